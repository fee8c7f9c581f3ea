"""Rehearse a real deployment on one machine: a SuperLink, N SuperNodes and ``flwr run``.

    liquid-fed deploy-local [CONFIG] [--set key=value ...] [--clients N] [--out DIR]
        [--timeout SECONDS] [--keep-logs DIR] [--mode fast|warm|stock]
        [--keys DIR | --insecure] [--shards DIR | --no-shards]
    python -m simulations.deploy_local ...   (the same options)

Starts ``flower-superlink`` (127.0.0.1, a free port) and one ``flower-supernode`` per client
(``--node-config 'partition-id=K num-partitions=N data-dir="<shards>/party-K"'``, each on its
own port), writes the connection into a temporary ``FLWR_HOME/config.toml``, submits the app
with ``flwr run . local-deploy --stream --run-config ...`` and waits for the run to finish.

Secure by default: every API runs over TLS (a CA and a server certificate from
:mod:`simulations.keys`, new in the work folder unless ``--keys DIR``), the SuperLink runs
with ``--enable-supernode-auth`` and admits only the SuperNodes whose public keys were
registered with ``flwr supernode register``; ``--insecure`` is an explicit opt-in. Private by
default: the config is split (``liquid-fed split``) into the work folder; node K reads only
``party-K`` and the ServerApp only ``server`` (``--shards DIR`` uses an existing split,
``--no-shards`` lets every node load the whole data set).

Every process it started (SuperLink, SuperNodes and what they spawn: SuperExec, ServerApp,
ClientApp processes) carries an environment tag; whatever happens (success, failure, timeout,
Ctrl-C) they are all stopped with SIGTERM, then SIGKILL, before the command returns.

``--mode`` says how the SuperNodes run the ClientApp (:mod:`clients.supernode`): ``fast``
(default) keeps one ClientApp worker per node warm and shortens the SuperNodes' waits, ``warm``
only keeps the worker, ``stock`` is Flower's own process per message. In the warm modes a
SuperNode stops as soon as its worker dies, and the run fails at once naming that node.

The run folder is ``<DIR>/<name>`` (``--out`` is passed to the ServerApp as an absolute
``out``; without it, ``<out>/<name>`` of the config relative to the current directory).
Exit status: 0 when the run finished and wrote its summary, 1 when it failed or timed out
(the ServerApp's error is printed), 2 when the config is rejected before launch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from liquid_fed.config import ConfigError, RunConfig, load_config
from liquid_fed.errors import LiquidFedError
from simulations import procs
from simulations.keys import KeySet, PartyKeys, ServerKeys, make_keys, write_node_key

log = logging.getLogger("liquid_fed.deploy")

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower App (pyproject.toml)
TAG_ENV = "LIQUID_FED_DEPLOY_TAG"
CONNECTION = "local-deploy"
CHILD_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
#: How SuperNodes run the ClientApp (clients/supernode.py): "stock" (Flower's process per
#: message), "warm" (one long-lived worker per node), "fast" (warm + shorter SuperNode waits).
MODES = ("stock", "warm", "fast")
DEFAULT_MODE = "fast"
_ROUND = re.compile(r"\[RUN \d+, ROUND (\d+)\]")
_MODE = re.compile(r"SuperNode \S+: mode (\w+) \(asked")


class DeploymentError(RuntimeError):
    """The deployment could not start, the run failed, or it did not finish in time.

    ``tag`` and ``ports`` name what the deployment used (all stopped and freed by then).
    """

    tag: str = ""
    ports: tuple[int, ...] = ()


@dataclass
class DeployResult:
    """What a finished deployment run produced and how long its parts took (seconds)."""

    run_dir: Path
    run_id: str
    status: str
    superlink_ready_seconds: float
    node_connect_seconds: list[float]
    run_seconds: float  # from `flwr run` until the run finished
    total_seconds: float
    exchange_seconds: list[float]  # between successive protocol exchanges (one round trip each)
    ports: list[int]
    tag: str
    summary: dict[str, Any] = field(default_factory=dict)
    secure: bool = False  # TLS and SuperNode authentication
    shards: Path | None = None  # the private shards the nodes and the ServerApp read
    rogue_exits: list[tuple[int | None, str]] = field(default_factory=list)
    mode: str = DEFAULT_MODE  # how the SuperNodes ran the ClientApp (after any fallback)

    @property
    def round_trip_seconds(self) -> float:
        """Median time of one protocol exchange (a round trip to every node)."""
        return statistics.median(self.exchange_seconds) if self.exchange_seconds else float("nan")


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (it can be bound again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _executable(name: str) -> str:
    """A Flower entry point next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} is not installed (looked in {local.parent} and PATH)")
    return found


