"""A run stopped while a party's SuperNode receives its message must not wedge the warm worker.

Flower 1.41's SuperNode creates a ClientApp task before it pulls the message's objects from the
SuperLink; when the run is stopped meanwhile (``flwr stop``), the SuperLink answers 403, the
``RunNotRunningException`` (a ``BaseException``) skips Flower's clean-up and the task stays
pending with a message whose objects never arrive. The single warm worker (clients/worker.py)
claimed it and waited for that message (500 tries, ~250 s) while the next run's messages queued
behind it: the resumed submit of tests/test_server_host.py once timed out that way.

These tests run, in this process, a real SuperNode state with its real Runtime API (Flower's
FastAPI app on a loopback port) and Flower's own ``_pull_and_store_message``; only the SuperLink
is a stand-in (the callables that function is given). The worker is the real one, serving over
HTTP; only its app loading is replaced by a small ClientApp (doubles a number).
"""

from __future__ import annotations

import hashlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clients import supernode, worker

NODE = 7
FAB_CONTENT = b""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """A SuperNode's state and Runtime API in this process; the SuperLink is stood in for."""

    def __init__(self) -> None:
        import uvicorn
        from flwr.supercore.object_store import ObjectStoreFactory
        from flwr.supernode.main import create_app
        from flwr.supernode.nodestate import NodeStateFactory

        self.factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state = self.factory.state()
        self.state.set_node_id(NODE)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app=create_app(state_factory=self.factory), host="127.0.0.1", port=self.port,
            log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the Runtime API did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def deliver(self, run_id: int, value: int,
                pull_object: Callable[[int, str, Callable[[], bytes]], bytes] | None = None
                ) -> int | None:
        """Let Flower's SuperNode receive one message of ``run_id`` carrying ``value``;
        ``pull_object(run_id, object_id, fetch)`` stands in for the SuperLink's object pull
        (default: the object). Returns what Flower's ``_pull_and_store_message`` returns."""
        from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
        from flwr.supercore.fab import Fab
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
        )
        from flwr.supercore.run import Run
        from flwr.supernode import start_client_internal as sci

        # The run, its FAB and Context as the SuperNode keeps them after a first message.
        fab = Fab(hash_str=hashlib.sha256(FAB_CONTENT).hexdigest(), content=FAB_CONTENT,
                  verifications={})
        run = Run.create_empty(run_id)
        run.fab_hash, run.series_id = fab.hash_str, run_id
        self.state.store_run(run)
        self.state.store_fab(fab)
        self.state.set_run_series_context(run_id, Context(
            run_id=run_id, node_id=NODE, node_config={}, state=RecordDict(), run_config={},
            series_id=run_id))
        metadata = Metadata(run_id=run_id, message_id="", src_node_id=1, dst_node_id=NODE,
                            reply_to_message_id="", group_id="", created_at=time.time(),
                            ttl=3600.0, message_type="train")
        msg = Message(RecordDict({"c": ConfigRecord({"v": value})}), metadata=metadata)
        msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink sets it
        objects = {k: o.deflate() for k, o in get_all_nested_objects(msg).items()}
        queue = [(msg, get_object_tree(msg))]

        def pull(rid: int, object_id: str) -> bytes:
            if pull_object is None:
                return objects[object_id]
            return pull_object(rid, object_id, lambda: objects[object_id])

        return sci._pull_and_store_message(
            state=self.state, object_store=self.state.object_store, node_config={},
            receive=lambda: queue.pop() if queue else None, get_run=None, get_fab=None,
            pull_object=pull, confirm_message_received=lambda rid, mid: None,
            trusted_entities=None)

    def tasks(self) -> dict[int, Any]:
        """The node's tasks by run id (one per run here)."""
        return {t.run_id: t.status for t in self.state.get_tasks()}

    def wait_reply(self, timeout: float) -> tuple[int, int] | None:
        """(run id, value) of the first reply the worker stored, or None after ``timeout``
        s. The state holds the reply's metadata (handed out once, as to Flower's loop); its
        content is in the object store once the worker has pushed it."""
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

        deadline = time.monotonic() + timeout
        reply = None
        while time.monotonic() < deadline:
            if reply is None:
                replies = self.state.get_messages_legacy(is_reply=True)
                reply = replies[0] if replies else None
            if reply is not None:
                store = self.state.object_store
                reply_id = reply.metadata.message_id
                contents = {t.object_id: store.get(t.object_id)
                            for t in iterate_object_tree(store.get_object_tree(reply_id))}
                if all(contents.values()):  # b"" until the worker has pushed the object
                    content = inflate_object_from_contents(reply_id, contents).content
                    return reply.metadata.run_id, content["c"]["v"]
            time.sleep(0.05)
        return None


