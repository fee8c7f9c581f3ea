"""The commands a person types on each machine of a real deployment.

    liquid-fed server-host CONFIG --keys KEYS/server --data-dir SHARDS/server
        [--host 127.0.0.1] [--port 9092] [--nodes N] [--set key=value ...] [--out DIR]
        [--wait-nodes SECONDS] [--timeout SECONDS] [--work-dir DIR] [--insecure]
    liquid-fed party-host --superlink HOST:PORT --keys KEYS/party-K --data-dir SHARDS/party-K
        --partition-id K --num-partitions N [--port PORT] [--work-dir DIR] [--insecure]

``server-host`` starts a SuperLink (TLS on every API, SuperNode authentication on) bound to
127.0.0.1 and publishes only its Fleet API on ``--host:--port`` through
:mod:`simulations.fleet_gate`; it registers the parties' public keys
(``KEYS/server/supernodes/party-*.pub``), waits until that many SuperNodes are online, submits
the run with ``flwr run`` (the ServerApp reads only the label folder ``--data-dir``), waits for
it to finish, then stops the SuperLink and the gate.

``party-host`` starts one SuperNode that trusts only the CA in ``KEYS/party-K/ca.crt``, signs
its requests with ``KEYS/party-K/supernode.key`` and gives its ClientApp the node config
``partition-id=K num-partitions=N data-dir="SHARDS/party-K"``; it runs until stopped (Ctrl-C
or SIGTERM) or until the SuperNode exits. Its local runtime API listens on 127.0.0.1 only.

Both bind to 127.0.0.1 unless told otherwise; ``--insecure`` (no TLS, no authentication) is
accepted only when every address involved is a loopback address.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from liquid_fed.errors import ConfigError, LiquidFedError
from simulations.deploy_local import (
    _NODE_ID,
    CONNECTION,
    DEFAULT_MODE,
    MODES,
    DeploymentError,
    LocalDeployment,
    _accepts,
    free_port,
    node_config,
    resolve,
    submit_run,
    supernode_command,
    supernode_security_args,
)
from simulations.keys import PartyKeys, ServerKeys

log = logging.getLogger("liquid_fed.hosts")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for wildcards and anything else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); raises ConfigError naming the value."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--superlink: got {address!r}; accepted: HOST:PORT, e.g. "
                          "10.0.0.5:9092 or [fd00::5]:9092")
    return host.strip("[]"), int(port)


def _check_security(insecure: bool, hosts: list[str], what: str) -> None:
    if insecure and not all(is_loopback(h) for h in hosts):
        raise ConfigError(f"--insecure with {what} {', '.join(hosts)}: refused; without TLS "
                          "and SuperNode authentication only loopback (127.0.0.1) is allowed. "
                          "Make keys with `liquid-fed keys` and pass --keys instead")


# --------------------------------------------------------------------------------------------
# Server host
# --------------------------------------------------------------------------------------------


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
    """Put :mod:`simulations.fleet_gate` on ``host:port`` in front of ``dep``'s SuperLink."""
    dep.ports.append(port)
    gate = dep._spawn("fleet-gate", [
        sys.executable, str(Path(__file__).resolve().parent / "fleet_gate.py"),
        "--host", host, "--port", str(port),
        "--upstream", f"127.0.0.1:{dep.superlink_port}", "--certfile", str(keys.cert),
        "--keyfile", str(keys.key), "--ca", str(keys.ca)], dep.work_dir / "gate-home")
    local = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.time() + wait
    while not _accepts(port, local):
        dep._check_alive(gate)
        if time.time() > deadline:
            raise DeploymentError(f"the Fleet gate did not open {host}:{port} within "
                                  f"{wait:.0f} s:\n{gate.tail()}")
        time.sleep(0.1)


def _keys(args: argparse.Namespace, kind: type, which: str) -> Any:
    """The checked key folder of ``--keys``, or None with ``--insecure``."""
    if args.insecure:
        return None
    if not args.keys:
        raise ConfigError(f"--keys: missing; give {which} written by `liquid-fed keys` (or "
                          "--insecure on 127.0.0.1 only)")
    keys = kind(Path(args.keys))
    keys.check()
    return keys


def server_host(args: argparse.Namespace) -> int:
    """Start a SuperLink, register the parties, run the federation once, stop."""
    _check_security(args.insecure, [args.host], "--host")
    keys = _keys(args, ServerKeys, "the server folder")
    cfg, overrides, n_nodes = resolve(args.config, args.set or [], args.out, args.nodes)
    from liquid_fed.shards import load_server_shard

    load_server_shard(args.data_dir, cfg)  # refused here, before anything starts
    if keys is not None and len(keys.node_public_keys()) < n_nodes:
        raise ConfigError(f"--keys {args.keys}: {len(keys.node_public_keys())} public key(s) "
                          f"in supernodes/ for {n_nodes} parties")
    run_dir = Path(cfg.out) / cfg.name
    if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
        raise ConfigError(f"run folder {run_dir} already holds results; choose another --out "
                          "or --set name=...")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="lf-server-"))
    # Secure: the SuperLink (all its APIs) on loopback, only the Fleet API through the gate.
    dep = LocalDeployment(0, work, None if args.quiet else sys.stderr,
                          host="127.0.0.1" if keys else args.host,
                          port=free_port() if keys else args.port, server_keys=keys)
    with dep:
        dep.start()
        if keys is not None:
            dep.register(keys.node_public_keys()[:n_nodes])
            start_gate(dep, args.host, args.port, keys)
        print(f"SuperLink on {args.host}:{args.port} "
              f"({'TLS + SuperNode authentication, Fleet API only' if keys else 'INSECURE'}); "
              f"waiting for {n_nodes} parties (logs: {work})", file=sys.stderr)
        online = wait_for_nodes(dep, n_nodes, args.wait_nodes)
        print(f"{len(online)} SuperNodes online; starting the run", file=sys.stderr)
        run_id, status, summary = submit_run(dep, args.config, overrides, run_dir,
                                             args.timeout, Path(args.data_dir))
    metric = summary.get("metric", "accuracy")
    print(f"run {run_id} {status}: {summary.get('rounds', 0)} rounds, test {metric} "
          f"{summary.get('test', {}).get(metric, float('nan')):.4f}\n  outputs: {run_dir}")
    return 0


