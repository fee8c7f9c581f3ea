"""One run on Flower's simulation engine (Ray): the supervisor and the child it starts.

``liquid-fed run`` calls :func:`run`, whose :func:`launch` starts ``python -m
simulations.simulate`` as the leader of a new session and watches it. Whatever ends the run —
success, an error, Ctrl-C, SIGTERM or SIGHUP to the launcher, or the launcher being killed
outright — every process of the run (Ray's daemons and workers included) and the run's
temporary folder are gone afterwards:

- the launcher treats SIGTERM and SIGHUP as Ctrl-C: it stops the child's tree (SIGINT, then
  SIGTERM, then SIGKILL), sweeps up every process carrying the run's environment tag and removes
  the temporary folder;
- the child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so a
  launcher killed with SIGKILL still takes the child down (a thread watching the parent's pid
  backs this up); on SIGTERM, SIGHUP or SIGINT the child kills every process carrying the run's
  tag, removes the temporary folder and exits at once (no training thread outlives it to keep
  writing; checkpoints are whole generations, so the last complete one stays usable). Ray's
  driver would replace the SIGTERM handler with a plain ``sys.exit``; the child keeps its own.

Ray is private to the run: token authentication with a random token per run
(``RAY_AUTH_MODE=token``; the token lives in the run's temporary folder, mode 0600), so no other
process can join the cluster or submit work to it. Ray 2.55 binds its gRPC servers to every
interface and resolves a loopback node address to the machine's own address, so it cannot be
kept on 127.0.0.1; the token is what keeps it private.

On an existing cluster (``liquid-fed run CONFIG --ray HOST:PORT``, ``simulation.ray_address``)
the child joins that cluster as a driver instead (:func:`_join_cluster`); nothing of the above
changes but what belongs to whom:

- the cluster is the user's: the run neither starts nor stops it, and neither launcher nor child
  ever signals a cluster process (GCS, raylets, their worker processes). The run's tag is not
  inherited by the cluster's workers (a raylet forks them with *its* environment, plus the
  runtime environment this driver asks for, which does not carry the tag), so the sweep by tag
  still reaches only the run's own processes;
- the run's client actors belong to its Ray job: when the driver disconnects — at the end of the
  run, or because the child died, however — the GCS ends the job and kills its actors on every
  node. "Nothing of the run left" there means: no actor of the run's job alive (the summary
  records the job id, so ``ray list actors --filter job_id=...`` or the GCS actor table can
  check it);
- authentication is the cluster's: with ``RAY_AUTH_MODE=token`` the driver presents the token
  the user's environment gives (``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``); a missing or
  wrong token, or nothing listening at the address, is a one-line error within seconds;
- code: the client actors import ``clients``, ``server`` and ``liquid_fed`` on whichever node
  they land, so the package (same version, same dependencies) must be installed on every node of
  the cluster, e.g. ``pip install -e .`` of the same checkout at the same path on each machine.
  The driver passes its ``sys.path`` as the actors' ``PYTHONPATH`` (as Flower does), which is
  all a one-machine cluster needs; nothing is shipped through a Ray ``working_dir``;
- the actors spread over the nodes by their resources: Flower sizes the pool by what every node
  can hold (``num_cpus_per_client``, ``num_gpus_per_client``) and Ray places each actor where it
  fits. The summary's ``engine.ray`` records the address, the job and the actors per node;
  ``peak_memory_bytes`` counts the driver's processes only (the actors live on the cluster).

Why ``run_simulation`` stays although flwr 1.41 deprecates it (issue 8): the supported path,
``flwr run . local`` against a ``":local:"`` connection, costs 2.8x per training round.
``python -m benchmarks.bench_launch`` (quickstart, 4 clients, 3 vs 1 epochs, references off,
OMP_NUM_THREADS=1, flwr 1.41.0, ray 2.55.1, 2 shared cores) measured 50 ms per steady-state
round here against 139 ms through ``flwr run`` (mean per exchange 62 vs 122 ms; same test
accuracy); the issue's bar was 1.2x. That path runs the same ``_run_simulation`` inside a
``flwr-simulation`` process started by a detached SuperLink and SuperExec, where our
dispatch-loop patch (:mod:`simulations.engine`) is not installed, so Flower's 0.1 s dispatch
poll comes back. Start-up and total wall were no worse (29 vs 37 s, 37 vs 44 s, both noisy
at a load average of 3 to 10), but on that loaded machine a second attempt failed outright:
``flwr`` gives the SuperLink it starts a fixed 15 s to come up. Switching would also need
whole CPUs per client (``client-resources-num-cpus`` is an integer there) and a way to stop
the detached SuperLink, which outlives the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liquid_fed import procs
from liquid_fed.config import RunConfig, config_from_yaml_text
from liquid_fed.errors import ConfigError, LiquidFedError
from liquid_fed.rundir import RunDir, sweep_partial_checkpoints

log = logging.getLogger("liquid_fed.simulate")

#: Keeps Ray small and quiet on a laptop-sized machine (see the README).
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_LOG_LEVEL": "ERROR",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DISABLE_IMPORT_WARNING": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
#: Ray passes an object of up to this many bytes inside a call or a streamed reply instead of
#: through its object store (Ray's own default is 100 KiB). Each client message and context
#: is an argument of an actor's call (:mod:`simulations.batching`) and each reply and updated
#: context a streamed item: a context over 100 KiB (an expert of some 8,500 parameters or more,
#: with Adam's two moments) took the store's round trip through the raylet both ways every
#: round. A call still inlines at most Ray's ``task_rpc_inlined_bytes_limit`` (10 MiB) in
#: all; the rest goes through the store as before. A cluster's own processes keep its setting:
#: there it applies to what the driver sends.
INLINE_BYTES = 4 << 20
#: The Ray settings of the run's driver (and of a private Ray's every process), unless the
#: user's environment sets them: see :data:`INLINE_BYTES`.
TRANSPORT_ENV = {"RAY_max_direct_call_object_size": str(INLINE_BYTES)}
CONFIG_ENV = "LIQUID_FED_CONFIG_YAML"
#: Seconds between two reads of where the client actors run (the summary's ``engine.ray``).
PLACEMENT_EVERY = 5.0
RUN_TAG_ENV = "LIQUID_FED_RUN_TAG"  # inherited by every process of the run, Ray's included
TMP_ENV = "LIQUID_FED_RUN_TMP"
SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@dataclass
class LaunchResult:
    """How the child ended."""

    returncode: int
    signal_name: str | None  # the signal that interrupted the run (SIGINT for Ctrl-C)
    peak_memory_bytes: int
    leftovers: int  # processes of the run still alive after cleanup (normally 0)


#: How many 1 s attempts the driver makes to reach a cluster's GCS (Ray's default is 20: a missing
#: token would be reported after 20 s). The cluster is up already; 3 s is plenty.
CLUSTER_CONNECT_RETRIES = 3


def _transport_env() -> dict[str, str]:
    """:data:`TRANSPORT_ENV` less what the user's environment sets itself."""
    return {k: v for k, v in TRANSPORT_ENV.items() if k not in os.environ}


