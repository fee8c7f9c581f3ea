"""Deployment on real Flower processes: a SuperLink and SuperNodes on loopback.

Each test starts (through :mod:`simulations.deploy_local`) a real ``flower-superlink`` and
``flower-supernode`` processes that spawn SuperExec, ServerApp and one ClientApp process per
message. A round trip costs seconds (an idle SuperNode polls every 3 s and starts a new
ClientApp process per message), so the federation is tiny: 2 clients, one round.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from liquid_fed.rundir import load_checkpoint
from simulations import procs
from simulations.deploy_local import TAG_ENV, DeploymentError, deploy, port_is_free

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
slow = pytest.mark.slow
deployment = pytest.mark.xdist_group("deployment")

#: 2 clients (left and right half of the image), one training round, no centralized baselines.
TINY = ["train.epochs=1", "train.chunk_size=100000", "train.eval_every=0",
        "baselines.uniform=false", "baselines.independent=false",
        "views.n_views=2", "views.options={grid: [1, 2]}"]


def test_run_config_reaches_the_serverapp_as_flower_fuses_it() -> None:
    # What `flwr run . CONN --run-config '...'` sends is fused by the SuperLink with the
    # defaults of [tool.flwr.app.config] (undeclared keys are refused), then read by the app.
    from flwr.common.config import fuse_dicts, get_fused_config_from_dir, parse_config_args

    from server.app import config_from_run_config

    overrides = parse_config_args(
        ['config="configs/quickstart.yaml" set="train.epochs=2 \'views.options={grid: [1, 4]}\' '
         'out=/abs/runs"'])
    run_config = get_fused_config_from_dir(ROOT, overrides)
    assert set(run_config) == {"config", "set", "resume", "data-dir"}
    cfg = config_from_run_config(run_config)
    assert (cfg.train.epochs, cfg.views.options, cfg.out) == (2, {"grid": [1, 4]}, "/abs/runs")
    assert cfg.optim.lr == 0.003  # from the YAML file, found inside the app
    defaults = config_from_run_config(get_fused_config_from_dir(ROOT, {}))
    assert defaults.name == "quickstart" and defaults.train.epochs == 40
    with pytest.raises(ValueError, match="not present"):
        fuse_dicts(run_config, parse_config_args(["train.epochs=2"]), check_keys=True)


def assert_all_stopped(tag: str, ports: list[int] | tuple[int, ...]) -> None:
    assert procs.tagged(TAG_ENV, tag) == set(), "processes outlived the deployment"
    assert ports, "the deployment reported no ports"
    busy = [p for p in ports if not port_is_free(p)]
    assert busy == [], f"ports still in use: {busy}"


@slow
@deployment
def test_deployment_trains_writes_outputs_and_cleans_up(tmp_path: Path) -> None:
    result = deploy(QUICKSTART, TINY, out=tmp_path / "runs", timeout=300,
                    work_dir=tmp_path / "deploy")
    assert_all_stopped(result.tag, result.ports)
    assert len(result.ports) == 3  # SuperLink + 2 SuperNodes

    run = tmp_path / "runs" / "quickstart"
    assert result.run_dir == run and result.status == "finished:completed"
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), f"{name} missing from {sorted(run.rglob('*'))}"
    assert len(load_checkpoint(run, 2).clients) == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "test" for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] > 0
    assert math.isfinite(summary["test"]["accuracy"]) and summary["test"]["accuracy"] > 0.3
    assert "views.n_views=2" not in (run / "config.yaml").read_text()  # resolved, not raw
    assert "n_views: 2" in (run / "config.yaml").read_text()

    # Timings the README quotes: nodes connect in seconds; every exchange is one round trip.
    assert len(result.node_connect_seconds) == 2
    assert all(0 < s < 60 for s in result.node_connect_seconds)
    assert len(result.exchange_seconds) >= 4  # hello, setup, train, evaluate, checkpoint
    print(f"\nconnect {result.node_connect_seconds} s, round trips "
          f"{[round(s, 1) for s in result.exchange_seconds]} s, run {result.run_seconds:.1f} s, "
          f"total {result.total_seconds:.1f} s")


@slow
@deployment
def test_bad_expert_options_are_rejected_before_anything_starts(tmp_path: Path) -> None:
    logs = tmp_path / "deploy"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.deploy_local", "--config", str(QUICKSTART),
         *[a for s in TINY for a in ("--set", s)], "--set", "experts.options={bogus: 1}",
         "--out", str(tmp_path / "runs"), "--keep-logs", str(logs)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "experts" in proc.stderr and "bogus" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not logs.exists(), "processes were started for a config that cannot run"


@slow
@deployment
def test_failed_run_is_reported_with_the_serverapp_error_and_cleaned_up(
        tmp_path: Path) -> None:
    # The ServerApp refuses a run folder that already holds results: the run fails on the
    # SuperLink after every process has started.
    run = tmp_path / "runs" / "quickstart"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    with pytest.raises(DeploymentError, match="already holds results") as caught:
        deploy(QUICKSTART, TINY, out=tmp_path / "runs", timeout=300,
               work_dir=tmp_path / "deploy")
    assert "finished:failed" in str(caught.value)
    assert_all_stopped(caught.value.tag, caught.value.ports)
    assert (run / "summary.json").read_text() == "{}"  # left as it was


@slow
@deployment
def test_timeout_stops_a_running_federation(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="did not finish within 15 s") as caught:
        deploy(QUICKSTART, TINY, out=tmp_path / "runs", timeout=15,
               work_dir=tmp_path / "deploy")
    assert_all_stopped(caught.value.tag, caught.value.ports)
