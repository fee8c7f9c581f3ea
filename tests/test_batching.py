"""Batched delivery (simulations/batching.py): what a worker does with a list of messages.

The backend here is a stand-in with Flower's ``process_message`` / actor-pool interface, so
that each outcome (a batch that answers, a ``ClientApp`` that raises in it, an actor that dies
under it) is checked message by message. The real engine runs batched in every Flower test
(it is the default); tests/test_federation.py checks a batched run with a crash and a NaN reply
against the centralized twin, and the same run with Flower's one-message delivery.
"""

from __future__ import annotations

import time
from queue import Queue
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode

from simulations.batching import BatchClientAppActor, Batching, deliver, distinct_nodes, make_worker


def _message(node: int, text: str = "") -> Message:
    metadata = Metadata(run_id=1, message_id=f"in-{node}-{text}", src_node_id=1,
                        dst_node_id=node, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(RecordDict({"c": ConfigRecord({"text": text or f"to {node}"})}),
                   metadata=metadata)


class _App:
    """A ClientApp: echoes the text and counts calls in the context; node 13 raises."""

    def __call__(self, message: Message, context: dict) -> Message:
        if message.metadata.dst_node_id == 13:
            raise ValueError("unlucky node")
        context["calls"] = context.get("calls", 0) + 1
        reply = RecordDict({"c": ConfigRecord({"echo": message.content["c"]["text"]})})
        return Message(reply, reply_to=message)


class _Pool:
    """Flower's actor-pool calls the batch path uses; the "actor" runs the real
    ``run_batch`` generator, and with ``die_after`` its process dies after that many
    results."""

    def __init__(self, die_after: int | None) -> None:
        self.die_after, self.batches, self.out = die_after, 0, 0

    def submit(self, fn, job):
        app_fn, msgs, _, ctxs = job
        self.out += 1
        self.batches += 1
        ctxs = [dict(c) for c in ctxs]  # the actor has its own copies, as through Ray
        return self._stream(BatchClientAppActor.run_batch(None, app_fn, msgs, ctxs))

    def _stream(self, results):
        for i, result in enumerate(results):
            if i == self.die_after:
                raise RuntimeError("The actor died unexpectedly before finishing this task.")
            yield result

    def add_actor_back_to_pool(self, future) -> None:
        self.out -= 1


class _Backend:
    def __init__(self, die_after: int | None = None) -> None:
        self.pool = _Pool(die_after)
        self.app_fn = _App
        self.singles: list[int] = []

    def process_message(self, message: Message, context: dict):
        self.singles.append(message.metadata.dst_node_id)
        if message.metadata.dst_node_id == 13:
            raise RuntimeError("ClientApp raised")
        return next(BatchClientAppActor.run_batch(None, self.app_fn, [message], [dict(context)]))


@pytest.fixture(autouse=True)
def _refs_are_values(monkeypatch):
    """The stand-in actor streams values, not object references."""
    from simulations import batching

    monkeypatch.setattr(batching, "ray", SimpleNamespace(get=lambda ref: ref))


class _Store:
    def __init__(self) -> None:
        self.contexts: dict = {}

    def retrieve_context(self, run_id: int) -> dict:
        return dict(self.contexts)

    def update_context(self, run_id: int, context: dict) -> None:
        self.contexts = context


def _deliver(nodes, backend):
    stores = {n: _Store() for n in nodes}
    replies: Queue = Queue()
    metrics = SimpleNamespace(runtime=0.0)
    metrics.add_clientapp_runtime = lambda s: setattr(metrics, "runtime", metrics.runtime + s)
    deliver([_message(n) for n in nodes], replies, stores, backend, metrics)
    out = [replies.get_nowait() for _ in nodes]
    assert replies.empty() and backend.pool.out == 0  # every actor back in the pool
    return out, stores


def test_split_gives_each_worker_a_contiguous_share() -> None:
    batching = Batching()
    assert batching.split([1, 2, 3]) == [[1, 2, 3]]  # no worker yet: one list
    batching.workers = 2
    assert batching.split([1, 2, 3, 4, 5]) == [[1, 2, 3], [4, 5]]
    assert batching.split([1]) == [[1]]
    batching.workers = 4
    assert batching.split(list(range(6))) == [[0, 1], [2, 3], [4], [5]]


def test_a_node_twice_in_a_batch_waits_for_its_first_message() -> None:
    parts = distinct_nodes([_message(n) for n in (1, 2, 1, 3, 3)])
    assert [[m.metadata.dst_node_id for m in p] for p in parts] == [[1, 2], [1, 3], [3]]


def test_a_batch_is_one_call_and_every_node_gets_its_reply_and_context() -> None:
    backend = _Backend()
    out, stores = _deliver([4, 5, 6], backend)
    assert backend.pool.batches == 1 and backend.singles == []
    for node, reply in zip([4, 5, 6], out, strict=True):
        assert reply.metadata.reply_to_message_id is not None
        assert reply.content["c"]["echo"] == f"to {node}"
        assert stores[node].contexts == {"calls": 1}
    assert len({r.metadata.message_id for r in out}) == 3  # each stamped with its own id


def test_a_client_app_that_raises_answers_its_message_alone() -> None:
    backend = _Backend()
    out, stores = _deliver([4, 13, 6], backend)
    assert backend.pool.batches == 1 and backend.singles == []
    assert out[1].has_error()
    assert out[1].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "unlucky node" in out[1].error.reason
    assert stores[13].contexts == {}  # no new context for the failed message
    assert [out[0].content["c"]["echo"], out[2].content["c"]["echo"]] == ["to 4", "to 6"]
    assert stores[4].contexts == stores[6].contexts == {"calls": 1}


def test_a_batch_whose_actor_died_keeps_what_arrived_and_sends_the_rest_alone() -> None:
    backend = _Backend(die_after=1)  # the process dies on node 13's message
    out, stores = _deliver([4, 13, 6, 7], backend)
    assert backend.pool.batches == 1
    assert backend.singles == [6, 7, 13]  # node 4 answered in the batch; 13, suspect, last
    assert [r.has_error() for r in out] == [False, False, False, True]
    assert [r.content["c"]["echo"] for r in out[:3]] == ["to 4", "to 6", "to 7"]
    assert "ClientApp raised" in out[3].error.reason
    assert all(stores[n].contexts == {"calls": 1} for n in (4, 6, 7))  # each applied once
    assert stores[13].contexts == {}


def test_a_batch_that_dies_at_once_goes_message_by_message() -> None:
    backend = _Backend(die_after=0)
    out, stores = _deliver([4, 6], backend)
    assert backend.singles == [6, 4]
    assert [r.content["c"]["echo"] for r in out] == ["to 6", "to 4"]
    assert stores[4].contexts == stores[6].contexts == {"calls": 1}


def test_a_lone_message_takes_flowers_own_path() -> None:
    backend = _Backend()
    out, stores = _deliver([4], backend)
    assert backend.pool.batches == 0 and backend.singles == [4]
    assert out[0].content["c"]["echo"] == "to 4" and stores[4].contexts == {"calls": 1}


def test_the_worker_takes_lists_and_single_messages_and_counts_itself() -> None:
    import threading

    batching, backend = Batching(), _Backend()
    ins, outs, stop = Queue(), Queue(), threading.Event()
    stores = {n: _Store() for n in (1, 2, 3)}
    metrics = SimpleNamespace(add_clientapp_runtime=lambda s: None)
    worker = threading.Thread(target=make_worker(batching),
                              args=(ins, outs, stores, backend, stop, metrics))
    worker.start()
    ins.put([_message(1), _message(2), _message(1, "again")])
    ins.put(_message(3))
    got = [outs.get(timeout=5) for _ in range(4)]
    assert batching.workers == 1
    stop.set()
    worker.join(timeout=5)
    assert batching.workers == 0 and not worker.is_alive()
    assert [r.content["c"]["echo"] for r in got] == ["to 1", "to 2", "again", "to 3"]
    assert stores[1].contexts == {"calls": 2}  # the second message saw the first's context
    assert backend.pool.batches == 1 and backend.singles == [1, 3]


def test_the_actor_class_keeps_flowers_suffix() -> None:
    from simulations.batching import RemoteBatchActor

    # How a run's summary finds its client actors in Ray's actor table.
    assert RemoteBatchActor.__ray_metadata__.class_name.endswith("ClientAppActor")
