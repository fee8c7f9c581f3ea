"""User data from files: CSV tables and NPZ arrays, checked with errors that say where."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from liquid_fed.data.datasets import LAYOUTS, TASKS, Dataset, _check_choice, _pixel_names

logger = logging.getLogger(__name__)

_MISSING = {"", "na", "nan", "null", "none"}


def _label_codes(raw: np.ndarray, where: str, row_name: Callable[[int], str]
                 ) -> tuple[np.ndarray, list[str]]:
    """Class labels (numbers or strings) as codes 0..C-1 and the class names, sorted."""
    try:
        as_num = raw.astype(np.float64)
    except ValueError:
        as_num = None
    if as_num is not None and np.all(as_num == np.round(as_num)):
        classes, codes = np.unique(as_num, return_inverse=True)
        names = [str(int(c)) for c in classes]
    elif as_num is not None:
        bad = int(np.flatnonzero(as_num != np.round(as_num))[0])
        raise ValueError(f"{where}: classification labels must be integers or names; "
                         f"{str(raw[bad])!r} at {row_name(bad)} is neither "
                         "(use task='regression'?)")
    else:
        classes, codes = np.unique(raw.astype(str), return_inverse=True)
        names = [str(c) for c in classes]
    return codes.astype(np.int64), names


def _row(i: int) -> str:
    """How a row is named in CSV messages: 1-based data row and the file line (header is 1)."""
    return f"row {i + 1} (line {i + 2})"


def load_csv(
    path: str | Path,
    label: str | list[str],
    features: list[str] | None = None,
    id_column: str | None = None,
    task: str = "classification",
    delimiter: str = ",",
    name: str | None = None,
) -> Dataset:
    """Load a table with a header row as a tabular data set.

    Args:
        path: the CSV file.
        label: the label column (a list of columns for multi-output regression).
        features: feature columns by name; default every column but the id and labels.
        id_column: column of unique integer sample ids; default the row order 0..N-1.
        task: "classification" (labels may be integers or names, coded 0..C-1 in sorted
            order; `class_names` keeps the originals) or "regression".
        delimiter: the field separator.
        name: the data set's name; default the file's stem.

    Returns:
        A tabular `Dataset`.

    Raises:
        ValueError: a missing column, a row of the wrong length, a non-numeric or missing
            feature value, a missing or invalid label, a non-integer or duplicate id; each
            message names the file, the column and the first bad row.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    task = _check_choice("data.task", task, TASKS)
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter))
    if not rows:
        raise ValueError(f"{path}: the file is empty (expected a header row)")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    seen: set[str] = set()
    for h in header:
        if h in seen:
            raise ValueError(f"{path}: column {h!r} appears twice in the header")
        seen.add(h)
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path}: {_row(i)} has {len(row)} fields, the header has "
                             f"{len(header)}")
    if not body:
        raise ValueError(f"{path}: no data rows after the header")
    label_cols = [label] if isinstance(label, str) else list(label)
    listed = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
    wanted = [("label", c) for c in label_cols] + [("id_column", id_column)] * (
        id_column is not None) + [("features", c) for c in (features or [])]
    for key, col in wanted:
        if col not in header:
            raise ValueError(f'{path}: data.{key} names column "{col}", which is not in the '
                             f"file (columns: {listed})")
    if features is None:
        features = [h for h in header if h not in label_cols and h != id_column]
    if not features:
        raise ValueError(f"{path}: no feature columns left (columns: {listed})")
    table = np.array(body, dtype=str).reshape(len(body), len(header))  # (N, all columns)
    col = {h: table[:, j] for j, h in enumerate(header)}
    where = path.name

    x = np.stack([_numeric(col[c], f"{where}: column {c!r}") for c in features], axis=1)

    if task == "classification":
        if len(label_cols) != 1:
            raise ValueError(f"{where}: classification takes one label column, got {label_cols}")
        raw = np.char.strip(col[label_cols[0]])
        bad = np.flatnonzero(np.isin(np.char.lower(raw), list(_MISSING)))
        if bad.size:
            raise ValueError(f"{where}: label column {label_cols[0]!r} has a missing value "
                             f"(NaN) at {_row(int(bad[0]))}")
        labels, class_names = _label_codes(raw, f"{where}: label column {label_cols[0]!r}", _row)
        n_outputs = len(class_names)
    else:
        ys = [_numeric(col[c], f"{where}: label column {c!r}", label=True) for c in label_cols]
        labels = ys[0] if len(ys) == 1 else np.stack(ys, axis=1)
        class_names, n_outputs = [], len(ys)

    if id_column is None:
        ids = np.arange(len(body), dtype=np.int64)
    else:
        ids = _int_ids(col[id_column], f"{where}: id column {id_column!r}", _row)
    logger.debug("loaded %s: %d rows, %d features", path, len(body), len(features))
    return Dataset(
        name=name or path.stem, ids=ids, features=x, labels=labels, task=task,
        layout="tabular", feature_names=list(features), n_outputs=n_outputs,
        class_names=class_names,
    )


