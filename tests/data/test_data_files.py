"""CSV and NPZ user files: they load, and every mistake names the file, column and first bad row."""

import numpy as np
import pytest

from liquid_fed.data import load_dataset


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "id,age,bmi,label\n10,50,22.5,yes\n11,61,30.1,no\n12,45,25.0,yes\n"


def test_csv_loads_with_id_column(tmp_path):
    ds = load_dataset("csv", path=_csv(tmp_path, GOOD), label="label", id_column="id")
    assert ds.name == "data" and ds.layout == "tabular"
    np.testing.assert_array_equal(ds.ids, [10, 11, 12])
    assert ds.feature_names == ["age", "bmi"]
    np.testing.assert_allclose(ds.features[1], [61, 30.1], rtol=1e-6)
    assert ds.class_names == ["no", "yes"] and list(ds.labels) == [1, 0, 1]
    assert ds.n_outputs == 2


def test_csv_row_order_ids_feature_subset_and_regression(tmp_path):
    path = _csv(tmp_path, "a,b,c,y1,y2\n1,2,3,0.5,1\n4,5,6,1.5,2\n")
    ds = load_dataset("csv", path=path, label=["y1", "y2"], features=["c", "a"],
                      task="regression")
    np.testing.assert_array_equal(ds.ids, [0, 1])
    assert ds.feature_names == ["c", "a"] and ds.labels.shape == (2, 2) and ds.n_outputs == 2
    np.testing.assert_array_equal(ds.features, [[3, 1], [6, 4]])


def test_csv_numeric_class_labels_are_coded_in_order(tmp_path):
    ds = load_dataset("csv", path=_csv(tmp_path, "x,y\n1,3\n2,1\n3,2\n"), label="y")
    assert list(ds.labels) == [2, 0, 1] and ds.class_names == ["1", "2", "3"]


@pytest.mark.parametrize("text, options, match", [
    (GOOD, dict(label="target"),
     r'data.csv: data.label names column "target", which is not in the file \(columns: id, '),
    (GOOD, dict(label="label", id_column="key"), r'data.id_column names column "key"'),
    (GOOD, dict(label="label", features=["age", "bmi2"]), r'data.features names column "bmi2"'),
    ("a,label\n1,x\n2,y\nthree,x\n", dict(label="label"),
     r"data.csv: column 'a' has a non-numeric value 'three' at row 3 \(line 4\)"),
    ("a,label\n1,x\n,y\n", dict(label="label"),
     r"column 'a' has a missing value \(NaN\) at row 2 \(line 3\)"),
    ("a,label\n1,x\n2,\n", dict(label="label"),
     r"label column 'label' has a missing value \(NaN\) at row 2 \(line 3\)"),
    ("a,label\n1,0.5\n2,nan\n", dict(label="label", task="regression"),
     r"label column 'label' has a missing value \(NaN\) at row 2"),
    ("id,a,label\n1,1,x\n2,1,y\n1,3,x\n", dict(label="label", id_column="id"),
     r"id column 'id' has duplicate id 1 at row 3 \(line 4\) \(first seen at row 1"),
    ("id,a,label\n1,1,x\nb7,1,y\n", dict(label="label", id_column="id"),
     r"id column 'id' has a non-integer id 'b7' at row 2"),
    ("a,label\n1,x\n2\n", dict(label="label"), r"data.csv: row 2 \(line 3\) has 1 fields"),
    ("a,a,label\n1,1,x\n", dict(label="label"), r"column 'a' appears twice"),
    ("a,label\n", dict(label="label"), r"no data rows"),
    ("a,label\n1,0.5\n2,1.5\n", dict(label="label"), r"must be integers or names; '0.5'"),
    (GOOD, dict(label="label", task="ranking"), r"data.task must be one of"),
])
def test_csv_errors_name_file_column_and_row(tmp_path, text, options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("csv", path=_csv(tmp_path, text), **options)


def test_required_options_are_named(tmp_path):
    with pytest.raises(ValueError, match=r'data set "csv" needs option "path"'):
        load_dataset("csv", label="y")
    with pytest.raises(ValueError, match=r'data set "npz" needs option "path"'):
        load_dataset("npz")


def test_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("csv", path=tmp_path / "nope.csv", label="y")


def _npz(tmp_path, **arrays):
    path = tmp_path / "arrays.npz"
    np.savez(path, **arrays)
    return path


def test_npz_tabular_with_ids_and_names(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = _npz(tmp_path, features=x, labels=np.array([3, 5, 3, 5]), ids=np.array([9, 8, 7, 6]),
                feature_names=np.array(["p", "q", "r"]))
    ds = load_dataset("npz", path=path)
    assert ds.feature_names == ["p", "q", "r"] and ds.class_names == ["3", "5"]
    np.testing.assert_array_equal(ds.ids, [9, 8, 7, 6])
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1])
    np.testing.assert_array_equal(ds.features, x)


def test_npz_image_sequence_and_custom_keys(tmp_path):
    path = _npz(tmp_path, x=np.zeros((5, 4, 6)), y=np.linspace(0, 1, 5))
    img = load_dataset("npz", path=path, features_key="x", labels_key="y", layout="image",
                       task="regression")
    assert img.features.shape == (5, 4, 6) and img.feature_names[7] == "r1c1"
    np.testing.assert_array_equal(img.ids, np.arange(5))
    seq = load_dataset("npz", path=path, features_key="x", labels_key="y", layout="sequence",
                       task="regression")
    assert seq.feature_names == [f"c{j}" for j in range(6)]


@pytest.mark.parametrize("arrays, options, match", [
    (dict(features=np.zeros((3, 2))), {}, r"arrays.npz: no array 'labels' in the file \(arrays: "
                                          r"features\)"),
    (dict(features=np.array([["a", "b"]] * 3), labels=np.zeros(3, int)), {},
     r"array 'features' must be numeric"),
    (dict(features=np.zeros((3, 2, 2)), labels=np.zeros(3, int)), {},
     r"give layout='image' \(N, H, W\) or 'sequence'"),
    (dict(features=np.array([[0.0, 1], [np.nan, 1], [1, 1]]), labels=np.zeros(3, int)), {},
     r"array 'features' has a NaN or infinite value at row index 1"),
    (dict(features=np.zeros((3, 2)), labels=np.array([0.0, 1.0, np.nan])), {},
     r"array 'labels' has a NaN label at row index 2"),
    (dict(features=np.zeros((3, 2)), labels=np.array([0.0, np.nan, 1])), dict(task="regression"),
     r"array 'labels' has a NaN or infinite label at row index 1"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(4, int)), {}, r"has shape \(4,\), but"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(3, int), ids=np.array([4, 5, 4])), {},
     r"array 'ids' has duplicate id 4 at row index 2 \(first seen at row index 0\)"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(3, int), ids=np.array([1.0, 2.5, 3])), {},
     r"array 'ids' has a non-integer id 2.5 at row index 1"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(3, int), feature_names=np.array(["a"])),
     {}, r"holds 1 names for 2 features"),
])
def test_npz_errors_name_file_key_and_row(tmp_path, arrays, options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("npz", path=_npz(tmp_path, **arrays), **options)
