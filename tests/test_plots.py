"""Figures of delegation patterns: the numbers they draw, the files they write, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.plots import (
    RunOutputs,
    comparison_figure,
    delegation_by_view,
    delegation_summary,
    error_by_top_share,
    load_run,
    plot_comparison,
    plot_run,
    region_power,
    run_figures,
    save_figure,
    top_expert,
)

PNG = b"\x89PNG\r\n\x1a\n"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
K = 4


def _concentrated(n: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """Every sample delegates by one known matrix; power sits on the informative expert."""
    rng = np.random.default_rng(seed)
    d0 = rng.dirichlet(np.ones(K), size=K)  # (K, K) rows sum to 1
    regions = rng.integers(0, 2 * K, size=n)
    informative = regions % K
    power = np.full((n, K), 0.1)
    power[np.arange(n), informative] = K - 0.1 * (K - 1)
    error = (rng.random(n) < 0.2).astype(np.float32)
    return {"ids": np.arange(n), "power": power.astype(np.float32),
            "delegation": np.broadcast_to(d0, (n, K, K)).astype(np.float32).copy(),
            "error": error, "labels": rng.integers(0, 2, size=n),
            "informative": informative, "regions": regions}


def _write_run(path: Path, arrays: dict[str, np.ndarray], test: dict | None = None) -> Path:
    path.mkdir(parents=True)
    np.savez_compressed(path / "test_outputs.npz", **arrays)
    (path / "config.yaml").write_text("name: synthetic\nensemble: {solver: sink_one}\n")
    if test is not None:
        (path / "summary.json").write_text(json.dumps({"name": "synthetic", "test": test}))
    return path


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


# --------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------


def test_summary_of_a_known_delegation_and_concentrated_power() -> None:
    a = _concentrated()
    s = delegation_summary(a["delegation"], a["power"], a["informative"])
    d0 = a["delegation"][0].astype(np.float64)
    np.testing.assert_allclose(s.mean_delegation, d0, atol=1e-6)
    assert s.mean_self_delegation == pytest.approx(np.trace(d0) / K, abs=1e-6)
    np.testing.assert_allclose(s.speaker_share, np.bincount(a["informative"], minlength=K)
                               / len(a["informative"]))
    np.testing.assert_allclose(s.informative_top, np.eye(K))
    assert s.informative_top_power == 1.0
    assert s.tie_share == 0.0
    share = np.array([K - 0.3, 0.1, 0.1, 0.1]) / K
    assert s.power_entropy == pytest.approx(-(share * np.log(share)).sum(), rel=1e-5)


def test_informative_by_top_matrix_against_a_loop() -> None:
    rng = np.random.default_rng(3)
    n = 300
    power = rng.dirichlet(np.ones(K), size=n) * K  # (n, K) sums to K, ties improbable
    informative = rng.integers(0, K, size=n)
    informative[informative == 3] = 2  # view 3 is never informative: its row is NaN
    delegation = rng.dirichlet(np.ones(K), size=(n, K))
    s = delegation_summary(delegation, power, informative)
    counts = np.zeros((K, K))
    for b in range(n):
        counts[informative[b], int(np.argmax(power[b]))] += 1
    for v in range(3):
        np.testing.assert_allclose(s.informative_top[v], counts[v] / counts[v].sum())
    assert np.isnan(s.informative_top[3]).all()
    assert s.informative_top_power == pytest.approx(np.trace(counts) / n)
    speakers = counts.sum(0) / n
    np.testing.assert_allclose(s.speaker_share, speakers)
    assert s.speaker_entropy == pytest.approx(-(speakers * np.log(speakers)).sum())
    np.testing.assert_allclose(s.mean_delegation, delegation.mean(0))
    ent = [-(p / K * np.log(p / K)).sum() for p in power]
    assert s.power_entropy == pytest.approx(np.mean(ent))


def test_delegation_to_the_informative_expert_by_view() -> None:
    # Every expert hands everything to the sample's informative expert: the overall mean is
    # uniform, the per-view means are one-hot columns.
    n = 40
    informative = np.arange(n) % K
    delegation = np.zeros((n, K, K))
    delegation[np.arange(n), :, informative] = 1.0
    s = delegation_summary(delegation, np.ones((n, K)), informative)
    np.testing.assert_allclose(s.mean_delegation, np.full((K, K), 1 / K))
    assert s.to_informative == pytest.approx(1.0)
    by_view = delegation_by_view(delegation, informative)
    for v in range(K):
        expected = np.zeros((K, K))
        expected[:, v] = 1.0
        np.testing.assert_allclose(by_view[v], expected)
    assert np.isnan(delegation_by_view(delegation[:2], informative[:2])[3]).all()


def test_uniform_power_is_a_tie_won_by_the_first_expert() -> None:
    power = np.ones((10, K), dtype=np.float32)
    top, tie = top_expert(power)
    assert (top == 0).all() and tie.all()
    s = delegation_summary(None, power)
    assert s.tie_share == 1.0
    assert s.speaker_entropy == 0.0
    assert s.power_entropy == pytest.approx(math.log(K))
    assert s.mean_delegation is None and s.mean_self_delegation is None
    run = RunOutputs("uniform", {}, {"power": power, "error": np.zeros(10),
                                     "delegation": np.full((10, K, K), 1 / K),
                                     "informative": np.arange(10) % K})
    assert sorted(run_figures(run)) == ["confidence", "delegation", "ground_truth", "power"]


def test_region_power_means_by_region() -> None:
    power = np.array([[3.0, 0.5, 0.5], [1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
    rp = region_power(power, informative=np.array([0, 0, 2]), regions=np.array([5, 5, 7]))
    np.testing.assert_array_equal(rp.regions, [5, 7])
    np.testing.assert_allclose(rp.informative, [2.0, 3.0])
    np.testing.assert_allclose(rp.others, [0.75, 0.0])
    np.testing.assert_array_equal(rp.counts, [2, 1])
    by_view = region_power(power, informative=np.array([0, 0, 2]))
    np.testing.assert_array_equal(by_view.regions, [0, 2])


def test_error_bins_of_the_top_share() -> None:
    # K = 2: top share in [0.5, 1]; two bins [0.5, 0.75) and [0.75, 1].
    power = np.array([[1.0, 1.0], [1.2, 0.8], [1.6, 0.4], [2.0, 0.0], [0.2, 1.8]])
    error = np.array([1.0, 0.0, 1.0, 0.0, 0.0])
    bins = error_by_top_share(power, error, n_bins=2)
    np.testing.assert_allclose(bins.edges, [0.5, 0.75, 1.0])
    np.testing.assert_array_equal(bins.counts, [2, 3])
    np.testing.assert_allclose(bins.mean_error, [0.5, 1 / 3])
    empty = error_by_top_share(power[:1], error[:1], n_bins=2)
    assert np.isnan(empty.mean_error[1])
    with pytest.raises(ValueError, match="n_bins"):
        error_by_top_share(power, error, n_bins=0)


def test_inconsistent_arrays_are_named() -> None:
    a = _concentrated(20)
    bad = {**a, "delegation": a["delegation"][:, :, :3]}
    with pytest.raises(ValueError, match=r"delegation must have shape \(20, 4, 4\).*\(20, 4, 3\)"):
        RunOutputs("x", {}, bad)
    with pytest.raises(ValueError, match="lack error"):
        RunOutputs("x", {}, {k: v for k, v in a.items() if k != "error"})
    with pytest.raises(ValueError, match="no samples"):
        RunOutputs("x", {}, {k: v[:0] for k, v in a.items()})
    with pytest.raises(ValueError, match="informative must index"):
        RunOutputs("x", {}, {**a, "informative": a["informative"] + K})


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_save_figure_is_atomic(tmp_path: Path) -> None:
    run = RunOutputs("x", {}, _concentrated(50))
    fig = run_figures(run)["delegation"]
    target = save_figure(fig, tmp_path / "sub" / "d.png")
    assert _is_png(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["d.png"]
    before = target.read_bytes()

    def broken(fh, **kwargs) -> None:
        fh.write(b"half a png")
        raise RuntimeError("disk full")

    fig.savefig = broken  # a failure halfway leaves the old file whole and no temp file
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(fig, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["d.png"]


def test_plot_run_writes_every_figure(tmp_path: Path) -> None:
    with_truth = _write_run(tmp_path / "truth", _concentrated(), {"accuracy": 0.8})
    written = plot_run(with_truth)
    assert [p.name for p in written] == ["delegation.png", "power.png", "confidence.png",
                                         "ground_truth.png"]
    assert all(_is_png(p) and p.parent == with_truth / "figures" for p in written)
    assert not [p for p in (with_truth / "figures").iterdir() if p.name.startswith(".")]

    plain = {k: v for k, v in _concentrated().items() if k not in ("informative", "regions")}
    no_truth = _write_run(tmp_path / "plain", plain)
    (no_truth / "metrics.jsonl").write_text(
        json.dumps({"split": "val", "rmse": 9.0}) + "\n"
        + json.dumps({"split": "test", "rmse": 0.5}) + "\n")
    run = load_run(no_truth)
    assert run.metric == ("rmse", 0.5) and run.task == "regression"
    out = plot_run(no_truth, tmp_path / "elsewhere")
    assert [p.name for p in out] == ["delegation.png", "power.png", "confidence.png"]
    assert all(_is_png(p) for p in out)


def test_comparison_of_runs_with_and_without_ground_truth(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", _concentrated(), {"accuracy": 0.9})
    plain = {k: v for k, v in _concentrated(seed=1).items() if k != "informative"}
    b = _write_run(tmp_path / "b", plain, {"accuracy": 0.7})
    path = plot_comparison([a, b], tmp_path / "cmp" / "comparison.png")
    assert _is_png(path)
    fig = comparison_figure([load_run(a), load_run(b)])
    titles = [ax.get_title() for ax in fig.axes]
    assert any("test accuracy 0.900" in t for t in titles)
    assert any("test accuracy 0.700" in t for t in titles)
    assert any("diagonal: 100%" in t for t in titles)
    with pytest.raises(ValueError, match="at least one"):
        plot_comparison([], tmp_path / "none.png")


def test_missing_or_broken_outputs_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match="run it to the end first"):
        plot_run(tmp_path / "unfinished")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test_outputs.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_run(broken)


# --------------------------------------------------------------------------------------------
# End to end: a real (short) federated run, its figures, the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regions_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    from liquid_fed.config import load_config
    from liquid_fed.federation import Federation, LocalTransport
    from liquid_fed.rundir import RunDir

    cfg = load_config(CONFIGS / "regions.yaml", [
        "train.epochs=2", "train.eval_every=0", "data.options.n_samples=1200",
        "baselines.uniform=false", "baselines.independent=false"])
    run_dir = tmp_path_factory.mktemp("runs") / "shared"
    writer = RunDir(run_dir)
    writer.write_text("config.yaml", cfg.to_yaml())
    result = Federation(cfg, LocalTransport(cfg.n_clients), writer).run()
    return run_dir, result.test


def test_figures_of_a_federated_run_agree_with_its_metrics(regions_run, tmp_path: Path) -> None:
    run_dir, test = regions_run
    run = load_run(run_dir)  # no summary.json: metrics come from metrics.jsonl
    assert run.metric == ("accuracy", pytest.approx(test["accuracy"]))
    s = delegation_summary(run.arrays["delegation"], run.arrays["power"], run.informative)
    assert s.informative_top_power == pytest.approx(test["informative_top_power"])
    assert s.power_entropy == pytest.approx(test["power_entropy"], abs=1e-5)
    assert s.speaker_entropy == pytest.approx(test["speaker_entropy"], abs=1e-6)
    np.testing.assert_allclose(s.mean_power, [test[f"mean_power_{j}"] for j in range(K)],
                               atol=1e-5)
    written = plot_run(run_dir, tmp_path / "figs")
    assert len(written) == 4 and all(_is_png(p) for p in written)
    other = tmp_path / "copy"
    shutil.copytree(run_dir, other)
    assert _is_png(plot_comparison([run_dir, other], tmp_path / "cmp.png"))


def test_cli_plot(regions_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from liquid_fed.cli import main

    run_dir, _ = regions_run
    other = tmp_path / "copy"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("figures"))
    assert main(["plot", str(other), "--out", str(tmp_path / "one")]) == 0
    assert _is_png(tmp_path / "one" / "ground_truth.png")
    assert main(["plot", str(run_dir), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert _is_png(tmp_path / "cmp" / "comparison.png")
    assert _is_png(other / "figures" / "delegation.png")
    capsys.readouterr()
    (tmp_path / "unfinished").mkdir()
    assert main(["plot", str(other), str(tmp_path / "unfinished")]) == 2
    assert "run it to the end first" in capsys.readouterr().err
