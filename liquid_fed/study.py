"""Studies: many run configs, several seeds and methods, side by side on the same data.

A study file (YAML) names a base run config and the settings to vary::

    name: observability
    base: ../regions.yaml            # a run config, relative to the study file
    set: {train.epochs: 20}          # overrides of the base, for every cell (dotted keys)
    grid:                            # every combination of these values
      data.options.region_visibility: [shared, noisy, none]
      views.overlap: [0.0, 0.25]
    paired:                          # optional: these lists move together (one axis)
      views.kind: [groups, random]
      views.options: [{}, {}]
    random:                          # optional: extra settings drawn at random
      n: 4
      seed: 0
      keys: {views.noise: {uniform: [0, 0.5]}, views.overlap: {choice: [0, 0.1]}}
    seeds: 3                         # or a list of seeds; each seed re-splits, re-cuts, re-inits
    methods: [liquid, uniform, averaged, local, splitnn, aggvfl, moe, central, oracle]
    solvers: [sink_one]              # one `liquid` method per solver (default: the base's)
    mixes: [probs, logits]           # optional: every pooling method once per ensemble.mix
    engine: centralized              # or federated (Flower on Ray) for the Liquid Ensemble
    method_options: {top_hidden: [64]}
    test_missing: [0, 0.1, 0.3]      # optional: every run also scored with parties absent
    show: [views.overlap]            # optional: the keys the report's setting labels show

Absent parties (configs/studies/dropout.yaml). ``train_missing`` is a study name of the run
key ``availability.dropout`` (usable in ``grid``, ``paired``, ``random``): each party misses
each training round with that probability, and every method that trains jointly loses the
same parties in the same mini-batches (:mod:`liquid_fed.methods`; with ``train.chunk_size ==
train.batch_size`` a round is one mini-batch, the MARS-VFL protocol). ``test_missing`` is a
study key, not an axis: a list of rates at which every run is scored on its test split, each
sample losing each party with that probability (one kept), on masks drawn from the seed and
shared by every method (:func:`liquid_fed.robustness.missing_mask`); each party absent alone
is scored too (column ``absent_one``: the mean over parties). The rows of results.csv are
then per *scored setting* (:meth:`Study.scored_settings`, id ``<cell>@<rate>``): one trained
run gives one row per rate, so the rates of a setting are paired through its models.

Method labels: ``liquid`` becomes ``liquid:<solver>`` per solver. With ``mixes``, every method
that pools the experts' outputs through ``ensemble.mix`` (:data:`MIX_METHODS`: the Liquid
Ensemble and the uniform vote, which train through the same combination, and ``averaged``,
which pools the experts trained alone) runs once per pooling, labelled ``<method>/<mix>``
(``liquid:sink_one/logits``, ``uniform/probs``); the other methods run once, with the base's
pooling. Without ``mixes`` the labels carry no pooling (as before), so older study folders
resume and report unchanged.

The settings are the grid's combinations (times the paired axis), then the random draws. A
*cell* is one setting; for every cell and seed, every method trains on the same data, splits,
views, optimiser, epochs and batch order (:mod:`liquid_fed.methods`). The Liquid Ensemble trains
through the federation's own code: in process (``engine: centralized``, the exact twin of the
Flower run, fast) or through Flower on Ray (``engine: federated``).

The study folder holds ``study.yaml`` (resolved), one run folder per cell x seed x method
(``cells/<cell>/seed-<s>/<method>/``, as ``liquid-fed run`` writes them, plus the cell's
``views.json`` with each view's probe score, importance share and inter-party correlation),
``results.csv``, ``report.md`` and ``figures/``. Every file is written whole; a finished
method's folder (its ``summary.json``) is skipped on resume, and the table is rebuilt from the
folders, so a resumed study gives the same rows.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from liquid_fed.config import RunConfig, apply_overrides, build_config, safe_yaml
from liquid_fed.errors import ConfigError, LiquidFedError, RunFolderError
from liquid_fed.metrics import CONFIDENCES, TASK_METRICS
from liquid_fed.rundir import (
    CONFIG_FILE,
    OUTPUTS_FILE,
    SUMMARY_FILE,
    VIEWS_FILE,
    RunDir,
    read_json,
)
from liquid_fed.solvers import SOLVERS

log = logging.getLogger(__name__)

STUDY_FILE = "study.yaml"
RESULTS_FILE = "results.csv"
REPORT_FILE = "report.md"
CELLS_DIR = "cells"
ENGINES = ("centralized", "federated")
STUDY_KEYS = ("name", "description", "base", "set", "grid", "paired", "random", "seeds",
              "methods", "solvers", "mixes", "engine", "method_options", "test_missing", "show",
              "out")
#: Study keys that stand for run-config keys in ``grid``/``paired``/``random``/``set``:
#: ``train_missing`` is the training rounds' dropout (each party misses each round, hence
#: each mini-batch when ``train.chunk_size == train.batch_size``, with this probability;
#: every method that trains jointly takes the same absences).
ALIASES = {"train_missing": "availability.dropout"}
#: The study key of the test-time missing rates and the column of results.csv.
TEST_MISSING = "test_missing"
#: The column of results.csv (rows at test_missing 0): the primary metric with one party
#: absent at test for every sample, averaged over the parties.
ABSENT_ONE = "absent_one"
DRAWS = ("choice", "uniform", "loguniform", "int")
#: What one study may hold, checked before anything is built (a typo like ``seeds: 1e9`` must
#: fail at once): settings (grid x paired + random draws), seeds, and runs in all.
MAX_SETTINGS = 10_000
MAX_SEEDS = 1_000
MAX_RUNS = 100_000
#: The largest seed: what numpy and torch seed from (the run config's ``seed`` range).
MAX_SEED = 2**32 - 1
LIQUID = "liquid"
#: Methods that pool their experts' outputs through ``ensemble.mix``; ``mixes`` runs each of
#: them once per pooling. ``oracle`` is not one: it hands every sample to one expert, so the
#: pooling changes none of its predictions.
MIX_METHODS = (LIQUID, "uniform", "averaged")

#: Runs the Liquid Ensemble of one cell through Flower on Ray: ``(cfg, run_dir) -> None``,
#: leaving a finished run folder (``liquid-fed compare`` passes
#: :func:`simulations.studies.federated_runner`).
FederatedRunner = Callable[[RunConfig, Path], None]


# --------------------------------------------------------------------------------------------
# The study file
# --------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One cell of a study: the dotted keys it sets and their values."""

    id: str
    values: dict[str, Any]
    show: tuple[str, ...] | None = None  # the keys its label shows (the study's `show`)

    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.values.items()
                         if self.show is None or k in self.show) or "base"


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-4].strip() if text.endswith("...") else text


