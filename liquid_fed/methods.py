"""Every method of a study, trained centrally on the same data, splits, views and batches.

``run_method(name, cfg, data)`` trains one method of :data:`METHODS` on a
:class:`~liquid_fed.centralized.CentralData` and returns a :class:`MethodResult`;
``run_methods`` trains several and shares what they have in common (the experts trained alone
serve ``averaged``, ``local`` and ``oracle``). Every method uses the run's optimiser
(``cfg.optim``), epochs, batch size and batch order (:func:`liquid_fed.train.fit`, hence
:func:`~liquid_fed.train.batch_order` with ``cfg.seed``), and every party's network is the
run's expert (``cfg.experts``, per client), built by
:func:`~liquid_fed.federation.setup.build_client_expert` from the same seed. Differences between
methods come from the method, not from initialisation or data order.

Dimension letters: ``B`` batch, ``K`` parties, ``C`` outputs, ``H`` a party's trunk width (the
input of its expert's prediction head: the hidden width of an ``mlp``, the channels of a
``cnn``, the units of ``esn``/``ltc``; the flattened view for an ``mlp`` without hidden layers).

Methods:

``liquid``
    The Liquid Ensemble (:func:`~liquid_fed.centralized.build_ensemble`), with the run's
    solver. Test outputs per sample: power (n, K), delegation (n, K, K), error (n,).
``uniform``
    The same experts trained jointly, every vote kept (``solver=uniform``, majority vote).
``averaged``
    Each expert trained alone on its own view and the labels, then combined with equal weights
    and pooled as ``ensemble.mix`` says (:func:`~liquid_fed.ensemble.pool`): class
    probabilities averaged (``probs``), logits averaged (``logits``) or summed (``sum``);
    outputs averaged for regression.
``local``
    Each party alone: ``per_party`` holds every expert's validation and test metrics on the
    samples its view holds; the headline metrics are those of the best party on validation.
``splitnn``
    Vertical split learning: each party's bottom model is its expert's trunk (everything
    before the prediction head) and sends its embedding (B, H); the server concatenates the K
    embeddings into a top MLP (``MethodOptions.top_hidden``) -> (B, C). Trained end to end.
``plugvfl``
    Split learning with party-wise dropout (PlugVFL, arXiv 2303.18178): ``splitnn``'s model,
    trained with each party's embedding of each sample zeroed with probability
    ``MethodOptions.party_dropout`` (default 0.3; at least one party kept per sample, drawn
    by :func:`~liquid_fed.availability.drop_keeping_one` from a stream of the run's seed),
    so the top model learns to predict from any subset; no rescaling of the kept
    embeddings. At test an absent party's embedding is zeros. Departures from the paper: the
    drop is per sample (the paper drops a party for a whole batch) and no party is exempt
    (the paper never drops the active party; here the labels sit at the server, which holds
    no features).
``laser``
    LASER-VFL (Valdeira et al., ICLR 2025; read from ``Valdeira/LASER-VFL``,
    ``models/model_utils.py`` and ``methods/laser.py``, and written anew): each party's
    bottom model is its expert's trunk, and each party has a linear predictor (B, H) -> (B,
    C) that reads the *mean* of the embeddings of a subset of parties that holds it (their
    ``FusionModel`` with ``aggregation="mean"``). Training: per sample, for every present
    party i and size s, one subset of the present parties with i in it and s members is
    drawn, its loss weighted ``C(n-1, s-1)/s`` (n present), the terms summed (their
    ``train_laser``). Prediction over the parties present: every present party's predictor
    on the mean of the present embeddings, class probabilities averaged (outputs averaged
    for regression). Departures: their observed set is one per batch, here per sample (the
    study's test masks are per sample); they report the mean accuracy of the present
    predictors, here their probabilities are averaged into one prediction; the predictors
    are linear on the experts' trunks (their FusionModel is linear on ResNet/MLP
    features). Needs one embedding width for all parties.
``aggvfl``
    Aggregate VFL: each party's expert outputs C logits (outputs); the server sums them.
``moe``
    A mixture of the parties' experts: a server-side gate (an MLP with
    ``MethodOptions.gate_hidden``, softmax over K) reads the concatenated trunk embeddings and
    weighs the parties' own heads (each expert's prediction head on its own embedding). The
    output mixes class probabilities (classification) or outputs (regression).
    ``party_weight`` is the mean gate per party, the counterpart of LE's power share.
``central``
    One model on all features concatenated (the upper bound): the run's expert kind when it
    can read the concatenation (``mlp``; ``esn``/``ltc`` on sequences of one length, channels
    concatenated), else an ``mlp`` with the default width ``[128]``.
``oracle``
    Where the data has ground truth of the informative view (``synthetic_regions`` with
    ``views.kind: groups`` and no ``views.options``): every sample is predicted by the
    informative party's expert trained alone (the experts of ``local``), pooled as
    ``ensemble.mix`` says (power K on that party: ``sum`` sharpens its logits K-fold).

Pooling and smoothing: ``liquid``, ``uniform``, ``averaged`` and ``oracle`` pool with the run's
``ensemble.mix``, through the same :func:`~liquid_fed.ensemble.pool` as the federated server.
The power smoothing ``ensemble.smoothing`` acts on learned powers: ``liquid`` applies it
(``auto`` picks it on validation, :func:`~liquid_fed.train.predict_splits`); the uniform vote
is unchanged by it, and ``averaged`` and ``oracle`` (fixed weights) ignore it. ``moe`` mixes
probabilities with its trained gate whatever ``mix`` says.

Presence masks (``views.missing``): a party that lacks a sample contributes nothing to it.
``liquid``/``uniform``: absent experts pass their vote on and get no power
(:func:`~liquid_fed.ensemble.combine`). ``averaged``, ``moe``: the weights are spread over
the present parties only (the gate's softmax runs over present parties). ``aggvfl``: absent
parties add nothing to the sum. ``splitnn``: an absent party's embedding is zeros. ``central``:
the absent view's features are 0, its training mean after standardisation (mean imputation).
``local`` and the experts of ``averaged``/``oracle`` train (batches of
:func:`~liquid_fed.train.batch_order` over those rows) and score only on the samples their view
holds; ``oracle`` falls back to the average of the present experts where the informative view
is absent. No party ever receives a gradient from a sample it lacks.

Absent parties in training (``availability``, a study's ``train_missing``): the methods that
train jointly (``liquid``, ``uniform``, ``splitnn``, ``plugvfl``, ``laser``, ``aggvfl``,
``moe``) lose, in every mini-batch, the parties absent from the round whose chunk holds it
(:func:`~liquid_fed.availability.round_presence`, the Liquid Ensemble's own draws: the same
parties in the same batches for every method of a seed). An absent party is not asked: its
network and its optimizer state are untouched that step; the others combine as under
``views.missing`` above. ``averaged``, ``local`` and ``oracle`` train each party alone on
its own view and the labels, with no round to miss: absences do not reach them; nor do they
reach ``central`` (one model, no parties). Under absences ``uniform`` reports no label
leakage (its steps with absent parties bypass the ensemble's forward that the eavesdropper
follows).

Absent parties at test (``MethodContext.test_missing``, ``MethodResult.test_missing``): every
method is scored on the same masks of :func:`liquid_fed.robustness.missing_mask` (each test
sample loses each party with the rate's probability, one kept) and of each party absent
alone: ``liquid``/``uniform`` re-solve the powers over the present experts (the run's
smoothing ``λ``), ``averaged``/``oracle`` weigh the present parties, ``aggvfl`` sums them,
``moe`` gates over them, ``splitnn``/``plugvfl`` zero-fill the absent embeddings, ``laser``
averages its present parties' predictors, ``local`` predicts with the best party (on
validation) where it is present and else with the best present party, and ``central`` reads
an absent view as zeros (its standardised training mean).

Label leakage (``MethodResult.label_leakage``, see :mod:`liquid_fed.privacy`): the methods
that send their parties gradients are attacked on exactly what each party receives during
training (recorded by hooks on the tensors the party sends): ``uniform`` and ``aggvfl`` (the
gradient w.r.t. each party's outputs: the argmin family), ``splitnn`` (w.r.t. each party's
embedding: the direction attack with one known label per class), ``moe`` (both: its heads'
outputs and the embeddings its gate reads; the stronger is reported). ``averaged``, ``local``
and ``oracle`` train every party on the labels: :func:`~liquid_fed.privacy.labels_at_party`.
``central`` has no parties: None. The baselines have no defence (``privacy`` applies to the
Liquid Ensemble's protocol only).

``train_seconds`` is the wall time of training; ``averaged``, ``local`` and ``oracle`` report
the time to train all K experts alone (shared by ``run_methods``, so count it once).

Metrics of every method and split: ``accuracy`` and ``nll`` (classification) or ``rmse`` and
``mse`` (regression), and ``loss`` (the method's training objective). Methods with an
ensemble-shaped output (``liquid``, ``uniform``, ``averaged``, ``moe``, ``oracle``) add what
:func:`~liquid_fed.metrics.evaluate_output` gives (Kendall τ of each confidence, power and
speaker entropy, mean power per party); ``moe`` counts its gate as the power share
(power = K · gate, every party's delegation row = the gate).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liquid_fed.availability import drop_keeping_one, round_mask, stream_rng
from liquid_fed.centralized import CentralData, _answering, build_ensemble
from liquid_fed.config import RunConfig
from liquid_fed.ensemble import EnsembleOutput, LiquidEnsemble, pool, task_loss
from liquid_fed.errors import ConfigError
from liquid_fed.experts import Expert, build_expert
from liquid_fed.federation.setup import build_client_expert
from liquid_fed.metrics import TASK_METRICS, confidences, evaluate_output, primary_score
from liquid_fed.privacy import EmbeddingLeakage, LabelLeakage, labels_at_party, strongest
from liquid_fed.robustness import (
    absent_key,
    absent_mask,
    check_missing_rate,
    missing_mask,
    rate_key,
    score,
)
from liquid_fed.train import DTYPES, batch_order, fit, predict_splits

log = logging.getLogger(__name__)

EVAL_BATCH = 1024
#: Options of :class:`MethodOptions` that are probabilities, not lists of widths.
_RATE_OPTIONS = ("party_dropout",)
# Random streams of the run's seed (liquid_fed.availability.stream_rng), apart from the
# rounds' absences and the test masks: plugvfl's party-wise dropout, laser's subset draws.
_PLUG_STREAM = 0x9106
_LASER_STREAM = 0x1A5E4


# --------------------------------------------------------------------------------------------
# Options, results and the shared context
# --------------------------------------------------------------------------------------------


@dataclass
class MethodOptions:
    """Settings of the server-side models of the baselines (widths of hidden layers)."""

    top_hidden: list[int] = field(default_factory=lambda: [64])  # splitnn's/plugvfl's top MLP
    gate_hidden: list[int] = field(default_factory=list)  # moe's gate; [] = linear gate
    # plugvfl: each party's embedding is zeroed with this probability in training (PlugVFL's
    # p_drop, which the paper takes in (0, 0.5))
    party_dropout: float = 0.3

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "method_options"
                  ) -> MethodOptions:
        """Options from a plain mapping; unknown keys and bad widths name their dotted key.

        Raises:
            ConfigError: an unknown key or a width that is not a positive integer.
        """
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(f'unknown key "{where}.{unknown[0]}" (accepted: '
                              f"{', '.join(names)})")
        for key, value in data.items():
            if key in _RATE_OPTIONS:
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                      and 0.0 <= value < 1.0)
                if not ok:
                    raise ConfigError(f"{where}.{key}: got {value!r}; expected a probability "
                                      "in [0, 1)")
                data[key] = float(value)
                continue
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in value):
                raise ConfigError(f"{where}.{key}: got {value!r}; expected a list of positive "
                                  "integers (hidden widths)")
            data[key] = [int(h) for h in value]
        return cls(**data)


@dataclass
class MethodResult:
    """What one method gives on one run config.

    ``val``/``test``: metric dicts (see the module docstring). ``per_party``: for ``local``,
    one dict per party with its ``val`` and ``test`` metrics and ``present`` (share of test
    samples its view holds). ``party_weight``: mean share of the say per party (power / K for
    the ensembles, the gate for ``moe``), summing to 1. ``arrays``: per-sample test arrays for
    figures (``ids`` (n,), ``error`` (n,), ``output`` (n, C), and where the method has them
    ``power`` (n, K), ``delegation`` (n, K, K), ``gate`` (n, K), ``conf_<measure>`` (n,)).
    ``model``: the trained module (not serialised). ``label_leakage``: what the parties
    recover of the training labels from the gradients they receive (see the module docstring).
    ``test_missing``: the test metrics with parties missing at test, per missing rate
    (:func:`liquid_fed.robustness.rate_key` of the rate -> metrics; the rates of
    ``MethodContext.test_missing`` above 0, each scored on the masks of
    :func:`liquid_fed.robustness.missing_mask`, the same for every method of a seed) and
    with each party absent alone (:func:`~liquid_fed.robustness.absent_key`).
    """

    method: str
    val: dict[str, float]
    test: dict[str, float]
    train_seconds: float
    epoch_losses: list[float] = field(default_factory=list)
    per_party: list[dict[str, Any]] | None = None
    party_weight: list[float] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    label_leakage: dict[str, Any] | None = None
    test_missing: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able part: everything but the arrays and the model."""
        out = {"method": self.method, "val": self.val, "test": self.test,
               "train_seconds": self.train_seconds, "epoch_losses": self.epoch_losses,
               "per_party": self.per_party, "party_weight": self.party_weight,
               "label_leakage": self.label_leakage}
        if self.test_missing:
            out["test_missing"] = self.test_missing
        return out


