"""What the returned gradients leak about the labels, measured with every accumulated attack;
the knob that blurs them; the label-DP guarantee it gives."""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from liquid_fed.config import build_config
from liquid_fed.federation import Federation, LocalTransport
from liquid_fed.privacy import (
    CLASSIFICATION_ATTACKS,
    AccountantMissing,
    EmbeddingLeakage,
    GradientDefence,
    LabelLeakage,
    guarantee,
    label_dp,
    matched_scores,
)
from liquid_fed.rundir import RunDir, load_checkpoint, prepare

TINY = {"train": {"epochs": 2, "chunk_size": 128, "batch_size": 64, "eval_every": 0},
        "experts": {"options": {"hidden": [16]}},
        "baselines": {"uniform": False, "independent": False}}


class _Spy(LocalTransport):
    """Records, per client, every (ids, g_pred, own prediction) the client is sent: the
    attacker's view (its own prediction is what it sent for the chunk the signals answer)."""

    def __init__(self, n_clients: int) -> None:
        super().__init__(n_clients)
        self.received: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [
            [] for _ in range(n_clients)]
        self.own: list[dict[int, np.ndarray]] = [{} for _ in range(n_clients)]

    def exchange(self, kind, arrays, settings):
        for k, a in enumerate(arrays):
            if "bwd_ids" in a:
                own = np.stack([self.own[k][int(t)] for t in a["bwd_ids"]])
                self.received[k].append((a["bwd_ids"].copy(), a["g_pred"].copy(), own))
        replies = super().exchange(kind, arrays, settings)
        if kind == "train":
            for k, (r, _) in enumerate(replies):
                for t, p in zip(arrays[k]["fwd_ids"].tolist(), r["pred"], strict=True):
                    self.own[k][int(t)] = p.copy()
        return replies


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _attacks_by_hand(received, fed: Federation) -> dict[str, float]:
    """Every classification attack, written out from the whole history the client kept (it
    receives tokens; the check maps them back to the server's labels)."""
    history: dict[int, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for tokens, g, own in received:
        per_sample = np.asarray(g, dtype=np.float64) * len(tokens)  # rows of the mean loss
        for i, row, o in zip(fed.known_ids(tokens).tolist(), per_sample, own, strict=True):
            history[i].append((row, np.asarray(o, dtype=np.float64)))
    guesses: dict[str, dict[int, int]] = defaultdict(dict)
    for i, rounds in history.items():
        rows = [r for r, _ in rounds]
        guesses["latest"][i] = int(np.argmin(rows[-1]))
        guesses["first"][i] = int(np.argmin(rows[0]))
        votes = Counter(int(np.argmin(r)) for r in rows)
        top = max(votes.values())
        guesses["majority"][i] = min(c for c, v in votes.items() if v == top)
        guesses["sum"][i] = int(np.argmin(sum(rows)))
        guesses["normalized_sum"][i] = int(np.argmin(sum(r / np.linalg.norm(r) for r in rows)))
        guesses["early"][i] = int(np.argmin(sum(r / (t + 1) for t, r in enumerate(rows))))
        score = np.zeros(rows[0].size)
        for r, o in rounds:
            s = _softmax(o)
            for c in range(r.size):
                v = s - np.eye(r.size)[c]
                score[c] += max(float(r @ v), 0.0) ** 2 / float(v @ v)
        guesses["matched"][i] = int(np.argmax(score))
    ids = np.array(sorted(history))
    labels = fed.data.labels_of(ids)
    return {name: float(np.mean(np.array([g[i] for i in ids]) == labels))
            for name, g in guesses.items()}


@pytest.mark.parametrize("extra", [[], ["ensemble.mix=logits", "ensemble.solver=sink_many"],
                                   ["ensemble.expert_loss_weight=0"]],
                         ids=["probs", "logits+sink_many", "no-expert-loss"])
def test_every_client_recovers_the_labels_from_exact_gradients(extra: list[str]) -> None:
    cfg = build_config(TINY, extra)
    spy = _Spy(cfg.n_clients)
    fed = Federation(cfg, spy)
    result = fed.run()
    leak = result.label_leakage
    # The meter agrees with the attacks done by hand on exactly what each client received.
    # (The final flush carries the last round's signals: the meter scored those too.)
    for k in range(cfg.n_clients):
        hand = _attacks_by_hand(spy.received[k], fed)
        assert hand["latest"] == 1.0
        for name in CLASSIFICATION_ATTACKS:
            assert leak["attacks"][name]["per_client"][k] == pytest.approx(hand[name]), name
    assert leak["max"] == 1.0 and min(leak["per_client"]) > 0.99
    assert leak["samples"] == fed.data.splits.train.size
    assert leak["rounds_per_sample"] == cfg.train.epochs
    assert 0.09 < leak["chance"] < 0.12  # digits: ten balanced classes
    assert leak["guarantee"]["epsilon"] is None
    assert "privacy.clip is 0" in leak["guarantee"]["reason"]


def test_the_reported_leakage_under_noise_is_the_strongest_accumulated_attack() -> None:
    cfg = build_config({**TINY, "train": {**TINY["train"], "epochs": 6}},
                       ["privacy.clip=1.0", "privacy.noise=0.5"])
    spy = _Spy(cfg.n_clients)
    fed = Federation(cfg, spy)
    leak = fed.run().label_leakage
    hand = [_attacks_by_hand(spy.received[k], fed) for k in range(cfg.n_clients)]
    for k in range(cfg.n_clients):
        for name in CLASSIFICATION_ATTACKS:
            assert leak["attacks"][name]["per_client"][k] == pytest.approx(hand[k][name]), name
    strongest = max(v for h in hand for v in h.values())
    assert leak["max"] == pytest.approx(strongest)
    assert leak["max"] == leak["attacks"][leak["best_attack"]]["max"]
    # Keeping every signal pays: the sum over rounds beats the latest gradient alone here.
    assert max(h["sum"] for h in hand) > max(h["latest"] for h in hand)
    assert leak["guarantee"]["epsilon"] == pytest.approx(
        label_dp(1.0, 0.5, cfg.train.epochs)["epsilon"])
    assert leak["guarantee"]["epsilon_all_clients"] == pytest.approx(
        label_dp(1.0, 0.5, cfg.train.epochs * cfg.n_clients)["epsilon"])


def test_noise_on_the_returned_gradients_brings_leakage_towards_chance() -> None:
    cfg = build_config(TINY, ["privacy.clip=1.0", "privacy.noise=4.0"])
    leak = Federation(cfg, LocalTransport(cfg.n_clients)).run().label_leakage
    assert leak["max"] < 0.3  # exact gradients: 1.0
    assert leak["guarantee"]["epsilon"] > 0


def test_regression_leakage_is_the_residual_sign() -> None:
    cfg = build_config({**TINY, "data": {"name": "diabetes"},
                        "views": {"kind": "groups", "n_views": 2, "options": {}}})
    result = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    leak = result.label_leakage
    assert leak["chance"] == 0.5 and 0.5 < leak["max"] <= 1.0
    assert leak["attack"].startswith("sign")
    assert leak["attacks"]["latest"]["max"] == 1.0  # exact gradients: the sign is the truth


def test_the_noise_key_is_the_servers_and_a_resumed_run_draws_the_same_noise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import liquid_fed.federation.loop as loop

    cfg = build_config(TINY, ["privacy.clip=1.0", "privacy.noise=0.5"])
    key = "0123456789abcdef" * 2
    monkeypatch.setattr(loop.secrets, "token_hex", lambda n: key[:2 * n])
    straight = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    run = prepare(cfg, tmp_path / "run")
    assert Federation(cfg, LocalTransport(cfg.n_clients), run).run(stop_after=5) is None
    checkpoint = load_checkpoint(tmp_path / "run", cfg.n_clients)
    assert checkpoint.server["noise_key"] == key  # kept by the server, for the resume
    monkeypatch.setattr(loop.secrets, "token_hex", lambda n: "f" * 2 * n)  # a resume keeps it
    resumed = Federation(cfg, LocalTransport(cfg.n_clients), RunDir(tmp_path / "run"))
    again = resumed.run(resume=checkpoint)
    assert resumed.step.defence.key == bytes.fromhex(key)
    np.testing.assert_allclose(again.train_losses, straight.train_losses, rtol=1e-6)
    assert again.label_leakage["attacks"] == straight.label_leakage["attacks"]
    # Another key: other noise.
    other = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    assert other.train_losses != straight.train_losses


def test_defence_clips_each_sample_and_draws_reproducible_noise() -> None:
    rng = np.random.default_rng(0)
    n = 50
    signals = [{"g_pred": rng.normal(size=(n, 3)) / n, "g_del": rng.normal(size=(n, 2)) / n}
               for _ in range(2)]
    assert GradientDefence().apply(signals, 0)[0] is signals[0]  # off: untouched
    clipped = GradientDefence(clip=0.5).apply(signals, 0)
    for before, after in zip(signals, clipped, strict=True):
        rows_b = np.hstack([before["g_pred"], before["g_del"]]) * n
        rows_a = np.hstack([after["g_pred"], after["g_del"]]) * n
        norms = np.linalg.norm(rows_a, axis=1)
        assert norms.max() <= 0.5 + 1e-12
        small = np.linalg.norm(rows_b, axis=1) <= 0.5
        np.testing.assert_allclose(rows_a[small], rows_b[small])  # within the bound: as is
        big = ~small  # beyond it: same direction, norm 0.5
        np.testing.assert_allclose(rows_a[big] / norms[big, None],
                                   rows_b[big] / np.linalg.norm(rows_b[big], axis=1)[:, None])
    noisy = GradientDefence(clip=0.5, noise=2.0, seed=3, key=b"secret-of-server")
    a, b = noisy.apply(signals, 7), noisy.apply(signals, 7)
    np.testing.assert_array_equal(a[1]["g_pred"], b[1]["g_pred"])  # same round: same draw
    assert not np.array_equal(a[1]["g_pred"], noisy.apply(signals, 8)[1]["g_pred"])
    # A client knows the seed, the round and its index, not the key: it cannot redraw it.
    keyless = GradientDefence(clip=0.5, noise=2.0, seed=3).apply(signals, 7)
    assert not np.allclose(a[1]["g_pred"], keyless[1]["g_pred"])
    resid = np.hstack([a[0]["g_pred"], a[0]["g_del"]]) * n - np.hstack(
        [clipped[0]["g_pred"], clipped[0]["g_del"]]) * n
    assert resid.std() == pytest.approx(1.0, rel=0.15)  # noise 2.0 x clip 0.5


# -- each attack on a hand-made case -----------------------------------------------------------


def _feed(meter: LabelLeakage, rounds: list[tuple[list[int], list[list[float]]]],
          own: np.ndarray | None = None) -> None:
    """Per round: the ids and their per-sample rows (sent as the gradient of the mean loss)."""
    for ids, rows in rounds:
        g = np.array(rows) / len(ids)
        pred = np.zeros_like(g) if own is None else own[np.searchsorted([10, 11, 12], ids)]
        meter.observe(np.array(ids), [{"g_pred": g}], [pred])


def test_each_classification_attack_on_a_hand_made_history() -> None:
    meter = LabelLeakage(np.array([10, 11, 12]), np.array([0, 1, 2]), "classification", 1, 3)
    _feed(meter, [
        ([10, 11], [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
        ([10, 11, 12], [[0.3, -0.2, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]),
        ([11, 12], [[-0.2, 0.0, 0.0], [0.0, -0.1, 0.0]]),
    ])
    # Sample 10 (label 0): rounds [-1,0,0], [.3,-.2,0]. Latest argmin 1 (wrong); first 0;
    # votes {0:1, 1:1}, tie to the lower class 0; sum [-.7,-.2,0] -> 0; unit sum
    # [-1,0,0] + [.83,-.55,0] -> 1 (wrong); early [-1,0,0] + [.15,-.1,0] -> 0.
    # Sample 11 (label 1): argmins 1, 1, 0. latest wrong; first, majority, sum [-.2,-2,0],
    # unit sum [-1,-2,0], early [-.07,-1.5,0] right.
    # Sample 12 (label 2): rounds [0,0,-1], [0,-.1,0]. latest 1 wrong; first 2; votes tie
    # {2:1, 1:1} -> 1 wrong; sum [0,-.1,-1] -> 2; unit sum [0,-1,-1] tie -> 1 wrong;
    # early [0,-.05,-1] -> 2.
    expected = {"latest": 0 / 3, "first": 3 / 3, "majority": 2 / 3, "sum": 3 / 3,
                "normalized_sum": 1 / 3, "early": 3 / 3}
    report = meter.report()
    for name, share in expected.items():
        assert report["attacks"][name]["per_client"] == [pytest.approx(share)], name
    assert report["max"] == 1.0 and report["best_attack"] == "first"  # first of the best
    assert report["rounds_per_sample"] == 3 and report["samples"] == 3
    twin = LabelLeakage(np.array([10, 11, 12]), np.array([0, 1, 2]), "classification", 1, 3)
    twin.load(meter.state())
    assert twin.report() == report


def test_the_matched_attack_uses_the_partys_own_output() -> None:
    own = np.array([[2.0, 1.0, 0.0]])
    s = np.exp(own[0]) / np.exp(own[0]).sum()
    rows = np.array([[0.2, -0.5, 0.4]])
    expected = [max(float(rows[0] @ (s - np.eye(3)[c])), 0.0) ** 2
                / float((s - np.eye(3)[c]) @ (s - np.eye(3)[c])) for c in range(3)]
    np.testing.assert_allclose(matched_scores(rows, own)[0], expected)
    # A row along s - e_1 plus a small push towards class 0's argmin: argmin says 0, the
    # likelihood under the party's own output says 1.
    row = 0.5 * (s - np.eye(3)[1]) + np.array([-0.9, 0.0, 0.0])
    assert np.argmin(row) == 0
    meter = LabelLeakage(np.array([10, 11, 12]), np.array([1, 1, 1]), "classification", 1, 3)
    meter.observe(np.array([10]), [{"g_pred": row[None]}], [own])
    assert meter.guesses("matched")[0, 0] == int(np.argmax(matched_scores(row[None], own)[0]))
    assert meter.guesses("latest")[0, 0] == 0


def test_each_regression_attack_on_a_hand_made_history() -> None:
    meter = LabelLeakage(np.array([1, 2]), np.array([1.0, -1.0]), "regression", 1, 1)
    # Sample 1 (label 1.0): gradients -1, +0.2, +0.3 (own prediction 0 then 0.5 then 2.0).
    # Truth vs the latest own prediction 2.0: below. latest +: below (right); first -: above
    # (wrong); majority 2 of 3 positive: below (right); sum -0.5: above (wrong); recent
    # 0.25·(-1) + 0.5·0.2 + 0.3 = 0.15: below (right).
    for g, pred in ((-1.0, 0.0), (0.2, 0.5), (0.3, 2.0)):
        meter.observe(np.array([1]), [{"g_pred": np.array([[g]])}], [np.array([[pred]])])
    expected = {"latest": 1.0, "first": 0.0, "majority": 1.0, "sum": 0.0, "recent": 1.0}
    report = meter.report()
    for name, share in expected.items():
        assert report["attacks"][name]["per_client"] == [share], name
    assert report["samples"] == 1 and report["chance"] == 0.5


def _reference_meter(task: str, k: int, n: int, c: int,
                     rounds: list[tuple[np.ndarray, list[int], np.ndarray, np.ndarray]]
                     ) -> dict[str, np.ndarray]:
    """The meter's running arrays, sample by sample and party by party in plain Python."""
    ref: dict[str, np.ndarray] = {"count": np.zeros((k, n), np.int64)}
    if task == "classification":
        ref.update(latest=np.full((k, n), -1), first=np.full((k, n), -1),
                   votes=np.zeros((k, n, c), np.int64),
                   **{a: np.zeros((k, n, c)) for a in ("sum", "normalized_sum", "early",
                                                       "matched")})
    else:
        ref.update(latest=np.zeros((k, n, c), bool), first=np.zeros((k, n, c), bool),
                   votes=np.zeros((k, n, c), np.int64),
                   **{a: np.zeros((k, n, c)) for a in ("sum", "recent", "reference")})
    for rows, parties, g, own in rounds:
        for i, party in enumerate(parties):
            for j, row in enumerate(rows):
                gr, mine = g[i, j] * len(rows), own[i, j]  # per-sample gradient row
                ref["count"][party, row] += 1
                if task == "classification":
                    guess = int(np.argmin(gr))
                    ref["latest"][party, row] = guess
                    if ref["count"][party, row] == 1:
                        ref["first"][party, row] = guess
                    ref["votes"][party, row, guess] += 1
                    ref["sum"][party, row] += gr
                    ref["normalized_sum"][party, row] += gr / np.sqrt(gr @ gr)
                    ref["early"][party, row] += gr / ref["count"][party, row]
                    soft = np.exp(mine - mine.max()) / np.exp(mine - mine.max()).sum()
                    for cls in range(c):
                        d = soft - np.eye(c)[cls]
                        ref["matched"][party, row, cls] += max(gr @ d, 0.0) ** 2 / (d @ d)
                else:
                    ref["latest"][party, row] = gr < 0
                    if ref["count"][party, row] == 1:
                        ref["first"][party, row] = gr < 0
                    ref["votes"][party, row] += gr < 0
                    ref["sum"][party, row] += gr
                    ref["recent"][party, row] = 0.5 * ref["recent"][party, row] + gr
                    ref["reference"][party, row] = mine
    return ref


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_rounds_parties_update_as_each_party_alone(task: str) -> None:
    # The server observes a round's parties in one vectorized update; every array must be
    # what each party's own history gives, sample by sample (parties absent from rounds too).
    rng = np.random.default_rng(5)
    k, n, c = 3, 12, 4
    ids = rng.permutation(np.arange(100, 100 + n))  # unsorted ids: the meter sorts them
    labels = rng.integers(0, c, n) if task == "classification" else rng.normal(size=(n, c))
    meter = LabelLeakage(ids, labels, task, k, c)
    rounds = []
    for _ in range(6):
        chunk = rng.choice(ids, size=int(rng.integers(1, n + 1)), replace=False)
        parties = sorted(rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False).tolist())
        g = rng.normal(size=(len(parties), len(chunk), c)) / len(chunk)
        own = rng.normal(size=g.shape)
        meter.observe(chunk, [{"g_pred": x} for x in g], list(own), parties=parties)
        rounds.append((np.searchsorted(np.sort(ids), chunk), parties, g, own))
    with pytest.raises(ValueError, match="2 parties, 1 signals and 1 predictions"):
        meter.observe(chunk, [{"g_pred": g[0]}], [own[0]], parties=[0, 1])
    ref = _reference_meter(task, k, n, c, rounds)
    np.testing.assert_array_equal(meter.count, ref.pop("count"))
    for name, want in ref.items():
        np.testing.assert_allclose(meter.arrays[name], want, rtol=1e-12, atol=1e-12,
                                   err_msg=name)


def test_the_direction_attack_on_embedding_gradients() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1])
    meter = EmbeddingLeakage(np.arange(6), labels, 1, [2])
    dirs = {0: np.array([1.0, 0.2]), 1: np.array([-0.3, 1.0])}
    # Round 1 is right for everyone; round 2 swaps samples 2 and 3 but weakly: the sum
    # keeps them right, the latest gets them wrong.
    meter.observe_rows(0, np.arange(6), np.stack([dirs[int(c)] for c in labels]))
    second = np.stack([dirs[int(c)] for c in labels])
    second[2], second[3] = 0.1 * dirs[1], 0.1 * dirs[0]
    meter.observe_rows(0, np.arange(6), second)
    report = meter.report()
    assert report["known_labels"] == 2  # samples 0 and 1 are the attacker's own
    assert report["attacks"]["sum"]["per_client"] == [1.0]
    assert report["attacks"]["first"]["per_client"] == [1.0]
    assert report["attacks"]["latest"]["per_client"] == [0.5]  # 2 of the 4 scored wrong
    assert report["max"] == 1.0 and report["chance"] == 0.5


# -- the guarantee -----------------------------------------------------------------------------


def _rdp_epsilon(z: float, rounds: int, delta: float, orders: np.ndarray) -> float:
    """Closed form: the Gaussian mechanism of noise multiplier z has RDP α/(2z²) at order α;
    T rounds compose to T·α/(2z²); converted to (ε, δ) by Canonne et al. 2020 (Prop. 12 of
    arXiv:2004.00010): ε = rdp + log(1 - 1/α) - log(δ·α)/(α - 1), minimised over α."""
    rdp = rounds * orders / (2 * z * z)
    return float(np.min(rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)))


