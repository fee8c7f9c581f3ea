"""Experiment tracking (``tracking`` in run configs): TensorBoard event files and MLflow runs
hold what ``metrics.jsonl`` holds, for runs, resumed runs and study cells; tracking changes
no result, a tracker failing mid-run does not end the run, and bad values and missing extras
fail at the door naming the key.

Event files are read back with TensorBoard's own EventAccumulator and MLflow runs with
MlflowClient on a local SQLite store, so every check goes through the trackers' readers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from liquid_fed import rundir
from liquid_fed.config import load_config
from liquid_fed.errors import ConfigError
from liquid_fed.federation import LocalTransport
from liquid_fed.runs import check_run, run_federated
from liquid_fed.tracking import STATE_FILE, TENSORBOARD_DIR, check_tracking

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ROOT / "configs" / "regions.yaml"
#: A small run with parties that miss rounds (so ``present`` varies), evaluations every 3
#: rounds and checkpoints every 2: 260 training rows in chunks of 64, 5 rounds per epoch.
SMALL = ["data.options.n_samples=400", "train.epochs=2", "train.chunk_size=64",
         "train.batch_size=32", "train.eval_every=3", "train.checkpoint_every=2",
         "baselines.uniform=false", "baselines.independent=false", "availability.dropout=0.3"]
K = 4


def both_on(store: Path) -> list[str]:
    return ["tracking.tensorboard=true", f"tracking.mlflow=sqlite:///{store}"]


def train(run_dir: Path, overrides: list[str], resume: bool = False,
          stop_after: int | None = None, force: bool = False) -> dict[str, Any] | None:
    """An in-process federated run (the exact twin of the Flower run's server loop)."""
    cfg = load_config(REGIONS, SMALL + overrides)
    rundir.prepare(cfg, run_dir, resume=resume, force=force)
    return run_federated(cfg, LocalTransport(cfg.n_clients), run_dir, resume=resume,
                         stop_after=stop_after)


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return rundir.RunDir(run_dir).read_metrics()


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row as the file holds them (NaN is written as null)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and k != "round"}


def train_losses(run_dir: Path) -> list[float]:
    return [float(v) for v in rundir.load_checkpoint(run_dir).server["train_losses"]]


