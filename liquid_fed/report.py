"""The report of a study: every method per setting with confidence intervals over seeds, and
the Liquid Ensemble's paired differences from each baseline.

Means come with 95 % confidence intervals of Student's t over the seeds (``mean ± t·s/√n``; no
interval with one seed). A difference is *paired*: the Liquid Ensemble and the baseline share
each seed's data, splits, views, initial experts and batch order, so the per-seed differences
are averaged and their own interval is reported; a win or a loss is claimed only where that
interval excludes 0.

Labels: ``oracle`` is shown as "oracle (ground-truth routing)" (it reads which view is
informative from the data's ground truth, which no federation has); a study's pooling variants
keep their labels (``liquid:sink_one/logits``). The label-leakage column renders each run's
``label_leakage`` as results.csv holds it: a share of labels recovered (mean ± interval), a
marker such as "labels at every party" (methods that train every party on the labels), or
"n/a" where a run reports none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from liquid_fed.study import ABSENT_ONE, LIQUID, Study, parse_method

ORACLE = "oracle"
ORACLE_NOTE = "ground-truth routing"
LABELS_AT_PARTY = "labels at every party"
#: Values of ``label_leakage`` that mean the parties hold the labels themselves.
LABELS_AT_PARTY_MARKERS = ("labels_at_party", "labels at every party", "true")
#: The secondary overview: per primary metric, the column of results.csv and its title.
SECONDARY = {"accuracy": ("nll", "NLL"), "rmse": ("nll", "MSE")}


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and the half-width of its 95 % interval (NaN with one seed)."""

    mean: float
    half: float
    n: int

    def text(self, digits: int = 3) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        if not math.isfinite(self.half):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def interval(values: Sequence[float | None]) -> Interval:
    """Mean and 95 % t-interval half-width of the finite values."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return Interval(math.nan, math.nan, 0)
    if x.size == 1:
        return Interval(float(x[0]), math.nan, 1)
    from scipy.stats import t

    half = float(t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(float(x.mean()), half, int(x.size))


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"


def display_name(method: str) -> str:
    """A method's label in tables and figure legends: ``oracle`` says that it routes by the
    ground truth; every other label is shown as it is (``liquid:sink_one/logits``)."""
    if parse_method(method).name == ORACLE:
        return f"{method} ({ORACLE_NOTE})"
    return method


def leakage_text(values: Sequence[Any]) -> str:
    """The label-leakage cell of a method: a marker (``labels at every party``) where the runs
    report one, else the mean ± 95 % interval of the numbers, else ``n/a``."""
    markers = [str(v) for v in values if isinstance(v, (str, bool))]
    if markers:
        texts = [LABELS_AT_PARTY if m.strip().lower() in LABELS_AT_PARTY_MARKERS else m
                 for m in markers]
        return " / ".join(dict.fromkeys(texts))
    return interval([v for v in values if isinstance(v, (int, float))]).text()


def _rows_of(rows: Sequence[dict[str, Any]], cell: str, method: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["cell"] == cell and r["method"] == method]


def paired_difference(rows: Sequence[dict[str, Any]], cell: str, method: str,
                      baseline: str, key: str = "score") -> Interval:
    """``method - baseline`` of ``key`` per seed (the seeds both have), with its interval."""
    mine = {r["seed"]: r.get(key) for r in _rows_of(rows, cell, method)}
    theirs = {r["seed"]: r.get(key) for r in _rows_of(rows, cell, baseline)}
    diffs = [mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs))
             if mine[s] is not None and theirs[s] is not None]
    return interval(diffs)


@dataclass
class Verdict:
    """Where a Liquid Ensemble variant wins or loses against a baseline (interval excludes 0)."""

    cell: str
    label: str
    method: str
    baseline: str
    difference: Interval
    metric: str

    @property
    def better(self) -> bool:
        d = self.difference.mean
        return d > 0 if higher_is_better(self.metric) else d < 0


def verdicts(study: Study, rows: Sequence[dict[str, Any]]) -> list[Verdict]:
    """Every (cell, Liquid Ensemble variant, baseline) whose paired interval excludes 0."""
    out = []
    liquids = [m for m in study.methods if m.startswith(LIQUID)]
    others = [m for m in study.methods if not m.startswith(LIQUID)]
    for setting in study.scored_settings():
        metric = next((r["metric"] for r in rows if r["cell"] == setting.id), None)
        if metric is None:
            continue
        for le in liquids:
            for base in others:
                d = paired_difference(rows, setting.id, le, base)
                if d.n >= 2 and math.isfinite(d.half) and (d.low > 0 or d.high < 0):
                    out.append(Verdict(setting.id, setting.label(), le, base, d, metric))
    return out


COLUMNS = (("score", None), ("nll", "NLL"), ("power_entropy", "power entropy"),
           ("delegation_accuracy", "delegation acc."), ("label_leakage", "label leakage"),
           ("train_seconds", "train s"))


def leakage_cell(rows: Sequence[dict[str, Any]]) -> str:
    """The label-leakage cell of one method: "labels at every party" where its parties hold
    the labels; else the mean share recovered by the strongest attack with its interval, the
    chance level and, where the defence gives one, the mean label-DP ε."""
    if rows and all(r.get("labels_at_party") for r in rows):
        return LABELS_AT_PARTY
    values = [r.get("label_leakage") for r in rows]
    if any(isinstance(v, (str, bool)) for v in values):
        return leakage_text(values)
    text = interval(values).text(3)
    if text == "n/a":
        return text
    chance = interval([r.get("label_leakage_chance") for r in rows])
    extra = [f"chance {chance.mean:.2f}"] if chance.n else []
    eps = interval([r.get("label_epsilon") for r in rows])
    if eps.n == len(rows) and eps.n:
        extra.append(f"ε {eps.mean:.3g}")
    return f"{text} ({', '.join(extra)})" if extra else text


def overview(study: Study, rows: Sequence[dict[str, Any]], key: str = "score",
             title: str | None = None) -> list[str]:
    """One table: a row per setting, a column per method, the mean of ``key`` over seeds (the
    best of the row in bold: the highest accuracy, the lowest error or NLL); empty when no row
    has the value.

    Args:
        study: the study (its settings and method labels, in order).
        rows: the rows of results.csv.
        key: the column to average (``score``: the primary metric; ``nll``).
        title: what the table shows (default: the primary metric).

    Returns:
        The table's markdown lines, ending with a blank line.
    """
    metric = next((r["metric"] for r in rows), None)
    if metric is None or not any(isinstance(r.get(key), (int, float)) for r in rows):
        return []
    higher = higher_is_better(metric) if key in ("score", ABSENT_ONE) else False
    methods = [m for m in study.methods if any(r["method"] == m for r in rows)]
    lines = [f"## Overview: mean test {title or metric} over seeds"
             f" ({'higher' if higher else 'lower'} is better)", "",
             "| setting | " + " | ".join(display_name(m) for m in methods) + " |",
             "|" + "---|" * (len(methods) + 1)]
    for setting in study.scored_settings():
        means = {m: interval([r.get(key) for r in _rows_of(rows, setting.id, m)]).mean
                 for m in methods}
        finite = {m: v for m, v in means.items() if math.isfinite(v)}
        if not finite:
            continue
        best = (max if higher else min)(finite, key=finite.get)
        cells = ["n/a" if not math.isfinite(v) else (f"**{v:.3f}**" if m == best else f"{v:.3f}")
                 for m, v in means.items()]
        lines.append(f"| {setting.id}: {setting.label()} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def render(study: Study, rows: Sequence[dict[str, Any]]) -> str:
    """``report.md``: per setting, every method's mean ± 95 % CI, the best marked; the paired
    differences of the Liquid Ensemble from each baseline; where it wins and loses."""
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description, ""]
    seeds = ", ".join(map(str, study.seeds))
    n_set = len(study.scored_settings())
    lines += [f"{n_set} setting(s) x {len(study.seeds)} seed(s) ({seeds}) x "
              f"{len(study.methods)} method(s); the Liquid Ensemble trained with the "
              f"`{study.engine}` engine. Means over seeds with 95 % t-intervals; **bold**: the "
              "best mean of the setting.", ""]
    if study.swept:
        lines += ["Swept: " + ", ".join(f"`{k}`" for k in study.swept), ""]
    # a run scored at several test missing rates has a row per rate: count it once
    runs = {(r["cell"].partition("@")[0], r["seed"], r["method"]): r.get("train_seconds") or 0.0
            for r in rows}
    lines += [f"Training time of all {len(runs)} runs: {sum(runs.values()):.0f} s.", ""]
    lines += overview(study, rows)
    metric = next((r["metric"] for r in rows), None)
    if metric in SECONDARY:
        lines += overview(study, rows, *SECONDARY[metric])
    if study.test_missing:
        lines += ["Absent at test: every run is scored with each sample losing each party with "
                  "probability `test_missing` (one party kept; the same masks for every method "
                  "of a seed), and with each party absent alone for every sample. Trained once "
                  "per setting and seed, so the rows of one setting at different "
                  "`test_missing` share their models.", ""]
        lines += overview(study, rows, ABSENT_ONE,
                          f"{metric} with one party absent (mean over which party)")
        lines += overview(study, rows, ABSENT_ONE + "_drop",
                          f"loss of {metric} when one party is absent (complete minus one "
                          "absent)")
    if any(parse_method(m).name == ORACLE for m in study.methods):
        lines += [f"`{ORACLE}` ({ORACLE_NOTE}) predicts each sample with the expert of the view "
                  "that the data's ground truth marks informative: a reference no federation "
                  "can run.", ""]
    for setting in study.scored_settings():
        cell_rows = [r for r in rows if r["cell"] == setting.id]
        if not cell_rows:
            continue
        metric = cell_rows[0]["metric"]
        lines += [f"## {setting.id}: {setting.label()}", ""]
        keep = [(k, t) for k, t in COLUMNS
                if any(r.get(k) is not None for r in cell_rows)
                or (k == "label_leakage" and any(r.get("labels_at_party") for r in cell_rows))]
        header = ["method"] + [SECONDARY[metric][1] if k == "nll" and metric in SECONDARY
                               else (t or metric) for k, t in keep] + ["seeds"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        stats = {m: interval([r.get("score") for r in _rows_of(cell_rows, setting.id, m)])
                 for m in study.methods}
        finite = {m: s.mean for m, s in stats.items() if math.isfinite(s.mean)}
        best = (max if higher_is_better(metric) else min)(finite, key=finite.get) if finite \
            else None
        for m in study.methods:
            mrows = _rows_of(cell_rows, setting.id, m)
            if not mrows:
                continue
            cells = []
            for k, _ in keep:
                if k == "label_leakage":
                    cells.append(leakage_cell(mrows))
                    continue
                text = interval([r.get(k) for r in mrows]).text(1 if k == "train_seconds" else 3)
                cells.append(f"**{text}**" if k == "score" and m == best else text)
            lines.append(f"| {display_name(m)} | " + " | ".join(cells) + f" | {len(mrows)} |")
        lines.append("")
        liquids = [m for m in study.methods if m.startswith(LIQUID)]
        others = [m for m in study.methods if not m.startswith(LIQUID)]
        if liquids and others:
            better = "higher" if higher_is_better(metric) else "lower"
            lines += [f"Paired differences in {metric} ({better} is better), Liquid Ensemble "
                      "minus baseline:", "",
                      "| Liquid Ensemble | " + " | ".join(map(display_name, others)) + " |",
                      "|" + "---|" * (len(others) + 1)]
            for le in liquids:
                diffs = [paired_difference(cell_rows, setting.id, le, b).text()
                         for b in others]
                lines.append(f"| {le} | " + " | ".join(diffs) + " |")
            lines.append("")
    found = verdicts(study, rows)
    wins = [v for v in found if v.better]
    losses = [v for v in found if not v.better]
    lines += ["## Where the Liquid Ensemble wins and loses", "",
              "A paired 95 % interval that excludes 0 (settings with at least two seeds).", ""]
    for title, group in (("Wins", wins), ("Losses", losses)):
        lines.append(f"**{title}** ({len(group)}):")
        lines.append("")
        if not group:
            lines.append("- none")
        for v in group:
            lines.append(f"- {v.cell} ({v.label}): {v.method} vs {display_name(v.baseline)}: "
                         f"{v.difference.text()} {v.metric}")
        lines.append("")
    return "\n".join(lines)
