"""Figures of a study (PNG, each written whole, into ``<study>/figures/``).

:func:`plot_study` draws, from ``results.csv`` and the run folders' test outputs:

- ``metric_vs_<knob>.png``: the primary metric against each swept knob, one line per method
  with its 95 % band over seeds; one panel per value of the other knobs. Studies whose knobs
  move together (``paired``, ``random``) get ``metric_by_setting.png`` instead.
- ``paired_differences.png``: a forest plot of each Liquid Ensemble variant minus each
  baseline, per setting: the mean paired difference and its 95 % interval over seeds, exactly
  as the report's table (:func:`liquid_fed.report.paired_difference`).
- ``routing_<cell>.png``: the mean power share ``p_j / K`` of each party per ground-truth
  region (synthetic data) or per class, the Liquid Ensemble beside ``moe`` (whose gate plays
  the role of power); the informative party of each region is outlined.
- ``delegation_<cell>.png``: the mean delegation matrix per ground-truth region, else per
  class (over seeds and test samples). The matrix over all test samples is not drawn: averaged
  over every region it is the same near-symmetric matrix in every setting.
- ``graph_<cell>.png``: who delegates to whom, one panel per region (else class): one node per
  party, sized by its mean power there and labelled inside, an arrow ``i -> j`` as wide as the
  share of ``i``'s vote it hands to ``j``.
- ``power_vs_observability.png``: each party's power share against its view's observability,
  drawn only where observability varies: by view (linear-probe score and importance share,
  in the settings where the views differ, :func:`observability_varies`), and
  per region (the share of a region's samples for which the party's view is the informative
  one, where the data has that ground truth). Skipped, with a log line, when neither varies.
- ``confidence_tau.png``: Kendall's τ of each confidence measure against correctness, per
  setting (mean and 95 % interval over seeds).

Legends and headers use :func:`liquid_fed.report.display_name` (``oracle`` says that it routes
by the ground truth; pooling variants keep their labels, ``liquid:sink_one/logits``). The
``*_data`` functions return the numbers a figure shows (for tests and tables).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from liquid_fed.metrics import CONFIDENCES
from liquid_fed.plots import ANNOTATE_MAX_K, new_figure, save_figure
from liquid_fed.report import display_name, interval, paired_difference
from liquid_fed.rundir import OUTPUTS_FILE, RunDir
from liquid_fed.study import (
    ALIASES,
    LIQUID,
    TEST_MISSING,
    Setting,
    Study,
    _short,
    cell_dir,
    method_slug,
    parse_method,
    read_results,
)

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
MAX_SPLIT_PANELS = 10  # a delegation figure splits by at most this many regions / classes
GRAPH_MIN_SHARE = 0.05  # arrows for smaller shares of a vote are not drawn
GROUPS = (("regions", "region"), ("labels", "class"))  # ground truth to split by, in order
ROUTED = ("moe",)  # baselines whose gate is drawn beside the Liquid Ensemble's power
OBSERVABILITY_ALPHA = 0.01  # level of the test that observability varies by view
# Views whose linear-probe scores span less than this within a seed are taken as equally
# observable. Measured (seeds 0-1, 3 epochs): the regions study's 4 symmetric views span
# 0.066-0.114 per seed, digits' 2x2 quadrants 0.045-0.052; digits' random-pixel and
# importance splits 0.152-0.829.
OBSERVABILITY_MIN_SPREAD = 0.15


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _ordered(values: Sequence[Any]) -> list[Any]:
    """Distinct values in a stable order: numeric order when all are numbers."""
    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return distinct


def knob_data(study: Study, rows: Sequence[dict[str, Any]], knob: str
              ) -> dict[tuple[tuple[str, Any], ...], dict[str, list[tuple[Any, Any]]]]:
    """Per panel (the other knobs' values) and method: ``(knob value, interval)`` pairs.

    Returns an empty dict when the knob does not vary on its own (paired or random studies).
    """
    others = [k for k in study.swept if k != knob]
    panels: dict[tuple[tuple[str, Any], ...], dict[str, list[tuple[Any, Any]]]] = {}
    by_panel: dict[tuple[tuple[str, Any], ...], list[Setting]] = {}
    for s in study.scored_settings():
        key = tuple((k, _as_key(s.values.get(k))) for k in others)
        by_panel.setdefault(key, []).append(s)
    for key, settings in by_panel.items():
        xs = _ordered([_as_key(s.values.get(knob)) for s in settings])
        if len(xs) < 2 or len(xs) != len(settings):
            return {}
        lines: dict[str, list[tuple[Any, Any]]] = {}
        for method in study.methods:
            points = []
            for s in sorted(settings, key=lambda s: xs.index(_as_key(s.values.get(knob)))):
                scores = [r.get("score") for r in rows
                          if r["cell"] == s.id and r["method"] == method]
                points.append((_as_key(s.values.get(knob)), interval(scores)))
            lines[method] = points
        panels[key] = lines
    return panels


def _as_key(value: Any) -> Any:
    """A hashable, printable form of a setting value."""
    if isinstance(value, (dict, list)):
        return _short(value)
    return value


def _seed_outputs(out: Path, setting: Setting, seeds: Sequence[int], method: str
                  ) -> Iterator[dict[str, np.ndarray]]:
    """The test outputs of a method's run for each seed that has them."""
    for seed in seeds:
        run = cell_dir(out, setting.id, seed) / method_slug(method)
        if (run / OUTPUTS_FILE).is_file():
            yield RunDir(run).read_outputs()


def group_means(out: Path, setting: Setting, seeds: Sequence[int], method: str, key: str,
                by: str | None = None) -> dict[Any, np.ndarray]:
    """The mean of one test-output array of a method over the samples of every seed, per
    ground-truth group.

    Args:
        out: the study folder.
        setting: the cell.
        seeds: the seeds to pool (those without outputs are skipped).
        method: the method label.
        key: ``power`` (n, K), ``delegation`` (n, K, K), or ``informative`` (n,), read as
            one-hot (n, K): its mean is, per party, the share of samples whose informative
            view is that party's.
        by: ``None`` for ``{"all": mean}``; ``regions`` or ``labels`` for one mean per value
            of that array (samples of all seeds pooled).

    Returns:
        ``{group: mean}`` in group order; empty when no seed has ``key`` (and ``by``).
    """
    sums: dict[Any, np.ndarray] = {}
    counts: dict[Any, int] = {}
    for arrays in _seed_outputs(out, setting, seeds, method):
        if key not in arrays or (by is not None and by not in arrays):
            continue
        values = np.asarray(arrays[key], dtype=np.float64)
        if key == "informative":
            k = np.asarray(arrays["power"]).shape[1]
            values = np.eye(k)[np.asarray(arrays[key], dtype=np.int64)]  # (n, K)
        if by is None:
            groups = {"all": np.ones(values.shape[0], dtype=bool)}
        else:
            labels = np.asarray(arrays[by])
            groups = {_plain(v): labels == v for v in np.unique(labels)}
        for g, mask in groups.items():
            if not mask.any():
                continue
            sums[g] = sums.get(g, 0.0) + values[mask].sum(axis=0)
            counts[g] = counts.get(g, 0) + int(mask.sum())
    return {g: sums[g] / counts[g] for g in sorted(sums, key=_sort_key)}


def mean_delegation(out: Path, setting: Setting, seeds: Sequence[int], method: str,
                    by: str | None = None) -> dict[Any, np.ndarray]:
    """The mean delegation matrix (K, K) of a method's test outputs over every seed.

    ``by=None`` gives ``{"all": matrix}``; ``by="regions"`` or ``"labels"`` one matrix per
    value of that array (samples of all seeds pooled). Seeds without outputs are skipped;
    an empty dict when none has any.
    """
    return group_means(out, setting, seeds, method, "delegation", by)


def ground_truth_split(out: Path, setting: Setting, seeds: Sequence[int], method: str
                       ) -> tuple[str, str] | None:
    """What to split a method's samples by: ``("regions", "region")`` where its outputs hold
    2..:data:`MAX_SPLIT_PANELS` regions, else ``("labels", "class")`` for as many classes;
    ``None`` otherwise (regression without regions, or no outputs)."""
    for key, name in GROUPS:
        values: set[Any] = set()
        for arrays in _seed_outputs(out, setting, seeds, method):
            if key in arrays:
                values.update(_plain(v) for v in np.unique(arrays[key]))
            if len(values) > MAX_SPLIT_PANELS:
                break
        if 1 < len(values) <= MAX_SPLIT_PANELS:
            return key, name
    return None


def routed_methods(study: Study) -> list[str]:
    """The methods of a routing figure: every Liquid Ensemble variant, then ``moe``."""
    return [m for m in study.methods if parse_method(m).name in (LIQUID, *ROUTED)]


def routing_data(study: Study, out: Path, setting: Setting
                 ) -> tuple[str, dict[str, dict[Any, np.ndarray]], dict[Any, np.ndarray]] | None:
    """The numbers of ``routing_<cell>.png``.

    Returns:
        ``(group name, {method: {group: mean power share (K,)}}, {group: informative share
        (K,)})``: the mean of ``p_j / K`` per party over the group's test samples (all seeds
        pooled; ``moe``: its gate), and per party the share of the group's samples whose
        informative view is its (empty without that ground truth). ``None`` when no routed
        method has outputs or the samples cannot be split by region or class.
    """
    methods = routed_methods(study)
    split = next((g for g in (ground_truth_split(out, setting, study.seeds, m)
                              for m in methods) if g is not None), None)
    if split is None:
        return None
    by, name = split
    shares: dict[str, dict[Any, np.ndarray]] = {}
    informative: dict[Any, np.ndarray] = {}
    for method in methods:
        power = group_means(out, setting, study.seeds, method, "power", by)
        if not power:
            continue
        shares[method] = {g: v / v.shape[0] for g, v in power.items()}
        if not informative:
            informative = group_means(out, setting, study.seeds, method, "informative", by)
    return (name, shares, informative) if shares else None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def mean_power(out: Path, setting: Setting, seeds: Sequence[int], method: str
               ) -> np.ndarray | None:
    """Mean voting power per party (sums to K) over the test samples of every seed."""
    total, n = None, 0
    for arrays in _seed_outputs(out, setting, seeds, method):
        power = np.asarray(arrays["power"], dtype=np.float64)
        total = power.sum(axis=0) if total is None else total + power.sum(axis=0)
        n += power.shape[0]
    return None if total is None else total / n


def observability_points(rows: Sequence[dict[str, Any]], method: str
                         ) -> dict[str, np.ndarray]:
    """Per (setting, seed, party) of ``method``: power share, probe score, importance share."""
    power, probe, importance = [], [], []
    for r in rows:
        if r["method"] != method:
            continue
        j = 0
        while f"power_{j}" in r:
            if r.get(f"power_{j}") is not None:
                power.append(r[f"power_{j}"])
                probe.append(_nan(r.get(f"probe_{j}")))
                importance.append(_nan(r.get(f"importance_{j}")))
            j += 1
    return {"power": np.array(power, dtype=np.float64), "probe": np.array(probe),
            "importance": np.array(importance, dtype=np.float64)}


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the pairs where both are finite (NaN if under 3 or constant)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return math.nan
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def forest_data(study: Study, rows: Sequence[dict[str, Any]]
                ) -> dict[str, dict[tuple[str, str], Any]]:
    """Per setting id: ``(Liquid Ensemble variant, baseline) -> Interval`` of the paired
    difference of the primary metric (variant minus baseline), as the report computes it;
    settings without rows are left out."""
    liquids = [m for m in study.methods if parse_method(m).name == LIQUID]
    others = [m for m in study.methods if parse_method(m).name != LIQUID]
    data: dict[str, dict[tuple[str, str], Any]] = {}
    for setting in study.scored_settings():
        if not any(r["cell"] == setting.id for r in rows):
            continue
        data[setting.id] = {(le, b): paired_difference(rows, setting.id, le, b)
                            for le in liquids for b in others}
    return data


def _view_values(rows: Sequence[dict[str, Any]], method: str, key: str
                 ) -> dict[Any, list[list[float]]]:
    """Per cell: one list of the K views' ``key_<j>`` per seed (seeds lacking one left out)."""
    by_cell: dict[Any, list[list[float]]] = {}
    for r in rows:
        if r["method"] != method:
            continue
        values = []
        j = 0
        while f"{key}_{j}" in r:
            values.append(_nan(r.get(f"{key}_{j}")))
            j += 1
        if len(values) >= 2 and all(math.isfinite(v) for v in values):
            by_cell.setdefault(r["cell"], []).append(values)
    return by_cell


def view_spread(rows: Sequence[dict[str, Any]], method: str, key: str = "probe"
                ) -> dict[Any, float]:
    """Per cell: the span (max - min) of the views' ``key`` within a seed, averaged over the
    seeds (each seed re-draws the views, so the spread is taken before averaging)."""
    return {cell: float(np.mean([max(v) - min(v) for v in blocks]))
            for cell, blocks in _view_values(rows, method, key).items()}


def view_effect(rows: Sequence[dict[str, Any]], method: str, key: str = "probe"
                ) -> dict[Any, float]:
    """Per cell with two seeds or more: the p-value of a view effect on ``key`` consistent
    across seeds, a two-way ANOVA without interaction (randomised blocks: each seed a block
    of K views), so that what varies from seed to seed is not taken for a difference between
    views (settings are not pooled: settings of one seed share their data)."""
    return {cell: _block_anova(np.array(blocks, dtype=np.float64))
            for cell, blocks in _view_values(rows, method, key).items()
            if len(blocks) >= 2 and len({len(v) for v in blocks}) == 1}


def observability_varies(rows: Sequence[dict[str, Any]], method: str) -> list[Any]:
    """The cells whose observability varies by view: the views' linear-probe scores span at
    least :data:`OBSERVABILITY_MIN_SPREAD` within a seed (on average over seeds: the views
    differ, as with uneven importance splits redrawn per seed), or differ consistently
    across seeds (:func:`view_effect` on the probe score or the importance share below
    :data:`OBSERVABILITY_ALPHA`, Bonferroni over cells and the two measures). In cell order.
    """
    spread = view_spread(rows, method, "probe")
    effects = [view_effect(rows, method, key) for key in ("probe", "importance")]
    tests = sum(len(e) for e in effects)
    cells = list(dict.fromkeys(r["cell"] for r in rows if r["method"] == method))
    return [c for c in cells
            if spread.get(c, 0.0) >= OBSERVABILITY_MIN_SPREAD
            or any(c in e and e[c] * tests < OBSERVABILITY_ALPHA for e in effects)]


def _block_anova(y: np.ndarray) -> float:
    """p-value of the column (view) effect of ``y`` (blocks, K), blocks as rows."""
    n_b, k = y.shape
    grand = y.mean()
    ss_view = n_b * float(((y.mean(axis=0) - grand) ** 2).sum())
    resid = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + grand
    ss_err = float((resid ** 2).sum())
    if ss_err <= 1e-12 * max(ss_view, 1e-300):  # no noise at all: any difference is real
        return 0.0 if ss_view > 0 else 1.0
    from scipy.stats import f

    df_view, df_err = k - 1, (n_b - 1) * (k - 1)
    return float(f.sf((ss_view / df_view) / (ss_err / df_err), df_view, df_err))


def region_observability_points(study: Study, out: Path, method: str
                                ) -> dict[str, np.ndarray]:
    """Per setting x seed x region x party of ``method``: the share of the region's test
    samples whose informative view is the party's (``informative``), the party's mean power
    share there (``power``), and the setting's index (``setting``). Empty arrays without the
    ground truth."""
    inf, power, where = [], [], []
    for i, setting in enumerate(study.settings):
        for seed in study.seeds:
            for arrays in _seed_outputs(out, setting, [seed], method):
                if not {"informative", "regions", "power"} <= set(arrays):
                    continue
                p = np.asarray(arrays["power"], dtype=np.float64)
                onehot = np.eye(p.shape[1])[np.asarray(arrays["informative"], dtype=np.int64)]
                regions = np.asarray(arrays["regions"])
                for g in np.unique(regions):
                    mask = regions == g
                    inf.extend(onehot[mask].mean(axis=0))
                    power.extend(p[mask].mean(axis=0) / p.shape[1])
                    where.extend([i] * p.shape[1])
    return {"informative": np.array(inf, dtype=np.float64),
            "power": np.array(power, dtype=np.float64), "setting": np.array(where, dtype=int)}


def tau_data(study: Study, rows: Sequence[dict[str, Any]], method: str
             ) -> dict[str, dict[str, Any]]:
    """Per setting id and confidence measure: the interval of Kendall's τ over seeds."""
    return {s.id: {c: interval([r.get(f"tau_{c}") for r in rows
                                if r["cell"] == s.id and r["method"] == method])
                   for c in CONFIDENCES}
            for s in study.scored_settings()}


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _metric_name(rows: Sequence[dict[str, Any]]) -> str:
    return next((r["metric"] for r in rows if r.get("metric")), "score")


def knob_figure(study: Study, rows: Sequence[dict[str, Any]], knob: str) -> Any | None:
    panels = knob_data(study, rows, knob)
    if not panels:
        return None
    n = len(panels)
    cols = min(n, 3)
    fig = new_figure(4.6 * cols + 1.8, 3.6 * math.ceil(n / cols))
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    colors = _colors(study.methods)
    for ax, (key, lines) in zip(axes, panels.items(), strict=False):
        for method, points in lines.items():
            xs = np.arange(len(points))
            mean = np.array([p[1].mean for p in points])
            half = np.array([p[1].half for p in points])
            if not np.isfinite(mean).any():
                continue
            ax.plot(xs, mean, marker="o", label=display_name(method), color=colors[method])
            band = np.isfinite(half)
            if band.any():
                ax.fill_between(xs[band], (mean - half)[band], (mean + half)[band],
                                color=colors[method], alpha=0.15, linewidth=0)
            ax.set_xticks(xs, [str(p[0]) for p in points])
        ax.set_xlabel(knob)
        ax.set_ylabel(_metric_name(rows))
        shown = study.scored_settings()[0].show  # the study's `show` (and test_missing)
        ax.set_title(", ".join(f"{k}={v}" for k, v in key if shown is None or k in shown)
                     or "all settings", fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    fig.suptitle(f"{study.name}: {_metric_name(rows)} vs {knob} (mean, 95 % band over seeds)")
    return fig


def missing_figure(study: Study, rows: Sequence[dict[str, Any]]) -> Any | None:
    """The metric against the test missing rate per method (mean, 95 % band over seeds): one
    panel per training setting, laid out as a grid of the training missing rate (columns,
    where the study varies ``train_missing``) by the other settings (rows); None without
    ``test_missing``."""
    if not study.test_missing:
        return None
    panels = knob_data(study, rows, TEST_MISSING)
    if not panels:
        return None
    train_key = next((k for k in study.swept if k in ("train_missing",
                                                      ALIASES["train_missing"])), None)

    def split(key: tuple[tuple[str, Any], ...]) -> tuple[tuple[tuple[str, Any], ...], Any]:
        rest = tuple((k, v) for k, v in key if k != train_key)
        return rest, dict(key).get(train_key)

    row_keys = list(dict.fromkeys(split(k)[0] for k in panels))
    col_keys = _ordered([split(k)[1] for k in panels])
    n_rows, n_cols = len(row_keys), len(col_keys)
    fig = new_figure(3.4 * n_cols + 2.2, 2.9 * n_rows + 0.8)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharex=True)
    colors = _colors(study.methods)
    metric = _metric_name(rows)
    for key, lines in panels.items():
        rest, col = split(key)
        ax = axes[row_keys.index(rest), col_keys.index(col)]
        for method, points in lines.items():
            xs = np.array([float(p[0]) for p in points])
            mean = np.array([p[1].mean for p in points])
            half = np.array([p[1].half for p in points])
            if not np.isfinite(mean).any():
                continue
            le = parse_method(method).name == LIQUID  # drawn thick, on top, with its band
            ax.plot(xs, mean, marker="o", markersize=3, label=display_name(method),
                    color=colors[method], linewidth=2.4 if le else 1.2, zorder=3 if le else 2)
            band = np.isfinite(half)
            if band.any():
                ax.fill_between(xs[band], (mean - half)[band], (mean + half)[band],
                                color=colors[method], alpha=0.15 if le else 0.05, linewidth=0)
        # the first other setting names the row (the data set of a paired axis)
        title = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in rest[:1])
        if train_key is not None:
            title += ("; " if title else "") + f"train missing {col}"
        ax.set_title(title, fontsize="small")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("test missing rate", fontsize="small")
    for ax in axes[:, 0]:
        ax.set_ylabel(metric, fontsize="small")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    fig.suptitle(f"{study.name}: test {metric} against the test missing rate (mean, 95 % "
                 "band over seeds)", fontsize="medium")
    return fig


