"""Train / validation / test splits by id, standardisation fitted on training rows, id alignment."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import reduce

import numpy as np

from liquid_fed.data.dataset import LAYOUTS, Dataset, check_choice, check_float, first_values
from liquid_fed.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """Sample ids of the train, validation and test splits (each sorted)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_dict(self) -> dict[str, list[int]]:
        """The ids as JSON-able lists."""
        return {k: [int(i) for i in getattr(self, k)] for k in ("train", "val", "test")}


def split_ids(ds: Dataset, val: float = 0.15, test: float = 0.2, seed: int = 0) -> Splits:
    """Split a data set's ids into train / validation / test, reproducibly from a seed.

    Classification splits are stratified: each class is shuffled and cut in the same
    proportions (rounded per class), so every split keeps the class balance. Regression data
    is shuffled and cut as a whole.

    Args:
        ds: the data set.
        val: share of samples in the validation split, in [0, 1).
        test: share of samples in the test split, in [0, 1); val + test < 1.
        seed: seed of the shuffle; the same seed gives the same splits.

    Returns:
        `Splits` of sorted int64 id arrays that together hold every id exactly once.

    Raises:
        ValueError: shares out of range.
        DataError: data too small to split: fewer than 2 samples, fewer than 2 training
            samples, a classification training split holding a single class, or a validation
            or test split left empty although its share is > 0; the message gives the counts
            and the config keys (``data.val``, ``data.test``) to change.
    """
    val = check_float("split.val", val, 0.0, 1.0, high_open=True)
    test = check_float("split.test", test, 0.0, 1.0, high_open=True)
    if val + test >= 1.0:
        raise ValueError(f"split.val + split.test must be < 1, got {val} + {test}")
    n = ds.n_samples
    if n < 2:
        raise DataError(f"split: data set {ds.name!r} has {n} sample{'s' * (n != 1)}; at least "
                        "2 are needed to train")
    rng = np.random.default_rng(seed)
    if ds.task == "classification":
        classes = np.unique(ds.labels)
        strata = [np.flatnonzero(ds.labels == c) for c in classes]
    else:
        classes = np.zeros(0, dtype=np.int64)
        strata = [np.arange(n)]
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for rows in strata:
        rows = rng.permutation(rows)
        n_test, n_val = round(len(rows) * test), round(len(rows) * val)
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test:n_test + n_val])
        parts["train"].append(rows[n_test + n_val:])
    out = {k: np.sort(ds.ids[np.concatenate(v)]).astype(np.int64) for k, v in parts.items()}
    shares = f"data.val={val}, data.test={test}"
    n_train = out["train"].size
    if n_train < 2:
        raise DataError(f"split: {n_train} training sample{'s' * (n_train != 1)} left from {n} "
                        f"with {shares}; at least 2 are needed (lower data.val or data.test, "
                        "or add rows)")
    if ds.task == "classification":
        in_train = [c for c, t in zip(classes.tolist(), parts["train"], strict=True) if t.size]
        if len(in_train) == 1:
            only = _class_name(ds, in_train[0])
            others = ("the other class is" if classes.size == 2
                      else f"the other {classes.size - 1} classes are")
            detail = ("the data holds no other class" if classes.size == 1 else
                      f"{others} too small to keep a training sample with {shares}")
            raise DataError(f"split: the training split ({n_train} samples) holds a single "
                            f"class {only!r}; {detail}; classification needs at least 2")
        if len(in_train) < classes.size:
            missing = [_class_name(ds, c) for c in classes.tolist() if c not in in_train]
            logger.warning("split: classes %s have no training sample with %s", missing, shares)
    for key, share, part, what in (("data.val", val, "val", "validation"),
                                   ("data.test", test, "test", "test")):
        if share > 0 and out[part].size == 0:
            per = (f" in {classes.size} classes, each too small for a {what} sample"
                   if ds.task == "classification" else "")
            raise DataError(f"split: {key}={share} leaves the {what} split empty: {n} "
                            f"samples{per}; raise {key}, set it to 0, or add rows")
    logger.debug("split %s: train %d, val %d, test %d", ds.name, out["train"].size,
                 out["val"].size, out["test"].size)
    return Splits(**out)


def _class_name(ds: Dataset, code: int) -> str:
    """A class as the data names it (its original label), else its code."""
    return ds.class_names[code] if code < len(ds.class_names) else str(code)


