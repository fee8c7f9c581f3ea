"""The federated Liquid Ensemble protocol, independent of any transport.

Labels stay at the server. Each round:

1. the server picks a chunk of training ids (the same permutation as the centralized
   reference, :func:`liquid_fed.train.batch_order`);
2. every client returns its expert's predictions (n, C) and delegation vectors (n, K) on them;
3. the server stacks them, solves the powers, computes the loss and sends each client the
   gradient of the loss with respect to its own outputs;
4. each client back-propagates those signals through its expert over mini-batches of the chunk
   (``local_steps`` passes) and steps its optimizer.

Steps 4 of round t and 2 of round t+1 travel in one message, so a training round costs one
round trip. With ``chunk_size == batch_size`` and one local step this is exact split learning
and reproduces centralized :func:`liquid_fed.train.fit` step by step. Larger chunks reuse the
signals for several local steps (as FedBCD does) to cut round trips.

Clients are driven by :func:`handle_client_message`, a pure function of (message kind, arrays,
settings, persisted state) -> (reply arrays, new state). The Flower ClientApp and the
in-process :class:`LocalTransport` both call it; the server loop :func:`run_federation` talks to
any object with the :class:`Transport` methods.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from liquid_fed.config import RunConfig, config_from_yaml_text
from liquid_fed.data import (
    Dataset,
    Splits,
    Standardizer,
    align_ids,
    common_ids,
    load_dataset,
    make_views,
    split_ids,
)
from liquid_fed.data.views import ViewPlan
from liquid_fed.ensemble import LiquidConfig, combine, ensemble_loss
from liquid_fed.errors import ClientFailure, ConfigError, DataError, LiquidFedError
from liquid_fed.experts import Expert, build_expert
from liquid_fed.metrics import evaluate_output, per_sample_error
from liquid_fed.privacy import GradientDefence, LabelLeakage
from liquid_fed.replies import (
    check_prediction_reply,
    check_setup_reply,
    check_signals,
    check_state_reply,
    ids_digest,
)
from liquid_fed.rundir import METRICS_FILE, OUTPUTS_FILE, Checkpoint, RunDir
from liquid_fed.train import batch_order, make_optimizer

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --------------------------------------------------------------------------------------------
# Data on each side
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _dataset(name: str, options_json: str) -> Dataset:
    return load_dataset(name, **json.loads(options_json))


def load_data(cfg: RunConfig) -> Dataset:
    """The run's data set (cached per process: simulation actors serve many clients)."""
    try:
        return _dataset(cfg.data.name, json.dumps(cfg.data.options, sort_keys=True))
    except (ValueError, TypeError) as exc:
        if isinstance(exc, LiquidFedError) and str(exc).startswith("data"):
            raise
        raise DataError(f"data: {exc}") from exc


def make_plan(cfg: RunConfig, ds: Dataset) -> ViewPlan:
    """The run's views, reproducible from ``cfg.seed``."""
    v = cfg.views
    try:
        return make_views(ds, v.kind, v.n_views, seed=cfg.seed, overlap=v.overlap,
                          noise=v.noise, missing=v.missing, **v.options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"views: {exc}") from exc


class IdIndex:
    """Row positions of sample ids, vectorised (sorted ids + searchsorted)."""

    def __init__(self, ids: np.ndarray, holder: str) -> None:
        self.order = np.argsort(ids, kind="stable")
        self.sorted = np.asarray(ids)[self.order]
        self.holder = holder

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids``; an unknown id is an error naming it."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.sorted.size == 0:
            if ids.size:
                raise ValueError(f"{self.holder} does not hold sample id {int(ids[0])}")
            return ids
        at = np.searchsorted(self.sorted, ids).clip(0, self.sorted.size - 1)
        known = self.sorted[at] == ids
        if not known.all():
            raise ValueError(f"{self.holder} does not hold sample id {int(ids[~known][0])}")
        return self.order[at]


