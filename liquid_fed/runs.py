"""A whole run: its folder, the federated training, the references and the summary.

The run folder's files and how they are written are :mod:`liquid_fed.rundir`'s: every file is
written whole and renamed into place, checkpoints are data in consistent generations, and
nothing already written is overwritten unless asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from liquid_fed.config import RunConfig
from liquid_fed.data import Splits, view_summary
from liquid_fed.data.probe import view_observability
from liquid_fed.errors import ConfigError
from liquid_fed.federation import (
    Federation,
    RoundInfo,
    ServerData,
    Transport,
    build_client_expert,
    load_client_view,
    load_data,
    load_server_data,
    make_plan,
)
from liquid_fed.metrics import primary_metric
from liquid_fed.rundir import VIEWS_FILE, RunDir
from liquid_fed.sizes import check_run_size
from liquid_fed.tracking import Tracker, check_tracking
from liquid_fed.train import DTYPES

log = logging.getLogger(__name__)


def check_run(cfg: RunConfig) -> None:
    """Everything that can be checked before any process starts, so mistakes surface in
    seconds with the config key they come from instead of minutes later inside Ray.

    Loads the data and splits it, cuts every view, builds every expert and runs one forward
    and backward pass of it on a few training rows of its own view, and checks that the
    server's device and the simulation's resources exist on this machine.

    Raises:
        ConfigError: naming the key (``data``, ``views``, ``experts``, ``server.device``,
            ``simulation.*``, ``tracking.*``), the value and what is accepted.
    """
    _check_resources(cfg)
    check_run_size(cfg)  # the data's and experts' memory, from headers and shapes, first
    check_tracking(cfg, reach=True)  # before Ray starts: the extras, a server that answers
    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    splits = load_server_data(cfg).splits
    rows = splits.train[: min(4, splits.train.size)]
    dtype = DTYPES[cfg.train.dtype]
    for k in range(cfg.n_clients):
        shape = plan.view_shape(k, ds.features.shape)
        expert = build_client_expert(cfg, k, shape, ds.n_outputs)
        try:  # the view as the client will hold it: cut, standardised on the training rows
            view = load_client_view(cfg, k, splits.train)
        except ValueError as exc:
            raise ConfigError(f"views (client {k}): {exc}") from exc
        x = torch.from_numpy(view.x[view.rows(rows)]).to(dtype)
        where = f"experts (client {k}: {type(expert).__name__} on a view of shape {shape})"
        try:
            pred, dele = expert(x)
            (pred.sum() + dele.sum()).backward()
        except Exception as exc:  # any failure of a user-chosen expert on this view
            raise ConfigError(f"{where}: a forward and backward pass on {len(rows)} training "
                              f"rows failed: {type(exc).__name__}: {exc}") from exc
        want = ((len(rows), ds.n_outputs), (len(rows), cfg.n_clients))
        if (tuple(pred.shape), tuple(dele.shape)) != want:
            raise ConfigError(f"{where}: returned outputs of shapes {tuple(pred.shape)} and "
                              f"{tuple(dele.shape)}; expected {want[0]} and {want[1]}")


def _check_resources(cfg: RunConfig) -> None:
    """The server's device and the simulation's CPU/GPU requests exist on this machine (the
    CPUs on a cluster's nodes, for a run that joins one, are checked when it joins)."""
    device = cfg.server.device
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= n_gpus:
            have = f"{n_gpus} CUDA device(s)" if n_gpus else "no CUDA device"
            raise ConfigError(f'server.device: got "{device}"; this machine has {have} '
                              "(accepted here: auto, cpu" + (", cuda" if n_gpus else "") + ")")
    if (cfg.simulation.num_gpus_per_client > 0 and n_gpus == 0
            and cfg.simulation.ray_address is None):
        raise ConfigError(f"simulation.num_gpus_per_client: got "
                          f"{cfg.simulation.num_gpus_per_client}; this machine has no CUDA "
                          "device, so no client could ever be scheduled (use 0)")
    cpus = os.cpu_count() or 1
    # On a cluster its nodes' CPUs count (the join checks them), not this machine's.
    if cfg.simulation.ray_address is None and cfg.simulation.num_cpus_per_client > cpus:
        raise ConfigError(f"simulation.num_cpus_per_client: got "
                          f"{cfg.simulation.num_cpus_per_client}; this machine has {cpus} CPUs, "
                          "so no client could ever be scheduled")


def write_views(cfg: RunConfig, run: RunDir, splits: Splits) -> list[dict]:
    """The view plan and a quick linear probe per view (how partial each view is)."""
    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    summary = view_summary(ds, plan, splits, seed=cfg.seed)
    run.write_json(VIEWS_FILE, {"plan": plan.to_dict(), "summary": summary,
                                "observability": view_observability(ds, plan, splits,
                                                                    seed=cfg.seed)})
    return summary


def run_federated(
    cfg: RunConfig,
    transport: Transport,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_round: Callable[[RoundInfo], None] | None = None,
    extra: dict[str, Any] | None = None,
    server_data: ServerData | None = None,
) -> dict[str, Any] | None:
    """Train the federation over ``transport`` and write the run folder.

    Args:
        cfg: the resolved config.
        transport: reaches the K clients (Flower's Grid in practice).
        run_dir: the run folder (already prepared by :func:`liquid_fed.rundir.prepare`).
        resume: continue from the folder's newest complete checkpoint.
        stop_after: stop after this many rounds, leaving a checkpoint (returns None).
        on_round: progress callback.
        extra: more fields for ``summary.json`` (e.g. the engine's start-up seconds).
        server_data: the server's labels and splits from its private folder (deployment with
            shards): the server then never loads the data set, so it writes no view probes
            and computes no centralized references (they need every party's features).

    Returns:
        The summary written to ``summary.json``, or None when stopped early.
    """
    torch.set_num_threads(cfg.server.threads)
    run = RunDir(run_dir)
    private = server_data is not None
    # once per run: the federation and the references share it
    data = server_data if private else load_server_data(cfg)
    checkpoint = None
    if resume:
        checkpoint = run.load_checkpoint(cfg.n_clients)
        log.info("resuming from round %d (checkpoint %s)", checkpoint.round,
                 checkpoint.generation)
    elif private:
        run.write_json(VIEWS_FILE, {"note": "the parties hold the features in private shards: "
                                            "the server has nothing to probe"})
    else:
        write_views(cfg, run, data.splits)
    references_data = dataclasses.replace(data)  # the federation may narrow its splits
    # before any training: a missing extra or an unreachable tracking server fails here
    tracker = Tracker.open(cfg, run.path, None if checkpoint is None else checkpoint.round)
    status = "FAILED"
    try:
        fed = Federation(cfg, transport, run, on_round, data=data, tracker=tracker)
        result = fed.run(checkpoint, stop_after)
        if result is not None and tracker is not None:
            tracker.finish(result.test)
        status = "FINISHED" if result is not None else "KILLED"
    finally:
        if tracker is not None:
            tracker.close(status)
    if result is None:
        return None
    t0 = time.perf_counter()
    refs = {}
    if private and (cfg.baselines.uniform or cfg.baselines.independent):
        log.info("centralized references skipped: they need every party's features")
    elif cfg.baselines.uniform or cfg.baselines.independent:
        from liquid_fed.centralized import baselines, central_data

        refs = baselines(cfg, central_data(cfg, references_data))
    metric = primary_metric(result.test)
    summary = {
        "name": cfg.name,
        "metric": metric,
        "test": result.test,
        "rounds": result.rounds,
        "epochs": cfg.train.epochs,
        "wall_seconds": result.wall_seconds,
        "bytes_up": result.bytes_up,
        "bytes_down": result.bytes_down,
        "bytes_per_round": (result.bytes_up + result.bytes_down) / max(result.rounds, 1),
        "n_params": result.n_params,
        "label_leakage": result.label_leakage,
        **({"smoothing": result.smoothing} if result.smoothing is not None else {}),
        **({"robustness": result.robustness} if result.robustness is not None else {}),
        **({"parties": result.parties} if result.parties is not None else {}),
        "privacy": {"clip": cfg.privacy.clip, "noise": cfg.privacy.noise},
        "references": {"centralized_" + k: v for k, v in refs.items()},
        "references_seconds": time.perf_counter() - t0,
        **(extra or {}),
    }
    run.write_summary(summary)
    return summary