@dataclass
class _Solos:
    experts: list[Expert]
    seconds: float
    losses: list[list[float]]


class MethodContext:
    """Options and what several methods of one (config, data) pair share (experts trained
    alone), so that ``averaged``, ``local`` and ``oracle`` train them once."""

    def __init__(self, cfg: RunConfig, data: CentralData,
                 options: MethodOptions | None = None,
                 test_missing: Sequence[float] = ()) -> None:
        self.cfg = cfg
        self.data = data
        self.options = options or MethodOptions()
        self.test_missing = tuple(check_missing_rate(p) for p in test_missing)
        self._solos: _Solos | None = None
        self._shared: MethodContext | None = None

    def missing_masks(self) -> dict[str, Tensor]:
        """The test presence masks (n, K) of ``test_missing``: per missing rate above 0
        (:func:`liquid_fed.robustness.missing_mask`: drawn from the run's seed, on top of the
        data's own absences; every method of a seed gets the same masks, and so does the
        Liquid Ensemble's ``robustness``), and with each party absent alone (``absent <k>``,
        :func:`~liquid_fed.robustness.absent_mask`). Empty without ``test_missing``."""
        if not self.test_missing:
            return {}
        target = self.data.targets["test"]
        n, k = int(target.shape[0]), self.cfg.n_clients
        base = self.data.present["test"]
        masks = {rate_key(p): missing_mask(n, k, p, self.cfg.seed, base)
                 for p in self.test_missing if p > 0}
        if k > 1:
            masks.update({absent_key(j): absent_mask(n, k, [j], base) for j in range(k)})
        return masks

    def solos(self) -> _Solos:
        if self._solos is None:
            self._solos = (self._shared.solos() if self._shared is not None
                           else _train_solos(self.cfg, self.data))
        return self._solos

    def for_config(self, cfg: RunConfig) -> MethodContext:
        """A context for ``cfg`` that shares this one's experts trained alone (a study's
        pooling variants: ``averaged/probs`` and ``averaged/logits`` pool the same experts).

        Raises:
            ValueError: ``cfg`` differs from this context's in more than its ``ensemble``
                section (how outputs pool), which the experts trained alone never read.
        """
        if cfg is self.cfg:
            return self
        if dataclasses.replace(cfg, ensemble=self.cfg.ensemble) != self.cfg:
            raise ValueError("MethodContext.for_config: the config differs in more than its "
                             "ensemble section; the experts trained alone cannot be shared")
        other = MethodContext(cfg, self.data, self.options, self.test_missing)
        other._shared = self
        return other


