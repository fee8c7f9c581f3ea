"""One typed configuration tree for a run; YAML files and ``--set a.b=c`` only override it.

Every component owns a dataclass of its defaults. :func:`load_config` reads a YAML file,
applies ``key=value`` overrides and checks every key and value once, at the door: an unknown
key or a bad value raises :class:`ConfigError` naming its full dotted path, the value that
arrived and what is accepted. A resolved config writes back to YAML (``to_yaml``) so every run
can be replayed from its own ``config.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from liquid_fed.ensemble import LiquidConfig
from liquid_fed.errors import ConfigError, ParameterError
from liquid_fed.train import DTYPES, OPTIMIZERS

log = logging.getLogger(__name__)


#: How the server lines up the ids its clients hold with the labelled ones.
ALIGNMENTS = ("strict", "intersect")
#: What the server does with a reply that fails its checks (``federation.on_bad_reply``).
BAD_REPLY_ACTIONS = ("drop", "fail")
#: Injected failures (``federation.faults``): the client's process exits, blocks, or sends NaN.
FAULT_KINDS = ("crash", "hang", "nan")


@dataclass
class DataConfig:
    """Which data set, how it is split and standardised."""

    name: str = "digits"
    options: dict[str, Any] = field(default_factory=dict)
    val: float = 0.15
    test: float = 0.2
    standardize: bool = True
    align: str = "strict"  # strict: every labelled id must be held by every client; intersect


@dataclass
class ViewsConfig:
    """How the features are cut into one view per client."""

    kind: str = "patches"
    n_views: int = 4
    options: dict[str, Any] = field(default_factory=lambda: {"grid": [2, 2]})
    overlap: float = 0.0
    noise: float | list[float] = 0.0
    missing: float | list[float] = 0.0


@dataclass
class ExpertsConfig:
    """The expert every client hosts; ``per_client`` entries override kind/options per client."""

    kind: str = "mlp"
    options: dict[str, Any] = field(default_factory=lambda: {"hidden": [128]})
    per_client: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class OptimConfig:
    """The optimiser each client (and the centralized reference) uses."""

    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.0


@dataclass
class TrainConfig:
    """Length of training and how samples travel per round.

    A round sends one chunk of ``chunk_size`` training ids; each client then runs
    ``local_steps`` passes over the chunk in mini-batches of ``batch_size``.
    ``chunk_size == batch_size`` with ``local_steps == 1`` is exact split learning.
    """

    epochs: int = 30
    chunk_size: int = 256
    batch_size: int = 64
    local_steps: int = 1
    eval_every: int = 20  # rounds; 0 = only at the end
    checkpoint_every: int = 0  # rounds; 0 = only at the end
    dtype: str = "float32"


@dataclass
class SimulationConfig:
    """Flower's simulation engine on Ray.

    ``ray_address``: null (the default) starts a private Ray for the run and stops it after;
    ``HOST:PORT`` (the GCS address ``ray start --head`` prints) joins that running cluster
    instead, neither starting nor stopping it (``liquid-fed run --ray HOST:PORT`` sets it; see
    :mod:`simulations.simulate`). ``object_store_mb`` then does not apply: the cluster's nodes
    have their own stores. ``batch_messages``: each Ray actor owns a fixed share of the clients
    and gets one call per round carrying all their messages (:mod:`simulations.batching`; a
    client that hangs then holds up the clients after it in that call); false = Flower's one
    call per message.
    """

    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    object_store_mb: int = 256
    pull_interval: float = 0.001
    dispatch_poll: float = 0.005  # longest wait of the engine's dispatch loop; 0 = Flower's 0.1 s
    threads_per_client: int = 1  # torch threads in each client; tiny experts run best on one
    ray_address: str | None = None
    batch_messages: bool = True  # needs the fast dispatch loop (dispatch_poll > 0)

    def __post_init__(self) -> None:
        if self.ray_address is not None:
            self.ray_address = check_ray_address(self.ray_address)


#: HOST:PORT with a host name, an IPv4 address or a bracketed IPv6 address.
_RAY_ADDRESS = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(?P<port>\d{1,5})")


def check_ray_address(value: Any, key: str = "simulation.ray_address") -> str:
    """``value`` as a Ray cluster address ``HOST:PORT``, or a ConfigError naming ``key``.

    Args:
        value: what arrived (from YAML, ``--set`` or ``--ray``).
        key: the config key (or option) to name in the error.

    Returns:
        The address, stripped of surrounding blanks.

    Raises:
        ConfigError: not a string of the form HOST:PORT with 1 <= PORT <= 65535 (``ray://``
            addresses of Ray Client are refused: the simulation needs a driver on the cluster).
    """
    accepted = ("accepted: null (a private Ray per run) or HOST:PORT of a running cluster's "
                "head, as `ray start --head` prints it, e.g. 10.0.0.5:6379")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: got {value!r}; {accepted}")
    text = value.strip()
    if text.startswith("ray://"):
        raise ConfigError(f"{key}: got {value!r}; Ray Client (ray://) addresses are not "
                          f"supported, give the GCS address instead; {accepted}")
    match = _RAY_ADDRESS.fullmatch(text)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ConfigError(f"{key}: got {value!r}; {accepted}")
    return text


@dataclass
class ServerConfig:
    """Where the server computes the solve and the loss, and what replies it accepts."""

    device: str = "auto"
    threads: int = 1
    reply_limit: float = 1e6  # largest |prediction| or |delegation| a client reply may carry


@dataclass
class PrivacyConfig:
    """The defence on the gradients returned to clients (see :mod:`liquid_fed.privacy`).

    ``clip`` bounds the L2 norm of each sample's own gradient row; ``noise`` is the standard
    deviation of Gaussian noise added to every entry, in units of ``clip`` (absolute when
    ``clip`` is 0). Both 0: the exact gradients (labels are recoverable from them).
    """

    clip: float = 0.0
    noise: float = 0.0


@dataclass
class AvailabilityConfig:
    """Parties that miss training rounds (see :mod:`liquid_fed.availability`).

    ``dropout``: each party misses each training round with this probability (drawn from the
    run's seed and the round; at least one party answers every round). ``absent``: scheduled
    absences ``{client: K, from_round: A, to_round: B}``, rounds counted from 1, both ends
    included. A party absent from a round is not asked and its expert stays as it was.
    """

    dropout: float = 0.0
    absent: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FederationConfig:
    """How the server treats parties that fail during a run (see
    :mod:`liquid_fed.federation.loop`).

    ``reply_timeout``: seconds the server waits for the replies of one exchange; a party that
    has not answered by then (crashed, hung, unreachable) is absent for that round.
    ``setup_timeout``: the same for the start of a run and of a rejoining party (``hello``,
    ``setup``: a client's imports, data and expert are built then); at least
    ``reply_timeout``.
    ``min_clients``: the run goes on while at least this many parties answer a round, and
    fails naming the missing parties and why below that. ``on_bad_reply``: a reply that fails
    the server's checks (non-finite values, wrong shapes, other samples' ids) makes its party
    absent for the round (``drop``) or ends the run (``fail``). ``faults``: injected failures
    for tests and studies, ``{client: K, round: R, kind: crash | hang | nan}`` (training
    rounds counted from 1; ``hang`` takes ``seconds``, default three times ``reply_timeout``).
    """

    reply_timeout: float = 600.0
    setup_timeout: float = 600.0
    min_clients: int = 1
    on_bad_reply: str = "drop"
    faults: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BaselinesConfig:
    """Centralized references computed beside the run, for the summary."""

    uniform: bool = True
    independent: bool = True


@dataclass
class TrackingConfig:
    """Experiment trackers the run's server logs to (see :mod:`liquid_fed.tracking`); logging
    never changes a result.

    ``tensorboard``: event files in the run folder's ``tensorboard/`` (the ``tensorboard``
    extra). ``mlflow``: a tracking URI (the ``mlflow`` extra): ``sqlite:///PATH.db`` (a local
    store), ``http(s)://HOST[:PORT]`` (a tracking server), or a local folder / ``file:`` URI
    (MLflow's file store, which MLflow 3 accepts only under ``MLFLOW_ALLOW_FILE_STORE=true``).
    The experiment is the run's name (a study's name for its cells).
    """

    tensorboard: bool = False
    mlflow: str | None = None


@dataclass
class RunConfig:
    """A whole run."""

    name: str = "run"
    seed: int = 0
    out: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    ensemble: LiquidConfig = field(default_factory=LiquidConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    availability: AvailabilityConfig = field(default_factory=AvailabilityConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def n_clients(self) -> int:
        return self.views.n_views

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Choices and ranges checked at the door
# --------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.align": ALIGNMENTS,
    "optim.name": tuple(OPTIMIZERS),
    "train.dtype": tuple(DTYPES),
    "federation.on_bad_reply": BAD_REPLY_ACTIONS,
}
# key: (low, high, low_inclusive, high_inclusive); None = unbounded
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.val": (0, 1, True, False),
    "data.test": (0, 1, False, False),
    "views.n_views": (1, None, True, True),
    "views.overlap": (0, 1, True, False),
    "optim.lr": (0, None, False, True),
    "optim.weight_decay": (0, None, True, True),
    "optim.momentum": (0, 1, True, False),
    "seed": (0, 2**32 - 1, True, True),  # what numpy and torch seed from, for every draw
    "train.epochs": (0, None, True, True),
    "train.chunk_size": (1, None, True, True),
    "train.batch_size": (1, None, True, True),
    "train.local_steps": (1, None, True, True),
    "train.eval_every": (0, None, True, True),
    "train.checkpoint_every": (0, None, True, True),
    "simulation.num_cpus_per_client": (0, None, False, True),
    "simulation.num_gpus_per_client": (0, None, True, True),
    "simulation.object_store_mb": (75, None, True, True),
    "simulation.pull_interval": (0, None, False, True),
    "simulation.dispatch_poll": (0, 1, True, True),
    "simulation.threads_per_client": (1, None, True, True),
    "federation.reply_timeout": (0, None, False, True),
    "federation.setup_timeout": (0, None, False, True),
    "federation.min_clients": (1, None, True, True),
    "server.threads": (1, None, True, True),
    "server.reply_limit": (0, None, False, True),
    "privacy.clip": (0, None, True, True),
    "privacy.noise": (0, None, True, True),
    "availability.dropout": (0, 1, True, False),
}


def _describe_range(low, high, low_inc, high_inc) -> str:
    left = "[" if low_inc else "("
    right = "]" if high_inc else ")"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _in_range(value: float, low, high, low_inc, high_inc) -> bool:
    if low is not None and (value < low or (value == low and not low_inc)):
        return False
    return not (high is not None and (value > high or (value == high and not high_inc)))


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with dotted-path errors
# --------------------------------------------------------------------------------------------


class _TypeMismatch(ConfigError):
    """A value of the wrong type (a union tries its next member); other errors are final."""


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check (and gently coerce) ``value`` against a type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, path)
            except _TypeMismatch:
                continue  # another member of the union may take it
        raise _TypeMismatch(f"{path}: got {value!r}, which is none of {_type_name(annotation)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(f"{path}: got {value!r}; expected a list")
        return [_coerce(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _TypeMismatch(f"{path}: got {value!r}; expected a mapping")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch(f"{path}: got {value!r}; expected true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _TypeMismatch(f"{path}: got {value!r}; expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _TypeMismatch(f"{path}: got {value!r}; expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: got {value!r}; expected a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _TypeMismatch(f"{path}: got {value!r}; expected a string")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    return value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: got {data!r}; expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("config", True)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(
            f'unknown config key "{where}" (accepted under {prefix or "the top level"}: '
            f"{', '.join(fields)})"
        )
    values = {}
    for name in fields:
        if name in data:
            path = f"{prefix}.{name}" if prefix else name
            values[name] = _coerce(data[name], hints[name], path)
    try:
        return cls(**values)
    except ParameterError as exc:  # a section that checks itself (the ensemble's LiquidConfig)
        raise ConfigError(exc.render(f"{prefix}.{exc.name}" if prefix else exc.name)) from exc


def _to_dict(obj: Any) -> Any:
    """Plain data of a config tree, leaving out fields that are no config keys."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("config", True)}
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


