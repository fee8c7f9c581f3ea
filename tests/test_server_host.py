"""The long-lived server host with real processes on loopback: one ``server-host``, two
``party-host``s, several ``submit``s one after another, a submitter killed and its run
resumed, and ``kill -9`` of the server host.

Every command is typed as a person would, in one folder holding the machines' files, with
relative paths (``keys/server``, ``shards/party-0``, ``work``). One server host and the two
parties serve the whole module (a module fixture): the parties are never restarted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from liquid_fed import procs
from liquid_fed.procs import TAG_ENV, free_port, port_is_free
from liquid_fed.rundir import RunLock, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
deployment = pytest.mark.xdist_group("deployment")

#: 2 parties, 6 rounds of 200 samples, a checkpoint every round, test metrics every 2 rounds.
SETS = ["train.epochs=1", "train.chunk_size=200", "train.eval_every=2",
        "train.checkpoint_every=1", "baselines.uniform=false", "baselines.independent=false",
        "views.n_views=2", "views.options={grid: [1, 2]}"]
ROUND_LINE = re.compile(r"^submit: run (\S+) round (\d+)/(\d+) loss (\S+) elapsed (\S+) s$")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "liquid_fed.cli", *args]


def _env() -> dict[str, str]:
    # The commands run where the machines' files are, not in the checkout: find this one.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _sets() -> list[str]:
    return [a for s in SETS for a in ("--set", s)]


@dataclass
class Site:
    """The folder of the machines (cwd of every command) and the long-lived processes."""

    home: Path
    server: subprocess.Popen
    parties: list[subprocess.Popen]
    port: int
    tag: str

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(_cli(*args), cwd=self.home, env=_env(), capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, *args: str) -> list[str]:
        return _cli("submit", str(QUICKSTART), *_sets(), "--data-dir", "shards/server",
                    "--work-dir", "work", *args)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("machines")
    run = lambda *a: subprocess.run(_cli(*a), cwd=home, env=_env(), check=True,  # noqa: E731
                                    capture_output=True, timeout=180)
    run("keys", "keys", "--nodes", "2")
    run("split", str(QUICKSTART), *_sets(), "--out", "shards")
    port = free_port()
    server = subprocess.Popen(
        _cli("server-host", "--keys", "keys/server", "--work-dir", "work", "--port", str(port)),
        cwd=home, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The parties get absolute paths: relative ones are clients/host.py's business (issue 17
    # item 5, another branch); everything on the server's side here is relative.
    parties = [subprocess.Popen(
        _cli("party-host", "--superlink", f"127.0.0.1:{port}", "--keys",
             str(home / "keys" / f"party-{k}"), "--data-dir", str(home / "shards" / f"party-{k}"),
             "--partition-id", str(k),
             "--num-partitions", "2", "--work-dir", f"party-{k}-work", "--quiet"),
        cwd=home, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for k in range(2)]
    try:
        _wait(lambda: (home / "work" / "server.json").is_file() or server.poll() is not None,
              120, "server.json")
        assert server.poll() is None, server.communicate(timeout=30)[1][-3000:]
        tag = json.loads((home / "work" / "server.json").read_text())["tag"]
        yield Site(home, server, parties, port, tag)
    finally:
        for proc in (server, *parties):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (server, *parties):
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_submit_without_a_running_server_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        _cli("submit", str(QUICKSTART), "--data-dir", "labels", "--work-dir", "work"),
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("liquid-fed submit: failed: no server-host is running for "
                               "--work-dir work"), lines[0]
    assert not (tmp_path / "work").exists()


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _numbers(row: dict) -> dict[str, float]:
    """A metrics row without the bytes on the wire (the resumed run's setup differs)."""
    return {k: v for k, v in row.items() if not k.startswith("bytes")
            and isinstance(v, (int, float))}


@deployment
def test_runs_one_after_another_and_a_killed_submit_resumes_with_equal_metrics(
        site: Site) -> None:
    # The Control API is not published: the public port answers the Fleet API only.
    trust = ssl.create_default_context(cafile=str(site.home / "keys" / "party-0" / "ca.crt"))
    probe = httpx.post(f"https://127.0.0.1:{site.port}/v1/control/list-runs", content=b"",
                       verify=trust, timeout=30)
    assert probe.status_code == 404
    party_pids = [p.pid for p in site.parties]
    assert all(p.poll() is None for p in site.parties), "a party host exited at start"

    # Run a: to the end, with a progress line per round and the summary table.
    a = site.run(*site.submit("--out", "runs", "--set", "name=a")[3:])
    assert a.returncode == 0, a.stderr[-3000:]
    rounds = [m.groups() for line in a.stderr.splitlines() if (m := ROUND_LINE.match(line))]
    assert [(r[0], int(r[1]), int(r[2])) for r in rounds] == [("a", k, 6) for k in range(1, 7)]
    assert "liquid ensemble (federated)" in a.stdout and "outputs:" in a.stdout
    summary_a = json.loads((site.home / "runs" / "a" / "summary.json").read_text())
    assert f"{summary_a['test']['accuracy']:.4f}" in a.stdout
    assert summary_a["rounds"] == 6

    # Run b, same config: killed (SIGKILL) after round 3, with the parties still up.
    b = subprocess.Popen(site.submit("--out", "runs", "--set", "name=b"), cwd=site.home,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    for line in b.stderr:  # type: ignore[union-attr]
        seen.append(line)
        if (m := ROUND_LINE.match(line.strip())) and int(m.group(2)) == 3:
            break
    else:
        pytest.fail("run b ended before round 3:\n" + "".join(seen[-20:]))
    b.kill()
    b.wait(timeout=10)
    run_b = site.home / "runs" / "b"
    # Its reaper stops the run on the server: the ServerApp ends and drops the folder's lock.
    def lock_free() -> bool:
        try:
            RunLock(run_b).acquire("test").release()
        except Exception:
            return False
        return True

    _wait(lock_free, 60, "the killed submit's ServerApp to release runs/b")
    status = site.run("status", "--work-dir", "work")
    assert status.returncode == 0, status.stderr
    table = {line.split()[2]: line.split()[1] for line in status.stdout.splitlines()[1:]}
    assert table == {"a": "finished:completed", "b": "finished:stopped"}, status.stdout
    assert not (run_b / "summary.json").exists()
    assert load_checkpoint(run_b, 2).round >= 3
    # A half-written generation (a writer killed mid-save) is skipped on resume.
    (run_b / "checkpoints" / ".gen-00000099-dead.partial").mkdir()

    resumed = site.run(*site.submit("--resume", "runs/b")[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = [int(m.group(2)) for line in resumed.stderr.splitlines()
             if (m := ROUND_LINE.match(line))]
    assert after and after[-1] == 6 and after[0] > 1, resumed.stderr[-2000:]
    summary_b = json.loads((run_b / "summary.json").read_text())
    for key, value in _numbers(summary_a["test"]).items():
        assert summary_b["test"][key] == pytest.approx(value, abs=1e-6, rel=0), key
    rows_a, rows_b = _rows(site.home / "runs" / "a"), _rows(run_b)
    assert [(r["round"], r["split"]) for r in rows_b] == [(r["round"], r["split"])
                                                          for r in rows_a]
    assert len(rows_a) >= 4  # evaluations before and after the kill
    for got, want in zip(rows_b, rows_a, strict=True):
        assert _numbers(got).keys() == _numbers(want).keys()
        for key, value in _numbers(want).items():
            assert got[key] == pytest.approx(value, abs=1e-6, rel=0), (got["round"], key)
    # Three runs, and the same two party processes served them all.
    assert [p.pid for p in site.parties] == party_pids
    assert all(p.poll() is None for p in site.parties)


@deployment
def test_kill_9_of_the_server_host_mid_run_leaves_none_of_its_processes(site: Site) -> None:
    # Runs last in this module: it ends the module's server host.
    c = subprocess.Popen(site.submit("--out", "runs", "--set", "name=c"), cwd=site.home,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in c.stderr:  # type: ignore[union-attr]
        if ROUND_LINE.match(line.strip()):
            break
    ours = procs.tagged(TAG_ENV, site.tag)
    names = {Path(procs._read(f"/proc/{p}/cmdline").split("\0")[1]).name
             for p in ours if procs._read(f"/proc/{p}/cmdline").count("\0") > 1}
    assert {"flower-superlink", "flwr-serverapp", "gate.py"} <= names, names
    site.server.kill()
    t0 = time.monotonic()
    _wait(lambda: not procs.tagged(TAG_ENV, site.tag), 30, "the server host's processes")
    gone = time.monotonic() - t0
    assert port_is_free(site.port)
    _, err = c.communicate(timeout=120)
    assert c.returncode != 0
    assert "liquid-fed submit: failed:" in err
    print(f"kill -9 of server-host: every process gone after {gone:.1f} s")
