"""Hostile probe of a liquid-fed tree (issue 7's closing table): bad configs, data files,
checkpoints, client replies, signals and Ray, each case in its own subprocess.

    git worktree add --detach ../before 1a6eed7      # the tree before issue 7
    python benchmarks/probe_hostile.py --tree ../before --out probe-before.json
    python benchmarks/probe_hostile.py --tree . --out probe-after.json
    python benchmarks/probe_hostile.py --compare probe-before.json probe-after.json

Every case runs with cwd=TREE and PYTHONPATH=TREE under this interpreter (``sys.executable``),
with a
timeout, and is classified as exactly one of :data:`CLASSES` (or ``n/a`` with a reason where
the tree cannot express it). ``--only SUBSTR`` runs the cases whose id contains SUBSTR;
``--no-ray`` skips the cases that start Ray (each costs 20-60 s).

Classes: handled (worked correctly), clear_error (exit != 0, one-line message naming the
key/file/client, no traceback), unclear_error (no traceback, but the message does not name the
thing, or hides it behind an invisible character), traceback, hang (timeout), silent_wrong
(exit 0 with a wrong/NaN result, or bad input accepted), code_ran (a planted payload ran),
data_lost (earlier results damaged or lost), process_leaked (processes or temporary folders
left), port_open (a port reachable beyond loopback, or joinable without credentials).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PY = sys.executable
CHILD = str(Path(__file__).with_name("probe_child.py"))
CLASSES = ["handled", "clear_error", "unclear_error", "traceback", "hang", "silent_wrong",
           "code_ran", "data_lost", "process_leaked", "port_open"]
BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
INVISIBLE = re.compile("[\ufeff\u200b\u200c\u200d\u2060\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass
class Ctx:
    tree: Path
    work: Path  # a fresh folder for this case
    marker: Path  # a planted payload touches this
    token: str  # PROBE_CASE value: every process of the case carries it


@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    facts: dict = field(default_factory=dict)


@dataclass
class Case:
    id: str
    group: str
    what: str
    argv: Callable[[Ctx], list[str]] | None = None  # the command (python args after PY)
    expect: str = "reject"  # reject: bad input; accept: valid input that must work
    names: tuple[str, ...] = ()  # one of these must appear in a clear error
    timeout: float = 90.0
    check: Callable[[Outcome, Ctx], tuple[str, str] | None] | None = None  # class, detail
    na: Callable[[Path], str | None] | None = None
    runner: Callable[[Ctx], tuple[str, str, str]] | None = None  # custom: class, detail, repro
    ray: bool = False


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


def env_for(ctx: Ctx) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PROBE_"))}
    env.update(BASE_ENV)
    env["PYTHONPATH"] = str(ctx.tree)
    env["PROBE_CASE"] = ctx.token
    return env


def tree_argv(ctx: Ctx, argv: list[str]) -> list[str]:
    """``argv`` for the tree: trees before issue 14 have their CLI in ``simulations.cli``."""
    if (ctx.tree / "liquid_fed" / "cli.py").is_file():
        return argv
    return ["simulations.cli" if a == "liquid_fed.cli" else a for a in argv]


def run_cmd(ctx: Ctx, argv: list[str], timeout: float) -> Outcome:
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, *tree_argv(ctx, argv)], cwd=ctx.tree, env=env_for(ctx),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    facts = {}
    for line in out.splitlines():
        if line.startswith("PROBE_RESULT "):
            facts = json.loads(line[len("PROBE_RESULT "):])
    return Outcome(None if timed_out else proc.returncode, out, err,
                   time.perf_counter() - t0, timed_out, facts)


def error_text(o: Outcome) -> str:
    lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs[-1] if errs else (lines[-1] if lines else o.stdout.strip()[-300:]))


def classify(case: Case, o: Outcome, ctx: Ctx) -> tuple[str, str]:
    if ctx.marker.exists():
        return "code_ran", "the planted payload touched its marker file"
    if o.timed_out:
        return "hang", f"no answer within {case.timeout:.0f} s"
    if case.check is not None:
        verdict = case.check(o, ctx)
        if verdict is not None:
            return verdict
    if o.rc != 0:
        if "Traceback (most recent call last)" in o.stderr:
            last = [ln for ln in o.stderr.splitlines() if ln.strip()][-1]
            return "traceback", last[:300]
        msg = error_text(o)
        if INVISIBLE.search(msg):
            return "unclear_error", "message hides an invisible character: " + ascii(msg)[:300]
        low = msg.lower()
        if not case.names or any(n.lower() in low for n in case.names):
            return "clear_error", msg[:300]
        return "unclear_error", msg[:300]
    if case.expect == "reject":
        return "silent_wrong", "bad input accepted (exit 0)"
    return "handled", "worked"


def leftovers(token: str) -> list[int]:
    """Live processes carrying this case's PROBE_CASE value."""
    found = []
    needle = f"PROBE_CASE={token}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes():
                stat = (d / "stat").read_text()
                if ") Z " not in stat:
                    found.append(int(d.name))
        except OSError:
            continue
    return found


def kill_own(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def lfray_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("lfray-*")}


def run_case(case: Case, tree: Path, root: Path) -> dict[str, Any]:
    work = root / re.sub(r"[^\w.=+-]", "_", case.id).lstrip(".")
    work.mkdir(parents=True)
    ctx = Ctx(tree, work, work / "PAYLOAD_RAN", secrets.token_hex(8))
    if case.na is not None:
        reason = case.na(tree)
        if reason:
            return {"id": case.id, "group": case.group, "what": case.what, "class": "n/a",
                    "detail": reason, "seconds": 0.0, "repro": ""}
    t0 = time.perf_counter()
    tmp_before = lfray_dirs()
    if case.runner is not None:
        cls, detail, repro = case.runner(ctx)
    else:
        argv = case.argv(ctx)
        o = run_cmd(ctx, argv, case.timeout)
        cls, detail = classify(case, o, ctx)
        repro = "cd TREE && PYTHONPATH=. python " + " ".join(_q(a) for a in argv)
        left = leftovers(ctx.token)
        if left and cls in ("handled", "clear_error"):
            cls, detail = "process_leaked", f"{len(left)} processes left; " + detail
        kill_own(left)
    new_tmp = lfray_dirs() - tmp_before
    if case.ray:
        for name in new_tmp:  # only folders this case's run made (Ray's), gone now
            shutil.rmtree(Path("/tmp") / name, ignore_errors=True)
    return {"id": case.id, "group": case.group, "what": case.what, "class": cls,
            "detail": detail, "seconds": round(time.perf_counter() - t0, 1),
            "repro": repro.replace(str(root), "$WORK")}


