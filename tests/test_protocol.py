"""The federated protocol without Flower: the exact client code, driven in-process."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from liquid_fed.centralized import build_ensemble, central_data, train_ensemble
from liquid_fed.config import build_config
from liquid_fed.errors import RunFolderError
from liquid_fed.federation import (
    Federation,
    LocalTransport,
    client,
    handle_client_message,
    payload_bytes,
)
from liquid_fed.federation.setup import id_tokens
from liquid_fed.rundir import RunDir, load_checkpoint, prepare

EXACT = {
    "train": {"epochs": 1, "chunk_size": 48, "batch_size": 48, "dtype": "float64",
              "eval_every": 0},
    "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 0.0, "momentum": 0.9},
    "experts": {"kind": "mlp", "options": {"hidden": [16]}},
    "baselines": {"uniform": False, "independent": False},
}


# Client 1 misses rounds 3 to 6 (counted from 1) on top of the random dropout.
SCHEDULED = ["availability.absent=[{client: 1, from_round: 3, to_round: 6}]"]


def _centralized_steps(cfg):
    data = central_data(cfg)
    ensemble = build_ensemble(cfg, data)
    losses: list[float] = []
    result = train_ensemble(cfg, data, ensemble, on_step=lambda _, loss: losses.append(loss))
    return ensemble, losses, result


@pytest.mark.parametrize("extra", [
    [],
    ["ensemble.solver=sink_many", "ensemble.load_weight=0.3",
     "ensemble.specialization_weight=0.2", "ensemble.expert_loss_weight=0.7"],
    ["views.missing=0.2", "optim.name=adam", "optim.lr=0.01"],
    ["availability.dropout=0.3", *SCHEDULED],
    ["availability.dropout=0.5", *SCHEDULED, "views.missing=0.3", "optim.name=adamw",
     "optim.lr=0.01", "ensemble.expert_loss_weight=0.5"],
], ids=["sink_one", "sink_many+aux", "missing+adam", "dropout", "dropout+missing+adamw"])
def test_exact_split_learning_matches_centralized(extra: list[str]) -> None:
    cfg = build_config(EXACT, extra)
    fed = Federation(cfg, LocalTransport(cfg.n_clients))
    result = fed.run()
    ensemble, losses, central = _centralized_steps(cfg)
    assert len(losses) == len(result.train_losses) == result.rounds > 10
    np.testing.assert_allclose(result.train_losses, losses, rtol=0, atol=1e-9)
    for k, expert in enumerate(ensemble.experts):
        state = fed.transport.states[k]
        for name, value in expert.state_dict().items():
            np.testing.assert_allclose(state[f"model/{name}"], value.numpy(), atol=1e-9)
    assert result.test["accuracy"] == pytest.approx(central["test"]["accuracy"], abs=1e-12)
    assert result.test["loss"] == pytest.approx(central["test"]["loss"], abs=1e-9)


class _FreshProcessTransport(LocalTransport):
    """Forgets every live client object before each message, as a deployment process would."""

    def exchange(self, kind, arrays, settings):
        client._LIVE.clear()
        return super().exchange(kind, arrays, settings)


def test_clients_restore_from_persisted_state_alone() -> None:
    cfg = build_config(EXACT, ["optim.name=adamw", "optim.lr=0.01", "train.chunk_size=96",
                               "train.batch_size=32", "train.local_steps=2"])
    cached = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    fresh = Federation(cfg, _FreshProcessTransport(cfg.n_clients)).run()
    np.testing.assert_array_equal(cached.train_losses, fresh.train_losses)
    assert cached.test == fresh.test


class _TwoActorTransport(LocalTransport):
    """Each message goes to one of two "actors" (two live caches) at random, as Flower's
    simulation hands a node's messages to whichever Ray actor is free: a client's live
    runtime is often one its other actor stepped before."""

    def __init__(self, n_clients: int) -> None:
        super().__init__(n_clients)
        self.caches = [OrderedDict(), OrderedDict()]
        self.rng = np.random.default_rng(5)
        self.reloads = 0

    def exchange(self, kind, arrays, settings, clients=None):
        replies = []
        for k, a, s in zip(range(len(self.states)) if clients is None else clients, arrays,
                           settings, strict=True):
            cache = self.caches[int(self.rng.integers(2))]
            stale = [key for key, (version, _) in cache.items() if key[1] == k
                     and "version" in self.states[k]
                     and version != int(self.states[k]["version"][0])]
            self.reloads += len(stale)
            client._LIVE = cache
            replies += super().exchange(kind, [a], [s], [k])
        return replies


def test_clients_stepped_by_two_processes_match_one(monkeypatch) -> None:
    """A live runtime another process stepped since is reloaded from the persisted state (not
    rebuilt): the run equals one where every client lives in one process, exactly."""
    monkeypatch.setattr(client, "_LIVE", client._LIVE)  # restored after the test
    cfg = build_config(EXACT, ["optim.name=adamw", "optim.lr=0.01", "train.chunk_size=96",
                               "train.batch_size=32", "train.local_steps=2"])
    cached = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    transport = _TwoActorTransport(cfg.n_clients)
    two = Federation(cfg, transport).run()
    assert transport.reloads > 20  # the stale-runtime path ran, often
    np.testing.assert_array_equal(cached.train_losses, two.train_losses)
    assert cached.test == two.test


def test_chunks_with_local_steps_learn() -> None:
    cfg = build_config({"train": {"epochs": 8, "chunk_size": 256, "batch_size": 32,
                                  "local_steps": 2, "eval_every": 0},
                        "baselines": {"uniform": False, "independent": False}})
    result = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    assert result.rounds == 8 * 5  # ~1080 training ids / 256 per chunk -> 5 rounds per epoch
    assert np.mean(result.train_losses[-5:]) < 0.5 * np.mean(result.train_losses[:5])
    assert result.test["accuracy"] > 0.8


def test_bytes_are_counted_per_message() -> None:
    cfg = build_config(EXACT, ["train.chunk_size=540", "train.batch_size=540"])
    fed = Federation(cfg, LocalTransport(cfg.n_clients))
    result = fed.run()
    assert result.rounds == -(-fed.data.splits.train.size // 540)
    # Each training reply carries float64 predictions (n, 10), delegations (n, 4), presence (n,).
    per_sample = 10 * 8 + 4 * 8 + 1
    n_train = fed.data.splits.train.size
    assert result.bytes_up > cfg.n_clients * n_train * per_sample
    assert payload_bytes({"a": np.zeros(3)}, {"k": "vv"}) == 24 + 3


def test_client_messages_are_checked() -> None:
    # A client without state (a restarted process) asks to be set up again, whatever it is sent.
    for kind in ("train", "evaluate", "checkpoint"):
        assert handle_client_message(kind, {"fwd_ids": np.arange(3)}, {}, {}) == (
            {}, {"needs_setup": True}, {})
    cfg = build_config(EXACT)
    salt = bytes(range(16))
    settings = {"config": cfg.to_yaml(), "index": 0, "out_dim": 10, "salt": salt.hex(),
                "run_id": "test"}
    with pytest.raises(ValueError, match="setup message lacks settings salt, run_id"):
        handle_client_message("setup", {"train_ids": np.arange(10)},
                              {k: settings[k] for k in ("config", "index", "out_dim")}, {})
    reply, info, state = handle_client_message(
        "setup", {"train_ids": id_tokens(np.arange(10), salt)}, settings, {})
    assert info["n_params"] > 0 and reply["ids"].size == 1797 and reply["absent"].size == 0
    np.testing.assert_array_equal(reply["ids"], id_tokens(np.arange(1797), salt))  # no raw ids
    with pytest.raises(ValueError, match='unknown client message kind "explode"'):
        handle_client_message("explode", {}, settings, state)
    unknown = id_tokens(np.array([99999]), salt)
    with pytest.raises(ValueError, match=f"client does not hold the sample of token "
                                         f"{int(unknown[0])}"):
        handle_client_message("train", {"fwd_ids": unknown}, settings, state)


class _DroppingTransport(LocalTransport):
    """Client 2 claims not to hold the first five ids."""

    def exchange(self, kind, arrays, settings):
        replies = super().exchange(kind, arrays, settings)
        if kind == "setup":
            reply, info = replies[2]
            replies[2] = ({**reply, "ids": reply["ids"][5:]}, info)
        return replies


def test_id_mismatch_is_a_clear_error_or_intersected() -> None:
    cfg = build_config(EXACT)
    with pytest.raises(ValueError, match=r"5 of 1797 requested ids .* 5 missing at 'client_2'"):
        Federation(cfg, _DroppingTransport(cfg.n_clients)).setup()
    cfg = build_config(EXACT, ["data.align=intersect"])
    fed = Federation(cfg, _DroppingTransport(cfg.n_clients))
    fed.setup()
    sp = fed.data.splits
    assert sp.train.size + sp.val.size + sp.test.size == 1797 - 5
    assert not np.isin(np.arange(5), np.concatenate([sp.train, sp.val, sp.test])).any()


def test_run_writer_replaces_files_whole(tmp_path: Path) -> None:
    writer = RunDir(tmp_path)
    writer.write_json("summary.json", {"a": 1})
    writer.write_json("summary.json", {"a": 2, "nan": float("nan"), "np": np.float32(0.5)})
    strict = json.loads((tmp_path / "summary.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-standard JSON: {c}"))
    assert strict == {"a": 2, "nan": None, "np": 0.5}
    writer.write_npz("checkpoints/x.npz", {"t": np.ones(2)})
    with np.load(tmp_path / "checkpoints" / "x.npz", allow_pickle=False) as z:
        assert z["t"].sum() == 2
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_run_folder_is_never_silently_overwritten(tmp_path: Path) -> None:
    cfg = build_config(EXACT)
    run = tmp_path / "run"
    prepare(cfg, run, resume=False, force=False)
    (run / "summary.json").write_text('{"keep": true}')
    with pytest.raises(RunFolderError, match="already holds results; pass --resume"):
        prepare(cfg, run, resume=False, force=False)
    assert json.loads((run / "summary.json").read_text()) == {"keep": True}
    other = build_config(EXACT, ["seed=5"])
    with pytest.raises(RunFolderError, match="config differs"):
        prepare(other, run, resume=True, force=False)
    with pytest.raises(RunFolderError, match="cannot resume"):
        prepare(cfg, tmp_path / "empty", resume=True, force=False)
    with pytest.raises(RunFolderError, match="already finished"):  # nothing left to continue
        prepare(cfg, run, resume=True, force=False)


def test_stop_and_resume_in_process_gives_the_same_result(tmp_path: Path) -> None:
    cfg = build_config(EXACT, ["train.epochs=2", "train.chunk_size=128", "train.batch_size=32",
                               "optim.name=adam", "optim.lr=0.01"])
    whole = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    writer = RunDir(tmp_path)
    stopped = Federation(cfg, LocalTransport(cfg.n_clients), writer).run(stop_after=7)
    assert stopped is None
    checkpoint = load_checkpoint(tmp_path, cfg.n_clients)
    assert checkpoint.round == 7
    resumed = Federation(cfg, LocalTransport(cfg.n_clients), writer).run(checkpoint)
    np.testing.assert_array_equal(resumed.train_losses, whole.train_losses)
    traffic = ("bytes_up", "bytes_down")
    assert ({k: v for k, v in resumed.test.items() if k not in traffic}
            == {k: v for k, v in whole.test.items() if k not in traffic})
    # The interruption cost an extra checkpoint and setup exchange, and the count says so.
    assert resumed.bytes_up > whole.bytes_up and resumed.bytes_down > whole.bytes_down


class _Roll(LocalTransport):
    """Records which clients each message goes to, and each client's state after each one."""

    def __init__(self, n_clients: int) -> None:
        super().__init__(n_clients)
        self.log: list[tuple[str, list[int]]] = []
        self.after: list[list[dict[str, np.ndarray]]] = []

    def exchange(self, kind, arrays, settings, clients=None):
        replies = super().exchange(kind, arrays, settings, clients)
        self.log.append((kind, list(range(len(self.states))) if clients is None
                         else list(clients)))
        self.after.append([{k: v.copy() for k, v in st.items()
                            if k.startswith(("model/", "optimizer/"))} for st in self.states])
        return replies


