"""How the ServerApp maps client indices to nodes (the rule alone; Flower is not involved)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.app import ClientFailure, GridTransport


def transport_with(parts: dict[int, object]) -> GridTransport:
    """A GridTransport whose nodes answer "hello" with the given partition-ids."""
    t = object.__new__(GridTransport)

    def send_raw(kind, nodes, arrays, settings):
        assert kind == "hello"
        return [({}, {} if parts[n] is None else {"partition_id": parts[n]}) for n in nodes]

    t._send_raw = send_raw
    return t


def test_partition_ids_decide_the_client_index() -> None:
    t = transport_with({11: 2, 12: 0, 13: 1})
    assert t._assign([11, 12, 13], 3) == [12, 13, 11]


def test_extra_nodes_are_ignored_only_if_indices_are_covered() -> None:
    with pytest.raises(ClientFailure, match="partition-id 3; accepted: integers 0..2"):
        transport_with({1: 0, 2: 1, 3: 2, 4: 3})._assign([1, 2, 3, 4], 3)


def test_no_partition_ids_means_node_order() -> None:
    assert transport_with({5: None, 6: None})._assign([5, 6], 2) == [5, 6]
    with pytest.raises(ClientFailure, match="3 nodes are connected for 2 clients"):
        transport_with({5: None, 6: None, 7: None})._assign([5, 6, 7], 2)


@pytest.mark.parametrize(("parts", "message"), [
    ({1: 0, 2: 0}, "nodes 1 and 2 both have partition-id 0"),
    ({1: 0, 2: None}, "node 2 has partition-id None"),
    ({1: 0, 2: "1"}, "node 2 has partition-id '1'"),
    ({1: 0, 2: True}, "node 2 has partition-id True"),
])
def test_bad_partition_ids_stop_the_run(parts, message) -> None:
    with pytest.raises(ClientFailure, match=message):
        transport_with(parts)._assign(list(parts), 2)


class _SilentGrid:
    """Takes every message and never answers."""

    def __init__(self) -> None:
        self.pushed: list = []

    def push_messages(self, msgs):
        self.pushed.extend(msgs)
        return [f"m{i}" for i in range(len(msgs))]

    def pull_messages(self, ids):
        return []


def test_a_round_without_some_parties_messages_and_names_only_the_others(monkeypatch) -> None:
    import server.app as app

    # Flower's Message needs a running app's context: a stand-in keeps its destination.
    monkeypatch.setattr(app, "Message", lambda content, dst_node_id, **_: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=dst_node_id)))
    t = object.__new__(GridTransport)
    t.nodes, t.threads, t.round, t.timeout, t.poll, t.health = [11, 12, 13], 1, 0, 0.0, 0.0, None
    t.grid = _SilentGrid()
    t.n_clients, t.missed, t.partitions, t.refused = 3, set(), {}, set()  # what __init__ sets
    replies = t.exchange("train", [{}, {}], [{}, {}], clients=[2, 0])
    # No reply within the timeout: each client named by its index and node, as absent.
    assert [r.cause for r in replies] == ["timeout", "timeout"]
    assert replies[0].reason.startswith('client 2 (node 13) sent no reply to "train"')
    assert replies[1].reason.startswith('client 0 (node 11) sent no reply to "train"')
    assert [m.metadata.dst_node_id for m in t.grid.pushed] == [13, 11]


def test_the_nodes_are_awaited_at_the_first_exchange_not_before(monkeypatch) -> None:
    import server.app as app

    monkeypatch.setattr(app, "Message", lambda content, dst_node_id, **_: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=dst_node_id)))
    asked = []

    class _LateGrid(_SilentGrid):
        def get_node_ids(self):  # the second node registers at the third look
            asked.append(1)
            return [11, 12] if len(asked) >= 3 else [11]

    t = GridTransport(_LateGrid(), 2, timeout=0.0, wait=10.0, poll=0.0)
    assert asked == [] and t.nodes == [] and t.describe(1) == "client 1"
    hello = []
    monkeypatch.setattr(t, "_assign", lambda nodes, n: hello.append(list(nodes)) or nodes)
    replies = t.exchange("train", [{}, {}], [{}, {}])
    assert hello == [[11, 12]] and t.nodes == [11, 12] and len(asked) == 3
    assert [r.cause for r in replies] == ["timeout", "timeout"]
    assert t.describe(1) == "client 1 (node 12)"
    t.exchange("train", [{}, {}], [{}, {}])  # connected once
    assert hello == [[11, 12]]
