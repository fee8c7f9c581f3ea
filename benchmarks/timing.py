"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], None], device: torch.device, budget_s: float, max_reps: int,
              min_reps: int = 3, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms after warm-up; repeats until budget or max_reps."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - start < budget_s
    ):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_arguments(doc: str | None, argv: list[str] | None
                    ) -> tuple[argparse.Namespace, list[torch.device]]:
    """``--quick`` and ``--device`` of a benchmark; prints the torch header line.

    Without ``--device`` the CPU is measured, and CUDA too when present.
    """
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda "
                        "too when present)")
    args = parser.parse_args(argv)
    if args.device is not None:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    return args, devices
