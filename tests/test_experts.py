"""Experts: registry, shapes, parameter counts, ODE solvers, streaming, gradients, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from liquid_fed.ensemble import LiquidEnsemble
from liquid_fed.experts import (
    EXPERTS,
    CNNExpert,
    ESNExpert,
    Expert,
    LTCExpert,
    MLPExpert,
    build_expert,
)
from liquid_fed.odeint import METHODS, STEPS, integrate
from liquid_fed.train import evaluate, fit

# Tiny instances of every kind: (kind, in_shape, options, input shape without the batch).
TINY = {
    "mlp": ((3, 2), {"hidden": (5,)}),
    "cnn": ((5, 5), {"channels": (2, 3)}),
    "esn": ((4, 2), {"units": 6, "seed": 0}),
    "ltc": ((4, 2), {"units": 4, "substeps": 2}),
}
LTC_SOLVERS = list(METHODS)


def tiny(kind: str, out_dim: int = 2, n_experts: int = 3, index: int = 0, **extra) -> Expert:
    in_shape, options = TINY[kind]
    return build_expert(kind, in_shape, out_dim, n_experts, index, **{**options, **extra})


def tiny_input(kind: str, batch: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, *TINY[kind][0], dtype=dtype)


# --------------------------------------------------------------------------------------------
# Registry and validation
# --------------------------------------------------------------------------------------------


def test_registry_holds_every_kind() -> None:
    assert set(EXPERTS) == {"mlp", "cnn", "esn", "ltc"}


def test_build_expert_rejects_unknown_option_naming_accepted() -> None:
    with pytest.raises(ValueError, match=r"'spectral_radius'.*accepted:.*substeps"):
        build_expert("ltc", (4, 2), 2, 3, spectral_radius=0.9)
    with pytest.raises(ValueError, match=r"'solver'.*accepted:.*leak"):
        build_expert("esn", (4, 2), 2, 3, solver="rk4")


def test_build_expert_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"one of \['cnn', 'esn', 'ltc', 'mlp'\].*\"gru\""):
        build_expert("gru", (4, 2), 2, 3)


@pytest.mark.parametrize("kind, options, message", [
    ("ltc", {"solver": "rk5"}, r'solver must be one of \[.*dopri5.*\], got "rk5"'),
    ("ltc", {"substeps": 0}, "substeps must be >= 1, got 0"),
    ("ltc", {"dt": -1.0}, "dt must be > 0, got -1.0"),
    ("esn", {"leak": 1.5}, r"leak must lie in \(0, 1\], got 1.5"),
    ("esn", {"spectral_radius": 0.0}, "spectral_radius must be > 0, got 0.0"),
    ("esn", {"readout": "max"}, r"readout must be one of \['last', 'mean'\], got \"max\""),
    ("cnn", {"pool": "sum"}, r"pool must be one of \['avg', 'max'\], got \"sum\""),
    ("cnn", {"kernel_size": 2}, "kernel_size must be an odd integer >= 1, got 2"),
])
def test_bad_option_values_are_named(kind: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(kind, **options)


def test_recurrent_input_shape_is_checked() -> None:
    message = r"expects sequences \(batch, T >= 1, 2\), got \(3, 4, 5\)"
    with pytest.raises(ValueError, match=message):
        tiny("ltc")(torch.randn(3, 4, 5))


# --------------------------------------------------------------------------------------------
# Shapes and parameter counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TINY))
def test_outputs_are_prediction_and_delegation(kind: str) -> None:
    pred, delegation = tiny(kind, out_dim=4, n_experts=3, index=1)(tiny_input(kind, batch=5))
    assert pred.shape == (5, 4) and delegation.shape == (5, 3)
    torch.testing.assert_close(delegation.sum(-1), torch.ones(5))
    assert bool((delegation >= 0).all())


def test_cnn_takes_channel_axis_or_not() -> None:
    gray = CNNExpert((6, 7), 2, 2, channels=(3,))
    assert gray(torch.randn(2, 6, 7))[0].shape == (2, 2)
    color = CNNExpert((3, 6, 7), 2, 2, channels=(4, 4, 4), pool="max")
    assert color(torch.randn(2, 3, 6, 7))[0].shape == (2, 2)


def _heads(h: int, c: int, k: int) -> int:
    return (h * c + c) + (h * k + k)  # prediction head + delegation head


@pytest.mark.parametrize("expert, expected", [
    (MLPExpert((3, 2), 4, 3, hidden=(5, 7)), (6 * 5 + 5) + (5 * 7 + 7) + _heads(7, 4, 3)),
    (CNNExpert((2, 6, 6), 4, 3, channels=(3, 5), kernel_size=3),
     (2 * 3 * 9 + 3) + (3 * 5 * 9 + 5) + _heads(5, 4, 3)),
    (ESNExpert((10, 2), 4, 3, units=7), _heads(7, 4, 3)),  # reservoir is fixed
    (LTCExpert((10, 2), 4, 3, units=7),
     (2 * 7 + 7) + 7 * 7 + 7 + 7 + _heads(7, 4, 3)),  # W_u, b; W_x; τ; A; heads
])
def test_parameter_count_matches_hand_count(expert: Expert, expected: int) -> None:
    assert expert.n_parameters() == expected


# --------------------------------------------------------------------------------------------
# ESN
# --------------------------------------------------------------------------------------------


def test_esn_reservoir_is_fixed_scaled_and_seeded() -> None:
    esn = ESNExpert((5, 3), 2, 2, units=20, spectral_radius=0.7, leak=0.4, density=0.5, seed=3)
    radius = torch.linalg.eigvals(esn.w_res.double()).abs().max()
    assert float(radius) == pytest.approx(0.7, rel=1e-5)
    assert {"w_in", "w_res", "b_res"} <= set(esn.state_dict())
    assert {n for n, _ in esn.named_parameters()} == {
        "head.weight", "head.bias", "delegate.linear.weight", "delegate.linear.bias"}
    twin = ESNExpert((5, 3), 2, 2, units=20, spectral_radius=0.7, leak=0.4, density=0.5, seed=3)
    torch.testing.assert_close(twin.w_res, esn.w_res)
    other = ESNExpert((5, 3), 2, 2, units=20, spectral_radius=0.7, seed=4)
    assert not torch.equal(other.w_res, esn.w_res)

    before = esn.w_res.clone()
    ensemble = LiquidEnsemble([esn, twin])
    x = torch.randn(8, 5, 3)
    fit(ensemble, [x, x], torch.randint(0, 2, (8,)), epochs=2, batch_size=4, lr=0.1)
    torch.testing.assert_close(esn.w_res, before)


# --------------------------------------------------------------------------------------------
# ODE steps and LTC solvers
# --------------------------------------------------------------------------------------------


def test_steps_on_a_linear_problem_with_exact_answer() -> None:
    # dx/dt = -a x + b with constant a, b: x(t) = b/a + (x0 - b/a) e^{-a t}
    a = torch.tensor([[0.5, 2.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64)
    x0 = torch.tensor([[0.3, 0.2, -0.4]], dtype=torch.float64)
    exact = b / a + (x0 - b / a) * torch.exp(-a * 0.8)

    def rates(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a.expand_as(x), b.expand_as(x)

    got = integrate(rates, x0, 0.8, "exponential", substeps=1)
    torch.testing.assert_close(got, exact, rtol=1e-14, atol=1e-14)
    got = integrate(rates, x0, 0.8, "dopri5", rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-9)
    for method in STEPS:
        got = integrate(rates, x0, 0.8, method, substeps=400)
        torch.testing.assert_close(got, exact, rtol=5e-3, atol=5e-3)


def _ltc64(**options) -> LTCExpert:
    torch.manual_seed(0)
    return LTCExpert((6, 3), 2, 2, units=6, **options).double()


def _final_state(expert: LTCExpert, x: torch.Tensor, solver: str, **settings) -> torch.Tensor:
    expert.solver = solver
    for name, value in settings.items():
        setattr(expert, name, value)
    with torch.no_grad():
        return expert(x, return_state=True)[2].h


def test_ltc_solvers_agree_and_converge_with_their_order() -> None:
    expert = _ltc64(dt=1.0)
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = _final_state(expert, x, "dopri5", rtol=1e-12, atol=1e-12)
    fine_rk4 = _final_state(expert, x, "rk4", substeps=200)
    assert float((fine_rk4 - reference).abs().max()) < 1e-10
    orders = {"euler": 1, "midpoint": 2, "rk4": 4, "fused": 1, "exponential": 1}
    for solver, order in orders.items():
        errors = [float((_final_state(expert, x, solver, substeps=n) - reference).abs().max())
                  for n in (4, 8, 16)]
        assert errors[0] > errors[1] > errors[2], (solver, errors)
        assert errors[2] < {1: 2e-3, 2: 1e-4, 4: 1e-7}[order], (solver, errors)
        # halving the step divides the error by about 2^order (loose bounds, cannot flake)
        ratio = errors[1] / errors[2]
        assert 2 ** order * 0.6 < ratio < 2 ** order * 1.6, (solver, errors)


def test_ltc_dopri5_tolerance_controls_error_and_ignores_batch_mates() -> None:
    expert = _ltc64(dt=2.0)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    reference = _final_state(expert, x, "rk4", substeps=400)
    loose = _final_state(expert, x, "dopri5", rtol=1e-3, atol=1e-6)
    tight = _final_state(expert, x, "dopri5", rtol=1e-8, atol=1e-10)
    assert float((tight - reference).abs().max()) < 1e-6
    assert (tight - reference).abs().max() < (loose - reference).abs().max()
    # every sample keeps its own step size: a sample's result does not depend on the others
    alone = _final_state(expert, x[2:3], "dopri5", rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(alone, loose[2:3], rtol=0, atol=1e-15)


def test_ltc_tau_is_positive_and_fused_step_is_stable_for_large_dt() -> None:
    expert = _ltc64(dt=50.0, solver="fused", substeps=1, tau_init=0.01)
    with torch.no_grad():
        expert.tau_raw.fill_(-30.0)
    assert bool((expert.tau() > 0).all())
    h = expert(torch.randn(3, 6, 3, dtype=torch.float64) * 5, return_state=True)[2].h
    bound = expert.reversal.abs().max()
    assert bool(torch.isfinite(h).all()) and bool((h.abs() <= bound + 1e-12).all())


@pytest.mark.parametrize("kind, options", [
    ("esn", {"readout": "last"}),
    ("esn", {"readout": "mean"}),
    *[("ltc", {"solver": s}) for s in LTC_SOLVERS],
    ("ltc", {"solver": "rk4", "readout": "mean"}),
])
def test_streaming_one_step_at_a_time_matches_full_pass(kind: str, options: dict) -> None:
    expert = tiny(kind, **options).double()
    x = torch.randn(3, 7, 2, dtype=torch.float64)
    pred, delegation, state = expert(x, return_state=True)
    stream = None
    for t in range(7):
        p_t, d_t, stream = expert.step(x[:, t], stream)
    torch.testing.assert_close(p_t, pred)
    torch.testing.assert_close(d_t, delegation)
    torch.testing.assert_close(stream.h, state.h)
    assert stream.steps == 7
    # a cached state continues a sequence: prefix pass + suffix pass == full pass
    _, _, mid = expert(x[:, :4], return_state=True)
    torch.testing.assert_close(expert(x[:, 4:], mid)[0], pred)


# --------------------------------------------------------------------------------------------
# Gradient checks (float64, tiny instances)
# --------------------------------------------------------------------------------------------


def _gradcheck_expert(expert: Expert, x: torch.Tensor, names: list[str],
                      fast_mode: bool = False) -> None:
    params = dict(expert.named_parameters())
    chosen = [params[n].detach().clone().requires_grad_() for n in names]

    def fn(x: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return functional_call(expert, dict(zip(names, ps, strict=True)), (x,), strict=False)

    assert gradcheck(fn, (x.requires_grad_(), *chosen), eps=1e-6, atol=1e-5, rtol=1e-4,
                     fast_mode=fast_mode)


@pytest.mark.parametrize("kind, options, names", [
    ("mlp", {}, ["trunk.1.weight", "head.bias"]),
    ("cnn", {}, ["convs.0.weight", "delegate.linear.weight"]),
    ("esn", {}, ["head.weight", "delegate.linear.bias"]),
    ("ltc", {"solver": "fused"}, ["tau_raw", "reversal", "recurrent.weight"]),
    ("ltc", {"solver": "exponential"}, ["tau_raw", "input.bias"]),
    ("ltc", {"solver": "rk4"}, ["tau_raw", "reversal"]),
    ("ltc", {"solver": "dopri5", "rtol": 1e-10, "atol": 1e-12}, ["tau_raw"]),
])
def test_expert_gradcheck(kind: str, options: dict, names: list[str]) -> None:
    torch.manual_seed(0)
    expert = tiny(kind, **options).double()
    # dopri5 is slow per call and fast mode (a random projection of the Jacobian) suffices
    fast = options.get("solver") == "dopri5"
    _gradcheck_expert(expert, tiny_input(kind, batch=2, dtype=torch.float64), names, fast)


def test_heterogeneous_ensemble_gradcheck() -> None:
    torch.manual_seed(0)
    experts = [
        build_expert("mlp", (3,), 2, 4, 0, hidden=(4,)),
        build_expert("cnn", (4, 4), 2, 4, 1, channels=(2,)),
        build_expert("esn", (3, 2), 2, 4, 2, units=5, seed=1),
        build_expert("ltc", (3, 1), 2, 4, 3, units=3, substeps=1, solver="rk4"),
    ]
    ensemble = LiquidEnsemble(experts).double()
    xs = [torch.randn(2, 3), torch.randn(2, 4, 4), torch.randn(2, 3, 2), torch.randn(2, 3, 1)]
    xs = [x.double().requires_grad_() for x in xs]

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = ensemble(list(xs))
        return out.output, out.power

    assert gradcheck(fn, tuple(xs), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    torch.autograd.gradcheck(lambda x: fn(*xs[:3], x), (xs[3],), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Ensembles
# --------------------------------------------------------------------------------------------


def test_heterogeneous_ensembles_run() -> None:
    mixed = LiquidEnsemble([
        build_expert("mlp", (8, 4), 3, 2, 0, hidden=(16, 8)),
        build_expert("cnn", (8, 4), 3, 2, 1, channels=(4,)),
    ])
    out = mixed([torch.randn(5, 8, 4), torch.randn(5, 8, 4)])
    assert out.output.shape == (5, 3) and out.power.shape == (5, 2)
    seq = LiquidEnsemble([
        build_expert("esn", (6, 2), 3, 2, 0, units=12),
        build_expert("ltc", (6, 3), 3, 2, 1, units=5, solver="midpoint"),
    ])
    out = seq([torch.randn(5, 6, 2), torch.randn(5, 6, 3)])
    torch.testing.assert_close(out.power.sum(-1), torch.full((5,), 2.0))


def test_homogeneous_ltc_ensemble_batched_equals_loop() -> None:
    torch.manual_seed(0)
    experts = [tiny("ltc", n_experts=2, index=i, solver="rk4") for i in range(2)]
    xs = [tiny_input("ltc", batch=4) for _ in range(2)]
    batched = LiquidEnsemble(experts)
    assert batched._use_vmap(xs)
    looped = LiquidEnsemble(experts, batched=False)
    torch.testing.assert_close(batched(xs).output, looped(xs).output)


def test_dopri5_experts_are_evaluated_in_a_loop() -> None:
    experts = [tiny("ltc", n_experts=2, index=i, solver="dopri5") for i in range(2)]
    assert not experts[0].supports_vmap and tiny("ltc").supports_vmap
    xs = [tiny_input("ltc") for _ in range(2)]
    auto = LiquidEnsemble(experts)(xs)  # "auto" sees supports_vmap=False and loops
    loop = LiquidEnsemble(experts, batched=False)(xs)
    assert auto.output.shape == (3, 2)
    torch.testing.assert_close(auto.output, loop.output)


# --------------------------------------------------------------------------------------------
# Every kind learns a small task inside a LiquidEnsemble
# --------------------------------------------------------------------------------------------


def _sequence_task(n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two views of a noisy 10-step sequence; the label is the sign of a drift in channel 0."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 10, 4, generator=gen)
    x[:, :, 0] += 0.6 * (2 * y - 1).unsqueeze(1)  # (B, T)
    return [x[:, :, :2], x[:, :, 2:]], y


def _patch_task(n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A horizontal (0) or vertical (1) bar at a random place in an 8×8 noisy patch."""
    y = torch.randint(0, 2, (n,), generator=gen)
    img = 0.3 * torch.randn(n, 8, 8, generator=gen)
    pos = torch.randint(0, 8, (n,), generator=gen)
    rows = torch.arange(n)
    for i in range(n):
        if y[i]:
            img[rows[i], :, pos[i]] += 1.5
        else:
            img[rows[i], pos[i], :] += 1.5
    return [img, img.flip(-1)], y


