"""User data from files: CSV tables and NPZ arrays, checked with errors that say where.

Files are read as if hostile: whatever bytes arrive, loading ends in a `Dataset` or in a
`DataError` naming the file and, where it applies, the column or key and the row or line. No
file makes the loader hang (FIFOs and devices are refused), run code (NPZ members are parsed by
their .npy header, never unpickled) or allocate what a header merely declares (an array's bytes
are read as they arrive and must match its declared shape). Ids are exact integers, never
routed through float64.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

import numpy as np

from liquid_fed import sizes
from liquid_fed.data.dataset import LAYOUTS, TASKS, Dataset, check_choice, pixel_names
from liquid_fed.errors import DataError

logger = logging.getLogger(__name__)

_MISSING = {"", "na", "nan", "null", "none"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Id text up to this many characters goes through numpy's exact str -> int64 cast in one call;
# longer text (and anything that cast rejects) is parsed value by value.
_FAST_ID_WIDTH = 32
_CHUNK = 1 << 24  # bytes read from an NPZ member at a time
# Deflate expands at most about 1032-fold, so no more room than this is set aside up front for a
# member's data; other compressions grow the room as their data actually arrives.
_MAX_EXPANSION = 1032
# What the zip and zlib layers raise on a damaged archive (bad CRC, truncated stream, ...).
# The largest magnitude float32 holds: experts train in float32 (train.dtype), where a feature
# of 1e39 becomes inf and the first failure would show up far away, in the delegation.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError,
               struct.error, NotImplementedError, RuntimeError, ValueError, OverflowError)


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist (still a `FileNotFoundError` for callers that catch it)."""


def read_failed(path: Path, exc: OSError) -> DataError:
    """A read that failed in the operating system (EIO, a vanished mount ...), as one line."""
    return DataError(f"{path}: cannot be read ({exc.strerror or exc}"
                     f"{f' [errno {exc.errno}]' if exc.errno else ''})")


def _shown(value: object, limit: int = 40) -> str:
    """A value as repr() for a message, cut short so a hostile 100 kB field stays readable."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def _open_regular(path: Path, kind: str) -> BinaryIO:
    """Open a regular file for binary reading; anything else is a DataError naming the path.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer), so the
    type check after it refuses FIFOs and devices rather than hanging on them.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{path}: no such file (expected {kind} file)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    except ValueError as exc:  # e.g. a NUL character in the path
        raise DataError(f"{str(path)!r}: not a usable path ({exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = ("a directory" if stat.S_ISDIR(mode)
                else "not a regular file (a FIFO, device or socket)")
        raise DataError(f"{path}: is {what}; expected {kind} file")
    return os.fdopen(fd, "rb")


# ---- exact integers from text ----------------------------------------------------------------


def _integral(text: str) -> Decimal | None:
    """Text as a Decimal if it names a finite integer ("12", "12.0", "1e3", "1e999"), else None."""
    try:
        d = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() and d == d.to_integral_value() else None


def _exact_int(text: str) -> int | None:
    """An integer written as text ("12", " -3", "12.0", "1e3"), exactly; None if it is not one.

    Integral decimals are accepted because spreadsheets and pandas write integer columns with
    missing values as "12.0". Integers of over 4300 digits (Python's own limit for int(str))
    are None too: they are no id or class anyone means, and "1e999999999" must not become a
    billion-digit int.
    """
    try:
        return int(text)
    except ValueError:
        pass
    d = _integral(text)
    return None if d is None or d.adjusted() >= 4300 else int(d)


def _exact_ints(values: Sequence[str]) -> tuple[np.ndarray | list[int] | None, int]:
    """Text as exact integers: int64 array (fast path), Python ints, or (None, first bad index)."""
    width = max(map(len, values), default=0)
    if width <= _FAST_ID_WIDTH:
        # numpy's str -> int64 cast parses each value with int(): exact, no float64 on the way,
        # and it raises on anything that is not an int64 integer. The width keeps the fixed-width
        # array from truncating any value.
        try:
            return np.array(values, dtype=f"U{max(width, 1)}").astype(np.int64), -1
        except (ValueError, OverflowError):
            pass
    out: list[int] = []
    for i, v in enumerate(values):
        k = _exact_int(v)
        if k is None:
            return None, i
        out.append(k)
    return out, -1


