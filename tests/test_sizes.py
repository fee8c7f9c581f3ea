"""Sizes known before starting (issue 18 item 5): each hostile input of the probe fails with one
line naming the key or file, within seconds and under 500 MB, before anything is built.

Memory is measured where it matters: the CLI runs as a child that writes its own peak RSS
(``VmHWM`` of /proc/self/status, which starts afresh at exec; ``ru_maxrss`` of a child would
also count the image of this pytest process it was forked from). ``liquid-fed validate
configs/quickstart.yaml`` itself peaks near 400 MB (torch, scikit-learn and the digits), so
500 MB leaves about 100 MB for a refusal.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from liquid_fed import sizes
from liquid_fed.cli import main
from liquid_fed.config import build_config
from liquid_fed.data import files
from liquid_fed.errors import DataError, RunFileError
from liquid_fed.experts import build_expert

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ROOT / "configs" / "regions.yaml"
LIMIT_KIB = 500 * 1024  # the bar: under 500 MB
SECONDS = 30  # "within seconds": 3-5 s each on an idle 2-core machine, 8-12 s at load 13


# Runs a module or code as __main__, then writes the process's peak RSS (KiB) at exit.
PEAK = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as fh:
        kib = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(os.environ["LF_PEAK_FILE"], "w") as out:
        out.write(kib)
atexit.register(_peak)
what, sys.argv = sys.argv[1], sys.argv[1:]
if what == "-c":  # sys.argv is ["-c", *args], as for python -c
    exec(os.environ["LF_CODE"])
else:
    runpy.run_module(what, run_name="__main__", alter_sys=True)
"""


def child(tmp_path: Path, what: str, *args: str, env: dict[str, str] | None = None
          ) -> tuple[int, str, str, float, int]:
    """Module ``what`` (or ``-c`` with $LF_CODE) as a child: (exit status, stdout, stderr,
    seconds, the child's own peak RSS in KiB)."""
    stem = tmp_path / f"child-{time.monotonic_ns()}"
    peak = stem.with_suffix(".peak")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, what, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LF_PEAK_FILE": str(peak),
                               **(env or {})})
    return (proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0,
            int(peak.read_text()))


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None
        ) -> tuple[int, str, float, int]:
    """``liquid-fed ARGS`` in a child: (exit status, stderr, seconds, the child's peak RSS KiB)."""
    rc, _, err, seconds, peak = child(tmp_path, "liquid_fed.cli", *args, env=env)
    return rc, err, seconds, peak


def assert_refused(result: tuple[int, str, float, int], *named: str) -> str:
    """One line ``liquid-fed: error: ...`` naming each of ``named``, fast and small."""
    rc, err, seconds, peak = result
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("liquid-fed: error: "), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert seconds < SECONDS, seconds
    assert peak < LIMIT_KIB, f"peak {peak / 1024:.0f} MB: {lines[0]}"
    return lines[0]