def settings_figure(study: Study, rows: Sequence[dict[str, Any]]) -> Any:
    """The metric per setting (x) and method (offset points with 95 % intervals; the axis
    spans the data, not zero, so small differences stay visible)."""
    n_set, methods = len(study.scored_settings()), study.methods
    fig = new_figure(max(6.0, 1.6 * n_set + 3.5), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    colors = _colors(methods)
    for m, method in enumerate(methods):
        stats = [interval([r.get("score") for r in rows
                           if r["cell"] == s.id and r["method"] == method])
                 for s in study.scored_settings()]
        xs = np.arange(n_set) + (m - (len(methods) - 1) / 2) * width
        mean = np.array([s.mean for s in stats])
        half = np.nan_to_num(np.array([s.half for s in stats]))
        ax.errorbar(xs, mean, yerr=half, fmt="o", markersize=4, capsize=2,
                    label=display_name(method), color=colors[method])
    for x in np.arange(n_set - 1) + 0.5:
        ax.axvline(x, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_xticks(np.arange(n_set), [_tick(s) for s in study.scored_settings()],
                  fontsize="x-small")
    ax.set_ylabel(_metric_name(rows))
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize="x-small", loc="outside right upper")
    ax.set_title(f"{study.name}: {_metric_name(rows)} per setting (mean, 95 % interval)",
                 fontsize="medium")
    return fig


def _tick(setting: Setting) -> str:
    """A setting's axis label: its id, then ``key=value`` per line with the key's last part."""
    return "\n".join([setting.id, *(f"{k.rsplit('.', 1)[-1]}={_short(v)}"
                                     for k, v in setting.values.items())])


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(methods) <= 10 else colormaps["tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _matrix(ax: Any, m: np.ndarray, title: str) -> Any:
    k = m.shape[0]
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("to party", fontsize="small")
    ax.set_ylabel("from party", fontsize="small")
    ax.set_title(title, fontsize="small")
    if k <= ANNOTATE_MAX_K:
        size = "small" if k <= 6 else "x-small"
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=size,
                        color="black" if m[i, j] > 0.6 else "white")
    return im


def delegation_figure(study: Study, out: Path, setting: Setting, method: str) -> Any | None:
    """Mean delegation of a setting per ground-truth region, else per class; ``None`` (with a
    log line) where the samples cannot be split (the mean over all samples is not drawn)."""
    split = ground_truth_split(out, setting, study.seeds, method)
    if split is None:
        if group_means(out, setting, study.seeds, method, "delegation"):
            log.info("delegation_%s (%s): no regions or classes to split by; not drawn",
                     setting.id, method)
        return None
    by, name = split
    groups = mean_delegation(out, setting, study.seeds, method, by=by)
    panels = [(f"{name} {g}", m) for g, m in groups.items()]
    cols = min(len(panels), 5)
    rows_n = math.ceil(len(panels) / cols)
    fig = new_figure(2.6 * cols + 1.0, 2.7 * rows_n + 0.6)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    im = None
    for ax, (title, m) in zip(axes, panels, strict=False):
        im = _matrix(ax, m, title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8, label="share of the row's vote")
    fig.suptitle(f"{display_name(method)}, {setting.label()}: mean delegation per {name} "
                 f"over {len(study.seeds)} seed(s)", fontsize="medium")
    return fig


def graph_figure(study: Study, out: Path, setting: Setting, method: str) -> Any | None:
    """Who delegates to whom, one panel per ground-truth region (else class): parties on a
    circle, each node sized by its mean power in the group and labelled inside; arrows
    i -> j by the share of i's vote delegated to j. ``None`` where the samples cannot be
    split (the graph over all samples is the same symmetric graph in every setting)."""
    split = ground_truth_split(out, setting, study.seeds, method)
    if split is None:
        return None
    by, name = split
    delegation = mean_delegation(out, setting, study.seeds, method, by=by)
    power = group_means(out, setting, study.seeds, method, "power", by)
    groups = [g for g in delegation if g in power]
    if not groups:
        return None
    cols = min(len(groups), 5)
    rows_n = math.ceil(len(groups) / cols)
    fig = new_figure(3.3 * cols, 3.5 * rows_n + 0.7)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, g in zip(axes, groups, strict=False):
        _graph(ax, delegation[g], power[g], f"{name} {g}")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    k = delegation[groups[0]].shape[0]
    fig.suptitle(f"{display_name(method)}, {setting.label()}: who delegates to whom per {name}"
                 f"\n(arrow: share of the vote >= {GRAPH_MIN_SHARE:.0%}; node: party, p = mean "
                 f"power, sums to {k})", fontsize="medium")
    return fig


def _graph(ax: Any, d: np.ndarray, power: np.ndarray, title: str) -> None:
    """One delegation graph: nodes on a circle, radius by power, labels inside."""
    from matplotlib.patches import FancyArrowPatch

    k = d.shape[0]
    angle = np.pi / 2 - 2 * np.pi * np.arange(k) / k
    pos = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    # big enough for the two lines of text inside; area grows with the power share
    radius = 0.2 + 0.16 * np.sqrt(power / k)
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    for i in range(k):
        for j in range(k):
            if i == j or d[i, j] < GRAPH_MIN_SHARE:
                continue
            start = pos[i] + radius[i] * (pos[j] - pos[i]) / np.linalg.norm(pos[j] - pos[i])
            end = pos[j] + radius[j] * (pos[i] - pos[j]) / np.linalg.norm(pos[j] - pos[i])
            ax.add_patch(FancyArrowPatch(
                start, end, arrowstyle="-|>", mutation_scale=8 + 8 * d[i, j],
                linewidth=0.5 + 4 * d[i, j], color="tab:blue", alpha=0.35 + 0.6 * d[i, j],
                connectionstyle="arc3,rad=0.15", shrinkA=0, shrinkB=0, zorder=2))
    for i in range(k):
        ax.add_patch(_circle(pos[i], radius[i]))
        ax.text(pos[i, 0], pos[i, 1], f"P{i}\np={power[i]:.2f}", ha="center", va="center",
                fontsize="x-small", zorder=4)
    ax.set_title(title, fontsize="small")


def _circle(center: np.ndarray, radius: float) -> Any:
    from matplotlib.patches import Circle

    return Circle(tuple(center), radius, facecolor="moccasin", edgecolor="black",
                  zorder=3)


def observability_figure(study: Study, out: Path, rows: Sequence[dict[str, Any]],
                         method: str) -> Any | None:
    """Power share against observability where it varies: by view (probe score, importance
    share; the settings of :func:`observability_varies`) and per region (ground truth).
    ``None``, with a log line, when neither varies."""
    cells = observability_varies(rows, method)
    spread = view_spread(rows, method)
    if cells:
        pts = observability_points([r for r in rows if r["cell"] in cells], method)
    else:
        pts = {"power": np.array([])}
        log.info("power_vs_observability (%s): the views' observability does not vary by view "
                 "in any setting (probe spans %s < %.2f, no consistent view effect); not "
                 "drawn by view", method, ", ".join(f"{c}: {v:.2f}" for c, v in spread.items()),
                 OBSERVABILITY_MIN_SPREAD)
    panels: list[tuple[np.ndarray, np.ndarray, str]] = []
    if pts["power"].size:
        where = "all settings" if len(cells) == len(spread) else "settings " + ", ".join(
            map(str, cells))
        for key, label in (("probe", "linear-probe score of the view"),
                           ("importance", "importance share of the view")):
            panels.append((pts[key], pts["power"], f"{label}\n(one point per seed x party; "
                                                   f"{where})"))
    region = region_observability_points(study, out, method)
    if not panels and not region["power"].size:
        log.info("power_vs_observability (%s): observability varies neither by view nor by "
                 "region; not drawn", method)
        return None
    n = len(panels) + bool(region["power"].size)
    wide = 1.2 * len(study.settings) + 2.5 if region["power"].size else 0.0
    fig = new_figure(5.0 * len(panels) + max(wide, 5.0 if region["power"].size else 0.0), 4.6)
    axes = fig.subplots(1, n, squeeze=False, width_ratios=[5.0] * len(panels) + (
        [max(wide, 5.0)] if region["power"].size else [])).ravel()
    for ax, (x, y, label) in zip(axes, panels, strict=False):
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=14, alpha=0.5)
        r = correlation(x, y)
        ax.set_xlabel(label, fontsize="small")
        ax.set_ylabel("power share of the party (p / K)")
        ax.set_title(f"by view: Pearson r = {r:.2f}" if math.isfinite(r) else "r undefined",
                     fontsize="small")
        ax.grid(alpha=0.3)
    if region["power"].size:
        _region_panel(axes[-1], study, region)
    fig.suptitle(f"{display_name(method)}: power vs observability", fontsize="medium")
    return fig