def _ids_from_text(values: Sequence[str], where: str, row_name: Callable[[int], str]
                   ) -> np.ndarray:
    """Id text as exact int64 ids; a non-integer or out-of-range id names its row."""
    ints, bad_at = _exact_ints(values)
    if ints is None:
        bad = values[bad_at].strip()
        if _integral(bad) is not None:  # an integer, just a vast one
            raise DataError(f"{where} has id {bad[:40]} at {row_name(bad_at)}, outside the "
                            f"int64 range [{_INT64_MIN}, {_INT64_MAX}]")
        raise DataError(f"{where} has a non-integer id {_shown(bad)} at {row_name(bad_at)}")
    if isinstance(ints, list):
        for i, k in enumerate(ints):
            if not _INT64_MIN <= k <= _INT64_MAX:
                raise DataError(f"{where} has id {values[i].strip()[:40]} at {row_name(i)}, "
                                f"outside the int64 range [{_INT64_MIN}, {_INT64_MAX}]")
        ints = np.array(ints, dtype=np.int64)
    return ints


def _int_ids(values: np.ndarray | Sequence[str], where: str,
             row_name: Callable[[int], str]) -> np.ndarray:
    """Unique exact int64 ids from text or an array; bad or repeated ids name their row.

    Integer arrays are used as they are (uint64 beyond int64 is an error); float arrays only
    when every value is an integer the float type holds exactly; strings parse like CSV text.
    """
    if not isinstance(values, np.ndarray):
        ids = _ids_from_text(values, where, row_name)
    elif values.dtype.kind == "i":
        ids = values.astype(np.int64)
    elif values.dtype.kind == "u":
        big = np.flatnonzero(values > _INT64_MAX)
        if big.size:
            i = int(big[0])
            raise DataError(f"{where} has id {int(values[i])} at {row_name(i)}, beyond the "
                            f"int64 maximum {_INT64_MAX}")
        ids = values.astype(np.int64)
    elif values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise DataError(f"{where} has a non-integer id {values[bad[0]].item()!r} at "
                            f"{row_name(int(bad[0]))}")
        # beyond 2**(mantissa bits + 1) neighbouring integers share one float: 2**53 + 1 was
        # already stored as 2**53, so such ids cannot be trusted.
        limit = min(2 ** (np.finfo(values.dtype).nmant + 1) - 1, _INT64_MAX)
        big = np.flatnonzero(np.abs(values) > limit)
        if big.size:
            i = int(big[0])
            raise DataError(f"{where} has id {values[i].item()!r} at {row_name(i)}, beyond "
                            f"{limit}, the largest integer {values.dtype} holds exactly; store "
                            "ids as an integer array (e.g. int64)")
        ids = values.astype(np.int64)
    elif values.dtype.kind in "US":
        ids = _ids_from_text(_as_text(values, where, row_name), where, row_name)
    else:
        raise DataError(f"{where}: ids must be integers, got dtype {values.dtype}")
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if np.any(counts > 1):
        # the first repeated row in file order, and where that id appeared before
        seen = np.zeros(len(ids), dtype=bool)
        seen[first] = True
        i = int(np.flatnonzero(~seen)[0])
        j = int(np.flatnonzero(ids == ids[i])[0])
        raise DataError(f"{where} has duplicate id {ids[i]} at {row_name(i)} "
                        f"(first seen at {row_name(j)})")
    return ids


def _as_text(values: np.ndarray, where: str, row_name: Callable[[int], str]) -> list[str]:
    """A str or bytes array as a list of str; bytes must be UTF-8."""
    if values.dtype.kind == "U":
        return [str(v) for v in values.tolist()]
    out = []
    for i, v in enumerate(values.tolist()):
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{where} holds bytes that are not UTF-8 text at "
                            f"{row_name(i)}") from None
    return out


# ---- labels and numbers ---------------------------------------------------------------------


