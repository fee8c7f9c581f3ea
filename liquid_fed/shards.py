"""Private shards: what each party of a deployment holds, and nothing more.

``liquid-fed split CONFIG --out DIR`` cuts a run's data set into::

    DIR/party-<k>/features.npz   party k's view: sample ids, its own columns (as the run's
                                 view plan cuts them, noise and missing rows included), and
                                 which rows it really has -- no labels, no other columns
    DIR/party-<k>/manifest.json  who it is for, what it holds, a SHA-256 of the arrays
    DIR/server/labels.npz        sample ids, labels, the train/validation/test split ids (and
                                 the ground truth of synthetic data) -- no features
    DIR/server/manifest.json

In deployment a SuperNode's ClientApp reads only the shard its node config names
(``data-dir="/data/party-2"``) and the ServerApp only the label folder: neither ever loads the
original data set. A shard given to the wrong party, made for another config, damaged, or whose
ids do not line up with the server's is refused with an error naming the party, the folder and
what does not match.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from liquid_fed.config import RunConfig
from liquid_fed.data import Splits
from liquid_fed.errors import DataError, RunFileError
from liquid_fed.federation.setup import ClientView, ServerData, client_view, load_server_data
from liquid_fed.rundir import (
    atomic_write,
    file_sha256,
    json_text,
    npz_bytes,
    private_folder,
    read_json,
    read_npz,
)

log = logging.getLogger(__name__)
PRIVATE = 0o600  # shard files: readable by their owner only

SHARD_FORMAT = "liquid-fed-shard/1"
FEATURES_FILE = "features.npz"
LABELS_FILE = "labels.npz"
MANIFEST_FILE = "manifest.json"
SERVER_DIR = "server"


def party_dir(out: str | Path, k: int) -> Path:
    return Path(out) / f"party-{k}"


def shard_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What a shard must agree on with the config a run uses: the data set, the views, the
    seed that cut them, and the number of parties."""
    return {"data": cfg.data.name, "data_options": cfg.data.options, "views": cfg.views.kind,
            "views_options": cfg.views.options, "n_parties": cfg.n_clients, "seed": cfg.seed,
            "overlap": cfg.views.overlap, "noise": cfg.views.noise,
            "missing": cfg.views.missing}


def _write(folder: Path, data_file: str, arrays: dict[str, np.ndarray],
           manifest: dict[str, Any]) -> None:
    """One shard: a 0700 folder whose files are 0600 (a party's data is for its owner only)."""
    private_folder(folder)
    data = npz_bytes(arrays, compress=True)
    atomic_write(folder / data_file, data, PRIVATE)
    atomic_write(folder / MANIFEST_FILE, (json_text(
        {"format": SHARD_FORMAT, **manifest,
         "files": {data_file: hashlib.sha256(data).hexdigest()}}) + "\n").encode(), PRIVATE)


def write_shards(cfg: RunConfig, out: str | Path) -> list[Path]:
    """Cut the config's data set into one folder per party and one for the server.

    Returns:
        The folders written: ``party-0`` .. ``party-<K-1>``, then ``server``.

    Raises:
        RunFolderError: ``out`` already holds shards (they are never overwritten).
    """
    from liquid_fed.errors import RunFolderError

    out = Path(out)
    if (out / SERVER_DIR / MANIFEST_FILE).exists() or any(out.glob(f"party-*/{MANIFEST_FILE}")):
        raise RunFolderError(f"{out} already holds shards; choose another --out")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)  # a folder of the user's keeps its mode
    fingerprint = shard_fingerprint(cfg)
    folders = []
    for k in range(cfg.n_clients):
        view = client_view(cfg, k)
        folder = party_dir(out, k)
        _write(folder, FEATURES_FILE,
               {"ids": view.ids, "x": view.x, "present": view.present},
               {"role": "party", "party": k, "layout": view.layout,
                "view_shape": list(view.in_shape), "n_samples": int(view.ids.size),
                "config": fingerprint})
        folders.append(folder)
    server = load_server_data(cfg)
    arrays = {"ids": server.ids, "labels": server.labels, "train": server.splits.train,
              "val": server.splits.val, "test": server.splits.test}
    for key in ("informative", "regions"):
        if getattr(server, key) is not None:
            arrays[key] = getattr(server, key)
    _write(out / SERVER_DIR, LABELS_FILE, arrays,
           {"role": "server", "task": server.task, "n_outputs": int(server.n_outputs),
            "n_samples": int(server.ids.size), "config": fingerprint})
    folders.append(out / SERVER_DIR)
    log.info("wrote %d party shards and the server's labels to %s", cfg.n_clients, out)
    return folders


