"""Observability per view: Shapley party importance and VertiBench's inter-party correlation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from liquid_fed.data import load_dataset, make_views, split_ids
from liquid_fed.data.probe import (
    inter_party_correlation,
    party_importance,
    spearman_matrix,
    view_observability,
)


def _parties(n: int, sizes: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, s)) for s in sizes]


def _labels(xs: list[np.ndarray], weights: list[float], classes: int, seed: int) -> np.ndarray:
    """Labels from a linear score of each party's first feature (weight 0: the party is
    noise)."""
    rng = np.random.default_rng(seed)
    score = sum(w * x[:, 0] for w, x in zip(weights, xs, strict=True))
    if classes == 2:
        return (score + 0.3 * rng.standard_normal(len(score)) > 0).astype(np.int64)
    cuts = np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1])
    return np.searchsorted(cuts, score + 0.3 * rng.standard_normal(len(score)))


@pytest.mark.parametrize("exact_max", [8, 0], ids=["exact", "permutations"])
def test_shapley_values_are_efficient_and_shares_sum_to_one(exact_max: int) -> None:
    xs = _parties(300, [2, 3, 1, 2], 0)
    y = _labels(xs, [1.0, 0.5, 0.8, 0.0], 3, 1)
    imp = party_importance(xs, y, task="classification", seed=2, exact_max=exact_max,
                           n_permutations=6)
    assert imp.exact == (exact_max == 8)
    assert imp.n_permutations == (0 if imp.exact else 6)
    assert imp.values.shape == (100, 4, 3)
    np.testing.assert_allclose(imp.values.sum(1), imp.full - imp.base, rtol=0, atol=1e-12)
    assert imp.share.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(imp.share, imp.importance / imp.importance.sum(), rtol=1e-12)


@pytest.mark.parametrize("classes", [2, 3])
def test_exact_values_match_the_definition_by_brute_force(classes: int) -> None:
    """Every order of the parties, every background row, sklearn's own predict_proba."""
    xs = _parties(40, [2, 1, 2], 3)
    y = _labels(xs, [1.0, -0.7, 0.4], classes, 4)
    imp = party_importance(xs, y, task="classification", seed=0, max_samples=40,
                           n_background=40)
    x = np.concatenate(xs, 1)
    x = (x - x.mean(0)) / x.std(0)
    model = LogisticRegression(max_iter=300, random_state=0).fit(x, y)
    cols = [[0, 1], [2], [3, 4]]

    def value(i: int, coalition: set[int]) -> np.ndarray:
        rows = x.copy()  # every background row j, with the coalition's features of sample i
        for k in coalition:
            rows[:, cols[k]] = x[i, cols[k]]
        return model.predict_proba(rows).mean(0)

    phi = np.zeros((len(x), 3, classes))
    orders = list(itertools.permutations(range(3)))
    for i in range(len(x)):
        for order in orders:
            seen: set[int] = set()
            for k in order:
                before = value(i, seen)
                seen.add(k)
                phi[i, k] += (value(i, seen) - before) / len(orders)
    np.testing.assert_allclose(imp.values, phi, rtol=0, atol=1e-6)
    np.testing.assert_allclose(imp.importance, np.abs(phi).sum(-1).mean(0), rtol=1e-5)


def test_regression_values_are_the_centred_contributions() -> None:
    """A linear model's party game is additive: φ_ik = W_k (x_ik - mean of the background)."""
    xs = _parties(60, [2, 3], 5)
    y = 2.0 * xs[0][:, 0] - xs[1][:, 1] + 0.1 * np.random.default_rng(6).standard_normal(60)
    imp = party_importance(xs, y, task="regression", max_samples=60, n_background=60)
    x = np.concatenate(xs, 1)
    z = (x - x.mean(0)) / x.std(0)
    from sklearn.linear_model import Ridge

    w = Ridge(alpha=1.0).fit(z, y).coef_
    expect = np.stack([z[:, :2] @ w[:2], z[:, 2:] @ w[2:]], 1)  # background mean is 0
    np.testing.assert_allclose(imp.values[..., 0], expect, rtol=0, atol=1e-10)