class MethodLabel(NamedTuple):
    """A study's method label ``<name>[:<solver>][/<mix>]``, taken apart."""

    name: str  # a key of liquid_fed.methods.METHODS
    solver: str | None = None  # the Liquid Ensemble's solver
    mix: str | None = None  # the pooling (ensemble.mix), where the study has a mixes axis

    def __str__(self) -> str:
        return method_label(self.name, self.solver, self.mix)


def method_label(name: str, solver: str | None = None, mix: str | None = None) -> str:
    """The label of a method variant: ``liquid:sink_one/logits``, ``uniform/probs``,
    ``splitnn``."""
    return name + (f":{solver}" if solver else "") + (f"/{mix}" if mix else "")


def parse_method(label: str) -> MethodLabel:
    """Take a method label apart (``liquid:sink_one/logits`` -> liquid, sink_one, logits);
    labels of older study folders (``liquid:sink_one``, ``uniform``) have no pooling."""
    head, _, mix = label.partition("/")
    name, _, solver = head.partition(":")
    return MethodLabel(name, solver or None, mix or None)


@dataclass
class Study:
    """A validated, expanded study."""

    name: str
    path: Path | None
    base: dict[str, Any]  # the base run config as plain data (with the study's `set`)
    settings: list[Setting]
    seeds: list[int]
    methods: list[str]  # expanded labels: "liquid:<solver>[/<mix>]", "<method>[/<mix>]"
    engine: str
    method_options: dict[str, Any]
    swept: list[str]  # the dotted keys the settings vary (and test_missing, when given)
    description: str = ""
    configs: dict[tuple[str, int], RunConfig] = field(default_factory=dict, repr=False)
    #: the missing rates at which every run is scored on its test split (None: not asked)
    test_missing: list[float] | None = None

    def scored_settings(self) -> list[Setting]:
        """The settings of the result rows: the training settings, each once per test missing
        rate when the study has ``test_missing`` (id ``<cell>@<rate>``, values with
        ``test_missing``); a run is trained once per training setting and scored at every
        rate, so the rates of one setting share each seed's trained models (paired)."""
        if not self.test_missing:
            return list(self.settings)
        return [Setting(scored_id(s.id, p), {**s.values, TEST_MISSING: p},
                        None if s.show is None else (*s.show, TEST_MISSING))
                for s in self.settings for p in self.test_missing]

    def training_setting(self, scored: Setting) -> Setting:
        """The training setting of a scored setting (itself without ``test_missing``)."""
        cell = scored.id.partition("@")[0]
        return next(s for s in self.settings if s.id == cell)

    def config(self, setting: Setting, seed: int, method: str | None = None) -> RunConfig:
        """The run config of a cell, seed and (for the Liquid Ensemble) method."""
        key = (setting.id, seed)
        if key not in self.configs:
            data = copy.deepcopy(self.base)
            data["seed"] = seed
            for dotted, value in setting.values.items():
                merge_key(data, ALIASES.get(dotted, dotted), value)
            self.configs[key] = build_config(data)
        cfg = self.configs[key]
        if method is None:
            return cfg
        label = parse_method(method)
        changes = {k: v for k, v in (("solver", label.solver), ("mix", label.mix)) if v}
        if changes:
            cfg = dataclasses.replace(cfg, ensemble=dataclasses.replace(cfg.ensemble, **changes))
        return cfg

    def cells(self) -> Iterator[tuple[Setting, int]]:
        for setting in self.settings:
            for seed in self.seeds:
                yield setting, seed

    def to_dict(self) -> dict[str, Any]:
        """The resolved study, as ``study.yaml`` holds it."""
        out = {"name": self.name, "description": self.description, "engine": self.engine,
               "seeds": self.seeds, "methods": self.methods, "swept": self.swept,
               "method_options": self.method_options, "base": self.base,
               "settings": [{"id": s.id, "values": s.values} for s in self.settings]}
        if self.test_missing:  # older study folders have no such key and resume unchanged
            out[TEST_MISSING] = self.test_missing
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def scored_id(setting_id: str, rate: float) -> str:
    """The id of a setting scored at a test missing rate (``c03@0.3``)."""
    return f"{setting_id}@{rate:g}"


