"""The server side of a deployment: the command a person types on the server's machine.

    liquid-fed server-host CONFIG --keys KEYS/server --data-dir SHARDS/server
        [--host 127.0.0.1] [--port 9092] [--nodes N] [--set key=value ...] [--out DIR]
        [--wait-nodes SECONDS] [--timeout SECONDS] [--work-dir DIR] [--insecure]

``server-host`` starts a SuperLink (TLS on every API, SuperNode authentication on) bound to
127.0.0.1 and publishes only its Fleet API on ``--host:--port`` through :mod:`server.gate`;
it registers the parties' public keys (``KEYS/server/supernodes/party-*.pub``), waits until
that many SuperNodes are online, submits the run with ``flwr run`` (the ServerApp reads only
the label folder ``--data-dir``), waits for it to finish, then stops the SuperLink and the
gate. The parties' side is :mod:`clients.host`.

It binds to 127.0.0.1 unless told otherwise; ``--insecure`` (no TLS, no authentication) is
accepted only when every address involved is a loopback address.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from liquid_fed import procs
from liquid_fed.errors import ConfigError, DeploymentError
from liquid_fed.procs import check_insecure
from server.deploy_local import (
    CONNECTION,
    LocalDeployment,
    check_new_run_dir,
    resolve,
    submit_run,
)
from server.keys import ServerKeys, load_keys

log = logging.getLogger("liquid_fed.hosts")

GATE = Path(__file__).resolve().parent / "gate.py"


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
            raise DeploymentError(f"{len(online)} of {n} SuperNodes online after {wait:.0f} s "
                                  "(--wait-nodes); are the party hosts running and can they "
                                  "reach this address?")
        log.info("%d of %d SuperNodes online", len(online), n)
        time.sleep(poll)


def start_gate(dep: LocalDeployment, host: str, port: int, keys: ServerKeys,
               wait: float = 60.0) -> None:
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


def server_host(config: str, overrides: list[str], keys_dir: str | None, data_dir: str,
                host: str = "127.0.0.1", port: int = 9092, nodes: int | None = None,
                out: str | None = None, wait_nodes: float = 600.0, timeout: float = 3600.0,
                work_dir: str | None = None, insecure: bool = False, quiet: bool = False) -> int:
    """Start a SuperLink, register the parties, run the federation once, stop.

    Args:
        config: the YAML config the shards were split from.
        overrides: ``key=value`` strings (the same as for ``liquid-fed split``).
        keys_dir: the server folder of ``liquid-fed keys`` (None only with ``insecure``).
        data_dir: the server's label folder of ``liquid-fed split``.
        host, port: where the parties reach the SuperLink's Fleet API (through the gate).
        nodes: parties to wait for (default: ``views.n_views``).
        out: parent of the run folder (default: the config's ``out``).
        wait_nodes: seconds to wait for the parties to connect.
        timeout: seconds the run may take once submitted.
        work_dir: logs and Flower homes (default: a new temporary folder).
        insecure: no TLS, no SuperNode authentication (refused off loopback).
        quiet: don't stream the run's logs.

    Returns:
        0 once the run has finished and written its summary.

    Raises:
        ConfigError: bad input, refused before anything starts.
        DeploymentError: a process did not start, or the run failed or timed out.
    """
    check_insecure(insecure, [host], "--host")
    keys = load_keys(keys_dir, insecure, ServerKeys, "the server folder")
    cfg, overrides, n_nodes = resolve(config, overrides, out, nodes)
    from liquid_fed.shards import load_server_shard

    load_server_shard(data_dir, cfg)  # refused here, before anything starts
    if keys is not None and len(keys.node_public_keys()) < n_nodes:
        raise ConfigError(f"--keys {keys_dir}: {len(keys.node_public_keys())} public key(s) "
                          f"in supernodes/ for {n_nodes} parties")
    run_dir = Path(cfg.out) / cfg.name
    check_new_run_dir(run_dir)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="lf-server-"))
    # Secure: the SuperLink (all its APIs) on loopback, only the Fleet API through the gate.
    dep = LocalDeployment(0, work, None if quiet else sys.stderr,
                          host="127.0.0.1" if keys else host,
                          port=procs.free_port() if keys else port, server_keys=keys)
    with dep:
        dep.start()
        if keys is not None:
            dep.register(keys.node_public_keys()[:n_nodes])
            start_gate(dep, host, port, keys)
        print(f"SuperLink on {host}:{port} "
              f"({'TLS + SuperNode authentication, Fleet API only' if keys else 'INSECURE'}); "
              f"waiting for {n_nodes} parties (logs: {work})", file=sys.stderr)
        online = wait_for_nodes(dep, n_nodes, wait_nodes)
        print(f"{len(online)} SuperNodes online; starting the run", file=sys.stderr)
        run_id, status, summary = submit_run(dep, config, overrides, run_dir,
                                             timeout, Path(data_dir))
    metric = summary.get("metric", "accuracy")
    print(f"run {run_id} {status}: {summary.get('rounds', 0)} rounds, test {metric} "
          f"{summary.get('test', {}).get(metric, float('nan')):.4f}\n  outputs: {run_dir}")
    return 0
