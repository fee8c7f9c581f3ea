"""Benchmark: batched (``torch.func.vmap``) vs looped evaluation of a Liquid Ensemble.

For K MLP experts of one architecture and batch sizes B, times forward + backward of
``LiquidEnsemble(..., batched=True)`` against ``batched=False`` (one call per expert) and prints
the speed ratio side by side. Both share the same experts, so they compute the same thing.

Run: ``python -m benchmarks.bench_ensemble [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.timing import bench_arguments, median_ms
from liquid_fed import LiquidEnsemble, MLPExpert


def _step(ens: LiquidEnsemble, xs: list[torch.Tensor], y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        ens.zero_grad(set_to_none=True)
        ens.loss(ens(xs), y).backward()

    return step


def run(device: torch.device, ks: list[int], batches: list[int], in_features: int,
        hidden: int, classes: int, budget_s: float, max_reps: int) -> None:
    print(f"\nLiquidEnsemble forward+backward, {device.type} float32, MLP experts "
          f"{in_features}->{hidden}->{classes} (median ms)")
    head = f"{'K':>4} {'B':>6} {'loop':>9} {'vmap':>9} {'loop/vmap':>10}  max |Δ output|"
    print(head)
    print("-" * len(head))
    for k in ks:
        torch.manual_seed(k)
        experts = [MLPExpert((in_features,), classes, k, i, hidden=(hidden,)) for i in range(k)]
        loop = LiquidEnsemble(experts, batched=False).to(device)
        vmap = LiquidEnsemble(loop.experts, batched=True).to(device)  # the same experts
        for b in batches:
            xs = [torch.randn(b, in_features, device=device) for _ in range(k)]
            y = torch.randint(0, classes, (b,), device=device)
            with torch.no_grad():
                diff = float((loop(xs).output - vmap(xs).output).abs().max())
            t_loop = median_ms(_step(loop, xs, y), device, budget_s, max_reps)
            t_vmap = median_ms(_step(vmap, xs, y), device, budget_s, max_reps)
            print(f"{k:>4} {b:>6} {t_loop:>9.3f} {t_vmap:>9.3f} {t_loop / t_vmap:>9.2f}x  "
                  f"{diff:.1e}")


def main(argv: list[str] | None = None) -> None:
    args, devices = bench_arguments(__doc__, argv)
    for device in devices:
        if args.quick:
            run(device, [2, 4], [8], 6, 8, 3, 0.01, 3)
        else:
            run(device, [4, 16, 64], [64, 1024], 32, 64, 10, 0.5, 30)


if __name__ == "__main__":
    main()