def _test_missing(raw: dict[str, Any]) -> list[float] | None:
    """The study's ``test_missing`` rates, checked: distinct numbers in [0, 1)."""
    for section in ("grid", "paired", "random"):
        node = raw.get(section) or {}
        keys = node.get("keys") or {} if section == "random" and isinstance(node, dict) else node
        if isinstance(keys, dict) and TEST_MISSING in keys:
            raise ConfigError(f"{section}.{TEST_MISSING}: test missing rates are a study key, "
                              f"not a {section} axis (every run is scored at each rate without "
                              f"training again); write `{TEST_MISSING}: [0, 0.1, ...]` at the "
                              "top level of the study file")
    rates = raw.get(TEST_MISSING)
    if rates is None:
        return None
    rates = _list_of(TEST_MISSING, rates)
    ok = all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1
             for p in rates)
    _require(ok and len(set(rates)) == len(rates),
             f"{TEST_MISSING}: got {rates!r}; expected distinct missing rates in [0, 1)")
    return [float(p) for p in rates]


def merge_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key of a config's plain data. A mapping given for a config *section* is
    merged into it (``set: {train: {epochs: 2}}`` keeps the section's other keys); a mapping
    given for an ``options`` key replaces it (options are the whole of what they say)."""
    parts = dotted.split(".")
    _require(all(parts), f'"{dotted}": a dotted key has an empty part')
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        _require(isinstance(child, dict), f'"{dotted}": "{part}" is not a section')
        node = child
    leaf = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(leaf), dict) and leaf != "options":
        for key, sub in value.items():
            merge_key(node[leaf], str(key), sub)
    else:
        node[leaf] = copy.deepcopy(value)


def _override_study(raw: dict[str, Any], text: str) -> None:
    """``--set`` on a study: ``seeds=2``, ``set.train.epochs=3``, ``grid.views.overlap=[0, 1]``
    (the dotted run-config key after ``set.``/``grid.``/``paired.`` stays one key)."""
    key, sep, value_text = text.partition("=")
    _require(bool(sep) and bool(key), f'override "{text}" must look like key=value')
    value = safe_yaml(value_text, f'override "{text}"') if value_text.strip() else ""
    head, _, rest = key.partition(".")
    if head in ("set", "grid", "paired") and rest:
        section = raw.setdefault(head, {})
        _require(isinstance(section, dict), f'override "{text}": {head} is not a mapping')
        section[rest] = value
    elif head == "random" and rest:
        apply_overrides(raw, [text])
    else:
        _require(not rest, f'override "{text}": unknown study key "{head}"')
        raw[key] = value


def _shown(value: Any, limit: int = 80) -> str:
    """A value as repr() for a message, cut short (a list of 1,000 seeds stays one line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _list_of(key: str, value: Any) -> list[Any]:
    _require(isinstance(value, list) and len(value) > 0,
             f"{key}: got {value!r}; expected a non-empty list of values")
    return list(value)


def _draw(key: str, spec: Any, rng: np.random.Generator) -> Any:
    _require(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DRAWS,
             f"random.keys.{key}: got {spec!r}; expected one of {{choice: [..]}}, "
             "{uniform: [low, high]}, {loguniform: [low, high]}, {int: [low, high]}")
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        values = _list_of(f"random.keys.{key}.choice", arg)
        return values[int(rng.integers(len(values)))]
    ok = (isinstance(arg, list) and len(arg) == 2
          and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arg)
          and arg[0] <= arg[1] and (kind != "loguniform" or arg[0] > 0))
    _require(ok, f"random.keys.{key}.{kind}: got {arg!r}; expected [low, high] with low <= "
                 f"high{' and low > 0' if kind == 'loguniform' else ''}")
    low, high = arg
    if kind == "int":
        _require(all(float(a).is_integer() for a in arg),
                 f"random.keys.{key}.int: got {arg!r}; the bounds of an integer draw must be "
                 "integers")
    if kind == "uniform":
        return round(float(rng.uniform(low, high)), 6)
    if kind == "loguniform":
        return round(float(math.exp(rng.uniform(math.log(low), math.log(high)))), 6)
    return int(rng.integers(int(low), int(high) + 1))


def _expand(raw: dict[str, Any]) -> list[dict[str, Any]]:
    grid = raw.get("grid") or {}
    _require(isinstance(grid, dict), f"grid: got {grid!r}; expected a mapping of dotted "
                                     "config keys to lists of values")
    axes = [[{k: v} for v in _list_of(f"grid.{k}", vals)] for k, vals in grid.items()]
    paired = raw.get("paired") or {}
    _require(isinstance(paired, dict), f"paired: got {paired!r}; expected a mapping of dotted "
                                       "config keys to lists of equal length")
    if paired:
        lists = {k: _list_of(f"paired.{k}", v) for k, v in paired.items()}
        lengths = {k: len(v) for k, v in lists.items()}
        _require(len(set(lengths.values())) == 1,
                 f"paired: its lists must have one length; got {lengths}")
        n = next(iter(lengths.values()))
        axes.append([{k: lists[k][i] for k in lists} for i in range(n)])
        clash = sorted(set(grid) & set(paired))
        if clash:
            raise ConfigError(f"paired.{clash[0]}: the key is also in grid")
    rand = raw.get("random")
    n = rand.get("n") if isinstance(rand, dict) else 0
    # Counted before anything is built: a grid of 10^12 cells must fail at once, not fill memory.
    cells = math.prod(len(axis) for axis in axes) if axes else 0
    if isinstance(n, int) and not isinstance(n, bool):
        cells += max(n, 0)
    _require(cells <= MAX_SETTINGS, f"the study has {cells:,} settings (grid x paired, plus "
                                    f"random.n); at most {MAX_SETTINGS:,} are accepted")
    settings = [dict(itertools.chain.from_iterable(d.items() for d in combo))
                for combo in itertools.product(*axes)] if axes else []
    if rand is not None:
        _require(isinstance(rand, dict) and set(rand) <= {"n", "seed", "keys"},
                 f"random: got {rand!r}; expected a mapping with n, seed and keys")
        _require(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                 f"random.n: got {n!r}; expected an integer >= 1")
        keys = rand.get("keys")
        _require(isinstance(keys, dict) and keys, f"random.keys: got {keys!r}; expected a "
                                                  "mapping of dotted config keys to draws")
        rng = np.random.default_rng(int(rand.get("seed", 0)))
        for _ in range(n):
            settings.append({k: _draw(k, spec, rng) for k, spec in keys.items()})
    return settings or [{}]


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """Read, validate and expand a study file; nothing runs.

    Every cell's run config is built and checked (the same errors as ``liquid-fed validate``,
    prefixed with the cell), every method is checked against its data, and every data set,
    view and expert is built once, so a mistake fails here, naming the key.

    Args:
        path: the study file.
        overrides: ``key=value`` overrides of the study file itself (``seeds=2``,
            ``set.train.epochs=3``, ``grid.views.overlap=[0, 0.5]`` ...).

    Returns:
        The :class:`Study`.

    Raises:
        ConfigError: naming the study key (or the cell and run-config key) at fault.
    """
    from liquid_fed.methods import METHODS

    path = Path(path)
    _require(path.is_file(), f"study file {str(path)!r} does not exist (or is not a file)")
    raw = safe_yaml(path.read_text(encoding="utf-8-sig"), f"study file {str(path)!r}") or {}
    _require(isinstance(raw, dict), f"study file {str(path)!r} must hold a mapping")
    for text in overrides:
        _override_study(raw, text)
    unknown = [k for k in raw if k not in STUDY_KEYS]
    _require(not unknown, f'unknown study key "{unknown[0] if unknown else ""}" (accepted: '
                          f"{', '.join(STUDY_KEYS)})")
    base_ref = raw.get("base")
    _require(isinstance(base_ref, str), f"base: got {base_ref!r}; expected the path of a run "
                                        "config (relative to the study file)")
    base_path = (path.parent / base_ref) if not Path(base_ref).is_absolute() else Path(base_ref)
    _require(base_path.is_file(), f"base: {str(base_path)!r} does not exist")
    base = safe_yaml(base_path.read_text(encoding="utf-8-sig"), f"base {str(base_path)!r}") or {}
    _require(isinstance(base, dict), f"base {str(base_path)!r} must hold a mapping")
    sets = raw.get("set") or {}
    _require(isinstance(sets, dict), f"set: got {sets!r}; expected a mapping of dotted keys")
    for key, value in sets.items():
        merge_key(base, key, value)
    name = raw.get("name", path.stem)
    _require(isinstance(name, str) and bool(name), f"name: got {name!r}; expected a string")
    base["name"] = name

    seeds = raw.get("seeds", 3)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        _require(1 <= seeds <= MAX_SEEDS, f"seeds: got {seeds}; expected 1..{MAX_SEEDS} (or a "
                                          "list of seeds)")
        seeds = list(range(seeds))
    _require(not isinstance(seeds, list) or len(seeds) <= MAX_SEEDS,
             f"seeds: got a list of {len(seeds) if isinstance(seeds, list) else 0} seeds; at "
             f"most {MAX_SEEDS}")
    _require(isinstance(seeds, list) and seeds and all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in seeds)
        and len(set(seeds)) == len(seeds),
        f"seeds: got {_shown(raw.get('seeds'))}; expected a count or a list of distinct seeds "
        f"in [0, {MAX_SEED}]")

    methods = raw.get("methods", [LIQUID, "uniform", "averaged"])
    _require(isinstance(methods, list) and methods and len(set(methods)) == len(methods),
             f"methods: got {methods!r}; expected a list of distinct method names")
    bad = [m for m in methods if m not in METHODS]
    _require(not bad, f'methods: unknown method "{bad[0] if bad else ""}"; accepted: '
                      f"{', '.join(METHODS)}")
    solvers = raw.get("solvers")
    if solvers is not None:
        solvers = _list_of("solvers", solvers)
        bad = [s for s in solvers if s not in SOLVERS]
        _require(not bad, f'solvers: got "{bad[0] if bad else ""}"; accepted: '
                          f"{', '.join(SOLVERS)}")
        _require(LIQUID in methods, "solvers: given, but methods has no liquid")
    mixes = _mixes(raw, methods)
    engine = raw.get("engine", "centralized")
    _require(engine in ENGINES, f'engine: got "{engine}"; accepted: {", ".join(ENGINES)}')
    options = raw.get("method_options") or {}
    from liquid_fed.methods import MethodOptions

    MethodOptions.from_dict(options)  # the error names method_options.<key>

    test_missing = _test_missing(raw)
    values = _expand(raw)
    swept = list(dict.fromkeys(k for v in values for k in v))
    if test_missing:
        swept.append(TEST_MISSING)
    show = raw.get("show")
    if show is not None:
        show = _list_of("show", show)
        bad = [k for k in show if k not in swept]
        _require(not bad, f'show: "{bad[0] if bad else ""}" is not a key the settings vary '
                          f"(they vary: {', '.join(swept)})")
        show = tuple(show)
    settings = [Setting(f"c{i:02d}", v, show) for i, v in enumerate(values)]
    study = Study(name, path, base, settings, seeds, [], engine, options, swept,
                  str(raw.get("description", "")), test_missing=test_missing)
    clash = [k for k in study.swept if k == "ensemble.mix"]
    _require(not (mixes and clash), "mixes: given, but the settings also vary ensemble.mix "
                                    "(keep one of the two)")
    study.methods = _expand_methods(methods, solvers, study, mixes)
    runs = len(settings) * len(seeds) * len(study.methods)
    _require(runs <= MAX_RUNS, f"the study has {runs:,} runs ({len(settings)} settings x "
                               f"{len(seeds)} seeds x {len(study.methods)} methods); at most "
                               f"{MAX_RUNS:,} are accepted")
    _check_cells(study)
    return study


