"""Figures of delegation patterns from a finished run's ``test_outputs.npz``.

Legend of dimension letters: ``n`` test samples, ``K`` experts (one per view).
``delegation[b, i, j]`` is what expert ``i`` (from) hands to expert ``j`` (to) on sample ``b``;
``power[b]`` sums to K.

Every figure is a :class:`matplotlib.figure.Figure` drawn on its own Agg canvas: nothing here
touches pyplot's global state, and every PNG is written to a temporary name in its folder and
renamed into place, so a figure on disk is always whole. The ``*_summary`` and ``*_bins``
functions return the numbers the figures show, for tests and tables.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from liquid_fed.metrics import TASK_METRICS, entropy, primary_metric
from liquid_fed.rundir import OUTPUTS_FILE, RunDir

log = logging.getLogger(__name__)

REQUIRED_ARRAYS = ("power", "delegation", "error")
TIE_TOLERANCE = 1e-5  # relative gap under which two powers count as a tie for the top
ANNOTATE_MAX_K = 10  # cells of larger matrices are too small to carry numbers


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class RunOutputs:
    """What the figures need from one run folder.

    Attributes:
        name: label of the run (the folder's name).
        config: the resolved config (``config.yaml``), empty when the folder has none.
        arrays: the arrays of ``test_outputs.npz`` (``power`` (n, K), ``delegation``
            (n, K, K), ``error`` (n,), ``labels``, ``ids`` and, where the data set has ground
            truth, ``informative`` (n,) and ``regions`` (n,)).
        metrics: the final test metrics (``summary.json``, else the last test row of
            ``metrics.jsonl``; empty when neither has them).
        path: the run folder, when loaded from one.
    """

    name: str
    config: dict[str, Any]
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        check_arrays(self.arrays)

    @property
    def k(self) -> int:
        return int(self.arrays["power"].shape[1])

    @property
    def task(self) -> str:
        """``classification`` (0/1 errors) or ``regression`` (squared errors)."""
        for task in ("classification", "regression"):
            if TASK_METRICS[task] in self.metrics:
                return task
        err = self.arrays["error"]
        return "classification" if np.isin(err, (0.0, 1.0)).all() else "regression"

    @property
    def metric(self) -> tuple[str, float] | None:
        """The headline test metric (``accuracy`` or ``rmse``) and its value, if known."""
        key = primary_metric(self.metrics)
        if self.metrics.get(key) is not None:
            return key, float(self.metrics[key])
        return None

    @property
    def informative(self) -> np.ndarray | None:
        return self.arrays.get("informative")

    @property
    def regions(self) -> np.ndarray | None:
        return self.arrays.get("regions")


def check_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Shapes of the test outputs agree; errors name the array, its shape and what fits."""
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise ValueError(f"test outputs lack {', '.join(missing)} "
                         f"(arrays present: {', '.join(sorted(arrays)) or 'none'})")
    power = np.asarray(arrays["power"])
    if power.ndim != 2 or power.shape[1] < 1:
        raise ValueError(f"power must have shape (n, K), got {power.shape}")
    n, k = power.shape
    if n == 0:
        raise ValueError("test outputs hold no samples (power has shape (0, K))")
    expected = {"delegation": (n, k, k), "error": (n,), "informative": (n,), "regions": (n,)}
    for key, shape in expected.items():
        if key in arrays and np.shape(arrays[key]) != shape:
            raise ValueError(f"{key} must have shape {shape} to match power {power.shape}, "
                             f"got {np.shape(arrays[key])}")
    if "informative" in arrays:
        inf = np.asarray(arrays["informative"])
        if inf.min() < 0 or inf.max() >= k:
            raise ValueError(f"informative must index one of the K={k} experts, got values "
                             f"from {inf.min()} to {inf.max()}")


def load_run(run_dir: str | Path) -> RunOutputs:
    """Read a run folder's test outputs, config and final test metrics.

    Args:
        run_dir: a run folder written by ``liquid-fed run`` (or an in-process
            :class:`liquid_fed.federation.Federation` with a :class:`~liquid_fed.rundir.RunDir`).

    Returns:
        The run's :class:`RunOutputs`, named after the folder.

    Raises:
        FileNotFoundError: the folder does not exist, or holds no ``test_outputs.npz`` (the
            run has not reached its final test evaluation).
        ValueError: the outputs are unreadable or their shapes disagree.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    run = RunDir(run_dir)
    npz = run / OUTPUTS_FILE
    if not npz.is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no {OUTPUTS_FILE}: the server writes it at the final test "
            "evaluation, so run it to the end first (liquid-fed run CONFIG --out "
            f"{run_dir} [--resume])")
    arrays = run.read_outputs()
    try:
        return RunOutputs(run_dir.resolve().name, run.read_config(), arrays,
                          run.final_test_metrics(), run_dir)
    except ValueError as exc:
        raise ValueError(f"{npz}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# The numbers behind the figures
# --------------------------------------------------------------------------------------------


def top_expert(power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The most powerful expert per sample (first on ties, like the server's metric) and
    whether that top is shared with another expert. Both (n,)."""
    power = np.asarray(power, dtype=np.float64)  # (n, K)
    top = power.argmax(-1)
    if power.shape[1] < 2:
        return top, np.zeros(power.shape[0], dtype=bool)
    two = np.sort(power, axis=-1)[:, -2:]  # (n, 2)
    tie = two[:, 1] - two[:, 0] <= TIE_TOLERANCE * np.maximum(np.abs(two[:, 1]), 1.0)
    return top, tie


@dataclass
class DelegationSummary:
    """What the delegation figures show (shapes with K experts)."""

    mean_delegation: np.ndarray | None  # (K, K) rows: from expert, columns: to expert
    mean_power: np.ndarray  # (K,)
    speaker_share: np.ndarray  # (K,) fraction of samples where each is the top (first on ties)
    tie_share: float  # fraction of samples whose top power is shared
    mean_self_delegation: float | None  # mean over samples and experts of d_i[i]
    power_entropy: float  # mean entropy of p / K (nats), as the server's metric
    speaker_entropy: float  # entropy of speaker_share (nats), as the server's metric
    informative_top: np.ndarray | None = None  # (K, K) informative view x top expert, rows sum 1
    informative_top_power: float | None = None  # fraction of samples whose top is informative
    to_informative: float | None = None  # mean share experts hand the sample's informative one


def delegation_summary(delegation: np.ndarray | None, power: np.ndarray,
                       informative: np.ndarray | None = None) -> DelegationSummary:
    """The mean delegation matrix, speaker shares, entropies and, with ground truth, the
    informative view x most powerful expert matrix (row-normalised; rows without samples are
    NaN). Without ``delegation`` its two fields are None."""
    power = np.asarray(power, dtype=np.float64)  # (n, K)
    n, k = power.shape
    top, tie = top_expert(power)
    speakers = np.bincount(top, minlength=k) / max(n, 1)
    mean_del = self_del = None
    if delegation is not None:
        delegation = np.asarray(delegation, dtype=np.float64)  # (n, K, K)
        mean_del = delegation.mean(0)
        self_del = float(np.diagonal(delegation, axis1=1, axis2=2).mean())
    summary = DelegationSummary(
        mean_delegation=mean_del,
        mean_power=power.mean(0),
        speaker_share=speakers,
        tie_share=float(tie.mean()) if n else 0.0,
        mean_self_delegation=self_del,
        power_entropy=float(entropy(power / k).mean()),
        speaker_entropy=float(entropy(speakers)),
    )
    if informative is not None:
        informative = np.asarray(informative, dtype=np.int64)
        counts = np.zeros((k, k))
        np.add.at(counts, (informative, top), 1.0)
        rows = counts.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            summary.informative_top = np.where(rows > 0, counts / rows, np.nan)
        summary.informative_top_power = float(np.mean(top == informative))
        if delegation is not None and n:
            to_inf = delegation[np.arange(n), :, informative]  # (n, K) column of the informative
            summary.to_informative = float(to_inf.mean())
    return summary


def delegation_by_view(delegation: np.ndarray, informative: np.ndarray) -> np.ndarray:
    """Mean delegation matrix over the samples of each informative view, (K, K, K) indexed
    [view, from, to]; NaN for a view that no sample has."""
    delegation = np.asarray(delegation, dtype=np.float64)  # (n, K, K)
    informative = np.asarray(informative, dtype=np.int64)
    k = delegation.shape[1]
    out = np.full((k, k, k), np.nan)
    for v in range(k):
        rows = informative == v
        if rows.any():
            out[v] = delegation[rows].mean(0)
    return out


@dataclass
class RegionPower:
    """Mean power of the informative expert vs the mean of the other experts, per region."""

    regions: np.ndarray  # (R,) region labels present
    informative: np.ndarray  # (R,) mean power of the sample's informative expert
    others: np.ndarray  # (R,) mean over samples of the mean power of the other K-1 experts
    counts: np.ndarray  # (R,) samples per region


def region_power(power: np.ndarray, informative: np.ndarray,
                 regions: np.ndarray | None = None) -> RegionPower:
    """Power held by the informative expert vs the others, grouped by region (or by the
    informative view when the data set has no regions)."""
    power = np.asarray(power, dtype=np.float64)  # (n, K)
    n, k = power.shape
    informative = np.asarray(informative, dtype=np.int64)
    groups = informative if regions is None else np.asarray(regions, dtype=np.int64)
    p_inf = power[np.arange(n), informative]  # (n,)
    p_oth = (power.sum(1) - p_inf) / max(k - 1, 1)  # (n,)
    labels = np.unique(groups)
    return RegionPower(
        regions=labels,
        informative=np.array([p_inf[groups == r].mean() for r in labels]),
        others=np.array([p_oth[groups == r].mean() for r in labels]),
        counts=np.array([(groups == r).sum() for r in labels]),
    )


@dataclass
class ErrorBins:
    """Mean error per bin of the top power share ``max_j p_j / K``."""

    edges: np.ndarray  # (B + 1,) from 1/K to 1
    counts: np.ndarray  # (B,)
    mean_error: np.ndarray  # (B,) NaN in empty bins


def error_by_top_share(power: np.ndarray, error: np.ndarray, n_bins: int = 8) -> ErrorBins:
    """Mean per-sample error in equal-width bins of the top power share (1/K .. 1)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    power = np.asarray(power, dtype=np.float64)  # (n, K)
    error = np.asarray(error, dtype=np.float64)  # (n,)
    k = power.shape[1]
    share = power.max(-1) / k  # (n,) in [1/K, 1]
    edges = np.linspace(1.0 / k, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, share, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=error, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return ErrorBins(edges, counts, mean)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no global state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temporary file in the folder, renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name beside the target (same file system, so the rename is atomic); opened
    # with "x" rather than mkstemp so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("wrote %s", path)
    return path


def _matrix(ax: Axes, m: np.ndarray, xlabel: str, ylabel: str, title: str,
            vmax: float = 1.0) -> Any:
    k_rows, k_cols = m.shape
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0.0, vmax=vmax,
                   aspect="equal")
    ax.set_xticks(range(k_cols))
    ax.set_yticks(range(k_rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    if max(k_rows, k_cols) <= ANNOTATE_MAX_K:
        size = "small" if max(k_rows, k_cols) <= 6 else "x-small"
        for i in range(k_rows):
            for j in range(k_cols):
                v = m[i, j]
                text = "–" if np.isnan(v) else f"{v:.2f}"
                color = "black" if (not np.isnan(v) and v > 0.6 * vmax) else "white"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=size)
    return im


def draw_delegation(ax: Axes, mean_delegation: np.ndarray, title: str = "mean delegation"
                    ) -> Any:
    """Heatmap of the mean delegation matrix (rows: from expert, columns: to expert)."""
    return _matrix(ax, mean_delegation, "to expert", "from expert", title)


def draw_informative_top(ax: Axes, informative_top: np.ndarray, share: float,
                         tie_share: float = 0.0) -> Any:
    """Heatmap of informative view x most powerful expert, diagonal share in the title."""
    title = f"top power on the informative expert: {share:.0%}"
    if tie_share > 0:
        title += f"\n(ties for the top: {tie_share:.0%}; first expert wins)"
    return _matrix(ax, informative_top, "most powerful expert", "informative view", title)


def delegation_figure(delegation: np.ndarray, informative: np.ndarray | None = None,
                      title: str = "") -> Figure:
    """Who delegates to whom: the mean delegation matrix over the test samples and, with
    ground truth (and K <= 6), the same mean over the samples of each informative view (the
    overall mean can look uniform while every sample delegates to its informative expert)."""
    delegation = np.asarray(delegation, dtype=np.float64)  # (n, K, K)
    m = delegation.mean(0)  # (K, K)
    k = m.shape[0]
    by_view = None
    if informative is not None and k <= 6:
        by_view = delegation_by_view(delegation, informative)
    side = max(3.6, 0.6 * k + 1.8)
    panels = 1 if by_view is None else 1 + k
    fig = new_figure(side * panels + 0.9, side + (1.4 if title else 1.0))
    axes = np.atleast_1d(fig.subplots(1, panels))
    im = draw_delegation(axes[0], m, "mean delegation\n(all test samples)")
    if by_view is not None:
        for v in range(k):
            draw_delegation(axes[1 + v], by_view[v], f"samples whose\ninformative view is {v}")
            axes[1 + v].set_ylabel("")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="share of the expert's vote")
    if title:
        fig.suptitle(title)
    return fig


def power_figure(power: np.ndarray, title: str = "") -> Figure:
    """Power per expert (box plots, dashed line at the equal share 1) and speaker shares."""
    power = np.asarray(power, dtype=np.float64)  # (n, K)
    k = power.shape[1]
    s = delegation_summary(None, power)
    fig = new_figure(max(7.0, 1.1 * k + 4.0), 3.6)
    ax_box, ax_bar = fig.subplots(1, 2, width_ratios=[1.4, 1.0])
    columns = [power[:, j] for j in range(k)]
    if power.shape[0] > 1 and power.std(0).min() > 1e-9:  # violins need spread to estimate
        ax_box.violinplot(columns, positions=range(k), widths=0.8, showmeans=True,
                          showextrema=False)
        kind = "violins"
    else:
        ax_box.boxplot(columns, positions=range(k), widths=0.6, showfliers=False,
                       showmeans=True)
        kind = "boxes"
    ax_box.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax_box.set_xticks(range(k))
    ax_box.set_xlabel("expert")
    ax_box.set_ylabel(f"voting power (sums to K={k})")
    ax_box.set_ylim(-0.05 * k, 1.05 * k)
    ax_box.set_title(f"power per expert over test samples\n({kind} with means; dashed: equal "
                     "share 1)", fontsize="medium")
    ax_bar.bar(range(k), s.speaker_share, color="tab:blue")
    ax_bar.set_xticks(range(k))
    ax_bar.set_xlabel("expert")
    ax_bar.set_ylabel("share of samples")
    ax_bar.set_ylim(0, 1.12)  # room for the labels above a bar of 1
    ax_bar.set_yticks(np.linspace(0, 1, 6))
    bar_title = f"speaker share (entropy {s.speaker_entropy:.2f} nats)"
    if s.tie_share > 0:
        bar_title += f"\nties for the top: {s.tie_share:.0%} (first expert wins)"
    ax_bar.set_title(bar_title, fontsize="medium")
    for j, v in enumerate(s.speaker_share):
        ax_bar.text(j, v + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def ground_truth_figure(power: np.ndarray, informative: np.ndarray,
                        regions: np.ndarray | None = None, title: str = "") -> Figure:
    """Informative view x most powerful expert, and the informative expert's power by region."""
    power = np.asarray(power, dtype=np.float64)
    k = power.shape[1]
    s = delegation_summary(None, power, informative)
    rp = region_power(power, informative, regions)
    fig = new_figure(max(8.5, 0.6 * k + 7.5), 4.0)
    ax_m, ax_r = fig.subplots(1, 2)
    im = draw_informative_top(ax_m, s.informative_top, s.informative_top_power, s.tie_share)
    fig.colorbar(im, ax=ax_m, shrink=0.8, label="share of the view's samples")
    x = np.arange(rp.regions.size)
    ax_r.bar(x - 0.2, rp.informative, width=0.4, label="informative expert")
    ax_r.bar(x + 0.2, rp.others, width=0.4, label="each other expert (mean)")
    ax_r.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax_r.set_xticks(x, [str(r) for r in rp.regions])
    ax_r.set_xlabel("region" if regions is not None else "informative view")
    ax_r.set_ylabel(f"mean voting power (sums to K={k})")
    ax_r.set_ylim(0, 1.25 * k)  # headroom for the legend above bars of up to K
    ax_r.set_title("power of the informative expert vs the others", fontsize="medium")
    ax_r.legend(loc="upper center", ncols=2, fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def confidence_figure(power: np.ndarray, error: np.ndarray, task: str = "classification",
                      n_bins: int = 8, title: str = "") -> Figure:
    """Mean error per bin of the top power share, with the number of samples per bin."""
    bins = error_by_top_share(power, error, n_bins)
    k = np.asarray(power).shape[1]
    centers = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    ok = bins.counts > 0
    ax.bar(centers[ok], bins.mean_error[ok], width=0.9 * width, color="tab:orange")
    top = np.nanmax(bins.mean_error) if ok.any() else 1.0
    for c, e, nb in zip(centers[ok], bins.mean_error[ok], bins.counts[ok], strict=True):
        ax.text(c, e + 0.02 * max(top, 1e-12), f"n={nb}", ha="center", va="bottom",
                fontsize="x-small")
    overall = float(np.mean(error))
    ax.axhline(overall, color="grey", linestyle="--", linewidth=1)
    top = max(top, overall)
    ax.set_xlim(bins.edges[0], bins.edges[-1])
    ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)
    ax.set_xlabel(f"top power share max_j p_j / K (1/K = {1 / k:.2f}: no one stands out)")
    ax.set_ylabel("error rate" if task == "classification" else "mean squared error")
    ax.set_title(f"error vs concentration of power (dashed: all samples, {overall:.3g})",
                 fontsize="medium")
    if title:
        fig.suptitle(title)
    return fig


def _column_title(run: RunOutputs) -> str:
    metric = run.metric
    return run.name if metric is None else f"{run.name}\ntest {metric[0]} {metric[1]:.3f}"


def comparison_figure(runs: Sequence[RunOutputs]) -> Figure:
    """One column per run: the mean delegation heatmap and, where any run has ground truth,
    the informative view x most powerful expert matrix; each title carries the test metric."""
    if not runs:
        raise ValueError("comparison_figure needs at least one run, got none")
    summaries = [delegation_summary(r.arrays["delegation"], r.arrays["power"], r.informative)
                 for r in runs]
    truth = any(s.informative_top is not None for s in summaries)
    n_rows = 2 if truth else 1
    k = max(r.k for r in runs)
    side = max(3.0, 0.45 * k + 1.6)
    fig = new_figure(side * len(runs) + 1.2, (side + 0.9) * n_rows + 0.3)
    axes = np.atleast_2d(np.asarray(fig.subplots(n_rows, len(runs), squeeze=False)))
    images: list[list[Any]] = [[] for _ in range(n_rows)]
    for c, (run, s) in enumerate(zip(runs, summaries, strict=True)):
        ax = axes[0, c]
        sub = "mean delegation"
        if s.to_informative is not None:
            sub += f"\nto the informative expert: {s.to_informative:.0%}"
        images[0].append(draw_delegation(ax, s.mean_delegation, f"{_column_title(run)}\n{sub}"))
        if c:
            ax.set_ylabel("")
        if truth:
            ax = axes[1, c]
            if s.informative_top is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "no ground truth", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            title = f"informative x top power\ndiagonal: {s.informative_top_power:.0%}"
            if s.tie_share > 0:
                title += f"\nties for the top: {s.tie_share:.0%} (first wins)"
            images[1].append(_matrix(ax, s.informative_top, "most powerful expert",
                                     "informative view" if c == 0 else "", title))
    labels = ["share of the expert's vote", "share of the view's samples"]
    for row in range(n_rows):
        if images[row]:
            fig.colorbar(images[row][0], ax=list(axes[row]), shrink=0.85, label=labels[row])
    return fig


# --------------------------------------------------------------------------------------------
# Run folders in, PNG files out
# --------------------------------------------------------------------------------------------


def run_figures(run: RunOutputs) -> dict[str, Figure]:
    """Every per-run figure by file stem (``ground_truth`` only where the data set has it)."""
    a = run.arrays
    figures = {
        "delegation": delegation_figure(a["delegation"], run.informative, run.name),
        "power": power_figure(a["power"], run.name),
        "confidence": confidence_figure(a["power"], a["error"], run.task, title=run.name),
    }
    if run.informative is not None:
        figures["ground_truth"] = ground_truth_figure(a["power"], run.informative,
                                                      run.regions, run.name)
    return figures


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw a finished run's figures as PNG files.

    Args:
        run_dir: the run folder (must hold ``test_outputs.npz``).
        out_dir: where to write them (default ``<run_dir>/figures``).

    Returns:
        The written files: ``delegation.png``, ``power.png``, ``confidence.png`` and, where the
        data set has ground truth, ``ground_truth.png``.

    Raises:
        FileNotFoundError: the folder or its ``test_outputs.npz`` is missing.
        ValueError: the outputs are unreadable or inconsistent.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "figures"
    return [save_figure(fig, out / f"{stem}.png") for stem, fig in run_figures(run).items()]


def plot_comparison(run_dirs: Sequence[str | Path], out_path: str | Path) -> Path:
    """Draw the comparison figure of several finished runs (one column each) as a PNG.

    Args:
        run_dirs: run folders, in the column order wanted.
        out_path: the PNG file to write.

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: a folder or its ``test_outputs.npz`` is missing.
        ValueError: no folders, or outputs unreadable or inconsistent.
    """
    if not run_dirs:
        raise ValueError("plot_comparison needs at least one run folder, got none")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # same folder name under different parents: say which is which
        if names.count(r.name) > 1 and r.path is not None:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    return save_figure(comparison_figure(runs), out_path)


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """``liquid-fed plot``: each run's own figures, plus a comparison when given several.

    Every folder is checked before anything is drawn.

    Args:
        run_dirs: finished run folders (each holding ``test_outputs.npz``).
        out: one run: where its figures go (default ``RUN_DIR/figures``); several: where
            ``comparison.png`` goes (default ``./figures``).

    Returns:
        The files written.
    """
    for run_dir in run_dirs:
        load_run(run_dir)
    if len(run_dirs) == 1:
        return plot_run(run_dirs[0], out)
    written = [path for run_dir in run_dirs for path in plot_run(run_dir)]
    written.append(plot_comparison(run_dirs, Path(out or "figures") / "comparison.png"))
    return written

