"""`liquid-fed compare`: study files, cells, the study folder, resume, the report."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.errors import ConfigError
from liquid_fed.report import interval, paired_difference, render, verdicts
from liquid_fed.study import load_study, merge_key

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ROOT / "configs" / "regions.yaml"
ALL_METHODS = ["liquid", "uniform", "averaged", "local", "splitnn", "aggvfl", "moe", "central",
               "oracle"]


def write_study(tmp_path: Path, body: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).replace("BASE", str(REGIONS)))
    return path


TINY = """
    name: tiny
    base: BASE
    set:
      train.epochs: 1
      data.options.n_samples: 400
      train.eval_every: 0
    grid:
      data.options.region_visibility: [shared, none]
    seeds: 2
    methods: [liquid, uniform, averaged, local, splitnn, aggvfl, moe, central, oracle]
"""


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liquid_fed.cli", "compare", *args,
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=600)


def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_tiny_study_writes_every_file_and_resumes_with_identical_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, TINY)
    out = tmp_path / "out"
    proc = compare(str(study), "--out", str(out), "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(out / "results.csv")
    assert len(rows) == 2 * 2 * len(ALL_METHODS)
    assert {r["method"] for r in rows} == {"liquid:sink_one", *ALL_METHODS[1:]}
    for r in rows:
        assert r["metric"] == "accuracy" and 0.0 <= float(r["score"]) <= 1.0
        assert r["data.options.region_visibility"] in ("shared", "none")
        assert float(r["icor"]) == float(r["icor"])  # observability of the views, per cell
        assert abs(sum(float(r[f"importance_{k}"]) for k in range(4)) - 1) < 1e-9
    liquid = [r for r in rows if r["method"] == "liquid:sink_one"]
    assert all(float(r["label_leakage"]) > 0.9 for r in liquid)  # measured in every LE run
    assert all(r["delegation_accuracy"] != "" and r["region_nmi"] != "" for r in liquid)
    # every run folder, as `liquid-fed run` writes them
    le = out / "cells" / "c00" / "seed-1" / "liquid-sink_one"
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "test_outputs.npz",
                 "views.json"):
        assert (le / name).is_file(), name
    assert (out / "cells" / "c01" / "seed-0" / "views.json").is_file()
    for method in ALL_METHODS[1:]:
        assert (out / "cells" / "c01" / "seed-0" / method / "summary.json").is_file(), method
    report = (out / "report.md").read_text()
    assert "## c00: data.options.region_visibility=shared" in report
    assert "Paired differences in accuracy" in report and "Where the Liquid" in report
    assert (out / "study.yaml").is_file()
    assert not list(out.rglob("*.tmp-*"))
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == {"metric_vs_data.options.region_visibility.png", "delegation_c00.png",
                       "delegation_c01.png", "graph_c00.png", "graph_c01.png",
                       "power_vs_observability.png", "confidence_tau.png",
                       "paired_differences.png", "routing_c00.png", "routing_c01.png"}
    assert all((out / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)

    # Resume (in this process): lose two runs; only those train again, rows come out the same.
    from liquid_fed.cli import main

    before = (out / "results.csv").read_text()
    shutil.rmtree(out / "cells" / "c01" / "seed-1" / "moe")
    shutil.rmtree(out / "cells" / "c00" / "seed-0" / "liquid-sink_one")
    assert main(["compare", str(study), "--out", str(out), "--resume", "--quiet"]) == 0
    assert "resuming: 34 finished run(s) skipped, 2 to go" in capsys.readouterr().err
    after = rows_of(out / "results.csv")

    def same(r: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in r.items() if k != "train_seconds"}

    assert [same(r) for r in after] == [same(r) for r in rows]
    redone = {("c01", "1", "moe"), ("c00", "0", "liquid:sink_one")}
    untouched = [i for i, r in enumerate(rows)
                 if (r["cell"], r["seed"], r["method"]) not in redone]
    assert [after[i] for i in untouched] == [rows[i] for i in untouched]
    assert before.splitlines()[0] == (out / "results.csv").read_text().splitlines()[0]
    # A plain rerun into the folder is refused; a changed study cannot resume it.
    assert main(["compare", str(study), "--out", str(out), "--quiet"]) == 2
    assert "already holds a study" in capsys.readouterr().err
    assert main(["compare", str(study), "--out", str(out), "--resume", "--quiet",
                 "--set", "seeds=3"]) == 2
    assert "the study differs" in capsys.readouterr().err


@pytest.mark.parametrize(("body", "message"), [
    ("base: BASE\nmethodz: [liquid]\n", 'unknown study key "methodz"'),
    ("base: nowhere.yaml\n", "base: "),
    ("base: BASE\ngrid: {views.overlapp: [0, 0.5]}\n", 'unknown config key "views.overlapp"'),
    ("base: BASE\ngrid: {views.overlap: [0, 1.5]}\n", "views.overlap: got 1.5"),
    ("base: BASE\ngrid: {views.overlap: 0.5}\n", "grid.views.overlap: got 0.5; expected a "
                                                  "non-empty list"),
    ("base: BASE\nmethods: [liquid, bagging]\n", 'methods: unknown method "bagging"'),
    ("base: BASE\nsolvers: [sink_three]\n", 'solvers: got "sink_three"'),
    ("base: BASE\nseeds: 0\n", "seeds: got 0"),
    ("base: BASE\nengine: spark\n", 'engine: got "spark"; accepted: centralized, federated'),
    ("base: BASE\npaired: {views.overlap: [0, 0.1], seed: [1]}\n", "paired: its lists must "
                                                                   "have one length"),
    ("base: BASE\nrandom: {n: 2, keys: {views.overlap: {gauss: [0, 1]}}}\n",
     "random.keys.views.overlap: got"),
    ("base: BASE\nmethod_options: {top: [4]}\n", 'unknown key "method_options.top"'),
    ("base: BASE\nmethods: [liquid, oracle]\nset: {data.name: digits, views.kind: patches, "
     "views.options: {grid: [2, 2]}, data.options: {}}\n",
     'method "oracle" needs the ground truth'),
], ids=["key", "base", "grid-key", "grid-value", "grid-list", "method", "solver", "seeds",
        "engine", "paired", "random", "options", "oracle"])
def test_bad_study_files_are_refused_before_anything_runs(tmp_path: Path, body: str,
                                                          message: str) -> None:
    study = write_study(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_study(study)
    assert message in str(err.value)


def test_the_cli_refuses_a_bad_study_before_creating_anything(tmp_path: Path) -> None:
    for body, message in (("base: BASE\nmethodz: [liquid]\n", 'unknown study key "methodz"'),
                          ("base: BASE\ngrid: {train.epochs: [1, -2]}\n",
                           "cell c01 (train.epochs=-2), seed 0: train.epochs: got -2")):
        study = write_study(tmp_path, body)
        out = tmp_path / "never"
        proc = compare(str(study), "--out", str(out))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists()


def test_settings_expand_grid_paired_and_random_draws(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, """
        base: BASE
        set: {train: {epochs: 3}}
        grid: {views.overlap: [0.0, 0.25], data.options.region_visibility: [shared, none]}
        paired: {views.noise: [0.0, 0.5], views.missing: [0.0, 0.1]}
        random: {n: 3, seed: 7, keys: {views.noise: {uniform: [0, 1]}, train.batch_size:
                 {choice: [32, 64]}}}
        seeds: [3, 5]
        methods: [liquid, uniform]
        solvers: [sink_one, sink_many]
    """))
    assert len(study.settings) == 2 * 2 * 2 + 3
    assert study.settings[0].values == {"views.overlap": 0.0,
                                        "data.options.region_visibility": "shared",
                                        "views.noise": 0.0, "views.missing": 0.0}
    assert study.settings[7].values["views.noise"] == 0.5  # paired keys move together
    assert study.settings[7].values["views.missing"] == 0.1
    draws = [s.values for s in study.settings[8:]]
    again = load_study(write_study(tmp_path, (tmp_path / "study.yaml").read_text()
                                   .replace(str(REGIONS), "BASE"), "again.yaml"))
    assert [s.values for s in again.settings[8:]] == draws  # seeded: reproducible
    assert all(0 <= d["views.noise"] <= 1 and d["train.batch_size"] in (32, 64) for d in draws)
    assert study.methods == ["liquid:sink_one", "liquid:sink_many", "uniform"]
    cfg = study.config(study.settings[5], 5, "liquid:sink_many")
    assert cfg.seed == 5 and cfg.ensemble.solver == "sink_many"
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 64  # set merged into the section
    assert cfg.views.overlap == 0.25 and cfg.data.options["region_visibility"] == "shared"
    assert cfg.data.options["n_samples"] == 3000  # the base's other options are kept


def test_merge_key_merges_sections_and_replaces_options() -> None:
    data = {"train": {"epochs": 1, "batch_size": 8}, "views": {"options": {"grid": [2, 2]}}}
    merge_key(data, "train", {"epochs": 5})
    merge_key(data, "views.options", {})
    merge_key(data, "data.options.noise", 0.3)
    assert data == {"train": {"epochs": 5, "batch_size": 8}, "views": {"options": {}},
                    "data": {"options": {"noise": 0.3}}}


def test_intervals_and_paired_differences_against_a_hand_computation() -> None:
    values = [0.81, 0.85, 0.79, 0.88]
    got = interval(values)
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert got.mean == pytest.approx(mean)
    assert got.half == pytest.approx(3.182446305284263 * sd / 2)  # t(0.975, 3) = 3.1824...
    assert math.isnan(interval([0.5]).half) and interval([]).n == 0
    rows = [{"cell": "c00", "seed": s, "method": m, "score": v, "metric": "accuracy"}
            for s, (a, b) in enumerate([(0.9, 0.8), (0.92, 0.81), (0.88, 0.83)])
            for m, v in (("liquid:sink_one", a), ("uniform", b))]
    d = paired_difference(rows, "c00", "liquid:sink_one", "uniform")
    diffs = np.array([0.1, 0.11, 0.05])
    assert d.mean == pytest.approx(diffs.mean())
    assert d.half == pytest.approx(4.302652729911275 * diffs.std(ddof=1) / math.sqrt(3))


def test_report_marks_the_best_and_lists_wins_and_losses(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, """
        base: BASE
        set: {data.options.n_samples: 300}
        seeds: 3
        methods: [liquid, uniform, central]
    """))
    scores = {"liquid:sink_one": [0.90, 0.92, 0.91], "uniform": [0.80, 0.82, 0.81],
              "central": [0.95, 0.97, 0.96]}
    rows = [{"cell": "c00", "seed": s, "method": m, "metric": "accuracy", "score": v[s]}
            for m, v in scores.items() for s in range(3)]
    text = render(study, rows)
    assert "| central | **0.960 ± 0.025** |" in text
    assert "| c00: base | 0.910 | 0.810 | **0.960** |" in text  # the overview: means only
    found = {(v.method, v.baseline, v.better) for v in verdicts(study, rows)}
    assert found == {("liquid:sink_one", "uniform", True),
                     ("liquid:sink_one", "central", False)}
    assert "**Wins** (1):" in text and "**Losses** (1):" in text


@pytest.mark.slow
@pytest.mark.xdist_group("live")
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_stopped_compare_leaves_no_worker_behind(tmp_path: Path, how: str) -> None:
    import os
    import signal
    import time
    import uuid

    from liquid_fed import procs

    study = write_study(tmp_path, TINY)
    out = tmp_path / "out"
    tag = uuid.uuid4().hex  # inherited by every process the command starts
    proc = subprocess.Popen([sys.executable, "-m", "liquid_fed.cli", "compare", str(study),
                             "--out", str(out), "--workers", "2", "--quiet",
                             "--set", "set.train.epochs=400"], cwd=ROOT,
                            env={**os.environ, "LF_STUDY_TEST_TAG": tag},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    # the launcher, multiprocessing's resource tracker and two workers
    while len(procs.tagged("LF_STUDY_TEST_TAG", tag)) < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)
    time.sleep(2.0)  # let them train
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    if how == "SIGTERM":
        assert proc.returncode == 130 and "continue with --resume" in err
    deadline = time.monotonic() + 20
    while procs.tagged("LF_STUDY_TEST_TAG", tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert procs.tagged("LF_STUDY_TEST_TAG", tag) == set()


def test_a_study_too_large_fails_at_once_naming_its_size(tmp_path: Path) -> None:
    import resource
    import time

    huge_grid = "\n".join(f"  views.noise{i}: [{', '.join(str(j) for j in range(100))}]"
                          for i in range(6))  # 10^12 cells (the keys need not exist yet)
    cases = {
        "seeds: 1000000000": r"seeds: got 1000000000; expected 1..1000",
        "random: {n: 1000000000, keys: {views.noise: {uniform: [0, 1]}}}":
            r"the study has 1,000,000,000 settings .*at most 10,000",
        f"grid:\n{huge_grid}": r"the study has 1,000,000,000,000 settings",
        "random: {n: 3, keys: {train.epochs: {int: [1.5, 4]}}}":
            r"random.keys.train.epochs.int: got \[1.5, 4\]; the bounds of an integer draw must "
            r"be integers",
        "seeds: 1000\nmethods: [liquid, uniform, averaged, local, splitnn, aggvfl, moe, central]"
        "\nrandom: {n: 20, keys: {views.noise: {uniform: [0, 1]}}}":
            r"the study has 160,000 runs \(20 settings x 1000 seeds x 8 methods\)",
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for body, message in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=message):
            load_study(write_study(tmp_path, f"base: {REGIONS}\n{body}\n"))
        assert time.perf_counter() - t0 < 5, body
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 << 10  # KiB