def _mixes(raw: dict[str, Any], methods: list[str]) -> list[str] | None:
    """The study's ``mixes`` axis, checked against :data:`liquid_fed.ensemble.MIXES`."""
    from liquid_fed.ensemble import MIXES

    mixes = raw.get("mixes")
    if mixes is None:
        return None
    mixes = _list_of("mixes", mixes)
    bad = [m for m in mixes if m not in MIXES]
    _require(not bad, f'mixes: got "{bad[0] if bad else ""}"; accepted: {", ".join(MIXES)}')
    _require(len(set(mixes)) == len(mixes), f"mixes: got {mixes!r}; expected distinct values")
    _require(any(m in MIX_METHODS for m in methods),
             f"mixes: given, but methods has none that pools through ensemble.mix "
             f"({', '.join(MIX_METHODS)})")
    return mixes


def _expand_methods(methods: list[str], solvers: list[str] | None, study: Study,
                    mixes: list[str] | None = None) -> list[str]:
    """Method labels: ``liquid`` once per solver, and every method of :data:`MIX_METHODS`
    once per pooling of ``mixes`` (solvers first, then poolings, in the study's order)."""
    out = []
    for m in methods:
        pools = mixes if (mixes and m in MIX_METHODS) else [None]
        if m == LIQUID:
            default = study.config(study.settings[0], study.seeds[0]).ensemble.solver
            out += [method_label(m, s, x) for s in (solvers or [default]) for x in pools]
        else:
            out += [method_label(m, None, x) for x in pools]
    return out


