"""The replacement dispatch loop of Flower's simulation engine."""

from __future__ import annotations

import threading
import time
from queue import Queue
from types import SimpleNamespace

from flwr.server.superlink.fleet.vce import vce_api

from simulations.engine import install_dispatch_loop, make_dispatch_loop


class _State:
    """Hands out queued messages per node, one per call, like Flower's LinkState."""

    def __init__(self) -> None:
        self.pending: dict[int, list[str]] = {1: [], 2: []}
        self.calls = 0

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        self.calls += 1
        out, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
        return out


def test_loop_forwards_every_message_quickly_and_backs_off_when_idle() -> None:
    state, queue, stop = _State(), Queue(), threading.Event()
    loop = make_dispatch_loop(max_wait=0.02)
    worker = threading.Thread(target=loop, args=(state, queue, {1: 0, 2: 1}, stop))
    worker.start()
    time.sleep(0.3)  # idle: the wait has grown to max_wait
    idle_calls = state.calls
    assert idle_calls < 2 * (0.3 / 0.02 + 12)  # ~doubling from 0.5 ms, then every 20 ms
    t0 = time.monotonic()
    state.pending[1] += ["a", "b"]
    state.pending[2] += ["c"]
    got = [queue.get(timeout=2) for _ in range(3)]
    latency = time.monotonic() - t0
    stop.set()
    worker.join(timeout=2)
    assert sorted(got) == ["a", "b", "c"]
    assert latency < 2.0  # forwarded while polling (speed itself: benchmarks/bench_federation)
    assert not worker.is_alive()


def test_install_replaces_flowers_loop_only_when_asked() -> None:
    original, injector = vce_api.add_messages_to_queue, vce_api.put_message_into_state
    try:
        assert install_dispatch_loop(0) == (False, False)
        assert vce_api.add_messages_to_queue is original
        assert install_dispatch_loop(0.005) == (True, False)
        assert vce_api.add_messages_to_queue is not original
    finally:
        vce_api.add_messages_to_queue = original
        vce_api.put_message_into_state = injector


def test_the_reply_injector_stores_every_reply_and_ends_on_the_stop() -> None:
    from simulations import engine

    original = vce_api.put_message_into_state
    assert engine.source_sha256(original) == engine.SOURCE_SHA256["put_message_into_state"]
    stored, queue, stop = [], Queue(), threading.Event()
    state = SimpleNamespace(store_message_res=stored.append)
    thread = threading.Thread(target=engine.put_message_into_state, args=(state, queue, stop))
    thread.start()
    for reply in ("r1", "r2"):
        queue.put(reply)
    deadline = time.monotonic() + 5
    while len(stored) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=5)
    assert stored == ["r1", "r2"] and not thread.is_alive()
    loop = vce_api.add_messages_to_queue
    try:  # installed with the dispatch loop
        install_dispatch_loop(0.005)
        assert vce_api.put_message_into_state is engine.put_message_into_state
    finally:
        vce_api.put_message_into_state = original
        vce_api.add_messages_to_queue = loop


def test_patches_are_keyed_on_flowers_version_and_the_replaced_source(monkeypatch, caplog) -> None:
    import flwr

    from simulations import engine

    original = vce_api.add_messages_to_queue
    assert engine.source_sha256(original) == engine.SOURCE_SHA256["add_messages_to_queue"]
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    assert install_dispatch_loop(0.005) == (False, False)
    assert vce_api.add_messages_to_queue is original
    assert "written for 1.41.0" in caplog.text
    monkeypatch.setattr(flwr, "__version__", engine.FLOWER_VERSION)

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):  # same signature, new body
        return None

    monkeypatch.setattr(vce_api, "add_messages_to_queue", add_messages_to_queue)
    # The old test accepted any matching signature.
    assert install_dispatch_loop(0.005) == (False, False)
    assert vce_api.add_messages_to_queue is add_messages_to_queue
    assert "add_messages_to_queue changed" in caplog.text