def _check(cfg: RunConfig) -> None:
    flat = _flatten(cfg.to_dict())
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f'{key}: got "{flat[key]}"; accepted: {", ".join(choices)}')
    for key, bounds in _RANGES.items():
        if not _in_range(flat[key], *bounds):
            raise ConfigError(f"{key}: got {flat[key]!r}; must lie in {_describe_range(*bounds)}")
    if cfg.data.val + cfg.data.test >= 1:
        raise ConfigError(
            f"data.val + data.test: got {cfg.data.val} + {cfg.data.test}; must be < 1"
        )
    if cfg.train.batch_size > cfg.train.chunk_size:
        raise ConfigError(
            f"train.batch_size: got {cfg.train.batch_size}; must be <= train.chunk_size "
            f"({cfg.train.chunk_size})"
        )
    if cfg.experts.per_client and len(cfg.experts.per_client) != cfg.views.n_views:
        raise ConfigError(
            f"experts.per_client: got {len(cfg.experts.per_client)} entries; needs one per "
            f"client (views.n_views = {cfg.views.n_views})"
        )
    for i, entry in enumerate(cfg.experts.per_client):
        unknown = sorted(set(entry) - {"kind", "options"})
        if unknown:
            raise ConfigError(
                f'unknown config key "experts.per_client[{i}].{unknown[0]}" '
                "(accepted: kind, options)"
            )
    _check_absent(cfg.availability.absent, cfg.views.n_views)
    if cfg.federation.min_clients > cfg.n_clients:
        raise ConfigError(f"federation.min_clients: got {cfg.federation.min_clients}; must be "
                          f"<= the number of clients (views.n_views = {cfg.n_clients})")
    _check_faults(cfg.federation.faults, cfg.views.n_views)
    if not _DEVICE.fullmatch(cfg.server.device):
        raise ConfigError(
            f'server.device: got "{cfg.server.device}"; accepted: auto, cpu, cuda, cuda:N'
        )
    if not _NAME.fullmatch(cfg.name):
        raise ConfigError(
            f"name: got {cfg.name!r}; a run name is one folder name inside `out`: letters, "
            "digits, '.', '_' and '-', not starting with '.' (at most 128 characters)"
        )
    _check_tracking(cfg.tracking)
    bad = _non_finite(cfg.to_dict())
    if bad:
        raise ConfigError(f"{bad[0][0]}: got {bad[0][1]!r}; numbers in a config must be finite")


