"""The federation's round loop at the server, over any transport.

Each round:

1. the server picks a chunk of training ids (the same permutation as the centralized
   reference, :func:`liquid_fed.train.batch_order`);
2. every client returns its expert's predictions (n, C) and delegation vectors (n, K) on them;
   each reply is checked (:mod:`liquid_fed.federation.replies`) before it is used;
3. the server stacks them, solves the powers, computes the loss and sends each client the
   gradient of the loss with respect to its own outputs;
4. each client back-propagates those signals through its expert over mini-batches of the chunk
   (``local_steps`` passes) and steps its optimizer.

Steps 4 of round t and 2 of round t+1 travel in one message, so a training round costs one
round trip. With ``chunk_size == batch_size`` and one local step this is exact split learning
and reproduces centralized :func:`liquid_fed.train.fit` step by step. Larger chunks reuse the
signals for several local steps (as FedBCD does) to cut round trips.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from liquid_fed.config import RunConfig
from liquid_fed.data import Splits, align_ids, common_ids
from liquid_fed.errors import ClientFailure
from liquid_fed.federation.replies import (
    check_prediction_reply,
    check_setup_reply,
    check_state_reply,
)
from liquid_fed.federation.server import ServerStep
from liquid_fed.federation.setup import ServerData, drop_unseen, load_server_data
from liquid_fed.federation.state import Arrays
from liquid_fed.federation.transport import Transport, describe_client, payload_bytes
from liquid_fed.privacy import LabelLeakage
from liquid_fed.rundir import METRICS_FILE, OUTPUTS_FILE, Checkpoint, RunDir
from liquid_fed.train import batch_order

log = logging.getLogger(__name__)


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
