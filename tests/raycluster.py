"""A real two-node Ray cluster on this machine, started the way a user starts one (test helper).

``ray start --head`` plus a second ``ray start --address``, each node with its own short
temporary folder, one CPU and a custom resource naming it (``node_a``, ``node_b``), token
authentication on (``RAY_AUTH_MODE=token``, one token file for both nodes and their clients)
and every port chosen free, so two such clusters (two xdist workers, two worktrees) do not
collide on Ray's fixed defaults (client server 10001, dashboard 8265, ...).

The cluster is *not* stopped with ``ray stop``: that command takes no address or folder and ends
every Ray process on the machine, other tests' and other users' included. Instead every process
``ray start`` leaves behind (GCS, raylets, their workers, log monitors, ...) inherits an
environment tag, :data:`TAG_ENV`, and :meth:`RayCluster.stop` ends exactly the processes that
carry this cluster's tag (SIGTERM, then SIGKILL), then asserts none is left. Clients of the
cluster (drivers such as ``liquid-fed run --ray``) get :attr:`RayCluster.env`, which does not
carry the tag: what they leave behind is theirs to clean up, and a test can check that.

Usage::

    with ray_cluster() as cluster:
        subprocess.run([..., "--ray", cluster.address], env=cluster.env)
        assert set(cluster.node_ids) == {"node_a", "node_b"}

or, in a test module, a module-scoped fixture::

    @pytest.fixture(scope="module")
    def cluster():
        with ray_cluster() as c:
            yield c

Measured (2 shared cores, ray 2.55.1): start 13-18 s (two ``ray start`` calls of about 8 s
each, run one after the other; the head must be up before the worker node joins), stop about
1-3 s; see ``python tests/raycluster.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from simulations.simulate import QUIET_ENV as SIMULATE_QUIET_ENV

#: Inherited by every process of the cluster (not by its clients): how stop() finds them.
TAG_ENV = "LIQUID_FED_TEST_RAY_CLUSTER"
#: The custom resource of each node, in start order (head first).
NODE_NAMES = ("node_a", "node_b")
#: Quiet, bounded Ray: what a run's own Ray gets (simulations.simulate.QUIET_ENV).
QUIET_ENV = dict(SIMULATE_QUIET_ENV)
#: Each node's object store (Ray's minimum is 75 MiB; its default, 30 % of RAM, is too much).
OBJECT_STORE_BYTES = 100 << 20
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def tagged(tag: str) -> set[int]:
    """Live (not zombie) processes whose environment holds ``TAG_ENV=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != "Z":
            found.add(int(pid))
    found.discard(os.getpid())
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return ""


@dataclass
class RayCluster:
    """A running two-node cluster.

    Attributes:
        address: ``127.0.0.1:PORT`` of the head's GCS (what ``--ray`` takes).
        env: the environment for clients of the cluster (token, quiet Ray), without the tag.
        node_ids: custom resource name (``node_a`` head, ``node_b`` worker) -> Ray node id.
        folders: the nodes' temporary folders (head first).
        token_path: the token file (0600) both nodes and their clients use.
        tag: the value of :data:`TAG_ENV` on every process of the cluster.
        start_seconds: wall time of start-up, both nodes up and registered.
        stop_seconds: wall time of the last :meth:`stop` (None before).
    """

    address: str
    env: dict[str, str]
    node_ids: dict[str, str]
    folders: tuple[Path, ...]
    token_path: Path
    tag: str
    start_seconds: float
    stop_seconds: float | None = field(default=None)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def processes(self) -> set[int]:
        """The cluster's live processes (daemons and workers)."""
        return tagged(self.tag)

    def daemons(self) -> set[int]:
        """The cluster's GCS and raylets (its workers come and go: Ray ends idle ones)."""
        return {p for p in self.processes()
                if any(name in command_line(p) for name in ("gcs_server", "raylet/raylet"))}

    def alive_nodes(self, timeout: float = 60.0) -> dict[str, str]:
        """Resource name -> node id of the nodes the GCS reports alive (a short driver)."""
        return _query_nodes(self.address, self.env, timeout)

    def actors(self, job_id: str | None = None, timeout: float = 60.0) -> list[dict]:
        """The cluster's actors (all jobs, or one job's: hex job id), each a dict with
        ``actor_id``, ``class_name``, ``state`` (``ALIVE``, ``DEAD``, ...), ``node_id``,
        ``job_id``, read from the GCS by a short driver."""
        code = (
            "import json, sys, ray\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "from ray._private.state import state\n"
            "rows = []\n"
            "for aid, a in state.actor_table(None).items():\n"
            "    rows.append({'actor_id': aid, 'class_name': a.get('ActorClassName', ''),\n"
            "                 'state': a['State'], 'job_id': a['JobID'],\n"
            "                 'node_id': a['Address']['NodeID']})\n"
            "print('ACTORS=' + json.dumps(rows))\n"
        )
        out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        rows = _marked(out, "ACTORS=")
        return [r for r in rows if job_id is None or r["job_id"] == job_id]

    def stop(self, grace: float = 2.0) -> float:
        """End every process of the cluster (SIGTERM, then SIGKILL after ``grace`` s), remove
        its folders; returns the seconds it took. Raises AssertionError when a process of the
        cluster outlives SIGKILL.

        The GCS, the raylets and the autoscaler monitor ignore SIGTERM for 10 s and more
        (measured): a test cluster has nothing to drain, so SIGKILL follows soon."""
        started = time.perf_counter()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            members = self.processes()
            if not members:
                break
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.processes():
                time.sleep(0.1)
        left = self.processes()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.stop_seconds = time.perf_counter() - started
        assert not left, "processes of the test's Ray cluster outlived SIGKILL: " + "; ".join(
            f"{p}: {command_line(p)}" for p in sorted(left))
        return self.stop_seconds