def _q(a: str) -> str:
    return a if re.fullmatch(r"[\w./=:,+@-]+", a) else "'" + a.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------------------------
# Case builders
# --------------------------------------------------------------------------------------------

QUICK = "configs/quickstart.yaml"


def validate(*sets: str, config: str | Callable[[Ctx], str] = QUICK) -> Callable[[Ctx], list]:
    def argv(ctx: Ctx) -> list[str]:
        path = config(ctx) if callable(config) else config
        out = ["-m", "liquid_fed.cli", "validate", path]
        for s in sets:
            out += ["--set", s]
        return out
    return argv


def child(op: str, args: Callable[[Ctx], dict] | dict) -> Callable[[Ctx], list[str]]:
    def argv(ctx: Ctx) -> list[str]:
        a = args(ctx) if callable(args) else args
        return [CHILD, op, json.dumps(a)]
    return argv


def key_missing(key: str) -> Callable[[Path], str | None]:
    """n/a where the tree's config has no such key (its section's dataclass lacks the field)."""
    section, name = key.split(".")
    classes = {"ensemble": ("EnsembleConfig", "LiquidConfig")}.get(
        section, (section.capitalize() + "Config",))

    def na(tree: Path) -> str | None:
        text = "".join((tree / f).read_text() for f in ("liquid_fed/config.py",
                                                       "liquid_fed/ensemble.py"))
        for cls in classes:
            m = re.search(rf"^class {cls}\b.*?(?=^class |\Z)", text, re.M | re.S)
            if m and re.search(rf"^\s+{name}\s*:", m.group(0), re.M):
                return None
        return f"{key} does not exist in this tree's config"
    return na


def tree_is(kind: str, reason: str) -> Callable[[Path], str | None]:
    def na(tree: Path) -> str | None:
        before = (tree / "liquid_fed/protocol.py").is_file()
        return reason if (kind == "before") == before else None
    return na


NUMERIC = ["data.val", "data.test", "views.overlap", "views.noise", "views.missing",
           "ensemble.epsilon", "ensemble.penalty", "ensemble.load_weight",
           "ensemble.load_temperature", "ensemble.specialization_weight",
           "ensemble.expert_loss_weight", "optim.lr", "optim.weight_decay", "optim.momentum",
           "simulation.num_cpus_per_client", "simulation.num_gpus_per_client",
           "simulation.pull_interval", "simulation.dispatch_poll", "federation.reply_timeout",
           "server.reply_limit", "privacy.clip", "privacy.noise"]