class _Child:
    """A child process in its own session whose output goes, time-stamped, to a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path,
                 log_path: Path, echo: IO[str] | None = None) -> None:
        self.name, self.log_path, self.echo = name, log_path, echo
        self.started = time.time()
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log_path.open("w") as out:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                now = time.time()
                with self._lock:
                    self.lines.append((now, line.rstrip("\n")))
                out.write(f"{now:.3f} {line}")
                out.flush()
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()

    def find(self, pattern: re.Pattern[str]) -> list[tuple[float, re.Match[str]]]:
        with self._lock:
            lines = list(self.lines)
        return [(t, m) for t, line in lines if (m := pattern.search(line))]

    def tail(self, n: int = 15) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines[-n:])

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_closed(self, timeout: float) -> None:
        self._reader.join(timeout)


# --------------------------------------------------------------------------------------------
# TLS and SuperNode authentication (the flags every process of a deployment gets)
# --------------------------------------------------------------------------------------------


def superlink_security_args(keys: ServerKeys | None) -> list[str]:
    """``flower-superlink`` flags: TLS on every API and SuperNode authentication, or
    ``--insecure`` when ``keys`` is None."""
    if keys is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(keys.ca), "--ssl-certfile", str(keys.cert),
            "--ssl-keyfile", str(keys.key), "--enable-supernode-auth"]


def supernode_security_args(keys: PartyKeys | None, private_key: Path | None = None
                            ) -> list[str]:
    """``flower-supernode`` flags: the CA that signed the SuperLink's certificate and the
    node's auth key (``private_key`` replaces the party's own), or ``--insecure``."""
    if keys is None:
        return ["--insecure"]
    return ["--root-certificates", str(keys.ca),
            "--auth-supernode-private-key", str(private_key or keys.private_key)]


def connection_toml(name: str, address: str, ca: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: one connection, TLS unless ``ca`` is
    None."""
    security = f"root-certificates = {json.dumps(str(ca))}\n" if ca else "insecure = true\n"
    return (f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
            f'address = "{address}"\n{security}')


def supernode_command(mode: str, name: str, flower: list[str]) -> list[str]:
    """A SuperNode with ``flower-supernode`` flags ``flower``, run as ``mode`` says
    (:mod:`clients.supernode`); its runtime API on 127.0.0.1."""
    if mode == "stock":
        return [_executable("flower-supernode"), *flower, "--host", "127.0.0.1"]
    return [sys.executable, "-m", "clients.supernode", "--mode", mode, "--name", name, "--",
            *flower, "--host", "127.0.0.1"]


def node_config(k: int, n: int, data_dir: Path | None = None) -> str:
    """A SuperNode's ``--node-config``: its partition and, with shards, its private folder."""
    text = f"partition-id={k} num-partitions={n}"
    if data_dir is not None:
        path = str(Path(data_dir).resolve())
        if any(c in path for c in "\"'\n"):
            raise ConfigError(f"data-dir: got {path!r}; Flower's node config cannot carry "
                              "quotes or newlines in a path")
        text += f' data-dir="{path}"'
    return text