def read_tensorboard(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR),
                           size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: Any) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def session_hparams(acc: Any) -> dict[str, Any]:
    """The hyper-parameters of the run's HParams session (number or string values)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: (v.string_value if v.WhichOneof("kind") == "string_value" else v.number_value)
            for k, v in info.hparams.items()}


def hparam_metrics(acc: Any) -> list[str]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    return [m.name.tag for m in experiment.metric_infos]


def mlflow_client(store: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}")


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def expected_present(run_dir: Path) -> list[tuple[int, list[int]]]:
    """(round, present counts) of every evaluation, from metrics.jsonl (val rows)."""
    return [(r["round"], r["present"]) for r in rows(run_dir) if r["split"] == "val"]


# --------------------------------------------------------------------------------------------
# One tracked run and one untracked run, shared by several tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tracking")
    store = root / "store" / "mlflow.db"
    train(root / "plain", [])
    train(root / "tracked", both_on(store))
    return {"plain": root / "plain", "tracked": root / "tracked", "store": store}


def test_tracking_changes_no_result(runs: dict[str, Path]) -> None:
    plain, tracked = rundir.RunDir(runs["plain"]), rundir.RunDir(runs["tracked"])
    assert tracked.read_metrics() == plain.read_metrics()
    for key in ("test", "parties", "rounds", "bytes_up", "bytes_down"):
        assert tracked.read_summary()[key] == plain.read_summary()[key]
    assert train_losses(runs["tracked"]) == train_losses(runs["plain"])
    assert not (runs["plain"] / TENSORBOARD_DIR).exists()
    assert not (runs["plain"] / STATE_FILE).exists()


def check_tensorboard_against_files(run_dir: Path) -> None:
    """Every number of every metrics row is a scalar at its round (once), every training
    round's loss is ``train/loss``, and the per-round presence adds up to the rows' counts."""
    acc = read_tensorboard(run_dir)
    tb = scalars(acc)
    for tag, events in tb.items():
        steps = [s for s, _ in events]
        assert len(steps) == len(set(steps)), f"{tag}: a round logged twice: {steps}"
    metric_rows = rows(run_dir)
    assert metric_rows
    for row in metric_rows:
        split, step = row["split"], row["round"]
        for key, value in numbers(row).items():
            assert dict(tb[f"{split}/{key}"])[step] == np.float32(value), (split, key, step)
        for j in range(K):
            share = dict(tb[f"{split}/power_share/party_{j}"])[step]
            assert share == np.float32(row[f"mean_power_{j}"] / K)
    losses = train_losses(run_dir)
    assert [s for s, _ in tb["train/loss"]] == list(range(1, len(losses) + 1))
    assert [v for _, v in tb["train/loss"]] == [np.float32(v) for v in losses]
    # presence: the per-round 0/1 of each party, summed between evaluations, gives the
    # counts the metrics rows carry
    previous = 0
    for step, counts in expected_present(run_dir):
        for j in range(K):
            got = sum(v for s, v in tb[f"train/present/party_{j}"] if previous < s <= step)
            assert got == counts[j], (step, j)
        total = sum(v for s, v in tb["train/present/count"] if previous < s <= step)
        assert total == sum(counts)
        previous = step
    val_rounds = [r["round"] for r in metric_rows if r["split"] == "val"]
    assert [e.step for e in acc.Images("val/delegation")] == val_rounds
    [final] = acc.Images("test/delegation")
    assert final.step == val_rounds[-1]
    # the final heat map shows the mean delegation of the test outputs the run wrote: each
    # entry's square has the viridis colour of its value
    from matplotlib import colormaps
    from PIL import Image

    mean = rundir.RunDir(run_dir).read_outputs()["delegation"].mean(0)  # (K, K)
    image = np.asarray(Image.open(io.BytesIO(final.encoded_image_string)).convert("RGB"))
    cell = image.shape[0] // K
    assert image.shape == (K * cell, K * cell, 3) and cell >= 4
    want = (colormaps["viridis"](np.clip(mean, 0, 1))[..., :3] * 255).round()
    centres = image[cell // 2::cell, cell // 2::cell]  # (K, K, 3)
    assert np.array_equal(centres, want.astype(np.uint8))


def test_tensorboard_scalars_equal_the_metrics_file_for_every_round(
        runs: dict[str, Path]) -> None:
    check_tensorboard_against_files(runs["tracked"])
    acc = read_tensorboard(runs["tracked"])
    hp = session_hparams(acc)
    assert hp["train.epochs"] == 2 and hp["availability.dropout"] == pytest.approx(0.3)
    assert hp["ensemble.solver"] == "sink_one"
    assert "test/accuracy" in hparam_metrics(acc)


def check_mlflow_against_files(store: Path, run_dir: Path) -> Any:
    client = mlflow_client(store)
    run_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for row in rows(run_dir):
        for key, value in numbers(row).items():
            got = [v for s, v in history(client, run_id, f"{row['split']}/{key}")
                   if s == row["round"]]
            assert got == [value], (row["split"], key, row["round"])
    losses = train_losses(run_dir)
    assert history(client, run_id, "train/loss") == list(enumerate(losses, start=1))
    for key in run.data.metrics:  # no round twice, whatever the key
        steps = [s for s, _ in history(client, run_id, key)]
        assert len(steps) == len(set(steps)), key
    return client, run


def test_mlflow_run_holds_the_history_and_the_config(runs: dict[str, Path]) -> None:
    client, run = check_mlflow_against_files(runs["store"], runs["tracked"])
    assert client.get_experiment(run.info.experiment_id).name == "regions"
    assert run.info.run_name == "tracked"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["views.kind"] == "groups"
    assert params["availability.dropout"] == "0.3"
    assert json.loads(params["data.options"])["n_samples"] == 400
    images = [a.path for a in client.list_artifacts(run.info.run_id, "val/delegation")]
    val_rounds = [r["round"] for r in rows(runs["tracked"]) if r["split"] == "val"]
    assert images == [f"val/delegation/round-{r:06d}.png" for r in val_rounds]
    # the artifacts lie beside the store, not in whatever folder the run started in
    assert (runs["store"].parent / "mlflow-artifacts").is_dir()


def test_a_resumed_run_appends_to_the_same_trackers_without_repeating_rounds(
        tmp_path: Path) -> None:
    """Stopped after round 7 and resumed from the checkpoint of round 6 (the newest one lost, as
    when a run dies between checkpoints), round 7 is trained and logged twice: each tracker
    keeps it once."""
    store = tmp_path / "mlflow.db"
    run_dir = tmp_path / "run"
    assert train(run_dir, both_on(store), stop_after=7) is None
    first_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow_run_id"]
    generations = sorted((run_dir / rundir.CHECKPOINTS_DIR).glob("gen-*"))
    newest = [g for g in generations if int(g.name.split("-")[1]) == 7]
    assert len(newest) == 1, generations
    shutil.rmtree(newest[0])
    assert rundir.load_checkpoint(run_dir).round == 6
    train(run_dir, both_on(store), resume=True)
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow_run_id"] == first_id
    check_tensorboard_against_files(run_dir)
    check_mlflow_against_files(store, run_dir)
    client = mlflow_client(store)
    experiment = client.get_experiment_by_name("regions").experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [first_id]
    # started over in the same folder (--force): the folder's trackers hold the new run only
    train(run_dir, both_on(store) + ["train.epochs=1"], force=True)
    second_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow_run_id"]
    assert second_id != first_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [second_id]
    assert client.get_run(first_id).info.lifecycle_stage == "deleted"
    check_tensorboard_against_files(run_dir)
    check_mlflow_against_files(store, run_dir)


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from liquid_fed import tracking

    calls = {"tb": 0, "mlflow": 0}
    real_scalars, real_batch = tracking._TensorBoard.scalars, MlflowClient.log_batch

    def tb_scalars(self: Any, step: int, values: Any) -> None:
        calls["tb"] += 1
        if calls["tb"] > 3:
            raise OSError("disk full")
        real_scalars(self, step, values)

    def log_batch(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("metrics"):
            calls["mlflow"] += 1
            if calls["mlflow"] > 3:
                raise ConnectionError("tracking server gone")
        real_batch(self, *args, **kwargs)

    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0.0)  # metrics go out every round
    monkeypatch.setattr(tracking._TensorBoard, "scalars", tb_scalars)
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with caplog.at_level(logging.WARNING, logger="liquid_fed.tracking"):
        train(tmp_path / "run", both_on(tmp_path / "mlflow.db"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "liquid_fed.tracking"]
    assert len([w for w in warnings if w.startswith("TensorBoard logging failed")]) == 1
    assert len([w for w in warnings if w.startswith("MLflow logging failed")]) == 1
    assert calls["tb"] == 4 and calls["mlflow"] == 4  # each switched off after its failure
    assert rows(tmp_path / "run") == rows(runs["plain"])
    summary = rundir.RunDir(tmp_path / "run").read_summary()
    assert summary["test"] == rundir.RunDir(runs["plain"]).read_summary()["test"]


# --------------------------------------------------------------------------------------------
# Studies and the centralized twin
# --------------------------------------------------------------------------------------------


def test_every_study_cell_gets_its_tensorboard_folder_and_mlflow_run(tmp_path: Path) -> None:
    from simulations.studies import compare

    store = tmp_path / "mlflow.db"
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: tracked-study
base: {REGIONS}
set:
  train.epochs: 1
  data.options.n_samples: 300
  train.eval_every: 2
  tracking.tensorboard: true
  tracking.mlflow: sqlite:///{store}
grid:
  data.options.region_visibility: [shared, none]
seeds: [3]
methods: [liquid, uniform]
""")
    out = tmp_path / "out"
    outcome = compare(study, [], out, quiet=True)
    assert outcome.rows == 4
    client = mlflow_client(store)
    experiment = client.get_experiment_by_name("tracked-study")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    expected = {f"{cell}/seed-3/{method}" for cell in ("c00", "c01")
                for method in ("liquid-sink_one", "uniform")}
    assert set(found) == expected
    visibility = {"c00": "shared", "c01": "none"}
    results = {(r["cell"], r["method"]): r for r in
               csv.DictReader((out / "results.csv").open())}
    for name, run in found.items():
        cell, _, method = name.split("/")
        run_dir = out / "cells" / cell / "seed-3" / method
        label = "liquid:sink_one" if method.startswith("liquid") else "uniform"
        assert run.data.params["method"] == label
        assert run.data.params["seed"] == "3" and run.data.params["cell"] == cell
        assert run.data.params["data.options.region_visibility"] == visibility[cell]
        assert run.data.params["solver"] == ("sink_one" if label.startswith("liquid")
                                             else "none")
        assert run.data.params["mix"] == "probs"
        test = rundir.RunDir(run_dir).final_test_metrics()
        assert run.data.metrics["test/accuracy"] == test["accuracy"]
        acc = read_tensorboard(run_dir)
        hp = session_hparams(acc)
        assert hp["method"] == label and hp["cell"] == cell and hp["seed"] == 3
        assert hp["data.options.region_visibility"] == visibility[cell]
        assert dict(scalars(acc)["test/accuracy"]).popitem()[1] == np.float32(test["accuracy"])
        assert "test/accuracy" in hparam_metrics(acc)
        # the study's table scores what was tracked
        assert float(results[(cell, label)]["score"]) == pytest.approx(test["accuracy"])
        if label.startswith("liquid"):
            check_tensorboard_against_files(run_dir)


