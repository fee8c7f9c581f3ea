"""Synthetic data sets with a known ground truth of which view is informative for which sample."""

from __future__ import annotations

import logging

import numpy as np

from liquid_fed.data.dataset import (
    TASKS,
    Dataset,
    check_choice,
    check_float,
    check_int,
)

logger = logging.getLogger(__name__)

VISIBILITIES = ("shared", "noisy", "none")


def synthetic_regions(
    n_samples: int = 3000,
    n_regions: int = 4,
    n_groups: int = 4,
    features_per_group: int = 5,
    task: str = "classification",
    n_classes: int = 2,
    n_outputs: int = 1,
    noise: float = 0.1,
    region_visibility: str = "shared",
    region_noise: float = 0.5,
    n_distractors: int = 0,
    seed: int = 0,
) -> Dataset:
    """Tabular data of R regions and G feature groups; in region r only group r % G matters.

    Every feature is standard normal everywhere. In region r the target is a random linear
    function (drawn per region) of the `features_per_group` signal features of group
    g(r) = r % G, plus Gaussian noise; the other groups carry nothing about it there.
    Classification takes the sign (2 classes) or the argmax (more) of noisy scores.
    Group g's columns are, in order: signal "g{g}_x{i}", then (unless visibility is "none")
    R region columns "g{g}_region{r}", then `n_distractors` pure-noise columns "g{g}_d{i}".
    `Dataset.groups` maps "g0".."g{G-1}" to these columns, so the "groups" partitioner makes
    one view per group; `regions` and `informative_view` hold r and g(r) per sample.

    Args:
        n_samples: number of samples N; regions are balanced (N // R or one more each).
        n_regions: number of regions R.
        n_groups: number of feature groups G.
        features_per_group: signal features per group.
        task: "classification" or "regression".
        n_classes: classes, for classification (>= 2).
        n_outputs: output dims, for regression (>= 1); labels are (N,) when 1.
        noise: std of the Gaussian noise on the (unit-scale) target scores.
        region_visibility: "shared" (each group holds an exact one-hot of the region),
            "noisy" (that one-hot plus Gaussian noise of std `region_noise`) or "none".
        region_noise: std of the noise on the region columns when visibility is "noisy".
        n_distractors: pure-noise features added to each group.
        seed: seed of everything drawn.

    Returns:
        A tabular `Dataset` named "synthetic_regions".

    Raises:
        ValueError: an option out of range, naming it and the value that arrived.
    """
    n = check_int("synthetic_regions.n_samples", n_samples, 1)
    r_count = check_int("synthetic_regions.n_regions", n_regions, 1)
    g_count = check_int("synthetic_regions.n_groups", n_groups, 1)
    p = check_int("synthetic_regions.features_per_group", features_per_group, 1)
    task = check_choice("synthetic_regions.task", task, TASKS)
    n_cls = check_int("synthetic_regions.n_classes", n_classes, 2)
    n_out = check_int("synthetic_regions.n_outputs", n_outputs, 1)
    noise = check_float("synthetic_regions.noise", noise, 0.0, float("inf"))
    vis = check_choice("synthetic_regions.region_visibility", region_visibility, VISIBILITIES)
    region_noise = check_float("synthetic_regions.region_noise", region_noise, 0.0, float("inf"))
    n_dis = check_int("synthetic_regions.n_distractors", n_distractors, 0)
    seed = check_int("synthetic_regions.seed", seed, 0)

    rng = np.random.default_rng(seed)
    regions = rng.permutation(np.arange(n) % r_count)  # (N,)
    informative = regions % g_count  # (N,)
    signal = rng.standard_normal((n, g_count, p))  # (N, G, P)

    d = n_out if task == "regression" else (1 if n_cls == 2 else n_cls)
    weights = rng.standard_normal((r_count, p, d)) / np.sqrt(p)  # (R, P, D)
    if d > 1 and task == "classification":
        weights -= weights.mean(axis=-1, keepdims=True)  # no class favoured on average
    x_inf = signal[np.arange(n), informative]  # (N, P)
    scores = np.einsum("np,npd->nd", x_inf, weights[regions])  # (N, D)
    scores += noise * rng.standard_normal(scores.shape)
    if task == "classification":
        labels = (scores[:, 0] > 0).astype(np.int64) if d == 1 else scores.argmax(axis=1)
        n_outputs_ds = n_cls
    else:
        labels = scores[:, 0] if d == 1 else scores
        n_outputs_ds = n_out

    onehot = np.eye(r_count)[regions]  # (N, R)
    blocks, names, groups = [], [], {}
    for g in range(g_count):
        cols = [f"g{g}_x{i}" for i in range(p)]
        blocks.append(signal[:, g])
        if vis != "none":
            reg = onehot if vis == "shared" else onehot + region_noise * rng.standard_normal(
                onehot.shape)
            blocks.append(reg)
            cols += [f"g{g}_region{r}" for r in range(r_count)]
        if n_dis:
            blocks.append(rng.standard_normal((n, n_dis)))
            cols += [f"g{g}_d{i}" for i in range(n_dis)]
        names += cols
        groups[f"g{g}"] = cols
    features = np.concatenate(blocks, axis=1).astype(np.float32)
    logger.debug("synthetic_regions: %d samples, %d features, %d regions", n, len(names),
                 r_count)
    return Dataset(
        name="synthetic_regions", ids=np.arange(n), features=features, labels=labels,
        task=task, layout="tabular", feature_names=names, n_outputs=n_outputs_ds,
        regions=regions, informative_view=informative, groups=groups,
        class_names=[str(c) for c in range(n_cls)] if task == "classification" else [],
    )