def test_a_party_of_pure_noise_gets_almost_no_share() -> None:
    xs = _parties(600, [3, 3, 4], 7)
    y = _labels(xs, [1.0, 0.6, 0.0], 2, 8)
    imp = party_importance(xs, y, seed=1)
    assert imp.share[2] < 0.05
    assert imp.share[0] > imp.share[1] > imp.share[2]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_symmetric_parties_get_equal_shares(task: str) -> None:
    (a, c) = _parties(400, [2, 2], 9)
    y = a[:, 0] + 0.5 * c[:, 1]
    if task == "classification":
        y = (y > 0).astype(np.int64)
    imp = party_importance([a, a.copy(), c], y, task=task)  # parties 0 and 1 are one view
    tol = 1e-9 if task == "regression" else 1e-3  # lbfgs stops at its own tolerance
    assert imp.share[0] == pytest.approx(imp.share[1], abs=tol)
    assert imp.share[0] > 0.1 and imp.share[2] > 0.1


def test_permutation_estimate_agrees_with_exact_enumeration() -> None:
    xs = _parties(300, [2, 1, 3, 2, 1], 11)
    y = _labels(xs, [1.0, 0.4, -0.8, 0.2, 0.0], 3, 12)
    exact = party_importance(xs, y, seed=3, max_samples=30)
    sampled = party_importance(xs, y, seed=3, max_samples=30, exact_max=4, n_permutations=400)
    assert exact.exact and not sampled.exact
    np.testing.assert_allclose(sampled.share, exact.share, atol=0.02)
    np.testing.assert_allclose(sampled.values, exact.values, atol=0.03)


def test_importance_rejects_bad_input_naming_it() -> None:
    xs = _parties(10, [1, 1], 0)
    with pytest.raises(ValueError, match=r"every party needs the same rows, got \[10, 9\]"):
        party_importance([xs[0], xs[1][:9]], np.zeros(10))
    with pytest.raises(ValueError, match="one class only"):
        party_importance(xs, np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="n_permutations must be an integer >= 1, got 0"):
        party_importance(xs, np.arange(10) % 2, n_permutations=0)
    with pytest.raises(ValueError, match=r"task must be .* got 'ranking'"):
        party_importance(xs, np.arange(10) % 2, task="ranking")


# ---- correlation -----------------------------------------------------------------------------