def test_absent_parties_are_not_asked_and_keep_their_experts() -> None:
    cfg = build_config(EXACT, ["availability.dropout=0.3", *SCHEDULED, "train.eval_every=4"])
    roll = _Roll(cfg.n_clients)
    fed = Federation(cfg, roll)
    result = fed.run()
    train = [(i, who) for i, (kind, who) in enumerate(roll.log) if kind == "train"]
    assert len(train) == result.rounds
    # the schedule holds and the dropout took parties away besides
    assert all(1 not in who for _, who in train[2:6])
    missed = sum(cfg.n_clients - len(who) for _, who in train)
    assert missed > 4 + 0.15 * cfg.n_clients * result.rounds
    assert all(who for _, who in train)
    # A client sent nothing keeps its expert and optimizer state bit for bit.
    for i, who in train:
        for k in set(range(cfg.n_clients)) - set(who):
            before, after = roll.after[i - 1], roll.after[i]
            assert before[k].keys() == after[k].keys()
            for name in before[k]:
                np.testing.assert_array_equal(before[k][name], after[k][name])
    # ``present``: per client, the training messages it got since the previous evaluation.
    rows = [row for row in result.history]
    counts, expected = np.zeros(cfg.n_clients, dtype=int), []
    for kind, who in roll.log:
        if kind == "train":
            counts[who] += 1
        elif kind == "evaluate":
            expected.append(counts.tolist())
            counts[:] = 0
    evaluations = sorted({row["round"] for row in rows})
    assert len(evaluations) == len(expected) >= 3
    for row in rows:
        assert row["present"] == expected[evaluations.index(row["round"])]
    assert sum(sum(e) for e in expected) == cfg.n_clients * result.rounds - missed


