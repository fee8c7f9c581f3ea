"""The client runtime: one pure step per message, from the persisted state.

:func:`handle_client_message` maps (message kind, arrays, settings, persisted state) to (reply,
info, new state). The Flower ClientApp and the in-process transport both call it. A
process-local cache keeps live runtimes (data, expert, optimizer) between messages, used only
while its version matches the persisted state's: in simulation one actor serves many messages
and skips the rebuild; in deployment every message may be a new process and restores from the
persisted state alone.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from liquid_fed.config import RunConfig, config_from_yaml_text
from liquid_fed.errors import RunFolderError
from liquid_fed.experts import Expert
from liquid_fed.federation.replies import check_signals, ids_digest
from liquid_fed.federation.setup import ClientView, build_client_expert, client_view
from liquid_fed.federation.state import OPT_GROUPS, Arrays, arrays_to_state, state_to_arrays
from liquid_fed.optim import Optimizer
from liquid_fed.rundir import Checkpoint, load_checkpoint, private_folder, save_checkpoint
from liquid_fed.train import DTYPES, batch_order, make_optimizer

#: What the server's setup message fixes for the rest of the run (a node adds its data_dir).
SETUP_KEYS = ("config", "index", "out_dim", "salt", "run_id")
#: Set to 1 (by ``liquid-fed run``'s simulation, for ``federation.faults``) to let this
#: process obey injected ``crash`` and ``hang`` faults; a deployed node never does.
FAULTS_ENV = "LIQUID_FED_FAULTS"
#: The exit status of a process that an injected fault ended.
FAULT_EXIT = 86


@dataclass
class ClientRuntime:
    """A client's live objects, rebuilt from the persisted state for each message."""

    cfg: RunConfig
    cfg_text: str
    index: int
    view: ClientView
    expert: Expert
    optimizer: Optimizer
    out_dim: int
    key: tuple[str, int, str, str] = ("", 0, "", "")  # its place in the live cache



@lru_cache(maxsize=16)
def _parse_config(text: str) -> RunConfig:
    return config_from_yaml_text(text)


@lru_cache(maxsize=1024)  # one per client a simulation actor serves (256 clients and more)
def _raw_view(cfg_yaml: str, index: int, data_dir: str) -> ClientView:
    """The party's own data: its shard (deployment) or its cut of the config's data set."""
    cfg = _parse_config(cfg_yaml)
    if data_dir:
        from liquid_fed.shards import load_party_shard  # shards builds on this package

        return load_party_shard(data_dir, index, cfg)
    return client_view(cfg, index)


@lru_cache(maxsize=1024)
def _cached_view(cfg_yaml: str, index: int, data_dir: str, salt: str,
                 train_key: bytes) -> ClientView:
    """The view as the run uses it: tokenized with the run's salt, standardised on the
    training samples it holds (the server names them by token)."""
    cfg = _parse_config(cfg_yaml)
    view = _raw_view(cfg_yaml, index, data_dir).tokenize(bytes.fromhex(salt))
    if cfg.data.standardize and train_key:
        rows, found = view.lookup_tokens(np.frombuffer(train_key, dtype=np.int64))
        view = view.standardised(rows[found])
    return view


# Live runtimes of this process, least recently used first; reused only while their version
# matches the persisted state's (see the module's docstring).
_LIVE: OrderedDict[tuple[str, int, str, str], tuple[int, ClientRuntime]] = OrderedDict()
#: Live runtimes kept at most: every client of a large simulation on one actor.
LIVE_RUNTIMES = 4096


def _version(state: Arrays) -> int:
    return int(state["version"][0]) if "version" in state else -1


def _runtime(settings: dict[str, Any], state: Arrays) -> ClientRuntime:
    index = int(settings["index"])
    # A run is its config, salt and data folder: a second run of one config in this process
    # (a warm deployment worker) never shares a runtime with the first.
    key = (settings["config"], index, str(settings["salt"]), str(settings.get("data_dir", "")))
    live = _LIVE.get(key)
    if live is not None and "version" in state:
        _LIVE.move_to_end(key)
        rt = live[1]
        if live[0] != _version(state) and OPT_GROUPS in state:
            # Another process (a second simulation actor) stepped this client since: load the
            # persisted state into the live expert and optimizer, as a rebuild would.
            arrays_to_state(state, rt.expert, rt.optimizer)
            _LIVE[key] = (_version(state), rt)
        if live[0] == _version(state) or OPT_GROUPS in state:
            return rt
    cfg = _parse_config(settings["config"])
    out_dim = int(settings["out_dim"])
    view = _cached_view(settings["config"], index, key[3], key[2],
                        state["train_ids"].tobytes())
    expert = build_client_expert(cfg, index, view.in_shape, out_dim)
    opt = make_optimizer(cfg.optim.name, expert.parameters(), cfg.optim.lr,
                         cfg.optim.weight_decay, cfg.optim.momentum)
    if OPT_GROUPS in state:
        arrays_to_state(state, expert, opt)
    return ClientRuntime(cfg, settings["config"], index, view, expert, opt, out_dim, key)


