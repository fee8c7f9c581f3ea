"""Bundled and synthetic data sets load offline with the right shapes; the registry checks names."""

import dataclasses

import numpy as np
import pytest

from liquid_fed.data import DATASETS, Dataset, load_dataset

EXPECTED = {
    # name: (features shape, layout, task, n_outputs, groups)
    "digits": ((1797, 8, 8), "image", "classification", 10, set()),
    "digits_flat": ((1797, 64), "tabular", "classification", 10, set()),
    "digits_rows": ((1797, 8, 8), "sequence", "classification", 10, set()),
    "breast_cancer": ((569, 30), "tabular", "classification", 2, {"mean", "se", "worst"}),
    "wine": ((178, 13), "tabular", "classification", 3, set()),
    "diabetes": ((442, 10), "tabular", "regression", 1, {"demographics", "serum"}),
    "iris": ((150, 4), "tabular", "classification", 3, {"sepal", "petal"}),
    "synthetic_regions": ((3000, 36), "tabular", "classification", 2, {"g0", "g1", "g2", "g3"}),
    "sensors": ((2000, 32, 4), "sequence", "classification", 2, set()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_offline_with_shapes(name):
    shape, layout, task, n_out, groups = EXPECTED[name]
    ds = load_dataset(name)
    assert ds.features.shape == shape and ds.features.dtype == np.float32
    assert (ds.layout, ds.task, ds.n_outputs) == (layout, task, n_out)
    assert ds.ids.dtype == np.int64 and len(np.unique(ds.ids)) == shape[0]
    assert ds.labels.shape == (shape[0],)
    if task == "classification":
        assert ds.labels.dtype == np.int64
        assert set(np.unique(ds.labels)) == set(range(n_out))
    else:
        assert ds.labels.dtype == np.float32
    assert len(ds.feature_names) == ds.n_features
    assert set(ds.groups) == groups
    for cols in ds.groups.values():
        assert set(cols) <= set(ds.feature_names)


def test_every_registry_entry_is_covered():
    # mfeat, mnist_5k and bikeshare need optional files: tested in test_data_mfeat.py and
    # test_data_packaged.py with and without them
    assert set(DATASETS) == set(EXPECTED) | {"csv", "npz", "mfeat", "mnist_5k", "bikeshare"}


def test_feature_names_per_layout():
    assert load_dataset("digits").feature_names[:3] == ["r0c0", "r0c1", "r0c2"]
    assert load_dataset("digits").feature_names[9] == "r1c1"
    assert load_dataset("digits_flat").feature_names == load_dataset("digits").feature_names
    assert load_dataset("digits_rows").feature_names == [f"c{j}" for j in range(8)]


def test_digits_read_from_the_file_equal_sklearns_load_digits(monkeypatch):
    from sklearn.datasets import load_digits

    from liquid_fed.data import datasets

    bunch = load_digits()
    ds = load_dataset("digits")
    np.testing.assert_array_equal(ds.features, bunch.images.astype(np.float32))
    np.testing.assert_array_equal(ds.labels, bunch.target)
    # Where the file is not found, sklearn's loader gives the same.
    monkeypatch.setattr(datasets, "_sk_data_file", lambda name: None)
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.features, ds.features)
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_digits_load_without_importing_sklearn():
    import subprocess
    import sys

    code = ("import sys; from liquid_fed.data import load_dataset; load_dataset('digits'); "
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_digit_views_agree():
    img, flat, rows = (load_dataset(n) for n in ("digits", "digits_flat", "digits_rows"))
    np.testing.assert_array_equal(img.features.reshape(len(img.ids), 64), flat.features)
    np.testing.assert_array_equal(img.features, rows.features)  # rows are steps, columns channels
    np.testing.assert_array_equal(img.labels, rows.labels)


def test_breast_cancer_groups_split_columns():
    ds = load_dataset("breast_cancer")
    cols = [c for g in ("mean", "se", "worst") for c in ds.groups[g]]
    assert sorted(cols) == sorted(ds.feature_names) and all(len(v) == 10 for v in
                                                             ds.groups.values())
    assert ds.groups["se"][0] == "radius error"


def test_unknown_name_lists_registry():
    with pytest.raises(ValueError, match=r'unknown data set "mnist".*breast_cancer'):
        load_dataset("mnist")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match=r'"digits" has no option "n_samples"'):
        load_dataset("digits", n_samples=10)
    with pytest.raises(ValueError, match=r'no option "n_region".*n_regions'):
        load_dataset("synthetic_regions", n_region=3)


def _tiny(**over):
    base = dict(name="t", ids=np.arange(3), features=np.zeros((3, 2)), labels=np.array([0, 1, 0]),
                task="classification", layout="tabular", feature_names=["a", "b"], n_outputs=2)
    base.update(over)
    return Dataset(**base)


@pytest.mark.parametrize("over, match", [
    (dict(ids=np.array([0, 1, 1])), "ids must be unique; duplicated: 1"),
    (dict(task="ranking"), "task 'ranking' is not one of"),
    (dict(layout="graph"), "layout 'graph'"),
    (dict(features=np.zeros((3, 2, 2))), "needs features of 2 dims"),
    (dict(feature_names=["a"]), "1 feature names for 2 features"),
    (dict(labels=np.array([0, 1, 2])), r"labels must lie in \[0, 2\)"),
    (dict(labels=np.array([0.5, 1, 0])), "must be a 1-D integer array"),
    (dict(regions=np.array([0, 1])), "regions must be"),
    (dict(groups={"x": ["a", "zz"]}), "group 'x' names unknown features"),
])
def test_dataset_checks_its_fields(over, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**over)


def test_positions_and_subset():
    ds = _tiny(ids=np.array([10, 5, 7]))
    np.testing.assert_array_equal(ds.positions(np.array([7, 10])), [2, 0])
    sub = ds.subset(np.array([7, 10]))
    np.testing.assert_array_equal(sub.ids, [7, 10])
    with pytest.raises(ValueError, match=r"2 of 3 ids are not in data set 't' \(first: 3, 4\)"):
        ds.positions(np.array([3, 5, 4]))


def test_regression_labels_match_outputs():
    ds = _tiny(task="regression", labels=np.zeros((3, 2)), n_outputs=2)
    assert ds.labels.dtype == np.float32
    with pytest.raises(ValueError, match="do not match n_outputs=1"):
        dataclasses.replace(ds, n_outputs=1)
