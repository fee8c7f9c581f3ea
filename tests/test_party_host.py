"""``liquid-fed party-host``: why a party cannot join, relative paths, private logs, no orphans.

The probe tests run against small servers in this process (TLS with the party's CA, another
CA or another name; plain HTTP; a closed port). The process tests start a real
``flower-superlink`` on loopback (TLS, one registered key) and real ``party-host`` commands.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.host import probe_superlink, supernode_failure
from clients.supernode import EXIT_WORKER_DIED
from clients.worker import one_line
from liquid_fed import procs
from liquid_fed.errors import DeploymentError
from server.keys import KeySet, make_keys

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# The probe, against servers in this process
# --------------------------------------------------------------------------------------------


class Server(threading.Thread):
    """Accepts connections on 127.0.0.1 and answers ``HTTP/1.0 404`` (over TLS with ``tls``)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(daemon=True)
        self.tls = tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass  # a client that gave up on the handshake
            finally:
                conn.close()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(5)
        self.sock.close()


def tls_context(keys: KeySet) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(keys.server.cert), str(keys.server.key))
    return ctx


@pytest.fixture(scope="module")
def key_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeySet]:
    root = tmp_path_factory.mktemp("keys")
    return {"ours": make_keys(root / "ours", 2),
            "other": make_keys(root / "other", 1),
            "named": make_keys(root / "named", 1, hosts=["localhost"])}