def ray_environment(cfg: RunConfig, tmp: Path) -> dict[str, str]:
    """The environment of a private, quiet, bounded Ray cluster living in ``tmp``; with
    ``simulation.ray_address``, the quiet driver of the user's cluster instead (the user's
    ``RAY_AUTH_*`` variables pass through unchanged)."""
    if cfg.simulation.ray_address is not None:
        return {**QUIET_ENV, **_transport_env(),
                "RAY_NUM_REDIS_GET_RETRIES": str(CLUSTER_CONNECT_RETRIES),
                "RAY_gcs_rpc_server_reconnect_timeout_s": "15"}
    token = tmp / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return {**QUIET_ENV, **_transport_env(), "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # A one-machine cluster cannot survive its GCS: give up after 15 s, not Ray's 60.
            "RAY_gcs_rpc_server_reconnect_timeout_s": "15",
            # Ray starts one idle worker per CPU for the first driver; the client actors got
            # workers of their own and the prestarted ones idled through the run (seen as
            # `ray::IDLE`): two worker start-ups for nothing, competing with the actors' (a
            # one-epoch quickstart: 1.5-2.5 s less CPU of 16-18 s; its wall time 12.9 -> 12.6 s,
            # five runs each, interleaved).
            "RAY_prestart_worker_first_driver": "0",
            "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(cfg.simulation.object_store_mb
                                                             << 20)}


