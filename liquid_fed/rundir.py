"""The run folder: its file names, whole-file writes, its lock, checkpoints and the summary.

A run folder holds::

    config.yaml          the resolved config (the run replays from it)
    views.json           the view plan and a probe score per view
    metrics.jsonl        one line per evaluation
    summary.json         the final test metrics, timings, bytes, references (the run finished)
    test_outputs.npz     per-sample powers, delegations, errors of the final test evaluation
    checkpoints/         generations of the server's and the clients' state
    .lock                held by the process that writes the folder

Every file is data: JSON, YAML or ``.npz`` arrays read with ``allow_pickle=False``; opening
someone else's run folder never runs their code. Every file is written whole to a temporary
name, flushed and renamed into place, so a crash or a full disk never leaves a half-written
file. A checkpoint is a *generation*: a folder ``checkpoints/gen-<round>-<id>`` whose
``manifest.json`` (round, generation id, a SHA-256 per file) is written last, and which is
renamed into place only when whole. Loading takes the newest generation whose files match its
manifest and skips (with a warning) any that does not: a crash in the middle of a checkpoint
resumes from the one before, never from a mix of rounds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from liquid_fed.errors import RunFileError, RunFolderError
from liquid_fed.sizes import SizeError, check_fits, format_bytes, npy_header

if TYPE_CHECKING:
    from liquid_fed.config import RunConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
VIEWS_FILE = "views.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
OUTPUTS_FILE = "test_outputs.npz"
CHECKPOINTS_DIR = "checkpoints"
FIGURES_DIR = "figures"
LOCK_FILE = ".lock"
#: What a new run (or ``--force``) clears: the results of an earlier run in the same folder.
RESULT_FILES = (VIEWS_FILE, METRICS_FILE, SUMMARY_FILE, OUTPUTS_FILE)

CHECKPOINT_FORMAT = "liquid-fed-checkpoint/1"
MANIFEST_FILE = "manifest.json"
SERVER_STATE_FILE = "server.json"
SERVER_ARRAYS_FILE = "server.npz"
KEEP_GENERATIONS = 2
_GEN_PREFIX = "gen-"


# --------------------------------------------------------------------------------------------
# Whole-file writes and data-only reads
# --------------------------------------------------------------------------------------------


def strict_json(obj: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays as Python ones, NaN and inf as null (a
    Kendall τ of a constant confidence, say); ``json.dumps`` would write a bare ``NaN``."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict_json`)."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def atomic_write(target: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``target`` whole: a temporary name beside it, fsync, rename.

    ``mode`` (e.g. ``0o600`` for a private key) is set on the temporary file before any byte
    is written, so the content is never readable with wider permissions.

    Raises:
        RunFolderError: the file could not be written (a full disk, say); the target keeps its
            previous content and no temporary file is left behind.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(tmp, flags, 0o666 if mode is None else mode)
        if mode is not None:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widen by accident
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunFolderError(f"could not write {target}: {exc.strerror or exc}") from exc
    return target


def npz_bytes(arrays: dict[str, np.ndarray], compress: bool = False) -> bytes:
    """Arrays as the bytes of an ``.npz`` file (refusing object arrays: data, never pickles)."""
    for key, value in arrays.items():
        if np.asarray(value).dtype.hasobject:
            raise ValueError(f"array {key!r} has dtype object; only plain arrays are saved")
    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    return buf.getvalue()


def read_failed(path: Path, exc: OSError) -> RunFileError:
    """A read the operating system failed (EIO, a vanished mount ...): one line naming the file,
    not mistaken for a damaged file."""
    return RunFileError(f"{path} cannot be read: {exc.strerror or exc}"
                        + (f" [errno {exc.errno}]" if exc.errno else ""))


def _check_npz_size(path: Path) -> None:
    """Refuse an archive whose arrays, by their .npy headers, would not fit in memory: a
    shard or checkpoint of a few megabytes never inflates into gigabytes unasked."""
    import zipfile

    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as f:
                _, shape, _, dtype = npy_header(f)
            if shape is not None:  # np.load judges other versions itself
                total += math.prod(shape) * dtype.itemsize
    check_fits(total, f"{path}: arrays of {format_bytes(total)} (by their headers)")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, never unpickling anything.

    Raises:
        RunFolderError: the file is missing, not an ``.npz`` archive, damaged, or holds object
            arrays; the message names the file.
        SizeError: its arrays, by their headers, would not fit in memory (names the file).
    """
    path = Path(path)
    try:
        _check_npz_size(path)
        with np.load(path, allow_pickle=False) as z:
            if len(set(z.files)) != len(z.files):  # a later member would silently win
                twice = sorted({k for k in z.files if z.files.count(k) > 1})
                raise RunFileError(f"{path} holds two members named {twice[0]!r}")
            return {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise RunFolderError(f"{path} does not exist") from exc
    except (RunFileError, SizeError):
        raise
    except OSError as exc:
        if exc.errno is None:  # zipfile's own complaints (bad CRC ...): a damaged file
            raise RunFileError(f"{path} is not a readable .npz of plain arrays: {exc}") from exc
        raise read_failed(path, exc) from exc
    except Exception as exc:  # zipfile, zlib, numpy format and pickle refusals alike
        raise RunFileError(f"{path} is not a readable .npz of plain arrays: {exc}") from exc


def read_json(path: str | Path) -> Any:
    """A JSON file's value; errors name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RunFolderError(f"{path} does not exist") from exc
    except OSError as exc:
        raise read_failed(path, exc) from exc
    except ValueError as exc:
        raise RunFileError(f"{path} is not readable JSON: {exc}") from exc


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (a shard of gigabytes never sits in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``<run folder>/.lock``, held while a process writes the folder.

    The kernel drops the lock when the holding process dies, however it dies, so a lock left by
    a killed run is stale by construction: the next run takes it over. The file records who holds
    it (pid, host, start time, command) for the message a second process gets. The descriptor may
    be handed to a child (``pass_fds``): the lock then lasts while either process lives.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, command: str = "") -> RunLock:
        """Take the lock or raise :class:`RunFolderError` naming the process that holds it."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in (folder, *folder.parents)
                            if p.exists() and not p.is_dir()), folder)
            raise RunFolderError(f"run folder {folder} cannot be a folder: {blocker} is a file; "
                                 "choose another --out") from None
        except OSError as exc:
            raise RunFolderError(f"run folder {folder} cannot be created or written "
                                 f"({exc.strerror or exc}); choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.path.parent} is in use by another liquid-fed process "
                f"({holder}); wait for it to finish or choose another --out") from None
        stale = _read_holder(fd)
        if stale != "unknown process":
            log.info("taking over the stale lock of %s (that process is gone)", stale)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": command}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.set_inheritable(fd, False)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the last descriptor of the description drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}"
                + (f": {info['command']}" if info.get("command") else ""))
    except (ValueError, KeyError, TypeError, OSError):
        return "unknown process"


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """One consistent generation of a run's state.

    Attributes:
        round: training rounds done.
        server: the server's JSON-able state (history, losses, bytes, elapsed seconds, ...).
        server_arrays: the server's array state (e.g. label-leakage bookkeeping).
        clients: each client's state arrays (expert and optimizer), by client index; empty when
            the clients keep their own checkpoints.
        generation: the generation id the manifest names.
        client_files: the clients' file names (``client_<k>.npz`` when empty; a party's own
            checkpoint names its file by its index, ``party_<k>.npz``).
    """

    round: int
    server: dict[str, Any]
    server_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    clients: list[dict[str, np.ndarray]] = field(default_factory=list)
    generation: str = ""
    digests: dict[str, str] = field(default_factory=dict)  # SHA-256 per file, once written
    client_files: list[str] = field(default_factory=list)