def _label_codes(raw: np.ndarray | Sequence[str], where: str, row_name: Callable[[int], str]
                 ) -> tuple[np.ndarray, list[str]]:
    """Class labels (numbers or strings) as codes 0..C-1 and the class names, sorted.

    Integer labels stay exact (no float64 on the way). A single class is left to
    `_check_classes`, after every other check of the file.
    """
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "biuf":
        values = raw.astype(np.int64) if raw.dtype.kind == "b" else raw
        if values.dtype.kind == "f":
            bad = np.flatnonzero(values != np.round(values))
            if bad.size:
                i = int(bad[0])
                raise DataError(f"{where}: classification labels must be integers or names; "
                                f"{str(values[i])!r} at {row_name(i)} is neither "
                                "(use task='regression'?)")
        classes, codes = np.unique(values, return_inverse=True)
        names = [str(int(c)) for c in classes.tolist()]
    else:
        text = list(raw) if not isinstance(raw, np.ndarray) else raw.tolist()
        ints, bad_at = _exact_ints(text)
        if ints is None:
            try:
                np.fromiter(map(float, text), dtype=np.float64, count=len(text))
            except ValueError:
                ints = None  # some label is not a number: they are all names
            else:
                raise DataError(f"{where}: classification labels must be integers or names; "
                                f"{_shown(text[bad_at])} at {row_name(bad_at)} is neither "
                                "(use task='regression'?)")
            classes_s = sorted(set(text))
            lookup_s = {c: k for k, c in enumerate(classes_s)}
            codes = np.fromiter((lookup_s[v] for v in text), dtype=np.int64, count=len(text))
            names = classes_s
        elif isinstance(ints, np.ndarray):
            classes, codes = np.unique(ints, return_inverse=True)
            names = [str(int(c)) for c in classes.tolist()]
        else:
            classes_i = sorted(set(ints))
            lookup_i = {c: k for k, c in enumerate(classes_i)}
            codes = np.fromiter((lookup_i[v] for v in ints), dtype=np.int64, count=len(ints))
            names = [str(c) for c in classes_i]
    return np.asarray(codes, dtype=np.int64).reshape(-1), names


def _check_classes(class_names: list[str], n_rows: int, where: str) -> None:
    """Refuse a single class: nothing could be learnt, and accuracy would be a hollow 1.0."""
    if len(class_names) == 1:
        raise DataError(f"{where} holds a single class {class_names[0]!r} in all {n_rows} rows; "
                        "classification needs at least 2 classes")


def _numeric(values: Sequence[str], where: str, row_name: Callable[[int], str],
             label: bool = False) -> np.ndarray:
    """Text as float64; the first non-numeric or missing value is an error naming its row."""
    try:
        out = np.fromiter(map(float, values), dtype=np.float64, count=len(values))
    except ValueError:
        for i, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                v = v.strip()
                if v.lower() in _MISSING:
                    raise DataError(f"{where} has a missing value (NaN) at {row_name(i)}"
                                    ) from None
                raise DataError(f"{where} has a non-numeric value {_shown(v)} at "
                                f"{row_name(i)}") from None
        raise  # unreachable: some value failed above
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        what = "a missing value (NaN)" if np.isnan(out[bad[0]]) else "an infinite value"
        raise DataError(f"{where} has {what} at {row_name(int(bad[0]))}"
                        + ("" if label else "; fill or drop it before loading"))
    _check_float32(out, where, row_name)
    return out


def _check_float32(values: np.ndarray, where: str, row_name: Callable[[int], str]) -> None:
    """Refuse finite values beyond float32's range: training would turn them into inf."""
    table = values.reshape(len(values), -1)  # (N, features of one row)
    big = np.flatnonzero(np.abs(table) > _FLOAT32_MAX)
    if big.size:
        i, j = divmod(int(big[0]), table.shape[1])
        column = f", column {j}" if table.shape[1] > 1 else ""
        raise DataError(f"{where} has {table[i, j].item():.6g} at {row_name(i)}{column}, "
                        f"beyond float32's range (largest magnitude {_FLOAT32_MAX:.6g}) that "
                        "the experts train in; rescale it")


# ---- CSV --------------------------------------------------------------------------------------


def _not_utf8(fh: BinaryIO, path: Path) -> DataError:
    """The error for a file that is not UTF-8, naming the first bad byte's line as csv counts.

    Lines end at "\n", "\r\n" or a lone "\r" (the newline="" convention csv reads with).
    Only run once decoding has failed, so the fast path never pays for it.
    """
    fh.seek(0)
    lineno = 1
    for raw in fh:  # pieces ending in b"\n"; lone b"\r" inside them end lines too
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            before = raw[:exc.start]
            line = lineno + before.count(b"\r") - before.count(b"\r\n")
            col = exc.start - max(before.rfind(b"\r"), before.rfind(b"\n")) - 1
            return DataError(f"{path}: line {line} is not UTF-8 text (byte "
                             f"0x{raw[exc.start]:02x} at byte {col + 1} of the line); save "
                             "the file as UTF-8")
        lineno += 1 + raw.count(b"\r") - raw.count(b"\r\n")
    return DataError(f"{path}: is not UTF-8 text (it ends inside a character); save the file "
                     "as UTF-8")


