"""The Liquid Ensemble layer: combination, presence mask, losses, vmap vs loop, gradients."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from liquid_fed import LiquidConfig, LiquidEnsemble, MLPExpert, combine, solve_power
from liquid_fed.ensemble import (
    ensemble_loss,
    expert_loss,
    load_distribution_loss,
    specialization_loss,
    task_loss,
)

REPO = Path(__file__).resolve().parents[1]
EPS = 0.01


def random_delegation(b: int, k: int, sharpness: float = 2.0, seed: int = 0,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(b, k, k, generator=g, dtype=torch.float64),
                         -1).to(dtype)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# Combination against hand-written formulas
# --------------------------------------------------------------------------------------------


def test_everyone_keeps_is_plain_averaging():
    preds = randn(5, 3, 4)
    d = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    out = combine(preds, d, LiquidConfig(task="regression"))
    torch.testing.assert_close(out.power, torch.ones(5, 3, dtype=torch.float64))
    torch.testing.assert_close(out.output, preds.mean(1), rtol=1e-14, atol=1e-14)
    out = combine(preds, d, LiquidConfig(task="classification", mix="probs"))
    mean_prob = torch.softmax(preds, -1).mean(1)
    torch.testing.assert_close(out.output.exp(), mean_prob, rtol=1e-13, atol=1e-15)
    out = combine(preds, d, LiquidConfig(task="classification", mix="logits"))
    torch.testing.assert_close(out.output, torch.log_softmax(preds.mean(1), -1), rtol=1e-13,
                               atol=1e-14)


@pytest.mark.parametrize("task", ["regression", "embedding"])
def test_regression_output_is_power_weighted_mean(task):
    preds = randn(6, 4, 3, seed=1)
    d = random_delegation(6, 4, seed=2)
    out = combine(preds, d, LiquidConfig(task=task, solver="sink_many"))
    p = solve_power(d, "sink_many")
    expected = torch.stack([sum(p[b, j] * preds[b, j] for j in range(4)) / 4 for b in range(6)])
    torch.testing.assert_close(out.output, expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out.power, p)


def test_classification_mixes_probabilities_or_logits():
    preds = randn(6, 4, 5, seed=3)
    d = random_delegation(6, 4, seed=4)
    p = solve_power(d, "sink_one").numpy()
    y = preds.numpy()
    soft = np.exp(y - y.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    mixture = np.einsum("bk,bkc->bc", p / 4, soft)
    out = combine(preds, d, LiquidConfig(mix="probs"))
    np.testing.assert_allclose(out.output.numpy(), np.log(mixture), rtol=1e-12)
    np.testing.assert_allclose(np.exp(out.output.numpy()).sum(-1), 1.0, rtol=1e-12)
    mixed_logits = np.einsum("bk,bkc->bc", p / 4, y)
    out = combine(preds, d, LiquidConfig(mix="logits"))
    expected = mixed_logits - np.log(np.exp(mixed_logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.output.numpy(), expected, rtol=1e-12, atol=1e-13)


def test_mixture_is_stable_for_extreme_logits():
    preds = torch.tensor([[[1000.0, 0.0], [0.0, 1000.0]]], dtype=torch.float64)
    d = torch.eye(2, dtype=torch.float64)[None]
    out = combine(preds, d, LiquidConfig())
    torch.testing.assert_close(out.output, torch.full((1, 2), math.log(0.5), dtype=torch.float64))


def test_single_expert_ensemble():
    preds = randn(4, 1, 3)
    d = torch.ones(4, 1, 1, dtype=torch.float64)
    for solver in ("sink_one", "sink_many", "uniform"):
        out = combine(preds, d, LiquidConfig(solver=solver))
        torch.testing.assert_close(out.power, torch.ones(4, 1, dtype=torch.float64))
        torch.testing.assert_close(out.output, torch.log_softmax(preds[:, 0], -1))
    torch.manual_seed(0)
    ens = LiquidEnsemble([MLPExpert((3,), 2, 1, 0, hidden=(4,))])
    out = ens(torch.randn(5, 3))
    assert out.power.shape == (5, 1) and bool((out.power == 1).all())
    assert out.aux_loss.item() == 0.0


# --------------------------------------------------------------------------------------------
# Presence mask
# --------------------------------------------------------------------------------------------


def test_present_mask_everyone_keeps():
    preds = randn(2, 3, 2)
    d = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    present = torch.tensor([[True, True, False], [False, True, False]])
    out = combine(preds, d, LiquidConfig(task="regression"), present)
    expected = torch.tensor([[1.5, 1.5, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out.power, expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(out.output[0], preds[0, :2].mean(0))
    torch.testing.assert_close(out.output[1], preds[1, 1])
    # Absent experts pass their vote on uniformly to the present ones and keep nothing.
    torch.testing.assert_close(out.delegation[0, 2], torch.tensor([0.5, 0.5, 0.0],
                                                                  dtype=torch.float64))
    torch.testing.assert_close(out.delegation[1, 0], torch.tensor([0.0, 1.0, 0.0],
                                                                  dtype=torch.float64))


def test_present_mask_vote_routed_through_an_absent_expert():
    # Expert 0 gives everything to expert 2, which is absent and passes half to each of 0, 1.
    # f0 = 1 + γ f2 / 2, f2 = 1 + γ f0, f1 = 1 + γ f2 / 2  =>  f0 = (1 + γ/2) / (1 - γ²/2).
    g = 1 - EPS
    f0 = (1 + g / 2) / (1 - g * g / 2)
    f = np.array([f0, f0, 1 + g * f0])
    raw = np.full(3, EPS * f.sum() / 3)
    raw[1] += g * f[1]  # only expert 1 keeps
    raw[2] = 0.0
    expected = 3 * raw / raw.sum()
    d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]]], dtype=torch.float64)
    present = torch.tensor([[True, True, False]])
    out = combine(randn(1, 3, 4), d, LiquidConfig(task="regression"), present)
    np.testing.assert_allclose(out.power[0].numpy(), expected, rtol=1e-12)


def test_masked_delegation_row_by_row_and_its_gradient():
    """Each absent expert's row becomes uniform over the other present experts of its sample
    (all zeros when none is), written here one row at a time; present rows pass through and
    carry the gradient, absent rows carry none."""
    from liquid_fed.ensemble import _mask_absent

    b, k = 9, 6
    d = random_delegation(b, k, seed=11).requires_grad_(True)
    present = torch.rand(b, k, generator=torch.Generator().manual_seed(12)) < 0.5
    present[0] = torch.tensor([False, False, True, False, False, False])  # one present
    present[1] = True  # none absent
    masked = _mask_absent(d, present)
    for s in range(b):
        for j in range(k):
            if present[s, j]:
                assert torch.equal(masked[s, j], d[s, j])
                continue
            others = [i for i in range(k) if i != j and bool(present[s, i])]
            want = torch.zeros(k, dtype=d.dtype)
            want[others] = 1.0 / len(others)
            torch.testing.assert_close(masked[s, j], want, rtol=0, atol=0)
    weights = randn(b, k, k, seed=13)
    (grad,) = torch.autograd.grad((masked * weights).sum(), d)
    torch.testing.assert_close(grad, weights * present.unsqueeze(-1), rtol=0, atol=0)
    everyone = torch.ones(b, k, dtype=torch.bool)
    assert _mask_absent(d, everyone) is d  # nothing absent: no copy


@pytest.mark.parametrize("task,mix", [("classification", "probs"), ("classification", "logits"),
                                      ("regression", "probs")])
@pytest.mark.parametrize("solver", ["sink_one", "sink_many", "uniform"])
def test_absent_experts_have_no_say(task, mix, solver):
    b, k, c = 16, 5, 4
    preds = randn(b, k, c, seed=5)
    d = random_delegation(b, k, seed=6)
    present = torch.rand(b, k, generator=torch.Generator().manual_seed(7)) < 0.6
    present[:, 1] = True  # at least one present per sample
    present[0] = torch.tensor([True, False, False, False, False])
    cfg = LiquidConfig(task=task, mix=mix, solver=solver)
    out = combine(preds, d, cfg, present)
    assert bool((out.power[~present] == 0).all())
    assert bool((out.power[present] > 0).all())
    torch.testing.assert_close(out.power.sum(-1), torch.full((b,), float(k), dtype=torch.float64))
    torch.testing.assert_close(out.power[0], torch.tensor([5.0, 0, 0, 0, 0], dtype=torch.float64))
    # Wild predictions of absent experts do not move the output at all.
    wild = preds.clone()
    wild[~present] = torch.randn(int((~present).sum()), c, dtype=torch.float64) * 1e3
    out_wild = combine(wild, d, cfg, present)
    torch.testing.assert_close(out_wild.output, out.output, rtol=0, atol=1e-12)
    # ...and a present expert's prediction does.
    moved = preds.clone()
    moved[:, 1, 0] += 1.0  # one logit: a shift of all logits would not change softmax
    assert not torch.allclose(combine(moved, d, cfg, present).output, out.output)
    # An absent expert's own delegation is ignored too.
    d2 = d.clone()
    d2[~present] = torch.roll(d[~present], 1, dims=-1)
    torch.testing.assert_close(combine(preds, d2, cfg, present).power, out.power)


def test_all_present_mask_changes_nothing():
    preds, d = randn(4, 3, 2), random_delegation(4, 3)
    cfg = LiquidConfig()
    full = torch.ones(4, 3, dtype=torch.bool)
    a, b = combine(preds, d, cfg), combine(preds, d, cfg, full)
    torch.testing.assert_close(a.output, b.output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(a.power, b.power, rtol=1e-14, atol=1e-14)


def test_combine_input_errors():
    preds, d = randn(4, 3, 2), random_delegation(4, 3)
    cfg = LiquidConfig()
    with pytest.raises(ValueError, match=r"predictions must have shape.*\(4, 2, 2\).*\(4, 3, 3\)"):
        combine(preds[:, :2], d, cfg)
    with pytest.raises(ValueError, match=r"present must have shape \(4, 3\), got \(4, 2\)"):
        combine(preds, d, cfg, torch.ones(4, 2, dtype=torch.bool))
    nobody = torch.ones(4, 3, dtype=torch.bool)
    nobody[2] = False
    with pytest.raises(ValueError, match="sample 2 has no expert present"):
        combine(preds, d, cfg, nobody)
    bad = d.clone()
    bad[1, 2, 0] = -0.5
    with pytest.raises(ValueError, match=r"delegation\[1, 2, 0\] is -0\.5"):
        combine(preds, bad, cfg)


def test_config_validation():
    with pytest.raises(ValueError, match=r'task must be one of .*got "ranking"'):
        LiquidConfig(task="ranking")
    with pytest.raises(ValueError, match=r'mix must be one of .*got "geometric"'):
        LiquidConfig(mix="geometric")
    with pytest.raises(ValueError, match=r'solver must be one of .*got "sink"'):
        LiquidConfig(solver="sink")
    with pytest.raises(ValueError, match=r"load_weight must be >= 0, got -1"):
        LiquidConfig(load_weight=-1)
    with pytest.raises(ValueError, match=r"load_temperature must be > 0, got 0"):
        LiquidConfig(load_temperature=0)
    experts = [MLPExpert((3,), 2, 2, i, hidden=(4,)) for i in range(2)]
    ens = LiquidEnsemble(experts, LiquidConfig(task="regression"), solver="sink_many")
    assert ens.config.task == "regression" and ens.config.solver == "sink_many"
    with pytest.raises(ValueError, match="experts must hold at least one"):
        LiquidEnsemble([])
    with pytest.raises(ValueError, match="batched must be True, False or"):
        LiquidEnsemble(experts, batched="yes")
    mixed = [MLPExpert((3,), 2, 2, 0, hidden=(4,)), MLPExpert((3,), 2, 2, 1, hidden=(5,))]
    with pytest.raises(ValueError, match="batched=True needs experts of one class"):
        LiquidEnsemble(mixed, batched=True)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        ens([torch.randn(3, 3)] * 3)
    wrong_k = LiquidEnsemble([MLPExpert((3,), 2, 3, i, hidden=(4,)) for i in range(2)])
    with pytest.raises(ValueError, match="delegation vectors over 2 experts, got width 3"):
        wrong_k(torch.randn(3, 3))


# --------------------------------------------------------------------------------------------
# Auxiliary and expert losses against hand values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 8])
def test_load_distribution_loss_hand_values(k):
    equal = torch.ones(7, k, dtype=torch.float64)
    for t in (0.1, 1.0, 5.0):
        assert abs(load_distribution_loss(equal, t).item()) < 1e-15
    chair = torch.zeros(7, k, dtype=torch.float64)
    chair[:, 0] = k
    # A sharp softmax is one-hot: one expert chairs every sample -> 1.
    assert load_distribution_loss(chair, 1e-3).item() == pytest.approx(1.0, abs=1e-15)
    # At T = 1: q = (e^K, 1, ..., 1) / (e^K + K - 1).
    q = np.ones(k)
    q[0] = math.exp(k)
    q /= q.sum()
    expected = (k * (q * q).sum() - 1) / (k - 1)
    assert load_distribution_loss(chair, 1.0).item() == pytest.approx(expected, rel=1e-13)
    # Every expert chairs equally often (a different one per sample) -> 0.
    rotate = torch.zeros(k, k, dtype=torch.float64)
    rotate[torch.arange(k), torch.arange(k)] = k
    assert abs(load_distribution_loss(rotate, 1e-3).item()) < 1e-15
    assert load_distribution_loss(chair[:, :1], 1.0).item() == 0.0  # K = 1


def test_specialization_loss_hand_values():
    assert specialization_loss(torch.ones(3, 4)).item() == pytest.approx(1.0, abs=1e-7)
    one = torch.zeros(3, 4)
    one[:, 2] = 4
    assert specialization_loss(one).item() == pytest.approx(0.0, abs=1e-7)
    # K = 2, p = (1.5, 0.5): shares (3/4, 1/4), K Σ share² - 1 = 1/4 -> loss 3/4.
    assert specialization_loss(torch.tensor([[1.5, 0.5]])).item() == pytest.approx(0.75)
    # averaged over the batch: (3/4 + 0) / 2
    batch = torch.tensor([[1.5, 0.5], [0.0, 2.0]])
    assert specialization_loss(batch).item() == pytest.approx(0.375)
    assert specialization_loss(torch.ones(5, 1)).item() == 0.0


def test_aux_losses_enter_the_output_with_their_weights():
    preds, d = randn(8, 3, 2), random_delegation(8, 3, seed=9)
    base = combine(preds, d, LiquidConfig())
    assert base.aux_loss.item() == 0.0
    cfg = LiquidConfig(load_weight=0.3, load_temperature=0.5, specialization_weight=2.0)
    out = combine(preds, d, cfg)
    expected = (0.3 * load_distribution_loss(base.power, 0.5)
                + 2.0 * specialization_loss(base.power))
    torch.testing.assert_close(out.aux_loss, expected)
    target = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    cfg_e = LiquidConfig(load_weight=0.3, load_temperature=0.5, specialization_weight=2.0,
                         expert_loss_weight=0.7)
    total = ensemble_loss(out, target, cfg_e)
    expected_total = (F.nll_loss(out.output, target) + expected
                      + 0.7 * expert_loss(preds, target, "classification"))
    torch.testing.assert_close(total, expected_total)


def test_expert_loss_is_mean_of_each_experts_own_loss():
    preds = randn(6, 3, 4, seed=11)
    target = torch.tensor([0, 3, 2, 1, 1, 0])
    per_expert = [F.cross_entropy(preds[:, j], target) for j in range(3)]
    torch.testing.assert_close(expert_loss(preds, target, "classification"),
                               torch.stack(per_expert).mean())
    # Zero logits: every expert's cross-entropy is log C.
    zeros = torch.zeros(6, 3, 4, dtype=torch.float64)
    assert expert_loss(zeros, target, "classification").item() == pytest.approx(math.log(4))
    # Regression: target (B,) with C = 1, and (B, C).
    reg = randn(5, 2, 1, seed=12)
    y = randn(5, seed=13)
    expected = np.mean([(reg[b, j, 0].item() - y[b].item()) ** 2
                        for b in range(5) for j in range(2)])
    assert expert_loss(reg, y, "regression").item() == pytest.approx(expected, rel=1e-12)
    reg3 = randn(5, 2, 3, seed=14)
    y3 = randn(5, 3, seed=15)
    expected3 = ((reg3 - y3[:, None]) ** 2).mean()
    torch.testing.assert_close(expert_loss(reg3, y3, "regression"), expected3)
    torch.testing.assert_close(task_loss(reg3[:, 0], y3, "regression"),
                               ((reg3[:, 0] - y3) ** 2).mean())


# --------------------------------------------------------------------------------------------
# Gradients (float64 gradcheck)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,mix", [("classification", "probs"), ("classification", "logits"),
                                      ("regression", "probs")])
@pytest.mark.parametrize("solver", ["sink_one", "sink_many", "uniform"])
@pytest.mark.parametrize("backend", ["elimination", "lapack"])
def test_gradcheck_combine(task, mix, solver, backend):
    preds = randn(3, 3, 4, seed=16).requires_grad_(True)
    d = random_delegation(3, 3, seed=17).requires_grad_(True)
    cfg = LiquidConfig(task=task, mix=mix, solver=solver, backend=backend, epsilon=0.05,
                       load_weight=0.5, specialization_weight=0.5)

    def fn(p, dl):  # validate=False: gradcheck's perturbations move rows off sum 1
        out = combine(p, dl, cfg, validate=False)
        return out.output, out.aux_loss

    assert torch.autograd.gradcheck(fn, (preds, d), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_combine_with_present_mask():
    preds = randn(3, 4, 2, seed=18).requires_grad_(True)
    d = random_delegation(3, 4, seed=19).requires_grad_(True)
    present = torch.tensor([[True, False, True, True], [True, True, True, True],
                            [False, False, True, False]])
    cfg = LiquidConfig(epsilon=0.05)
    assert torch.autograd.gradcheck(
        lambda p, dl: combine(p, dl, cfg, present, validate=False).output, (preds, d),
        eps=1e-6, atol=1e-8, rtol=1e-6)


def tiny_ensemble(batched: bool, k: int = 3, task: str = "classification",
                  seed: int = 0, width: int = 4, hidden: int = 5, **cfg) -> LiquidEnsemble:
    torch.manual_seed(seed)
    experts = [MLPExpert((width,), 3, k, i, hidden=(hidden,)) for i in range(k)]
    return LiquidEnsemble(experts, batched=batched, task=task, **cfg).double()


@pytest.mark.parametrize("batched", [False, True])
def test_gradcheck_layer_parameters_and_inputs(batched):
    from torch.func import functional_call

    ens = tiny_ensemble(batched, width=2, hidden=3, epsilon=0.05, expert_loss_weight=0.3,
                        load_weight=0.2)
    xs = [randn(3, 2, seed=20 + i).requires_grad_(True) for i in range(3)]
    target = torch.tensor([0, 2, 1])
    names = [n for n, _ in ens.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in ens.parameters()]

    def fn(*args):
        ps, inputs = args[: len(names)], args[len(names):]
        out = functional_call(ens, dict(zip(names, ps, strict=True)), (list(inputs),))
        return ens.loss(out, target), out.output

    assert torch.autograd.gradcheck(fn, (*params, *xs), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Batched (vmap) evaluation equals the loop, in outputs and in parameter gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_vmap_equals_loop(dtype, tol, task):
    k = 4
    loop = tiny_ensemble(False, k, task, seed=3, expert_loss_weight=0.5,
                         specialization_weight=0.1).to(dtype)
    vmap = tiny_ensemble(True, k, task, seed=3, expert_loss_weight=0.5,
                         specialization_weight=0.1).to(dtype)
    for a, b in zip(loop.parameters(), vmap.parameters(), strict=True):
        assert torch.equal(a, b)
    xs = [randn(9, 4, seed=30 + i, dtype=dtype) for i in range(k)]
    target = (torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]) if task == "classification"
              else randn(9, 3, seed=40, dtype=dtype))
    out_l, out_v = loop(xs), vmap(xs)
    for name in ("output", "power", "delegation", "predictions", "aux_loss"):
        torch.testing.assert_close(getattr(out_v, name), getattr(out_l, name), rtol=tol,
                                   atol=tol)
    loop.loss(out_l, target).backward()
    vmap.loss(out_v, target).backward()
    for (name, a), b in zip(loop.named_parameters(), vmap.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        assert a.grad.abs().sum() > 0, name  # every parameter takes part
        torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("batched", [False, True])
def test_functional_call_on_a_fresh_ensemble(batched):
    """torch.func.functional_call works on the first call (regression: the vmap path used to
    need real nn.Parameters, failing with "`weight` is not an nn.Parameter")."""
    from torch.func import functional_call, grad

    ens = tiny_ensemble(batched)
    x = randn(6, 4, seed=50)
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    params = {n: p.detach() for n, p in ens.named_parameters()}

    def loss(ps):
        return ens.loss(functional_call(ens, ps, (x,)), target)

    grads = grad(loss)(params)
    ens.zero_grad()
    ens.loss(ens(x), target).backward()
    for n, p in ens.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-12, msg=n)


def test_vmap_auto_falls_back_for_mixed_input_shapes():
    torch.manual_seed(0)
    experts = [MLPExpert((4,), 2, 2, 0, hidden=(3,)), MLPExpert((4,), 2, 2, 1, hidden=(3,))]
    auto = LiquidEnsemble(experts)
    xs = [torch.randn(5, 4), torch.randn(5, 2, 2)]  # same numel per row, different shape
    out = auto(xs)
    manual = [e(x) for e, x in zip(experts, xs, strict=True)]
    torch.testing.assert_close(out.predictions, torch.stack([m[0] for m in manual], 1))
    # one shared tensor input reaches every expert
    x = torch.randn(5, 4)
    shared = auto(x)
    torch.testing.assert_close(shared.predictions[:, 1], experts[1](x)[0])


# --------------------------------------------------------------------------------------------
# The benchmark script runs (smoke test, no timing assertions)
# --------------------------------------------------------------------------------------------


def test_bench_ensemble_quick_prints_its_table():
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_ensemble", "--quick", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "loop/vmap" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines()
            if line.split()[:1] in (["2"], ["4"])]
    assert [r[0] for r in rows] == ["2", "4"]
    assert all(r[4].endswith("x") for r in rows)


def test_auto_batching_falls_back_for_experts_that_cannot_vmap() -> None:
    from liquid_fed.experts import LTCExpert

    experts = [LTCExpert((5, 2), 3, 2, i, units=4, solver="dopri5") for i in range(2)]
    ens = LiquidEnsemble(experts, task="classification")
    out = ens(torch.randn(3, 5, 2))  # "auto" must loop, not vmap
    assert out.output.shape == (3, 3)
    with pytest.raises(ValueError, match="supports_vmap"):
        LiquidEnsemble(experts, batched=True)


def test_a_large_evaluation_solves_in_chunks_with_the_same_powers(monkeypatch) -> None:
    from liquid_fed import ensemble as ens

    gen = torch.Generator().manual_seed(3)
    b, k, c = 37, 5, 3
    predictions = torch.randn(b, k, c, generator=gen)
    delegation = torch.softmax(torch.randn(b, k, k, generator=gen), -1)
    present = torch.rand(b, k, generator=gen) > 0.3
    present[:, 0] = True
    cfg = LiquidConfig(task="classification", smoothing=0.25)
    with torch.no_grad():
        whole = ens.combine(predictions, delegation, cfg, present)
        calls: list[int] = []
        real = ens.solve_power
        monkeypatch.setattr(ens, "solve_power", lambda d, *a: calls.append(len(d)) or real(d, *a))
        monkeypatch.setattr(ens, "SOLVE_CHUNK_ENTRIES", 10 * k * k)  # 10 samples per solve
        chunked = ens.combine(predictions, delegation, cfg, present)
    assert calls == [10, 10, 10, 7]
    torch.testing.assert_close(chunked.power, whole.power, rtol=0, atol=0)
    torch.testing.assert_close(chunked.output, whole.output, rtol=0, atol=0)
    # With a gradient to carry, one solve (the graph is built once).
    calls.clear()
    combine_grad = ens.combine(predictions, delegation.clone().requires_grad_(), cfg, present)
    assert calls == [b] and combine_grad.power.requires_grad
