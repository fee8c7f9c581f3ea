"""Figures of a study (PNG, each written whole, into ``<study>/figures/``).

:func:`plot_study` draws, from ``results.csv`` and the Liquid Ensemble's run folders:

- ``metric_vs_<knob>.png``: the primary metric against each swept knob, one line per method
  with its 95 % band over seeds; one panel per value of the other knobs. Studies whose knobs
  move together (``paired``, ``random``) get ``metric_by_setting.png`` instead.
- ``delegation_<cell>.png``: the mean delegation matrix of each setting (over seeds and test
  samples), then split by ground-truth region (synthetic data) or by class.
- ``graph_<cell>.png``: who delegates to whom: one node per party sized by its mean power, an
  arrow ``i -> j`` as wide as the share of ``i``'s vote it hands to ``j``.
- ``power_vs_observability.png``: each party's power share against its view's linear-probe
  score and importance share, one point per setting x seed x party.
- ``confidence_tau.png``: Kendall's τ of each confidence measure against correctness, per
  setting (mean and 95 % interval over seeds).

The ``*_data`` functions return the numbers a figure shows (for tests and tables).
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
from liquid_fed.report import interval
from liquid_fed.rundir import OUTPUTS_FILE, RunDir
from liquid_fed.study import (
    LIQUID,
    Setting,
    Study,
    _short,
    cell_dir,
    method_slug,
    read_results,
)

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
MAX_SPLIT_PANELS = 10  # a delegation figure splits by at most this many regions / classes
GRAPH_MIN_SHARE = 0.05  # arrows for smaller shares of a vote are not drawn


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
    for s in study.settings:
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


def mean_delegation(out: Path, setting: Setting, seeds: Sequence[int], method: str,
                    by: str | None = None) -> dict[Any, np.ndarray]:
    """The mean delegation matrix (K, K) of a method's test outputs over every seed.

    ``by=None`` gives ``{"all": matrix}``; ``by="regions"`` or ``"labels"`` one matrix per
    value of that array (samples of all seeds pooled). Seeds without outputs are skipped;
    an empty dict when none has any.
    """
    sums: dict[Any, np.ndarray] = {}
    counts: dict[Any, int] = {}
    for arrays in _seed_outputs(out, setting, seeds, method):
        if "delegation" not in arrays:
            continue
        d = np.asarray(arrays["delegation"], dtype=np.float64)
        if by is None:
            groups = {"all": np.ones(d.shape[0], dtype=bool)}
        elif by in arrays:
            labels = np.asarray(arrays[by])
            groups = {_plain(v): labels == v for v in np.unique(labels)}
        else:
            continue
        for g, mask in groups.items():
            if not mask.any():
                continue
            sums[g] = sums.get(g, 0.0) + d[mask].sum(axis=0)
            counts[g] = counts.get(g, 0) + int(mask.sum())
    return {g: sums[g] / counts[g] for g in sorted(sums, key=_sort_key)}


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


def tau_data(study: Study, rows: Sequence[dict[str, Any]], method: str
             ) -> dict[str, dict[str, Any]]:
    """Per setting id and confidence measure: the interval of Kendall's τ over seeds."""
    return {s.id: {c: interval([r.get(f"tau_{c}") for r in rows
                                if r["cell"] == s.id and r["method"] == method])
                   for c in CONFIDENCES}
            for s in study.settings}


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
            ax.plot(xs, mean, marker="o", label=method, color=colors[method])
            band = np.isfinite(half)
            if band.any():
                ax.fill_between(xs[band], (mean - half)[band], (mean + half)[band],
                                color=colors[method], alpha=0.15, linewidth=0)
            ax.set_xticks(xs, [str(p[0]) for p in points])
        ax.set_xlabel(knob)
        ax.set_ylabel(_metric_name(rows))
        ax.set_title(", ".join(f"{k}={v}" for k, v in key) or "all settings", fontsize="small")
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    fig.suptitle(f"{study.name}: {_metric_name(rows)} vs {knob} (mean, 95 % band over seeds)")
    return fig


