"""What the gradient signals tell a party about the labels, a knob that blurs them, and the
label-privacy guarantee the knob gives.

**The signals.** Each round the server sends client ``k`` of the Liquid Ensemble the gradient of
the chunk's mean loss with respect to that client's own outputs: ``g_pred`` (n, C) and ``g_del``
(n, K). The baselines of :mod:`liquid_fed.methods` send their parties the gradient with respect
to what each party sent: its logits (``aggvfl``, and ``moe``'s heads) and/or its trunk embedding
(``splitnn``, and ``moe``'s gate input). These signals carry the labels. For classification
the gradient of the loss with respect to a party's logits is ``a·(q - onehot(y))`` with
``a > 0`` (``q`` a probability vector), negative only at the true class, so
``argmin_c g[i, c]`` *is* the label: an honest-but-curious party recovers every training label
it is sent (Li et al., "Label leakage and protection in two-party split learning", ICLR 2022,
make the same observation). For regression the sign of ``g_pred`` tells whether the label lies
above or below the combined prediction.

**The attacker keeps everything it was sent.** A party receives a signal for a sample every time
the sample is in a round's chunk (once per epoch), and nothing stops it from keeping them all.
:class:`LabelLeakage` runs a family of attacks per party on exactly the signals that party
received (after the defence), with running sums per sample (memory ``O(K·n·C)``, not the
history), and reports the strongest. Classification (rows ``r_t`` = the per-sample gradient the
party received the ``t``-th time it was sent the sample; ``s_t`` = softmax of its own output):

``latest``          argmin of the latest ``r_t`` (what this module reported before);
``first``           argmin of the first ``r_t`` (early rounds carry the most signal: the model
                    has not fit the sample yet, so ``|q - onehot(y)|`` is large);
``majority``        the most frequent per-round argmin;
``sum``             argmin of ``Σ_t r_t`` (Gaussian noise averages out, the signal adds up);
``normalized_sum``  argmin of ``Σ_t r_t / |r_t|`` (each round one vote of unit weight);
``early``           argmin of ``Σ_t r_t / t`` (rounds weighted by how early they came);
``matched``         argmax over classes ``c`` of ``Σ_t max(<r_t, v>, 0)² / |v|²``,
                    ``v = s_t - onehot(c)``: the Gaussian likelihood of the round's row
                    under "the gradient is a positive multiple of ``s_t - onehot(c)``" with the
                    multiple fitted per round, summed over rounds. It uses the party's own
                    output, which the party has; it is exact for ``aggvfl``/``moe`` heads and the
                    ``probs`` pooling, a proxy for the others.

Regression (the target is fixed: whether each label lies above the party's own latest
prediction of it; a sample counts as recovered when at least half its outputs are): ``latest``
(sign of the latest gradient), ``first``, ``majority`` (of per-round signs), ``sum``, and
``recent`` (sign of ``Σ_t 0.5^(T-t) r_t``: recent rounds weigh more because the reference moves).

Embedding gradients (:class:`EmbeddingLeakage`, classification only): the direction attack of
Li et al. (2022, §3.2), extended to C classes. The party is assumed to know the label of one
training sample per class (the first of each class in id order; those C samples are not
scored) and labels every other sample with the class of the known sample whose (latest, first,
summed or summed-unit) gradient has the highest cosine similarity with its own. Gradients of one
class point alike because the loss enters the embedding's gradient through ``q - onehot(y)``.

``max`` is the share recovered by the strongest (attack, party) pair, picked with hindsight, an
upper bound on what a party that must pick its attack beforehand gets (over ~7 attacks on
~1000 samples, the pick adds at most a point or two over the best fixed attack). The chance
level is the share of the most frequent class (0.5 for the residual sign). Runs whose parties
all hold the labels themselves (``averaged``, ``local``, ``oracle``) report
:func:`labels_at_party`.

**The defence** (:class:`GradientDefence`, ``privacy.clip``, ``privacy.noise``): each sample's
own gradient row ``[g_pred, g_del]`` (the returned rows times the chunk size) is clipped to L2
norm ``clip``, then Gaussian noise of standard deviation ``noise · clip`` (``noise`` itself when
``clip`` is 0) is added to every entry. The noise is drawn from ``(seed, round, client, key)``
where ``key`` is a secret the server draws per run and keeps in its own checkpoint (a resumed run
draws what an uninterrupted one would). Without the key every client could regenerate the
noise, since the config (with its seed) and the round index travel to the clients.

**The guarantee** (:func:`label_dp`): with ``clip > 0`` and ``noise > 0``, each round releases
to a client its sample's clipped row plus ``N(0, (noise·clip)² I)``. Changing one training label
moves that clipped row anywhere inside the L2 ball of radius ``clip``: sensitivity ``2·clip``,
noise multiplier ``noise / 2``. The same sample is sent once per epoch, and each release sees
the outputs of models trained on earlier releases (adaptive composition), so the guarantee
is the Gaussian mechanism composed over every round the sample is sent, with no amplification
by subsampling (the party sees which ids are in the chunk): label-DP ``(ε, δ)`` with ``ε`` from
the RDP accountant of ``dp-accounting``. What else a client receives and why it does not break
this: the other rows of the chunk do not depend on the label (the task and per-expert losses are
per-sample means; the auxiliary power losses do not read labels); the ids, the salt and the
config carry no labels; evaluation sends the clients no metrics. The guarantee is per client;
K clients that pool what they received see K independently noised rows per round
(``epsilon_all_clients``: K-fold composition). It covers training labels only (validation
labels pick nothing the clients see), and it does not hold when the server's noise key leaks.
With ``clip = 0`` the sensitivity is unbounded and with ``noise = 0`` nothing is random: no
``ε`` exists, and the report says which.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from liquid_fed.errors import LiquidFedError

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

#: The optional dependency of the guarantee (``pip install 'liquid-fed[privacy]'``).
ACCOUNTANT_EXTRA = "privacy"
ACCOUNTANT_PIN = "dp-accounting==0.6.0"
#: δ of the reported label-DP guarantee.
DELTA = 1e-5

CLASSIFICATION_ATTACKS = ("latest", "first", "majority", "sum", "normalized_sum", "early",
                          "matched")
REGRESSION_ATTACKS = ("latest", "first", "majority", "sum", "recent")
EMBEDDING_ATTACKS = ("latest", "first", "sum", "normalized_sum")

_DESCRIBE = {
    "latest": "the latest gradient received",
    "first": "the first gradient received",
    "majority": "the majority over rounds",
    "sum": "the sum over rounds of the gradients received",
    "normalized_sum": "the sum over rounds of the unit-norm gradients received",
    "early": "the sum over rounds of the gradients received, the t-th weighted 1/t",
    "matched": "the per-round likelihood of each class given the party's own output, summed",
    "recent": "the sum over rounds of the gradients received, halving with each later round",
}


class AccountantMissing(LiquidFedError, ImportError):
    """The privacy accountant (an optional extra) is not installed."""


# --------------------------------------------------------------------------------------------
# The defence
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradientDefence:
    """Per-sample clipping and Gaussian noise on the signals returned to the clients.

    Args:
        clip: L2 bound of each sample's own gradient row ``[g_pred, g_del]``; 0 = no clipping.
        noise: noise standard deviation, in units of ``clip`` (absolute when ``clip`` is 0).
        seed: the run's seed.
        key: the server's secret noise key; empty, the noise is reproducible from the seed by
            anyone who knows it (the clients do).
    """

    clip: float = 0.0
    noise: float = 0.0
    seed: int = 0
    key: bytes = b""

    @property
    def active(self) -> bool:
        return self.clip > 0 or self.noise > 0

    def apply(self, signals: Sequence[Arrays], round_index: int) -> list[Arrays]:
        """The defended signals (the input is left untouched)."""
        if not self.active:
            return list(signals)
        secret = int.from_bytes(self.key, "little") if self.key else 0
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
                rng = np.random.default_rng([self.seed, round_index, k, 0x9E37, secret])
                rows = rows + rng.normal(0.0, std, size=rows.shape)
            rows = (rows / n).astype(g_pred.dtype)
            c = g_pred.shape[1]
            out.append({**s, "g_pred": rows[:, :c], "g_del": rows[:, c:]})
        return out


# --------------------------------------------------------------------------------------------
# The guarantee
# --------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(version unknown)"


def _accountant() -> Any:
    try:
        import dp_accounting
    except ImportError as err:
        raise AccountantMissing(
            f"the label-privacy guarantee needs the optional extra '{ACCOUNTANT_EXTRA}': "
            f"pip install 'liquid-fed[{ACCOUNTANT_EXTRA}]' (or pip install {ACCOUNTANT_PIN})"
        ) from err
    return dp_accounting


def label_dp(clip: float, noise: float, rounds: int, delta: float = DELTA,
             parties: int = 1) -> dict[str, Any]:
    """The label-DP guarantee of :class:`GradientDefence` over ``rounds`` releases per sample.

    Sensitivity ``2·clip`` (one label changed moves a clipped row anywhere in the L2 ball of
    radius ``clip``), noise standard deviation ``noise·clip``, so noise multiplier
    ``noise / 2``; the Gaussian mechanism composed ``rounds · parties`` times (no subsampling
    amplification) with the RDP accountant of ``dp-accounting``. See the module docstring for
    what the guarantee covers.

    Args:
        clip: ``privacy.clip``.
        noise: ``privacy.noise``.
        rounds: how many times a sample is sent to a party (the most over samples).
        delta: δ of the guarantee.
        parties: how many parties pool what they received (1: one client alone).

    Returns:
        ``epsilon`` (None when no guarantee holds), ``delta``, ``rounds``, ``parties``,
        ``noise_multiplier``, ``accountant`` and ``reason`` (why no guarantee holds, or None).

    Raises:
        AccountantMissing: the optional extra ``privacy`` (dp-accounting) is not installed and a
            guarantee has to be computed.
        ValueError: a negative clip or noise, ``rounds`` or ``parties`` below 0 or 1, or
            ``delta`` outside (0, 1).
    """
    if clip < 0 or noise < 0:
        raise ValueError(f"privacy.clip and privacy.noise must be >= 0, got {clip}, {noise}")
    if rounds < 0 or parties < 1:
        raise ValueError(f"rounds must be >= 0 and parties >= 1, got {rounds}, {parties}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    out: dict[str, Any] = {"epsilon": None, "delta": delta, "rounds": int(rounds),
                           "parties": int(parties), "noise_multiplier": None,
                           "accountant": None, "reason": None}
    if clip == 0:
        out["reason"] = ("no guarantee: privacy.clip is 0, so a gradient row (and the effect of "
                         "one label on it) is unbounded")
        return out
    if noise == 0:
        out["reason"] = "no guarantee: privacy.noise is 0, the clipped gradients travel exact"
        return out
    z = noise / 2.0
    out["noise_multiplier"] = z
    if rounds == 0:
        out.update(epsilon=0.0, accountant="none needed: no sample was sent")
        return out
    dpa = _accountant()
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.GaussianDpEvent(noise_multiplier=z), int(rounds) * int(parties))
    out["epsilon"] = float(acc.get_epsilon(delta))
    out["accountant"] = f"dp-accounting {_version('dp-accounting')} RdpAccountant"
    return out


def guarantee(clip: float, noise: float, rounds: int, parties: int,
              delta: float = DELTA) -> dict[str, Any]:
    """What a run reports under ``label_leakage.guarantee``: :func:`label_dp` for one client
    and for all ``parties`` pooled (``epsilon_all_clients``); when the accountant is missing,
    no number but the reason (a run is not lost for want of an optional extra)."""
    try:
        one = label_dp(clip, noise, rounds, delta)
        if one["epsilon"] is not None:
            one["epsilon_all_clients"] = label_dp(clip, noise, rounds, delta,
                                                  parties)["epsilon"]
        return one
    except AccountantMissing as err:
        log.warning("%s", err)
        return {"epsilon": None, "delta": delta, "rounds": int(rounds), "parties": 1,
                "noise_multiplier": noise / 2.0, "accountant": None, "reason": str(err)}


def labels_at_party(method: str) -> dict[str, Any]:
    """The ``label_leakage`` of a method whose parties train on the labels themselves."""
    return {"labels_at_party": True, "max": None,
            "attack": f"none: every party of {method} holds the labels"}


# --------------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def matched_scores(rows: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(..., n, C) per class ``c``: ``max(<r, s - e_c>, 0)² / |s - e_c|²`` with ``s`` the
    softmax of the party's own output (the ``matched`` attack's per-round score)."""
    s = _softmax(own.astype(np.float64))  # (..., n, C)
    dot = (rows * s).sum(axis=-1, keepdims=True) - rows  # <r, s - e_c> (..., n, C)
    sq = (s * s).sum(axis=-1, keepdims=True) - 2 * s + 1.0  # |s - e_c|² (..., n, C)
    return np.maximum(dot, 0.0) ** 2 / np.maximum(sq, 1e-300)


