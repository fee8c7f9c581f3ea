"""Study figures: the numbers behind them against independent computations, and every PNG
written whole. The study folder is built by hand (run outputs with known delegations), so
these tests train nothing."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import f as f_dist
from scipy.stats import pearsonr, t

from liquid_fed.report import paired_difference, render
from liquid_fed.rundir import OUTPUTS_FILE, RunDir
from liquid_fed.study import cell_dir, load_study, method_slug
from liquid_fed.study_plots import (
    correlation,
    forest_data,
    ground_truth_split,
    knob_data,
    mean_delegation,
    mean_power,
    observability_points,
    observability_varies,
    plot_study,
    region_observability_points,
    routing_data,
    tau_data,
    view_effect,
    view_spread,
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


def fake_study(tmp_path: Path, body: str = GRID, with_outputs: tuple[str, ...] = ()
               ) -> tuple[object, Path, list[dict], dict]:
    """A finished-looking study folder: LE outputs per cell x seed (and those of the methods
    in ``with_outputs``, in ``outputs[(cell, seed, method)]``) and results rows."""
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
        for method in with_outputs:
            other = fake_outputs(rng, len(arrays["error"]))
            # the same test samples: the ground truth is the LE's
            other.update({k: arrays[k] for k in ("labels", "regions", "informative")})
            RunDir(cell_dir(out, setting.id, seed) / method_slug(method)).write_npz(
                OUTPUTS_FILE, other)
            outputs[(setting.id, seed, method)] = other
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
            row["nll"] = float(rng.uniform(0.1, 1.0))
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
    # the routing figure needs only the LE's outputs; the forest plot needs a baseline
    assert names == {"metric_vs_views.overlap.png",
                     "metric_vs_data.options.region_visibility.png",
                     "power_vs_observability.png", "confidence_tau.png",
                     "paired_differences.png", *(f"routing_{c}.png" for c in cells),
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


MOE_STUDY = """
    name: routed
    base: BASE
    grid:
      data.options.region_visibility: [shared, none]
    seeds: 3
    methods: [liquid, uniform, moe, oracle]
