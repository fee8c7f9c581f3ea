"""``flower-supernode`` with a warm ClientApp worker and shorter waits.

    python -m clients.supernode [--mode fast|warm|stock] [--name NODE] [...] -- FLOWER_ARGS

``FLOWER_ARGS`` are ``flower-supernode``'s own (``--superlink``, ``--node-config``, ``--port``,
TLS and authentication flags...). The modes:

- ``stock``: Flower's SuperNode as it is: one ``flwr-clientapp`` process per message.
- ``warm``: ``--isolation process`` plus one long-lived worker (:mod:`clients.worker`) that
  this process starts against the node's Runtime API (``--host``, 127.0.0.1 by default) and
  supervises: if the worker dies, the SuperNode stops at once with an error naming the node
  (otherwise the run would wait for the task to expire and then fail anyway).
- ``fast`` (default): ``warm`` plus shorter SuperNode waits: poll the SuperLink every
  ``--hot-poll`` s (0.1) for ``--hot-window`` s (10) after a message and every ``--idle-poll``
  s (1.0) otherwise (Flower: 3 s), check for the ClientApp's reply every ``--reply-poll`` s
  (0.05; Flower: 0.5 s), and retry an object that is not uploaded yet after 0.05 s doubling to
  0.5 s (Flower: 1 s doubling to 10 s). Polls much under 0.05-0.1 s saturate small machines.

In ``warm`` and ``fast`` modes a SuperNode reports a heartbeat interval of 10 s (Flower: 30 s),
so a node that dies unannounced is offline at the SuperLink after 20 s, not 60 s. With an auth
key (``--auth-supernode-private-key``) it also keeps its node claimable (:class:`NodeIdentity`):
it signs its node off when its worker dies, and at start it signs off a node of its own key
that a killed predecessor left online (Flower refuses to activate a node that is online, so
a restarted party would be turned away like an unknown key for up to a minute). The node id
is kept next to the key (``--node-id-file``) because the SuperLink says it to no one else.

Each faster path relies on Flower internals and is used only when :mod:`clients.fastpath`
finds the installed Flower to be the version and source it was written against; otherwise a
warning is logged and Flower's stock behaviour is kept (``warm``/``fast`` fall back to
``stock``; ``fast`` keeps Flower's waits when only those changed).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clients import fastpath

log = logging.getLogger("liquid_fed.supernode")

MODES = ("stock", "warm", "fast")
EXIT_WORKER_DIED = 75


def resolve_mode(mode: str) -> str:
    """The mode that the installed Flower allows (a warning says why when it is lower)."""
    if mode not in MODES:
        raise ValueError(f"--mode: got {mode!r}; accepted: {', '.join(MODES)}")
    if mode == "stock" or not fastpath.usable("worker"):
        return "stock"
    if mode == "fast" and not fastpath.usable("waits"):
        return "warm"
    return mode


# --------------------------------------------------------------------------------------------
# Shorter waits (guarded)
# --------------------------------------------------------------------------------------------


class Waits:
    """Stands in for the ``time`` module of Flower's SuperNode loop: its two fixed sleeps,
    ``time.sleep(3)`` when no message came and ``time.sleep(0.5)`` while waiting for the
    ClientApp's reply, become shorter; everything else is the real ``time``."""

    IDLE, REPLY = 3, 0.5  # the literals in flwr 1.41.0 (guarded by the source hash)

    def __init__(self, hot_poll: float, idle_poll: float, hot_window: float,
                 reply_poll: float) -> None:
        self.hot_poll, self.idle_poll = hot_poll, idle_poll
        self.hot_window, self.reply_poll = hot_window, reply_poll
        self.last_activity = float("-inf")

    def seconds(self, seconds: float) -> float:
        """How long a sleep of ``seconds`` in Flower's loop lasts instead."""
        if seconds == self.IDLE:
            hot = time.monotonic() - self.last_activity < self.hot_window
            return self.hot_poll if hot else self.idle_poll
        if seconds == self.REPLY:
            self.last_activity = time.monotonic()
            return self.reply_poll
        return seconds

    def sleep(self, seconds: float) -> None:
        time.sleep(self.seconds(seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install_waits(hot_poll: float = 0.1, idle_poll: float = 1.0, hot_window: float = 10.0,
                  reply_poll: float = 0.05) -> Waits | None:
    """Shorten the SuperNode loop's waits in this process; None (Flower's kept) when the
    installed Flower is not the one this was written for."""
    if not fastpath.usable("waits"):
        return None
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as sci

    waits = Waits(hot_poll, idle_poll, hot_window, reply_poll)
    original: Callable[..., int | None] = sci._pull_and_store_message

    @functools.wraps(original)
    def pull_and_store_message(*args: Any, **kwargs: Any) -> int | None:
        run_id = original(*args, **kwargs)
        if run_id is not None:
            waits.last_activity = time.monotonic()
        return run_id

    sci._pull_and_store_message = pull_and_store_message
    sci.time = waits  # type: ignore[assignment]
    sci.pull_objects = functools.partial(inflatable_utils.pull_objects,
                                         initial_backoff=fastpath.PULL_INITIAL_BACKOFF,
                                         backoff_cap=fastpath.PULL_BACKOFF_CAP)
    return waits


# --------------------------------------------------------------------------------------------
# A run stopped while its message is received: drop the message's task (guarded)
# --------------------------------------------------------------------------------------------

PULL_AND_STORE_REF = "flwr.supernode.start_client_internal:_pull_and_store_message"


class RunStopped(Exception):
    """The run of a message being received is no longer running at the SuperLink."""


def install_stopped_run_cleanup() -> bool:
    """Make this process's SuperNode finish the task of a message whose run stops while the
    message is being received; False (Flower's kept, with a warning) when the installed
    Flower is not the one this was written for.

    Flower 1.41's ``_pull_and_store_message`` creates the task before it pulls the message's
    objects; when the SuperLink answers that the run is not running, the
    ``RunNotRunningException`` (a ``BaseException``) passes its ``except Exception`` that would
    delete the message and finish the task, so the task stays pending with a message that
    will never be complete, and a single warm worker that claims it waits for that message.
    Raised as :class:`RunStopped` instead, it takes Flower's own clean-up path ("Failed to
    receive message ...": message deleted, task finished as failed).

    Returns:
        True when installed.
    """
    import flwr

    found = None
    if flwr.__version__ != fastpath.FLOWER_VERSION:
        found = f"Flower {flwr.__version__} is installed; written for {fastpath.FLOWER_VERSION}"
    elif fastpath.source_sha256(fastpath.resolve(PULL_AND_STORE_REF)) != \
            fastpath.SOURCE_SHA256[PULL_AND_STORE_REF]:
        found = f"{PULL_AND_STORE_REF} changed"
    if found:
        log.warning("stopped-run clean-up not installed (%s): a run stopped while its message "
                    "is received leaves a pending task that the worker gives up only later",
                    found)
        return False
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode import start_client_internal as sci

    original: Callable[..., int | None] = sci._pull_and_store_message
    if getattr(original, "_liquid_fed_cleanup", False):
        return True

    def converting(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(run_id: int, *args: Any) -> Any:
            try:
                return fn(run_id, *args)
            except RunNotRunningException:
                log.warning("SuperNode: run %s stopped while its message was being "
                            "received; dropping the message and its task", run_id)
                raise RunStopped(f"run {run_id} is no longer running at the SuperLink"
                                 ) from None
        return call

    @functools.wraps(original)
    def pull_and_store_message(*args: Any, **kwargs: Any) -> int | None:
        for name in ("pull_object", "confirm_message_received"):
            if name in kwargs:  # Flower 1.41 passes them by keyword
                kwargs[name] = converting(kwargs[name])
        return original(*args, **kwargs)

    pull_and_store_message._liquid_fed_cleanup = True  # type: ignore[attr-defined]
    sci._pull_and_store_message = pull_and_store_message
    return True


# --------------------------------------------------------------------------------------------
# The node's identity at the SuperLink: reclaimed at start, signed off when the worker dies
# --------------------------------------------------------------------------------------------

#: The heartbeat interval SuperNodes report (Flower's default 30 s, its minimum 10 s). The
#: SuperLink marks a node offline after 2 intervals without a heartbeat.
HEARTBEAT_INTERVAL = 10
HEARTBEAT_STOCK = 30  # flwr 1.41.0's HEARTBEAT_DEFAULT_INTERVAL
#: How long a restarted SuperNode without its node-id file waits for a node of its key that
#: is still online (a predecessor killed without signing off) to expire: 2 heartbeats of 10 s
#: plus a margin. A key the SuperLink never registered is refused by Flower after this wait.
RECLAIM_WAIT = 25.0


def install_heartbeat(interval: int = HEARTBEAT_INTERVAL) -> bool:
    """Make this process's SuperNode report (and send) heartbeats every ``interval`` s;
    False, Flower's 30 s kept and a warning logged, when Flower is not the one expected."""
    import flwr
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as fhc

    values = [getattr(m, "HEARTBEAT_DEFAULT_INTERVAL", None) for m in (heartbeat, fhc)]
    if flwr.__version__ != fastpath.FLOWER_VERSION or values != [HEARTBEAT_STOCK] * 2:
        log.warning("SuperNode heartbeats: Flower %s holds intervals %s, written for %s "
                    "with %s s; keeping Flower's", flwr.__version__, values,
                    fastpath.FLOWER_VERSION, HEARTBEAT_STOCK)
        return False
    if not constant.HEARTBEAT_MIN_INTERVAL <= interval <= constant.HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval: got {interval}; accepted: "
                         f"{constant.HEARTBEAT_MIN_INTERVAL}..{constant.HEARTBEAT_MAX_INTERVAL}")
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval  # the sender's period (x 0.8 - 5 s)
    fhc.HEARTBEAT_DEFAULT_INTERVAL = interval  # what ActivateNode / heartbeats report
    return True


class NodeIdentity:
    """The SuperLink's node for this SuperNode's auth key.

    Flower 1.41 binds a node id to each registered public key and activates that node only
    while it is offline. A SuperNode killed without signing off leaves its node online until
    two heartbeats are missed; a restart with the same key is refused meanwhile. Any holder of
    the key may sign the node off (``DeactivateNode`` is authenticated by the key), but only
    with its id, which the SuperLink tells only the SuperNode that activates it: the id is
    kept in ``id_file``.
    """

    def __init__(self, superlink: str, key_file: str, root_certificates: str | None,
                 id_file: str | Path, heartbeat: int = HEARTBEAT_INTERVAL) -> None:
        self.superlink, self.key_file = superlink, key_file
        self.root_certificates, self.id_file = root_certificates, Path(id_file)
        self.heartbeat = heartbeat
        self.node_id: int | None = None

    def _client(self) -> Any:
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key
        from flwr.supercore.interceptors.http.runtime_version import (
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        private = load_ssh_private_key(Path(self.key_file).expanduser().read_bytes(), None)
        return FleetHttpClient.from_server_address(
            self.superlink, self.root_certificates is None, self.root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                          NodeAuthHttpInterceptor(private, private.public_key())])

    def _stored(self) -> int | None:
        try:
            return int(self.id_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _store(self, node_id: int) -> None:
        try:
            self.id_file.write_text(f"{node_id}\n")
        except OSError as exc:
            log.warning("cannot keep the node id in %s (%s): a restart after a crash will "
                        "wait up to %.0f s for the SuperLink to let the key in again",
                        self.id_file, exc, RECLAIM_WAIT)

    def reclaim(self, wait: float = RECLAIM_WAIT) -> int | None:
        """Make the key's node activatable for Flower's SuperNode; its node id, or None
        (Flower's own activation then reports the refusal).

        Activates the node and signs it off again (that tells its id); when the SuperLink
        refuses because the node is still online, signs off the node in ``id_file`` and
        tries again, or, without one, retries until ``wait`` seconds have passed.
        """
        import httpx
        from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
            ActivateNodeRequest,
            DeactivateNodeRequest,
        )
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes
        from flwr.supercore.retry import make_simple_http_retry_invoker

        retry = make_simple_http_retry_invoker()  # the SuperLink may not be up yet
        deadline = time.monotonic() + wait
        stale, told = self._stored(), False
        with self._client() as client:
            public = public_key_to_bytes(client_public_key(self.key_file))
            while True:
                try:
                    res = retry.invoke(client.ActivateNode, ActivateNodeRequest(
                        public_key=public, heartbeat_interval=self.heartbeat))
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 412:
                        log.warning("node reclaim: the SuperLink answered %s; leaving it to "
                                    "Flower", exc.response.status_code)
                        return None
                    if stale is not None:  # our predecessor's node: sign it off
                        log.warning("a node of this key (%d) is still online at the "
                                    "SuperLink (a SuperNode that stopped without signing "
                                    "off); signing it off", stale)
                        self._deactivate(client, stale, DeactivateNodeRequest)
                        stale = None
                        continue
                    if time.monotonic() > deadline:
                        log.error("the SuperLink refused to activate this key's node for "
                                  "%.0f s (HTTP 412): either %s is not registered there, or "
                                  "a node of this key is still online from an earlier start",
                                  wait, self.key_file)
                        return None
                    if not told:
                        log.warning("the SuperLink does not activate this key's node (HTTP "
                                    "412): either the key is not registered there, or its "
                                    "node is still online from before (%s holds no node id "
                                    "to sign it off); retrying for up to %.0f s",
                                    self.id_file, wait)
                        told = True
                    time.sleep(1.0)
                    continue
                self.node_id = int(res.node_id)
                self._store(self.node_id)
                self._deactivate(client, self.node_id, DeactivateNodeRequest)
                return self.node_id

    @staticmethod
    def _deactivate(client: Any, node_id: int, request: Any) -> bool:
        import httpx

        try:
            client.DeactivateNode(request(node_id=node_id))
        except httpx.HTTPError:
            return False  # already offline, or not this key's node
        return True

    def release(self) -> None:
        """Sign the node off (best effort): the server sees it offline at once."""
        if self.node_id is None:
            return
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611

        try:
            with self._client() as client:
                if self._deactivate(client, self.node_id, DeactivateNodeRequest):
                    log.info("node %d signed off at the SuperLink", self.node_id)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.warning("could not sign node %d off: %s", self.node_id, exc)


def client_public_key(key_file: str) -> Any:
    """The public half of an OpenSSH private key file."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    return load_ssh_private_key(Path(key_file).expanduser().read_bytes(), None).public_key()


# --------------------------------------------------------------------------------------------
# The worker and its supervisor
# --------------------------------------------------------------------------------------------


def _option(args: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def flower_args(args: list[str], warm: bool) -> list[str]:
    """``flower-supernode``'s arguments for a mode: ``--isolation process`` when warm."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg == "--isolation":
            skip = i + 1 < len(args)
            continue
        if arg.startswith("--isolation="):
            continue
        out.append(arg)
    return [*out, "--isolation", "process" if warm else "subprocess"]


class Supervisor(threading.Thread):
    """Starts the worker once the Runtime API listens; if the worker exits, logs an error
    naming the node and ends this SuperNode (exit status 75)."""

    def __init__(self, name: str, host: str, port: int, worker_args: list[str],
                 identity: NodeIdentity | None = None) -> None:
        super().__init__(name="liquid-fed-worker-supervisor", daemon=True)
        self.node, self.host, self.port = name, host, port
        self.worker_args = worker_args
        self.identity = identity
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def _listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((self.host, self.port)) == 0

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._listening():
            if time.monotonic() > deadline:
                self._fail(f"the Runtime API did not open {self.host}:{self.port}")
            time.sleep(0.05)
        parent = os.getpid()

        def prepare() -> None:  # the worker dies with this thread (i.e. with this process)
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)

        cmd = [sys.executable, "-m", "clients.worker", "--runtime-api-address",
               f"{self.host}:{self.port}", "--name", self.node, *self.worker_args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=prepare)
        log.info("SuperNode %s: ClientApp worker started (pid %d)", self.node, self.proc.pid)
        status = self.proc.wait()
        # SIGTERM reaches the worker and this process together (one process group): give
        # Flower's exit handlers (which call stop()) a moment before calling it a failure.
        time.sleep(1.0)
        if not self.stopping:
            self._fail(f"its ClientApp worker (pid {self.proc.pid}) exited with status "
                       f"{status}")

    def _fail(self, why: str) -> None:
        log.error("SuperNode %s stops: %s. The run cannot get this node's replies.",
                  self.node, why)
        if self.identity is not None:  # the server sees the node offline now, not in 20 s
            self.identity.release()
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_WORKER_DIED)

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


