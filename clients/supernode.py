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

    def __init__(self, name: str, host: str, port: int, worker_args: list[str]) -> None:
        super().__init__(name="liquid-fed-worker-supervisor", daemon=True)
        self.node, self.host, self.port = name, host, port
        self.worker_args = worker_args
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
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_WORKER_DIED)

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()


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
        if mode == "fast":
            install_waits(args.hot_poll, args.idle_poll, args.hot_window, args.reply_poll)
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