def config_cases() -> list[Case]:
    cases = []
    for key in NUMERIC:
        cases.append(Case(f"cfg-nan-{key}", "config", f"{key}=NaN", validate(f"{key}=.nan"),
                          names=(key,), na=key_missing(key)))
    for key in ["optim.lr", "ensemble.expert_loss_weight", "ensemble.load_weight",
                "privacy.noise", "views.noise", "federation.reply_timeout"]:
        cases.append(Case(f"cfg-inf-{key}", "config", f"{key}=inf", validate(f"{key}=.inf"),
                          names=(key,), na=key_missing(key)))
    for key, val in [("optim.lr", "0"), ("optim.lr", "-1"), ("train.epochs", "-1"),
                     ("train.chunk_size", "0"), ("views.n_views", "0"),
                     ("federation.reply_timeout", "0"), ("simulation.object_store_mb", "10"),
                     ("train.batch_size", "0"), ("ensemble.epsilon", "0"),
                     ("privacy.noise", "-1"), ("views.noise", "-0.5"),
                     ("server.threads", "0")]:
        cases.append(Case(f"cfg-bad-{key}={val}", "config", f"{key}={val}",
                          validate(f"{key}={val}"), names=(key,), na=key_missing(key)))
    for key, val in [("train.epochs", "ten"), ("optim.lr", "fast"), ("ensemble.solver", "3"),
                     ("views.n_views", "2.5"), ("train.epochs", "true"), ("data", "[1, 2]"),
                     ("experts.options", "5"), ("views.options", "[1]")]:
        cases.append(Case(f"cfg-type-{key}={val}", "config", f"{key}={val} (wrong type)",
                          validate(f"{key}={val}"), names=(key,)))
    for key in ["train.epoch", "foo", "ensemble.epsilom"]:
        cases.append(Case(f"cfg-unknown-{key}", "config", f"unknown key {key}",
                          validate(f"{key}=1"), names=(key,)))
    for dev in ["cudaXYZ", "cuda:7", "tpu", "cuda:x"]:
        cases.append(Case(f"cfg-device-{dev}", "config", f"server.device={dev}",
                          validate(f"server.device={dev}"), names=("server.device",)))
    cases.append(Case("cfg-gpus-per-client", "config", "num_gpus_per_client=1 with no GPU",
                      validate("simulation.num_gpus_per_client=1"),
                      names=("simulation.num_gpus_per_client",)))
    cases.append(Case("cfg-cpus-per-client", "config", "num_cpus_per_client=64 on 2 cores",
                      validate("simulation.num_cpus_per_client=64"),
                      names=("simulation.num_cpus_per_client",)))
    for name in ["../../x", "/etc/x", "a/../../b", ""]:
        cases.append(Case(f"cfg-name-{name or 'empty'}", "config", f"run name {name!r}",
                          validate(f"name={name}" if name else "name=''"), names=("name",)))

    def write(name: str, data: bytes | str) -> Callable[[Ctx], str]:
        def path(ctx: Ctx) -> str:
            p = ctx.work / name
            p.write_bytes(data.encode() if isinstance(data, str) else data)
            return str(p)
        return path

    _CHAIN = list(zip("abcdefgh", "bcdefghi", strict=True))  # noqa: N806
    bomb = ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in _CHAIN)
        + "train: {epochs: 1}\n")
    cases.append(Case("yaml-alias-bomb", "yaml", f"alias bomb ({len(bomb)} bytes)",
                      validate(config=write("bomb.yaml", bomb)), timeout=20,
                      names=("alias", "bomb.yaml")))

    nested = ("data:\n  name: digits\n  options:\n    a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"    {c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in _CHAIN))
    cases.append(Case("yaml-alias-bomb-nested", "yaml", f"alias bomb inside data.options "
                      f"({len(nested)} bytes; 10^9 elements once expanded)",
                      validate(config=write("bomb2.yaml", nested)), timeout=20,
                      names=("alias", "bomb2.yaml")))

    def huge(ctx: Ctx) -> str:
        p = ctx.work / "huge.yaml"
        with p.open("w") as fh:
            fh.write("name: huge\nextra:\n")
            for i in range(400_000):
                fh.write(f"  - item{i}\n")
        return str(p)
    cases.append(Case("yaml-huge", "yaml", "8 MB YAML with an unknown key", validate(config=huge),
                      timeout=90, names=("extra", "huge.yaml")))
    deep = "train: " + "[" * 5000 + "]" * 5000 + "\n"
    cases.append(Case("yaml-deep-nesting", "yaml", "5000 nested lists",
                      validate(config=write("deep.yaml", deep)), names=("deep.yaml", "train")))
    cases.append(Case("yaml-binary", "yaml", "binary file as config",
                      validate(config=write("bin.yaml", bytes(range(256)) * 40)),
                      names=("bin.yaml",)))
    cases.append(Case("yaml-latin1", "yaml", "latin-1 bytes in a config",
                      validate(config=write("latin.yaml", b"name: caf\xe9\n")),
                      names=("latin.yaml",)))
    cases.append(Case("yaml-directory", "yaml", "a directory as config",
                      validate(config=lambda ctx: str(ctx.work)), names=("config", "/")))
    cases.append(Case("yaml-missing", "yaml", "missing config file",
                      validate(config="/nonexistent/probe.yaml"), names=("probe.yaml",)))
    cases.append(Case("yaml-top-list", "yaml", "top level is a list",
                      validate(config=write("list.yaml", "- 1\n- 2\n")), names=("list.yaml",)))
    cases.append(Case("yaml-syntax", "yaml", "invalid YAML syntax",
                      validate(config=write("syn.yaml", "train: {epochs: 1\n")),
                      names=("syn.yaml",)))
    cases.append(Case("yaml-python-tag", "yaml", "!!python/object/apply payload",
                      validate(config=lambda ctx: write(
                          "tag.yaml", f"name: !!python/object/apply:os.system "
                                      f"['touch {ctx.marker}']\n")(ctx)),
                      names=("tag.yaml",)))
    cases.append(Case("yaml-duplicate-key", "yaml", "a key given twice",
                      validate(config=write("dup.yaml",
                                            "train: {epochs: 1}\ntrain: {epochs: 3}\n")),
                      names=("train", "dup.yaml")))
    cases.append(Case("yaml-empty", "yaml", "an empty config (all defaults)",
                      validate(config=write("empty.yaml", "")), expect="accept"))
    for s, what in [("train.epochs", "no ="), ("=3", "empty key"),
                    ("train..epochs=3", "empty part"), ("optim.lr=[", "bad YAML value")]:
        cases.append(Case(f"set-malformed-{what.replace(' ', '_')}", "config", f"--set {s!r}",
                          validate(s), names=(s.split("=")[0] or "=3", "override")))
    return cases


# -- data files ------------------------------------------------------------------------------


def csv_text(rows: int = 120, ids: list | None = None, classes: int = 2, bom: bool = False,
             newline: str = "\n") -> str:
    import random

    rng = random.Random(0)
    lines = ["id,f0,f1,f2,f3,y"]
    for i in range(rows):
        y = i % classes
        feats = [f"{rng.gauss(y, 1):.4f}" for _ in range(4)]
        lines.append(",".join([str(ids[i] if ids else i), *feats, str(y)]))
    return ("\ufeff" if bom else "") + newline.join(lines) + newline


def data_config(ctx: Ctx, name: str, options: dict) -> str:
    import yaml

    cfg = {"name": "probe-data", "data": {"name": name, "options": options},
           "views": {"kind": "blocks", "n_views": 2, "options": {}},
           "experts": {"kind": "mlp", "options": {"hidden": [8]}},
           "train": {"epochs": 1, "chunk_size": 32, "batch_size": 16}}
    p = ctx.work / "data.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def csv_case(cid: str, what: str, make: Callable[[Ctx, Path], None], expect: str = "reject",
             names: tuple[str, ...] = ("data.csv",), check=None, load: bool = False) -> Case:
    def opts(ctx: Ctx) -> dict:
        p = ctx.work / "data.csv"
        make(ctx, p)
        return {"path": str(p), "label": "y", "id_column": "id"}

    if load:
        argv = child("load", lambda ctx: {"name": "csv", "options": opts(ctx)})
    else:
        argv = validate(config=lambda ctx: data_config(ctx, "csv", opts(ctx)))
    return Case(cid, "data-csv", what, argv, expect=expect, names=names, check=check)


def npz_case(cid: str, what: str, make: Callable[[Ctx, Path], None], expect: str = "reject",
             names: tuple[str, ...] = ("data.npz",), check=None, load: bool = False,
             timeout: float = 90.0) -> Case:
    def opts(ctx: Ctx) -> dict:
        p = ctx.work / "data.npz"
        make(ctx, p)
        return {"path": str(p)}

    if load:
        argv = child("load", lambda ctx: {"name": "npz", "options": opts(ctx)})
    else:
        argv = validate(config=lambda ctx: data_config(ctx, "npz", opts(ctx)))
    return Case(cid, "data-npz", what, argv, expect=expect, names=names, check=check,
                timeout=timeout)


def text(s: str | bytes) -> Callable[[Ctx, Path], None]:
    def make(ctx: Ctx, p: Path) -> None:
        p.write_bytes(s.encode() if isinstance(s, str) else s)
    return make


