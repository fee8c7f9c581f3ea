"""Parties absent at prediction time: a trained Liquid Ensemble scored over the experts present.

Dimension letters: ``B`` samples, ``K`` experts (parties), ``C`` outputs.

A party that does not answer has no prediction and no delegation for the sample. The layer
already handles that (:func:`liquid_fed.ensemble.combine` with ``present``): an absent expert
passes its vote on uniformly to the present ones, the powers are re-solved over those, and the
absent expert has no say, under power smoothing too. This module asks how much that costs a
trained run. Two kinds of absence:

- ``absent``: the named parties answer for no sample (:func:`absent_mask`);
- ``missing_rate`` ``P``: each sample loses each party with probability ``P``, at least one
  party kept per sample (:func:`missing_mask`; the masks come from a fixed seed derived from
  the run's ``seed``, so every run, centralized or federated, draws the same ones).

Absence here comes on top of the data's own: a party that holds no row for a sample stays
absent in every case.

A run's ``summary.json`` carries ``robustness`` (:func:`robustness`): the test metrics with
each party absent alone and at the missing rates :data:`MISSING_RATES`, computed from the
final test evaluation's predictions and delegations (one forward pass of the experts, then one
combination per case). ``liquid-fed evaluate`` (:func:`evaluate_run`) scores a finished run
folder again with the cases a user asks for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from liquid_fed.availability import drop_keeping_one, stream_rng
from liquid_fed.ensemble import LiquidConfig, combine, ensemble_loss
from liquid_fed.errors import ParameterError, RunFolderError
from liquid_fed.metrics import evaluate_output

log = logging.getLogger(__name__)

#: The missing rates every run's summary reports.
MISSING_RATES = (0.1, 0.3, 0.5)
# Keeps the masks' random stream apart from every other draw seeded by the run's ``seed``.
_MASK_STREAM = 0x16AB5E


def _base(n: int, k: int, base: Tensor | None) -> Tensor:
    """The data's own presence (B, K): all True when ``base`` is None."""
    if base is None:
        return torch.ones(n, k, dtype=torch.bool)
    if tuple(base.shape) != (n, k):
        raise ValueError(f"base must have shape {(n, k)}, got {tuple(base.shape)}")
    return base.to(torch.bool).cpu()


def check_absent(absent: Sequence[int], k: int) -> list[int]:
    """The parties of an ``absent`` case, checked: indices in ``[0, K)``, at least one kept.

    Raises:
        ParameterError: an index out of range, or every party absent.
    """
    parties = sorted({int(j) for j in absent})
    for j in parties:
        if not 0 <= j < k:
            raise ParameterError(f"absent: party {j} does not exist; the run has {k} parties "
                                 f"(0 to {k - 1})", "absent", j, interval=f"[0, {k - 1}]")
    if len(parties) == k:
        raise ParameterError(f"absent: {parties} leaves no party to predict; at most {k - 1} "
                             f"of the {k} parties can be absent", "absent", parties,
                             interval=f"at most {k - 1} of [0, {k - 1}]")
    return parties


def rate_key(rate: float) -> str:
    """The key of a missing rate in ``robustness["missing_rate"]`` and in a study run's
    ``test_missing`` (``0.1`` -> ``"0.1"``)."""
    return str(float(rate))


def absent_key(party: int) -> str:
    """The key of a party absent alone in ``robustness["absent"]`` is ``str(party)``; in a
    study run's ``test_missing`` it is ``"absent <party>"``."""
    return f"absent {int(party)}"


def check_missing_rate(rate: float) -> float:
    """A missing rate, checked: a number in ``[0, 1)``.

    Raises:
        ParameterError: anything else.
    """
    ok = isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate < 1.0
    if not ok:
        raise ParameterError(f"missing_rate must lie in [0, 1), got {rate!r}", "missing_rate",
                             rate, interval="[0, 1)")
    return float(rate)


