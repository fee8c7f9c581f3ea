"""Data sets: the `Dataset` record, the bundled scikit-learn sets and the registry by name."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

TASKS = ("classification", "regression")
LAYOUTS = ("tabular", "image", "sequence")


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
        _check_dataset(self)

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
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        where = np.clip(np.searchsorted(sorted_ids, ids), 0, max(self.n_samples - 1, 0))
        found = sorted_ids[where] == ids if self.n_samples else np.zeros(ids.shape, bool)
        if not np.all(found):
            bad = ids[~found]
            raise ValueError(
                f"{bad.size} of {ids.size} ids are not in data set {self.name!r} "
                f"(first: {_first(bad)})"
            )
        return order[where]

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


def _first(values: np.ndarray, n: int = 5) -> str:
    """The first `n` values of an array as text, with an ellipsis if there are more."""
    shown = ", ".join(str(v) for v in np.asarray(values).ravel()[:n].tolist())
    return shown + (", ..." if np.asarray(values).size > n else "")


def _check_int(key: str, value: object, minimum: int = 0) -> int:
    """An integer option >= minimum, or a ValueError naming the key and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(key: str, value: object, low: float, high: float,
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


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    """One of `choices`, or a ValueError naming the key, the value and the choices."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
    return str(value)


def _check_dataset(ds: Dataset) -> None:
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
        raise ValueError(f"{where}: ids must be unique; duplicated: {_first(uniq[counts > 1])}")
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


# ---- bundled scikit-learn sets ------------------------------------------------------------


def _pixel_names(h: int, w: int) -> list[str]:
    """Pixel names "r{i}c{j}" in row-major order."""
    return [f"r{i}c{j}" for i in range(h) for j in range(w)]


def _sk_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ((N, 8, 8) float32, (N,) int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def load_digits_image() -> Dataset:
    """scikit-learn digits as 8x8 images: 1,797 samples, 10 classes."""
    x, y = _sk_digits()
    return Dataset("digits", np.arange(len(y)), x, y, "classification", "image",
                   _pixel_names(8, 8), 10, class_names=[str(c) for c in range(10)])


def load_digits_flat() -> Dataset:
    """scikit-learn digits as 64 pixel columns "r{i}c{j}"."""
    x, y = _sk_digits()
    return Dataset("digits_flat", np.arange(len(y)), x.reshape(len(y), 64), y, "classification",
                   "tabular", _pixel_names(8, 8), 10, class_names=[str(c) for c in range(10)])


def load_digits_rows() -> Dataset:
    """scikit-learn digits read as a sequence of 8 rows (steps) with 8 channels (columns)."""
    x, y = _sk_digits()
    return Dataset("digits_rows", np.arange(len(y)), x, y, "classification", "sequence",
                   [f"c{j}" for j in range(8)], 10, class_names=[str(c) for c in range(10)])


def load_breast_cancer() -> Dataset:
    """scikit-learn breast cancer: 569 x 30, binary; groups "mean", "se", "worst"."""
    from sklearn.datasets import load_breast_cancer as sk_load

    b = sk_load()
    names = [str(n) for n in b.feature_names]
    groups = {
        "mean": [n for n in names if n.startswith("mean ")],
        "se": [n for n in names if n.endswith(" error")],
        "worst": [n for n in names if n.startswith("worst ")],
    }
    return Dataset("breast_cancer", np.arange(len(b.target)), b.data, b.target, "classification",
                   "tabular", names, 2, groups=groups, class_names=[str(c) for c in b.target_names])


def load_wine() -> Dataset:
    """scikit-learn wine: 178 x 13, 3 classes."""
    from sklearn.datasets import load_wine as sk_load

    b = sk_load()
    return Dataset("wine", np.arange(len(b.target)), b.data, b.target, "classification",
                   "tabular", list(b.feature_names), 3,
                   class_names=[str(c) for c in b.target_names])


def load_diabetes() -> Dataset:
    """scikit-learn diabetes: 442 x 10, regression on the raw target; groups demographics/serum."""
    from sklearn.datasets import load_diabetes as sk_load

    b = sk_load()
    names = list(b.feature_names)
    groups = {"demographics": ["age", "sex", "bmi", "bp"],
              "serum": [n for n in names if n.startswith("s") and n != "sex"]}
    return Dataset("diabetes", np.arange(len(b.target)), b.data, b.target, "regression",
                   "tabular", names, 1, groups=groups)


def load_iris() -> Dataset:
    """scikit-learn iris: 150 x 4, 3 classes; groups "sepal" and "petal"."""
    from sklearn.datasets import load_iris as sk_load

    b = sk_load()
    names = [str(n) for n in b.feature_names]
    groups = {"sepal": [n for n in names if n.startswith("sepal")],
              "petal": [n for n in names if n.startswith("petal")]}
    return Dataset("iris", np.arange(len(b.target)), b.data, b.target, "classification",
                   "tabular", names, 3, groups=groups,
                   class_names=[str(c) for c in b.target_names])


# Loaders live in sibling modules that import `Dataset` from here, so they are imported last.
from liquid_fed.data import files, mfeat, synthetic  # noqa: E402

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits_image,
    "digits_flat": load_digits_flat,
    "breast_cancer": load_breast_cancer,
    "wine": load_wine,
    "diabetes": load_diabetes,
    "iris": load_iris,
    "synthetic_regions": synthetic.synthetic_regions,
    "sensors": synthetic.sensors,
    "digits_rows": load_digits_rows,
    "csv": files.load_csv,
    "npz": files.load_npz,
    "mfeat": mfeat.load_mfeat,
}


def load_dataset(name: str, **options: object) -> Dataset:
    """Load a data set from the registry by name.

    Args:
        name: a key of `DATASETS` ("digits", "breast_cancer", "synthetic_regions", "csv", ...).
        **options: keyword options of that loader (e.g. `n_samples=500, seed=1` for the
            synthetic sets; `path=..., label=...` for "csv").

    Returns:
        The loaded `Dataset`.

    Raises:
        ValueError: unknown name, unknown option, or an option value the loader rejects.
    """
    if name not in DATASETS:
        raise ValueError(f'data.name: unknown data set "{name}"; must be one of {sorted(DATASETS)}')
    loader = DATASETS[name]
    params = inspect.signature(loader).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in options if k not in params]
    if unknown and not accepts_any:
        raise ValueError(f'data: data set "{name}" has no option "{unknown[0]}" '
                         f"(options: {', '.join(params) or 'none'})")
    required = [k for k, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind is not inspect.Parameter.VAR_KEYWORD and k not in options]
    if required:
        raise ValueError(f'data: data set "{name}" needs option "{required[0]}" '
                         f"(options: {', '.join(params)})")
    ds = loader(**options)
    logger.debug("loaded %s: %d samples, features %s, task %s", name, ds.n_samples,
                 ds.features.shape, ds.task)
    return ds