class _Meter:
    """Shared bookkeeping: training ids in sorted order, labels, per-party state arrays."""

    attacks: tuple[str, ...] = ()
    prefix = "leakage"

    def __init__(self, train_ids: np.ndarray, labels: np.ndarray, task: str,
                 n_clients: int) -> None:
        self.task = task
        self.k = n_clients
        self.order = np.argsort(train_ids, kind="stable")
        self.sorted = np.asarray(train_ids, dtype=np.int64)[self.order]
        self.labels = np.asarray(labels)[self.order]
        self.n = self.sorted.size
        self.count = np.zeros((n_clients, self.n), dtype=np.int32)  # signals received
        self.arrays: dict[str, np.ndarray] = {}

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self.sorted, ids)
        if rows.size and (rows.max() >= self.n or not np.array_equal(self.sorted[rows], ids)):
            raise ValueError("label leakage: signals for ids that are not training ids")
        return rows

    def chance(self) -> float:
        """What guessing without the signals achieves: the majority class share (0.5 for the
        residual sign of regression)."""
        if self.task != "classification" or self.labels.size == 0:
            return 0.5
        return float(np.bincount(self.labels.astype(np.int64)).max() / self.labels.size)

    def _right(self, attack: str) -> tuple[np.ndarray, np.ndarray]:
        """(K, n) whether the attack's guess is right, (K, n) whether it is scored."""
        raise NotImplementedError

    def _report(self, describe: str) -> dict[str, Any]:
        table: dict[str, dict[str, Any]] = {}
        for name in self.attacks:
            right, scored = self._right(name)
            per = [float(right[k][scored[k]].mean()) if scored[k].any() else float("nan")
                   for k in range(self.k)]
            finite = [v for v in per if math.isfinite(v)]
            table[name] = {"max": max(finite) if finite else float("nan"), "per_client": per}
        scores = {n: t["max"] for n, t in table.items() if math.isfinite(t["max"])}
        best = max(scores, key=scores.get) if scores else self.attacks[0]
        per_client = [max((t["per_client"][k] for t in table.values()
                           if math.isfinite(t["per_client"][k])), default=float("nan"))
                      for k in range(self.k)]
        return {"attack": f"{describe}: {_DESCRIBE[best]}", "best_attack": best,
                "max": table[best]["max"], "per_client": per_client, "chance": self.chance(),
                "samples": int((self.count > 0).any(axis=0).sum()),
                "rounds_per_sample": int(self.count.max()) if self.count.size else 0,
                "attacks": table}

    # -- checkpoints ----------------------------------------------------------------------------

    def state(self) -> Arrays:
        """The running sums, for the server's checkpoint."""
        return {f"{self.prefix}/count": self.count.copy(),
                **{f"{self.prefix}/{k}": v.copy() for k, v in self.arrays.items()}}

    def load(self, arrays: Arrays) -> None:
        """Continue from :meth:`state` (a checkpoint of another shape or version is ignored:
        the meter then scores only the rounds after the resume)."""
        count = arrays.get(f"{self.prefix}/count")
        if count is None or count.shape != self.count.shape or any(
                arrays.get(f"{self.prefix}/{k}") is None
                or arrays[f"{self.prefix}/{k}"].shape != v.shape for k, v in self.arrays.items()):
            log.warning("the checkpoint holds no label-leakage state of this run's shape: "
                        "leakage counts only the rounds after the resume")
            return
        self.count = count.astype(np.int32)
        for k, v in self.arrays.items():
            self.arrays[k] = arrays[f"{self.prefix}/{k}"].astype(v.dtype)