def launch(cfg: RunConfig, run_dir: Path, resume: bool = False, stop_after: int | None = None,
           quiet: bool = False, lock_fd: int | None = None) -> LaunchResult:
    """Run the simulation in a child session and clean up after it, whatever happens.

    Args:
        cfg: the resolved config.
        run_dir: the prepared run folder.
        resume: continue from its newest checkpoint.
        stop_after: stop after that many rounds, leaving a checkpoint.
        quiet: no progress bar.
        lock_fd: the run folder's lock, handed to the child so it holds while either lives.
    """
    tmp = Path(tempfile.mkdtemp(prefix="lfray-", dir="/tmp"))  # short: Ray's socket paths
    tag = f"lf-run-{uuid.uuid4().hex}"
    env = {**os.environ, **ray_environment(cfg, tmp), CONFIG_ENV: cfg.to_yaml(),
           RUN_TAG_ENV: tag, TMP_ENV: str(tmp)}
    env.setdefault("FLWR_HOME", str(tmp / "flwr"))
    # glibc's malloc, in the child and the Ray processes it starts: each thread that
    # allocates gets its own arena (up to 8 per core), and once a large block has been freed
    # the size from which blocks are mapped on their own (and returned to the system when
    # freed) rises up to 32 MB, so the replies and tensors of a round (hundreds of MB at 256
    # clients) are carved from arenas that keep what was freed. Two arenas and a fixed 128 kB
    # threshold took the 256-client benchmark run from 3.8-4.0 GiB peak to 2.8-3.0 GiB.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    options = {"resume": resume, "stop_after": stop_after, "quiet": quiet}
    cmd = [sys.executable, "-m", "simulations.simulate", str(run_dir), json.dumps(options)]
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in SIGNALS}
    proc = memory = None
    signal_name = None
    rc = 1
    try:
        proc = procs.start_session(cmd, env, pass_fds=() if lock_fd is None else (lock_fd,))
        memory = procs.PeakMemory(proc.pid, marker=str(tmp))
        memory.start()
        rc = proc.wait()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP via Interrupted
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        signal_name = signal.Signals(signum).name
        rc = 128 + signum
        print(f"\n{signal_name}: stopping the simulation ...", file=sys.stderr)
    finally:
        for sig in (*SIGNALS, signal.SIGINT):  # cleanup is bounded: let it finish
            signal.signal(sig, signal.SIG_IGN)
        peak = memory.stop() if memory is not None else 0
        left = set()
        if proc is not None:
            procs.terminate(proc, marker=str(tmp))
            left = procs.leftovers(proc.pid, str(tmp)) | procs.kill_tagged(RUN_TAG_ENV, tag)
            if left:
                log.warning("processes still alive after cleanup: %s", sorted(left))
            else:  # the child is gone: a checkpoint it was writing when stopped is void
                sweep_partial_checkpoints(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return LaunchResult(rc, signal_name, peak, len(left))


@dataclass
class RunOutcome:
    """How ``liquid-fed run`` ended: the exit status and what to tell the user."""

    returncode: int
    summary: dict[str, Any] | None = None  # the finished run's summary.json
    message: str | None = None  # a line for stderr (interrupted or failed)
    stopped_after: int | None = None  # stopped early on purpose after that many rounds


def run(cfg: RunConfig, run_dir: Path, resume: bool = False, force: bool = False,
        stop_after: int | None = None, quiet: bool = False, command: str = "liquid-fed run"
        ) -> RunOutcome:
    """``liquid-fed run``: lock and prepare the run folder, launch, record the peak memory.

    Args:
        cfg: the resolved, checked config.
        run_dir: the run folder.
        resume: continue from the folder's newest complete checkpoint.
        force: overwrite a folder holding results.
        stop_after: stop after that many rounds, leaving a checkpoint.
        quiet: no progress bar.
        command: what the run folder's lock records as its holder.

    Raises:
        RunFolderError: the folder is locked by another run, or holds results.
        ConfigError: ``simulation.ray_address`` is set and nothing answers there.
    """
    from liquid_fed import rundir

    if cfg.simulation.ray_address is not None:
        probe_cluster(cfg.simulation.ray_address)
    with rundir.RunLock(run_dir).acquire(command) as lock:
        run_folder = rundir.prepare(cfg, run_dir, resume, force)
        result = launch(cfg, run_dir, resume, stop_after, quiet, lock.fd)
        if result.signal_name is not None:
            return RunOutcome(result.returncode, message=f"the last checkpoint in {run_dir} is "
                              "intact; continue with --resume")
        if result.returncode != 0:
            return RunOutcome(result.returncode, message=f"liquid-fed run failed (exit "
                              f"{result.returncode}); see the messages above")
        if not run_folder.finished:
            return RunOutcome(0, stopped_after=stop_after)
        summary = run_folder.update_summary(peak_memory_bytes=result.peak_memory_bytes)
    return RunOutcome(0, summary=summary)


# --------------------------------------------------------------------------------------------
# The child
# --------------------------------------------------------------------------------------------


def _cleanup_and_exit(signum: int) -> None:
    """Kill every process of the run, remove its temporary folder, exit now (no thread of
    this process outlives it to keep training or writing)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        with contextlib.suppress(ValueError):  # only the main thread may change handlers
            signal.signal(sig, signal.SIG_IGN)
    # The folder first: once Ray's daemons die, Ray's core in this process may end it at once.
    tmp = os.environ.get(TMP_ENV)
    if tmp and Path(tmp).name.startswith("lfray-"):
        shutil.rmtree(tmp, ignore_errors=True)
    tag = os.environ.get(RUN_TAG_ENV)
    if tag:  # the run is being abandoned: nothing of Ray's needs a graceful end. The launcher
        # started this process as a session leader: Ray's processes are in its tree (on a
        # cluster only this run's own are), also those whose environment no longer shows the tag.
        procs.kill_tagged(RUN_TAG_ENV, tag, gentle=False,
                          root=os.getpid() if os.getsid(0) == os.getpid() else None)
    os._exit(128 + signum)


def _die(signum: int, frame: Any) -> None:
    _cleanup_and_exit(signum)


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """Belt and braces for ``PR_SET_PDEATHSIG``: when the launcher is gone, go too."""
    while True:
        if os.getppid() != parent:
            _cleanup_and_exit(signal.SIGTERM)
        time.sleep(interval)


def _keep_our_sigterm_handler() -> None:
    """``ray.init`` installs its own SIGTERM handler in the driver (``sys.exit``), which would
    leave the ServerApp thread training on; keep ours, which takes the whole run down."""
    try:
        import ray._private.utils as ray_utils
    except ImportError:
        return
    if hasattr(ray_utils, "set_sigterm_handler"):
        ray_utils.set_sigterm_handler = lambda handler: None


def probe_cluster(address: str, timeout: float = 3.0) -> None:
    """Check that something accepts TCP connections at a cluster address ``HOST:PORT``.

    Ray itself would retry for many seconds before saying anything; the launcher asks first.

    Args:
        address: ``simulation.ray_address``.
        timeout: seconds to wait for the connection.

    Raises:
        ConfigError: nothing answers there (names ``simulation.ray_address`` and what to do).
    """
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"simulation.ray_address (--ray): nothing answers at {address} "
            f"({exc.strerror or exc}); start the cluster first (`ray start --head "
            f"--port={port}` on its head node) or give the address its head printed") from None


@contextlib.contextmanager
def _stderr_to(path: Path) -> Any:
    """Send this process's file descriptor 2 to ``path`` for the block (Ray's C++ core logs
    each failed attempt to reach a GCS there; the user gets one line instead)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _join_cluster(cfg: RunConfig, tmp: Path) -> str:
    """Connect this process to the running cluster at ``simulation.ray_address`` as the run's
    driver; Flower's backend then finds Ray initialised and uses it as it is.

    Args:
        cfg: the run's config (``simulation.ray_address`` set).
        tmp: a private folder for what Ray's core says while connecting.

    Returns:
        The run's Ray job id (hex).

    Raises:
        ConfigError: the cluster refused the token (or its absence), did not let this process
            join as a driver, or no node of the cluster can hold one client actor; each names
            ``simulation.ray_address`` (or the resource key) and what to do.
    """
    import ray

    address = cfg.simulation.ray_address
    assert address is not None
    key = "simulation.ray_address"
    env_vars = {k: v for k, v in QUIET_ENV.items() if not k.startswith("RAY_")}
    # As Flower does for the private Ray: the actors import this checkout's packages.
    env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (*sys.path,
                                                          os.environ.get("PYTHONPATH")) if p)
    if cfg.federation.faults:  # the cluster's workers do not inherit this process's environment
        from liquid_fed.federation.client import FAULTS_ENV

        env_vars[FAULTS_ENV] = "1"
    said = tmp / "ray_connect.log"
    try:
        with _stderr_to(said):
            ray.init(address=address, runtime_env={"env_vars": env_vars},
                     logging_level="ERROR", log_to_driver=False, namespace="liquid-fed")
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or AuthenticationError
        text = f"{exc} {exc.__cause__} {said.read_text(errors='replace') if said.exists() else ''}"
        if "AuthenticationError" in type(exc).__name__ or "Unauthenticated" in text \
                or "InvalidAuthToken" in text:
            given = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
                     f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
                     if os.environ.get("RAY_AUTH_TOKEN_PATH") else "no token")
            raise ConfigError(
                f"{key} (--ray): the Ray cluster at {address} refused this run's authentication "
                f"({given}, RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}); it uses "
                "token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the "
                "cluster's token file> (or RAY_AUTH_TOKEN) before `liquid-fed run`") from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key} (--ray): could not join the Ray cluster at {address}: "
                          f"{first}; is it a Ray GCS address (`ray status --address "
                          f"{address}`)?") from None
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    resources = {"num_cpus": cfg.simulation.num_cpus_per_client,
                 "num_gpus": cfg.simulation.num_gpus_per_client}
    if pool_size_from_resources(resources) == 0:
        nodes = [{k: n["Resources"].get(k, 0) for k in ("CPU", "GPU")} for n in ray.nodes()
                 if n["Alive"]]
        ray.shutdown()
        raise ConfigError(
            f"simulation.num_cpus_per_client / num_gpus_per_client: got {resources}; no node of "
            f"the Ray cluster at {address} can hold one client (nodes: {nodes})")
    job = ray.get_runtime_context().get_job_id()
    log.info("joined the Ray cluster at %s as job %s", address, job)
    return job


