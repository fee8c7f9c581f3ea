"""In-process operations of the hostile probe (``benchmarks/probe_hostile.py``), run in a
subprocess whose cwd and PYTHONPATH are the tree under test.

    python probe_child.py OP JSON_ARGS

Each op adapts to the tree's API: "before" (commit 1a6eed7: ``liquid_fed/protocol.py``,
``liquid_fed.runs.prepare_folder``, pickled ``checkpoints/*.pt``) or "after" (main:
``liquid_fed/federation/``, ``liquid_fed/rundir.py``). Errors the tree's CLI would catch are
printed the way its ``main`` prints them (``liquid-fed: error: ...``, exit 2); anything else
propagates as a traceback, exactly as the CLI would let it. The op's facts go to stdout as one
JSON line prefixed with ``PROBE_RESULT ``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# this file's folder must not shadow the tree's modules; the tree is cwd / PYTHONPATH
_here = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here or p in ("", ".")]
if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())

import numpy as np  # noqa: E402

TREE = "before" if Path("liquid_fed/protocol.py").is_file() else "after"


def emit(obj: dict) -> None:
    print("PROBE_RESULT " + json.dumps(obj, default=str), flush=True)


def cli_caught(exc: BaseException) -> bool:
    """Whether the tree's CLI ``main`` prints this exception as one line (else: traceback)."""
    if TREE == "before":
        from liquid_fed.config import ConfigError

        if isinstance(exc, (ConfigError, ValueError, FileNotFoundError)):
            return True
        return isinstance(exc, RuntimeError) and type(exc).__name__ in ("RunFolderError",
                                                                         "ClientFailure")
    from liquid_fed.errors import LiquidFedError

    return isinstance(exc, (LiquidFedError, ValueError, FileNotFoundError))


# --------------------------------------------------------------------------------------------
# Tree adapters
# --------------------------------------------------------------------------------------------


def local_transport_cls():
    if TREE == "before":
        from liquid_fed.protocol import LocalTransport
    else:
        from liquid_fed.federation import LocalTransport
    return LocalTransport


def build_cfg(path: str | None, overrides: list[str]):
    from liquid_fed.config import load_config

    return load_config(path, overrides)


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def lock(run_dir: Path):
    if TREE == "before":
        return _NoLock()
    from liquid_fed.rundir import RunLock

    return RunLock(run_dir).acquire("probe")


def prepare(cfg, run_dir: Path, resume: bool, force: bool = False) -> None:
    if TREE == "before":
        from liquid_fed.runs import prepare_folder

        prepare_folder(cfg, run_dir, resume, force)
    else:
        from liquid_fed import rundir

        rundir.prepare(cfg, run_dir, resume, force)


def run_local(cfg, run_dir: Path, transport, resume: bool = False, stop_after=None):
    from liquid_fed.runs import run_federated

    return run_federated(cfg, transport, run_dir, resume=resume, stop_after=stop_after)


def metric_rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def state_finite(state: dict) -> bool:
    ok = True
    for key, value in state.items():
        if key.startswith("model/"):
            a = np.asarray(value)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                ok = False
    return ok


# --------------------------------------------------------------------------------------------
# Hostile transport: client 0 corrupts its replies
# --------------------------------------------------------------------------------------------


def _with(a: np.ndarray, where, value) -> np.ndarray:
    a = a.copy()
    a[where] = value
    return a


