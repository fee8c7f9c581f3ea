"""The process-tree memory sampler (:class:`liquid_fed.procs.PeakMemory`) against a child that
reports its own PSS at its peak; stopping a run's process tree when one of its processes
ignores SIGINT and SIGTERM and no longer shows the run's tag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from liquid_fed import procs
from simulations.simulate import RUN_TAG_ENV

#: A child that holds 160 MB for 0.7 s (well under the sampler's 2 s refresh), writes its own
#: PSS at that moment, frees it and idles.
CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np

    def pss():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024

    time.sleep(1.0)
    block = np.ones(160 * 2**20 // 8)
    print(pss(), flush=True)
    time.sleep(0.7)
    del block
    time.sleep(2.5)
""")


def test_peak_memory_catches_a_short_peak_with_few_pss_reads():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    sampler = procs.PeakMemory(child.pid)
    sampler.start()
    try:
        at_peak = int(child.stdout.readline())
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        peak = sampler.stop()
    assert at_peak > 160 * 2**20
    # The sampler saw the peak (it may read a few pages more or less than the child did).
    assert 0.97 * at_peak <= peak <= at_peak + 16 * 2**20, (peak, at_peak)
    # ... without reading PSS at every tick: once at the start, on the growth, every 2 s.
    assert sampler.ticks >= 14
    assert sampler.pss_reads <= sampler.ticks // 2, (sampler.pss_reads, sampler.ticks)


def test_rss_bounds_pss_of_the_same_processes():
    pids = {procs.os.getpid()}
    rss, pss = procs.rss_bytes(pids), procs.pss_bytes(pids)
    assert 0 < pss <= rss


#: A session leader's stubborn child: same session, no run tag in its environment (as Ray's
#: agents showed after rewriting their process titles), deaf to SIGINT and SIGTERM.
STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    code = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(120)")
    env = {k: v for k, v in os.environ.items() if k != "LIQUID_FED_RUN_TAG"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                             text=True)
    child.stdout.readline()
    print(child.pid, flush=True)
    if sys.argv[1] == "cleanup":  # what the simulation child does when it is stopped
        from simulations.simulate import _cleanup_and_exit
        _cleanup_and_exit(signal.SIGINT)
    time.sleep(120)  # SIGINT: KeyboardInterrupt ends this process, not its child
""")


def _start_stubborn(mode: str, tag: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, RUN_TAG_ENV: tag, "PYTHONPATH": str(procs.APP_DIR)}
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, mode], env=env, text=True,
                            stdout=subprocess.PIPE, start_new_session=True, cwd=procs.APP_DIR)
    return proc, int(proc.stdout.readline())


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or not procs._alive(pid)


def test_the_stopped_child_s_cleanup_kills_its_whole_session_tag_or_not():
    assert RUN_TAG_ENV == "LIQUID_FED_RUN_TAG"  # the name STUBBORN leaves out
    proc, stubborn = _start_stubborn("cleanup", "lf-run-test-cleanup")
    try:
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
        assert _gone(stubborn), "the untagged process of the child's session outlived it"
    finally:
        procs._signal({stubborn}, signal.SIGKILL)


def test_terminate_gives_stragglers_no_grace_once_the_child_has_exited():
    proc, stubborn = _start_stubborn("wait", "lf-run-test-terminate")
    try:
        assert procs.tree(proc.pid) == {proc.pid, stubborn}
        started = time.monotonic()
        remained = procs.terminate(proc, grace=60.0)
        took = time.monotonic() - started
        assert remained == 1 and proc.returncode is not None and _gone(stubborn)
        # Before: the whole 60 s grace (and SIGTERM's 5 s) went by for the deaf child.
        assert took < 30, f"terminate took {took:.1f} s"
    finally:
        procs._signal({stubborn}, signal.SIGKILL)