def _csv_records(fh: BinaryIO, path: Path, delimiter: str) -> tuple[list[list[str]], list[int]]:
    """Every record of a CSV file, and the line each record starts on (1-based).

    The text is strict UTF-8 (a byte order mark is dropped); bytes that are not, and NUL
    bytes, are named by their line. `strict` parsing refuses an unclosed quote rather than
    letting it swallow the rest of the file into one field.
    """
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="strict", newline="")

    def lines() -> Iterator[str]:
        for lineno, line in enumerate(text, start=1):
            if "\x00" in line:
                raise DataError(f"{path}: line {lineno} holds a NUL byte; a CSV file is text")
            yield line

    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    records: list[list[str]] = []
    starts: list[int] = []
    end = 0  # the line the last complete record ended on
    try:
        for record in reader:
            records.append(record)
            starts.append(end + 1)
            end = reader.line_num
    except UnicodeDecodeError:
        raise _not_utf8(fh, path) from None
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            raise DataError(f"{path}: line {reader.line_num} has a field longer than "
                            f"{csv.field_size_limit()} characters (csv's field size limit); "
                            "is data.delimiter right, or is a quote left open?") from None
        opened = ("" if end + 1 >= reader.line_num
                  else f" in the record that starts on line {end + 1}")
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({exc}){opened}; "
                        "check the quotes") from None
    finally:
        text.detach()  # the caller owns and closes the file
    return records, starts


def csv_shape(fh: BinaryIO, delimiter: str) -> tuple[int, int, int]:
    """(data rows, columns, bytes) of a CSV, streamed in 1 MiB blocks and never held.

    Rows are counted as line ends after the header ("\n", or "\r" in a file of old Mac line
    ends; a quoted field holding newlines makes it an upper bound); the columns are the
    header's fields. Only the size is judged here: the parse that follows names any fault.
    The file is left at its start.
    """
    fh.seek(0)
    head = b""
    while not (b"\n" in head or b"\r" in head) and len(head) < (64 << 20):  # header line
        block = fh.read(1 << 20)
        if not block:
            break
        head += block
    first = head.replace(b"\r", b"\n").split(b"\n", 1)[0].decode("utf-8-sig", "replace")
    try:
        columns = len(next(csv.reader([first], delimiter=delimiter), []))
    except csv.Error:
        columns = first.count(delimiter) + 1
    newlines, returns, size, last = head.count(b"\n"), head.count(b"\r"), len(head), head[-1:]
    for block in iter(lambda: fh.read(1 << 20), b""):
        newlines += block.count(b"\n")
        returns += block.count(b"\r")
        size += len(block)
        last = block[-1:]
    lines = max(newlines, returns) + (bool(last) and last not in b"\r\n")  # unended last line
    fh.seek(0)
    return max(lines - 1, 0), max(columns, 1), size


def _check_csv_size(fh: BinaryIO, path: Path, delimiter: str) -> None:
    """Refuse a CSV whose loading would not fit in memory, before parsing a field of it."""
    rows, columns, size = csv_shape(fh, delimiter)
    sizes.check_fits(sizes.csv_load_bytes(rows, columns, size),
                     f"{path}: {rows:,} rows x {columns} columns ({sizes.format_bytes(size)})")


