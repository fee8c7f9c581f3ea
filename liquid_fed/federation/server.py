"""The server's step: combine the clients' outputs, the loss, the signals, the metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from liquid_fed.availability import answered_rows
from liquid_fed.config import RunConfig
from liquid_fed.ensemble import (
    EnsembleOutput,
    SmoothingPick,
    combine,
    ensemble_loss,
    pick_smoothing,
    with_smoothing,
)
from liquid_fed.errors import ClientFailure
from liquid_fed.federation.setup import ServerData
from liquid_fed.federation.state import Arrays
from liquid_fed.metrics import evaluate_output, per_sample_error
from liquid_fed.privacy import GradientDefence
from liquid_fed.robustness import robustness
from liquid_fed.train import DTYPES


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def absent_reply(n: int, out_dim: int, k: int, dtype: torch.dtype) -> Arrays:
    """What stands in for the reply of a party absent from a round: zeros, present nowhere
    (the combination ignores the outputs of an absent expert)."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    return {"pred": np.zeros((n, out_dim), dtype=np_dtype),
            "del": np.zeros((n, k), dtype=np_dtype), "present": np.zeros(n, dtype=bool)}


class TrainStep(NamedTuple):
    """A training round's result at the server."""

    loss: float
    signals: list[Arrays]  # per client: g_pred (n, C), g_del (n, K), as sent


class Stacked(NamedTuple):
    """One split's replies stacked by client."""

    preds: Tensor  # (n, K, C)
    dels: Tensor  # (n, K, K)
    present: Tensor  # (n, K) bool

    @property
    def mask(self) -> Tensor | None:
        """``present``, or None when every party is present on every sample (what
        :func:`~liquid_fed.ensemble.combine` takes)."""
        return None if bool(self.present.all()) else self.present


class Evaluation(NamedTuple):
    """An evaluated split: metrics and the per-sample outputs behind them."""

    metrics: dict[str, float]
    details: Arrays  # ids, power (n, K), delegation (n, K, K), error (n,), labels, truth


