"""One-interval ODE steps for liquid time-constant cells, with the input held constant.

Every system here has the conductance form

    dx/dt = -a(x) ⊙ x + b(x),    a > 0,

given as a function ``rates(x) -> (a, b)``; explicit solvers use ``dx/dt = b - a x`` and the
model-specific steps use ``a`` and ``b`` themselves. :func:`integrate` advances the state over
one interval ``dt`` (the time between two inputs) by ``substeps`` equal steps of a method in
:data:`STEPS`, or adaptively with :func:`dopri5`.

Orders of the fixed steps: ``euler`` 1, ``midpoint`` 2, ``rk4`` 4, ``fused`` 1 and
``exponential`` 1. ``fused`` is the semi-implicit Euler step of Hasani et al. (2021),
``x ← (x + h b) / (1 + h a)`` with ``a`` and ``b`` taken at the old state: implicit in the
linear decay, explicit in the gate; it is unconditionally stable and keeps ``x`` within the
range of ``b/a``. ``exponential`` solves the frozen-gate linear ODE exactly,
``x ← b/a + (x - b/a) e^{-h a}`` (exponential Euler): exact when ``a`` and ``b`` do not depend
on ``x``, first order otherwise. No step is exact for the full nonlinear system.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Rates = Callable[[Tensor], tuple[Tensor, Tensor]]
Step = Callable[[Rates, Tensor, float], Tensor]


def _derivative(rates: Rates, x: Tensor) -> Tensor:
    a, b = rates(x)
    return b - a * x


def euler_step(rates: Rates, x: Tensor, h: float) -> Tensor:
    """Explicit Euler, order 1."""
    return x + h * _derivative(rates, x)


def midpoint_step(rates: Rates, x: Tensor, h: float) -> Tensor:
    """Explicit midpoint, order 2."""
    k1 = _derivative(rates, x)
    return x + h * _derivative(rates, x + 0.5 * h * k1)


def rk4_step(rates: Rates, x: Tensor, h: float) -> Tensor:
    """Classical Runge–Kutta, order 4."""
    k1 = _derivative(rates, x)
    k2 = _derivative(rates, x + 0.5 * h * k1)
    k3 = _derivative(rates, x + 0.5 * h * k2)
    k4 = _derivative(rates, x + h * k3)
    return x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def fused_step(rates: Rates, x: Tensor, h: float) -> Tensor:
    """Semi-implicit (fused) Euler of Hasani et al. (2021), order 1, unconditionally stable."""
    a, b = rates(x)
    return (x + h * b) / (1 + h * a)


def exponential_step(rates: Rates, x: Tensor, h: float) -> Tensor:
    """Exponential Euler: the exact solution with ``a`` and ``b`` frozen at ``x``; order 1."""
    a, b = rates(x)
    steady = b / a
    return steady + (x - steady) * torch.exp(-h * a)


#: Fixed-step methods by name; ``dopri5`` (adaptive) is handled by :func:`integrate`.
STEPS: dict[str, Step] = {
    "euler": euler_step,
    "midpoint": midpoint_step,
    "rk4": rk4_step,
    "fused": fused_step,
    "exponential": exponential_step,
}

#: Every method :func:`integrate` accepts.
METHODS: tuple[str, ...] = (*STEPS, "dopri5")

# Dormand–Prince 5(4) tableau (autonomous: the input is constant within an interval).
_DOPRI_A: tuple[tuple[float, ...], ...] = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DOPRI_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _combo(weights: tuple[float, ...], ks: list[Tensor]) -> Tensor:
    """``Σ_i w_i k_i`` over the non-zero weights."""
    return sum(w * k for w, k in zip(weights, ks, strict=True) if w)  # type: ignore[return-value]


def dopri5(rates: Rates, x: Tensor, dt: float, rtol: float = 1e-3, atol: float = 1e-6,
           max_steps: int = 1000) -> Tensor:
    """Integrate ``dx/dt = b - a x`` over ``[0, dt]`` with adaptive Dormand–Prince 5(4).

    Every sample (row of ``x``, shape (B, H)) keeps its own step size and clock, so a result
    never depends on the other samples of the batch. Finished samples take steps of length 0.
    Gradients flow through the accepted steps; the step sizes are treated as constants
    (discretise-then-optimise). Each attempt costs 7 evaluations (no FSAL reuse).

    Args:
        rates: ``x -> (a, b)``.
        x: (B, H) state at the start of the interval.
        dt: interval length, > 0.
        rtol, atol: tolerances of the per-sample RMS error norm.
        max_steps: attempts allowed before giving up.

    Returns:
        (B, H) state at ``dt``.

    Raises:
        RuntimeError: if some sample has not reached ``dt`` after ``max_steps`` attempts.
    """
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1): one clock per sample
    t = x.new_zeros(shape)
    h = x.new_full(shape, dt)
    for _ in range(max_steps):
        remaining = dt - t
        try:
            finished = not bool((remaining > 1e-12 * dt).any())
        except RuntimeError as err:  # vmap cannot branch on data; say what to do instead
            raise RuntimeError(
                "dopri5 decides its steps from the data and cannot run under torch.func.vmap; "
                "evaluate the experts in a loop instead, e.g. LiquidEnsemble(..., batched=False)"
            ) from err
        if finished:
            return x
        step = torch.minimum(h, remaining).clamp_min(0)  # (B, 1), constant for autograd
        ks = [_derivative(rates, x)]
        for row in _DOPRI_A:
            ks.append(_derivative(rates, x + step * _combo(row, ks)))
        y5 = x + step * _combo(_DOPRI_B5, ks)
        y4 = x + step * _combo(_DOPRI_B4, ks)
        with torch.no_grad():
            scale = atol + rtol * torch.maximum(x.abs(), y5.abs())
            err = ((y5 - y4) / scale).pow(2).flatten(1).mean(1).sqrt().reshape(shape)
            accept = err <= 1
            factor = (0.9 * err.clamp_min(1e-10).pow(-0.2)).clamp(0.2, 10.0)
            t = torch.where(accept, t + step, t)
            # finished samples (step 0) keep their step size
            h = torch.where(step > 0, step * factor, h)
        x = torch.where(accept, y5, x)
    raise RuntimeError(
        f"dopri5 did not reach dt={dt} within max_steps={max_steps} attempts "
        f"(rtol={rtol}, atol={atol}); raise max_steps or loosen the tolerances"
    )


def integrate(rates: Rates, x: Tensor, dt: float, method: str = "fused", substeps: int = 1,
              rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 1000) -> Tensor:
    """Advance ``x`` (B, H) over one interval ``dt`` with the input held constant.

    Args:
        rates: ``x -> (a, b)`` with ``dx/dt = b - a x``.
        x: (B, H) state.
        dt: interval length.
        method: a key of :data:`STEPS` or ``"dopri5"``.
        substeps: equal fixed steps per interval (ignored by ``dopri5``).
        rtol, atol, max_steps: ``dopri5`` settings.

    Returns:
        (B, H) state after ``dt``.

    Raises:
        ValueError: for an unknown method or ``substeps < 1``.
    """
    if method == "dopri5":
        return dopri5(rates, x, dt, rtol, atol, max_steps)
    if method not in STEPS:
        raise ValueError(f'method must be one of {list(METHODS)}, got "{method}"')
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    step, h = STEPS[method], dt / substeps
    for _ in range(substeps):
        x = step(rates, x, h)
    return x
