"""Flower ServerApp: holds the labels, solves the delegation graph, drives the rounds.

A thin adapter: :class:`GridTransport` turns the protocol's exchanges into Flower messages, and
:func:`liquid_fed.runs.run_federated` does the rest. ``liquid-fed run`` builds the app with
:func:`make_server_app` around a resolved config; ``flwr run .`` (simulation or deployment)
uses the module-level ``app``, which reads the config from the run config: ``config`` (a YAML
path) plus optional dotted overrides in ``set``, e.g. ``--run-config
'config="configs/quickstart.yaml" set="train.epochs=2"'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from clients import fastpath
from clients.codec import MESSAGE_TYPES, decode, encode
from liquid_fed import rundir
from liquid_fed.config import RunConfig, load_config
from liquid_fed.errors import ClientFailure
from liquid_fed.federation import RoundInfo, ServerData
from liquid_fed.federation.transport import NoReply, Reply
from liquid_fed.procs import PROGRESS_ENV
from liquid_fed.rundir import RunLock
from liquid_fed.runs import run_federated
from liquid_fed.shards import load_server_shard

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parent.parent  # the Flower App: pyproject.toml, configs/
#: The exchanges that wait ``federation.setup_timeout``: a client's start is in them.
SETUP_KINDS = ("hello", "setup")


class GridTransport:
    """The protocol's exchanges over a Flower Grid; client index = node's partition-id.

    A client that missed an exchange may come back as another node (a restarted SuperNode
    without an auth key registers anew; with one it keeps its node id): before the next
    exchange, a node that was not there before is asked its partition-id once, and takes the
    place of a missing client with that partition-id whose node is offline. A node naming a
    partition whose node is online is never given it (logged, asked again later).
    """

    def __init__(self, grid: Grid, n_clients: int, timeout: float, threads: int = 1,
                 wait: float = 120.0, poll: float = 0.15,
                 health: Callable[[], str | None] | None = None,
                 setup_timeout: float | None = None) -> None:
        self.grid = grid
        self.timeout = timeout
        # A client's first messages include its start (imports, data, expert): they may wait
        # longer than a round's reply.
        self.setup_timeout = max(timeout, setup_timeout or 0.0)
        self.threads = threads
        self.poll = poll
        self.health = health
        self.round = 0
        self.n_clients = n_clients
        self.missed: set[int] = set()  # clients without a reply to their last message
        self.partitions: dict[int, Any] = {}  # node -> partition-id it named (asked once)
        self.refused: set[int] = set()  # nodes told off for naming a live partition
        self.wait = wait
        self.nodes: list[int] = []

    def connect(self) -> None:
        """Wait for the nodes and map client indices to them (:meth:`_assign`); done by the
        first exchange, so that the server prepares its data while the nodes start (in a
        simulation Ray starts the client actors meanwhile).

        Raises:
            ClientFailure: fewer nodes than clients within ``wait`` seconds, or nodes whose
                partition-ids do not name every client once.
        """
        n_clients, grid = self.n_clients, self.grid
        deadline = time.monotonic() + self.wait
        nodes = sorted(grid.get_node_ids())
        pause = 0.02  # doubling to 0.5 s: the simulation's nodes register within milliseconds
        while len(nodes) < n_clients and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(2 * pause, 0.5)
            nodes = sorted(grid.get_node_ids())
        if len(nodes) < n_clients:
            raise ClientFailure(
                f"{len(nodes)} nodes connected within {self.wait:.0f} s but the config needs "
                f"{n_clients} (views.n_views)"
            )
        self.nodes = self._assign(nodes, n_clients)

    def _assign(self, nodes: list[int], n_clients: int) -> list[int]:
        """Map client index -> node id by each node's ``partition-id``.

        Nodes without any ``partition-id`` are taken in node order; when some node names one,
        every client index must be named by exactly one node, or the run stops: clients that
        hold private data must never be silently swapped.
        """
        replies = self._send_raw("hello", nodes, [{} for _ in nodes], [{} for _ in nodes])
        for node, reply in zip(nodes, replies, strict=True):
            if isinstance(reply, NoReply):
                raise ClientFailure(f'node {node} did not answer "hello": {reply.reason}')
        parts = {node: info.get("partition_id") for node, (_, info) in zip(nodes, replies,
                                                                              strict=True)}
        if all(p is None for p in parts.values()):
            if len(nodes) != n_clients:
                raise ClientFailure(f"{len(nodes)} nodes are connected for {n_clients} clients "
                                    "and none names its partition-id")
            return nodes
        by_partition: dict[int, int] = {}
        for node, part in parts.items():
            if not _is_partition(part, n_clients):
                raise ClientFailure(f"node {node} has partition-id {part!r}; accepted: integers "
                                    f"0..{n_clients - 1} (one per client, views.n_views)")
            if part in by_partition:
                raise ClientFailure(f"nodes {by_partition[part]} and {node} both have "
                                    f"partition-id {part}; each client index needs one node")
            by_partition[part] = node
        missing = [k for k in range(n_clients) if k not in by_partition]
        if missing:
            raise ClientFailure(f"no node has partition-id {missing[0]} "
                                f"({len(missing)} client indices unassigned)")
        return [by_partition[k] for k in range(n_clients)]

    def describe(self, k: int) -> str:
        """How errors name client ``k``."""
        return f"client {k} (node {self.nodes[k]})" if k < len(self.nodes) else f"client {k}"

    def _send_raw(self, kind: str, nodes: Sequence[int], arrays: Sequence[dict],
                  settings: Sequence[dict],
                  clients: Sequence[int] | None = None) -> list[Reply | NoReply]:
        self.round += 1
        msgs = [Message(encode(a, s), dst_node_id=node, message_type=MESSAGE_TYPES[kind],
                        group_id=str(self.round))
                for node, a, s in zip(nodes, arrays, settings, strict=True)]
        timeout, key = ((self.setup_timeout, "setup_timeout") if kind in SETUP_KINDS
                        else (self.timeout, "reply_timeout"))
        replies, waited = exchange_messages(self.grid, msgs, timeout, self.poll, self.health,
                                            kind)
        out: list[Reply | NoReply] = []
        names = range(len(nodes)) if clients is None else clients  # how errors name them
        for k, node in zip(names, nodes, strict=True):
            reply = replies.get(node)
            if reply is None:
                out.append(NoReply("timeout", f'client {k} (node {node}) sent no reply to '
                                              f'"{kind}" within {waited:.1f} s '
                                              f"(federation.{key} = {timeout:g} s)"))
            elif reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                out.append(NoReply("error", f'client {k} (node {node}) is offline on "{kind}": '
                                            "its SuperNode signed off or its heartbeats stopped "
                                            "(stopped, killed or unreachable)"))
            elif reply.has_error():
                out.append(NoReply("error", f'client {k} (node {node}) failed on "{kind}": '
                                            f"{reply.error.reason}"))
            else:
                try:
                    out.append(decode(reply.content))
                except (ValueError, KeyError, TypeError) as exc:  # written by no client of ours
                    out.append(NoReply("bad_reply", f'client {k} (node {node}) sent an '
                                                    f'unreadable reply to "{kind}": {exc}'))
        return out

    def exchange(self, kind: str, arrays: Sequence[dict], settings: Sequence[dict],
                 clients: Sequence[int] | None = None) -> list[Reply | NoReply]:
        if not self.nodes:
            self.connect()
        if kind == "setup":
            settings = [{**s, "threads": self.threads} for s in settings]
        if self.missed:
            self._replace_missing_nodes()
        clients = range(len(self.nodes)) if clients is None else clients
        nodes = [self.nodes[k] for k in clients]
        replies = self._send_raw(kind, nodes, arrays, settings, clients)
        for k, reply in zip(clients, replies, strict=True):
            if isinstance(reply, NoReply):
                self.missed.add(k)
            else:
                self.missed.discard(k)
        return replies

    def _replace_missing_nodes(self) -> None:
        """Give a missing client's index to a new node that names its partition-id, if the
        client's own node is offline (see the class's docstring)."""
        online = set(self.grid.get_node_ids())
        new = sorted(n for n in online if n not in self.nodes and n not in self.partitions)
        if new:
            replies = self._send_raw("hello", new, [{} for _ in new], [{} for _ in new])
            for node, reply in zip(new, replies, strict=True):
                # No answer within federation.setup_timeout: not a party's node, for good.
                self.partitions[node] = (None if isinstance(reply, NoReply)
                                         else reply[1].get("partition_id"))
        for node in sorted(n for n in online if n not in self.nodes and n in self.partitions):
            k = self.partitions[node]
            if not _is_partition(k, self.n_clients):
                continue  # refused for good: no such client index
            if k in self.missed and self.nodes[k] not in online:
                log.warning("client %d: node %d takes the place of node %d (offline), naming "
                            "partition-id %d", k, node, self.nodes[k], k)
                self.nodes[k] = node
            elif node not in self.refused:  # said once per node
                self.refused.add(node)
                log.warning("node %d names partition-id %d, which node %d holds and is "
                            "online: refused", node, k, self.nodes[k])


def _is_partition(part: Any, n_clients: int) -> bool:
    """A node's ``partition-id`` names a client index: an integer in ``0..n_clients - 1``."""
    return isinstance(part, int) and not isinstance(part, bool) and 0 <= part < n_clients