def _check_cells(study: Study) -> None:
    """Build every cell's config, and check each distinct setting's data, views, experts and
    methods once (the first seed), before anything trains."""
    from liquid_fed.federation import load_server_data
    from liquid_fed.runs import check_run

    for setting, seed in study.cells():
        try:
            cfg = study.config(setting, seed)
            if seed == study.seeds[0]:
                check_run(cfg)
                if "oracle" in study.methods and load_server_data(cfg).informative is None:
                    raise ConfigError(
                        'method "oracle" needs the ground truth of which view is informative '
                        'per sample (data set "synthetic_regions" with views.kind groups or '
                        f'natural); got data.name "{cfg.data.name}", views.kind '
                        f'"{cfg.views.kind}"')
        except LiquidFedError as exc:
            where = f"cell {setting.id} ({setting.label()}), seed {seed}"
            raise ConfigError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Running cells
# --------------------------------------------------------------------------------------------


def cell_dir(out: Path, setting_id: str, seed: int) -> Path:
    return Path(out) / CELLS_DIR / setting_id / f"seed-{seed}"


def method_slug(method: str) -> str:
    """The folder name of a method (``liquid:sink_one`` -> ``liquid-sink_one``,
    ``uniform/logits`` -> ``uniform-logits``)."""
    return method.replace(":", "-").replace("/", "-")


