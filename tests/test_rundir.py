"""The run folder: whole-file writes, data-only checkpoints in generations, the lock."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.config import build_config
from liquid_fed.errors import RunFolderError
from liquid_fed.rundir import (
    CHECKPOINTS_DIR,
    Checkpoint,
    RunDir,
    RunLock,
    has_checkpoint,
    load_checkpoint,
    prepare,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent


def _ckpt(round_index: int, k: int = 2) -> Checkpoint:
    clients = [{"model/w": np.full((3, 2), float(round_index + j)),
                "optimizer/groups": np.frombuffer(b'{"a": 1}', dtype=np.uint8).copy()}
               for j in range(k)]
    return Checkpoint(round_index, {"history": [{"round": round_index, "loss": 0.5}],
                                    "train_losses": [0.1, 0.2]},
                      {"leakage/seen": np.ones((k, 4), dtype=bool)}, clients)


def _generations(run: Path) -> list[Path]:
    return sorted(p for p in (run / CHECKPOINTS_DIR).iterdir() if p.name.startswith("gen-"))


class _Payload:
    """Unpickling it creates a marker file: what a planted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_round_trips_and_keeps_two_generations(tmp_path: Path) -> None:
    for r in (3, 6, 9):
        save_checkpoint(tmp_path, _ckpt(r))
    assert [p.name.split("-")[1] for p in _generations(tmp_path)] == ["00000006", "00000009"]
    got = load_checkpoint(tmp_path, 2)
    assert got.round == 9 and got.server["train_losses"] == [0.1, 0.2]
    np.testing.assert_array_equal(got.clients[1]["model/w"], np.full((3, 2), 10.0))
    assert got.server_arrays["leakage/seen"].dtype == bool
    assert not list(tmp_path.rglob("*.tmp-*")) and not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("damage", ["no_manifest", "mixed_rounds", "truncated", "partial_dir"])