MethodFn = Callable[[MethodContext], MethodResult]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class JointOutput(NamedTuple):
    """What a jointly trained baseline returns for a batch."""

    output: Tensor  # (B, C) log-probabilities (classification) or predictions
    predictions: Tensor | None = None  # (B, K, C) each party's head, where there is one
    gate: Tensor | None = None  # (B, K) weights over parties, where there are some
    present: Tensor | None = None  # (B, K)
    # laser in training: the sampled subset predictors' outputs (B, M, C) and the weights of
    # their losses (B, M) in the training objective
    subset_outputs: Tensor | None = None
    subset_weights: Tensor | None = None


class PartyNet(nn.Module):
    """One party's expert read as a bottom model: ``(trunk embedding (B, H), head (B, C))``.

    The embedding is the input of the expert's prediction head ``expert.head`` (every kind of
    :data:`~liquid_fed.experts.EXPERTS` has one), taken with a forward pre-hook so that the
    expert runs exactly as it does in the Liquid Ensemble. The delegation head is computed
    and ignored: it gets no gradient, so the optimisers leave it untouched.
    """

    def __init__(self, expert: Expert) -> None:
        super().__init__()
        if not isinstance(getattr(expert, "head", None), nn.Module):
            raise ValueError(f"{type(expert).__name__} has no prediction head `head`; a "
                             "bottom model needs one")
        self.expert = expert

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        seen: list[Tensor] = []
        handle = self.expert.head.register_forward_pre_hook(
            lambda _module, args: seen.append(args[0]))
        try:
            pred, _ = self.expert(x)
        finally:
            handle.remove()
        return seen[0], pred


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths (input first) with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _final(logits: Tensor, task: str) -> Tensor:
    return torch.log_softmax(logits, dim=-1) if task == "classification" else logits


def _mask(x: Tensor, present: Tensor | None, k: int) -> Tensor:
    """Party k's tensor with the rows it lacks set to zero (no value, no gradient)."""
    if present is None:
        return x
    keep = present[:, k].reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def mixture(predictions: Tensor, log_weight: Tensor, task: str) -> Tensor:
    """Weighted mixture of the parties' outputs: ``log Σ_k w_k softmax(y_k)`` (classification)
    or ``Σ_k w_k y_k``; ``log_weight`` (B, K) may hold ``-inf`` for parties that weigh 0."""
    if task == "classification":
        return torch.logsumexp(log_weight.unsqueeze(-1) + torch.log_softmax(predictions, -1), 1)
    weight = log_weight.exp().unsqueeze(-1)  # (B, K, 1)
    return (weight * predictions).sum(1)


class _Joint(nn.Module):
    """Base of the jointly trained baselines: K party networks, a task, the loss."""

    def __init__(self, parties: Sequence[nn.Module], task: str) -> None:
        super().__init__()
        self.parties = nn.ModuleList(parties)
        self.task = task

    @property
    def n_parties(self) -> int:
        return len(self.parties)

    def _run(self, inputs: Sequence[Tensor], present: Tensor | None
             ) -> tuple[list[Tensor], list[Tensor]]:
        if len(inputs) != self.n_parties:
            raise ValueError(f"expected {self.n_parties} inputs (one per party), "
                             f"got {len(inputs)}")
        embeds, preds = [], []
        for k, (party, x) in enumerate(zip(self.parties, inputs, strict=True)):
            if present is not None and not bool(present[:, k].any()):
                # A party absent from the whole batch (a round it missed) is not asked: its
                # network gets no gradient, so the optimizer leaves it and its state as they
                # were, as the Liquid Ensemble's absent experts. Run for the shapes only.
                with torch.no_grad():
                    h, y = party(x)
                h, y = torch.zeros_like(h), torch.zeros_like(y)
            else:
                h, y = party(x)
            embeds.append(_mask(h, present, k))
            preds.append(_mask(y, present, k))
        return embeds, preds

    def loss(self, out: JointOutput, target: Tensor) -> Tensor:
        """The task loss of the output (NLL of log-probabilities, or mean squared error); for
        laser in training, its subset predictors' weighted losses (summed per sample,
        averaged over the batch)."""
        if out.subset_outputs is not None and out.subset_weights is not None:
            per = _per_sample_loss(out.subset_outputs, target, self.task)  # (B, M)
            return (per * out.subset_weights).sum(-1).mean()
        return task_loss(out.output, target, self.task)


class AggVFL(_Joint):
    """Aggregate VFL: the server sums the parties' outputs, ``Σ_k y_k`` (logits or values)."""

    def forward(self, inputs: Sequence[Tensor], present: Tensor | None = None) -> JointOutput:
        _, preds = self._run(inputs, present)
        stacked = torch.stack(preds, 1)  # (B, K, C)
        return JointOutput(_final(stacked.sum(1), self.task), stacked, None, present)


class SplitNN(_Joint):
    """Split learning: concatenated party embeddings (B, K·H) -> top model -> (B, C)."""

    def __init__(self, parties: Sequence[nn.Module], top: nn.Module, task: str) -> None:
        super().__init__(parties, task)
        self.top = top

    def forward(self, inputs: Sequence[Tensor], present: Tensor | None = None) -> JointOutput:
        embeds, _ = self._run(inputs, present)
        return JointOutput(_final(self.top(torch.cat(embeds, -1)), self.task), None, None,
                           present)


class PlugVFL(SplitNN):
    """Split learning with party-wise dropout (PlugVFL, arXiv 2303.18178): in training, each
    party's embedding of each sample is zeroed with probability ``party_dropout`` (at least
    one party kept per sample), so that the top model learns to predict from any subset;
    at test an absent party's embedding is zeros, as in :class:`SplitNN`.

    The draws of training step ``t`` come from :func:`liquid_fed.availability.stream_rng`
    ``(seed, plug stream, t)`` through :func:`~liquid_fed.availability.drop_keeping_one`,
    on top of the batch's own presence (absent stays absent)."""

    def __init__(self, parties: Sequence[nn.Module], top: nn.Module, task: str,
                 party_dropout: float, seed: int) -> None:
        super().__init__(parties, top, task)
        self.party_dropout = float(party_dropout)
        self.seed = int(seed)
        self.steps = 0  # training forwards so far: the key of the next step's draws

    def party_mask(self, n: int, present: Tensor | None) -> Tensor:
        """(B, K) the presence of the next training step: ``present`` (or all) with each
        entry dropped with probability ``party_dropout``, one party kept per sample."""
        k = self.n_parties
        held = (np.ones((n, k), dtype=bool) if present is None
                else present.to(torch.bool).cpu().numpy())
        keep = drop_keeping_one(stream_rng(self.seed, _PLUG_STREAM, self.steps), held,
                                self.party_dropout) & held  # a row holding none stays so
        self.steps += 1
        return torch.from_numpy(keep)

    def forward(self, inputs: Sequence[Tensor], present: Tensor | None = None) -> JointOutput:
        if self.training and torch.is_grad_enabled() and self.party_dropout > 0:
            present = self.party_mask(inputs[0].shape[0], present)
        return super().forward(inputs, present)