#: URI schemes ``tracking.mlflow`` accepts (no scheme: a local folder).
MLFLOW_SCHEMES = ("sqlite", "http", "https", "file")


def _check_tracking(tracking: TrackingConfig) -> None:
    """``tracking.mlflow``: None or a URI of an accepted scheme. (Whether the extras are
    installed is checked where the run starts, :func:`liquid_fed.tracking.check_tracking`:
    the clients read this config too and need neither.)"""
    uri = tracking.mlflow
    if uri is None:
        return
    if not isinstance(uri, str):  # the annotation's None admits anything else through
        raise ConfigError(f"tracking.mlflow: got {uri!r}; expected a URI string or null")
    accepted = ("sqlite:///PATH.db, http(s)://HOST[:PORT], file:///PATH or a local folder")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    if not uri.strip() or (scheme is not None and scheme[1].lower() not in MLFLOW_SCHEMES):
        raise ConfigError(f"tracking.mlflow: got {uri!r}; accepted: {accepted}, or null")
    if scheme is not None and scheme[1].lower() in ("http", "https") and not uri.split(
            "://", 1)[1].strip("/"):
        raise ConfigError(f"tracking.mlflow: got {uri!r}, which names no host; accepted: "
                          f"{accepted}")
    if scheme is not None and scheme[1].lower() == "sqlite" and not uri.startswith(
            "sqlite:///"):
        raise ConfigError(f"tracking.mlflow: got {uri!r}; a SQLite store is "
                          "sqlite:///relative/path.db or sqlite:////absolute/path.db")


