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

Under ``availability`` (:mod:`liquid_fed.availability`) some parties miss a round: they get no
message, a stand-in reply that is present nowhere takes their place in the combination, and
their pending signals wait for the next message they get. Every metrics row carries
``present``: per client, the training rounds it answered since the previous evaluation (the
rows of one evaluation, val and test, share their counts).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from liquid_fed.availability import round_presence
from liquid_fed.config import RunConfig
from liquid_fed.data import IdIndex, Splits, align_ids, common_ids
from liquid_fed.ensemble import SMOOTHING_AUTO, SmoothingPick
from liquid_fed.errors import ClientFailure
from liquid_fed.federation.replies import (
    check_prediction_reply,
    check_setup_reply,
    check_state_reply,
)
from liquid_fed.federation.server import ServerStep, absent_reply
from liquid_fed.federation.setup import ServerData, drop_unseen, id_tokens, load_server_data
from liquid_fed.federation.state import Arrays
from liquid_fed.federation.transport import (
    NoReply,
    Reply,
    Transport,
    describe_client,
    payload_bytes,
)
from liquid_fed.privacy import LabelLeakage, guarantee
from liquid_fed.rundir import METRICS_FILE, OUTPUTS_FILE, Checkpoint, RunDir
from liquid_fed.tracking import Tracker, party_config_yaml
from liquid_fed.train import batch_order

log = logging.getLogger(__name__)

#: A client's signals not yet applied: (chunk ids, signals, round).
Pending = tuple[np.ndarray, Arrays, int]
#: What a tolerant exchange returns: (reply, info) by client, (cause, reason) of the missing.
Answers = tuple[dict[int, Reply], dict[int, tuple[str, str]]]


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
    smoothing: dict[str, Any] | None = None  # the pick of ``ensemble.smoothing: auto``
    robustness: dict[str, Any] | None = None  # test metrics with parties absent
    parties: list[dict[str, Any]] | None = None  # per party: rounds present, absences, why