class Laser(_Joint):
    """LASER-VFL (Valdeira et al., ICLR 2025): one predictor per party that reads the mean of
    the embeddings of any subset of parties holding it (B, H) -> (B, C).

    Prediction over the parties present ``P`` of a sample: every present party's predictor on
    the mean of the present embeddings, their class probabilities averaged (outputs averaged
    for regression). Training (per sample, parties present ``P``, ``n = |P|``): for every
    present party ``i`` and every size ``s`` in ``1..n``, one subset ``S`` of ``P`` with
    ``i`` in it and ``|S| = s`` is drawn uniformly; its loss enters with weight
    ``C(n - 1, s - 1) / s``, so the objective is an unbiased estimate of the sum over all
    subsets ``S`` of ``P`` of the mean loss of the predictors of ``S`` (as LASER-VFL's
    ``train_laser`` weighs its draws). The draws of training step ``t`` come from
    :func:`liquid_fed.availability.stream_rng` ``(seed, laser stream, t)``.
    """

    def __init__(self, parties: Sequence[nn.Module], heads: Sequence[nn.Module], task: str,
                 seed: int) -> None:
        super().__init__(parties, task)
        if len(heads) != len(parties):
            raise ValueError(f"laser: one head per party; got {len(heads)} heads for "
                             f"{len(parties)} parties")
        self.heads = nn.ModuleList(heads)
        self.seed = int(seed)
        self.steps = 0  # training forwards so far: the key of the next step's draws

    def predict_subsets(self, embeds: Tensor, subsets: Tensor) -> Tensor:
        """(B, K, C): party ``i``'s predictor on the mean embedding of ``subsets[:, i]``.

        Args:
            embeds: (B, K, H) the parties' embeddings.
            subsets: (B, K, K) bool, ``subsets[b, i, j]``: party j is in the subset that
                party i's predictor reads for sample b (rows with no party give zeros in).
        """
        w = subsets.to(embeds.dtype)  # (B, K, K)
        fused = torch.einsum("bij,bjh->bih", w, embeds) / w.sum(-1, keepdim=True).clamp(min=1)
        return torch.stack([head(fused[:, i]) for i, head in enumerate(self.heads)], 1)

    def forward(self, inputs: Sequence[Tensor], present: Tensor | None = None) -> JointOutput:
        embeds, _ = self._run(inputs, present)
        h = torch.stack(embeds, 1)  # (B, K, H)
        n, k = h.shape[:2]
        mask = (torch.ones(n, k, dtype=torch.bool, device=h.device) if present is None
                else present.to(torch.bool))
        preds = self.predict_subsets(h, mask.unsqueeze(1).expand(n, k, k))  # (B, K, C)
        weight = mask.to(h.dtype) / mask.sum(-1, keepdim=True).clamp(min=1).to(h.dtype)
        log_weight = torch.where(mask, weight.log(), torch.full_like(weight, -math.inf))
        out = mixture(preds, log_weight, self.task)
        if not (self.training and torch.is_grad_enabled()):
            return JointOutput(out, preds, weight, present)
        outputs, weights = self._subset_terms(h, mask)
        return JointOutput(out, preds, weight, present, outputs, weights)

    def _subset_terms(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The training draws: (B, K·K, C) the predictors' outputs on the drawn subsets (party
        i, size s at column ``i·K + s - 1``) and (B, K·K) their weights (0 where party i is
        absent or fewer than s parties are present)."""
        n, k = mask.shape
        rng = stream_rng(self.seed, _LASER_STREAM, self.steps)
        self.steps += 1
        held = mask.cpu().numpy()
        count = mask.sum(-1)  # (B,)
        comb = torch.tensor([[math.comb(a, b) for b in range(k)] for a in range(k)],
                            dtype=h.dtype, device=h.device)  # C(a, b)
        outputs, weights = [], []
        for size in range(1, k + 1):
            subsets = np.zeros((n, k, k), dtype=bool)
            for i in range(k):
                u = rng.random((n, k))  # drawn whatever the mask: a fixed stream
                u[~held] = np.inf
                u[:, i] = -1.0  # party i is always in its own subset
                rank = u.argsort(1).argsort(1)
                subsets[:, i] = (rank < size) & held
            outputs.append(self.predict_subsets(h, torch.from_numpy(subsets).to(h.device)))
            valid = mask & (count >= size).unsqueeze(-1)  # (B, K)
            w = comb[(count - 1).clamp(min=0), size - 1] / size  # (B,)
            weights.append(torch.where(valid, w.unsqueeze(-1), torch.zeros_like(w)[:, None]))
        # (B, K, sizes, C) -> party-major columns i·K + s - 1
        outs = torch.stack(outputs, 2).reshape(n, k * k, -1)
        return outs, torch.stack(weights, 2).reshape(n, k * k)


class MixtureOfParties(_Joint):
    """Mixture of experts over parties: a server gate on the concatenated embeddings weighs
    each party's own head; absent parties get weight 0."""

    def __init__(self, parties: Sequence[nn.Module], gate: nn.Module, task: str) -> None:
        super().__init__(parties, task)
        self.gate = gate

    def forward(self, inputs: Sequence[Tensor], present: Tensor | None = None) -> JointOutput:
        embeds, preds = self._run(inputs, present)
        logits = self.gate(torch.cat(embeds, -1))  # (B, K)
        if present is not None:
            logits = torch.where(present, logits, torch.full_like(logits, -math.inf))
        log_gate = torch.log_softmax(logits, -1)  # (B, K)
        stacked = torch.stack(preds, 1)  # (B, K, C)
        return JointOutput(mixture(stacked, log_gate, self.task), stacked, log_gate.exp(),
                           present)


def _per_sample_loss(output: Tensor, target: Tensor, task: str) -> Tensor:
    """(B, M) the loss of M raw outputs (B, M, C) per sample: cross-entropy of logits, or the
    squared error averaged over outputs."""
    b, m = output.shape[:2]
    if task == "classification":
        flat = F.cross_entropy(output.reshape(b * m, -1),
                               target.repeat_interleave(m), reduction="none")
        return flat.reshape(b, m)
    y = target.reshape(b, 1, -1).to(output.dtype)
    return ((output - y) ** 2).mean(-1)


