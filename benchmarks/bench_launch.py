"""Benchmark: today's launcher against Flower's supported path, on the same run.

The same config (the quickstart by default, 4 clients, ``train.epochs=3``, references off) is
launched two ways, alternately, and the two are printed side by side:

* **(a) today**: ``liquid-fed run CONFIG --quiet --force`` in a subprocess, i.e.
  :func:`simulations.simulate.launch`: a child process calls ``flwr.simulation.run_simulation``
  with the patched dispatch loop of :mod:`simulations.engine`;
* **(b) flwr run**: ``flwr run . local --stream`` against a connection whose address is
  ``":local:"``: the ``flwr`` CLI starts a detached ``flower-superlink --simulation`` (which
  starts ``flower-superexec``, which starts one ``flwr-simulation`` process per run), builds the
  app's FAB, submits it with ``--run-config`` (``config``, ``set``) and
  ``--federation-config`` (``num-supernodes``, client resources and Ray's init args matching
  what (a) passes to ``run_simulation``) and streams the logs until the run ends. The
  SuperLink's ports are free ones (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``,
  ``FLWR_LOCAL_CONTROL_API_PORT``) and ``FLWR_HOME`` is a temporary folder, so another
  SuperLink on the machine is neither reused nor disturbed.

What is measured, the same way for both, from the run folder and the launcher's clock:

* *per round*: the run folder records no clock per round, only ``wall_seconds`` (from the
  first training round to the end of the final evaluation) and ``rounds``. With
  ``--short-epochs S`` (default 1) every launch is also run for S epochs, and the steady-state
  time of one round (one train exchange) is ``(wall(E) - wall(S)) / (rounds(E) - rounds(S))``:
  the final evaluation cancels. *per exchange* is ``wall / (rounds + 2)`` of the long run
  (the final val+test evaluation and checkpoint are one exchange each).
* *start-up*: from the launch to the first training round (``mtime(metrics.jsonl) - wall``:
  ``metrics.jsonl`` is written at the end of the final evaluation).
* *total*: from the launch until every process of the run is gone (for (b): ``flwr run``
  returned and the SuperLink, SuperExec and simulation processes were stopped).

Every process a launch starts carries ``LIQUID_FED_BENCH_TAG=<tag>`` in its environment
(inherited by the detached SuperLink and by Ray's workers). After each launch, on an error, on
Ctrl-C, SIGTERM or SIGHUP, they are stopped (SIGTERM, then SIGKILL) and the temporary folders
removed; a small reaper process does the same if the benchmark itself is killed outright.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_launch [--epochs 3] [--repeats 1]``.
Timings depend on the machine's load: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from liquid_fed import procs

ROOT = Path(__file__).resolve().parents[1]  # the Flower App (pyproject.toml)
CONFIG = ROOT / "configs" / "quickstart.yaml"
TAG_ENV = "LIQUID_FED_BENCH_TAG"
#: Both launches train only: no centralized references, no evaluation during training.
BASE_SET = ["baselines.uniform=false", "baselines.independent=false", "train.eval_every=0"]
RATIO_TARGET = 1.2  # (b) / (a) per round: the bar for switching


class BenchError(RuntimeError):
    """A launch failed or left no finished run folder."""


@dataclass
class Launch:
    """One finished launch: its run folder's figures and the launcher's clock (seconds)."""

    rounds: int
    wall: float  # first training round to the end of the final evaluation
    startup: float
    total: float
    accuracy: float

    @property
    def per_exchange(self) -> float:
        return self.wall / (self.rounds + 2)


def _measure(run_dir: Path, t_launch: float, t_gone: float) -> Launch:
    """Read a finished run folder; ``t_*`` are ``time.time()`` values."""
    summary_file, metrics_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if not summary_file.exists():
        raise BenchError(f"{run_dir} holds no summary.json: the run did not finish")
    summary = json.loads(summary_file.read_text())
    wall = float(summary["wall_seconds"])
    first_round = metrics_file.stat().st_mtime - wall
    return Launch(int(summary["rounds"]), wall, first_round - t_launch, t_gone - t_launch,
                  float(summary["test"].get("accuracy", float("nan"))))


def _start(cmd: list[str], env: dict[str, str], out: Any, cwd: Path) -> subprocess.Popen:
    """``cmd`` in its own session, output to ``out``; it gets SIGTERM if this process dies."""
    parent = os.getpid()

    def prepare() -> None:
        procs.die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=prepare)


def _stop(proc: subprocess.Popen | None, tag: str) -> set[int]:
    """Stop ``proc``'s tree and everything tagged; the pids still alive (normally none)."""
    if proc is not None:
        procs.terminate(proc, grace=5.0)
    return procs.kill_tagged(TAG_ENV, tag)