class ServerStep:
    """Combines the clients' outputs, computes loss, signals and metrics on the server.

    The replies it is given have passed :func:`liquid_fed.replies.check_prediction_reply`.
    """

    def __init__(self, cfg: RunConfig, data: ServerData) -> None:
        self.cfg = cfg
        self.data = data
        self.liquid = dataclasses.replace(cfg.ensemble, task=data.task)
        self.device = resolve_device(cfg.server.device)
        self.dtype = DTYPES[cfg.train.dtype]
        self.defence = GradientDefence(cfg.privacy.clip, cfg.privacy.noise, cfg.seed)

    def _target(self, ids: np.ndarray) -> Tensor:
        y = torch.from_numpy(np.asarray(self.data.labels_of(ids)))
        if self.data.task == "classification":
            return y.long().to(self.device)
        return y.to(self.dtype).to(self.device)

    def stack_splits(self, replies: list[Arrays | None], sizes: Sequence[int]
                     ) -> list[Stacked]:
        """Replies stacked per split (a training chunk is one split), consuming ``replies``.

        Each reply holds its client's rows of every split, split after split (``sizes``
        rows each). The tensors are allocated once and filled client by client; each entry of
        ``replies`` is set to None once copied, so a reply's buffer can be freed before the
        next is read (at 256 clients an evaluation's replies are hundreds of MB).
        """
        k = len(replies)
        out = [Stacked(torch.empty(n, k, self.data.n_outputs, dtype=self.dtype),
                       torch.empty(n, k, k, dtype=self.dtype),
                       torch.empty(n, k, dtype=torch.bool)) for n in sizes]
        for j in range(k):
            reply, replies[j] = replies[j], None
            assert reply is not None
            start = 0
            for n, part in zip(sizes, out, strict=True):
                part.preds[:, j] = torch.from_numpy(reply["pred"][start:start + n])
                part.dels[:, j] = torch.from_numpy(reply["del"][start:start + n])
                part.present[:, j] = torch.from_numpy(
                    np.asarray(reply["present"][start:start + n], dtype=bool))
                start += n
        return [Stacked(p.preds.to(self.device), p.dels.to(self.device),
                        p.present.to(self.device)) for p in out]

    def train_step(self, ids: np.ndarray, replies: Sequence[Arrays],
                   round_index: int = 0) -> TrainStep:
        """Loss on the chunk and each client's signals ``g_pred`` (n, C), ``g_del`` (n, K),
        after the configured defence (``privacy``).

        A party absent from the round (:func:`absent_reply` stands in for its reply) is
        combined with ``present`` False on every sample; its signals are zero and not sent."""
        # one split of the chunk's rows; a copy of the list is consumed, not the caller's
        split = self.stack_splits(list(replies), [ids.size])[0]
        preds, dels, mask = split.preds, split.dels, split.mask
        preds.requires_grad_(True)
        dels.requires_grad_(True)
        target = self._target(ids)
        # Samples that no answering party holds (a round's absences on top of the data's)
        # take no part in the loss; their signals are zero.
        rows = None if mask is None else answered_rows(mask)
        if rows is None:
            out = combine(preds, dels, self.liquid, mask)
        else:
            out = combine(preds[rows], dels[rows], self.liquid, mask[rows])
            target = target[rows]
        loss = ensemble_loss(out, target, self.liquid)
        g_pred, g_del = torch.autograd.grad(loss, (preds, dels), allow_unused=True)
        if g_del is None:  # the uniform vote ignores delegations: nothing to learn there
            g_del = torch.zeros_like(dels)
        if not (torch.isfinite(loss) and torch.isfinite(g_pred).all()
                and torch.isfinite(g_del).all()):
            raise ClientFailure(f"round {round_index}: the loss or its gradient is not finite "
                                f"(loss {float(loss.detach()):.6g}) although every reply passed "
                                "its checks; lower optim.lr or check the data")
        signals = [{"g_pred": g_pred[:, k].cpu().numpy(), "g_del": g_del[:, k].cpu().numpy()}
                   for k in range(len(replies))]
        return TrainStep(float(loss.detach()), self.defence.apply(signals, round_index))

    def _output(self, split: Stacked) -> EnsembleOutput:
        """A split combined (no gradient): the data's absences as ``present``."""
        return combine(split.preds, split.dels, self.liquid, split.mask)

    def pick_smoothing(self, ids: np.ndarray, split: Stacked) -> SmoothingPick:
        """The power smoothing ``λ`` for ``smoothing: auto``, picked on this (validation)
        split by :func:`liquid_fed.ensemble.pick_smoothing`, as the centralized run picks
        it."""
        with torch.no_grad():
            return pick_smoothing(self._output(split), self._target(ids), self.liquid)

    def robustness(self, ids: np.ndarray, split: Stacked, n_params: Sequence[int],
                   smoothing: float | None = None) -> dict[str, Any]:
        """The run's ``robustness`` from this (test) split: the metrics with parties absent
        (:func:`liquid_fed.robustness.robustness`, as the centralized run computes them)."""
        with torch.no_grad():
            lam = self.liquid.training_smoothing if smoothing is None else smoothing
            mask = split.mask
            base = None if mask is None else mask.cpu()
            return robustness(split.preds, split.dels, self._target(ids), self.liquid, lam,
                              self.cfg.seed, base, n_params)

    def evaluate(self, ids: np.ndarray, split: Stacked,
                 n_params: Sequence[int], smoothing: float | None = None) -> Evaluation:
        """Loss and metrics of the ensemble on ``ids``, and the per-sample outputs behind them
        (ids, power (n, K), delegation (n, K, K), error (n,), labels, and the ground truth
        ``informative`` / ``regions`` where the data set has it).

        ``smoothing`` pools with that ``λ`` (a pick of :meth:`pick_smoothing`) instead of the
        training one; the metric ``smoothing`` records the ``λ`` used."""
        with torch.no_grad():
            out = self._output(split)
            if smoothing is not None:
                out = with_smoothing(out, self.liquid, smoothing)
            target = self._target(ids)
            metrics = evaluate_output(out, target, self.data.task, n_params)
            metrics["loss"] = float(ensemble_loss(out, target, self.liquid))
            metrics["smoothing"] = float(self.liquid.training_smoothing if smoothing is None
                                         else smoothing)
            details: Arrays = {
                "ids": np.asarray(ids), "power": out.power.cpu().numpy(),
                "delegation": out.delegation.cpu().numpy(),
                "error": per_sample_error(out, target, self.data.task).cpu().numpy(),
                "labels": np.asarray(self.data.labels_of(ids)),
            }
            truth = self.data.informative_of(ids)
            if truth is not None:
                top = out.power.argmax(-1).cpu().numpy()
                metrics["informative_top_power"] = float(np.mean(top == truth))
                details["informative"] = truth
            if self.data.regions is not None:
                details["regions"] = self.data.regions_of(ids)
        return Evaluation(metrics, details)
