"""Rounds continue when parties fail: the server loop with injected faults, in process.

The runs through Flower on Ray (a real crash, hang and NaN reply) are in test_federation.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_protocol import EXACT  # one step per chunk, float64

from liquid_fed.availability import round_presence
from liquid_fed.centralized import build_ensemble, central_data, train_ensemble
from liquid_fed.config import build_config
from liquid_fed.errors import ClientFailure
from liquid_fed.federation import Federation, LocalTransport, handle_client_message
from liquid_fed.federation.setup import id_tokens
from liquid_fed.rundir import RunDir, load_checkpoint

# Client 1 crashes in round 2, client 2 hangs in round 3 and client 0 sends NaN in round 5;
# client 3 crashes in round 5 too (two parties out of one round).
FAULTS = ("federation.faults=[{client: 1, round: 2, kind: crash}, {client: 2, round: 3, "
          "kind: hang}, {client: 0, round: 5, kind: nan}, {client: 3, round: 5, kind: crash}]")


@pytest.mark.parametrize("extra", [
    [FAULTS],
    [FAULTS, "availability.dropout=0.3", "optim.name=adam", "optim.lr=0.01"],
], ids=["faults", "faults+dropout+adam"])
def test_faults_give_the_centralized_twin_with_those_parties_absent(extra: list[str]) -> None:
    # Momentum 0.9 (EXACT): a signal applied twice, or a faulted party's optimizer stepped,
    # would move the experts away from the twin's.
    cfg = build_config(EXACT, extra)
    fed = Federation(cfg, LocalTransport(cfg.n_clients))
    result = fed.run()
    data = central_data(cfg)
    ensemble = build_ensemble(cfg, data)
    losses: list[float] = []
    central = train_ensemble(cfg, data, ensemble, on_step=lambda _, loss: losses.append(loss))
    assert len(losses) == len(result.train_losses) == result.rounds > 10
    np.testing.assert_allclose(result.train_losses, losses, rtol=0, atol=1e-9)
    for k, expert in enumerate(ensemble.experts):
        for name, value in expert.state_dict().items():
            np.testing.assert_allclose(fed.transport.states[k][f"model/{name}"], value.numpy(),
                                       rtol=0, atol=1e-9)
    assert result.test["loss"] == pytest.approx(central["test"]["loss"], abs=1e-9)
    # Per party: the faults that hit a round it was asked in, each under its cause.
    avail, causes = cfg.availability, {"crash": "error", "hang": "timeout", "nan": "bad_reply"}
    asked = np.stack([round_presence(avail.dropout, avail.absent, cfg.n_clients, r, cfg.seed)
                      for r in range(result.rounds)])
    for party in result.parties:
        k = party["client"]
        hits = [f for f in cfg.federation.faults if f["client"] == k and asked[f["round"] - 1, k]]
        expected = {causes[f["kind"]]: 1 for f in hits}
        if (~asked[:, k]).any():
            expected["availability"] = int((~asked[:, k]).sum())
        assert party["absent"] == expected, k
        assert party["rounds_present"] == int(asked[:, k].sum()) - len(hits)
    hit = sum(sum(p["absent"].get(c, 0) for c in causes.values()) for p in result.parties)
    assert hit >= 2
    assert sum(result.history[-1]["present"]) == sum(p["rounds_present"]
                                                     for p in result.parties)


def test_signals_sent_again_are_applied_once() -> None:
    cfg = build_config(EXACT)
    salt = bytes(range(16))
    settings = {"config": cfg.to_yaml(), "index": 0, "out_dim": 10, "salt": salt.hex(),
                "run_id": "test"}
    train = id_tokens(np.arange(40), salt)
    _, _, state = handle_client_message("setup", {"train_ids": train}, settings, {})
    rng = np.random.default_rng(0)
    signals = {"bwd_ids": train[:8], "g_pred": rng.normal(size=(8, 10)),
               "g_del": rng.normal(size=(8, 4))}
    _, _, once = handle_client_message("train", signals, {**settings, "round": 3}, state)
    changed = [k for k in state if k.startswith("model/")
               and not np.array_equal(state[k], once[k])]
    assert changed  # the signals moved the expert
    _, _, twice = handle_client_message("train", signals, {**settings, "round": 3}, once)
    for key in once:
        if key.startswith(("model/", "optimizer/")):
            np.testing.assert_array_equal(once[key], twice[key])
    _, _, later = handle_client_message("train", signals, {**settings, "round": 4}, once)
    assert any(not np.array_equal(once[k], later[k]) for k in changed)  # a new round applies


def test_too_few_answers_end_the_run_naming_who_is_missing() -> None:
    faults = ("federation.faults=[{client: 0, round: 3, kind: crash}, "
              "{client: 2, round: 3, kind: nan}, {client: 3, round: 3, kind: hang}]")
    cfg = build_config(EXACT, [faults, "federation.min_clients=2"])
    with pytest.raises(ClientFailure) as info:
        Federation(cfg, LocalTransport(cfg.n_clients)).run()
    text = str(info.value)
    assert text.startswith("training round 3: 1 of 4 clients answered, fewer than "
                           "federation.min_clients = 2. Missing: ")
    assert "client 0: error: client 0: injected crash" in text
    assert "client 2: bad_reply: client 2" in text and "client 3: timeout" in text
    # The centralized twin stops where the federation does.
    data = central_data(cfg)
    with pytest.raises(ClientFailure, match="training round 3: 1 of 4 clients answer"):
        train_ensemble(cfg, data, build_ensemble(cfg, data))
    # One party fewer is enough with min_clients = 1.
    cfg = build_config(EXACT, [faults])
    assert Federation(cfg, LocalTransport(cfg.n_clients)).run().rounds > 3


def test_a_bad_reply_ends_the_run_under_on_bad_reply_fail() -> None:
    cfg = build_config(EXACT, ["federation.faults=[{client: 1, round: 2, kind: nan}]",
                               "federation.on_bad_reply=fail"])
    with pytest.raises(ClientFailure, match=r"client 1 .*values must be finite.*"
                                            r"\(federation.on_bad_reply = fail\)"):
        Federation(cfg, LocalTransport(cfg.n_clients)).run()


class _Restarting(LocalTransport):
    """Client ``who`` loses its state (a restarted process) just before training round
    ``at``; the setups it gets afterwards are recorded."""

    def __init__(self, n: int, who: int, at: int) -> None:
        super().__init__(n)
        self.who, self.at, self.trains, self.resetups = who, at, 0, []
        self.checkpointed: dict[int, dict] = {}  # round -> client who's state it checkpointed

    def exchange(self, kind, arrays, settings, clients=None):
        if kind == "train":
            self.trains += 1
            if self.trains == self.at:
                self.restart(self.who)
        if kind == "setup" and clients == [self.who]:
            self.resetups.append({k: v.copy() for k, v in arrays[0].items()})
        replies = super().exchange(kind, arrays, settings, clients)
        if kind == "checkpoint":
            self.checkpointed[self.trains] = {k: v.copy() for k, v in replies[self.who][0].items()}
        return replies


def test_a_restarted_client_rejoins_from_the_latest_checkpoint(tmp_path: Path) -> None:
    cfg = build_config(EXACT, ["train.checkpoint_every=4", "train.eval_every=3"])
    transport = _Restarting(cfg.n_clients, who=2, at=6)
    result = Federation(cfg, transport, RunDir(tmp_path)).run()
    # Round 6: client 2 answers without state and is absent; round 7 sets it up again from
    # the generation of round 4, then it trains with the others to the end.
    [setup] = transport.resetups
    assert set(transport.checkpointed[4]) == {k for k in setup if k != "train_ids"}
    for key, value in transport.checkpointed[4].items():
        np.testing.assert_array_equal(setup[key], value)
    record = result.parties[2]
    assert record["absent"] == {"restarted": 1} and record["rejoined"] == 1
    assert "holds no state of this run" in record["last_reason"]
    assert record["rounds_present"] == result.rounds - 1
    assert [p["rounds_present"] for p in result.parties if p["client"] != 2] == [
        result.rounds] * 3
    rows = {row["round"]: row for row in result.history if row["split"] == "val"}
    assert rows[6]["present"] == [3, 3, 2, 3]  # rounds 4..6
    assert result.test["accuracy"] > 0.5


def test_a_client_missing_at_evaluation_passes_its_vote_on() -> None:
    cfg = build_config(EXACT, ["train.eval_every=5"])

    class _DownAtEvaluation(LocalTransport):
        def exchange(self, kind, arrays, settings, clients=None):
            if kind == "evaluate":
                settings = [{**s, "fault": "crash"} if i == 1 else s
                            for i, s in enumerate(settings)]
            return super().exchange(kind, arrays, settings, clients)

    result = Federation(cfg, _DownAtEvaluation(cfg.n_clients)).run()
    assert all(row["absent"] == [1] for row in result.history)
    assert result.parties[1]["absent"] == {"error": len({row["round"]
                                                         for row in result.history})}
    assert result.test["accuracy"] > 0.3


def test_stop_and_resume_with_faults_gives_the_same_run(tmp_path: Path) -> None:
    cfg = build_config(EXACT, [FAULTS, "train.eval_every=4", "optim.name=adam",
                               "optim.lr=0.01"])
    whole = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    writer = RunDir(tmp_path)
    assert Federation(cfg, LocalTransport(cfg.n_clients), writer).run(stop_after=4) is None
    resumed = Federation(cfg, LocalTransport(cfg.n_clients), writer).run(
        load_checkpoint(tmp_path, cfg.n_clients))
    np.testing.assert_array_equal(resumed.train_losses, whole.train_losses)
    # Every metric and count but the bytes (a resumed run sends its setup twice).
    assert [_no_bytes(r) for r in resumed.history] == [_no_bytes(r) for r in whole.history]
    assert resumed.parties == whole.parties
    assert [p["absent"] for p in whole.parties][1] == {"error": 1}


def _no_bytes(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("bytes")}
