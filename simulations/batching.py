"""Batched delivery: one Ray call per actor per exchange instead of one per client.

Flower's simulation runtime (flwr 1.41.0, ``vce_api.worker``) hands the client actors one
message at a time: each worker thread takes a message, ships it with its node's whole
``Context`` to an idle actor (``RayBackend.process_message``), waits for the reply and the
updated ``Context``, and only then takes the next. At 64 clients on 2 actors a round is 32
sequential Ray round trips per actor for each exchange, and the actors sat idle 60 % of a
round waiting for them (``benchmarks/bench_federation.py``).

Here each worker thread owns one actor, and the dispatch loop
(:func:`simulations.engine.make_dispatch_loop`) routes what one pass took to the workers' own
queues, one list per worker, each node to the same worker (and actor) every round, so an actor
keeps its clients' live experts and never rebuilds another actor's (:class:`Batching`). A
worker sends a list to its actor in one call (:meth:`BatchClientAppActor.run_batch`), which
runs Flower's ``ClientApp`` on each message with its node's ``Context``, exactly as Flower's
actor does, and streams back each reply and updated ``Context`` as it is done. Nothing else
changes: contexts still live in the runtime's node stores and travel with each message, so an
actor that dies loses nothing. (Keeping the state in the actor instead would save its copies
both ways, a sizeable part of what a round still costs at 64 clients, but a crashed actor
would then lose its clients' experts: the state would have to come back from a checkpoint,
and a restarted client would no longer equal the centralized twin step by step.)

Failure handling keeps Flower's per-message outcome for errors and crashes:

* a ``ClientApp`` that raises answers that message with Flower's error reply; the rest of the
  batch goes on;
* when the actor's process dies during a batch, the replies that arrived stand, and the
  messages it had not finished go one at a time through Flower's own actor method
  (``ClientAppActor.run``) to the next actor, so they need not wait for the restart; the one
  it died on goes last, to its own restarted actor, without a further retry (the batch was
  its first try: Flower's one retry in all): a crashing client fails alone and the others
  answer.

What batching does change: a client that *hangs* holds up the messages behind it in its
batch for as long as it hangs (Flower's one-message delivery would hand them to the other
actors). ``simulation.batch_messages: false`` restores Flower's delivery.

A batch never holds two messages for one node (the second would need the first's updated
``Context``): it is cut into parts with distinct nodes, delivered in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

import ray
from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from flwr.common.constant import PARTITION_ID_KEY, ErrorCode
from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

log = logging.getLogger(__name__)


class Batching:
    """What the dispatch loop and the workers share: one queue per worker, and the actor each
    worker owns (worker ``w`` sends everything it gets to actor ``w``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: list[Queue] = []
        self.actors: list[Any] = []
        self.workers = 0

    def register(self, backend: Any) -> tuple[Queue, Any]:
        """A starting worker's queue and actor (Flower starts one worker per actor, after
        building the pool, none of them busy yet)."""
        with self.lock:
            if not self.actors:
                self.actors = list(backend.pool.pool)
            w = len(self.queues)
            if w >= len(self.actors):
                raise RuntimeError(f"worker {w + 1} of a pool of {len(self.actors)} actors")
            self.queues.append(Queue())
            self.workers += 1
            return self.queues[w], self.actors[w]

    def spare(self, actor: Any) -> Any:
        """The actor after ``actor`` in the pool (``actor`` itself when it is alone)."""
        return self.actors[(self.actors.index(actor) + 1) % len(self.actors)]

    def stop(self) -> None:
        """Wake every worker to end (the runtime is stopping): each gets a None."""
        with self.lock:
            for queue in self.queues:
                queue.put(None)

    def ready(self) -> bool:
        """Whether every worker has its queue (before that the dispatch loop takes nothing)."""
        return bool(self.actors) and len(self.queues) >= len(self.actors)

    def route(self, messages: Sequence[Any], partitions: dict[int, int]) -> None:
        """Put ``messages`` into the workers' queues, one list per worker, in order: a node
        always goes to the same worker (and so to the same actor, which keeps its client's
        live expert between rounds): partition ``p`` of ``K`` to worker ``p * n // K``."""
        n, k = len(self.queues), max(len(partitions), 1)
        groups: dict[int, list[Any]] = {}
        for message in messages:
            part = partitions.get(message.metadata.dst_node_id, 0)
            groups.setdefault(min(part * n // k, n - 1), []).append(message)
        for w in sorted(groups):
            self.queues[w].put(groups[w])


def failed(message: Message, ex: BaseException) -> Message:
    """Log a ``ClientApp`` failure on ``message`` and return its :func:`error_reply`."""
    log.error("a ClientApp failed on a message to node %s: %s", message.metadata.dst_node_id,
              ex)
    return error_reply(message, ex)


def error_reply(message: Message, ex: BaseException) -> Message:
    """Flower's reply to a message whose ``ClientApp`` failed (as ``vce_api.worker`` builds
    it)."""
    if isinstance(ex, ClientAppException):
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    elif isinstance(ex, LoadClientAppError):
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    else:
        code = ErrorCode.UNKNOWN
    return Message(Error(code=code, reason=f"{type(ex)}:<'{ex}'>"), reply_to=message)


class BatchClientAppActor(VirtualClientEngineActor):
    """Flower's ``ClientAppActor`` with :meth:`run_batch` (the class name keeps its suffix:
    a run's summary finds its client actors by it)."""

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        super().__init__()
        if on_actor_init_fn:
            on_actor_init_fn()

    def terminate(self) -> None:
        """Flower asks every actor to exit (``exit_actor``) just before it stops Ray. From a
        task of an actor created with ``max_task_retries``, Ray takes that exit for a failed
        task to retry and prints a warning per actor on the user's terminal. The actors end
        with the run anyway (``ray.shutdown`` stops a private Ray's workers; on a cluster the
        end of the driver's job ends its actors), so this does nothing."""

    def run_batch(self, client_app_fn: Callable[[], Any], n: int, *items: Any
                  ) -> Iterator[tuple[Any, Any]]:
        """Run the ``ClientApp`` on each of the ``n`` messages (``items[:n]``) with its context
        (``items[n:]``, in the same order), yielding (a streaming generator: each result
        reaches the driver as it is done) the reply and the updated context, or
        ``(exception, None)`` where the app failed (Flower's ``run`` raises).

        Each message and context is an argument of its own (:func:`run_batch`'s docstring
        says why)."""
        messages, contexts = items[:n], items[n:]
        try:
            app = client_app_fn()
        except LoadClientAppError as ex:
            for _ in messages:
                yield ex, None
            return
        for message, context in zip(messages, contexts, strict=True):
            try:
                reply = app(message=message, context=context)
            except Exception as ex:  # noqa: BLE001 - answered as Flower's run would raise it
                yield ClientAppException(str(ex)), None
            else:
                yield reply, context


#: The Ray actor class the patched backend builds its pool from.
RemoteBatchActor = ray.remote(BatchClientAppActor)


def distinct_nodes(batch: Sequence[Message]) -> list[list[Message]]:
    """``batch`` cut, in order, into parts where no node has two messages."""
    parts: list[list[Message]] = [[]]
    seen: set[int] = set()
    for message in batch:
        node = message.metadata.dst_node_id
        if node in seen:
            parts.append([])
            seen = set()
        parts[-1].append(message)
        seen.add(node)
    return [part for part in parts if part]


def run_one(backend: Any, actor: Any, message: Message, context: Any, retry: bool = True
            ) -> tuple[Message, Any]:
    """One message through Flower's own actor method (``ClientAppActor.run``, with Ray's one
    retry on a restarted actor unless ``retry`` is false); a failure is Flower's error reply
    (and no new context)."""
    try:
        cid = str(context.node_config.get(PARTITION_ID_KEY, ""))
        method = actor.run if retry else actor.run.options(max_task_retries=0)
        _, reply, context = ray.get(method.remote(backend.app_fn, message, cid, context))
        return reply, context
    except Exception as ex:  # noqa: BLE001 - reported as an error reply, as Flower does
        return failed(message, ex), None


def run_batch(backend: Any, actor: Any, messages: Sequence[Message], contexts: Sequence[Any],
              done: list[tuple[Message, Any]]) -> None:
    """``messages`` through ``actor`` in one call, appending each result to ``done`` as it
    arrives; raises when the call failed, ``done`` then holding what finished before.

    Every message and context travels as an argument of its own: Ray inlines an argument of
    up to ``max_direct_call_object_size`` bytes in the call (100 KiB unless set; a run sets
    :data:`simulations.simulate.INLINE_BYTES`) and puts a larger one in its object store, a
    round trip through the raylet on each side. A quickstart context is 57 kB
    (its expert, Adam's moments, its ids), so the one list of an actor's two contexts took the
    store's path every round.
    """
    # No retry of the whole batch on a restarted actor (the actor's own option): what did not
    # finish goes message by message at once (deliver), each with Ray's one retry.
    stream = actor.run_batch.options(num_returns="streaming", max_task_retries=0).remote(
        backend.app_fn, len(messages), *messages, *contexts)
    for message, ref in zip(messages, stream, strict=False):
        reply, context = ray.get(ref)
        done.append((failed(message, reply), None) if isinstance(reply, BaseException)
                    else (reply, context))
    if len(done) != len(messages):
        raise RuntimeError(f"the actor returned {len(done)} results for {len(messages)} "
                           "messages")


def deliver(batch: Sequence[Message], replies: Queue, node_info_store: dict[int, Any],
            backend: Any, actor: Any, metrics: Any, spare: Any = None) -> None:
    """Process ``batch`` (distinct nodes) on ``actor`` and queue its replies, updating each
    node's context. If ``actor`` dies during the batch, the messages it had not finished go
    one by one to ``spare`` (another actor: this one is restarting), the one it died on last
    and to ``actor`` again (its second try: Flower's one retry)."""
    started = time.perf_counter()
    try:
        contexts = [node_info_store[m.metadata.dst_node_id].retrieve_context(
            run_id=m.metadata.run_id) for m in batch]
    except Exception as ex:  # noqa: BLE001 - each message answered, as Flower's worker does
        for message in batch:
            replies.put(_stamped(error_reply(message, ex)))
        return
    done: list[tuple[Message, Any]] = []
    if len(batch) > 1:
        try:
            run_batch(backend, actor, batch, contexts, done)
        except Exception as ex:  # noqa: BLE001 - the rest get their own chance below
            log.warning("a batch of %d messages failed after %d (%s: %s); delivering the rest "
                        "one by one", len(batch), len(done), type(ex).__name__, ex)
    share = (time.perf_counter() - started) / len(batch)

    def answer(message: Message, reply: Message, context: Any) -> None:
        metrics.add_clientapp_runtime(share)
        if context is not None:
            node_info_store[message.metadata.dst_node_id].update_context(
                message.metadata.run_id, context=context)
        replies.put(_stamped(reply))

    for message, (reply, context) in zip(batch, done, strict=False):
        answer(message, reply, context)
    rest = list(zip(batch, contexts, strict=True))[len(done):]
    if not rest:
        return
    # The others need not wait for the restart, nor for the retry of the one it died on.
    for message, context in rest[1:]:
        answer(message, *run_one(backend, spare if spare is not None else actor, message,
                                 context))
    message, context = rest[0]
    answer(message, *run_one(backend, actor, message, context, retry=len(batch) == 1))


def _stamped(reply: Message) -> Message:
    reply.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's worker assigns it
    return reply


def make_worker(batching: Batching) -> Callable[..., None]:
    """A worker thread for Flower's runtime (``vce_api.worker``'s signature) that owns one
    actor and delivers the lists the dispatch loop routes to it, one call per part."""

    def worker(messageins_queue: Queue, messageres_queue: Queue,
               node_info_store: dict[int, Any], backend: Any, f_stop: threading.Event,
               metrics: Any) -> None:
        queue, actor = batching.register(backend)
        spare = batching.spare(actor)  # the pool was taken whole at the first registration
        try:
            while not f_stop.is_set():
                try:
                    batch = queue.get(timeout=1.0)
                except Empty:
                    continue
                if batch is None:  # Batching.stop: the runtime is stopping
                    break
                for part in distinct_nodes(batch):
                    deliver(part, messageres_queue, node_info_store, backend, actor, metrics,
                            spare)
        finally:
            with batching.lock:
                batching.workers -= 1

    worker._liquid_fed_patch = True  # type: ignore[attr-defined]
    return worker
