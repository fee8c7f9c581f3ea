"""Deployment on real Flower processes: a SuperLink and SuperNodes on loopback.

Each test starts (through :mod:`server.deploy_local`) a real ``flower-superlink`` and
``flower-supernode`` processes that spawn SuperExec, ServerApp and one ClientApp process per
message. A round trip costs seconds (an idle SuperNode polls every 3 s and starts a new
ClientApp process per message), so the federation is tiny: 2 clients, one round. By default a
deployment runs over TLS with SuperNode authentication and each node reads its private shard.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from liquid_fed import procs, rundir
from liquid_fed.errors import DeploymentError
from liquid_fed.federation import LocalTransport
from liquid_fed.procs import TAG_ENV, port_is_free
from liquid_fed.rundir import load_checkpoint
from liquid_fed.runs import run_federated
from liquid_fed.shards import load_server_shard, write_shards
from server.deploy_local import deploy, resolve

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


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _numbers(row: dict) -> dict[str, float]:
    """A metrics row without what differs between engines by design (bytes on the wire)."""
    return {k: v for k, v in row.items() if not k.startswith("bytes")
            and isinstance(v, (int, float))}


@slow
@deployment
def test_secure_deployment_refuses_a_rogue_reproduces_the_simulation_and_keeps_experts_home(
        tmp_path: Path) -> None:
    # One deployment checks (a) metrics, (b) a node with an unregistered key is refused while
    # the run completes with the registered ones, (c) experts stay home.
    work = tmp_path / "deploy"
    result = deploy(QUICKSTART, TINY, out=tmp_path / "runs", timeout=300, work_dir=work,
                    rogue=1)
    assert_all_stopped(result.tag, result.ports)
    assert len(result.ports) == 4  # SuperLink + 2 SuperNodes + the rogue
    assert result.secure and result.shards == work / "shards"
    link_log = (work / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in link_log  # TLS on every API
    assert "SuperNode authentication is disabled" not in link_log
    assert link_log.count("register-node HTTP/1.1\" 200") == 2  # each party's key, once
    assert str(work / "shards" / "server") in (work / "run-config.toml").read_text()
    # (b) The rogue claims partition-id 2: had it been let in, the ServerApp would refuse the run.
    [(status, tail)] = result.rogue_exits
    assert status is not None and status != 0, f"the rogue node is still running:\n{tail}"
    assert "Failed to initialize the connection" in tail, tail
    # Only the registered pair was let in (each node is activated twice: the SuperNode
    # wrapper's reclaim at start, which signs it off again, then Flower's own activation).
    activated = re.findall(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)", link_log)
    assert len(set(activated)) == 2 and len(activated) == 4, activated

    run = tmp_path / "runs" / "quickstart"
    assert result.run_dir == run and result.status == "finished:completed"
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), f"{name} missing from {sorted(run.rglob('*'))}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] > 0
    assert math.isfinite(summary["test"]["accuracy"]) and summary["test"]["accuracy"] > 0.3
    assert "views.n_views=2" not in (run / "config.yaml").read_text()  # resolved, not raw
    assert "n_views: 2" in (run / "config.yaml").read_text()

    # (a) The same config and seed in process (the library's run over LocalTransport, from a
    # fresh split of the same config) gives the same metrics, row by row.
    cfg, _, _ = resolve(QUICKSTART, TINY, tmp_path / "ref-runs")
    ref_shards = tmp_path / "ref-shards"
    write_shards(cfg, ref_shards)
    ref_run = tmp_path / "ref-run"
    rundir.prepare(cfg, ref_run, resume=False)
    ref = run_federated(cfg, LocalTransport(2, [ref_shards / f"party-{k}" for k in range(2)]),
                        ref_run, server_data=load_server_shard(ref_shards / "server", cfg))
    deployed, simulated = _rows(run), _rows(ref_run)
    assert [(r["round"], r["split"]) for r in deployed] == [
        (r["round"], r["split"]) for r in simulated]
    assert any(r["split"] == "test" for r in deployed)
    for got, want in zip(deployed, simulated, strict=True):
        assert _numbers(got).keys() == _numbers(want).keys()
        for key, value in _numbers(want).items():
            assert got[key] == pytest.approx(value, abs=1e-6, rel=0), (got["split"], key)
    for key, value in _numbers(ref["test"]).items():
        assert summary["test"][key] == pytest.approx(value, abs=1e-6, rel=0), key

    # (c) Experts stay home: the server's checkpoint holds only receipts, and no file on the
    # server's side (the run folder, the SuperLink's home) holds a byte of any party's expert.
    ckpt = load_checkpoint(run, 2)
    assert ckpt.clients == [] and len(ckpt.server["parties"]) == 2
    server_files = [f for f in [*run.rglob("*"), *(work / "superlink-home").rglob("*")]
                    if f.is_file()]
    assert len(server_files) > 5
    for k in range(2):
        party = load_checkpoint(work / "shards" / f"party-{k}" / "checkpoints" /
                                ckpt.server["run_id"], 1)
        weights = [v for name, v in party.clients[0].items() if name.startswith("model/")]
        assert weights, f"party {k} kept no expert of its own"
        needles = [np.ascontiguousarray(w).tobytes()[:64] for w in weights if w.size >= 16]
        for f in server_files:
            data = f.read_bytes()
            assert not [n for n in needles if n in data], f"party {k}'s expert is in {f}"
            if f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    assert not [n for n in z.files if n.startswith(("model/", "optimizer/"))]

    # Warm workers (the default fast mode): no node fell back to Flower's stock path, and every
    # message of a node went to one worker, which loaded the app once.
    assert result.mode == "fast"
    for k in range(2):
        text = (work / f"supernode-{k}.log").read_text()
        assert "mode fast (asked: fast)" in text
        assert len(re.findall(rf"worker supernode-{k} loaded app", text)) == 1
        assert len(re.findall(r"Receiving: ", text)) >= summary["rounds"] + 2

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
        [sys.executable, "-m", "liquid_fed.cli", "deploy-local", "--config", str(QUICKSTART),
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
               work_dir=tmp_path / "deploy", check_run_dir=False)
    assert "finished:failed" in str(caught.value)
    assert_all_stopped(caught.value.tag, caught.value.ports)
    assert (run / "summary.json").read_text() == "{}"  # left as it was


@slow
@deployment
def test_timeout_stops_a_running_federation(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="did not finish within 15 s") as caught:
        # 200 rounds cannot finish in 15 s; a 1-round run now can (it did once in this test).
        deploy(QUICKSTART, [*TINY, "train.epochs=200"], out=tmp_path / "runs", timeout=15,
               work_dir=tmp_path / "deploy")
    assert_all_stopped(caught.value.tag, caught.value.ports)


# --------------------------------------------------------------------------------------------
# Host commands (what a person types on each machine)
# --------------------------------------------------------------------------------------------


def test_hosts_refuse_to_go_off_loopback_without_tls_and_auth(tmp_path: Path,
                                                              capsys) -> None:
    from liquid_fed.cli import main
    from liquid_fed.procs import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    work = tmp_path / "work"
    shards = tmp_path / "shards"
    assert main(["server-host", "--host", "0.0.0.0", "--insecure",
                 "--work-dir", str(work)]) == 2
    assert "--insecure with --host 0.0.0.0: refused" in capsys.readouterr().err
    assert main(["party-host", "--superlink", "10.0.0.5:9092", "--insecure",
                 "--data-dir", str(shards / "party-0"), "--partition-id", "0",
                 "--num-partitions", "2", "--work-dir", str(work)]) == 2
    assert "--insecure with --superlink 10.0.0.5: refused" in capsys.readouterr().err
    assert main(["server-host", "--work-dir", str(work)]) == 2  # no keys: refused, not
    # silently insecure
    assert "--keys: missing" in capsys.readouterr().err
    assert main(["deploy-local", str(QUICKSTART), "--insecure", "--keys", str(tmp_path),
                 "--out", str(tmp_path / "runs"), "--keep-logs", str(work), "--quiet"]) == 2
    assert "--insecure: cannot be combined with --keys" in capsys.readouterr().err
    assert not work.exists(), "processes were started for a command that was refused"


def test_party_host_refuses_another_partys_shard(tmp_path: Path, capsys) -> None:
    from liquid_fed.cli import main
    from liquid_fed.config import load_config
    from server.keys import make_keys

    cfg = load_config(QUICKSTART, TINY)
    write_shards(cfg, tmp_path / "shards")
    keys = make_keys(tmp_path / "keys", 2)
    assert main(["party-host", "--superlink", "127.0.0.1:9092", "--keys",
                 str(keys.party(1).folder), "--data-dir", str(tmp_path / "shards" / "party-0"),
                 "--partition-id", "1", "--num-partitions", "2",
                 "--work-dir", str(tmp_path / "work")]) == 2
    assert "holds party 0's shard, not party 1's" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


# The three-machine recipe (server-host, party-hosts, runs submitted to them) lives in
# tests/test_server_host.py.