def _persist(rt: ClientRuntime, state: Arrays) -> Arrays:
    """New persisted state after an update; the live runtime is remembered under its version."""
    version = secrets.randbits(62)
    new = {**state, **state_to_arrays(rt.expert, rt.optimizer),
           "version": np.array([version], dtype=np.int64)}
    _LIVE[rt.key] = (version, rt)
    _LIVE.move_to_end(rt.key)
    while len(_LIVE) > LIVE_RUNTIMES:  # runs of the past in a long-lived process
        _LIVE.popitem(last=False)
    return new


def _set_mode(expert: torch.nn.Module, train: bool) -> None:
    """``expert.train(train)``, skipped when the expert is in that mode already (only these
    two calls switch it; ``train()`` walks every submodule, twice per message)."""
    if expert.training != train:
        expert.train(train)


def _client_forward(rt: ClientRuntime, ids: np.ndarray, train: bool) -> Arrays:
    rows = rt.view.token_rows(ids)
    dtype = DTYPES[rt.cfg.train.dtype]
    _set_mode(rt.expert, train)
    with torch.no_grad():
        x = torch.from_numpy(rt.view.x[rows]).to(dtype)
        pred, dele = rt.expert(x)
    return {"pred": pred.numpy(), "del": dele.numpy(), "present": rt.view.present[rows],
            "ids_digest": ids_digest(ids)}


def obey_fault(settings: dict[str, Any]) -> None:
    """Carry out an injected ``crash`` or ``hang`` (setting ``fault``) before the message is
    handled: the process exits at once, or blocks ``fault_seconds`` and then exits (as a
    watchdog would end it), so it never replies and never writes state for this message.

    Raises:
        ValueError: the fault is not allowed in this process (:data:`FAULTS_ENV` unset: a
            deployed node refuses to kill itself on a server's word).
    """
    kind = settings.get("fault")
    if kind not in ("crash", "hang"):
        return
    if os.environ.get(FAULTS_ENV) != "1":
        raise ValueError(f"refused an injected {kind}: fault injection is off in this process "
                         f"({FAULTS_ENV} is not 1; only simulations enable it)")
    if kind == "hang":
        time.sleep(float(settings.get("fault_seconds", 0.0)))
    os._exit(FAULT_EXIT)


def _applied_round(state: Arrays) -> int:
    return int(state["applied_round"][0]) if "applied_round" in state else -1


def _client_backward(rt: ClientRuntime, ids: np.ndarray, g_pred: np.ndarray,
                     g_del: np.ndarray, round_index: int) -> None:
    """Back-propagate the server's signals through the expert over mini-batches of the chunk."""
    rows = rt.view.token_rows(ids)
    check_signals({"g_pred": g_pred, "g_del": g_del}, len(rows), rt.out_dim, rt.cfg.n_clients)
    dtype = DTYPES[rt.cfg.train.dtype]
    train = rt.cfg.train
    keep = torch.from_numpy(rt.view.present[rows]).to(dtype).unsqueeze(-1)  # (n, 1)
    g_pred_t = torch.from_numpy(g_pred).to(dtype) * keep
    g_del_t = torch.from_numpy(g_del).to(dtype) * keep
    x_all = torch.from_numpy(rt.view.x[rows]).to(dtype)
    n = len(rows)
    _set_mode(rt.expert, True)
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


def own_checkpoints(settings: dict[str, Any]) -> Path:
    """Where a client with a data folder keeps its checkpoints of this run."""
    return Path(settings["data_dir"]) / "checkpoints" / str(settings["run_id"])


def own_file(index: int) -> str:
    """The file of a party's own checkpoint: named by its index."""
    return f"party_{index}.npz"


def _save_own_checkpoint(settings: dict[str, Any], own: Arrays) -> dict[str, Any]:
    index = int(settings["index"])
    ckpt = Checkpoint(int(settings.get("checkpoint_round", 0)),
                      {"party": index, "run_id": settings["run_id"]}, clients=[own],
                      client_files=[own_file(index)])
    private_folder(Path(settings["data_dir"]) / "checkpoints")
    save_checkpoint(own_checkpoints(settings), ckpt, private=True)  # 0600 files, 0700 folders
    return {"generation": ckpt.generation, "sha256": ckpt.digests[own_file(index)]}


