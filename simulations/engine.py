"""Guarded patches of Flower's simulation engine (flwr 1.41.0).

1. A faster dispatch loop. Flower moves the server's messages to the Ray actors in
   ``vce_api.add_messages_to_queue``, which checks for new messages every 0.1 s: on average
   50 ms of dead time per round, most of a round's cost for small experts
   (``benchmarks/bench_federation.py`` measures it). It also asks the LinkState once per node,
   and each ask walks (and re-validates) every stored message: K² checks per poll, which at
   64 clients kept the server's process busy for most of a round and at 256 for seconds.
   :func:`install_dispatch_loop` swaps in a loop that wakes when the server has pushed a
   round (polling seldom otherwise) and takes every undelivered message in one pass over the
   store (what Flower's ``InMemoryLinkState.get_message_ins`` does for one node, done for all
   of them at once). With batching (:func:`install_batching`, :mod:`simulations.batching`) it
   also replaces Flower's worker threads and client actor class: one Ray call per actor per
   round instead of one per message.
2. A watch on the simulation runtime. When ``vce_api.run_api`` fails (the Ray backend cannot be
   built, a thread of the runtime dies), Flower sets its stop event but the ServerApp thread
   keeps waiting for replies until its own timeout. :func:`install_runtime_watch` wraps
   ``run_api`` to record the failure, so the server's wait ends within one poll with the
   runtime's own reason (:data:`WATCH`).

Each patch replaces a Flower function only when the installed Flower is the version it was
written for *and* the function's source is byte-for-byte the one it was written against
(SHA-256 below); otherwise it logs a warning and Flower's own function stays, so an upstream
change can cost speed but never silently drop an upstream fix.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Callable
from queue import Empty, Queue
from typing import Any

log = logging.getLogger(__name__)

FLOWER_VERSION = "1.41.0"
#: SHA-256 of the source of each Flower function a patch replaces (flwr 1.41.0).
SOURCE_SHA256 = {
    "add_messages_to_queue": "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a",
    "run_api": "f85c0cd6e902752f455c00ab9c7212c1cd94a8c681fa9bf294ba967463390898",
    # Not replaced but imitated for all nodes at once by the dispatch loop's one-pass take.
    "get_message_ins": "6547c8dcbc62e12f5b2aa5c69f4de8c7c7072c10d6c0876512cf37197d941056",
    # Batched delivery (simulations/batching.py): the worker threads it replaces, the backend
    # build whose actor pool it takes over, the actor method it calls for single messages.
    "worker": "60f308688ba34fb5bc942ac68c1d97be61b2010e8d4c3983833f646c5c038157",
    "build": "6a0c387457a6dbc1b35091762c24afdd2c3453fe09eeceeb7e966136f832ddc0",
    "run": "a87502a00b99224d9733ec81e909efa1c07c616242b47c692d366015393ad194",
    # The thread that stores the replies: it notices the stop once a second.
    "put_message_into_state":
        "3622eb5bfcd9cd1a4cef3b1d5b8250a07af41a9439ea0379e0459d62e6fa5b35",
}


def source_sha256(fn: Callable[..., Any]) -> str:
    """SHA-256 of a function's source text."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def _vce_api() -> Any | None:
    try:
        import flwr
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        log.warning("Flower's simulation engine module moved; keeping Flower's own functions")
        return None
    if flwr.__version__ != FLOWER_VERSION:
        log.warning("Flower %s is installed; the engine patches were written for %s: keeping "
                    "Flower's own functions", flwr.__version__, FLOWER_VERSION)
        return None
    return vce_api


def guarded_original(module: Any, name: str) -> Callable[..., Any] | None:
    """``module.name`` (a module or a class) when its source matches :data:`SOURCE_SHA256`;
    else None (warned)."""
    original = getattr(module, name, None)
    if original is None or getattr(original, "_liquid_fed_patch", False):
        return None
    try:
        digest = source_sha256(original)
    except (OSError, TypeError):
        digest = ""
    if digest != SOURCE_SHA256[name]:
        log.warning("Flower's %s changed (source hash %s...); keeping Flower's own function",
                    name, digest[:12])
        return None
    return original


def take_all_undelivered(state: Any, nodes: Any) -> list[Any] | None:
    """Every message of ``state`` not yet delivered and addressed to one of ``nodes``, marked
    delivered, in one pass over the store; None when ``state`` is not the LinkState this was
    written for (then the caller asks node by node, as Flower does).

    What ``InMemoryLinkState.get_message_ins(node_id, limit=None)`` does for one node — drop
    expired or orphaned messages (``_check_stored_messages``), take the undelivered ones in
    the order they were stored, stamp ``delivered_at`` — for all nodes under one lock.
    """
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    check = getattr(state, "_check_stored_messages", None)
    if not (isinstance(store, dict) and lock is not None and callable(check)
            and _same_source(type(state), "get_message_ins")):
        return None
    from flwr.supercore.date import now

    with lock:
        ids = {mid for mid, msg in store.items()
               if msg.metadata.delivered_at == "" and msg.metadata.dst_node_id in nodes}
        if not ids:
            return []
        check(ids)
        taken = [msg for mid, msg in store.items()
                 if mid in ids and msg.metadata.delivered_at == ""]
        stamp = now().isoformat()
        for msg in taken:
            msg.metadata.delivered_at = stamp
    return taken


def _same_source(cls: type, name: str) -> bool:
    """Whether ``cls.name`` is the Flower function :data:`SOURCE_SHA256` knows
    (:func:`guarded_original`, which warns when not; asked once per class)."""
    key = (cls, name)
    if key not in _SOURCE_OK:
        _SOURCE_OK[key] = guarded_original(cls, name) is not None
    return _SOURCE_OK[key]