def node_identity(flower: list[str], id_file: str = "", heartbeat: int = HEARTBEAT_INTERVAL
                  ) -> NodeIdentity | None:
    """The :class:`NodeIdentity` of a SuperNode with ``flower-supernode`` flags ``flower``;
    None without an auth key (Flower then registers a new node per start)."""
    key = _option(flower, "--auth-supernode-private-key", "")
    if not key:
        return None
    root = _option(flower, "--root-certificates", "") or None
    if root is None and "--insecure" not in flower:
        return None  # system CAs: not a set-up this project writes
    return NodeIdentity(_option(flower, "--superlink", "127.0.0.1:9092"), key, root,
                        id_file or f"{key}.node-id", heartbeat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients.supernode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="fast",
                        help="stock, warm or fast (default; see above)")
    parser.add_argument("--name", default="", help="the node's name in errors and logs")
    parser.add_argument("--hot-poll", type=float, default=0.1)
    parser.add_argument("--idle-poll", type=float, default=1.0)
    parser.add_argument("--hot-window", type=float, default=10.0)
    parser.add_argument("--reply-poll", type=float, default=0.05)
    parser.add_argument("--worker-poll", type=float, default=0.05)
    parser.add_argument("--worker-idle-poll", type=float, default=0.5)
    parser.add_argument("--node-id-file", default="",
                        help="where the node id of this SuperNode's auth key is kept "
                             "(default: next to the key, <key>.node-id)")
    parser.add_argument("--reclaim-wait", type=float, default=RECLAIM_WAIT,
                        help="seconds a restart without a node-id file waits for a node of "
                             f"its key left online to expire (default {RECLAIM_WAIT:g})")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER,
                        help="-- then flower-supernode's arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    fastpath.log_to_stderr("%(levelname)s %(name)s: %(message)s")
    rest = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    for flag in ("hot_poll", "idle_poll", "reply_poll", "worker_poll", "worker_idle_poll"):
        value = getattr(args, flag)
        if not 0.01 <= value <= 60:
            log.error("--%s: got %s; accepted: 0.01 to 60 seconds", flag.replace("_", "-"),
                      value)
            return 2
    mode = resolve_mode(args.mode)
    name = args.name or _option(rest, "--node-config", "") or "supernode"
    log.info("SuperNode %s: mode %s (asked: %s)", name, mode, args.mode)
    supervisor = None
    if mode != "stock" and _option(rest, "--ssl-certfile", ""):
        log.warning("SuperNode %s: the warm worker does not speak TLS to the Runtime API "
                    "(--ssl-certfile); keeping Flower's stock isolation", name)
        mode = "stock"
    if mode in ("warm", "fast"):
        host = _option(rest, "--host", "127.0.0.1")
        port = int(_option(rest, "--port", "9094"))
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("SuperNode %s: the Runtime API on %s is unauthenticated; keep it on "
                        "127.0.0.1", name, host)
        supervisor = Supervisor(name, "127.0.0.1" if host == "localhost" else host, port,
                                ["--poll", str(args.worker_poll),
                                 "--idle-poll", str(args.worker_idle_poll),
                                 "--hot-window", str(args.hot_window)])
        install_stopped_run_cleanup()  # before install_waits, which wraps it again
        if mode == "fast":
            install_waits(args.hot_poll, args.idle_poll, args.hot_window, args.reply_poll)
        beat = HEARTBEAT_INTERVAL if install_heartbeat() else HEARTBEAT_STOCK
        supervisor.identity = node_identity(rest, args.node_id_file, beat)
        if supervisor.identity is not None:
            node_id = supervisor.identity.reclaim(args.reclaim_wait)
            log.info("SuperNode %s: node %s of this key reclaimed", name, node_id)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args(rest, supervisor is not None)]
    if supervisor is not None:
        from flwr.supercore.exit import add_exit_handler

        add_exit_handler(supervisor.stop)
        supervisor.start()
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