def ids_exact(want: list[int]) -> Callable[[Outcome, Ctx], tuple[str, str] | None]:
    def check(o: Outcome, ctx: Ctx):
        if o.rc != 0 or not o.facts:
            return None
        f = o.facts
        ok = f["ids_unique"] == f["n"] and all(w in f["ids"] for w in want)
        if ok:
            return "handled", f"ids kept exact: {f['ids'][:3]}...{f['ids'][-2:]}"
        return "silent_wrong", f"ids changed: unique {f['ids_unique']} of {f['n']}, {f['ids']}"
    return check


def loaded_clean(o: Outcome, ctx: Ctx):
    if o.rc != 0 or not o.facts:
        return None
    names = o.facts.get("feature_names", [])
    if any("\ufeff" in n for n in names) or o.facts["ids_unique"] != o.facts["n"]:
        return "silent_wrong", f"loaded with damaged names/ids: {ascii(names)}"
    return "handled", f"{o.facts['n']} rows, features {names}"


def data_cases() -> list[Case]:
    big = 2 ** 53
    cases = [
        csv_case("csv-control", "a good CSV (control)", text(csv_text()), expect="accept"),
        csv_case("csv-ids-2^53", "ids 2^53 and 2^53+1 (distinct)",
                 text(csv_text(ids=[big + i for i in range(120)])), expect="accept",
                 check=ids_exact([big, big + 1]), load=True),
        csv_case("csv-ids-2^63", "id 2^63 (outside int64)",
                 text(csv_text(ids=[2 ** 63 + i for i in range(120)]))),
        csv_case("csv-ids-vast", "an id of 5000 digits",
                 text(csv_text(ids=["9" * 5000] + list(range(1, 120))))),
        csv_case("csv-ids-float", "ids 1.5, 2.5, ...",
                 text(csv_text(ids=[f"{i}.5" for i in range(120)]))),
        csv_case("csv-ids-duplicate", "two rows with one id",
                 text(csv_text(ids=[0] + list(range(119))))),
        csv_case("csv-single-class", "every label the same", text(csv_text(classes=1))),
        csv_case("csv-one-row", "one data row", text(csv_text(rows=1))),
        csv_case("csv-bom", "UTF-8 BOM before the header", text(csv_text(bom=True)),
                 expect="accept", check=loaded_clean, load=True),
        csv_case("csv-crlf", "CRLF line ends", text(csv_text(newline="\r\n")), expect="accept",
                 check=loaded_clean, load=True),
        csv_case("csv-long-field", "a 200 000-character field",
                 text(csv_text().replace("\n1,", "\n1" + "9" * 200_000 + ",", 1))),
        csv_case("csv-nan-feature", "a feature field 'nan00.66' (text, not a number)",
                 text(csv_text().replace("\n3,", "\n3,nan0", 1))),
        csv_case("csv-inf-feature", "a feature 1e400 (inf)",
                 text(csv_text().replace("\n3,", "\n3,1e400,", 1).replace("1e400,-", "1e400,",
                                                                            1))),
        csv_case("csv-missing-label", "an empty label",
                 text(csv_text().replace(",1\n", ",\n", 1))),
        csv_case("csv-ragged", "a row with a missing field",
                 text(csv_text().replace("\n5,", "\n5,1.0\n", 1))),
        csv_case("csv-empty", "an empty file", text("")),
        csv_case("csv-header-only", "a header only", text("id,f0,f1,f2,f3,y\n")),
        csv_case("csv-latin1", "a latin-1 byte in a field",
                 text(csv_text().encode().replace(b"\n7,", b"\n7\xe9,", 1))),
        csv_case("csv-nul", "a NUL byte", text(csv_text().replace("\n9,", "\n9\x00,", 1))),
        csv_case("csv-no-id-column", "the id column named is absent",
                 text(csv_text().replace("id,", "ident,", 1)), names=("id", "data.csv")),
        Case("csv-directory", "data-csv", "a directory as the CSV path",
             validate(config=lambda ctx: data_config(ctx, "csv", {"path": str(ctx.work),
                                                                  "label": "y"})),
             names=(("/tmp",))),
        Case("csv-missing-file", "data-csv", "a missing CSV",
             validate(config=lambda ctx: data_config(ctx, "csv", {"path": "/nonexistent/d.csv",
                                                                  "label": "y"})),
             names=("d.csv",)),
    ]

    import numpy as np

    def arrays(n: int = 120, **over) -> dict:
        rng = np.random.default_rng(0)
        y = np.arange(n) % 2
        out = {"features": (rng.normal(size=(n, 4)) + y[:, None]).astype(np.float32),
               "labels": y.astype(np.int64), "ids": np.arange(n, dtype=np.int64)}
        out.update(over)
        return {k: v for k, v in out.items() if v is not None}

    def savez(**over) -> Callable[[Ctx, Path], None]:
        def make(ctx: Ctx, p: Path) -> None:
            with p.open("wb") as fh:
                np.savez(fh, **arrays(**over))
        return make

    def pickled(key: str) -> Callable[[Ctx, Path], None]:
        def make(ctx: Ctx, p: Path) -> None:
            class Payload:
                def __reduce__(self):
                    return (os.system, (f"touch {ctx.marker}",))
            obj = np.empty(3, dtype=object)
            obj[0] = Payload()
            a = arrays()
            a[key] = obj if key != "features" else obj
            with p.open("wb") as fh:
                np.savez(fh, **a)
        return make

    def truncated(ctx: Ctx, p: Path) -> None:
        savez()(ctx, p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    def huge_shape(ctx: Ctx, p: Path) -> None:
        import io

        a = arrays()
        buf = io.BytesIO()
        np.lib.format.write_array(buf, a["features"])
        raw = buf.getvalue()
        header_end = raw.index(b"\n") + 1
        header = raw[:header_end].decode("latin1")
        new = header.replace("(120, 4)", "(100000000000, 4)")
        pad = len(header) - len(new)
        new = new[:-1].rstrip() + " " * (len(header) - len(new[:-1].rstrip()) - 1) + "\n"
        assert len(new) == len(header) and pad <= 0 or True
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("features.npy", new.encode("latin1") + raw[header_end:])
            for k in ("labels", "ids"):
                b = io.BytesIO()
                np.lib.format.write_array(b, a[k])
                z.writestr(f"{k}.npy", b.getvalue())

    big = 2 ** 53
    cases += [
        npz_case("npz-control", "a good NPZ (control)", savez(), expect="accept"),
        npz_case("npz-truncated", "the archive cut in half", truncated),
        npz_case("npz-empty-file", "a 0-byte file", text(b"")),
        npz_case("npz-no-arrays", "an archive with no arrays",
                 lambda ctx, p: np.savez(p.open("wb"))),
        npz_case("npz-pickled-features", "features an object array with a payload",
                 pickled("features"), names=("features", "data.npz")),
        npz_case("npz-object-unused-key", "an object array in an unused key",
                 pickled("notes"), expect="accept", names=("notes",)),
        npz_case("npz-huge-shape", "header declares 10^11 x 4 floats", huge_shape,
                 names=("features", "data.npz"), timeout=60),
        npz_case("npz-nan-features", "a NaN feature",
                 savez(features=np.where(np.eye(120, 4) > 0, np.nan, 1.0).astype(np.float32))),
        npz_case("npz-labels-2d", "classification labels of shape (N, 2)",
                 savez(labels=np.zeros((120, 2), dtype=np.int64))),
        npz_case("npz-length-mismatch", "119 labels for 120 rows",
                 savez(labels=(np.arange(119) % 2).astype(np.int64))),
        npz_case("npz-ids-duplicate", "duplicate ids",
                 savez(ids=np.r_[0, np.arange(119)].astype(np.int64))),
        npz_case("npz-ids-2^53", "int64 ids 2^53 and 2^53+1",
                 savez(ids=(big + np.arange(120)).astype(np.int64)), expect="accept",
                 check=ids_exact([big, big + 1]), load=True),
        npz_case("npz-ids-float-2^53", "float64 ids around 2^53 (collide in float)",
                 savez(ids=(float(big) + np.arange(120) * 1.0).astype(np.float64))),
        npz_case("npz-single-class", "every label the same",
                 savez(labels=np.zeros(120, dtype=np.int64))),
        npz_case("npz-one-row", "one row", lambda ctx, p: np.savez(
            p.open("wb"), **{k: v[:1] for k, v in arrays().items()})),
        Case("npz-directory", "data-npz", "a directory as the NPZ path",
             validate(config=lambda ctx: data_config(ctx, "npz", {"path": str(ctx.work)})),
             names=("/tmp",)),
    ]
    return cases


# -- replies ---------------------------------------------------------------------------------

MUTATIONS = [
    ("pred_nan", "one NaN prediction"), ("pred_all_nan", "all predictions NaN"),
    ("pred_inf", "one +inf prediction"), ("pred_neg_inf", "a column of -inf"),
    ("pred_1e30", "one prediction 1e30"), ("pred_1e30_all", "every prediction 1e30"),
    ("del_nan", "one NaN delegation"), ("del_inf", "one inf delegation"),
    ("pred_short", "one row too few"), ("pred_wide", "one class too many"),
    ("pred_1d", "predictions 1-D"), ("del_short", "delegations one row short"),
    ("del_wide", "delegations one column too many"), ("missing_pred", "no 'pred'"),
    ("missing_del", "no 'del'"), ("missing_present", "no 'present'"),
    ("empty_reply", "an empty reply"), ("pred_int", "integer predictions"),
    ("pred_float16", "float16 predictions"), ("pred_complex", "complex predictions"),
    ("pred_list", "predictions as a list"), ("del_sum2", "delegation rows sum to 2"),
    ("del_negative", "delegation rows -1, 2 (sum 1)"), ("present_float", "'present' floats"),
    ("present_short", "'present' one short"), ("stale", "the previous round's reply (other ids)"),
    ("eval_pred_nan", "NaN predictions at evaluation"),
    ("eval_pred_1e30", "1e30 at evaluation"), ("eval_pred_short", "short reply at evaluation"),
    ("setup_dup_ids", "setup: duplicate ids"), ("setup_neg_params", "setup: n_params -5"),
    ("setup_missing_ids", "setup: no 'ids'"),
]
BENIGN = [("none", "honest clients (control)"), ("extra_key", "an extra array in the reply"),
          ("setup_float_ids", "setup: ids as floats")]


def reply_check(o: Outcome, ctx: Ctx):
    if o.rc == 0 and o.facts:
        f = o.facts
        if not f.get("honest_finite", True):
            return "silent_wrong", "accepted; honest experts' parameters became NaN"
        if not f.get("test_finite", True):
            return "silent_wrong", f"accepted; test metrics not finite: {f.get('test')}"
    return None


def reply_cases() -> list[Case]:
    cases = []
    for m, what in MUTATIONS:
        cases.append(Case(f"reply-{m}", "replies", f"client 0 sends {what}",
                          child("fed", lambda ctx, m=m: {"run_dir": str(ctx.work / "run"),
                                                         "mutation": m}),
                          names=("client 0", "client_0"), check=reply_check))
    for m, what in BENIGN:
        def benign(o: Outcome, ctx: Ctx):
            v = reply_check(o, ctx)
            if v is None and o.rc == 0:
                return "handled", f"finished: test {o.facts.get('test')}"
            return v
        cases.append(Case(f"reply-{m}", "replies", f"client 0 sends {what}",
                          child("fed", lambda ctx, m=m: {"run_dir": str(ctx.work / "run"),
                                                         "mutation": m}),
                          expect="accept", names=("client 0", "client_0"), check=benign))
    return cases


# -- checkpoints -----------------------------------------------------------------------------


def ckpt(case: str, **extra) -> Callable[[Ctx], list[str]]:
    return child("ckpt", lambda ctx: {"run_dir": str(ctx.work / "run"), "case": case,
                                      "marker": str(ctx.marker), **extra})


def resume_finished_check(o: Outcome, ctx: Ctx):
    dup = o.facts.get("duplicates", 0)
    if dup:
        return "silent_wrong", f"{dup} duplicate metric rows ({o.facts})"
    if o.facts and o.facts.get("rows_after") != o.facts.get("rows_before"):
        return "data_lost", f"metric rows changed: {o.facts}"
    return None


def mixed_check(o: Outcome, ctx: Ctx):
    if o.rc == 0:
        if re.search(r"checksum|not used|older complete", o.stderr):
            return "handled", "the mixed generation was refused; resumed from the last " \
                              "consistent one: " + error_text(o)[:200]
        return "silent_wrong", "a checkpoint mixing rounds 1 and 2 was accepted silently"
    return None


def disk_full_runner(ctx: Ctx) -> tuple[str, str, str]:
    mnt = ctx.work / "mnt"
    mnt.mkdir()
    args = json.dumps({"run_dir": str(mnt / "run"), "case": "disk_full",
                       "free_bytes": 20_000})
    script = (f"mount -t tmpfs -o size=4m tmpfs {mnt} && "
              f"{PY} {CHILD} ckpt '{args}'")
    t0 = time.perf_counter()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ctx.tree,
                          env=env_for(ctx), capture_output=True, text=True, timeout=240)
    o = Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0, False)
    facts = {}
    for line in o.stdout.splitlines():
        if line.startswith("PROBE_RESULT "):
            facts = json.loads(line[len("PROBE_RESULT "):])
    repro = ("unshare -rm sh -c 'mount -t tmpfs -o size=4m tmpfs MNT && python "
             "benchmarks/probe_child.py ckpt {\"case\":\"disk_full\",...}'")
    if not facts:
        if "Operation not permitted" in o.stderr or proc.returncode and "mount" in o.stderr:
            return "n/a", "could not mount a tmpfs in a user namespace", repro
        last = (o.stderr.strip().splitlines() or ["?"])[-1]
        return "traceback" if "Traceback" in o.stderr else "unclear_error", last[:300], repro
    if not facts.get("first_error"):
        return "handled", f"the run fit in the space ({facts})", repro
    usable = facts.get("rerun") == "ok" or facts.get("resume") == "ok"
    detail = (f"first: {facts['first_error'][:160]}; rerun: {str(facts.get('rerun'))[:160]}; "
              f"resume: {str(facts.get('resume', '-'))[:120]}")
    if not facts.get("first_caught"):
        return "traceback", detail, repro
    if not usable:
        return ("unclear_error", "folder left unusable (neither rerun nor --resume): " + detail,
                repro)
    return "clear_error", detail, repro


