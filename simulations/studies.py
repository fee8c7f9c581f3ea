"""The process side of ``liquid-fed compare``: a study's cells in this process or in a pool.

:mod:`liquid_fed.study` defines a study (its settings, seeds and methods) and trains one cell;
this module schedules the cells — one after another, in ``workers`` spawned processes, or as
Ray Tune trials on a running Ray cluster (``ray``, :mod:`simulations.tune`) —
ticks the progress bar, runs ``engine: federated`` cells through Flower's simulation engine
(:func:`simulations.simulate.launch`), and writes ``results.csv``, ``report.md`` and the
figures at the end. Interrupted, every finished run is kept and ``--resume`` skips it.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liquid_fed import rundir
from liquid_fed import study as studies
from liquid_fed.config import RunConfig
from liquid_fed.progress import Progress
from liquid_fed.rundir import RunLock


@dataclass
class StudyOutcome:
    """What a finished (or interrupted) study left behind."""

    name: str
    out: Path
    rows: int = 0  # result rows written
    figures: int = 0  # figures written
    interrupted: bool = False


def compare(study_file: str | Path, overrides: list[str], out: str | Path | None = None,
            workers: int = 1, resume: bool = False, force: bool = False, quiet: bool = False,
            command: str = "liquid-fed compare", ray: str | None = None) -> StudyOutcome:
    """Run every (setting, seed, method) run of a study not yet finished, then its report.

    Args:
        study_file: the study YAML.
        overrides: ``key=value`` overrides of the study file.
        out: the study folder (default: ``<out of the base config>/<name>``).
        workers: cells trained in parallel processes.
        resume: skip the runs already finished.
        force: start over a folder holding a study.
        quiet: no progress bar.
        command: what the study folder's lock records as its holder.
        ray: the address of a running Ray cluster: the jobs run there as Ray Tune trials
            (:mod:`simulations.tune`; the same rows). None: in this machine's processes.

    Returns:
        A :class:`StudyOutcome` (``interrupted`` after Ctrl-C; the finished runs are kept).

    Raises:
        ConfigError: the study file or one of its cells is invalid (before anything runs);
            with ``ray``: Ray Tune is missing, ``engine: federated``, or the cluster cannot be
            joined.
        DeploymentError: with ``ray``: a trial failed.
        RunFolderError: the folder is locked, or holds a study and neither flag was given.
    """
    from liquid_fed.report import render
    from liquid_fed.study_plots import plot_study

    study = studies.load_study(study_file, overrides)
    if ray is not None:
        from simulations import tune

        tune.check_study(study, ray, workers)
        tune.require_tune()  # before the folder is touched: the error names the extra
    folder = Path(out) if out else Path(study.base.get("out", "runs")) / study.name
    with RunLock(folder).acquire(command):
        studies.prepare_study(study, folder, resume, force)
        jobs = [(setting, seed, [m for m in study.methods
                                 if not studies.finished(folder, setting.id, seed, m)])
                for setting, seed in study.cells()]
        jobs = [j for j in jobs if j[2]]
        total = sum(len(j[2]) for j in jobs)
        done = len(list(study.cells())) * len(study.methods) - total
        if done:
            print(f"resuming: {done} finished run(s) skipped, {total} to go", file=sys.stderr)
        bar = Progress(total, f"compare {study.name}", not quiet, unit="run")
        try:
            if ray is not None and jobs:
                from simulations.tune import run_on_cluster

                bar.bar.set_description(f"compare {study.name} (Ray cluster {ray})")
                run_on_cluster(study, folder, jobs, ray, _ticker(bar))
            else:
                run_jobs(study, folder, jobs, workers, bar)
        except KeyboardInterrupt:
            bar.close()
            return StudyOutcome(study.name, folder, interrupted=True)
        bar.close()
        rows = studies.collect(study, folder)
        studies.write_results(rows, folder)
        rundir.RunDir(folder).write_text(studies.REPORT_FILE, render(study, rows) + "\n")
        figures = plot_study(study, folder)
    return StudyOutcome(study.name, folder, len(rows), len(figures))


def _ticker(bar: Progress) -> Any:
    """The bar's tick after each finished run: (method, seconds) -> None."""
    def tick(method: str, seconds: float) -> None:
        bar.bar.set_postfix({"last": method, "s": f"{seconds:.1f}"}, refresh=False)
        bar.bar.update(1)

    return tick


def run_jobs(study: Any, out: Path, jobs: list, workers: int, bar: Progress) -> None:
    """Run every (cell, seed, methods) job: in this process, or in ``workers`` processes."""
    federated = federated_runner if study.engine == "federated" else None
    tick = _ticker(bar)

    if workers <= 1 or len(jobs) <= 1:
        for setting, seed, methods in jobs:
            studies.run_cell(study, setting, seed, methods, out, federated, tick)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = mp.get_context("spawn")
    queue = context.Queue()  # inherited by the workers at start: no manager process to outlive us
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(queue, os.getpid()))
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM,
                                                                      signal.SIGHUP)}
    try:
        running = {pool.submit(_job, study, setting, seed, methods, out)
                   for setting, seed, methods in jobs}
        bar.bar.set_description(f"compare {study.name} ({workers} workers)")
        while running:
            finished, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            while not queue.empty():
                tick(*queue.get())
            for future in finished:
                future.result()  # a failed cell stops the study, with its error
        while not queue.empty():
            tick(*queue.get())
    finally:
        # Interrupted or failed: no worker may keep training into the study folder.
        for process in list(getattr(pool, "_processes", {}).values()):
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


_QUEUE: Any = None


def _start_worker(queue: Any, launcher: int) -> None:
    """A pool worker: dies with the launcher (SIGKILL included) and reports to ``queue``."""
    global _QUEUE
    from liquid_fed.procs import die_with_parent

    die_with_parent()
    if os.getppid() != launcher:  # the launcher died while this worker was starting
        os._exit(1)
    _QUEUE = queue


def _job(study: Any, setting: Any, seed: int, methods: list[str], out: Path) -> None:
    """One cell in a worker process (module level: picklable for ``spawn``)."""
    federated = federated_runner if study.engine == "federated" else None
    studies.run_cell(study, setting, seed, methods, out, federated,
                     lambda method, seconds: _QUEUE.put((method, seconds)))


def federated_runner(cfg: RunConfig, run_dir: Path) -> None:
    """The Liquid Ensemble of a cell through Flower on Ray (``engine: federated``)."""
    from liquid_fed.errors import ClientFailure
    from simulations.simulate import launch

    with RunLock(run_dir).acquire("liquid-fed compare (federated cell)") as lock:
        result = launch(cfg, run_dir, quiet=True, lock_fd=lock.fd)
        run = rundir.RunDir(run_dir)
        if result.returncode != 0 or not run.finished:
            raise ClientFailure(f"the federated run of {run_dir} failed (exit "
                                f"{result.returncode}); see the messages above")
        run.update_summary(peak_memory_bytes=result.peak_memory_bytes)
