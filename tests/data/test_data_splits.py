"""Splits are deterministic and stratified; standardisation uses training rows; ids align."""

import json

import numpy as np
import pytest

from liquid_fed.data import (
    Dataset,
    Splits,
    Standardizer,
    align_ids,
    common_ids,
    load_dataset,
    split_ids,
    standardize,
)
from liquid_fed.errors import DataError


@pytest.fixture(scope="module")
def wine():
    return load_dataset("wine")


def test_splits_partition_ids_and_repeat_by_seed(wine):
    a, b, c = split_ids(wine, seed=0), split_ids(wine, seed=0), split_ids(wine, seed=1)
    every = np.concatenate([a.train, a.val, a.test])
    assert sorted(every.tolist()) == sorted(wine.ids.tolist())
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
        assert np.all(np.diff(getattr(a, part)) > 0)  # sorted, no repeats
    assert not np.array_equal(a.test, c.test)
    assert len(a.test) == pytest.approx(0.2 * 178, abs=2)
    assert len(a.val) == pytest.approx(0.15 * 178, abs=2)


def test_splits_are_stratified():
    ds = load_dataset("digits_flat")
    sp = split_ids(ds, val=0.2, test=0.2, seed=3)
    overall = np.bincount(ds.labels) / ds.n_samples
    for part in (sp.train, sp.val, sp.test):
        share = np.bincount(ds.labels[ds.positions(part)], minlength=10) / len(part)
        assert np.abs(share - overall).max() < 0.01


def test_regression_split_and_non_contiguous_ids():
    ds = load_dataset("diabetes").subset(np.arange(0, 442, 2))  # ids 0, 2, 4, ...
    sp = split_ids(ds, val=0.0, test=0.5, seed=0)
    assert len(sp.val) == 0 and len(sp.test) == pytest.approx(110.5, abs=1)
    assert np.all(sp.train % 2 == 0)
    json.dumps(sp.to_dict())


@pytest.mark.parametrize("val, test, match", [
    (-0.1, 0.2, r"split.val must be a number in \[0.0, 1.0\), got -0.1"),
    (0.1, 1.0, r"split.test must be a number in \[0.0, 1.0\), got 1.0"),
    (0.5, 0.5, r"split.val \+ split.test must be < 1, got 0.5 \+ 0.5"),
])
def test_split_rejects_bad_shares(wine, val, test, match):
    with pytest.raises(ValueError, match=match):
        split_ids(wine, val=val, test=test)


def test_standardizer_fits_training_rows_only(wine):
    sp = split_ids(wine, seed=0)
    out, scaler = standardize(wine, sp)
    train = out.features[wine.positions(sp.train)]
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-4)
    raw_train = wine.features[wine.positions(sp.train)].astype(np.float64)
    np.testing.assert_allclose(scaler.mean, raw_train.mean(axis=0), rtol=1e-6)
    all_mean = wine.features.astype(np.float64).mean(axis=0)
    assert not np.allclose(scaler.mean, all_mean)  # the test rows did not leak in
    np.testing.assert_array_equal(out.ids, wine.ids)  # the original is left alone
    assert wine.features.mean() > 1


def test_standardizer_per_layout_and_round_trip():
    rng = np.random.default_rng(0)
    seq = rng.normal(3.0, 2.0, size=(50, 7, 3))
    s = Standardizer("sequence").fit(seq)
    assert s.mean.shape == (3,)
    np.testing.assert_allclose(s.transform(seq).reshape(-1, 3).mean(axis=0), 0, atol=1e-5)
    img = rng.normal(size=(20, 4, 4))
    img[:, 0, 0] = 0.0  # a constant pixel stays finite
    g = Standardizer("image").fit(img)
    assert g.mean.shape == () and np.isfinite(g.transform(img)).all()
    const = Standardizer().fit(np.ones((5, 2)))
    np.testing.assert_array_equal(const.transform(np.ones((2, 2))), 0)
    back = Standardizer.from_dict(json.loads(json.dumps(s.to_dict())))
    np.testing.assert_allclose(back.transform(seq), s.transform(seq))


def test_standardizer_errors():
    with pytest.raises(RuntimeError, match="call fit"):
        Standardizer().transform(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"layout 'tabular' needs 2-D arrays, got shape"):
        Standardizer().fit(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="fitted on 2 features"):
        Standardizer().fit(np.zeros((3, 2))).transform(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="standardizer.layout must be one of"):
        Standardizer("video")


def test_align_ids_returns_requested_when_all_hold_them():
    holders = {"client_0": np.arange(10), "client_1": np.arange(2, 12), "server": np.arange(12)}
    np.testing.assert_array_equal(common_ids(holders), np.arange(2, 10))
    out = align_ids(np.array([5, 3, 9]), holders)
    np.testing.assert_array_equal(out, [5, 3, 9])
    assert out.dtype == np.int64