def _region_panel(ax: Any, study: Study, pts: dict[str, np.ndarray]) -> None:
    """Per setting: the power share of each region's informative party (red) and of the other
    parties (grey), one point per seed x region x party; the equal share 1/K dashed."""
    rng = np.random.default_rng(0)  # jitter only spreads the points; the data are exact
    informative = pts["informative"] >= 0.5
    for mask, color, label, dx in ((informative, "tab:red", "informative party", 0.15),
                                   (~informative, "grey", "other parties", -0.15)):
        x = pts["setting"][mask] + dx + rng.uniform(-0.08, 0.08, int(mask.sum()))
        ax.scatter(x, pts["power"][mask], s=12, alpha=0.5, color=color, label=label)
    k = study.config(study.settings[0], study.seeds[0]).n_clients
    ax.axhline(1 / k, color="black", linestyle="--", linewidth=0.8, label=f"equal share 1/{k}")
    ax.set_xticks(range(len(study.settings)), [_tick(s) for s in study.settings],
                  fontsize="x-small")
    ax.set_ylabel("power share in the region (p / K)")
    ax.set_ylim(-0.02, 1.02)
    r = correlation(pts["informative"], pts["power"])
    ax.set_title("per region: share of the region's samples whose view is informative vs power"
                 + (f" (Pearson r = {r:.2f})" if math.isfinite(r) else ""), fontsize="small")
    ax.legend(fontsize="x-small", loc="best")
    ax.grid(axis="y", alpha=0.3)