def _placement(job: str, seen: dict[str, str]) -> None:
    """Add the node of each client actor of Ray job ``job`` to ``seen`` (actor id -> node id),
    read from the GCS's actor table (no dashboard needed)."""
    import ray
    from ray._private.state import state

    table = state.actor_table(None, job_id=ray.JobID.from_hex(job))
    for actor_id, info in table.items():
        node = info.get("Address", {}).get("NodeID")
        if info.get("ActorClassName", "").endswith("ClientAppActor") and node:
            seen[actor_id] = node


def _simulate(run_dir: str, resume: bool, stop_after: int | None, quiet: bool,
              progress: Callable[[int | None, str, bool], Any]) -> int:
    """Flower's simulation engine on Ray, in this process."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = config_from_yaml_text(os.environ[CONFIG_ENV])
    # Flower has its own console handler (FLWR_LOG_LEVEL); don't echo its records twice.
    logging.getLogger("flwr").propagate = False
    _keep_our_sigterm_handler()
    times: dict[str, float] = {"start": time.perf_counter()}
    address = cfg.simulation.ray_address
    # Join first: a refused token is reported before the seconds of importing Flower and apps.
    job = _join_cluster(cfg, Path(os.environ.get(TMP_ENV) or tempfile.gettempdir())) \
        if address else None
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from liquid_fed.federation.client import FAULTS_ENV
    from server.app import make_server_app
    from simulations import engine

    if not address:
        times["start"] = time.perf_counter()
    fast_dispatch, batched = engine.install_dispatch_loop(cfg.simulation.dispatch_poll,
                                                          cfg.simulation.batch_messages)
    watched = engine.install_runtime_watch()
    bar = progress(None, cfg.name, not quiet)
    actors: dict[str, str] = {}  # client actor id -> node id
    placed = -float("inf")  # when the actor table was last read

    def place() -> None:
        nonlocal job, placed
        try:  # where the clients run (restarted actors may move): bookkeeping, never fatal
            import ray

            job = job or ray.get_runtime_context().get_job_id()
            _placement(job, actors)
        except Exception as exc:  # noqa: BLE001 - the run matters more than its record
            log.debug("could not read the actor table: %s", exc)
        placed = time.monotonic()

    def on_round(info: Any) -> None:
        if "first_round" not in times and not address:
            hasten_ray_shutdown()
        times.setdefault("first_round", time.perf_counter() - info.elapsed)
        # A GCS query costs about a millisecond: not every round of a fast run, but the
        # first and the last (Flower stops Ray before this function sees it again).
        if (time.monotonic() - placed >= PLACEMENT_EVERY
                or info.round >= info.total_rounds):
            place()
        bar.round(info)

    app = make_server_app(cfg, run_dir, resume, stop_after, on_round,
                          health=engine.WATCH.reason if watched else None)
    if cfg.federation.faults:  # the clients (Ray workers inherit it) obey injected faults
        os.environ[FAULTS_ENV] = "1"
    backend = {
        # A client actor whose process dies (a crash, an injected one included) is restarted
        # by Ray; its node's state lives in the engine, so the client comes back with it.
        "client_resources": {"num_cpus": cfg.simulation.num_cpus_per_client,
                             "num_gpus": cfg.simulation.num_gpus_per_client,
                             "max_restarts": -1, "max_task_retries": 1},
        # On a cluster Ray is initialised already (_join_cluster) and Flower keeps it as it is.
        "init_args": {} if address else {
            "num_cpus": os.cpu_count() or 1,
            "object_store_memory": cfg.simulation.object_store_mb << 20,
            "logging_level": "ERROR", "log_to_driver": False},
    }
    try:
        run_simulation(server_app=app, client_app=client_app, num_supernodes=cfg.n_clients,
                       backend_config=backend)
    finally:
        bar.close()
        import ray

        if ray.is_initialized():
            ray.shutdown()
    times["end"] = time.perf_counter()
    run = RunDir(run_dir)
    if run.finished and "first_round" in times:
        total = times["end"] - times["start"]
        startup = times["first_round"] - times["start"]
        wall = float(run.read_summary()["wall_seconds"])
        per_node: dict[str, int] = {}
        for node in actors.values():
            per_node[node] = per_node.get(node, 0) + 1
        run.update_summary(engine={
            "total_seconds": total, "startup_seconds": startup,
            "dispatch_poll": cfg.simulation.dispatch_poll if fast_dispatch else 0.1,
            "batched": batched,
            "after_training_seconds": total - startup - wall,
            "ray": {"address": address, "job_id": job, "nodes": sorted(per_node),
                    "actors_per_node": per_node}})
    return 0


def hasten_ray_shutdown() -> bool:
    """Let ``ray.shutdown`` stop this driver's private Ray daemons together.

    Ray (2.55) stops the processes it started one after another, each with SIGTERM and up to a
    second's wait: about 1.2 s at the end of every run here. Wrapping its node's
    ``kill_all_processes`` (called once the driver has disconnected) to send SIGTERM first to
    all of them but the GCS and the reaper lets them exit in parallel; Ray's own sequence then
    stops the raylet (whose graceful exit, which needs the GCS up, also ends its dashboard and
    runtime-env agents: with the GCS gone at once they outlived it), the GCS, the others (gone
    or going) and the reaper, and still kills what outlives its wait. Returns whether the
    wrapper is in place: not on a cluster this driver joined (it started nothing), nor where
    Ray's internals are not the ones this was written for (Ray's own shutdown then runs as is).
    """
    try:
        import ray._private.worker as ray_worker
        from ray._private import ray_constants

        node = getattr(ray_worker, "_global_node", None)
        original = getattr(node, "kill_all_processes", None)
        keep = (ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_REAPER)
    except (ImportError, AttributeError):
        return False
    if (node is None or getattr(node, "head", False) is not True or not callable(original)
            or not isinstance(getattr(node, "all_processes", None), dict)):
        return False
    if getattr(original, "_liquid_fed_patch", False):
        return True

    def kill_all_processes(*args: Any, **kwargs: Any) -> Any:
        for process_type, infos in list(node.all_processes.items()):
            if process_type in keep:
                continue
            for info in infos:
                with contextlib.suppress(OSError, AttributeError):
                    if info.process.poll() is None:
                        info.process.terminate()
        return original(*args, **kwargs)

    kill_all_processes._liquid_fed_patch = True  # type: ignore[attr-defined]
    node.kill_all_processes = kill_all_processes
    return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child (``python -m simulations.simulate RUN_DIR OPTIONS_JSON``)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _die)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                     name="watch-parent").start()
    run_dir, options = (sys.argv[1:] if argv is None else argv)[:2]
    opts = json.loads(options)  # written by launch(), never by a user
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from liquid_fed.progress import Progress

    try:
        return _simulate(run_dir, bool(opts["resume"]), opts["stop_after"], bool(opts["quiet"]),
                         Progress)
    except LiquidFedError as exc:
        print(f"liquid-fed: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # Flower wraps what failed in its threads
        cause = exc.__cause__
        if isinstance(cause, LiquidFedError):
            print(f"liquid-fed: error: {cause}", file=sys.stderr)
            return 2
        raise


def exit_now(code: int) -> None:
    """End this process with ``code`` once its work is written and Ray is down: the exit
    handlers run (logging's flush, finalizers, file locks), the interpreter's teardown does
    not. Freeing torch's, Ray's and Flower's modules one by one took about a second of every
    run."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

