"""A party that dies during a deployed run is absent for the rounds it misses and rejoins.

The unit tests check the rules alone (Flower not running): the SuperLink's own error reply
for a node it lost is charged to that node, a new node for a missing partition takes its
place while a live partition is never taken over, and the SuperNode wrapper's reading of
Flower's flags. The slow test runs a real deployment on loopback (SuperLink, two SuperNodes
with warm workers, TLS and node authentication, private shards), kills one SuperNode with
SIGKILL mid-run, checks that the run goes on over the other, starts the party again with
the same key and shard, checks that it is back, and prints the detection and rejoin times.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_deployment import QUICKSTART, TINY, assert_all_stopped, deployment, slow

from clients import supernode
from liquid_fed.federation.transport import NoReply
from server.app import GridTransport

# --------------------------------------------------------------------------------------------
# The ServerApp's rules (a stand-in Grid)
# --------------------------------------------------------------------------------------------

SUPERLINK_NODE_ID = 1  # flwr.common.constant: the SuperLink signs its own error replies


def _reply(to: str, src: int, info: dict | None = None, error: tuple[int, str] | None = None
           ) -> SimpleNamespace:
    from clients.codec import encode

    return SimpleNamespace(
        metadata=SimpleNamespace(reply_to_message_id=to, src_node_id=src),
        has_error=lambda: error is not None,
        error=SimpleNamespace(code=error[0], reason=error[1]) if error else None,
        content=None if error else encode({}, info or {}))


class _Grid:
    """Answers each message with ``answer(node, kind) -> reply kwargs | None`` (None: silent);
    ``online`` is what ``get_node_ids`` lists."""

    def __init__(self, online: list[int], answer: Any) -> None:
        self.online, self.answer = online, answer
        self.pushed: list[tuple[int, str]] = []
        self._out: dict[str, tuple[int, str]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.online)

    def push_messages(self, msgs: list) -> list[str]:
        ids = []
        for msg in msgs:
            mid = f"m{len(self._out)}"
            self._out[mid] = (msg.metadata.dst_node_id, msg.metadata.message_type)
            self.pushed.append(self._out[mid])
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list:
        out = []
        for mid in ids:
            node, kind = self._out[mid]
            got = self.answer(node, kind)
            if got is not None:
                out.append(_reply(mid, **{"src": node, **got}))
        return out


@pytest.fixture
def stand_in_messages(monkeypatch) -> None:
    import server.app as app

    # Flower's Message needs a running app's context: a stand-in keeps destination and type.
    monkeypatch.setattr(app, "Message", lambda content, dst_node_id, message_type, **_:
                        SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst_node_id,
                                                                 message_type=message_type)))


def _transport(grid: _Grid, nodes: list[int]) -> GridTransport:
    t = object.__new__(GridTransport)
    t.grid, t.nodes, t.threads, t.round, t.timeout, t.poll, t.health = (
        grid, list(nodes), 1, 0, 0.2, 0.01, None)
    t.n_clients = len(nodes)
    t.missed, t.partitions, t.refused = set(), {}, set()
    t.setup_timeout = 0.2
    return t


def test_the_superlinks_reply_for_a_lost_node_is_charged_to_that_node(
        stand_in_messages) -> None:
    from flwr.common.constant import ErrorCode

    # Flower answers for a node whose heartbeats stopped with an error signed by the
    # SuperLink itself; matched by sender, it looked like silence ("no reply within 65 s").
    def answer(node: int, kind: str) -> dict | None:
        if node == 12:
            return {"src": SUPERLINK_NODE_ID,
                    "error": (ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable")}
        return {"info": {"ok": node}}

    t = _transport(_Grid([11, 12], answer), [11, 12])
    t0 = time.monotonic()
    first, second = t.exchange("train", [{}, {}], [{}, {}])
    assert time.monotonic() - t0 < 0.15  # not the 0.2 s reply timeout: nothing was waited on
    assert first == ({}, {"ok": 11})
    assert isinstance(second, NoReply) and second.cause == "error"
    assert second.reason.startswith('client 1 (node 12) is offline on "train"')
    assert "heartbeat" in second.reason
    assert t.missed == {1}


def test_a_new_node_takes_a_missing_partition_but_never_a_live_one(stand_in_messages) -> None:
    parts = {11: 0, 12: 1, 21: 1, 22: 0}
    answered: list[int] = []

    def answer(node: int, kind: str) -> dict | None:
        if node in grid.online:
            answered.append(node)
            return {"info": {"partition_id": parts[node]} if kind == "query.hello" else {}}
        return None

    grid = _Grid([11, 12], answer)
    t = _transport(grid, [11, 12])
    assert not isinstance(t.exchange("train", [{}, {}], [{}, {}])[1], NoReply)
    grid.online = [11, 21, 22]  # node 12 died; 21 (partition 1) and 22 (partition 0) appear
    replies = t.exchange("train", [{}, {}], [{}, {}])
    assert isinstance(replies[1], NoReply) and t.missed == {1}  # 12 is silent this round
    hellos = len([p for p in grid.pushed if p[1] == "query.hello"])
    replies = t.exchange("train", [{}, {}], [{}, {}])
    assert t.nodes == [11, 21], "node 21 named the missing partition 1; 22 a live one"
    assert not any(isinstance(r, NoReply) for r in replies) and t.missed == set()
    assert [n for n, k in grid.pushed if k == "query.hello"][-2:] == [21, 22]
    # Asked once per node: a later round neither says hello to 22 again nor hands it a client.
    grid.online = [11, 21, 22]
    t.missed = {0}
    t.exchange("train", [{}, {}], [{}, {}])
    assert len([p for p in grid.pushed if p[1] == "query.hello"]) == hellos + 2
    assert t.nodes == [11, 21]


def test_a_new_node_silent_to_hello_is_asked_once_and_given_nothing(
        stand_in_messages) -> None:
    def answer(node: int, kind: str) -> dict | None:
        return None if node in (12, 31) else {"info": {}}

    grid = _Grid([11, 12], answer)
    t = _transport(grid, [11, 12])
    grid.online = [11, 31]  # 12 gone; 31 never answers (not a party's SuperNode)
    t.exchange("train", [{}, {}], [{}, {}])
    for _ in range(2):
        t.exchange("train", [{}, {}], [{}, {}])
    assert [n for n, k in grid.pushed if k == "query.hello"] == [31]  # within setup_timeout
    assert t.nodes == [11, 12] and t.missed == {1}


# --------------------------------------------------------------------------------------------
# The SuperNode wrapper
# --------------------------------------------------------------------------------------------


def test_node_identity_comes_from_the_auth_key_and_lives_next_to_it(tmp_path: Path) -> None:
    flags = ["--root-certificates", "/k/ca.crt", "--auth-supernode-private-key",
             "/k/supernode.key", "--superlink", "10.0.0.5:9092", "--port", "9"]
    identity = supernode.node_identity(flags)
    assert identity is not None
    assert (identity.superlink, identity.key_file, identity.root_certificates) == (
        "10.0.0.5:9092", "/k/supernode.key", "/k/ca.crt")
    assert identity.id_file == Path("/k/supernode.key.node-id")
    assert supernode.node_identity(flags, str(tmp_path / "id")).id_file == tmp_path / "id"
    # Without a key Flower registers a new node per start: nothing to reclaim.
    assert supernode.node_identity(["--insecure", "--superlink", "127.0.0.1:1"]) is None
    stored = supernode.NodeIdentity("x:1", "k", None, tmp_path / "id")
    assert stored._stored() is None
    stored._store(1234567890123)
    assert stored._stored() == 1234567890123


def test_heartbeats_every_10_s_or_flowers_with_a_warning(monkeypatch, caplog) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as fhc

    for module in (heartbeat, fhc):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", 30)  # restored after
    assert supernode.install_heartbeat() is True
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fhc.HEARTBEAT_DEFAULT_INTERVAL == 10
    monkeypatch.setattr(fhc, "HEARTBEAT_DEFAULT_INTERVAL", 45)  # another Flower
    monkeypatch.setattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    assert supernode.install_heartbeat() is False
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 30 and fhc.HEARTBEAT_DEFAULT_INTERVAL == 45
    assert "keeping Flower's" in caplog.text
    monkeypatch.setattr(fhc, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    with pytest.raises(ValueError, match="got 5; accepted: 10..1800"):
        supernode.install_heartbeat(5)


# --------------------------------------------------------------------------------------------
# A real deployment
# --------------------------------------------------------------------------------------------

ABSENT = re.compile(r'"(\w+)": absent \((\w+)\): client 1 \(node \d+\)')
REJOINED = re.compile(r"client 1 \(node \d+\) rejoined the run \(from its last checkpoint")


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _generations(run: Path) -> list[Path]:
    """The server's complete checkpoint generations (manifest written, folder renamed)."""
    return [m for m in (run / "checkpoints").glob("*/manifest.json")
            if not m.parent.name.startswith(".")]


