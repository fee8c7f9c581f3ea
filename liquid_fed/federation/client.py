"""The client runtime: one pure step per message, from the persisted state.

:func:`handle_client_message` maps (message kind, arrays, settings, persisted state) to (reply,
info, new state). The Flower ClientApp and the in-process transport both call it. A
process-local cache keeps live runtimes (data, expert, optimizer) between messages, used only
while its version matches the persisted state's: in simulation one actor serves many messages
and skips the rebuild; in deployment every message may be a new process and restores from the
persisted state alone.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from liquid_fed.config import RunConfig, config_from_yaml_text
from liquid_fed.experts import Expert
from liquid_fed.federation.replies import check_signals, ids_digest
from liquid_fed.federation.setup import ClientView, build_client_expert, load_client_view
from liquid_fed.federation.state import OPT_GROUPS, Arrays, arrays_to_state, state_to_arrays
from liquid_fed.train import DTYPES, batch_order, make_optimizer


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
# state's (see the module's docstring).
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