def sensors(
    n_samples: int = 2000,
    n_steps: int = 32,
    n_channels: int = 4,
    n_segments: int = 4,
    task: str = "classification",
    n_classes: int = 2,
    noise: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """Multi-sensor sequences (N, T, C) whose signal sits in one segment and one channel.

    Time is cut into `n_segments` near-equal segments. Each sample has an event in one
    segment s (its region, balanced over samples); during s, channel s % C carries a wave
    that encodes the label, and every other step of every channel is Gaussian noise. So
    channel c carries the signal in segments c, c + C, ... and not in the others. For
    classification the wave of class k is sin with k + 1 cycles per segment; for regression
    the label y ~ U(-1, 1) scales a one-cycle sine.

    Args:
        n_samples: number of samples N.
        n_steps: sequence length T (at least 2 steps per segment).
        n_channels: number of channels C, named "s0".."s{C-1}".
        n_segments: number of time segments (regions).
        task: "classification" or "regression" (one output).
        n_classes: classes, for classification (>= 2).
        noise: std of the Gaussian noise on every step (the wave has amplitude 1).
        seed: seed of everything drawn.

    Returns:
        A sequence `Dataset` named "sensors", with `regions` (segment of the event) and
        `informative_view` (channel carrying it).

    Raises:
        ValueError: an option out of range, naming it and the value that arrived.
    """
    n = check_int("sensors.n_samples", n_samples, 1)
    c_count = check_int("sensors.n_channels", n_channels, 1)
    s_count = check_int("sensors.n_segments", n_segments, 1)
    t_count = check_int("sensors.n_steps", n_steps, 2 * s_count)
    task = check_choice("sensors.task", task, TASKS)
    n_cls = check_int("sensors.n_classes", n_classes, 2)
    noise = check_float("sensors.noise", noise, 0.0, float("inf"))
    seed = check_int("sensors.seed", seed, 0)

    rng = np.random.default_rng(seed)
    regions = rng.permutation(np.arange(n) % s_count)  # (N,)
    channel = regions % c_count  # (N,)
    n_waves = n_cls if task == "classification" else 1
    waves = np.zeros((s_count, n_waves, t_count))  # (S, K, T): wave k placed in segment s
    for s, steps in enumerate(np.array_split(np.arange(t_count), s_count)):
        phase = 2 * np.pi * np.arange(len(steps)) / len(steps)
        for k in range(n_waves):
            waves[s, k, steps] = np.sin((k + 1) * phase)
    if task == "classification":
        labels = rng.integers(0, n_cls, size=n)
        signal = waves[regions, labels]  # (N, T)
    else:
        labels = rng.uniform(-1.0, 1.0, size=n)
        signal = labels[:, None] * waves[regions, 0]  # (N, T)
    x = noise * rng.standard_normal((n, t_count, c_count))  # (N, T, C)
    x[np.arange(n), :, channel] += signal
    return Dataset(
        name="sensors", ids=np.arange(n), features=x.astype(np.float32), labels=labels,
        task=task, layout="sequence", feature_names=[f"s{c}" for c in range(c_count)],
        n_outputs=n_cls if task == "classification" else 1, regions=regions,
        informative_view=channel,
        class_names=[str(c) for c in range(n_cls)] if task == "classification" else [],
    )
