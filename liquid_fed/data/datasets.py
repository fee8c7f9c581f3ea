"""Data sets by name: the bundled scikit-learn sets, synthetic sets, files, and the registry."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import numpy as np

from liquid_fed.data import bikeshare, files, mfeat, mnist, synthetic
from liquid_fed.data.dataset import Dataset, pixel_names

logger = logging.getLogger(__name__)


# ---- bundled scikit-learn sets ------------------------------------------------------------


def _sk_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ((N, 8, 8) float32, (N,) int64).

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixel
    columns and the label, as ``load_digits`` reads it) without importing scikit-learn, which
    costs about a second in every process that loads the digits: the launcher's checks, the
    server and each client actor. Falls back to ``load_digits`` where the file is not there.
    """
    table = _sk_data_file("digits.csv.gz")
    if table is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    data = np.loadtxt(table, delimiter=",")
    return (data[:, :-1].reshape(-1, 8, 8).astype(np.float32),
            data[:, -1].astype(np.int64))


def _sk_data_file(name: str) -> str | None:
    """Path of a data file scikit-learn bundles, found without importing scikit-learn."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # a top-level package: found, not executed
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / name
        if path.is_file():
            return str(path)
    return None


def load_digits_image() -> Dataset:
    """scikit-learn digits as 8x8 images: 1,797 samples, 10 classes."""
    x, y = _sk_digits()
    return Dataset("digits", np.arange(len(y)), x, y, "classification", "image",
                   pixel_names(8, 8), 10, class_names=[str(c) for c in range(10)])


def load_digits_flat() -> Dataset:
    """scikit-learn digits as 64 pixel columns "r{i}c{j}"."""
    x, y = _sk_digits()
    return Dataset("digits_flat", np.arange(len(y)), x.reshape(len(y), 64), y, "classification",
                   "tabular", pixel_names(8, 8), 10, class_names=[str(c) for c in range(10)])


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
    "mnist_5k": mnist.load_mnist,
    "bikeshare": bikeshare.load_bikeshare,
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
