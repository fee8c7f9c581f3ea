"""Runs on a long-lived server host: submit one, list them, stop one.

    liquid-fed submit CONFIG --data-dir SHARDS/server --work-dir DIR [--set key=value ...]
        [--out DIR] [--resume RUN_DIR] [--timeout SECONDS] [--quiet]
    liquid-fed status --work-dir DIR [--stop RUN_ID]

``submit`` finds the server host (:mod:`server.host`) through its work folder, submits the
run with ``flwr run`` against its SuperLink, prints one line per round (round/total, loss,
elapsed) and returns the run's summary; the parties stay up between runs. The run folder is
``<out>/<name>`` (``--out`` is the parent, as for ``server-host``/``deploy-local``).

A submitter owns its run: when ``submit`` ends before the run did — Ctrl-C, SIGTERM, its
``--timeout``, or SIGKILL (then its reaper, :func:`liquid_fed.procs.start_reaper`, does it) —
the run is stopped on the server (``flwr stop``), so a dead submitter never leaves a run
behind to block the next one. Such a run continues from its last complete checkpoint
generation with ``submit CONFIG ... --resume RUN_DIR`` (the same config and ``--set``\\ s).

Only one run at a time: a submit while another run is running is refused, naming that run
(``liquid-fed status --stop RUN_ID`` stops it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from liquid_fed import procs, rundir
from liquid_fed.errors import ConfigError, DeploymentError
from server.deploy_local import (
    CONNECTION,
    LocalDeployment,
    _config_for_app,
    check_new_run_dir,
    resolve,
    run_status,
    stage_app,
    write_toml,
)
from server.host import PROGRESS, ServerState, find_server

log = logging.getLogger("liquid_fed.hosts")

STARTED = re.compile(r"Successfully started run (\d+)")
#: ``flwr ls`` statuses of a run that has not ended.
ACTIVE = ("pending", "starting", "running")
RUNS = "runs"  # <work>/runs/<run id>.json: what `status` shows beside Flower's own row


@dataclass
class Submitted:
    """A run that ended on the server, as ``submit`` saw it."""

    run_id: str
    status: str
    run_dir: Path
    summary: dict[str, Any]
    seconds: float


class _Client(LocalDeployment):
    """The ``flwr`` CLI against a running server host (no SuperLink or SuperNode of its own)."""

    def __init__(self, state: ServerState, work_dir: Path, echo: IO[str] | None = None) -> None:
        super().__init__(0, work_dir, echo)
        self.flwr_home = state.flwr_home


def _session_dir(state: ServerState, kind: str) -> Path:
    folder = state.work_dir / "sessions" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-" \
        f"{os.getpid()}"
    folder.mkdir(parents=True, mode=0o700)
    return folder


def list_runs(state: ServerState, client: _Client | None = None) -> list[dict[str, Any]]:
    """Flower's rows of ``flwr ls`` (``run-id``, ``status``, ...) joined with what ``submit``
    recorded of each run (``name``, ``run_dir``, ``config``), oldest first."""
    own = client is None
    if own:
        client = _Client(state, _session_dir(state, "status"))
    try:
        rows = client.flwr_list("ls", CONNECTION, key="runs", name="flwr-ls", timeout=60)
    finally:
        if own:
            client.stop()
    for row in rows:
        record = state.work_dir / RUNS / f"{row.get('run-id')}.json"
        if record.is_file():
            row.update(json.loads(record.read_text()))
    return sorted(rows, key=lambda r: str(r.get("pending-at", "")))


def stop_run(state: ServerState, run_id: str, client: _Client | None = None) -> None:
    """``flwr stop RUN_ID`` on the server host.

    Raises:
        DeploymentError: Flower refused (the run is unknown or already finished: its words).
    """
    own = client is None
    if own:
        client = _Client(state, _session_dir(state, "stop"))
    try:
        stopper = client.flwr("stop", str(run_id), CONNECTION, name=f"flwr-stop-{run_id}")
        rc = stopper.proc.wait(timeout=120)
        stopper.wait_closed(5)
        if rc != 0:
            raise DeploymentError(f"`flwr stop {run_id}` failed (exit {rc}): "
                                  f"{stopper.tail(5)}")
    finally:
        if own:
            client.stop()


def _probe_lock(run_dir: Path) -> None:
    """Refuse a run folder some process holds (the kernel dropped a dead holder's lock)."""
    if run_dir.exists():
        rundir.RunLock(run_dir).acquire("liquid-fed submit (probe)").release()


def submit(config: str, overrides: list[str], data_dir: str, work_dir: str,
           out: str | None = None, resume: str | None = None, timeout: float = 3600.0,
           echo: IO[str] | None = None) -> Submitted:
    """Submit one run to the server host on ``work_dir`` and wait until it has finished.

    Args:
        config: the YAML config (the same file the shards were split from).
        overrides: ``key=value`` strings (as for ``liquid-fed split``).
        data_dir: the server's label folder of ``liquid-fed split``.
        work_dir: the server host's ``--work-dir``.
        out: parent of the run folder (default: the config's ``out``).
        resume: a run folder to continue from its last complete checkpoint generation (the
            config and overrides must resolve to its saved ``config.yaml``).
        timeout: seconds the run may take once submitted; then it is stopped.
        echo: where the progress lines go (None: nowhere).

    Returns:
        A :class:`Submitted` with the run's summary.

    Raises:
        ConfigError: bad input (config, label folder, run folder), before anything is sent.
        RunFolderError: the run folder is in use, holds results, or cannot be resumed.
        DeploymentError: no server host runs on ``work_dir``; another run is running; the run
            failed, was stopped or timed out (the ServerApp's error is in the message).
    """
    state = find_server(work_dir)
    overrides = list(overrides)
    if resume is not None:
        if out is not None:
            raise ConfigError("--out with --resume: the run folder is --resume's; drop --out")
        run_dir = Path(resume).resolve()
        overrides += [f"out={run_dir.parent}", f"name={run_dir.name}"]
        cfg, overrides, _ = resolve(config, overrides, None)
    else:
        cfg, overrides, _ = resolve(config, overrides, out)
        run_dir = Path(cfg.out) / cfg.name
    from liquid_fed.shards import load_server_shard

    load_server_shard(data_dir, cfg)  # refused here, before anything is sent
    if resume is not None:
        rundir.prepare(cfg, run_dir, resume=True)  # read-only when resuming: says what's wrong
    else:
        check_new_run_dir(run_dir)
    _probe_lock(run_dir)
    session = _session_dir(state, "submit")
    client = _Client(state, session)
    # Its guard (a reaper) runs the hook first if submit dies: SIGKILL of submit stops its run.
    hook = client.reaper_hook = session / "stop-on-death.json"
    client.start_guard()
    t0 = time.time()
    run_id: str | None = None
    finished = False
    with client, stage_app(session / "app") as app:
        try:
            busy = [r for r in list_runs(state, client)
                    if str(r.get("status", "")).split(":")[0] in ACTIVE]
            if busy:
                raise DeploymentError(
                    f"run {busy[0]['run-id']} ({busy[0].get('name', 'unknown name')}) is "
                    f"{busy[0]['status']} on this server; wait for it, or stop it with "
                    f"`liquid-fed status --work-dir {work_dir} --stop {busy[0]['run-id']}`")
            settings: dict[str, Any] = {"config": _config_for_app(config),
                                        "set": shlex.join(overrides),
                                        "data-dir": str(Path(data_dir).resolve()),
                                        "resume": resume is not None}
            run_config = session / "run-config.toml"
            write_toml(run_config, settings)
            runner = client.flwr("run", str(app), CONNECTION, "--stream",
                                 "--run-config", str(run_config), name="flwr-run")
            deadline = time.time() + timeout
            shown = 0
            while True:
                rc = runner.proc.poll()
                shown, lines = runner.since(shown)
                for _, line in lines:
                    if run_id is None and (m := STARTED.search(line)):
                        run_id = m.group(1)
                        _record(state, run_id, cfg.name, run_dir, config, overrides, resume)
                        _write_json(hook, {
                            "argv": [procs.executable("flwr"), "stop", run_id, CONNECTION],
                            "env": {"FLWR_HOME": str(state.flwr_home)}})
                        if echo is not None:
                            print(f"submit: run {run_id} ({cfg.name}) started on the server; "
                                  f"outputs: {run_dir}", file=echo, flush=True)
                    elif echo is not None and (m := PROGRESS.search(line)):
                        print(f"submit: {m.group(1)}", file=echo, flush=True)
                if rc is not None:
                    break
                if not state.alive():
                    finished = True  # nothing left to stop: the server took its runs along
                    raise DeploymentError(
                        f"the server-host (pid {state.pid}) stopped during run {run_id}; "
                        f"start it again and continue with --resume {run_dir}")
                if time.time() > deadline:
                    raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s "
                                          "(--timeout); stopped it. Logs: "
                                          f"{state.work_dir}/superlink.log")
                time.sleep(0.2)
            runner.wait_closed(5)
            if rc != 0 or run_id is None:
                raise DeploymentError(f"`flwr run` failed (exit {rc}):\n{runner.tail(25)}")
            row = run_status(client, run_id)
            finished = True
            status = str(row.get("status", "unknown"))
            if status != "finished:completed":
                raise DeploymentError(f"run {run_id} ended as {status}: "
                                      f"{row.get('status-details', '')}\n{runner.tail(15)}")
        finally:
            if run_id is not None and not finished:  # this submitter stops early: so does its run
                try:
                    stop_run(state, run_id, client)
                except DeploymentError as exc:
                    log.warning("%s", exc)
            hook.unlink(missing_ok=True)
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise DeploymentError(f"run {run_id} completed but wrote no {summary_file}")
    return Submitted(run_id, status, run_dir, json.loads(summary_file.read_text()),
                     time.time() - t0)


def _record(state: ServerState, run_id: str, name: str, run_dir: Path, config: str,
            overrides: list[str], resume: str | None) -> None:
    """What ``status`` shows of a run beside Flower's row (``<work>/runs/<id>.json``)."""
    folder = state.work_dir / RUNS
    folder.mkdir(mode=0o700, exist_ok=True)
    _write_json(folder / f"{run_id}.json", {
        "name": name, "run_dir": str(run_dir), "config": str(Path(config).resolve()),
        "set": overrides, "resumed": resume is not None})


def _write_json(path: Path, obj: Any) -> None:
    rundir.atomic_write(path, json.dumps(obj, indent=2).encode(), mode=0o600)
