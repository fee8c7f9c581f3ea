"""Benchmark: the federated Liquid Ensemble on Flower/Ray against its centralized reference.

For each client count K it trains the quickstart task (digits, MLP experts; K image patches of
a finer grid for K > 4) three ways and prints them side by side:

* **centralized**: :mod:`liquid_fed.centralized` in this process (``train_ensemble``), the
  same experts, batches and optimiser, one torch thread like each client; timed before the
  Flower runs and again after each pair of them (the median of all: the machine's own speed
  drifts by a third and more within minutes, and a twin timed only at the start skewed the
  ratio);
* **protocol, no Flower**: ``Federation(cfg, LocalTransport(K)).run()`` in this process: the
  exact client and server code with in-memory messages, i.e. the protocol's own cost;
* **Flower/Ray**: the real CLI (``liquid-fed run --quiet --force``) in a subprocess; numbers
  come from its ``summary.json``.

How the Flower numbers are split:

* *s/epoch* is the steady-state training time per epoch, ``(wall(E) - wall(1)) / (E - 1)``
  from two runs of E and 1 epochs: ``wall_seconds`` of a run also holds the actors' first-call
  warm-up and the final val + test evaluation, which cancel in the difference. (With one
  epoch, as in ``--quick``, it is ``wall / E`` and says so.)
* *start-up* is ``engine.startup_seconds``: Ray, the actors, and the hello and setup
  exchanges, up to the first training round.
* *shutdown* splits ``engine.after_training_seconds`` (the end of the training loop's clock
  to the end of ``run_simulation`` and ``ray.shutdown``) by two files' modification times:
  ``metrics.jsonl`` is written after the final test evaluation, the newest checkpoint
  generation's ``manifest.json`` after the final checkpoint exchange. *final ckpt* is the
  time between them; *teardown* is the rest: writing ``summary.json`` (milliseconds without
  references) and Flower's and Ray's shutdown.
* *peak memory* is the CLI's PSS peak of the whole process tree (``peak_memory_bytes``).

Run: ``python -m benchmarks.bench_federation [--quick] [--clients 4,16,64] [--epochs N]``.
Timings depend on the machine's load: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
#: Federated runs measure training only: no references, no evaluation during training.
BASE_SET = ["baselines.uniform=false", "baselines.independent=false", "train.eval_every=0"]
#: Federated / centralized seconds per epoch, by client count (issue 18).
RATIO_TARGETS = {4: 2.0, 16: 3.0, 64: 4.0}
#: Peak memory of the whole process tree (bytes), every client count up to 256 (issue 18).
MEMORY_TARGET = 3 * 2**30


def task_overrides(k: int) -> tuple[list[str], str]:
    """Overrides that give the quickstart task ``k`` views, and a description of them.

    Image patches of an a x b grid (a * b = k, both at most 8) keep the quickstart's data set;
    other counts up to 64 fall back to contiguous pixel blocks of ``digits_flat``; beyond the
    64 pixels, blocks of a synthetic table with 8 columns per 8 parties-worth of groups
    (``synthetic_regions``, 3,000 samples, 2 classes).
    """
    for a in range(math.isqrt(k), 0, -1):
        if k % a == 0 and k // a <= 8:
            b = k // a
            return ([f"views.n_views={k}", f"views.options={{grid: [{a}, {b}]}}"],
                    f"digits, patches grid {a}x{b}")
    if k <= 64:
        return ([f"views.n_views={k}", "data.name=digits_flat", "views.kind=blocks",
                 "views.options={}"], "digits_flat, pixel blocks")
    groups = -(-k // 8) * 8 // 4  # 4 signal + 4 region columns per group: >= 2 per view
    return ([f"views.n_views={k}", "data.name=synthetic_regions",
             f"data.options={{n_groups: {groups}, features_per_group: 4}}",
             "views.kind=blocks", "views.options={}"],
            f"synthetic_regions ({groups} groups x 8 columns), blocks")


def auto_epochs(k: int) -> int:
    """More epochs where they are cheap (few clients), at least 2 for the difference."""
    return max(2, min(10, 48 // k))


def median_runs(fn: Callable[[], float], repeats: int, budget_s: float) -> float:
    """Median of ``fn()`` over up to ``repeats`` calls, stopping early past ``budget_s``."""
    values: list[float] = []
    start = time.perf_counter()
    while len(values) < repeats and (not values or time.perf_counter() - start < budget_s):
        values.append(fn())
    return statistics.median(values)


# --------------------------------------------------------------------------------------------
# The three ways to train
# --------------------------------------------------------------------------------------------


class InProcess:
    """Centralized and in-process federated (protocol-only: ``LocalTransport``) training of
    one config in this process, timed per epoch after a warm-up; every timing is kept."""

    def __init__(self, overrides: list[str], epochs: int) -> None:
        from liquid_fed.centralized import build_ensemble, central_data, train_ensemble
        from liquid_fed.config import load_config

        self.cfg = load_config(str(CONFIG), overrides + [f"train.epochs={epochs}"])
        self.epochs = epochs
        self.data = central_data(self.cfg)
        warm = load_config(str(CONFIG), overrides + ["train.epochs=1"])
        train_ensemble(warm, self.data, build_ensemble(warm, self.data))  # torch's first calls
        self.central_times: list[float] = []
        self.acc: dict[str, float] = {}

    def central(self) -> float:
        """One centralized run's seconds per epoch (also kept in :attr:`central_times`)."""
        from liquid_fed.centralized import build_ensemble, train_ensemble

        result = train_ensemble(self.cfg, self.data, build_ensemble(self.cfg, self.data))
        self.acc["central"] = result["test"].get("accuracy", math.nan)
        self.central_times.append(result["wall_seconds"] / self.epochs)
        return self.central_times[-1]

    def local(self) -> float:
        """One protocol-only run's seconds per epoch (training rounds only)."""
        from liquid_fed.federation import Federation, LocalTransport

        last: list[float] = []
        fed = Federation(self.cfg, LocalTransport(self.cfg.n_clients),
                         on_round=lambda info: last.append(info.elapsed))
        result = fed.run()
        self.acc["local"] = result.test.get("accuracy", math.nan)
        return last[-1] / self.epochs  # the final evaluations excluded


