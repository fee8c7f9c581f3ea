"""Each partitioner covers the features as specified, repeats from its seed, rejects bad specs."""

import json
import time

import numpy as np
import pytest

from liquid_fed.data import (
    PARTITIONERS,
    Dataset,
    ViewPlan,
    load_dataset,
    make_views,
    split_ids,
    view_summary,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def cancer():
    return load_dataset("breast_cancer")


@pytest.fixture(scope="module")
def diabetes():
    return load_dataset("diabetes")


@pytest.fixture(scope="module")
def rows():
    return load_dataset("digits_rows")


def _covered(plan, n_features):
    every = sorted(c for cols in plan.columns for c in cols)
    return every == list(range(n_features))


# ---- coverage and reproducibility of each partitioner --------------------------------------


@pytest.mark.parametrize("kind, options", [
    ("blocks", {}), ("random", {}), ("importance", {}), ("importance", {"alpha": 0.1}),
    ("correlation", {"beta": 0.0}), ("correlation", {"beta": 1.0}),
])
@pytest.mark.parametrize("data", ["cancer", "digits", "rows"])
def test_partitions_cover_every_feature_once(request, data, kind, options):
    ds = request.getfixturevalue(data)
    k = 3
    plan = make_views(ds, kind, k, seed=4, **options)
    assert plan.n_views == k and plan.kind == kind and plan.layout == ds.layout
    assert _covered(plan, ds.n_features)
    assert all(len(c) >= 1 for c in plan.columns)
    assert plan.names == [[ds.feature_names[c] for c in cols] for cols in plan.columns]
    again = make_views(ds, kind, k, seed=4, **options)
    assert again.columns == plan.columns and again.info == plan.info


def test_blocks_are_contiguous_and_balanced(cancer):
    plan = make_views(cancer, "blocks", 4)
    assert [len(c) for c in plan.columns] == [8, 8, 7, 7]
    assert all(c == list(range(c[0], c[-1] + 1)) for c in plan.columns)
    wine = load_dataset("wine")
    assert [len(c) for c in make_views(wine, "blocks", 3).columns] == [5, 4, 4]


@pytest.mark.parametrize("kind", ["random", "importance", "correlation"])
def test_seed_changes_random_partitions(cancer, kind):
    plans = [make_views(cancer, kind, 3, seed=s).columns for s in range(4)]
    assert any(p != plans[0] for p in plans[1:])


def test_explicit_by_name_and_index(diabetes):
    plan = make_views(diabetes, "explicit", 2,
                      columns=[["age", "sex", "bmi", "bp"], [4, 5, 6, 7, 8, 9]])
    assert plan.names == [["age", "sex", "bmi", "bp"], ["s1", "s2", "s3", "s4", "s5", "s6"]]
    partial = make_views(diabetes, "explicit", 2, columns=[["bmi"], ["bmi", "s5"]])
    assert partial.columns == [[2], [2, 8]]  # features may be left out or shared


@pytest.mark.parametrize("columns, match", [
    ([["age", "bmi2"], ["s1"]],
     r'views.columns\[0\] names column "bmi2", which is not in the data \(columns: age, sex, '
     r"bmi, bp, s1, s2, \.\.\.\)"),
    ([["age"], [3, 10]], r"views.columns\[1\] has index 10, but the data has 10 features"),
    ([["age"], []], r"views.columns\[1\] is empty"),
    ([["age", "age"], ["s1"]], r'views.columns\[0\] lists feature "age" twice'),
    ([["age"]], r"views.columns lists 1 views but n_views=2"),
    (["age", "s1"], r"views.columns must be a list with one list of features per view"),
    ([["age"], [1.5]], r"views.columns\[1\] holds 1.5"),
    (None, r"kind 'explicit' needs views.columns"),
])
def test_explicit_rejects_bad_columns(diabetes, columns, match):
    with pytest.raises(ValueError, match=match):
        make_views(diabetes, "explicit", 2, columns=columns)


def test_groups_default_order_and_merges(cancer, diabetes):
    plan = make_views(cancer, "groups", 3)
    assert plan.names == [cancer.groups[g] for g in ("mean", "se", "worst")]
    assert _covered(plan, 30)
    merged = make_views(cancer, "groups", 2, groups=[["mean", "se"], "worst"])
    assert len(merged.columns[0]) == 20 and merged.info["groups"] == [["mean", "se"], "worst"]
    demo = make_views(diabetes, "groups", 2)
    assert demo.names[0] == ["age", "sex", "bmi", "bp"]


def test_groups_errors(cancer):
    with pytest.raises(ValueError, match=r"3 groups \(mean, se, worst\) but n_views=2"):
        make_views(cancer, "groups", 2)
    with pytest.raises(ValueError, match=r'views.groups\[1\] names group "sd".*mean, se, worst'):
        make_views(cancer, "groups", 2, groups=["mean", "sd"])
    with pytest.raises(ValueError, match=r"data set 'wine' has none"):
        make_views(load_dataset("wine"), "groups", 2)


def test_patches_quadrants(digits):
    plan = make_views(digits, "patches", 4, grid=(2, 2))
    assert _covered(plan, 64)
    assert plan.names[0][:5] == ["r0c0", "r0c1", "r0c2", "r0c3", "r1c0"]
    assert plan.names[3][0] == "r4c4"
    x = plan.apply(digits, 1)
    assert x.shape == (1797, 4, 4) and plan.view_shape(1, digits.features.shape) == (4, 4)
    np.testing.assert_array_equal(x, digits.features[:, :4, 4:])
    assert make_views(digits, "patches", 4).columns == plan.columns  # default grid is 2x2
    halves = make_views(digits, "patches", 2)
    assert halves.info["grid"] == [1, 2] and halves.view_shape(0, (8, 8)) == (8, 4)


def test_patches_errors(digits, cancer):
    with pytest.raises(ValueError, match=r"views.grid 3x1 does not divide the 8x8 image"):
        make_views(digits, "patches", 3, grid=(3, 1))
    with pytest.raises(ValueError, match=r"no grid of 3 patches divides the 8x8 image"):
        make_views(digits, "patches", 3)
    with pytest.raises(ValueError, match=r"views.grid 2x2 gives 4 patches but n_views=2"):
        make_views(digits, "patches", 2, grid=(2, 2))
    with pytest.raises(ValueError, match=r"kind 'patches' needs image data"):
        make_views(cancer, "patches", 2)


def test_channels(rows):
    plan = make_views(rows, "channels", 3)
    assert plan.columns == [[0, 1, 2], [3, 4, 5], [6, 7]]
    x = plan.apply(rows, 2, rows.ids[:5])
    assert x.shape == (5, 8, 2) and plan.view_shape(2, rows.features.shape) == (8, 2)
    np.testing.assert_array_equal(x, rows.features[:5, :, 6:])
    named = make_views(rows, "channels", 2, channels=[["c0", "c7"], [1]])
    assert named.columns == [[0, 7], [1]]
    with pytest.raises(ValueError, match=r'views.channels\[0\] names column "c9"'):
        make_views(rows, "channels", 2, channels=[["c9"], [1]])
    with pytest.raises(ValueError, match="kind 'channels' needs sequence data"):
        make_views(load_dataset("iris"), "channels", 2)


def test_importance_weights_steer_the_shares():
    ds = load_dataset("synthetic_regions", n_samples=500, features_per_group=20,
                      region_visibility="none")
    sizes = np.zeros(3)
    for seed in range(20):
        plan = make_views(ds, "importance", 3, seed=seed, weights=[8.0, 1.0, 1.0], alpha=1.0)
        sizes += [len(c) for c in plan.columns]
        assert sum(plan.info["probabilities"]) == pytest.approx(1.0)
        assert sum(plan.info["importance_share"]) == pytest.approx(1.0)
    assert sizes[0] > 2 * sizes[1] and sizes[0] > 2 * sizes[2]
    with pytest.raises(ValueError, match=r"views.weights must be 3 positive numbers"):
        make_views(ds, "importance", 3, weights=[1, 2])
    with pytest.raises(ValueError, match=r"views.alpha must be > 0"):
        make_views(ds, "importance", 3, alpha=0)


def test_importance_every_view_nonempty_even_when_skewed(cancer):
    for seed in range(10):
        plan = make_views(cancer, "importance", 6, seed=seed, alpha=0.05)
        assert all(plan.columns) and _covered(plan, 30)


def test_correlation_beta_orders_inter_view_correlation(cancer):
    scores = [make_views(cancer, "correlation", 3, beta=b).info["score"]
              for b in (0.0, 0.5, 1.0)]
    assert scores[0] < scores[1] < scores[2]
    low, high = (make_views(cancer, "correlation", 3, beta=b).info for b in (0.0, 1.0))
    assert low["score"] == pytest.approx(low["score_low"])
    assert high["score"] == pytest.approx(high["score_high"])
    with pytest.raises(ValueError, match=r"views.beta must be a number in \[0.0, 1.0\], got 2"):
        make_views(cancer, "correlation", 3, beta=2)


def test_correlation_is_fast_on_digits(digits):
    start = time.perf_counter()
    make_views(digits, "correlation", 4, beta=0.3)
    assert time.perf_counter() - start < 2.0


# ---- make_views door checks ------------------------------------------------------------------


@pytest.mark.parametrize("kind, n_views, options, match", [
    ("blocks", 5, {}, r"views: 5 views requested but the data has only 4 features"),
    ("slices", 2, {}, r'views.kind: unknown partitioner "slices"; must be one of \[.explicit'),
    ("blocks", 0, {}, r"views.n_views must be an integer >= 1, got 0"),
    ("blocks", 2, {"grid": (1, 2)}, r'kind "blocks" has no option "grid" \(options: none\)'),
    ("correlation", 2, {"alpha": 1}, r'no option "alpha" \(options: beta\)'),
    ("blocks", 2, {"overlap": 1.5}, r"views.overlap must be a number in \[0.0, 1.0\]"),
    ("blocks", 2, {"noise": [0.1]}, r"views.noise lists 1 values but n_views=2"),
    ("blocks", 2, {"noise": -1}, r"views.noise must be a number"),
    ("blocks", 2, {"missing": 1.0}, r"views.missing must be a number in \[0.0, 1.0\)"),
    ("blocks", 2, {"missing": [0.1, 2]}, r"views.missing\[1\] must be a number"),
])
def test_make_views_rejects_impossible_specs(kind, n_views, options, match):
    iris = load_dataset("iris")
    with pytest.raises(ValueError, match=match):
        make_views(iris, kind, n_views, **options)


def test_every_partitioner_is_tested():
    # "natural" is tested in test_data_mfeat.py, beside the data set it was made for
    assert set(PARTITIONERS) == {"explicit", "blocks", "random", "groups", "patches", "channels",
                                 "importance", "correlation", "natural"}


# ---- modifiers ---------------------------------------------------------------------------------


def test_overlap_shares_features_between_views(cancer):
    plan = make_views(cancer, "random", 3, seed=1, overlap=0.2)
    shared = plan.info["shared"]
    assert len(shared) == 6
    assert all(set(shared) <= set(c) for c in plan.columns)
    counts = np.bincount([c for cols in plan.columns for c in cols], minlength=30)
    assert np.all(counts >= 1) and (counts == 3).sum() == 6
    base = make_views(cancer, "random", 3, seed=1)
    assert all(set(b) <= set(c) for b, c in zip(base.columns, plan.columns, strict=True))
    assert make_views(cancer, "random", 3, seed=1, overlap=0.2).columns == plan.columns


def test_overlap_grows_patches(digits):
    plan = make_views(digits, "patches", 4, grid=(2, 2), overlap=0.25)
    assert plan.info["margin"] == [1, 1]
    assert [plan.view_shape(k, (8, 8)) for k in range(4)] == [(5, 5)] * 4
    np.testing.assert_array_equal(plan.apply(digits, 3), digits.features[:, 3:, 3:])


def test_noise_is_per_view_and_fixed_by_seed_and_id(cancer):
    plan = make_views(cancer, "blocks", 3, seed=2, noise=[0.0, 0.5, 2.0])
    clean = make_views(cancer, "blocks", 3, seed=2)
    np.testing.assert_array_equal(plan.apply(cancer, 0), clean.apply(cancer, 0))
    full = plan.apply(cancer, 2)
    diff = full - clean.apply(cancer, 2)
    assert diff.std() == pytest.approx(2.0, rel=0.05) and abs(diff.mean()) < 0.05
    some = np.array([300, 5, 17])
    np.testing.assert_allclose(plan.apply(cancer, 2, some), full[some], rtol=1e-6)
    np.testing.assert_array_equal(plan.apply(cancer, 2), full)  # repeatable
    other = make_views(cancer, "blocks", 3, seed=3, noise=[0.0, 0.5, 2.0])
    assert not np.allclose(other.apply(cancer, 2), full)
    d1 = plan.apply(cancer, 1) - clean.apply(cancer, 1)
    assert abs(np.corrcoef(d1[:, 0], diff[:, 0])[0, 1]) < 0.15  # views draw independently


def test_noise_on_sequences_and_images(rows, digits):
    plan = make_views(rows, "channels", 2, noise=1.0)
    x = plan.apply(rows, 0, rows.ids[:50])
    assert x.shape == (50, 8, 4)
    assert (x - rows.features[:50, :, :4]).std() == pytest.approx(1.0, rel=0.1)
    img = make_views(digits, "patches", 4, noise=0.5, seed=1)
    np.testing.assert_array_equal(img.apply(digits, 0, digits.ids[[3]]),
                                  img.apply(digits, 0)[[3]])


def test_missing_samples_are_fixed_and_zeroed(cancer):
    plan = make_views(cancer, "blocks", 2, seed=5, missing=[0.0, 0.3])
    assert plan.present(cancer, 0).all()
    mask = plan.present(cancer, 1)
    assert mask.dtype == bool and mask.mean() == pytest.approx(0.7, abs=0.06)
    some = np.array([10, 3, 400])
    np.testing.assert_array_equal(plan.present(cancer, 1, some), mask[some])
    x = plan.apply(cancer, 1)
    assert np.all(x[~mask] == 0) and np.all(np.abs(x[mask]).sum(axis=1) > 0)
    other = make_views(cancer, "blocks", 2, seed=6, missing=[0.0, 0.3])
    assert not np.array_equal(other.present(cancer, 1), mask)


def test_apply_checks_its_inputs(cancer, digits):
    plan = make_views(cancer, "blocks", 2)
    with pytest.raises(ValueError, match=r"view index must be in \[0, 2\), got 2"):
        plan.apply(cancer, 2)
    with pytest.raises(ValueError, match="1 of 2 ids are not in data set 'breast_cancer'"):
        plan.apply(cancer, 0, np.array([0, 10_000]))
    with pytest.raises(ValueError, match="does not fit data set 'digits'"):
        plan.apply(digits, 0)


def test_plan_round_trips_through_json(digits):
    plan = make_views(digits, "correlation", 4, seed=3, overlap=0.1, noise=0.2, missing=0.1)
    state = json.loads(json.dumps(plan.to_dict()))
    back = ViewPlan.from_dict(state)
    assert back.columns == plan.columns and back.info == state["info"]
    np.testing.assert_array_equal(back.apply(digits, 1), plan.apply(digits, 1))


def test_view_shape_accepts_shapes_with_or_without_n(cancer, rows):
    plan = make_views(cancer, "blocks", 3)
    assert plan.view_shape(0, cancer.features.shape) == plan.view_shape(0, (30,)) == (10,)
    seq = make_views(rows, "random", 2, seed=0)
    assert seq.view_shape(1, rows.features.shape) == (8, 4)


def test_random_pixels_of_an_image_come_back_flat(digits):
    plan = make_views(digits, "random", 4, seed=0)
    assert plan.apply(digits, 0).shape == (1797, 16)


# ---- view summary ------------------------------------------------------------------------------


def test_view_summary_on_digits_quadrants_is_fast_and_partial(digits):
    sp = split_ids(digits, seed=0)
    plan = make_views(digits, "patches", 4)
    start = time.perf_counter()
    summary = view_summary(digits, plan, sp)
    assert time.perf_counter() - start < 2.0  # < 1 s on a quiet machine
    assert [r["view"] for r in summary] == [0, 1, 2, 3, "all"]
    assert summary[0]["n_features"] == 16 and summary[0]["names"][-1] == "... (+8)"
    assert all(r["metric"] == "accuracy" for r in summary)
    assert all(0.45 < r["score"] < 0.85 for r in summary[:4])
    assert summary[-1]["score"] > 0.93
    json.dumps(summary)


def test_view_summary_regression_noise_and_missing(diabetes):
    sp = split_ids(diabetes, seed=0)
    plan = make_views(diabetes, "groups", 2, noise=[0.0, 10.0], missing=[0.5, 0.0])
    summary = view_summary(diabetes, plan, sp)
    assert summary[0]["metric"] == "r2" and 0.3 < summary[0]["present"] < 0.7
    assert summary[1]["score"] < 0.1  # drowned in noise
    assert summary[-1]["score"] > 0.35


def test_view_summary_falls_back_to_test_split():
    ds = Dataset("tiny", np.arange(40), np.random.default_rng(0).normal(size=(40, 4)),
                 np.arange(40) % 2, "classification", "tabular", list("abcd"), 2)
    sp = split_ids(ds, val=0.0, test=0.3)
    summary = view_summary(ds, make_views(ds, "blocks", 2), sp)
    assert len(summary) == 3