def write_config(tmp_path: Path, data: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        name: probe
        data: {data}
        views: {{kind: columns, n_views: 2, options: {{}}}}
        experts: {{kind: mlp, options: {{hidden: [8]}}}}
        train: {{epochs: 1}}
    """))
    return path


# ---- the formulas ----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "in_shape", "options"), [
    ("mlp", (16,), {"hidden": [128]}),
    ("mlp", (3, 7), {"hidden": [5, 9, 2], "dropout": 0.1}),
    ("cnn", (8, 8), {"channels": [4, 6, 3], "kernel_size": 3}),
    ("cnn", (2, 5, 4), {"channels": [7], "kernel_size": 5, "downsample": False}),
    ("esn", (6, 3), {"units": 20, "seed": 1}),
    ("ltc", (6, 3), {"units": 12}),
    ("ltc", (4,), {"units": 5, "solver": "rk4", "substeps": 2}),
])
def test_parameter_count_equals_the_built_experts(kind, in_shape, options) -> None:
    expert = build_expert(kind, in_shape, 7, 3, 1, **options)
    size = sizes.expert_size(kind, in_shape, 7, 3, **options)
    assert size.parameters == sum(p.numel() for p in expert.parameters())
    assert size.buffers == sum(b.numel() for b in expert.buffers())


def test_a_run_estimate_counts_every_expert_and_the_optimizer() -> None:
    from liquid_fed.federation import build_client_expert, load_data, make_plan

    cfg = build_config({"experts": {"per_client": [{"kind": "mlp", "options": {"hidden": [9]}},
                                                   {}, {}, {"kind": "cnn"}]}})
    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    shapes = [plan.view_shape(k, ds.features.shape) for k in range(4)]
    built = [build_client_expert(cfg, k, shapes[k], ds.n_outputs) for k in range(4)]
    n = sum(p.numel() for e in built for p in e.parameters())
    est = sizes.run_estimate(cfg, shapes, ds.n_outputs)
    assert est.parameters == n
    assert est.model_bytes == n * 4 * (1 + 1 + 2)  # float32: parameter, gradient, Adam's 2
    sgd = build_config({**cfg.to_dict(), "optim": {"name": "sgd"}, "train": {"dtype": "float64"}})
    assert sizes.run_estimate(sgd, shapes, ds.n_outputs).model_bytes == n * 8 * 2


def test_npz_and_csv_estimates_bound_what_loading_takes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 5)).astype(np.float32)
    y = rng.integers(0, 3, 2000)
    np.savez_compressed(tmp_path / "a.npz", features=x, labels=y)
    loaded = files.load_npz(tmp_path / "a.npz")
    need = sizes.npz_load_bytes({"features": ((2000, 5), 4), "labels": ((2000,), 8)},
                                "features", "labels")
    # at least what the data set keeps (float64 features, labels, ids) plus the raw arrays
    kept = loaded.features.nbytes + loaded.labels.nbytes + loaded.ids.nbytes
    assert kept + x.nbytes + y.nbytes <= need <= 3 * (kept + x.nbytes + y.nbytes)

    text = "a,b,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(1000))
    (tmp_path / "a.csv").write_text(text)
    with open(tmp_path / "a.csv", "rb") as fh:
        assert files.csv_shape(fh, ",") == (1000, 3, len(text))
        assert fh.tell() == 0
    (tmp_path / "b.csv").write_bytes(b"a;b\r1;2\r3;4")  # old Mac line ends, no last line end
    with open(tmp_path / "b.csv", "rb") as fh:
        assert files.csv_shape(fh, ";")[:2] == (2, 2)


def test_the_limit_is_memavailable_or_the_override(monkeypatch) -> None:
    with open("/proc/meminfo") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    monkeypatch.delenv(sizes.ENV_MAX_MEMORY, raising=False)
    have, words = sizes.memory_limit()
    assert abs(have - kib * 1024) < 2**30 and "available" in words  # it moves a little
    assert sizes.memory_limit("1.5GiB")[0] == 3 * 2**29
    monkeypatch.setenv(sizes.ENV_MAX_MEMORY, "500M")
    assert sizes.memory_limit() == (500 * 10**6, "the limit is 500.0 MB (--max-memory or "
                                                 f"{sizes.ENV_MAX_MEMORY})")
    for bad in ("lots", "-1G", "0", "5XB"):
        with pytest.raises(ValueError, match=rf"--max-memory: got '{bad}'; expected a positive"):
            sizes.parse_size(bad)


# ---- each probe input: one line, seconds, under 500 MB ---------------------------------------


def test_validate_baseline_and_the_60000_wide_experts(tmp_path: Path) -> None:
    rc, err, _, base = cli(tmp_path, "validate", "configs/quickstart.yaml")
    assert rc == 0 and "size: 4 experts, 15,928 parameters" in err, err
    assert base < LIMIT_KIB, base
    line = assert_refused(cli(tmp_path, "validate", "configs/quickstart.yaml", "--set",
                              "experts.options.hidden=[60000, 60000, 60000]"),
                          "experts.options.hidden = [60000, 60000, 60000]", "the 4 experts",
                          "available")
    n = 4 * (16 * 60000 + 2 * 60000 * 60000 + 3 * 60000 + 60000 * 14 + 14)
    assert f"{n:,} parameters" in line


STUDIES = {
    "seeds": ("seeds: 1000000000", "seeds: got 1000000000; expected 1..1000"),
    "random.n": ("random: {n: 1000000000, keys: {views.noise: {uniform: [0, 1]}}}",
                 "the study has 1,000,000,000 settings"),
    "grid 10^12": ("grid:\n" + "\n".join(
        f"  views.noise{i}: [{', '.join(str(j) for j in range(100))}]" for i in range(6)),
        "the study has 1,000,000,000,000 settings"),
    "grid 10^6": ("grid:\n" + "\n".join(
        f"  views.noise{i}: [{', '.join(str(j) for j in range(100))}]" for i in range(3)),
        "the study has 1,000,000 settings (grid x paired, plus random.n); at most 10,000"),
    "int bounds": ("random: {n: 3, keys: {train.epochs: {int: [1.5, 4]}}}",
                   "random.keys.train.epochs.int: got [1.5, 4]"),
    "seed 2**63": ("seeds: [0, 9223372036854775808]", "seeds: got [0, 9223372036854775808]; "
                   "expected a count or a list of distinct seeds in [0, 4294967295]"),
}


@pytest.mark.parametrize("kind", list(STUDIES))
def test_a_study_too_large_or_malformed_fails_in_one_line(tmp_path: Path, kind: str) -> None:
    body, message = STUDIES[kind]
    study = tmp_path / "study.yaml"
    study.write_text(f"base: {REGIONS}\n{body}\n")
    assert_refused(cli(tmp_path, "compare", str(study), "--out", str(tmp_path / "out")), message)
    assert not (tmp_path / "out").exists()


def _zeros_npz(path: Path, rows: int, cols: int) -> None:
    """An .npz of float32 zeros, streamed: a 1.2 GB array in a 1.2 MB file, never in memory."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (rows, cols)})
    block = bytes(cols * 4 * 4096)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("features.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            for start in range(0, rows, 4096):
                f.write(block[:cols * 4 * min(4096, rows - start)])
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.arange(rows) % 2)
        zf.writestr("labels.npy", buf.getvalue())


def test_an_npz_that_expands_beyond_the_limit_is_refused_before_inflating(
        tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"
    _zeros_npz(bomb, 3_000_000, 100)  # 1.2 GB of float32 zeros
    assert bomb.stat().st_size < 2_000_000
    config = write_config(tmp_path, f"{{name: npz, options: {{path: {bomb}}}}}")
    assert_refused(cli(tmp_path, "validate", str(config), "--max-memory", "2G"),
                   str(bomb), "features (3000000, 100)", "the limit is 2.0 GB (--max-memory")
    # the same limit from the environment, as children of compare and run inherit it
    assert_refused(cli(tmp_path, "validate", str(config),
                       env={sizes.ENV_MAX_MEMORY: "2G"}), str(bomb), "needs about")


def test_a_csv_of_ten_million_rows_is_counted_not_loaded(tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    big.write_bytes(b"a,b,label\n" + b"1,2,0\n3,4,1\n" * 5_000_000)
    config = write_config(tmp_path, f"{{name: csv, options: {{path: {big}, label: label}}}}")
    line = assert_refused(cli(tmp_path, "validate", str(config), "--max-memory", "2G"),
                          str(big), "10,000,000 rows x 3 columns", "(--max-memory")
    need = sizes.csv_load_bytes(10_000_000, 3, big.stat().st_size)
    assert f"needs about {sizes.format_bytes(need)}" in line


def test_an_npz_with_two_members_of_one_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.npz"
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name, and writes it
        for member, array in (("features", np.zeros((4, 2))), ("labels", np.arange(4) % 2),
                              ("labels", np.arange(4) % 3)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array)
            zf.writestr(f"{member}.npy", buf.getvalue())
    config = write_config(tmp_path, f"{{name: npz, options: {{path: {path}}}}}")
    assert_refused(cli(tmp_path, "validate", str(config)), str(path),
                   "holds two arrays named 'labels'")


def test_a_checksum_streams_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "shard.npz"
    with path.open("wb") as fh:  # 600 MB, sparse: reading it whole would cross the bar
        fh.seek(600 * 10**6 - 5)
        fh.write(b"tail.")
    want = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            want.update(block)
    code = ("import sys; from liquid_fed.rundir import file_sha256; "
            "print(file_sha256(sys.argv[1]))")
    rc, out, err, seconds, peak = child(tmp_path, "-c", str(path), env={"LF_CODE": code})
    assert rc == 0 and out.strip() == want.hexdigest(), err
    # the import of the library (torch) alone is about 230 MB; the 600 MB file adds nothing
    assert peak < 300 * 1024 and seconds < SECONDS, (peak, seconds)


# ---- values, read errors, a vanished study folder --------------------------------------------


def test_csv_values_beyond_float32_name_the_file_column_and_row(tmp_path: Path, capsys) -> None:
    path = tmp_path / "over.csv"
    path.write_text("a,b,label\n1,2,0\n3,1e39,1\n5,6,0\n7,8,1\n")
    config = write_config(tmp_path, f"{{name: csv, options: {{path: {path}, label: label}}}}")
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"liquid-fed: error: data: {path}: column 'b' has 1e+39 at row 2 (line 3), "
                   "beyond float32's range (largest magnitude 3.40282e+38) that the experts "
                   "train in; rescale it")
    with np.errstate(over="ignore"):
        assert float(np.float32(1e39)) == math.inf  # what training would have made of it
    x = np.ones((4, 3))
    x[2, 1] = -1e39
    np.savez(tmp_path / "over.npz", features=x, labels=np.arange(4) % 2)
    with pytest.raises(DataError, match=r"over.npz: array 'features' has -1e\+39 at row index "
                                        r"2, column 1, beyond float32's range"):
        files.load_npz(tmp_path / "over.npz")
    x[2, 1] = np.inf
    np.savez(tmp_path / "inf.npz", features=x, labels=np.arange(4) % 2)
    with pytest.raises(DataError, match=r"inf.npz: array 'features' has a NaN or infinite "
                                        r"value at row index 2"):
        files.load_npz(tmp_path / "inf.npz")


class _Failing(io.RawIOBase):
    """A file whose every read fails as a dying disk's does."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def readinto(self, buffer) -> int:
        raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("fmt", ["csv", "npz"])
def test_a_read_error_of_a_data_file_is_one_line_naming_it(tmp_path: Path, capsys, monkeypatch,
                                                          fmt: str) -> None:
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("a,b,label\n1,2,0\n3,4,1\n")
        data = f"{{name: csv, options: {{path: {path}, label: label}}}}"
    else:
        np.savez(path, features=np.ones((4, 2)), labels=np.arange(4) % 2)
        data = f"{{name: npz, options: {{path: {path}}}}}"
    config = write_config(tmp_path, data)
    real = files._open_regular
    calls = []

    def failing(p: Path, kind: str):
        fh = real(p, kind)  # the same checks; then every read fails
        fh.close()
        calls.append(p)
        return io.BufferedReader(_Failing())

    monkeypatch.setattr(files, "_open_regular", failing)
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert calls and err == (f"liquid-fed: error: data: {path}: cannot be read "
                             "(Input/output error [errno 5])")


def test_read_errors_of_configs_run_folders_and_anything_else_are_one_line(
        tmp_path: Path, capsys, monkeypatch) -> None:
    from liquid_fed import cli, rundir

    config = write_config(tmp_path, "{name: iris}")
    real_read_text = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:
        if self.name in ("run.yaml", "summary.json", "config.yaml"):
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"liquid-fed: error: config file {str(config)!r} cannot be read: [Errno 5] "
                   f"Input/output error: {str(config)!r}"]
    run = rundir.RunDir(tmp_path / "run")
    for read, name in ((run.read_summary, "summary.json"), (run.read_config, "config.yaml")):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / name).write_bytes(b"{}")
        with pytest.raises(RunFileError) as caught:
            read()
        assert str(caught.value) == (f"{tmp_path / 'run' / name} cannot be read: "
                                     "Input/output error [errno 5]")
    np.savez(tmp_path / "run" / "a.npz", x=np.arange(3))
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    with pytest.raises(RunFileError, match=r"a.npz cannot be read: Input/output error \[errno 5"):
        rundir.read_npz(tmp_path / "run" / "a.npz")

    def eio(args) -> int:  # whatever command meets the failing disk: one line, status 1
        raise OSError(errno.EIO, "Input/output error", "/data/shard.npz")

    parsed = cli.build_parser().parse_args(["validate", str(config)])
    assert cli._dispatch(eio, parsed) == 1
    assert capsys.readouterr().err == ("liquid-fed: error: /data/shard.npz: Input/output error "
                                       "[errno 5]\n")


def test_a_study_whose_folder_is_deleted_midway_fails_naming_it(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(textwrap.dedent(f"""
        name: vanishing
        base: {REGIONS}
        set: {{train.epochs: 1, data.options.n_samples: 300, train.eval_every: 0}}
        seeds: 3
        methods: [liquid, uniform]
    """))
    out = tmp_path / "out"
    keep = tmp_path / "neighbour.txt"
    keep.write_text("untouched")
    proc = subprocess.Popen([sys.executable, "-m", "liquid_fed.cli", "compare", str(study),
                             "--out", str(out), "--quiet"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(out.glob("cells/*/*/*/summary.json")):  # the first run finished
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while out.exists():  # the study keeps writing: remove until it is gone
        shutil.rmtree(out, ignore_errors=True)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("liquid-fed: error: ") and str(out) in lines[-1], stderr
    assert "rows ->" not in stdout  # no claim of success
    assert keep.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir() if p != out) == [
        "neighbour.txt", "study.yaml"]


def test_a_run_folder_archive_is_sized_by_its_headers_before_inflating(tmp_path: Path,
                                                                        monkeypatch) -> None:
    from liquid_fed import rundir

    path = tmp_path / "party_0.npz"
    np.savez_compressed(path, x=np.zeros((1000, 1000)), ids=np.arange(1000))
    assert path.stat().st_size < 100_000  # 8 MB of zeros, compressed
    monkeypatch.setenv(sizes.ENV_MAX_MEMORY, "5M")
    with pytest.raises(sizes.SizeError, match=rf"^{path}: arrays of 8.0 MB \(by their headers\): "
                                              r"needs about 8.0 MB of memory; the limit is 5.0 MB"):
        rundir.read_npz(path)
    monkeypatch.setenv(sizes.ENV_MAX_MEMORY, "9M")
    assert rundir.read_npz(path)["x"].shape == (1000, 1000)
