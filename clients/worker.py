"""A long-lived ClientApp worker for one SuperNode started with ``--isolation process``.

    python -m clients.worker --runtime-api-address 127.0.0.1:PORT [--name NODE]

Flower 1.41 runs every message in a new ``flwr-clientapp`` process (imports of flwr, torch and
the library cost ~5 CPU-s per message). This worker does what that process does, in a loop and
with the app loaded once: it claims the SuperNode's next ClientApp task on the node's local
Runtime API (as Flower's SuperExec does), pulls the task's Message, Context, Run and FAB, calls
the ClientApp, pushes the reply and the updated Context. The node's state therefore lives in
``Context.state`` exactly as with Flower's own process per message; results are identical.

An app is loaded from its FAB (installed under ``$FLWR_HOME/apps`` like ``flwr-clientapp``
does). Flower's ``load_app`` does not reload modules, so a task whose FAB hash differs from the
loaded one makes the worker replace itself (``exec``, same pid) by a fresh process that takes
over the claimed task. The Runtime API is unauthenticated: keep it on 127.0.0.1.

Flower internals used here are guarded by :mod:`clients.fastpath` (version and source hashes);
when they do not fit, the worker refuses to start (exit status 3) and says why; the SuperNode
wrapper checks this before it starts one and otherwise keeps Flower's stock isolation.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("liquid_fed.worker")

EXIT_UNFIT = 3
#: Object pulls from the node's local store: the task is handed out before the SuperNode has
#: finished pulling its objects from the SuperLink, so retry quickly (Flower: 1 s doubling).
PULL_INITIAL_BACKOFF = 0.05  # the same as clients.fastpath
PULL_BACKOFF_CAP = 0.5
#: The longest a task's message may take to become pullable before the task is given up
#: (Flower's flwr-clientapp: 500 tries per object). A task whose run was stopped while its
#: message was being received never gets one (see :func:`pull_task_input`).
PULL_TIMEOUT = 300.0
#: How often, while a task's message is not pullable, the worker checks whether the SuperNode
#: has queued a newer task (then the waiting one was abandoned by the SuperNode).
SUPERSEDED_CHECK = 1.0
#: How long a request to the node's Runtime API is retried on transport errors.
REQUEST_RETRY_TIME = 30.0


class TaskAbandoned(Exception):
    """The claimed task cannot be served: its message will never be pullable."""


class _Reload(Exception):
    """The claimed task needs another app bundle than the loaded one."""

    def __init__(self, token: str, fab_hash: str) -> None:
        super().__init__(fab_hash)
        self.token, self.fab_hash = token, fab_hash


def task_retry_invoker(max_time: float = REQUEST_RETRY_TIME) -> Any:
    """A retry invoker for the worker's Runtime API requests that never outlives the worker.

    Flower's (``make_simple_http_retry_invoker``) answers HTTP 401 by sending SIGINT to its own
    process and HTTP 403 by raising ``RunNotRunningException`` (a ``BaseException``); both are
    right for a one-shot ``flwr-clientapp`` and fatal for a worker that serves many tasks: the
    SuperNode revokes a task's token when it gives the task up (e.g. its run was stopped), and
    the worker must then go on to the next task. Here any HTTP error status ends the request
    with ``httpx.HTTPStatusError`` (the caller gives the task up), and transport errors are
    retried for at most ``max_time`` seconds.

    Args:
        max_time: seconds after which a request failing on transport errors is given up.

    Returns:
        A ``flwr.supercore.retry.RetryInvoker``.
    """
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry import http_retry
    from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential

    # Flower's own list (private); any transport error if a later Flower renames it.
    transport = getattr(http_retry, "_RETRYABLE_TRANSPORT_ERRORS", (httpx.TransportError,))
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=min(MAX_RETRY_DELAY, 2.0)),
        recoverable_exceptions=transport,
        max_tries=None, max_time=max_time,
        should_giveup=lambda exc: isinstance(exc, httpx.HTTPStatusError))


def _runtime_client(address: str, token: str | None, invoker: Any = None) -> Any:
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(
        component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    # A task's requests must fail, not kill the worker, when its token is revoked.
    if invoker is None:
        invoker = task_retry_invoker() if token else make_simple_http_retry_invoker()
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=invoker)


def pull_task_input(client: Any, superseded: Any = None, timeout: float = PULL_TIMEOUT
                    ) -> tuple[Any, Any, Any, Any]:
    """Flower's ``run_clientapp.pull_task_input`` with a short object-pull backoff, bounded.

    Flower 1.41's SuperNode creates a task before it pulls the task's message from the
    SuperLink; when the run is stopped meanwhile (``RunNotRunningException``, a
    ``BaseException`` that its ``except Exception`` misses) it leaves the task pending with a
    message whose objects never arrive. Pulling that message is therefore bounded: by
    ``timeout`` seconds, and by ``superseded``, asked while the message is not pullable yet.

    Args:
        client: the task's ``RuntimeHttpClient`` (with its token).
        superseded: called (from the pull threads) while an object is not available yet;
            returns why the task is to be given up, or None to keep waiting.
        timeout: seconds to wait for the message's objects.

    Returns:
        The task's Message, Context, Run and Fab.

    Raises:
        TaskAbandoned: ``superseded`` said so, or the objects did not come within ``timeout``.
        RuntimeError: the node holds no message for the task.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectPullError,
        ObjectUnavailableError,
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def pull_object(object_id: str) -> bytes:
        try:
            return pull(object_id)
        except ObjectUnavailableError:
            why = superseded() if superseded is not None else None
            if why:
                raise TaskAbandoned(why) from None
            raise

    try:
        message = pull_and_inflate_object_from_tree(
            tree, pull_object,
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                      context.run_id),
            return_type=Message,
            max_time=timeout,
            max_tries_per_object=None,
            initial_backoff=PULL_INITIAL_BACKOFF,
            backoff_cap=PULL_BACKOFF_CAP,
        )
    except ObjectPullError as exc:
        raise TaskAbandoned(f"its message was not pullable within {timeout:g} s") from exc
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