def _seeded(cfg: RunConfig, index: int, build: Callable[[], nn.Module]) -> nn.Module:
    """A module built from the seed ``build_client_expert`` would use for client ``index``:
    server-side modules take index K (the first after the clients)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 100_003 + index)
        module = build()
    return module.to(DTYPES[cfg.train.dtype])


def _parties(cfg: RunConfig, data: CentralData) -> list[PartyNet]:
    return [PartyNet(build_client_expert(cfg, k, data.views[k].in_shape, data.server.n_outputs))
            for k in range(cfg.n_clients)]


def _embed_width(party: PartyNet, x: Tensor) -> int:
    with torch.no_grad():
        h, _ = party(x[:1])
    return int(h.shape[-1])


#: The jointly trained baselines :func:`build_joint` builds.
JOINT = ("aggvfl", "splitnn", "plugvfl", "laser", "moe", "central")


def build_joint(name: str, cfg: RunConfig, data: CentralData,
                options: MethodOptions | None = None) -> _Joint:
    """The untrained model of a jointly trained baseline (one of :data:`JOINT`), built
    exactly as :func:`run_method` builds it.

    Raises:
        ValueError: for a name that is not one of :data:`JOINT`.
        ConfigError: ``laser`` with parties of different embedding widths.
    """
    options = options or MethodOptions()
    task, c, k = data.server.task, data.server.n_outputs, cfg.n_clients
    if name == "central":
        return _central_model(cfg, data)
    if name not in JOINT:
        raise ValueError(f'build_joint: name must be one of {", ".join(JOINT)}, got "{name}"')
    parties = _parties(cfg, data)
    if name == "aggvfl":
        return AggVFL(parties, task)
    widths = [_embed_width(p, x) for p, x in zip(parties, data.inputs["train"], strict=True)]
    width = sum(widths)
    if name in ("splitnn", "plugvfl"):
        top = _seeded(cfg, k, lambda: mlp([width, *options.top_hidden, c]))
        if name == "plugvfl":
            return PlugVFL(parties, top, task, options.party_dropout, cfg.seed)
        return SplitNN(parties, top, task)
    if name == "laser":
        if len(set(widths)) != 1:
            raise ConfigError(f"method laser averages the parties' embeddings, which needs one "
                              f"width; the experts' embedding widths are {widths} (set one "
                              "hidden width in experts.options / experts.per_client)")
        # one linear predictor per party (LASER-VFL's FusionModel), seeded after the server's
        heads = [_seeded(cfg, k + 1 + i, lambda: nn.Linear(widths[0], c)) for i in range(k)]
        return Laser(parties, heads, task, cfg.seed)
    gate = _seeded(cfg, k, lambda: mlp([width, *options.gate_hidden, k]))
    return MixtureOfParties(parties, gate, task)


def _central_spec(cfg: RunConfig, data: CentralData) -> tuple[str, dict[str, Any], bool]:
    """(kind, options, concatenate channels) of the central model."""
    spec = cfg.experts.per_client[0] if cfg.experts.per_client else {}
    kind = spec.get("kind", cfg.experts.kind)
    options = {**(cfg.experts.options if "kind" not in spec else {}), **spec.get("options", {})}
    shapes = [v.in_shape for v in data.views]
    if kind in ("esn", "ltc") and all(len(s) == 2 and s[0] == shapes[0][0] for s in shapes):
        return kind, options, True
    if kind == "mlp":
        return kind, options, False
    return "mlp", {"hidden": [128]}, False


def _central_inputs(cfg: RunConfig, data: CentralData, split: str,
                    absent: Tensor | None = None) -> list[Tensor]:
    """The central model's input; ``absent``: a presence (n, K) whose absent views read as
    zeros."""
    xs = data.inputs[split]
    if absent is not None:
        xs = [_mask(x, absent, k) for k, x in enumerate(xs)]
    if _central_spec(cfg, data)[2]:
        return [torch.cat(xs, -1)]  # (n, T, Σ D_k)
    return [torch.cat([x.reshape(x.shape[0], -1) for x in xs], 1)]  # (n, Σ F_k)


def _central_model(cfg: RunConfig, data: CentralData) -> AggVFL:
    kind, options, _ = _central_spec(cfg, data)
    shape = tuple(_central_inputs(cfg, data, "train")[0].shape[1:])
    expert = _seeded(cfg, cfg.n_clients, lambda: build_expert(
        kind, shape, data.server.n_outputs, 1, 0, **options))
    return AggVFL([PartyNet(expert)], data.server.task)


# --------------------------------------------------------------------------------------------
# What the parties receive
# --------------------------------------------------------------------------------------------


class Eavesdropper:
    """Records what every party of a jointly trained method receives during training and runs
    the attacks of :mod:`liquid_fed.privacy` on it.

    Hooks on the tensors each party sends (its outputs; the embeddings the server's top model
    or gate reads) see the gradient that would travel back to it. :func:`liquid_fed.train.fit`
    runs one forward per batch of :func:`~liquid_fed.train.batch_order`, epoch after epoch;
    the eavesdropper walks the same order to know which training rows each batch holds, and
    checks that every batch has the size it expects.

    Args:
        name: the method (``uniform``, ``aggvfl``, ``splitnn`` or ``moe``).
        model: its untrained model.
        cfg: the run config (epochs, batch size, seed).
        data: the run's data.
    """

    def __init__(self, name: str, model: nn.Module, cfg: RunConfig, data: CentralData) -> None:
        task, k = data.server.task, cfg.n_clients
        target = data.targets["train"]
        n = target.shape[0]
        ids, labels = np.arange(n), target.numpy()
        self.name = name
        self.present = data.present["train"]
        self.batches = (rows for epoch in range(cfg.train.epochs)
                        for rows in batch_order(n, cfg.train.batch_size, epoch, cfg.seed))
        self.rows: np.ndarray | None = None
        self.logits = (LabelLeakage(ids, labels, task, k, data.server.n_outputs)
                       if name in ("uniform", "aggvfl", "moe") else None)
        self.embedding: EmbeddingLeakage | None = None
        self.widths: list[int] = []
        self.handles = [model.register_forward_pre_hook(self._batch),
                        model.register_forward_hook(self._outputs)]
        server_side = {"splitnn": "top", "plugvfl": "top", "moe": "gate"}.get(name)
        if server_side is not None and task == "classification":
            self.widths = [_embed_width(p, x) for p, x in
                           zip(model.parties, data.inputs["train"], strict=True)]
            self.embedding = EmbeddingLeakage(ids, labels, k, self.widths)
            self.handles.append(getattr(model, server_side).register_forward_pre_hook(
                self._embeddings))

    def _recording(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.rows is not None

    def _batch(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            self.rows = None
            return
        rows = next(self.batches, None)
        b = args[0][0].shape[0]
        if rows is None or rows.size != b:
            raise RuntimeError(f"{self.name}: a training batch of {b} rows does not follow "
                               "the batch order of liquid_fed.train.fit")
        self.rows = rows

    def _held(self, k: int, rows: np.ndarray) -> np.ndarray:
        """Positions in the batch of the rows party k holds (it gets no signal for others)."""
        if self.present is None:
            return np.arange(rows.size)
        return np.flatnonzero(self.present[torch.as_tensor(rows), k].numpy())

    def _outputs(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        preds = out.predictions
        if self.logits is None or not self._recording(module) or preds is None \
                or not preds.requires_grad:
            return
        rows, own = self.rows, preds.detach().cpu().double().numpy()  # (B, K, C)

        def received(grad: Tensor) -> None:
            g = grad.detach().cpu().double().numpy() * rows.size  # per-sample (B, K, C)
            for k in range(g.shape[1]):
                held = self._held(k, rows)
                self.logits.observe_rows(k, rows[held], g[held, k], own[held, k])

        preds.register_hook(received)

    def _embeddings(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        joined = args[0]  # (B, Σ H_k): the parties' embeddings side by side
        if not self._recording(module) or not joined.requires_grad:
            return
        rows = self.rows

        def received(grad: Tensor) -> None:
            g = grad.detach().cpu().double().numpy() * rows.size
            start = 0
            for k, width in enumerate(self.widths):
                held = self._held(k, rows)
                self.embedding.observe_rows(k, rows[held], g[held, start:start + width])
                start += width

        joined.register_hook(received)

    def report(self) -> dict[str, Any]:
        """The strongest attack's report (every channel's under ``channels``); removes the
        hooks."""
        for handle in self.handles:
            handle.remove()
        reports = [m.report() for m in (self.logits, self.embedding) if m is not None]
        if not reports:
            return {"max": None, "attack": f"none implemented: {self.name} sends embeddings, "
                    "and the direction attack needs classes"}
        return strongest(reports)


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


class _RoundAbsences(nn.Module):
    """A jointly trained model whose training steps drop the parties absent from the step's
    round (``availability``: ``answering(step)`` (K,), the draws the Liquid Ensemble's rounds
    take, :func:`liquid_fed.centralized._answering`). Rows that no answering party holds
    (``views.missing`` on top of the round) keep the data's own presence."""

    def __init__(self, model: _Joint, answering: Callable[[int], np.ndarray]) -> None:
        super().__init__()
        self.model = model
        self.answering = answering
        self.steps = 0

    def forward(self, inputs: Sequence[Tensor], present: Tensor | None = None) -> JointOutput:
        if self.training and torch.is_grad_enabled():
            who = self.answering(self.steps)
            self.steps += 1
            mask = round_mask(present, who, int(inputs[0].shape[0]))
            if mask is not None and present is not None:
                lost = ~mask.any(-1, keepdim=True)
                mask = torch.where(lost, present, mask)
            present = mask
        return self.model(inputs, present)

    def loss(self, out: JointOutput, target: Tensor) -> Tensor:
        return self.model.loss(out, target)


