"""Sizes known before starting: the memory a run needs, from headers and shapes, against a limit.

Every estimate here is computed from what a file's header or a config declares, never by
loading or building the thing itself, so a run that cannot fit is refused in a fraction of a
second and a few megabytes, with one line naming the number and the limit:

* a data file: an ``.npz`` by its members' .npy headers (shape, dtype), a CSV by its header row
  and a streamed count of its lines (:func:`npz_load_bytes`, :func:`csv_load_bytes`);
* the experts: parameters counted from the config's options and each view's shape
  (:func:`expert_size`), times the bytes of parameters, gradients and optimizer state, for the
  K experts of a run, plus the activations of one batch (:func:`run_estimate`).

The limit (:func:`memory_limit`) is the memory this machine has available (``MemAvailable`` of
``/proc/meminfo``; elsewhere ``os.sysconf``), or ``--max-memory`` / the environment variable
``LIQUID_FED_MAX_MEMORY`` (e.g. ``8G``, ``500M``) when given.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from liquid_fed.errors import ConfigError, LiquidFedError

if TYPE_CHECKING:
    from liquid_fed.config import RunConfig

log = logging.getLogger(__name__)

#: The environment variable (and what ``--max-memory`` sets) that overrides the limit.
ENV_MAX_MEMORY = "LIQUID_FED_MAX_MEMORY"
#: Bytes of one element of each training dtype (``train.dtype``).
DTYPE_BYTES = {"float32": 4, "float64": 8}
#: Optimizer state kept per parameter: Adam's two moments; SGD's momentum buffer when used.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}
# A CSV field held by the loader as a Python str (49 bytes + its text) in a row list, again in
# its column tuple, then as a float64: measured 117 bytes a cell for 8-character fields on a
# 300,000 x 6 file (see tests/test_sizes.py for the check against a real load).
_CSV_CELL = 104
_CSV_ROW = 88  # the row's list and its start line
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


class SizeError(LiquidFedError, MemoryError):
    """What a run or a file would need is more than the memory limit (names both)."""


# ---- the limit --------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """Bytes in decimal units, e.g. ``43.2 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def parse_size(text: str | int, key: str = "--max-memory") -> int:
    """A size such as ``8G``, ``500MB``, ``1.5GiB`` or ``123456`` (bytes) as bytes.

    Raises:
        ConfigError: naming ``key``, the text and what is accepted.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: got {str(text)!r}; expected a positive size such as 8G, "
                          "500M, 1.5GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def available_memory() -> int:
    """Bytes this machine has available now: ``MemAvailable`` (Linux), else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such sysconf name here
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_limit(override: str | int | None = None) -> tuple[int, str]:
    """The limit estimates are held to, and how to say where it comes from.

    Args:
        override: a size (``parse_size``); default ``$LIQUID_FED_MAX_MEMORY``, else the memory
            available on this machine.

    Returns:
        ``(bytes, words)``, e.g. ``(23_400_000_000, "this machine has 23.4 GB available")``.

    Raises:
        ConfigError: the override (or the environment variable) is not a size.
    """
    key = "--max-memory"
    if override is None and os.environ.get(ENV_MAX_MEMORY):
        # what --max-memory sets for this process and its children, or the user's own
        override = os.environ[ENV_MAX_MEMORY]
        key = f"--max-memory or {ENV_MAX_MEMORY}"
    if override is not None:
        limit = parse_size(override, key)
        return limit, f"the limit is {format_bytes(limit)} ({key})"
    have = available_memory()
    return have, (f"this machine has {format_bytes(have)} available (raise or lower the limit "
                  "with --max-memory)")


def check_fits(need: int, what: str) -> None:
    """Refuse ``need`` bytes beyond the limit, naming ``what`` needs them.

    Raises:
        SizeError: ``what: needs N GB ...; this machine has M GB available ...``.
    """
    limit, words = memory_limit()
    if need > limit:
        raise SizeError(f"{what}: needs about {format_bytes(need)} of memory; {words}")
    log.debug("%s: about %s (limit %s)", what, format_bytes(need), format_bytes(limit))


# ---- data files -------------------------------------------------------------------------------


def npy_header(f: BinaryIO) -> tuple[tuple[int, int], tuple[int, ...] | None, bool, Any]:
    """A ``.npy`` stream's format version, then its header (shape, fortran order, dtype) when
    the version is 1.0 or 2.0 (else ``None, False, None``), read without the data.

    Raises:
        ValueError (and what numpy's header parser raises): not a ``.npy`` header.
    """
    import numpy as np

    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return (version, *np.lib.format.read_array_header_1_0(f))
    if version == (2, 0):
        return (version, *np.lib.format.read_array_header_2_0(f))
    return version, None, False, None


