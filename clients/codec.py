"""Flower messages <-> the protocol's (arrays, settings) pairs: the codec of both Flower apps.

A message's arrays travel packed into one byte buffer, with an index in a ``ConfigRecord``
that says where each array lies. The buffer is one Flower ``Array`` whose bytes are the buffer
itself (``stype`` :data:`PACKED_STYPE`), not an ``.npy`` file: Flower's ``Array(ndarray)``
writes an ``.npy`` header and ``Array.numpy()`` parses it (with ``ast.literal_eval``), which
cost about 0.1 ms each way per message and per stored client state; one ``.npy`` per array
had cost a sixth of a simulation actor's time at 64 clients. :func:`unpack` trusts nothing in
a message it did not write: only plain numeric dtypes, shapes that match their byte counts,
every array inside the buffer and aligned; anything else is a :class:`ValueError` naming what
is wrong (the server counts that reply as a bad one).

Imports Flower (the library under ``liquid_fed/`` never does), starts nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

ARRAYS = "arrays"
SETTINGS = "settings"
INDEX = "index"
#: The one Array of a packed ArrayRecord.
PACKED = "packed"
#: Every packed array starts at a multiple of this many bytes (aligned for any dtype).
ALIGN = 64
#: Most arrays one message may carry (the protocol sends a handful; a checkpoint a few dozen).
MAX_ARRAYS = 4096
#: The dtype kinds a message may carry: bool, signed and unsigned integers, floats.
KINDS = "biuf"
#: The ``stype`` of an Array whose ``data`` is a packed buffer as it is (no ``.npy`` header).
PACKED_STYPE = "liquid-fed.packed"

#: Protocol message kinds -> Flower message types.
MESSAGE_TYPES = {
    "hello": "query.hello",
    "setup": "query.setup",
    "train": "train",
    "evaluate": "evaluate",
    "checkpoint": "query.checkpoint",
}


def pack(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """``arrays`` as one uint8 buffer (each array C-ordered, at a multiple of :data:`ALIGN`)
    and its index (JSON: ``[[name, dtype, shape, start, size], ...]``).

    Raises:
        ValueError: an array whose dtype is not a plain number or bool.
    """
    index, offset = [], 0
    contiguous = {}
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        if value.dtype.kind not in KINDS or value.dtype.fields is not None:
            raise ValueError(f"array {name!r}: dtype {value.dtype} cannot travel (numbers and "
                             "bools only)")
        contiguous[name] = value
        index.append([name, value.dtype.str, list(value.shape), offset, value.nbytes])
        offset += -(-value.nbytes // ALIGN) * ALIGN
    buffer = np.zeros(offset, dtype=np.uint8)
    for name, _, _, start, size in index:
        buffer[start:start + size] = contiguous[name].reshape(-1).view(np.uint8)
    return buffer, json.dumps(index)


def unpack(buffer: np.ndarray, index_json: str) -> dict[str, np.ndarray]:
    """The arrays :func:`pack` packed: views into ``buffer``, after checking every entry.

    Raises:
        ValueError: the index is not what :func:`pack` writes (names the entry and why).
    """
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError(f"packed arrays: the buffer is {buffer.dtype} of shape "
                         f"{buffer.shape}, not bytes")
    try:
        index = json.loads(index_json)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"packed arrays: the index is not JSON ({exc})") from exc
    if not isinstance(index, list) or len(index) > MAX_ARRAYS:
        raise ValueError(f"packed arrays: the index must be a list of at most {MAX_ARRAYS} "
                         "entries")
    out: dict[str, np.ndarray] = {}
    for entry in index:
        name, dtype, shape, start, size = _entry(entry)
        if name in out:
            raise ValueError(f"packed arrays: {name!r} appears twice")
        if not 0 <= start <= start + size <= buffer.size or start % ALIGN:
            raise ValueError(f"packed arrays: {name!r} lies outside the buffer or unaligned "
                             f"(bytes {start}..{start + size} of {buffer.size})")
        count = math.prod(shape)  # exact: the entries are checked non-negative ints
        if count * dtype.itemsize != size:
            raise ValueError(f"packed arrays: {name!r} has shape {shape} of {dtype} "
                             f"({count * dtype.itemsize} bytes) but {size} bytes")
        out[name] = buffer[start:start + size].view(dtype).reshape(shape)
    return out


def _entry(entry: Any) -> tuple[str, np.dtype, list[int], int, int]:
    """One index entry, checked: a name, a plain numeric dtype, a shape, start, size."""
    ok = (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str)
          and isinstance(entry[1], str) and isinstance(entry[2], list)
          and all(type(v) is int and v >= 0 for v in entry[2]) and len(entry[2]) <= 32
          and all(type(v) is int and v >= 0 for v in entry[3:]))
    if not ok:
        raise ValueError(f"packed arrays: bad index entry {str(entry)[:120]}")
    dtype = _DTYPES.get(entry[1])
    if dtype is None:
        try:
            dtype = np.dtype(entry[1])
        except TypeError as exc:
            raise ValueError(f"packed arrays: {entry[0]!r} has an unknown dtype "
                             f"{entry[1][:40]!r}") from exc
        if (dtype.kind not in KINDS or dtype.fields is not None or dtype.subdtype is not None
                or not dtype.isnative):
            raise ValueError(f"packed arrays: {entry[0]!r} has dtype {entry[1][:40]!r}; only "
                             "native numbers and bools travel")
    return entry[0], dtype, entry[2], entry[3], entry[4]


#: The dtypes that may travel, by the text :func:`pack` writes for them (``dtype.str``):
#: looked up instead of parsed, for every entry of every message. Other texts are parsed and
#: checked (a native numeric dtype spelled another way is still accepted).
_DTYPES = {np.dtype(t).str: np.dtype(t) for t in (
    "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")}


def buffer_array(buffer: np.ndarray):
    """A packed buffer (uint8, 1-D) as a Flower ``Array`` holding its bytes as they are."""
    from flwr.app import Array

    return Array(dtype=np.dtype(np.uint8).str, shape=(int(buffer.size),), stype=PACKED_STYPE,
                 data=buffer.tobytes())


def array_buffer(array: Any) -> np.ndarray:
    """The packed buffer an ``Array`` of :func:`buffer_array` holds (a writable copy); an
    ``.npy`` Array (a message or state written before this format) is read by Flower.

    Raises:
        ValueError: a packed Array whose dtype or shape does not match its bytes (an Array of
            another ``stype`` raises what Flower's reader raises: ``TypeError``).
    """
    if array.stype != PACKED_STYPE:
        return array.numpy()  # Flower's .npy reader, allow_pickle=False
    data = array.data
    size = len(data) if isinstance(data, bytes) else -1
    if array.dtype != np.dtype(np.uint8).str or tuple(array.shape) != (size,):
        raise ValueError(f"packed arrays: the buffer's Array says dtype {str(array.dtype)[:20]!r}"
                         f" and shape {str(array.shape)[:40]} for {size} bytes")
    return np.frombuffer(bytearray(data), dtype=np.uint8)


def encode(arrays: dict[str, np.ndarray], settings: dict[str, Any]):
    """A RecordDict holding numpy arrays (packed) and flat settings (int, float, str, bool,
    lists)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    buffer, index = pack(arrays)
    return RecordDict({ARRAYS: ArrayRecord({PACKED: buffer_array(buffer)}),
                       INDEX: ConfigRecord({INDEX: index}),
                       SETTINGS: ConfigRecord(dict(settings))})


def decode(content) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The inverse of :func:`encode`.

    Raises:
        ValueError: the arrays are not what :func:`encode` writes.
    """
    records, configs = content.array_records, content.config_records  # each built per call
    arrays = {}
    if ARRAYS in records:
        record = records[ARRAYS]
        if set(record.keys()) != {PACKED} or INDEX not in configs:
            raise ValueError("the message's arrays are not packed as liquid-fed packs them "
                             f"(arrays {sorted(record.keys())[:5]})")
        arrays = unpack(array_buffer(record[PACKED]), configs[INDEX].get(INDEX))
    settings = {}
    if SETTINGS in configs:
        settings = dict(configs[SETTINGS])
    return arrays, settings
