"""The server side of a deployment: the long-lived command on the server's machine.

    liquid-fed server-host --keys KEYS/server --work-dir DIR [--host 127.0.0.1] [--port 9092]
        [--nodes N] [--insecure] [--quiet]

``server-host`` starts a SuperLink (TLS on every API, SuperNode authentication on, its state
in ``DIR/superlink.db``) bound to 127.0.0.1 on a free port, registers the parties' public keys
(``KEYS/server/supernodes/party-*.pub``), and publishes only its Fleet API on
``--host:--port`` through :mod:`server.gate`. It takes no run config and runs until stopped
(Ctrl-C or SIGTERM): runs are submitted to it with ``liquid-fed submit`` (:mod:`server.submit`)
and listed with ``liquid-fed status``, one after another, while the parties
(:mod:`clients.host`) stay up.

What ``submit`` and ``status`` need to find it is written into the work folder (mode 0700,
files 0600): ``server.json`` (pid, the SuperLink's Control API address, the ``flwr`` CLI's
home) and ``flwr-cli/config.toml`` (the connection). Every process it starts (SuperLink,
gate, the SuperExec and ServerApps the SuperLink spawns) carries an environment tag and is
stopped when it stops, or, when it is killed outright (SIGKILL), by a reaper
(:func:`liquid_fed.procs.start_reaper`).

It binds to 127.0.0.1 unless told otherwise; ``--insecure`` (no TLS, no authentication) is
accepted only when every address involved is a loopback address.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liquid_fed import procs
from liquid_fed.errors import ConfigError, DeploymentError
from liquid_fed.procs import PROGRESS_ENV, check_insecure
from liquid_fed.rundir import atomic_write, private_folder
from server.deploy_local import CONNECTION, LocalDeployment
from server.keys import ServerKeys, load_keys

log = logging.getLogger("liquid_fed.hosts")

GATE = Path(__file__).resolve().parent / "gate.py"
#: What ``server-host`` writes into its work folder for ``submit`` and ``status``.
STATE_FILE = "server.json"
#: The progress line the ServerApp prints after each round (:mod:`server.app`).
PROGRESS = re.compile(r"\[liquid-fed\] (run \S+ round \d+/\d+ .*)$")


@dataclass(frozen=True)
class ServerState:
    """A running server host as its work folder describes it (``server.json``)."""

    work_dir: Path
    pid: int
    started: str  # the process's start time (clock ticks): tells a reused pid apart
    control: str  # the SuperLink's Control API, host:port (on this machine)
    flwr_home: Path  # the `flwr` CLI's home: config.toml with the connection CONNECTION
    fleet: str  # the public address of the Fleet API (the gate)
    secure: bool
    tag: str

    def alive(self) -> bool:
        """True while the server host that wrote the file still runs."""
        return procs.pid_alive(self.pid, self.started)


def find_server(work_dir: str | Path) -> ServerState:
    """The server host running on ``work_dir``.

    Raises:
        DeploymentError: none runs there (one line: where it looked and what to start).
    """
    work = Path(work_dir).resolve()
    state_file = work / STATE_FILE
    hint = f"start one with `liquid-fed server-host --keys KEYS/server --work-dir {work_dir}`"
    if not state_file.is_file():
        raise DeploymentError(f"no server-host is running for --work-dir {work_dir} "
                              f"({state_file} does not exist); {hint}")
    try:
        raw: dict[str, Any] = json.loads(state_file.read_text())
        state = ServerState(work, int(raw["pid"]), str(raw["started"]), str(raw["control"]),
                            Path(raw["flwr_home"]), str(raw["fleet"]), bool(raw["secure"]),
                            str(raw["tag"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeploymentError(f"--work-dir {work_dir}: {state_file} is unreadable ({exc}); "
                              f"{hint}") from None
    if not state.alive():
        raise DeploymentError(f"no server-host is running for --work-dir {work_dir} (the one "
                              f"that wrote {state_file}, pid {state.pid}, is gone); {hint}")
    return state


def wait_for_nodes(dep: LocalDeployment, n: int, wait: float, poll: float = 3.0) -> list[str]:
    """Poll ``flwr supernode ls`` until ``n`` SuperNodes are online; their node ids.

    Raises:
        DeploymentError: fewer than ``n`` online after ``wait`` seconds (says how many).
    """
    deadline = time.time() + wait
    online: list[str] = []
    while True:
        nodes = dep.flwr_list("supernode", "ls", CONNECTION, key="nodes", name="flwr-nodes")
        online = [str(node["node-id"]) for node in nodes if node.get("status") == "online"]
        if len(online) >= n:
            return online
        if time.time() > deadline:
            raise DeploymentError(f"{len(online)} of {n} SuperNodes online after {wait:.0f} s; "
                                  "are the party hosts running and can they reach this "
                                  "address?")
        log.info("%d of %d SuperNodes online", len(online), n)
        time.sleep(poll)


def start_gate(dep: LocalDeployment, host: str, port: int, keys: ServerKeys,
               wait: float = 60.0) -> procs.Child:
    """Put :mod:`server.gate` on ``host:port`` in front of ``dep``'s SuperLink."""
    dep.ports.append(port)
    gate = dep.spawn("fleet-gate", [
        sys.executable, str(GATE),
        "--host", host, "--port", str(port),
        "--upstream", f"127.0.0.1:{dep.superlink_port}", "--certfile", str(keys.cert),
        "--keyfile", str(keys.key), "--ca", str(keys.ca)], dep.work_dir / "gate-home")
    local = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.time() + wait
    while not procs.accepts(port, local):
        dep.check_alive(gate)
        if time.time() > deadline:
            raise DeploymentError(f"the Fleet gate did not open {host}:{port} within "
                                  f"{wait:.0f} s:\n{gate.tail()}")
        time.sleep(0.1)
    return gate