def _table_task(n: int, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] + x[:, 1] - x[:, 3] > 0).long()
    return [x[:, :3], x[:, 3:]], y


TASKS = {
    "mlp": (_table_task, {"hidden": (16,)}),
    "cnn": (_patch_task, {"channels": (4, 8)}),
    "esn": (_sequence_task, {"units": 40, "leak": 0.3, "readout": "mean", "seed": 0}),
    "ltc": (_sequence_task, {"units": 8, "solver": "fused", "substeps": 1, "readout": "mean"}),
}


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_every_kind_learns_inside_an_ensemble(kind: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    make, options = TASKS[kind]
    train_x, train_y = make(256, gen)
    test_x, test_y = make(256, gen)
    experts = [build_expert(kind, tuple(v.shape[1:]), 2, 2, i, **options)
               for i, v in enumerate(train_x)]
    ensemble = LiquidEnsemble(experts)
    before = evaluate(ensemble, test_x, test_y)["loss"]
    history = fit(ensemble, train_x, train_y, epochs=8, batch_size=64, lr=0.05)
    metrics = evaluate(ensemble, test_x, test_y)
    assert history[-1] < 0.75 * history[0], history
    assert metrics["loss"] < 0.75 * before
    assert metrics["accuracy"] > 0.75, metrics
    assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize(("options", "message"), [
    ({"hidden": [-3]}, "hidden must be a list of positive integers, got \\[-3\\]"),
    ({"hidden": 64}, "hidden must be a list of positive integers, got 64"),
    ({"dropout": 1.5}, "dropout must lie in \\[0, 1\\), got 1.5"),
])
def test_mlp_options_are_checked_at_the_door(options, message) -> None:
    from liquid_fed.experts import build_expert

    with pytest.raises(ValueError, match=message):
        build_expert("mlp", (4,), 3, 2, 0, **options)
