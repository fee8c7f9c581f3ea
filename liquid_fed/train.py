"""Centralized training and evaluation of a :class:`LiquidEnsemble` (the reference run)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from liquid_fed.ensemble import EnsembleOutput, LiquidEnsemble
from liquid_fed.metrics import evaluate_output

log = logging.getLogger(__name__)

#: Floating-point precisions of training, by config name (``train.dtype``).
DTYPES = {"float32": torch.float32, "float64": torch.float64}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer by registry name (``sgd``, ``adam``, ``adamw``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f'optimizer must be one of {sorted(OPTIMIZERS)}, got "{name}"')
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def batch_order(n: int, batch_size: int, epoch: int, seed: int) -> Iterator[np.ndarray]:
    """Row positions of each mini-batch of one epoch: a permutation fixed by (seed, epoch).

    The federation draws its chunks from the same function, so a federated run and a
    centralized run visit the samples in the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


def _take(inputs: Sequence[Tensor], rows: np.ndarray) -> list[Tensor]:
    idx = torch.as_tensor(rows, dtype=torch.long)
    return [x[idx] for x in inputs]


@torch.no_grad()
def predict(ensemble: LiquidEnsemble, inputs: Sequence[Tensor], batch_size: int = 1024,
            present: Tensor | None = None) -> EnsembleOutput:
    """Evaluate the ensemble on all rows, in batches, and concatenate the outputs."""
    was_training = ensemble.training
    ensemble.eval()
    n = inputs[0].shape[0]
    parts = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        mask = None if present is None else present[rows]
        parts.append(ensemble(_take(inputs, rows), mask))
    ensemble.train(was_training)
    return EnsembleOutput(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("output", "power", "delegation",
                                                              "predictions")),
        aux_loss=torch.stack([p.aux_loss for p in parts]).mean(),
        present=None if present is None else torch.cat([p.present for p in parts]),
    )


def fit(
    ensemble: LiquidEnsemble,
    inputs: Sequence[Tensor],
    target: Tensor,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    seed: int = 0,
    present: Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the ensemble on K views; returns the mean training loss of every epoch.

    Args:
        ensemble: the model.
        inputs: K tensors, one per expert, rows aligned with ``target``.
        target: labels or targets.
        epochs, batch_size, lr, optimizer, weight_decay, momentum: the usual.
        seed: fixes the batch order (see :func:`batch_order`).
        present: optional (N, K) mask of which expert sees which row.
        on_step: called with (step, loss) after each optimiser step.
        on_epoch: called with (epoch, mean loss) after each epoch.
    """
    opt = make_optimizer(optimizer, ensemble.parameters(), lr, weight_decay, momentum)
    step = 0
    n = target.shape[0]
    history = []
    ensemble.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for rows in batch_order(n, batch_size, epoch, seed):
            mask = None if present is None else present[torch.as_tensor(rows)]
            out = ensemble(_take(inputs, rows), mask)
            loss = ensemble.loss(out, target[torch.as_tensor(rows)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
            count += len(rows)
            if on_step is not None:
                on_step(step, float(loss.detach()))
            step += 1
        history.append(total / count)
        log.debug("epoch %d loss %.4f", epoch, history[-1])
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history


def evaluate(ensemble: LiquidEnsemble, inputs: Sequence[Tensor], target: Tensor,
             present: Tensor | None = None) -> dict[str, float]:
    """Loss and metrics of the ensemble on one split."""
    out = predict(ensemble, inputs, present=present)
    metrics = evaluate_output(
        out, target, ensemble.config.task,
        n_params=[sum(p.numel() for p in e.parameters()) for e in ensemble.experts],
    )
    metrics["loss"] = float(ensemble.loss(out, target))
    return metrics
