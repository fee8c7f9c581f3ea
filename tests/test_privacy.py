"""What the returned gradients leak about the labels, measured, and the knob that blurs them."""

from __future__ import annotations

import numpy as np
import pytest

from liquid_fed.config import build_config
from liquid_fed.federation import Federation, LocalTransport
from liquid_fed.privacy import GradientDefence, LabelLeakage

TINY = {"train": {"epochs": 2, "chunk_size": 128, "batch_size": 64, "eval_every": 0},
        "experts": {"options": {"hidden": [16]}},
        "baselines": {"uniform": False, "independent": False}}


class _Spy(LocalTransport):
    """Records, per client, every (ids, g_pred) pair the client is sent: the attacker's view."""

    def __init__(self, n_clients: int) -> None:
        super().__init__(n_clients)
        self.received: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_clients)]

    def exchange(self, kind, arrays, settings):
        for k, a in enumerate(arrays):
            if "bwd_ids" in a:
                self.received[k].append((a["bwd_ids"].copy(), a["g_pred"].copy()))
        return super().exchange(kind, arrays, settings)


def _attack_by_hand(received, fed: Federation) -> float:
    """The honest-but-curious client's attack, written out: the latest guess per sample (it
    receives tokens; the check maps them back to the server's labels)."""
    latest: dict[int, int] = {}
    for tokens, g in received:
        for i, row in zip(fed.known_ids(tokens).tolist(), g, strict=True):
            latest[i] = int(np.argmin(row))
    ids = np.array(sorted(latest))
    return float(np.mean(np.array([latest[i] for i in ids]) == fed.data.labels_of(ids)))


@pytest.mark.parametrize("extra", [[], ["ensemble.mix=logits", "ensemble.solver=sink_many"],
                                   ["ensemble.expert_loss_weight=0"]],
                         ids=["probs", "logits+sink_many", "no-expert-loss"])
def test_every_client_recovers_the_labels_from_exact_gradients(extra: list[str]) -> None:
    cfg = build_config(TINY, extra)
    spy = _Spy(cfg.n_clients)
    fed = Federation(cfg, spy)
    result = fed.run()
    leak = result.label_leakage
    # The meter agrees with the attack done by hand on exactly what each client received.
    # (The final flush carries the last round's signals: the meter scored those too.)
    for k in range(cfg.n_clients):
        assert leak["per_client"][k] == pytest.approx(
            _attack_by_hand(spy.received[k], fed))
    assert leak["max"] == 1.0 and min(leak["per_client"]) > 0.99
    assert leak["samples"] == fed.data.splits.train.size
    assert 0.09 < leak["chance"] < 0.12  # digits: ten balanced classes


def test_noise_on_the_returned_gradients_brings_leakage_towards_chance() -> None:
    cfg = build_config(TINY, ["privacy.clip=1.0", "privacy.noise=4.0"])
    spy = _Spy(cfg.n_clients)
    fed = Federation(cfg, spy)
    leak = fed.run().label_leakage
    assert leak["max"] < 0.3  # exact gradients: 1.0
    assert leak["per_client"][2] == pytest.approx(
        _attack_by_hand(spy.received[2], fed))


def test_regression_leakage_is_the_residual_sign() -> None:
    cfg = build_config({**TINY, "data": {"name": "diabetes"},
                        "views": {"kind": "groups", "n_views": 2, "options": {}}})
    result = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    leak = result.label_leakage
    assert leak["chance"] == 0.5 and 0.5 < leak["max"] <= 1.0
    assert leak["attack"].startswith("sign")


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
    noisy = GradientDefence(clip=0.5, noise=2.0, seed=3)
    a, b = noisy.apply(signals, 7), noisy.apply(signals, 7)
    np.testing.assert_array_equal(a[1]["g_pred"], b[1]["g_pred"])  # same round: same draw
    assert not np.array_equal(a[1]["g_pred"], noisy.apply(signals, 8)[1]["g_pred"])
    resid = np.hstack([a[0]["g_pred"], a[0]["g_del"]]) * n - np.hstack(
        [clipped[0]["g_pred"], clipped[0]["g_del"]]) * n
    assert resid.std() == pytest.approx(1.0, rel=0.15)  # noise 2.0 x clip 0.5


def test_leakage_meter_keeps_the_latest_guess() -> None:
    meter = LabelLeakage(np.array([10, 11, 12]), np.array([0, 1, 2]), "classification", 1)
    g = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # right on 10 and 11
    meter.observe(np.array([10, 11]), [{"g_pred": g}], [np.zeros((2, 3))])
    assert meter.per_client() == [1.0]
    meter.observe(np.array([11]), [{"g_pred": np.array([[-1.0, 0.0, 0.0]])}],
                  [np.zeros((1, 3))])  # now wrong on 11
    assert meter.per_client() == [0.5]
    twin = LabelLeakage(np.array([10, 11, 12]), np.array([0, 1, 2]), "classification", 1)
    twin.load(meter.state())
    assert twin.report() == meter.report()