class LocalDeployment:
    """A SuperLink and ``n_nodes`` SuperNodes on 127.0.0.1, stopped by :meth:`stop`.

    Use as a context manager: every process started (and every process they spawn) carries
    ``LIQUID_FED_DEPLOY_TAG=<tag>`` and is gone after ``__exit__``.

    With ``keys`` every API runs over TLS, the SuperLink admits only SuperNodes whose public
    key it registered (party k signs with ``keys.party(k)``); ``keys=None`` is insecure.
    ``shards``: party k's node config names ``<shards>/party-k`` as its ``data-dir``.
    ``rogue``: that many extra SuperNodes with fresh keys the SuperLink never registered,
    started after the others connected (each must be refused: see :attr:`rogue_exits`).
    """

    def __init__(self, n_nodes: int, work_dir: Path, echo: IO[str] | None = None,
                 keys: KeySet | None = None, shards: Path | None = None,
                 rogue: int = 0, host: str = "127.0.0.1", port: int | None = None,
                 server_keys: ServerKeys | None = None, mode: str = DEFAULT_MODE) -> None:
        if mode not in MODES:
            raise ConfigError(f"--mode: got {mode!r}; accepted: {', '.join(MODES)}")
        self.n_nodes = n_nodes
        self.mode = mode
        self.host, self.port = host, port
        self.server_keys = server_keys or (keys.server if keys is not None else None)
        self.work_dir = Path(work_dir)
        self.echo = echo
        self.keys = keys
        self.shards = shards
        self.rogue = rogue
        self.rogue_exits: list[tuple[int | None, str]] = []  # (exit status, log tail) each
        self.tag = f"lf-deploy-{uuid.uuid4().hex}"
        self.children: list[_Child] = []
        self.ports: list[int] = []
        self.superlink_port = 0
        self.superlink_ready_seconds = float("nan")
        self.node_connect_seconds: list[float] = []
        self.nodes: list[_Child] = []
        self.flwr_home = self.work_dir / "flwr-cli"  # the `flwr` CLI's home: the connection

    def env(self, home: Path) -> dict[str, str]:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # clients.supernode / clients.worker come from this app, not another install.
        pythonpath = os.pathsep.join(p for p in (str(APP_DIR), os.environ.get("PYTHONPATH"))
                                     if p)
        return {**os.environ, **CHILD_ENV, TAG_ENV: self.tag, "FLWR_HOME": str(home),
                "PATH": path, "PYTHONPATH": pythonpath}

    def _spawn(self, name: str, cmd: list[str], home: Path, echo: bool = False) -> _Child:
        home.mkdir(parents=True, exist_ok=True)
        child = _Child(name, cmd, self.env(home), self.work_dir, self.work_dir / f"{name}.log",
                       self.echo if echo else None)
        self.children.append(child)
        return child

    def _check_alive(self, child: _Child, during: str = "start-up") -> None:
        if child.proc.poll() is not None:
            child.wait_closed(2)
            raise DeploymentError(
                f"{child.name} exited with status {child.proc.returncode} during {during}:\n"
                f"{child.tail()}"
            )

    def check_nodes(self) -> None:
        """Raise :class:`DeploymentError` naming the first SuperNode that has exited (in warm
        modes a SuperNode stops as soon as its ClientApp worker dies)."""
        for node in self.nodes:
            self._check_alive(node, "the run")

    def supernode_command(self, k: int, port: int) -> list[str]:
        """The command of SuperNode ``k`` for :attr:`mode` (its Runtime API on ``port``)."""
        flower = [*supernode_security_args(self.keys.party(k) if self.keys else None),
                  "--superlink", f"127.0.0.1:{self.superlink_port}", "--port", str(port),
                  "--node-config", self.node_config(k)]
        return supernode_command(self.mode, f"supernode-{k}", flower)

    def start(self, wait: float = 60.0) -> None:
        """Start the SuperLink, then the SuperNodes; return once every node is connected."""
        t0 = time.time()
        self.superlink_port = self.port or free_port()
        self.ports.append(self.superlink_port)
        link = self._spawn("superlink", [
            _executable("flower-superlink"), *superlink_security_args(self.server_keys),
            "--host", self.host,
            "--port", str(self.superlink_port), "--disable-runtime-dependency-installation",
        ], self.work_dir / "superlink-home")
        deadline = time.time() + wait
        while not _accepts(self.superlink_port, self.local_host):
            self._check_alive(link)
            if time.time() > deadline:
                raise DeploymentError(f"the SuperLink did not open port {self.superlink_port} "
                                      f"within {wait:.0f} s:\n{link.tail()}")
            time.sleep(0.1)
        self.superlink_ready_seconds = time.time() - t0
        self.write_connection()
        if self.server_keys is not None:
            self.register(self.server_keys.node_public_keys()[:self.n_nodes])
        for k in range(self.n_nodes):
            port = free_port()
            self.ports.append(port)
            self.nodes.append(self._spawn(f"supernode-{k}", self.supernode_command(k, port),
                                          self.work_dir / f"supernode-{k}-home"))
        connected: dict[int, float] = {}
        while len(connected) < self.n_nodes:
            for k, node in enumerate(self.nodes):
                if k not in connected:
                    self._check_alive(node)
                    if hits := node.find(_NODE_ID):
                        connected[k] = hits[0][0] - node.started
            if time.time() > deadline:
                missing = sorted(set(range(self.n_nodes)) - set(connected))
                raise DeploymentError(
                    f"SuperNodes {missing} did not connect within {wait:.0f} s:\n"
                    f"{self.nodes[missing[0]].tail()}")
            time.sleep(0.1)
        self.node_connect_seconds = [connected[k] for k in range(self.n_nodes)]
        self._check_alive(link)
        if self.rogue:
            self.start_rogues(deadline)

    def node_config(self, k: int) -> str:
        shard = self.shards / f"party-{k}" if self.shards is not None else None
        return node_config(k, self.n_nodes, shard)

    def register(self, public_keys: list[Path]) -> None:
        """Let the SuperNodes holding these keys' private halves in (Control API; one ``flwr``
        CLI process per key, all at once: each spends seconds importing Flower)."""
        regs = [(pub, self.flwr("supernode", "register", str(pub), CONNECTION,
                                name=f"flwr-register-{pub.stem}")) for pub in public_keys]
        for pub, reg in regs:
            rc = reg.proc.wait(timeout=120)
            reg.wait_closed(5)
            if rc != 0:
                raise DeploymentError(f"`flwr supernode register {pub}` failed (exit "
                                      f"{rc}):\n{reg.tail()}")

    def start_rogues(self, deadline: float) -> None:
        """SuperNodes with keys nobody registered; wait until the SuperLink turned each away.

        A rogue claims a partition-id beyond the parties': were it let in, the ServerApp
        would refuse to start the run.
        """
        if self.keys is None:
            raise DeploymentError("rogue nodes need a secure deployment (keys)")
        rogues = []
        for i in range(self.rogue):
            key, _ = write_node_key(self.work_dir / "rogue-keys", f"rogue-{i}")
            port = free_port()
            self.ports.append(port)
            rogues.append(self._spawn(f"rogue-{i}", [
                _executable("flower-supernode"),
                *supernode_security_args(self.keys.party(0), private_key=key),
                "--superlink", f"127.0.0.1:{self.superlink_port}", "--port", str(port),
                "--node-config", f"partition-id={self.n_nodes + i} "
                                 f"num-partitions={self.n_nodes}",
            ], self.work_dir / f"rogue-{i}-home"))
        for child in rogues:
            while child.proc.poll() is None and time.time() < deadline:
                if child.find(_NODE_ID):
                    raise DeploymentError(f"{child.name}, whose key was never registered, "
                                          f"was let in:\n{child.tail()}")
                time.sleep(0.1)
            child.wait_closed(2)
            self.rogue_exits.append((child.proc.poll(), child.tail()))

    def node_modes(self) -> list[str]:
        """The mode each SuperNode runs in: the one asked for unless the installed Flower
        did not fit it (then the SuperNode fell back and logged why)."""
        if self.mode == "stock":
            return ["stock"] * len(self.nodes)
        return [hits[0][1].group(1) if (hits := node.find(_MODE)) else "unknown"
                for node in self.nodes]

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: one connection (TLS with keys)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        path.write_text(connection_toml(CONNECTION, f"{host}:{self.superlink_port}",
                                        self.server_keys.ca if self.server_keys else None))
        return path

    @property
    def local_host(self) -> str:
        """How processes on this machine reach the SuperLink (a wildcard bind: loopback)."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    def flwr(self, *args: str, name: str = "flwr", echo: bool = False) -> _Child:
        """Start the ``flwr`` CLI against this deployment's connection."""
        return self._spawn(name, [_executable("flwr"), *args], self.flwr_home, echo)

    def flwr_list(self, *args: str, key: str, name: str, timeout: float = 120.0
                  ) -> list[dict[str, Any]]:
        """Run ``flwr ARGS --format json`` to the end and return its list under ``key``.

        Raises:
            DeploymentError: the output holds no such list (its tail is in the message).
        """
        ls = self.flwr(*args, "--format", "json", name=name)
        ls.proc.wait(timeout=timeout)
        ls.wait_closed(5)
        text = "\n".join(line for _, line in ls.lines)
        try:
            return json.loads(text[text.index("{"):])[key]
        except (ValueError, KeyError) as exc:
            raise DeploymentError(f"`flwr {' '.join(args)}` gave no {key} list:\n"
                                  f"{text[-2000:]}") from exc

    def exchange_seconds(self) -> list[float]:
        """Time between successive protocol exchanges, from the nodes' time-stamped logs.

        A node logs ``[RUN r, ROUND g]`` when it sends its reply to exchange ``g``; an exchange
        ends when the last node has replied.
        """
        ends: dict[int, float] = {}
        for node in self.nodes:
            for t, m in node.find(_ROUND):
                g = int(m.group(1))
                ends[g] = max(ends.get(g, 0.0), t)
        times = [ends[g] for g in sorted(ends)]
        return [b - a for a, b in zip(times[:-1], times[1:], strict=True)]

    def stop(self, grace: float = 8.0) -> set[int]:
        """SIGTERM every child's session, then SIGTERM/SIGKILL anything tagged that is left;
        returns the pids still alive afterwards (normally none)."""
        for child in reversed(self.children):
            child.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in self.children):
            time.sleep(0.1)
        left = procs.kill_tagged(TAG_ENV, self.tag, grace=3.0)
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
            child.proc.wait(timeout=5)
            child.wait_closed(2)
        return left

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        left = self.stop()
        if left:
            log.warning("processes still alive after cleanup: %s", sorted(left))