class Federation:
    """The server's round loop over any :class:`Transport`.

    Args:
        cfg: the resolved config.
        transport: reaches the K clients.
        run: the run folder to write (metrics, test outputs, checkpoints); None writes nothing.
        on_round: progress callback.
        data: the server's labels and splits (loaded from ``cfg`` when not given).
        tracker: logs every round and evaluation (``tracking``); None logs nothing.
    """

    def __init__(self, cfg: RunConfig, transport: Transport, run: RunDir | None = None,
                 on_round: Callable[[RoundInfo], None] | None = None,
                 data: ServerData | None = None, tracker: Tracker | None = None) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.transport = transport
        self.run_dir = run
        self.on_round = on_round
        self.data = data if data is not None else load_server_data(cfg)
        self.step = ServerStep(cfg, self.data)
        self.k = cfg.n_clients
        # What the parties get: the config without `tracking` and the cluster's address (where
        # the server logs and runs is none of theirs; a run's bytes must not depend on them).
        self.cfg_yaml = party_config_yaml(cfg)
        self.bytes_up = 0
        self.bytes_down = 0
        self.history: list[dict[str, Any]] = []
        self.train_losses: list[float] = []
        self.n_params: list[int] = []
        # Per client: (chunk ids, signals, round) not yet applied. They travel with the
        # client's next message, whichever round asks it next (a round may skip it).
        self.pending: list[Pending | None] = [None] * self.k
        # Training rounds each client answered since the last metrics rows (``present``).
        self.answered = np.zeros(self.k, dtype=np.int64)
        self.salt = b""  # drawn at setup (or taken from the checkpoint): ids travel as tokens
        self.noise_key = ""  # the defence's secret (hex): kept by the server, never sent
        self.run_id = ""  # names the clients' own checkpoints of this run
        self._tokens = np.zeros(0, dtype=np.int64)
        self._token_index: IdIndex | None = None
        self.parties: list[dict[str, Any]] | None = None  # clients' own checkpoints, by index
        self.shards: list[str] = []  # the shard folder each client reads, when it has one
        self.leakage: LabelLeakage | None = None
        self.smoothing: SmoothingPick | None = None  # picked at the final evaluation (auto)
        self.robustness: dict[str, Any] | None = None  # scored at the final evaluation
        # Parties that fail: who must be set up again (answered without state), and per party
        # the rounds answered, absences by cause, rejoins and the last reason (the summary).
        self.resetup: set[int] = set()
        self.saved_states: list[Arrays] | None = None  # clients' states at the last checkpoint
        self.rounds_present = np.zeros(self.k, dtype=np.int64)
        self.absences: list[dict[str, int]] = [{} for _ in range(self.k)]
        self.rejoins = np.zeros(self.k, dtype=np.int64)
        self.last_reason = [""] * self.k

    # -- messaging ---------------------------------------------------------------------------

    def _exchange(self, kind: str, arrays: Sequence[Arrays], settings: Sequence[dict[str, Any]],
                  clients: Sequence[int] | None = None) -> list[Reply | NoReply]:
        """One message to each of ``clients`` (all when None); replies in that order, a
        :class:`NoReply` for each client that did not answer."""
        self.bytes_down += sum(payload_bytes(a, s) for a, s in zip(arrays, settings, strict=True))
        if clients is None or len(clients) == self.k:
            replies = self.transport.exchange(kind, arrays, settings)
        else:  # a round some parties miss: they get no message
            replies = self.transport.exchange(kind, arrays, settings, clients=list(clients))
        expected = self.k if clients is None else len(clients)
        if len(replies) != expected:
            raise ClientFailure(f'"{kind}": {len(replies)} replies for {expected} clients')
        self.bytes_up += sum(payload_bytes(*r) for r in replies if not isinstance(r, NoReply))
        return replies

    def _exchange_all(self, kind: str, arrays: Sequence[Arrays],
                      settings: Sequence[dict[str, Any]]) -> list[Reply]:
        """:meth:`_exchange` with every client, where every client must answer (setup)."""
        replies = self._exchange(kind, arrays, settings)
        for k, reply in enumerate(replies):
            if isinstance(reply, NoReply):
                raise ClientFailure(f'{describe_client(self.transport, k)} did not answer '
                                    f'"{kind}" ({reply.cause}): {reply.reason}')
        return replies  # type: ignore[return-value]

    # -- ids travel as tokens ----------------------------------------------------------------

    def _draw_tokens(self, salt: bytes | None) -> None:
        self.salt = salt or secrets.token_bytes(16)
        self._tokens = id_tokens(self.data.ids, self.salt)
        if np.unique(self._tokens).size != self._tokens.size:
            raise ClientFailure("two sample ids hash to one token; start the run again")
        self._token_index = IdIndex(self._tokens, "server")

    def tokens(self, ids: np.ndarray) -> np.ndarray:
        """The tokens of labelled sample ids."""
        return self._tokens[self.data.rows(ids)]

    def known_ids(self, tokens: np.ndarray) -> np.ndarray:
        """The ids of the tokens the server knows (tokens of samples it has no label for are
        dropped: they take no part in the run)."""
        pos, found = self._token_index.lookup(tokens)
        return self.data.ids[pos[found]]

    def _with_pending(self, arrays: list[Arrays], settings: list[dict[str, Any]],
                      clients: Sequence[int]) -> list[Pending | None]:
        """Add each messaged client's pending signals (``arrays[i]`` goes to ``clients[i]``);
        returns what each was sent (to put back if its reply does not come)."""
        sent: list[Pending | None] = []
        for i, k in enumerate(clients):
            sent.append(self.pending[k])
            if self.pending[k] is None:
                continue
            ids, signals, round_index = self.pending[k]
            arrays[i].update({"bwd_ids": self.tokens(ids), **signals})
            settings[i]["round"] = round_index
            self.pending[k] = None
        return sent

    def _send(self, kind: str, fwd_ids: np.ndarray | None, clients: Sequence[int] | None = None,
              settings: Sequence[dict[str, Any]] | None = None) -> Answers:
        """One exchange with ``clients`` (all when None) that tolerates failures.

        Clients that asked to be set up again (:attr:`resetup`) are set up first. With
        ``fwd_ids``, every reply is checked before it is used; a reply that fails the checks
        counts as missing under ``federation.on_bad_reply: drop`` and ends the run under
        ``fail``. The signals a missing client was sent are kept for its next message (it
        applies a round's signals at most once).

        Returns:
            The (reply, info) pairs by client, and ``{client: (cause, reason)}`` for those
            missing.
        """
        clients = list(range(self.k)) if clients is None else list(clients)
        missing: dict[int, tuple[str, str]] = {}
        for k in [k for k in clients if k in self.resetup]:
            why = self._setup_again(k)
            if why is not None:
                missing[k] = why
        clients = [k for k in clients if k not in missing]
        fwd = None if fwd_ids is None else self.tokens(fwd_ids)
        arrays: list[Arrays] = [{} if fwd is None else {"fwd_ids": fwd} for _ in clients]
        settings = [dict(s) for s in settings] if settings is not None else (
            [{} for _ in clients])
        sent = self._with_pending(arrays, settings, clients)
        got: dict[int, Reply] = {}
        results = self._exchange(kind, arrays, settings, clients) if clients else []
        for k, result, was in zip(clients, results, sent, strict=True):
            who = describe_client(self.transport, k)
            if isinstance(result, NoReply):
                if result.cause == "bad_reply" and self.cfg.federation.on_bad_reply == "fail":
                    raise ClientFailure(f"{result.reason} (federation.on_bad_reply = fail)")
                missing[k] = (result.cause, result.reason)
                self.pending[k] = was
                continue
            reply, info = result
            if info.get("needs_setup"):  # a restarted process: its expert comes back at setup
                missing[k] = ("restarted", f"{who} holds no state of this run (restarted); "
                                           "it is set up again before its next message")
                self.resetup.add(k)
                continue
            if fwd is not None:
                try:
                    check_prediction_reply(reply, fwd, self.data.n_outputs, self.k, who, kind,
                                           self.cfg.server.reply_limit)
                except ClientFailure as exc:
                    if self.cfg.federation.on_bad_reply == "fail":
                        raise ClientFailure(f"{exc} (federation.on_bad_reply = fail)") from exc
                    missing[k] = ("bad_reply", str(exc))
                    self.pending[k] = was
                    continue
            got[k] = result
        for k, (cause, reason) in missing.items():
            self._absent(k, cause, reason)
            log.warning('"%s": absent (%s): %s', kind, cause, reason)  # the reason names it
        return got, missing

    def _absent(self, k: int, cause: str, reason: str | None = None) -> None:
        """Count a round client ``k`` missed under ``cause`` (and why, when it was asked)."""
        self.absences[k][cause] = self.absences[k].get(cause, 0) + 1
        if reason is not None:
            self.last_reason[k] = reason

    def _with_stand_ins(self, got: dict[int, Reply], n: int) -> list[Arrays]:
        """The replies of every client, in order: a missing one's is a stand-in present
        nowhere on the ``n`` samples (it passes its vote on)."""
        return [got[k][0] if k in got else absent_reply(n, self.data.n_outputs, self.k,
                                                        self.step.dtype)
                for k in range(self.k)]

    def _enough(self, got: dict[int, Reply], missing: dict[int, tuple[str, str]],
                where: str) -> None:
        """Fail when fewer than ``federation.min_clients`` answered, naming who is missing."""
        need = self.cfg.federation.min_clients
        if len(got) >= need:
            return
        away = [k for k in range(self.k) if k not in got]
        why = "; ".join(f"{describe_client(self.transport, k)}: "
                        + (f"{missing[k][0]}: {missing[k][1]}" if k in missing
                           else "not asked (availability)") for k in away)
        raise ClientFailure(f"{where}: {len(got)} of {self.k} clients answered, fewer than "
                            f"federation.min_clients = {need}. Missing: {why}")

    def _setup_message(self, k: int, train: np.ndarray, state: Arrays | None,
                       party: dict[str, Any] | None) -> tuple[Arrays, dict[str, Any]]:
        """Client ``k``'s setup: the run's settings, the training tokens and, when resuming,
        its state (``state``) or the generation of its own checkpoint (``party``)."""
        arrays: Arrays = {"train_ids": train, **(state or {})}
        settings = {"config": self.cfg_yaml, "index": k, "out_dim": self.data.n_outputs,
                    "salt": self.salt.hex(), "run_id": self.run_id}
        if party is not None:  # the client keeps its own state
            settings.update(resume_generation=party["generation"],
                            resume_sha256=party["sha256"])
        return arrays, settings

    def _setup_again(self, k: int) -> tuple[str, str] | None:
        """Set up a client that lost its state, from the latest complete checkpoint generation
        (its own file, or the state the server holds) or from scratch when there is none yet.

        Returns:
            None when it took, else (cause, reason) of its absence.
        """
        state = self.saved_states[k] if self.saved_states else None
        party = self.parties[k] if self.parties else None
        arrays, settings = self._setup_message(k, self.tokens(self.data.splits.train), state,
                                               party)
        [result] = self._exchange("setup", [arrays], [settings], [k])
        who = describe_client(self.transport, k)
        if isinstance(result, NoReply):
            return result.cause, result.reason
        reply, info = result
        check_setup_reply(reply, info, who)
        if int(info["n_params"]) != self.n_params[k]:
            raise ClientFailure(f"{who} came back with {info['n_params']} parameters; it had "
                                f"{self.n_params[k]}")
        self.resetup.discard(k)
        self.pending[k] = None  # signals for outputs of a state it no longer holds
        self.rejoins[k] += 1
        log.warning("%s rejoined the run (%s)", who, "from its last checkpoint"
                    if state is not None or party is not None else "from scratch: no "
                    "checkpoint yet")
        return None

    # -- phases ------------------------------------------------------------------------------

    def setup(self, resume: Checkpoint | None = None) -> None:
        """Send every client the config, the run's salt and the training tokens (with its own
        state when resuming); check the samples line up."""
        self._draw_tokens(bytes.fromhex(resume.server["salt"]) if resume is not None
                          and resume.server.get("salt") else None)
        self.run_id = (resume.server.get("run_id") if resume is not None else None) or (
            f"{self.cfg.name}-{secrets.token_hex(4)}")
        # The config (and its seed) travels to every client: noise drawn from the seed alone
        # could be regenerated and subtracted by any of them.
        self.noise_key = (resume.server.get("noise_key") if resume is not None else None) or (
            secrets.token_hex(16))
        self.step.defence = dataclasses.replace(self.step.defence,
                                                key=bytes.fromhex(self.noise_key))
        train = self.tokens(self.data.splits.train)
        messages = [self._setup_message(
            k, train, resume.clients[k] if resume is not None and resume.clients else None,
            resume.server["parties"][k] if resume is not None and not resume.clients
            and resume.server.get("parties") else None) for k in range(self.k)]
        replies = self._exchange_all("setup", [a for a, _ in messages], [s for _, s in messages])
        for k, (reply, info) in enumerate(replies):
            check_setup_reply(reply, info, describe_client(self.transport, k))
        if resume is not None:
            self.saved_states = list(resume.clients) or None
            self.parties = resume.server.get("parties")
        self.n_params = [int(info["n_params"]) for _, info in replies]
        self.shards = [str(info.get("shard", "")) for _, info in replies]
        held = {self._holder(k): self.known_ids(r["ids"]) for k, (r, _) in enumerate(replies)}
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
        self.data.splits = drop_unseen(self.data.splits,
                                       [self.known_ids(r["absent"]) for r, _ in replies])
        train = self.data.splits.train
        self.leakage = LabelLeakage(train, self.data.labels_of(train), self.data.task, self.k,
                                    self.data.n_outputs)
        log.info("setup: %d clients, %s parameters", self.k, self.n_params)

    def evaluate(self, splits: Sequence[str], round_index: int,
                 final: bool = False) -> list[dict[str, Any]]:
        """Evaluate on one or more splits with a single exchange; one metrics row each.

        ``final`` (the evaluation after training, ``val`` among ``splits``): under
        ``ensemble.smoothing: auto`` the server first picks ``λ`` on the validation replies
        and evaluates every split with it (:attr:`smoothing` keeps the pick).
        """
        parts = [getattr(self.data.splits, split) for split in splits]
        ids_all = np.concatenate(parts)
        got, missing = self._send("evaluate", ids_all)
        self._enough(got, missing, f"evaluation after round {round_index}")
        replies: list[Arrays | None] = list(self._with_stand_ins(got, ids_all.size))
        got.clear()  # the replies now live only in `replies`, which stacking consumes
        subs = self.step.stack_splits(replies, [ids.size for ids in parts])
        smoothing = None
        if final and self.cfg.ensemble.smoothing == SMOOTHING_AUTO:
            at = list(splits).index("val")
            self.smoothing = self.step.pick_smoothing(parts[at], subs[at])
            smoothing = self.smoothing.value
        rows = []
        delegations: dict[str, np.ndarray] = {}  # split -> mean delegation (K, K), tracked
        for split, ids, sub in zip(splits, parts, subs, strict=True):
            metrics, details = self.step.evaluate(ids, sub, self.n_params, smoothing)
            if self.tracker is not None:
                delegations[split] = details["delegation"].mean(0)
            row = {"round": round_index, "split": split, **metrics,
                   "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                   "present": self.answered.tolist(),
                   **({"absent": sorted(missing)} if missing else {})}
            self.history.append(row)
            rows.append(row)
            if final and split == "test":  # the same replies, combined once per absence
                self.robustness = self.step.robustness(ids, sub, self.n_params, smoothing)
            if self.run_dir is not None and split == "test":
                # what the figures of delegation patterns are drawn from
                self.run_dir.write_npz(OUTPUTS_FILE, details)
        # The rows of one evaluation share their counts; the next rows count afresh.
        self.answered = np.zeros(self.k, dtype=np.int64)
        if self.run_dir is not None:
            self.run_dir.write_jsonl(METRICS_FILE, self.history)
        if self.tracker is not None:
            self.tracker.evaluation(rows, delegations)
        return rows

    def _holder(self, k: int) -> str:
        shard = self.shards[k] if k < len(self.shards) else ""
        return f"client_{k}" + (f" (shard {shard})" if shard else "")

    def checkpoint(self, round_index: int, elapsed: float) -> bool:
        """Flush pending signals; every client checkpoints its state (into its own folder when
        it has one, else in its reply); write the server's generation.

        A generation is complete only with every party: when one does not answer, none is
        written (the latest complete one stays; a warning says why) and False is returned.
        """
        settings = [{"checkpoint_round": round_index} for _ in range(self.k)]
        got, missing = self._send("checkpoint", None, settings=settings)
        if missing:
            log.warning("checkpoint after round %d not written: %s did not answer; the latest "
                        "complete checkpoint stays", round_index,
                        ", ".join(describe_client(self.transport, k) for k in sorted(missing)))
            return False
        infos = [got[k][1] for k in range(self.k)]
        kept = [bool(info.get("generation")) for info in infos]
        if any(kept) and not all(kept):
            raise ClientFailure(
                f"clients {[k for k, v in enumerate(kept) if v]} keep their own checkpoints "
                f"and {[k for k, v in enumerate(kept) if not v]} do not: give every node a "
                "data-dir, or none")
        states = []
        for k in range(self.k):
            state = got[k][0]
            if kept[k]:
                if state:
                    raise ClientFailure(f"{describe_client(self.transport, k)} keeps its own "
                                        "checkpoint but also sent its state")
            else:
                check_state_reply(state, describe_client(self.transport, k))
            states.append(state)
        self.parties = ([{"generation": str(infos[k]["generation"]),
                          "sha256": str(infos[k]["sha256"])} for k in range(self.k)]
                        if all(kept) else None)
        self.saved_states = None if self.parties else states
        if self.run_dir is not None:
            server = {"history": self.history, "bytes_up": self.bytes_up,
                      "bytes_down": self.bytes_down, "train_losses": self.train_losses,
                      "elapsed": elapsed, "config": self.cfg_yaml, "salt": self.salt.hex(),
                      "run_id": self.run_id, "parties": self.parties,
                      "noise_key": self.noise_key, "answered": self.answered.tolist(),
                      "party_record": self.party_record()}
            leak = self.leakage.state() if self.leakage is not None else {}
            clients = [] if self.parties else list(states)
            self.run_dir.save_checkpoint(Checkpoint(round_index, server, leak, clients))
        return True

    def party_record(self) -> list[dict[str, Any]]:
        """Per party: training rounds answered, rounds absent by cause, rejoins, and the last
        reason it was absent (the summary's ``parties``).

        Causes: ``availability`` (not asked: ``availability.dropout`` / ``absent``),
        ``timeout`` (no reply within ``federation.reply_timeout``), ``error`` (its process
        raised or died), ``bad_reply`` (the reply failed the server's checks), ``restarted``
        (it answered without its state and was set up again).
        """
        return [{"client": k, "rounds_present": int(self.rounds_present[k]),
                 "absent": dict(sorted(self.absences[k].items())),
                 "rejoined": int(self.rejoins[k]), "last_reason": self.last_reason[k]}
                for k in range(self.k)]

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
            self.answered = np.asarray(resume.server.get("answered", [0] * self.k),
                                       dtype=np.int64)
            self._load_party_record(resume.server.get("party_record"))
        self.setup(resume)
        if resume is not None and self.leakage is not None:
            self.leakage.load(resume.server_arrays)
        t0 = time.perf_counter() - elapsed0
        train_ids = self.data.splits.train
        per_epoch = self.rounds_per_epoch()
        total = self.cfg.train.epochs * per_epoch
        tcfg = self.cfg.train
        avail = self.cfg.availability
        chunks: dict[int, list[np.ndarray]] = {}
        for r in range(start_round, total):
            epoch, j = divmod(r, per_epoch)
            if epoch not in chunks:
                chunks = {epoch: list(batch_order(train_ids.size, tcfg.chunk_size, epoch,
                                                  self.cfg.seed))}
            ids = train_ids[chunks[epoch][j]]
            asked = round_presence(avail.dropout, avail.absent, self.k, r, self.cfg.seed)
            clients = [k for k in range(self.k) if asked[k]]
            for k in np.flatnonzero(~asked):
                self._absent(int(k), "availability")
            got, missing = self._send("train", ids, clients,
                                      [self._fault(k, r + 1) for k in clients])
            self._enough(got, missing, f"training round {r + 1}")
            answered = [k for k in clients if k in got]
            loss, signals = self.step.train_step(ids, self._with_stand_ins(got, ids.size), r)
            self.leakage.observe(ids, [signals[k] for k in answered],
                                 [got[k][0]["pred"] for k in answered], parties=answered)
            for k in answered:  # an absent party is sent nothing: its expert stays as it was
                self.pending[k] = (ids, signals[k], r)
            self.answered[answered] += 1
            self.rounds_present[answered] += 1
            self.train_losses.append(loss)
            metrics = None
            done = r + 1
            if self.tracker is not None:
                present = np.zeros(self.k, dtype=bool)
                present[answered] = True
                self.tracker.train_round(done, loss, present)
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
        _, test = self.evaluate(["val", "test"], total, final=True)
        wall = time.perf_counter() - t0
        self.checkpoint(total, wall)
        return FederationResult(self.history, test, total, self.bytes_up, self.bytes_down,
                                wall, self.train_losses, self.n_params, self.leakage_report(),
                                None if self.smoothing is None else self.smoothing.to_dict(),
                                self.robustness, self.party_record())

    def _fault(self, k: int, round_number: int) -> dict[str, Any]:
        """The settings that inject client ``k``'s fault in training round ``round_number``
        (counted from 1; ``federation.faults``), or none."""
        fed = self.cfg.federation
        for entry in fed.faults:
            if int(entry["client"]) == k and int(entry["round"]) == round_number:
                seconds = float(entry.get("seconds", 3 * fed.reply_timeout))
                return {"fault": entry["kind"], "fault_seconds": seconds}
        return {}

    def _load_party_record(self, record: list[dict[str, Any]] | None) -> None:
        for entry in record or []:
            k = int(entry["client"])
            self.rounds_present[k] = int(entry["rounds_present"])
            self.absences[k] = {str(c): int(n) for c, n in entry["absent"].items()}
            self.rejoins[k] = int(entry["rejoined"])
            self.last_reason[k] = str(entry["last_reason"])

    def leakage_report(self) -> dict[str, Any]:
        """``label_leakage``: the strongest accumulated attack of :mod:`liquid_fed.privacy` and,
        under ``guarantee``, the label-DP guarantee of the defence over every round a sample was
        sent."""
        report = self.leakage.report()
        privacy = self.cfg.privacy
        # Every epoch's chunks cover the training set once: each sample is sent once per epoch
        # (counted from the config, not the meter, which an old checkpoint may have reset).
        report["guarantee"] = guarantee(privacy.clip, privacy.noise, self.cfg.train.epochs,
                                        self.k)
        return report