def test_align_ids_names_missing_ids_per_holder():
    holders = {"client_0": np.arange(100), "client_1": np.arange(50, 150)}
    with pytest.raises(ValueError) as err:
        align_ids(np.arange(40, 110), holders)
    msg = str(err.value)
    assert "20 of 70 requested ids are not held by every party" in msg
    assert "10 missing at 'client_0' (first: 100, 101, 102, 103, 104, ...)" in msg
    assert "10 missing at 'client_1' (first: 40, 41, 42, 43, 44, ...)" in msg


def test_align_ids_rejects_repeats_and_non_integers():
    with pytest.raises(ValueError, match="requested ids repeat: 3"):
        align_ids(np.array([3, 3]), {"a": np.arange(5)})
    with pytest.raises(ValueError, match="1-D integer array"):
        align_ids(np.array([0.5]), {"a": np.arange(5)})


def test_splits_dataclass_fields():
    sp = Splits(train=np.array([1]), val=np.array([2]), test=np.array([3]))
    assert sp.to_dict() == {"train": [1], "val": [2], "test": [3]}


# ---- data too small to split: clear errors naming the counts and data.val / data.test ---------


def _tiny(labels, task="classification"):
    """A data set of len(labels) rows with the given labels (codes for classification)."""
    labels = np.asarray(labels)
    n_out = int(labels.max()) + 1 if task == "classification" else 1
    names = [f"c{k}" for k in range(n_out)] if task == "classification" else []
    return Dataset("tiny", np.arange(len(labels)) * 10, np.zeros((len(labels), 2)), labels,
                   task, "tabular", ["a", "b"], n_out, class_names=names)


@pytest.mark.parametrize("labels, task", [([0], "classification"), ([0.5], "regression"),
                                          ([], "regression")])
def test_split_needs_two_samples(labels, task):
    n = len(labels)
    with pytest.raises(DataError, match=rf"split: data set 'tiny' has {n} samples?; at least 2"):
        split_ids(_tiny(labels, task), val=0.0, test=0.0)


def test_split_needs_two_training_samples():
    ds = _tiny([0.1, 0.2, 0.3], "regression")  # test round(1.2) = 1, val round(0.9) = 1
    with pytest.raises(DataError, match=r"split: 1 training sample left from 3 with data.val=0.3, "
                                        r"data.test=0.4; at least 2 are needed"):
        split_ids(ds, val=0.3, test=0.4)
    assert split_ids(ds, val=0.0, test=0.0).train.tolist() == [0, 10, 20]


def test_split_training_split_needs_two_classes():
    # c0: 2 test, 2 validation, 2 train rows; c1: 1 test, 1 validation, none to train on
    ds = _tiny([0, 0, 0, 0, 0, 0, 1, 1])
    with pytest.raises(DataError, match=r"split: the training split \(2 samples\) holds a single "
                                        r"class 'c0'; the other class is too small to keep a "
                                        r"training sample with data.val=0.3, data.test=0.3"):
        split_ids(ds, val=0.3, test=0.3)
    with pytest.raises(DataError, match=r"holds a single class 'c0'; the data holds no other"):
        split_ids(_tiny([0, 0, 0]), val=0.0, test=0.0)


@pytest.mark.parametrize("val, test, match", [
    (0.1, 0.3, r"split: data.val=0.1 leaves the validation split empty: 6 samples in 3 classes, "
               r"each too small for a validation sample; raise data.val, set it to 0"),
    (0.3, 0.1, r"split: data.test=0.1 leaves the test split empty: 6 samples in 3 classes"),
])
def test_split_refuses_an_empty_split_with_a_share(val, test, match):
    ds = _tiny([0, 0, 1, 1, 2, 2])  # round(2 * 0.1) = 0 rows per class
    with pytest.raises(DataError, match=match):
        split_ids(ds, val=val, test=test)


def test_split_regression_empty_test_split_is_named():
    ds = _tiny(np.linspace(0, 1, 4), "regression")  # round(4 * 0.1) = 0
    with pytest.raises(DataError, match=r"split: data.test=0.1 leaves the test split empty: 4 "
                                        r"samples; raise data.test"):
        split_ids(ds, val=0.0, test=0.1)


def test_split_smallest_valid_data_splits():
    sp = split_ids(_tiny([0, 0, 1, 1]), val=0.0, test=0.0)
    assert sp.train.tolist() == [0, 10, 20, 30] and sp.val.size == 0 and sp.test.size == 0
    sp = split_ids(_tiny([0, 0, 0, 1, 1, 1]), val=0.0, test=0.34)  # round(3 * 0.34) = 1
    assert sorted(sp.train.tolist() + sp.test.tolist()) == [0, 10, 20, 30, 40, 50]
    assert len(sp.test) == 2 and len(sp.train) == 4