def _wait(proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout:.0f} s; log: {log}") from None
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise BenchError(f"{what} failed (exit {rc}):\n{tail}")


def launch_today(overrides: list[str], run_dir: Path, work: Path, timeout: float,
                 tag: str) -> Launch:
    """(a): ``liquid-fed run`` (simulations.simulate.launch -> run_simulation)."""
    cmd = [sys.executable, "-m", "liquid_fed.cli", "run", str(CONFIG), "--quiet", "--force",
           "--out", str(run_dir)]
    for item in [*overrides, f"name={run_dir.name}"]:
        cmd += ["--set", item]
    log = work / f"today-{run_dir.name}.log"
    proc = None
    t0 = time.time()
    try:
        with log.open("w") as out:
            proc = _start(cmd, {**os.environ, TAG_ENV: tag}, out, ROOT)
            _wait(proc, timeout, "liquid-fed run", log)
    finally:
        left = _stop(proc, tag)
    t_gone = time.time()
    if left:
        raise BenchError(f"liquid-fed run left processes behind: {sorted(left)}")
    return _measure(run_dir, t0, t_gone)


def launch_flwr_run(cfg: Any, overrides: list[str], run_dir: Path, work: Path,
                    timeout: float, tag: str) -> Launch:
    """(b): ``flwr run . local --stream`` against a ``:local:`` simulation SuperLink."""
    from liquid_fed.procs import free_port
    from server.deploy_local import write_toml
    from simulations.simulate import QUIET_ENV, ray_environment

    tmp = Path(tempfile.mkdtemp(prefix=f"lfb-{tag[-8:]}-", dir="/tmp"))  # short: Ray's socket paths
    home = tmp / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    sets = [*overrides, f"out={run_dir.parent}", f"name={run_dir.name}"]
    write_toml(tmp / "run-config.toml", {"config": str(CONFIG.relative_to(ROOT)),
                                          "set": shlex.join(sets)})
    sim = cfg.simulation
    if sim.num_cpus_per_client != int(sim.num_cpus_per_client):
        raise BenchError("flwr run takes whole CPUs per client (client-resources-num-cpus is "
                         f"an integer); got simulation.num_cpus_per_client = "
                         f"{sim.num_cpus_per_client}")
    federation = (f"num-supernodes={cfg.n_clients} "
                  f"client-resources-num-cpus={int(sim.num_cpus_per_client)} "
                  f"client-resources-num-gpus={float(sim.num_gpus_per_client)} "
                  f"init-args-num-cpus={os.cpu_count() or 1} "
                  'init-args-logging-level="ERROR" init-args-log-to-driver=false')
    flwr = Path(sys.executable).parent / "flwr"
    cmd = [str(flwr if flwr.exists() else "flwr"), "run", str(ROOT), "local", "--stream",
           "--run-config", str(tmp / "run-config.toml"), "--federation-config", federation]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **ray_environment(cfg, tmp), **QUIET_ENV, TAG_ENV: tag,
           "FLWR_HOME": str(home), "PATH": path,
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    log = work / f"flwr-run-{run_dir.name}.log"
    proc = None
    t0 = time.time()
    try:
        with log.open("w") as out:
            proc = _start(cmd, env, out, tmp)
            _wait(proc, timeout, "flwr run", log)
    finally:
        left = _stop(proc, tag)  # the detached SuperLink, its SuperExec and simulation
        superlink_log = home / "local-superlink" / "superlink.log"
        if superlink_log.exists():
            shutil.copy(superlink_log, work / f"superlink-{run_dir.name}.log")
        shutil.rmtree(tmp, ignore_errors=True)
    t_gone = time.time()
    if left:
        raise BenchError(f"flwr run left processes behind: {sorted(left)}")
    return _measure(run_dir, t0, t_gone)


# --------------------------------------------------------------------------------------------
# Reaper: takes a killed benchmark's processes down with it
# --------------------------------------------------------------------------------------------