class LabelLeakage(_Meter):
    """The share of training labels each party recovers from the logit gradients it received,
    by the strongest of the accumulated attacks (see the module docstring).

    Args:
        train_ids: the training ids (sorted or not); labels of other ids are never scored.
        labels: their labels, row-aligned with ``train_ids``.
        task: ``classification`` or ``regression``.
        n_clients: K.
        n_outputs: C (outputs per sample); inferred from the labels' classes when not given.
    """

    def __init__(self, train_ids: np.ndarray, labels: np.ndarray, task: str,
                 n_clients: int, n_outputs: int | None = None) -> None:
        super().__init__(train_ids, labels, task, n_clients)
        if n_outputs is None:
            n_outputs = (int(self.labels.max()) + 1 if task == "classification"
                         and self.labels.size else
                         (int(np.prod(self.labels.shape[1:])) if self.labels.ndim > 1 else 1))
        c, shape = n_outputs, (n_clients, self.n)
        self.c = c
        if task == "classification":
            self.attacks = CLASSIFICATION_ATTACKS
            self.arrays = {"latest": np.full(shape, -1, np.int32),
                           "first": np.full(shape, -1, np.int32),
                           "votes": np.zeros((*shape, c), np.int32),
                           **{name: np.zeros((*shape, c), np.float64)
                              for name in ("sum", "normalized_sum", "early", "matched")}}
        else:
            self.attacks = REGRESSION_ATTACKS
            self.arrays = {"latest": np.zeros((*shape, c), bool),
                           "first": np.zeros((*shape, c), bool),
                           "votes": np.zeros((*shape, c), np.int32),
                           "sum": np.zeros((*shape, c), np.float64),
                           "recent": np.zeros((*shape, c), np.float64),
                           "reference": np.zeros((*shape, c), np.float64)}

    def observe(self, ids: np.ndarray, signals: Sequence[Arrays],
                own_predictions: Sequence[np.ndarray],
                parties: Sequence[int] | None = None) -> None:
        """Update every party's attacks with one round's signals.

        Args:
            ids: the chunk's training ids (n,), unique.
            signals: per party, the arrays it was sent: ``g_pred`` (n, C), the gradient of the
                chunk's *mean* loss (the per-sample rows are these times n).
            own_predictions: per party, the outputs it sent for this chunk (n, C).
            parties: the party of each entry of ``signals`` (all K in order when None): a
                party absent from the round was sent nothing and learns nothing.
        """
        rows = self._rows(ids)
        n = rows.size
        parties = np.arange(len(signals)) if parties is None else np.asarray(parties, np.int64)
        if not len(parties) == len(signals) == len(own_predictions):
            raise ValueError(f"label leakage: {len(parties)} parties, {len(signals)} signals and "
                             f"{len(own_predictions)} predictions in one round")
        if parties.size == 0:
            return
        g = np.stack([np.asarray(s["g_pred"], dtype=np.float64).reshape(n, -1) * n
                      for s in signals])  # (P, n, C)
        own = np.stack([np.asarray(p, dtype=np.float64).reshape(n, -1)
                        for p in own_predictions])
        self._observe(parties, rows, g, own)

    def observe_rows(self, k: int, rows: np.ndarray, g: np.ndarray, own: np.ndarray) -> None:
        """One party's per-sample gradient rows ``g`` (n, C) for meter rows ``rows``."""
        self._observe(np.array([k]), rows, np.asarray(g, np.float64)[None],
                      np.asarray(own, np.float64)[None])

    def _observe(self, parties: np.ndarray, rows: np.ndarray, g: np.ndarray,
                 own: np.ndarray) -> None:
        """Parties ``parties`` (P,), distinct, each sent gradient rows ``g[i]`` (n, C) for the
        distinct meter rows ``rows`` (n,); ``own[i]`` is what party i sent for them. One
        vectorized update for all P parties (a round's parties share its rows)."""
        a = self.arrays
        at = (parties[:, None], rows[None, :])  # (P, n) pairs, all distinct
        first = self.count[at] == 0
        self.count[at] += 1
        if self.task == "classification":
            t = self.count[at].astype(np.float64)[..., None]
            guess = g.argmin(axis=-1).astype(np.int32)  # (P, n)
            a["latest"][at] = guess
            a["first"][at] = np.where(first, guess, a["first"][at])
            a["votes"][(*at, guess)] += 1
            a["sum"][at] += g
            norm = np.linalg.norm(g, axis=-1, keepdims=True)
            a["normalized_sum"][at] += g / np.maximum(norm, 1e-300)
            a["early"][at] += g / t
            a["matched"][at] += matched_scores(g, own)
        else:
            above = g < 0  # the label lies above the output where the loss falls with it
            a["latest"][at] = above
            a["first"][at] = np.where(first[..., None], above, a["first"][at])
            a["votes"][at] += above.astype(np.int32)
            a["sum"][at] += g
            a["recent"][at] = 0.5 * a["recent"][at] + g
            a["reference"][at] = own

    def guesses(self, attack: str) -> np.ndarray:
        """(K, n) class guesses (classification) or (K, n, C) "above" guesses (regression) in
        the meter's sorted id order; meaningless where ``count`` is 0."""
        a = self.arrays
        if self.task == "classification":
            if attack in ("latest", "first"):
                return a[attack]
            if attack == "majority":
                return a["votes"].argmax(axis=2)
            if attack == "matched":
                return a["matched"].argmax(axis=2)
            return a[attack].argmin(axis=2)
        if attack in ("latest", "first"):
            return a[attack]
        if attack == "majority":
            return 2 * a["votes"] > self.count[:, :, None]
        return a[attack] < 0

    def _right(self, attack: str) -> tuple[np.ndarray, np.ndarray]:
        guess = self.guesses(attack)
        if self.task == "classification":
            right = guess == self.labels[None, :]
        else:
            y = self.labels.reshape(1, self.n, -1).astype(np.float64)
            truth = y > self.arrays["reference"]  # above the party's latest own prediction
            right = (guess == truth).mean(axis=2) >= 0.5
        return right, self.count > 0

    def per_client(self, attack: str | None = None) -> list[float]:
        """Per party: the recovered share of the training labels it received signals for, by
        ``attack`` (the strongest against that party when None)."""
        report = self.report()
        return report["per_client"] if attack is None else report["attacks"][attack][
            "per_client"]

    def report(self) -> dict[str, Any]:
        """What ``summary.json`` holds under ``label_leakage``: ``max`` (the headline),
        ``best_attack``, ``attack`` (in words), ``per_client``, ``chance``, ``samples``,
        ``rounds_per_sample`` and ``attacks`` (per attack: ``max``, ``per_client``)."""
        describe = ("argmin over classes of the gradients received" if self.task ==
                    "classification" else "sign of the gradients received vs own prediction")
        return self._report(describe)


