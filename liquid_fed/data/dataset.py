"""The `Dataset` record, the public checks every loader and partitioner uses, and one id index.

Every module of :mod:`liquid_fed.data` (and the federation) looks ids up through
:class:`IdIndex`, and checks options through :func:`check_int`, :func:`check_float` and
:func:`check_choice`, whose errors name the key, the value and what is accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: Tasks of labelled data sets (the ensemble also combines unlabelled embeddings).
TASKS = ("classification", "regression")
LAYOUTS = ("tabular", "image", "sequence")


class IdIndex:
    """Row positions of sample ids, vectorised (sorted ids + searchsorted): the one id lookup.

    Args:
        ids: the ids held, (N,) integers, unique.
        holder: how errors name whoever holds them (``client``, ``server``, a data set).
    """

    def __init__(self, ids: np.ndarray, holder: str = "holder", what: str = "sample id") -> None:
        self.order = np.argsort(np.asarray(ids), kind="stable")
        self.sorted = np.asarray(ids, dtype=np.int64)[self.order]
        self.holder = holder
        self.what = what

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, found): positions of ``ids`` (meaningless where not found)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.sorted.size == 0:
            return np.zeros(ids.shape, dtype=np.int64), np.zeros(ids.shape, dtype=bool)
        at = np.searchsorted(self.sorted, ids).clip(0, self.sorted.size - 1)
        return self.order[at], self.sorted[at] == ids

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids``; an unknown id is an error naming it."""
        pos, found = self.lookup(ids)
        if not found.all():
            missing = np.asarray(ids, dtype=np.int64)[~found]
            raise ValueError(f"{self.holder} does not hold {self.what} {int(missing[0])}")
        return pos


