"""Experts: each maps its own view of a sample to ``(prediction, delegation)``.

Every expert returns the prediction (B, C) — logits for classification — and a delegation
vector (B, K), a probability distribution over the K experts of the ensemble (softmax of a
delegation head). Build experts by name through :data:`EXPERTS` / :func:`build_expert`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

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

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class MLPExpert(Expert):
    """Flattened input → MLP trunk → prediction head and softmax delegation head."""

    def __init__(self, in_shape: Sequence[int], out_dim: int, n_experts: int, index: int = 0,
                 hidden: Sequence[int] = (64,), dropout: float = 0.0,
                 self_bias: float = 0.0) -> None:
        super().__init__(in_shape, out_dim, n_experts, index)
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


#: Expert kinds by name, as written in configs.
EXPERTS: dict[str, Callable[..., Expert]] = {"mlp": MLPExpert}


def build_expert(kind: str, in_shape: Sequence[int], out_dim: int, n_experts: int,
                 index: int = 0, **options) -> Expert:
    """Build an expert by registry name.

    Args:
        kind: a key of :data:`EXPERTS`.
        in_shape: shape of one sample of this expert's view.
        out_dim: classes or output width.
        n_experts: K, the width of the delegation vector.
        index: this expert's position among the K.
        **options: the kind's own settings (e.g. ``hidden`` for ``mlp``).

    Raises:
        ValueError: for an unknown kind or option, naming what is accepted.
    """
    if kind not in EXPERTS:
        raise ValueError(f'expert kind must be one of {sorted(EXPERTS)}, got "{kind}"')
    import inspect

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