def test_a_damaged_newest_generation_falls_back_to_the_last_complete_one(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, _ckpt(4))
    save_checkpoint(tmp_path, _ckpt(8))
    old, new = _generations(tmp_path)
    if damage == "no_manifest":  # a crash before the manifest: the generation never completed
        (new / "manifest.json").unlink()
    elif damage == "mixed_rounds":  # one client's file from another round
        shutil.copy(old / "client_1.npz", new / "client_1.npz")
    elif damage == "truncated":
        data = (new / "client_0.npz").read_bytes()
        (new / "client_0.npz").write_bytes(data[: len(data) // 2])
    else:  # a crash while writing a generation leaves a hidden partial folder: ignored
        shutil.copytree(new, tmp_path / CHECKPOINTS_DIR / ".gen-00000012-abcd.partial")
        shutil.rmtree(new)
    got = load_checkpoint(tmp_path, 2)
    assert got.round == 4
    np.testing.assert_array_equal(got.clients[1]["model/w"], np.full((3, 2), 5.0))
    if damage != "partial_dir":
        assert "is not used" in caplog.text and new.name in caplog.text


def test_no_usable_generation_is_an_error_that_says_why(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _ckpt(4))
    (gen,) = _generations(tmp_path)
    (gen / "server.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"no complete checkpoint .* server.json does not "
                                             r"match the manifest's checksum"):
        load_checkpoint(tmp_path, 2)
    assert not has_checkpoint(tmp_path)
    with pytest.raises(RunFolderError, match="holds 2 clients, the config has 3"):
        save_checkpoint(tmp_path, _ckpt(5))
        load_checkpoint(tmp_path, 3)


def test_planted_pickles_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    ck = tmp_path / CHECKPOINTS_DIR
    ck.mkdir()
    for name in ("server.pt", "client_0.pt"):  # the format of liquid-fed before checkpoints
        (ck / name).write_bytes(pickle.dumps(_Payload(marker)))  # were data
    with pytest.raises(RunFolderError, match=r"server.pt.*pickled files .* never loaded"):
        load_checkpoint(tmp_path, 1)
    # An .npz whose array is a pickle, with a manifest that vouches for it.
    save_checkpoint(tmp_path, _ckpt(2, k=1))
    (gen,) = _generations(tmp_path)
    np.save(gen / "evil.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    import zipfile

    with zipfile.ZipFile(gen / "client_0.npz", "w") as z:
        z.write(gen / "evil.npy", "model/w.npy")
    manifest = json.loads((gen / "manifest.json").read_text())
    import hashlib

    manifest["files"]["client_0.npz"]["sha256"] = hashlib.sha256(
        (gen / "client_0.npz").read_bytes()).hexdigest()
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match="not a readable .npz of plain arrays"):
        load_checkpoint(tmp_path, 1)
    assert not marker.exists()


def test_resume_rules(tmp_path: Path) -> None:
    cfg = build_config({"views": {"n_views": 2, "options": {"grid": [1, 2]}}})
    run = tmp_path / "run"
    prepare(cfg, run)
    (run / "views.json").write_text("{}")  # a start that failed before its first checkpoint
    prepare(cfg, run)  # ... may simply be run again: nothing was completed
    assert not (run / "views.json").exists()
    with pytest.raises(RunFolderError, match="no complete checkpoint .* none was written"):
        prepare(cfg, run, resume=True)
    save_checkpoint(run, _ckpt(3))
    assert prepare(cfg, run, resume=True).path == run
    with pytest.raises(RunFolderError, match="already holds results"):
        prepare(cfg, run)
    RunDir(run).write_summary({"done": True})
    with pytest.raises(RunFolderError, match="already finished .* nothing to continue"):
        prepare(cfg, run, resume=True)
    prepare(cfg, run, force=True)  # asked for: the old results go
    assert not (run / "summary.json").exists() and not has_checkpoint(run)


_HOLD = textwrap.dedent("""
    import sys, time
    from liquid_fed.rundir import RunLock
    RunLock(sys.argv[1]).acquire("holder")
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_run_folder_that_is_a_file_is_refused_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("mine")
    for folder in (blocker, blocker / "sub"):
        with pytest.raises(RunFolderError) as err:
            RunLock(folder).acquire()
        assert str(err.value) == (f"run folder {folder} cannot be a folder: {blocker} is a "
                                  "file; choose another --out")
    assert blocker.read_text() == "mine"


def test_lock_refuses_a_second_writer_and_outlives_no_one(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another liquid-fed process "
                                                 rf"\(pid {holder.pid} on .*: holder\)"):
            RunLock(tmp_path).acquire()
        holder.kill()  # SIGKILL: no chance to clean up; the kernel drops the lock
        holder.wait(timeout=10)
        with RunLock(tmp_path).acquire("second") as lock:
            record = json.loads((tmp_path / ".lock").read_text())
            assert record["pid"] == os.getpid() and record["command"] == "second"
            with pytest.raises(RunFolderError, match="in use"):
                RunLock(tmp_path).acquire()  # another descriptor, even in this process
        assert lock.fd is None
        RunLock(tmp_path).acquire().release()
    finally:
        holder.kill()
        holder.wait(timeout=10)


_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from liquid_fed.rundir import RunDir
    run = RunDir(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # files larger than 4 kB fail
    try:
        run.write_text("summary.json", "x" * 100_000)
    except Exception as exc:
        print(type(exc).__name__, exc)
""")


def test_a_full_disk_loses_nothing_already_written(tmp_path: Path) -> None:
    RunDir(tmp_path).write_text("summary.json", '{"kept": 1}')
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("RunFolderError could not write"), out.stdout + out.stderr
    assert "File too large" in out.stdout
    assert (tmp_path / "summary.json").read_text() == '{"kept": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_a_manifest_cannot_name_client_files_outside_its_generation(tmp_path: Path) -> None:
    from liquid_fed.rundir import Checkpoint, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, Checkpoint(2, {"x": 1}, clients=[{"a": np.zeros(2)}]))
    [gen] = (tmp_path / "checkpoints").iterdir()
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["client_files"] == ["client_0.npz"]
    for planted in (["../../secret.npz"], ["client_0.npz", "client_1.npz"], "client_0.npz"):
        (gen / "manifest.json").write_text(json.dumps({**manifest, "client_files": planted}))
        with pytest.raises(RunFolderError, match="client files"):
            load_checkpoint(tmp_path)
    # A manifest of an older version (no client_files) reads client_<k>.npz.
    del manifest["client_files"]
    (gen / "manifest.json").write_text(json.dumps(manifest))
    assert load_checkpoint(tmp_path).client_files == ["client_0.npz"]


def test_an_npz_with_two_members_of_one_name_is_refused(tmp_path: Path) -> None:
    import io
    import warnings
    import zipfile

    from liquid_fed.data.files import load_npz
    from liquid_fed.errors import DataError, RunFileError
    from liquid_fed.rundir import file_sha256, read_npz

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    path = tmp_path / "twice.npz"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: the point here
        zf.writestr("features.npy", npy(np.zeros((4, 2))))
        zf.writestr("labels.npy", npy(np.array([0, 1, 0, 1])))
        zf.writestr("labels.npy", npy(np.array([1, 1, 1, 1])))
    with pytest.raises(RunFileError, match="holds two members named 'labels'"):
        read_npz(path)
    with pytest.raises(DataError, match="holds two arrays named 'labels'"):
        load_npz(path)
    # The checksum of a file is read in blocks and equals the whole file's.
    import hashlib

    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
