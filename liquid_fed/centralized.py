"""Centralized references of a run: the same views, experts and batches, in one process.

``liquid-fed centralized`` trains the ensemble this way; the federated run must reproduce it
(exactly, for ``chunk_size == batch_size`` with one local step). The baselines of a run's
summary — the uniform vote and experts trained independently, alone and averaged — come from
here too.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from liquid_fed.availability import faulted, round_presence
from liquid_fed.config import RunConfig
from liquid_fed.ensemble import LiquidConfig, LiquidEnsemble
from liquid_fed.errors import ClientFailure
from liquid_fed.federation.setup import (
    ClientView,
    ServerData,
    build_client_expert,
    drop_unseen,
    load_client_view,
    load_server_data,
)
from liquid_fed.metrics import primary_score
from liquid_fed.robustness import robustness
from liquid_fed.train import DTYPES, evaluate, fit, output_metrics, predict_splits

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class CentralData:
    """Every client's view and the labels, row-aligned per split."""

    server: ServerData
    views: list[ClientView]
    inputs: dict[str, list[Tensor]]  # split -> K tensors (n, *view_shape)
    targets: dict[str, Tensor]  # split -> (n,) labels or targets
    present: dict[str, Tensor | None]  # split -> (n, K) or None when every view is complete


def central_data(cfg: RunConfig, server: ServerData | None = None) -> CentralData:
    """Load labels and all K views, aligned by the server's split ids.

    Args:
        cfg: the resolved config.
        server: the server's labels and splits when already loaded (else loaded here); it is
            not modified.
    """
    server = load_server_data(cfg) if server is None else dataclasses.replace(server)
    views = [load_client_view(cfg, k, server.splits.train) for k in range(cfg.n_clients)]
    server.splits = drop_unseen(server.splits, [v.ids[~v.present] for v in views])
    dtype = DTYPES[cfg.train.dtype]
    inputs, targets, present = {}, {}, {}
    for split in SPLITS:
        ids = getattr(server.splits, split)
        rows = [v.rows(ids) for v in views]
        inputs[split] = [torch.from_numpy(v.x[r]).to(dtype) for v, r in zip(views, rows,
                                                                             strict=True)]
        y = torch.from_numpy(np.asarray(server.labels_of(ids)))
        targets[split] = y.long() if server.task == "classification" else y.to(dtype)
        mask = torch.from_numpy(np.stack([v.present[r] for v, r in zip(views, rows,
                                                                         strict=True)], 1))
        present[split] = None if bool(mask.all()) else mask
    return CentralData(server, views, inputs, targets, present)


def build_ensemble(cfg: RunConfig, data: CentralData, **overrides: Any) -> LiquidEnsemble:
    """The run's experts, initialised exactly as the clients initialise theirs."""
    experts = [build_client_expert(cfg, k, data.views[k].in_shape, data.server.n_outputs)
               for k in range(cfg.n_clients)]
    config = _layer(cfg, data)
    # One expert at a time: the federated clients evaluate theirs one by one too.
    return LiquidEnsemble(experts, config, batched=False, **overrides)


def train_ensemble(cfg: RunConfig, data: CentralData, ensemble: LiquidEnsemble,
                   on_step: Callable[[int, float], None] | None = None,
                   on_epoch: Callable[[int, float], None] | None = None,
                   robust: bool = False) -> dict[str, Any]:
    """Fit on the training split with the run's optimiser and batches; metrics per split.

    The validation and test metrics use the run's final smoothing: ``ensemble.smoothing:
    auto`` picks ``λ`` on the validation split (:func:`liquid_fed.train.predict_splits`) and
    the pick is returned under ``smoothing``. ``robust`` adds ``robustness``: the test metrics
    with parties absent (:func:`liquid_fed.robustness.robustness`, as the federated run has
    them).
    """
    t0 = time.perf_counter()
    losses = fit(ensemble, data.inputs["train"], data.targets["train"],
                 epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, lr=cfg.optim.lr,
                 optimizer=cfg.optim.name, weight_decay=cfg.optim.weight_decay,
                 momentum=cfg.optim.momentum, seed=cfg.seed,
                 present=data.present["train"], on_step=on_step, on_epoch=on_epoch,
                 answering=_answering(cfg, len(ensemble.experts),
                                      int(data.targets["train"].shape[0])))
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"epoch_losses": losses, "wall_seconds": wall}
    outs, smoothing, pick = predict_splits(ensemble, data.inputs, data.targets, data.present)
    for split, out in outs.items():
        result[split] = output_metrics(ensemble, out, data.targets[split], smoothing)
    if pick is not None:
        result["smoothing"] = pick.to_dict()
    if robust:
        test = outs["test"]
        result["robustness"] = robustness(
            test.predictions, test.delegation, data.targets["test"], ensemble.config,
            smoothing, cfg.seed, data.present["test"],
            [sum(p.numel() for p in e.parameters()) for e in ensemble.experts])
    return result