@dataclass
class ClientView:
    """What one client holds: ids and its own (standardised) features, never labels."""

    ids: np.ndarray  # (N,) int64
    x: np.ndarray  # (N, *view_shape)
    present: np.ndarray  # (N,) bool: rows this view really has
    scaler: Standardizer | None = None

    def __post_init__(self) -> None:
        self._index = IdIndex(self.ids, "client")

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids``; an unknown id is an error naming it."""
        return self._index.rows(ids)


def load_client_view(cfg: RunConfig, index: int, train_ids: np.ndarray | None) -> ClientView:
    """Client ``index``'s view of the data, standardised on the training ids only."""
    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    x = plan.apply(ds, index)
    present = plan.present(ds, index)
    scaler = None
    if cfg.data.standardize and train_ids is not None:
        pos = ds.positions(np.asarray(train_ids))
        pos = pos[present[pos]]
        scaler = Standardizer(ds.layout).fit(x[pos])
        x = scaler.transform(x)
        x[~present] = 0.0
    return ClientView(ids=ds.ids.copy(), x=np.ascontiguousarray(x, dtype=np.float32),
                      present=present, scaler=scaler)


@dataclass
class ServerData:
    """What the server holds: ids, labels and the splits."""

    ids: np.ndarray
    labels: np.ndarray
    task: str
    n_outputs: int
    splits: Splits
    informative: np.ndarray | None = None  # ground truth of synthetic tasks, for evaluation
    regions: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._index = IdIndex(self.ids, "server")

    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        return self.labels[self._index.rows(ids)]

    def informative_of(self, ids: np.ndarray) -> np.ndarray | None:
        if self.informative is None:
            return None
        return self.informative[self._index.rows(ids)]

    def regions_of(self, ids: np.ndarray) -> np.ndarray | None:
        if self.regions is None:
            return None
        return self.regions[self._index.rows(ids)]


def load_server_data(cfg: RunConfig) -> ServerData:
    """Labels and splits (stratified by label for classification) from the config."""
    ds = load_data(cfg)
    splits = split_ids(ds, cfg.data.val, cfg.data.test, cfg.seed)
    informative = None
    natural = cfg.views.kind == "natural" or (cfg.views.kind == "groups" and not cfg.views.options)
    if ds.informative_view is not None and natural:
        informative = ds.informative_view.copy()  # view k is group k
    regions = None if ds.regions is None else ds.regions.copy()
    return ServerData(ds.ids.copy(), ds.labels.copy(), ds.task, ds.n_outputs, splits,
                      informative, regions)


def drop_unseen(splits: Splits, absent: Sequence[np.ndarray]) -> Splits:
    """Remove ids that no client holds (every view misses them): nobody can predict them."""
    unseen = absent[0]
    for a in absent[1:]:
        unseen = np.intersect1d(unseen, a)
    if unseen.size == 0:
        return splits
    log.warning("%d sample ids are missing from every view and are left out: %s",
                unseen.size, unseen[:5].tolist())
    return Splits(*(s[~np.isin(s, unseen)] for s in (splits.train, splits.val, splits.test)))