@slow
@deployment
# Keys only: the other path (no keys: a new node id mapped to the missing partition once the old
# node is offline) is the ServerApp's rule, tested above with a stand-in grid; a real run of it
# took 72 s of the suite's budget.
@pytest.mark.parametrize("secure", [True], ids=["keys"])
def test_a_killed_party_is_absent_and_rejoins_the_running_deployment(tmp_path: Path,
                                                                     secure: bool) -> None:
    # With keys the restarted SuperNode reclaims its node id; without, Flower registers a new
    # node, which the ServerApp maps to the missing partition once the old node is offline.
    from liquid_fed.shards import write_shards
    from server.deploy_local import LocalDeployment, resolve, submit_run
    from server.keys import make_keys

    reply_timeout = 4.0
    sets = [*TINY, "train.epochs=12", "train.eval_every=2", "train.checkpoint_every=2",
            f"federation.reply_timeout={reply_timeout}", "federation.min_clients=1"]
    cfg, overrides, _ = resolve(QUICKSTART, sets, tmp_path / "runs")
    keys, shards = make_keys(tmp_path / "keys", 2) if secure else None, tmp_path / "shards"
    write_shards(cfg, shards)
    run = tmp_path / "runs" / "quickstart"
    outcome: dict[str, Any] = {}
    with LocalDeployment(2, tmp_path / "deploy", keys=keys, shards=shards,
                         tolerate_exits=True) as dep:
        dep.start()

        def submit() -> None:
            try:
                outcome["result"] = submit_run(dep, QUICKSTART, overrides, run, 300,
                                               shards / "server")
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=submit, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        # Under way: a metrics row written and a complete checkpoint (the server's receipts,
        # each party's expert at home) to rejoin from.
        while not (_rows(run) and _generations(run)) and thread.is_alive():
            assert time.monotonic() < deadline, "the run never got under way"
            time.sleep(0.05)
        assert thread.is_alive(), outcome
        rows_before = len(_rows(run))
        dep.kill_node(1)  # SIGKILL: the SuperNode (its worker dies with it) cannot sign off
        killed = time.time()
        runner = next(c for c in dep.children if c.name == "flwr-run")
        while not runner.find(ABSENT) and thread.is_alive():
            assert time.time() - killed < 60, runner.tail(30)
            time.sleep(0.05)
        detected = runner.find(ABSENT)[0][0] - killed
        restarted_child = dep.restart_node(1)
        restarted = time.time()
        while not runner.find(REJOINED) and thread.is_alive():
            assert time.time() - restarted < 90, restarted_child.tail(30)
            time.sleep(0.05)
        assert runner.find(REJOINED), runner.tail(30)
        rejoined = runner.find(REJOINED)[0][0] - restarted
        thread.join(timeout=240)
        assert not thread.is_alive(), "the run did not finish"
        dep.check_nodes()
        node_log = restarted_child.tail(100000)
        server_log = runner.tail(100000)
        tag, ports = dep.tag, list(dep.ports)
    assert "error" not in outcome, outcome.get("error")
    _, status, summary = outcome["result"]
    assert status == "finished:completed" and summary["rounds"] == 12
    assert "Failed to initialize the connection" not in node_log
    if secure:  # the node its predecessor left online was reclaimed (same key, same node id)
        assert "still online at the SuperLink" in node_log and "reclaimed" in node_log
        assert "takes the place of node" not in server_log
    else:  # a new node id, given partition 1 once the old node was offline
        assert re.search(r"client 1: node \d+ takes the place of node \d+ \(offline\)",
                         server_log), server_log[-3000:]
    # present counts: party 0 answered every round; party 1 missed some, then came back.
    rows = [r for r in _rows(run) if r["split"] == "val"]
    assert all(r["present"][0] == 2 for r in rows[:-1]), [r["present"] for r in rows]
    ones = [r["present"][1] for r in rows]
    gap = [i for i, n in enumerate(ones[:-1]) if n < 2]
    assert gap and gap[0] >= rows_before - 1, f"party 1 was never absent, or too soon: {ones}"
    assert any(n > 0 for n in ones[gap[0] + 1:]), f"party 1 never answered again: {ones}"
    assert sum(ones) < sum(r["present"][0] for r in rows)
    parties = summary["parties"]
    assert parties[1]["rejoined"] >= 1 and parties[0]["rejoined"] == 0
    assert summary["test"]["accuracy"] > 0.3
    assert_all_stopped(tag, ports)
    print(f"\ndetection (kill -9 -> the server's absence message): {detected:.1f} s "
          f"(federation.reply_timeout = {reply_timeout:g} s); rejoin (restart -> the "
          f"server sets the party up again): {rejoined:.1f} s; present[1] per row: {ones}")