def test_epsilon_is_the_closed_form_rdp_composition() -> None:
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    got = label_dp(clip=4.0, noise=2.5, rounds=40, delta=1e-5)
    assert got["noise_multiplier"] == 1.25  # sensitivity 2·clip, noise 2.5·clip
    orders = np.asarray(DEFAULT_RDP_ORDERS, dtype=np.float64)
    orders = orders[orders > 1.01]
    assert got["epsilon"] == pytest.approx(_rdp_epsilon(1.25, 40, 1e-5, orders), rel=1e-9)
    # The library's orders are a grid: a dense grid finds at most a little less.
    dense = _rdp_epsilon(1.25, 40, 1e-5, np.linspace(1.02, 200, 200_000))
    assert dense <= got["epsilon"] <= dense * 1.02
    # The classic conversion (Mironov 2017) is looser.
    classic = float(np.min(40 * orders / (2 * 1.25 ** 2) - math.log(1e-5) / (orders - 1)))
    assert got["epsilon"] < classic
    # Clip alone sets nothing: ε depends on noise / 2 only. K pooled clients: K·T rounds.
    assert label_dp(1.0, 2.5, 40)["epsilon"] == pytest.approx(got["epsilon"])
    assert label_dp(4.0, 2.5, 40, parties=4)["epsilon"] == pytest.approx(
        label_dp(4.0, 2.5, 160)["epsilon"])


