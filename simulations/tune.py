"""``liquid-fed compare STUDY --ray ADDRESS``: a study's jobs as Ray Tune trials on a cluster.

The study is expanded, checked and resumed exactly as without ``--ray`` (:mod:`liquid_fed.study`,
:func:`simulations.studies.compare`); only the scheduling of its jobs changes. A *job* is one
(setting, seed, methods still to run), the unit the local scheduler hands to a worker process.
The jobs become one Ray Tune experiment: a grid search over their ids (``c00-seed-1``), one trial
per job, each on one CPU of the cluster. Tune's own search spaces are not used on purpose: the
study has already drawn its random settings (from ``random.seed``) and numbered its cells, so a
grid over job ids gives the same cells, seeds, folders and rows as the local run, and a resumed
study the same draws.

What a trial does: :func:`liquid_fed.study.run_cell` — the code path of the local scheduler
(the centralized twin for the Liquid Ensemble, the baselines as usual) — into a private
temporary folder on its node. After each method it sends that method's run folder (and the
cell's ``views.json``) as bytes to a small *collector* actor pinned to the node of the driver
(the ``liquid-fed compare`` process), which writes them into the study folder, ``summary.json``
last (it marks the run finished). Then the trial reports the method's row to Tune (score, loss,
power entropy ..., the node id and seconds): the driver's progress bar ticks on it, and Tune's
own loggers (CSV, JSON, TensorBoard) keep it under ``<study>/tune/<experiment>/``. No shared
filesystem is needed: the study folder lives on the driver's machine only. Every node needs the
same liquid-fed and its data at the same paths (the trials load the data themselves).

Resume is the study's own: finished runs (their ``summary.json``) are skipped before the
experiment is built, so every invocation is a fresh Tune experiment of the remaining jobs, and
``results.csv`` is rebuilt from the folders (each row once). ``Tuner.restore`` is not used: it
would re-run the trials that were running when the study stopped, whose finished methods the
folder already holds.

``engine: federated`` is refused: a Flower simulation cannot run inside a Tune trial (nested Ray
runtimes, ray#36024). The cluster is only joined: nothing is started or stopped; a token of a
``RAY_AUTH_MODE=token`` cluster is read by Ray from the environment. When the study ends, fails
or is interrupted (Ctrl-C, SIGTERM, SIGHUP), the driver disconnects: Ray ends the trials and the
collector (they belong to its job), and the trials' working folders in Ray's session folders
are removed (an interrupted experiment's Tune logs are first copied into the study folder).

Where it runs: ``liquid-fed compare`` must run on a node of the cluster (the head, or a machine
that joined it with ``ray start --address``): a Ray Client address (``ray://``) is refused, as
the collector would then write on the head's disk. Trial processes are reused from job to job
(``reuse_actors``: torch and the library are imported once per process). Each run's
``summary.json`` records the node that trained it (``ray_node_id``; not a column of
``results.csv``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from liquid_fed import study as studies
from liquid_fed.errors import ConfigError, DeploymentError
from liquid_fed.rundir import SUMMARY_FILE, VIEWS_FILE, RunDir, atomic_write

log = logging.getLogger(__name__)

#: The optional extra that installs Ray Tune (pyproject.toml).
EXTRA = "cluster"
TUNE_PIN = "ray[tune]==2.55.1"
#: Where Tune keeps its experiments inside the study folder (one per invocation).
TUNE_DIR = "tune"
#: CPUs one trial asks for (a cell trains with one torch thread).
TRIAL_CPUS = 1.0
#: Numeric columns of a row that a trial reports to Tune (its loggers keep them).
REPORTED = ("score", "nll", "power_entropy", "speaker_entropy", "delegation_accuracy",
            "region_nmi", "label_leakage")


def require_tune() -> tuple[Any, Any]:
    """Import Ray and Ray Tune (only ``--ray`` does).

    Returns:
        The modules ``ray`` and ``ray.tune``.

    Raises:
        ConfigError: Ray Tune is not installed; the message names the extra.
    """
    try:
        import ray
        from ray import tune
    except ImportError as err:
        raise ConfigError(
            f"--ray needs Ray Tune, the optional extra '{EXTRA}': pip install "
            f"'liquid-fed[{EXTRA}]' (or pip install '{TUNE_PIN}'); the import failed: {err}"
        ) from err
    return ray, tune


def check_study(study: Any, address: str, workers: int) -> None:
    """Refuse what ``--ray`` cannot run, before anything is created.

    Raises:
        ConfigError: ``engine: federated`` (naming the key), ``--workers`` with ``--ray``, an
            empty address or a Ray Client one (``ray://``).
    """
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"--ray: got {address!r}; expected the address of a running Ray "
                          "cluster (host:port of its head, or auto)")
    if address.strip().startswith("ray://"):
        raise ConfigError(
            f"--ray: got {address!r}; a Ray Client address (ray://) is not accepted: the study "
            "folder is written on the node of the driver, so run liquid-fed compare on a node "
            "of the cluster (the head, or a machine that joined it with ray start --address) "
            "and pass the head's host:port")
    if study.engine == "federated":
        raise ConfigError(
            "engine: federated cannot run with --ray: a Flower simulation cannot run inside a "
            "Ray Tune trial (ray#36024). Use engine: centralized (the exact in-process twin of "
            "the federation, what the trials run), or run the study without --ray")
    if workers > 1:
        raise ConfigError(f"--workers {workers} with --ray: the cluster's CPUs set how many "
                          "cells run at once; drop --workers")


def job_id(setting_id: str, seed: int) -> str:
    return f"{setting_id}-seed-{seed}"


def run_on_cluster(study: Any, out: Path, jobs: list, address: str,
                   tick: Callable[[str, float], None]) -> None:
    """Run the study's jobs as Ray Tune trials on the cluster at ``address``.

    Args:
        study: the study (:class:`liquid_fed.study.Study`).
        out: the study folder (on this machine; the trials send their folders here).
        jobs: (setting, seed, methods) to run.
        address: the Ray cluster's address (``ray.init(address=...)``).
        tick: called with (method, seconds) as each run finishes.

    Raises:
        ConfigError: Ray Tune is missing, or the cluster cannot be joined.
        DeploymentError: a trial failed (its error is named).
        KeyboardInterrupt: Ctrl-C, SIGTERM or SIGHUP; the finished runs are in the folder.
    """
    ray, tune = require_tune()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune tables on the user's terminal
    # Ctrl-C must stop the study now (the finished runs are kept), not ask Tune to save a state
    # that resume never reads.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    out = Path(out).resolve()
    previous: dict[int, Any] = {}
    joined = interrupted = False
    name = f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    try:
        _probe(address)
        try:
            with warnings.catch_warnings():  # Ray's tip about accelerators: not for our users
                warnings.simplefilter("ignore", FutureWarning)
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                         namespace=f"liquid-fed-{uuid.uuid4().hex[:8]}")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--ray: could not join the Ray cluster at {address!r}: "
                              f"{exc}") from exc
        joined = True
        # After ray.init, which installs Ray's own SIGTERM handler (it would kill this process
        # before the cleanup below): SIGTERM and SIGHUP stop the study like Ctrl-C.
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM,
                                                                          signal.SIGHUP)}
        here = ray.get_runtime_context().get_node_id()
        collector = ray.remote(num_cpus=0, max_concurrency=1)(Collector).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
        ).remote(str(out))
        ray.get(collector.ready.remote())
        by_id = {job_id(setting.id, seed): (setting, seed, methods)
                 for setting, seed, methods in jobs}
        trainable = tune.with_resources(
            tune.with_parameters(_trial, study=study, jobs=by_id, collector=collector),
            {"cpu": TRIAL_CPUS})
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search(list(by_id))},
            # reuse_actors: a trial's process (torch and the library imported) trains the next
            # job on its node instead of a fresh process importing them again
            tune_config=tune.TuneConfig(trial_dirname_creator=_trial_dirname,
                                        trial_name_creator=_trial_dirname, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=str(out / TUNE_DIR), verbose=0,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=True),
                callbacks=[_progress(tick)]))
        log.info("Tune experiment %s: %d trial(s) on %s", name, len(by_id), address)
        grid = tuner.fit()
        if grid.errors:  # fail_fast: the first failure stops the study, as a local run does
            raise DeploymentError(f"a trial of the study failed on the cluster: "
                                  f"{_cause(grid.errors[0])}")
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if joined:
            log.info("removing the experiment's session folders on the cluster")
            _remove_experiment_folders(ray, name, out, interrupted)
            log.info("leaving the cluster")
            ray.shutdown()
            log.info("left the cluster")  # ends this job: Ray stops its trials and the collector
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail at once when nothing listens at a ``host:port`` address: ``ray.init`` would wait
    for minutes. Other forms (``auto``, ``ray://...``) are left to Ray."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"--ray: could not join the Ray cluster at {address!r}: nothing "
                          f"answers there ({exc.strerror or exc}); expected the host:port of a "
                          "running cluster's head (ray start --head --port=...)") from exc


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _trial_dirname(trial: Any) -> str:
    return str(trial.config["job"])


def _cause(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"


class Collector:
    """Writes the run folders the trials send into the study folder (on the driver's node)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out).resolve()

    def ready(self) -> bool:
        return True

    def write(self, files: dict[str, bytes]) -> None:
        """Write ``{path in the study folder: bytes}``, each file whole, summaries last."""
        last = [p for p in files if Path(p).name == SUMMARY_FILE]
        for rel in [p for p in files if p not in last] + last:
            path = (self.out / rel).resolve()
            if self.out not in path.parents:
                raise ValueError(f"a trial sent {rel!r}, outside the study folder")
            atomic_write(path, files[rel])


def _progress(tick: Callable[[str, float], None]) -> Any:
    """A Tune callback on the driver: ticks the bar as each run finishes."""
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                            **info: Any) -> None:
            tick(result["method"], float(result["seconds"]))

    return Progress()


def _trial(config: dict[str, Any], study: Any, jobs: dict[str, tuple],
           collector: Any) -> None:
    """One job in a Tune trial: its methods into a private folder, each sent to the collector
    and reported to Tune as it finishes."""
    import ray
    from ray import tune

    setting, seed, methods = jobs[config["job"]]
    node = ray.get_runtime_context().get_node_id()
    workdir = os.getcwd()  # Tune's working folder of the trial (it changed into it); unused
    work = Path(tempfile.mkdtemp(prefix="liquid-fed-trial-"))
    try:
        # The private folder stands in for the study folder: run_cell checks it still holds a
        # study file (a study folder deleted mid-way must fail); the collector never copies it.
        (work / studies.STUDY_FILE).write_text("# a Tune trial's private folder\n")
        folder = studies.cell_dir(work, setting.id, seed)

        def done(method: str, seconds: float) -> None:
            run_dir = folder / studies.method_slug(method)
            RunDir(run_dir).update_summary(ray_node_id=node)  # where it ran (not in the rows)
            files = {str(p.relative_to(work)): p.read_bytes()
                     for p in [folder / VIEWS_FILE, *sorted(run_dir.rglob("*"))]
                     if p.is_file() and ".tmp-" not in p.name}
            ray.get(collector.write.remote(files))
            row = studies.result_row(study, setting, seed, method, work)
            # every result the same keys (Tune's CSV log takes its columns from the first)
            metrics = {k: float(row[k]) if isinstance(row.get(k), (int, float)) else math.nan
                       for k in REPORTED}
            tune.report({**metrics, "method": method, "cell": setting.id, "seed": seed,
                         "seconds": seconds, "node": node})

        studies.run_cell(study, setting, seed, methods, work, None, done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Out of the folder first: a reused trial process asks for its working folder (getcwd)
    # before it changes into the next trial's.
    os.chdir(tempfile.gettempdir())
    _remove_working_folder(Path(workdir))


def _remove_experiment_folders(ray: Any, name: str, out: Path, interrupted: bool) -> None:
    """Remove the experiment's folders from Ray's session folders: Tune makes a working folder
    per trial there (``<temp>/<session>/artifacts/<time>/<name>/``; a finished trial removes
    its own) and keeps the driver's staging copy of its logs (the real copy is in the study
    folder). Interrupted trials leave theirs: then one short task per other node removes them
    (a node's session folder may be anywhere: its own --temp-dir)."""
    if interrupted:  # Tune had no time to copy its logs from the staging folder: keep them
        _remove_session_folders(name, keep=out / TUNE_DIR / name)
        log.info("Tune's logs of the interrupted experiment kept in %s", out / TUNE_DIR / name)
    else:
        _remove_session_folders(name)  # the driver's node
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        here = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
        remove = ray.remote(num_cpus=0)(_remove_session_folders)
        ray.get([remove.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(name) for node in nodes], timeout=30)
    except Exception as exc:  # noqa: BLE001 - the cluster is going or gone: nothing to clean
        log.warning("could not remove Tune's working folders of %s on the cluster: %s",
                    name, exc)


def _remove_session_folders(name: str, keep: Path | None = None) -> int:
    """On one node: remove ``<temp>/<session>/artifacts/*/<name>`` and its emptied parent,
    first copying the driver's staging folder of Tune's logs into ``keep`` if given."""
    import ray

    context = ray.get_runtime_context()
    artifacts = Path(context.get_temp_dir()) / context.get_session_name() / "artifacts"
    removed = 0
    for folder in artifacts.resolve().glob(f"*/{name}"):
        staged = folder / "driver_artifacts"
        if keep is not None and staged.is_dir():
            shutil.copytree(staged, keep, dirs_exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # kept when another experiment's folder is there too
    return removed


def _remove_working_folder(workdir: Path) -> None:
    """A finished trial's working folder (empty: trials write elsewhere), and its parents up to
    the experiment's folder when they are left empty."""
    for folder in (workdir, workdir.parent, workdir.parent.parent, workdir.parent.parent.parent):
        try:
            folder.rmdir()
        except OSError:
            return


__all__ = ["EXTRA", "TUNE_DIR", "check_study", "require_tune", "run_on_cluster"]
