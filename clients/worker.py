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
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("liquid_fed.worker")

EXIT_UNFIT = 3
#: Object pulls from the node's local store: the task is handed out before the SuperNode has
#: finished pulling its objects from the SuperLink, so retry quickly (Flower: 1 s doubling).
PULL_INITIAL_BACKOFF = 0.05  # the same as clients.fastpath
PULL_BACKOFF_CAP = 0.5


class _Reload(Exception):
    """The claimed task needs another app bundle than the loaded one."""

    def __init__(self, token: str, fab_hash: str) -> None:
        super().__init__(fab_hash)
        self.token, self.fab_hash = token, fab_hash


def _runtime_client(address: str, token: str | None) -> Any:
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
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``run_clientapp.pull_task_input`` with a short object-pull backoff."""
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
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
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
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message,
        initial_backoff=PULL_INITIAL_BACKOFF,
        backoff_cap=PULL_BACKOFF_CAP,
    )
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
                 hot_window: float, argv: list[str]) -> None:
        self.address, self.name = address, name
        self.poll, self.idle_poll, self.hot_window = poll, idle_poll, hot_window
        self.argv = argv
        self.fab_hash: str | None = None
        self.app: Any = None
        self.tasks = 0
        self.last_task = float("-inf")

    # -- the loop ---------------------------------------------------------------------------

    def serve(self, token: str | None = None) -> None:
        """Run ``token``'s task first (after a reload), then claim tasks until killed."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        if token:
            self.run_task(token, None)
        client = _runtime_client(self.address, None)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        log.info("worker %s (pid %d) polls %s for ClientApp tasks", self.name, os.getpid(),
                 self.address)
        try:
            while True:
                res = client.AcquireTask(request)
                if res.HasField("task") and res.token:
                    self.run_task(res.token, res.task.fab_hash)
                    continue
                hot = time.monotonic() - self.last_task < self.hot_window
                time.sleep(self.poll if hot else self.idle_poll)
        except _Reload as reload:
            client.close()
            self._reexec(reload)

    def run_task(self, token: str, fab_hash: str | None) -> None:
        """One task, as ``flwr-clientapp`` runs it (its ``run_clientapp``)."""
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
            message, context, run, fab = pull_task_input(client)
            app = self.load(run, fab)
            reply = app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
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
            push_task_output(client=client, context=context, sub_status=sub_status,
                             details=details)
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
    found = fastpath.problems("worker")
    if found:
        log.error("the warm worker does not fit the installed Flower: %s", "; ".join(found))
        return EXIT_UNFIT
    keep = ["--runtime-api-address", args.runtime_api_address, "--name", args.name,
            "--poll", str(args.poll), "--idle-poll", str(args.idle_poll),
            "--hot-window", str(args.hot_window)]
    worker = Worker(args.runtime_api_address, name, args.poll, args.idle_poll,
                    args.hot_window, keep)
    try:
        worker.serve(args.token)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