def test_no_guarantee_says_why() -> None:
    assert "privacy.clip is 0" in label_dp(0.0, 1.0, 10)["reason"]
    no_noise = label_dp(4.0, 0.0, 10)
    assert no_noise["epsilon"] is None and "privacy.noise is 0" in no_noise["reason"]
    with pytest.raises(ValueError, match="delta must lie in"):
        label_dp(1.0, 1.0, 10, delta=0.0)


def test_a_missing_accountant_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import now fails
    with pytest.raises(AccountantMissing, match=r"liquid-fed\[privacy\].*dp-accounting==0.6.0"):
        label_dp(4.0, 1.0, 10)
    # A run is not lost for it: the report says why there is no number.
    got = guarantee(4.0, 1.0, 10, 4)
    assert got["epsilon"] is None and "liquid-fed[privacy]" in got["reason"]
    assert label_dp(0.0, 1.0, 10)["epsilon"] is None  # nothing to compute: no import needed


# -- the baselines -----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [0.0, 0.2], ids=["complete", "missing-views"])
def test_every_method_that_sends_gradients_is_attacked_on_what_its_parties_receive(
        missing: float) -> None:
    from liquid_fed.centralized import central_data
    from liquid_fed.methods import run_methods

    cfg = build_config({**TINY, "train": {**TINY["train"], "epochs": 3}},
                       [f"views.missing={missing}"])
    data = central_data(cfg)
    got = run_methods(["uniform", "aggvfl", "splitnn", "moe", "averaged", "local", "central"],
                      cfg, data)
    n = data.targets["train"].shape[0]
    held = (data.present["train"].sum(0).tolist() if data.present["train"] is not None
            else [n] * cfg.n_clients)
    for name in ("uniform", "aggvfl", "moe"):
        leak = got[name].label_leakage
        logits = leak["channels"][0] if "channels" in leak else leak
        # Exact logit gradients: negative at the label only. A batch's rows matched to the
        # wrong samples would score about chance (0.1) instead.
        assert logits["attacks"]["latest"]["per_client"] == [1.0] * cfg.n_clients, name
        assert leak["max"] == 1.0 and leak["rounds_per_sample"] == cfg.train.epochs
        assert logits["samples"] == n
    split = got["splitnn"].label_leakage
    assert split["known_labels"] == 10 and split["attack"].startswith("cosine direction")
    assert split["max"] > 5 * split["chance"]  # embeddings leak too (measured 0.99)
    moe = got["moe"].label_leakage
    assert [c["attack"].split(":")[0] for c in moe["channels"]] == [
        "argmin over classes of the gradients received",
        "cosine direction attack, one known label per class (Li et al. 2022)"]
    for name in ("averaged", "local"):
        assert got[name].label_leakage["labels_at_party"] is True
        assert got[name].to_dict()["label_leakage"]["max"] is None
    assert got["central"].label_leakage is None
    if missing:
        assert min(held) < n  # a party lacking a sample is sent nothing for it
        eaves = got["aggvfl"].label_leakage
        assert eaves["samples"] == n


def test_the_report_renders_leakage_chance_epsilon_or_labels_at_party() -> None:
    from liquid_fed.report import leakage_cell

    rows = [{"label_leakage": 0.5, "label_leakage_chance": 0.1, "label_epsilon": 30.0},
            {"label_leakage": 0.7, "label_leakage_chance": 0.1, "label_epsilon": 30.0}]
    text = leakage_cell(rows)
    assert text.startswith("0.600 ± ") and text.endswith("(chance 0.10, ε 30)")
    assert leakage_cell([{"label_leakage": 1.0, "label_leakage_chance": 0.1}]) == (
        "1.000 (chance 0.10)")
    assert leakage_cell([{"labels_at_party": 1}, {"labels_at_party": 1}]) == (
        "labels at every party")
    assert leakage_cell([{"label_leakage": None}]) == "n/a"