_ABSENT_KEYS = ("client", "from_round", "to_round")


def _check_absent(absent: list[dict[str, Any]], k: int) -> None:
    """``availability.absent``: complete entries, clients in range, ``1 <= from <= to``, and no
    round in which every client is scheduled away."""
    for i, entry in enumerate(absent):
        where = f"availability.absent[{i}]"
        _check_entry_keys(entry, where, _ABSENT_KEYS, (), "an absence")
        for key in _ABSENT_KEYS:
            _int_field(entry, key, where)
        if not 0 <= entry["client"] < k:
            raise ConfigError(f"{where}.client: got {entry['client']}; must lie in [0, {k - 1}] "
                              f"(views.n_views = {k})")
        if entry["from_round"] < 1:
            raise ConfigError(f"{where}.from_round: got {entry['from_round']}; rounds are "
                              "counted from 1")
        if entry["to_round"] < entry["from_round"]:
            raise ConfigError(f"{where}.to_round: got {entry['to_round']}; must be >= "
                              f"from_round ({entry['from_round']})")
    # If every client is away in some round, it is so at the latest start among the windows
    # that cover that round: checking every window's start is enough.
    for entry in absent:
        r = entry["from_round"]
        away = {e["client"] for e in absent if e["from_round"] <= r <= e["to_round"]}
        if len(away) == k:
            raise ConfigError(f"availability.absent: every client is scheduled absent in round "
                              f"{r}; at least one must answer every round")