def _accepts(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def resolve(config: str | Path | None, overrides: list[str], out: str | Path | None,
            clients: int | None = None) -> tuple[RunConfig, list[str], int]:
    """Validate the config here, before any process starts.

    Returns:
        The resolved config, the overrides to send (with an absolute ``out``), and the number
        of SuperNodes to start.

    Raises:
        ConfigError: for a bad key or value, data, view or expert option (names the key).
    """
    from liquid_fed.runs import check_run

    overrides = list(overrides)
    if out is not None:
        overrides.append(f"out={Path(out).resolve()}")
    cfg = load_config(config, overrides)
    if out is None and not Path(cfg.out).is_absolute():
        overrides.append(f"out={Path(cfg.out).resolve()}")  # the SuperLink has another cwd
        cfg = load_config(config, overrides)
    check_run(cfg)
    n = cfg.n_clients if clients is None else clients
    if n < cfg.n_clients:
        raise ConfigError(f"--clients: got {n}; the config needs at least {cfg.n_clients} "
                          "(views.n_views)")
    return cfg, overrides, n


def _config_for_app(config: str | Path | None) -> str:
    """The ``config`` run-config value: relative to the app when the file lies inside it."""
    if config is None:
        return ""
    path = Path(config).resolve()
    try:
        return str(path.relative_to(APP_DIR))
    except ValueError:
        return str(path)


def _run_status(dep: LocalDeployment, run_id: str | None, wait: float = 20.0) -> dict[str, Any]:
    """The run's row from ``flwr ls --format json`` once it has finished."""
    deadline = time.time() + wait
    row: dict[str, Any] = {}
    while True:
        runs = dep.flwr_list("ls", CONNECTION, key="runs", name="flwr-ls", timeout=60)
        rows = [r for r in runs if run_id is None or str(r["run-id"]) == run_id]
        if rows:
            row = rows[-1]
            if str(row.get("status", "")).startswith("finished") or time.time() > deadline:
                return row
        elif time.time() > deadline:
            return row
        time.sleep(1.0)


def submit_run(dep: LocalDeployment, config: str | Path | None, overrides: list[str],
               run_dir: Path, timeout: float, server_data: Path | None = None
               ) -> tuple[str, str, dict[str, Any]]:
    """``flwr run`` the app on ``dep``'s SuperLink and wait until the run has finished.

    Args:
        server_data: the server's label folder (the ServerApp's run config ``data-dir``).

    Returns:
        The run id, its final status and its ``summary.json``.

    Raises:
        DeploymentError: the run failed, ended otherwise than completed, or took longer than
            ``timeout`` seconds.
    """
    run_config = dep.work_dir / "run-config.toml"
    settings = {"config": _config_for_app(config), "set": shlex.join(overrides)}
    if server_data is not None:
        settings["data-dir"] = str(Path(server_data).resolve())
    _write_toml(run_config, settings)
    runner = dep.flwr("run", str(APP_DIR), CONNECTION, "--stream",
                      "--run-config", str(run_config), name="flwr-run", echo=True)
    deadline = time.time() + timeout
    while (rc := runner.proc.poll()) is None:
        dep.check_nodes()  # a node (or its worker) died: fail now, naming it
        if time.time() > deadline:
            raise DeploymentError(
                f"the run did not finish within {timeout:.0f} s (--timeout); stopped it. "
                f"Logs: {dep.work_dir}")
        time.sleep(0.2)
    runner.wait_closed(5)
    started = runner.find(re.compile(r"Successfully started run (\d+)"))
    if rc != 0 or not started:
        raise DeploymentError(f"`flwr run` failed (exit {rc}):\n{runner.tail(25)}")
    run_id = started[0][1].group(1)
    row = _run_status(dep, run_id)
    status = str(row.get("status", "unknown"))
    if status != "finished:completed":
        raise DeploymentError(
            f"run {run_id} ended as {status}: {row.get('status-details', '')}")
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise DeploymentError(f"run {run_id} completed but wrote no {summary_file}")
    return run_id, status, json.loads(summary_file.read_text())


def deploy(config: str | Path | None, overrides: list[str] = (), clients: int | None = None,
           out: str | Path | None = None, timeout: float = 900.0,
           work_dir: str | Path | None = None, echo: IO[str] | None = None,
           keys: str | Path | None = None, insecure: bool = False,
           shards: str | Path | bool = True, rogue: int = 0, mode: str = DEFAULT_MODE,
           after_run: Callable[[LocalDeployment], None] | None = None) -> DeployResult:
    """Run the federation on a real SuperLink and SuperNodes on this machine.

    By default every API runs over TLS, the SuperLink admits only the SuperNodes whose keys it
    registered, and each node reads only its private shard (written by ``liquid-fed split``
    into the work folder) while the ServerApp reads only the server's label folder.

    Args:
        config: YAML config (inside the app, or any path on this machine).
        overrides: ``key=value`` strings (sent to the ServerApp in the run config's ``set``).
        clients: SuperNodes to start (default: the config's ``views.n_views``).
        out: parent folder of the run folder (default: the config's ``out``).
        timeout: seconds the run may take once submitted.
        work_dir: where logs and the Flower homes go (default: a new temporary folder,
            removed afterwards).
        echo: a stream that receives the run's logs as ``flwr run --stream`` prints them.
        keys: a folder written by ``liquid-fed keys`` (default: new keys in the work folder).
        insecure: no TLS, no SuperNode authentication (explicit opt-in; ``keys`` must be None).
        shards: a folder written by ``liquid-fed split`` for this config, True to split into
            the work folder, False to let every node load the whole data set (a rehearsal
            that is not private).
        rogue: extra SuperNodes with unregistered keys, each of which must be refused.
        mode: how SuperNodes run the ClientApp: ``"fast"`` (default: a long-lived worker per
            node and shorter SuperNode waits), ``"warm"`` (the worker, Flower's waits) or
            ``"stock"`` (Flower's process per message). A faster mode falls back to
            ``"stock"`` with a warning when the installed Flower does not fit it.
        after_run: called with the still running deployment once the run has finished
            (e.g. to measure it while idle).

    Returns:
        A :class:`DeployResult` (run folder, timings, the run's summary).

    Raises:
        ConfigError: the config is rejected before anything starts.
        DeploymentError: a process did not start, the run failed or did not finish in time;
            the message carries the ServerApp's error. Every process is stopped either way.
    """
    cfg, overrides, n_nodes = resolve(config, list(overrides), out, clients)
    if insecure and (keys is not None or rogue):
        raise ConfigError("--insecure: cannot be combined with --keys or rogue nodes")
    key_set = None if insecure or keys is None else KeySet(Path(keys), n_nodes)
    if key_set is not None:
        key_set.server.check()
        for k in range(n_nodes):
            key_set.party(k).check()
    shard_dir = None if shards is True or shards is False else Path(shards)
    if shard_dir is not None:
        from liquid_fed.shards import load_party_shard, load_server_shard

        load_server_shard(shard_dir / "server", cfg)  # refused here, before anything starts
        for k in range(cfg.n_clients):
            load_party_shard(shard_dir / f"party-{k}", k, cfg)
    run_dir = Path(cfg.out) / cfg.name
    own_dir = work_dir is None
    base = Path(tempfile.mkdtemp(prefix="lf-deploy-")) if own_dir else Path(work_dir)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        if key_set is None and not insecure:
            key_set = make_keys(base / "keys", n_nodes)
        if shards is True:
            from liquid_fed.shards import write_shards

            shard_dir = base / "shards"
            write_shards(cfg, shard_dir)
    except BaseException:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
        raise
    dep = LocalDeployment(n_nodes, base, echo, keys=key_set, shards=shard_dir, rogue=rogue,
                          mode=mode)
    try:
        with dep:
            dep.start()
            t_run = time.time()
            run_id, status, summary = submit_run(
                dep, config, overrides, run_dir, timeout,
                shard_dir / "server" if shard_dir is not None else None)
            run_seconds = time.time() - t_run
            exchanges = dep.exchange_seconds()
            if after_run is not None:
                after_run(dep)
            return DeployResult(
                run_dir=run_dir, run_id=run_id, status=status,
                superlink_ready_seconds=dep.superlink_ready_seconds,
                node_connect_seconds=dep.node_connect_seconds, run_seconds=run_seconds,
                total_seconds=time.time() - t0, exchange_seconds=exchanges,
                ports=list(dep.ports), tag=dep.tag,
                summary=summary, mode=",".join(sorted(set(dep.node_modes()))),
                secure=key_set is not None, shards=shard_dir,
                rogue_exits=list(dep.rogue_exits))
    except DeploymentError as exc:
        exc.tag, exc.ports = dep.tag, tuple(dep.ports)
        raise
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


def _write_toml(path: Path, data: dict[str, Any]) -> None:
    import tomli_w  # a dependency of flwr

    path.write_text(tomli_w.dumps(data))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``liquid-fed deploy-local`` (and ``python -m simulations.deploy_local``)."""
    parser.add_argument("config_arg", nargs="?", metavar="CONFIG",
                        help="YAML config (same as --config)")
    parser.add_argument("--config", default=str(APP_DIR / "configs" / "quickstart.yaml"),
                        help="YAML config (default: configs/quickstart.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.epochs=1 (repeatable)")
    parser.add_argument("--clients", type=int, help="SuperNodes to start "
                        "(default: the config's views.n_views)")
    parser.add_argument("--out", help="parent of the run folder (default: the config's out)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds the run may take once submitted (default: 900)")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="keep the processes' logs and Flower homes in DIR")
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                        help="how SuperNodes run the ClientApp: fast (default: a long-lived "
                        "worker per node, shorter waits), warm (the worker only) or stock "
                        "(Flower's process per message)")
    parser.add_argument("--quiet", action="store_true", help="don't stream the run's logs")
    parser.add_argument("--keys", metavar="DIR", help="keys written by `liquid-fed keys` "
                        "(default: new keys in the work folder)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication (explicit opt-in)")
    shard = parser.add_mutually_exclusive_group()
    shard.add_argument("--shards", metavar="DIR", help="shards written by `liquid-fed split` "
                       "for this config (default: split into the work folder)")
    shard.add_argument("--no-shards", action="store_true",
                       help="every node loads the whole data set (a rehearsal, not private)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.deploy_local",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_args(args)


def run_args(args: argparse.Namespace) -> int:
    """Deploy as the parsed command line says; the exit status."""
    signal.signal(signal.SIGTERM, _raise_interrupt)  # stop the deployment like Ctrl-C
    if args.config_arg:
        args.config = args.config_arg
    shards: str | bool = args.shards or not args.no_shards
    try:
        cfg, _, _ = resolve(args.config, args.set, args.out, args.clients)
        run_dir = Path(cfg.out) / cfg.name
        if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
            raise ConfigError(f"run folder {run_dir} already holds results; choose another "
                              "--out or --set name=...")
        result = deploy(args.config, args.set, args.clients, args.out, args.timeout,
                        args.keep_logs, None if args.quiet else sys.stderr, keys=args.keys,
                        insecure=args.insecure, shards=shards, mode=args.mode)
    except (LiquidFedError, ValueError, FileNotFoundError) as exc:  # ConfigError: ValueError
        print(f"deploy_local: error: {exc}", file=sys.stderr)
        return 2
    except DeploymentError as exc:
        print(f"deploy_local: run failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deploy_local: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return 130
    print(format_result(result))
    return 0


def format_result(result: DeployResult) -> str:
    """A few lines: where the outputs are, the test score and the deployment's timings."""
    summary = result.summary
    metric = summary.get("metric", "accuracy")
    score = summary.get("test", {}).get(metric, float("nan"))
    connect = ", ".join(f"{s:.1f}" for s in result.node_connect_seconds)
    security = "TLS + SuperNode authentication" if result.secure else "INSECURE (no TLS/auth)"
    data = "the whole data set"
    if result.shards is not None:
        data = (f"private shards in {result.shards}" if result.shards.exists()
                else "private shards (split into the work folder, now removed)")
    return "\n".join([
        f"run {result.run_id} {result.status}: {summary.get('rounds', 0)} rounds, "
        f"test {metric} {score:.4f}",
        f"  {security}; nodes read {data}",
        f"  SuperLink ready {result.superlink_ready_seconds:.1f} s; nodes connected after "
        f"[{connect}] s",
        f"  flwr run until finished {result.run_seconds:.1f} s; round trip per exchange "
        f"{result.round_trip_seconds:.1f} s (median of {len(result.exchange_seconds)}); "
        f"total {result.total_seconds:.1f} s",
        f"  outputs: {result.run_dir}",
    ])


if __name__ == "__main__":
    sys.exit(main())