def _app(message: Any, context: Any) -> Any:
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(RecordDict({"c": ConfigRecord({"v": message.content["c"]["v"] * 2})}),
                   reply_to=message)


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    yield n
    n.close()


@pytest.fixture
def no_sigint() -> Iterator[list[int]]:
    """Record SIGINTs instead of letting them stop pytest (Flower's HTTP retry invoker sends
    one to its own process when a task token is refused)."""
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGINT, previous)


def _start_worker(node: Node, **options: float) -> tuple[worker.Worker, threading.Thread]:
    w = worker.Worker(f"127.0.0.1:{node.port}", "party-1", 0.05, 0.05, 10.0, [], **options)
    w.load = lambda run, fab: _app  # type: ignore[method-assign]
    thread = threading.Thread(target=w.serve, daemon=True)
    thread.start()
    return w, thread


def _stop(w: worker.Worker, thread: threading.Thread) -> None:
    w.stop()
    thread.join(timeout=15)
    assert not thread.is_alive(), "the worker did not stop"


def _stopped(rid: int, object_id: str, fetch: Callable[[], bytes]) -> bytes:
    from flwr.supercore.run import RunNotRunningException

    raise RunNotRunningException  # what Flower's invoker raises on the SuperLink's 403


def test_flower_leaves_the_task_of_a_run_stopped_mid_message_pending(node: Node) -> None:
    # The cause, shown on Flower as installed (no clean-up of ours): the task stays pending.
    from flwr.common.constant import Status

    assert node.deliver(1, 5, _stopped) is None
    assert node.tasks()[1].status == Status.PENDING
    assert len(node.state.get_messages_legacy(run_ids=[1], is_reply=False)) == 1


def test_worker_gives_up_a_stopped_runs_task_when_the_next_run_arrives(node: Node, caplog,
                                                                       no_sigint) -> None:
    from flwr.common.constant import Status, SubStatus

    assert node.deliver(1, 5, _stopped) is None  # run 1 stopped: task left pending
    assert node.deliver(2, 21) == 2  # the next run's message, fully received
    with caplog.at_level(logging.WARNING, logger="liquid_fed.worker"):
        w, thread = _start_worker(node)  # claims run 1's task first (the oldest)
        t0 = time.monotonic()
        reply = node.wait_reply(15)
        took = time.monotonic() - t0
        assert reply is not None, "the worker never answered the next run's message"
        _stop(w, thread)
    assert reply == (2, 42)
    assert took < 10, took
    tasks = node.tasks()
    assert (tasks[1].status, tasks[1].sub_status) == (Status.FINISHED, SubStatus.FAILED)
    assert "newer task (run 2)" in tasks[1].details
    assert (tasks[2].status, tasks[2].sub_status) == (Status.FINISHED, SubStatus.COMPLETED)
    assert "gave up a task of run 1" in caplog.text
    assert no_sigint == []


