"""Smoke test of the federation benchmark: it runs and prints finite numbers (no timings)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_federation_quick_prints_a_finite_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_federation", "--quick",
                           "--clients", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "clients rnd/ep" in out, out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\d+)\s+(\d+)\s+(.*)$", line)
        if m and line.rstrip().endswith(tuple("0123456789")) and "x" in m.group(3):
            rows[int(m.group(1))] = [float(v.rstrip("x")) for v in m.group(3).split()]
    assert sorted(rows) == [4], out
    for k, values in rows.items():
        # central, protocol, flower, ratio, ms/round, startup, shutdown, peak GB, kB/round
        assert len(values) == 9, (k, values)
        assert all(math.isfinite(v) for v in values), (k, values)
        assert all(v > 0 for v in values[:4] + values[5:]), (k, values)
    assert re.search(r"Target s/epoch .*(PASS|MISS)", out), out
    assert re.search(r"Target peak memory .*(PASS|MISS)", out), out
    # The centralized twin is timed before the Flower run and again after it; the table's
    # figure is the median of those runs, so it lies within their printed range.
    m = re.search(r"centralized s/epoch = median of (\d+) runs, before and between the Flower "
                  r"runs \(([\d.]+)-([\d.]+)\)", out)
    assert m, out
    assert int(m.group(1)) == 2
    lo, hi = float(m.group(2)), float(m.group(3))
    assert lo <= rows[4][0] <= hi, (lo, rows[4][0], hi)
