"""Guards for the Flower internals that the warm worker and the faster SuperNode rely on.

The warm ClientApp worker (:mod:`clients.worker`) re-implements Flower's one-shot
``flwr-clientapp`` as a loop, and the SuperNode wrapper (:mod:`clients.supernode`) shortens the
SuperNode's hard-coded waits. Both depend on private Flower functions. Each feature is used only
when the installed Flower is the version it was written for *and* the source of every function
it relies on or replaces is byte-for-byte the one it was written against (SHA-256 below);
otherwise :func:`usable` logs a warning and the caller keeps Flower's stock path, so an upstream
change can cost speed but never correctness.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

FLOWER_VERSION = "1.41.0"

#: SHA-256 of the source of each Flower function relied on or replaced (flwr 1.41.0).
SOURCE_SHA256 = {
    # The worker re-implements run_clientapp's body and pull_task_input (faster object-pull
    # backoff); it calls push_message and push_task_output as they are.
    "flwr.supernode.runtime.run_clientapp:run_clientapp":
        "6ce09559f3a2f5dcafb7d08f4b443585d76b9b53b9cb29ba1ec06a6982163443",
    "flwr.supernode.runtime.run_clientapp:pull_task_input":
        "5607a23e1673ee876930c1b35685b8dfdfd8b3776a436560b0467042e15fc695",
    "flwr.supernode.runtime.run_clientapp:push_message":
        "07cb512c93e065a93a4cba3facc7d37dd99758c56835065a63fdfbfc604dcd8a",
    "flwr.supernode.runtime.run_clientapp:push_task_output":
        "9206407456e79e17338d367de7c21e2d840d939de378c03ac61da6cc2b57a3c6",
    # The worker claims tasks as Flower's SuperExec does.
    "flwr.supercore.servicer.runtime.runtime_handlers:acquire_task":
        "e3701406b5547001d679f65d5aeb1ebdaf1e53a680fca9e39455d55ea3b0e003",
    # `--isolation process`: the SuperNode starts no SuperExec; its loop sleeps 3 s when idle.
    "flwr.supernode.start_client_internal:start_client_internal":
        "9e89a6eb68fbec6821e817cd2c09f7894fc7b0f5725c2365b19a7122307f11f3",
    # Waits for the ClientApp's reply every 0.5 s.
    "flwr.supernode.start_client_internal:_push_messages":
        "00bb86faffdec114db87e7f716af2acd901d12284e44f51f5c2a84704db05f64",
    # Pulls a message's objects with pull_objects' default backoff (1 s doubling to 10 s).
    "flwr.supernode.start_client_internal:_pull_and_store_message":
        "eaf5d0e36dc34e4cf46a490511d077ac55cc8edbbcdbe938c1f6dbcb758628be",
    # The ServerApp pulls a reply's objects with the same default backoff; the SuperLink hands
    # out a reply before its objects are uploaded, so a fast poll often waits 1 s or more.
    "flwr.superlink.grid.http_grid:HttpGrid.pull_messages":
        "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83",
}

#: What each feature relies on.
FEATURES = {
    "worker": (
        "flwr.supernode.runtime.run_clientapp:run_clientapp",
        "flwr.supernode.runtime.run_clientapp:pull_task_input",
        "flwr.supernode.runtime.run_clientapp:push_message",
        "flwr.supernode.runtime.run_clientapp:push_task_output",
        "flwr.supercore.servicer.runtime.runtime_handlers:acquire_task",
        "flwr.supernode.start_client_internal:start_client_internal",
    ),
    "waits": (
        "flwr.supernode.start_client_internal:start_client_internal",
        "flwr.supernode.start_client_internal:_push_messages",
        "flwr.supernode.start_client_internal:_pull_and_store_message",
    ),
    "server-pulls": ("flwr.superlink.grid.http_grid:HttpGrid.pull_messages",),
}

#: Retry an object that is not uploaded yet after 0.05 s, doubling to 0.5 s (Flower: 1 s
#: doubling to 10 s).
PULL_INITIAL_BACKOFF = 0.05
PULL_BACKOFF_CAP = 0.5


def source_sha256(fn: Callable[..., Any]) -> str:
    """SHA-256 of a function's source text."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def resolve(ref: str) -> Any:
    """The object named ``module:attribute`` (``attribute`` may be dotted)."""
    module, _, name = ref.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def problems(feature: str) -> list[str]:
    """Why ``feature`` does not fit the installed Flower (empty when it does)."""
    try:
        import flwr
    except ImportError:
        return ["Flower is not installed"]
    if flwr.__version__ != FLOWER_VERSION:
        return [f"Flower {flwr.__version__} is installed; written for {FLOWER_VERSION}"]
    found = []
    for ref in FEATURES[feature]:
        try:
            digest = source_sha256(resolve(ref))
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            found.append(f"{ref} cannot be read ({type(exc).__name__}: {exc})")
            continue
        if digest != SOURCE_SHA256[ref]:
            found.append(f"{ref} changed (source SHA-256 {digest[:12]}..., expected "
                         f"{SOURCE_SHA256[ref][:12]}...)")
    return found


def usable(feature: str) -> bool:
    """True when ``feature`` may be used; else a warning says why and False is returned."""
    if feature not in FEATURES:
        raise ValueError(f"feature: got {feature!r}; accepted: {sorted(FEATURES)}")
    found = problems(feature)
    if found:
        log.warning("the fast path '%s' does not fit the installed Flower; falling back to "
                    "Flower's stock path: %s", feature, "; ".join(found))
    return not found


def log_to_stderr(fmt: str, level: int = logging.INFO) -> None:
    """Send the ``liquid_fed`` loggers to stderr (for the worker and SuperNode processes).

    Only ``liquid_fed``: Flower's logger has its own handler, and the root logger would
    also print every HTTP request that httpx logs.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    logger = logging.getLogger("liquid_fed")
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def install_server_pulls() -> bool:
    """In a ServerApp process: retry a reply's objects that are not uploaded yet after 0.05 s
    (doubling to 0.5 s) instead of Flower's 1 s (doubling to 10 s). False, and Flower's kept,
    when the installed Flower is not the one this was written for."""
    if not usable("server-pulls"):
        return False
    import functools

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    if isinstance(http_grid.pull_objects, functools.partial):
        return True  # already installed
    http_grid.pull_objects = functools.partial(inflatable_utils.pull_objects,
                                               initial_backoff=PULL_INITIAL_BACKOFF,
                                               backoff_cap=PULL_BACKOFF_CAP)
    return True