def run_cli(overrides: list[str], out: Path) -> dict[str, Any]:
    """One ``liquid-fed run`` in a subprocess; its summary plus timings read from its files."""
    cmd = [sys.executable, "-m", "liquid_fed.cli", "run", str(CONFIG), "--quiet", "--force",
           "--out", str(out)]
    for item in BASE_SET + overrides:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    command_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"liquid-fed run failed (exit {proc.returncode}): {' '.join(cmd)}")
    summary = json.loads((out / "summary.json").read_text())
    t_test = (out / "metrics.jsonl").stat().st_mtime
    t_ckpt = max(p.stat().st_mtime for p in (out / "checkpoints").glob("gen-*/manifest.json"))
    final_ckpt = t_ckpt - t_test
    summary["bench"] = {"command_seconds": command_s, "final_checkpoint_seconds": final_ckpt,
                        "teardown_seconds": summary["engine"]["after_training_seconds"]
                        - final_ckpt}
    return summary


@dataclass
class Row:
    """Everything printed for one client count."""

    k: int
    task: str
    epochs: int
    rounds_per_epoch: int
    central_s: float
    local_s: float
    fed_s: float
    fed_raw_s: float  # wall / E of the E-epoch run (warm-up and final evaluations included)
    steady: bool  # fed_s from the difference of two runs
    startup_s: float
    after_s: float
    final_ckpt_s: float
    teardown_s: float
    command_s: float
    peak_bytes: int
    bytes_per_round: float
    central_runs: int = 1
    central_spread: tuple[float, float] = (math.nan, math.nan)  # min, max s/epoch
    acc: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.fed_s / self.central_s

    @property
    def transport_ms_per_round(self) -> float:
        return 1e3 * (self.fed_s - self.local_s) / self.rounds_per_epoch