def load_csv(
    path: str | Path,
    label: str | list[str],
    features: list[str] | None = None,
    id_column: str | None = None,
    task: str = "classification",
    delimiter: str = ",",
    name: str | None = None,
) -> Dataset:
    """Load a UTF-8 table with a header row as a tabular data set.

    Args:
        path: the CSV file (UTF-8; a byte order mark is allowed).
        label: the label column (a list of columns for multi-output regression).
        features: feature columns by name; default every column but the id and labels.
        id_column: column of unique integer sample ids in int64's range, parsed exactly (an
            integral decimal such as "12.0" is allowed); default the row order 0..N-1.
        task: "classification" (labels may be integers or names, coded 0..C-1 in sorted
            order; `class_names` keeps the originals; at least 2 classes) or "regression".
        delimiter: the field separator, one character.
        name: the data set's name; default the file's stem.

    Returns:
        A tabular `Dataset`.

    Raises:
        DataError: (a ValueError) a path that is missing (also a FileNotFoundError), a
            directory or otherwise unreadable; text that is not UTF-8, a NUL byte, a field
            beyond csv's size limit or broken quoting (naming the line); a missing column, a
            row of the wrong length, a non-numeric or missing feature value, a missing or
            invalid label, a single class, a non-integer, out-of-range or duplicate id. Each
            message names the file, the column and the first bad row and its line.
    """
    path = Path(path)
    task = check_choice("data.task", task, TASKS)
    if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\"":
        raise DataError(f"data.delimiter must be one character other than a quote or a "
                        f"newline, got {delimiter!r}")
    with _open_regular(path, "a CSV") as fh:
        try:
            _check_csv_size(fh, path, delimiter)
            rows, starts = _csv_records(fh, path, delimiter)
        except OSError as exc:
            raise read_failed(path, exc) from None
    if not rows:
        raise DataError(f"{path}: the file is empty (expected a header row)")
    header = [h.strip() for h in rows[0]]
    body, body_starts = rows[1:], starts[1:]

    def row_name(i: int) -> str:
        """A data row: 1-based, and the file line it starts on (the header is line 1)."""
        return f"row {i + 1} (line {body_starts[i]})"

    seen: set[str] = set()
    for h in header:
        if h in seen:
            raise DataError(f"{path}: column {_shown(h)} appears twice in the header")
        seen.add(h)
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"{path}: {row_name(i)} has {len(row)} fields, the header has "
                            f"{len(header)}")
    if not body:
        raise DataError(f"{path}: no data rows after the header")
    label_cols = [label] if isinstance(label, str) else list(label)
    listed = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
    wanted = [("label", c) for c in label_cols] + [("id_column", id_column)] * (
        id_column is not None) + [("features", c) for c in (features or [])]
    for key, c in wanted:
        if c not in header:
            raise DataError(f'{path}: data.{key} names column "{c}", which is not in the '
                            f"file (columns: {listed})")
    if features is None:
        features = [h for h in header if h not in label_cols and h != id_column]
    if not features:
        raise DataError(f"{path}: no feature columns left (columns: {listed})")
    # columns as tuples of Python str: a fixed-width numpy string table would be as wide as its
    # longest field in every cell, so one 100 kB field could demand gigabytes
    columns = list(zip(*body, strict=True))
    col = {h: columns[j] for j, h in enumerate(header)}

    x = np.stack([_numeric(col[c], f"{path}: column {c!r}", row_name) for c in features], axis=1)

    if task == "classification":
        if len(label_cols) != 1:
            raise DataError(f"{path}: classification takes one label column, got {label_cols}")
        raw = [v.strip() for v in col[label_cols[0]]]
        for i, v in enumerate(raw):
            if v.lower() in _MISSING:
                raise DataError(f"{path}: label column {label_cols[0]!r} has a missing value "
                                f"(NaN) at {row_name(i)}")
        labels, class_names = _label_codes(raw, f"{path}: label column {label_cols[0]!r}",
                                           row_name)
        n_outputs = len(class_names)
    else:
        ys = [_numeric(col[c], f"{path}: label column {c!r}", row_name, label=True)
              for c in label_cols]
        labels = ys[0] if len(ys) == 1 else np.stack(ys, axis=1)
        class_names, n_outputs = [], len(ys)

    if id_column is None:
        ids = np.arange(len(body), dtype=np.int64)
    else:
        ids = _int_ids(col[id_column], f"{path}: id column {id_column!r}", row_name)
    if task == "classification":
        _check_classes(class_names, len(body), f"{path}: label column {label_cols[0]!r}")
    logger.debug("loaded %s: %d rows, %d features", path, len(body), len(features))
    return Dataset(
        name=name or path.stem, ids=ids, features=x, labels=labels, task=task,
        layout="tabular", feature_names=list(features), n_outputs=n_outputs,
        class_names=class_names,
    )


# ---- NPZ --------------------------------------------------------------------------------------


def _npz_row(i: int) -> str:
    """How a row is named in NPZ messages: its 0-based index along the first axis."""
    return f"row index {i}"


def _why(exc: BaseException) -> str:
    """An exception as "Type: message" for the end of an error message."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _member_header(f: BinaryIO, where: str, file_size: int
                   ) -> tuple[tuple[int, ...], bool, np.dtype]:
    """A .npy member's (shape, fortran order, dtype), read from its header alone; the header
    must account for exactly the member's ``file_size`` bytes (uncompressed)."""
    try:
        version, shape, fortran, dtype = sizes.npy_header(f)
        if shape is None:
            raise DataError(f"{where} is a .npy array of format version {version}; "
                            "only versions 1.0 and 2.0 (numeric and string arrays) are read")
    except (ValueError, struct.error, UnicodeDecodeError, SyntaxError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where} is not a .npy array ({_why(exc)})") from None
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (dtype {dtype}), which only pickle could "
                        "load and pickles are never loaded; store numbers or fixed-width "
                        "strings")
    if dtype.itemsize == 0 or any(d < 0 for d in shape):
        raise DataError(f"{where} declares shape {shape} of dtype {dtype}, which holds no "
                        "valid array")
    nbytes = math.prod(shape) * dtype.itemsize
    stored = file_size - f.tell()
    if stored != nbytes:
        raise DataError(f"{where} declares shape {shape} of dtype {dtype} ({nbytes} bytes), but "
                        f"the archive holds {stored} bytes for it; the file is damaged or was "
                        "not written by numpy")
    return shape, fortran, dtype