@pytest.mark.parametrize("per_round", [1, 2], ids=["step=round", "two steps a round"])
def test_centralized_twin_leaves_a_missed_experts_parameters_alone(per_round: int) -> None:
    from liquid_fed.availability import round_presence

    # One epoch: the mini-batches of a round's chunk are steps per_round * r, ... (the chunks
    # cut the same permutation as the batches).
    cfg = build_config(EXACT, ["availability.dropout=0.3", *SCHEDULED,
                               f"train.chunk_size={48 * per_round}"])
    data = central_data(cfg)
    ensemble = build_ensemble(cfg, data)
    snaps = [[p.detach().clone() for p in e.parameters()] for e in ensemble.experts]
    checked = 0

    def on_step(step: int, _loss: float) -> None:
        nonlocal checked
        who = round_presence(0.3, cfg.availability.absent, cfg.n_clients, step // per_round,
                             cfg.seed)
        for k, expert in enumerate(ensemble.experts):
            now = [p.detach().clone() for p in expert.parameters()]
            changed = any(not torch.equal(a, b) for a, b in zip(snaps[k], now, strict=True))
            # momentum SGD would move a parameter with a zero gradient: absent means no step
            assert changed == bool(who[k]), (step, k)
            checked += not who[k]
            snaps[k] = now

    train_ensemble(cfg, data, ensemble, on_step=on_step)
    assert checked >= 4


