"""Benchmark: a real Flower deployment on loopback, per way of running the ClientApp.

For each mode of :mod:`server.deploy_local` (``stock``: Flower's process per message;
``warm``: one long-lived ClientApp worker per SuperNode; ``fast``: the worker plus shorter
SuperNode waits) it deploys the quickstart config with 4 parties (a SuperLink and 4 SuperNodes
on 127.0.0.1), runs a few training epochs, and prints ONE table, all measured in this run:

* *round*: one protocol exchange (the server sends a message to every node and has all
  replies), timed from the SuperNodes' logs as the time between the ends of successive
  exchanges (the last node's ``[RUN r, ROUND g]`` reply line), training rounds only (the
  ``hello`` and ``setup`` exchanges, which load the app and the data, are left out):
  median, inter-quartile range and min-max;
* *nodes up*: from starting the SuperLink until every SuperNode has connected;
* *run start-up*: from ``flwr run`` until the ``setup`` exchange has ended (the ServerApp
  started, the app and data loaded on every node: what a run pays once);
* *idle CPU*: once the run has finished the deployment stays up and waits for the next run;
  after ``--settle`` seconds (longer than the 10 s in which nodes keep polling fast after a
  message) the CPU time (user + system, from ``/proc/PID/stat``) of every process of the
  deployment (SuperLink, SuperNodes, their workers or SuperExecs) is summed over ``--idle``
  seconds, as a percentage of one core; *idle PSS* is their memory at that point;
* *CPU/round*: CPU seconds (user + system) that all processes of the deployment together
  spend per training round, from the end of the ``setup`` exchange to the end of the last
  exchange, divided by the exchanges in between. It barely depends on the machine's load,
  unlike wall times. Sampled every 0.25 s as ``utime + stime + cutime + cstime`` summed over
  the deployment's live processes (found by their working folder, then their tag), so the
  time of a process that has exited counts in its parent's ``cutime`` (e.g. Flower's
  ``flwr-clientapp`` per message in its SuperExec, the ServerApp in the SuperLink's);
* *test acc*: the run's test accuracy (every mode must give the same).

Run: ``python -m benchmarks.bench_deployment [--epochs 2] [--modes stock,warm,fast]
[--hundred]``; ``--hundred`` also times a 100-round quickstart deployment (20 epochs) in the
fast mode, from ``flwr run`` to the run's end. Timings depend on the machine's load: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from clients.host import MODES
from liquid_fed import procs
from liquid_fed.errors import DeploymentError
from liquid_fed.procs import APP_DIR, TAG_ENV
from server.deploy_local import ROUND, LocalDeployment, deploy

QUICKSTART = APP_DIR / "configs" / "quickstart.yaml"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: set[int], children: bool = False) -> dict[int, float]:
    """User + system CPU seconds of each process (those that still exist); with
    ``children``, plus that of its exited and reaped descendants."""
    out = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])
        if children:
            ticks += int(fields[13]) + int(fields[14])
        out[pid] = ticks / CLOCK_TICKS
    return out


class CpuSampler(threading.Thread):
    """Every ``interval`` s: (time, total CPU seconds) of the deployment working in ``cwd``."""

    def __init__(self, cwd: Path, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.cwd, self.interval = str(cwd.resolve()), interval
        self.samples: list[tuple[float, float]] = []
        self.tag: str | None = None
        self._stop_event = threading.Event()

    def _find_tag(self) -> str | None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{pid}/cwd") != self.cwd:
                    continue
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            prefix = f"{TAG_ENV}=".encode()
            for item in env:
                if item.startswith(prefix):
                    return item[len(prefix):].decode()
        return None

    def run(self) -> None:
        total = 0.0
        while not self._stop_event.is_set():
            if self.tag is None:
                self.tag = self._find_tag()
            if self.tag is not None:
                # An exited process's time leaves the sum until its parent reaps it (then it
                # is in the parent's cutime): keep the running maximum over those gaps.
                now = cpu_seconds(procs.tagged(TAG_ENV, self.tag), children=True)
                total = max(total, sum(now.values()))
                self.samples.append((time.time(), total))
            self._stop_event.wait(self.interval)

    def at(self, t: float) -> float:
        """Total CPU seconds at the last sample before ``t``."""
        before = [c for s, c in self.samples if s <= t]
        return before[-1] if before else float("nan")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@dataclass
class Row:
    mode: str
    rounds: list[float] = field(default_factory=list)
    nodes_up: float = float("nan")
    run_startup: float = float("nan")
    run_seconds: float = float("nan")
    idle_cpu: float = float("nan")
    idle_pss: int = 0
    cpu_per_round: float = float("nan")
    accuracy: float = float("nan")
    error: str = ""


def measure(mode: str, epochs: int, settle: float, idle: float, work: Path,
            extra: list[str] = ()) -> Row:
    row = Row(mode)
    out = work / mode
    (out / "deploy").mkdir(parents=True, exist_ok=True)
    sampler = CpuSampler(out / "deploy")
    sampler.start()

    def after_run(dep: LocalDeployment) -> None:
        ends: dict[int, float] = {}
        for node in dep.nodes:
            for t, m in node.find(ROUND):
                ends[int(m.group(1))] = max(ends.get(int(m.group(1)), 0.0), t)
        times = [ends[g] for g in sorted(ends)]
        submit = next(c.started for c in dep.children if c.name == "flwr-run")
        row.run_startup = times[1] - submit if len(times) > 1 else float("nan")
        # exchanges: 1 hello, 2 setup, then training rounds (and evaluations, checkpoints)
        row.rounds = [b - a for a, b in zip(times[2:-1], times[3:], strict=True)]
        if len(times) > 2:
            used = sampler.at(times[-1] + 0.3) - sampler.at(times[1])
            row.cpu_per_round = used / (len(times) - 2)
        sampler.stop()
        time.sleep(settle)
        pids = procs.tagged(TAG_ENV, dep.tag)
        before, t0 = cpu_seconds(pids), time.monotonic()
        time.sleep(idle)
        after, t1 = cpu_seconds(pids), time.monotonic()
        used = sum(after[p] - before[p] for p in after if p in before)
        row.idle_cpu = 100.0 * used / (t1 - t0)
        row.idle_pss = procs.pss_bytes(set(after))

    try:
        result = deploy(QUICKSTART, [f"train.epochs={epochs}", *extra], out=out / "runs",
                        timeout=3600, work_dir=out / "deploy", mode=mode, after_run=after_run)
    except DeploymentError as exc:
        row.error = str(exc).splitlines()[0]
        return row
    finally:
        sampler.stop()
    if result.mode != mode:  # the installed Flower did not fit: the nodes fell back
        row.mode = f"{mode}>{result.mode}"
    row.nodes_up = result.superlink_ready_seconds + max(result.node_connect_seconds)
    row.run_seconds = result.run_seconds
    row.accuracy = float(result.summary.get("test", {}).get("accuracy", float("nan")))
    return row


HEAD = (f"{'mode':<6} {'rounds':>6} {'round median':>12} {'IQR':>13} {'min-max':>13} "
        f"{'CPU/round':>9} {'nodes up':>8} {'run start-up':>12} {'idle CPU':>8} "
        f"{'idle PSS':>8} {'test acc':>8}")


def line(row: Row) -> str:
    if row.error:
        return f"{row.mode:<6} failed: {row.error}"
    r = sorted(row.rounds)
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [float("nan")] * 3
    return (f"{row.mode:<6} {len(r):>6} {statistics.median(r):>10.2f} s "
            f"{q[0]:>5.2f}-{q[2]:<5.2f} s {r[0]:>5.2f}-{r[-1]:<5.2f} s "
            f"{row.cpu_per_round:>7.2f} s {row.nodes_up:>6.1f} s {row.run_startup:>10.1f} s "
            f"{row.idle_cpu:>7.1f}% "
            f"{row.idle_pss / 2**30:>5.2f} GiB {row.accuracy:>8.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="training epochs per run (5 rounds each; default 2)")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds after the run before idle CPU is measured (default 12)")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds over which idle CPU is measured (default 10)")
    parser.add_argument("--hundred", action="store_true",
                        help="also time a 100-round (20-epoch) deployment in the fast mode")
    parser.add_argument("--work", help="keep logs and run folders here (default: a temp dir)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: got {unknown}; accepted: {', '.join(MODES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs; logs in {work}",
          flush=True)
    rows = []
    for mode in modes:
        print(f"... {mode}", file=sys.stderr, flush=True)
        rows.append(measure(mode, args.epochs, args.settle, args.idle, work))
    print(f"\n4 parties on 127.0.0.1, quickstart config, {args.epochs} epochs "
          f"({5 * args.epochs} training rounds + evaluations/checkpoint), one run per mode")
    print(HEAD)
    print("-" * len(HEAD))
    for row in rows:
        print(line(row))
    if args.hundred:
        print("... fast, 100 rounds", file=sys.stderr, flush=True)
        row = measure("fast", 20, 0.0, 1.0, work / "hundred")
        if row.error:
            print(f"\n100-round fast deployment failed: {row.error}")
        else:
            print(f"\n100-round quickstart deployment (20 epochs, fast): flwr run until "
                  f"finished {row.run_seconds:.0f} s ({row.run_seconds / 60:.1f} min; target "
                  f"< 5 min), round median {statistics.median(row.rounds):.2f} s, "
                  f"test acc {row.accuracy:.4f}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