def routing_figure(study: Study, out: Path, setting: Setting) -> Any | None:
    """Mean power share per party and ground-truth group, one panel per routed method; the
    informative party of each group (ground truth, where known) outlined in red."""
    data = routing_data(study, out, setting)
    if data is None:
        return None
    name, shares, informative = data
    methods = list(shares)
    groups = list(next(iter(shares.values())))
    k = next(iter(next(iter(shares.values())).values())).shape[0]
    fig = new_figure(max(7.0, 1.0 + (0.55 * k + 1.3) * len(methods)), 1.8 + 0.38 * len(groups))
    axes = fig.subplots(1, len(methods), squeeze=False).ravel()
    im = None
    for ax, method in zip(axes, methods, strict=True):
        m = np.array([shares[method].get(g, np.full(k, np.nan)) for g in groups])  # (G, K)
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(k), [f"P{j}" for j in range(k)], fontsize="small")
        ax.set_yticks(range(len(groups)), [str(g) for g in groups], fontsize="small")
        ax.set_xlabel("party", fontsize="small")
        ax.set_ylabel(name, fontsize="small")
        title = display_name(method)
        ax.set_title(title if parse_method(method).name == LIQUID else f"{title} (gate)",
                     fontsize="small")
        if k <= ANNOTATE_MAX_K:
            for gi in range(len(groups)):
                for j in range(k):
                    ax.text(j, gi, f"{m[gi, j]:.2f}", ha="center", va="center",
                            fontsize="x-small", color="black" if m[gi, j] > 0.6 else "white")
        for gi, g in enumerate(groups):
            share = informative.get(g)
            if share is not None and share.max() >= 0.5:
                _outline(ax, int(share.argmax()), gi)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.9, label="mean power share p / K")
    note = "; red: the informative party" if informative else ""
    fig.suptitle(f"{setting.id}: {setting.label()}\nmean power share per {name} over "
                 f"{len(study.seeds)} seed(s){note}", fontsize="medium")
    return fig