#: Seconds between two pulls per message still awaited (see :func:`exchange_messages`).
PULL_SECONDS_PER_PENDING = 1e-4
#: Longest single wait for a reply: the runtime's health and the timeout are checked this often.
WAIT_SLICE = 0.5


def store_event(state: Any, method: str) -> threading.Event | None:
    """An Event set each time ``state.<method>`` stores a message, or None when ``state``
    has no such method (a deployment's Grid holds no LinkState: it is polled).

    The simulation's Grid and its engine share one in-memory LinkState: wrapping its
    ``store_message_res`` on the instance lets the server wake when a reply lands instead of
    sleeping a poll interval each (the engine's dispatch loop wakes on :func:`push_event`).
    Installed once per state and method.
    """
    original = getattr(state, method, None)
    if state is None or not callable(original):
        return None
    events = state.__dict__.setdefault("_liquid_fed_events", {})
    if method not in events:
        event = threading.Event()

        def store(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                event.set()

        setattr(state, method, store)
        events[method] = event
    return events[method]


def push_event(state: Any) -> threading.Event | None:
    """An Event the server sets after each push of a batch of messages into ``state`` (the
    simulation's in-memory LinkState), or None without one (a deployment's Grid): the
    engine's dispatch loop waits on it, so that it takes a whole push at once rather than
    the first messages stored of it."""
    if state is None:
        return None
    return state.__dict__.setdefault("_liquid_fed_events", {}).setdefault(
        "pushed", threading.Event())


def exchange_messages(grid: Grid, msgs: Sequence[Message], timeout: float, poll: float,
                      health: Callable[[], str | None] | None = None,
                      kind: str = "") -> tuple[dict[int, Message], float]:
    """Push ``msgs``, then pull their replies every ``poll`` seconds (longer while many are
    pending: :data:`PULL_SECONDS_PER_PENDING` each) until all have come,
    ``timeout`` seconds have passed, or ``health()`` names a reason to stop (the simulation
    runtime crashed): that ends the wait at once with the runtime's reason.

    Returns:
        Replies by the node each message went to, and the seconds waited.
    """
    t0 = time.monotonic()
    state = getattr(grid, "state", None)
    landed = store_event(state, "store_message_res")
    ids = list(grid.push_messages(msgs))
    pushed = push_event(state)
    if pushed is not None:
        pushed.set()
    # Matched by the message they answer, not by sender: for a node it lost, the SuperLink
    # answers itself (an error signed with its own node id).
    dst = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, msgs, strict=True)
           if mid is not None}
    pending = set(dst)
    replies: dict[int, Message] = {}
    while pending:
        if landed is not None:
            landed.clear()  # before the pull: a reply stored after it sets the event again
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                replies[dst[mid]] = reply
                pending.discard(mid)
        if not pending:
            break
        waited = time.monotonic() - t0
        reason = health() if health is not None else None
        if reason:
            raise ClientFailure(f'the simulation runtime stopped while the server waited '
                                f'{waited:.1f} s for replies to "{kind}": {reason}')
        if waited >= timeout:
            break
        # Each pull checks every pending message: while many are out, let replies gather
        # before the next pull (the last ones are still seen within a few ms), so that polling
        # never takes the CPU the clients' actors need (at 64 clients a 1 ms poll kept a core
        # busy). In simulation a stored reply wakes the wait at once.
        gather = PULL_SECONDS_PER_PENDING * len(pending)
        if landed is None:
            time.sleep(max(poll, gather))
        else:
            landed.wait(min(WAIT_SLICE, max(timeout - waited, 0.0)))
            if gather > poll:
                time.sleep(gather)
    return replies, time.monotonic() - t0