def _marked(out: subprocess.CompletedProcess, prefix: str) -> dict | list:
    for line in out.stdout.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    raise RuntimeError(f"no {prefix} line from a driver of the test cluster (exit "
                       f"{out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def _query_nodes(address: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    code = (
        "import json, sys, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "names = sys.argv[2].split(',')\n"
        "print('NODES=' + json.dumps({name: n['NodeID'] for n in ray.nodes() if n['Alive']\n"
        "                             for name in names if name in n['Resources']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, address, ",".join(NODE_NAMES)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    return _marked(out, "NODES=")  # type: ignore[return-value]


_WORKER_PORT_BASES: set[int] = set()


def _ports(head: bool) -> list[str]:
    """Every port a node opens, chosen free (Ray's fixed defaults collide between clusters),
    and a worker-port range of its own: every Ray hands its workers and drivers ports from
    10002-19999 by default, and a private run's Ray started meanwhile (the other xdist worker)
    took one a node of this cluster had picked, which kills the driver that gets it (a Ray
    CHECK in GrpcServer::Run), so each node takes 100 ports at random in 20000-31999, below
    the kernel's ephemeral range."""
    base = 20000 + 100 * secrets.randbelow(120)
    while base in _WORKER_PORT_BASES:  # the two nodes of a cluster never share a range
        base = 20000 + 100 * secrets.randbelow(120)
    _WORKER_PORT_BASES.add(base)
    ports = [f"--min-worker-port={base}", f"--max-worker-port={base + 99}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}"]
    if head:
        ports += [f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"]
    return ports


def start_cluster(num_cpus: float = 1, start_timeout: float = 120.0) -> RayCluster:
    """Start the two nodes (head ``node_a``, worker ``node_b``), wait until both are alive.

    Args:
        num_cpus: CPUs each node declares.
        start_timeout: seconds each ``ray start`` may take.

    Returns:
        The running cluster; call :meth:`RayCluster.stop` (or use :func:`ray_cluster`).

    Raises:
        RuntimeError: a node did not start or did not register (the cluster is stopped).
    """
    began = time.perf_counter()
    tag = f"lf-raycluster-{uuid.uuid4().hex[:12]}"
    # Short folders: Ray puts Unix sockets under them (107-byte path limit).
    folders = tuple(Path(tempfile.mkdtemp(prefix=f"lfrc{i}-", dir="/tmp")) for i in range(2))
    token_path = folders[0] / "token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("RAY_", "LIQUID_FED_RUN_")) and k != TAG_ENV}
    env = {**base, **QUIET_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    port = free_port()
    address = f"127.0.0.1:{port}"
    cluster = RayCluster(address, env, {}, folders, token_path, tag, 0.0)
    common = [f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
              f"--object-store-memory={OBJECT_STORE_BYTES}", "--log-style=record"]
    starts = [
        [RAY, "start", "--head", f"--port={port}", f"--temp-dir={folders[0]}",
         "--include-dashboard=false", f"--resources={json.dumps({NODE_NAMES[0]: 1})}",
         *common, *_ports(head=True)],
        [RAY, "start", f"--address={address}", f"--temp-dir={folders[1]}",
         f"--resources={json.dumps({NODE_NAMES[1]: 1})}", *common, *_ports(head=False)],
    ]
    try:
        for cmd in starts:
            out = subprocess.run(cmd, env={**env, TAG_ENV: tag}, capture_output=True, text=True,
                                 timeout=start_timeout, start_new_session=True)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {out.returncode}):\n"
                                   f"{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        deadline = time.monotonic() + start_timeout
        while True:
            cluster.node_ids = cluster.alive_nodes()
            if len(cluster.node_ids) == len(NODE_NAMES):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {cluster.node_ids} of {NODE_NAMES} registered")
            time.sleep(0.5)
    except BaseException:
        with contextlib.suppress(AssertionError):
            cluster.stop()
        raise
    cluster.start_seconds = time.perf_counter() - began
    return cluster


@contextlib.contextmanager
def ray_cluster(num_cpus: float = 1) -> Iterator[RayCluster]:
    """A two-node cluster for the ``with`` block; stopped (and checked empty) afterwards."""
    cluster = start_cluster(num_cpus)
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":  # measure: python tests/raycluster.py
    with ray_cluster() as c:
        print(f"started in {c.start_seconds:.1f} s at {c.address}: {c.node_ids}, "
              f"{len(c.processes())} processes")
    print(f"stopped in {c.stop_seconds:.1f} s; processes left: {len(c.processes())}")