def finished(out: Path, setting_id: str, seed: int, method: str) -> bool:
    return (cell_dir(out, setting_id, seed) / method_slug(method) / SUMMARY_FILE).is_file()


def run_cell(study: Study, setting: Setting, seed: int, methods: Sequence[str], out: Path,
             federated: FederatedRunner | None = None,
             on_method: Callable[[str, float], None] | None = None) -> None:
    """Train ``methods`` of one cell and seed, each into its own run folder.

    Args:
        study: the study.
        setting: the cell.
        seed: the seed.
        methods: which of the study's methods to run (the others are finished).
        out: the study folder.
        federated: runs the Liquid Ensemble through Flower on Ray (``engine: federated``).
        on_method: called with (method, seconds) after each method.
    """
    import torch

    from liquid_fed.centralized import central_data
    from liquid_fed.federation import LocalTransport, load_data, load_server_data, make_plan
    from liquid_fed.methods import MethodContext, MethodOptions, run_method
    from liquid_fed.runs import run_federated

    check_study_folder(out)
    torch.set_num_threads(1)  # tiny models: threads only add overhead, and cells run in parallel
    cfg = study.config(setting, seed)
    folder = cell_dir(out, setting.id, seed)
    server = load_server_data(cfg)
    views = RunDir(folder)
    if not (folder / VIEWS_FILE).is_file():
        from liquid_fed.data.probe import view_observability, view_summary

        ds, plan = load_data(cfg), make_plan(cfg, load_data(cfg))
        views.write_json(VIEWS_FILE, {
            "setting": setting.values, "seed": seed, "plan": plan.to_dict(),
            "summary": view_summary(ds, plan, server.splits, seed=cfg.seed),
            "observability": view_observability(ds, plan, server.splits, seed=cfg.seed)})
    data = None
    context = None
    for method in methods:
        t0 = time.perf_counter()
        run_dir = folder / method_slug(method)
        mcfg = study.config(setting, seed, method)
        name = parse_method(method).name
        if mcfg.tracking.tensorboard or mcfg.tracking.mlflow is not None:
            from liquid_fed.tracking import write_context

            # read by the run's tracker, here or in the process that trains it (federated)
            write_context(run_dir, study.name, f"{setting.id}/seed-{seed}/{method_slug(method)}",
                          cell_hparams(setting, seed, method, mcfg))
        if name == LIQUID:
            lcfg = build_config(_plain(mcfg), ["baselines.uniform=false",
                                               "baselines.independent=false"])
            from liquid_fed import rundir

            rundir.prepare(lcfg, run_dir, force=True)
            if study.engine == "federated":
                if federated is None:
                    raise ConfigError("engine: federated needs a runner of Flower on Ray "
                                      "(liquid-fed compare provides one)")
                federated(lcfg, run_dir)
            else:
                torch.manual_seed(lcfg.seed)
                run_federated(lcfg, LocalTransport(lcfg.n_clients), run_dir)
            run = RunDir(run_dir)
            extra = ({TEST_MISSING: _liquid_missing(run, study.test_missing)}
                     if study.test_missing else {})
            run.update_summary(method=method, study_engine=study.engine,
                               train_seconds=time.perf_counter() - t0, **extra)
        else:
            if data is None:
                data = central_data(cfg, server)
                context = MethodContext(cfg, data, MethodOptions.from_dict(study.method_options),
                                        study.test_missing or ())
            torch.manual_seed(mcfg.seed)
            # a pooling variant (uniform/logits) shares the experts trained alone of the cell
            result = run_method(name, mcfg, data, context=context.for_config(mcfg))
            _write_method(run_dir, mcfg, result, data, method)
            _track_method(run_dir, mcfg, result, data)
        if on_method is not None:
            on_method(method, time.perf_counter() - t0)


def cell_hparams(setting: Setting, seed: int, method: str, cfg: RunConfig) -> dict[str, Any]:
    """A study run's hyper-parameters for the trackers: the setting's values (its dotted
    keys), the cell, seed, method, the Liquid Ensemble's solver and the pooling, so that
    TensorBoard's HParams view and MLflow's compare view line the methods up."""
    label = parse_method(method)
    solver = label.solver or (cfg.ensemble.solver if label.name == LIQUID else "none")
    return {**setting.values, "cell": setting.id, "seed": seed, "method": method,
            "solver": solver, "mix": label.mix or cfg.ensemble.mix}


