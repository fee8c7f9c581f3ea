"""Bikeshare: hourly rentals of Washington D.C.'s Capital Bikeshare in 2011, calendar vs weather.

8,645 hours (ISLP's copy of the UCI "Bike Sharing" data, Fanaee-T and Gama 2013; ISLP,
BSD 3-clause). The target is ``bikers``, the rentals in that hour. ``casual`` and
``registered`` are dropped: they sum to the target. The other columns form two genuine views:

``calendar`` (50 columns): ``season`` one-hot (4), ``mnth`` one-hot (12), ``day`` (day of the
    year 1-365, numeric: the growth through the year), ``hr`` one-hot (24), ``holiday`` (0/1),
    ``weekday`` one-hot (7), ``workingday`` (0/1).
``weather`` (5 columns): ``weathersit`` as its ordered severity (0 clear, 1 cloudy/misty,
    2 light rain/snow, 3 heavy rain/snow), ``temp``, ``atemp``, ``hum``, ``windspeed``
    (already scaled to [0, 1] by the source).

Why one-hot for hour, month, weekday and season: they are nominal, and the hour's effect is
bimodal (commuting peaks at 8 and 17-18 on working days) and not monotone in any ordering.
``weathersit`` is a severity scale, so one ordinal column; one-hot would also give the single
"heavy rain/snow" hour a column of its own, which standardising turns into a value near 90.
The categories are fixed here, not read from the data, so every file gives the same columns.
Standardising is the run's (``data.standardize``, on the training rows), as for every data
set. The target is the count divided by ``target_scale`` (default 100: hundreds of rentals per
hour): the raw counts (mean 144, std 134) slow the fit of a network whose outputs start near 0
(30 epochs of the study: central R² 0.902 on raw counts, 0.917 in hundreds). R² does not
depend on the unit; RMSE is in the unit chosen.

Only the CSV file is read, never ``import ISLP`` (its loader needs pandas, statsmodels, torch
and more; `make data` installs it with ``--no-deps``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from liquid_fed.data.dataset import Dataset, check_float
from liquid_fed.data.packaged import data_file
from liquid_fed.errors import DataError

logger = logging.getLogger(__name__)

BIKESHARE_NAME = "bikeshare"
#: What `make data` installs; ``--no-deps``: only the data file is read.
BIKESHARE_PIN = "ISLP==0.6.0"
BIKESHARE_FILE = "data/Bikeshare.csv"
TARGET = "bikers"
#: Columns read and dropped: casual + registered = bikers, so either would leak the target.
DROPPED = ("casual", "registered")
MONTHS = ("Jan", "Feb", "March", "April", "May", "June", "July", "Aug", "Sept", "Oct", "Nov",
          "Dec")
#: Severity order of ``weathersit`` (the UCI codes 1-4).
WEATHER = ("clear", "cloudy/misty", "light rain/snow", "heavy rain/snow")

#: How each source column becomes features: ("onehot", categories), ("number", None) or
#: ("ordinal", categories in order). The view of each column is in VIEWS.
ENCODING: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "season": ("onehot", ("1", "2", "3", "4")),
    "mnth": ("onehot", MONTHS),
    "day": ("number", None),
    "hr": ("onehot", tuple(str(h) for h in range(24))),
    "holiday": ("number", None),
    "weekday": ("onehot", tuple(str(d) for d in range(7))),
    "workingday": ("number", None),
    "weathersit": ("ordinal", WEATHER),
    "temp": ("number", None),
    "atemp": ("number", None),
    "hum": ("number", None),
    "windspeed": ("number", None),
}
VIEWS: dict[str, tuple[str, ...]] = {
    "calendar": ("season", "mnth", "day", "hr", "holiday", "weekday", "workingday"),
    "weather": ("weathersit", "temp", "atemp", "hum", "windspeed"),
}


def _number(text: str, column: str, row: int, file: Path) -> float:
    """A cell as a float, or a DataError naming the file, row and column."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise DataError(f'data set "{BIKESHARE_NAME}": {str(file)!r} line {row}, column '
                        f'"{column}": {text!r} is not a finite number')
    return value