def run_centralized(cfg: RunConfig, run_dir: Path, force: bool = False,
                    command: str = "liquid-fed centralized",
                    on_epoch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """``liquid-fed centralized``: the same experts trained in one process, into ``run_dir``.

    The folder follows the same no-overwrite rule and lock as a federated run's.

    Args:
        cfg: the resolved, checked config.
        run_dir: the output folder.
        force: overwrite a folder holding results.
        command: what the folder's lock records as its holder.
        on_epoch: called after each epoch with (epoch, mean loss).

    Returns:
        The summary written (test metrics under ``"test"``, ``"wall_seconds"``, ...).

    Raises:
        RunFolderError: the folder is locked by another run, or holds results.
    """
    from liquid_fed import rundir
    from liquid_fed.tracking import Tracker

    torch.set_num_threads(cfg.server.threads)
    with rundir.RunLock(run_dir).acquire(command):
        run = rundir.prepare(cfg, run_dir, resume=False, force=force)
        data = central_data(cfg)
        ensemble = build_ensemble(cfg, data)
        tracker = Tracker.open(cfg, run_dir)  # before training: a bad tracker fails here
        status = "FAILED"
        try:
            result = train_ensemble(cfg, data, ensemble, on_epoch=on_epoch, robust=True,
                                    on_step=None if tracker is None else (
                                        lambda step, loss: tracker.train_round(step + 1, loss)))
            if tracker is not None:
                tracker.final(steps_per_epoch(cfg, data) * cfg.train.epochs, result.get("val"),
                              result["test"])
            status = "FINISHED"
        finally:
            if tracker is not None:
                tracker.close(status)
        # The experts' states, as a federated run's checkpoint keeps them: `liquid-fed
        # evaluate` scores either folder alike.
        clients = [{f"model/{name}": value.detach().cpu().numpy().copy()
                    for name, value in expert.state_dict().items()}
                   for expert in ensemble.experts]
        run.save_checkpoint(rundir.Checkpoint(len(result["epoch_losses"]),
                                              {"mode": "centralized"}, {}, clients))
        summary = {"name": cfg.name, "mode": "centralized", **result}
        run.write_summary(summary)
    return summary


def steps_per_epoch(cfg: RunConfig, data: CentralData) -> int:
    """Optimiser steps (mini-batches) per epoch: the federation's rounds per epoch when
    ``chunk_size == batch_size``."""
    return -(-int(data.targets["train"].shape[0]) // cfg.train.batch_size)


def baselines(cfg: RunConfig, data: CentralData) -> dict[str, Any]:
    """Test scores of the uniform vote and of experts trained independently.

    ``uniform``: the same experts trained jointly with every vote kept (majority vote).
    ``independent``: each expert trained alone on its own view and label (``single`` lists
    them), then averaged with equal weights (``averaged``).
    """
    out: dict[str, Any] = {}
    if cfg.baselines.uniform:
        ens = build_ensemble(cfg, data, solver="uniform")
        out["uniform"] = primary_score(train_ensemble(cfg, data, ens)["test"])
    if cfg.baselines.independent:
        experts, single = [], []
        for k in range(cfg.n_clients):
            expert = build_client_expert(cfg, k, data.views[k].in_shape, data.server.n_outputs)
            solo = LiquidEnsemble([_Solo(expert)], _layer(cfg, data),
                                  solver="uniform", expert_loss_weight=0.0)
            sub = CentralData(data.server, [data.views[k]],
                              {s: [data.inputs[s][k]] for s in SPLITS}, data.targets,
                              {s: None for s in SPLITS})
            single.append(primary_score(train_ensemble(cfg, sub, solo)["test"]))
            experts.append(expert)
        avg = LiquidEnsemble([_Solo(e, cfg.n_clients, k) for k, e in enumerate(experts)],
                             _layer(cfg, data), solver="uniform")
        out["single"] = single
        out["averaged"] = primary_score(evaluate(avg, data.inputs["test"], data.targets["test"],
                                          data.present["test"]))
    return out


def _answering(cfg: RunConfig, k: int, n: int) -> Callable[[int], np.ndarray] | None:
    """Step -> the experts that answer in it (``availability``), as the federated server
    draws them for the round whose chunk holds the step's mini-batch; None when every party
    answers every round.

    Chunks and mini-batches cut the same permutation of the ``n`` training rows
    (:func:`liquid_fed.train.batch_order`), so a batch starting at position ``s`` of an epoch
    lies in that epoch's chunk ``s // chunk_size`` (wholly so when ``chunk_size`` is a
    multiple of ``batch_size``; with equal sizes a step is a round)."""
    avail = cfg.availability
    faults = cfg.federation.faults
    if avail.dropout == 0 and not avail.absent and not faults:
        return None
    if k != cfg.n_clients:  # a baseline over fewer experts (one trained alone) has no parties
        return None
    tcfg = cfg.train
    batches = -(-n // tcfg.batch_size)
    chunks = -(-n // tcfg.chunk_size)

    def answering(step: int) -> np.ndarray:
        epoch, b = divmod(step, batches)
        r = epoch * chunks + (b * tcfg.batch_size) // tcfg.chunk_size
        mask = round_presence(avail.dropout, avail.absent, k, r, cfg.seed)
        mask &= ~faulted(faults, k, r + 1)  # as the federation loses a faulted party's reply
        if mask.sum() < cfg.federation.min_clients:  # where the federation stops
            raise ClientFailure(f"training round {r + 1}: {int(mask.sum())} of {k} clients "
                                "answer (availability, federation.faults), fewer than "
                                f"federation.min_clients = {cfg.federation.min_clients}")
        return mask

    return answering


def _layer(cfg: RunConfig, data: CentralData) -> LiquidConfig:
    """The run's ensemble settings with the task of its data."""
    return dataclasses.replace(cfg.ensemble, task=data.server.task)


class _Solo(torch.nn.Module):
    """An expert whose delegation is ignored: it keeps its own vote."""

    def __init__(self, expert: torch.nn.Module, n_experts: int = 1, index: int = 0) -> None:
        super().__init__()
        self.expert = expert
        self.n_experts = n_experts
        self.index = index

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pred, _ = self.expert(x)
        keep = torch.zeros(pred.shape[0], self.n_experts, dtype=pred.dtype, device=pred.device)
        keep[:, self.index] = 1.0
        return pred, keep
