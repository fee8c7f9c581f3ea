"""What the gradient signals tell a client about the labels, and a knob that blurs them.

Each round the server sends client ``k`` the gradient of the chunk's mean loss with respect to
that client's own outputs: ``g_pred`` (n, C) and ``g_del`` (n, K). These signals carry the
labels. For classification the gradient of the loss with respect to a client's logits is
``w·(q - onehot(y))`` up to positive factors (``q`` a probability vector), negative only at the
true class, so ``argmin_c g_pred[i, c]`` *is* the label: an honest-but-curious client recovers
every training label it is sent (Li et al., "Label leakage and protection in two-party split
learning", 2022, make the same observation). For regression the sign of ``g_pred`` tells
whether the label lies above or below the ensemble's prediction.

:class:`LabelLeakage` runs that attack for every client on exactly the signals the client
received, and reports the share of training labels it recovers: for classification, the share
of training samples whose *latest* received gradient's argmin equals the label (chance: the
share of the most frequent class); for regression, the share whose residual sign it recovers
from the sign of ``g_pred`` and its own prediction (chance: about 0.5).

:class:`GradientDefence` is the knob (``privacy.clip``, ``privacy.noise``): each sample's own
gradient (the returned rows times the chunk size, i.e. the gradient of that sample's loss) is
clipped to L2 norm ``clip`` over ``[g_pred, g_del]``, then Gaussian noise of standard deviation
``noise · clip`` (``noise`` itself when ``clip`` is 0) is added to every entry. The noise is drawn
from ``(seed, round, client)``, so a resumed run draws what an uninterrupted one would. This is
the gradient-perturbation defence of split learning; it is not a differential-privacy guarantee
(no accounting is done, and ids and predictions still travel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class GradientDefence:
    """Per-sample clipping and Gaussian noise on the signals returned to the clients.

    Args:
        clip: L2 bound of each sample's own gradient row ``[g_pred, g_del]``; 0 = no clipping.
        noise: noise standard deviation, in units of ``clip`` (absolute when ``clip`` is 0).
        seed: the run's seed.
    """

    clip: float = 0.0
    noise: float = 0.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.clip > 0 or self.noise > 0

    def apply(self, signals: Sequence[Arrays], round_index: int) -> list[Arrays]:
        """The defended signals (the input is left untouched)."""
        if not self.active:
            return list(signals)
        out = []
        for k, s in enumerate(signals):
            g_pred, g_del = s["g_pred"], s["g_del"]
            n = g_pred.shape[0]
            # Work on each sample's own gradient: the rows are d(mean loss)/d(output) = (1/n)·it.
            rows = np.concatenate([g_pred, g_del], axis=1).astype(np.float64) * n  # (n, C + K)
            if self.clip > 0:
                norm = np.linalg.norm(rows, axis=1, keepdims=True)
                rows = rows * np.minimum(1.0, self.clip / np.maximum(norm, 1e-300))
            if self.noise > 0:
                std = self.noise * (self.clip if self.clip > 0 else 1.0)
                rng = np.random.default_rng([self.seed, round_index, k, 0x9E37])
                rows = rows + rng.normal(0.0, std, size=rows.shape)
            rows = (rows / n).astype(g_pred.dtype)
            c = g_pred.shape[1]
            out.append({**s, "g_pred": rows[:, :c], "g_del": rows[:, c:]})
        return out


class LabelLeakage:
    """The share of training labels each client recovers from the signals it received.

    Args:
        train_ids: the training ids (sorted or not); labels of other ids are never scored.
        labels: their labels, row-aligned with ``train_ids``.
        task: ``classification`` or ``regression``.
        n_clients: K.
    """

    def __init__(self, train_ids: np.ndarray, labels: np.ndarray, task: str,
                 n_clients: int) -> None:
        self.task = task
        self.order = np.argsort(train_ids, kind="stable")
        self.sorted = np.asarray(train_ids, dtype=np.int64)[self.order]
        self.labels = np.asarray(labels)[self.order]
        n = self.sorted.size
        self.seen = np.zeros((n_clients, n), dtype=bool)  # the client got a signal for it
        self.right = np.zeros((n_clients, n), dtype=bool)  # its latest guess was right

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.sorted, np.asarray(ids, dtype=np.int64))

    def observe(self, ids: np.ndarray, signals: Sequence[Arrays],
                own_predictions: Sequence[np.ndarray]) -> None:
        """Score every client's attack on one round's signals.

        Args:
            ids: the chunk's training ids (n,).
            signals: per client, the arrays it was sent (``g_pred`` (n, C)).
            own_predictions: per client, the predictions it sent for this chunk (n, C).
        """
        rows = self._rows(ids)
        y = self.labels[rows]
        for k, (s, pred) in enumerate(zip(signals, own_predictions, strict=True)):
            g = np.asarray(s["g_pred"], dtype=np.float64)
            if self.task == "classification":
                right = g.argmin(axis=1) == y
            else:
                # The label lies above the ensemble's output where the gradient is negative;
                # the client compares with its own prediction, the best it knows of the output.
                guess_above = g < 0
                truth_above = y.reshape(g.shape) > np.asarray(pred).reshape(g.shape)
                right = (guess_above == truth_above).mean(axis=1) >= 0.5
            self.seen[k, rows] = True
            self.right[k, rows] = right

    def per_client(self) -> list[float]:
        """Per client: recovered share of the training labels it received signals for."""
        seen = self.seen.sum(axis=1)
        return [float(r / s) if s else float("nan")
                for r, s in zip(self.right.sum(axis=1), seen, strict=True)]

    def chance(self) -> float:
        """What guessing without the signals achieves: the majority class share (0.5 for the
        residual sign of regression)."""
        if self.task != "classification" or self.labels.size == 0:
            return 0.5
        return float(np.bincount(self.labels.astype(np.int64)).max() / self.labels.size)

    def report(self) -> dict[str, object]:
        """What ``summary.json`` holds under ``label_leakage``."""
        per = self.per_client()
        finite = [v for v in per if np.isfinite(v)]
        attack = ("argmin over classes of the returned gradient" if self.task ==
                  "classification" else "sign of the returned gradient vs own prediction")
        return {"attack": attack, "max": max(finite) if finite else float("nan"),
                "per_client": per, "chance": self.chance(),
                "samples": int(self.seen.any(axis=0).sum())}

    # -- checkpoints ----------------------------------------------------------------------------

    def state(self) -> Arrays:
        return {"leakage/seen": self.seen.copy(), "leakage/right": self.right.copy()}

    def load(self, arrays: Arrays) -> None:
        seen, right = arrays.get("leakage/seen"), arrays.get("leakage/right")
        if seen is not None and right is not None and seen.shape == self.seen.shape:
            self.seen, self.right = seen.astype(bool), right.astype(bool)
