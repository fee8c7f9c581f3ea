"""Vertical views: partitioners that give each of K clients a subset of the features.

A view is a set of indices into a data set's flattened feature axis: columns (tabular),
pixels i * W + j (image) or channels (sequence; every view keeps all T steps). A `ViewPlan`
records the mapping, the per-view noise and missing shares and the seed, so the same plan
gives the same views, noise and missing samples every time.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from liquid_fed.data.dataset import Dataset, check_float, check_int
from liquid_fed.rundir import strict_json

logger = logging.getLogger(__name__)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class ViewPlan:
    """Which features each of K views holds, with per-view noise and missing shares."""

    kind: str
    n_views: int
    layout: str
    columns: list[list[int]]  # per view, sorted indices into the flattened feature axis
    names: list[list[str]]  # per view, feature names
    noise: list[float]  # per-view Gaussian noise std (0 = none)
    missing: list[float]  # per-view share of samples the view lacks
    seed: int
    info: dict = field(default_factory=dict)  # partitioner details, JSON-able

    def _check(self, ds: Dataset, k: int) -> None:
        """Check `k` is a view and the data set matches the plan."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
                0 <= k < self.n_views):
            raise ValueError(f"view index must be in [0, {self.n_views}), got {k!r}")
        if ds.layout != self.layout or max(max(c) for c in self.columns) >= ds.n_features:
            raise ValueError(f"view plan ({self.layout}, columns up to "
                             f"{max(max(c) for c in self.columns)}) does not fit data set "
                             f"{ds.name!r} ({ds.layout}, {ds.n_features} features)")

    def _patch(self, k: int, width: int) -> tuple[int, int] | None:
        """(h, w) if image view k is a full grid of rows x columns, else None."""
        cols = np.asarray(self.columns[k])
        rows, cc = np.unique(cols // width), np.unique(cols % width)
        return (len(rows), len(cc)) if len(rows) * len(cc) == len(cols) else None

    def view_shape(self, k: int, ds_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one sample of view k, given the data's features shape (with or without N)."""
        shape = tuple(ds_shape)
        if len(shape) == (1 if self.layout == "tabular" else 2) + 1:
            shape = shape[1:]
        n_k = len(self.columns[k])
        if self.layout == "tabular":
            return (n_k,)
        if self.layout == "sequence":
            return (shape[0], n_k)
        patch = self._patch(k, shape[1])
        return patch if patch is not None else (n_k,)

    def present(self, ds: Dataset, k: int, ids: np.ndarray | None = None) -> np.ndarray:
        """Bool mask (n,): which of `ids` (all if None) view k holds; fixed by seed and id."""
        self._check(ds, k)
        ids = ds.ids if ids is None else np.asarray(ids)
        ds.positions(ids)  # unknown ids are an error
        if self.missing[k] <= 0:
            return np.ones(len(ids), dtype=bool)
        u = _hash_uniform(self.seed, k, 2, ids, np.zeros(1, dtype=np.int64))[:, 0]
        return u >= self.missing[k]

    def apply(self, ds: Dataset, k: int, ids: np.ndarray | None = None) -> np.ndarray:
        """Features of view k for `ids` (all if None), with its noise; rows it lacks are 0.

        Shapes: tabular (n, n_k); image (n, h, w) for a rectangular patch, else (n, n_k);
        sequence (n, T, c_k). Noise is drawn from (seed, view, id, feature position), so the
        same id always gets the same noise whatever else is asked for. Noise is in the units
        of `ds.features`: standardise first for a std that means the same on every feature.
        """
        self._check(ds, k)
        pos = ds.positions(ids)
        ids = ds.ids[pos]
        cols = np.asarray(self.columns[k], dtype=np.int64)
        n = len(pos)
        if self.layout == "tabular":
            x = ds.features[pos][:, cols]  # (n, n_k)
            cells = cols[None, :]
        elif self.layout == "sequence":
            t_count, c_count = ds.features.shape[1:]
            x = ds.features[pos][:, :, cols]  # (n, T, c_k)
            cells = (np.arange(t_count)[:, None] * c_count + cols[None, :]).ravel()[None, :]
        else:
            h, w = ds.features.shape[1:]
            x = ds.features.reshape(len(ds.features), h * w)[pos][:, cols]  # (n, n_k)
            patch = self._patch(k, w)
            if patch is not None:
                x = x.reshape(n, *patch)  # (n, h_k, w_k): columns are sorted row-major
            cells = cols[None, :]
        x = np.array(x, dtype=np.float32)
        if self.noise[k] > 0:
            z = _hash_normal(self.seed, k, ids, cells.ravel())  # (n, cells)
            x += (self.noise[k] * z).reshape(x.shape).astype(np.float32)
        if self.missing[k] > 0:
            x[~self.present(ds, k, ids)] = 0.0
        return x

    def to_dict(self) -> dict:
        """JSON-able record of the plan, for the run's report."""
        return {
            "kind": self.kind, "n_views": self.n_views, "layout": self.layout,
            "columns": [[int(c) for c in cols] for cols in self.columns],
            "names": [list(n) for n in self.names],
            "noise": [float(v) for v in self.noise], "missing": [float(v) for v in self.missing],
            "seed": int(self.seed), "info": strict_json(self.info),
        }

    @classmethod
    def from_dict(cls, state: dict) -> ViewPlan:
        """Rebuild a plan from `to_dict()` output."""
        return cls(**{k: state[k] for k in ("kind", "n_views", "layout", "columns", "names",
                                            "noise", "missing", "seed")},
                   info=dict(state.get("info", {})))


# ---- counter-based randomness: the same (seed, view, id, cell) always gives the same draw ----


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_uniform(seed: int, k: int, stream: int, ids: np.ndarray,
                  cells: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) of shape (len(ids), len(cells)), a pure function of the inputs."""
    key = _mix(np.array([seed, k, stream], dtype=np.int64).view(np.uint64)
               * np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9],
                          dtype=np.uint64))
    base = _mix(key[0] ^ _mix(key[1] ^ _mix(key[2])))
    i = _mix(np.asarray(ids, dtype=np.int64).view(np.uint64) ^ base)[:, None]
    c = np.asarray(cells, dtype=np.int64).view(np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = _mix(i + c * np.uint64(0x9E3779B97F4A7C15))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def _hash_normal(seed: int, k: int, ids: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Standard normals (len(ids), len(cells)) by Box-Muller on two hashed uniform streams."""
    u1 = 1.0 - _hash_uniform(seed, k, 0, ids, cells)  # (0, 1]
    u2 = _hash_uniform(seed, k, 1, ids, cells)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# ---- partitioners ------------------------------------------------------------------------------


def _plan(ds: Dataset, kind: str, columns: list, seed: int, info: dict | None = None
          ) -> ViewPlan:
    """A plan without modifiers from per-view column lists (sorted, checked non-empty)."""
    cols = [sorted(int(c) for c in set(np.asarray(v).tolist())) for v in columns]
    for k, c in enumerate(cols):
        if not c:
            raise ValueError(f"views: view {k} of kind {kind!r} got no features")
    return ViewPlan(kind=kind, n_views=len(cols), layout=ds.layout, columns=cols,
                    names=[[ds.feature_names[c] for c in v] for v in cols],
                    noise=[0.0] * len(cols), missing=[0.0] * len(cols), seed=seed,
                    info=info or {})


def _resolve(ds: Dataset, spec: object, key: str, n_views: int) -> list[list[int]]:
    """Per-view lists of feature names or indices as indices; errors name the bad entry."""
    if not isinstance(spec, (list, tuple)) or not all(isinstance(v, (list, tuple)) for v in spec):
        raise ValueError(f"views.{key} must be a list with one list of features per view, "
                         f"got {spec!r}")
    if len(spec) != n_views:
        raise ValueError(f"views.{key} lists {len(spec)} views but n_views={n_views}")
    index = {n: j for j, n in enumerate(ds.feature_names)}
    shown = ", ".join(ds.feature_names[:6]) + (", ..." if ds.n_features > 6 else "")
    out = []
    for k, view in enumerate(spec):
        cols: list[int] = []
        for c in view:
            if isinstance(c, str):
                if c not in index:
                    raise ValueError(f'views.{key}[{k}] names column "{c}", which is not in '
                                     f"the data (columns: {shown})")
                j = index[c]
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                if not 0 <= c < ds.n_features:
                    raise ValueError(f"views.{key}[{k}] has index {c}, but the data has "
                                     f"{ds.n_features} features (0..{ds.n_features - 1})")
                j = int(c)
            else:
                raise ValueError(f"views.{key}[{k}] holds {c!r}; give feature names or indices")
            if j in cols:
                raise ValueError(f'views.{key}[{k}] lists feature "{ds.feature_names[j]}" '
                                 f"twice")
            cols.append(j)
        if not cols:
            raise ValueError(f"views.{key}[{k}] is empty")
        out.append(cols)
    return out


def explicit(ds: Dataset, n_views: int, seed: int, columns: list | None = None) -> ViewPlan:
    """Columns given by name or index per view (features may be left out or repeated)."""
    if columns is None:
        raise ValueError("views: kind 'explicit' needs views.columns, one list per view")
    return _plan(ds, "explicit", _resolve(ds, columns, "columns", n_views), seed)


def blocks(ds: Dataset, n_views: int, seed: int) -> ViewPlan:
    """Contiguous blocks of near-equal size, in feature order."""
    return _plan(ds, "blocks", np.array_split(np.arange(ds.n_features), n_views), seed)


def random(ds: Dataset, n_views: int, seed: int) -> ViewPlan:
    """A random partition into near-equal parts."""
    perm = np.random.default_rng(seed).permutation(ds.n_features)
    return _plan(ds, "random", np.array_split(perm, n_views), seed)


def groups(ds: Dataset, n_views: int, seed: int, groups: list | None = None) -> ViewPlan:
    """One view per named group of the data set; an entry may list several groups to merge.

    Features in no chosen group are left out.
    """
    if not ds.groups:
        raise ValueError(f"views: kind 'groups' needs named feature groups, and data set "
                         f"{ds.name!r} has none (use 'explicit' or 'blocks')")
    spec = list(ds.groups) if groups is None else groups
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"views.groups must be a list of group names, got {spec!r}")
    if len(spec) != n_views:
        raise ValueError(f"views: kind 'groups' gives one view per group; {len(spec)} groups "
                         f"({', '.join(map(str, spec))}) but n_views={n_views}")
    index = {n: j for j, n in enumerate(ds.feature_names)}
    cols = []
    for k, entry in enumerate(spec):
        names = [entry] if isinstance(entry, str) else list(entry)
        view: list[int] = []
        for g in names:
            if g not in ds.groups:
                raise ValueError(f'views.groups[{k}] names group "{g}", which data set '
                                 f"{ds.name!r} does not have (groups: {', '.join(ds.groups)})")
            view += [index[c] for c in ds.groups[g]]
        cols.append(view)
    return _plan(ds, "groups", cols, seed, {"groups": [e if isinstance(e, str) else list(e)
                                                       for e in spec]})


def natural(ds: Dataset, n_views: int, seed: int) -> ViewPlan:
    """The data set's own views: one per named feature group, all of them, in their order.

    The same partition as "groups" without options, for data whose groups are genuine views
    (e.g. mfeat's six feature sets); n_views must equal the number of groups.
    """
    if not ds.groups:
        raise ValueError(f"views: kind 'natural' needs a data set with natural views (named "
                         f"feature groups), and data set {ds.name!r} has none")
    if n_views != len(ds.groups):
        raise ValueError(f"views: data set {ds.name!r} has {len(ds.groups)} natural views "
                         f"({', '.join(ds.groups)}); set views.n_views to {len(ds.groups)}, "
                         f"got {n_views}")
    plan = groups(ds, n_views, seed)
    plan.kind = "natural"
    return plan


def patches(ds: Dataset, n_views: int, seed: int, grid: Sequence[int] | None = None) -> ViewPlan:
    """Image patches on a grid (rows x columns of patches), e.g. (2, 2) quadrants.

    The grid must divide the image; by default it is the most square one that does.
    """
    if ds.layout != "image":
        raise ValueError(f"views: kind 'patches' needs image data; {ds.name!r} is {ds.layout}")
    h, w = ds.features.shape[1:]
    if grid is None:
        fits = [(a, n_views // a) for a in range(1, n_views + 1)
                if n_views % a == 0 and h % a == 0 and w % (n_views // a) == 0]
        if not fits:
            raise ValueError(f"views: no grid of {n_views} patches divides the {h}x{w} image; "
                             f"give views.grid")
        grid = min(fits, key=lambda g: (abs(g[0] - g[1]), g[0]))
    if (not isinstance(grid, (list, tuple)) or len(grid) != 2
            or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid)):
        raise ValueError(f"views.grid must be two positive integers (rows, cols), got {grid!r}")
    gh, gw = int(grid[0]), int(grid[1])
    if gh * gw != n_views:
        raise ValueError(f"views.grid {gh}x{gw} gives {gh * gw} patches but n_views={n_views}")
    if h % gh or w % gw:
        raise ValueError(f"views.grid {gh}x{gw} does not divide the {h}x{w} image evenly")
    ph, pw = h // gh, w // gw
    cols = [[i * w + j for i in range(a * ph, (a + 1) * ph) for j in range(b * pw, (b + 1) * pw)]
            for a in range(gh) for b in range(gw)]
    return _plan(ds, "patches", cols, seed, {"grid": [gh, gw], "patch": [ph, pw],
                                            "image": [h, w]})


def channels(ds: Dataset, n_views: int, seed: int, channels: list | None = None) -> ViewPlan:
    """Sequence channels per view: given by name or index, or contiguous blocks by default."""
    if ds.layout != "sequence":
        raise ValueError(f"views: kind 'channels' needs sequence data; {ds.name!r} is "
                         f"{ds.layout}")
    if channels is None:
        cols = np.array_split(np.arange(ds.n_features), n_views)
    else:
        cols = _resolve(ds, channels, "channels", n_views)
    return _plan(ds, "channels", cols, seed)


def _flat_matrix(ds: Dataset, rng: np.random.Generator, max_rows: int = 2000
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Features as (rows, F) over the view axis, and the labels per row, subsampled."""
    pos = np.sort(rng.choice(ds.n_samples, size=min(max_rows, ds.n_samples), replace=False))
    x, y = ds.features[pos].astype(np.float64), ds.labels[pos]
    if ds.layout == "image":
        return x.reshape(len(pos), -1), y
    if ds.layout == "sequence":
        t_count = x.shape[1]
        return x.reshape(-1, x.shape[2]), np.repeat(y, t_count, axis=0)
    return x, y


def _univariate_importance(x: np.ndarray, y: np.ndarray, task: str) -> np.ndarray:
    """Per feature: share of label variance it explains alone (eta^2 or r^2), in [0, 1]."""
    xc = x - x.mean(axis=0)
    var = (xc**2).mean(axis=0)
    ok = var > 1e-12
    if task == "classification":
        onehot = (y[:, None] == np.unique(y)[None, :]).astype(np.float64)  # (rows, C)
        counts = onehot.sum(axis=0)
        means = onehot.T @ xc / counts[:, None]  # (C, F) class means, centred
        between = (counts[:, None] * means**2).sum(axis=0) / len(x)
        score = np.where(ok, between / np.where(ok, var, 1.0), 0.0)
    else:
        yy = y.reshape(len(y), -1).astype(np.float64)
        yc = yy - yy.mean(axis=0)
        cov = xc.T @ yc / len(x)  # (F, O)
        yvar = np.maximum((yc**2).mean(axis=0), 1e-12)
        r2 = cov**2 / (np.where(ok, var, 1.0)[:, None] * yvar[None, :])
        score = np.where(ok, r2.mean(axis=1), 0.0)
    return np.clip(score, 0.0, 1.0)


def importance(ds: Dataset, n_views: int, seed: int, weights: Sequence[float] | None = None,
               alpha: float = 1.0) -> ViewPlan:
    """VertiBench's importance split: shares p ~ Dirichlet(alpha * weights), feature j -> k ~ p.

    A party with a large share gets many features and so, in expectation, a matching share
    of the total feature importance (Wu et al., VertiBench, 2023). Small alpha gives uneven
    parties. Every party gets at least one feature: the draw is repeated (up to 100 times),
    then a feature is moved from the largest party. `info` records p and each party's share
    of a univariate importance score (eta^2 / r^2 of each feature with the label).
    """
    alpha = check_float("views.alpha", alpha, 0.0, float("inf"))
    if alpha <= 0:
        raise ValueError(f"views.alpha must be > 0, got {alpha}")
    w = np.ones(n_views) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n_views,) or not np.all(w > 0):
        raise ValueError(f"views.weights must be {n_views} positive numbers (one per view), "
                         f"got {weights!r}")
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(alpha * w)
    p = np.maximum(p, 0.0)
    p = p / p.sum() if p.sum() > 0 else np.full(n_views, 1.0 / n_views)
    f_count = ds.n_features
    for _ in range(100):
        owner = rng.choice(n_views, size=f_count, p=p)
        if len(np.unique(owner)) == n_views:
            break
    for k in range(n_views):  # still empty parties: take a feature from the largest one
        if not np.any(owner == k):
            largest = np.bincount(owner, minlength=n_views).argmax()
            owner[rng.choice(np.flatnonzero(owner == largest))] = k
    x, y = _flat_matrix(ds, np.random.default_rng([seed, 7]))
    imp = _univariate_importance(x, y, ds.task)
    share = np.bincount(owner, weights=imp, minlength=n_views) / max(imp.sum(), 1e-12)
    cols = [np.flatnonzero(owner == k) for k in range(n_views)]
    return _plan(ds, "importance", cols, seed, {"alpha": alpha, "weights": w.tolist(),
                                                "probabilities": p.tolist(),
                                                "importance_share": share.tolist()})


def _greedy_swaps(c: np.ndarray, owner: np.ndarray, goal: Callable[[np.ndarray, float],
                  np.ndarray], max_steps: int) -> tuple[np.ndarray, float]:
    """Swap pairs of features between parties while the best swap improves `goal`.

    `goal(w_new, w)` scores candidate within-party sums (lower is better). Returns the final
    assignment and its within-party sum of |corr|.
    """
    owner = owner.copy()
    n_parties = owner.max() + 1
    s = c @ np.eye(n_parties)[owner]  # (F, K): sum of |corr| of feature i with party k
    within = 0.5 * s[np.arange(len(owner)), owner].sum()
    for _ in range(max_steps):
        own = s[np.arange(len(owner)), owner]  # (F,)
        cross = s[:, owner]  # (F, F): [i, j] = sum of |corr| of i with j's party
        delta = cross - own[:, None] + cross.T - own[None, :] - 2 * c  # change of within-sum
        valid = owner[:, None] != owner[None, :]
        score = np.where(valid, goal(within + delta, within), np.inf)
        i, j = np.unravel_index(np.argmin(score), score.shape)
        if not np.isfinite(score[i, j]) or score[i, j] >= -1e-12:
            break
        a, b = owner[i], owner[j]
        s[:, a] += c[:, j] - c[:, i]
        s[:, b] += c[:, i] - c[:, j]
        owner[i], owner[j] = b, a
        within += delta[i, j]
    return owner, float(within)


def correlation(ds: Dataset, n_views: int, seed: int, beta: float = 0.5) -> ViewPlan:
    """Near-equal parties whose inter-party feature correlation is low (beta=0) or high (1).

    A cheap stand-in for VertiBench's correlation split (which searches with BRKGA): from a
    random balanced assignment, greedy pairwise swaps find a low and a high extreme of the
    mean |corr| between features of different parties; then, from the nearer extreme, greedy
    swaps move to the value beta of the way from low to high. Correlations are taken on at
    most 2,000 samples (pixels for images, channels over all steps for sequences). `info`
    records the score reached and the two extremes.
    """
    beta = check_float("views.beta", beta, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    x, _ = _flat_matrix(ds, np.random.default_rng([seed, 7]))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.abs(np.corrcoef(x, rowvar=False))
    c = np.nan_to_num(np.atleast_2d(c), nan=0.0)
    np.fill_diagonal(c, 0.0)
    f_count = ds.n_features
    sizes = np.array([len(b) for b in np.array_split(np.arange(f_count), n_views)])
    start = rng.permutation(np.repeat(np.arange(n_views), sizes))
    total = c.sum() / 2
    n_cross = f_count * (f_count - 1) / 2 - (sizes * (sizes - 1) / 2).sum()

    def inter(within: float) -> float:
        return float((total - within) / n_cross) if n_cross else 0.0

    steps = 20 * f_count
    lo_owner, w_max = _greedy_swaps(c, start, lambda wn, w: w - wn, steps)  # low inter-corr
    hi_owner, w_min = _greedy_swaps(c, start, lambda wn, w: wn - w, steps)  # high inter-corr
    target = w_max + beta * (w_min - w_max)
    owner = lo_owner if beta <= 0.5 else hi_owner
    owner, within = _greedy_swaps(c, owner, lambda wn, w: np.abs(wn - target) - abs(w - target),
                                  steps)
    cols = [np.flatnonzero(owner == k) for k in range(n_views)]
    info = {"beta": beta, "score": inter(within), "score_low": inter(w_max),
            "score_high": inter(w_min), "measure": "mean |corr| between features of "
            "different views"}
    return _plan(ds, "correlation", cols, seed, info)


PARTITIONERS: dict[str, Callable[..., ViewPlan]] = {
    "explicit": explicit,
    "blocks": blocks,
    "random": random,
    "groups": groups,
    "natural": natural,
    "patches": patches,
    "channels": channels,
    "importance": importance,
    "correlation": correlation,
}


def _per_view(key: str, value: float | Sequence[float], n_views: int, high: float,
              high_open: bool) -> list[float]:
    """A number or one number per view, each checked, as a list of n_views floats."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n_views:
            raise ValueError(f"views.{key} lists {len(value)} values but n_views={n_views}")
        return [check_float(f"views.{key}[{k}]", v, 0.0, high, high_open)
                for k, v in enumerate(value)]
    return [check_float(f"views.{key}", value, 0.0, high, high_open)] * n_views


def _with_overlap(ds: Dataset, plan: ViewPlan, overlap: float) -> ViewPlan:
    """Share features between views: patches grow into their neighbours; otherwise a random
    share `overlap` of the used features is added to every view."""
    if overlap <= 0:
        return plan
    if plan.kind == "patches":
        (gh, gw), (ph, pw), (h, w) = plan.info["grid"], plan.info["patch"], plan.info["image"]
        mh, mw = round(overlap * ph), round(overlap * pw)
        cols = [[i * w + j
                 for i in range(max(a * ph - mh, 0), min((a + 1) * ph + mh, h))
                 for j in range(max(b * pw - mw, 0), min((b + 1) * pw + mw, w))]
                for a in range(gh) for b in range(gw)]
        info = {**plan.info, "overlap": overlap, "margin": [mh, mw]}
    else:
        used = np.unique(np.concatenate([np.asarray(c) for c in plan.columns]))
        rng = np.random.default_rng([plan.seed, 1])
        shared = rng.choice(used, size=round(overlap * len(used)), replace=False)
        cols = [np.union1d(c, shared) for c in plan.columns]
        info = {**plan.info, "overlap": overlap, "shared": sorted(int(s) for s in shared)}
    return _plan(ds, plan.kind, cols, plan.seed, info)


def make_views(
    ds: Dataset,
    kind: str,
    n_views: int,
    seed: int = 0,
    overlap: float = 0.0,
    noise: float | list[float] = 0.0,
    missing: float | list[float] = 0.0,
    **options: object,
) -> ViewPlan:
    """Split a data set's features into K client views.

    Args:
        ds: the data set.
        kind: a key of `PARTITIONERS`: "explicit" (columns=[[names or indices], ...]),
            "blocks", "random", "groups" (groups=[...], default all of the data set's),
            "natural" (every group of the data set, one view each),
            "patches" (grid=(rows, cols)), "channels" (channels=[[...], ...], default
            contiguous), "importance" (weights=[...], alpha=1.0), "correlation" (beta=0.5).
        n_views: number of views K.
        seed: seed of the partition, the noise and the missing samples.
        overlap: in [0, 1]. For "patches", each patch grows by overlap x patch size into its
            neighbours; otherwise that share of the used features is added to every view.
        noise: Gaussian noise std added to a view's features, one value or one per view.
        missing: share of samples a view lacks, in [0, 1), one value or one per view.
        **options: the options of `kind`.

    Returns:
        The `ViewPlan`.

    Raises:
        ValueError: unknown kind or option, more views than features, unknown columns or
            groups, a grid that does not fit, or a modifier out of range.
    """
    if kind not in PARTITIONERS:
        raise ValueError(f'views.kind: unknown partitioner "{kind}"; must be one of '
                         f"{list(PARTITIONERS)}")
    n_views = check_int("views.n_views", n_views, 1)
    seed = check_int("views.seed", seed, 0)
    if n_views > ds.n_features:
        unit = {"tabular": "features", "image": "pixels", "sequence": "channels"}[ds.layout]
        raise ValueError(f"views: {n_views} views requested but the data has only "
                         f"{ds.n_features} {unit}")
    overlap = check_float("views.overlap", overlap, 0.0, 1.0)
    noise_k = _per_view("noise", noise, n_views, float("inf"), False)
    missing_k = _per_view("missing", missing, n_views, 1.0, True)
    partitioner = PARTITIONERS[kind]
    accepted = list(inspect.signature(partitioner).parameters)[3:]
    for key in options:
        if key not in accepted:
            raise ValueError(f'views: kind "{kind}" has no option "{key}" (options: '
                             f"{', '.join(accepted) or 'none'})")
    plan = _with_overlap(ds, partitioner(ds, n_views, seed, **options), overlap)
    plan.noise, plan.missing = noise_k, missing_k
    logger.debug("views %s on %s: sizes %s", kind, ds.name, [len(c) for c in plan.columns])
    return plan
