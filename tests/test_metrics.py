"""Metrics: Kendall's τ-b against a hand-written O(n²) reference, confidences, entropies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liquid_fed.ensemble import EnsembleOutput
from liquid_fed.metrics import (
    active_parameter_fraction,
    confidences,
    entropy,
    evaluate_output,
    kendall_tau,
    per_sample_error,
)


def tau_b_reference(x: np.ndarray, y: np.ndarray) -> float:
    """τ-b = Σ_{i<j} sx sy / sqrt(Σ sx² · Σ sy²), sx = sign(x_i - x_j): ties drop out."""
    num = nx = ny = 0.0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            num += sx * sy
            nx += sx * sx
            ny += sy * sy
    return num / math.sqrt(nx * ny)


def make_output(power: torch.Tensor, delegation: torch.Tensor | None = None,
                predictions: torch.Tensor | None = None,
                output: torch.Tensor | None = None) -> EnsembleOutput:
    b, k = power.shape
    if delegation is None:
        delegation = torch.eye(k, dtype=power.dtype).expand(b, k, k)
    if predictions is None:
        predictions = torch.zeros(b, k, 2, dtype=power.dtype)
    if output is None:
        output = torch.log_softmax(predictions.mean(1), -1)
    return EnsembleOutput(output, power, delegation, predictions, power.new_zeros(()))


# --------------------------------------------------------------------------------------------
# Kendall's τ
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_matches_hand_written_tau_b(seed):
    rng = np.random.default_rng(seed)
    n = 40
    x = rng.integers(0, 5, n).astype(float) if seed % 2 else rng.normal(size=n)  # ties
    y = x + rng.normal(scale=1.5, size=n)
    if seed >= 4:
        y = (rng.random(n) < 0.5).astype(float)  # 0/1, like per-sample classification error
    assert kendall_tau(x, y) == pytest.approx(tau_b_reference(x, y), abs=1e-12)


def test_kendall_tau_hand_values():
    assert kendall_tau(np.arange(5), np.arange(5)) == pytest.approx(1.0)
    assert kendall_tau(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)
    # pairs of (1,2,3) vs (1,3,2): concordant 2, discordant 1 -> 1/3
    assert kendall_tau(np.array([1, 2, 3]), np.array([1, 3, 2])) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau(np.ones(4), np.arange(4)))
    assert math.isnan(kendall_tau(np.arange(4), np.zeros(4)))
    assert math.isnan(kendall_tau(np.array([1.0]), np.array([2.0])))


def test_tau_sign_positive_when_confidence_predicts_correctness():
    # 10 samples, 2 classes: the first 6 are right, the last 4 wrong, and every expert
    # keeps more of its vote on the right ones: self-delegation ranks all right above all wrong.
    b, k = 10, 3
    correct = torch.tensor([True] * 6 + [False] * 4)
    keep = torch.where(correct, 0.9, 0.4) + torch.linspace(0, 0.05, b).double()
    d = torch.zeros(b, k, k, dtype=torch.float64)
    for i in range(k):
        d[:, i, :] = ((1 - keep) / (k - 1))[:, None]
        d[:, i, i] = keep
    target = torch.zeros(b, dtype=torch.long)
    prob_right = torch.where(correct, 0.8, 0.3).double()
    output = torch.log(torch.stack([prob_right, 1 - prob_right], -1))
    out = make_output(torch.ones(b, k, dtype=torch.float64), d, output=output)
    metrics = evaluate_output(out, target, "classification")
    assert metrics["accuracy"] == pytest.approx(0.6)
    # All right-wrong pairs concordant, ties in the error excluded:
    # τ-b = n_r n_w / sqrt(C(n,2) · n_r n_w) = sqrt(24 / 45).
    expected = math.sqrt(6 * 4 / 45)
    assert metrics["tau_self_delegation"] == pytest.approx(expected, rel=1e-12)
    assert metrics["tau_delegation"] == pytest.approx(expected, rel=1e-12)
    # max_prob takes two values (0.8 right, 0.7 wrong), aligned with the 0/1 error: τ-b = 1.
    assert metrics["tau_max_prob"] == pytest.approx(1.0, rel=1e-12)
    # A confidence that is backwards gets the negative sign.
    flipped = make_output(out.power, d, output=output.flip(-1))
    assert evaluate_output(flipped, 1 - target, "classification")["tau_self_delegation"] \
        == pytest.approx(expected, rel=1e-12)
    wrong_way = evaluate_output(out, 1 - target, "classification")
    assert wrong_way["tau_self_delegation"] == pytest.approx(-expected, rel=1e-12)
    # Equal powers and identical (zero) predictions: constant confidences give NaN, not 0.
    assert math.isnan(metrics["tau_power"])
    assert math.isnan(metrics["tau_agreement"])


# --------------------------------------------------------------------------------------------
# Confidences
# --------------------------------------------------------------------------------------------


def test_confidence_hand_values():
    k = 4
    power = torch.tensor([[1.0, 1, 1, 1], [4.0, 0, 0, 0], [2.0, 2, 0, 0]], dtype=torch.float64)
    d = torch.stack([
        torch.full((k, k), 1 / k, dtype=torch.float64),  # flat: entropy 1
        torch.eye(k, dtype=torch.float64),  # everyone keeps: entropy 0
        torch.tensor([[0.5, 0.5, 0, 0]], dtype=torch.float64).expand(k, k),  # entropy 1/2
    ])
    preds = torch.zeros(3, k, 2, dtype=torch.float64)
    preds[2, :, 0] = torch.tensor([1.0, 3.0, 1.0, 3.0])  # regression: spread |±1| -> 1
    out = make_output(power, d, preds)
    conf = confidences(out, "regression")
    assert set(conf) == {"delegation", "power", "self_delegation", "agreement"}
    torch.testing.assert_close(conf["delegation"],
                               torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(conf["power"], torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(conf["self_delegation"],
                               torch.tensor([0.25, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(conf["agreement"],
                               torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
    cls = confidences(out, "classification")
    # classification spreads class probabilities: softmax((1,0)) vs softmax((3,0))
    p1, p3 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-3))
    spread = math.sqrt(2) * abs(p3 - p1) / 2
    assert cls["agreement"][2].item() == pytest.approx(-spread, rel=1e-12)
    torch.testing.assert_close(cls["max_prob"], out.output.exp().max(-1).values)


def test_single_expert_confidences_are_finite():
    out = make_output(torch.ones(3, 1, dtype=torch.float64))
    for name, value in confidences(out, "classification").items():
        assert bool(torch.isfinite(value).all()), name


# --------------------------------------------------------------------------------------------
# Entropies, active parameters, the metrics dict
# --------------------------------------------------------------------------------------------


def test_entropy_hand_values():
    assert entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    assert entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(math.log(2))
    e = entropy(np.array([1.0, 0.0]))
    assert e == 0.0 and math.copysign(1.0, e) == 1.0  # no "-0.0"
    p = np.array([0.2, 0.3, 0.5])
    assert entropy(p) == pytest.approx(-(p * np.log(p)).sum())


def test_active_parameter_fraction_hand_values():
    power = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    assert active_parameter_fraction(power, [10, 30]) == pytest.approx((10 + 40 + 30) / 3 / 40)
    # The threshold is on the share p/K and is strict.
    edge = torch.tensor([[1.98, 0.02]])  # shares 0.99, 0.01
    assert active_parameter_fraction(edge, [1, 1], threshold=0.01) == pytest.approx(0.5)
    assert active_parameter_fraction(edge, [1, 1], threshold=0.005) == pytest.approx(1.0)
    assert active_parameter_fraction(torch.ones(4, 3), [5, 6, 7]) == pytest.approx(1.0)


def test_evaluate_output_classification():
    power = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]],
                         dtype=torch.float64)
    output = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]],
                                    dtype=torch.float64))
    out = make_output(power, output=output)
    target = torch.tensor([0, 1, 1, 1])
    m = evaluate_output(out, target, "classification", n_params=[1, 2, 3])
    assert m["accuracy"] == pytest.approx(0.5)  # the last one is a tie: argmax picks class 0
    torch.testing.assert_close(per_sample_error(out, target, "classification"),
                               torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    assert m["power_entropy"] == pytest.approx(math.log(3) / 4)
    # argmax powers: 0, 1, 1, 0 (ties to the first) -> histogram (2, 2, 0) -> log 2
    assert m["speaker_entropy"] == pytest.approx(math.log(2))
    assert [m[f"mean_power_{j}"] for j in range(3)] == pytest.approx([1.0, 7 / 4, 1 / 4])
    assert m["active_param_fraction"] == pytest.approx((1 + 2 + 2 + 6) / 4 / 6)
    assert set(m) >= {"tau_delegation", "tau_power", "tau_self_delegation", "tau_agreement",
                      "tau_max_prob"}


def test_evaluate_output_regression_rmse():
    out = make_output(torch.ones(3, 2, dtype=torch.float64),
                      output=torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]],
                                          dtype=torch.float64))
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 1.0]], dtype=torch.float64)
    m = evaluate_output(out, target, "regression")
    # squared errors 4, 2, 0 over 3 samples × 2 outputs
    assert m["rmse"] == pytest.approx(math.sqrt(6 / 6))
    assert "accuracy" not in m and "tau_max_prob" not in m
    # lower error on more confident samples (here: less spread) -> τ > 0
    preds = torch.zeros(3, 2, 2, dtype=torch.float64)
    preds[0, 1] = 5.0  # the worst sample has the most disagreement
    preds[1, 1] = 1.0
    out = out._replace(predictions=preds)
    m = evaluate_output(out, target, "regression")
    assert m["tau_agreement"] == pytest.approx(1.0)


def test_entropy_in_slices_equals_a_direct_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tensor is taken p log p of in slices along its first axis (bounded memory at
    many parties); the result equals a float64 numpy sum, zeros included."""
    import liquid_fed.metrics as metrics

    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(13, 6, 5, generator=gen, dtype=torch.float64), -1)
    p[2, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    q = p.numpy()
    want = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(-1)
    whole = entropy(p)
    monkeypatch.setattr(metrics, "ENTROPY_CHUNK", 31)  # 1 sample (30 entries) per slice
    sliced = entropy(p)
    assert sliced.shape == (13, 6)
    np.testing.assert_allclose(whole.numpy(), want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sliced.numpy(), want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(entropy(p, dim=1).numpy(),
                               -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)),
                                         0.0).sum(1), rtol=0, atol=1e-15)