def npz_load_bytes(members: dict[str, tuple[tuple[int, ...], int]], features_key: str,
                   labels_key: str) -> int:
    """Peak bytes loading an ``.npz`` takes, from its members' (shape, itemsize) headers.

    The raw arrays, the features as float64 and their finiteness mask, the labels coded (a
    sort and its inverse) and the ids: measured 45 MB for 300,000 x 5 float32 features (the
    estimate gives 47 MB).
    """
    raw = sum(math.prod(shape) * item for shape, item in members.values())
    feat = math.prod(members[features_key][0]) if features_key in members else 0
    shape = members.get(labels_key, ((0,), 0))[0]
    labels = math.prod(shape)
    rows = shape[0] if shape else 0
    return raw + 16 * feat + 32 * labels + 16 * rows


def csv_load_bytes(rows: int, columns: int, file_bytes: int) -> int:
    """Peak bytes loading a CSV takes: every field as a Python str, then as float64."""
    return rows * columns * _CSV_CELL + rows * _CSV_ROW + file_bytes


# ---- experts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertSize:
    """One expert, counted from its options: trainable parameters, fixed buffers, the
    activations one sample keeps for the backward pass (elements), and the elements building
    it needs for a moment (the ESN's float64 reservoir and its eigenvalues)."""

    parameters: int
    buffers: int = 0
    activations: int = 0
    build: int = 0


def _heads(width: int, out_dim: int, k: int) -> int:
    """The prediction head (width -> C) and the delegation head (width -> K), with biases."""
    return width * out_dim + out_dim + width * k + k


def _mlp(in_shape: Sequence[int], out_dim: int, k: int, hidden: Sequence[int] = (64,),
         **_: Any) -> ExpertSize:
    width, params, acts = math.prod(in_shape), 0, math.prod(in_shape)
    for h in hidden:
        params += width * int(h) + int(h)
        acts += 2 * int(h)  # the linear's output and the ReLU's
        width = int(h)
    return ExpertSize(params + _heads(width, out_dim, k), 0, acts + out_dim + 2 * k)


def _cnn(in_shape: Sequence[int], out_dim: int, k: int, channels: Sequence[int] = (16, 32),
         kernel_size: int = 3, downsample: bool = True, **_: Any) -> ExpertSize:
    width = in_shape[0] if len(in_shape) == 3 else 1
    h, w = in_shape[-2], in_shape[-1]
    size = min(h, w)
    params, acts = 0, math.prod(in_shape)
    for i, c in enumerate(channels):
        params += width * int(c) * kernel_size * kernel_size + int(c)
        acts += 2 * int(c) * h * w
        if downsample and i < len(channels) - 1 and size >= 2:
            h, w, size = h // 2, w // 2, size // 2
        width = int(c)
    return ExpertSize(params + _heads(width, out_dim, k), 0, acts + out_dim + 2 * k)


def _steps(in_shape: Sequence[int]) -> int:
    return in_shape[0] if len(in_shape) == 2 else 1


def _esn(in_shape: Sequence[int], out_dim: int, k: int, units: int = 100, **_: Any
         ) -> ExpertSize:
    d = in_shape[-1]
    # float64 draws (uniform, mask), the scaled copy and complex eigenvalues' workspace
    return ExpertSize(_heads(units, out_dim, k), units * d + units * units + units,
                      3 * units * _steps(in_shape), 8 * units * units)


def _ltc(in_shape: Sequence[int], out_dim: int, k: int, units: int = 32, substeps: int = 6,
         **_: Any) -> ExpertSize:
    d = in_shape[-1]
    params = d * units + units + units * units + 2 * units
    return ExpertSize(params + _heads(units, out_dim, k), 0,
                      4 * units * substeps * _steps(in_shape))


#: The parameter count of each expert kind of :data:`liquid_fed.experts.EXPERTS`.
EXPERT_SIZES = {"mlp": _mlp, "cnn": _cnn, "esn": _esn, "ltc": _ltc}


def expert_size(kind: str, in_shape: Sequence[int], out_dim: int, n_experts: int,
                **options: Any) -> ExpertSize:
    """An expert's parameters, buffers and per-sample activations, counted from its options.

    Equals ``sum(p.numel() for p in expert.parameters())`` of the built expert (tested for
    every kind); nothing is allocated.

    Args:
        kind: a key of :data:`EXPERT_SIZES` (the registry of experts).
        in_shape: one sample of the expert's view.
        out_dim: classes or outputs.
        n_experts: K.
        **options: the kind's options as in the config (``hidden``, ``channels``, ``units``...).

    Returns:
        An :class:`ExpertSize`.

    Raises:
        ConfigError: an unknown kind.
    """
    if kind not in EXPERT_SIZES:
        raise ConfigError(f'experts.kind: got "{kind}"; accepted: {", ".join(EXPERT_SIZES)}')
    return EXPERT_SIZES[kind](tuple(int(s) for s in in_shape), int(out_dim), int(n_experts),
                              **options)


