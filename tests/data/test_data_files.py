"""CSV and NPZ user files: they load, and every mistake names the file, column and first bad row."""

import io
import os
import re
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from liquid_fed.data import load_dataset
from liquid_fed.errors import DataError


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "id,age,bmi,label\n10,50,22.5,yes\n11,61,30.1,no\n12,45,25.0,yes\n"


def test_csv_loads_with_id_column(tmp_path):
    ds = load_dataset("csv", path=_csv(tmp_path, GOOD), label="label", id_column="id")
    assert ds.name == "data" and ds.layout == "tabular"
    np.testing.assert_array_equal(ds.ids, [10, 11, 12])
    assert ds.feature_names == ["age", "bmi"]
    np.testing.assert_allclose(ds.features[1], [61, 30.1], rtol=1e-6)
    assert ds.class_names == ["no", "yes"] and list(ds.labels) == [1, 0, 1]
    assert ds.n_outputs == 2


def test_csv_row_order_ids_feature_subset_and_regression(tmp_path):
    path = _csv(tmp_path, "a,b,c,y1,y2\n1,2,3,0.5,1\n4,5,6,1.5,2\n")
    ds = load_dataset("csv", path=path, label=["y1", "y2"], features=["c", "a"],
                      task="regression")
    np.testing.assert_array_equal(ds.ids, [0, 1])
    assert ds.feature_names == ["c", "a"] and ds.labels.shape == (2, 2) and ds.n_outputs == 2
    np.testing.assert_array_equal(ds.features, [[3, 1], [6, 4]])


def test_csv_numeric_class_labels_are_coded_in_order(tmp_path):
    ds = load_dataset("csv", path=_csv(tmp_path, "x,y\n1,3\n2,1\n3,2\n"), label="y")
    assert list(ds.labels) == [2, 0, 1] and ds.class_names == ["1", "2", "3"]


@pytest.mark.parametrize("text, options, match", [
    (GOOD, dict(label="target"),
     r'data.csv: data.label names column "target", which is not in the file \(columns: id, '),
    (GOOD, dict(label="label", id_column="key"), r'data.id_column names column "key"'),
    (GOOD, dict(label="label", features=["age", "bmi2"]), r'data.features names column "bmi2"'),
    ("a,label\n1,x\n2,y\nthree,x\n", dict(label="label"),
     r"data.csv: column 'a' has a non-numeric value 'three' at row 3 \(line 4\)"),
    ("a,label\n1,x\n,y\n", dict(label="label"),
     r"column 'a' has a missing value \(NaN\) at row 2 \(line 3\)"),
    ("a,label\n1,x\n2,\n", dict(label="label"),
     r"label column 'label' has a missing value \(NaN\) at row 2 \(line 3\)"),
    ("a,label\n1,0.5\n2,nan\n", dict(label="label", task="regression"),
     r"label column 'label' has a missing value \(NaN\) at row 2"),
    ("id,a,label\n1,1,x\n2,1,y\n1,3,x\n", dict(label="label", id_column="id"),
     r"id column 'id' has duplicate id 1 at row 3 \(line 4\) \(first seen at row 1"),
    ("id,a,label\n1,1,x\nb7,1,y\n", dict(label="label", id_column="id"),
     r"id column 'id' has a non-integer id 'b7' at row 2"),
    ("a,label\n1,x\n2\n", dict(label="label"), r"data.csv: row 2 \(line 3\) has 1 fields"),
    ("a,a,label\n1,1,x\n", dict(label="label"), r"column 'a' appears twice"),
    ("a,label\n", dict(label="label"), r"no data rows"),
    ("a,label\n1,0.5\n2,1.5\n", dict(label="label"), r"must be integers or names; '0.5'"),
    (GOOD, dict(label="label", task="ranking"), r"data.task must be one of"),
])
def test_csv_errors_name_file_column_and_row(tmp_path, text, options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("csv", path=_csv(tmp_path, text), **options)


def test_required_options_are_named(tmp_path):
    with pytest.raises(ValueError, match=r'data set "csv" needs option "path"'):
        load_dataset("csv", label="y")
    with pytest.raises(ValueError, match=r'data set "npz" needs option "path"'):
        load_dataset("npz")


def test_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("csv", path=tmp_path / "nope.csv", label="y")


def _npz(tmp_path, **arrays):
    path = tmp_path / "arrays.npz"
    np.savez(path, **arrays)
    return path


def test_npz_tabular_with_ids_and_names(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = _npz(tmp_path, features=x, labels=np.array([3, 5, 3, 5]), ids=np.array([9, 8, 7, 6]),
                feature_names=np.array(["p", "q", "r"]))
    ds = load_dataset("npz", path=path)
    assert ds.feature_names == ["p", "q", "r"] and ds.class_names == ["3", "5"]
    np.testing.assert_array_equal(ds.ids, [9, 8, 7, 6])
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1])
    np.testing.assert_array_equal(ds.features, x)