@dataclass
class Dataset:
    """Samples with ids, features, labels and, where known, their ground-truth region."""

    name: str
    ids: np.ndarray  # (N,) int64, unique
    features: np.ndarray  # float32: tabular (N, F); image (N, H, W); sequence (N, T, C)
    labels: np.ndarray  # classification (N,) int64; regression (N,) or (N, O) float32
    task: str
    layout: str
    feature_names: list[str]  # tabular: F columns; image: H*W "r{i}c{j}"; sequence: C channels
    n_outputs: int  # classes (classification) or output dims (regression)
    regions: np.ndarray | None = None  # (N,) int64
    informative_view: np.ndarray | None = None  # (N,) int64
    groups: dict[str, list[str]] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids)
        self.features = np.asarray(self.features, dtype=np.float32)
        self.feature_names = [str(n) for n in self.feature_names]
        check_dataset(self)

    @property
    def n_samples(self) -> int:
        """Number of samples N."""
        return int(self.ids.shape[0])

    @property
    def n_features(self) -> int:
        """Length of the feature axis views split: columns, pixels or channels."""
        return len(self.feature_names)

    def positions(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Row positions of `ids` in this data set (all rows if None); unknown ids are an error."""
        if ids is None:
            return np.arange(self.n_samples)
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must be a 1-D array, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        pos, found = self.index.lookup(ids)
        if not np.all(found):
            bad = ids[~found]
            raise ValueError(
                f"{bad.size} of {ids.size} ids are not in data set {self.name!r} "
                f"(first: {first_values(bad)})"
            )
        return pos

    @property
    def index(self) -> IdIndex:
        """The id index of this data set (built once)."""
        cached = self.__dict__.get("_index")
        if cached is None or cached.sorted.size != self.ids.size:
            cached = self.__dict__["_index"] = IdIndex(self.ids, f"data set {self.name!r}")
        return cached

    def subset(self, ids: np.ndarray) -> Dataset:
        """A new data set holding only the samples `ids`, in that order."""
        pos = self.positions(ids)
        pick = (lambda a: None if a is None else a[pos])  # noqa: E731
        return Dataset(
            name=self.name, ids=self.ids[pos], features=self.features[pos],
            labels=self.labels[pos], task=self.task, layout=self.layout,
            feature_names=list(self.feature_names), n_outputs=self.n_outputs,
            regions=pick(self.regions), informative_view=pick(self.informative_view),
            groups={k: list(v) for k, v in self.groups.items()},
            class_names=list(self.class_names),
        )


def first_values(values: np.ndarray, n: int = 5) -> str:
    """The first `n` values of an array as text, with an ellipsis if there are more."""
    shown = ", ".join(str(v) for v in np.asarray(values).ravel()[:n].tolist())
    return shown + (", ..." if np.asarray(values).size > n else "")


def check_int(key: str, value: object, minimum: int = 0) -> int:
    """An integer option >= minimum, or a ValueError naming the key and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(key: str, value: object, low: float, high: float,
                 high_open: bool = False) -> float:
    """A number in [low, high] (or [low, high) if high_open), or a ValueError naming the key."""
    bracket = ")" if high_open else "]"
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = low <= v and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{key} must be a number in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    """One of `choices`, or a ValueError naming the key, the value and the choices."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_dataset(ds: Dataset) -> None:
    """Check a data set's fields agree with each other; raise ValueError naming the field."""
    where = f"dataset {ds.name!r}"
    if ds.task not in TASKS:
        raise ValueError(f"{where}: task {ds.task!r} is not one of {list(TASKS)}")
    if ds.layout not in LAYOUTS:
        raise ValueError(f"{where}: layout {ds.layout!r} is not one of {list(LAYOUTS)}")
    if ds.ids.ndim != 1 or not np.issubdtype(ds.ids.dtype, np.integer):
        raise ValueError(f"{where}: ids must be a 1-D integer array, got {ds.ids.dtype} "
                         f"with shape {ds.ids.shape}")
    ds.ids = ds.ids.astype(np.int64)
    n = ds.ids.shape[0]
    uniq, counts = np.unique(ds.ids, return_counts=True)
    if uniq.size != n:
        raise ValueError(f"{where}: ids must be unique; duplicated: "
                         f"{first_values(uniq[counts > 1])}")
    ndim = {"tabular": 2, "image": 3, "sequence": 3}[ds.layout]
    if ds.features.ndim != ndim or ds.features.shape[0] != n:
        raise ValueError(f"{where}: layout {ds.layout!r} needs features of {ndim} dims with "
                         f"{n} rows, got shape {ds.features.shape}")
    n_feat = {"tabular": lambda s: s[1], "image": lambda s: s[1] * s[2],
              "sequence": lambda s: s[2]}[ds.layout](ds.features.shape)
    if len(ds.feature_names) != n_feat:
        raise ValueError(f"{where}: {len(ds.feature_names)} feature names for {n_feat} features")
    if len(set(ds.feature_names)) != n_feat:
        raise ValueError(f"{where}: feature names must be unique")
    if ds.labels.shape[:1] != (n,):
        raise ValueError(f"{where}: labels have shape {ds.labels.shape}, expected {n} rows")
    if ds.task == "classification":
        ds.labels = np.asarray(ds.labels)
        if ds.labels.ndim != 1 or not np.issubdtype(ds.labels.dtype, np.integer):
            raise ValueError(f"{where}: classification labels must be a 1-D integer array, got "
                             f"{ds.labels.dtype} with shape {ds.labels.shape}")
        ds.labels = ds.labels.astype(np.int64)
        if n and (ds.labels.min() < 0 or ds.labels.max() >= ds.n_outputs):
            raise ValueError(f"{where}: labels must lie in [0, {ds.n_outputs}), got "
                             f"[{ds.labels.min()}, {ds.labels.max()}]")
    else:
        ds.labels = np.asarray(ds.labels, dtype=np.float32)
        outs = 1 if ds.labels.ndim == 1 else ds.labels.shape[1]
        if ds.labels.ndim > 2 or outs != ds.n_outputs:
            raise ValueError(f"{where}: regression labels of shape {ds.labels.shape} do not "
                             f"match n_outputs={ds.n_outputs}")
    for key in ("regions", "informative_view"):
        value = getattr(ds, key)
        if value is not None:
            value = np.asarray(value)
            if value.shape != (n,) or not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"{where}: {key} must be ({n},) integers, got {value.dtype} "
                                 f"{value.shape}")
            setattr(ds, key, value.astype(np.int64))
    known = set(ds.feature_names)
    for group, names in ds.groups.items():
        unknown = [c for c in names if c not in known]
        if unknown:
            raise ValueError(f"{where}: group {group!r} names unknown features {unknown[:5]}")


def pixel_names(h: int, w: int) -> list[str]:
    """Pixel names "r{i}c{j}" in row-major order."""
    return [f"r{i}c{j}" for i in range(h) for j in range(w)]