def _load_own_checkpoint(settings: dict[str, Any]) -> Arrays:
    """The state this client saved at the generation the server resumes from."""
    where = own_checkpoints(settings)
    gen = str(settings["resume_generation"])
    try:
        ckpt = load_checkpoint(where, 1, generation=gen)
    except RunFolderError as exc:
        raise RunFolderError(f"party {settings['index']}: cannot resume: {exc}") from exc
    if ckpt.digests.get(ckpt.client_files[0]) != settings.get("resume_sha256"):
        raise RunFolderError(f"party {settings['index']}: its checkpoint {gen} in {where} is "
                             "not the one the server's checkpoint names (checksums differ)")
    return ckpt.clients[0]


def handle_client_message(kind: str, arrays: Arrays, settings: dict[str, Any],
                          state: Arrays) -> tuple[Arrays, dict[str, Any], Arrays]:
    """One client step: (kind, arrays, settings, persisted state) -> (reply, info, new state).

    Kinds:
        ``setup``: ``settings`` holds ``config`` (YAML), ``index``, ``out_dim`` and ``salt``
            (hex: samples travel as salted tokens, :func:`~liquid_fed.federation.setup.id_tokens`);
            ``arrays`` holds ``train_ids`` (tokens) and optionally a checkpoint (``model/*``,
            ``optimizer/*``). Replies with the tokens of the samples the client holds and
            lacks, and its parameter count. A node with a ``data_dir`` setting (its node
            config) reads its data from that private shard, never from the data set.
        ``train`` / ``evaluate``: optionally applies pending signals (``bwd_ids``,
            ``g_pred``, ``g_del``) for round ``settings["round"]``, then returns predictions
            and delegations on ``fwd_ids`` (if given).
        ``checkpoint``: applies pending signals, then returns the expert and optimizer state.

    Signals are applied at most once: the state remembers the last round applied and skips a
    copy the server sends again (it re-sends the signals of a message it got no valid reply
    to, not knowing whether they were applied). A client that holds no state for the run (a
    restarted process) answers any message but ``setup`` with info ``needs_setup``.
    Setting ``fault: nan`` (an injected fault) replaces the predictions with NaN.
    """
    if kind == "setup":
        state = {"train_ids": np.asarray(arrays["train_ids"], dtype=np.int64)}
        for key, value in arrays.items():
            if key.startswith(("model/", "optimizer/")):
                state[key] = value
        if settings.get("resume_generation"):  # the client kept its own checkpoint
            state.update(_load_own_checkpoint(settings))
        missing = [k for k in SETUP_KEYS if k not in settings]
        if missing:
            raise ValueError(f"setup message lacks settings {', '.join(missing)}")
        settings_state = {k: settings[k] for k in SETUP_KEYS}
        rt = _runtime({**settings_state, "data_dir": settings.get("data_dir", "")}, state)
        state = _persist(rt, state)
        info = {"n_params": rt.expert.n_parameters(), "in_shape": list(rt.view.in_shape),
                "shard": str(settings.get("data_dir", ""))}
        tokens = rt.view.tokens
        return {"ids": tokens, "absent": tokens[~rt.view.present]}, info, state
    if kind not in ("train", "evaluate", "checkpoint"):
        raise ValueError(f'unknown client message kind "{kind}" '
                         "(accepted: setup, train, evaluate, checkpoint)")
    if "config" not in settings or "train_ids" not in state:
        return {}, {"needs_setup": True}, state
    rt = _runtime(settings, state)
    round_index = int(settings.get("round", 0))
    if "bwd_ids" in arrays and round_index > _applied_round(state):
        _client_backward(rt, arrays["bwd_ids"], arrays["g_pred"], arrays["g_del"], round_index)
        state = _persist(rt, {**state, "applied_round": np.array([round_index], np.int64)})
    reply: Arrays = {}
    if kind in ("train", "evaluate") and "fwd_ids" in arrays:
        reply = _client_forward(rt, arrays["fwd_ids"], train=kind == "train")
        if settings.get("fault") == "nan":
            reply["pred"] = np.full_like(reply["pred"], np.nan)
    elif kind == "checkpoint":  # the persisted state is already the latest
        own = {k: v for k, v in state.items() if k.startswith(("model/", "optimizer/"))}
        if settings.get("data_dir"):  # experts stay home: the server gets a receipt
            return {}, _save_own_checkpoint(settings, own), state
        reply = own
    return reply, {}, state