def _outline(ax: Any, x: int, y: int) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red",
                           linewidth=2.0))


def forest_figure(study: Study, rows: Sequence[dict[str, Any]]) -> Any | None:
    """Paired differences, Liquid Ensemble minus each baseline, one panel per setting: the
    mean and its 95 % interval over seeds (a point alone with one seed)."""
    data = forest_data(study, rows)
    liquids = [m for m in study.methods if parse_method(m).name == LIQUID]
    others = [m for m in study.methods if parse_method(m).name != LIQUID]
    if not data or not liquids or not others:
        return None
    metric = _metric_name(rows)
    settings = [s for s in study.scored_settings() if s.id in data]
    cols = min(len(settings), 3)
    rows_n = math.ceil(len(settings) / cols)
    fig = new_figure(4.2 * cols + 3.0, (0.32 * len(others) * max(1, len(liquids)) ** 0.5 + 1.3)
                     * rows_n + 0.6)
    axes = fig.subplots(rows_n, cols, squeeze=False, sharey=True).ravel()
    colors = _colors(liquids)
    step = 0.7 / len(liquids)
    for ax, setting in zip(axes, settings, strict=False):
        for li, le in enumerate(liquids):
            ys = np.arange(len(others)) + (li - (len(liquids) - 1) / 2) * step
            diffs = [data[setting.id][(le, b)] for b in others]
            mean = np.array([d.mean for d in diffs])
            half = np.nan_to_num(np.array([d.half for d in diffs]))
            ax.errorbar(mean, ys, xerr=half, fmt="o", markersize=4, capsize=2,
                        color=colors[le], label=display_name(le))
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_yticks(np.arange(len(others)), [display_name(b) for b in others],
                      fontsize="small")
        ax.set_title(f"{setting.id}: {setting.label()}", fontsize="small", wrap=True)
        ax.set_xlabel(f"LE minus baseline ({metric})", fontsize="small")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # shared: the first baseline on top in every panel
    for ax in axes[len(settings):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper",
               fontsize="small", title="Liquid Ensemble", title_fontsize="small")
    better = "right" if metric == "accuracy" else "left"
    fig.suptitle(f"{study.name}: paired differences per setting (mean, 95 % interval over "
                 f"seeds; {better} of 0: the Liquid Ensemble is better)", fontsize="medium")
    return fig