def bench_clients(k: int, epochs: int, repeats: int, fed_repeats: int, extra: list[str],
                  workdir: Path, log: Callable[[str], None]) -> Row:
    """All measurements for ``k`` clients."""
    overrides, task = task_overrides(k)
    overrides += extra
    log(f"[{k} clients] in-process centralized and protocol-only, {epochs} epochs ...")
    ip = InProcess(overrides, epochs)
    median_runs(ip.central, repeats, budget_s=10.0)
    local_s = median_runs(ip.local, repeats, budget_s=15.0)
    long_runs, short_runs = [], []
    for rep in range(fed_repeats):
        log(f"[{k} clients] liquid-fed run, {epochs} epochs (repeat {rep + 1}/{fed_repeats}) ...")
        long_runs.append(run_cli(overrides + [f"train.epochs={epochs}"],
                                 workdir / f"k{k}-e{epochs}-r{rep}"))
        if epochs > 1:
            log(f"[{k} clients] liquid-fed run, 1 epoch ...")
            short_runs.append(run_cli(overrides + ["train.epochs=1"], workdir / f"k{k}-e1-r{rep}"))
        # The machine's speed drifts over minutes: one more centralized run after each Flower
        # pair keeps the twin's timings spread over the same minutes as the Flower runs'.
        log(f"[{k} clients] centralized again ...")
        ip.central()
    runs = long_runs + short_runs

    def med(get: Callable[[dict[str, Any]], float], among: Sequence[dict[str, Any]] = runs
            ) -> float:
        return statistics.median(get(s) for s in among)

    raw = med(lambda s: s["wall_seconds"] / epochs, long_runs)
    if short_runs:
        fed = statistics.median((a["wall_seconds"] - b["wall_seconds"]) / (epochs - 1)
                                for a, b in zip(long_runs, short_runs, strict=True))
    else:
        fed = raw
    first = long_runs[0]
    return Row(
        k=k, task=task, epochs=epochs, rounds_per_epoch=first["rounds"] // first["epochs"],
        central_s=statistics.median(ip.central_times), local_s=local_s, fed_s=fed,
        fed_raw_s=raw, central_runs=len(ip.central_times),
        central_spread=(min(ip.central_times), max(ip.central_times)),
        steady=bool(short_runs),
        startup_s=med(lambda s: s["engine"]["startup_seconds"]),
        after_s=med(lambda s: s["engine"]["after_training_seconds"]),
        final_ckpt_s=med(lambda s: s["bench"]["final_checkpoint_seconds"]),
        teardown_s=med(lambda s: s["bench"]["teardown_seconds"]),
        command_s=med(lambda s: s["bench"]["command_seconds"]),
        peak_bytes=max(int(s["peak_memory_bytes"]) for s in runs),
        bytes_per_round=first["bytes_per_round"],
        acc={"centralized": ip.acc["central"], "protocol": ip.acc["local"],
             "flower": first["test"].get("accuracy", math.nan)},
    )


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress on stderr; the results go to stdout."""
    print(msg, file=sys.stderr, flush=True)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def print_block(row: Row, actors: str) -> None:
    how = (f"(wall({row.epochs}) - wall(1)) / {row.epochs - 1}: steady state" if row.steady
           else f"wall / {row.epochs}: includes actor warm-up and the final val+test evaluation")
    print(f"\n== {row.k} clients: {row.task}, {row.rounds_per_epoch} rounds/epoch, "
          f"{row.epochs} epochs; {actors} ==")
    print(f"  {'':<40} {'s/epoch':>8} {'vs central':>10} {'test acc':>9}")
    print(f"  {'centralized (in-process, 1 thread)':<40} {row.central_s:>8.3f} {1.0:>9.2f}x "
          f"{row.acc['centralized']:>9.4f}")
    print(f"  {'federated protocol, no Flower':<40} {row.local_s:>8.3f} "
          f"{row.local_s / row.central_s:>9.2f}x {row.acc['protocol']:>9.4f}")
    print(f"  {'federated on Flower/Ray':<40} {row.fed_s:>8.3f} {row.ratio:>9.2f}x "
          f"{row.acc['flower']:>9.4f}")
    print(f"    s/epoch on Flower = {how}; wall/{row.epochs} = {row.fed_raw_s:.3f}")
    lo, hi = row.central_spread
    print(f"    centralized s/epoch = median of {row.central_runs} runs, before and between the "
          f"Flower runs ({lo:.3f}-{hi:.3f})")
    print(f"    Flower/Ray transport cost: {row.transport_ms_per_round:.0f} ms per round "
          f"(Flower minus protocol-only, per round)")
    print(f"  start-up {row.startup_s:.1f} s | after training {row.after_s:.1f} s = final "
          f"checkpoint {row.final_ckpt_s:.2f} s + teardown {row.teardown_s:.1f} s "
          f"(+ summary) | whole command {row.command_s:.1f} s")
    print(f"  peak memory {row.peak_bytes / 1e9:.2f} GB ({row.peak_bytes / 2**30:.2f} GiB) | "
          f"{row.bytes_per_round / 1e3:.1f} kB/round")


TABLE_HEAD = (f"{'clients':>7} {'rnd/ep':>6} {'central':>8} {'protocol':>8} {'flower':>8} "
              f"{'ratio':>7} {'ms/rnd':>7} {'startup':>7} {'shutdn':>7} {'peakGB':>7} "
              f"{'kB/rnd':>9}")


def table_line(row: Row) -> str:
    """One line of the scaling table (the test parses these)."""
    return (f"{row.k:>7d} {row.rounds_per_epoch:>6d} {row.central_s:>8.3f} {row.local_s:>8.3f} "
            f"{row.fed_s:>8.3f} {row.ratio:>6.2f}x {row.transport_ms_per_round:>7.0f} "
            f"{row.startup_s:>7.1f} {row.teardown_s:>7.1f} {row.peak_bytes / 1e9:>7.2f} "
            f"{row.bytes_per_round / 1e3:>9.1f}")


def print_summary(rows: list[Row]) -> None:
    print("\nScaling (s/epoch: centralized, protocol-only, Flower/Ray; ratio = flower/central;"
          " ms/rnd = Flower transport per round; startup, shutdown (teardown) in s)")
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD))
    for row in rows:
        print(table_line(row))
    base = rows[0]
    for row in rows[1:]:
        print(f"  {base.k} -> {row.k} clients: Flower s/epoch x{row.fed_s / base.fed_s:.1f}, "
              f"centralized x{row.central_s / base.central_s:.1f}, peak memory "
              f"x{row.peak_bytes / base.peak_bytes:.2f}, bytes/round "
              f"x{row.bytes_per_round / base.bytes_per_round:.1f}, start-up "
              f"x{row.startup_s / base.startup_s:.2f}")
    print()
    for row in rows:
        target = RATIO_TARGETS.get(row.k)
        if target is not None:
            print(f"Target s/epoch Flower / centralized <= {target:g}x at {row.k} clients: "
                  f"{row.ratio:.2f}x  {'PASS' if row.ratio <= target else 'MISS'}")
        print(f"Target peak memory <= {MEMORY_TARGET / 2**30:g} GiB at {row.k} clients: "
              f"{row.peak_bytes / 2**30:.2f} GiB  "
              f"{'PASS' if row.peak_bytes <= MEMORY_TARGET else 'MISS'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 and 8 clients, 1 epoch, no repeats")
    parser.add_argument("--clients", default=None,
                        help="client counts (default 4,16,64,256)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the long run (default: max(2, min(10, 48 // K)))")
    parser.add_argument("--repeats", type=int, default=3,
                        help="in-process repeats (median; fewer when slow)")
    parser.add_argument("--fed-repeats", type=int, default=1,
                        help="Flower run pairs per client count (median)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. "
                             "simulation.num_cpus_per_client=0.5")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args(argv)
    if args.quick:
        clients, repeats = [4, 8], 1
    else:
        clients, repeats = [4, 16, 64, 256], args.repeats
    if args.clients:
        clients = [int(c) for c in args.clients.split(",")]

    def epochs_for(k: int) -> int:
        if args.epochs is not None:
            return args.epochs
        return 1 if args.quick else auto_epochs(k)

    import torch

    torch.set_num_threads(1)  # like each client (simulation.threads_per_client = 1)
    from liquid_fed.config import load_config

    cfg = load_config(str(CONFIG), args.set)
    cores = os.cpu_count() or 1
    per = cfg.simulation.num_cpus_per_client
    actors = (f"num_cpus_per_client={per:g} -> {int(cores // per)} Ray actors on {cores} "
              "cores")
    print("Federated Liquid Ensemble on Flower/Ray vs centralized (quickstart task)")
    print(f"torch {torch.__version__}, flwr {_version('flwr')}, ray {_version('ray')}, "
          f"python {sys.version.split()[0]}; {cores} cores; torch threads 1 here and in each "
          f"client (server.threads={cfg.server.threads}); {actors}; "
          f"pull_interval {cfg.simulation.pull_interval:g} s")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.set:
        print(f"extra overrides: {' '.join(args.set)}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    t0 = time.perf_counter()
    rows = []
    try:
        for k in clients:
            row = bench_clients(k, epochs_for(k), repeats, args.fed_repeats, list(args.set),
                                workdir, log)
            print_block(row, actors)
            sys.stdout.flush()
            rows.append(row)
    finally:
        if args.keep:
            print(f"run folders kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_summary(rows)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"benchmark took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