def corrupt(mutation: str, kind: str, reply: dict, info: dict, prev: dict | None):
    r = dict(reply)
    if mutation == "none":
        return r, info
    if kind == "setup":
        if mutation == "setup_dup_ids":
            ids = np.asarray(r["ids"]).copy()
            ids[1] = ids[0]
            r["ids"] = ids
        elif mutation == "setup_float_ids":
            r["ids"] = np.asarray(r["ids"]).astype(np.float64)
        elif mutation == "setup_neg_params":
            info = {**info, "n_params": -5}
        elif mutation == "setup_missing_ids":
            r.pop("ids", None)
        return r, info
    if mutation.startswith("setup_"):  # only the setup reply is bad
        return r, info
    target = "evaluate" if mutation.startswith("eval_") else "train"
    if kind != target:
        return r, info
    m = mutation.removeprefix("eval_")
    pred = np.asarray(r["pred"])
    dele = np.asarray(r["del"])
    if m == "pred_nan":
        r["pred"] = _with(pred, np.s_[0, 0], np.nan)
    elif m == "pred_all_nan":
        r["pred"] = np.full_like(pred, np.nan)
    elif m == "pred_inf":
        r["pred"] = _with(pred, np.s_[0, 0], np.inf)
    elif m == "pred_neg_inf":
        r["pred"] = _with(pred, np.s_[:, 0], -np.inf)
    elif m == "pred_1e30":
        r["pred"] = _with(pred, np.s_[0, 0], 1e30)
    elif m == "pred_1e30_all":
        r["pred"] = np.full_like(pred, 1e30)
    elif m == "del_nan":
        r["del"] = _with(dele, np.s_[0, 0], np.nan)
    elif m == "del_inf":
        r["del"] = _with(dele, np.s_[0, 0], np.inf)
    elif m == "pred_short":
        r["pred"] = pred[:-1]
    elif m == "pred_wide":
        r["pred"] = np.concatenate([pred, pred[:, :1]], axis=1)
    elif m == "pred_1d":
        r["pred"] = pred[:, 0].copy()
    elif m == "del_short":
        r["del"] = dele[:-1]
    elif m == "del_wide":
        r["del"] = np.concatenate([dele, dele[:, :1]], axis=1)
    elif m == "missing_pred":
        r.pop("pred")
    elif m == "missing_del":
        r.pop("del")
    elif m == "missing_present":
        r.pop("present")
    elif m == "empty_reply":
        r = {}
    elif m == "pred_int":
        r["pred"] = pred.astype(np.int64)
    elif m == "pred_float16":
        r["pred"] = pred.astype(np.float16)
    elif m == "pred_complex":
        r["pred"] = pred.astype(np.complex64)
    elif m == "pred_list":
        r["pred"] = pred.tolist()
    elif m == "del_sum2":
        r["del"] = dele * 2
    elif m == "del_negative":
        d = np.zeros_like(dele)
        d[:, 0], d[:, 1] = -1.0, 2.0
        r["del"] = d
    elif m == "present_float":
        r["present"] = np.asarray(r["present"]).astype(np.float64)
    elif m == "present_short":
        r["present"] = np.asarray(r["present"])[:-1]
    elif m == "stale":  # the previous request's reply (other ids)
        if prev is not None:
            r = dict(prev)
    elif m == "rows_permuted":  # right ids asked, rows answered in another order
        perm = np.roll(np.arange(pred.shape[0]), 1)
        r["pred"], r["del"] = pred[perm], dele[perm]
    elif m == "extra_key":
        r["junk"] = np.zeros(3)
    else:
        raise SystemExit(f"unknown mutation {mutation}")
    return r, info


def hostile_transport(n_clients: int, mutation: str, bad: int = 0):
    base = local_transport_cls()

    class Hostile(base):
        def __init__(self):
            super().__init__(n_clients)
            self.prev: dict[str, dict] = {}

        def exchange(self, kind, arrays, settings):
            replies = super().exchange(kind, arrays, settings)
            out = []
            for k, (reply, info) in enumerate(replies):
                if k == bad:
                    prev = self.prev.get(kind)
                    self.prev[kind] = dict(reply)
                    reply, info = corrupt(mutation, kind, reply, info, prev)
                out.append((reply, info))
            return out

    return Hostile()


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------

TINY = ["train.epochs=1", "views.n_views=2", "views.kind=blocks", "views.options={}",
        "data.name=digits_flat", "data.options={}", "experts.options={hidden: [16]}",
        "baselines.uniform=false", "baselines.independent=false", "train.eval_every=0"]


