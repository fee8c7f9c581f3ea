"""A whole run: its folder, the federated training, the references and the summary.

The run folder holds ``config.yaml`` (fully resolved), ``views.json`` (the view plan and a probe
score per view), ``metrics.jsonl`` (one line per evaluation), ``summary.json`` and
``checkpoints/`` (server state and every client's expert and optimizer) from which a run
resumes. Every file is written whole and renamed into place, so an interrupted run never
leaves a half-written file, and nothing already written is overwritten unless asked for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from liquid_fed.config import RunConfig, config_from_yaml_text
from liquid_fed.data import view_summary
from liquid_fed.errors import RunFolderError
from liquid_fed.protocol import (
    Federation,
    RoundInfo,
    RunWriter,
    Transport,
    load_checkpoint,
    load_data,
    load_server_data,
    make_plan,
)

log = logging.getLogger(__name__)


def prepare_folder(cfg: RunConfig, path: str | Path, resume: bool, force: bool) -> RunWriter:
    """Check the folder against the request; write ``config.yaml`` for a new run."""
    path = Path(path)
    has_results = (path / "summary.json").exists() or (path / "checkpoints").exists()
    if resume:
        saved = path / "config.yaml"
        if not saved.is_file():
            raise RunFolderError(f"cannot resume: {saved} does not exist")
        old = config_from_yaml_text(saved.read_text())
        if _without_io(old) != _without_io(cfg):
            raise RunFolderError(
                f"cannot resume: the config differs from the one saved in {saved} "
                "(resume with that config, or start a new run folder)"
            )
        return RunWriter(path)
    if has_results and not force:
        raise RunFolderError(
            f"run folder {path} already holds results; pass --resume to continue it, --force "
            "to overwrite it, or choose another --out"
        )
    writer = RunWriter(path)
    writer.write_text("config.yaml", cfg.to_yaml())
    return writer


def check_run(cfg: RunConfig) -> None:
    """Load the data, cut the views and build every expert once, so mistakes surface before
    any process starts; errors name the config key (``data``, ``views``, ``experts``)."""
    from liquid_fed.protocol import build_client_expert

    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    for k in range(cfg.n_clients):
        shape = plan.view_shape(k, ds.features.shape)
        build_client_expert(cfg, k, shape, ds.n_outputs)


def _without_io(cfg: RunConfig) -> dict[str, Any]:
    """The parts of a config that change results (not where they are written)."""
    d = cfg.to_dict()
    d.pop("out", None)
    d.pop("name", None)
    d["train"].pop("checkpoint_every", None)
    d["train"].pop("eval_every", None)
    return d


def write_views(cfg: RunConfig, writer: RunWriter) -> list[dict]:
    """The view plan and a quick linear probe per view (how partial each view is)."""
    ds = load_data(cfg)
    plan = make_plan(cfg, ds)
    splits = load_server_data(cfg).splits
    summary = view_summary(ds, plan, splits, seed=cfg.seed)
    writer.write_json("views.json", {"plan": plan.to_dict(), "summary": summary})
    return summary


def run_federated(
    cfg: RunConfig,
    transport: Transport,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    on_round: Callable[[RoundInfo], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train the federation over ``transport`` and write the run folder.

    Args:
        cfg: the resolved config.
        transport: reaches the K clients (Flower's Grid in practice).
        run_dir: the run folder (already prepared by :func:`prepare_folder`).
        resume: continue from ``run_dir/checkpoints``.
        stop_after: stop after this many rounds, leaving a checkpoint (returns None).
        on_round: progress callback.
        extra: more fields for ``summary.json`` (e.g. the engine's start-up seconds).

    Returns:
        The summary written to ``summary.json``, or None when stopped early.
    """
    torch.set_num_threads(cfg.server.threads)
    writer = RunWriter(run_dir)
    server_state = client_states = None
    if resume:
        server_state, client_states = load_checkpoint(run_dir, cfg.n_clients)
        log.info("resuming from round %d", server_state["round"])
    else:
        write_views(cfg, writer)
    fed = Federation(cfg, transport, writer, on_round)
    result = fed.run(server_state, client_states, stop_after)
    if result is None:
        return None
    t0 = time.perf_counter()
    refs = {}
    if cfg.baselines.uniform or cfg.baselines.independent:
        from liquid_fed.centralized import baselines, central_data

        refs = baselines(cfg, central_data(cfg))
    metric = "accuracy" if "accuracy" in result.test else "rmse"
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
        "references": {"centralized_" + k: v for k, v in refs.items()},
        "references_seconds": time.perf_counter() - t0,
        **(extra or {}),
    }
    writer.write_json("summary.json", summary)
    return summary