def check_smoothing(value: float) -> float:
    """A power smoothing ``λ`` to score with: a number in [0, 1]."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0.0 <= value <= 1.0):
        raise ParameterError(f"smoothing must lie in [0, 1], got {value!r}", "smoothing",
                             value, interval="[0, 1]")
    return float(value)


def absent_mask(n: int, k: int, absent: Sequence[int], base: Tensor | None = None) -> Tensor:
    """Presence (B, K) with the parties ``absent`` missing from every sample.

    Args:
        n: samples.
        k: parties.
        absent: the parties that do not answer.
        base: the data's own presence (B, K), or None when every party holds every sample.

    Returns:
        (B, K) bool; a row is all False where the data's own absence leaves a sample with none
        of the remaining parties (:func:`score` leaves such samples out).

    Raises:
        ParameterError: a party out of range, or all of them absent.
    """
    parties = check_absent(absent, k)
    mask = _base(n, k, base).clone()
    mask[:, parties] = False
    return mask


def missing_mask(n: int, k: int, rate: float, seed: int,
                 base: Tensor | None = None) -> Tensor:
    """Presence (B, K): each sample loses each party with probability ``rate``, keeping one.

    Each entry is dropped when a uniform draw falls below ``rate``; a sample that loses every
    party it holds keeps one of them, drawn uniformly. An entry is therefore missing with
    probability ``rate - rate^K / K`` (every party holding every sample). The same
    ``(n, k, rate, seed)`` always give the same mask.

    Args:
        n: samples.
        k: parties.
        rate: the missing rate, in ``[0, 1)``.
        seed: the run's seed (the mask draws from its own stream of it).
        base: the data's own presence (B, K), or None; absent there stays absent.

    Returns:
        (B, K) bool with at least one True per row.

    Raises:
        ParameterError: ``rate`` outside ``[0, 1)``.
    """
    rate = check_missing_rate(rate)
    rng = stream_rng(seed, _MASK_STREAM, round(rate * 1_000_000))
    return torch.from_numpy(drop_keeping_one(rng, _base(n, k, base).numpy(), rate))


def score(predictions: Tensor, delegation: Tensor, target: Tensor, config: LiquidConfig,
          smoothing: float, present: Tensor | None = None,
          n_params: Sequence[int] | None = None) -> dict[str, float]:
    """Test metrics of the experts' outputs combined over the parties ``present``.

    The metrics are those a run reports for its test split
    (:func:`liquid_fed.metrics.evaluate_output`, plus ``loss`` and ``smoothing``), and
    ``present_fraction``, the share of (sample, party) pairs present, and ``scored_fraction``,
    the share of samples scored: a sample that no present party holds (a party absent on top
    of the data's own absence) has no prediction at all and is left out.

    Args:
        predictions: (B, K, C) the experts' raw outputs.
        delegation: (B, K, K) their delegations.
        target: (B,) labels or targets.
        config: the run's ensemble settings, ``task`` filled in.
        smoothing: the ``λ`` the run pools with (its ``smoothing.value`` under ``auto``).
        present: (B, K) bool, or None for every party present.
        n_params: per-expert parameter counts (for ``active_param_fraction``).

    Returns:
        A flat dict of floats.
    """
    layer = dataclasses.replace(config, smoothing=float(smoothing))
    scored = 1.0
    with torch.no_grad():
        mask = None if present is None else present.to(predictions.device)
        if mask is not None and not bool(mask.any(-1).all()):
            rows = mask.any(-1)
            if not bool(rows.any()):
                raise ValueError("no sample has a party present: nothing to score")
            scored = float(rows.to(torch.float64).mean())
            predictions, delegation = predictions[rows], delegation[rows]
            target, mask = target.to(rows.device)[rows], mask[rows]
        out = combine(predictions, delegation, layer, mask)
        metrics = evaluate_output(out, target, layer.task, n_params)
        metrics["loss"] = float(ensemble_loss(out, target, layer))
    metrics["smoothing"] = float(smoothing)
    metrics["present_fraction"] = 1.0 if present is None else float(
        present.to(torch.float64).mean())
    metrics["scored_fraction"] = scored
    return metrics


#: Above this many parties a run's summary skips the each-party-absent cases (see robustness).
ABSENT_MAX_PARTIES = 32


def robustness(predictions: Tensor, delegation: Tensor, target: Tensor, config: LiquidConfig,
               smoothing: float, seed: int, base: Tensor | None = None,
               n_params: Sequence[int] | None = None,
               missing_rates: Sequence[float] = MISSING_RATES) -> dict[str, Any]:
    """A run's ``robustness``: its test metrics with each party absent, and at missing rates.

    Both the centralized and the federated run call this on their final test outputs, so they
    report the same numbers.

    Args:
        predictions: (B, K, C) the experts' raw outputs on the test split.
        delegation: (B, K, K) their delegations.
        target: (B,) labels or targets.
        config: the run's ensemble settings, ``task`` filled in.
        smoothing: the ``λ`` of the run's final evaluation.
        seed: the run's seed (the missing-rate masks derive from it).
        base: the data's own presence (B, K), or None.
        n_params: per-expert parameter counts.
        missing_rates: the rates to report.

    Returns:
        ``{"absent": {"<k>": metrics, ...}, "missing_rate": {"<P>": metrics, ...}}``
        (:func:`score`'s metrics); with one party (K = 1) ``absent`` is empty, and with more
        than :data:`ABSENT_MAX_PARTIES` parties too (each case re-solves every sample's K x K
        graph: at 256 parties the K cases took minutes; ``liquid-fed evaluate --absent``
        scores any of them on demand).
    """
    n, k = predictions.shape[:2]
    absent: dict[str, dict[str, float]] = {}
    # One party absent of one leaves nothing to predict with; of many, costs K solves.
    for j in range(k if 1 < k <= ABSENT_MAX_PARTIES else 0):
        absent[str(j)] = score(predictions, delegation, target, config, smoothing,
                               absent_mask(n, k, [j], base), n_params)
    missing = {rate_key(p): score(predictions, delegation, target, config, smoothing,
                             missing_mask(n, k, p, seed, base), n_params)
               for p in missing_rates}
    return {"absent": absent, "missing_rate": missing}


# --------------------------------------------------------------------------------------------
# A finished run folder
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One row of ``liquid-fed evaluate``: what was absent, and the test metrics."""

    label: str  # "all present", "absent 0 2", "missing 0.3"
    metrics: dict[str, float]


def evaluate_run(run_dir: str | Path, absent: Sequence[Sequence[int]] = (),
                 missing_rates: Sequence[float] = (),
                 smoothings: Sequence[float] = ()) -> list[Case]:
    """Score a finished run folder with parties absent.

    Rebuilds the run's data and experts from its ``config.yaml``, loads every expert's state
    from the newest checkpoint generation (``client_K.npz``, ``model/<param>`` keys), runs the
    experts once on the test split and combines their outputs per case with the run's own
    ``ensemble`` settings and the smoothing ``λ`` of its final evaluation.

    Args:
        run_dir: a folder written by ``liquid-fed run`` or ``liquid-fed centralized``.
        absent: cases of parties absent together for every sample, e.g. ``[[0], [1, 2]]``.
        missing_rates: cases of each sample losing each party with that probability.
        smoothings: cases of every party present, pooled with that power smoothing ``λ``
            instead of the run's own (0 = the learned powers, 1 = the uniform vote): how much
            the delegation adds over a plain vote of the same experts.

    Returns:
        The cases in order: all present first, then ``absent``, then ``missing_rates``, then
        ``smoothings``.

    Raises:
        RunFolderError: the folder is not a finished run, or holds no experts' states.
        ParameterError: a party out of range, all parties absent, a rate outside [0, 1), or a
            smoothing outside [0, 1].
    """
    from liquid_fed.centralized import build_ensemble, central_data
    from liquid_fed.config import ConfigError, config_from_yaml_text
    from liquid_fed.rundir import CONFIG_FILE, RunDir, load_checkpoint
    from liquid_fed.train import predict

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunFolderError(f"{run.path} is not a folder")
    if not run.finished or not (run / CONFIG_FILE).is_file():
        raise RunFolderError(f"{run.path} is not a finished run (it needs summary.json and "
                             "config.yaml, as `liquid-fed run` or `liquid-fed centralized` "
                             "write them)")
    try:
        cfg = config_from_yaml_text((run / CONFIG_FILE).read_text())
    except ConfigError as exc:
        raise RunFolderError(f"{run / CONFIG_FILE} is not a valid config: {exc}") from exc
    k = cfg.n_clients
    cases = [check_absent(a, k) for a in absent]  # refuse bad input before any work
    rates = [check_missing_rate(p) for p in missing_rates]
    lambdas = [check_smoothing(v) for v in smoothings]
    ckpt = load_checkpoint(run.path, k)
    if len(ckpt.clients) != k:
        raise RunFolderError(f"{run.path}: its checkpoint holds no experts' states (the parties "
                             "kept them in their own checkpoints); evaluate it where every "
                             "party's state is")
    summary = run.read_summary()
    test = summary.get("test") if isinstance(summary.get("test"), dict) else {}
    smoothing = float(test.get("smoothing", cfg.ensemble.training_smoothing))

    log.info("evaluate %s: checkpoint %s (round %d), smoothing λ = %g", run.path,
             ckpt.generation, ckpt.round, smoothing)
    data = central_data(cfg)
    ensemble = build_ensemble(cfg, data)
    for j, expert in enumerate(ensemble.experts):
        state = {name[len("model/"):]: torch.from_numpy(np.array(value))
                 for name, value in ckpt.clients[j].items() if name.startswith("model/")}
        expert.load_state_dict(state)
    out = predict(ensemble, data.inputs["test"], present=data.present["test"])
    target = data.targets["test"]
    base = data.present["test"]
    n = target.shape[0]
    n_params = [sum(p.numel() for p in e.parameters()) for e in ensemble.experts]

    def scored(mask: Tensor | None, lam: float = smoothing) -> dict[str, float]:
        return score(out.predictions, out.delegation, target, ensemble.config, lam, mask,
                     n_params)

    rows = [Case("all present", scored(base))]
    rows += [Case("absent " + " ".join(map(str, a)), scored(absent_mask(n, k, a, base)))
             for a in cases]
    rows += [Case(f"missing {p:g}", scored(missing_mask(n, k, p, cfg.seed, base)))
             for p in rates]
    rows += [Case(f"smoothing {lam:g}", scored(base, lam)) for lam in lambdas]
    return rows