class EmbeddingLeakage(_Meter):
    """The direction attack on embedding gradients (classification; see the module docstring).

    Args:
        train_ids: the training ids.
        labels: their classes, row-aligned with ``train_ids``.
        n_clients: K.
        widths: per party, the width of the embedding it sends.
    """

    prefix = "embedding_leakage"

    def __init__(self, train_ids: np.ndarray, labels: np.ndarray, n_clients: int,
                 widths: Sequence[int]) -> None:
        super().__init__(train_ids, labels, "classification", n_clients)
        self.attacks = EMBEDDING_ATTACKS
        self.widths = list(widths)
        h, shape = max(self.widths), (n_clients, self.n)
        self.arrays = {name: np.zeros((*shape, h), np.float64) for name in EMBEDDING_ATTACKS}
        # The party knows one label per class: the first training sample of each class.
        classes = np.unique(self.labels)
        self.known = np.array([int(np.flatnonzero(self.labels == c)[0]) for c in classes])
        self.known_classes = classes

    def observe_rows(self, k: int, rows: np.ndarray, g: np.ndarray) -> None:
        """Party ``k``'s per-sample embedding gradients ``g`` (n, H_k) for meter rows ``rows``."""
        a, h = self.arrays, g.shape[1]
        first = self.count[k, rows] == 0
        self.count[k, rows] += 1
        a["latest"][k, rows, :h] = g
        a["first"][k, rows[first], :h] = g[first]
        a["sum"][k, rows, :h] += g
        norm = np.linalg.norm(g, axis=1, keepdims=True)
        a["normalized_sum"][k, rows, :h] += (g / np.maximum(norm, 1e-300)).astype(np.float64)

    def guesses(self, attack: str) -> np.ndarray:
        """(K, n) each sample's class: that of the known sample of highest cosine similarity."""
        v = self.arrays[attack].astype(np.float64)
        v = v / np.maximum(np.linalg.norm(v, axis=2, keepdims=True), 1e-300)
        ref = v[:, self.known]  # (K, C, H)
        cos = np.einsum("knh,kch->knc", v, ref)
        return self.known_classes[cos.argmax(axis=2)]

    def _right(self, attack: str) -> tuple[np.ndarray, np.ndarray]:
        scored = self.count > 0
        scored[:, self.known] = False  # the attacker's own known labels are not recovered
        return self.guesses(attack) == self.labels[None, :], scored

    def report(self) -> dict[str, Any]:
        """As :meth:`LabelLeakage.report`, plus ``known_labels`` (how many the attack assumed)."""
        out = self._report("cosine direction attack, one known label per class (Li et al. "
                           "2022)")
        out["known_labels"] = int(self.known.size)
        return out


def strongest(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The report of the strongest of several meters on one run (e.g. the logit and the
    embedding channel of ``moe``), with every meter's report under ``channels``."""
    finite = [r for r in reports if r.get("max") is not None and math.isfinite(r["max"])]
    if not finite:
        return {**reports[0], "channels": list(reports)} if reports else {}
    best = max(finite, key=lambda r: r["max"])
    if len(reports) == 1:
        return best
    return {**best, "channels": list(reports)}