def tau_figure(study: Study, rows: Sequence[dict[str, Any]], method: str) -> Any | None:
    data = tau_data(study, rows, method)
    if not any(math.isfinite(v.mean) for per in data.values() for v in per.values()):
        return None
    n_set = len(study.scored_settings())
    fig = new_figure(max(6.0, 1.1 * n_set + 3.0), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(CONFIDENCES)
    for c, name in enumerate(CONFIDENCES):
        mean = np.array([data[s.id][name].mean for s in study.scored_settings()])
        half = np.nan_to_num(np.array([data[s.id][name].half for s in study.scored_settings()]))
        xs = np.arange(n_set) + (c - (len(CONFIDENCES) - 1) / 2) * width
        ax.bar(xs, mean, width=width, yerr=half, capsize=2, label=name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(np.arange(n_set), [_tick(s) for s in study.scored_settings()],
                  fontsize="x-small")
    ax.set_ylabel("Kendall τ (positive: confident and correct)")
    ax.legend(fontsize="x-small", title="confidence", title_fontsize="x-small")
    ax.set_title(f"{display_name(method)}: confidence vs error per setting (mean, 95 % "
                 "interval)",
                 fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------
# The study's figures
# --------------------------------------------------------------------------------------------


def plot_study(study: Study, out: Path, rows: Sequence[dict[str, Any]] | None = None
               ) -> list[Path]:
    """Every figure of a study folder (from its ``results.csv`` unless ``rows`` is given);
    returns the files written."""
    out = Path(out)
    rows = read_results(out) if rows is None else rows
    folder = out / FIGURES_DIR
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        if fig is not None:
            written.append(save_figure(fig, folder / name))

    save(missing_figure(study, rows), f"metric_vs_{TEST_MISSING}.png")
    knob_figures = [(knob, knob_figure(study, rows, knob)) for knob in study.swept
                    if knob != TEST_MISSING]
    for knob, fig in knob_figures:
        save(fig, f"metric_vs_{_safe(knob)}.png")
    if len(study.settings) > 1 and not any(fig is not None for _, fig in knob_figures):
        save(settings_figure(study, rows), "metric_by_setting.png")
    save(forest_figure(study, rows), "paired_differences.png")
    for setting in study.settings:
        save(routing_figure(study, out, setting), f"routing_{setting.id}.png")
    liquids = [m for m in study.methods if parse_method(m).name == LIQUID]
    for method in liquids:
        tag = "" if len(liquids) == 1 else f"_{_safe(method_slug(method))}"
        for setting in study.settings:
            save(delegation_figure(study, out, setting, method),
                 f"delegation_{setting.id}{tag}.png")
            save(graph_figure(study, out, setting, method), f"graph_{setting.id}{tag}.png")
        save(observability_figure(study, out, rows, method), f"power_vs_observability{tag}.png")
        save(tau_figure(study, rows, method), f"confidence_tau{tag}.png")
    log.info("%d figure(s) in %s", len(written), folder)
    return written


__all__ = ["FIGURES_DIR", "correlation", "delegation_figure", "forest_data", "forest_figure",
           "graph_figure", "ground_truth_split", "group_means", "knob_data", "knob_figure",
           "missing_figure",
           "mean_delegation", "mean_power", "observability_figure", "observability_points",
           "observability_varies", "plot_study", "region_observability_points",
           "view_effect", "view_spread",
           "routed_methods", "routing_data", "routing_figure", "settings_figure", "tau_data",
           "tau_figure"]