def _encode(column: str, text: str, row: int, file: Path) -> list[float]:
    """The features of one cell (several for a one-hot column)."""
    kind, cats = ENCODING[column]
    if kind == "number" or cats is None:
        return [_number(text, column, row, file)]
    value = text.strip()
    if kind == "onehot" and value not in cats:
        # integer codes may come as "3.0" from other writers of the same table
        try:
            value = str(int(float(value)))
        except ValueError:
            pass
    if value not in cats:
        raise DataError(f'data set "{BIKESHARE_NAME}": {str(file)!r} line {row}, column '
                        f'"{column}": {text!r} is not one of {list(cats)}')
    if kind == "ordinal":
        return [float(cats.index(value))]
    return [1.0 if value == c else 0.0 for c in cats]


def feature_columns() -> dict[str, list[str]]:
    """The feature names of each view, in feature order (``hr_0`` ... ``hr_23``, ``temp``)."""
    out: dict[str, list[str]] = {}
    for view, columns in VIEWS.items():
        names: list[str] = []
        for column in columns:
            kind, cats = ENCODING[column]
            names += [f"{column}_{c}" for c in cats] if kind == "onehot" and cats else [column]
        out[view] = names
    return out


def load_bikeshare(path: str | None = None, target_scale: float = 100.0) -> Dataset:
    """Hourly bike rentals (regression on ``bikers``) with a calendar view and a weather view.

    Args:
        path: a CSV file in ISLP's ``Bikeshare.csv`` layout (a header naming at least season,
            mnth, day, hr, holiday, weekday, workingday, weathersit, temp, atemp, hum,
            windspeed, bikers; other columns are ignored). By default the file the package
            ISLP ships is read.
        target_scale: the target is ``bikers / target_scale`` (> 0; 1 for raw counts).

    Returns:
        A tabular regression `Dataset` named "bikeshare" (55 features), groups "calendar"
        (50 columns) and "weather" (5 columns), labels the rentals per hour divided by
        ``target_scale`` (float32).

    Raises:
        ValueError: ``target_scale`` is not a positive number.
        DataError: ISLP is not installed and no path is given (naming `make data`), the file is
            missing, lacks a column, or holds a value that is not a number or not a known
            category (naming the line, the column and the accepted values).
    """
    scale = check_float("data.options.target_scale", target_scale, 0.0, float("inf"))
    if scale <= 0:
        raise ValueError(f"data.options.target_scale must be > 0, got {target_scale!r}")
    file = data_file(path, BIKESHARE_NAME, "ISLP", BIKESHARE_PIN, BIKESHARE_FILE,
                     "a CSV file in ISLP's Bikeshare.csv layout")
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f'data set "{BIKESHARE_NAME}": cannot read {str(file)!r}: {exc}') from exc
    needed = [c for cols in VIEWS.values() for c in cols] + [TARGET]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f'data set "{BIKESHARE_NAME}": {str(file)!r} has no column '
                        f'"{missing[0]}" (columns: {", ".join(header)})')
    if not rows:
        raise DataError(f'data set "{BIKESHARE_NAME}": {str(file)!r} has no rows')
    order = [c for cols in VIEWS.values() for c in cols]
    features = np.array([[v for c in order for v in _encode(c, r[c], i + 2, file)]
                         for i, r in enumerate(rows)], dtype=np.float64)  # (N, 55)
    target = np.array([_number(r[TARGET], TARGET, i + 2, file) for i, r in enumerate(rows)])
    target = target / scale
    groups = feature_columns()
    names = [n for cols in groups.values() for n in cols]
    logger.debug("%s: %d hours from %s", BIKESHARE_NAME, len(rows), file)
    return Dataset(BIKESHARE_NAME, np.arange(len(rows)), features, target, "regression",
                   "tabular", names, 1, groups=groups)