def _reap(parent: int, tag: str, work: str) -> int:
    """Wait for ``parent`` to go; then stop every process tagged ``tag``, remove ``work``
    and the launches' temporary folders."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's to handle
    while os.getppid() == parent:
        time.sleep(0.5)
    procs.kill_tagged(TAG_ENV, tag)
    if work:
        shutil.rmtree(work, ignore_errors=True)
    for tmp in Path("/tmp").glob(f"lfb-{tag[-8:]}-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _fmt(value: float, unit: str) -> str:
    return f"{1e3 * value:.0f} ms" if unit == "ms" else f"{value:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_launch", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the long run "
                        "(default: 3)")
    parser.add_argument("--short-epochs", type=int, default=1, help="epochs of the short run "
                        "for the steady-state round time; 0: no short run (default: 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="launches of each kind and length; medians are printed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for both launches (repeatable)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one launch may take (default: 600)")
    parser.add_argument("--keep", metavar="DIR", help="keep run folders and logs in DIR")
    args = parser.parse_args(argv)
    if not 0 <= args.short_epochs < args.epochs:
        parser.error(f"--short-epochs must be in 0..{args.epochs - 1}; got {args.short_epochs}")

    from liquid_fed.config import load_config

    overrides = [*BASE_SET, *args.set]
    cfg = load_config(str(CONFIG), [*overrides, f"train.epochs={args.epochs}"])
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-launch-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tag = f"lf-bench-{uuid.uuid4().hex}"  # every process of every launch carries it
    reaper = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_launch", "--_reap",
                               str(os.getpid()), tag, "" if args.keep else str(work)],
                              cwd=ROOT, start_new_session=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    print(f"flwr {metadata.version('flwr')}, ray {metadata.version('ray')}, "
          f"{cfg.n_clients} clients, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"config {CONFIG.relative_to(ROOT)} with {' '.join(overrides)}; "
          f"epochs {args.epochs} (short {args.short_epochs}), repeats {args.repeats}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    results: dict[tuple[str, int], list[Launch]] = {}
    lengths = [args.epochs] + ([args.short_epochs] if args.short_epochs else [])
    t_start = time.perf_counter()
    try:
        for rep in range(args.repeats):
            for epochs in lengths:
                sets = [*overrides, f"train.epochs={epochs}"]
                for kind in ("a", "b"):  # alternate, so that load drifts hit both alike
                    run_dir = work / f"{kind}-e{epochs}-r{rep}"
                    if kind == "a":
                        res = launch_today(sets, run_dir, work, args.timeout, tag)
                    else:
                        res = launch_flwr_run(cfg, sets, run_dir, work, args.timeout, tag)
                    results.setdefault((kind, epochs), []).append(res)
                    print(f"  ({kind}) {epochs} epochs: {res.rounds} rounds, wall "
                          f"{res.wall:.2f} s, start-up {res.startup:.1f} s, total "
                          f"{res.total:.1f} s, test accuracy {res.accuracy:.4f}", flush=True)
    except KeyboardInterrupt:
        print("bench_launch: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench_launch: {exc}", file=sys.stderr)
        return 1
    finally:
        reaper.terminate()
        reaper.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"benchmark took {time.perf_counter() - t_start:.0f} s")
    print(format_table(results, args.epochs, args.short_epochs))
    return 0


def _median(values: list[float]) -> float:
    return statistics.median(values)


def format_table(results: dict[tuple[str, int], list[Launch]], epochs: int, short: int) -> str:
    """One row per figure: (a), (b) and the ratio (b)/(a)."""
    rows: list[tuple[str, str, float, float]] = []

    def med(kind: str, attr: str, e: int = epochs) -> float:
        return _median([getattr(r, attr) for r in results[(kind, e)]])

    if short:
        def steady(kind: str) -> float:
            return _median([(lg.wall - sh.wall) / (lg.rounds - sh.rounds) for lg, sh in
                            zip(results[(kind, epochs)], results[(kind, short)], strict=True)])

        rows.append(("per round, steady state", "ms", steady("a"), steady("b")))
    rows.append(("per exchange, mean of the run", "ms", med("a", "per_exchange"),
                 med("b", "per_exchange")))
    rows.append(("start-up to first round", "s", med("a", "startup"), med("b", "startup")))
    rows.append((f"total wall ({epochs} epochs)", "s", med("a", "total"), med("b", "total")))
    rounds = results[("a", epochs)][0].rounds
    lines = [f"{'figure':32} {'(a) liquid-fed run':>19} {'(b) flwr run':>13} {'(b)/(a)':>8}",
             "-" * 75]
    for name, unit, a, b in rows:
        lines.append(f"{name:32} {_fmt(a, unit):>19} {_fmt(b, unit):>13} {b / a:>7.2f}x")
    lines.append(f"({rounds} rounds per long run; switch bar: per round <= "
                 f"{RATIO_TARGET:.1f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_reap":
        sys.exit(_reap(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
    sys.exit(main())