def refusal(**kwargs: object) -> str:
    with pytest.raises(DeploymentError) as info:
        probe_superlink(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_probe_accepts_the_server_its_ca_signed_for_its_address(key_sets) -> None:
    ours = key_sets["ours"]
    with Server(tls_context(ours)) as server:
        probe_superlink("127.0.0.1", server.port, ours.party(0).ca, timeout=5)
        probe_superlink("localhost", server.port, ours.party(1).ca, timeout=5)
    with Server() as server:
        probe_superlink("127.0.0.1", server.port, None, timeout=5)  # --insecure, plain HTTP


def test_probe_names_each_tls_failure(key_sets) -> None:
    ours, other, named = key_sets["ours"], key_sets["other"], key_sets["named"]
    ca = ours.party(0).ca
    with Server(tls_context(other)) as server:
        why = refusal(host="127.0.0.1", port=server.port, ca=ca, timeout=5)
        assert why == (f"the certificate served at 127.0.0.1:{server.port} is not signed by this "
                       f"party's CA ({ca}): the party's keys and the server's come from "
                       "different `liquid-fed keys` runs, or another server answers at that "
                       "address")
    with Server(tls_context(named)) as server:  # its CA is trusted, but it names localhost only
        why = refusal(host="127.0.0.1", port=server.port, ca=named.party(0).ca, timeout=5)
        assert why == (f"the SuperLink's certificate at 127.0.0.1:{server.port} does not name "
                       "127.0.0.1 (it names localhost): give --superlink one of those names, "
                       "or make keys whose --host includes 127.0.0.1")
        probe_superlink("localhost", server.port, named.party(0).ca, timeout=5)
    with Server() as server:  # no TLS at all
        why = refusal(host="127.0.0.1", port=server.port, ca=ca, timeout=5)
        assert why.startswith(f"the server at 127.0.0.1:{server.port} does not speak TLS (")
        assert why.endswith("it runs without keys (--insecure), or another service listens "
                            "there; this party expects TLS (--keys)")
    with Server(tls_context(ours)) as server:  # TLS, but the party runs --insecure
        why = refusal(host="127.0.0.1", port=server.port, ca=None, timeout=5)
        assert why == (f"the server at 127.0.0.1:{server.port} does not answer in plain HTTP "
                       "(it expects TLS): this party runs --insecure; give it --keys (its "
                       "folder of `liquid-fed keys`) instead")


def test_probe_retries_a_closed_port_until_the_timeout_then_says_so() -> None:
    port = procs.free_port()
    told: list[str] = []
    t0 = time.monotonic()
    why = refusal(host="127.0.0.1", port=port, ca=None, timeout=1.5, on_wait=told.append)
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 5, elapsed
    assert why == (f"cannot reach the SuperLink at 127.0.0.1:{port} within 1.5 s "
                   "(--connect-timeout): connection refused: nothing listens on that port (is "
                   "server-host running there, and is the port its public one?)")
    assert told == [f"the SuperLink at 127.0.0.1:{port} does not answer yet: connection "
                    "refused: nothing listens on that port (is server-host running there, and "
                    "is the port its public one?); retrying for up to 1.5 s (--connect-timeout)"]
    why = refusal(host="no-such-host.invalid", port=port, ca=None, timeout=1.5)
    assert why.startswith(f"cannot reach the SuperLink at no-such-host.invalid:{port}: the name "
                          "'no-such-host.invalid' does not resolve (")


def test_probe_finds_a_server_that_starts_late() -> None:
    port = procs.free_port()
    late = socket.socket()
    late.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    threading.Timer(0.8, lambda: (late.bind(("127.0.0.1", port)), late.listen())).start()
    told: list[str] = []
    try:
        with pytest.raises(DeploymentError, match="did not answer a plain HTTP request"):
            # it listens but never answers: the probe gets that far once the port opens
            probe_superlink("127.0.0.1", port, None, timeout=3, on_wait=told.append)
    finally:
        late.close()
    assert len(told) == 1 and "connection refused" in told[0]


def test_supernode_failure_reads_the_reason_from_the_log() -> None:
    key = Path("/k/party-0/supernode.key")
    flower = ["INFO :      Starting Flower SuperNode",
              "ERROR :     Exit Code: 305",
              "Failed to initialize the connection to the SuperLink.",
              "[code: 2004] Failed to activate SuperNode."]
    refused = supernode_failure(flower, 1, "h:1", key)
    assert refused.startswith("the SuperLink at h:1 refused this party's key "
                              "(/k/party-0/supernode.key): either the key is not registered")
    assert "still online from an earlier start" in refused
    ours = ["WARNING liquid_fed.supernode: the SuperLink does not activate this key's node (HTTP "
            "412): either ..."]
    assert supernode_failure(ours, None, "h:1", key) == refused
    died = ["INFO liquid_fed.supernode: SuperNode supernode-0: ClientApp worker started (pid 7)",
            "ERROR liquid_fed.supernode: SuperNode supernode-0 stops: its ClientApp worker "
            "(pid 7) exited with status -9. The run cannot get this node's replies."]
    assert supernode_failure(died, EXIT_WORKER_DIED, "h:1", key) == (
        "its ClientApp worker died (worker (pid 7) exited with status -9. The run cannot get "
        "this node's replies.)")
    other = ["Failed to initialize the connection to the SuperLink.", "[code: 1] No way."]
    assert supernode_failure(other, 1, "h:1", None) == (
        "Flower could not connect to the SuperLink at h:1: [code: 1] No way.")
    assert supernode_failure(["a", "last words", ""], 3, "h:1", None) == (
        "exit status 3; its last line: last words")


def test_a_clientapp_failure_is_one_line_with_its_cause() -> None:
    try:
        try:
            raise ValueError("views.n_views: got 3\nmore detail")
        except ValueError as inner:
            raise RuntimeError("the ClientApp could not start") from inner
    except RuntimeError as exc:
        assert one_line(exc) == ("RuntimeError: the ClientApp could not start (caused by "
                                 "ValueError: views.n_views: got 3)")


def test_private_logs_and_folders(tmp_path: Path) -> None:
    work = tmp_path / "a" / "b"
    group = procs.ProcessGroup(work, guard=False)
    with group:
        child = group.spawn("echo", [sys.executable, "-c", "print('hi')"], work / "home")
        child.proc.wait(10)
        child.wait_closed(5)
    assert child.log_path.read_text().endswith(" hi\n")
    for folder in (tmp_path / "a", work, work / "home"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(child.log_path.stat().st_mode) == 0o600


# --------------------------------------------------------------------------------------------
# Real processes: a SuperLink on loopback, party hosts started from another folder
# --------------------------------------------------------------------------------------------


def tagged(tag: str) -> list[str]:
    """Live processes carrying ``LIQUID_FED_TEST_TAG=tag`` (descendants inherit it)."""
    return [f"{pid}: {' '.join(procs._read(f'/proc/{pid}/cmdline').split(chr(0)))[:150]}"
            for pid in sorted(procs.tagged("LIQUID_FED_TEST_TAG", tag))]


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A TLS SuperLink with SuperNode authentication that registered party 0's key only;
    (the folder holding ``keys/`` and ``shards/``, its port)."""
    from server.deploy_local import LocalDeployment

    root = tmp_path_factory.mktemp("party")
    keys = make_keys(root / "keys", 2)
    for k in range(2):
        (root / "shards" / f"party-{k}").mkdir(parents=True)
        (root / "shards" / f"party-{k}" / "manifest.json").write_text(json.dumps({"party": k}))
    with LocalDeployment(0, root / "server-work", keys=keys) as dep:
        dep.superlink_port = procs.free_port()
        from server.deploy_local import superlink_security_args

        link = dep.spawn("superlink", [
            procs.executable("flower-superlink"), *superlink_security_args(keys.server),
            "--host", "127.0.0.1", "--port", str(dep.superlink_port),
            "--disable-runtime-dependency-installation"], dep.work_dir / "superlink-home")
        deadline = time.monotonic() + 60
        while not procs.accepts(dep.superlink_port):
            dep.check_alive(link)
            assert time.monotonic() < deadline, link.tail()
            time.sleep(0.1)
        dep.write_connection()
        dep.register([keys.party(0).public_key])
        yield root, dep.superlink_port


def party_host(cwd: Path, port: int, k: int, tag: str, *extra: str) -> subprocess.Popen:
    """``liquid-fed party-host`` for party ``k``, typed in ``cwd`` with relative paths."""
    env = {**os.environ, "LIQUID_FED_TEST_TAG": tag,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "liquid_fed.cli", "party-host", "--superlink",
         f"127.0.0.1:{port}", "--keys", f"keys/party-{k}", "--data-dir", f"shards/party-{k}",
         "--partition-id", str(k), "--num-partitions", "2", "--work-dir", f"work-{k}",
         "--quiet", *extra],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_party_host_with_relative_paths_joins_and_dies_whole_with_kill_9(superlink) -> None:
    root, port = superlink
    tag = f"lf-test-{uuid.uuid4().hex}"
    party = party_host(root, port, 0, tag)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(party.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("party 0 connected to" in line for line in lines):
            assert party.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        running = tagged(tag)
        assert any("clients.supernode" in p for p in running), running
        deadline = time.monotonic() + 30
        while not any("clients.worker" in p for p in tagged(tag)):
            assert time.monotonic() < deadline, tagged(tag)
            time.sleep(0.2)
    finally:
        party.kill()  # SIGKILL: party-host cannot clean up; its children must see to it
        party.wait(10)
    deadline = time.monotonic() + 20
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged(tag) == []
    work = root / "work-0"
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    log = work / "supernode-0.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "SuperNode ID:" in log.read_text()  # the relative --keys reached the SuperNode
    for path in (work / "supernode-home").rglob("*"):  # what its children wrote is private
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_an_unregistered_key_is_named_within_the_connect_timeout(superlink) -> None:
    root, port = superlink
    tag = f"lf-test-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    party = party_host(root, port, 1, tag, "--connect-timeout", "12")
    _, err = party.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert party.returncode == 1, err
    first = err.splitlines()[0]
    assert first.startswith(f"liquid-fed party-host: failed: party 1 was not let in by the "
                            f"SuperLink at 127.0.0.1:{port} within 12 s (--connect-timeout): "
                            f"the SuperLink at 127.0.0.1:{port} refused this party's key ("
                            f"{root / 'keys' / 'party-1' / 'supernode.key'}): either the key is "
                            "not registered there"), err
    assert "Traceback" not in err
    assert 12 <= elapsed < 30, elapsed
    assert tagged(tag) == []


def test_a_wrong_port_fails_fast_with_its_reason(tmp_path: Path) -> None:
    make_keys(tmp_path / "keys", 1)
    (tmp_path / "shards" / "party-0").mkdir(parents=True)
    (tmp_path / "shards" / "party-0" / "manifest.json").write_text(json.dumps({"party": 0}))
    port = procs.free_port()
    party = party_host(tmp_path, port, 0, f"lf-test-{uuid.uuid4().hex}", "--connect-timeout",
                       "2")
    _, err = party.communicate(timeout=60)
    assert party.returncode == 1
    assert err.splitlines()[-1] == (
        f"liquid-fed party-host: failed: cannot reach the SuperLink at 127.0.0.1:{port} within "
        "2 s (--connect-timeout): connection refused: nothing listens on that port (is "
        "server-host running there, and is the port its public one?)")
    assert not (tmp_path / "work-0").exists()  # nothing was started


def test_a_killed_deploy_group_launcher_takes_every_child_down(tmp_path: Path) -> None:
    # What deploy-local and the hosts rely on: a launcher (here a small script) holding a
    # ProcessGroup is killed with SIGKILL; its child and the grandchild that child started in
    # a session of its own (as Flower's SuperExec and ClientApp processes are) both go.
    tag = f"lf-test-{uuid.uuid4().hex}"
    script = tmp_path / "launcher.py"
    script.write_text(f"""
import sys, time
from pathlib import Path
from liquid_fed.procs import ProcessGroup
group = ProcessGroup(Path({str(tmp_path / 'w')!r}))
grandchild = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(300)'], start_new_session=True); time.sleep(300)")
group.spawn("child", [sys.executable, "-c", grandchild], Path({str(tmp_path / 'h')!r}))
print("started", flush=True)
time.sleep(300)
""")
    env = {**os.environ, "LIQUID_FED_TEST_TAG": tag,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    launcher = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                text=True)
    try:
        assert launcher.stdout.readline() == "started\n"  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while len(tagged(tag)) < 4:  # launcher, guard, child, grandchild
            assert time.monotonic() < deadline, tagged(tag)
            time.sleep(0.1)
    finally:
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
    deadline = time.monotonic() + 15
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tagged(tag) == []


def test_a_childs_output_is_followed_with_bounded_memory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(procs, "MAX_LINES", 5)
    child = procs.Child("count", [sys.executable, "-c", "print(*range(12), sep='\\n')"], {},
                        tmp_path, tmp_path / "count.log")
    child.proc.wait(timeout=30)
    child.wait_closed(10)
    assert len(child.lines) == 5 and child.written == 12
    seen, new = child.since(0)  # the first seven are gone from memory (kept on disk)
    assert seen == 12 and [line for _, line in new] == ["7", "8", "9", "10", "11"]
    assert [line for _, line in child.since(10)[1]] == ["10", "11"]
    assert child.since(12) == (12, [])
    assert len((tmp_path / "count.log").read_text().splitlines()) == 12


def test_a_party_given_the_wrong_folder_is_told_what_it_holds(tmp_path: Path) -> None:
    from clients.host import _check_shard
    from liquid_fed.config import build_config
    from liquid_fed.errors import ConfigError
    from liquid_fed.shards import write_shards

    cfg = build_config({"data": {"name": "iris"}, "views": {"kind": "random", "n_views": 2,
                                                            "options": {}}})
    write_shards(cfg, tmp_path / "shards")
    _check_shard(tmp_path / "shards" / "party-1", 1)  # its own: accepted
    with pytest.raises(ConfigError, match=r"holds the server's label folder, not party 0's "
                                          r"shard \(give it the party-0 folder"):
        _check_shard(tmp_path / "shards" / "server", 0)
    with pytest.raises(ConfigError, match=r"holds party 1's shard, not party 0's"):
        _check_shard(tmp_path / "shards" / "party-1", 0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="its manifest.json cannot be read"):
        _check_shard(tmp_path / "bad", 0)