def ckpt_cases() -> list[Case]:
    return [
        Case("ckpt-planted-pickle", "checkpoint", "pickles with a payload where checkpoints "
             "live, then resume", ckpt("planted_pickle"), names=("checkpoint", "server.pt")),
        Case("ckpt-resume-finished", "checkpoint", "resume a finished run",
             ckpt("resume_finished"), names=("finished", "summary.json"),
             check=resume_finished_check),
        Case("ckpt-mixed-round", "checkpoint", "client 0's file of round 1 beside round 2",
             ckpt("mixed_round"), names=("client_0", "checkpoint"), check=mixed_check),
        Case("ckpt-garbage-client", "checkpoint", "client_0 checkpoint replaced by garbage",
             ckpt("garbage_checkpoint"), names=("client_0",)),
        Case("ckpt-truncated-server", "checkpoint", "server checkpoint cut in half",
             ckpt("truncated_checkpoint"), names=("server", "checkpoint")),
        Case("ckpt-none", "checkpoint", "resume with no checkpoint", ckpt("no_checkpoint"),
             names=("checkpoint",)),
        Case("ckpt-other-config", "checkpoint", "resume with another config",
             ckpt("resume_other_config"), names=("config",)),
        Case("ckpt-rerun-no-force", "checkpoint", "start again over results without --force",
             ckpt("rerun_without_force"), names=("--force", "results")),
        Case("ckpt-disk-full", "checkpoint", "disk full (4 MB tmpfs, 20 kB left) mid-run, "
             "then space freed: rerun or resume", runner=disk_full_runner),
        Case("plot-pickled-outputs", "checkpoint", "plot a folder whose test_outputs.npz is "
             "a pickle payload", lambda ctx: _plot_pickle(ctx),
             names=("test_outputs.npz",)),
        Case("run-out-is-file", "checkpoint", "--out names a regular file",
             lambda ctx: (ctx.work.joinpath("f").write_text("x"), [
                 "-m", "liquid_fed.cli", "run", QUICK, "--out", str(ctx.work / "f"),
                 "--set", "train.epochs=1"])[1], names=("/f", "run folder"),
             timeout=120),
    ]