def _check_npz_size(zf: zipfile.ZipFile, members: dict[str, str], keys: Sequence[str],
                    path: Path) -> None:
    """Refuse an archive whose arrays expand beyond the memory limit, from their headers
    alone: a 1.2 MB archive of zeros that declares 1.2 GB is refused before it inflates."""
    headers: dict[str, tuple[tuple[int, ...], int]] = {}
    for key in keys:
        where = f"{path}: array {key!r}"
        info = zf.getinfo(members[key])
        try:
            with zf.open(info) as f:
                shape, _, dtype = _member_header(f, where, info.file_size)
        except DataError:
            raise
        except OSError as exc:
            if exc.errno is not None:
                raise read_failed(path, exc) from None
            raise DataError(f"{where}: the archive is damaged ({_why(exc)})") from None
        except _ZIP_ERRORS as exc:
            raise DataError(f"{where}: the archive is damaged ({_why(exc)})") from None
        headers[key] = (tuple(shape), dtype.itemsize)
    declared = ", ".join(f"{k} {headers[k][0]}" for k in headers)
    archive = sizes.format_bytes(sum(zf.getinfo(members[k]).compress_size for k in headers))
    sizes.check_fits(sizes.npz_load_bytes(headers, keys[0], keys[1]),
                     f"{path}: arrays {declared} ({archive} compressed)")


