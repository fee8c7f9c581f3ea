"""Delegation solvers: from a per-sample delegation graph to voting powers.

Notation (one sample): K experts; expert ``i`` outputs a delegation vector ``d_i``, a
probability distribution over the K experts. ``W[i, j] = d_i[j]`` ("i delegates to j"), so
every row of ``W`` sums to 1. ``s = diag(W)`` is what each expert keeps and ``O = W - diag(s)``
what it passes on. Every expert starts with one vote; the vote mass that flows through each
expert is ``f``, the solution of

    (I - γ Oᵀ) f = 1.

Solvers (the registry :data:`SOLVERS`):

``sink_one`` (γ = 1 - ε)
    One absorbing sink takes ε of every expert's outgoing mass and hands it back uniformly:
    ``p_j = (1 - ε) s_j f_j + (ε / K) Σ_k f_k``. Summing the flow equations gives
    ``ε Σf + (1 - ε) Σ s f = K``, hence ``Σ_j p_j = K`` exactly.
``sink_many`` (γ = ``penalty``, the long-delegation penalty)
    Every expert has its own sink: ``k_j = (s_j + ε) f_j`` and ``p = K k / Σ k``.
``uniform``
    ``p = 1`` for everyone: majority vote / plain averaging, the baseline.

``A = I - γ Oᵀ`` has column sums ``1 - γ (1 - s_i) ≥ 1 - γ > 0`` off the diagonal mass, i.e. it
is strictly column diagonally dominant whenever γ < 1. Such a matrix is non-singular and
Gaussian elimination *without pivoting* is backward stable on it (growth factor ≤ 2), which is
what the ``elimination`` backend exploits: a batched, pivot-free LU written as K vectorised
steps over the whole batch, with the batch as the innermost (contiguous) axis. Its backward is
one more solve with the transposed factors. The ``lapack`` backend calls
``torch.linalg.solve_ex`` (LU with partial pivoting; cuSOLVER/cuBLAS on CUDA) and is preferred
for large K. Neither ever forms an inverse, and neither synchronises with the host on CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from liquid_fed.errors import ParameterError

log = logging.getLogger(__name__)

#: Largest K for which ``backend="auto"`` uses the vectorised elimination (measured crossover
#: on CPU and CUDA in ``benchmarks/bench_solvers.py``).
ELIMINATION_MAX_K = 24

BACKENDS = ("auto", "elimination", "lapack")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _row_tolerance(dtype: torch.dtype) -> float:
    """How far a delegation row may stray from summing to 1 in ``dtype``."""
    if dtype == torch.float64:
        return 1e-8
    if dtype == torch.float32:
        return 1e-4
    return 1e-2  # float16 / bfloat16


def validate_delegation(delegation: Tensor) -> None:
    """Check that ``delegation`` is a batch of row-stochastic K×K matrices.

    Args:
        delegation: tensor of shape (B, K, K); row ``i`` of sample ``b`` is expert ``i``'s
            delegation vector.

    Raises:
        TypeError: when it is not a floating-point tensor.
        ValueError: naming the first offending sample and row when the shape is wrong, a value
            is not finite or negative, or a row does not sum to 1.

    On CUDA the value checks are queued with ``torch._assert_async`` (no host
    synchronisation); the message then cannot name the row: call this function on a CPU copy
    to find it.
    """
    if not isinstance(delegation, Tensor):
        raise TypeError(f"delegation must be a torch.Tensor, got {type(delegation).__name__}")
    if not delegation.is_floating_point():
        raise TypeError(f"delegation must have a floating-point dtype, got {delegation.dtype}")
    shape = tuple(delegation.shape)
    if delegation.ndim != 3 or shape[1] != shape[2] or shape[1] < 1:
        raise ValueError(f"delegation must have shape (batch, K, K) with K >= 1, got {shape}")
    tol = _row_tolerance(delegation.dtype)
    row_sums = delegation.sum(-1)
    finite = torch.isfinite(delegation)
    nonneg = delegation >= 0
    sums_ok = (row_sums - 1).abs() <= tol
    if delegation.device.type != "cpu":
        ok = finite.all() & nonneg.all() & sums_ok.all()
        torch._assert_async(
            ok,
            "delegation must be finite, non-negative, with rows summing to 1 "
            "(call liquid_fed.solvers.validate_delegation on a CPU copy for details)",
        )
        return
    if not bool(finite.all()):
        b, i, j = (int(v) for v in (~finite).nonzero()[0])
        raise ValueError(
            f"delegation[{b}, {i}, {j}] is {delegation[b, i, j].item()}; "
            "delegation weights must be finite"
        )
    if not bool(nonneg.all()):
        b, i, j = (int(v) for v in (~nonneg).nonzero()[0])
        raise ValueError(
            f"delegation[{b}, {i}, {j}] is {delegation[b, i, j].item():.6g}; "
            "delegation weights must be >= 0"
        )
    if not bool(sums_ok.all()):
        b, i = (int(v) for v in (~sums_ok).nonzero()[0])
        raise ValueError(
            f"delegation row {i} of sample {b} sums to {row_sums[b, i].item():.10g} (off by "
            f"{(row_sums[b, i] - 1).item():.3g}); every row must sum to 1 (tolerance {tol:g} "
            f"for {delegation.dtype}; renormalise after casting from a lower precision)"
        )


def check_parameters(solver: str, epsilon: float, penalty: float, backend: str) -> None:
    """The one check of a solver's name and parameters (the layer's config uses it too).

    Raises:
        ParameterError: naming the parameter, the value and what is accepted.
    """
    if solver not in SOLVERS:
        raise ParameterError(f'solver must be one of {sorted(SOLVERS)}, got "{solver}"',
                             "solver", solver, choices=tuple(SOLVERS))
    if backend not in BACKENDS:
        raise ParameterError(f'backend must be one of {list(BACKENDS)}, got "{backend}"',
                             "backend", backend, choices=BACKENDS)
    if solver == "uniform":
        return
    if not 0.0 < float(epsilon) < 1.0:
        raise ParameterError(f"epsilon must lie in (0, 1) for solver {solver}, got {epsilon!r}",
                             "epsilon", epsilon, interval="(0, 1)")
    if solver == "sink_many" and not 0.0 <= float(penalty) < 1.0:
        raise ParameterError(
            f"penalty (long_delegation_penalty) must lie in [0, 1) for sink_many, got {penalty!r}",
            "penalty", penalty, interval="[0, 1)")


# --------------------------------------------------------------------------------------------
# The flow solve f = (I - γ Oᵀ)^{-1} 1
# --------------------------------------------------------------------------------------------


def _system_batch_last(delegation: Tensor, gamma: float) -> Tensor:
    """``A = I - γ Oᵀ`` laid out as (K, K, B) so that every elimination step is contiguous."""
    k = delegation.shape[-1]
    # A[j, i, b] = δ_ij - γ O[b, i, j]
    a = delegation.permute(2, 1, 0).mul(-gamma)
    a = a.contiguous()
    idx = torch.arange(k, device=delegation.device)
    a[idx, idx] = 1.0
    return a


def _lu_inplace(a: Tensor) -> Tensor:
    """Pivot-free LU of a (K, K, B) batch, in place: unit-lower multipliers below the diagonal."""
    k = a.shape[0]
    for c in range(k - 1):
        a[c + 1 :, c].div_(a[c, c])  # (K-c-1, B) multipliers
        a[c + 1 :, c + 1 :].sub_(a[c + 1 :, c, None] * a[c, None, c + 1 :])
    return a


def _lu_solve(lu: Tensor, b: Tensor) -> Tensor:
    """Solve ``L U x = b`` for a (K, B) right-hand side."""
    x = b.clone()
    k = lu.shape[0]
    for c in range(k - 1):  # L y = b (unit diagonal)
        x[c + 1 :].sub_(lu[c + 1 :, c] * x[c])
    for c in range(k - 1, -1, -1):  # U x = y
        x[c].div_(lu[c, c])
        if c:
            x[:c].sub_(lu[:c, c] * x[c])
    return x


def _lu_solve_transposed(lu: Tensor, g: Tensor) -> Tensor:
    """Solve ``(L U)ᵀ z = g`` for a (K, B) right-hand side, reusing the factors."""
    z = g.clone()
    k = lu.shape[0]
    for c in range(k):  # Uᵀ w = g (lower triangular)
        z[c].div_(lu[c, c])
        if c + 1 < k:
            z[c + 1 :].sub_(lu[c, c + 1 :] * z[c])
    for c in range(k - 1, 0, -1):  # Lᵀ z = w (unit upper triangular)
        z[:c].sub_(lu[c, :c] * z[c])
    return z


class _EliminationFlow(torch.autograd.Function):
    """f = (I - γ Oᵀ)^{-1} 1 by pivot-free batched elimination; backward is one more solve."""

    @staticmethod
    def forward(delegation: Tensor, gamma: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        lu = _lu_inplace(_system_batch_last(delegation, gamma))  # (K, K, B)
        ones = torch.ones(lu.shape[0], lu.shape[2], dtype=lu.dtype, device=lu.device)
        f = _lu_solve(lu, ones)  # (K, B)
        return f.t().contiguous(), lu

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        _, gamma = inputs
        f, lu = output
        ctx.gamma = gamma
        ctx.save_for_backward(f, lu)
        ctx.mark_non_differentiable(lu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_f: Tensor, _grad_lu: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        f, lu = ctx.saved_tensors
        z = _lu_solve_transposed(lu, grad_f.t()).t()  # (B, K) = A^{-T} g
        # A = I - γ Oᵀ, dL/dA = -z fᵀ  =>  dL/dO[i, j] = γ f_i z_j; the diagonal is not in O.
        grad = _gamma_outer(f, z, ctx.gamma)
        grad.diagonal(dim1=-2, dim2=-1).zero_()
        return grad, None


def _gamma_outer(f: Tensor, z: Tensor, gamma: float) -> Tensor:
    """``γ f zᵀ`` per sample: (B, K) × (B, K) -> (B, K, K)."""
    return (f * gamma).unsqueeze(-1) * z.unsqueeze(-2)


def _flow_lapack(delegation: Tensor, gamma: float) -> Tensor:
    k = delegation.shape[-1]
    eye = torch.eye(k, dtype=delegation.dtype, device=delegation.device)
    off = delegation * (1 - eye)
    a = eye - gamma * off.transpose(-1, -2)  # (B, K, K)
    ones = torch.ones(delegation.shape[:-1] + (1,), dtype=a.dtype, device=a.device)
    # solve_ex skips the error check (and the host synchronisation it costs); A is
    # non-singular by construction (column diagonally dominant for γ < 1).
    f, _ = torch.linalg.solve_ex(a, ones)
    return f.squeeze(-1)


def flow(delegation: Tensor, gamma: float, backend: str = "auto") -> Tensor:
    """Vote mass through each expert: solve ``(I - γ Oᵀ) f = 1`` per sample.

    Args:
        delegation: (B, K, K) row-stochastic delegation matrices.
        gamma: damping in [0, 1).
        backend: ``"elimination"``, ``"lapack"`` or ``"auto"`` (elimination for
            K <= ELIMINATION_MAX_K).

    Returns:
        f of shape (B, K).
    """
    k = delegation.shape[-1]
    if backend == "auto":
        backend = "elimination" if k <= ELIMINATION_MAX_K else "lapack"
    if backend == "elimination":
        f, _ = _EliminationFlow.apply(delegation, float(gamma))
        return f
    return _flow_lapack(delegation, float(gamma))


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------


def sink_one(delegation: Tensor, epsilon: float = 0.01, penalty: float = 0.9,
             backend: str = "auto") -> Tensor:
    """Single absorbing sink: ``p_j = (1-ε) s_j f_j + (ε/K) Σ_k f_k`` with γ = 1 - ε."""
    del penalty  # γ is tied to ε here
    k = delegation.shape[-1]
    f = flow(delegation, 1.0 - epsilon, backend)  # (B, K)
    keep = delegation.diagonal(dim1=-2, dim2=-1)  # (B, K)
    return (1.0 - epsilon) * keep * f + (epsilon / k) * f.sum(-1, keepdim=True)


def sink_many(delegation: Tensor, epsilon: float = 0.01, penalty: float = 0.9,
              backend: str = "auto") -> Tensor:
    """One sink per expert: ``k_j = (s_j + ε) f_j``, ``p = K k / Σ k`` with γ = penalty."""
    k = delegation.shape[-1]
    f = flow(delegation, penalty, backend)
    kept = (delegation.diagonal(dim1=-2, dim2=-1) + epsilon) * f
    return k * kept / kept.sum(-1, keepdim=True)


def uniform(delegation: Tensor, epsilon: float = 0.01, penalty: float = 0.9,
            backend: str = "auto") -> Tensor:
    """Everyone keeps one vote: majority vote / plain averaging."""
    del epsilon, penalty, backend
    return torch.ones(delegation.shape[:-1], dtype=delegation.dtype, device=delegation.device)


SolverFn = Callable[..., Tensor]
#: Delegation solvers by name, as written in configs.
SOLVERS: dict[str, SolverFn] = {"sink_one": sink_one, "sink_many": sink_many, "uniform": uniform}


def solve_power(
    delegation: Tensor,
    solver: str = "sink_one",
    epsilon: float = 0.01,
    penalty: float = 0.9,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """Resolve per-sample delegation graphs into voting powers.

    Args:
        delegation: (B, K, K); ``delegation[b, i, j]`` is how much of its vote expert ``i``
            gives to expert ``j`` on sample ``b``. Rows are probability distributions.
        solver: a key of :data:`SOLVERS` (``sink_one``, ``sink_many``, ``uniform``).
        epsilon: sink share ε in (0, 1) (default 0.01).
        penalty: long-delegation penalty γ in [0, 1) for ``sink_many`` (default 0.9).
        backend: ``auto`` | ``elimination`` | ``lapack``; see the module docstring.
        validate: check the input once (shape, finite, non-negative, rows summing to 1).

    Returns:
        Powers of shape (B, K), non-negative, summing to K per sample; same dtype and device
        as ``delegation``. Differentiable with respect to ``delegation``.

    Raises:
        ValueError: for an unknown solver or backend, parameters out of range, or malformed
            delegation input (naming the first offending sample and row).
    """
    check_parameters(solver, epsilon, penalty, backend)
    if validate:
        validate_delegation(delegation)
    dtype = delegation.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the solve runs in float32
        return SOLVERS[solver](delegation.float(), epsilon, penalty, backend).to(dtype)
    return SOLVERS[solver](delegation, epsilon, penalty, backend)
