"""A study under absent parties: train_missing and test_missing, end to end, resumed."""

from __future__ import annotations

import csv
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.errors import ConfigError
from liquid_fed.study import collect, finished, load_study, run_cell

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ROOT / "configs" / "regions.yaml"
METHODS = ["liquid", "averaged", "local", "plugvfl", "laser"]

TINY = f"""
    name: tiny-dropout
    base: {REGIONS}
    set:
      train.epochs: 1
      train.chunk_size: 64
      data.options.n_samples: 300
      train.eval_every: 0
    grid:
      train_missing: [0.0, 0.3]
    test_missing: [0.0, 0.5]
    show: [train_missing]
    seeds: [4]
    methods: {METHODS}
"""


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_tiny_dropout_study_runs_scores_every_rate_and_resumes(
        tmp_path: Path) -> None:
    from liquid_fed.cli import main

    study_file = _write(tmp_path, TINY)
    study = load_study(study_file)
    # train_missing is the rounds' dropout of every cell's run config
    assert [study.config(s, 4).availability.dropout for s in study.settings] == [0.0, 0.3]
    out = tmp_path / "out"
    assert main(["compare", str(study_file), "--out", str(out), "--quiet"]) == 0
    rows = _rows(out / "results.csv")
    labels = ["liquid:sink_one", *METHODS[1:]]
    assert len(rows) == 2 * 2 * len(labels)
    assert {(r["cell"], r["train_missing"], r["test_missing"]) for r in rows} == {
        ("c00@0", "0.0", "0.0"), ("c00@0.5", "0.0", "0.5"), ("c01@0", "0.3", "0.0"),
        ("c01@0.5", "0.3", "0.5")}
    for cell in ("c00", "c01"):
        for label in labels:
            slug = label.replace(":", "-")
            summary = json.loads((out / "cells" / cell / "seed-4" / slug / "summary.json")
                                 .read_text())
            full, half = (next(r for r in rows if r["cell"] == f"{cell}@{p}"
                               and r["method"] == label) for p in ("0", "0.5"))
            # rate 0: the run's own test score; 0.5: its score on the shared masks
            assert float(full["score"]) == pytest.approx(summary["test"]["accuracy"])
            assert float(half["score"]) == pytest.approx(
                summary["test_missing"]["0.5"]["accuracy"])
            assert full["absent_one"] != "" and half["absent_one"] == ""
            assert float(full["absent_one_drop"]) == pytest.approx(
                float(full["score"]) - float(full["absent_one"]))
    le = json.loads((out / "cells" / "c01" / "seed-4" / "liquid-sink_one" / "summary.json")
                    .read_text())
    # the Liquid Ensemble's rate is its own robustness (powers re-solved over the present)
    assert le["test_missing"]["0.5"] == le["robustness"]["missing_rate"]["0.5"]
    assert le["test_missing"]["absent 2"] == le["robustness"]["absent"]["2"]
    report = (out / "report.md").read_text()
    assert "## c01@0.5: train_missing=0.3, test_missing=0.5" in report
    assert "with one party absent (mean over which party)" in report
    assert "Training time of all 10 runs" in report
    figure = out / "figures" / "metric_vs_test_missing.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume (the library's part of it: `compare --resume` is tested in test_study): two runs
    # lost, only they train again, and the rows come out the same
    shutil.rmtree(out / "cells" / "c01" / "seed-4" / "laser")
    shutil.rmtree(out / "cells" / "c00" / "seed-4" / "liquid-sink_one")
    todo = [(s, [m for m in study.methods if not finished(out, s.id, 4, m)])
            for s in study.settings]
    assert [(s.id, m) for s, m in todo] == [("c00", ["liquid:sink_one"]), ("c01", ["laser"])]
    for setting, methods in todo:
        run_cell(study, setting, 4, methods, out)
    again = [{k: "" if v is None else str(v) for k, v in r.items()}
             for r in collect(study, out)]
    diff = [(k, a.get(k), b.get(k)) for a, b in zip(again, rows, strict=True) for k in b
            if k != "train_seconds" and a.get(k, "") != b[k]]
    assert not diff, diff[:5]


@pytest.mark.parametrize(("extra", "message"), [
    ("grid: {train_missing: [0.0], test_missing: [0.1]}\n",
     "grid.test_missing: test missing rates are a study key"),
    ("test_missing: [0.0, 1.0]\n", r"test_missing: got \[0.0, 1.0\]; expected distinct"),
    ("test_missing: 0.3\n", "test_missing: got 0.3; expected a non-empty list"),
    ("show: [views.overlap]\n", 'show: "views.overlap" is not a key the settings vary'),
    ("grid: {train_missing: [0.0, 1.0]}\n", "availability.dropout"),
], ids=["grid", "range", "list", "show", "train-range"])
def test_bad_absence_keys_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    body = f"base: {REGIONS}\nmethods: [liquid]\n" + extra
    if "grid:" not in extra:
        body += "grid: {train_missing: [0.0, 0.1]}\n"
    with pytest.raises(ConfigError, match=message):
        load_study(_write(tmp_path, body))


def test_the_missing_figure_draws_each_methods_mean_per_test_rate(tmp_path: Path) -> None:
    from liquid_fed.study_plots import missing_figure

    body = TINY.replace("seeds: [4]", "seeds: [0, 1]")
    study = load_study(_write(tmp_path, body))
    rows = []
    for s in study.scored_settings():
        for seed in study.seeds:
            for m in study.methods:
                # a score that tells every panel, line, rate and seed apart
                score = (0.9 - 0.3 * s.values["test_missing"] - 0.1 * s.values["train_missing"]
                         - 0.01 * study.methods.index(m) + 0.001 * seed)
                rows.append({"cell": s.id, "seed": seed, "method": m, "metric": "accuracy",
                             "score": score})
    fig = missing_figure(study, rows)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["train missing 0.0", "train missing 0.3"]
    for ax, train in zip(axes, (0.0, 0.3), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == study.methods
        for i, (label, line) in enumerate(lines.items()):
            assert list(line.get_xdata()) == [0.0, 0.5]
            expected = [0.9 - 0.3 * p - 0.1 * train - 0.01 * i + 0.0005 for p in (0.0, 0.5)]
            assert np.allclose(line.get_ydata(), expected), label
