"""Observability of each view on VertiBench's two axes: party importance and inter-party
correlation (Wu et al., "VertiBench: Advancing Feature Distribution Diversity in Vertical
Federated Learning Benchmarks", ICLR 2024; code: github.com/Xtra-Computing/VertiBench,
``src/vertibench/Evaluator.py``).

- :func:`party_importance`: each party's share of a model's Shapley importance, the quantity
  VertiBench's ``ImportanceEvaluator`` measures and from which it estimates α.
- :func:`inter_party_correlation`: VertiBench's ``CorrelationEvaluator`` score ``Icor``, from
  which it estimates β, with its inner- and inter-party parts.
- :func:`view_observability`: both for the views of a run, as the clients hold them.
- :func:`view_summary`: a linear probe per view against all features (how partial each view
  is), written to every run's ``views.json``.

Both work on plain arrays, one (n, F_k) matrix per party, rows aligned.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from liquid_fed.data.dataset import Dataset
from liquid_fed.data.splits import Splits, Standardizer
from liquid_fed.data.views import ViewPlan

logger = logging.getLogger(__name__)


# ---- party importance ------------------------------------------------------------------------


@dataclass
class PartyImportance:
    """Shapley values of parties for a linear probe, per explained sample and in summary.

    ``values[i, k, c]`` is party k's Shapley value for output c of sample i; by efficiency,
    ``values.sum(1) == full - base`` for every sample. ``importance[k]`` is the mean over
    samples of ``Σ_c |values[i, k, c]|`` and ``share`` its normalisation to sum 1.
    """

    share: np.ndarray  # (K,) sums to 1
    importance: np.ndarray  # (K,)
    values: np.ndarray  # (n, K, C)
    base: np.ndarray  # (n, C) value of the empty coalition (every party at its background)
    full: np.ndarray  # (n, C) value of the grand coalition (the model's output)
    exact: bool  # all 2^K coalitions enumerated (else sampled permutations)
    n_permutations: int  # permutations sampled (0 when exact)

    def to_dict(self) -> dict:
        """JSON-able summary (without the per-sample values)."""
        return {"share": self.share.tolist(), "importance": self.importance.tolist(),
                "exact": self.exact, "n_permutations": self.n_permutations,
                "n_samples": int(self.values.shape[0])}


def _as_parties(xs: Sequence[np.ndarray], what: str) -> list[np.ndarray]:
    if len(xs) == 0:
        raise ValueError(f"{what}: needs at least one party, got none")
    out = [np.asarray(x, dtype=np.float64).reshape(len(x), -1) for x in xs]
    rows = {x.shape[0] for x in out}
    if len(rows) != 1:
        raise ValueError(f"{what}: every party needs the same rows, got {[len(x) for x in out]}")
    for k, x in enumerate(out):
        if x.shape[1] == 0:
            raise ValueError(f"{what}: party {k} has no features")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{what}: party {k} holds non-finite values")
    return out


def _fit_linear(x: np.ndarray, y: np.ndarray, task: str, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(W (C, F), b (C,), classes) of logistic regression (softmax) or ridge regression."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge

    if task == "classification":
        classes = np.unique(y)
        if classes.size < 2:
            raise ValueError(f"party_importance: the training labels hold one class only "
                             f"({classes[0]!r}); Shapley values of a constant model are 0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(max_iter=300, random_state=seed).fit(x, y)
        w, b = model.coef_, model.intercept_
        if classes.size == 2:  # sklearn keeps one logit for two classes: make it a softmax
            w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
        return w, b, classes
    model = Ridge(alpha=1.0).fit(x, y.reshape(len(y), -1))
    return np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_), None


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


class _Game:
    """Per-sample coalition values of an additive-logit model with background replacement.

    For sample i and coalition S, ``v_i(S) = mean_j link(Σ_{k∈S} u_ik + Σ_{k∉S} g_jk + b)``
    with ``u_ik = W_k x_ik`` (the party's own contribution), ``g_jk = W_k x_jk`` over
    background rows j, and link = softmax (classification) or identity (regression).
    """

    def __init__(self, u: np.ndarray, g: np.ndarray, bias: np.ndarray, task: str) -> None:
        self.u, self.g, self.bias, self.task = u, g, bias, task  # (n, K, C), (m, K, C), (C,)
        self.cache: dict[int, np.ndarray] = {}

    def value(self, mask: int) -> np.ndarray:
        if mask not in self.cache:
            k = self.u.shape[1]
            inside = np.array([(mask >> j) & 1 for j in range(k)], dtype=bool)
            own = self.u[:, inside].sum(1)  # (n, C)
            rest = self.g[:, ~inside].sum(1)  # (m, C)
            if self.task == "classification":
                z = own[:, None, :] + rest[None, :, :] + self.bias  # (n, m, C)
                self.cache[mask] = _softmax(z).mean(1)
            else:  # the mean of an affine map is the map of the mean
                self.cache[mask] = own + rest.mean(0) + self.bias
        return self.cache[mask]


def _exact_shapley(game: _Game, k: int) -> np.ndarray:
    n, c = game.u.shape[0], game.u.shape[2]
    phi = np.zeros((n, k, c))
    for j in range(k):
        others = [i for i in range(k) if i != j]
        for size in range(k):
            weight = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for subset in itertools.combinations(others, size):
                mask = sum(1 << i for i in subset)
                phi[:, j] += weight * (game.value(mask | (1 << j)) - game.value(mask))
    return phi


def _permutation_shapley(game: _Game, k: int, n_permutations: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Mean marginal contributions over sampled orders, each with its reverse (antithetic
    pairs, as shap's permutation explainer does)."""
    n, c = game.u.shape[0], game.u.shape[2]
    phi = np.zeros((n, k, c))
    count = 0
    for _ in range(max(1, n_permutations // 2)):
        order = rng.permutation(k)
        for perm in (order, order[::-1]):
            mask, previous = 0, game.value(0)
            for j in perm:
                mask |= 1 << int(j)
                current = game.value(mask)
                phi[:, j] += current - previous
                previous = current
            count += 1
    return phi / count


def party_importance(x_train: Sequence[np.ndarray], y_train: np.ndarray,
                     x_eval: Sequence[np.ndarray] | None = None, task: str = "classification",
                     seed: int = 0, max_samples: int = 100, n_background: int = 50,
                     n_permutations: int = 32, exact_max: int = 8) -> PartyImportance:
    """Each party's Shapley importance for a linear probe on all parties' features.

    Definition (VertiBench's ``ImportanceEvaluator.evaluate``): a model trained on all
    features is explained with Shapley values, where a coalition's value for a sample is the
    model's expected output when the features outside the coalition are replaced by those of
    background rows (shap's permutation explainer with an independent masker over the data);
    a party's importance is the mean over explained samples of the absolute Shapley value it
    receives, and its share (VertiBench normalises the scores before estimating α) is that
    importance over the sum of all. What differs here, to stay cheap for every study cell:

    - the players are the K parties themselves (exact Shapley values of the party game),
      where VertiBench computes per-feature values and sums their absolute values per party
      (``Σ_features |φ|`` is at least ``|Σ_features φ|``, so feature-level sums credit
      features whose effects cancel inside a party);
    - the model is logistic regression (class probabilities are explained, the absolute
      values summed over classes) or ridge regression, on standardised features, instead
      of a user-given model (VertiBench's tests use XGBoost's ``predict``);
    - with K <= ``exact_max`` all 2^K coalitions are enumerated; above, ``n_permutations``
      seeded orders (antithetic pairs) are sampled. Both satisfy efficiency per sample.

    Args:
        x_train: one (n, F_k) matrix per party (training rows), standardised or not.
        y_train: (n,) labels or (n,) / (n, O) targets.
        x_eval: the rows to explain (validation rows; default: the training rows).
        task: ``classification`` or ``regression``.
        seed: seed of the sampled rows and permutations.
        max_samples: at most this many rows of ``x_eval`` are explained (sampled).
        n_background: at most this many training rows form the background.
        n_permutations: sampled orders when K > ``exact_max``.
        exact_max: the largest K enumerated exactly.

    Returns:
        A :class:`PartyImportance`.

    Raises:
        ValueError: no parties, rows that disagree, non-finite values, one class only, an
            unknown task or a non-positive count.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f'party_importance: task must be "classification" or "regression", '
                         f"got {task!r}")
    for name, value in (("max_samples", max_samples), ("n_background", n_background),
                        ("n_permutations", n_permutations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"party_importance: {name} must be an integer >= 1, got {value!r}")
    xs = _as_parties(x_train, "party_importance x_train")
    evals = xs if x_eval is None else _as_parties(x_eval, "party_importance x_eval")
    if len(evals) != len(xs):
        raise ValueError(f"party_importance: {len(xs)} parties in x_train but {len(evals)} in "
                         "x_eval")
    y = np.asarray(y_train)
    if y.shape[0] != xs[0].shape[0]:
        raise ValueError(f"party_importance: y_train has {y.shape[0]} rows, x_train "
                         f"{xs[0].shape[0]}")
    sizes = [x.shape[1] for x in xs]
    mean = np.concatenate([x.mean(0) for x in xs])
    std = np.concatenate([x.std(0) for x in xs])
    std = np.where(std > 1e-12, std, 1.0)
    full_train = (np.concatenate(xs, 1) - mean) / std
    full_eval = (np.concatenate(evals, 1) - mean) / std
    w, b, _ = _fit_linear(full_train, y, task, seed)  # (C, F), (C,)

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(full_eval), min(max_samples, len(full_eval)), replace=False))
    back = np.sort(rng.choice(len(full_train), min(n_background, len(full_train)),
                              replace=False))
    cuts = np.cumsum([0, *sizes])
    k = len(xs)

    def contributions(x: np.ndarray) -> np.ndarray:  # (rows, K, C)
        return np.stack([x[:, cuts[j]:cuts[j + 1]] @ w[:, cuts[j]:cuts[j + 1]].T
                         for j in range(k)], 1)

    game = _Game(contributions(full_eval[pick]), contributions(full_train[back]), b, task)
    exact = k <= exact_max
    phi = _exact_shapley(game, k) if exact else _permutation_shapley(game, k, n_permutations,
                                                                      rng)
    importance = np.abs(phi).sum(-1).mean(0)  # (K,)
    total = importance.sum()
    share = importance / total if total > 0 else np.full(k, 1.0 / k)
    logger.debug("party importance (%s): %s", "exact" if exact else "sampled",
                 np.round(share, 3).tolist())
    return PartyImportance(share, importance, phi, game.value(0), game.value((1 << k) - 1),
                           exact, 0 if exact else 2 * max(1, n_permutations // 2))


# ---- inter-party correlation -----------------------------------------------------------------


@dataclass
class PartyCorrelation:
    """VertiBench's correlation score of a split, with its parts.

    ``pcor[i, j]`` scores the block of Spearman correlations between the features of party i
    (rows) and party j (columns): the standard deviation (ddof 1) of its singular values over
    ``sqrt(min(F_i, F_j))``: 0 for an orthogonal block (e.g. independent features, or one
    feature), 1 for a rank-one block of ±1 (every feature a monotone function of one
    variable). ``inner`` is the mean of the diagonal, ``inter`` the mean over i != j and
    ``icor = mean_i [mean_{j != i} pcor[j, i] - pcor[i, i]]`` is VertiBench's ``Icor``.
    """

    icor: float
    inter: float
    inner: float
    pcor: np.ndarray  # (K, K)

    def to_dict(self) -> dict:
        """JSON-able record."""
        return {"icor": self.icor, "inter": self.inter, "inner": self.inner,
                "pcor": self.pcor.tolist()}


def spearman_matrix(x: np.ndarray) -> np.ndarray:
    """(F, F) Spearman correlations of the columns of ``x`` (average ranks for ties); a
    constant column correlates 0 with everything, itself included (as VertiBench's
    pandas-based ``spearmanr_pandas`` after ``nan_to_num``)."""
    from scipy.stats import rankdata

    r = rankdata(np.asarray(x, dtype=np.float64), axis=0)
    r = r - r.mean(0)
    norm = np.sqrt((r * r).sum(0))
    ok = norm > 1e-12
    z = np.where(ok, r / np.where(ok, norm, 1.0), 0.0)
    return z.T @ z


def _pcor(block: np.ndarray) -> float:
    """std (ddof 1) of the singular values over sqrt(min dimension); 0 below two values."""
    if min(block.shape) <= 1:
        return 0.0
    values = np.linalg.svd(block, compute_uv=False)
    return float(np.std(values, ddof=1) / math.sqrt(min(block.shape)))


def inter_party_correlation(xs: Sequence[np.ndarray], max_rows: int = 2000,
                            seed: int = 0) -> PartyCorrelation:
    """VertiBench's inter-party correlation score ``Icor`` of a vertical split.

    Definition (VertiBench's ``CorrelationEvaluator``: ``fit`` + ``overall_corr_score``):
    Spearman correlations of all features, cut into blocks by party; each block scored by
    the spread of its singular values (:class:`PartyCorrelation`); ``Icor`` = the mean over
    parties of (mean score of the blocks linking the party to the others minus the score of
    its own block). High when parties share information, low when each party's features are
    correlated among themselves but not with the other parties'. What differs: every block's
    singular values are exact (VertiBench switches to a randomized SVD for blocks of 100
    features or more), rows are subsampled to ``max_rows``, and β (``Icor`` scaled between
    its minimum and maximum over all splits, which VertiBench searches with BRKGA) is not
    computed: the ``correlation`` view partitioner records a cheaper min/max of mean |corr|.

    Args:
        xs: one (n, F_k) matrix per party, rows aligned (further axes are flattened).
        max_rows: at most this many rows are used (sampled with ``seed``).
        seed: seed of the row sample.

    Returns:
        A :class:`PartyCorrelation` (``icor``, ``inter``, ``inner``, ``pcor`` (K, K)).

    Raises:
        ValueError: no parties, rows that disagree, fewer than two rows, non-finite values.
    """
    parts = _as_parties(xs, "inter_party_correlation")
    n = parts[0].shape[0]
    if n < 2:
        raise ValueError(f"inter_party_correlation: needs at least 2 rows, got {n}")
    if n > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))
        parts = [x[rows] for x in parts]
    corr = spearman_matrix(np.concatenate(parts, 1))
    cuts = np.cumsum([0, *[x.shape[1] for x in parts]])
    k = len(parts)
    pcor = np.array([[_pcor(corr[cuts[i]:cuts[i + 1], cuts[j]:cuts[j + 1]]) for j in range(k)]
                     for i in range(k)])
    inner = float(np.mean(np.diag(pcor)))
    if k == 1:
        return PartyCorrelation(0.0, 0.0, inner, pcor)
    off = ~np.eye(k, dtype=bool)
    inter = float(pcor[off].mean())
    icor = float(np.mean([(pcor[:, i][off[:, i]].sum()) / (k - 1) - pcor[i, i]
                          for i in range(k)]))
    return PartyCorrelation(icor, inter, inner, pcor)


# ---- both, for a run's views -----------------------------------------------------------------


def _standardised_views(ds: Dataset, plan: ViewPlan, splits: Splits, ids: np.ndarray
                        ) -> list[np.ndarray]:
    """Each view of ``ids`` as its client holds it (noise, absent rows) flattened, standardised
    on the training rows it holds; absent rows are 0 (the mean)."""
    out = []
    for k in range(plan.n_views):
        x_tr = plan.apply(ds, k, splits.train).reshape(len(splits.train), -1)
        p_tr = plan.present(ds, k, splits.train)
        x = plan.apply(ds, k, ids).reshape(len(ids), -1).astype(np.float64)
        fit = x_tr[p_tr] if p_tr.any() else x_tr
        mean, std = fit.mean(0), fit.std(0)
        x = (x - mean) / np.where(std > 1e-12, std, 1.0)
        x[~plan.present(ds, k, ids)] = 0.0
        out.append(x)
    return out


def view_observability(ds: Dataset, plan: ViewPlan, splits: Splits, seed: int = 0,
                       **importance_options: int) -> dict:
    """Importance shares and inter-party correlation of a run's views, for ``views.json``.

    Importance: a linear probe fitted on the training rows, explained on the validation rows
    (test rows when there are none); correlation on the training rows.

    Args:
        ds: the data set the plan was made for.
        plan: the views.
        splits: train / validation / test ids.
        seed: seed of the probe, the sampled rows and permutations.
        **importance_options: ``max_samples``, ``n_background``, ``n_permutations``,
            ``exact_max`` of :func:`party_importance`.

    Returns:
        ``{"importance_share": [K], "importance": [K], "importance_exact": bool,
        "icor": float, "inter_correlation": float, "inner_correlation": float,
        "pcor": [[K x K]]}``.

    Raises:
        ValueError: split ids that are not in the data set, or no rows to explain.
    """
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    score_ids = splits.val if len(splits.val) else splits.test
    if len(score_ids) == 0 or len(splits.train) == 0:
        raise ValueError("view_observability: needs training rows and validation or test rows")
    with threadpool_limits(limits=1):  # tiny fits: BLAS threads only cost on a busy machine
        x_tr = _standardised_views(ds, plan, splits, splits.train)
        x_ev = _standardised_views(ds, plan, splits, score_ids)
        y_tr = ds.labels[ds.positions(splits.train)]
        imp = party_importance(x_tr, y_tr, x_ev, ds.task, seed=seed, **importance_options)
        corr = inter_party_correlation(x_tr, seed=seed)
    return {"importance_share": imp.share.tolist(), "importance": imp.importance.tolist(),
            "importance_exact": imp.exact, "icor": corr.icor,
            "inter_correlation": corr.inter, "inner_correlation": corr.inner,
            "pcor": corr.pcor.tolist()}


# ---- linear probe per view ----------------------------------------------------------------


def _probe(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, task: str,
           seed: int) -> float:
    """Validation accuracy of logistic regression or R^2 of ridge, on standardised inputs."""
    if len(x_tr) == 0 or len(x_va) == 0:
        return float("nan")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge

    scaler = Standardizer("tabular").fit(x_tr)
    x_tr, x_va = scaler.transform(x_tr), scaler.transform(x_va)
    if task == "classification":
        if len(np.unique(y_tr)) < 2:
            return float(np.mean(y_va == y_tr[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(max_iter=200, random_state=seed).fit(x_tr, y_tr)
        return float(model.score(x_va, y_va))
    return float(Ridge(alpha=1.0).fit(x_tr, y_tr).score(x_va, y_va))


def view_summary(ds: Dataset, plan: ViewPlan, splits: Splits, seed: int = 0) -> list[dict]:
    """How partial each view is: its features and a linear probe on it alone.

    Args:
        ds: the data set the plan was made for.
        plan: the views.
        splits: the probe fits on `splits.train` and scores on `splits.val` (or on
            `splits.test` when there is no validation split).
        seed: seed of the probe.

    Returns:
        One dict per view, then one for all features (view "all"): "view", "n_features",
        "names" (the first 8), "present" (share of scored samples the view holds), "noise",
        "metric" ("accuracy" from logistic regression or "r2" from ridge) and "score"
        (on the samples the view holds, with its noise).

    Raises:
        ValueError: split ids that are not in the data set, or no samples to score on.
    """
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # one BLAS thread: these fits are tiny, and on a busy machine threads cost 10-50x
    with threadpool_limits(limits=1):
        return _view_summary(ds, plan, splits, seed)


def _view_summary(ds: Dataset, plan: ViewPlan, splits: Splits, seed: int) -> list[dict]:
    """`view_summary` without the thread limit."""
    train, score_ids = splits.train, splits.val if len(splits.val) else splits.test
    if len(score_ids) == 0:
        raise ValueError("view_summary: splits have neither validation nor test ids")
    y_tr, y_va = ds.labels[ds.positions(train)], ds.labels[ds.positions(score_ids)]
    metric = "accuracy" if ds.task == "classification" else "r2"
    rows = []
    for k in range(plan.n_views):
        x_tr = plan.apply(ds, k, train).reshape(len(train), -1)
        x_va = plan.apply(ds, k, score_ids).reshape(len(score_ids), -1)
        p_tr, p_va = plan.present(ds, k, train), plan.present(ds, k, score_ids)
        names = plan.names[k]
        rows.append({
            "view": k, "n_features": len(names),
            "names": names[:8] + ([f"... (+{len(names) - 8})"] if len(names) > 8 else []),
            "present": float(p_va.mean()), "noise": plan.noise[k], "metric": metric,
            "score": _probe(x_tr[p_tr], y_tr[p_tr], x_va[p_va], y_va[p_va], ds.task, seed),
        })
    x_tr = ds.features[ds.positions(train)].reshape(len(train), -1)
    x_va = ds.features[ds.positions(score_ids)].reshape(len(score_ids), -1)
    rows.append({"view": "all", "n_features": ds.n_features,
                 "names": ds.feature_names[:8] + (
                     [f"... (+{ds.n_features - 8})"] if ds.n_features > 8 else []),
                 "present": 1.0, "noise": 0.0, "metric": metric,
                 "score": _probe(x_tr, y_tr, x_va, y_va, ds.task, seed)})
    logger.info("view summary for %s/%s: %s", ds.name, plan.kind,
                ", ".join(f"{r['view']}={r['score']:.3f}" for r in rows))
    return rows