# --------------------------------------------------------------------------------------------
# Party host
# --------------------------------------------------------------------------------------------


def _check_shard(folder: Path, k: int) -> None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"--data-dir {folder}: no manifest.json (expected party-{k} written "
                          "by `liquid-fed split`)")
    party = json.loads(manifest.read_text()).get("party")
    if party != k:
        raise ConfigError(f"--data-dir {folder} holds party {party}'s shard, not party {k}'s "
                          "(--partition-id)")


def party_host(args: argparse.Namespace) -> int:
    """Run one SuperNode for party K until it exits or this command is stopped."""
    host, port = split_address(args.superlink)
    _check_security(args.insecure, [host], "--superlink")
    if not 0 <= args.partition_id < args.num_partitions:
        raise ConfigError(f"--partition-id: got {args.partition_id}; accepted: 0.."
                          f"{args.num_partitions - 1} (--num-partitions {args.num_partitions})")
    keys = _keys(args, PartyKeys, "this party's folder")
    data_dir = Path(args.data_dir).resolve()
    _check_shard(data_dir, args.partition_id)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="lf-party-"))
    dep = LocalDeployment(0, work, None if args.quiet else sys.stderr)
    superlink = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with dep:
        runtime_port = args.port or free_port()
        dep.ports.append(runtime_port)
        node = dep._spawn(f"supernode-{args.partition_id}", supernode_command(
            args.mode, f"supernode-{args.partition_id}", [
                *supernode_security_args(keys), "--superlink", superlink,
                "--port", str(runtime_port),
                "--node-config", node_config(args.partition_id, args.num_partitions, data_dir),
            ]), work / "supernode-home", echo=not args.quiet)
        announced = False
        while node.proc.poll() is None:
            if not announced and (hits := node.find(_NODE_ID)):
                print(f"party {args.partition_id} connected to {superlink} as SuperNode "
                      f"{hits[0][1].group(1)}; Ctrl-C stops it (logs: {work})", file=sys.stderr)
                announced = True
            time.sleep(0.2)
        node.wait_closed(2)
        rc = node.proc.returncode
    if rc != 0:
        print(f"party-host: the SuperNode exited with status {rc}:\n{node.tail()}",
              file=sys.stderr)
    return rc


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (the same file the shards were split from)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key (repeatable; the same as for `liquid-fed split`)")
    p.add_argument("--keys", metavar="DIR", help="the server folder of `liquid-fed keys`")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="the server's label folder of `liquid-fed split`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the SuperLink binds to (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=9092, help="SuperLink port (default 9092)")
    p.add_argument("--nodes", type=int, help="parties to wait for (default: views.n_views)")
    p.add_argument("--out", help="parent of the run folder (default: the config's out)")
    p.add_argument("--wait-nodes", type=float, default=600.0,
                   help="seconds to wait for the parties to connect (default 600)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds the run may take once submitted (default 3600)")
    p.add_argument("--work-dir", help="logs and Flower homes (default: a new temporary folder)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no SuperNode authentication (only with --host 127.0.0.1)")
    p.add_argument("--quiet", action="store_true", help="don't stream the run's logs")


def add_party_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", required=True, metavar="HOST:PORT",
                   help="the server host's address, as named in its certificate")
    p.add_argument("--keys", metavar="DIR", help="this party's folder of `liquid-fed keys`")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="this party's shard (party-K of `liquid-fed split`)")
    p.add_argument("--partition-id", type=int, required=True, metavar="K")
    p.add_argument("--num-partitions", type=int, required=True, metavar="N")
    p.add_argument("--port", type=int, help="the SuperNode's local runtime API port on "
                   "127.0.0.1 (default: a free one)")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="how the SuperNode runs the ClientApp: fast (default: a warm worker, "
                   "shorter waits), warm, or stock (Flower's process per message)")
    p.add_argument("--work-dir", help="logs and Flower home (default: a new temporary folder)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no authentication (only with a 127.0.0.1 SuperLink)")
    p.add_argument("--quiet", action="store_true", help="don't echo the SuperNode's log")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_command(func: Any, args: argparse.Namespace, name: str) -> int:
    """Run a host command: errors as one line, Ctrl-C/SIGTERM stop every process started."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return func(args)
    except (LiquidFedError, ValueError, FileNotFoundError) as exc:
        print(f"liquid-fed {name}: error: {exc}", file=sys.stderr)
        return 2
    except DeploymentError as exc:
        print(f"liquid-fed {name}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"liquid-fed {name}: stopped; every process it started is gone", file=sys.stderr)
        return 130
