"""How the server reaches its clients: the :class:`Transport` protocol and an in-process one.

Flower's Grid is the transport of real runs (``server/app.py``: ``GridTransport``);
:class:`LocalTransport` runs the exact client code in this process, for tests, benchmarks and
studies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from liquid_fed.federation.client import SETUP_KEYS, handle_client_message
from liquid_fed.federation.state import Arrays


def payload_bytes(arrays: Arrays, settings: dict[str, Any] | None = None) -> int:
    """Bytes a message carries: array data plus the text of its settings."""
    total = sum(int(np.asarray(a).nbytes) for a in arrays.values())
    if settings:
        total += sum(len(str(k)) + len(str(v)) for k, v in settings.items())
    return total


@dataclass(frozen=True)
class NoReply:
    """What stands in a transport's answer for a client that did not reply.

    Attributes:
        cause: ``timeout`` (no reply within ``federation.reply_timeout``: crashed, hung or
            unreachable), ``error`` (the client's process raised or died on the message) or
            ``bad_reply`` (a reply the transport could not read; ``federation.on_bad_reply``
            decides, as for a reply that fails the server's checks).
        reason: the transport's own words, naming the client.
    """

    cause: str
    reason: str


Reply = tuple[Arrays, dict[str, Any]]


class Transport(Protocol):
    """How the server reaches its K clients (Flower's Grid, or in-process for tests)."""

    def exchange(self, kind: str, arrays: Sequence[Arrays],
                 settings: Sequence[dict[str, Any]]) -> list[Reply | NoReply]:
        """Send one message per client (list index = client index); replies in that order,
        a :class:`NoReply` for each client that did not answer.

        A round that some parties miss (``availability``) calls it with the keyword
        ``clients``: the indices of the clients the messages go to, in order; the others get
        no message."""
        ...


def describe_client(transport: Transport, k: int) -> str:
    """How errors name client ``k``: the transport's own words (e.g. with its node id)."""
    describe = getattr(transport, "describe", None)
    return describe(k) if describe is not None else f"client {k}"


class LocalTransport:
    """Clients as in-process state dicts; runs the exact client code without Flower.

    Injected faults (setting ``fault``): ``crash`` and ``hang`` leave the client as it was and
    give a :class:`NoReply` (a process that dies or blocks before replying); ``nan`` runs in
    the client code. :meth:`restart` forgets a client's state, as a restarted process would.

    Args:
        n_clients: K.
        data_dirs: optionally, each client's private shard folder (what a deployed node's
            ``data-dir`` node config gives it): the client then reads its data and keeps its
            checkpoints there.
    """

    def __init__(self, n_clients: int, data_dirs: Sequence[str | Path] | None = None) -> None:
        self.states: list[Arrays] = [{} for _ in range(n_clients)]
        self.settings: list[dict[str, Any]] = [{} for _ in range(n_clients)]
        self.local = [{"data_dir": str(d)} for d in data_dirs] if data_dirs else (
            [{} for _ in range(n_clients)])

    def exchange(self, kind: str, arrays: Sequence[Arrays], settings: Sequence[dict[str, Any]],
                 clients: Sequence[int] | None = None) -> list[Reply | NoReply]:
        replies: list[Reply | NoReply] = []
        clients = range(len(self.states)) if clients is None else clients
        for k, a, s in zip(clients, arrays, settings, strict=True):
            if s.get("fault") in ("crash", "hang"):
                cause = "error" if s["fault"] == "crash" else "timeout"
                replies.append(NoReply(cause, f'client {k}: injected {s["fault"]} on "{kind}"'))
                continue
            merged = {**self.settings[k], **s, **self.local[k]}
            reply, info, self.states[k] = handle_client_message(kind, a, merged, self.states[k])
            if kind == "setup":
                self.settings[k] = {key: merged[key] for key in SETUP_KEYS}
            replies.append((reply, info))
        return replies

    def restart(self, k: int) -> None:
        """Client ``k`` loses everything it held in memory (a restarted process)."""
        self.states[k] = {}
        self.settings[k] = {}