def test_the_centralized_twin_logs_every_step_and_its_final_metrics(tmp_path: Path) -> None:
    from liquid_fed.centralized import run_centralized

    cfg = load_config(REGIONS, SMALL[:5] + ["tracking.tensorboard=true"])
    summary = run_centralized(cfg, tmp_path / "run")
    tb = scalars(read_tensorboard(tmp_path / "run"))
    losses = [v for _, v in tb["train/loss"]]
    n_rows = _train_rows(tmp_path / "run")
    per_epoch = -(-n_rows // cfg.train.batch_size)
    assert len(losses) == per_epoch * cfg.train.epochs
    assert [s for s, _ in tb["train/loss"]] == list(range(1, len(losses) + 1))
    # an epoch's loss is the mean over its rows: the steps' losses weighted by batch sizes
    sizes = [cfg.train.batch_size] * (per_epoch - 1)
    sizes.append(n_rows - sum(sizes))
    for epoch, mean in enumerate(summary["epoch_losses"]):
        steps = losses[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert sum(w * v for w, v in zip(sizes, steps, strict=True)) / n_rows == pytest.approx(
            mean, rel=1e-5)
    last = len(losses)
    for split in ("val", "test"):
        assert dict(tb[f"{split}/accuracy"])[last] == np.float32(summary[split]["accuracy"])


def _train_rows(run_dir: Path) -> int:
    cfg = load_config(run_dir / "config.yaml")
    from liquid_fed.federation import load_server_data

    return int(load_server_data(cfg).splits.train.size)


# --------------------------------------------------------------------------------------------
# At the door
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("tracking.tensorboard=1", "tracking.tensorboard: got 1; expected true or false"),
    ("tracking.tensorboard=on_error", "tracking.tensorboard: got 'on_error'; expected true"),
    ("tracking.mlflow=5", "tracking.mlflow: got 5; expected a URI string or null"),
    ("tracking.mlflow=[a]", "tracking.mlflow: got ['a']; expected a URI string or null"),
    ("tracking.mlflow=ftp://host/x", "tracking.mlflow: got 'ftp://host/x'; accepted: "
                                     "sqlite:///PATH.db, http(s)://HOST[:PORT]"),
    ("tracking.mlflow=http://", "tracking.mlflow: got 'http://', which names no host"),
    ("tracking.mlflow=sqlite://x.db", "tracking.mlflow: got 'sqlite://x.db'; a SQLite store"),
    ("tracking.mlflow=' '", "tracking.mlflow: got ' '; accepted"),
    ("tracking.wandb=true", 'unknown config key "tracking.wandb" (accepted under tracking: '
                            "tensorboard, mlflow)"),
])
def test_bad_tracking_values_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REGIONS, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(("override", "module", "extra"), [
    ("tracking.tensorboard=true", "tensorboard", "tensorboard"),
    ("tracking.mlflow=sqlite:///x.db", "mlflow", "mlflow"),
])
def test_a_missing_extra_is_one_line_at_validate_naming_it(
        override: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from liquid_fed import cli

    cfg = load_config(REGIONS, [override])
    check_tracking(cfg)  # installed here
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not: import fails
    with pytest.raises(ConfigError) as err:
        check_run(cfg)
    text = str(err.value)
    key = override.split("=")[0]
    assert text.startswith(f"{key}: ") and f"pip install 'liquid-fed[{extra}]'" in text
    assert "\n" not in text
    code = cli.main(["validate", str(REGIONS), "--set", override])
    stderr = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback" not in stderr
    assert f"pip install 'liquid-fed[{extra}]'" in stderr and len(stderr.splitlines()) == 1


def test_a_file_store_the_installed_mlflow_refuses_is_named_at_validate(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = load_config(REGIONS, [f"tracking.mlflow={tmp_path / 'mlruns'}"])
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true.*sqlite:///"):
        check_tracking(cfg)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking(cfg)


def test_an_unreachable_tracking_server_fails_before_training(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"tracking.mlflow: the tracking server "
                                          f"'http://127.0.0.1:{port}' cannot be reached"):
        train(tmp_path / "run", [f"tracking.mlflow=http://127.0.0.1:{port}"])
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "run" / rundir.METRICS_FILE).exists()
    assert not (tmp_path / "run" / rundir.CHECKPOINTS_DIR).exists()


# --------------------------------------------------------------------------------------------
# The real thing: `liquid-fed run` on Flower and Ray, both trackers on
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_a_real_liquid_fed_run_logs_from_the_server_side(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    run_dir = tmp_path / "run"
    args = [f"--set={o}" for o in SMALL[:5] + both_on(store)]
    proc = subprocess.run([sys.executable, "-m", "liquid_fed.cli", "run", str(REGIONS),
                           "--out", str(run_dir), "--quiet", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_tensorboard_against_files(run_dir)
    check_mlflow_against_files(store, run_dir)
