"""Pooling (``ensemble.mix``) and power smoothing (``ensemble.smoothing``): hand computations,
finite differences, the validation pick, config errors, and centralized = federated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_protocol import EXACT  # the exactness settings: one step per chunk, float64

from liquid_fed import LiquidConfig, combine
from liquid_fed.centralized import build_ensemble, central_data, train_ensemble
from liquid_fed.config import build_config, load_config
from liquid_fed.ensemble import (
    MIXES,
    EnsembleOutput,
    pick_smoothing,
    pool,
    smooth_power,
    with_smoothing,
)
from liquid_fed.errors import ConfigError, ParameterError
from liquid_fed.federation import Federation, LocalTransport
from liquid_fed.methods import run_method
from liquid_fed.rundir import RunDir, prepare
from liquid_fed.runs import run_federated


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def random_delegation(b: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.softmax(2.0 * randn(b, k, k, seed=seed), -1)


# --------------------------------------------------------------------------------------------
# Hand computations (plain python / numpy), K = 3
# --------------------------------------------------------------------------------------------

LOG3 = math.log(3.0)
# Expert 0 is undecided, experts 1 and 2 each say class 0 at odds 3:1 (C = 2).
Y3 = torch.tensor([[[0.0, 0.0], [LOG3, 0.0], [LOG3, 0.0]]], dtype=torch.float64)


def _uniform_vote(present: list[bool] | None) -> torch.Tensor:
    d = torch.full((1, 3, 3), 1 / 3, dtype=torch.float64)
    mask = None if present is None else torch.tensor([present])
    return combine(Y3, d, LiquidConfig(solver="uniform", mix="sum"), mask).power


@pytest.mark.parametrize("present,expected", [
    # every expert present, p = (1, 1, 1):
    #   probs: (1/2 + 3/4 + 3/4) / 3 = 2/3; logits: 3^(2/3) : 1; sum: 3^2 : 1 = 9/10
    (None, {"probs": 2 / 3, "logits": 3 ** (2 / 3) / (3 ** (2 / 3) + 1), "sum": 9 / 10}),
    # expert 2 absent, p = (3/2, 3/2, 0):
    #   probs: (1/2 + 3/4) / 2 = 5/8; logits: 3^(1/2) : 1; sum: 3^(3/2) : 1
    ([True, True, False], {"probs": 5 / 8, "logits": 3 ** 0.5 / (3 ** 0.5 + 1),
                           "sum": 3 ** 1.5 / (3 ** 1.5 + 1)}),
    # only expert 0 present, p = (3, 0, 0): every pooling gives its own 1/2
    ([True, False, False], {"probs": 0.5, "logits": 0.5, "sum": 0.5}),
])
def test_each_mix_against_closed_forms(present, expected):
    mask = None if present is None else torch.tensor([present])
    power = _uniform_vote(present)
    held = 3 if present is None else sum(present)
    want_power = [0.0 if present is not None and not present[j] else 3 / held for j in range(3)]
    np.testing.assert_allclose(power[0].numpy(), want_power, rtol=0, atol=1e-15)
    d = torch.full((1, 3, 3), 1 / 3, dtype=torch.float64)
    for mix in MIXES:
        out = combine(Y3, d, LiquidConfig(solver="uniform", mix=mix), mask)
        prob = out.output.exp()[0]
        assert prob[0].item() == pytest.approx(expected[mix], abs=1e-14), mix
        assert prob.sum().item() == pytest.approx(1.0, abs=1e-14)


def _numpy_pool(y: np.ndarray, p: np.ndarray, mix: str) -> np.ndarray:
    """Independent numpy: log-probabilities (B, C) of powers p (B, K) on logits y (B, K, C)."""
    k = p.shape[1]

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    if mix == "probs":
        soft = np.exp(log_softmax(y))
        return np.log(np.einsum("bk,bkc->bc", p / k, soft))
    pooled = np.einsum("bk,bkc->bc", p, y)
    return log_softmax(pooled / k if mix == "logits" else pooled)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("solver", ["sink_one", "sink_many"])
def test_combine_matches_numpy_with_absent_experts(mix, smoothing, solver):
    b, k, c = 6, 3, 3
    y = randn(b, k, c, seed=1) * 2
    d = random_delegation(b, k, seed=2)
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, True],
                            [True, True, False], [True, True, True], [False, True, False]])
    out = combine(y, d, LiquidConfig(solver=solver, mix=mix, smoothing=smoothing), present)
    p = out.power.numpy()
    assert np.all(p[~present.numpy()] == 0) and np.allclose(p.sum(1), k, atol=1e-12)
    # p' = (1 - λ) p + λ u, u uniform over the present experts, written out per sample
    pm = present.numpy()
    u = np.array([[k / row.sum() if row[j] else 0.0 for j in range(k)] for row in pm])
    smoothed = (1 - smoothing) * p + smoothing * u
    assert np.all(smoothed[~pm] == 0)
    expected = _numpy_pool(y.numpy(), smoothed, mix)
    np.testing.assert_allclose(out.output.numpy(), expected, rtol=0, atol=1e-12)
    # what is absent has no say, smoothed or not: wild predictions there change nothing
    wild = y.clone()
    wild[~present] = 1e3
    again = combine(wild, d, LiquidConfig(solver=solver, mix=mix, smoothing=smoothing), present)
    np.testing.assert_allclose(again.output.numpy(), out.output.numpy(), rtol=0, atol=1e-12)


def test_sum_is_k_times_logits_and_regression_ignores_mix():
    y = randn(4, 3, 5, seed=3)
    d = random_delegation(4, 3, seed=4)
    logits = combine(y, d, LiquidConfig(mix="logits"))
    summed = combine(y, d, LiquidConfig(mix="sum"))
    pooled = (logits.power.unsqueeze(-1) * y).sum(1)  # Σ p_j y_j
    torch.testing.assert_close(summed.output, torch.log_softmax(pooled, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(logits.output, torch.log_softmax(pooled / 3, -1), rtol=0,
                               atol=1e-12)
    regs = [combine(y, d, LiquidConfig(task="regression", mix=m)).output for m in MIXES]
    want = (logits.power.unsqueeze(-1) * y).sum(1) / 3
    for r in regs:
        torch.testing.assert_close(r, want, rtol=0, atol=1e-12)


def test_smoothing_endpoints_and_power_reported_unsmoothed():
    y = randn(5, 4, 3, seed=5)
    d = random_delegation(5, 4, seed=6)
    for mix in MIXES:
        learned = combine(y, d, LiquidConfig(mix=mix))
        flat = combine(y, d, LiquidConfig(mix=mix, smoothing=1.0))
        vote = combine(y, d, LiquidConfig(mix=mix, solver="uniform"))
        torch.testing.assert_close(flat.output, vote.output, rtol=0, atol=1e-12)
        torch.testing.assert_close(flat.power, learned.power, rtol=0, atol=0)
        assert not torch.allclose(flat.output, learned.output)
        half = combine(y, d, LiquidConfig(mix=mix, smoothing=0.5))
        torch.testing.assert_close(half.output, with_smoothing(learned, half_cfg := LiquidConfig(
            mix=mix), 0.5).output, rtol=0, atol=0)
        assert half_cfg.training_smoothing == 0.0
    # auto trains with the learned powers
    auto = combine(y, d, LiquidConfig(mix="sum", smoothing="auto"))
    torch.testing.assert_close(auto.output, combine(y, d, LiquidConfig(mix="sum")).output,
                               rtol=0, atol=0)


def test_smooth_power_keeps_absent_at_zero_and_sum_k():
    power = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    present = torch.tensor([[True, True, False, True], [False, True, True, False]])
    got = smooth_power(power, 0.25, present)
    want = torch.tensor([[0.75 * 4 + 0.25 * 4 / 3, 0.25 * 4 / 3, 0.0, 0.25 * 4 / 3],
                         [0.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert smooth_power(power, 0.0, present) is power


# --------------------------------------------------------------------------------------------
# Finite differences (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("smoothing", [0.0, 0.4])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_each_mix(mix, smoothing, masked):
    preds = randn(3, 3, 3, seed=7).requires_grad_(True)
    d = random_delegation(3, 3, seed=8).requires_grad_(True)
    present = torch.tensor([[True, False, True], [True, True, True], [False, False, True]])
    cfg = LiquidConfig(mix=mix, smoothing=smoothing, epsilon=0.05, load_weight=0.3)

    def fn(p, dl):  # validate=False: gradcheck's perturbations move rows off sum 1
        out = combine(p, dl, cfg, present if masked else None, validate=False)
        return out.output, out.aux_loss

    assert torch.autograd.gradcheck(fn, (preds, d), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The validation pick on cases whose answer is known by construction
# --------------------------------------------------------------------------------------------


def _output(power, preds, present=None) -> EnsembleOutput:
    power = torch.as_tensor(power, dtype=torch.float64)
    preds = torch.as_tensor(preds, dtype=torch.float64)
    b, k = power.shape
    dummy = torch.zeros(b, k, k, dtype=torch.float64)
    return EnsembleOutput(torch.zeros(b, preds.shape[-1], dtype=torch.float64), power, dummy,
                          preds, torch.zeros((), dtype=torch.float64), present)


@pytest.mark.parametrize("mix", ["logits", "sum"])
def test_pick_smoothing_finds_the_constructed_lambda(mix):
    # Expert 0 holds all the power (p = (2, 0)); smoothed p' = (2 - λ, λ). The pooled logit
    # margin of class 1 is λ b - (2 - λ) a, so class 1 wins for λ > 2a / (a + b):
    #   sample A (label 1): y0 = [1, 0], y1 = [0, 2.5]: right for λ > 4/7 ≈ 0.571
    #   sample B (label 0): y0 = [3, 0], y1 = [0, 4]:   right for λ < 6/7 ≈ 0.857
    # Both are right for λ in (0.571, 0.857): 0.75 and 0.8 of the grid; the tie goes to 0.75.
    out = _output([[2.0, 0.0], [2.0, 0.0]], [[[1.0, 0.0], [0.0, 2.5]], [[3.0, 0.0], [0.0, 4.0]]])
    target = torch.tensor([1, 0])
    cfg = LiquidConfig(mix=mix, smoothing="auto", smoothing_grid=[1.0, 0.8, 0.0, 0.75, 0.25, 0.5])
    pick = pick_smoothing(out, target, cfg)
    assert pick.grid == [0.0, 0.25, 0.5, 0.75, 0.8, 1.0]
    assert pick.scores == [0.5, 0.5, 0.5, 1.0, 1.0, 0.5]
    assert pick.value == 0.75 and pick.metric == "accuracy"
    assert pick.to_dict()["split"] == "val"


def test_pick_smoothing_regression_and_absent_experts():
    # output = ((2 - λ) * 0 + λ * 1) / 2 = λ / 2; target 0.5: the error vanishes at λ = 1
    out = _output([[2.0, 0.0]], [[[0.0], [1.0]]])
    cfg = LiquidConfig(task="regression", smoothing="auto", smoothing_grid=[0.0, 0.5, 1.0])
    pick = pick_smoothing(out, torch.tensor([0.5], dtype=torch.float64), cfg)
    assert pick.value == 1.0 and pick.metric == "rmse"
    np.testing.assert_allclose(pick.scores, [0.5, 0.25, 0.0], rtol=0, atol=1e-15)
    # expert 1 absent: uniform over the present is p itself, every λ ties -> the smallest
    absent = _output([[2.0, 0.0]], [[[0.0], [1.0]]], torch.tensor([[True, False]]))
    pick = pick_smoothing(absent, torch.tensor([0.5], dtype=torch.float64), cfg)
    assert pick.value == 0.0 and pick.scores == [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------------------------
# Config errors: the key, the value, what is accepted
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("ensemble.mix=geometric", 'ensemble.mix: got "geometric"; accepted: probs, logits, sum'),
    ("ensemble.smoothing=often", 'ensemble.smoothing: got "often"; accepted: auto, a number '
                                 "in [0, 1]"),
    ("ensemble.smoothing=1.5", 'ensemble.smoothing: got "1.5"; accepted: auto, a number in '
                               "[0, 1]"),
    ("ensemble.smoothing=-0.1", 'ensemble.smoothing: got "-0.1"; accepted: auto'),
    ("ensemble.smoothing_grid=[]", 'ensemble.smoothing_grid: got "[]"; accepted: a non-empty '
                                   "list of numbers in [0, 1]"),
    ("ensemble.smoothing_grid=[0.0, 2.0]", "ensemble.smoothing_grid[1]: got 2.0; must lie in "
                                           "[0, 1]"),
    ("ensemble.smoothing_grid=0.5", "ensemble.smoothing_grid: got 0.5; expected a list"),
])
def test_config_errors_name_key_value_and_accepted(override, message):
    with pytest.raises(ConfigError) as err:
        build_config({}, [override])
    assert message in str(err.value)


def test_library_errors_and_accepted_values():
    with pytest.raises(ParameterError, match=r'smoothing must be "auto" or a number in \[0, 1\]'):
        LiquidConfig(smoothing="sometimes")
    with pytest.raises(ParameterError, match=r'mix must be one of .*got "max"'):
        pool(randn(2, 3, 2), torch.ones(2, 3, dtype=torch.float64), "classification", "max")
    cfg = build_config({}, ["ensemble.smoothing=auto", "ensemble.mix=sum",
                            "ensemble.smoothing_grid=[0, 0.5]"])
    assert (cfg.ensemble.smoothing, cfg.ensemble.mix) == ("auto", "sum")
    assert cfg.ensemble.smoothing_grid == [0.0, 0.5]
    assert build_config({}, ["ensemble.smoothing=1"]).ensemble.smoothing == 1.0
    assert build_config({}, []).ensemble.smoothing == "auto"  # picked on val by default
    assert build_config({}, []).ensemble.mix == "logits"


# --------------------------------------------------------------------------------------------
# Centralized = federated (in process), and the pick recorded in the run's files
# --------------------------------------------------------------------------------------------

# a fine grid: the pick then rests on exact agreement of many validation scores
GRID = "ensemble.smoothing_grid=[0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1]"


@pytest.mark.parametrize("extra", [[], ["views.missing=0.2"]], ids=["complete", "missing"])
def test_centralized_and_federated_pick_and_score_alike(extra, tmp_path: Path):
    cfg = build_config(EXACT, ["ensemble.mix=sum", "ensemble.smoothing=auto", GRID, *extra])
    run_dir = tmp_path / "run"
    prepare(cfg, run_dir, force=True)
    torch.manual_seed(cfg.seed)
    summary = run_federated(cfg, LocalTransport(cfg.n_clients), run_dir)
    data = central_data(cfg)
    central = train_ensemble(cfg, data, build_ensemble(cfg, data))

    fed_pick, cen_pick = summary["smoothing"], central["smoothing"]
    assert fed_pick["grid"] == cen_pick["grid"] == sorted(fed_pick["grid"])
    np.testing.assert_allclose(fed_pick["scores"], cen_pick["scores"], rtol=0, atol=1e-12)
    assert fed_pick["value"] == cen_pick["value"]
    best = max(cen_pick["scores"])
    assert cen_pick["value"] == cen_pick["grid"][cen_pick["scores"].index(best)]
    for split in ("val", "test"):
        assert central[split]["smoothing"] == cen_pick["value"]
    test = summary["test"]
    assert test["smoothing"] == cen_pick["value"]
    assert test["accuracy"] == pytest.approx(central["test"]["accuracy"], abs=1e-12)
    assert test["loss"] == pytest.approx(central["test"]["loss"], abs=1e-9)
    assert test["nll"] == pytest.approx(central["test"]["nll"], abs=1e-9)
    rows = [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["smoothing"]) for r in rows[-2:]] == [("val", cen_pick["value"]),
                                                                   ("test", cen_pick["value"])]
    assert RunDir(run_dir).read_summary()["smoothing"] == fed_pick

    # the study's liquid method (methods.py) reports the same
    method = run_method("liquid", cfg, data)
    assert method.test["smoothing"] == cen_pick["value"]
    assert method.test["accuracy"] == pytest.approx(central["test"]["accuracy"], abs=1e-12)


def test_federated_fixed_smoothing_trains_with_it():
    """λ = 0.5 acts in training too: the federation reproduces centralized step by step."""
    cfg = build_config(EXACT, ["ensemble.mix=logits", "ensemble.smoothing=0.5"])
    fed = Federation(cfg, LocalTransport(cfg.n_clients))
    result = fed.run()
    data = central_data(cfg)
    losses: list[float] = []
    central = train_ensemble(cfg, data, build_ensemble(cfg, data),
                             on_step=lambda _, loss: losses.append(loss))
    np.testing.assert_allclose(result.train_losses, losses, rtol=0, atol=1e-9)
    assert result.smoothing is None and result.test["smoothing"] == 0.5
    assert result.test["accuracy"] == pytest.approx(central["test"]["accuracy"], abs=1e-12)
    plain = build_config(EXACT, ["ensemble.mix=logits"])
    unsmoothed = Federation(plain, LocalTransport(plain.n_clients)).run()
    assert not np.allclose(unsmoothed.train_losses, result.train_losses)


@pytest.mark.parametrize("mix", MIXES)
def test_averaged_pools_as_the_ensemble_does(mix):
    options = {"n_samples": 90, "n_regions": 2, "n_groups": 2, "features_per_group": 3,
               "task": "classification", "n_classes": 3}
    cfg = build_config({
        "seed": 3, "data": {"name": "synthetic_regions", "options": options},
        "views": {"kind": "groups", "n_views": 2, "options": {}, "missing": 0.3},
        "experts": {"kind": "mlp", "options": {"hidden": [4]}},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        "train": {"epochs": 2, "batch_size": 16, "chunk_size": 64, "dtype": "float64"},
    }, [f"ensemble.mix={mix}"])
    data = central_data(cfg)
    result = run_method("averaged", cfg, data)
    present = data.present["test"].numpy()
    with torch.no_grad():
        y = np.stack([e(x)[0].numpy() for e, x in zip(result.model, data.inputs["test"],
                                                        strict=True)], 1)  # (n, K, C)
    power = 2 * present / present.sum(1, keepdims=True)  # equal say among the present
    np.testing.assert_allclose(result.arrays["output"], _numpy_pool(y, power, mix), rtol=0,
                               atol=1e-12)


def test_the_smoothing_curve_benchmark_scores_what_a_run_scores():
    # benchmarks.smoothing_curve re-scores the trained experts at every λ; at the shipped
    # pick it must give what the run itself reports, and the uniform vote what solver=uniform
    # trains to (both computed here independently, through run_method).
    from benchmarks.smoothing_curve import PICKS, curves, table

    config = "configs/quickstart.yaml"
    overrides = ["train.epochs=2"]
    got = curves(config, overrides, seed=1)
    cfg = load_config(config, overrides + ["seed=1"])
    data = central_data(cfg)
    liquid = run_method("liquid", cfg, data)
    uniform = run_method("uniform", cfg, data)
    shipped = PICKS["shipped: val accuracy, ties to smallest λ"](got)
    assert got["grid"][shipped] == liquid.test["smoothing"]
    assert got["test_acc"][shipped] == pytest.approx(liquid.test["accuracy"], abs=1e-6)
    assert got["uniform"] == pytest.approx(uniform.test["accuracy"], abs=1e-6)
    rows = {name: row for name, *row in table([got, got])}
    assert rows["fixed λ = 1"][0] == pytest.approx(got["test_acc"][-1])
    assert rows["oracle: best test accuracy (not a method)"][0] == pytest.approx(
        got["test_acc"].max())
