"""docs/deployment.md, run as written: every command of its code blocks, each machine a folder.

The guide marks each block with the machine it is typed on (``<!-- machine: NAME -->``). Here
every machine is a folder holding the checkout's ``configs/`` and ``.venv`` (as a host with the
project installed would); the only changes to the commands are the ones a single machine needs:
host names and the public port become 127.0.0.1 and a free port, ``scp FILE HOST:liquid-fed/``
copies into that host's folder, and party 1 runs the party block with its own index, as the
guide says. Long-lived commands (``server-host``, ``party-host``) are started and left running;
at the end they get SIGTERM (Ctrl-C's twin) and nothing they started may be left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from liquid_fed.procs import free_port, tagged

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "deployment.md"
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployment")]
TEST_TAG = "LIQUID_FED_TEST_TAG"  # every process the guide's commands start inherits it
HOSTS = {"server.example.org": "server", "party0.example.org": "party0",
         "party1.example.org": "party1"}


def guide_blocks() -> list[tuple[str, list[str]]]:
    """(machine, command lines) of every marked bash block, in order."""
    text = GUIDE.read_text()
    blocks = re.findall(r"<!-- machine: (\w+) -->\n```bash\n(.*?)```", text, re.S)
    return [(machine, [line for line in body.replace("\\\n", " ").splitlines()
                       if line.strip() and not line.lstrip().startswith("#")])
            for machine, body in blocks]


def on_one_machine(line: str, port: int) -> str:
    """The changes a single machine needs (see the module's docstring)."""
    line = line.replace("server.example.org:9092", f"127.0.0.1:{port}")
    if "liquid-fed server-host" in line:
        line = line.replace("--host 10.0.0.5", "--host 127.0.0.1")
        line = line.replace("--port 9092", f"--port {port}")
    m = re.fullmatch(r"scp (\S+) ([\w.]+):liquid-fed/", line.strip())
    if m:
        line = f"cp {m.group(1)} ../{HOSTS[m.group(2)]}/"
    return line


def test_the_deployment_guide_works_as_written(tmp_path: Path) -> None:
    blocks = guide_blocks()
    assert [m for m, _ in blocks] == ["trusted", "trusted", "server", "party", "server"]
    for machine in ("trusted", "server", "party0", "party1"):
        folder = tmp_path / machine
        folder.mkdir()
        (folder / ".venv").symlink_to(ROOT / ".venv")
        (folder / "configs").symlink_to(ROOT / "configs")
    port = free_port()
    tag = f"lf-docs-{uuid.uuid4().hex}"
    env = {**os.environ, TEST_TAG: tag, "PATH": f"{ROOT / '.venv' / 'bin'}:"
           f"{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    long_lived: list[subprocess.Popen] = []

    def script(lines: list[str]) -> str:
        return "set -e\n" + "\n".join(on_one_machine(line, port) for line in lines) + "\n"

    def run(machine: str, lines: list[str], timeout: float = 300) -> str:
        proc = subprocess.run(["bash", "-c", script(lines)], cwd=tmp_path / machine, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{machine}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    def start(machine: str, lines: list[str]) -> subprocess.Popen:
        log = (tmp_path / f"{machine}.log").open("w")
        proc = subprocess.Popen(["bash", "-c", script(lines)], cwd=tmp_path / machine,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        long_lived.append(proc)
        return proc

    def log_of(machine: str) -> str:
        return (tmp_path / f"{machine}.log").read_text()

    try:
        for lines in (blocks[0][1], blocks[1][1]):  # keys, shards, the three files handed out
            run("trusted", lines)
        assert sorted(p.name for p in (tmp_path / "server").iterdir()) == [
            ".venv", "configs", "server.tgz"]
        server = start("server", blocks[2][1])
        deadline = time.monotonic() + 120
        while not (tmp_path / "server" / "deploy" / "work" / "server.json").exists():
            assert server.poll() is None, log_of("server")
            assert time.monotonic() < deadline, log_of("server")
            time.sleep(0.5)
        party = blocks[3][1]
        start("party0", party)
        start("party1", [line.replace("party-0", "party-1").replace("--partition-id 0",
                                                                     "--partition-id 1")
                         for line in party])
        out = run("server", blocks[4][1], timeout=600)
        for name in ("quickstart", "second"):
            summary = json.loads((tmp_path / "server" / "runs" / name / "summary.json")
                                 .read_text())
            assert summary["rounds"] > 0 and 0 < summary["test"]["accuracy"] <= 1, name
            assert len(summary["n_params"]) == 2  # the two parties of the guide
        assert "liquid ensemble (federated)" in out
        assert re.search(r"finished:completed\s+quickstart", out), out[-2000:]
        assert re.search(r"finished:completed\s+second", out), out[-2000:]
        for machine in ("server", "party0", "party1"):
            assert long_lived[["server", "party0", "party1"].index(machine)].poll() is None, (
                log_of(machine))
    finally:
        for proc in long_lived:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in long_lived:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    deadline = time.monotonic() + 30
    while tagged(TEST_TAG, tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tagged(TEST_TAG, tag) == set(), "processes outlived the guide's commands"