def _track_method(run_dir: Path, cfg: RunConfig, result: Any, data: Any) -> None:
    """A study method trained outside the federation loop: its epoch losses and final metrics
    to the trackers (steps: the rounds of as many epochs)."""
    from liquid_fed.tracking import Tracker

    tracker = Tracker.open(cfg, run_dir)
    if tracker is None:
        return
    try:
        per_epoch = -(-int(data.targets["train"].shape[0]) // cfg.train.chunk_size)
        for epoch, loss in enumerate(result.epoch_losses or []):
            if isinstance(loss, (int, float)):
                tracker.scalars((epoch + 1) * per_epoch, {"train/epoch_loss": float(loss)})
        tracker.final(per_epoch * cfg.train.epochs, result.val, result.test)
    finally:
        tracker.close()


def _liquid_missing(run: RunDir, rates: Sequence[float]) -> dict[str, dict[str, float]]:
    """The Liquid Ensemble's test metrics per missing rate above 0: from its summary's
    ``robustness`` (the powers re-solved over the present experts, on the masks every method
    of the seed is scored on), else scored again from its folder
    (:func:`liquid_fed.robustness.evaluate_run`, the same masks)."""
    from liquid_fed.robustness import absent_key, evaluate_run, rate_key

    robust = run.read_summary().get("robustness") or {}
    have = robust.get("missing_rate") or {}
    out = {rate_key(p): have[rate_key(p)] for p in rates if p > 0 and rate_key(p) in have}
    out.update({absent_key(int(j)): m for j, m in (robust.get("absent") or {}).items()})
    rest = [p for p in rates if p > 0 and rate_key(p) not in have]
    if rest:
        cases = evaluate_run(run.path, missing_rates=rest)[1:]
        out.update({rate_key(p): c.metrics for p, c in zip(rest, cases, strict=True)})
    return out


def _plain(cfg: RunConfig) -> dict[str, Any]:
    return cfg.to_dict()


def _write_method(run_dir: Path, cfg: RunConfig, result: Any, data: Any,
                  label: str | None = None) -> None:
    """A baseline's run folder: config, test outputs, then the summary (last: it marks the
    folder finished)."""
    run = RunDir(run_dir)
    run.clear_results()
    run.write_text(CONFIG_FILE, cfg.to_yaml())
    arrays = {k: np.asarray(v) for k, v in result.arrays.items()}
    if "ids" in arrays:
        ids = arrays["ids"]
        arrays["labels"] = np.asarray(data.server.labels_of(ids))
        for key, values in (("informative", data.server.informative_of(ids)),
                            ("regions", data.server.regions_of(ids))):
            if values is not None:
                arrays[key] = np.asarray(values)
    if "power" in arrays and "error" in arrays:
        run.write_npz(OUTPUTS_FILE, arrays)
    summary = {"name": cfg.name, "method": result.method, "study_engine": "centralized",
               "metric": TASK_METRICS[data.server.task], **result.to_dict()}
    summary["method"] = label or result.method  # the study's label (uniform/logits)
    run.write_summary(summary)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def routing(run_dir: Path) -> tuple[float, float]:
    """(delegation accuracy, region NMI) of a run's test outputs, where the data has ground
    truth: the share of test samples whose most powerful party is the informative one (a tie
    for the top counts as no choice), and the normalised mutual information between the most
    powerful party and the ground-truth region. NaN without ground truth or powers."""
    path = run_dir / OUTPUTS_FILE
    if not path.is_file():
        return math.nan, math.nan
    arrays = RunDir(run_dir).read_outputs()
    if "power" not in arrays:
        return math.nan, math.nan
    from liquid_fed.plots import top_expert

    top, tie = top_expert(arrays["power"])
    accuracy = nmi = math.nan
    if "informative" in arrays:
        accuracy = float(np.mean((top == arrays["informative"]) & ~tie))
    if "regions" in arrays:
        from sklearn.metrics import normalized_mutual_info_score

        choice = np.where(tie, -1, top)  # a tie is its own "no choice" label
        nmi = float(normalized_mutual_info_score(arrays["regions"], choice))
    return accuracy, nmi


def result_row(study: Study, setting: Setting, seed: int, method: str, out: Path
               ) -> dict[str, Any]:
    """One row of ``results.csv``, from the cell's run folder and views.

    ``setting`` is one of :meth:`Study.scored_settings`: at a test missing rate above 0 the
    test metrics are those of the run's ``test_missing`` at that rate (the per-sample columns
    of the figures, power entropy, delegation accuracy, stay those of the complete test)."""
    rate = setting.values.get(TEST_MISSING) if study.test_missing else None
    trained = study.training_setting(setting) if rate is not None else setting
    folder = cell_dir(out, trained.id, seed)
    run_dir = folder / method_slug(method)
    summary = RunDir(run_dir).read_summary()
    test = summary.get("test") or {}
    if rate:
        from liquid_fed.robustness import rate_key

        missing = (summary.get(TEST_MISSING) or {}).get(rate_key(rate))
        if missing is None:
            raise RunFolderError(f"{run_dir}: its summary has no test metrics at missing rate "
                                 f"{rate} (a run of another study?); run the study again with "
                                 "--force")
        test = dict(missing)
    metric = TASK_METRICS["classification" if "accuracy" in test else "regression"]
    row: dict[str, Any] = {"cell": setting.id, **{k: _short(v) for k, v in
                                                 setting.values.items()},
                           "seed": seed, "method": method, "metric": metric,
                           "score": test.get(metric, math.nan)}
    # regression: the MSE (a run's own summary gives the RMSE only)
    row["nll"] = test.get("nll", test.get("loss", math.nan)) if metric == "accuracy" else (
        test.get("mse", test.get("rmse", math.nan) ** 2))
    for name in CONFIDENCES:
        row[f"tau_{name}"] = test.get(f"tau_{name}", math.nan)
    row["power_entropy"] = test.get("power_entropy", math.nan)
    row["smoothing"] = test.get("smoothing", math.nan)  # the λ used (auto: picked on val)
    row["speaker_entropy"] = test.get("speaker_entropy", math.nan)
    weights = summary.get("party_weight")
    k = study.config(trained, seed).n_clients
    for j in range(k):
        power = test.get(f"mean_power_{j}")
        row[f"power_{j}"] = (power / k if power is not None
                             else (weights[j] if weights else math.nan))
    row["delegation_accuracy"], row["region_nmi"] = (
        routing(run_dir) if not rate else (math.nan, math.nan))
    if study.test_missing and not rate:
        # the primary metric with one party absent at test, averaged over the parties
        from liquid_fed.robustness import absent_key

        missing = summary.get(TEST_MISSING) or {}
        alone = [missing.get(absent_key(j), {}).get(metric) for j in range(k)]
        row[ABSENT_ONE] = (float(np.mean(alone)) if alone and None not in alone
                           else math.nan)
        row[ABSENT_ONE + "_drop"] = row["score"] - row[ABSENT_ONE] if row["score"] is not None \
            else math.nan
    views = read_json(folder / VIEWS_FILE) if (folder / VIEWS_FILE).is_file() else {}
    probes = [v for v in views.get("summary", []) if v.get("view") != "all"]
    obs = views.get("observability", {})
    for j in range(k):
        row[f"probe_{j}"] = probes[j]["score"] if j < len(probes) else math.nan
        share = obs.get("importance_share")
        row[f"importance_{j}"] = share[j] if share and j < len(share) else math.nan
    row["icor"] = obs.get("icor", math.nan)
    # What a party recovers of the training labels (strongest attack), or that it holds them.
    leak = summary.get("label_leakage") or {}
    row["label_leakage"] = leak.get("max", math.nan)
    row["label_leakage_attack"] = leak.get("best_attack")
    row["label_leakage_chance"] = leak.get("chance", math.nan)
    row["labels_at_party"] = 1 if leak.get("labels_at_party") else None
    row["label_epsilon"] = (leak.get("guarantee") or {}).get("epsilon")
    # the Liquid Ensemble's own training loop (its run also probes views and checkpoints)
    row["train_seconds"] = summary.get("wall_seconds", summary.get("train_seconds", math.nan))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()}


