"""Confidence measures and evaluation metrics of a Liquid Ensemble.

Confidence per sample (higher = more confident), from an :class:`EnsembleOutput`:

- ``delegation``: 1 - mean over experts of the normalised entropy of their delegation rows.
- ``power``: 1 - normalised entropy of ``p / K``.
- ``self_delegation``: mean over experts of what each keeps, ``mean_i d_i[i]``.
- ``agreement``: minus the spread of the predictions, ``-mean_j ||y_j - ȳ||`` (class
  probabilities for classification).
- ``max_prob``: the mixture's largest class probability (classification only), the plain
  reference a user would compare with.

Kendall's τ (τ-b, ties handled) is taken between each confidence and the per-sample error with
the sign flipped, so positive τ means confidence predicts correctness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from liquid_fed.ensemble import EnsembleOutput

CONFIDENCES = ("delegation", "power", "self_delegation", "agreement", "max_prob")


#: Largest number of entries :func:`entropy` takes ``p log p`` of at once.
ENTROPY_CHUNK = 1 << 22


def entropy(prob: Tensor | np.ndarray, dim: int = -1,
            normalised: bool = False) -> Tensor | np.ndarray | float:
    """Shannon entropy (nats) of probability vectors along ``dim``; ``0 log 0 = 0``.

    Args:
        prob: probabilities, a torch tensor or a numpy array (any shape).
        dim: the axis the vectors lie along.
        normalised: divide by ``log K`` (K = the length of the vectors; 0 for K = 1).

    Returns:
        The same kind as ``prob`` with ``dim`` removed (a float for one numpy vector).
    """
    as_numpy = not isinstance(prob, Tensor)
    p = torch.as_tensor(np.asarray(prob, dtype=np.float64)) if as_numpy else prob
    if p.ndim > 1 and dim % p.ndim != 0 and p.numel() > ENTROPY_CHUNK:
        # in slices along the first axis: p log p of a (B, K, K) delegation at 256 parties
        # would be hundreds of MB at once
        step = max(1, ENTROPY_CHUNK // (p.numel() // max(1, p.shape[0])))
        ent = torch.cat([-torch.special.xlogy(part, part).sum(dim) for part in p.split(step)])
    else:
        ent = -torch.special.xlogy(p, p).sum(dim)
    if normalised:
        k = p.shape[dim]
        ent = ent / math.log(k) if k > 1 else torch.zeros_like(ent)
    ent = ent + 0.0  # no "-0.0" in reports
    if not as_numpy:
        return ent
    out = ent.numpy()
    return float(out) if out.ndim == 0 else out


def confidences(out: EnsembleOutput, task: str) -> dict[str, Tensor]:
    """Every confidence measure per sample, each of shape (B,)."""
    k = out.power.shape[-1]
    preds = out.predictions
    if task == "classification":
        preds = torch.softmax(preds, dim=-1)
    spread = (preds - preds.mean(1, keepdim=True)).norm(dim=-1).mean(1)  # (B,)
    conf = {
        "delegation": 1 - entropy(out.delegation, normalised=True).mean(-1),
        "power": 1 - entropy(out.power / k, normalised=True),
        "self_delegation": out.delegation.diagonal(dim1=-2, dim2=-1).mean(-1),
        "agreement": -spread,
    }
    if task == "classification":
        conf["max_prob"] = out.output.exp().max(-1).values
    return conf


def per_sample_error(out: EnsembleOutput, target: Tensor, task: str) -> Tensor:
    """0/1 error (classification) or squared error summed over outputs, per sample."""
    if task == "classification":
        return (out.output.argmax(-1) != target).to(out.output.dtype)
    diff = out.output - target.reshape(out.output.shape).to(out.output.dtype)
    return (diff * diff).sum(-1)


def headline_score(out: EnsembleOutput, target: Tensor, task: str,
                   err: Tensor | None = None) -> float:
    """Accuracy (classification) or RMSE over all outputs (the others) of ``out``."""
    if err is None:
        err = per_sample_error(out, target, task)
    if task == "classification":
        return float(1 - err.mean())
    return float(err.mean().sqrt() / math.sqrt(out.output.shape[-1]))


#: The headline metric of each task (higher is better only for accuracy).
TASK_METRICS = {"classification": "accuracy", "regression": "rmse", "embedding": "rmse"}


def primary_metric(metrics: dict[str, object]) -> str:
    """The headline metric of a result: ``accuracy`` for classification, else ``rmse``."""
    return "accuracy" if "accuracy" in metrics else "rmse"


def primary_score(metrics: dict[str, float]) -> float:
    """The value of a result's headline metric."""
    return metrics[primary_metric(metrics)]


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b between two 1-D arrays (ties handled); NaN when either is constant."""
    from scipy.stats import kendalltau

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(kendalltau(x, y, variant="b").statistic)


def active_parameter_fraction(power: Tensor, n_params: Sequence[int],
                              threshold: float = 0.01) -> float:
    """Mean over samples of the share of expert parameters whose expert holds power.

    An expert counts as active on a sample when its power share ``p_j / K`` exceeds
    ``threshold``; the others could be skipped at inference without changing the output by
    more than that share.
    """
    k = power.shape[-1]
    sizes = torch.as_tensor(list(n_params), dtype=power.dtype, device=power.device)
    active = (power / k > threshold).to(power.dtype)  # (B, K)
    return float((active @ sizes).mean() / sizes.sum())


def evaluate_output(out: EnsembleOutput, target: Tensor, task: str,
                    n_params: Sequence[int] | None = None) -> dict[str, float]:
    """Metrics of one evaluated split: accuracy or RMSE, τ per confidence, entropies.

    Args:
        out: the ensemble's output on the whole split.
        target: labels (B,) for classification, targets (B,) or (B, C) otherwise.
        task: ``classification``, ``regression`` or ``embedding``.
        n_params: per-expert parameter counts, for the active-parameter fraction.

    Returns:
        A flat dict of floats: ``accuracy`` or ``rmse``, ``tau_<confidence>`` for each
        measure, ``power_entropy`` (mean entropy of p/K, nats), ``speaker_entropy`` (entropy of
        the histogram of the most powerful expert, nats), ``mean_power_<j>`` per expert and,
        with ``n_params``, ``active_param_fraction``.
    """
    with torch.no_grad():
        err = per_sample_error(out, target, task)
        k = out.power.shape[-1]
        metrics: dict[str, float] = {TASK_METRICS[task]: headline_score(out, target, task, err)}
        if task == "classification":
            metrics["nll"] = float(-out.output.gather(-1, target.long().view(-1, 1)).mean())
        neg_err = (-err).cpu().numpy()
        for name, conf in confidences(out, task).items():
            metrics[f"tau_{name}"] = kendall_tau(conf.cpu().numpy(), neg_err)
        metrics["power_entropy"] = float(entropy(out.power / k).mean())
        speakers = torch.bincount(out.power.argmax(-1), minlength=k).cpu().numpy()
        metrics["speaker_entropy"] = entropy(speakers / speakers.sum())
        for j, m in enumerate(out.power.mean(0).tolist()):
            metrics[f"mean_power_{j}"] = m
        if n_params is not None:
            metrics["active_param_fraction"] = active_parameter_fraction(out.power, n_params)
    return metrics
