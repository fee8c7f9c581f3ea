"""Experts: each maps its own view of a sample to ``(prediction, delegation)``.

Every expert returns the prediction (B, C) — logits for classification — and a delegation
vector (B, K), a probability distribution over the K experts of the ensemble (softmax of a
delegation head). Build experts by name through :data:`EXPERTS` / :func:`build_expert`.

Kinds and the view each one takes (``B`` batch, ``T`` time steps, ``D`` channels of the view,
``H`` hidden width, ``C`` outputs, ``K`` experts):

- ``mlp``: anything, flattened.
- ``cnn``: image patches (B, h, w) or (B, c, h, w); conv stack and global pooling.
- ``esn``: sequences (B, T, D); a fixed random leaky reservoir, trainable linear readouts.
- ``ltc``: sequences (B, T, D); a liquid time-constant cell integrated by an ODE solver.

The two recurrent kinds also stream: ``expert.step(x_t, state)`` consumes one new time step
(B, D) in O(1) and returns ``(prediction, delegation, state)``; feeding a sequence step by step
gives what one full pass gives.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liquid_fed.odeint import METHODS, integrate

log = logging.getLogger(__name__)


class DelegationHead(nn.Module):
    """Linear map to K logits, softmax: how much of the vote goes to whom.

    ``self_bias`` adds a constant to the expert's own logit at initialisation (0 gives a
    uniform delegation at start; a large value starts from "everyone keeps their vote").
    """

    def __init__(self, in_features: int, n_experts: int, index: int = 0,
                 self_bias: float = 0.0) -> None:
        super().__init__()
        if not 0 <= index < n_experts:
            raise ValueError(f"index must lie in [0, {n_experts}), got {index}")
        self.linear = nn.Linear(in_features, n_experts)
        with torch.no_grad():
            self.linear.weight.mul_(0.1)
            self.linear.bias.zero_()
            self.linear.bias[index] = self_bias

    def forward(self, h: Tensor) -> Tensor:
        return torch.softmax(self.linear(h), dim=-1)


class Expert(nn.Module):
    """Base class: an input shape, an output width, K experts and this expert's index."""

    def __init__(self, in_shape: Sequence[int], out_dim: int, n_experts: int,
                 index: int = 0) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_dim = int(out_dim)
        self.n_experts = int(n_experts)
        self.index = int(index)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    #: Whether ``LiquidEnsemble`` may evaluate K copies with ``torch.func.vmap``; False where
    #: the forward has data-dependent control flow (e.g. the adaptive ``dopri5`` solver).
    supports_vmap: bool = True

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class MLPExpert(Expert):
    """Flattened input → MLP trunk → prediction head and softmax delegation head."""

    def __init__(self, in_shape: Sequence[int], out_dim: int, n_experts: int, index: int = 0,
                 hidden: Sequence[int] = (64,), dropout: float = 0.0,
                 self_bias: float = 0.0) -> None:
        super().__init__(in_shape, out_dim, n_experts, index)
        hidden = list(hidden) if isinstance(hidden, (list, tuple)) else hidden
        if not isinstance(hidden, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ValueError(f"mlp option hidden must be a list of positive integers, "
                             f"got {hidden!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"mlp option dropout must lie in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        width = math.prod(self.in_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.trunk = nn.Sequential(nn.Flatten(), *layers)
        self.head = nn.Linear(width, out_dim)
        self.delegate = DelegationHead(width, n_experts, index, self_bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)  # (B, H)
        return self.head(h), self.delegate(h)


class CNNExpert(Expert):
    """Image patch (B, h, w) or (B, c, h, w) → conv stack → global pooling → two heads.

    Each entry of ``channels`` adds ``Conv2d(kernel_size, same padding) + ReLU``; with
    ``downsample`` a 2×2 max-pool follows every block but the last while the patch is at
    least 2×2. No batch norm, so K experts can be evaluated with ``vmap``.
    """

    POOLS = ("avg", "max")

    def __init__(self, in_shape: Sequence[int], out_dim: int, n_experts: int, index: int = 0,
                 channels: Sequence[int] = (16, 32), kernel_size: int = 3, pool: str = "avg",
                 downsample: bool = True, dropout: float = 0.0,
                 self_bias: float = 0.0) -> None:
        super().__init__(in_shape, out_dim, n_experts, index)
        if len(self.in_shape) not in (2, 3):
            raise ValueError(
                f"cnn in_shape must be (h, w) or (c, h, w), got {self.in_shape}")
        if pool not in self.POOLS:
            raise ValueError(f'cnn pool must be one of {list(self.POOLS)}, got "{pool}"')
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"cnn channels must be a non-empty list of widths >= 1, "
                             f"got {list(channels)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"cnn kernel_size must be an odd integer >= 1, got {kernel_size}")
        self.pool = pool
        width = self.in_shape[0] if len(self.in_shape) == 3 else 1
        size = min(self.in_shape[-2:])
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(width, int(c), kernel_size, padding=kernel_size // 2),
                       nn.ReLU()]
            if downsample and i < len(channels) - 1 and size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            width = int(c)
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(width, out_dim)
        self.delegate = DelegationHead(width, n_experts, index, self_bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim == 3:
            x = x.unsqueeze(1)  # (B, 1, h, w)
        if x.ndim != 4:
            raise ValueError(f"cnn expects patches (batch, h, w) or (batch, c, h, w), "
                             f"got {tuple(x.shape)}")
        z = self.convs(x)  # (B, W, h', w')
        h = z.mean((-2, -1)) if self.pool == "avg" else z.amax((-2, -1))  # (B, W)
        h = self.dropout(h)
        return self.head(h), self.delegate(h)


class RecurrentState(NamedTuple):
    """What a recurrent expert carries from one time step to the next."""

    h: Tensor  # (B, H) hidden state after the last step
    total: Tensor  # (B, H) sum of all hidden states so far (for ``readout="mean"``)
    steps: int  # time steps consumed


class RecurrentExpert(Expert):
    """Shared frame of ``esn`` and ``ltc``: a cell over (B, T, D), readouts from the state.

    ``readout="last"`` reads the final hidden state, ``"mean"`` the mean of all hidden states.
    Subclasses implement :meth:`_cell`, one time step ``(h (B, H), u (B, D)) -> h``.
    """

    READOUTS = ("last", "mean")

    def __init__(self, in_shape: Sequence[int], out_dim: int, n_experts: int, index: int,
                 units: int, readout: str, self_bias: float) -> None:
        super().__init__(in_shape, out_dim, n_experts, index)
        kind = type(self).__name__
        if len(self.in_shape) not in (1, 2):
            raise ValueError(f"{kind} in_shape must be (T, channels) or (channels,), "
                             f"got {self.in_shape}")
        if units < 1:
            raise ValueError(f"{kind} units must be >= 1, got {units}")
        if readout not in self.READOUTS:
            raise ValueError(f'{kind} readout must be one of {list(self.READOUTS)}, '
                             f'got "{readout}"')
        self.channels = self.in_shape[-1]
        self.units = int(units)
        self.readout = readout
        self.head = nn.Linear(self.units, out_dim)
        self.delegate = DelegationHead(self.units, n_experts, index, self_bias)

    def _cell(self, h: Tensor, u: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def initial_state(self, x: Tensor) -> RecurrentState:
        """The zero state for a batch like ``x`` (B, ...)."""
        zeros = x.new_zeros(x.shape[0], self.units)  # (B, H)
        return RecurrentState(zeros, zeros, 0)

    def forward(self, x: Tensor, state: RecurrentState | None = None, return_state: bool = False
                ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, RecurrentState]:
        """Run the cell over a sequence and read out.

        Args:
            x: (B, T, D) sequence, T >= 1 (T need not match ``in_shape``).
            state: where a previous call stopped; ``None`` starts from zeros.
            return_state: also return the new :class:`RecurrentState`.

        Returns:
            ``(prediction (B, C), delegation (B, K))``, plus the state if asked.

        Raises:
            ValueError: if ``x`` is not (batch, T >= 1, channels of this view).
        """
        if x.ndim != 3 or x.shape[-1] != self.channels or x.shape[1] < 1:
            raise ValueError(f"{type(self).__name__} expects sequences (batch, T >= 1, "
                             f"{self.channels}), got {tuple(x.shape)}")
        h, total, steps = state if state is not None else self.initial_state(x)
        for t in range(x.shape[1]):
            h = self._cell(h, x[:, t])  # (B, H)
            total = total + h
        steps += x.shape[1]
        feature = h if self.readout == "last" else total / steps  # (B, H)
        pred, delegation = self.head(feature), self.delegate(feature)
        if return_state:
            return pred, delegation, RecurrentState(h, total, steps)
        return pred, delegation

    def step(self, x_t: Tensor, state: RecurrentState | None = None
             ) -> tuple[Tensor, Tensor, RecurrentState]:
        """Consume one new time step ``x_t`` (B, D) in O(1): prediction, delegation, state."""
        return self.forward(x_t.unsqueeze(1), state, return_state=True)


class ESNExpert(RecurrentExpert):
    """Echo-state expert: a fixed random leaky reservoir, trainable linear readouts.

    ``h ← (1 - leak) h + leak · tanh(W_in u + W h + b)`` with ``W_in ~ U(-s, s)``
    (``s = input_scaling``), ``b ~ U(-bias_scaling, bias_scaling)`` and ``W`` uniform, a
    fraction ``density`` of it non-zero, scaled once at construction so that its spectral
    radius (largest ``|eigenvalue|``) equals ``spectral_radius``. ``W_in``, ``W`` and ``b`` are
    buffers: saved in the ``state_dict``, never trained. Only the prediction and delegation
    readouts learn. ``seed`` fixes the reservoir; without it the global RNG draws it.
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int, n_experts: int, index: int = 0,
                 units: int = 100, spectral_radius: float = 0.9, leak: float = 0.5,
                 input_scaling: float = 1.0, bias_scaling: float = 0.1, density: float = 1.0,
                 readout: str = "last", seed: int | None = None,
                 self_bias: float = 0.0) -> None:
        super().__init__(in_shape, out_dim, n_experts, index, units, readout, self_bias)
        if spectral_radius <= 0:
            raise ValueError(f"esn spectral_radius must be > 0, got {spectral_radius}")
        if not 0 < leak <= 1:
            raise ValueError(f"esn leak must lie in (0, 1], got {leak}")
        if not 0 < density <= 1:
            raise ValueError(f"esn density must lie in (0, 1], got {density}")
        if input_scaling < 0 or bias_scaling < 0:
            raise ValueError(f"esn input_scaling and bias_scaling must be >= 0, "
                             f"got {input_scaling} and {bias_scaling}")
        self.leak = float(leak)
        self.spectral_radius = float(spectral_radius)
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        f64 = torch.float64
        h, d = self.units, self.channels

        def uniform(*shape: int) -> Tensor:
            return 2 * torch.rand(*shape, generator=gen, dtype=f64) - 1

        w_in = input_scaling * uniform(h, d)  # (H, D)
        bias = bias_scaling * uniform(h)  # (H,)
        w = uniform(h, h) * (torch.rand(h, h, generator=gen, dtype=f64) < density)  # (H, H)
        radius = float(torch.linalg.eigvals(w).abs().max())
        if radius == 0.0:
            raise ValueError(f"esn reservoir with units={h}, density={density} has spectral "
                             f"radius 0 and cannot be scaled; raise density or units")
        w = w * (spectral_radius / radius)
        dtype = torch.get_default_dtype()
        self.register_buffer("w_in", w_in.to(dtype))
        self.register_buffer("w_res", w.to(dtype))
        self.register_buffer("b_res", bias.to(dtype))

    def _cell(self, h: Tensor, u: Tensor) -> Tensor:
        pre = u @ self.w_in.T + h @ self.w_res.T + self.b_res  # (B, H)
        return (1 - self.leak) * h + self.leak * torch.tanh(pre)


class LTCExpert(RecurrentExpert):
    """Liquid time-constant expert (Hasani et al., 2021) for sequences (B, T, D).

    The hidden state ``x`` (B, H) follows, between two inputs ``u`` held constant,

        dx/dt = -[1/τ + f(x, u)] ⊙ x + f(x, u) ⊙ A,   f = sigmoid(W_u u + W_x x + b),

    with learnable ``τ = softplus(τ_raw) + 1e-3 > 0`` and reversal levels ``A`` (H,). The
    effective, input-dependent time constant is ``τ_sys = τ / (1 + τ f(x, u))``. Every time
    step advances ``x`` by ``dt`` with ``solver`` (a key of :data:`liquid_fed.odeint.METHODS`):
    ``euler``, ``midpoint``, ``rk4`` and the model-specific ``fused`` (semi-implicit Euler of
    the paper, unconditionally stable) and ``exponential`` (exact for frozen ``f``), each in
    ``substeps`` equal steps, or adaptive ``dopri5`` with ``rtol``/``atol``/``max_steps``.
    Solver settings are plain attributes and may be changed after construction.

    Other options: ``units`` (H), ``dt`` (time between two inputs), ``tau_init`` (initial
    ``τ``), ``readout`` (``"last"`` or ``"mean"`` state), ``self_bias`` (delegation head).
    Defaults follow the reference implementation: ``fused`` with 6 unfolds per input.
    ``dopri5`` cannot run under ``torch.func.vmap`` (see :attr:`supports_vmap`).
    """

    def __init__(self, in_shape: Sequence[int], out_dim: int, n_experts: int, index: int = 0,
                 units: int = 32, solver: str = "fused", substeps: int = 6, dt: float = 1.0,
                 rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 1000,
                 tau_init: float = 1.0, readout: str = "last",
                 self_bias: float = 0.0) -> None:
        super().__init__(in_shape, out_dim, n_experts, index, units, readout, self_bias)
        if solver not in METHODS:
            raise ValueError(f'ltc solver must be one of {list(METHODS)}, got "{solver}"')
        if substeps < 1:
            raise ValueError(f"ltc substeps must be >= 1, got {substeps}")
        for name, value in (("dt", dt), ("rtol", rtol), ("atol", atol), ("tau_init", tau_init),
                            ("max_steps", max_steps)):
            if value <= 0:
                raise ValueError(f"ltc {name} must be > 0, got {value}")
        if tau_init <= 1e-3:
            raise ValueError(f"ltc tau_init must be > 1e-3, got {tau_init}")
        self.solver, self.substeps, self.dt = solver, int(substeps), float(dt)
        self.rtol, self.atol, self.max_steps = float(rtol), float(atol), int(max_steps)
        h = self.units
        self.input = nn.Linear(self.channels, h)  # W_u, b
        self.recurrent = nn.Linear(h, h, bias=False)  # W_x
        raw = math.log(math.expm1(tau_init - 1e-3))  # softplus⁻¹
        self.tau_raw = nn.Parameter(torch.full((h,), raw))
        self.reversal = nn.Parameter(torch.empty(h).uniform_(-1, 1))  # A

    @property
    def supports_vmap(self) -> bool:  # type: ignore[override]
        return self.solver != "dopri5"

    def tau(self) -> Tensor:
        """(H,) the positive base time constants."""
        return F.softplus(self.tau_raw) + 1e-3

    def _cell(self, h: Tensor, u: Tensor) -> Tensor:
        drive = self.input(u)  # (B, H), constant over the interval
        inv_tau = 1 / self.tau()  # (H,)

        def rates(x: Tensor) -> tuple[Tensor, Tensor]:
            f = torch.sigmoid(drive + self.recurrent(x))  # (B, H)
            return inv_tau + f, f * self.reversal

        return integrate(rates, h, self.dt, self.solver, self.substeps, self.rtol, self.atol,
                         self.max_steps)


#: Expert kinds by name, as written in configs.
EXPERTS: dict[str, Callable[..., Expert]] = {
    "mlp": MLPExpert,
    "cnn": CNNExpert,
    "esn": ESNExpert,
    "ltc": LTCExpert,
}


def build_expert(kind: str, in_shape: Sequence[int], out_dim: int, n_experts: int,
                 index: int = 0, **options) -> Expert:
    """Build an expert by registry name.

    Args:
        kind: a key of :data:`EXPERTS`.
        in_shape: shape of one sample of this expert's view.
        out_dim: classes or output width.
        n_experts: K, the width of the delegation vector.
        index: this expert's position among the K.
        **options: the kind's own settings (e.g. ``hidden`` for ``mlp``, ``channels`` for
            ``cnn``, ``units``/``spectral_radius``/``leak`` for ``esn``,
            ``units``/``solver``/``substeps`` for ``ltc``); see each class.

    Raises:
        ValueError: for an unknown kind or option, naming what is accepted.
    """
    if kind not in EXPERTS:
        raise ValueError(f'expert kind must be one of {sorted(EXPERTS)}, got "{kind}"')
    cls = EXPERTS[kind]
    accepted = set(inspect.signature(cls).parameters) - {
        "in_shape", "out_dim", "n_experts", "index"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f'expert "{kind}" has no option {unknown[0]!r} '
            f'(accepted: {", ".join(sorted(accepted))})'
        )
    return cls(in_shape, out_dim, n_experts, index, **options)