def _client_file(k: int) -> str:
    return f"client_{k}.npz"


def _generations(ck: Path) -> list[Path]:
    """Complete-looking generation folders, newest round first."""
    if not ck.is_dir():
        return []
    gens = []
    for p in ck.iterdir():
        if p.is_dir() and p.name.startswith(_GEN_PREFIX):
            try:
                gens.append((int(p.name.split("-")[1]), p.stat().st_mtime, p))
            except (IndexError, ValueError):
                continue
    return [p for _, _, p in sorted(gens, key=lambda g: (g[0], g[1]), reverse=True)]


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, private: bool = False) -> str:
    """Write ``ckpt`` as a new generation (manifest last, folder renamed when whole), then drop
    all but the newest :data:`KEEP_GENERATIONS` generations; returns the generation id.

    ``private`` (a party's own checkpoints): folders 0700 and files 0600, whatever the umask.
    """
    ck = Path(run_dir) / CHECKPOINTS_DIR
    gen_id = secrets.token_hex(8)
    name = f"{_GEN_PREFIX}{ckpt.round:08d}-{gen_id}"
    partial = ck / f".{name}.partial"
    files = {SERVER_STATE_FILE: json_text({"round": ckpt.round, **ckpt.server}).encode(),
             SERVER_ARRAYS_FILE: npz_bytes(ckpt.server_arrays)}
    names = ckpt.client_files or [_client_file(k) for k in range(len(ckpt.clients))]
    if len(names) != len(ckpt.clients) or not all(_CLIENT_FILE.fullmatch(n) for n in names):
        raise ValueError(f"client files {names!r}: one <name>_<k>.npz per client")
    for fname, state in zip(names, ckpt.clients, strict=True):
        files[fname] = npz_bytes(state)
    mode = 0o600 if private else None
    try:
        if private:
            private_folder(run_dir)
            private_folder(ck)
        partial.mkdir(parents=True, exist_ok=False, mode=0o700 if private else 0o777)
        for fname, data in files.items():
            atomic_write(partial / fname, data, mode)
        manifest = {"format": CHECKPOINT_FORMAT, "generation": gen_id, "round": ckpt.round,
                    "n_clients": len(ckpt.clients), "client_files": names,
                    "files": {f: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)}
                              for f, d in files.items()}}
        atomic_write(partial / MANIFEST_FILE, json_text(manifest).encode(), mode)
        os.replace(partial, ck / name)
        _fsync_dir(ck)
        ckpt.generation = gen_id
        ckpt.digests = {f: m["sha256"] for f, m in manifest["files"].items()}
    except (OSError, RunFolderError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, RunFolderError):
            raise
        raise RunFolderError(f"could not write checkpoint {ck / name}: {exc}") from exc
    for old in _generations(ck)[KEEP_GENERATIONS:]:
        shutil.rmtree(old, ignore_errors=True)
    sweep_partial_checkpoints(run_dir)
    return gen_id


