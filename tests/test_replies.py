"""A client's reply is checked before it touches the loss: a bad one fails the round naming the
client, and nothing it sends can make an honest expert's parameters non-finite."""

from __future__ import annotations

import re

import numpy as np
import pytest

from liquid_fed.config import build_config
from liquid_fed.errors import ClientFailure
from liquid_fed.federation import Federation, LocalTransport, handle_client_message
from liquid_fed.federation.replies import check_prediction_reply, check_signals, ids_digest
from liquid_fed.federation.setup import id_tokens

TINY = {"train": {"epochs": 1, "chunk_size": 64, "batch_size": 32, "eval_every": 0},
        "experts": {"options": {"hidden": [8]}},
        "baselines": {"uniform": False, "independent": False}}


class _Hostile(LocalTransport):
    """Client 1 corrupts its reply to the n-th message of ``kind`` (0 = the first)."""

    def __init__(self, n_clients: int, kind: str, corrupt, at: int = 1) -> None:
        super().__init__(n_clients)
        self.kind, self.corrupt, self.at, self.seen = kind, corrupt, at, 0

    def exchange(self, kind, arrays, settings):
        replies = super().exchange(kind, arrays, settings)
        if kind == self.kind:
            if self.seen == self.at:
                reply, info = replies[1]
                replies[1] = (self.corrupt({k: v.copy() for k, v in reply.items()}), info)
            self.seen += 1
        return replies


def _set(key, fn):
    def corrupt(r):
        r[key] = fn(r[key])
        return r
    return corrupt


def _drop(key):
    def corrupt(r):
        del r[key]
        return r
    return corrupt


def _nan_at(r):
    r["pred"][3, 2] = np.nan
    return r


def _inf_at(r):
    r["pred"][0, 0] = np.inf
    return r


def _huge_at(r):
    r["pred"][5, 1] = 1e30
    return r


def _negative_delegation(r):
    r["del"][2] = np.array([1.5, -0.5, 0.0, 0.0], dtype=r["del"].dtype)
    return r


def _unnormalised(r):
    r["del"][7] *= 2
    return r


def _stale(r):
    r["ids_digest"] = ids_digest(np.arange(3))
    return r


CASES = {
    "nan prediction": (_nan_at, r"'pred'\[3, 2\] is nan; values must be finite"),
    "inf prediction": (_inf_at, r"'pred'\[0, 0\] is inf"),
    "1e30 prediction": (_huge_at, r"'pred'\[5, 1\] is 1e\+30, beyond the accepted magnitude "
                                  r"1e\+06 \(server.reply_limit\)"),
    "one class too many": (_set("pred", lambda a: np.concatenate([a, a[:, :1]], 1)),
                           r"'pred' has shape \(64, 11\); expected \(64, 10\)"),
    "one row short": (_set("pred", lambda a: a[1:]), r"'pred' has shape \(63, 10\)"),
    "wrong delegation width": (_set("del", lambda a: a[:, :3]),
                               r"'del' has shape \(64, 3\); expected \(64, 4\)"),
    "negative delegation": (_negative_delegation, r"'del'\[2, 1\] is -0.5; delegation weights"),
    "rows not summing to 1": (_unnormalised, r"delegation row 7 sums to (2|1\.99999)"),
    "missing key": (_drop("del"), r"no array 'del' \(arrays: ids_digest, pred, present\)"),
    "integer predictions": (_set("pred", lambda a: a.astype(np.int64)),
                            r"'pred' has dtype int64; expected float32 or float64"),
    "present not bool": (_set("present", lambda a: a.astype(np.float32)),
                         r"'present' has dtype float32"),
    "stale reply": (_stale, r"it answers other ids than the 64 asked for"),
    "no id echo": (_drop("ids_digest"), r"no array 'ids_digest'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_training_reply_fails_the_round_naming_the_client(name: str) -> None:
    corrupt, message = CASES[name]
    cfg = build_config(TINY, ["federation.on_bad_reply=fail"])
    transport = _Hostile(cfg.n_clients, "train", corrupt, at=2)
    fed = Federation(cfg, transport)
    with pytest.raises(ClientFailure, match=r'client 1 sent a bad reply to "train": ' + message):
        fed.run()
    # The honest clients applied only signals computed from checked replies: all finite.
    for k in (0, 2, 3):
        for key, value in transport.states[k].items():
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), (k, key)
    assert len(fed.train_losses) == 2 and np.isfinite(fed.train_losses).all()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_training_reply_drops_the_party_for_the_round(name: str) -> None:
    corrupt, message = CASES[name]
    cfg = build_config(TINY)  # federation.on_bad_reply: drop
    transport = _Hostile(cfg.n_clients, "train", corrupt, at=2)
    result = Federation(cfg, transport).run()
    assert result.parties[1]["absent"] == {"bad_reply": 1}
    assert re.search(r'client 1 sent a bad reply to "train": ' + message,
                     result.parties[1]["last_reason"])
    assert [p["rounds_present"] for p in result.parties] == [result.rounds, result.rounds - 1,
                                                             result.rounds, result.rounds]
    assert np.isfinite(result.train_losses).all()
    for k in range(cfg.n_clients):
        for key, value in transport.states[k].items():
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), (k, key)


