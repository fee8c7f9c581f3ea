"""Benchmark of the delegation solvers (forward + backward), printed as tables.

Measured side by side in one run, for ``sink_one`` on (B, K, K) delegations:

- ``solve_power`` with ``backend="auto"``, ``"elimination"`` and ``"lapack"``;
- the pseudo-inverse formulation of the original research code (written here as the
  baseline): a batched ``torch.linalg.pinv`` of the (K+1)×(K+1) extended system whose last
  unknown is the sink's mass; checked numerically against ``solve_power`` before timing;
- the floor set by reading the data: one ``torch.bmm`` (B, K, K) @ (B, K, K), and for honesty
  one matrix-vector ``bmm`` (B, K, K) @ (B, K, 1).

Targets (from the issue): ≥ 20× faster than the pinverse baseline at K = 8, and within 5× of
one (B, K, K) bmm for K ≤ 16. A second table gives the elimination/LAPACK crossover that
``liquid_fed.solvers.ELIMINATION_MAX_K`` is set from.

Run: ``python -m benchmarks.bench_solvers [--quick] [--device cpu|cuda]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks.timing import bench_arguments, median_ms
from liquid_fed.solvers import ELIMINATION_MAX_K, solve_power

EPSILON = 0.01


def pinverse_sink_one(delegation: Tensor, epsilon: float = EPSILON) -> Tensor:
    """Baseline: sink_one powers through an explicit pseudo-inverse of the extended system.

    Unknowns ``x = (f_1 … f_K, g)``, ``g`` the mass the sink absorbs:
    ``(I - (1-ε) Oᵀ) f = 1`` and ``g - ε Σ f = 0``; then ``p = (1-ε) s f + g / K``.
    """
    b, k, _ = delegation.shape
    eye = torch.eye(k, dtype=delegation.dtype, device=delegation.device)
    keep = delegation.diagonal(dim1=-2, dim2=-1)  # (B, K)
    off = delegation * (1 - eye)
    m = delegation.new_zeros(b, k + 1, k + 1)
    m[:, :k, :k] = eye - (1 - epsilon) * off.transpose(-1, -2)
    m[:, k, :k] = -epsilon
    m[:, k, k] = 1.0
    rhs = delegation.new_zeros(b, k + 1, 1)
    rhs[:, :k] = 1.0
    x = (torch.linalg.pinv(m) @ rhs).squeeze(-1)  # (B, K+1)
    f, g = x[:, :k], x[:, k:]
    return (1 - epsilon) * keep * f + g / k


def _delegation(b: int, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(k)
    logits = 2.0 * torch.randn(b, k, k, generator=g, dtype=torch.float64)
    return torch.softmax(logits, -1).to(device=device, dtype=dtype)


def _fwd_bwd(power_fn: Callable[[Tensor], Tensor], d: Tensor, w: Tensor) -> Callable[[], None]:
    def step() -> None:
        x = d.detach().requires_grad_(True)
        (power_fn(x) * w).sum().backward()

    return step


def _bmm_step(a: Tensor, b: Tensor) -> Callable[[], None]:
    def step() -> None:
        x = a.detach().requires_grad_(True)
        y = b.detach().requires_grad_(True)
        torch.bmm(x, y).sum().backward()

    return step


def _solver(backend: str) -> Callable[[Tensor], Tensor]:
    return lambda x: solve_power(x, "sink_one", EPSILON, backend=backend, validate=False)


def main_table(device: torch.device, batch: int, ks: list[int], budget_s: float,
               max_reps: int) -> list[tuple[int, dict[str, float]]]:
    """Time every method at every K; returns the rows and prints the table."""
    dtype = torch.float32
    rows = []
    for k in ks:
        d = _delegation(batch, k, device, dtype)
        w = torch.randn(batch, k, dtype=dtype, device=device)
        # The baseline must compute the same thing before it is worth timing.
        d64 = d.double()
        d64 = d64 / d64.sum(-1, keepdim=True)  # float32 rows are off 1 by more than 1e-8
        ref = solve_power(d64, "sink_one", EPSILON)
        base = pinverse_sink_one(d64)
        err = float((ref - base).abs().max())
        assert err < 1e-8 * k, f"pinverse baseline disagrees with solve_power at K={k}: {err}"
        reps = max_reps if k <= 16 else max(3, max_reps // 4)
        pinv_reps = reps if k <= 16 else 3
        t = {
            "auto": median_ms(_fwd_bwd(_solver("auto"), d, w), device, budget_s, reps),
            "elim": median_ms(_fwd_bwd(_solver("elimination"), d, w), device, budget_s, reps),
            "lapack": median_ms(_fwd_bwd(_solver("lapack"), d, w), device, budget_s, reps),
            "pinv": median_ms(_fwd_bwd(pinverse_sink_one, d, w), device, budget_s, pinv_reps,
                              min_reps=min(3, pinv_reps), warmup=1),
            "bmm": median_ms(_bmm_step(d, d), device, budget_s, reps),
            "bmv": median_ms(_bmm_step(d, d[..., :1].contiguous()), device, budget_s, reps),
        }
        rows.append((k, t))
    print(f"\nsink_one forward+backward, {device.type} float32, B = {batch} (median ms)")
    head = (f"{'K':>4} {'auto':>8} {'elim':>8} {'lapack':>8} {'pinv':>9} {'bmm':>8} "
            f"{'bmv':>8} {'pinv/auto':>10} {'auto/bmm':>9} {'auto/bmv':>9}  targets")
    print(head)
    print("-" * len(head))
    for k, t in rows:
        speedup = t["pinv"] / t["auto"]
        vs_bmm = t["auto"] / t["bmm"]
        notes = []
        if k == 8:
            notes.append(f"pinv>=20x {'PASS' if speedup >= 20 else 'MISS'}")
        if k <= 16:
            notes.append(f"bmm<=5x {'PASS' if vs_bmm <= 5 else 'MISS'}")
        print(f"{k:>4} {t['auto']:>8.3f} {t['elim']:>8.3f} {t['lapack']:>8.3f} "
              f"{t['pinv']:>9.3f} {t['bmm']:>8.3f} {t['bmv']:>8.3f} {speedup:>9.1f}x "
              f"{vs_bmm:>8.2f}x {t['auto'] / t['bmv']:>8.2f}x  {'; '.join(notes)}")
    return rows


def crossover_table(device: torch.device, batch: int, ks: list[int], budget_s: float,
                    max_reps: int) -> None:
    """Elimination vs LAPACK, forward + backward, around ELIMINATION_MAX_K."""
    print(f"\nelimination vs lapack crossover, {device.type} float32, B = {batch} "
          f"(median ms; ELIMINATION_MAX_K = {ELIMINATION_MAX_K})")
    head = f"{'K':>4} {'elim':>9} {'lapack':>9} {'elim/lapack':>12}  faster"
    print(head)
    print("-" * len(head))
    for k in ks:
        d = _delegation(batch, k, device, torch.float32)
        w = torch.randn(batch, k, device=device)
        te = median_ms(_fwd_bwd(_solver("elimination"), d, w), device, budget_s, max_reps)
        tl = median_ms(_fwd_bwd(_solver("lapack"), d, w), device, budget_s, max_reps)
        print(f"{k:>4} {te:>9.3f} {tl:>9.3f} {te / tl:>11.2f}x  "
              f"{'elimination' if te < tl else 'lapack'}")


def main(argv: list[str] | None = None) -> None:
    args, devices = bench_arguments(__doc__, argv)
    if args.quick:
        batch, ks, cross, budget, reps = 64, [4, 8], [16, 24], 0.02, 3
    else:
        batch, ks, cross, budget, reps = 4096, [4, 8, 16, 64], [16, 24, 32, 48], 1.0, 30
    for device in devices:
        if device.type == "cuda":
            print(f"device: {torch.cuda.get_device_name(device)}")
        main_table(device, batch, ks, budget, reps)
        crossover_table(device, batch, cross, budget / 2, reps)


if __name__ == "__main__":
    main()