def _plot_pickle(ctx: Ctx) -> list[str]:
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ctx.marker}",))

    run = ctx.work / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "summary.json").write_text("{}")
    (run / "test_outputs.npz").write_bytes(pickle.dumps(Payload()))
    return ["-m", "liquid_fed.cli", "plot", str(run)]


# -- Ray runs --------------------------------------------------------------------------------

RAY_SET = ["train.epochs=300", "views.n_views=2", "views.kind=blocks", "views.options={}",
           "data.name=digits_flat", "data.options={}", "experts.options={hidden: [16]}",
           "baselines.uniform=false", "baselines.independent=false", "train.eval_every=5",
           "train.checkpoint_every=5", "federation.reply_timeout=300"]
SHORT = [s if not s.startswith("train.epochs") else "train.epochs=20" for s in RAY_SET]


def cli_run_argv(out: Path, *extra: str, sets: list[str] = RAY_SET) -> list[str]:
    argv = ["-m", "liquid_fed.cli", "run", QUICK, "--out", str(out), "--quiet", *extra]
    for s in sets:
        argv += ["--set", s]
    return argv


def start(ctx: Ctx, argv: list[str], log: Path) -> subprocess.Popen:
    fh = log.open("w")
    return subprocess.Popen([PY, *tree_argv(ctx, argv)], cwd=ctx.tree, env=env_for(ctx), stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.5)
    return False


def listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, pid) of TCP listeners owned by these processes."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        m = re.search(r"pid=(\d+)", line)
        if m and int(m.group(1)) in pids:
            found.append((line.split()[3], int(m.group(1))))
    return found