def serve(grid: Grid, cfg: RunConfig, run_dir: str | Path, resume: bool = False,
          stop_after: int | None = None, on_round: Callable[[RoundInfo], None] | None = None,
          extra: dict[str, Any] | None = None,
          health: Callable[[], str | None] | None = None,
          server_data: ServerData | None = None) -> dict[str, Any] | None:
    """Run the whole federation on ``grid``."""
    # The simulation Grid lives in this process: poll it often. A deployment's SuperLink is
    # reached over HTTP: every 0.15 s instead of Flower's fixed 3 s.
    poll = cfg.simulation.pull_interval if hasattr(grid, "pull_interval") else 0.15
    transport = GridTransport(grid, cfg.n_clients, cfg.federation.reply_timeout,
                              cfg.simulation.threads_per_client, poll=poll, health=health,
                              setup_timeout=cfg.federation.setup_timeout)
    return run_federated(cfg, transport, run_dir, resume, stop_after, on_round, extra,
                         server_data)


def make_server_app(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                    stop_after: int | None = None,
                    on_round: Callable[[RoundInfo], None] | None = None,
                    extra: dict[str, Any] | None = None,
                    health: Callable[[], str | None] | None = None) -> ServerApp:
    """A ServerApp bound to a resolved config (what ``liquid-fed run`` launches)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, run_dir, resume, stop_after, on_round, extra, health)

    return app


def config_from_run_config(run_config: dict[str, Any]) -> RunConfig:
    """``config`` (a YAML path) plus overrides from Flower's run config.

    The SuperLink accepts only the keys ``[tool.flwr.app.config]`` declares, so dotted
    overrides travel in ``set`` as one shell-quoted string (``set="train.epochs=2 out=/x"``);
    any other undeclared key (possible in simulation) is taken as an override too. A relative
    ``config`` path is looked up in the working directory, then in the app's own folder (in
    deployment the SuperLink unpacks the app under ``$FLWR_HOME/apps`` and keeps its cwd).
    """
    path = run_config.get("config")
    if path and not Path(str(path)).is_absolute() and not Path(str(path)).exists():
        in_app = APP_DIR / str(path)
        path = in_app if in_app.exists() else path
    overrides = [f"{k}={v}" for k, v in run_config.items()
                 if k not in ("config", "resume", "set", "data-dir")]
    overrides += shlex.split(str(run_config.get("set", "")))
    return load_config(str(path) if path else None, overrides)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``."""
    # Replies are handed out before their objects are uploaded: retry those within 0.05 s,
    # not Flower's 1 s (guarded on Flower's version and source; else Flower's kept, warned).
    fastpath.install_server_pulls()
    cfg = config_from_run_config(dict(context.run_config))
    resume = bool(context.run_config.get("resume", False))
    run_dir = Path(cfg.out) / cfg.name
    data_dir = str(context.run_config.get("data-dir", ""))
    # With private shards the server reads only its label folder, never the data set.
    server_data = load_server_shard(data_dir, cfg) if data_dir else None
    with RunLock(run_dir).acquire("flwr run (ServerApp)"):
        rundir.prepare(cfg, run_dir, resume=resume)
        serve(grid, cfg, run_dir, resume, server_data=server_data,
              on_round=progress_printer(cfg.name))