def sweep_partial_checkpoints(run_dir: str | Path) -> None:
    """Remove half-written generations (``.gen-*.partial``) left by a writer that was killed
    mid-checkpoint. Only whoever holds the run folder's lock may call it: a live writer's
    partial generation would go too."""
    ck = Path(run_dir) / CHECKPOINTS_DIR
    for stray in ck.glob(f".{_GEN_PREFIX}*.partial"):
        shutil.rmtree(stray, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_CLIENT_FILE = re.compile(r"[a-z]+_\d{1,6}\.npz")


def private_folder(path: str | Path, claim: bool = True) -> Path:
    """``path`` as a folder only its owner may list or enter (shards, a party's checkpoints,
    work folders and logs): every folder it creates (parents included) is 0700, whatever the
    umask; an existing ``path`` is made 0700 too when ``claim``, else left as it is (it may be
    the user's own folder)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)  # mkdir's mode is filtered by the umask
    if claim:
        path.chmod(0o700)
    return path


def _client_files(manifest: dict[str, Any]) -> list[str]:
    """The clients' file names a manifest lists (older manifests: ``client_<k>.npz``)."""
    names = manifest.get("client_files")
    if names is None:
        return [_client_file(k) for k in range(int(manifest["n_clients"]))]
    if (not isinstance(names, list) or len(names) != manifest.get("n_clients")
            or not all(isinstance(n, str) and _CLIENT_FILE.fullmatch(n) for n in names)):
        raise RunFolderError(f"manifest lists client files {names!r}; expected one "
                             "<name>_<k>.npz per client")
    missing = [n for n in names if n not in manifest["files"]]
    if missing:
        raise RunFolderError(f"manifest has no checksum for {missing[0]}")
    return names


def _check_generation(gen: Path, n_clients: int | None) -> dict[str, Any]:
    """The generation's manifest, after checking every file against it; else a reason."""
    manifest_path = gen / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RunFolderError("no manifest (written last: the checkpoint was interrupted)")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise RunFolderError(f"manifest is not a {CHECKPOINT_FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or SERVER_STATE_FILE not in files:
        raise RunFolderError("manifest lists no server state")
    if n_clients is not None and manifest.get("n_clients") not in (0, n_clients):
        raise RunFolderError(f"it holds {manifest.get('n_clients')} clients, the config has "
                             f"{n_clients}")
    for fname, meta in files.items():
        path = gen / str(fname)
        if "/" in str(fname) or not path.is_file():
            raise RunFolderError(f"{fname} is missing")
        if not isinstance(meta, dict) or file_sha256(path) != meta.get("sha256"):
            raise RunFolderError(f"{fname} does not match the manifest's checksum (a file of "
                                 "another generation or a damaged one)")
    return manifest


def load_checkpoint(run_dir: str | Path, n_clients: int | None = None,
                    generation: str | None = None) -> Checkpoint:
    """The newest complete, consistent checkpoint generation of a run folder (or the one
    ``generation`` names).

    Generations whose manifest is missing or whose files do not match it are skipped with a
    warning. Nothing is unpickled.

    Raises:
        RunFolderError: no usable generation (the message says why each one was refused).
    """
    ck = Path(run_dir) / CHECKPOINTS_DIR
    refused = []
    for gen in _generations(ck):
        if generation is not None and not gen.name.endswith(f"-{generation}"):
            continue
        try:
            manifest = _check_generation(gen, n_clients)
            server = read_json(gen / SERVER_STATE_FILE)
            arrays = read_npz(gen / SERVER_ARRAYS_FILE) if (
                SERVER_ARRAYS_FILE in manifest["files"]) else {}
            names = _client_files(manifest)
            clients = [read_npz(gen / fname) for fname in names]
        except RunFolderError as exc:
            log.warning("checkpoint %s is not used: %s", gen, exc)
            refused.append(f"{gen.name}: {exc}")
            continue
        if refused:
            log.warning("resuming from the older complete checkpoint %s", gen.name)
        rnd = int(server.pop("round"))
        ckpt = Checkpoint(rnd, server, arrays, clients, str(manifest["generation"]),
                          client_files=names)
        ckpt.digests = {f: m["sha256"] for f, m in manifest["files"].items()}
        return ckpt
    legacy = sorted(p.name for p in ck.glob("*.pt")) if ck.is_dir() else []
    why = "; ".join(refused) if refused else (
        f"generation {generation} is not there" if generation else "none was written")
    hint = (f" ({', '.join(legacy)}: pickled files of an older liquid-fed, never loaded: "
            "opening them could run foreign code)") if legacy else ""
    raise RunFolderError(f"no complete checkpoint to resume from in {ck}: {why}{hint}")


def has_checkpoint(run_dir: str | Path) -> bool:
    """True when the folder holds at least one complete generation (checked, not assumed)."""
    try:
        load_checkpoint(run_dir)
    except RunFolderError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


class RunDir:
    """One run folder: what is in it, and the only code that writes it.

    Args:
        path: the folder (created on the first write).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- writes --------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write(self.path / name, data)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json_text(obj) + "\n")

    def write_jsonl(self, name: str, rows: Sequence[dict]) -> Path:
        return self.write_text(name, "".join(json_text(r, None) + "\n" for r in rows))

    def write_npz(self, name: str, arrays: dict[str, np.ndarray], compress: bool = True) -> Path:
        return self.write_bytes(name, npz_bytes(arrays, compress))

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """``summary.json``, whole; the only writer of that file."""
        return self.write_json(SUMMARY_FILE, summary)

    def update_summary(self, **fields: Any) -> dict[str, Any]:
        """Add fields (timings, peak memory from the launcher) to an existing summary."""
        summary = {**self.read_summary(), **fields}
        self.write_summary(summary)
        return summary

    def save_checkpoint(self, ckpt: Checkpoint) -> str:
        return save_checkpoint(self.path, ckpt)

    # -- reads ---------------------------------------------------------------------------------

    def load_checkpoint(self, n_clients: int | None = None) -> Checkpoint:
        return load_checkpoint(self.path, n_clients)

    def read_summary(self) -> dict[str, Any]:
        summary = read_json(self.path / SUMMARY_FILE)
        if not isinstance(summary, dict):
            raise RunFolderError(f"{self.path / SUMMARY_FILE} does not hold a JSON object")
        return summary

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (empty when the file does not exist)."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise read_failed(path, exc) from exc
        except ValueError as exc:
            raise RunFileError(f"{path} is not readable JSON lines: {exc}") from exc

    def read_outputs(self) -> dict[str, np.ndarray]:
        """The arrays of ``test_outputs.npz`` (never unpickled)."""
        return read_npz(self.path / OUTPUTS_FILE)

    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` as plain data (empty when the folder has none)."""
        from liquid_fed.config import safe_yaml

        path = self.path / CONFIG_FILE
        if not path.is_file():
            return {}
        try:
            text = path.read_text()
        except OSError as exc:
            raise read_failed(path, exc) from exc
        data = safe_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise RunFileError(f"{path} does not hold a mapping")
        return data

    def final_test_metrics(self) -> dict[str, Any]:
        """The final test metrics: the summary's, else the last test row of the metrics (a run
        that stopped after its final evaluation); empty when neither has them."""
        if self.finished:
            test = self.read_summary().get("test")
            if isinstance(test, dict):
                return test
        tests = [r for r in self.read_metrics() if r.get("split") == "test"]
        return tests[-1] if tests else {}

    # -- state ---------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The run wrote its summary."""
        return (self.path / SUMMARY_FILE).is_file()

    @property
    def has_results(self) -> bool:
        """A finished run, or a complete checkpoint to resume from: what a new run must not
        silently overwrite. A folder left by a start that failed before its first checkpoint
        holds no results."""
        return self.finished or has_checkpoint(self.path)

    def clear_results(self) -> None:
        """Remove an earlier run's results (``--force``, or a start after a failed one)."""
        for name in RESULT_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        shutil.rmtree(self.path / CHECKPOINTS_DIR, ignore_errors=True)

    def files(self) -> Iterator[Path]:
        return (p for p in self.path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Preparing a folder for a run
# --------------------------------------------------------------------------------------------


def comparable_config(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config that change results (not where or how often they are written)."""
    d = cfg.to_dict()
    d.pop("out", None)
    d.pop("name", None)
    d.pop("tracking", None)  # where the server logs changes no result
    d["simulation"].pop("ray_address", None)  # nor where it runs: resume on another cluster
    d["train"].pop("checkpoint_every", None)
    d["train"].pop("eval_every", None)
    return d


def prepare(cfg: RunConfig, path: str | Path, resume: bool = False,
            force: bool = False) -> RunDir:
    """Check a run folder against what is asked of it; write ``config.yaml`` for a new run.

    Args:
        cfg: the resolved config.
        path: the run folder.
        resume: continue the folder's run from its newest complete checkpoint.
        force: start over in a folder that holds results (they are removed).

    Returns:
        The :class:`RunDir`.

    Raises:
        RunFolderError: resuming a folder without a run, with another config, that already
            finished or whose checkpoints cannot be used; or starting over a folder that
            holds results without ``force``.
    """
    from liquid_fed.config import ConfigError, config_from_yaml_text

    run = RunDir(path)
    if resume:
        saved = run / CONFIG_FILE
        if not saved.is_file():
            raise RunFolderError(f"cannot resume: {saved} does not exist")
        try:
            old = config_from_yaml_text(saved.read_text())
        except ConfigError as exc:
            raise RunFolderError(f"cannot resume: {saved} is not a valid config: {exc}") from exc
        if comparable_config(old) != comparable_config(cfg):
            raise RunFolderError(
                f"cannot resume: the config differs from the one saved in {saved} "
                "(resume with that config, or start a new run folder)")
        if run.finished:
            raise RunFolderError(
                f"cannot resume: the run in {run.path} already finished ({SUMMARY_FILE} is "
                "written); there is nothing to continue. Pass --force to run it again from the "
                "start, or choose another --out")
        load_checkpoint(run.path, cfg.n_clients)  # the error says why none can be used
        return run
    if run.has_results and not force:
        raise RunFolderError(
            f"run folder {run.path} already holds results; pass --resume to continue it, --force "
            "to overwrite it, or choose another --out")
    run.clear_results()  # a forced start, or leftovers of a start that failed early
    run.write_text(CONFIG_FILE, cfg.to_yaml())
    return run
