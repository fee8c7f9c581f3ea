"""A faster dispatch loop for Flower's simulation engine (flwr 1.41).

Flower's simulation engine moves the server's messages to the Ray actors in
``vce_api.add_messages_to_queue``, which checks for new messages every 0.1 s: on average 50 ms
of dead time per round, most of a round's cost for small experts
(``simulations/bench_federation.py`` measures it). :func:`install_dispatch_loop` swaps in the
same loop with a short poll that backs off while idle. It is applied only when Flower's
function has exactly the signature it replaces; otherwise Flower's own loop stays.
"""

from __future__ import annotations

import inspect
import logging
import threading
from queue import Queue
from typing import Any

log = logging.getLogger(__name__)

_EXPECTED = ["state", "queue", "nodes_mapping", "f_stop"]


def make_dispatch_loop(max_wait: float, min_wait: float = 0.0005):
    """Flower's dispatch loop, polling after ``min_wait`` and doubling to ``max_wait`` idle."""

    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: Any,
                              f_stop: threading.Event) -> None:
        wait = min_wait
        while not f_stop.is_set():
            found = False
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
                    found = True
            wait = min_wait if found else min(wait * 2, max_wait)
            f_stop.wait(wait)

    return add_messages_to_queue


def install_dispatch_loop(max_wait: float) -> bool:
    """Replace Flower's dispatch loop; False (and Flower's loop kept) when it does not fit."""
    if max_wait <= 0:
        return False
    try:
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        log.warning("Flower's simulation engine module moved; keeping its dispatch loop")
        return False
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or list(inspect.signature(original).parameters) != _EXPECTED:
        log.warning("Flower's dispatch loop changed; keeping it (0.1 s poll)")
        return False
    vce_api.add_messages_to_queue = make_dispatch_loop(max_wait)
    return True