def op_fed(a: dict) -> None:
    """A tiny in-process federated run where client ``bad`` corrupts its replies."""
    run_dir = Path(a["run_dir"])
    cfg = build_cfg(a.get("config"), TINY + a.get("set", []))
    transport = hostile_transport(cfg.n_clients, a.get("mutation", "none"))
    with lock(run_dir):
        prepare(cfg, run_dir, False, True)
        summary = run_local(cfg, run_dir, transport)
    test = summary["test"] if summary else {}
    finite = [state_finite(s) for s in transport.states]
    emit({"test": test, "honest_finite": all(finite[1:]), "finite": finite,
          "test_finite": all(isinstance(v, (int, float)) and math.isfinite(v)
                             for v in test.values() if isinstance(v, (int, float)))})


def op_load(a: dict) -> None:
    """Load a data set through the tree's registry; report ids and classes."""
    from liquid_fed.data import load_dataset

    ds = load_dataset(a["name"], **a["options"])
    ids = np.asarray(ds.ids)
    labels = np.asarray(ds.labels)
    emit({"n": int(ids.size), "ids_dtype": str(ids.dtype),
          "ids": [int(i) for i in ids[:5]] + [int(i) for i in ids[-3:]],
          "ids_unique": int(np.unique(ids).size),
          "feature_names": list(ds.feature_names)[:6],
          "n_classes": int(np.unique(labels).size) if labels.ndim == 1 else None,
          "features_finite": bool(np.isfinite(np.asarray(ds.features, dtype=float)).all())})


def op_validate_fn(a: dict) -> None:
    """check_run as validate does it (for configs written by the parent)."""
    from liquid_fed.runs import check_run

    cfg = build_cfg(a["config"], a.get("set", []))
    check_run(cfg)
    emit({"ok": True})


def _finished_run(run_dir: Path, extra: list[str], stop_after=None, force: bool = True) -> None:
    cfg = build_cfg(None, TINY + ["train.checkpoint_every=1"] + extra)
    with lock(run_dir):
        prepare(cfg, run_dir, False, force)
        run_local(cfg, run_dir, local_transport_cls()(cfg.n_clients), stop_after=stop_after)


def _resume(run_dir: Path, extra: list[str], stop_after=None):
    cfg = build_cfg(None, TINY + ["train.checkpoint_every=1"] + extra)
    with lock(run_dir):
        prepare(cfg, run_dir, True)
        return run_local(cfg, run_dir, local_transport_cls()(cfg.n_clients), resume=True,
                         stop_after=stop_after)


def _plant_pickle(path: Path, marker: str) -> None:
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload()))


