"""Delegation solvers: hand-solved graphs, independent references, properties, gradients.

Every expected value below is either derived on paper (closed forms in ε, γ, K) or computed by
an independent numpy float64 reference that never calls the library.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from liquid_fed.solvers import (
    ELIMINATION_MAX_K,
    SOLVERS,
    flow,
    solve_power,
    validate_delegation,
)

BACKENDS = ("elimination", "lapack")
FLOW_SOLVERS = ("sink_one", "sink_many")
EPS = 0.01
PENALTY = 0.9
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Independent references (numpy float64, explicit extended graphs)
# --------------------------------------------------------------------------------------------


def ref_sink_one_extended(w: np.ndarray, eps: float) -> np.ndarray:
    """sink_one by the absorbing Markov chain of the extended graph, solved in numpy.

    Transient states: the K experts. Absorbing states: "kept by j" (K of them) and the sink.
    From expert i a unit of mass moves to expert j ≠ i with (1-ε) W[i, j], is kept by i with
    (1-ε) W[i, i] and falls into the sink with ε. The sink hands its total back uniformly.
    Every expert starts with one vote; p = mass absorbed at "kept by j" + sink mass / K.
    """
    k = w.shape[0]
    s = np.diag(w).copy()
    q = (1 - eps) * (w - np.diag(s))  # transient -> transient
    r = np.zeros((k, k + 1))
    r[:, :k] = (1 - eps) * np.diag(s)  # transient -> kept by j
    r[:, k] = eps  # transient -> sink
    assert np.allclose(q.sum(1) + r.sum(1), 1.0)  # a proper Markov chain
    absorbed = np.linalg.solve((np.eye(k) - q).T, np.ones(k)) @ r  # 1ᵀ (I - Q)^{-1} R
    return absorbed[:k] + absorbed[k] / k


def ref_sink_one_iterated(w: np.ndarray, eps: float, tol: float = 1e-15) -> np.ndarray:
    """The same extended graph, by pushing the mass around until none is left in transit."""
    k = w.shape[0]
    s = np.diag(w).copy()
    o = w - np.diag(s)
    mass = np.ones(k)
    kept = np.zeros(k)
    sink = 0.0
    while mass.sum() > tol:
        kept += (1 - eps) * s * mass
        sink += eps * mass.sum()
        mass = (1 - eps) * (o.T @ mass)
    return kept + sink / k


def ref_sink_many(w: np.ndarray, eps: float, gamma: float, tol: float = 1e-15) -> np.ndarray:
    """sink_many: f as the Neumann series Σ_n (γ Oᵀ)^n 1, then k = (s + ε) f, p = K k / Σ k.

    Extended-graph reading: every expert j has its own sink, absorbing what j keeps (s_j f_j)
    plus an ε-share; each delegation hop loses the fraction 1 - γ.
    """
    k = w.shape[0]
    s = np.diag(w).copy()
    o = w - np.diag(s)
    term = np.ones(k)
    f = np.zeros(k)
    while term.sum() > tol:
        f += term
        term = gamma * (o.T @ term)
    kept = (s + eps) * f
    return k * kept / kept.sum()


def random_delegation(b: int, k: int, sharpness: float, dtype: torch.dtype,
                      seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(b, k, k, generator=g, dtype=torch.float64)
    return torch.softmax(logits, -1).to(dtype)


def powers(w: np.ndarray | torch.Tensor, solver: str, backend: str,
           eps: float = EPS, penalty: float = PENALTY) -> np.ndarray:
    d = torch.as_tensor(np.asarray(w, dtype=np.float64))[None]
    return solve_power(d, solver, eps, penalty, backend=backend)[0].numpy()


# --------------------------------------------------------------------------------------------
# Hand-solvable graphs, closed forms derived on paper
# --------------------------------------------------------------------------------------------


def chain(k: int) -> np.ndarray:
    """1 -> 2 -> ... -> K, the last keeps its vote."""
    w = np.zeros((k, k))
    w[np.arange(k - 1), np.arange(1, k)] = 1.0
    w[k - 1, k - 1] = 1.0
    return w


def star(k: int, leaf_keep: float) -> np.ndarray:
    """Leaves keep ``leaf_keep`` and give the rest to expert 0, which keeps everything."""
    w = np.zeros((k, k))
    w[0, 0] = 1.0
    w[1:, 0] = 1 - leaf_keep
    w[np.arange(1, k), np.arange(1, k)] = leaf_keep
    return w


def cycle(k: int) -> np.ndarray:
    """i -> i+1 mod K, nobody keeps anything."""
    return np.roll(np.eye(k), 1, axis=1)


def chain_expected(k: int, solver: str, eps: float, gamma: float) -> np.ndarray:
    # f_i = Σ_{n<i} γ^n = (1 - γ^i) / (1 - γ) (1-based i): a geometric sum along the chain.
    i = np.arange(1, k + 1)
    f = (1 - gamma**i) / (1 - gamma)
    if solver == "sink_one":  # γ = 1 - ε; ε Σ f = K - γ f_K
        p = np.full(k, (k - gamma * f[-1]) / k)
        p[-1] += gamma * f[-1]
        return p
    kept = eps * f
    kept[-1] = (1 + eps) * f[-1]
    return k * kept / kept.sum()


def star_expected(k: int, a: float, solver: str, eps: float, gamma: float) -> np.ndarray:
    # f_leaf = 1, f_centre = 1 + γ (1 - a)(K - 1)
    f = np.ones(k)
    f[0] = 1 + gamma * (1 - a) * (k - 1)
    s = np.full(k, a)
    s[0] = 1.0
    if solver == "sink_one":
        return gamma * s * f + (eps / k) * f.sum()
    kept = (s + eps) * f
    return k * kept / kept.sum()


def pair_expected(a: float, b: float, solver: str, eps: float, gamma: float) -> np.ndarray:
    # W = [[a, 1-a], [1-b, b]]: f1 = 1 + γ(1-b) f2, f2 = 1 + γ(1-a) f1 (Cramer's rule).
    det = 1 - gamma**2 * (1 - a) * (1 - b)
    f = np.array([1 + gamma * (1 - b), 1 + gamma * (1 - a)]) / det
    s = np.array([a, b])
    if solver == "sink_one":
        return gamma * s * f + (eps / 2) * f.sum()
    kept = (s + eps) * f
    return 2 * kept / kept.sum()


def gamma_of(solver: str, eps: float, penalty: float) -> float:
    return 1 - eps if solver == "sink_one" else penalty


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("k", [1, 2, 3, 7, 30])
def test_everyone_keeps_their_vote(solver, backend, k):
    p = powers(np.eye(k), solver, backend)
    np.testing.assert_allclose(p, np.ones(k), rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_single_expert(solver, backend):
    for eps, pen in [(0.01, 0.9), (0.5, 0.0), (0.99, 0.5)]:
        p = powers(np.ones((1, 1)), solver, backend, eps, pen)
        np.testing.assert_allclose(p, [1.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", FLOW_SOLVERS)
@pytest.mark.parametrize("k", [2, 4, 9, 40])
@pytest.mark.parametrize("eps,penalty", [(0.01, 0.9), (0.2, 0.5)])
def test_chain(solver, backend, k, eps, penalty):
    p = powers(chain(k), solver, backend, eps, penalty)
    expected = chain_expected(k, solver, eps, gamma_of(solver, eps, penalty))
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-13)
    assert p.argmax() == k - 1


def test_chain_sink_one_concentrates_power_at_the_end():
    # K = 4, ε = 0.01: p_K = γ(1-γ⁴)/(1-γ) + ε Σf / K ≈ 3.926, the others ≈ 0.0248 each.
    p = powers(chain(4), "sink_one", "elimination")
    assert p[-1] > 0.98 * 4
    gf = 0.99 * (1 - 0.99**4) / 0.01
    np.testing.assert_allclose(p[:-1], (4 - gf) / 4, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", FLOW_SOLVERS)
@pytest.mark.parametrize("k", [2, 5, 33])
@pytest.mark.parametrize("leaf_keep", [0.0, 0.3])
def test_star(solver, backend, k, leaf_keep):
    p = powers(star(k, leaf_keep), solver, backend)
    expected = star_expected(k, leaf_keep, solver, EPS, gamma_of(solver, EPS, PENALTY))
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(p[1:], p[1])  # leaves are interchangeable


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", FLOW_SOLVERS)
@pytest.mark.parametrize("k", [2, 3, 8])
def test_cycle_that_never_keeps_goes_through_the_sink(solver, backend, k):
    # f = 1/(1-γ) everywhere and nobody keeps: all power is the sink's uniform return
    # (sink_one: (ε/K)·K/ε = 1) or the ε-shares (sink_many: equal), so p = 1.
    p = powers(cycle(k), solver, backend)
    np.testing.assert_allclose(p, np.ones(k), rtol=1e-12)
    # ...and the flow itself is the geometric sum 1/(1-γ).
    gamma = gamma_of(solver, EPS, PENALTY)
    d = torch.as_tensor(cycle(k))[None]
    np.testing.assert_allclose(flow(d, gamma, backend)[0].numpy(), 1 / (1 - gamma), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", FLOW_SOLVERS)
@pytest.mark.parametrize("a,b", [(0.0, 0.0), (0.5, 0.0), (0.2, 0.9), (1.0, 0.3)])
def test_two_experts_closed_form(solver, backend, a, b):
    w = np.array([[a, 1 - a], [1 - b, b]])
    for eps, pen in [(0.01, 0.9), (0.3, 0.4)]:
        p = powers(w, solver, backend, eps, pen)
        expected = pair_expected(a, b, solver, eps, gamma_of(solver, eps, pen))
        np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_uniform_solver_ignores_the_graph(solver):
    if solver != "uniform":
        return test_everyone_keeps_their_vote(solver, "lapack", 3)
    for w in (chain(5), star(5, 0.2), cycle(5)):
        np.testing.assert_array_equal(powers(w, "uniform", "auto"), np.ones(5))


def test_hand_graphs_match_the_independent_references():
    """The closed forms and the extended-graph references agree (checks the references)."""
    for w in (chain(6), star(6, 0.3), cycle(4), np.array([[0.2, 0.8], [0.1, 0.9]])):
        k = w.shape[0]
        gamma = 1 - EPS
        if np.allclose(w, chain(k)):
            exp_one = chain_expected(k, "sink_one", EPS, gamma)
            exp_many = chain_expected(k, "sink_many", EPS, PENALTY)
        elif k == 2:
            exp_one = pair_expected(0.2, 0.9, "sink_one", EPS, gamma)
            exp_many = pair_expected(0.2, 0.9, "sink_many", EPS, PENALTY)
        elif np.allclose(w, cycle(k)):
            exp_one = exp_many = np.ones(k)
        else:
            exp_one = star_expected(k, 0.3, "sink_one", EPS, gamma)
            exp_many = star_expected(k, 0.3, "sink_many", EPS, PENALTY)
        np.testing.assert_allclose(ref_sink_one_extended(w, EPS), exp_one, rtol=1e-11)
        np.testing.assert_allclose(ref_sink_one_iterated(w, EPS), exp_one, rtol=1e-11)
        np.testing.assert_allclose(ref_sink_many(w, EPS, PENALTY), exp_many, rtol=1e-11)


# --------------------------------------------------------------------------------------------
# Random delegations: references and properties
# --------------------------------------------------------------------------------------------

SHAPES = [(2, 0.3), (2, 8.0), (5, 1.0), (5, 8.0), (16, 0.3), (16, 8.0), (64, 1.0), (64, 8.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,sharpness", SHAPES)
def test_sink_one_matches_extended_graph_reference(backend, k, sharpness):
    d = random_delegation(6, k, sharpness, torch.float64, seed=k)
    p = solve_power(d, "sink_one", EPS, backend=backend).numpy()
    for b in range(d.shape[0]):
        np.testing.assert_allclose(p[b], ref_sink_one_extended(d[b].numpy(), EPS),
                                   rtol=1e-10, atol=1e-12)
    # The iterated reference is slow for large K; check a couple of samples at small K.
    if k <= 16:
        for b in range(2):
            np.testing.assert_allclose(p[b], ref_sink_one_iterated(d[b].numpy(), EPS),
                                       rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,sharpness", SHAPES)
@pytest.mark.parametrize("eps,penalty", [(0.01, 0.9), (0.1, 0.3)])
def test_sink_many_matches_reference(backend, k, sharpness, eps, penalty):
    d = random_delegation(4, k, sharpness, torch.float64, seed=100 + k)
    p = solve_power(d, "sink_many", eps, penalty, backend=backend).numpy()
    for b in range(d.shape[0]):
        np.testing.assert_allclose(p[b], ref_sink_many(d[b].numpy(), eps, penalty),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("k,sharpness", SHAPES)
def test_properties_on_random_delegations(solver, k, sharpness, dtype, rtol):
    d = random_delegation(32, k, sharpness, dtype, seed=7 * k)
    results = {}
    for backend in ("auto", *BACKENDS):
        p = solve_power(d, solver, EPS, PENALTY, backend=backend)
        assert p.shape == (32, k) and p.dtype == dtype
        assert bool((p >= 0).all())
        torch.testing.assert_close(p.sum(-1), torch.full((32,), float(k), dtype=dtype),
                                   rtol=rtol, atol=0)
        results[backend] = p
    # The two backends solve the same system: they agree to rounding.
    torch.testing.assert_close(results["elimination"], results["lapack"], rtol=50 * rtol,
                               atol=50 * rtol)
    auto_is = "elimination" if k <= ELIMINATION_MAX_K else "lapack"
    torch.testing.assert_close(results["auto"], results[auto_is], rtol=0, atol=0)
    # Relabelling the experts relabels the powers.
    g = torch.Generator().manual_seed(k)
    perm = torch.randperm(k, generator=g)
    d_perm = d[:, perm][:, :, perm]
    for backend in BACKENDS:
        torch.testing.assert_close(solve_power(d_perm, solver, EPS, PENALTY, backend=backend),
                                   results[backend][:, perm], rtol=50 * rtol, atol=50 * rtol)


@pytest.mark.parametrize("solver", FLOW_SOLVERS)
def test_float32_matches_float64_reference(solver):
    d64 = random_delegation(16, 12, 3.0, torch.float64, seed=3)
    d32 = d64.float()
    d32 = d32 / d32.sum(-1, keepdim=True)
    ref = np.stack([
        ref_sink_one_extended(w, EPS) if solver == "sink_one" else ref_sink_many(w, EPS, PENALTY)
        for w in d32.double().numpy()
    ])
    for backend in BACKENDS:
        p = solve_power(d32, solver, backend=backend).double().numpy()
        np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)


def test_large_k_lapack_path():
    k = 256
    d = random_delegation(8, k, 2.0, torch.float64, seed=1)
    p_auto = solve_power(d, "sink_one")
    p_lapack = solve_power(d, "sink_one", backend="lapack")
    torch.testing.assert_close(p_auto, p_lapack, rtol=0, atol=0)  # auto picks LAPACK
    torch.testing.assert_close(p_auto.sum(-1), torch.full((8,), 256.0, dtype=torch.float64))
    for b in (0, 7):
        np.testing.assert_allclose(p_auto[b].numpy(), ref_sink_one_extended(d[b].numpy(), EPS),
                                   rtol=1e-9, atol=1e-11)
    p32 = solve_power(d.float() / d.float().sum(-1, keepdim=True), "sink_many")
    torch.testing.assert_close(p32.sum(-1), torch.full((8,), 256.0), rtol=1e-5, atol=0)
    assert bool((p32 >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_input_solves_in_float32(dtype, solver, backend):
    d = random_delegation(10, 6, 2.0, torch.float64, seed=5).to(dtype)
    p = solve_power(d, solver, backend=backend)
    assert p.dtype == dtype
    # Reference: the same (rounded) half-precision graph solved in float32, then rounded.
    d32 = d.float()
    expected = solve_power(d32 / d32.sum(-1, keepdim=True), solver, backend=backend,
                           validate=False)
    expected_unnormalised = solve_power(d32, solver, backend=backend, validate=False)
    torch.testing.assert_close(p, expected_unnormalised.to(dtype), rtol=0, atol=0)
    # and to half precision it is the solution of the normalised graph
    torch.testing.assert_close(p.float(), expected, rtol=2e-2, atol=2e-2)
    # gradients flow back in the input dtype (uniform has no gradient path at all)
    x = d.clone().requires_grad_(True)
    out = solve_power(x, solver, backend=backend)
    assert out.requires_grad == (solver != "uniform")
    if solver != "uniform":
        out[:, 0].sum().backward()
        assert x.grad is not None and x.grad.dtype == dtype
        assert bool(torch.isfinite(x.grad).all())


def test_empty_batch():
    d = torch.empty(0, 4, 4, dtype=torch.float64)
    for solver in SOLVERS:
        for backend in BACKENDS:
            assert solve_power(d, solver, backend=backend).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("k", [1, 2, 5])
def test_gradcheck_solvers(solver, backend, k):
    d = random_delegation(3, k, 1.5, torch.float64, seed=11 + k).requires_grad_(True)

    def fn(x):  # gradcheck perturbs single entries: rows then stray from 1 by design
        return solve_power(x, solver, 0.05, 0.8, backend=backend, validate=False)

    if solver == "uniform":  # constant: no gradient path, the function must say so
        assert not fn(d).requires_grad
        return
    assert torch.autograd.gradcheck(fn, (d,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("solver", FLOW_SOLVERS)
def test_gradients_agree_between_backends_and_with_reference(solver):
    """Backward of both backends against central differences of the numpy reference."""
    d = random_delegation(2, 4, 2.0, torch.float64, seed=21)
    w_out = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def ref_loss(x: np.ndarray) -> float:
        total = 0.0
        for b in range(x.shape[0]):
            p = (ref_sink_one_extended(x[b], 0.05) if solver == "sink_one"
                 else ref_sink_many(x[b], 0.05, 0.8))
            total += float(p @ w_out[b].numpy())
        return total

    h = 1e-6
    x0 = d.numpy()
    numeric = np.zeros_like(x0)
    for idx in np.ndindex(*x0.shape):
        plus, minus = x0.copy(), x0.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (ref_loss(plus) - ref_loss(minus)) / (2 * h)
    grads = []
    for backend in BACKENDS:
        x = d.clone().requires_grad_(True)
        (solve_power(x, solver, 0.05, 0.8, backend=backend, validate=False) * w_out).sum()\
            .backward()
        grads.append(x.grad)
        np.testing.assert_allclose(x.grad.numpy(), numeric, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Validation at the door
# --------------------------------------------------------------------------------------------


def test_validation_wrong_ndim_and_shape():
    with pytest.raises(ValueError, match=r"shape \(batch, K, K\).*got \(4, 4\)"):
        solve_power(torch.eye(4))
    with pytest.raises(ValueError, match=r"got \(2, 3, 4\)"):
        solve_power(torch.full((2, 3, 4), 0.25))
    with pytest.raises(ValueError, match=r"got \(2, 0, 0\)"):
        solve_power(torch.empty(2, 0, 0))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        solve_power(torch.eye(3, dtype=torch.long)[None])
    with pytest.raises(TypeError, match="torch.Tensor.*ndarray"):
        validate_delegation(np.eye(3)[None])


def test_validation_names_sample_row_and_value():
    d = torch.eye(3, dtype=torch.float64).repeat(4, 1, 1)
    bad = d.clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"delegation\[2, 1, 0\] is nan.*finite"):
        solve_power(bad)
    bad = d.clone()
    bad[3, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"delegation\[3, 2, 2\] is inf"):
        solve_power(bad)
    bad = d.clone()
    bad[1, 0] = torch.tensor([1.25, -0.25, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"delegation\[1, 0, 1\] is -0\.25.*>= 0"):
        solve_power(bad)
    bad = d.clone()
    bad[2, 1] = torch.tensor([0.5, 0.4, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"row 1 of sample 2 sums to 0\.9\b"):
        solve_power(bad)
    # float32 tolerance is looser, float64 is not
    slightly = d.clone()
    slightly[0, 0, 0] += 1e-6
    solve_power(slightly.float())
    with pytest.raises(ValueError, match="row 0 of sample 0"):
        solve_power(slightly)
    # validate=False skips the value checks (the caller vouches for the input)
    assert solve_power(bad, validate=False).shape == (4, 3)


def test_validation_of_parameters():
    d = torch.eye(3)[None]
    with pytest.raises(ValueError, match=r'solver must be one of .*got "sink_two"'):
        solve_power(d, "sink_two")
    with pytest.raises(ValueError, match=r'backend must be one of .*got "cusolver"'):
        solve_power(d, backend="cusolver")
    for eps in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"epsilon must lie in \(0, 1\).*{eps!r}"):
            solve_power(d, "sink_one", epsilon=eps)
        with pytest.raises(ValueError, match="epsilon"):
            solve_power(d, "sink_many", epsilon=eps)
    for pen in (1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match=rf"penalty .* \[0, 1\).*{pen!r}"):
            solve_power(d, "sink_many", penalty=pen)
    # sink_one ties γ to ε and ignores the penalty; uniform ignores both
    assert solve_power(d, "sink_one", penalty=5.0).shape == (1, 3)
    assert solve_power(d, "uniform", epsilon=5.0, penalty=5.0).shape == (1, 3)
    # penalty = 0: no flow beyond the first hop
    np.testing.assert_allclose(powers(chain(3), "sink_many", "lapack", 0.01, 0.0),
                               chain_expected(3, "sink_many", 0.01, 0.0), rtol=1e-13)


# --------------------------------------------------------------------------------------------
# The benchmark script runs (smoke test, no timing assertions)
# --------------------------------------------------------------------------------------------


def test_bench_solvers_quick_prints_its_tables():
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_solvers", "--quick", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "pinv/auto" in out and "auto/bmm" in out
    assert "elimination vs lapack crossover" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("4 ", "8 ")]
    assert {r[0] for r in rows} >= {"4", "8"}