def _fit(cfg: RunConfig, model: nn.Module, inputs: Sequence[Tensor], target: Tensor,
         present: Tensor | None, rounds: bool = False) -> tuple[list[float], float]:
    """:func:`liquid_fed.train.fit` with the run's settings (as ``train_ensemble`` calls it).

    ``rounds``: the model takes part in the run's training rounds, so the parties absent from
    a round (``availability``) are absent from its steps, with the same draws as the Liquid
    Ensemble's (an ensemble through ``fit``'s ``answering``, a jointly trained baseline
    through :class:`_RoundAbsences`)."""
    answering = _answering(cfg, cfg.n_clients, int(target.shape[0])) if rounds else None
    if answering is not None and not isinstance(model, LiquidEnsemble):
        model, answering = _RoundAbsences(model, answering), None
    t0 = time.perf_counter()
    losses = fit(model, inputs, target, epochs=cfg.train.epochs,
                 batch_size=cfg.train.batch_size, lr=cfg.optim.lr, optimizer=cfg.optim.name,
                 weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                 seed=cfg.seed, present=present, answering=answering)
    return losses, time.perf_counter() - t0


@torch.no_grad()
def predict_joint(model: _Joint, inputs: Sequence[Tensor], present: Tensor | None = None,
                  batch_size: int = EVAL_BATCH) -> JointOutput:
    """Evaluate a jointly trained baseline on all rows, in batches."""
    was_training = model.training
    model.eval()
    n = inputs[0].shape[0]
    parts = []
    for start in range(0, n, batch_size):
        rows = slice(start, min(n, start + batch_size))
        parts.append(model([x[rows] for x in inputs], None if present is None else present[rows]))
    model.train(was_training)
    return JointOutput(*(None if getattr(parts[0], f) is None
                         else torch.cat([getattr(p, f) for p in parts])
                         for f in JointOutput._fields))


def _basic_metrics(output: Tensor, target: Tensor, task: str) -> dict[str, float]:
    """accuracy and nll (classification) or rmse and mse (regression)."""
    if task == "classification":
        return {"accuracy": float((output.argmax(-1) == target).double().mean()),
                "nll": float(F.nll_loss(output, target))}
    mse = float(F.mse_loss(output, target.reshape(output.shape).to(output.dtype)))
    return {"rmse": math.sqrt(mse), "mse": mse}


def _per_sample_error(output: Tensor, target: Tensor, task: str) -> Tensor:
    """0/1 error or squared error summed over outputs, per sample (as the ensemble's)."""
    if task == "classification":
        return (output.argmax(-1) != target).to(output.dtype)
    return ((output - target.reshape(output.shape).to(output.dtype)) ** 2).sum(-1)


def _ensemble_metrics(out: EnsembleOutput, target: Tensor, task: str,
                      n_params: Sequence[int] | None = None) -> dict[str, float]:
    metrics = _basic_metrics(out.output, target, task)
    metrics.update(evaluate_output(out, target, task, n_params=n_params))
    return metrics


def _as_ensemble(predictions: Tensor, weight: Tensor, output: Tensor,
                 present: Tensor | None, delegation: Tensor | None = None) -> EnsembleOutput:
    """An ensemble-shaped record of a weighted combination: power = K · weight; by default
    every party's delegation row is the weight (all hand their say to the combination)."""
    k = weight.shape[-1]
    if delegation is None:
        delegation = weight.unsqueeze(1).expand(-1, k, -1)
    return EnsembleOutput(output, k * weight, delegation, predictions,
                          output.new_zeros(()), present)


def _arrays(data: CentralData, out_output: Tensor, target: Tensor, task: str,
            ens: EnsembleOutput | None = None, **extra: Tensor) -> dict[str, np.ndarray]:
    err = _per_sample_error(out_output, target, task)
    arrays = {"ids": np.asarray(data.server.splits.test), "error": err.numpy(),
              "output": out_output.numpy()}
    if ens is not None:
        arrays["power"] = ens.power.numpy()
        arrays["delegation"] = ens.delegation.numpy()
        for name, conf in confidences(ens, task).items():
            arrays[f"conf_{name}"] = conf.numpy()
    arrays.update({k: v.numpy() for k, v in extra.items()})
    return arrays


def _weights(ens: EnsembleOutput) -> list[float]:
    return (ens.power.mean(0) / ens.power.shape[-1]).tolist()


def _best(scores: Sequence[float], task: str) -> int:
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isnan(values), -np.inf if task == "classification" else np.inf, values)
    return int(np.argmax(values) if task == "classification" else np.argmin(values))


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def _ensemble_method(ctx: MethodContext, name: str, **overrides: Any) -> MethodResult:
    cfg, data = ctx.cfg, ctx.data
    task = data.server.task
    ens = build_ensemble(cfg, data, **overrides)
    # fit runs the experts themselves in steps with absent parties (not the ensemble's
    # forward, which the eavesdropper follows): no attack is measured under absences
    rounds = _answering(cfg, cfg.n_clients, int(data.targets["train"].shape[0])) is not None
    spy = Eavesdropper(name, ens, cfg, data) if name == "uniform" and not rounds else None
    losses, seconds = _fit(cfg, ens, data.inputs["train"], data.targets["train"],
                           data.present["train"], rounds=True)
    n_params = [sum(p.numel() for p in e.parameters()) for e in ens.experts]
    # the run's final smoothing (auto: picked on val), exactly as train_ensemble and the
    # federated server apply it
    outs, smoothing, _ = predict_splits(ens, data.inputs, data.targets, data.present)
    metrics = {}
    for split, out in outs.items():
        metrics[split] = _ensemble_metrics(out, data.targets[split], task, n_params)
        metrics[split]["loss"] = float(ens.loss(out, data.targets[split]))
        metrics[split]["smoothing"] = smoothing
    test = outs["test"]
    # absent at test: the powers re-solved over the present experts (as LE's robustness)
    missing = {key: score(test.predictions, test.delegation, data.targets["test"], ens.config,
                          smoothing, mask, n_params)
               for key, mask in ctx.missing_masks().items()}
    return MethodResult(name, metrics["val"], metrics["test"], seconds, losses,
                        party_weight=_weights(test),
                        arrays=_arrays(data, test.output, data.targets["test"], task, test),
                        model=ens, label_leakage=None if spy is None else spy.report(),
                        test_missing=missing)