def gcs_address(pids: list[int]) -> str | None:
    """host:port of the run's GCS (the address ``ray.init(address=...)`` joins)."""
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(b"gcs_server" in c for c in cmd[:2]):
            continue
        port = None
        for c in cmd:
            m = re.match(rb"--gcs_server_port=(\d+)", c)
            if m and m.group(1) != b"0":
                port = m.group(1).decode()
        lst = listening({pid})
        if port is None and lst:
            port = lst[0][0].rsplit(":", 1)[1]
        host = "127.0.0.1"
        for a, _ in lst:
            h = a.rsplit(":", 1)[0]
            if a.endswith(":" + str(port)) and h not in ("0.0.0.0", "*", "[::]"):
                host = h.strip("[]")
        if port:
            return f"{host}:{port}"
    return None


JOIN = """
import sys
from ray._raylet import GcsClient
try:  # one gRPC call to the GCS without any credentials
    nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=30)
    print("CONNECTED gcs answered with", len(nodes), "node(s)", flush=True)
except Exception as exc:
    print("GCS refused:", type(exc).__name__, str(exc)[:300], file=sys.stderr, flush=True)
    sys.exit(3)
import ray
kw = {"_node_ip_address": sys.argv[2]} if len(sys.argv) > 2 and sys.argv[2] else {}
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, **kw)
print("JOINED", ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
ray.shutdown()
"""


def sigterm_port_runner(sig: int, join: bool = False) -> Callable[[Ctx], tuple[str, str, str]]:
    def runner(ctx: Ctx) -> tuple[str, str, str]:
        out = ctx.work / "run"
        proc = start(ctx, cli_run_argv(out), ctx.work / "log.txt")
        facts: dict[str, Any] = {}
        ok = wait_for(lambda: (out / "metrics.jsonl").is_file() or proc.poll() is not None,
                      240)
        pids = leftovers(ctx.token)
        facts["training"] = ok and proc.poll() is None
        lst = listening(set(pids))
        facts["listeners"] = sorted({a for a, _ in lst})
        public = [a for a in facts["listeners"]
                  if not a.startswith(("127.", "[::1]", "localhost"))]
        joined = None
        addr = gcs_address(pids)
        if addr and join:
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            env.update(BASE_ENV)
            env["RAY_TMPDIR"] = str(ctx.work / "intruder")
            try:
                node_ip = next((a.rsplit(":", 1)[0].strip("[]") for a in public
                                if not a.startswith(("*", "0.0.0.0", "["))), "")
                if not node_ip:
                    node_ip = (subprocess.run(["hostname", "-I"], capture_output=True,
                                              text=True).stdout.split() or [""])[0]
                if node_ip:  # join as a driver on the run's node, by its node address
                    addr = f"{node_ip}:{addr.rsplit(':', 1)[1]}"
                j = subprocess.run([PY, "-c", JOIN, addr, node_ip], env=env,
                                   capture_output=True,
                                   text=True, timeout=150, start_new_session=True)
                joined = "CONNECTED" in j.stdout
                facts["task_ran"] = "JOINED 42" in j.stdout
                facts["join_out"] = j.stdout.strip()[-200:]
                errs = [ln for ln in j.stderr.splitlines() if "refused" in ln or "Error" in ln]
                facts["join_err"] = (errs or j.stderr.strip().splitlines() or [""])[0][:300]
            except subprocess.TimeoutExpired as exc:
                got = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                joined = "CONNECTED" in got
                facts["join_err"] = "timeout" + (" after connecting" if joined else "")
        facts["gcs"] = addr
        facts["joined"] = joined
        t_sig = time.time()
        try:
            os.kill(proc.pid, sig)
        except OSError:
            pass
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(8)
        left = leftovers(ctx.token)
        mtime = max((p.stat().st_mtime for p in out.rglob("*") if p.is_file()), default=0)
        facts["left"] = len(left)
        facts["written_after_signal"] = mtime > t_sig + 2
        kill_own(left)
        name = signal.Signals(sig).name
        repro = (f"liquid-fed run configs/quickstart.yaml --out X --set ... & sleep 30; "
                 f"kill -{name[3:]} $!; pgrep -f ray")
        if join:
            repro = ("liquid-fed run ... & sleep 30; ss -ltnp; python -c 'import ray; "
                     "ray.init(address=\"127.0.0.1:<gcs port>\"); ray.get(f.remote())'")
        if not facts["training"]:
            log = (ctx.work / "log.txt").read_text()[-400:]
            return "unclear_error", f"run did not reach training: {log}", repro
        if join:
            if joined:
                return "port_open", f"a process without credentials joined the run's Ray at " \
                                    f"{addr} ({facts})", repro
            if addr is None:
                return "unclear_error", f"no GCS address found ({facts})", repro
            note = f"{len(public)} ports listen beyond loopback; " if public else ""
            return "handled", f"{note}a tokenless ray.init(address={addr}) was refused " \
                              f"({facts})", repro
        if left:
            return "process_leaked", f"{len(left)} processes alive 8 s after {name} " \
                                     f"({facts})", repro
        return "handled", f"stopped cleanly ({facts})", repro
    return runner


