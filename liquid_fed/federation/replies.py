"""The server's checks of every client reply, before anything in it touches the loss.

A client is a party the server does not control: its reply may be stale, truncated, of the
wrong shape or dtype, or hostile (NaN, inf, 1e30 outputs that would poison every honest expert
through the shared loss). :func:`check_reply` accepts a reply only when its keys, dtypes, shapes
and values are what the protocol defines, and when it answers the ids that were asked (the
client echoes a digest of them); otherwise it raises :class:`ClientFailure` naming the client,
the message kind, the array and what was wrong. Signals are checked the same way on the client
side (:func:`check_signals`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from liquid_fed.errors import ClientFailure

Arrays = dict[str, np.ndarray]

#: Tolerance of a delegation row's sum (float32 softmax rows are within ~1e-6 of 1).
ROW_SUM_TOLERANCE = 1e-4


def ids_digest(ids: np.ndarray) -> np.ndarray:
    """16 bytes identifying an id sequence (order included): the reply's echo of its request."""
    data = np.ascontiguousarray(np.asarray(ids, dtype="<i8")).tobytes()
    return np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), dtype=np.uint8).copy()


def _fail(who: str, kind: str, what: str) -> ClientFailure:
    return ClientFailure(f'{who} sent a bad reply to "{kind}": {what}')


def _array(reply: Mapping[str, Any], key: str, who: str, kind: str) -> np.ndarray:
    if key not in reply:
        raise _fail(who, kind, f"no array {key!r} (arrays: {', '.join(sorted(reply)) or 'none'})")
    value = reply[key]
    if not isinstance(value, np.ndarray):
        raise _fail(who, kind, f"{key!r} is a {type(value).__name__}, not an array")
    return value


def _float_block(reply: Mapping[str, Any], key: str, shape: tuple[int, int], who: str,
                 kind: str, limit: float) -> np.ndarray:
    a = _array(reply, key, who, kind)
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
        raise _fail(who, kind, f"{key!r} has dtype {a.dtype}; expected float32 or float64")
    if a.shape != shape:
        raise _fail(who, kind, f"{key!r} has shape {a.shape}; expected {shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise _fail(who, kind, f"{key!r}[{i}, {j}] is {a[i, j]}; values must be finite")
    big = np.abs(a) > limit
    if big.any():
        i, j = np.argwhere(big)[0]
        raise _fail(who, kind, f"{key!r}[{i}, {j}] is {a[i, j]:.6g}, beyond the accepted "
                               f"magnitude {limit:g} (server.reply_limit)")
    return a


def check_prediction_reply(reply: Mapping[str, Any], ids: np.ndarray, n_outputs: int,
                           n_clients: int, who: str, kind: str,
                           limit: float = 1e6) -> Arrays:
    """Check a ``train``/``evaluate`` reply: ``pred`` (n, C), ``del`` (n, K), ``present`` (n,)
    and the echo of ``ids``.

    Args:
        reply: the reply's arrays.
        ids: the ids the request asked for (n,).
        n_outputs: C.
        n_clients: K.
        who: how the client is named in errors (e.g. ``client 2 (node 123)``).
        kind: the message kind.
        limit: the largest |prediction| accepted.

    Returns:
        The reply (unchanged) once it passed.

    Raises:
        ClientFailure: naming the client and what was wrong.
    """
    n = int(np.asarray(ids).shape[0])
    echo = _array(reply, "ids_digest", who, kind)
    if echo.dtype != np.uint8 or not np.array_equal(echo, ids_digest(ids)):
        raise _fail(who, kind, f"it answers other ids than the {n} asked for (the echoed id "
                               "digest does not match: a stale or misrouted reply)")
    _float_block(reply, "pred", (n, n_outputs), who, kind, limit)
    dele = _float_block(reply, "del", (n, n_clients), who, kind, limit)
    if (dele < 0).any():
        i, j = np.argwhere(dele < 0)[0]
        raise _fail(who, kind, f"'del'[{i}, {j}] is {dele[i, j]:.6g}; delegation weights must "
                               "be >= 0")
    sums = dele.sum(axis=1, dtype=np.float64)
    off = np.abs(sums - 1) > ROW_SUM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise _fail(who, kind, f"delegation row {i} sums to {sums[i]:.10g}; every row must sum "
                               f"to 1 (tolerance {ROW_SUM_TOLERANCE:g})")
    present = _array(reply, "present", who, kind)
    if present.dtype != np.bool_ or present.shape != (n,):
        raise _fail(who, kind, f"'present' has dtype {present.dtype} and shape {present.shape}; "
                               f"expected bool ({n},)")
    return dict(reply)


def check_setup_reply(reply: Mapping[str, Any], info: Mapping[str, Any], who: str) -> None:
    """Check a ``setup`` reply: unique integer ``ids``, ``absent`` among them, ``n_params``."""
    ids = _array(reply, "ids", who, "setup")
    absent = _array(reply, "absent", who, "setup")
    for key, a in (("ids", ids), ("absent", absent)):
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise _fail(who, "setup", f"{key!r} has dtype {a.dtype} and shape {a.shape}; "
                                      "expected a 1-D integer array")
    if np.unique(ids).size != ids.size:
        raise _fail(who, "setup", "'ids' repeat")
    if not np.isin(absent, ids).all():
        raise _fail(who, "setup", "'absent' names ids the client does not hold")
    n_params = info.get("n_params")
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 0:
        raise _fail(who, "setup", f"n_params is {n_params!r}; expected a non-negative integer")


def check_state_reply(reply: Mapping[str, Any], who: str) -> None:
    """Check a ``checkpoint`` reply: numeric arrays, finite floats (a client's own state)."""
    for key, a in reply.items():
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
            raise _fail(who, "checkpoint", f"{key!r} is not a numeric array")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise _fail(who, "checkpoint", f"{key!r} holds values that are not finite")


def check_signals(arrays: Mapping[str, Any], n_rows: int, n_outputs: int,
                  n_clients: int) -> None:
    """The client's check of the server's signals: ``g_pred`` (n, C), ``g_del`` (n, K), finite.

    Raises:
        ValueError: naming the array and what was wrong.
    """
    for key, width in (("g_pred", n_outputs), ("g_del", n_clients)):
        a = arrays.get(key)
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.shape != (n_rows, width):
            got = (a.dtype, a.shape) if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"server signal {key!r} is {got}; expected floats of shape "
                             f"({n_rows}, {width})")
        if not np.isfinite(a).all():
            raise ValueError(f"server signal {key!r} holds values that are not finite")
