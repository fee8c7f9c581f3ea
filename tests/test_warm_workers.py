"""Warm ClientApp workers and shorter SuperNode waits (clients/worker.py, clients/supernode.py).

The unit tests check the guards on Flower internals (a changed source or another Flower version
falls back to Flower's stock path with a warning) and what the patches change. The slow tests
run real deployments on loopback: a killed worker fails the run at once with an error naming
its node, and a worker restarts for a new app bundle. That the fast mode (the default) gives
the in-process run's metrics is checked by tests/test_deployment.py's secure deployment.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from test_deployment import QUICKSTART, ROOT, TINY, assert_all_stopped, deployment, slow

from clients import fastpath, supernode, worker
from liquid_fed.errors import DeploymentError
from server.deploy_local import deploy

WORKER_REF = "flwr.supernode.runtime.run_clientapp:pull_task_input"
WAITS_REF = "flwr.supernode.start_client_internal:_push_messages"


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------


def test_guards_fit_the_installed_flower() -> None:
    import flwr

    if flwr.__version__ != fastpath.FLOWER_VERSION:
        pytest.skip(f"Flower {flwr.__version__}: the fast paths are off (warned) until the "
                    "guards are re-checked")
    assert fastpath.problems("worker") == []
    assert fastpath.problems("waits") == []
    assert supernode.resolve_mode("fast") == "fast"


def test_a_changed_flower_function_falls_back_to_stock_with_a_warning(monkeypatch,
                                                                      caplog) -> None:
    monkeypatch.setitem(fastpath.SOURCE_SHA256, WORKER_REF, "0" * 64)
    with caplog.at_level(logging.WARNING, logger="clients.fastpath"):
        assert supernode.resolve_mode("fast") == "stock"
        assert supernode.resolve_mode("warm") == "stock"
    assert "pull_task_input changed" in caplog.text
    assert "falling back to Flower's stock path" in caplog.text
    assert supernode.resolve_mode("stock") == "stock"


def test_another_flower_version_falls_back_to_stock(monkeypatch, caplog) -> None:
    monkeypatch.setattr(fastpath, "FLOWER_VERSION", "0.0.0")
    with caplog.at_level(logging.WARNING, logger="clients.fastpath"):
        assert supernode.resolve_mode("fast") == "stock"
    assert "written for 0.0.0" in caplog.text


def test_changed_waits_keep_the_worker_and_flowers_waits(monkeypatch, caplog) -> None:
    from flwr.supernode import start_client_internal as sci

    monkeypatch.setitem(fastpath.SOURCE_SHA256, WAITS_REF, "0" * 64)
    with caplog.at_level(logging.WARNING, logger="clients.fastpath"):
        assert supernode.resolve_mode("fast") == "warm"
        assert supernode.install_waits() is None
    assert "_push_messages changed" in caplog.text
    assert sci.time is time  # Flower's module left as it was


def test_unknown_mode_is_refused_naming_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="got 'turbo'; accepted: stock, warm, fast"):
        supernode.resolve_mode("turbo")


def test_install_waits_shortens_only_flowers_fixed_sleeps(monkeypatch) -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci

    for name in ("time", "pull_objects", "_pull_and_store_message"):
        monkeypatch.setattr(sci, name, getattr(sci, name))  # restored after the test
    original = sci._pull_and_store_message
    waits = supernode.install_waits(hot_poll=0.1, idle_poll=1.0, hot_window=10.0,
                                    reply_poll=0.05)
    assert waits is not None and sci.time is waits
    assert sci.pull_objects.func is inflatable_utils.pull_objects
    assert sci.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
    assert sci._pull_and_store_message.__wrapped__ is original
    assert waits.seconds(3) == 1.0  # idle, no message yet: Flower sleeps 3 s
    assert waits.seconds(0.5) == 0.05  # waiting for the reply (and now hot)
    assert waits.seconds(3) == 0.1  # a message came less than 10 s ago
    assert waits.seconds(2) == 2  # any other sleep is left alone
    assert waits.monotonic is time.monotonic


def test_server_pulls_retry_missing_objects_sooner_or_fall_back(monkeypatch, caplog) -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after
    ref = "flwr.superlink.grid.http_grid:HttpGrid.pull_messages"
    monkeypatch.setitem(fastpath.SOURCE_SHA256, ref, "0" * 64)
    with caplog.at_level(logging.WARNING, logger="clients.fastpath"):
        assert fastpath.install_server_pulls() is False
    assert http_grid.pull_objects is inflatable_utils.pull_objects
    assert "HttpGrid.pull_messages changed" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    assert fastpath.install_server_pulls() is True
    assert http_grid.pull_objects.func is inflatable_utils.pull_objects
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}


def test_flower_args_choose_the_isolation() -> None:
    args = ["--insecure", "--isolation", "subprocess", "--port", "9"]
    assert supernode.flower_args(args, True) == ["--insecure", "--port", "9",
                                                 "--isolation", "process"]
    assert supernode.flower_args(["--isolation=process"], False) == ["--isolation",
                                                                     "subprocess"]


def test_worker_restarts_for_a_new_app_bundle_before_touching_the_task() -> None:
    w = worker.Worker("127.0.0.1:1", "node", 0.05, 0.5, 10.0, [])
    w.fab_hash = "a" * 64
    with pytest.raises(worker._Reload) as caught:  # raised before any request is made
        w.run_task("token", "b" * 64)
    assert (caught.value.token, caught.value.fab_hash) == ("token", "b" * 64)


def test_worker_forgets_modules_the_app_bundle_provides(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "pkg_lf_test").mkdir()
    (tmp_path / "pkg_lf_test" / "__init__.py").write_text("")
    (tmp_path / "mod_lf_test.py").write_text("")
    for name in ("pkg_lf_test", "pkg_lf_test.sub", "mod_lf_test", "other_lf_test"):
        monkeypatch.setitem(sys.modules, name, object())
    worker._forget_app_modules(tmp_path)
    assert "pkg_lf_test" not in sys.modules and "pkg_lf_test.sub" not in sys.modules
    assert "mod_lf_test" not in sys.modules and "other_lf_test" in sys.modules


# --------------------------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------------------------


@slow
@deployment
def test_a_killed_worker_fails_the_run_naming_its_node(tmp_path: Path) -> None:
    work = tmp_path / "deploy"
    outcome: dict[str, BaseException | float] = {}

    def run() -> None:
        try:
            # Every party required (federation.min_clients = 2): a dead node ends the run.
            deploy(QUICKSTART, [*TINY, "train.epochs=50", "federation.min_clients=2"],
                   out=tmp_path / "runs", timeout=600, work_dir=work, mode="fast")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc
        outcome["end"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    log1 = work / "supernode-1.log"
    deadline = time.monotonic() + 240
    pid = None
    while pid is None and time.monotonic() < deadline and thread.is_alive():
        text = log1.read_text() if log1.exists() else ""
        if "loaded app" in text:  # the run is under way and the worker is warm
            pid = int(re.search(r"ClientApp worker started \(pid (\d+)\)", text).group(1))
        time.sleep(0.2)
    assert pid is not None, f"the run never reached the worker: {outcome}"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run kept waiting after its worker died"
    error = outcome.get("error")
    assert isinstance(error, DeploymentError), error
    message = str(error)
    assert "supernode-1 exited with status 75 during the run" in message
    assert f"ClientApp worker (pid {pid}) exited with status -9" in message
    # Flower would let the task expire after about 60 s; the launcher ends the run at once.
    assert outcome["end"] - killed < 30
    assert_all_stopped(error.tag, error.ports)


@slow
@deployment
def test_worker_restarts_when_the_app_bundle_changes(tmp_path: Path) -> None:
    import shlex
    import shutil

    from server.deploy_local import CONNECTION, LocalDeployment, run_status, write_toml

    apps = []
    for variant in (1, 2):  # two app bundles that differ by one comment: two FAB hashes
        app = tmp_path / f"app{variant}"
        shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".pytest_cache", ".ruff_cache", "__pycache__", "tests", "runs",
            "docs", "*.egg-info"))
        with (app / "clients" / "app.py").open("a") as f:
            f.write(f"# variant {variant}\n")
        apps.append(app)
    with LocalDeployment(2, tmp_path / "deploy", mode="fast") as dep:
        dep.start()
        for variant, app in enumerate(apps, 1):
            run_config = tmp_path / f"run-config-{variant}.toml"
            overrides = [*TINY, f"out={tmp_path / 'runs'}", f"name=v{variant}"]
            write_toml(run_config, {"config": "configs/quickstart.yaml",
                                     "set": shlex.join(overrides)})
            runner = dep.flwr("run", str(app), CONNECTION, "--stream", "--run-config",
                              str(run_config), name=f"flwr-run-{variant}")
            assert runner.proc.wait(timeout=300) == 0, runner.tail(25)
            runner.wait_closed(5)
            run_id = runner.find(re.compile(r"Successfully started run (\d+)"))[0][1].group(1)
            assert run_status(dep, run_id)["status"] == "finished:completed", (
                runner.tail(40), [node.tail(40) for node in dep.nodes])
            assert (tmp_path / "runs" / f"v{variant}" / "summary.json").is_file()
        dep.check_nodes()  # the restarted workers kept their SuperNodes up
        logs = [node.tail(100000) for node in dep.nodes]
        tag, ports = dep.tag, list(dep.ports)
    for text in logs:
        assert len(re.findall(r"restarting the worker \(same pid\)", text)) == 1
        assert len(re.findall(r"loaded app", text)) == 2
    assert_all_stopped(tag, ports)