@dataclass(frozen=True)
class RunEstimate:
    """What one run needs: its experts' parameters and memory, and the limit it is held to."""

    parameters: int  # all K experts
    model_bytes: int  # parameters, gradients, optimizer state and buffers of all K experts
    activation_bytes: int  # one batch through all K experts
    build_bytes: int  # the largest expert while it is built
    limit: int
    limit_words: str

    @property
    def total(self) -> int:
        return self.model_bytes + self.activation_bytes + self.build_bytes

    def line(self, n_clients: int) -> str:
        """One line for ``liquid-fed validate``."""
        return (f"size: {n_clients} experts, {self.parameters:,} parameters: about "
                f"{format_bytes(self.model_bytes)} with gradients and optimizer state, "
                f"{format_bytes(self.activation_bytes)} of activations per batch; "
                f"{self.limit_words}")


def _options(cfg: RunConfig, index: int) -> tuple[str, dict[str, Any], str]:
    """Expert ``index``'s kind, options and config key, as ``build_client_expert`` merges them."""
    spec = cfg.experts.per_client[index] if cfg.experts.per_client else {}
    kind = spec.get("kind", cfg.experts.kind)
    options = {**(cfg.experts.options if "kind" not in spec else {}), **spec.get("options", {})}
    return kind, options, (f"experts.per_client[{index}]" if spec else "experts")


def run_estimate(cfg: RunConfig, view_shapes: Sequence[Sequence[int]], out_dim: int
                 ) -> RunEstimate:
    """The memory of a run's K experts, from the config and each view's shape.

    Per expert: parameters x (1 + 1 gradient + the optimizer's states) + buffers, in
    ``train.dtype``; plus the activations of one ``max(chunk_size, batch_size)`` batch through
    every expert (forward and backward), plus the largest expert's build-time scratch.

    An expert whose options or view the formula cannot count (an unknown kind, a CNN on a
    tabular view, ``hidden: "x"``) is left out: building it is the next check, and refuses it
    naming the key and the reason.
    """
    item = DTYPE_BYTES.get(cfg.train.dtype, 8)
    states = OPTIMIZER_STATES.get(cfg.optim.name, 2)
    if cfg.optim.name == "sgd" and not cfg.optim.momentum:
        states = 0
    batch = max(cfg.train.chunk_size, cfg.train.batch_size)
    params = model = acts = build = 0
    for k, shape in enumerate(view_shapes):
        kind, options, key = _options(cfg, k)
        try:
            size = expert_size(kind, shape, out_dim, cfg.n_clients, **options)
        except Exception as exc:  # noqa: BLE001 - options or a shape the build refuses
            # not counted: building this expert comes next and refuses it naming the key
            log.debug("%s: not counted (%s: %s)", key, type(exc).__name__, exc)
            continue
        params += size.parameters
        model += (size.parameters * (2 + states) + size.buffers) * item
        acts += 2 * batch * size.activations * item
        build = max(build, size.build * 8 + (size.parameters + size.buffers) * item)
    limit, words = memory_limit()
    return RunEstimate(params, model, acts, build, limit, words)


def check_run_size(cfg: RunConfig) -> RunEstimate:
    """Refuse a run whose experts cannot fit, before any expert is built.

    Loads the data (which checks its own size from the file's headers first) and cuts the
    views, then counts each expert's parameters from its options.

    Returns:
        The :class:`RunEstimate` (for ``liquid-fed validate`` to show).

    Raises:
        SizeError: naming ``experts`` (its hidden widths or units), the bytes and the limit.
    """
    from liquid_fed.federation import load_data, make_plan

    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    shapes = [plan.view_shape(k, ds.features.shape) for k in range(cfg.n_clients)]
    est = run_estimate(cfg, shapes, ds.n_outputs)
    if est.total > est.limit:
        kind, options, key = _options(cfg, 0)
        shown = {o: options[o] for o in ("hidden", "channels", "units") if o in options}
        setting = "; ".join(f"{key}.options.{o} = {v!r}" for o, v in shown.items()) or key
        raise SizeError(
            f"{setting}: the {cfg.n_clients} experts hold {est.parameters:,} parameters, "
            f"{format_bytes(est.model_bytes)} with gradients and optimizer state "
            f"({cfg.optim.name}, {cfg.train.dtype}), plus {format_bytes(est.activation_bytes)} "
            f"of activations per batch and {format_bytes(est.build_bytes)} to build one; "
            f"{est.limit_words}")
    return est


__all__ = ["ENV_MAX_MEMORY", "ExpertSize", "RunEstimate", "SizeError", "available_memory",
           "check_fits", "check_run_size", "csv_load_bytes", "expert_size", "format_bytes",
           "memory_limit", "npz_load_bytes", "parse_size", "run_estimate"]