def concurrent_runner(ctx: Ctx) -> tuple[str, str, str]:
    out = ctx.work / "run"
    sets_a = SHORT
    sets_b = SHORT + ["optim.lr=0.01"]
    a = start(ctx, cli_run_argv(out, sets=sets_a), ctx.work / "a.txt")
    wait_for(lambda: (out / "metrics.jsonl").is_file() or a.poll() is not None, 240)
    b = start(ctx, cli_run_argv(out, "--force", sets=sets_b), ctx.work / "b.txt")
    for p in (a, b):
        try:
            p.wait(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    left = leftovers(ctx.token)
    kill_own(left)
    log_a = (ctx.work / "a.txt").read_text()
    log_b = (ctx.work / "b.txt").read_text()
    repro = ("liquid-fed run cfg --out X & sleep 20; liquid-fed run cfg --out X --force "
             "--set optim.lr=0.01")
    saved = (out / "config.yaml").read_text() if (out / "config.yaml").is_file() else ""
    cfg_is_a = "lr: 0.003" in saved or ("lr: 0.01" not in saved)
    facts = {"rc_a": a.returncode, "rc_b": b.returncode, "config_is_first": cfg_is_a,
             "b_tail": log_b.strip().splitlines()[-1:] if log_b.strip() else []}
    if b.returncode == 0 and a.returncode == 0:
        return "data_lost", f"both runs wrote into one folder ({facts})", repro
    if b.returncode != 0 and a.returncode == 0 and cfg_is_a:
        tail = " ".join(log_b.strip().splitlines()[-2:])
        if "Traceback" in log_b:
            return "traceback", tail[-300:], repro
        if left:
            return "process_leaked", f"{len(left)} left ({facts})", repro
        return "clear_error", f"second run refused: {tail[-250:]}", repro
    return "data_lost", f"first run's results damaged or lost ({facts}; a: " \
                        f"{log_a.strip().splitlines()[-1:]})", repro


def planted_cli_runner(ctx: Ctx) -> tuple[str, str, str]:
    """A folder with the resolved config and planted pickles, then ``run --resume``."""
    import pickle

    out = ctx.work / "run"
    # the tree's own resolved config for these settings
    o = run_cmd(ctx, ["-m", "liquid_fed.cli", "validate", QUICK,
                      *sum((["--set", s] for s in SHORT), [])], 120)
    out.mkdir()
    (out / "config.yaml").write_text(o.stdout)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ctx.marker}",))

    ck = out / "checkpoints"
    ck.mkdir()
    for name in ("server.pt", "client_0.pt", "client_1.pt"):
        (ck / name).write_bytes(pickle.dumps(Payload()))
    r = run_cmd(ctx, cli_run_argv(out, "--resume", sets=SHORT), 300)
    left = leftovers(ctx.token)
    kill_own(left)
    repro = "mkdir -p X/checkpoints; cp config.yaml X/; python -c 'plant pickle' > " \
            "X/checkpoints/server.pt; liquid-fed run cfg --out X --resume"
    case = Case("ray-planted-pickle-resume", "ray", "", names=("checkpoint",))
    cls, detail = classify(case, r, ctx)
    if cls in ("handled", "clear_error") and left:
        cls = "process_leaked"
    return cls, detail + f" ({r.seconds:.0f} s)", repro


def ray_cases() -> list[Case]:
    return [
        Case("ray-port-join", "processes", "during a run: listeners beyond loopback, and a "
             "process without the run's credentials calling ray.init(address=GCS)",
             runner=sigterm_port_runner(signal.SIGTERM, join=True), ray=True),
        Case("ray-sigterm", "processes", "SIGTERM to liquid-fed run mid-run",
             runner=sigterm_port_runner(signal.SIGTERM), ray=True),
        Case("ray-sigkill", "processes", "SIGKILL to liquid-fed run mid-run",
             runner=sigterm_port_runner(signal.SIGKILL), ray=True),
        Case("ray-concurrent-runs", "processes", "a second run (--force) into a live run's "
             "folder", runner=concurrent_runner, ray=True),
        Case("ray-planted-pickle-resume", "processes", "liquid-fed run --resume over planted "
             "pickles", runner=planted_cli_runner, ray=True),
    ]


def all_cases() -> list[Case]:
    return config_cases() + data_cases() + reply_cases() + ckpt_cases() + ray_cases()


# --------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------


def compare(before_file: str, after_file: str) -> str:
    before = {r["id"]: r for r in json.loads(Path(before_file).read_text())["cases"]}
    after = {r["id"]: r for r in json.loads(Path(after_file).read_text())["cases"]}
    ids = list(dict.fromkeys([*before, *after]))

    def counts(rs: dict) -> dict[str, int]:
        c = {k: 0 for k in [*CLASSES, "n/a"]}
        for r in rs.values():
            c[r["class"]] = c.get(r["class"], 0) + 1
        return c

    cb, ca = counts(before), counts(after)
    lines = [f"Inputs tried: {len(ids)} cases ({len(before)} before, {len(after)} after)", "",
             "| class | before (1a6eed7) | after (main) |", "|---|---:|---:|"]
    for k in [*CLASSES, "n/a"]:
        lines.append(f"| {k} | {cb.get(k, 0)} | {ca.get(k, 0)} |")
    lines += ["", "Changes per case:", "",
              "| case | before | after | after: detail |", "|---|---|---|---|"]
    for i in ids:
        b = before.get(i, {}).get("class", "-")
        a = after.get(i, {}).get("class", "-")
        if a != b:
            d = after.get(i, {}).get("detail", "").replace("|", "/").replace("\n", " ")[:140]
            lines.append(f"| {i} | {b} | {a} | {d} |")
    bad = [i for i in ids if after.get(i, {}).get("class") not in
           ("handled", "clear_error", "n/a", None)]
    lines += ["", f"After, not handled/clear_error: {len(bad)}", ""]
    for i in bad:
        r = after[i]
        lines.append(f"- {i} [{r['class']}]: {r['detail'][:220]}\n  repro: {r['repro'][:300]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree")
    ap.add_argument("--out")
    ap.add_argument("--only", action="append")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--merge", help="keep the cases of this JSON file, run only the others "
                                    "(or those --only names), write the union to --out")
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return 0
    tree = Path(args.tree).resolve()
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if any(s in c.id for s in args.only)]
    if args.no_ray:
        cases = [c for c in cases if not c.ray]
    root = Path(tempfile.mkdtemp(prefix="probe-"))
    results = []
    prior = {}
    if args.merge and Path(args.merge).is_file():
        prior = {r["id"]: r for r in json.loads(Path(args.merge).read_text())["cases"]}
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    if prior and not args.only:
        cases = [c for c in cases if c.id not in prior]

    def save() -> None:
        if args.out:
            merged = {**prior, **{r["id"]: r for r in results}}
            order = [c.id for c in all_cases()]
            rows = sorted(merged.values(), key=lambda r: order.index(r["id"])
                          if r["id"] in order else len(order))
            Path(args.out).write_text(json.dumps({"tree": str(tree), "commit": commit,
                                                  "cases": rows}, indent=1) + "\n")

    for case in cases:
        r = run_case(case, tree, root)
        results.append(r)
        print(f"{r['class']:<15} {r['seconds']:6.1f}s {case.id}: {r['detail'][:110]}",
              flush=True)
        save()  # after every case: a crash keeps what was measured
    shutil.rmtree(root, ignore_errors=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