def test_runtime_watch_reports_why_flowers_runtime_ended(monkeypatch) -> None:
    from flwr.server.superlink.fleet.vce.vce_api import run_api

    from simulations import engine

    monkeypatch.setattr(vce_api, "run_api", run_api)
    watch = engine.RuntimeWatch()
    assert engine.install_runtime_watch(watch) is True
    stop = threading.Event()

    def broken_backend():
        raise OSError("no Ray for you")

    assert watch.reason() is None
    try:
        vce_api.run_api(lambda: None, broken_backend, {}, None, {}, stop, None)
    except RuntimeError as exc:  # Flower's own wrapping: "Simulation Runtime crashed."
        assert "crashed" in str(exc)
    else:
        raise AssertionError("Flower's run_api swallowed the failure")
    assert watch.reason() == "OSError: no Ray for you"
    assert stop.is_set()


class _SilentGrid:
    """A grid whose nodes never answer: what the server sees when the runtime is gone."""

    def push_messages(self, msgs):
        return [f"m{i}" for i, _ in enumerate(msgs)]

    def pull_messages(self, ids):
        return []


def test_a_dead_runtime_ends_the_wait_at_once_with_its_reason() -> None:
    from types import SimpleNamespace

    import pytest

    from liquid_fed.errors import ClientFailure
    from server.app import exchange_messages

    message = SimpleNamespace(metadata=SimpleNamespace(dst_node_id=7))  # to node 7
    t0 = time.monotonic()
    with pytest.raises(ClientFailure, match=r'runtime stopped while the server waited .* s for '
                                            r'replies to "train": OSError: boom'):
        exchange_messages(_SilentGrid(), [message], timeout=600, poll=0.01,
                          health=lambda: "OSError: boom", kind="train")
    assert time.monotonic() - t0 < 60  # not the 600 s timeout
    replies, waited = exchange_messages(_SilentGrid(), [message], timeout=0.2, poll=0.01)
    assert replies == {} and 0.2 <= waited < 60  # the caller reports how long it really waited


class _StoringState(_State):
    """A LinkState whose ``store_message_ins`` the server calls (the dispatch loop wraps it)."""

    def store_message_ins(self, node_id: int, msg: str) -> str:
        self.pending[node_id].append(msg)
        return msg


def test_a_push_wakes_the_idle_dispatch_loop_at_once(monkeypatch) -> None:
    from server.app import push_event
    from simulations import engine

    monkeypatch.setattr(engine, "IDLE_POLL", 2.0)  # idle, it would sleep 2 s between polls
    state, queue, stop = _StoringState(), Queue(), threading.Event()
    loop = make_dispatch_loop(max_wait=0.005)
    worker = threading.Thread(target=loop, args=(state, queue, {1: 0, 2: 1}, stop))
    worker.start()
    time.sleep(1.0)
    calls = state.calls
    assert calls <= 2  # one poll (2 nodes) on start, then asleep: no 5 ms polling
    t0 = time.monotonic()
    state.store_message_ins(2, "x")
    push_event(state).set()  # what the server does after a push
    got = queue.get(timeout=3)
    latency = time.monotonic() - t0
    stop.set()
    push_event(state).set()  # a stop is seen at the next wake
    worker.join(timeout=3)
    assert got == "x"
    assert latency < 0.5  # woken, not the 2 s poll it was sleeping
    assert state.calls - calls <= 6  # a few polls (2 nodes each), no busy polling
    assert not worker.is_alive()