def _read_member(zf: zipfile.ZipFile, member: str, path: Path, key: str, archive_size: int
                 ) -> np.ndarray:
    """One .npy member of an archive, checked against its header before any data is kept.

    The header's shape and dtype must account for exactly the member's stored bytes, and the
    data is read in chunks as it arrives, so a header declaring 10**12 elements over 200 bytes
    is refused instead of allocated. Object dtypes are refused: they would need pickle.
    """
    where = f"{path}: array {key!r}"
    info = zf.getinfo(member)
    try:
        with zf.open(info) as f:
            shape, fortran, dtype = _member_header(f, where, info.file_size)
            nbytes = math.prod(shape) * dtype.itemsize
            # room for what the archive's own bytes could hold, grown only as data arrives
            room = min(nbytes, min(info.compress_size, archive_size) * _MAX_EXPANSION)
            buf = np.empty(room, dtype=np.uint8)
            got = 0
            while got < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - got))
                if not chunk:
                    break
                if got + len(chunk) > buf.size:
                    grown = np.empty(min(nbytes, max(2 * buf.size, got + len(chunk))), np.uint8)
                    grown[:got] = buf[:got]
                    buf = grown
                buf[got:got + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                got += len(chunk)
            if got != nbytes or f.read(1):
                raise DataError(f"{where}: the archive holds {got} bytes of data where "
                                f"its header declares {nbytes}; the file is damaged")
    except DataError:
        raise
    except OSError as exc:
        if exc.errno is None:  # zipfile's own complaints, e.g. a bad CRC
            raise DataError(f"{where}: the archive is damaged ({_why(exc)})") from None
        raise read_failed(path, exc) from None
    except _ZIP_ERRORS as exc:
        raise DataError(f"{where}: the archive is damaged ({_why(exc)})") from None
    flat = buf.view(dtype)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _check_directory(zf: zipfile.ZipFile, fh: BinaryIO, path: Path) -> None:
    """Check the archive's directory against its members, reading no array data.

    No checksum covers the directory, so one damaged byte there can rename "ids.npy" or (through
    a comment length) hide the entries after it, and an optional key would silently disappear.
    So every member's local header must agree with its directory entry (zipfile compares the
    names on opening), and the members must tile the file from byte 0 to the directory, leaving
    no bytes that no entry accounts for. Members written with data descriptors (sizes after the
    data; numpy never writes them) are not tiled. Other refusals (encryption, an unknown
    compression) are left to the members actually read, so an unused key never blocks loading.
    """
    for info in zf.infolist():
        try:
            with zf.open(info):
                pass
        except zipfile.BadZipFile as exc:
            raise DataError(f"{path}: the archive is damaged at member {info.filename!r} "
                            f"({_why(exc)})") from None
        except _ZIP_ERRORS:
            pass
    infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
    if any(i.flag_bits & 0x08 for i in infos):
        return
    pos = 0
    for info in infos:
        if info.header_offset != pos:
            break
        fh.seek(pos)
        local = fh.read(30)
        if len(local) < 30:
            break
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        pos = info.header_offset + 30 + name_len + extra_len + info.compress_size
    else:
        if pos == getattr(zf, "start_dir", pos):
            return
    raise DataError(f"{path}: the archive is damaged: its directory does not account for every "
                    f"byte before it (at byte {pos}); entries may be missing from the directory")


def _npz_arrays(path: Path, required: Sequence[str], optional: Sequence[str]
                ) -> dict[str, np.ndarray]:
    """The arrays under `required` and (where present) `optional` keys; no other key is read."""
    with _open_regular(path, "an NPZ") as fh:
        head = fh.read(6)
        if not head:
            raise DataError(f"{path}: the file is empty (expected an .npz archive written by "
                            "numpy.savez)")
        if head == b"\x93NUMPY":
            raise DataError(f"{path}: is a single .npy array, not an .npz archive of named "
                            "arrays; write it with numpy.savez")
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except OSError as exc:
            if exc.errno is not None:
                raise read_failed(path, exc) from None
            raise DataError(f"{path}: not a readable .npz archive ({_why(exc)}); is it "
                            "truncated or damaged? write it with numpy.savez") from None
        except _ZIP_ERRORS as exc:
            raise DataError(f"{path}: not a readable .npz archive ({_why(exc)}); is it "
                            "truncated or damaged? write it with numpy.savez") from None
        with zf:
            _check_directory(zf, fh, path)
            # numpy.savez stores array "x" as member "x.npy"; np.load lists it as "x"
            names = [n[:-4] if n.endswith(".npy") else n for n in zf.namelist()]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:  # which copy a reader takes is up to the reader: refuse the file
                raise DataError(f"{path}: holds two arrays named {twice[0]!r}; an .npz "
                                "archive names each array once (write it with numpy.savez)")
            members = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
            for key in required:
                if key not in members:
                    raise DataError(f"{path}: no array {key!r} in the file (arrays: "
                                    f"{', '.join(sorted(members)) or 'none'})")
            wanted = [k for k in [*required, *optional] if k in members]
            _check_npz_size(zf, members, wanted, path)
            size = os.fstat(fh.fileno()).st_size
            return {k: _read_member(zf, members[k], path, k, size) for k in wanted}


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
    """Load arrays saved with `numpy.savez` (or `savez_compressed`) as a data set.

    Only the four keys below are read; other arrays in the file are never opened.

    Args:
        path: the .npz file.
        features_key: key of the features: (N, F) tabular, or (N, H, W) / (N, T, C).
        labels_key: key of the labels: (N,) classes (integers or strings, coded 0..C-1 in
            sorted order; at least 2 classes), or (N,) / (N, O) regression targets.
        ids_key: key of unique integer ids (N,): an integer array (uint64 beyond int64 is
            refused), strings of integers, or floats holding integers the float type stores
            exactly (float64: |id| < 2**53); if the file lacks it, the row order is used.
        feature_names_key: key of the feature names (strings); if absent, names are generated
            ("x{j}"; pixels "r{i}c{j}"; channels "c{j}").
        task: "classification" or "regression".
        layout: "tabular", "image" or "sequence"; default "tabular" for 2-D features and
            required for 3-D ones.
        name: the data set's name; default the file's stem.

    Returns:
        A `Dataset`.

    Raises:
        DataError: (a ValueError) a path that is missing (also a FileNotFoundError), a
            directory or otherwise unreadable; an empty, truncated or damaged archive; a
            member that is not a .npy array, holds Python objects, or whose header declares
            more or fewer bytes than are stored; a missing key, a non-numeric array, shapes
            that disagree, NaN or infinite features, NaN labels, a single class, non-integer,
            out-of-range or duplicate ids. Each message names the file, the key and the first
            bad row index.
    """
    path = Path(path)
    task = check_choice("data.task", task, TASKS)
    try:
        arrays = _npz_arrays(path, [features_key, labels_key], [ids_key, feature_names_key])
    except DataError:
        raise
    except OSError as exc:  # a read the operating system failed (EIO ...), outside the archive
        raise read_failed(path, exc) from None
    x = arrays[features_key]
    if x.dtype.kind not in "iufb":
        raise DataError(f"{path}: array {features_key!r} must be numeric, got dtype {x.dtype}")
    if layout is None:
        if x.ndim != 2:
            raise DataError(f"{path}: array {features_key!r} has shape {x.shape}; give "
                            f"layout='image' (N, H, W) or 'sequence' (N, T, C) for 3-D data")
        layout = "tabular"
    layout = check_choice("data.layout", layout, LAYOUTS)
    need = 2 if layout == "tabular" else 3
    if x.ndim != need:
        raise DataError(f"{path}: layout {layout!r} needs {need}-D {features_key!r}, got "
                        f"shape {x.shape}")
    if 0 in x.shape:
        raise DataError(f"{path}: array {features_key!r} has shape {x.shape}: no "
                        f"{'rows' if x.shape[0] == 0 else 'features'}")
    n = x.shape[0]
    x = x.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(x.reshape(n, -1)).all(axis=1))
    if bad.size:
        raise DataError(f"{path}: array {features_key!r} has a NaN or infinite value at "
                        f"{_npz_row(int(bad[0]))}")
    _check_float32(x, f"{path}: array {features_key!r}", _npz_row)

    y = arrays[labels_key]
    if y.shape[:1] != (n,):
        raise DataError(f"{path}: array {labels_key!r} has shape {y.shape}, but "
                        f"{features_key!r} has {n} rows")
    if task == "classification":
        if y.ndim != 1:
            raise DataError(f"{path}: classification labels {labels_key!r} must be 1-D, "
                            f"got shape {y.shape}")
        if y.dtype.kind == "f":
            nan = np.flatnonzero(np.isnan(y))
            if nan.size:
                raise DataError(f"{path}: array {labels_key!r} has a NaN label at "
                                f"{_npz_row(int(nan[0]))}")
        elif y.dtype.kind not in "iubUS":
            raise DataError(f"{path}: array {labels_key!r} has dtype {y.dtype}; expected "
                            f"integers or strings")
        where = f"{path}: array {labels_key!r}"
        labels, class_names = _label_codes(
            _as_text(y, where, _npz_row) if y.dtype.kind in "US" else y, where, _npz_row)
        n_outputs = len(class_names)
    else:
        if y.dtype.kind not in "iuf" or y.ndim > 2:
            raise DataError(f"{path}: regression labels {labels_key!r} must be a numeric "
                            f"(N,) or (N, O) array, got {y.dtype} with shape {y.shape}")
        y = y.astype(np.float64)
        nan = np.flatnonzero(~np.isfinite(y.reshape(n, -1)).all(axis=1))
        if nan.size:
            raise DataError(f"{path}: array {labels_key!r} has a NaN or infinite label at "
                            f"{_npz_row(int(nan[0]))}")
        _check_float32(y, f"{path}: array {labels_key!r}", _npz_row)
        labels, class_names, n_outputs = y, [], 1 if y.ndim == 1 else y.shape[1]

    if ids_key in arrays:
        ids = arrays[ids_key]
        if ids.shape != (n,):
            raise DataError(f"{path}: array {ids_key!r} has shape {ids.shape}, expected "
                            f"({n},)")
        ids = _int_ids(ids, f"{path}: array {ids_key!r}", _npz_row)
    else:
        ids = np.arange(n, dtype=np.int64)

    n_feat = {"tabular": lambda s: s[1], "image": lambda s: s[1] * s[2],
              "sequence": lambda s: s[2]}[layout](x.shape)
    if feature_names_key in arrays:
        raw_names = arrays[feature_names_key]
        if raw_names.size != n_feat:
            raise DataError(f"{path}: array {feature_names_key!r} holds {raw_names.size} names "
                            f"for {n_feat} features")
        names = (_as_text(raw_names.ravel(), f"{path}: array {feature_names_key!r}",
                          lambda i: f"index {i}") if raw_names.dtype.kind in "US"
                 else [str(v) for v in raw_names.ravel().tolist()])
    elif layout == "image":
        names = pixel_names(x.shape[1], x.shape[2])
    else:
        names = [f"{'x' if layout == 'tabular' else 'c'}{j}" for j in range(n_feat)]
    if task == "classification":
        _check_classes(class_names, n, f"{path}: array {labels_key!r}")
    logger.debug("loaded %s: features %s", path, x.shape)
    return Dataset(
        name=name or path.stem, ids=ids, features=x, labels=labels, task=task, layout=layout,
        feature_names=names, n_outputs=n_outputs, class_names=class_names,
    )
