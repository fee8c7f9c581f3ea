"""`liquid-fed compare STUDY --ray ADDRESS`: a study's jobs as Ray Tune trials on a real
two-node cluster (tests/raycluster.py), against the local run of the same study."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_study import TINY as STUDY_TINY
from test_study import write_study as study_file

from liquid_fed.cli import main
from liquid_fed.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# test_study's tiny study (2 settings x 2 seeds) with two methods: 4 jobs (trials) of 2
# runs, 1 epoch each.
TINY = STUDY_TINY.split("    methods:")[0] + "    methods: [liquid, uniform]\n"
TIMING = ("train_seconds",)


def write_study(tmp_path: Path, body: str = TINY) -> Path:
    return study_file(tmp_path, body)


def rows_of(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


# --------------------------------------------------------------------------------------------
# Without a cluster: what --ray refuses, and what it never imports without --ray
# --------------------------------------------------------------------------------------------


def test_ray_without_the_extra_names_the_extra_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray.tune", None)  # `from ray import tune` now fails
    out = tmp_path / "out"
    assert main(["compare", str(write_study(tmp_path)), "--out", str(out), "--quiet",
                 "--ray", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "optional extra 'cluster'" in err and "pip install 'liquid-fed[cluster]'" in err
    assert not out.exists()


@pytest.mark.parametrize(("extra", "args", "message"), [
    ("engine: federated", ["--ray", "127.0.0.1:1"],
     "engine: federated cannot run with --ray"),
    ("", ["--ray", "127.0.0.1:1", "--workers", "2"], "--workers 2 with --ray"),
    ("", ["--ray", " "], "--ray: got ' '; expected the address of a running Ray cluster"),
    ("", ["--ray", "ray://head:10001"], "a Ray Client address (ray://) is not accepted"),
])
def test_what_ray_cannot_run_is_refused_before_the_folder_exists(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, args: list[str],
        message: str) -> None:
    out = tmp_path / "out"
    study = write_study(tmp_path, TINY + (f"    {extra}\n" if extra else ""))
    assert main(["compare", str(study), "--out", str(out), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unreachable_cluster_is_a_config_error_naming_the_address(tmp_path: Path) -> None:
    from liquid_fed.study import load_study
    from simulations.tune import run_on_cluster

    study = load_study(write_study(tmp_path))
    setting, seed = next(study.cells())
    env = os.environ.pop("RAY_ADDRESS", None)
    try:
        with pytest.raises(ConfigError, match=r"--ray: could not join the Ray cluster at "
                                              r"'127\.0\.0\.1:1'"):
            run_on_cluster(study, tmp_path / "out", [(setting, seed, ["uniform"])],
                           "127.0.0.1:1", lambda method, seconds: None)
    finally:
        if env is not None:
            os.environ["RAY_ADDRESS"] = env


def test_the_collector_writes_summaries_last_and_nothing_outside_the_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import simulations.tune as tune_module
    from liquid_fed.rundir import atomic_write

    out = tmp_path / "study"
    seen: list[str] = []

    def record(path: Path, data: bytes, mode: int | None = None) -> Path:
        seen.append(Path(path).name)
        return atomic_write(path, data, mode)

    monkeypatch.setattr(tune_module, "atomic_write", record)
    collector = tune_module.Collector(str(out))
    collector.write({"cells/c00/seed-0/uniform/summary.json": b"{}",
                     "cells/c00/seed-0/views.json": b"[]",
                     "cells/c00/seed-0/uniform/config.yaml": b"a: 1\n"})
    with pytest.raises(ValueError, match="outside the study folder"):
        collector.write({"../elsewhere.txt": b"x"})
    assert seen == ["views.json", "config.yaml", "summary.json"]
    assert (out / "cells/c00/seed-0/uniform/config.yaml").read_bytes() == b"a: 1\n"
    assert not (tmp_path / "elsewhere.txt").exists()


def test_the_bar_ticks_once_per_result_a_trial_reports() -> None:
    from simulations.tune import _progress

    ticks: list[tuple[str, float]] = []
    callback = _progress(lambda method, seconds: ticks.append((method, seconds)))
    for method, seconds in (("liquid:sink_one", 1.5), ("uniform", 0.25)):
        callback.on_trial_result(iteration=1, trials=[], trial=None,
                                 result={"method": method, "seconds": seconds, "node": "n"})
    assert ticks == [("liquid:sink_one", 1.5), ("uniform", 0.25)]


# --------------------------------------------------------------------------------------------
# On a real two-node cluster
# --------------------------------------------------------------------------------------------

LOCAL = """
import sys
from liquid_fed.cli import main
code = main(sys.argv[1:])
# Without --ray nothing of Ray Tune (nor the cluster side of compare) is imported.
assert "ray.tune" not in sys.modules and "simulations.tune" not in sys.modules, "imported"
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_a_study_on_a_two_node_cluster_gives_the_local_rows_resumes_and_leaves_nothing(
        tmp_path: Path) -> None:
    from raycluster import start_cluster

    study = write_study(tmp_path)
    local_out, out = tmp_path / "local", tmp_path / "cluster"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cluster = start_cluster()
    local = None
    try:
        idle = cluster.processes()  # the cluster's own daemons, before the study joins it
        # The local run (one process: the rows do not depend on --workers) trains meanwhile.
        local = subprocess.Popen([sys.executable, "-c", LOCAL, "compare", str(study), "--out",
                                  str(local_out), "--quiet"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        command = [sys.executable, "-m", "liquid_fed.cli", "compare", str(study), "--out",
                   str(out), "--quiet", "--ray", cluster.address]

        # Interrupted (Ctrl-C) once the first run is in the study folder.
        proc = subprocess.Popen(command, cwd=ROOT, env={**cluster.env, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while not list(out.glob("cells/*/*/*/summary.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no run finished on the cluster"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "continue with --resume" in err, err[-3000:]
        before = _runs(out)
        first = len(before)
        assert 1 <= first < 8
        assert not (out / "results.csv").exists()
        _assert_nothing_left(cluster, idle)
        assert local.wait(timeout=300) == 0, local.communicate()[1][-3000:]
        expected = rows_of(local_out)
        assert len(expected) == 2 * 2 * 2

        # Resumed: only the missing runs train; every row once, equal to the local rows.
        done = subprocess.run([*command, "--resume"], cwd=ROOT, timeout=300,
                              env={**cluster.env, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"resuming: {first} finished run(s) skipped, {len(expected) - first} to go" \
            in done.stderr
        rows = rows_of(out)
        keys = [(r["cell"], r["seed"], r["method"]) for r in rows]
        assert len(keys) == len(set(keys)) == len(expected)
        assert rows == expected  # every score and metric column, in the local order
        _assert_nothing_left(cluster, idle)

        # The trials ran on both nodes (each run's summary records its node).
        nodes = {json.loads(p.read_text())["ray_node_id"]
                 for p in out.glob("cells/*/*/*/summary.json")}
        assert nodes == set(cluster.node_ids.values())
        # Tune's own logs of both experiments (the interrupted one's kept too), in the study
        # folder: a row per run trained by the resumed one, with its score.
        assert len(list(out.glob("tune/compare-*/experiment_state-*.json"))) == 2
        progress = list(out.glob("tune/compare-*/*/progress.csv"))
        logged = {(r["cell"], r["seed"], r["method"]): r["score"]
                  for p in progress for r in csv.DictReader(p.open(newline=""))}
        scores = {k: r["score"] for k, r in zip(keys, rows, strict=True)}
        resumed = set(keys) - before
        assert resumed and {k: logged.get(k) for k in resumed} == {
            k: scores[k] for k in resumed}
        assert list(out.glob("tune/compare-*/*/events.out.tfevents.*"))
    finally:
        if local is not None and local.poll() is None:
            local.kill()
        cluster.stop()


def _runs(out: Path) -> set[tuple[str, str, str]]:
    """(cell, seed, method) of the finished runs in a study folder."""
    return {(p.parents[2].name, p.parents[1].name.removeprefix("seed-"),
             json.loads(p.read_text())["method"]) for p in out.glob("cells/*/*/*/summary.json")}


def _assert_nothing_left(cluster: object, idle: set[int]) -> None:
    """No process, live actor or session folder of the study's job on the cluster."""
    deadline = time.monotonic() + 30
    while cluster.processes() - idle and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.2)
    assert cluster.processes() - idle == set()  # type: ignore[attr-defined]
    assert [a for a in cluster.actors() if a["state"] == "ALIVE"] == []  # type: ignore
    for folder in cluster.folders:  # type: ignore[attr-defined]
        assert list(folder.glob("session_2*/artifacts/*/compare-*")) == []