def server_host(keys_dir: str | None, work_dir: str, host: str = "127.0.0.1",
                port: int = 9092, nodes: int | None = None, insecure: bool = False,
                quiet: bool = False) -> int:
    """Run the long-lived server (SuperLink with a state database, key registration, the
    Fleet gate) until stopped.

    Args:
        keys_dir: the server folder of ``liquid-fed keys`` (None only with ``insecure``).
        work_dir: the server's folder: state database, logs, ``server.json`` (0700).
        host, port: where the parties reach the Fleet API (the gate; the SuperLink itself
            listens on 127.0.0.1 only).
        nodes: register only the first ``nodes`` keys of ``supernodes/`` (default: all).
        insecure: no TLS, no SuperNode authentication (refused off loopback; the SuperLink
            then serves the parties itself on ``host:port``).
        quiet: print only the start-up and progress lines.

    Returns:
        0 once stopped (Ctrl-C or SIGTERM arrive as KeyboardInterrupt in the CLI).

    Raises:
        ConfigError: bad input, refused before anything starts.
        DeploymentError: a process did not start or died; a server host already runs on
            ``work_dir``.
    """
    check_insecure(insecure, [host], "--host")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port: got {port}; accepted: 1..65535")
    # Absolute: the SuperLink and the gate run in the work folder, not where this was typed.
    keys = load_keys(Path(keys_dir).resolve() if keys_dir else None, insecure, ServerKeys,
                     "the server folder")
    public_keys = keys.node_public_keys() if keys is not None else []
    if keys is not None and not public_keys:
        raise ConfigError(f"--keys {keys_dir}: no public keys in supernodes/ (written by "
                          "`liquid-fed keys DIR --nodes N`)")
    if nodes is not None:
        if nodes < 1 or (keys is not None and nodes > len(public_keys)):
            raise ConfigError(f"--nodes: got {nodes}; accepted: 1..{len(public_keys)} (the "
                              f"public keys in {keys_dir}/supernodes)")
        public_keys = public_keys[:nodes]
    work = Path(work_dir).resolve()
    try:
        running = find_server(work)
    except DeploymentError:
        running = None
    if running is not None:
        raise DeploymentError(f"a server-host already runs on --work-dir {work_dir} (pid "
                              f"{running.pid}); stop it first or choose another --work-dir")
    os.umask(0o077)  # logs, state database, Flower homes: this user's only
    private_folder(work)
    state_file = work / STATE_FILE
    state_file.unlink(missing_ok=True)
    dep = LocalDeployment(0, work, None, host="127.0.0.1" if keys else host,
                          port=procs.free_port() if keys else port, server_keys=keys,
                          database=work / "superlink.db")
    progress = work / "progress.log"
    progress.touch()
    # The SuperLink's ServerApps inherit this: they append their progress lines there.
    os.environ[PROGRESS_ENV] = str(progress)
    with dep:
        try:
            dep.start()
            link = dep.children[0]
            gate = None
            if keys is not None:
                dep.register(public_keys)
                gate = start_gate(dep, host, port, keys)
            state = {"pid": os.getpid(), "started": procs.start_time(os.getpid()),
                     "control": f"{dep.local_host}:{dep.superlink_port}",
                     "flwr_home": str(dep.flwr_home), "fleet": f"{host}:{port}",
                     "secure": keys is not None, "tag": dep.tag}
            atomic_write(state_file, json.dumps(state, indent=2).encode(), mode=0o600)
            security = (f"TLS + SuperNode authentication, {len(public_keys)} party key(s)"
                        if keys is not None else "INSECURE")
            print(f"server-host: Fleet API on {host}:{port} ({security}); submit runs with "
                  f"`liquid-fed submit CONFIG --data-dir LABELS --work-dir {work_dir}`; "
                  f"Ctrl-C stops it (logs: {work})", file=sys.stderr, flush=True)
            with progress.open() as follow:
                follow.seek(0, os.SEEK_END)
                while True:
                    dep.check_alive(link, "serving")
                    if gate is not None:
                        dep.check_alive(gate, "serving")
                    for line in follow.readlines():
                        if not quiet and (match := PROGRESS.search(line)):
                            print(f"server-host: {match.group(1)}", file=sys.stderr,
                                  flush=True)
                    time.sleep(0.5)
        finally:
            state_file.unlink(missing_ok=True)