class _Heartbeat:
    """Keeps a claimed task alive (Flower expires it after 60 s without a heartbeat)."""

    def __init__(self, client: Any) -> None:
        import httpx
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
        from flwr.supercore.heartbeat import HeartbeatSender

        def beat() -> bool:
            # Unlike Flower's, never raise SIGINT: this process outlives the task.
            try:
                client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except (httpx.TransportError, httpx.HTTPStatusError):
                return False
            return True

        self.sender = HeartbeatSender(beat)
        self.sender.start()

    def stop(self) -> None:
        if self.sender.is_running:
            self.sender.stop()


class Worker:
    """Claims and runs the SuperNode's ClientApp tasks, one at a time, app loaded once."""

    def __init__(self, address: str, name: str, poll: float, idle_poll: float,
                 hot_window: float, argv: list[str], pull_timeout: float = PULL_TIMEOUT
                 ) -> None:
        self.address, self.name = address, name
        self.poll, self.idle_poll, self.hot_window = poll, idle_poll, hot_window
        self.pull_timeout = pull_timeout
        self.argv = argv
        self.fab_hash: str | None = None
        self.app: Any = None
        self.tasks = 0
        self.last_task = float("-inf")
        #: A task claimed while another was waiting for its message: served next.
        self.claimed: tuple[str, str, int] | None = None
        self._claim_lock = threading.Lock()
        self._last_check = float("-inf")
        self._stop = threading.Event()

    # -- the loop ---------------------------------------------------------------------------

    def serve(self, token: str | None = None) -> None:
        """Run ``token``'s task first (after a reload), then claim tasks until killed (or
        :meth:`stop` is called)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        try:
            if token:
                self.run_task(token, None)
            client = _runtime_client(self.address, None)
            request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
            log.info("worker %s (pid %d) polls %s for ClientApp tasks", self.name,
                     os.getpid(), self.address)
            while not self._stop.is_set():
                if self.claimed is not None:  # claimed while the previous task waited
                    (claimed_token, fab_hash, run_id), self.claimed = self.claimed, None
                    self.run_task(claimed_token, fab_hash, run_id)
                    continue
                res = client.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self.run_task(res.token, res.task.fab_hash, res.task.run_id)
                    continue
                hot = time.monotonic() - self.last_task < self.hot_window
                self._stop.wait(self.poll if hot else self.idle_poll)
            client.close()
        except _Reload as reload:
            self._reexec(reload)

    def stop(self) -> None:
        """Make :meth:`serve` return after the task at hand (for in-process use)."""
        self._stop.set()

    def superseded(self) -> str | None:
        """Why the task being pulled is to be given up, or None.

        The SuperNode receives one message at a time and queues the next one only after the
        current one was answered or given up, so a newer pending task means that the one
        whose message the worker waits for was abandoned (its run stopped while the SuperNode
        received it). The newer task is claimed here (that is the only way to see it) and
        served next. Asks the Runtime API at most every ``SUPERSEDED_CHECK`` seconds.
        """
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        with self._claim_lock:
            if self.claimed is None:
                if time.monotonic() - self._last_check < SUPERSEDED_CHECK:
                    return None
                self._last_check = time.monotonic()
                # Flower's invoker would retry for ever if the SuperNode went away meanwhile.
                client = _runtime_client(self.address, None, task_retry_invoker())
                try:
                    res = client.AcquireTask(AcquireTaskRequest(
                        supported_task_types=[TaskType.CLIENT_APP]))
                finally:
                    client.close()
                if not (res.HasField("task") and res.token):
                    return None
                self.claimed = (res.token, res.task.fab_hash, res.task.run_id)
            return (f"the SuperNode has queued a newer task (run {self.claimed[2]}), so it "
                    "gave this one up")

    def run_task(self, token: str, fab_hash: str | None, run_id: int | None = None) -> None:
        """One task, as ``flwr-clientapp`` runs it (its ``run_clientapp``).

        A task whose message cannot be pulled (its run was stopped while the SuperNode
        received it, or its token was revoked) is given up with a log line naming the run;
        the worker then serves the next task. Errors of the Runtime API on the way out are
        logged, never raised: one task must not end the worker.

        Args:
            token: the task's token (from ``AcquireTask``).
            fab_hash: the task's app bundle hash; None when unknown (after a reload).
            run_id: the task's run, for log lines; None when unknown.

        Raises:
            _Reload: the task needs another app bundle than the loaded one.
        """
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        if fab_hash and self.fab_hash is not None and fab_hash != self.fab_hash:
            raise _Reload(token, fab_hash)
        client = _runtime_client(self.address, token)
        heartbeat = _Heartbeat(client)
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client, self.superseded,
                                                         self.pull_timeout)
            app = self.load(run, fab)
            reply = app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except (TaskAbandoned, httpx.HTTPStatusError) as ex:
            log.warning("worker %s: gave up a task of run %s: %s; serving the next task",
                        self.name, context.run_id if context is not None else run_id,
                        one_line(ex))
            sub_status, details = SubStatus.FAILED, f"task given up: {one_line(ex)}"
            message = None  # no reply to a message that was never received
        except Exception as ex:  # pylint: disable=broad-exception-caught
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                reason = "An exception was raised when attempting to load `ClientApp`"
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            # The reason on one line first; a party's operator reads that, not the traceback.
            log.error("worker %s: the ClientApp failed: %s", self.name, one_line(ex))
            log.error("worker %s: the traceback of that failure follows", self.name,
                      exc_info=ex)
            sub_status, details = SubStatus.FAILED, reason
            if message:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply and context:
                    push_message(client, reply, context)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log.error("worker %s: failed to push the reply", self.name, exc_info=ex)
            heartbeat.stop()
            try:
                push_task_output(client=client, context=context, sub_status=sub_status,
                                 details=details)
            except httpx.HTTPError as ex:  # e.g. the SuperNode revoked the task's token
                log.warning("worker %s: could not report the task's end (%s)", self.name,
                            one_line(ex))
            client.close()
            self.tasks += 1
            self.last_task = time.monotonic()

    # -- the app ----------------------------------------------------------------------------

    def load(self, run: Any, fab: Any) -> Any:
        """The ClientApp of ``fab``, installed and imported on first use."""
        if self.fab_hash is not None:
            if fab.hash_str != self.fab_hash:  # a task claimed without its hash (after exec)
                raise RuntimeError(f"app bundle changed from {self.fab_hash[:12]} to "
                                   f"{fab.hash_str[:12]} within one worker")
            return self.app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        t0 = time.monotonic()
        app_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        if not (Path(app_dir) / "pyproject.toml").exists():
            install_from_fab(fab.content, skip_prompt=True)
        _forget_app_modules(Path(app_dir))
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash = fab.hash_str
        log.info("worker %s loaded app %s (FAB %s...) in %.1f s", self.name, run.fab_id,
                 fab.hash_str[:12], time.monotonic() - t0)
        return self.app

    def _reexec(self, reload: _Reload) -> None:
        log.warning("worker %s: task needs app bundle %s..., loaded is %s...; restarting the "
                    "worker (same pid) to load it", self.name, reload.fab_hash[:12],
                    (self.fab_hash or "")[:12])
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "clients.worker", *self.argv,
                                  "--token", reload.token])


def one_line(ex: BaseException) -> str:
    """``Type: message`` of an exception on one line (its first line when longer), with the
    innermost cause's when Flower wrapped the app's own error (``LoadClientAppError``)."""
    while ex.__cause__ is not None and not str(ex).strip():
        ex = ex.__cause__
    text = str(ex).strip().splitlines()
    reason = f"{type(ex).__name__}: {text[0]}" if text else type(ex).__name__
    if ex.__cause__ is not None:
        reason += f" (caused by {one_line(ex.__cause__)})"
    return reason


def _forget_app_modules(app_dir: Path) -> None:
    """Drop already-imported modules that the app bundle provides (e.g. this ``clients``
    package), so that the app is imported from its bundle, as ``flwr-clientapp`` does."""
    tops = {p.stem if p.suffix == ".py" else p.name for p in app_dir.iterdir()
            if p.suffix == ".py" or (p / "__init__.py").exists()}
    for name in list(sys.modules):
        if name.partition(".")[0] in tops:
            del sys.modules[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clients.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, e.g. 127.0.0.1:9094")
    parser.add_argument("--name", default="", help="the node's name in log lines")
    parser.add_argument("--poll", type=float, default=0.05,
                        help="seconds between task polls after a task (default 0.05)")
    parser.add_argument("--idle-poll", type=float, default=0.5,
                        help="seconds between task polls when idle (default 0.5)")
    parser.add_argument("--hot-window", type=float, default=10.0,
                        help="seconds after a task during which --poll applies (default 10)")
    parser.add_argument("--pull-timeout", type=float, default=PULL_TIMEOUT,
                        help="seconds a task's message may take to become pullable before "
                             f"the task is given up (default {PULL_TIMEOUT:g})")
    parser.add_argument("--token", help=argparse.SUPPRESS)  # a claimed task, after a reload
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    name = args.name or args.runtime_api_address
    from clients import fastpath

    fastpath.log_to_stderr(f"%(levelname)s worker[{name}] %(name)s: %(message)s")
    for value, flag in ((args.poll, "--poll"), (args.idle_poll, "--idle-poll")):
        if not 0.01 <= value <= 60:
            log.error("%s: got %s; accepted: 0.01 to 60 seconds", flag, value)
            return 2
    if not 1 <= args.pull_timeout <= 7200:
        log.error("--pull-timeout: got %s; accepted: 1 to 7200 seconds", args.pull_timeout)
        return 2
    found = fastpath.problems("worker")
    if found:
        log.error("the warm worker does not fit the installed Flower: %s", "; ".join(found))
        return EXIT_UNFIT
    keep = ["--runtime-api-address", args.runtime_api_address, "--name", args.name,
            "--poll", str(args.poll), "--idle-poll", str(args.idle_poll),
            "--hot-window", str(args.hot_window), "--pull-timeout", str(args.pull_timeout)]
    worker = Worker(args.runtime_api_address, name, args.poll, args.idle_poll,
                    args.hot_window, keep, args.pull_timeout)
    try:
        worker.serve(args.token)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