def _check_entry_keys(entry: Any, where: str, required: tuple[str, ...],
                      optional: tuple[str, ...], what: str) -> None:
    """One entry of a list of mappings: a mapping, no unknown key, every required key."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: got {entry!r}; expected a mapping with "
                          f"{', '.join(required)}")
    unknown = sorted(set(entry) - {*required, *optional}, key=str)
    if unknown:
        raise ConfigError(f'unknown config key "{where}.{unknown[0]}" (accepted: '
                          f"{', '.join((*required, *optional))})")
    lacking = [key for key in required if key not in entry]
    if lacking:
        raise ConfigError(f"{where}: got {entry!r}, which lacks {', '.join(lacking)}; "
                          f"{what} needs {', '.join(required[:-1])} and {required[-1]}")


def _int_field(entry: dict[str, Any], key: str, where: str) -> int:
    value = entry[key]
    if isinstance(value, float) and value.is_integer():
        value = entry[key] = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key}: got {value!r}; expected an integer")
    return value


def _check_faults(faults: list[dict[str, Any]], k: int) -> None:
    """``federation.faults``: complete entries, clients in range, rounds from 1, known kinds,
    at most one fault per client and round."""
    seen: set[tuple[int, int]] = set()
    for i, entry in enumerate(faults):
        where = f"federation.faults[{i}]"
        _check_entry_keys(entry, where, _FAULT_KEYS, ("seconds",), "a fault")
        client, round_number = _int_field(entry, "client", where), _int_field(entry, "round",
                                                                              where)
        if not 0 <= client < k:
            raise ConfigError(f"{where}.client: got {client}; must lie in [0, {k - 1}] "
                              f"(views.n_views = {k})")
        if round_number < 1:
            raise ConfigError(f"{where}.round: got {round_number}; rounds are counted from 1")
        if entry["kind"] not in FAULT_KINDS:
            raise ConfigError(f"{where}.kind: got {entry['kind']!r}; accepted: "
                              f"{', '.join(FAULT_KINDS)}")
        if "seconds" in entry:
            seconds = entry["seconds"]
            if entry["kind"] != "hang":
                raise ConfigError(f"{where}.seconds: only a hang lasts seconds (kind is "
                                  f"{entry['kind']!r})")
            if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                    or not math.isfinite(seconds) or seconds <= 0):
                raise ConfigError(f"{where}.seconds: got {seconds!r}; expected a positive "
                                  "number")
        if (client, round_number) in seen:
            raise ConfigError(f"{where}: client {client} already has a fault in round "
                              f"{round_number}; one fault per client and round")
        seen.add((client, round_number))


_FAULT_KEYS = ("client", "round", "kind")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _non_finite(value: Any, path: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every NaN or infinite number, options included."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(path, value)]
    if isinstance(value, dict):
        return [hit for k, v in value.items()
                for hit in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in _non_finite(v, f"{path}[{i}]")]
    return []


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and key not in ("options",):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


#: A config is small: larger files, or YAML whose aliases expand beyond this many nodes (a
#: "billion laughs" bomb), are refused before anything walks them.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class _DuplicateKey(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key written twice in one mapping (PyYAML keeps the
    last silently, so a typo'd copy of a section would win without a word). Keys brought in by
    a ``<<`` merge may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML reports it itself
                continue
            if first is not None:
                raise _DuplicateKey(f"key {key!r} appears twice in one mapping (lines "
                                    f"{first.line + 1} and {key_node.start_mark.line + 1}); "
                                    "write it once")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses oversized text, duplicate keys and alias expansion
    beyond a budget.

    Raises:
        ConfigError: invalid YAML, too large, or aliases expanding beyond
            :data:`MAX_YAML_NODES` nodes (also recursive aliases); names ``where``.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is {len(text)} bytes; a config holds at most "
                          f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where} nests too deeply") from exc
    budget = [MAX_YAML_NODES]

    def walk(node: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or depth > 100:
            raise ConfigError(f"{where}: its YAML aliases expand beyond {MAX_YAML_NODES} nodes "
                              "or 100 levels (an alias bomb or a recursive alias); write the "
                              "values out")
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                walk(v, depth + 1)

    walk(data, 0)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f'override "{text}" must look like key.path=value')
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f'override "{text}" has an empty key part')
    value = safe_yaml(raw, f'override "{text}": value') if raw.strip() else ""
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in a nested dict (creating levels as needed)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f'override "{text}": "{part}" is not a section')
            node = child
        node[parts[-1]] = value
    return data


def build_config(data: dict[str, Any] | None = None, overrides: list[str] = ()) -> RunConfig:
    """A validated :class:`RunConfig` from a nested dict plus overrides."""
    # A deep copy: overrides must not write into the caller's nested sections.
    data = _migrate(copy.deepcopy(dict(data or {})))
    data = apply_overrides(data, list(overrides))
    cfg = _build(RunConfig, data)
    _check(cfg)
    return cfg


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Keys of earlier versions, moved to their present place (run folders written before keep
    resuming): ``simulation.timeout`` is ``federation.reply_timeout``."""
    simulation = data.get("simulation")
    if isinstance(simulation, dict) and "timeout" in simulation:
        federation = data.setdefault("federation", {})
        if isinstance(federation, dict) and "reply_timeout" not in federation:
            federation["reply_timeout"] = simulation.pop("timeout")
            log.warning("simulation.timeout is now federation.reply_timeout; taken as that")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Args:
        path: a YAML file whose keys override the defaults of :class:`RunConfig`.
        overrides: ``key.path=value`` strings applied after the file.

    Returns:
        The resolved, validated config.

    Raises:
        ConfigError: for a missing/unreadable file, invalid YAML, an unknown key or a bad value,
            naming the dotted key, the value and what is accepted.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (or is not a file)")
        where = f"config file {str(path)!r}"
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{where} is {path.stat().st_size} bytes; a config holds at "
                                  f"most {MAX_CONFIG_BYTES} bytes")
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where} cannot be read: {exc}") from exc
        data = safe_yaml(text, where) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return build_config(data, overrides)


def config_from_yaml_text(text: str) -> RunConfig:
    """Rebuild a config sent as YAML text (as the server sends it to clients)."""
    data = safe_yaml(text, "config text") or {}
    if not isinstance(data, dict):
        raise ConfigError("config text must hold a mapping at the top level")
    return build_config(data)
