"""Flower messages <-> the protocol's (arrays, settings) pairs: the codec of both Flower apps.

Imports Flower (the library under ``liquid_fed/`` never does), starts nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ARRAYS = "arrays"
SETTINGS = "settings"

#: Protocol message kinds -> Flower message types.
MESSAGE_TYPES = {
    "hello": "query.hello",
    "setup": "query.setup",
    "train": "train",
    "evaluate": "evaluate",
    "checkpoint": "query.checkpoint",
}


def encode(arrays: dict[str, np.ndarray], settings: dict[str, Any]):
    """A RecordDict holding numpy arrays and flat settings (int, float, str, bool, lists)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return RecordDict({ARRAYS: record, SETTINGS: ConfigRecord(dict(settings))})


def decode(content) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The inverse of :func:`encode`."""
    arrays = {}
    if ARRAYS in content.array_records:
        arrays = {k: v.numpy() for k, v in content.array_records[ARRAYS].items()}
    settings = {}
    if SETTINGS in content.config_records:
        settings = dict(content.config_records[SETTINGS])
    return arrays, settings