def liquid(ctx: MethodContext) -> MethodResult:
    """The Liquid Ensemble with the run's solver."""
    return _ensemble_method(ctx, "liquid")


def uniform(ctx: MethodContext) -> MethodResult:
    """The same experts trained jointly with every vote kept (majority vote)."""
    return _ensemble_method(ctx, "uniform", solver="uniform")


def _joint_method(ctx: MethodContext, name: str) -> MethodResult:
    cfg, data = ctx.cfg, ctx.data
    task = data.server.task
    model = build_joint(name, cfg, data, ctx.options)

    def inputs(split: str) -> list[Tensor]:
        return _central_inputs(cfg, data, split) if name == "central" else data.inputs[split]

    def present(split: str) -> Tensor | None:
        # the central model reads every view; an absent one is its (standardised) mean, 0
        return None if name == "central" else data.present[split]
    spy = None if name == "central" else Eavesdropper(name, model, cfg, data)
    # the central model has no parties to lose: the rounds' absences do not reach it
    losses, seconds = _fit(cfg, model, inputs("train"), data.targets["train"],
                           present("train"), rounds=name != "central")
    leakage = None if spy is None else spy.report()
    metrics, outs = {}, {}
    for split in ("val", "test"):
        out = predict_joint(model, inputs(split), present(split))
        target = data.targets[split]
        if out.gate is not None:
            ens = _as_ensemble(out.predictions, out.gate, out.output, out.present)
            metrics[split] = _ensemble_metrics(ens, target, task)
            outs[split] = ens
        else:
            metrics[split] = _basic_metrics(out.output, target, task)
            outs[split] = out
        metrics[split]["loss"] = float(model.loss(out, target))
    test = outs["test"]
    missing = {}
    for key, mask in ctx.missing_masks().items():
        # absent at test: zero-filled embeddings (splitnn, plugvfl), left out of the sum
        # (aggvfl), the gate or the average over the present (moe, laser); the central
        # model reads an absent view as zeros, its training mean after standardisation
        if name == "central":
            out = predict_joint(model, _central_inputs(cfg, data, "test", mask))
        else:
            out = predict_joint(model, data.inputs["test"], mask)
        missing[key] = _basic_metrics(out.output, data.targets["test"], task)
        missing[key]["present_fraction"] = float(mask.to(torch.float64).mean())
    if isinstance(test, EnsembleOutput):
        return MethodResult(name, metrics["val"], metrics["test"], seconds, losses,
                            party_weight=_weights(test),
                            arrays=_arrays(data, test.output, data.targets["test"], task, test,
                                           gate=test.power / test.power.shape[-1]),
                            model=model, label_leakage=leakage, test_missing=missing)
    return MethodResult(name, metrics["val"], metrics["test"], seconds, losses,
                        arrays=_arrays(data, test.output, data.targets["test"], task),
                        model=model, label_leakage=leakage, test_missing=missing)


def splitnn(ctx: MethodContext) -> MethodResult:
    """Vertical split learning: party trunks -> concatenated embeddings -> top MLP."""
    return _joint_method(ctx, "splitnn")


def aggvfl(ctx: MethodContext) -> MethodResult:
    """Aggregate VFL: the parties' outputs summed, trained jointly."""
    return _joint_method(ctx, "aggvfl")


def plugvfl(ctx: MethodContext) -> MethodResult:
    """Split learning with party-wise dropout in training (PlugVFL); zero-fill at test."""
    return _joint_method(ctx, "plugvfl")


def laser(ctx: MethodContext) -> MethodResult:
    """LASER-VFL: per party a predictor over any subset of the parties' embeddings."""
    return _joint_method(ctx, "laser")


def moe(ctx: MethodContext) -> MethodResult:
    """A server-side gate over the parties' embeddings mixing the parties' heads."""
    return _joint_method(ctx, "moe")


def central(ctx: MethodContext) -> MethodResult:
    """One model on all features concatenated."""
    return _joint_method(ctx, "central")


def _train_solos(cfg: RunConfig, data: CentralData) -> _Solos:
    """Every party's expert trained alone on the training samples its view holds."""
    experts, losses, seconds = [], [], 0.0
    for k in range(cfg.n_clients):
        expert = build_client_expert(cfg, k, data.views[k].in_shape, data.server.n_outputs)
        model = AggVFL([PartyNet(expert)], data.server.task)
        x, y = data.inputs["train"][k], data.targets["train"]
        mask = data.present["train"]
        if mask is not None:
            rows = torch.nonzero(mask[:, k]).squeeze(1)
            x, y = x[rows], y[rows]
        epoch_losses, secs = _fit(cfg, model, [x], y, None)
        experts.append(expert)
        losses.append(epoch_losses)
        seconds += secs
    return _Solos(experts, seconds, losses)


@torch.no_grad()
def _solo_predictions(experts: Sequence[Expert], inputs: Sequence[Tensor]) -> Tensor:
    """(n, K, C) every expert's raw output (rows a view lacks are computed, never used)."""
    preds = []
    for expert, x in zip(experts, inputs, strict=True):
        was = expert.training
        expert.eval()
        preds.append(torch.cat([expert(x[i:i + EVAL_BATCH])[0]
                                for i in range(0, x.shape[0], EVAL_BATCH)]))
        expert.train(was)
    return torch.stack(preds, 1)


def _combined_method(ctx: MethodContext, name: str,
                     weight_of: Callable[[str, Tensor], tuple[Tensor, Tensor | None]]
                     ) -> MethodResult:
    """A fixed combination of the experts trained alone; ``weight_of(split, present)`` gives
    the (n, K) weights and optionally the delegation rows."""
    data, task = ctx.data, ctx.data.server.task
    solos = ctx.solos()
    metrics, outs = {}, {}
    for split in ("val", "test"):
        preds = _solo_predictions(solos.experts, data.inputs[split])
        mask = data.present[split]
        present = mask if mask is not None else torch.ones(preds.shape[:2], dtype=torch.bool)
        weight, delegation = weight_of(split, present)
        # pooled as the Liquid Ensemble pools (ensemble.mix); weight 0 = no say
        output = pool(preds, preds.shape[1] * weight, task, ctx.cfg.ensemble.mix)
        ens = _as_ensemble(preds, weight, output, mask, delegation)
        metrics[split] = _ensemble_metrics(ens, data.targets[split], task)
        metrics[split]["loss"] = float(task_loss(output, data.targets[split], task))
        outs[split] = ens
    test = outs["test"]
    missing = {}
    for key, mask in ctx.missing_masks().items():  # the votes of the present parties
        weight, _ = weight_of("test", mask)
        output = pool(test.predictions, test.predictions.shape[1] * weight, task,
                      ctx.cfg.ensemble.mix)
        missing[key] = _basic_metrics(output, data.targets["test"], task)
        missing[key]["present_fraction"] = float(mask.to(torch.float64).mean())
    return MethodResult(name, metrics["val"], metrics["test"], solos.seconds,
                        [float(np.mean(e)) for e in zip(*solos.losses, strict=True)],
                        party_weight=_weights(test),
                        arrays=_arrays(data, test.output, data.targets["test"], task, test),
                        model=nn.ModuleList(solos.experts), label_leakage=labels_at_party(name),
                        test_missing=missing)


def _even(present: Tensor, dtype: torch.dtype) -> Tensor:
    """(n, K) equal weights over the present parties."""
    w = present.to(dtype)
    return w / w.sum(-1, keepdim=True)