def settings_figure(study: Study, rows: Sequence[dict[str, Any]]) -> Any:
    """The metric per setting (x) and method (offset points with 95 % intervals; the axis
    spans the data, not zero, so small differences stay visible)."""
    n_set, methods = len(study.settings), study.methods
    fig = new_figure(max(6.0, 1.6 * n_set + 3.5), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    colors = _colors(methods)
    for m, method in enumerate(methods):
        stats = [interval([r.get("score") for r in rows
                           if r["cell"] == s.id and r["method"] == method])
                 for s in study.settings]
        xs = np.arange(n_set) + (m - (len(methods) - 1) / 2) * width
        mean = np.array([s.mean for s in stats])
        half = np.nan_to_num(np.array([s.half for s in stats]))
        ax.errorbar(xs, mean, yerr=half, fmt="o", markersize=4, capsize=2, label=method,
                    color=colors[method])
    for x in np.arange(n_set - 1) + 0.5:
        ax.axvline(x, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_xticks(np.arange(n_set), [_tick(s) for s in study.settings],
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
    """Mean delegation of a setting, then per ground-truth region, else per class."""
    overall = mean_delegation(out, setting, study.seeds, method)
    if not overall:
        return None
    split, by = {}, ""
    for key, name in (("regions", "region"), ("labels", "class")):
        split = mean_delegation(out, setting, study.seeds, method, by=key)
        if 1 < len(split) <= MAX_SPLIT_PANELS:
            by = name
            break
        split = {}
    panels = [("all test samples", overall["all"])] + [(f"{by} {g}", m)
                                                        for g, m in split.items()]
    cols = min(len(panels), 6)
    rows_n = math.ceil(len(panels) / cols)
    fig = new_figure(2.6 * cols + 1.0, 2.7 * rows_n + 0.6)
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    im = None
    for ax, (title, m) in zip(axes, panels, strict=False):
        im = _matrix(ax, m, title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8, label="share of the row's vote")
    fig.suptitle(f"{method}, {setting.label()}: mean delegation over {len(study.seeds)} seed(s)",
                 fontsize="medium")
    return fig


def graph_figure(study: Study, out: Path, setting: Setting, method: str) -> Any | None:
    """Who delegates to whom: parties on a circle, arrows i -> j by the share delegated."""
    from matplotlib.patches import FancyArrowPatch

    d = mean_delegation(out, setting, study.seeds, method).get("all")
    power = mean_power(out, setting, study.seeds, method)
    if d is None or power is None:
        return None
    k = d.shape[0]
    angle = np.pi / 2 - 2 * np.pi * np.arange(k) / k
    pos = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    fig = new_figure(5.4, 5.4)
    ax = fig.add_subplot()
    radius = 0.08 + 0.14 * np.sqrt(power / k)
    for i in range(k):
        for j in range(k):
            if i == j or d[i, j] < GRAPH_MIN_SHARE:
                continue
            ax.add_patch(FancyArrowPatch(
                pos[i], pos[j], arrowstyle="-|>", mutation_scale=12 + 10 * d[i, j],
                linewidth=0.5 + 6 * d[i, j], color="tab:blue", alpha=0.35 + 0.6 * d[i, j],
                connectionstyle="arc3,rad=0.15", shrinkA=72 * radius[i] * 2.2,
                shrinkB=72 * radius[j] * 2.2))
    for i in range(k):
        ax.add_patch(_circle(pos[i], radius[i]))
        ax.text(pos[i, 0], pos[i, 1], f"{i}\np={power[i]:.2f}\nkeeps {d[i, i]:.2f}",
                ha="center", va="center", fontsize="x-small")
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.45, 1.45)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"{method}, {setting.label()}\nwho delegates to whom (arrows: share of the "
                 f"vote >= {GRAPH_MIN_SHARE:.0%}; p: mean power, sums to {k})",
                 fontsize="small")
    return fig


def _circle(center: np.ndarray, radius: float) -> Any:
    from matplotlib.patches import Circle

    return Circle(tuple(center), radius, facecolor="tab:orange", edgecolor="black",
                  alpha=0.8, zorder=3)


def observability_figure(rows: Sequence[dict[str, Any]], method: str) -> Any | None:
    pts = observability_points(rows, method)
    if pts["power"].size == 0:
        return None
    fig = new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "probe", "linear-probe score of the view"),
                           (axes[1], "importance", "importance share of the view")):
        x, y = pts[key], pts["power"]
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=14, alpha=0.6)
        r = correlation(x, y)
        ax.set_xlabel(label)
        ax.set_ylabel("power share of the party")
        ax.set_title(f"Pearson r = {r:.2f}" if math.isfinite(r) else "r undefined",
                     fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{method}: power vs observability (one point per setting x seed x party)",
                 fontsize="medium")
    return fig


def tau_figure(study: Study, rows: Sequence[dict[str, Any]], method: str) -> Any | None:
    data = tau_data(study, rows, method)
    if not any(math.isfinite(v.mean) for per in data.values() for v in per.values()):
        return None
    n_set = len(study.settings)
    fig = new_figure(max(6.0, 1.1 * n_set + 3.0), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(CONFIDENCES)
    for c, name in enumerate(CONFIDENCES):
        mean = np.array([data[s.id][name].mean for s in study.settings])
        half = np.nan_to_num(np.array([data[s.id][name].half for s in study.settings]))
        xs = np.arange(n_set) + (c - (len(CONFIDENCES) - 1) / 2) * width
        ax.bar(xs, mean, width=width, yerr=half, capsize=2, label=name)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(np.arange(n_set), [_tick(s) for s in study.settings],
                  fontsize="x-small")
    ax.set_ylabel("Kendall τ (positive: confident and correct)")
    ax.legend(fontsize="x-small", title="confidence", title_fontsize="x-small")
    ax.set_title(f"{method}: confidence vs error per setting (mean, 95 % interval)",
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

    knob_figures = [(knob, knob_figure(study, rows, knob)) for knob in study.swept]
    for knob, fig in knob_figures:
        save(fig, f"metric_vs_{_safe(knob)}.png")
    if len(study.settings) > 1 and not any(fig is not None for _, fig in knob_figures):
        save(settings_figure(study, rows), "metric_by_setting.png")
    liquids = [m for m in study.methods if m.startswith(LIQUID)]
    for method in liquids:
        tag = "" if len(liquids) == 1 else f"_{_safe(method_slug(method))}"
        for setting in study.settings:
            save(delegation_figure(study, out, setting, method),
                 f"delegation_{setting.id}{tag}.png")
            save(graph_figure(study, out, setting, method), f"graph_{setting.id}{tag}.png")
        save(observability_figure(rows, method), f"power_vs_observability{tag}.png")
        save(tau_figure(study, rows, method), f"confidence_tau{tag}.png")
    log.info("%d figure(s) in %s", len(written), folder)
    return written


__all__ = ["FIGURES_DIR", "correlation", "delegation_figure", "graph_figure", "knob_data",
           "knob_figure", "mean_delegation", "mean_power", "observability_figure",
           "observability_points", "plot_study", "settings_figure", "tau_data", "tau_figure"]
