"""Batched delivery (simulations/batching.py): what a worker does with a list of messages.

The backend here is a stand-in with Flower's ``process_message`` / actor-pool interface, so
that each outcome (a batch that answers, a ``ClientApp`` that raises in it, an actor that dies
under it) is checked message by message. The real engine runs batched in every Flower test
(it is the default); tests/test_federation.py checks a batched run with a crash and a NaN reply
against the centralized twin, and the same run with Flower's one-message delivery.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
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


class _Context(dict):
    """A node's Context: its state (this dict) and its node config."""

    def __init__(self, node: int) -> None:
        super().__init__()
        self.node_config = {"partition-id": node}


class _Method:
    """An actor method: ``.remote(...)`` runs it at once; the options of each call are kept
    (``{}`` for none)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls, self._next = fn, [], {}

    def options(self, **options):
        self._next = options
        return self

    def remote(self, *args):
        self.calls.append(self._next)
        self._next = {}
        return self.fn(*args)


class _Actor:
    """Flower's actor methods the batch path calls, running the real ``run_batch`` generator
    on copies of the contexts (as through Ray); with ``die_after`` its process dies after that
    many results of a batch. Counts batches and single messages."""

    def __init__(self, die_after: int | None = None) -> None:
        self.die_after, self.batches, self.singles = die_after, 0, []
        self.run_batch, self.run = _Method(self._batch), _Method(self._run)

    def _batch(self, app_fn, n, *items):
        self.batches += 1
        msgs, ctxs = items[:n], [copy.deepcopy(c) for c in items[n:]]
        assert len(msgs) == len(ctxs) == n
        for i, result in enumerate(BatchClientAppActor.run_batch(None, app_fn, n, *msgs,
                                                                 *ctxs)):
            if i == self.die_after:
                raise RuntimeError("The actor died unexpectedly before finishing this task.")
            yield result

    def _run(self, app_fn, message, cid, context):
        node = message.metadata.dst_node_id
        self.singles.append(node)
        assert cid == str(node)  # Flower's client id: the partition
        if node == 13:
            raise RuntimeError("ClientApp raised")
        reply, ctx = next(BatchClientAppActor.run_batch(None, app_fn, 1, message,
                                                        copy.deepcopy(context)))
        return cid, reply, ctx


@pytest.fixture(autouse=True)
def _refs_are_values(monkeypatch):
    """The stand-in actor returns values, not object references."""
    from simulations import batching

    monkeypatch.setattr(batching, "ray", SimpleNamespace(get=lambda ref: ref))


class _Store:
    def __init__(self, node: int) -> None:
        self.contexts = _Context(node)

    def retrieve_context(self, run_id: int) -> _Context:
        return copy.deepcopy(self.contexts)

    def update_context(self, run_id: int, context: _Context) -> None:
        self.contexts = context


def _backend(*actors: _Actor):
    return SimpleNamespace(app_fn=_App, pool=SimpleNamespace(pool=list(actors)),
                           num_workers=len(actors))


def _deliver(nodes, actor, spare=None):
    stores = {n: _Store(n) for n in nodes}
    replies: Queue = Queue()
    metrics = SimpleNamespace(runtime=0.0)
    metrics.add_clientapp_runtime = lambda s: setattr(metrics, "runtime", metrics.runtime + s)
    deliver([_message(n) for n in nodes], replies, stores, _backend(actor), actor, metrics,
            spare)
    out = [replies.get_nowait() for _ in nodes]
    assert replies.empty() and metrics.runtime > 0
    return out, stores


def test_route_sends_each_node_to_the_same_worker_every_time() -> None:
    batching = Batching()
    actors = [_Actor(), _Actor()]
    backend = _backend(*actors)
    assert not batching.ready()
    (q0, a0), (q1, a1) = batching.register(backend), batching.register(backend)
    assert batching.ready() and (a0, a1) == (actors[0], actors[1])
    with pytest.raises(RuntimeError, match="worker 3 of a pool of 2 actors"):
        batching.register(backend)
    partitions = {100 + p: p for p in range(5)}  # node id -> partition id
    batching.route([_message(100 + p) for p in (4, 0, 3, 1)], partitions)
    got = [[m.metadata.dst_node_id for m in q.get_nowait()] for q in (q0, q1)]
    assert got == [[100, 101], [104, 103]]  # partitions 0-2 -> worker 0, 3-4 -> 1; in order
    assert batching.spare(a0) is a1 and batching.spare(a1) is a0
    batching.route([_message(103)], partitions)  # alone, partition 3 still goes to worker 1
    assert q0.empty() and [m.metadata.dst_node_id for m in q1.get_nowait()] == [103]


def test_a_node_twice_in_a_batch_waits_for_its_first_message() -> None:
    parts = distinct_nodes([_message(n) for n in (1, 2, 1, 3, 3)])
    assert [[m.metadata.dst_node_id for m in p] for p in parts] == [[1, 2], [1, 3], [3]]


def test_a_batch_is_one_call_and_every_node_gets_its_reply_and_context() -> None:
    actor = _Actor()
    out, stores = _deliver([4, 5, 6], actor)
    assert actor.batches == 1 and actor.singles == []
    for node, reply in zip([4, 5, 6], out, strict=True):
        assert reply.metadata.reply_to_message_id is not None
        assert reply.content["c"]["echo"] == f"to {node}"
        assert stores[node].contexts == {"calls": 1}
        assert stores[node].contexts.node_config == {"partition-id": node}
    assert len({r.metadata.message_id for r in out}) == 3  # each stamped with its own id


def test_a_client_app_that_raises_answers_its_message_alone() -> None:
    actor = _Actor()
    out, stores = _deliver([4, 13, 6], actor)
    assert actor.batches == 1 and actor.singles == []
    assert out[1].has_error()
    assert out[1].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "unlucky node" in out[1].error.reason
    assert stores[13].contexts == {}  # no new context for the failed message
    assert [out[0].content["c"]["echo"], out[2].content["c"]["echo"]] == ["to 4", "to 6"]
    assert stores[4].contexts == stores[6].contexts == {"calls": 1}


def test_a_batch_whose_actor_died_keeps_what_arrived_and_sends_the_rest_alone() -> None:
    actor = _Actor(die_after=1)  # the process dies on node 13's message
    out, stores = _deliver([4, 13, 6, 7], actor)
    assert actor.batches == 1
    assert actor.singles == [6, 7, 13]  # node 4 answered in the batch; 13, suspect, last
    assert [r.has_error() for r in out] == [False, False, False, True]
    assert [r.content["c"]["echo"] for r in out[:3]] == ["to 4", "to 6", "to 7"]
    assert "ClientApp raised" in out[3].error.reason
    assert all(stores[n].contexts == {"calls": 1} for n in (4, 6, 7))  # each applied once
    assert stores[13].contexts == {}


def test_the_rest_of_a_dead_batch_goes_to_the_spare_actor_and_the_suspect_home() -> None:
    actor, spare = _Actor(die_after=1), _Actor()
    out, stores = _deliver([4, 13, 6, 7], actor, spare)
    assert (actor.batches, actor.singles, spare.singles) == (1, [13], [6, 7])
    assert actor.run.calls == [{"max_task_retries": 0}]  # its batch was its first try
    assert spare.run.calls == [{}, {}]  # Flower's own call, with the actor's one retry
    assert actor.run_batch.calls == [{"num_returns": "streaming", "max_task_retries": 0}]
    assert [r.has_error() for r in out] == [False, False, False, True]
    assert all(stores[n].contexts == {"calls": 1} for n in (4, 6, 7))


def test_a_batch_that_dies_at_once_goes_message_by_message() -> None:
    actor = _Actor(die_after=0)
    out, stores = _deliver([4, 6], actor)
    assert actor.singles == [6, 4]
    assert [r.content["c"]["echo"] for r in out] == ["to 6", "to 4"]
    assert stores[4].contexts == stores[6].contexts == {"calls": 1}


def test_a_lone_message_takes_flowers_own_path() -> None:
    actor = _Actor()
    out, stores = _deliver([4], actor)
    assert actor.batches == 0 and actor.singles == [4]
    assert actor.run.calls == [{}]  # with the actor's own retry, as Flower sends it
    assert out[0].content["c"]["echo"] == "to 4" and stores[4].contexts == {"calls": 1}


def test_the_worker_delivers_its_queue_on_its_own_actor() -> None:
    import threading

    batching, actors = Batching(), [_Actor(), _Actor()]
    backend = _backend(*actors)
    outs, stop = Queue(), threading.Event()
    stores = {n: _Store(n) for n in (1, 2, 3)}
    metrics = SimpleNamespace(add_clientapp_runtime=lambda s: None)
    workers = [threading.Thread(target=make_worker(batching),
                                args=(Queue(), outs, stores, backend, stop, metrics))
               for _ in actors]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 5
    while not batching.ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batching.workers == 2
    batching.queues[1].put([_message(1), _message(2), _message(1, "again")])
    got = [outs.get(timeout=5) for _ in range(3)]
    batching.queues[0].put([_message(3)])
    got.append(outs.get(timeout=5))
    # The runtime's stop: the dispatch loop wakes each worker with a None (Batching.stop);
    # they end on it, without waiting for their next look at the stop event (never set here).
    batching.stop()
    for worker in workers:
        worker.join(timeout=5)
    assert batching.workers == 0 and not any(w.is_alive() for w in workers)
    assert not stop.is_set()
    assert [r.content["c"]["echo"] for r in got] == ["to 1", "to 2", "again", "to 3"]
    assert stores[1].contexts == {"calls": 2}  # the second message saw the first's context
    assert (actors[1].batches, actors[1].singles) == (1, [1])  # queue 1's worker owns actor 1
    assert (actors[0].batches, actors[0].singles) == (0, [3])


def test_the_actor_class_keeps_flowers_suffix() -> None:
    from simulations.batching import RemoteBatchActor

    # How a run's summary finds its client actors in Ray's actor table.
    assert RemoteBatchActor.__ray_metadata__.class_name.endswith("ClientAppActor")


def test_terminate_leaves_the_actor_to_the_end_of_the_run() -> None:
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    with pytest.raises(TypeError, match="exit_actor"):  # Flower's exits the actor (not in one here)
        VirtualClientEngineActor().terminate()
    assert BatchClientAppActor().terminate() is None


def test_the_run_driver_inlines_objects_up_to_the_limit_unless_the_user_says(
        tmp_path, monkeypatch) -> None:
    """A run's driver (and a private Ray) passes objects of up to INLINE_BYTES inside calls;
    a user's own setting passes through untouched."""
    from liquid_fed.config import load_config
    from simulations.simulate import INLINE_BYTES, ray_environment

    key = "RAY_max_direct_call_object_size"
    monkeypatch.delenv(key, raising=False)
    quickstart = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    private = load_config(quickstart)
    cluster = load_config(quickstart, ["simulation.ray_address=10.0.0.5:6379"])
    for cfg in (private, cluster):
        assert ray_environment(cfg, tmp_path)[key] == str(INLINE_BYTES)
    assert INLINE_BYTES > 100 * 1024  # above Ray's default, or it would change nothing
    monkeypatch.setenv(key, "12345")
    for cfg in (private, cluster):
        assert key not in ray_environment(cfg, tmp_path)  # the launcher passes os.environ on