def test_worker_gives_up_an_unpullable_task_after_its_pull_timeout(node: Node, caplog,
                                                                   no_sigint) -> None:
    from flwr.common.constant import Status, SubStatus

    assert node.deliver(1, 5, _stopped) is None
    with caplog.at_level(logging.WARNING, logger="liquid_fed.worker"):
        w, thread = _start_worker(node, pull_timeout=1.0)
        deadline = time.monotonic() + 15
        while node.tasks()[1].status != Status.FINISHED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.deliver(2, 4) == 2  # served after the given-up task
        reply = node.wait_reply(10)
        _stop(w, thread)
    assert (node.tasks()[1].status, node.tasks()[1].sub_status) == (Status.FINISHED,
                                                                      SubStatus.FAILED)
    assert "not pullable within 1 s" in node.tasks()[1].details
    assert "gave up a task of run 1" in caplog.text
    assert reply == (2, 8)
    assert no_sigint == []


def test_supernode_cleanup_finishes_the_stopped_runs_task(node: Node, monkeypatch,
                                                          caplog) -> None:
    from flwr.common.constant import Status, SubStatus
    from flwr.supernode import start_client_internal as sci

    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)
    assert supernode.install_stopped_run_cleanup() is True
    with caplog.at_level(logging.WARNING, logger="liquid_fed.supernode"):
        assert node.deliver(1, 5, _stopped) is None
    status = node.tasks()[1]
    assert (status.status, status.sub_status) == (Status.FINISHED, SubStatus.FAILED)
    assert "run 1 is no longer running at the SuperLink" in status.details
    assert node.state.get_messages_legacy(run_ids=[1], is_reply=False) == []
    assert "run 1 stopped while its message was being received" in caplog.text
    assert node.deliver(2, 3) == 2  # an ordinary message is received as before
    assert node.tasks()[2].status == Status.PENDING


def test_supernode_cleanup_is_not_installed_on_another_flower(monkeypatch, caplog) -> None:
    from flwr.supernode import start_client_internal as sci

    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)
    before = sci._pull_and_store_message
    monkeypatch.setitem(supernode.fastpath.SOURCE_SHA256, supernode.PULL_AND_STORE_REF,
                        "0" * 64)
    with caplog.at_level(logging.WARNING, logger="liquid_fed.supernode"):
        assert supernode.install_stopped_run_cleanup() is False
    assert sci._pull_and_store_message is before
    assert "_pull_and_store_message changed" in caplog.text


def test_worker_survives_the_supernode_revoking_a_task_it_has_claimed(node: Node, monkeypatch,
                                                                      caplog,
                                                                      no_sigint) -> None:
    # The race of the real deployment: the worker claims the task while the SuperNode still
    # pulls the message; then the run stops and the SuperNode (with its clean-up) finishes
    # the task, which revokes its token. Flower's retry invoker would SIGINT the worker.
    from flwr.common.constant import Status, SubStatus
    from flwr.supernode import start_client_internal as sci

    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)
    assert supernode.install_stopped_run_cleanup() is True

    def claimed_then_stopped(rid: int, object_id: str, fetch: Callable[[], bytes]) -> bytes:
        deadline = time.monotonic() + 10
        while node.tasks()[rid].status == Status.PENDING and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the worker now waits for the message's objects
        return _stopped(rid, object_id, fetch)

    with caplog.at_level(logging.WARNING, logger="liquid_fed.worker"):
        w, thread = _start_worker(node)
        assert node.deliver(1, 5, claimed_then_stopped) is None
        assert node.deliver(2, 10) == 2
        reply = node.wait_reply(15)
        alive = thread.is_alive()
        assert no_sigint == [], "Flower's retry invoker sent SIGINT to the worker's process"
        _stop(w, thread)
    assert alive, "the worker ended when its task's token was revoked"
    assert reply == (2, 20)
    assert node.tasks()[1].sub_status == SubStatus.FAILED
    assert (node.tasks()[2].status, node.tasks()[2].sub_status) == (Status.FINISHED,
                                                                      SubStatus.COMPLETED)
    assert "gave up a task of run 1" in caplog.text