def test_npz_image_sequence_and_custom_keys(tmp_path):
    path = _npz(tmp_path, x=np.zeros((5, 4, 6)), y=np.linspace(0, 1, 5))
    img = load_dataset("npz", path=path, features_key="x", labels_key="y", layout="image",
                       task="regression")
    assert img.features.shape == (5, 4, 6) and img.feature_names[7] == "r1c1"
    np.testing.assert_array_equal(img.ids, np.arange(5))
    seq = load_dataset("npz", path=path, features_key="x", labels_key="y", layout="sequence",
                       task="regression")
    assert seq.feature_names == [f"c{j}" for j in range(6)]


@pytest.mark.parametrize("arrays, options, match", [
    (dict(features=np.zeros((3, 2))), {}, r"arrays.npz: no array 'labels' in the file \(arrays: "
                                          r"features\)"),
    (dict(features=np.array([["a", "b"]] * 3), labels=np.zeros(3, int)), {},
     r"array 'features' must be numeric"),
    (dict(features=np.zeros((3, 2, 2)), labels=np.zeros(3, int)), {},
     r"give layout='image' \(N, H, W\) or 'sequence'"),
    (dict(features=np.array([[0.0, 1], [np.nan, 1], [1, 1]]), labels=np.zeros(3, int)), {},
     r"array 'features' has a NaN or infinite value at row index 1"),
    (dict(features=np.zeros((3, 2)), labels=np.array([0.0, 1.0, np.nan])), {},
     r"array 'labels' has a NaN label at row index 2"),
    (dict(features=np.zeros((3, 2)), labels=np.array([0.0, np.nan, 1])), dict(task="regression"),
     r"array 'labels' has a NaN or infinite label at row index 1"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(4, int)), {}, r"has shape \(4,\), but"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(3, int), ids=np.array([4, 5, 4])), {},
     r"array 'ids' has duplicate id 4 at row index 2 \(first seen at row index 0\)"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(3, int), ids=np.array([1.0, 2.5, 3])), {},
     r"array 'ids' has a non-integer id 2.5 at row index 1"),
    (dict(features=np.zeros((3, 2)), labels=np.zeros(3, int), feature_names=np.array(["a"])),
     {}, r"holds 1 names for 2 features"),
])
def test_npz_errors_name_file_key_and_row(tmp_path, arrays, options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("npz", path=_npz(tmp_path, **arrays), **options)


# ---- hostile and broken files: every failure is a DataError naming the file and where ----------


def _zip(path, members, compression=zipfile.ZIP_STORED):
    """An archive holding `members` (name -> bytes) exactly, whatever they are."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _npy(array):
    """One array as .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _header(shape, descr="<f8"):
    """A .npy header alone, declaring `shape`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


BIG = [2**53, 2**53 + 1, -(2**63), 2**63 - 1]  # float64 merges the first two


def test_csv_ids_are_exact_integers(tmp_path):
    rows = "".join(f"{i},{k},{'pq'[k % 2]}\n" for k, i in enumerate(BIG))
    ds = load_dataset("csv", path=_csv(tmp_path, "id,a,y\n" + rows), label="y", id_column="id")
    assert ds.ids.dtype == np.int64 and ds.ids.tolist() == BIG
    # integral decimals, as spreadsheets write integer columns, are the integers they name
    ds = load_dataset("csv", path=_csv(tmp_path, "id,a,y\n12.0,1,p\n 1e3 ,2,q\n-7,3,q\n"),
                      label="y", id_column="id")
    assert ds.ids.tolist() == [12, 1000, -7]


@pytest.mark.parametrize("bad", [str(2**63), str(-(2**63) - 1), "1e999999999", "9" * 5000])
def test_csv_ids_outside_int64_are_refused(tmp_path, bad):
    path = _csv(tmp_path, f"id,a,y\n5,1,p\n{bad},2,q\n")
    with pytest.raises(DataError, match=rf"data.csv: id column 'id' has id {bad[:40]} at row 2 "
                                        r"\(line 3\), outside the int64 range"):
        load_dataset("csv", path=path, label="y", id_column="id")


@pytest.mark.parametrize("ids", [
    np.array(BIG, dtype=np.int64),
    np.array([str(i) for i in BIG]),
    np.array([str(i).encode() for i in BIG]),
    np.array(BIG[:2] + [0, 2**63 - 1], dtype=np.uint64),
], ids=["int64", "str", "bytes", "uint64"])
def test_npz_ids_are_exact_integers(tmp_path, ids):
    path = _npz(tmp_path, features=np.zeros((4, 2)), labels=np.array([0, 1, 0, 1]), ids=ids)
    assert load_dataset("npz", path=path).ids.tolist() == [int(i) for i in ids.tolist()]


@pytest.mark.parametrize("ids, match", [
    (np.array([1, 2**63], dtype=np.uint64),
     r"array 'ids' has id 9223372036854775808 at row index 1, beyond the int64 maximum"),
    (np.array(["1", str(2**63)]),
     r"array 'ids' has id 9223372036854775808 at row index 1, outside the int64 range"),
    (np.array([1.0, 2.0**53]),
     r"array 'ids' has id 9007199254740992.0 at row index 1, beyond 9007199254740991, the "
     r"largest integer float64 holds exactly; store ids as an integer array"),
    (np.array([1.0, 2.0**24], dtype=np.float32),
     r"array 'ids' has id 16777216.0 at row index 1, beyond 16777215, the largest integer "
     r"float32 holds exactly"),
    (np.array([1.0, np.inf]), r"array 'ids' has a non-integer id inf at row index 1"),
    (np.array([True, False]), r"array 'ids': ids must be integers, got dtype bool"),
])
def test_npz_ids_beyond_int64_or_inexact_floats_are_refused(tmp_path, ids, match):
    path = _npz(tmp_path, features=np.zeros((2, 2)), labels=np.array([0, 1]), ids=ids)
    with pytest.raises(DataError, match=r"arrays.npz: " + match):
        load_dataset("npz", path=path)


def test_npz_float_ids_that_are_exact_integers_load(tmp_path):
    ids = np.array([3.0, -1.0, 2.0**53 - 1])
    path = _npz(tmp_path, features=np.zeros((3, 2)), labels=np.array([0, 1, 0]), ids=ids)
    assert load_dataset("npz", path=path).ids.tolist() == [3, -1, 2**53 - 1]


def test_integer_labels_stay_exact(tmp_path):
    a, b = 2**53, 2**53 + 1
    ds = load_dataset("csv", path=_csv(tmp_path, f"x,y\n1,{a}\n2,{b}\n3,{a}\n"), label="y")
    assert ds.class_names == [str(a), str(b)] and ds.labels.tolist() == [0, 1, 0]
    path = _npz(tmp_path, features=np.zeros((3, 2)), labels=np.array([b, a, b]))
    ds = load_dataset("npz", path=path)
    assert ds.class_names == [str(a), str(b)] and ds.labels.tolist() == [1, 0, 1]


def test_single_class_labels_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"data.csv: label column 'y' holds a single class 'yes' "
                                        r"in all 3 rows; classification needs at least 2"):
        load_dataset("csv", path=_csv(tmp_path, "x,y\n1,yes\n2,yes\n3, yes\n"), label="y")
    for labels, shown in ((np.array([4, 4]), "'4'"), (np.array(["cat", "cat"]), "'cat'")):
        path = _npz(tmp_path, features=np.zeros((2, 2)), labels=labels)
        with pytest.raises(DataError, match=rf"arrays.npz: array 'labels' holds a single class "
                                            rf"{shown} in all 2 rows"):
            load_dataset("npz", path=path)
    # one value is fine for regression targets
    ds = load_dataset("csv", path=_csv(tmp_path, "x,y\n1,5\n2,5\n"), label="y", task="regression")
    assert ds.labels.tolist() == [5.0, 5.0]


def test_csv_utf8_bom_is_stripped(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("id,a,é\n7,1,p\n8,2,q\n".encode("utf-8-sig"))
    ds = load_dataset("csv", path=path, label="é", id_column="id")
    assert ds.ids.tolist() == [7, 8] and ds.feature_names == ["a"] and ds.class_names == ["p", "q"]


@pytest.mark.parametrize("data, match", [
    ("a,y\n1,p\n2,café\n".encode("latin-1"),
     r"data.csv: line 3 is not UTF-8 text \(byte 0xe9 at byte 6 of the line\)"),
    ("a,y\n1,p\n".encode("utf-16"), r"data.csv: line 1 is not UTF-8 text \(byte 0xff"),
    (b"a,y\r1,p\r\n2,p\r3,caf\xe9\r", r"data.csv: line 4 is not UTF-8 text \(byte 0xe9 at byte 6"),
    (b"a,y\n1,p\n2,\xc3", r"data.csv: line 3 is not UTF-8 text \(byte 0xc3 at byte 3"),
    (b"a,y\n1,p\n2,q\x00\n3,r\n", r"data.csv: line 3 holds a NUL byte"),
    (b"a,y\n1,p\n2," + b"x" * 200_000 + b"\n3,q\n",
     r"data.csv: line 3 has a field longer than 131072 characters \(csv's field size limit\)"),
    (b'a,y\n1,p\n2,"q\n3,r\n', r"data.csv: line 4 is not valid CSV \(unexpected end of data\) in "
                               r"the record that starts on line 3"),
    (b'a,y\n1,"p"x\n2,q\n', r"data.csv: line 2 is not valid CSV"),
])
def test_csv_bytes_that_are_not_a_text_table_name_the_line(tmp_path, data, match):
    path = tmp_path / "data.csv"
    path.write_bytes(data)
    with pytest.raises(DataError, match=match):
        load_dataset("csv", path=path, label="y")


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_csv_windows_and_old_mac_line_endings_load_like_unix(tmp_path, newline):
    unix = load_dataset("csv", path=_csv(tmp_path, GOOD, "unix.csv"), label="label",
                        id_column="id")
    path = tmp_path / "other.csv"
    path.write_bytes(GOOD.encode().replace(b"\n", newline))
    ds = load_dataset("csv", path=path, label="label", id_column="id")
    assert ds.ids.tolist() == unix.ids.tolist() and ds.class_names == unix.class_names
    np.testing.assert_array_equal(ds.features, unix.features)
    np.testing.assert_array_equal(ds.labels, unix.labels)


def test_csv_rows_name_their_line_after_a_multiline_field(tmp_path):
    path = _csv(tmp_path, 'a,y\n1,"two\nlines"\nz,q\n')
    with pytest.raises(DataError, match=r"column 'a' has a non-numeric value 'z' at row 2 "
                                        r"\(line 4\)"):
        load_dataset("csv", path=path, label="y")


def test_csv_long_bad_value_is_shown_cut_short(tmp_path):
    path = _csv(tmp_path, "a,y\n1,p\n" + "x" * 5000 + ",q\n")
    with pytest.raises(DataError, match=r"non-numeric value 'x{39}\.\.\. \(5000 characters\) at "
                                        r"row 2 \(line 3\)"):
        load_dataset("csv", path=path, label="y")


def test_csv_delimiter_must_be_one_character(tmp_path):
    with pytest.raises(DataError, match=r"data.delimiter must be one character .* got ';;'"):
        load_dataset("csv", path=_csv(tmp_path, GOOD), label="label", delimiter=";;")


@pytest.mark.parametrize("loader, options", [("csv", dict(label="y")), ("npz", {})])
def test_paths_that_are_not_readable_files_are_named(tmp_path, loader, options):
    missing = tmp_path / "nope.dat"
    with pytest.raises(DataError, match=rf"{re.escape(str(missing))}: no such file") as err:
        load_dataset(loader, path=missing, **options)
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}: is a directory"):
        load_dataset(loader, path=tmp_path, **options)
    (tmp_path / "plain").write_text("x")
    below = tmp_path / "plain" / "data"
    with pytest.raises(DataError, match=rf"{re.escape(str(below))}: cannot be opened"):
        load_dataset(loader, path=below, **options)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(DataError, match=rf"{re.escape(str(fifo))}: is not a regular file"):
        load_dataset(loader, path=fifo, **options)


def _good_npz(tmp_path, name="good.npz", compressed=False, **extra):
    arrays = dict(features=np.arange(12.0).reshape(6, 2), labels=np.array([0, 1] * 3),
                  ids=np.arange(6) + 2**53, feature_names=np.array(["a", "b"]), **extra)
    path = tmp_path / name
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_npz_loads_what_numpy_loads(tmp_path):
    """savez_compressed, Fortran order and a big-endian dtype read as np.load reads them."""
    x = np.asfortranarray(np.arange(24, dtype=">i4").reshape(8, 3))
    y = np.array(["b", "a"] * 4)
    path = tmp_path / "c.npz"
    np.savez_compressed(path, features=x, labels=y)
    ds = load_dataset("npz", path=path)
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(ds.features, z["features"])
        assert ds.class_names == sorted(set(z["labels"].tolist()))


def test_npz_empty_not_a_zip_and_npy_files(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"x.npz: the file is empty"):
        load_dataset("npz", path=path)
    path.write_bytes(b"id,a\n1,2\n" * 20)
    with pytest.raises(DataError, match=r"x.npz: not a readable .npz archive"):
        load_dataset("npz", path=path)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match=r"one.npy: is a single .npy array, not an .npz archive"):
        load_dataset("npz", path=tmp_path / "one.npy")


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz_truncations_are_clear_errors(tmp_path, compressed):
    data = _good_npz(tmp_path, compressed=compressed).read_bytes()
    path = tmp_path / "cut.npz"
    for size in range(0, len(data), 3):  # every third length: a cut in each field of each part
        path.write_bytes(data[:size])
        with pytest.raises(DataError, match=r"cut.npz: "):
            load_dataset("npz", path=path)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz_damaged_data_names_the_key(tmp_path, compressed):
    path = _good_npz(tmp_path, compressed=compressed)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("ids.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename)  # savez writes no local extra field
    data[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"good.npz: array 'ids': the archive is damaged \("
                                        r"(BadZipFile: Bad CRC-32|zlib.error|EOFError)"):
        load_dataset("npz", path=path)


def test_npz_every_damaged_byte_errors_or_loads_the_same(tmp_path):
    """No single damaged byte, data or directory, gives a different data set silently."""
    path = _good_npz(tmp_path)
    data = path.read_bytes()
    ref = load_dataset("npz", path=path)
    loaded = 0
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x5A
        path.write_bytes(bytes(damaged))
        try:
            ds = load_dataset("npz", path=path)
        except DataError as exc:
            assert "good.npz" in str(exc)
            continue
        loaded += 1  # timestamps, version fields, ...: harmless
        assert ds.ids.tolist() == ref.ids.tolist() and ds.feature_names == ref.feature_names
        np.testing.assert_array_equal(ds.features, ref.features)
        np.testing.assert_array_equal(ds.labels, ref.labels)
    assert 0 < loaded < len(data) // 2


def test_npz_member_that_is_not_npy_names_the_key(tmp_path):
    path = _zip(tmp_path / "z.npz", {"features.npy": b"this is not an array",
                                     "labels.npy": _npy(np.array([0, 1]))})
    with pytest.raises(DataError, match=r"z.npz: array 'features' is not a .npy array "
                                        r"\(ValueError: the magic string is not correct"):
        load_dataset("npz", path=path)


def test_npz_huge_declared_shape_is_refused_without_allocating(tmp_path):
    members = {"features.npy": _header((10**12,)) + bytes(72), "labels.npy": _npy(np.arange(2))}
    path = _zip(tmp_path / "huge.npz", members)
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"huge.npz: array 'features' declares shape "
                                            r"\(1000000000000,\) of dtype float64 "
                                            r"\(8000000000000 bytes\), but the archive holds 72"):
            load_dataset("npz", path=path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**22


def test_npz_sizes_that_lie_are_refused_without_allocating(tmp_path):
    """Directory and header agree on 400 MB, but only 16 bytes are there."""
    member = _header((400_000_000,), "|u1") + bytes(16)
    path = _zip(tmp_path / "lie.npz", {"features.npy": member, "labels.npy": _npy(np.arange(2))})
    data = bytearray(path.read_bytes())
    claimed = struct.pack("<II", 400_000_000 + len(member) - 16, 400_000_000 + len(member) - 16)
    data[18:26] = claimed  # local header: compressed and uncompressed sizes
    central = data.index(b"PK\x01\x02")  # first directory entry: features.npy
    data[central + 20:central + 28] = claimed
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"lie.npz: .*damaged"):
            load_dataset("npz", path=path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**22


def test_npz_unused_keys_never_block_loading(tmp_path):
    """Objects, non-arrays and even damaged data under keys the loader does not use."""
    path = _good_npz(tmp_path, junk=np.array([{"a": 1}], dtype=object))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes.txt", b"free text")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        junk = z.getinfo("junk.npy")
    data[junk.header_offset + 30 + len(junk.filename) + junk.compress_size - 1] ^= 0xFF
    path.write_bytes(bytes(data))
    ds = load_dataset("npz", path=path)
    assert ds.ids.tolist() == [2**53 + i for i in range(6)] and ds.feature_names == ["a", "b"]


@pytest.mark.parametrize("key", ["labels", "ids", "features"])
def test_npz_object_array_under_a_used_key_is_refused(tmp_path, key):
    arrays = dict(features=np.zeros((2, 2)), labels=np.array([0, 1]), ids=np.array([1, 2]))
    arrays[key] = np.array([{"a": 1}, 2], dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=rf"obj.npz: array '{key}' holds Python objects "
                                        r"\(dtype object\)"):
        load_dataset("npz", path=path)


def test_npz_without_rows_is_refused(tmp_path):
    path = _npz(tmp_path, features=np.zeros((0, 2)), labels=np.zeros(0, int))
    with pytest.raises(DataError, match=r"arrays.npz: array 'features' has shape \(0, 2\): no "
                                        r"rows"):
        load_dataset("npz", path=path)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_npz_highly_compressed_members_load_as_numpy_loads_them(tmp_path, method):
    """Zeros compress far beyond deflate's 1032-fold limit: room grows as the data arrives."""
    x = np.zeros((4096, 64))
    x[::7, 3] = 1.5
    path = _zip(tmp_path / "bz.npz", {"features.npy": _npy(x),
                                      "labels.npy": _npy(np.arange(4096) % 3)}, method)
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("features.npy").compress_size * 1032 < x.nbytes
    ds = load_dataset("npz", path=path)
    with np.load(path, allow_pickle=False) as z:
        np.testing.assert_array_equal(ds.features, z["features"])
        np.testing.assert_array_equal(ds.labels, z["labels"])
