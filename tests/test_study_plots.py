"""Study figures: the numbers behind them against independent computations, and every PNG
written whole. The study folder is built by hand (run outputs with known delegations), so
these tests train nothing."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, t

from liquid_fed.rundir import OUTPUTS_FILE, RunDir
from liquid_fed.study import cell_dir, load_study, method_slug
from liquid_fed.study_plots import (
    correlation,
    knob_data,
    mean_delegation,
    mean_power,
    observability_points,
    plot_study,
    tau_data,
)

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ROOT / "configs" / "regions.yaml"
K = 4
PNG = b"\x89PNG\r\n\x1a\n"


def study_of(tmp_path: Path, body: str) -> object:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(body).replace("BASE", str(REGIONS)))
    return load_study(path)


GRID = """
    name: grid
    base: BASE
    grid:
      views.overlap: [0.0, 0.25, 0.5]
      data.options.region_visibility: [shared, none]
    seeds: 3
    methods: [liquid, uniform]
"""


def fake_outputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    d = rng.dirichlet(np.ones(K), size=(n, K))
    power = rng.dirichlet(np.ones(K), size=n) * K
    return {"power": power, "delegation": d, "error": rng.random(n),
            "labels": rng.integers(0, 3, n), "regions": rng.integers(0, 2, n),
            "informative": rng.integers(0, K, n)}


def fake_study(tmp_path: Path, body: str = GRID) -> tuple[object, Path, list[dict], dict]:
    """A finished-looking study folder: LE outputs per cell x seed and results rows."""
    study = study_of(tmp_path, body)
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    rows, outputs = [], {}
    for setting, seed in study.cells():
        arrays = fake_outputs(rng, int(rng.integers(20, 40)))
        liquid = study.methods[0]
        RunDir(cell_dir(out, setting.id, seed) / method_slug(liquid)).write_npz(
            OUTPUTS_FILE, arrays)
        outputs[(setting.id, seed)] = arrays
        for method in study.methods:
            row = {"cell": setting.id, "seed": seed, "method": method, "metric": "accuracy",
                   "score": float(rng.random())}
            share = arrays["power"].mean(0) / K if method == liquid else [None] * K
            for j in range(K):
                row[f"power_{j}"] = share[j]
                row[f"probe_{j}"] = float(rng.random())
                row[f"importance_{j}"] = float(rng.random())
            for c in ("delegation", "power", "self_delegation", "agreement", "max_prob"):
                row[f"tau_{c}"] = float(rng.uniform(-1, 1)) if method == liquid else None
            rows.append(row)
    return study, out, rows, outputs


def test_mean_delegation_pools_every_seeds_samples_and_splits_by_ground_truth(
        tmp_path: Path) -> None:
    study, out, _, outputs = fake_study(tmp_path)
    setting = study.settings[2]
    liquid = study.methods[0]
    pooled = np.concatenate([outputs[(setting.id, s)]["delegation"] for s in study.seeds])
    regions = np.concatenate([outputs[(setting.id, s)]["regions"] for s in study.seeds])
    got = mean_delegation(out, setting, study.seeds, liquid)
    np.testing.assert_allclose(got["all"], pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["all"].sum(axis=1), np.ones(K), rtol=1e-12)
    split = mean_delegation(out, setting, study.seeds, liquid, by="regions")
    assert sorted(split) == [0, 1]
    for r in (0, 1):
        np.testing.assert_allclose(split[r], pooled[regions == r].mean(axis=0), rtol=1e-12)
    power = np.concatenate([outputs[(setting.id, s)]["power"] for s in study.seeds])
    np.testing.assert_allclose(mean_power(out, setting, study.seeds, liquid),
                               power.mean(axis=0), rtol=1e-12)
    # a seed without outputs is skipped; a method without outputs gives nothing
    (cell_dir(out, setting.id, 0) / method_slug(liquid) / OUTPUTS_FILE).unlink()
    rest = np.concatenate([outputs[(setting.id, s)]["delegation"] for s in study.seeds[1:]])
    np.testing.assert_allclose(mean_delegation(out, setting, study.seeds, liquid)["all"],
                               rest.mean(axis=0), rtol=1e-12)
    assert mean_delegation(out, setting, study.seeds, "uniform") == {}


def test_knob_data_gives_t_intervals_per_panel_and_method(tmp_path: Path) -> None:
    study, _, rows, _ = fake_study(tmp_path)
    panels = knob_data(study, rows, "views.overlap")
    assert sorted(panels) == [(("data.options.region_visibility", "none"),),
                              (("data.options.region_visibility", "shared"),)]
    lines = panels[(("data.options.region_visibility", "shared"),)]
    assert set(lines) == {"liquid:sink_one", "uniform"}
    assert [x for x, _ in lines["uniform"]] == [0.0, 0.25, 0.5]
    setting = next(s for s in study.settings if s.values == {
        "views.overlap": 0.25, "data.options.region_visibility": "shared"})
    scores = np.array([r["score"] for r in rows
                       if r["cell"] == setting.id and r["method"] == "uniform"])
    got = lines["uniform"][1][1]
    half = t.ppf(0.975, 2) * scores.std(ddof=1) / math.sqrt(3)
    assert got.n == 3 and got.mean == pytest.approx(scores.mean(), rel=1e-12)
    assert got.half == pytest.approx(half, rel=1e-12)
    # a paired study's knobs do not vary alone: no per-knob figure
    paired = study_of(tmp_path, """
        name: p
        base: BASE
        paired:
          views.overlap: [0.0, 0.25]
          data.options.region_visibility: [shared, none]
        seeds: 2
        methods: [liquid]
    """)
    assert knob_data(paired, [], "views.overlap") == {}


def test_observability_points_and_correlation_match_an_independent_pearson(
        tmp_path: Path) -> None:
    study, _, rows, _ = fake_study(tmp_path)
    pts = observability_points(rows, "liquid:sink_one")
    n_cells = len(study.settings) * len(study.seeds)
    assert pts["power"].shape == (n_cells * K,)
    assert pts["power"].reshape(n_cells, K).sum(axis=1) == pytest.approx(np.ones(n_cells))
    assert correlation(pts["probe"], pts["power"]) == pytest.approx(
        pearsonr(pts["probe"], pts["power"])[0], rel=1e-10)
    assert observability_points(rows, "uniform")["power"].size == 0  # no powers: no points
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    y = np.array([2.0, 4.1, 0.0, 8.0, np.nan])
    assert correlation(x, y) == pytest.approx(pearsonr([1, 2, 4], [2, 4.1, 8])[0])
    assert math.isnan(correlation(np.ones(5), np.arange(5.0)))


def test_tau_data_per_setting_and_measure(tmp_path: Path) -> None:
    study, _, rows, _ = fake_study(tmp_path)
    data = tau_data(study, rows, "liquid:sink_one")
    s = study.settings[0]
    values = [r["tau_agreement"] for r in rows
              if r["cell"] == s.id and r["method"] == "liquid:sink_one"]
    assert data[s.id]["agreement"].mean == pytest.approx(np.mean(values))
    assert data[s.id]["agreement"].n == 3
    assert tau_data(study, rows, "uniform")[s.id]["power"].n == 0


def test_plot_study_writes_every_figure_whole(tmp_path: Path) -> None:
    study, out, rows, _ = fake_study(tmp_path)
    written = plot_study(study, out, rows)
    names = {p.name for p in written}
    cells = [s.id for s in study.settings]
    assert names == {"metric_vs_views.overlap.png",
                     "metric_vs_data.options.region_visibility.png",
                     "power_vs_observability.png", "confidence_tau.png",
                     *(f"delegation_{c}.png" for c in cells), *(f"graph_{c}.png" for c in cells)}
    for p in written:
        assert p.parent == out / "figures" and p.read_bytes()[:8] == PNG
    assert not [p for p in (out / "figures").iterdir() if p.name.startswith(".")]


def test_a_paired_study_with_two_solvers_gets_a_figure_per_setting_and_solver(
        tmp_path: Path) -> None:
    study, out, rows, _ = fake_study(tmp_path, """
        name: p
        base: BASE
        paired:
          views.overlap: [0.0, 0.25]
          data.options.region_visibility: [shared, none]
        seeds: 2
        solvers: [sink_one, sink_many]
        methods: [liquid, uniform]
    """)
    names = {p.name for p in plot_study(study, out, rows)}
    # only the first solver has outputs in this fake folder
    assert "metric_by_setting.png" in names
    assert {"delegation_c00_liquid-sink_one.png", "graph_c01_liquid-sink_one.png",
            "power_vs_observability_liquid-sink_one.png"} <= names
    assert not any("sink_many" in n and "delegation" in n for n in names)