def averaged(ctx: MethodContext) -> MethodResult:
    """Experts trained alone, their probabilities (outputs) averaged over present parties."""

    def weight_of(split: str, present: Tensor) -> tuple[Tensor, Tensor]:
        w = _even(present, ctx.data.inputs[split][0].dtype)
        eye = torch.eye(present.shape[1], dtype=w.dtype).expand(present.shape[0], -1, -1)
        return w, eye  # each party keeps its own vote

    return _combined_method(ctx, "averaged", weight_of)


def oracle(ctx: MethodContext) -> MethodResult:
    """Each sample predicted by the expert of its informative view (trained alone).

    Raises:
        ConfigError: when the data has no ground truth of the informative view.
    """
    cfg, data = ctx.cfg, ctx.data
    check_methods(["oracle"], cfg, data)

    def weight_of(split: str, present: Tensor) -> tuple[Tensor, None]:
        dtype = data.inputs[split][0].dtype
        inf = torch.as_tensor(data.server.informative_of(getattr(data.server.splits, split)))
        onehot = F.one_hot(inf, present.shape[1]).to(torch.bool)  # (n, K)
        held = (onehot & present).any(-1, keepdim=True)
        return torch.where(held, onehot.to(dtype), _even(present, dtype)), None

    return _combined_method(ctx, "oracle", weight_of)


def local(ctx: MethodContext) -> MethodResult:
    """Each party alone, scored on the samples its view holds; the headline is the best party
    on validation."""
    data, task = ctx.data, ctx.data.server.task
    solos = ctx.solos()
    per_party: list[dict[str, Any]] = []
    test_outputs: list[tuple[Tensor, Tensor]] = []
    for k, expert in enumerate(solos.experts):
        entry: dict[str, Any] = {"party": k}
        for split in ("val", "test"):
            preds = _solo_predictions([expert], data.inputs[split][k:k + 1])[:, 0]  # (n, C)
            mask = data.present[split]
            rows = (torch.arange(preds.shape[0]) if mask is None
                    else torch.nonzero(mask[:, k]).squeeze(1))
            output = _final(preds, task)
            target = data.targets[split]
            entry["present" if split == "test" else "present_val"] = (
                rows.numel() / max(preds.shape[0], 1))
            if rows.numel() == 0:
                entry[split] = {TASK_METRICS[task]: math.nan}
            else:
                entry[split] = _basic_metrics(output[rows], target[rows], task)
                entry[split]["loss"] = float(task_loss(output[rows], target[rows], task))
            if split == "test":
                test_outputs.append((output, rows))
        per_party.append(entry)
    best = _best([primary_score(p["val"]) for p in per_party], task)
    missing = {}
    if ctx.test_missing:
        # the best party alone; where it is absent, the best present party (validation order)
        order = sorted(range(len(per_party)), key=lambda j: (
            -primary_score(per_party[j]["val"]) if task == "classification"
            else primary_score(per_party[j]["val"])))
        outputs = torch.stack([o for o, _ in test_outputs], 1)  # (n, K, C)
        for key, mask in ctx.missing_masks().items():
            rank = torch.full(mask.shape, len(order), dtype=torch.long)
            rank[:, order] = torch.arange(len(order))
            pick = torch.where(mask, rank, torch.full_like(rank, len(order))).argmin(-1)
            output = outputs[torch.arange(mask.shape[0]), pick]
            missing[key] = _basic_metrics(output, data.targets["test"], task)
            missing[key]["best_party_present"] = float(mask[:, best].to(torch.float64).mean())
    output, rows = test_outputs[best]
    arrays = _arrays(data, output, data.targets["test"], task)
    held = np.zeros(output.shape[0], dtype=bool)
    held[rows.numpy()] = True
    arrays["error"] = np.where(held, arrays["error"], np.nan)
    arrays["held"] = held
    val = {**per_party[best]["val"], "best_party": float(best)}
    test = {**per_party[best]["test"], "best_party": float(best)}
    return MethodResult("local", val, test, solos.seconds,
                        [float(np.mean(e)) for e in zip(*solos.losses, strict=True)],
                        per_party=per_party, arrays=arrays,
                        model=nn.ModuleList(solos.experts), label_leakage=labels_at_party("local"),
                        test_missing=missing)


#: Every method of a study by name.
METHODS: dict[str, MethodFn] = {
    "liquid": liquid,
    "uniform": uniform,
    "averaged": averaged,
    "local": local,
    "splitnn": splitnn,
    "plugvfl": plugvfl,
    "laser": laser,
    "aggvfl": aggvfl,
    "moe": moe,
    "central": central,
    "oracle": oracle,
}


def check_methods(names: Sequence[str], cfg: RunConfig, data: CentralData) -> None:
    """Check, without training, that every method exists and applies to this data.

    Raises:
        ConfigError: an unknown method, or ``oracle`` where the data has no ground truth of
            the informative view, naming what arrived and what is accepted.
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f'methods: unknown method "{unknown[0]}"; accepted: '
                          f'{", ".join(METHODS)}')
    if "oracle" in names and data.server.informative is None:
        raise ConfigError(
            f'method "oracle" needs the ground truth of which view is informative per sample: '
            f'data set "synthetic_regions" with views.kind: groups and no views.options; got '
            f'data.name "{cfg.data.name}", views.kind "{cfg.views.kind}"'
            + (f", views.options {cfg.views.options}" if cfg.views.options else ""))


def run_method(name: str, cfg: RunConfig, data: CentralData,
               options: MethodOptions | dict[str, Any] | None = None,
               context: MethodContext | None = None) -> MethodResult:
    """Train and evaluate one method on a run's data.

    Args:
        name: a key of :data:`METHODS`.
        cfg: the run config (optimiser, epochs, batches, experts, seed, ensemble).
        data: the run's :class:`~liquid_fed.centralized.CentralData` (``central_data(cfg)``).
        options: :class:`MethodOptions` or a mapping of them (server-side model widths).
        context: a :class:`MethodContext` shared with other methods of the same cfg and data
            (``run_methods`` passes one); ``options`` is then ignored.

    Returns:
        The :class:`MethodResult`.

    Raises:
        ConfigError: an unknown method or option; ``oracle`` on data without ground truth.
    """
    check_methods([name], cfg, data)
    if context is None:
        if not isinstance(options, MethodOptions):
            options = MethodOptions.from_dict(options)
        context = MethodContext(cfg, data, options)
    elif context.cfg is not cfg or context.data is not data:
        raise ValueError("run_method: the context was made for another config or data")
    log.debug("method %s on %s (seed %d)", name, cfg.name, cfg.seed)
    return METHODS[name](context)


def run_methods(names: Sequence[str], cfg: RunConfig, data: CentralData,
                options: MethodOptions | dict[str, Any] | None = None,
                test_missing: Sequence[float] = ()) -> dict[str, MethodResult]:
    """Several methods on the same data; the experts trained alone are trained once.

    ``test_missing``: missing rates at which every method is scored on the test split too
    (``MethodResult.test_missing``; the same masks for every method).

    Raises:
        ConfigError: an unknown or inapplicable method (before anything trains) or option.
        ParameterError: a missing rate outside [0, 1).
    """
    check_methods(names, cfg, data)
    if not isinstance(options, MethodOptions):
        options = MethodOptions.from_dict(options)
    context = MethodContext(cfg, data, options, test_missing)
    return {n: run_method(n, cfg, data, context=context) for n in names}


__all__ = ["JOINT", "METHODS", "AggVFL", "JointOutput", "Laser", "MethodContext",
           "MethodOptions", "Eavesdropper", "MethodResult", "MixtureOfParties", "PartyNet",
           "PlugVFL", "SplitNN", "build_joint",
           "check_methods", "mixture", "predict_joint", "run_method", "run_methods"]
