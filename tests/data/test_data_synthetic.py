"""The synthetic generators' ground truth: in each region only the informative view predicts."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge
from threadpoolctl import threadpool_limits

from liquid_fed.data import load_dataset, make_views, split_ids


def _probe_by_region(ds, view_cols):
    """Validation score per (region, view) of a linear model fitted on that region only."""
    with threadpool_limits(limits=1):  # tiny fits; BLAS threads only contend on a busy machine
        return _probe_by_region_unlimited(ds, view_cols)


def _probe_by_region_unlimited(ds, view_cols):
    """`_probe_by_region` without the thread limit."""
    sp = split_ids(ds, seed=1)
    tr, va = ds.positions(sp.train), ds.positions(sp.val)
    x = ds.features.reshape(ds.n_samples, ds.features.shape[1], -1)  # (N, F or T, 1 or C)
    scores = np.zeros((ds.regions.max() + 1, len(view_cols)))
    for r in range(scores.shape[0]):
        rtr, rva = tr[ds.regions[tr] == r], va[ds.regions[va] == r]
        for v, cols in enumerate(view_cols):
            xs = x[..., cols] if ds.layout == "sequence" else x[:, cols, 0]
            xtr, xva = xs[rtr].reshape(len(rtr), -1), xs[rva].reshape(len(rva), -1)
            model = (LogisticRegression(max_iter=300) if ds.task == "classification"
                     else Ridge(alpha=1.0))
            scores[r, v] = model.fit(xtr, ds.labels[rtr]).score(xva, ds.labels[rva])
    return scores


def _group_cols(ds):
    return [[ds.feature_names.index(c) for c in ds.groups[g]] for g in sorted(ds.groups)]


@pytest.mark.parametrize("visibility", ["shared", "noisy", "none"])
def test_classification_ground_truth(visibility):
    ds = load_dataset("synthetic_regions", n_samples=2000, region_visibility=visibility, seed=3)
    scores = _probe_by_region(ds, _group_cols(ds))
    majority = max(np.mean(ds.labels), 1 - np.mean(ds.labels))
    for r in range(4):
        g = r % 4
        assert scores[r, g] > 0.85, scores
        others = np.delete(scores[r], g)
        assert np.all(others < majority + 0.15), scores


def test_regression_ground_truth_and_more_regions_than_groups():
    ds = load_dataset("synthetic_regions", n_samples=2400, n_regions=6, n_groups=3,
                      task="regression", seed=0)
    assert ds.n_outputs == 1 and ds.labels.shape == (2400,)
    np.testing.assert_array_equal(ds.informative_view, ds.regions % 3)
    scores = _probe_by_region(ds, _group_cols(ds))
    for r in range(6):
        assert scores[r, r % 3] > 0.9, scores
        assert np.all(np.delete(scores[r], r % 3) < 0.1), scores


def test_multiclass_and_multioutput():
    ds = load_dataset("synthetic_regions", n_samples=600, n_classes=4, seed=2)
    assert ds.n_outputs == 4 and set(np.unique(ds.labels)) == {0, 1, 2, 3}
    reg = load_dataset("synthetic_regions", n_samples=600, task="regression", n_outputs=3)
    assert reg.labels.shape == (600, 3) and reg.n_outputs == 3


def test_layout_of_columns_and_region_features():
    ds = load_dataset("synthetic_regions", n_samples=400, n_regions=3, n_groups=2,
                      features_per_group=4, n_distractors=2)
    assert ds.features.shape == (400, 2 * (4 + 3 + 2))
    assert ds.groups["g1"] == [f"g1_x{i}" for i in range(4)] + [
        f"g1_region{r}" for r in range(3)] + ["g1_d0", "g1_d1"]
    region_cols = [ds.feature_names.index(f"g0_region{r}") for r in range(3)]
    np.testing.assert_array_equal(ds.features[:, region_cols].argmax(axis=1), ds.regions)
    np.testing.assert_array_equal(np.bincount(ds.regions), [134, 133, 133])  # balanced
    noisy = load_dataset("synthetic_regions", n_samples=400, region_visibility="noisy",
                         region_noise=0.3)
    cols = [noisy.feature_names.index(f"g2_region{r}") for r in range(4)]
    err = noisy.features[:, cols] - np.eye(4)[noisy.regions]
    assert 0.25 < err.std() < 0.35
    none = load_dataset("synthetic_regions", n_samples=400, region_visibility="none")
    assert not any("region" in n for n in none.feature_names)


def test_groups_partitioner_gives_one_view_per_group():
    ds = load_dataset("synthetic_regions", n_samples=300)
    plan = make_views(ds, "groups", 4)
    assert plan.names == [ds.groups[f"g{g}"] for g in range(4)]


def test_deterministic_from_seed():
    a, b = (load_dataset("synthetic_regions", n_samples=500, seed=5) for _ in range(2))
    c = load_dataset("synthetic_regions", n_samples=500, seed=6)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.features, c.features)
    s1, s2 = load_dataset("sensors", n_samples=200), load_dataset("sensors", n_samples=200)
    np.testing.assert_array_equal(s1.features, s2.features)


@pytest.mark.parametrize("option, value, match", [
    ("n_samples", 0, r"synthetic_regions.n_samples must be an integer >= 1, got 0"),
    ("task", "ranking", r"synthetic_regions.task must be one of"),
    ("region_visibility", "half", r"region_visibility must be one of \['shared', 'noisy'"),
    ("noise", -1.0, r"synthetic_regions.noise must be a number"),
    ("n_classes", 1, r"n_classes must be an integer >= 2"),
])
def test_synthetic_rejects_bad_options(option, value, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("synthetic_regions", **{option: value})


def test_sensors_ground_truth():
    ds = load_dataset("sensors", n_samples=1600, seed=1)
    assert ds.features.shape == (1600, 32, 4) and ds.layout == "sequence"
    np.testing.assert_array_equal(ds.informative_view, ds.regions % 4)
    scores = _probe_by_region(ds, [[c] for c in range(4)])
    for r in range(4):
        assert scores[r, r] > 0.9, scores
        assert np.all(np.delete(scores[r], r) < 0.7), scores


def test_sensors_signal_only_in_event_segment():
    ds = load_dataset("sensors", n_samples=400, n_steps=16, n_channels=2, n_segments=4,
                      noise=0.0)
    for i in range(20):
        seg, ch = ds.regions[i], ds.informative_view[i]
        active = np.flatnonzero(np.abs(ds.features[i]).sum(axis=1) > 1e-6)
        assert set(active) <= set(range(4 * seg, 4 * seg + 4))
        assert np.abs(ds.features[i, :, 1 - ch]).max() == 0


def test_sensors_regression_and_errors():
    ds = load_dataset("sensors", n_samples=100, task="regression")
    assert ds.labels.dtype == np.float32 and ds.n_outputs == 1
    with pytest.raises(ValueError, match=r"sensors.n_steps must be an integer >= 8, got 6"):
        load_dataset("sensors", n_steps=6, n_segments=4)
