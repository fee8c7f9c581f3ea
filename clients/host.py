"""The party side of a deployment: one SuperNode for party K, on the party's own machine.

    liquid-fed party-host --superlink HOST:PORT --keys KEYS/party-K --data-dir SHARDS/party-K
        --partition-id K --num-partitions N [--port PORT] [--work-dir DIR] [--insecure]

``party-host`` starts one SuperNode that trusts only the CA in ``KEYS/party-K/ca.crt``, signs
its requests with ``KEYS/party-K/supernode.key`` and gives its ClientApp the node config
``partition-id=K num-partitions=N data-dir="SHARDS/party-K"``; it runs until stopped (Ctrl-C
or SIGTERM) or until the SuperNode exits. Its local runtime API listens on 127.0.0.1 only.

A party whose SuperNode or worker died (crash, kill -9, reboot) rejoins the running run when
the same command is started again: the SuperNode reclaims its key's node at the SuperLink
(its id is kept in ``KEYS/party-K/supernode.key.node-id``), the server sets the party up
again from its own last checkpoint in ``SHARDS/party-K/checkpoints``, and it takes part in
the next rounds.
How the SuperNode runs the ClientApp (``--mode``) is :mod:`clients.supernode`'s business; the
commands and flags every SuperNode of a deployment gets (here and in the loopback rehearsal,
:mod:`server.deploy_local`) are built by this module.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from clients.supernode import MODES
from liquid_fed import procs
from liquid_fed.errors import ConfigError
from liquid_fed.procs import ProcessGroup, check_insecure
from server.keys import PartyKeys, load_keys

log = logging.getLogger("liquid_fed.hosts")

#: The mode SuperNodes run in unless told otherwise (see :mod:`clients.supernode`).
DEFAULT_MODE = "fast"
#: What a SuperNode logs once the SuperLink has let it in.
NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def supernode_security_args(keys: PartyKeys | None, private_key: Path | None = None
                            ) -> list[str]:
    """``flower-supernode`` flags: the CA that signed the SuperLink's certificate and the
    node's auth key (``private_key`` replaces the party's own), or ``--insecure``."""
    if keys is None:
        return ["--insecure"]
    return ["--root-certificates", str(keys.ca),
            "--auth-supernode-private-key", str(private_key or keys.private_key)]


def supernode_command(mode: str, name: str, flower: list[str]) -> list[str]:
    """A SuperNode with ``flower-supernode`` flags ``flower``, run as ``mode`` says
    (:mod:`clients.supernode`); its runtime API on 127.0.0.1."""
    if mode == "stock":
        return [procs.executable("flower-supernode"), *flower, "--host", "127.0.0.1"]
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


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); raises ConfigError naming the value."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--superlink: got {address!r}; accepted: HOST:PORT, e.g. "
                          "10.0.0.5:9092 or [fd00::5]:9092")
    return host.strip("[]"), int(port)


def _check_shard(folder: Path, k: int) -> None:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"--data-dir {folder}: no manifest.json (expected party-{k} written "
                          "by `liquid-fed split`)")
    party = json.loads(manifest.read_text()).get("party")
    if party != k:
        raise ConfigError(f"--data-dir {folder} holds party {party}'s shard, not party {k}'s "
                          "(--partition-id)")


def party_host(superlink: str, keys: str | None, data_dir: str, partition_id: int,
               num_partitions: int, port: int | None = None, mode: str = DEFAULT_MODE,
               work_dir: str | None = None, insecure: bool = False, quiet: bool = False) -> int:
    """Run one SuperNode for party K until it exits or this command is stopped.

    Args:
        superlink: ``HOST:PORT`` of the server host, as named in its certificate.
        keys: this party's folder of ``liquid-fed keys`` (None only with ``insecure``).
        data_dir: this party's shard (``party-K`` of ``liquid-fed split``).
        partition_id: K.
        num_partitions: the number of parties.
        port: the SuperNode's local runtime API port on 127.0.0.1 (default: a free one).
        mode: how the SuperNode runs the ClientApp (:data:`clients.supernode.MODES`).
        work_dir: logs and Flower home (default: a new temporary folder).
        insecure: no TLS, no authentication (refused unless the SuperLink is on loopback).
        quiet: don't echo the SuperNode's log.

    Returns:
        The SuperNode's exit status.

    Raises:
        ConfigError: a bad address, partition, key folder or shard (before anything starts).
    """
    if mode not in MODES:
        raise ConfigError(f"--mode: got {mode!r}; accepted: {', '.join(MODES)}")
    host, superlink_port = split_address(superlink)
    check_insecure(insecure, [host], "--superlink")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"--partition-id: got {partition_id}; accepted: 0.."
                          f"{num_partitions - 1} (--num-partitions {num_partitions})")
    party_keys = load_keys(keys, insecure, PartyKeys, "this party's folder")
    shard = Path(data_dir).resolve()
    _check_shard(shard, partition_id)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="lf-party-"))
    group = ProcessGroup(work, None if quiet else sys.stderr)
    address = f"[{host}]:{superlink_port}" if ":" in host else f"{host}:{superlink_port}"
    with group:
        runtime_port = port or procs.free_port()
        group.ports.append(runtime_port)
        node = group.spawn(f"supernode-{partition_id}", supernode_command(
            mode, f"supernode-{partition_id}", [
                *supernode_security_args(party_keys), "--superlink", address,
                "--port", str(runtime_port),
                "--node-config", node_config(partition_id, num_partitions, shard),
            ]), work / "supernode-home", echo=not quiet)
        announced = False
        while node.proc.poll() is None:
            if not announced and (hits := node.find(NODE_ID)):
                print(f"party {partition_id} connected to {address} as SuperNode "
                      f"{hits[0][1].group(1)}; Ctrl-C stops it (logs: {work})", file=sys.stderr)
                announced = True
            time.sleep(0.2)
        node.wait_closed(2)
        rc = node.proc.returncode
    if rc != 0:
        print(f"party-host: the SuperNode exited with status {rc}:\n{node.tail()}\n"
              "The run goes on without this party if the server allows absences "
              "(federation.min_clients); start the same command again (same --keys and "
              "--data-dir) to rejoin it.", file=sys.stderr)
    return rc