def _parse(values: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Strings as float64, or (None, index of the first value that is not a number)."""
    try:
        return values.astype(np.float64), -1
    except ValueError:
        out = np.empty(values.shape, dtype=np.float64)
        for i, v in enumerate(values.tolist()):
            try:
                out[i] = float(v)
            except ValueError:
                return None, i
        return out, -1


def _numeric(values: np.ndarray, where: str, label: bool = False) -> np.ndarray:
    """Strings as float64; the first non-numeric or missing value is an error naming its row."""
    stripped = np.char.strip(values)
    out, bad_at = _parse(stripped)
    if out is None:
        v = str(stripped[bad_at])
        if v.lower() in _MISSING:
            raise ValueError(f"{where} has a missing value (NaN) at {_row(bad_at)}")
        raise ValueError(f"{where} has a non-numeric value {v!r} at {_row(bad_at)}")
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        what = "a missing value (NaN)" if np.isnan(out[bad[0]]) else "an infinite value"
        raise ValueError(f"{where} has {what} at {_row(int(bad[0]))}"
                         + ("" if label else "; fill or drop it before loading"))
    return out


def _int_ids(values: np.ndarray, where: str, row_name: Callable[[int], str]) -> np.ndarray:
    """Unique integer ids; a non-integer or repeated id is an error naming its row."""
    values = np.asarray(values)
    if values.dtype.kind in "US":
        values = np.char.strip(values.astype(str))
        as_num, bad_at = _parse(values)
        if as_num is None:
            raise ValueError(f"{where} has a non-integer id {str(values[bad_at])!r} at "
                             f"{row_name(bad_at)}")
    elif values.dtype.kind in "iubf":
        as_num = values.astype(np.float64)
    else:
        raise ValueError(f"{where}: ids must be integers, got dtype {values.dtype}")
    bad = np.flatnonzero(~np.isfinite(as_num) | (as_num != np.round(as_num)))
    if bad.size:
        raise ValueError(f"{where} has a non-integer id {values[bad[0]].item()!r} at "
                         f"{row_name(int(bad[0]))}")
    ids = values.astype(np.int64) if values.dtype.kind in "iu" else as_num.astype(np.int64)
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
        # the first repeated row in file order, and where that id appeared before
        seen = np.zeros(len(ids), dtype=bool)
        seen[first] = True
        i = int(np.flatnonzero(~seen)[0])
        j = int(np.flatnonzero(ids == ids[i])[0])
        raise ValueError(f"{where} has duplicate id {ids[i]} at {row_name(i)} "
                         f"(first seen at {row_name(j)})")
    return ids


def _npz_row(i: int) -> str:
    """How a row is named in NPZ messages: its 0-based index along the first axis."""
    return f"row index {i}"


def load_npz(
    path: str | Path,
    features_key: str = "features",
    labels_key: str = "labels",
    ids_key: str = "ids",
    feature_names_key: str = "feature_names",
    task: str = "classification",
    layout: str | None = None,
    name: str | None = None,
) -> Dataset:
    """Load arrays saved with `numpy.savez` as a data set.

    Args:
        path: the .npz file.
        features_key: key of the features: (N, F) tabular, or (N, H, W) / (N, T, C).
        labels_key: key of the labels: (N,) classes (integers or strings, coded 0..C-1 in
            sorted order), or (N,) / (N, O) regression targets.
        ids_key: key of unique integer ids (N,); if the file lacks it, the row order is used.
        feature_names_key: key of the feature names (strings); if absent, names are generated
            ("x{j}"; pixels "r{i}c{j}"; channels "c{j}").
        task: "classification" or "regression".
        layout: "tabular", "image" or "sequence"; default "tabular" for 2-D features and
            required for 3-D ones.
        name: the data set's name; default the file's stem.

    Returns:
        A `Dataset`.

    Raises:
        ValueError: a missing key, a non-numeric array, shapes that disagree, NaN or
            infinite features, NaN labels, non-integer or duplicate ids; each message names
            the file, the key and the first bad row index.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    task = _check_choice("data.task", task, TASKS)
    where = path.name
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key in (features_key, labels_key):
        if key not in arrays:
            raise ValueError(f"{where}: no array {key!r} in the file (arrays: "
                             f"{', '.join(sorted(arrays)) or 'none'})")
    x = arrays[features_key]
    if x.dtype.kind not in "iufb":
        raise ValueError(f"{where}: array {features_key!r} must be numeric, got dtype {x.dtype}")
    if layout is None:
        if x.ndim != 2:
            raise ValueError(f"{where}: array {features_key!r} has shape {x.shape}; give "
                             f"layout='image' (N, H, W) or 'sequence' (N, T, C) for 3-D data")
        layout = "tabular"
    layout = _check_choice("data.layout", layout, LAYOUTS)
    need = 2 if layout == "tabular" else 3
    if x.ndim != need:
        raise ValueError(f"{where}: layout {layout!r} needs {need}-D {features_key!r}, got "
                         f"shape {x.shape}")
    n = x.shape[0]
    x = x.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(x.reshape(n, -1)).all(axis=1))
    if bad.size:
        raise ValueError(f"{where}: array {features_key!r} has a NaN or infinite value at "
                         f"{_npz_row(int(bad[0]))}")

    y = arrays[labels_key]
    if y.shape[:1] != (n,):
        raise ValueError(f"{where}: array {labels_key!r} has shape {y.shape}, but "
                         f"{features_key!r} has {n} rows")
    if task == "classification":
        if y.ndim != 1:
            raise ValueError(f"{where}: classification labels {labels_key!r} must be 1-D, "
                             f"got shape {y.shape}")
        if y.dtype.kind == "f":
            nan = np.flatnonzero(np.isnan(y))
            if nan.size:
                raise ValueError(f"{where}: array {labels_key!r} has a NaN label at "
                                 f"{_npz_row(int(nan[0]))}")
        elif y.dtype.kind not in "iubUS":
            raise ValueError(f"{where}: array {labels_key!r} has dtype {y.dtype}; expected "
                             f"integers or strings")
        labels, class_names = _label_codes(y.astype(str) if y.dtype.kind == "S" else y,
                                           f"{where}: array {labels_key!r}", _npz_row)
        n_outputs = len(class_names)
    else:
        if y.dtype.kind not in "iuf" or y.ndim > 2:
            raise ValueError(f"{where}: regression labels {labels_key!r} must be a numeric "
                             f"(N,) or (N, O) array, got {y.dtype} with shape {y.shape}")
        y = y.astype(np.float64)
        nan = np.flatnonzero(~np.isfinite(y.reshape(n, -1)).all(axis=1))
        if nan.size:
            raise ValueError(f"{where}: array {labels_key!r} has a NaN or infinite label at "
                             f"{_npz_row(int(nan[0]))}")
        labels, class_names, n_outputs = y, [], 1 if y.ndim == 1 else y.shape[1]

    if ids_key in arrays:
        ids = arrays[ids_key]
        if ids.shape != (n,):
            raise ValueError(f"{where}: array {ids_key!r} has shape {ids.shape}, expected "
                             f"({n},)")
        ids = _int_ids(ids, f"{where}: array {ids_key!r}", _npz_row)
    else:
        ids = np.arange(n, dtype=np.int64)

    n_feat = {"tabular": lambda s: s[1], "image": lambda s: s[1] * s[2],
              "sequence": lambda s: s[2]}[layout](x.shape)
    if feature_names_key in arrays:
        names = [str(v) for v in arrays[feature_names_key].ravel().tolist()]
        if len(names) != n_feat:
            raise ValueError(f"{where}: array {feature_names_key!r} holds {len(names)} names "
                             f"for {n_feat} features")
    elif layout == "image":
        names = _pixel_names(x.shape[1], x.shape[2])
    else:
        names = [f"{'x' if layout == 'tabular' else 'c'}{j}" for j in range(n_feat)]
    logger.debug("loaded %s: features %s", path, x.shape)
    return Dataset(
        name=name or path.stem, ids=ids, features=x, labels=labels, task=task, layout=layout,
        feature_names=names, n_outputs=n_outputs, class_names=class_names,
    )