def format_progress(name: str, info: RoundInfo) -> str:
    """The one line per round that ``liquid-fed submit`` and ``server-host`` show (they find
    it by its ``[liquid-fed]`` prefix in the run's log stream)."""
    return (f"[liquid-fed] run {name} round {info.round}/{info.total_rounds} "
            f"loss {info.loss:.4f} elapsed {info.elapsed:.1f} s")


def progress_printer(name: str) -> Callable[[RoundInfo], None]:
    """An ``on_round`` that writes :func:`format_progress` to the ServerApp's stdout, which
    Flower streams to ``flwr run --stream`` and the SuperLink's log."""
    out = logging.getLogger("liquid_fed.progress")
    if not out.handlers:  # this process's entry point: the handler is ours to set
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        out.addHandler(handler)
        out.setLevel(logging.INFO)
        out.propagate = False

    # The long-lived server host names a file (in its work folder) it shows progress from:
    # Flower's SuperExec does not pass a ServerApp's output on to the SuperLink.
    progress_file = os.environ.get(PROGRESS_ENV)

    def on_round(info: RoundInfo) -> None:
        line = format_progress(name, info)
        out.info(line)
        if progress_file:
            with contextlib.suppress(OSError), open(progress_file, "a") as f:
                f.write(line + "\n")

    return on_round