def test_nan_at_evaluation_is_refused_instead_of_reported_as_accuracy() -> None:
    cfg = build_config(TINY, ["federation.on_bad_reply=fail"])
    fed = Federation(cfg, _Hostile(cfg.n_clients, "evaluate", _nan_at, at=0))
    with pytest.raises(ClientFailure, match=r'client 1 sent a bad reply to "evaluate": '
                                            r"'pred'\[3, 2\] is nan"):
        fed.run()
    # Dropped instead: the evaluation combines the other three, and its rows say so.
    result = Federation(build_config(TINY), _Hostile(cfg.n_clients, "evaluate", _nan_at,
                                                     at=0)).run()
    assert [row["absent"] for row in result.history] == [[1], [1]]
    assert np.isfinite(result.test["loss"]) and 0 < result.test["accuracy"] <= 1


def test_bad_setup_and_checkpoint_replies_are_refused() -> None:
    cfg = build_config(TINY)
    repeat = _set("ids", lambda a: np.concatenate([a, a[:1]]))
    with pytest.raises(ClientFailure, match=r"client 1 sent a bad reply to \"setup\": 'ids' "
                                            r"repeat"):
        Federation(cfg, _Hostile(cfg.n_clients, "setup", repeat, at=0)).setup()
    floats = _set("ids", lambda a: a.astype(np.float64))
    with pytest.raises(ClientFailure, match="'ids' has dtype float64"):
        Federation(cfg, _Hostile(cfg.n_clients, "setup", floats, at=0)).setup()

    def poison(r):
        key = next(k for k in r if k.startswith("model/"))
        r[key] = np.full_like(r[key], np.nan)
        return r
    with pytest.raises(ClientFailure, match=r'"checkpoint": .* holds values that are not finite'):
        Federation(cfg, _Hostile(cfg.n_clients, "checkpoint", poison, at=0)).run()


def test_reply_limit_is_configurable() -> None:
    n = 4
    ids = np.arange(n)
    reply = {"pred": np.full((n, 2), 5e5, np.float32),
             "del": np.full((n, 2), 0.5, np.float32), "present": np.ones(n, bool),
             "ids_digest": ids_digest(ids)}
    check_prediction_reply(reply, ids, 2, 2, "client 0", "train")  # within 1e6
    with pytest.raises(ClientFailure, match="beyond the accepted magnitude 100000"):
        check_prediction_reply(reply, ids, 2, 2, "client 0", "train", limit=1e5)


def test_clients_check_the_servers_signals() -> None:
    with pytest.raises(ValueError, match=r"server signal 'g_pred' holds values that are not"):
        check_signals({"g_pred": np.array([[np.nan]]), "g_del": np.zeros((1, 2))}, 1, 1, 2)
    cfg = build_config(TINY)
    settings = {"config": cfg.to_yaml(), "index": 0, "out_dim": 10, "salt": "00" * 16,
                "run_id": "test"}
    tokens = id_tokens(np.arange(100), bytes(16))
    _, _, state = handle_client_message("setup", {"train_ids": tokens}, settings, {})
    with pytest.raises(ValueError, match=r"server signal 'g_del' is .*expected floats of shape "
                                         r"\(2, 4\)"):
        handle_client_message("train", {"bwd_ids": tokens[:2], "g_pred": np.zeros((2, 10)),
                                        "g_del": np.zeros((2, 3))}, settings, state)