def check_study_folder(out: Path) -> None:
    """The study folder still holds its ``study.yaml`` (written by :func:`prepare_study`).

    A folder deleted or moved while the study runs would otherwise be recreated piecemeal by
    the next run, and the study would end claiming success over the runs that are gone.

    Raises:
        RunFolderError: naming the folder.
    """
    if not (Path(out) / STUDY_FILE).is_file():
        raise RunFolderError(f"study folder {out} lost its {STUDY_FILE} while the study ran "
                             "(deleted or moved?); the runs it held are gone: start the study "
                             "again")


def collect(study: Study, out: Path) -> list[dict[str, Any]]:
    """Every finished row of the study (in cell, seed, method order).

    Raises:
        RunFolderError: the study folder lost its ``study.yaml`` (deleted while running).
    """
    check_study_folder(out)
    rows = []
    scored = study.scored_settings()
    for setting, seed in study.cells():
        for method in study.methods:
            if finished(out, setting.id, seed, method):
                rows += [result_row(study, s, seed, method, out) for s in scored
                         if s.id == setting.id or s.id.partition("@")[0] == setting.id]
    return rows


def write_results(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """``results.csv``: one row per cell x seed x method, the union of columns."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return RunDir(out).write_text(RESULTS_FILE, buf.getvalue())


def read_results(out: Path) -> list[dict[str, Any]]:
    """The rows of ``results.csv`` (numbers as floats, empty cells as None)."""
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist: run the study first")
    rows = []
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append({k: _number(v) for k, v in r.items()})
    return rows


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


# --------------------------------------------------------------------------------------------
# The study folder
# --------------------------------------------------------------------------------------------


def prepare_study(study: Study, out: Path, resume: bool, force: bool = False) -> None:
    """Write ``study.yaml``; on resume, refuse a folder whose study differs."""
    out = Path(out)
    saved = out / STUDY_FILE
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        if resume:
            if old != yaml.safe_load(study.to_yaml()):
                raise RunFolderError(f"cannot resume: the study differs from the one saved in "
                                     f"{saved} (resume with that study, or choose another --out)")
            return
        if not force:
            raise RunFolderError(f"study folder {out} already holds a study; pass --resume to "
                                 "continue it, --force to start it over, or choose another --out")
        import shutil

        shutil.rmtree(out / CELLS_DIR, ignore_errors=True)
    elif resume and any(out.glob(f"{CELLS_DIR}/*")):
        raise RunFolderError(f"cannot resume: {saved} does not exist")
    RunDir(out).write_text(STUDY_FILE, study.to_yaml())


__all__ = ["ENGINES", "FederatedRunner", "Setting", "Study", "cell_dir", "collect",
           "finished", "load_study", "method_slug", "prepare_study", "read_results",
           "result_row", "run_cell", "write_results"]
