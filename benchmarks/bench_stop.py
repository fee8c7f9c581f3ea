"""Benchmark: how long a stopped ``liquid-fed run`` takes to end, and what it leaves behind.

Each repeat launches the quickstart for many epochs (``liquid-fed run configs/quickstart.yaml
--set train.epochs=200 ... --quiet``) in its own session, waits for its first checkpoint and
``--delay`` seconds more, sends the launcher the signal (``--signal``, SIGTERM by default; a
terminal's Ctrl-C is SIGINT), and measures

* *stop*: from the signal until the launcher has exited (it returns once every process of the
  run is gone and its temporary folder removed);
* *left*: processes of the run still alive at that moment (tagged ``LIQUID_FED_BENCH_TAG``,
  which every process of the run inherits), which should be none.

A stopped run's launcher used to wait, now and then, the full 10 + 5 s it gives its child to
clean up, for Ray's dashboard agent, which ignores SIGINT and SIGTERM while it shuts down and
which the child's cleanup had not found by its tag (see :func:`liquid_fed.procs.terminate`).

Run: ``python -m benchmarks.bench_stop [--repeats 8] [--delay 10] [--signal SIGTERM]``.
Timings depend on the machine's load: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from liquid_fed import procs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
TAG_ENV = "LIQUID_FED_BENCH_TAG"
SETS = ["train.epochs=200", "train.checkpoint_every=5", "baselines.uniform=false",
        "baselines.independent=false"]


def stop_once(work: Path, delay: float, sig: signal.Signals, timeout: float = 180.0
              ) -> tuple[float, int]:
    """One launch stopped by ``sig``: (seconds from the signal to the launcher's exit, processes
    of the run alive then)."""
    tag = f"bench-stop-{uuid.uuid4().hex}"
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "liquid_fed.cli", "run", str(CONFIG),
           *[a for s in SETS for a in ("--set", s)], "--out", str(run), "--quiet"]
    env = {**os.environ, TAG_ENV: tag, "OMP_NUM_THREADS": "1"}
    log = work / "launcher.log"
    with log.open("w") as out:
        proc = procs.start_session(cmd, env, output=out)
    try:
        deadline = time.monotonic() + timeout
        while not any((run / "checkpoints").glob("*")):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"the run ended or stalled before its first checkpoint "
                                   f"(exit {proc.returncode}):\n{tail}")
            time.sleep(0.1)
        time.sleep(delay)
        started = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
        took = time.monotonic() - started
        return took, len(procs.tagged(TAG_ENV, tag))
    finally:
        procs.terminate(proc, grace=2.0)
        procs.kill_tagged(TAG_ENV, tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_stop",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="launches (default 8)")
    parser.add_argument("--delay", type=float, default=10.0,
                        help="seconds after the first checkpoint before the signal (default 10)")
    parser.add_argument("--signal", default="SIGTERM", choices=["SIGTERM", "SIGINT", "SIGHUP"])
    args = parser.parse_args(argv)
    sig = signal.Signals[args.signal]
    print(f"stopping `liquid-fed run` (quickstart) with {sig.name}, {args.delay:g} s after its "
          f"first checkpoint, {args.repeats} times")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    times, left = [], []
    with tempfile.TemporaryDirectory(prefix="lf-bench-stop-") as tmp:
        for i in range(args.repeats):
            took, alive = stop_once(Path(tmp), args.delay, sig)
            times.append(took)
            left.append(alive)
            print(f"  run {i + 1}: stopped in {took:.2f} s, {alive} process(es) of it left",
                  flush=True)
    print(f"stop: median {statistics.median(times):.2f} s, max {max(times):.2f} s; processes "
          f"left: {sum(left)}")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