def build_client_expert(cfg: RunConfig, index: int, in_shape: Sequence[int],
                        out_dim: int) -> Expert:
    """Client ``index``'s expert, initialised from (seed, index) so every path builds the same."""
    spec = cfg.experts.per_client[index] if cfg.experts.per_client else {}
    kind = spec.get("kind", cfg.experts.kind)
    options = {**(cfg.experts.options if "kind" not in spec else {}), **spec.get("options", {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 100_003 + index)
        try:
            expert = build_expert(kind, in_shape, out_dim, cfg.n_clients, index, **options)
        except (ValueError, TypeError) as exc:
            where = f"experts.per_client[{index}]" if spec else "experts"
            raise ConfigError(f"{where}: {exc}") from exc
    return expert.to(DTYPES[cfg.train.dtype])


def liquid_config(cfg: RunConfig, task: str) -> LiquidConfig:
    """The ensemble settings of a run."""
    return LiquidConfig(task=task, **vars(cfg.ensemble))


# --------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------


OPT_GROUPS = "optimizer/groups"


def state_to_arrays(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Arrays:
    """Expert parameters and optimizer state as flat numpy arrays (no pickling).

    Tensors of the optimizer state become ``optimizer/<param>/<name>`` arrays; its param
    groups and non-tensor entries travel as JSON text in ``optimizer/groups``.
    """
    arrays = {f"model/{k}": v.detach().cpu().numpy().copy()
              for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for idx, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                arrays[f"optimizer/{idx}/{name}"] = value.detach().cpu().numpy().copy()
            else:
                scalars[f"{idx}/{name}"] = value
    text = json.dumps({"groups": opt["param_groups"], "scalars": scalars})
    arrays[OPT_GROUPS] = np.frombuffer(text.encode(), dtype=np.uint8).copy()
    return arrays


def arrays_to_state(arrays: Arrays, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`state_to_arrays` wrote."""
    module.load_state_dict({k[6:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
                            if k.startswith("model/")})
    meta = json.loads(arrays[OPT_GROUPS].tobytes().decode())
    state: dict[int, dict[str, Any]] = {}
    for key, value in arrays.items():
        if key.startswith("optimizer/") and key != OPT_GROUPS:
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = torch.from_numpy(np.array(value))
    for key, value in meta["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["groups"]})


@dataclass
class ClientRuntime:
    """A client's live objects, rebuilt from the persisted state for each message."""

    cfg: RunConfig
    cfg_text: str
    index: int
    view: ClientView
    expert: Expert
    optimizer: torch.optim.Optimizer
    out_dim: int


@lru_cache(maxsize=16)
def _parse_config(text: str) -> RunConfig:
    return config_from_yaml_text(text)


@lru_cache(maxsize=64)
def _cached_view(cfg_yaml: str, index: int, train_key: bytes) -> ClientView:
    train = np.frombuffer(train_key, dtype=np.int64) if train_key else None
    return load_client_view(_parse_config(cfg_yaml), index, train)


# Live runtimes of this process, reused only while their version matches the persisted
# state's: in simulation one actor serves many messages and skips the rebuild; in deployment
# every message is a new process and restores from the persisted state.
_LIVE: dict[tuple[str, int], tuple[int, ClientRuntime]] = {}


def _version(state: Arrays) -> int:
    return int(state["version"][0]) if "version" in state else -1


def _runtime(settings: dict[str, Any], state: Arrays) -> ClientRuntime:
    index = int(settings["index"])
    key = (settings["config"], index)
    live = _LIVE.get(key)
    if live is not None and live[0] == _version(state) and "version" in state:
        return live[1]
    cfg = _parse_config(settings["config"])
    out_dim = int(settings["out_dim"])
    view = _cached_view(settings["config"], index, state["train_ids"].tobytes())
    expert = build_client_expert(cfg, index, view.in_shape, out_dim)
    opt = make_optimizer(cfg.optim.name, expert.parameters(), cfg.optim.lr,
                         cfg.optim.weight_decay, cfg.optim.momentum)
    if OPT_GROUPS in state:
        arrays_to_state(state, expert, opt)
    return ClientRuntime(cfg, settings["config"], index, view, expert, opt, out_dim)


def _persist(rt: ClientRuntime, state: Arrays) -> Arrays:
    """New persisted state after an update; the live runtime is remembered under its version."""
    version = secrets.randbits(62)
    new = {**state, **state_to_arrays(rt.expert, rt.optimizer),
           "version": np.array([version], dtype=np.int64)}
    if len(_LIVE) > 256:  # runs of the past in a long-lived process
        _LIVE.clear()
    _LIVE[(rt.cfg_text, rt.index)] = (version, rt)
    return new


def _client_forward(rt: ClientRuntime, ids: np.ndarray, train: bool) -> Arrays:
    rows = rt.view.rows(ids)
    dtype = DTYPES[rt.cfg.train.dtype]
    rt.expert.train(train)
    with torch.no_grad():
        x = torch.from_numpy(rt.view.x[rows]).to(dtype)
        pred, dele = rt.expert(x)
    return {"pred": pred.numpy(), "del": dele.numpy(), "present": rt.view.present[rows],
            "ids_digest": ids_digest(ids)}


def _client_backward(rt: ClientRuntime, ids: np.ndarray, g_pred: np.ndarray,
                     g_del: np.ndarray, round_index: int) -> None:
    """Back-propagate the server's signals through the expert over mini-batches of the chunk."""
    rows = rt.view.rows(ids)
    check_signals({"g_pred": g_pred, "g_del": g_del}, len(rows), rt.out_dim, rt.cfg.n_clients)
    dtype = DTYPES[rt.cfg.train.dtype]
    train = rt.cfg.train
    keep = torch.from_numpy(rt.view.present[rows]).to(dtype).unsqueeze(-1)  # (n, 1)
    g_pred_t = torch.from_numpy(g_pred).to(dtype) * keep
    g_del_t = torch.from_numpy(g_del).to(dtype) * keep
    x_all = torch.from_numpy(rt.view.x[rows]).to(dtype)
    n = len(rows)
    rt.expert.train()
    for step in range(train.local_steps):
        for sub in batch_order(n, train.batch_size, step, rt.cfg.seed * 7919 + round_index):
            if train.local_steps == 1 and n <= train.batch_size:
                sub = np.arange(n)  # exact split learning: the chunk as it came
            idx = torch.as_tensor(sub)
            pred, dele = rt.expert(x_all[idx])
            # The signals are d(mean loss over the chunk)/d(output); rescale so that every
            # mini-batch step sees the gradient of its own mean loss.
            scale = n / len(sub)
            surrogate = scale * ((pred * g_pred_t[idx]).sum() + (dele * g_del_t[idx]).sum())
            rt.optimizer.zero_grad(set_to_none=True)
            surrogate.backward()
            rt.optimizer.step()


def handle_client_message(kind: str, arrays: Arrays, settings: dict[str, Any],
                          state: Arrays) -> tuple[Arrays, dict[str, Any], Arrays]:
    """One client step: (kind, arrays, settings, persisted state) -> (reply, info, new state).

    Kinds:
        ``setup``: ``settings`` holds ``config`` (YAML), ``index``, ``out_dim``; ``arrays``
            holds ``train_ids`` and optionally a checkpoint (``model/*``, ``optimizer``).
            Replies with the ids the client holds and its parameter count.
        ``train`` / ``evaluate``: optionally applies pending signals (``bwd_ids``,
            ``g_pred``, ``g_del``) for round ``settings["round"]``, then returns predictions
            and delegations on ``fwd_ids`` (if given).
        ``checkpoint``: applies pending signals, then returns the expert and optimizer state.
    """
    if kind == "setup":
        state = {"train_ids": np.asarray(arrays["train_ids"], dtype=np.int64)}
        for key, value in arrays.items():
            if key.startswith(("model/", "optimizer/")):
                state[key] = value
        settings_state = {k: settings[k] for k in ("config", "index", "out_dim")}
        rt = _runtime(settings_state, state)
        state = _persist(rt, state)
        info = {"n_params": rt.expert.n_parameters(), "in_shape": list(rt.view.in_shape),
                **settings_state}
        return {"ids": rt.view.ids, "absent": rt.view.ids[~rt.view.present]}, info, state
    if "config" not in settings:
        raise ValueError(f'client received "{kind}" before "setup"')
    rt = _runtime(settings, state)
    if "bwd_ids" in arrays:
        _client_backward(rt, arrays["bwd_ids"], arrays["g_pred"], arrays["g_del"],
                         int(settings.get("round", 0)))
        state = _persist(rt, state)
    reply: Arrays = {}
    if kind in ("train", "evaluate") and "fwd_ids" in arrays:
        reply = _client_forward(rt, arrays["fwd_ids"], train=kind == "train")
    elif kind == "checkpoint":  # the persisted state is already the latest
        reply = {k: v for k, v in state.items() if k.startswith(("model/", "optimizer/"))}
    elif kind not in ("train", "evaluate"):
        raise ValueError(f'unknown client message kind "{kind}" '
                         "(accepted: setup, train, evaluate, checkpoint)")
    return reply, {}, state


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainStep(NamedTuple):
    """A training round's result at the server."""

    loss: float
    signals: list[Arrays]  # per client: g_pred (n, C), g_del (n, K), as sent


class Evaluation(NamedTuple):
    """An evaluated split: metrics and the per-sample outputs behind them."""

    metrics: dict[str, float]
    details: Arrays  # ids, power (n, K), delegation (n, K, K), error (n,), labels, truth


class ServerStep:
    """Combines the clients' outputs, computes loss, signals and metrics on the server.

    The replies it is given have passed :func:`liquid_fed.replies.check_prediction_reply`.
    """

    def __init__(self, cfg: RunConfig, data: ServerData) -> None:
        self.cfg = cfg
        self.data = data
        self.liquid = liquid_config(cfg, data.task)
        self.device = resolve_device(cfg.server.device)
        self.dtype = DTYPES[cfg.train.dtype]
        self.defence = GradientDefence(cfg.privacy.clip, cfg.privacy.noise, cfg.seed)

    def _target(self, ids: np.ndarray) -> Tensor:
        y = torch.from_numpy(np.asarray(self.data.labels_of(ids)))
        if self.data.task == "classification":
            return y.long().to(self.device)
        return y.to(self.dtype).to(self.device)

    def _stack(self, replies: Sequence[Arrays], grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        preds = torch.stack([torch.from_numpy(r["pred"]) for r in replies], 1)  # (B, K, C)
        dels = torch.stack([torch.from_numpy(r["del"]) for r in replies], 1)  # (B, K, K)
        present = torch.stack([torch.from_numpy(np.asarray(r["present"], dtype=bool))
                               for r in replies], 1)  # (B, K)
        preds = preds.to(self.device, self.dtype).requires_grad_(grad)
        dels = dels.to(self.device, self.dtype).requires_grad_(grad)
        return preds, dels, present.to(self.device)

    def train_step(self, ids: np.ndarray, replies: Sequence[Arrays],
                   round_index: int = 0) -> TrainStep:
        """Loss on the chunk and each client's signals ``g_pred`` (n, C), ``g_del`` (n, K),
        after the configured defence (``privacy``)."""
        preds, dels, present = self._stack(replies, grad=True)
        mask = None if bool(present.all()) else present
        out = combine(preds, dels, self.liquid, mask)
        loss = ensemble_loss(out, self._target(ids), self.liquid)
        g_pred, g_del = torch.autograd.grad(loss, (preds, dels), allow_unused=True)
        if g_del is None:  # the uniform vote ignores delegations: nothing to learn there
            g_del = torch.zeros_like(dels)
        if not (torch.isfinite(loss) and torch.isfinite(g_pred).all()
                and torch.isfinite(g_del).all()):
            raise ClientFailure(f"round {round_index}: the loss or its gradient is not finite "
                                f"(loss {float(loss.detach()):.6g}) although every reply passed "
                                "its checks; lower optim.lr or check the data")
        signals = [{"g_pred": g_pred[:, k].cpu().numpy(), "g_del": g_del[:, k].cpu().numpy()}
                   for k in range(len(replies))]
        return TrainStep(float(loss.detach()), self.defence.apply(signals, round_index))

    def evaluate(self, ids: np.ndarray, replies: Sequence[Arrays],
                 n_params: Sequence[int]) -> Evaluation:
        """Loss and metrics of the ensemble on ``ids``, and the per-sample outputs behind them
        (ids, power (n, K), delegation (n, K, K), error (n,), labels, and the ground truth
        ``informative`` / ``regions`` where the data set has it)."""
        with torch.no_grad():
            preds, dels, present = self._stack(replies, grad=False)
            mask = None if bool(present.all()) else present
            out = combine(preds, dels, self.liquid, mask)
            target = self._target(ids)
            metrics = evaluate_output(out, target, self.data.task, n_params)
            metrics["loss"] = float(ensemble_loss(out, target, self.liquid))
            details: Arrays = {
                "ids": np.asarray(ids), "power": out.power.cpu().numpy(),
                "delegation": out.delegation.cpu().numpy(),
                "error": per_sample_error(out, target, self.data.task).cpu().numpy(),
                "labels": np.asarray(self.data.labels_of(ids)),
            }
            truth = self.data.informative_of(ids)
            if truth is not None:
                top = out.power.argmax(-1).cpu().numpy()
                metrics["informative_top_power"] = float(np.mean(top == truth))
                details["informative"] = truth
            if self.data.regions is not None:
                details["regions"] = self.data.regions_of(ids)
        return Evaluation(metrics, details)


# --------------------------------------------------------------------------------------------
# Transport and the round loop
# --------------------------------------------------------------------------------------------


def payload_bytes(arrays: Arrays, settings: dict[str, Any] | None = None) -> int:
    """Bytes a message carries: array data plus the text of its settings."""
    total = sum(int(np.asarray(a).nbytes) for a in arrays.values())
    if settings:
        total += sum(len(str(k)) + len(str(v)) for k, v in settings.items())
    return total


class Transport(Protocol):
    """How the server reaches its K clients (Flower's Grid, or in-process for tests)."""

    def exchange(self, kind: str, arrays: Sequence[Arrays],
                 settings: Sequence[dict[str, Any]]) -> list[tuple[Arrays, dict[str, Any]]]:
        """Send one message per client (list index = client index); replies in that order."""
        ...


def describe_client(transport: Transport, k: int) -> str:
    """How errors name client ``k``: the transport's own words (e.g. with its node id)."""
    describe = getattr(transport, "describe", None)
    return describe(k) if describe is not None else f"client {k}"


class LocalTransport:
    """Clients as in-process state dicts; runs the exact client code without Flower."""

    def __init__(self, n_clients: int) -> None:
        self.states: list[Arrays] = [{} for _ in range(n_clients)]
        self.settings: list[dict[str, Any]] = [{} for _ in range(n_clients)]

    def exchange(self, kind: str, arrays: Sequence[Arrays],
                 settings: Sequence[dict[str, Any]]) -> list[tuple[Arrays, dict[str, Any]]]:
        replies = []
        for k, (a, s) in enumerate(zip(arrays, settings, strict=True)):
            merged = {**self.settings[k], **s}
            reply, info, self.states[k] = handle_client_message(kind, a, merged, self.states[k])
            if kind == "setup":
                self.settings[k] = {key: merged[key] for key in ("config", "index", "out_dim")}
            replies.append((reply, info))
        return replies


@dataclass
class RoundInfo:
    """What the progress display shows after each round."""

    round: int
    total_rounds: int
    epoch: float
    loss: float
    elapsed: float
    metrics: dict[str, float] | None = None


@dataclass
class FederationResult:
    """What a finished federated run reports."""

    history: list[dict[str, Any]]
    test: dict[str, float]
    rounds: int
    bytes_up: int
    bytes_down: int
    wall_seconds: float
    train_losses: list[float]
    n_params: list[int]
    label_leakage: dict[str, Any]


class Federation:
    """The server's round loop over any :class:`Transport`.

    Args:
        cfg: the resolved config.
        transport: reaches the K clients.
        run: the run folder to write (metrics, test outputs, checkpoints); None writes nothing.
        on_round: progress callback.
        data: the server's labels and splits (loaded from ``cfg`` when not given).
    """

    def __init__(self, cfg: RunConfig, transport: Transport, run: RunDir | None = None,
                 on_round: Callable[[RoundInfo], None] | None = None,
                 data: ServerData | None = None) -> None:
        self.cfg = cfg
        self.transport = transport
        self.run_dir = run
        self.on_round = on_round
        self.data = data if data is not None else load_server_data(cfg)
        self.step = ServerStep(cfg, self.data)
        self.k = cfg.n_clients
        self.cfg_yaml = cfg.to_yaml()
        self.bytes_up = 0
        self.bytes_down = 0
        self.history: list[dict[str, Any]] = []
        self.train_losses: list[float] = []
        self.n_params: list[int] = []
        self.pending: list[Arrays] | None = None  # signals not yet applied by the clients
        self.pending_ids: np.ndarray | None = None
        self.pending_round = 0
        self.leakage: LabelLeakage | None = None

    # -- messaging ---------------------------------------------------------------------------

    def _exchange(self, kind: str, arrays: Sequence[Arrays],
                  settings: Sequence[dict[str, Any]]) -> list[tuple[Arrays, dict[str, Any]]]:
        self.bytes_down += sum(payload_bytes(a, s) for a, s in zip(arrays, settings, strict=True))
        replies = self.transport.exchange(kind, arrays, settings)
        if len(replies) != self.k:
            raise ClientFailure(f'"{kind}": {len(replies)} replies for {self.k} clients')
        self.bytes_up += sum(payload_bytes(r, i) for r, i in replies)
        return replies

    def _with_pending(self, arrays: list[Arrays], settings: list[dict[str, Any]]) -> None:
        if self.pending is None:
            return
        for k in range(self.k):
            arrays[k].update({"bwd_ids": self.pending_ids, **self.pending[k]})
            settings[k]["round"] = self.pending_round
        self.pending = None
        self.pending_ids = None

    def _send(self, kind: str, fwd_ids: np.ndarray | None) -> list[Arrays]:
        """One exchange; with ``fwd_ids``, every reply is checked before it is used."""
        arrays: list[Arrays] = [{} if fwd_ids is None else {"fwd_ids": fwd_ids}
                                for _ in range(self.k)]
        settings: list[dict[str, Any]] = [{} for _ in range(self.k)]
        self._with_pending(arrays, settings)
        replies = [r for r, _ in self._exchange(kind, arrays, settings)]
        for k, r in enumerate(replies):
            who = describe_client(self.transport, k)
            if fwd_ids is not None:
                check_prediction_reply(r, fwd_ids, self.data.n_outputs, self.k, who, kind,
                                       self.cfg.server.reply_limit)
            elif kind == "checkpoint":
                check_state_reply(r, who)
        return replies

    # -- phases ------------------------------------------------------------------------------

    def setup(self, client_states: Sequence[Arrays] | None = None) -> None:
        """Send every client the config and training ids; check the ids line up."""
        out_dim = self.data.n_outputs
        arrays = []
        for k in range(self.k):
            a = {"train_ids": self.data.splits.train}
            if client_states:
                a.update(client_states[k])
            arrays.append(a)
        settings = [{"config": self.cfg_yaml, "index": k, "out_dim": out_dim}
                    for k in range(self.k)]
        replies = self._exchange("setup", arrays, settings)
        for k, (reply, info) in enumerate(replies):
            check_setup_reply(reply, info, describe_client(self.transport, k))
        self.n_params = [int(info["n_params"]) for _, info in replies]
        held = {f"client_{k}": r["ids"] for k, (r, _) in enumerate(replies)}
        labelled = np.concatenate([self.data.splits.train, self.data.splits.val,
                                   self.data.splits.test])
        if self.cfg.data.align == "intersect":
            common = common_ids(held)
            dropped = labelled.size - np.isin(labelled, common).sum()
            if dropped:
                log.warning("align: dropping %d labelled ids not held by every client", dropped)
            sp = self.data.splits
            self.data.splits = Splits(*(s[np.isin(s, common)] for s in (sp.train, sp.val,
                                                                         sp.test)))
        else:
            align_ids(labelled, held)
        self.data.splits = drop_unseen(self.data.splits, [r["absent"] for r, _ in replies])
        train = self.data.splits.train
        self.leakage = LabelLeakage(train, self.data.labels_of(train), self.data.task, self.k)
        log.info("setup: %d clients, %s parameters", self.k, self.n_params)

    def evaluate(self, splits: Sequence[str], round_index: int) -> list[dict[str, Any]]:
        """Evaluate on one or more splits with a single exchange; one metrics row each."""
        parts = [getattr(self.data.splits, split) for split in splits]
        replies = self._send("evaluate", np.concatenate(parts))
        rows, start = [], 0
        for split, ids in zip(splits, parts, strict=True):
            sub = [{k: v[start:start + ids.size] for k, v in r.items() if k != "ids_digest"}
                   for r in replies]
            start += ids.size
            metrics, details = self.step.evaluate(ids, sub, self.n_params)
            row = {"round": round_index, "split": split, **metrics,
                   "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}
            self.history.append(row)
            rows.append(row)
            if self.run_dir is not None and split == "test":
                # what the figures of delegation patterns are drawn from
                self.run_dir.write_npz(OUTPUTS_FILE, details)
        if self.run_dir is not None:
            self.run_dir.write_jsonl(METRICS_FILE, self.history)
        return rows

    def checkpoint(self, round_index: int, elapsed: float) -> list[Arrays]:
        """Flush pending signals, collect every client's state, write one generation."""
        states = self._send("checkpoint", None)
        if self.run_dir is not None:
            server = {"history": self.history, "bytes_up": self.bytes_up,
                      "bytes_down": self.bytes_down, "train_losses": self.train_losses,
                      "elapsed": elapsed, "config": self.cfg_yaml}
            leak = self.leakage.state() if self.leakage is not None else {}
            self.run_dir.save_checkpoint(Checkpoint(round_index, server, leak, list(states)))
        return states

    def rounds_per_epoch(self) -> int:
        return math.ceil(self.data.splits.train.size / self.cfg.train.chunk_size)

    def run(self, resume: Checkpoint | None = None,
            stop_after: int | None = None) -> FederationResult | None:
        """Train for ``train.epochs`` epochs, evaluating and checkpointing on schedule.

        Args:
            resume: a checkpoint to continue from (see :func:`liquid_fed.rundir.load_checkpoint`).
            stop_after: end the run after that many rounds as an interruption would, leaving a
                checkpoint there to resume from; the run then returns None.
        """
        start_round, elapsed0 = 0, 0.0
        if resume is not None:
            start_round = resume.round
            self.history = list(resume.server["history"])
            self.bytes_up = int(resume.server["bytes_up"])
            self.bytes_down = int(resume.server["bytes_down"])
            self.train_losses = [float(v) for v in resume.server["train_losses"]]
            elapsed0 = float(resume.server["elapsed"])
        self.setup(resume.clients if resume is not None else None)
        if resume is not None and self.leakage is not None:
            self.leakage.load(resume.server_arrays)
        t0 = time.perf_counter() - elapsed0
        train_ids = self.data.splits.train
        per_epoch = self.rounds_per_epoch()
        total = self.cfg.train.epochs * per_epoch
        tcfg = self.cfg.train
        chunks: dict[int, list[np.ndarray]] = {}
        for r in range(start_round, total):
            epoch, j = divmod(r, per_epoch)
            if epoch not in chunks:
                chunks = {epoch: list(batch_order(train_ids.size, tcfg.chunk_size, epoch,
                                                  self.cfg.seed))}
            ids = train_ids[chunks[epoch][j]]
            replies = self._send("train", ids)
            loss, signals = self.step.train_step(ids, replies, r)
            self.leakage.observe(ids, signals, [rep["pred"] for rep in replies])
            self.pending, self.pending_ids, self.pending_round = signals, ids, r
            self.train_losses.append(loss)
            metrics = None
            done = r + 1
            if tcfg.eval_every and done % tcfg.eval_every == 0 and done < total:
                metrics = self.evaluate(["val"], done)[0]
            if tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and done < total:
                self.checkpoint(done, time.perf_counter() - t0)
            if self.on_round is not None:
                self.on_round(RoundInfo(done, total, done / per_epoch, loss,
                                        time.perf_counter() - t0, metrics))
            if stop_after is not None and done >= stop_after and done < total:
                self.checkpoint(done, time.perf_counter() - t0)
                log.info("stopped after round %d of %d; checkpoint written", done, total)
                return None
        _, test = self.evaluate(["val", "test"], total)
        wall = time.perf_counter() - t0
        self.checkpoint(total, wall)
        return FederationResult(self.history, test, total, self.bytes_up, self.bytes_down,
                                wall, self.train_losses, self.n_params, self.leakage.report())