def test_round_presence_is_reproducible_and_keeps_one_party() -> None:
    from liquid_fed.availability import round_presence

    absent = [{"client": 2, "from_round": 10, "to_round": 20}]
    masks = np.stack([round_presence(0.3, absent, 4, r, seed=3) for r in range(4000)])
    again = np.stack([round_presence(0.3, absent, 4, r, seed=3) for r in range(4000)])
    np.testing.assert_array_equal(masks, again)
    assert not masks[9:20, 2].any() and masks.any(1).all()
    other = np.stack([round_presence(0.3, [], 4, r, seed=4) for r in range(4000)])
    assert (other != masks).any()
    # Each party is missing with probability P - P^K / K (a round that loses all keeps one).
    rate = 1 - other.mean()
    expected = 0.3 - 0.3 ** 4 / 4
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / other.size)
    assert round_presence(0.0, [], 4, 7, seed=0).all()
    nearly = np.stack([round_presence(0.99, [], 3, r, seed=0) for r in range(200)])
    assert (nearly.sum(1) >= 1).all() and (nearly.sum(1) == 1).mean() > 0.9


def test_stop_and_resume_with_absences_gives_the_same_run(tmp_path: Path) -> None:
    cfg = build_config(EXACT, ["availability.dropout=0.4", *SCHEDULED, "train.eval_every=5",
                               "optim.name=adam", "optim.lr=0.01"])
    whole = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    writer = RunDir(tmp_path)
    assert Federation(cfg, LocalTransport(cfg.n_clients), writer).run(stop_after=7) is None
    resumed = Federation(cfg, LocalTransport(cfg.n_clients), writer).run(
        load_checkpoint(tmp_path, cfg.n_clients))
    np.testing.assert_array_equal(resumed.train_losses, whole.train_losses)
    assert [r["present"] for r in resumed.history] == [r["present"] for r in whole.history]
    assert resumed.test["accuracy"] == whole.test["accuracy"]
    rows = writer.read_metrics()
    assert [r["present"] for r in rows] == [r["present"] for r in whole.history]


def test_evaluation_replies_are_stacked_per_split_and_consumed() -> None:
    """The server stacks an evaluation's replies split by split into tensors filled client
    by client, dropping each reply once copied; the tensors equal a plain stack of each
    split's rows, absent stand-ins and the run's dtype included."""
    from liquid_fed.federation.server import ServerStep, absent_reply
    from liquid_fed.federation.setup import load_server_data

    cfg = build_config({"train": {"dtype": "float64"}})
    step = ServerStep(cfg, load_server_data(cfg))
    k, c, sizes = cfg.n_clients, step.data.n_outputs, [3, 5]
    gen = np.random.default_rng(4)
    replies = [{"pred": gen.standard_normal((8, c)).astype(np.float32),
                "del": gen.dirichlet(np.ones(k), 8).astype(np.float32),
                "present": gen.random(8) < 0.7} for _ in range(k - 1)]
    replies.append(absent_reply(8, c, k, torch.float32))
    want = [{key: np.stack([r[key][start:start + n] for r in replies], 1)
             for key in ("pred", "del", "present")}
            for start, n in ((0, 3), (3, 5))]
    queue = list(replies)
    got = step.stack_splits(queue, sizes)
    assert queue == [None] * k
    for split, expect in zip(got, want, strict=True):
        assert split.preds.dtype == torch.float64 and split.present.dtype == torch.bool
        np.testing.assert_array_equal(split.preds.numpy(), expect["pred"].astype(np.float64))
        np.testing.assert_array_equal(split.dels.numpy(), expect["del"].astype(np.float64))
        np.testing.assert_array_equal(split.present.numpy(), expect["present"])