def _read(folder: Path, role: str, who: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A shard's manifest and arrays, after checking its role and checksum."""
    folder = Path(folder)
    data_file = FEATURES_FILE if role == "party" else LABELS_FILE
    if not (folder / MANIFEST_FILE).is_file():
        raise DataError(f"{who}: {folder} holds no shard ({MANIFEST_FILE} is missing; make "
                        "shards with `liquid-fed split CONFIG --out DIR`)")
    try:
        manifest = read_json(folder / MANIFEST_FILE)
        if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
            raise DataError(f"{who}: {folder / MANIFEST_FILE} is not a {SHARD_FORMAT} manifest")
        if manifest.get("role") != role:
            holder = ("the server's shard" if manifest.get("role") == "server"
                      else f"party {manifest.get('party')}'s shard")
            raise DataError(f"{who}: {folder} holds {holder}, not "
                            + ("a party's" if role == "party" else "the server's labels"))
        path = folder / data_file
        if not path.is_file():
            raise DataError(f"{who}: {path} is missing")
        digest = file_sha256(path)
        if digest != (manifest.get("files") or {}).get(data_file):
            raise DataError(f"{who}: {path} does not match its manifest's checksum (damaged, "
                            "or taken from another shard)")
        return manifest, read_npz(path)
    except RunFileError as exc:
        raise DataError(f"{who}: {exc}") from exc


def _check_config(manifest: dict[str, Any], cfg: RunConfig, who: str, folder: Path) -> None:
    want = shard_fingerprint(cfg)
    have = manifest.get("config") or {}
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        key = diff[0]
        raise DataError(f"{who}: the shard in {folder} was cut for another config ({key}: "
                        f"shard {have.get(key)!r}, run {want[key]!r}); cut shards for this "
                        "config with `liquid-fed split`")


def load_party_shard(folder: str | Path, index: int, cfg: RunConfig) -> ClientView:
    """Party ``index``'s view from its shard (not standardised), checked against the run.

    Raises:
        DataError: no shard, a damaged one, another party's, or one cut for another config;
            the message names the party, the folder and what does not match.
    """
    folder = Path(folder)
    who = f"party {index}"
    manifest, arrays = _read(folder, "party", who)
    if manifest.get("party") != index:
        raise DataError(f"{who} was given the shard of party {manifest.get('party')} "
                        f"({folder}); each node's data-dir must hold its own party's shard")
    _check_config(manifest, cfg, who, folder)
    ids, x, present = arrays.get("ids"), arrays.get("x"), arrays.get("present")
    ok = (ids is not None and x is not None and present is not None and ids.ndim == 1
          and ids.dtype.kind == "i" and x.shape[:1] == ids.shape and present.shape == ids.shape
          and present.dtype == bool and x.dtype.kind == "f"
          and list(x.shape[1:]) == manifest.get("view_shape"))
    if not ok:
        raise DataError(f"{who}: {folder / FEATURES_FILE} does not hold ids (N,), x (N, "
                        f"{manifest.get('view_shape')}) and present (N,) as its manifest says")
    if not np.isfinite(x).all():
        raise DataError(f"{who}: {folder / FEATURES_FILE} holds features that are not finite")
    return ClientView(ids=ids.astype(np.int64), x=np.ascontiguousarray(x, dtype=np.float32),
                      present=present, layout=str(manifest.get("layout", "tabular")))


def load_server_shard(folder: str | Path, cfg: RunConfig) -> ServerData:
    """The server's labels and splits from its folder, checked against the run.

    Raises:
        DataError: naming the folder and what does not match.
    """
    folder = Path(folder)
    who = "server"
    manifest, arrays = _read(folder, "server", who)
    _check_config(manifest, cfg, who, folder)
    need = ("ids", "labels", "train", "val", "test")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise DataError(f"{who}: {folder / LABELS_FILE} lacks {', '.join(missing)}")
    ids = arrays["ids"]
    if ids.ndim != 1 or arrays["labels"].shape[:1] != ids.shape:
        raise DataError(f"{who}: {folder / LABELS_FILE}: labels do not line up with ids")
    splits = Splits(*(np.sort(arrays[k].astype(np.int64)) for k in ("train", "val", "test")))
    known = np.isin(np.concatenate(splits_list := [splits.train, splits.val, splits.test]), ids)
    if not known.all() or len(np.unique(np.concatenate(splits_list))) != known.size:
        raise DataError(f"{who}: {folder / LABELS_FILE}: the split ids repeat or name unknown "
                        "samples")
    return ServerData(ids.astype(np.int64), arrays["labels"], str(manifest["task"]),
                      int(manifest["n_outputs"]), splits, arrays.get("informative"),
                      arrays.get("regions"))
