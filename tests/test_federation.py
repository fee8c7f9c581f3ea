"""End-to-end federation: the real ``liquid-fed`` CLI, Flower's simulation engine, real Ray.

Each test starts Ray through the CLI in a child process. They share one xdist group so that
no two Ray clusters compete for the 2 cores and the leftover-process checks see only their
own run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.centralized import build_ensemble, central_data, train_ensemble
from liquid_fed.config import load_config
from liquid_fed.rundir import RunLock, has_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]
#: The signal and process tests run beside the others (a second group: its own xdist worker);
#: every check they make is by their own run's tag, so another run on the machine is no harm.
live = pytest.mark.xdist_group("live")

OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "views.json")


def tagged_env() -> tuple[dict[str, str], str]:
    """The environment for one CLI call, with a marker every descendant inherits."""
    tag = f"lf-test-{uuid.uuid4().hex}"
    return {**os.environ, "LIQUID_FED_TEST_TAG": tag}, tag


def live_processes(tag: str) -> list[str]:
    """Command lines of live processes (Ray's daemons and workers included) carrying ``tag``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if tag.encode() not in Path(f"/proc/{pid}/environ").read_bytes():
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(f"{pid}: {cmd[:120]}")
    return found


def liquid_fed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env, tag = tagged_env()
    cmd = [sys.executable, "-m", "liquid_fed.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert live_processes(tag) == [], "processes outlived `liquid-fed run`"
    return proc


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_federated_run_reproduces_centralized_training_exactly(tmp_path: Path) -> None:
    sets = ["train.epochs=1", "train.chunk_size=64", "train.batch_size=64",
            "train.local_steps=1", "train.dtype=float64", "train.eval_every=0",
            "optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0", "optim.momentum=0",
            "baselines.uniform=false", "baselines.independent=false",
            "experts.options={hidden: [32]}"]
    run = tmp_path / "exact"
    args = [a for s in sets for a in ("--set", s)]
    ok(liquid_fed("run", str(QUICKSTART), *args, "--out", str(run), "--quiet"))

    cfg = load_config(QUICKSTART, sets)
    data = central_data(cfg)
    ensemble = build_ensemble(cfg, data)
    losses: list[float] = []
    central = train_ensemble(cfg, data, ensemble, on_step=lambda _, loss: losses.append(loss))

    checkpoint = load_checkpoint(run, cfg.n_clients)
    assert len(checkpoint.server["train_losses"]) == len(losses) > 15
    np.testing.assert_allclose(checkpoint.server["train_losses"], losses, rtol=0, atol=1e-6)
    for k, expert in enumerate(ensemble.experts):
        state = checkpoint.clients[k]
        for name, value in expert.state_dict().items():
            np.testing.assert_allclose(state[f"model/{name}"], value.numpy(), rtol=0, atol=1e-6)
    assert summary(run)["test"]["accuracy"] == pytest.approx(central["test"]["accuracy"])


def test_quickstart_end_to_end_then_interrupted_and_resumed(tmp_path: Path) -> None:
    short = ["--set", "train.epochs=4", "--set", "train.eval_every=10"]
    whole = tmp_path / "whole"
    proc = ok(liquid_fed("run", str(QUICKSTART), *short, "--out", str(whole)))
    for name in OUTPUTS:
        assert (whole / name).is_file(), name
    assert len(load_checkpoint(whole, 4).clients) == 4
    result = summary(whole)
    assert result["rounds"] == 20 and result["epochs"] == 4
    assert 0.0 < result["test"]["accuracy"] <= 1.0
    assert result["bytes_up"] > 0 and result["bytes_down"] > 0
    assert result["peak_memory_bytes"] > 100 * 2**20
    assert result["engine"]["startup_seconds"] > 0
    refs = result["references"]
    assert len(refs["centralized_single"]) == 4
    assert {"centralized_uniform", "centralized_averaged"} <= set(refs)
    assert "liquid ensemble (federated)" in proc.stdout
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["split"]) for r in rows] == [(10, "val"), (20, "val"), (20, "test")]
    for key in ("loss", "accuracy", "tau_max_prob", "tau_delegation", "power_entropy",
                "speaker_entropy", "bytes_up", "bytes_down"):
        assert key in rows[-1], key
    views = json.loads((whole / "views.json").read_text())
    assert len(views["plan"]["columns"]) == 4 and len(views["summary"]) == 5

    # Interrupted after 7 of 20 rounds (baselines off: they do not touch the federation).
    part = tmp_path / "part"
    common = [*short, "--set", "baselines.uniform=false", "--set", "baselines.independent=false",
              "--out", str(part), "--quiet"]
    stopped = ok(liquid_fed("run", str(QUICKSTART), *common, "--stop-after", "7"))
    assert "stopped after round 7" in stopped.stdout
    assert not (part / "summary.json").exists()
    again = liquid_fed("run", str(QUICKSTART), *common)
    assert again.returncode == 2 and "already holds results; pass --resume" in again.stderr
    ok(liquid_fed("run", str(QUICKSTART), *common, "--resume"))
    resumed = summary(part)["test"]
    for key, value in result["test"].items():
        if not key.startswith("bytes"):
            assert resumed[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_sixteen_clients_complete_on_two_cores(tmp_path: Path) -> None:
    run = tmp_path / "sixteen"
    sets = ["data.name=synthetic_regions",
            "data.options={n_samples: 1200, n_regions: 16, n_groups: 16, features_per_group: 2}",
            "views.kind=groups", "views.n_views=16", "views.options={}",
            "experts.options={hidden: [16]}", "train.epochs=2", "train.chunk_size=512",
            "train.eval_every=0", "baselines.uniform=false", "baselines.independent=false"]
    ok(liquid_fed("run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
                  "--out", str(run), "--quiet"))
    result = summary(run)
    assert len(result["n_params"]) == 16
    assert result["rounds"] == 2 * 2
    assert np.isfinite(result["test"]["loss"])
    assert len([k for k in result["test"] if k.startswith("mean_power_")]) == 16


def test_heterogeneous_experts_in_one_federation(tmp_path: Path) -> None:
    run = tmp_path / "hetero"
    per_client = ("[{kind: mlp, options: {hidden: [32]}},"
                  " {kind: cnn, options: {channels: [8]}},"
                  " {kind: mlp, options: {hidden: [64, 32]}},"
                  " {kind: cnn, options: {channels: [4, 8]}}]")
    sets = [f"experts.per_client={per_client}", "train.epochs=3", "train.eval_every=0",
            "baselines.uniform=false", "baselines.independent=false"]
    ok(liquid_fed("run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
                  "--out", str(run), "--quiet"))
    result = summary(run)
    assert len(set(result["n_params"])) == 4  # four different architectures
    assert result["test"]["accuracy"] > 0.5


def start_live_run(run: Path, env: dict[str, str],
                   args: list[str] | None = None) -> subprocess.Popen:
    """A long `liquid-fed run` (of ``args``: a config and its options), returned once it has
    written its first checkpoint."""
    args = args or [str(QUICKSTART), "--set", "train.checkpoint_every=5", "--set",
                    "train.epochs=200", "--set", "baselines.uniform=false", "--set",
                    "baselines.independent=false"]
    cmd = [sys.executable, "-m", "liquid_fed.cli", "run", *args, "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 180
    while not has_checkpoint(run) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert has_checkpoint(run)
    return proc


def run_environment(tag: str) -> dict[str, str]:
    """The environment of the run's simulation child (found by the test's tag)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"simulations.simulate" in cmd and tag.encode() in env:
            return dict(item.split("=", 1) for item in env.decode().split("\0") if "=" in item)
    raise AssertionError("no simulation child found")


@live
def test_ctrl_c_stops_everything_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "interrupt"
    env, tag = tagged_env()
    proc = start_live_run(run, env)
    seen_during = live_processes(tag)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "continue with --resume" in err
    assert any("raylet" in p for p in seen_during), "the tag did not reach Ray's processes"
    assert live_processes(tag) == []
    checkpoint = load_checkpoint(run, 4)
    assert checkpoint.round % 5 == 0 and checkpoint.round > 0
    assert not list(run.rglob("*.tmp-*"))


_JOIN = """
import ray
ray.init(address=ADDRESS, logging_level="ERROR", log_to_driver=False)
@ray.remote
def f():
    return 42
print("JOINED", ray.get(f.remote(), timeout=30))
"""


@live
def test_a_live_run_is_private_locked_and_stops_on_sigterm(tmp_path: Path) -> None:
    run = tmp_path / "private"
    env, tag = tagged_env()
    proc = start_live_run(run, env)
    try:
        # A second run into the same folder is refused while the first one holds it.
        second = liquid_fed("run", str(QUICKSTART), "--out", str(run), "--quiet")
        assert second.returncode == 2
        assert f"is in use by another liquid-fed process (pid {proc.pid}" in second.stderr
        # Ray is private to the run: a process without the run's token cannot join it.
        child = run_environment(tag)
        token = Path(child["RAY_AUTH_TOKEN_PATH"])
        assert child["RAY_AUTH_MODE"] == "token" and token.stat().st_mode & 0o777 == 0o600
        raylet = next(p for p in live_processes(tag) if "raylet/raylet" in p)
        pid = int(raylet.split(":")[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        address = next(a.split("=", 1)[1] for a in cmdline if a.startswith("--gcs-address="))
        outsider = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        outsider["RAY_gcs_rpc_server_connect_timeout_s"] = "5"
        outsider["RAY_NUM_REDIS_GET_RETRIES"] = "2"  # refused twice, not Ray's 20 x 1 s
        joined = subprocess.run([sys.executable, "-c", _JOIN.replace("ADDRESS", repr(address))],
                                capture_output=True, text=True, timeout=120, env=outsider,
                                cwd=tmp_path)
        assert joined.returncode != 0 and "JOINED" not in joined.stdout
        assert "InvalidAuthToken" in joined.stderr, joined.stderr[-2000:]
        tmp = Path(child["LIQUID_FED_RUN_TMP"])
        assert tmp.is_dir()
        # Ray prestarted no idle workers for the run: every Ray worker process it started
        # (each writes its own core-worker log) is a client actor.
        actors = [p for p in live_processes(tag) if " ray::BatchClientAppActor" in p]
        logs = list((tmp / "ray" / "session_latest" / "logs").glob("python-core-worker-*.log"))
        assert actors and len(logs) == len(actors), (logs, actors)
    finally:
        proc.send_signal(signal.SIGTERM)  # handled like Ctrl-C
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopping the simulation" in err and "continue with --resume" in err
    assert live_processes(tag) == []
    assert not tmp.exists()
    assert load_checkpoint(run, 4).round > 0


@live
def test_a_killed_launcher_takes_its_run_down(tmp_path: Path) -> None:
    run = tmp_path / "orphan"
    env, tag = tagged_env()
    proc = start_live_run(run, env)
    tmp = Path(run_environment(tag)["LIQUID_FED_RUN_TMP"])
    proc.kill()  # SIGKILL: the launcher cannot clean up; its child must see to it
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while live_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes(tag) == []
    assert not tmp.exists()
    generations = sorted(p.name for p in (run / "checkpoints").iterdir())
    time.sleep(2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == generations  # no writer
    RunLock(run).acquire().release()  # the kernel dropped the dead run's lock
    assert load_checkpoint(run, 4).round > 0


def test_bad_config_fails_before_anything_starts(tmp_path: Path) -> None:
    run = tmp_path / "bad"
    proc = liquid_fed("run", str(QUICKSTART), "--set", "views.options={grid: [3, 3]}",
                      "--out", str(run))
    assert proc.returncode == 2
    assert "views" in proc.stderr and "9 patches but n_views=4" in proc.stderr
    assert not run.exists()
    proc = liquid_fed("run", str(QUICKSTART), "--set", "experts.options={hidden: [8], depth: 3}")
    assert proc.returncode == 2
    assert "experts: expert \"mlp\" has no option 'depth'" in proc.stderr


def test_study_engines_federated_and_centralized_agree(tmp_path: Path) -> None:
    study = tmp_path / "engines.yaml"
    study.write_text(f"""
name: engines
base: {ROOT / "configs" / "regions.yaml"}
set: {{train.epochs: 2, data.options.n_samples: 400, train.eval_every: 0}}
seeds: [1]
methods: [liquid]
engine: federated
""")
    rows = {}
    for engine in ("federated", "centralized"):
        out = tmp_path / engine
        ok(liquid_fed("compare", str(study), "--out", str(out), "--quiet",
                      "--set", f"engine={engine}"))
        with (out / "results.csv").open() as fh:
            (rows[engine],) = list(csv.DictReader(fh))
    for key in ("score", "nll", "power_entropy", "tau_max_prob", "delegation_accuracy",
                "label_leakage", "power_0", "power_3"):
        assert float(rows["federated"][key]) == pytest.approx(float(rows["centralized"][key]),
                                                              abs=1e-6), key
    summary = json.loads((tmp_path / "federated" / "cells" / "c00" / "seed-1" /
                          "liquid-sink_one" / "summary.json").read_text())
    assert summary["study_engine"] == "federated" and summary["peak_memory_bytes"] > 0
    assert summary["engine"]["startup_seconds"] > 0  # Flower on Ray, as `liquid-fed run`


# Exact split learning (float64, one step per chunk, momentum: a signal applied twice or a
# faulted party's optimizer stepped would show).
EXACT_SETS = ["train.chunk_size=64", "train.batch_size=64", "train.dtype=float64",
              "train.eval_every=0", "optim.name=sgd", "optim.lr=0.05", "optim.weight_decay=0",
              "optim.momentum=0.9", "baselines.uniform=false", "baselines.independent=false",
              "experts.options={hidden: [32]}", "federation.reply_timeout=10"]


def _twin_losses(sets: list[str]) -> list[float]:
    """The centralized twin's loss per step: a faulted party is absent from its round."""
    cfg = load_config(QUICKSTART, sets)
    data = central_data(cfg)
    losses: list[float] = []
    train_ensemble(cfg, data, build_ensemble(cfg, data),
                   on_step=lambda _, loss: losses.append(loss))
    return losses


def test_faults_of_every_kind_through_flower_on_ray(tmp_path: Path) -> None:
    # Client 1's actor process exits in round 2 (Ray restarts it; its state lives in the
    # engine); client 2's blocks 31 s in round 3, past the 30 s reply_timeout, then exits;
    # client 0 sends NaN predictions in round 5. Flower's one-message delivery: a hang holds up
    # no other party (batched, it holds up the parties batched with it on its actor). The
    # timeout leaves room for a restarted actor's start (a message may wait for it) on a
    # loaded machine: at 10 s a party waiting for one was once counted absent too, and a
    # restart once took over 10 s in CI (the test below).
    faults = ("federation.faults=[{client: 1, round: 2, kind: crash}, {client: 2, round: 3, "
              "kind: hang, seconds: 31}, {client: 0, round: 5, kind: nan}]")
    sets = ["train.epochs=1", *EXACT_SETS, faults, "simulation.batch_messages=false",
            "federation.reply_timeout=30"]
    run = tmp_path / "faults"
    proc = ok(liquid_fed("run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
                         "--out", str(run), "--quiet"))
    result = summary(run)
    parties = {p["client"]: p for p in result["parties"]}
    rounds = result["rounds"]
    assert f"client 2 answered {rounds - 1} of {rounds} rounds (absent: 1 timeout)" in proc.stdout
    assert [parties[k]["rounds_present"] for k in range(4)] == [rounds - 1] * 3 + [rounds], \
        result["parties"]
    assert parties[1]["absent"] == {"error": 1}  # the process died on the message
    assert 'client 1 (node' in parties[1]["last_reason"]
    assert parties[2]["absent"] == {"timeout": 1}
    assert "sent no reply to \"train\" within 30" in parties[2]["last_reason"]
    assert parties[0]["absent"] == {"bad_reply": 1}
    assert "'pred'[0, 0] is nan" in parties[0]["last_reason"]
    assert parties[3]["absent"] == {}
    losses = load_checkpoint(run, 4).server["train_losses"]
    np.testing.assert_allclose(losses, _twin_losses(sets), rtol=0, atol=1e-6)


def test_a_crash_in_a_batch_costs_only_its_own_party(tmp_path: Path) -> None:
    # Batched delivery (the default): client 1's process exits in round 2 in the middle of
    # its actor's batch; the batch goes again message by message, so its batch-mates answer
    # that round, and the losses are the twin's with client 1 (and client 0's NaN) absent.
    faults = ("federation.faults=[{client: 1, round: 2, kind: crash}, "
              "{client: 0, round: 5, kind: nan}]")
    # No party hangs: a long timeout costs nothing and covers a slow actor restart.
    sets = ["train.epochs=1", *EXACT_SETS, faults, "federation.reply_timeout=60"]
    run = tmp_path / "batched"
    ok(liquid_fed("run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)],
                  "--out", str(run), "--quiet"))
    result = summary(run)
    assert result["engine"]["batched"] is True
    parties = {p["client"]: p for p in result["parties"]}
    assert [parties[k]["absent"] for k in range(4)] == [{"bad_reply": 1}, {"error": 1}, {}, {}], \
        result["parties"]
    losses = load_checkpoint(run, 4).server["train_losses"]
    np.testing.assert_allclose(losses, _twin_losses(sets), rtol=0, atol=1e-6)


@live
def test_a_run_with_faults_killed_and_resumed_gives_the_same_losses(tmp_path: Path) -> None:
    # A NaN reply before the kill, a crash after it: the resumed run equals the twin. No party
    # hangs, so a long timeout costs nothing; it covers the crashed actor's restart, which the
    # message it died on waits for (once over 10 s on a loaded CI machine: counted a timeout).
    faults = ("federation.faults=[{client: 0, round: 2, kind: nan}, "
              "{client: 3, round: 16, kind: crash}]")
    sets = ["train.epochs=1", "train.checkpoint_every=3", *EXACT_SETS, faults,
            "federation.reply_timeout=60"]
    run = tmp_path / "killed"
    env, tag = tagged_env()
    args = [a for s in sets for a in ("--set", s)]
    proc = start_live_run(run, env, [str(QUICKSTART), *args])
    proc.kill()  # SIGKILL of the launcher: the run dies with it
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while live_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped_at = load_checkpoint(run, 4).round
    assert 0 < stopped_at < 16 and not (run / "summary.json").exists()
    ok(liquid_fed("run", str(QUICKSTART), *args, "--out", str(run), "--quiet", "--resume"))
    losses = load_checkpoint(run, 4).server["train_losses"]
    np.testing.assert_allclose(losses, _twin_losses(sets), rtol=0, atol=1e-6)
    parties = summary(run)["parties"]
    assert [p["absent"] for p in parties] == [{"bad_reply": 1}, {}, {}, {"error": 1}]
