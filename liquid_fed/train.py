"""Centralized training and evaluation of a :class:`LiquidEnsemble` (the reference run)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from liquid_fed.availability import answered_rows, round_mask
from liquid_fed.ensemble import (
    SMOOTHING_AUTO,
    EnsembleOutput,
    LiquidEnsemble,
    SmoothingPick,
    combine,
    pick_smoothing,
    with_smoothing,
)
from liquid_fed.metrics import evaluate_output
from liquid_fed.optim import SGD, Adam, AdamW, Optimizer

log = logging.getLogger(__name__)

#: Floating-point precisions of training, by config name (``train.dtype``).
DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: The experts' optimizers by config name (``optim.name``): :mod:`liquid_fed.optim`, the same
#: arithmetic as ``torch.optim``'s without importing ``torch._dynamo`` in every process.
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> Optimizer:
    """An optimizer by registry name (``sgd``, ``adam``, ``adamw``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f'optimizer must be one of {sorted(OPTIMIZERS)}, got "{name}"')
    if name == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
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
    answering: Callable[[int], np.ndarray] | None = None,
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
        answering: optionally, step -> (K,) bool: the experts that take part in that step
            (:func:`liquid_fed.availability.round_presence`). An absent expert is not run, its
            parameters get no gradient (the optimizer leaves them and their state as they
            were) and the step combines the others with ``present`` False for it.
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
            who = None if answering is None else answering(step)
            if who is None or bool(who.all()):
                out = ensemble(_take(inputs, rows), mask)
                loss = ensemble.loss(out, target[torch.as_tensor(rows)])
            else:
                loss = _partial_loss(ensemble, _take(inputs, rows),
                                     target[torch.as_tensor(rows)], mask, who)
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


def _partial_loss(ensemble: LiquidEnsemble, inputs: Sequence[Tensor], target: Tensor,
                  mask: Tensor | None, who: np.ndarray) -> Tensor:
    """A step's loss with only the experts ``who`` (K,) answering, as the federated server
    computes it: absent experts are not run (zeros stand in for their outputs, which the
    combination ignores) and samples no answering expert holds are left out."""
    n, k = target.shape[0], len(ensemble.experts)
    outs = {j: ensemble.experts[j](inputs[j]) for j in range(k) if who[j]}
    pred0, del0 = next(iter(outs.values()))
    zeros_p = pred0.new_zeros(pred0.shape)  # (B, C)
    zeros_d = del0.new_zeros(del0.shape)  # (B, K)
    preds = torch.stack([outs[j][0] if j in outs else zeros_p for j in range(k)], 1)
    dels = torch.stack([outs[j][1] if j in outs else zeros_d for j in range(k)], 1)
    mask = round_mask(mask, who, n)
    rows = answered_rows(mask)
    if rows is not None:
        preds, dels, mask, target = preds[rows], dels[rows], mask[rows], target[rows]
    out = combine(preds, dels, ensemble.config, mask)
    return ensemble.loss(out, target)


def evaluate(ensemble: LiquidEnsemble, inputs: Sequence[Tensor], target: Tensor,
             present: Tensor | None = None) -> dict[str, float]:
    """Loss and metrics of the ensemble on one split (with its own ``smoothing``; ``auto``
    evaluates the learned powers, ``λ = 0``: :func:`evaluate_splits` picks ``λ``)."""
    return output_metrics(ensemble, predict(ensemble, inputs, present=present), target,
                          ensemble.config.training_smoothing)


def output_metrics(ensemble: LiquidEnsemble, out: EnsembleOutput, target: Tensor,
                   smoothing: float) -> dict[str, float]:
    """Loss and metrics of an output of ``ensemble``; ``smoothing`` is the ``λ`` it was
    pooled with (recorded as the metric ``smoothing``)."""
    metrics = evaluate_output(
        out, target, ensemble.config.task,
        n_params=[sum(p.numel() for p in e.parameters()) for e in ensemble.experts],
    )
    metrics["loss"] = float(ensemble.loss(out, target))
    metrics["smoothing"] = float(smoothing)
    return metrics


def predict_splits(ensemble: LiquidEnsemble, inputs: Mapping[str, Sequence[Tensor]],
                   targets: Mapping[str, Tensor], present: Mapping[str, Tensor | None],
                   splits: Sequence[str] = ("val", "test"),
                   ) -> tuple[dict[str, EnsembleOutput], float, SmoothingPick | None]:
    """A trained ensemble's outputs on ``splits``, pooled with its final smoothing.

    With ``ensemble.smoothing: auto``, ``λ`` is picked on the ``val`` split
    (:func:`liquid_fed.ensemble.pick_smoothing`, as the federated server does) and every
    split is pooled with it; otherwise the configured ``λ`` is used.

    Args:
        ensemble: the trained model.
        inputs: split -> K tensors, one per expert.
        targets: split -> labels or targets.
        present: split -> (n, K) presence mask or None.
        splits: the splits to predict (``val`` among them under ``auto``).

    Returns:
        (split -> output, the ``λ`` used, the pick or None when ``smoothing`` is a number).

    Raises:
        ValueError: ``smoothing: auto`` without ``val`` among ``splits``.
    """
    config = ensemble.config
    outs = {s: predict(ensemble, inputs[s], present=present[s]) for s in splits}
    if config.smoothing != SMOOTHING_AUTO:
        return outs, config.training_smoothing, None
    if "val" not in outs:
        raise ValueError(f'smoothing "auto" picks λ on the val split; got splits {list(splits)}')
    pick = pick_smoothing(outs["val"], targets["val"], config)
    return ({s: with_smoothing(o, config, pick.value) for s, o in outs.items()}, pick.value,
            pick)