def _vertibench_icor(xs: list[np.ndarray]) -> float:
    """A literal transcription of VertiBench's CorrelationEvaluator (spearman, exact SVD)."""
    x = np.concatenate(xs, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.nan_to_num(np.atleast_2d(spearmanr(x).correlation), nan=0)
    cut = np.insert(np.cumsum([a.shape[1] for a in xs]), 0, 0)
    n = len(xs)
    pcors = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            block = corr[cut[i]:cut[i + 1], cut[j]:cut[j + 1]]
            vals = np.linalg.svd(block, compute_uv=False)
            pcors[i][j] = 0 if len(vals) <= 1 else np.std(vals, ddof=1) / np.sqrt(min(block.shape))
    diffs = np.zeros(n)
    for i in range(n):
        for j in range(n):
            if i != j:
                diffs[i] += pcors[j][i] - pcors[i][i]
        diffs[i] /= n - 1
    return float(np.mean(diffs))


def test_correlation_matches_a_transcription_of_vertibench() -> None:
    rng = np.random.default_rng(13)
    base = rng.standard_normal((500, 4))
    mix = base @ rng.standard_normal((4, 9)) + 0.5 * rng.standard_normal((500, 9))
    xs = [mix[:, :2], mix[:, 2:6], mix[:, 6:]]
    result = inter_party_correlation(xs)
    assert result.icor == pytest.approx(_vertibench_icor(xs), abs=1e-12)
    assert result.pcor.shape == (3, 3)
    np.testing.assert_allclose(result.pcor, result.pcor.T, atol=1e-12)


def test_correlation_against_a_hand_computed_value() -> None:
    """A = [a, a³] (rank-identical columns), B = [exp a, b]: with r = ρ(a, b), the blocks are
    [[1, 1], [1, 1]] (score 1), [[1, r], [r, 1]] (score |r|) and [[1, r], [1, r]] (one
    singular value sqrt(2 (1 + r²)), score sqrt((1 + r²) / 2))."""
    rng = np.random.default_rng(14)
    a = rng.standard_normal(300)
    b = 0.6 * a + rng.standard_normal(300)
    r = spearmanr(a, b).statistic
    result = inter_party_correlation([np.stack([a, a**3], 1), np.stack([np.exp(a), b], 1)])
    s = math.sqrt((1 + r * r) / 2)
    np.testing.assert_allclose(result.pcor, [[1.0, s], [s, abs(r)]], rtol=0, atol=1e-12)
    assert result.inner == pytest.approx((1 + abs(r)) / 2, abs=1e-12)
    assert result.inter == pytest.approx(s, abs=1e-12)
    assert result.icor == pytest.approx(((s - 1) + (s - abs(r))) / 2, abs=1e-12)


def test_independent_parties_score_near_zero_and_duplicated_parties_high() -> None:
    independent = inter_party_correlation(_parties(2000, [4, 4, 4], 15))
    assert abs(independent.icor) < 0.05 and independent.inter < 0.05

    a, b = _parties(2000, [1, 1], 16)
    party = np.concatenate([a, a**3, np.tanh(a)], 1)  # one variable, three monotone views
    other = np.concatenate([b, b**3, np.tanh(b)], 1)
    duplicated = inter_party_correlation([party, party.copy()])
    separate = inter_party_correlation([party, other])
    assert duplicated.inter == pytest.approx(1.0, abs=1e-9)
    assert duplicated.icor == pytest.approx(0.0, abs=1e-9)  # as related across as within
    assert separate.inter < 0.05 and separate.icor == pytest.approx(-1.0, abs=0.05)


def test_constant_features_correlate_zero() -> None:
    x = np.column_stack([np.arange(6.0), np.ones(6), np.arange(6.0) ** 2])
    corr = spearman_matrix(x)
    np.testing.assert_allclose(corr, [[1, 0, 1], [0, 0, 0], [1, 0, 1]], atol=1e-12)
    assert np.isfinite(inter_party_correlation([x[:, :2], x[:, 2:]]).icor)


def test_view_observability_of_a_run_finds_the_informative_view() -> None:
    """One region: only group g0 carries the label; g1 and the distractors are noise."""
    ds = load_dataset("synthetic_regions", n_samples=600, n_regions=1, n_groups=2,
                      features_per_group=3, n_distractors=3, region_visibility="none", seed=0)
    noise_cols = [c for c in ds.feature_names if "_d" in c]
    columns = [ds.groups["g0"][:3], ds.groups["g1"][:3], noise_cols]
    plan = make_views(ds, "explicit", 3, seed=0, columns=columns, missing=[0.0, 0.0, 0.2])
    obs = view_observability(ds, plan, split_ids(ds, 0.15, 0.2, 0), seed=0)
    assert set(obs) == {"importance_share", "importance", "importance_exact", "icor",
                        "inter_correlation", "inner_correlation", "pcor"}
    share = obs["importance_share"]
    assert sum(share) == pytest.approx(1.0)
    assert share[0] > 0.8 and share[1] < 0.1 and share[2] < 0.1
    assert obs["importance_exact"] is True
    # every feature is drawn independently: no block correlates
    assert abs(obs["icor"]) < 0.1 and obs["inter_correlation"] < 0.1