class Standardizer:
    """Zero mean, unit variance, with statistics fitted on training rows only.

    Statistics are per column for "tabular" (N, F), per channel over samples and steps for
    "sequence" (N, T, C), and one global mean and std for "image" (N, H, W), since per-pixel
    scaling would blow up near-constant border pixels. Features with (near) zero spread are
    only centred.
    """

    def __init__(self, layout: str = "tabular") -> None:
        self.layout = check_choice("standardizer.layout", layout, LAYOUTS)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def _axes(self, x: np.ndarray) -> tuple[int, ...]:
        """The axes statistics are taken over, after checking the array's rank."""
        if self.layout == "image" and x.ndim == 2:
            return (0, 1)  # pixels of a view that is no rectangle (random, importance splits)
        ndim = 2 if self.layout == "tabular" else 3
        if x.ndim != ndim:
            raise ValueError(f"standardizer: layout {self.layout!r} needs {ndim}-D arrays"
                             + (" (or 2-D flattened pixels)" if self.layout == "image" else "")
                             + f", got shape {x.shape}")
        return {"tabular": (0,), "sequence": (0, 1), "image": (0, 1, 2)}[self.layout]

    def fit(self, x: np.ndarray) -> Standardizer:
        """Fit mean and std on `x` (training rows only); returns self."""
        x = np.asarray(x, dtype=np.float64)
        axes = self._axes(x)
        if x.shape[0] == 0:
            raise ValueError("standardizer: cannot fit on zero rows")
        self.mean = x.mean(axis=axes)
        std = x.std(axis=axes)
        self.std = np.where(std > 1e-8, std, 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise `x` with the fitted statistics, as float32."""
        if self.mean is None or self.std is None:
            raise RuntimeError("standardizer: call fit() before transform()")
        x = np.asarray(x, dtype=np.float64)
        self._axes(x)
        if self.mean.ndim and x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"standardizer: fitted on {self.mean.shape[0]} features, got "
                             f"shape {x.shape}")
        return ((x - self.mean) / self.std).astype(np.float32)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        """Fit on `x` and standardise it."""
        return self.fit(x).transform(x)

    def to_dict(self) -> dict:
        """JSON-able statistics, for checkpoints."""
        if self.mean is None or self.std is None:
            raise RuntimeError("standardizer: call fit() before to_dict()")
        return {"layout": self.layout, "mean": np.asarray(self.mean).tolist(),
                "std": np.asarray(self.std).tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> Standardizer:
        """Rebuild a fitted standardizer from `to_dict()` output."""
        missing = {"layout", "mean", "std"} - set(state)
        if missing:
            raise ValueError(f"standardizer: state lacks keys {sorted(missing)}")
        out = cls(state["layout"])
        out.mean = np.asarray(state["mean"], dtype=np.float64)
        out.std = np.asarray(state["std"], dtype=np.float64)
        return out


def standardize(ds: Dataset, splits: Splits) -> tuple[Dataset, Standardizer]:
    """Standardise a data set with statistics fitted on its training split only.

    Args:
        ds: the data set.
        splits: its splits; only `splits.train` rows are used to fit.

    Returns:
        A copy of `ds` with standardised features, and the fitted `Standardizer`.

    Raises:
        ValueError: training ids not in the data set.
    """
    scaler = Standardizer(ds.layout).fit(ds.features[ds.positions(splits.train)])
    return dataclasses.replace(ds, features=scaler.transform(ds.features)), scaler


def common_ids(holders: dict[str, np.ndarray]) -> np.ndarray:
    """Sorted ids that every holder has."""
    if not holders:
        return np.zeros(0, dtype=np.int64)
    return reduce(np.intersect1d, [np.asarray(v, dtype=np.int64) for v in holders.values()])


def align_ids(requested: np.ndarray, holders: dict[str, np.ndarray]) -> np.ndarray:
    """Check that every holder has every requested id.

    Args:
        requested: ids the server asks for, (n,) integers without repeats.
        holders: name (e.g. "client_0", "server") -> the ids that party holds.

    Returns:
        `requested` as int64, in the order given.

    Raises:
        ValueError: requested ids repeat or are not integers, or some holder lacks some ids;
            the message says how many ids are missing at which holder and shows the first few.
    """
    requested = np.asarray(requested)
    if requested.ndim != 1 or (requested.size and not np.issubdtype(requested.dtype,
                                                                     np.integer)):
        raise ValueError(f"align: requested ids must be a 1-D integer array, got "
                         f"{requested.dtype} with shape {requested.shape}")
    requested = requested.astype(np.int64)
    uniq, counts = np.unique(requested, return_counts=True)
    if uniq.size != requested.size:
        raise ValueError(f"align: requested ids repeat: {first_values(uniq[counts > 1])}")
    problems = []
    for name, held in holders.items():
        missing = requested[~np.isin(requested, np.asarray(held))]
        if missing.size:
            problems.append(f"{missing.size} missing at {name!r} (first: {first_values(missing)})")
    if problems:
        n_bad = np.zeros(requested.size, dtype=bool)
        for held in holders.values():
            n_bad |= ~np.isin(requested, np.asarray(held))
        raise ValueError(f"align: {int(n_bad.sum())} of {requested.size} requested ids are not "
                         f"held by every party: " + "; ".join(problems))
    return requested
