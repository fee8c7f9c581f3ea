"""The process-tree memory sampler (:class:`liquid_fed.procs.PeakMemory`) against a child that
reports its own PSS at its peak."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from liquid_fed import procs

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