def test_a_push_reaches_each_worker_as_one_list() -> None:
    from server.app import push_event
    from simulations.batching import Batching

    class _Msg(SimpleNamespace):
        def __init__(self, node: int) -> None:
            super().__init__(metadata=SimpleNamespace(dst_node_id=node))

    batching = Batching()
    backend = SimpleNamespace(pool=SimpleNamespace(pool=["actor-0", "actor-1"]), num_workers=2)
    (q0, _), (q1, _) = batching.register(backend), batching.register(backend)
    state, queue, stop = _StoringState(), Queue(), threading.Event()
    state.pending = {n: [] for n in range(5)}
    for n in range(5):  # a whole push, stored before the loop's first take
        state.store_message_ins(n, _Msg(n))
    push_event(state).set()
    loop = make_dispatch_loop(max_wait=0.005, batching=batching)
    worker = threading.Thread(target=loop, args=(state, queue, {n: n for n in range(5)}, stop))
    worker.start()
    got = [q0.get(timeout=3), q1.get(timeout=3)]
    stop.set()
    push_event(state).set()
    worker.join(timeout=3)
    assert [[m.metadata.dst_node_id for m in g] for g in got] == [[0, 1, 2], [3, 4]]
    assert queue.empty()  # Flower's queue is not used
    # At the stop the loop wakes each worker with a None, and sends nothing else.
    assert (q0.get_nowait(), q1.get_nowait()) == (None, None) and q0.empty() and q1.empty()


def test_the_server_wakes_when_a_reply_lands() -> None:
    from server.app import exchange_messages

    class Grid:
        """Replies land (store_message_res) 0.3 s after the push, from another thread."""

        def __init__(self) -> None:
            self.state = SimpleNamespace(store_message_res=self._store)
            self.replies: list = []
            self.pulls = 0

        def _store(self, reply) -> None:
            self.replies.append(reply)

        def push_messages(self, msgs):
            def land() -> None:
                time.sleep(0.3)
                for i in range(len(msgs)):
                    self.state.store_message_res(SimpleNamespace(
                        metadata=SimpleNamespace(reply_to_message_id=f"m{i}")))
            threading.Thread(target=land).start()
            return [f"m{i}" for i in range(len(msgs))]

        def pull_messages(self, ids):
            self.pulls += 1
            out, self.replies = self.replies, []
            return out

    grid = Grid()
    msgs = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in (7, 8)]
    replies, waited = exchange_messages(grid, msgs, timeout=10.0, poll=5.0)  # a 5 s poll...
    assert sorted(replies) == [7, 8]
    assert 0.3 <= waited < 1.0  # ...not slept through: the stored reply woke the server
    assert grid.pulls <= 4


def test_ray_shutdown_signals_the_daemons_together_but_the_gcs_and_the_reaper(monkeypatch
                                                                               ) -> None:
    import subprocess
    import sys

    import ray._private.worker as ray_worker
    from ray._private import ray_constants

    from simulations.simulate import hasten_ray_shutdown

    kinds = [ray_constants.PROCESS_TYPE_RAYLET, ray_constants.PROCESS_TYPE_GCS_SERVER,
             ray_constants.PROCESS_TYPE_LOG_MONITOR, ray_constants.PROCESS_TYPE_REAPER]
    procs = {kind: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for kind in kinds}
    seen: dict[str, int | None] = {}

    def kill_all_processes(check_alive=True, allow_graceful=False, wait=False):
        for kind, proc in procs.items():  # what Ray's own sequence finds when it starts
            try:
                seen[kind] = proc.wait(timeout=10) if kind in (kinds[0], kinds[2]) else (
                    proc.poll())
            except subprocess.TimeoutExpired:
                seen[kind] = None
            proc.kill()
            proc.wait()

    node = SimpleNamespace(head=True, kill_all_processes=kill_all_processes,
                           all_processes={k: [SimpleNamespace(process=p)]
                                          for k, p in procs.items()})
    try:
        monkeypatch.setattr(ray_worker, "_global_node", node, raising=False)
        assert hasten_ray_shutdown() is True
        assert hasten_ray_shutdown() is True  # wrapped once
        node.kill_all_processes(check_alive=False, allow_graceful=True)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    # The raylet and the log monitor had their SIGTERM before Ray's sequence; the GCS and the
    # reaper were left to it, still running.
    assert seen[kinds[0]] == -15 and seen[kinds[2]] == -15
    assert seen[kinds[1]] is None and seen[kinds[3]] is None
    # A driver that joined a cluster started nothing: no wrapper.
    monkeypatch.setattr(ray_worker, "_global_node",
                        SimpleNamespace(head=False, all_processes={}), raising=False)
    assert hasten_ray_shutdown() is False