def op_ckpt(a: dict) -> None:
    """Checkpoint and resume cases on a tiny in-process run."""
    run_dir = Path(a["run_dir"])
    case = a["case"]
    marker = a.get("marker", "")
    extra = a.get("set", [])
    facts: dict = {}
    if case == "planted_pickle":
        # a folder with a valid config and planted pickles where checkpoints live
        _finished_run(run_dir, extra, stop_after=1)
        ck = run_dir / "checkpoints"
        for name in ["server.pt", "client_0.pt", "client_1.pt"]:
            _plant_pickle(ck / name, marker)
        if TREE == "after":
            import shutil

            for gen in ck.iterdir():
                if gen.is_dir():
                    shutil.rmtree(gen)
        _resume(run_dir, extra)
    elif case == "resume_finished":
        _finished_run(run_dir, extra)
        before = metric_rows(run_dir)
        try:
            _resume(run_dir, extra)
        finally:
            after = metric_rows(run_dir)
            keys = [(r.get("round"), r.get("split")) for r in after]
            facts = {"rows_before": len(before), "rows_after": len(after),
                     "duplicates": len(keys) - len(set(keys))}
            emit(facts)
        return
    elif case == "mixed_round":
        import shutil

        _finished_run(run_dir, extra, stop_after=1)
        ck = run_dir / "checkpoints"
        old = Path(str(run_dir) + "-round1")
        shutil.copytree(ck, old)
        _resume(run_dir, extra, stop_after=2)
        # a crash between per-file writes: client 0's file of round 1 beside round 2's others
        if TREE == "before":
            shutil.copy(old / "client_0.pt", ck / "client_0.pt")
        else:
            # the generation a resume would pick: highest round, newest (two may share a round)
            gens = sorted((p for p in ck.iterdir() if p.is_dir() and p.name.startswith("gen")),
                          key=lambda p: (int(p.name.split("-")[1]), p.stat().st_mtime))
            src = next(p for p in (old.iterdir()) if p.is_dir() and p.name.startswith("gen"))
            shutil.copy(src / "client_0.npz", gens[-1] / "client_0.npz")
        summary = _resume(run_dir, extra)
        facts = {"finished": summary is not None}
    elif case == "garbage_checkpoint":
        _finished_run(run_dir, extra, stop_after=1)
        ck = run_dir / "checkpoints"
        for p in ck.rglob("*"):
            if p.is_file() and p.suffix in (".pt", ".npz") and "client_0" in p.name:
                p.write_bytes(b"\x00garbage" * 10)
        _resume(run_dir, extra)
    elif case == "truncated_checkpoint":
        _finished_run(run_dir, extra, stop_after=1)
        ck = run_dir / "checkpoints"
        for p in ck.rglob("*"):
            if p.is_file() and p.suffix in (".pt", ".npz") and "server" in p.name:
                data = p.read_bytes()
                p.write_bytes(data[: len(data) // 2])
            if p.is_file() and p.name == "server.json":
                p.write_text(p.read_text()[:20])
        _resume(run_dir, extra)
    elif case == "no_checkpoint":
        cfg = build_cfg(None, TINY + extra)
        prepare(cfg, run_dir, False, True)
        _resume(run_dir, extra)
    elif case == "resume_other_config":
        _finished_run(run_dir, extra, stop_after=1)
        _resume(run_dir, extra + ["optim.lr=0.5"])
    elif case == "rerun_without_force":
        _finished_run(run_dir, extra)
        cfg = build_cfg(None, TINY + ["train.checkpoint_every=1"] + extra)
        prepare(cfg, run_dir, False, False)
    elif case == "disk_full":
        # run inside a user+mount namespace with a tiny tmpfs on run_dir's parent (the parent
        # sets that up); fill it, run, then free the space and try to carry on
        filler = run_dir.parent / "filler"
        budget = int(a.get("free_bytes", 60_000))
        st = os.statvfs(run_dir.parent)
        free = st.f_bavail * st.f_frsize
        filler.write_bytes(b"\0" * max(0, free - budget))
        err1 = None
        try:
            _finished_run(run_dir, extra, stop_after=None)
        except BaseException as exc:  # noqa: BLE001
            err1 = f"{type(exc).__name__}: {exc}"
            err1_caught = cli_caught(exc)
        filler.unlink()
        facts = {"first_error": err1, "first_caught": err1 is not None and err1_caught}
        # the same command again, without --force
        for label, fn in (("rerun", lambda: _finished_run(run_dir, extra, force=False)),):
            try:
                fn()
                facts[label] = "ok"
            except BaseException as exc:  # noqa: BLE001
                facts[label] = f"{type(exc).__name__}: {exc}"
        if facts["rerun"] != "ok":
            try:
                _resume(run_dir, extra)
                facts["resume"] = "ok"
            except BaseException as exc:  # noqa: BLE001
                facts["resume"] = f"{type(exc).__name__}: {exc}"
        facts["files"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))[:20]
    else:
        raise SystemExit(f"unknown ckpt case {case}")
    if marker:
        facts["marker"] = os.path.exists(marker)
    emit(facts)


OPS = {"fed": op_fed, "load": op_load, "validate_fn": op_validate_fn, "ckpt": op_ckpt}


def main() -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    op, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        OPS[op](args)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not cli_caught(exc):
            raise
        print(f"liquid-fed: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
