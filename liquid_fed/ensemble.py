"""The Liquid Ensemble: experts predict and delegate, the delegation graph decides who votes.

Dimension letters: ``B`` batch, ``K`` experts, ``C`` outputs (classes, regression targets or
embedding width).

Combination with powers ``p`` (B, K), ``Σ_j p_j = K`` (absent experts have ``p_j = 0``):

- ``regression`` and ``embedding``: ``ŷ = (1/K) Σ_j p_j y_j`` whatever ``mix`` says.
- ``classification``, pooled as ``mix`` says (the output is log-probabilities, the loss their
  NLL):

  - ``probs``: the arithmetic mixture ``log Σ_j (p_j / K) softmax(y_j)``. A mixture
    of experts: it assumes one view suffices for each sample (the powerful expert's is the
    answer) and cannot accumulate evidence that several weak views share.
  - ``logits`` (default): ``log_softmax((1/K) Σ_j p_j y_j)``, a power-weighted geometric mean
    of the experts' distributions (a product of experts with exponents ``p_j / K`` summing to
    1).
  - ``sum``: ``log_softmax(Σ_j p_j y_j)``, the plain power-weighted logit sum, ``K`` times the
    pooled logits of ``logits``: a product of experts with exponents ``p_j`` (summing to K).
    With every expert present and equal powers it is the sum of the views' logits (what
    aggregate VFL trains). ``sum`` and ``logits`` rank the classes alike for given powers;
    ``sum`` is K times sharper, which changes the NLL and hence what training learns.

  ``logits`` and ``sum`` assume the views are complementary: their evidence (log-odds) adds,
  as it does for views conditionally independent given the label, so several weak views that
  agree outvote one confident view.

Power smoothing (``smoothing``: ``λ`` in [0, 1], or ``auto``, the default): the combination
uses ``p' = (1 - λ) p + λ u`` instead of ``p``, with ``u`` the uniform vote over the present experts
(``u_j = K / n_present``, 0 for an absent expert, so absent experts still have no say), in
training and inference alike. ``λ = 0`` is the learned powers, ``λ = 1`` the uniform vote.
``smoothing: auto`` trains with ``λ = 0`` and afterwards picks ``λ`` from ``smoothing_grid``
(default :data:`SMOOTHING_GRID`: 0, 0.1, 0.25, 0.5, 0.75, 1) on the validation split
(:func:`pick_smoothing`: best accuracy, or lowest RMSE; ties go to the smallest ``λ``) and
evaluates with it. :class:`EnsembleOutput` ``power`` is always the solved powers ``p`` (what
the delegation graph gives), before smoothing.

Auxiliary losses (weights default 0):

- load distribution: ``q = mean_b softmax(p_b / T)``, ``L_load = (K Σ q² - 1) / (K - 1)``;
  0 when every expert chairs equally often.
- specialization: ``mean_b [1 - (K Σ (p/K)² - 1) / (K - 1)]``; 0 when one expert holds all
  power on every sample.

The server of a federation holds no experts: it calls :func:`combine` on the predictions and
delegations that clients sent, exactly as :class:`LiquidEnsemble` does after evaluating its
experts locally.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from liquid_fed.data.dataset import TASKS as DATA_TASKS
from liquid_fed.errors import ParameterError
from liquid_fed.solvers import check_parameters, solve_power

log = logging.getLogger(__name__)

#: What the layer combines: the labelled tasks of the data sets, and unlabelled embeddings.
TASKS = (*DATA_TASKS, "embedding")
#: How classification pools the experts' logits (see the module docstring).
MIXES = ("probs", "logits", "sum")
#: The ``smoothing`` value that picks ``λ`` on the validation split.
SMOOTHING_AUTO = "auto"
#: The ``λ`` values ``smoothing: auto`` tries by default.
SMOOTHING_GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


class EnsembleOutput(NamedTuple):
    """What a Liquid Ensemble returns for a batch."""

    output: Tensor  # (B, C): log-probabilities (classification), prediction or embedding
    power: Tensor  # (B, K) voting powers, Σ = K
    delegation: Tensor  # (B, K, K) rows = from-expert
    predictions: Tensor  # (B, K, C) each expert's raw output (logits for classification)
    aux_loss: Tensor  # () weighted auxiliary losses (0 when their weights are 0)
    present: Tensor | None = None  # (B, K) bool, where some experts lack some samples


@dataclass
class LiquidConfig:
    """How delegations become powers and how powers combine predictions.

    It is also the ``ensemble`` section of a run's config (:class:`liquid_fed.config.RunConfig`):
    every value is checked here, once, and the run config reports a refusal with its dotted
    key. ``task`` is not a config key there: a run fills it in from its data.
    """

    task: str = field(default="classification", metadata={"config": False})
    solver: str = "sink_one"
    epsilon: float = 0.01
    penalty: float = 0.9
    backend: str = "auto"
    mix: str = "logits"
    smoothing: float | str = SMOOTHING_AUTO
    smoothing_grid: list[float] = field(default_factory=lambda: list(SMOOTHING_GRID))
    load_weight: float = 0.0
    load_temperature: float = 1.0
    specialization_weight: float = 0.0
    expert_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ParameterError(f'task must be one of {list(TASKS)}, got "{self.task}"',
                                 "task", self.task, choices=TASKS)
        if self.mix not in MIXES:
            raise ParameterError(f'mix must be one of {list(MIXES)}, got "{self.mix}"', "mix",
                                 self.mix, choices=MIXES)
        _check_smoothing(self.smoothing, self.smoothing_grid)
        check_parameters(self.solver, self.epsilon, self.penalty, self.backend)
        # A config's values must hold whatever solver a sweep later switches to.
        if not 0.0 < self.epsilon < 1.0:
            raise ParameterError(f"epsilon must lie in (0, 1), got {self.epsilon!r}", "epsilon",
                                 self.epsilon, interval="(0, 1)")
        if not 0.0 <= self.penalty < 1.0:
            raise ParameterError(f"penalty must lie in [0, 1), got {self.penalty!r}", "penalty",
                                 self.penalty, interval="[0, 1)")
        for name in ("load_weight", "specialization_weight", "expert_loss_weight"):
            value = getattr(self, name)
            if not value >= 0:
                raise ParameterError(f"{name} must be >= 0, got {value!r}", name, value,
                                     interval="[0, inf]")
        if not self.load_temperature > 0:
            raise ParameterError(f"load_temperature must be > 0, got {self.load_temperature!r}",
                                 "load_temperature", self.load_temperature, interval="(0, inf]")

    @property
    def training_smoothing(self) -> float:
        """The ``λ`` the combination uses while training: the value, or 0 for ``auto``."""
        return 0.0 if self.smoothing == SMOOTHING_AUTO else float(self.smoothing)


_SMOOTHING_ACCEPTED = (SMOOTHING_AUTO, "a number in [0, 1]")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_smoothing(smoothing: object, grid: object) -> None:
    """``smoothing`` is ``auto`` or a number in [0, 1]; ``grid`` a non-empty list of them."""
    if isinstance(smoothing, str):
        ok = smoothing == SMOOTHING_AUTO
    else:
        ok = _is_number(smoothing) and 0.0 <= smoothing <= 1.0
    if not ok:
        raise ParameterError(f'smoothing must be "auto" or a number in [0, 1], got '
                             f"{smoothing!r}", "smoothing", smoothing,
                             choices=_SMOOTHING_ACCEPTED)
    if not isinstance(grid, (list, tuple)) or not grid:
        raise ParameterError(f"smoothing_grid must be a non-empty list of numbers in [0, 1], "
                             f"got {grid!r}", "smoothing_grid", grid,
                             choices=("a non-empty list of numbers in [0, 1]",))
    for i, value in enumerate(grid):
        if not (_is_number(value) and 0.0 <= value <= 1.0):
            raise ParameterError(f"smoothing_grid[{i}] must lie in [0, 1], got {value!r}",
                                 f"smoothing_grid[{i}]", value, interval="[0, 1]")


# --------------------------------------------------------------------------------------------
# Auxiliary losses
# --------------------------------------------------------------------------------------------


def load_distribution_loss(power: Tensor, temperature: float = 1.0) -> Tensor:
    """``(K Σ q² - 1)/(K - 1)`` with ``q = mean_b softmax(p_b / T)``; 0 for K = 1."""
    k = power.shape[-1]
    if k == 1:
        return power.new_zeros(())
    q = torch.softmax(power / temperature, dim=-1).mean(0)  # (K,)
    return (k * (q * q).sum() - 1) / (k - 1)


def specialization_loss(power: Tensor) -> Tensor:
    """``mean_b [1 - (K Σ (p/K)² - 1)/(K - 1)]``; 0 for K = 1."""
    k = power.shape[-1]
    if k == 1:
        return power.new_zeros(())
    share = power / k
    concentration = (k * (share * share).sum(-1) - 1) / (k - 1)  # (B,)
    return (1 - concentration).mean()


# --------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------


def _mask_absent(delegation: Tensor, present: Tensor) -> Tensor:
    """Absent experts pass their vote on uniformly to the present ones and keep nothing.

    Only the absent experts' rows are built (a copy of ``delegation`` with those rows
    replaced), not a full (B, K, K) fallback beside it: at 256 experts each such tensor of a
    600-sample split is 150 MB.
    """
    b, j = (~present).nonzero(as_tuple=True)
    if b.numel() == 0:
        return delegation
    others = present[b].clone()  # (m, K): the present experts of each absent row's sample,
    others[torch.arange(b.numel(), device=b.device), j] = False  # itself excluded
    fallback = others.to(delegation.dtype)
    fallback = fallback / fallback.sum(-1, keepdim=True).clamp_min(1)
    masked = delegation.clone()
    masked[b, j] = fallback
    return masked


def smooth_power(power: Tensor, smoothing: float, present: Tensor | None = None) -> Tensor:
    """Powers mixed with the uniform vote: ``(1 - λ) p + λ u``.

    Args:
        power: (B, K) powers, ``Σ = K``, 0 for absent experts.
        smoothing: ``λ`` in [0, 1].
        present: optional (B, K) bool; ``u`` is uniform over the present experts
            (``K / n_present`` each, 0 for the absent), so ``Σ`` stays K and absent experts
            keep no power.

    Returns:
        (B, K) smoothed powers; ``power`` itself when ``λ = 0``.
    """
    if smoothing == 0:
        return power
    k = power.shape[-1]
    if present is None:
        uniform = torch.ones_like(power)
    else:
        held = present.to(power.dtype)
        uniform = k * held / held.sum(-1, keepdim=True)
    return (1 - smoothing) * power + smoothing * uniform


def pool(predictions: Tensor, power: Tensor, task: str, mix: str = "probs") -> Tensor:
    """The experts' predictions combined with powers (see the module docstring).

    Args:
        predictions: (B, K, C) raw outputs (logits for classification).
        power: (B, K) powers, ``Σ = K``; an expert of power 0 has no say.
        task: ``classification``, ``regression`` or ``embedding``.
        mix: ``probs``, ``logits`` or ``sum`` (classification only; the others ignore it).

    Returns:
        (B, C) log-probabilities (classification) or the weighted mean of the outputs.

    Raises:
        ValueError: an unknown ``mix``.
    """
    if mix not in MIXES:
        raise ParameterError(f'mix must be one of {list(MIXES)}, got "{mix}"', "mix", mix,
                             choices=MIXES)
    k = power.shape[-1]
    weight = (power / k).unsqueeze(-1)  # (B, K, 1), Σ = 1
    if task != "classification":
        return (weight * predictions).sum(1)
    if mix == "logits":
        return torch.log_softmax((weight * predictions).sum(1), dim=-1)
    if mix == "sum":
        return torch.log_softmax((power.unsqueeze(-1) * predictions).sum(1), dim=-1)
    # probs: log Σ_j (p_j/K) softmax(y_j), computed stably (log 0 -> log tiny: no say)
    log_w = torch.log(weight.clamp_min(torch.finfo(weight.dtype).tiny))
    return torch.logsumexp(log_w + torch.log_softmax(predictions, dim=-1), dim=1)


def combine(
    predictions: Tensor,
    delegation: Tensor,
    config: LiquidConfig,
    present: Tensor | None = None,
    validate: bool = True,
) -> EnsembleOutput:
    """Resolve delegations into powers and combine the experts' predictions.

    The powers ``p`` come from the delegation graph (``config.solver``); the output pools the
    predictions with ``(1 - λ) p + λ u`` (:func:`smooth_power`, ``λ`` =
    ``config.training_smoothing``) as ``config.mix`` says (:func:`pool`):

    - ``probs``: ``log Σ_j (p_j/K) softmax(y_j)`` (a mixture: one view per sample suffices);
    - ``logits``: ``log_softmax((1/K) Σ_j p_j y_j)``;
    - ``sum``: ``log_softmax(Σ_j p_j y_j)`` (``logits`` and ``sum`` are products of experts:
      complementary views whose evidence adds);
    - regression and embedding: ``(1/K) Σ_j p_j y_j`` for every ``mix``.

    Args:
        predictions: (B, K, C) raw outputs of the experts (logits for classification).
        delegation: (B, K, K) delegation vectors stacked by from-expert.
        config: solver and combination settings.
        present: optional (B, K) bool; ``False`` where an expert has no view of the sample.
            Absent experts delegate uniformly to present ones, get no power and no say (under
            smoothing too).
        validate: check the delegation input once.

    Returns:
        An :class:`EnsembleOutput`; its ``power`` is the solved ``p``, before smoothing.

    Raises:
        ValueError: inputs of mismatched shapes, a sample without any present expert, or an
            invalid delegation (when ``validate``).
    """
    if predictions.ndim != 3 or predictions.shape[:2] != delegation.shape[:2]:
        raise ValueError(
            "predictions must have shape (batch, K, C) matching delegation (batch, K, K), got "
            f"{tuple(predictions.shape)} and {tuple(delegation.shape)}"
        )
    k = delegation.shape[-1]
    if present is not None:
        if present.shape != delegation.shape[:2]:
            raise ValueError(
                f"present must have shape {tuple(delegation.shape[:2])}, got {tuple(present.shape)}"
            )
        if validate and not bool(present.any(-1).all()):
            b = int((~present.any(-1)).nonzero()[0])
            raise ValueError(f"sample {b} has no expert present; at least one is needed")
        delegation = _mask_absent(delegation, present)
    power = _solve_in_chunks(delegation, config, validate)
    if present is not None:  # the sink's uniform return must not reach absent experts
        power = power * present
        power = k * power / power.sum(-1, keepdim=True)
    votes = smooth_power(power, config.training_smoothing, present)
    output = pool(predictions, votes, config.task, config.mix)
    aux = power.new_zeros(())
    if config.load_weight:
        aux = aux + config.load_weight * load_distribution_loss(power, config.load_temperature)
    if config.specialization_weight:
        aux = aux + config.specialization_weight * specialization_loss(power)
    return EnsembleOutput(output, power, delegation, predictions, aux, present)


#: Largest number of delegation entries (B x K x K) solved at once without a gradient: an
#: evaluation of many samples with many experts solves in chunks of samples (each sample's
#: graph is solved on its own, so the powers are the same) and its workspace stays bounded
#: (at 256 experts, 600 test samples in one solve took about 1 GB).
SOLVE_CHUNK_ENTRIES = 1 << 22


def _solve_in_chunks(delegation: Tensor, config: LiquidConfig, validate: bool) -> Tensor:
    b, k = delegation.shape[:2]
    step = max(1, SOLVE_CHUNK_ENTRIES // (k * k))
    if b <= step or (torch.is_grad_enabled() and delegation.requires_grad):
        return solve_power(delegation, config.solver, config.epsilon, config.penalty,
                           config.backend, validate)
    return torch.cat([solve_power(delegation[i:i + step], config.solver, config.epsilon,
                                  config.penalty, config.backend, validate)
                      for i in range(0, b, step)])


def with_smoothing(out: EnsembleOutput, config: LiquidConfig, smoothing: float
                   ) -> EnsembleOutput:
    """``out`` pooled again with smoothing ``λ`` (its powers, predictions and presence kept).

    Equal to what :func:`combine` gives with ``config.smoothing = λ``: the powers do not depend
    on ``λ``, so a trained ensemble's outputs need no second solve.
    """
    votes = smooth_power(out.power, smoothing, out.present)
    return out._replace(output=pool(out.predictions, votes, config.task, config.mix))


class SmoothingPick(NamedTuple):
    """What :func:`pick_smoothing` chose, and why."""

    value: float  # the λ picked
    grid: list[float]  # the λ tried, ascending
    scores: list[float]  # the validation metric of each
    metric: str  # "accuracy" (higher is better) or "rmse" (lower is better)

    def to_dict(self) -> dict[str, object]:
        """Plain data for ``summary.json``."""
        return {"value": self.value, "grid": list(self.grid), "scores": list(self.scores),
                "metric": self.metric, "split": "val"}


def pick_smoothing(out: EnsembleOutput, target: Tensor, config: LiquidConfig) -> SmoothingPick:
    """Pick the power smoothing ``λ`` on the validation split, with the trained experts.

    Every ``λ`` of ``config.smoothing_grid`` pools the same predictions and solved powers
    (:func:`with_smoothing`); the best validation accuracy (classification) or lowest RMSE
    (regression, embedding) wins, and a tie goes to the smallest ``λ`` (the least change from
    the learned powers). The centralized and the federated run both call this on their
    validation outputs, so they pick the same ``λ``.

    Args:
        out: the ensemble's output on the whole validation split (any smoothing; only its
            powers, predictions and presence are used).
        target: (B,) labels, or targets.
        config: the ensemble's settings (``task``, ``mix``, ``smoothing_grid``).

    Returns:
        A :class:`SmoothingPick`.
    """
    from liquid_fed.metrics import headline_score  # metrics builds on this module

    grid = sorted({float(v) for v in config.smoothing_grid})
    higher = config.task == "classification"
    scores, best = [], None
    with torch.no_grad():
        for lam in grid:
            score = headline_score(with_smoothing(out, config, lam), target, config.task)
            scores.append(score)
            if best is None or (score > scores[best] if higher else score < scores[best]):
                best = len(scores) - 1
    metric = "accuracy" if higher else "rmse"
    log.info("smoothing: picked λ = %g on validation (%s %s over λ %s)", grid[best], metric,
             [round(v, 4) for v in scores], grid)
    return SmoothingPick(grid[best], grid, scores, metric)


def task_loss(output: Tensor, target: Tensor, task: str) -> Tensor:
    """Loss of a combined output: NLL of log-probabilities, or mean squared error."""
    if task == "classification":
        return F.nll_loss(output, target)
    return F.mse_loss(output, target.reshape(output.shape).to(output.dtype))


def expert_loss(predictions: Tensor, target: Tensor, task: str,
                present: Tensor | None = None) -> Tensor:
    """Mean over (sample, expert) pairs of each expert's own loss against the label.

    With ``present`` (B, K), only the pairs where the expert holds the sample count: an
    expert is never trained on a sample it does not have.
    """
    b, k, c = predictions.shape
    if task == "classification":
        each = F.cross_entropy(predictions.reshape(b * k, c), target.repeat_interleave(k),
                               reduction="none").reshape(b, k)
    else:
        diff = predictions - target.reshape(b, 1, c).to(predictions.dtype)
        each = (diff * diff).mean(-1)  # (B, K)
    if present is None:
        return each.mean()
    weight = present.to(each.dtype)
    return (each * weight).sum() / weight.sum().clamp_min(1)


def ensemble_loss(out: EnsembleOutput, target: Tensor, config: LiquidConfig) -> Tensor:
    """Total training loss: task loss + auxiliary losses + weighted per-expert loss."""
    loss = task_loss(out.output, target, config.task) + out.aux_loss
    if config.expert_loss_weight:
        loss = loss + config.expert_loss_weight * expert_loss(out.predictions, target,
                                                              config.task, out.present)
    return loss


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


def _same_architecture(experts: Sequence[nn.Module]) -> bool:
    first = experts[0]
    shapes = [(n, p.shape) for n, p in first.named_parameters()]
    bufs = [(n, b.shape) for n, b in first.named_buffers()]
    if not all(getattr(e, "supports_vmap", True) for e in experts):
        return False  # e.g. adaptive ODE steps: per-sample control flow vmap cannot trace
    return all(
        type(e) is type(first)
        and [(n, p.shape) for n, p in e.named_parameters()] == shapes
        and [(n, b.shape) for n, b in e.named_buffers()] == bufs
        for e in experts[1:]
    )


class LiquidEnsemble(nn.Module):
    """A drop-in module over K experts, each returning ``(prediction, delegation)``.

    Args:
        experts: K modules; expert ``i`` maps its input to ``(prediction (B, C),
            delegation (B, K))``. They may differ in architecture and input.
        config: a :class:`LiquidConfig`; keyword overrides are accepted as well, e.g.
            ``LiquidEnsemble(experts, task="regression", solver="sink_many")``.
        batched: evaluate experts of one architecture with ``torch.func.vmap`` (one batched
            call instead of K). ``"auto"`` does so when all experts share a class and parameter
            shapes and their inputs share a shape.

    Call it with one tensor (every expert sees the same input) or a sequence of K tensors
    (expert ``i`` sees ``inputs[i]``), and optionally ``present`` (B, K).
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        config: LiquidConfig | None = None,
        batched: bool | str = "auto",
        **overrides,
    ) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("experts must hold at least one expert, got an empty list")
        if batched not in (True, False, "auto"):
            raise ValueError(f'batched must be True, False or "auto", got {batched!r}')
        base = config or LiquidConfig()
        self.config = LiquidConfig(**{**base.__dict__, **overrides})
        self.experts = nn.ModuleList(experts)
        self.batched = batched
        self._can_batch = _same_architecture(self.experts)
        if batched is True and not self._can_batch:
            raise ValueError("batched=True needs experts of one class and parameter shapes "
                             "that support vmap (supports_vmap)")
        self._template: nn.Module | None = None
        if batched is not False and self._can_batch and len(experts) > 1:
            # Built here, while the experts hold real Parameters: under torch.func's
            # functional_call they hold plain tensors, which a meta copy cannot be made of.
            # Kept out of the module tree: it holds no real parameters.
            object.__setattr__(self, "_template", _meta_copy(self.experts[0]))

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def _inputs(self, inputs: Tensor | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(inputs, Tensor):
            return [inputs] * self.n_experts
        inputs = list(inputs)
        if len(inputs) != self.n_experts:
            raise ValueError(
                f"expected {self.n_experts} inputs (one per expert), got {len(inputs)}"
            )
        return inputs

    def _use_vmap(self, xs: list[Tensor]) -> bool:
        if self.batched is False or not self._can_batch or self.n_experts == 1:
            return False
        return all(x.shape == xs[0].shape for x in xs)

    def _run_vmap(self, xs: list[Tensor]) -> tuple[Tensor, Tensor]:
        from torch.func import functional_call, vmap

        if self._template is None:  # batched switched on after __init__
            object.__setattr__(self, "_template", _meta_copy(self.experts[0]))
        template = self._template
        # named_parameters(), not get_parameter(): under functional_call the experts hold
        # plain tensors in place of Parameters. torch.stack is differentiable: gradients flow
        # back to every expert's own parameters (or to the tensors functional_call swapped in).
        per_expert = [dict(e.named_parameters()) for e in self.experts]
        per_expert_bufs = [dict(e.named_buffers()) for e in self.experts]
        params = {n: torch.stack([pe[n] for pe in per_expert]) for n in per_expert[0]}
        bufs = {n: torch.stack([pb[n] for pb in per_expert_bufs]) for n in per_expert_bufs[0]}

        def call(p: dict, b: dict, x: Tensor) -> tuple[Tensor, Tensor]:
            return functional_call(template, (p, b), (x,))

        preds, dels = vmap(call, randomness="different")(params, bufs, torch.stack(xs))
        return preds.transpose(0, 1), dels.transpose(0, 1)  # (B, K, C), (B, K, K)

    def expert_outputs(self, inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Every expert's ``(predictions (B, K, C), delegation (B, K, K))``."""
        xs = self._inputs(inputs)
        if self._use_vmap(xs):
            return self._run_vmap(xs)
        outs = [expert(x) for expert, x in zip(self.experts, xs, strict=True)]
        preds = torch.stack([o[0] for o in outs], dim=1)
        dels = torch.stack([o[1] for o in outs], dim=1)
        return preds, dels

    def forward(
        self, inputs: Tensor | Sequence[Tensor], present: Tensor | None = None
    ) -> EnsembleOutput:
        preds, dels = self.expert_outputs(inputs)
        if dels.shape[-1] != self.n_experts:
            raise ValueError(
                f"experts must return delegation vectors over {self.n_experts} experts, "
                f"got width {dels.shape[-1]}"
            )
        return combine(preds, dels, self.config, present)

    def loss(self, out: EnsembleOutput, target: Tensor) -> Tensor:
        """Training loss of a forward's output (task + auxiliary + per-expert)."""
        return ensemble_loss(out, target, self.config)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A parameter-free twin of ``module`` for ``functional_call``."""
    import copy

    twin = copy.deepcopy(module)
    return twin.to("meta")