_SOURCE_OK: dict[tuple[type, str], bool] = {}


#: Seconds between polls of the dispatch loop while it waits for the server's push event
#: (Flower's own loop polls every 0.1 s).
IDLE_POLL = 0.1


def make_dispatch_loop(max_wait: float, min_wait: float = 0.0005, batching: Any = None):
    """Flower's dispatch loop, taking every undelivered message in one pass
    (:func:`take_all_undelivered`) where the LinkState allows it, else one message per node
    per poll as Flower does; it wakes when the server has pushed messages
    (:func:`server.app.push_event`), and otherwise (a state without the event) polls after
    ``min_wait``, doubling to ``max_wait`` while idle. With ``batching`` (a
    :class:`simulations.batching.Batching` whose workers are installed) what one pass took
    goes to the workers' own queues, one list per worker, each node to the same worker
    every time."""

    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any,
                              f_stop: threading.Event) -> None:
        from server.app import push_event

        pushed = push_event(state)  # set after each whole push of the server's
        wait = min_wait
        while not f_stop.is_set():
            if batching is not None and not batching.ready():
                f_stop.wait(min_wait)  # the workers are starting: nowhere to put messages yet
                continue
            if pushed is not None:
                pushed.clear()  # before the take: a push after it sets the event again
            taken = take_all_undelivered(state, nodes_mapping)
            if taken is None:
                taken = [msg for node_id in nodes_mapping.keys()
                         for msg in state.get_message_ins(node_id=node_id, limit=1)]
            if batching is not None:
                batching.route(taken, nodes_mapping)
            else:
                for msg in taken:
                    queue.put(msg)
            wait = min_wait if taken else min(wait * 2, max_wait)
            if taken:
                continue
            if pushed is not None:
                # Woken by the push; polling only for messages stored otherwise (and to see
                # a stop), seldom: a poll in the middle of a push would split it.
                pushed.wait(IDLE_POLL)
            else:
                f_stop.wait(wait)
        if batching is not None:
            batching.stop()  # the workers end now, not at their next second's check

    add_messages_to_queue._liquid_fed_patch = True  # type: ignore[attr-defined]
    return add_messages_to_queue


def install_dispatch_loop(max_wait: float, batch: bool = False) -> tuple[bool, bool]:
    """Replace Flower's dispatch loop and, with ``batch``, its workers and client actor class
    (:mod:`simulations.batching`); each stays Flower's (warned) when it does not fit.

    Returns:
        Whether the dispatch loop and whether batched delivery are installed.
    """
    if max_wait <= 0:
        return False, False
    vce_api = _vce_api()
    if vce_api is None or guarded_original(vce_api, "add_messages_to_queue") is None:
        return False, False
    batching = install_batching(vce_api) if batch else None
    vce_api.add_messages_to_queue = make_dispatch_loop(max_wait, batching=batching)
    if guarded_original(vce_api, "put_message_into_state") is not None:
        vce_api.put_message_into_state = put_message_into_state
    return True, batching is not None


def put_message_into_state(state: Any, queue: Queue, f_stop: threading.Event) -> None:
    """Flower's thread that stores the clients' replies in the LinkState, checking for the
    stop every :data:`IDLE_POLL` seconds instead of every second (the end of every run
    waited up to a second for it)."""
    while not f_stop.is_set():
        try:
            reply = queue.get(timeout=IDLE_POLL)
        except Empty:
            continue
        state.store_message_res(reply)


put_message_into_state._liquid_fed_patch = True  # type: ignore[attr-defined]


def install_batching(vce_api: Any) -> Any:
    """Swap Flower's worker threads for :func:`simulations.batching.make_worker` and its
    client actor class for one with ``run_batch``; the shared
    :class:`~simulations.batching.Batching`, or None (Flower's kept) when a function they
    stand in for or rely on changed."""
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    if (guarded_original(vce_api, "worker") is None
            or guarded_original(raybackend.RayBackend, "build") is None
            or guarded_original(VirtualClientEngineActor, "run") is None):
        return None
    from simulations import batching

    shared = batching.Batching()
    vce_api.worker = batching.make_worker(shared)
    raybackend.ClientAppActor = batching.RemoteBatchActor
    return shared


class RuntimeWatch:
    """What the wrapped ``run_api`` saw: the runtime's stop event and the error that ended it."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.stop: threading.Event | None = None
        self.done = False

    def reason(self) -> str | None:
        """Why the runtime stopped, or None while it runs (or before it started)."""
        if self.error is not None:
            return self.error
        if self.done or (self.stop is not None and self.stop.is_set()):
            return "the runtime stopped (its stop event is set)"
        return None


#: The watch of this process's simulation runtime (one per process: one simulation per child).
WATCH = RuntimeWatch()


def install_runtime_watch(watch: RuntimeWatch = WATCH) -> bool:
    """Wrap Flower's ``run_api`` so that ``watch`` learns when and why the runtime ended."""
    vce_api = _vce_api()
    original = None if vce_api is None else guarded_original(vce_api, "run_api")
    if original is None:
        return False

    def run_api(*args: Any, **kwargs: Any) -> None:
        stop = kwargs.get("f_stop", args[5] if len(args) > 5 else None)
        watch.stop = stop if isinstance(stop, threading.Event) else None
        try:
            original(*args, **kwargs)
        except BaseException as exc:
            cause = exc.__cause__ or exc
            watch.error = f"{type(cause).__name__}: {cause}"
            raise
        finally:
            watch.done = True

    run_api._liquid_fed_patch = True  # type: ignore[attr-defined]
    vce_api.run_api = run_api
    return True