"""


def test_routing_data_is_the_mean_power_share_per_region_of_the_le_and_of_moe(
        tmp_path: Path) -> None:
    study, out, _, outputs = fake_study(tmp_path, MOE_STUDY, with_outputs=("moe",))
    setting = study.settings[1]
    name, shares, informative = routing_data(study, out, setting)
    assert name == "region" and list(shares) == ["liquid:sink_one", "moe"]
    regions = np.concatenate([outputs[(setting.id, s)]["regions"] for s in study.seeds])
    inf = np.concatenate([outputs[(setting.id, s)]["informative"] for s in study.seeds])
    for method, key in (("liquid:sink_one", None), ("moe", "moe")):
        power = np.concatenate([outputs[(setting.id, s) + ((key,) if key else ())]["power"]
                                for s in study.seeds])
        assert sorted(shares[method]) == [0, 1]
        for r in (0, 1):
            expected = power[regions == r].sum(axis=0) / (regions == r).sum() / K
            np.testing.assert_allclose(shares[method][r], expected, rtol=1e-12)
            assert shares[method][r].sum() == pytest.approx(1.0)
    for r in (0, 1):
        counts = np.bincount(inf[regions == r], minlength=K)
        np.testing.assert_allclose(informative[r], counts / counts.sum(), rtol=1e-12)
    # uniform and oracle are not routed methods; without outputs there is nothing to draw
    assert routing_data(study, tmp_path / "empty", setting) is None


def test_ground_truth_split_prefers_regions_then_few_classes(tmp_path: Path) -> None:
    study = study_of(tmp_path, MOE_STUDY)
    out = tmp_path / "out"
    setting = study.settings[0]
    run = RunDir(cell_dir(out, setting.id, 0) / "liquid-sink_one")
    rng = np.random.default_rng(1)
    base = fake_outputs(rng, 30)
    run.write_npz(OUTPUTS_FILE, base)
    assert ground_truth_split(out, setting, [0], "liquid:sink_one") == ("regions", "region")
    no_regions = {k: v for k, v in base.items() if k not in ("regions", "informative")}
    run.write_npz(OUTPUTS_FILE, no_regions)
    assert ground_truth_split(out, setting, [0], "liquid:sink_one") == ("labels", "class")
    # regression: a continuous target has too many values to split by
    run.write_npz(OUTPUTS_FILE, {**no_regions, "labels": rng.normal(size=30)})
    assert ground_truth_split(out, setting, [0], "liquid:sink_one") is None


def test_forest_data_matches_per_seed_differences_and_the_report(tmp_path: Path) -> None:
    study, out, rows, _ = fake_study(tmp_path, MOE_STUDY)
    data = forest_data(study, rows)
    assert sorted(data) == [s.id for s in study.settings]
    assert set(data["c01"]) == {("liquid:sink_one", b) for b in ("uniform", "moe", "oracle")}
    for (le, base), got in data["c01"].items():
        mine = {r["seed"]: r["score"] for r in rows if r["cell"] == "c01" and r["method"] == le}
        theirs = {r["seed"]: r["score"] for r in rows
                  if r["cell"] == "c01" and r["method"] == base}
        diffs = np.array([mine[s] - theirs[s] for s in study.seeds])
        assert got.mean == pytest.approx(diffs.mean(), rel=1e-12)
        assert got.half == pytest.approx(
            t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3), rel=1e-12)
        assert got == paired_difference(rows, "c01", le, base)
        # the report's table prints the same interval
        assert got.text() in render(study, rows)
    names = {p.name for p in plot_study(study, out, rows)}
    assert "paired_differences.png" in names


def _block_anova_by_regression(y: np.ndarray) -> float:
    """The view effect by least squares: blocks-only model against blocks + views."""
    n_b, k = y.shape
    target = y.ravel()
    blocks = np.kron(np.eye(n_b), np.ones((k, 1)))  # (n_b*k, n_b)
    views = np.tile(np.eye(k)[:, 1:], (n_b, 1))  # (n_b*k, k-1)

    def rss(x: np.ndarray) -> float:
        coef = np.linalg.lstsq(x, target, rcond=None)[0]
        return float(((target - x @ coef) ** 2).sum())

    full, reduced = rss(np.hstack([blocks, views])), rss(blocks)
    df = n_b * k - n_b - (k - 1)
    return float(f_dist.sf(((reduced - full) / (k - 1)) / (full / df), k - 1, df))


def test_observability_varies_by_spread_within_seeds_or_a_consistent_view_effect() -> None:
    rng = np.random.default_rng(3)
    rows, per_cell = [], {}
    # c00: a consistent but small view effect; c01: noise only; c02: large spreads that
    # change from seed to seed (uneven splits redrawn per seed)
    shapes = {"c00": lambda: 0.02 * np.arange(K) + rng.normal(0, 0.002, size=(4, K)),
              "c01": lambda: rng.normal(0, 0.01, size=(4, K)),
              "c02": lambda: np.array([rng.permutation([0.2, 0.5, 0.6, 0.9])
                                       for _ in range(4)])}
    for cell, draw in shapes.items():
        y = draw() + rng.normal(size=(4, 1)) * 0.01 + 0.5
        per_cell[cell] = y
        for seed in range(4):
            rows.append({"cell": cell, "seed": seed, "method": "liquid:sink_one",
                         **{f"probe_{j}": float(y[seed, j]) for j in range(K)},
                         **{f"importance_{j}": 0.25 for j in range(K)}})
    p = view_effect(rows, "liquid:sink_one", "probe")
    for cell, y in per_cell.items():
        assert p[cell] == pytest.approx(_block_anova_by_regression(y), rel=1e-9, abs=1e-15)
    spans = view_spread(rows, "liquid:sink_one", "probe")
    for cell, y in per_cell.items():
        assert spans[cell] == pytest.approx(float(np.mean(y.max(axis=1) - y.min(axis=1))))
    assert spans["c00"] < 0.15 and spans["c01"] < 0.15 <= spans["c02"]
    assert p["c00"] * 6 < 0.01 < p["c01"]  # Bonferroni over 3 cells x 2 measures
    assert observability_varies(rows, "liquid:sink_one") == ["c00", "c02"]
    one_seed = [r for r in rows if r["seed"] == 0]
    assert view_effect(one_seed, "liquid:sink_one") == {}  # one block: nothing to test
    assert observability_varies(one_seed, "liquid:sink_one") == ["c02"]
    assert observability_varies(rows, "uniform") == []


def test_region_observability_points_and_the_figure_skipped_without_variation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    study, out, rows, outputs = fake_study(tmp_path, MOE_STUDY)
    pts = region_observability_points(study, out, "liquid:sink_one")
    expected_inf, expected_power = [], []
    for setting in study.settings:
        for seed in study.seeds:
            a = outputs[(setting.id, seed)]
            for r in np.unique(a["regions"]):
                mask = a["regions"] == r
                expected_inf += list(np.bincount(a["informative"][mask], minlength=K)
                                     / mask.sum())
                expected_power += list(a["power"][mask].mean(axis=0) / K)
    np.testing.assert_allclose(pts["informative"], expected_inf, rtol=1e-12)
    np.testing.assert_allclose(pts["power"], expected_power, rtol=1e-12)
    # every view equally observable, and no ground truth of regions: no figure
    rows = [{**r, **{f"probe_{j}": 0.6 for j in range(K)},
             **{f"importance_{j}": 1 / K for j in range(K)}} for r in rows]
    for (cell, seed), a in outputs.items():
        RunDir(cell_dir(out, cell, seed) / "liquid-sink_one").write_npz(
            OUTPUTS_FILE, {k: v for k, v in a.items() if k not in ("regions", "informative")})
    assert region_observability_points(study, out, "liquid:sink_one")["power"].size == 0
    with caplog.at_level("INFO", logger="liquid_fed.study_plots"):
        names = {p.name for p in plot_study(study, out, rows)}
    assert not any(n.startswith("power_vs_observability") for n in names)
    assert "varies neither by view nor by region; not drawn" in caplog.text
    assert "does not vary by view in any setting" in caplog.text
    # delegation matrices and graphs now split by class; none is drawn over all samples
    assert {"delegation_c00.png", "graph_c01.png"} <= names
