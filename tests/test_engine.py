"""The replacement dispatch loop of Flower's simulation engine."""

from __future__ import annotations

import threading
import time
from queue import Queue

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
    assert latency < 0.1  # Flower's own loop waits up to 0.1 s per poll
    assert not worker.is_alive()


def test_install_replaces_flowers_loop_only_when_asked() -> None:
    original = vce_api.add_messages_to_queue
    try:
        assert install_dispatch_loop(0) is False
        assert vce_api.add_messages_to_queue is original
        assert install_dispatch_loop(0.005) is True
        assert vce_api.add_messages_to_queue is not original
    finally:
        vce_api.add_messages_to_queue = original
