"""Parties absent at prediction time: the combination, the masks, the summary, ``evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_protocol import EXACT  # one step per chunk, float64

from liquid_fed import cli
from liquid_fed.centralized import build_ensemble, central_data, train_ensemble
from liquid_fed.config import build_config
from liquid_fed.ensemble import LiquidConfig, LiquidEnsemble, with_smoothing
from liquid_fed.errors import ParameterError, RunFolderError
from liquid_fed.federation import LocalTransport
from liquid_fed.metrics import evaluate_output
from liquid_fed.robustness import (
    ABSENT_MAX_PARTIES,
    MISSING_RATES,
    absent_mask,
    evaluate_run,
    missing_mask,
    robustness,
    score,
)
from liquid_fed.rundir import Checkpoint, prepare, save_checkpoint
from liquid_fed.runs import run_federated
from liquid_fed.train import predict

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


# --------------------------------------------------------------------------------------------
# The combination against a hand computation and against the library's ``present`` path
# --------------------------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_absent_party_matches_hand_computation(lam: float) -> None:
    """K = 3, party 1 absent: expert 0 keeps its vote, expert 2 delegates all to 0.

    Party 1's row becomes uniform over the present others, [1/2, 0, 1/2]; nobody delegates
    to 1, so f1 = 1, f2 = 1 + γ/2, f0 = 1 + γ (f1/2 + f2); sink_one gives
    p0 = (1-ε) f0 + ε Σf / 3 and p1 = p2 = ε Σf / 3; p1 is zeroed and the rest rescaled to 3.
    """
    eps = 0.1
    gamma = 1 - eps
    f1 = 1.0
    f2 = 1 + gamma * f1 / 2
    f0 = 1 + gamma * (f1 / 2 + f2)
    total = f0 + f1 + f2
    p0, p2 = (1 - eps) * f0 + eps * total / 3, eps * total / 3
    power = np.array([3 * p0 / (p0 + p2), 0.0, 3 * p2 / (p0 + p2)])
    vote = (1 - lam) * power + lam * np.array([1.5, 0.0, 1.5])  # uniform over {0, 2}
    y = np.array([[2.0, -1.0], [-3.0, 4.0], [0.5, 1.5]])  # (K, C) logits
    hand = _log_softmax((vote[:, None] / 3 * y).sum(0))  # mix: logits

    preds = torch.tensor(y[None], dtype=torch.float64)  # (1, 3, 2)
    # Party 1's own delegation is arbitrary: absent, it must not matter.
    dels = torch.tensor([[[1.0, 0.0, 0.0], [0.1, 0.2, 0.7], [1.0, 0.0, 0.0]]],
                        dtype=torch.float64)
    config = LiquidConfig(epsilon=eps, mix="logits")
    for label in (0, 1):
        metrics = score(preds, dels, torch.tensor([label]), config, lam,
                        absent_mask(1, 3, [1]))
        assert metrics["nll"] == pytest.approx(-hand[label], abs=1e-12)
        assert metrics["accuracy"] == float(int(np.argmax(hand)) == label)
        assert metrics["mean_power_1"] == 0.0
        assert metrics["mean_power_0"] == pytest.approx(power[0], abs=1e-12)
        assert metrics["present_fraction"] == pytest.approx(2 / 3)


def _numpy_combine(y: np.ndarray, d: np.ndarray, present: np.ndarray, eps: float,
                   lam: float) -> np.ndarray:
    """An independent sink_one + probs pooling, one sample at a time (log-probabilities)."""
    b, k, _ = y.shape
    out = []
    for i in range(b):
        w = d[i].copy()
        for j in range(k):
            if not present[i, j]:  # absent: uniform over the present others
                others = present[i] & (np.arange(k) != j)
                w[j] = others / others.sum()
        s = np.diag(w).copy()
        o = w - np.diag(s)
        f = np.linalg.solve(np.eye(k) - (1 - eps) * o.T, np.ones(k))
        p = (1 - eps) * s * f + eps / k * f.sum()
        p = p * present[i]
        p = k * p / p.sum()
        vote = (1 - lam) * p + lam * k * present[i] / present[i].sum()
        prob = np.exp(_log_softmax(y[i]))  # (K, C)
        out.append(np.log((vote[:, None] / k * prob).sum(0)))
    return np.stack(out)


def test_missing_rate_matches_numpy_reference() -> None:
    rng = np.random.default_rng(3)
    b, k, c = 40, 3, 4
    y = rng.normal(size=(b, k, c))
    d = rng.dirichlet(np.ones(k), size=(b, k))
    target = rng.integers(0, c, size=b)
    config = LiquidConfig(epsilon=0.05, mix="probs")
    mask = missing_mask(b, k, 0.5, seed=11)
    assert 0 < int((~mask).sum()) and bool(mask.any(-1).all())
    ref = _numpy_combine(y, d, mask.numpy(), 0.05, 0.25)
    got = score(torch.from_numpy(y), torch.from_numpy(d), torch.from_numpy(target), config,
                0.25, mask)
    assert got["nll"] == pytest.approx(-ref[np.arange(b), target].mean(), abs=1e-12)
    assert got["accuracy"] == pytest.approx((ref.argmax(-1) == target).mean(), abs=1e-15)


class _Expert(torch.nn.Module):
    """A linear expert with a softmax delegation (the test's own, so the paths are plain)."""

    def __init__(self, d_in: int, c: int, k: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.pred = torch.nn.Linear(d_in, c).double()
        self.dele = torch.nn.Linear(d_in, k).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pred(x), torch.softmax(self.dele(x), -1)


@pytest.mark.parametrize("mix", ["probs", "logits", "sum"])
def test_one_forward_then_combine_equals_the_ensemble_run_with_present(mix: str) -> None:
    """The summary's shortcut (run the experts once, combine per case) is what the ensemble
    gives when it is called with the same ``present`` mask."""
    k, c, b = 3, 5, 64
    torch.manual_seed(0)
    xs = [torch.randn(b, 4, dtype=torch.float64) for _ in range(k)]
    target = torch.randint(0, c, (b,))
    ens = LiquidEnsemble([_Expert(4, c, k, s) for s in range(k)],
                         LiquidConfig(mix=mix, smoothing=0.0), batched=False)
    with torch.no_grad():
        full = ens(xs)
    lam = 0.25
    report = robustness(full.predictions, full.delegation, target, ens.config, lam, seed=5)
    n_params = None
    cases = {f"absent/{j}": absent_mask(b, k, [j]) for j in range(k)}
    cases.update({f"missing_rate/{p}": missing_mask(b, k, p, 5) for p in MISSING_RATES})
    for name, mask in cases.items():
        with torch.no_grad():
            out = with_smoothing(ens(xs, mask), ens.config, lam)
        want = evaluate_output(out, target, "classification", n_params)
        kind, key = name.split("/")
        got = report[kind][key]
        for metric in ("accuracy", "nll", "power_entropy", "mean_power_0", "mean_power_2"):
            assert got[metric] == pytest.approx(want[metric], abs=1e-12), (name, metric)


def test_samples_no_present_party_holds_are_left_out() -> None:
    """Party 0 absent on top of the data's own absence: a sample only party 0 holds has no
    prediction; the case scores the other samples, as if they were the whole split."""
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.normal(size=(5, 3, 4)))
    d = torch.from_numpy(rng.dirichlet(np.ones(3), size=(5, 3)))
    target = torch.tensor([0, 1, 2, 3, 0])
    base = torch.ones(5, 3, dtype=torch.bool)
    base[1, 1:] = False  # sample 1: party 0 only
    config = LiquidConfig()
    got = score(y, d, target, config, 0.1, absent_mask(5, 3, [0], base))
    rows = [0, 2, 3, 4]
    want = score(y[rows], d[rows], target[rows], config, 0.1, absent_mask(4, 3, [0]))
    assert got["scored_fraction"] == pytest.approx(0.8)
    assert want["scored_fraction"] == 1.0
    for metric in ("accuracy", "nll", "loss", "mean_power_1"):
        assert got[metric] == pytest.approx(want[metric], abs=1e-12)
    assert got["present_fraction"] == pytest.approx(8 / 15)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate,k", [(0.1, 4), (0.5, 3), (0.9, 2)])
def test_missing_mask_rate_and_one_party_kept(rate: float, k: int) -> None:
    n = 200_000
    mask = missing_mask(n, k, rate, seed=0)
    assert mask.shape == (n, k) and mask.dtype == torch.bool
    assert bool(mask.any(-1).all())
    # Each entry is dropped with probability rate, except the one kept when all are dropped.
    expected = rate - rate**k / k
    std = math.sqrt(expected * (1 - expected) / (n * k))
    assert float((~mask).double().mean()) == pytest.approx(expected, abs=6 * std)
    # Every party is equally likely to be the one kept (by symmetry, rescued or not).
    lone = mask[mask.sum(-1) == 1].double()
    spread = 6 * math.sqrt((1 / k) * (1 - 1 / k) / lone.shape[0])
    assert lone.mean(0).numpy() == pytest.approx(np.full(k, 1 / k), abs=spread)


def test_missing_mask_is_seeded_and_respects_the_data() -> None:
    a = missing_mask(500, 4, 0.3, seed=7)
    assert torch.equal(a, missing_mask(500, 4, 0.3, seed=7))
    assert not torch.equal(a, missing_mask(500, 4, 0.3, seed=8))
    assert torch.equal(missing_mask(50, 4, 0.0, seed=1), torch.ones(50, 4, dtype=torch.bool))
    base = torch.rand(500, 4, generator=torch.Generator().manual_seed(1)) < 0.6
    base[base.sum(-1) == 0, 0] = True
    masked = missing_mask(500, 4, 0.7, seed=7, base=base)
    assert not bool((masked & ~base).any())  # absent in the data stays absent
    assert bool(masked.any(-1).all())


def test_mask_errors() -> None:
    with pytest.raises(ParameterError, match=r"party 3 does not exist; the run has 3"):
        absent_mask(4, 3, [3])
    with pytest.raises(ParameterError, match=r"party -1 does not exist"):
        absent_mask(4, 3, [-1])
    with pytest.raises(ParameterError, match=r"leaves no party"):
        absent_mask(4, 3, [0, 1, 2])
    held = torch.tensor([[True, True], [True, False]])
    assert absent_mask(2, 2, [0], base=held).tolist() == [[False, True], [False, False]]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ParameterError, match=r"missing_rate must lie in \[0, 1\)"):
            missing_mask(4, 3, bad, seed=0)


@pytest.mark.parametrize("k", [ABSENT_MAX_PARTIES, ABSENT_MAX_PARTIES + 1])
def test_each_party_absent_is_scored_up_to_the_cap(k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    b, c = 5, 3
    predictions = torch.randn(b, k, c, generator=gen)
    delegation = torch.softmax(torch.randn(b, k, k, generator=gen), -1)
    target = torch.randint(0, c, (b,), generator=gen)
    cfg = LiquidConfig(task="classification", smoothing=0.0)
    rob = robustness(predictions, delegation, target, cfg, 0.0, seed=1, missing_rates=[0.5])
    assert sorted(rob["absent"], key=int) == ([str(j) for j in range(k)]
                                              if k <= ABSENT_MAX_PARTIES else [])
    assert list(rob["missing_rate"]) == ["0.5"]  # the missing rates are scored at any K


# --------------------------------------------------------------------------------------------
# Runs: the summary, federated == centralized, and ``evaluate``
# --------------------------------------------------------------------------------------------


def _assert_same(got: dict, want: dict, tol: float) -> None:
    for metric in ("accuracy", "nll", "loss", "present_fraction", "scored_fraction",
                   "smoothing"):
        assert got[metric] == pytest.approx(want[metric], abs=tol), metric


def _assert_cases_match_summary(cases: list, summary: dict, k: int, tol: float) -> None:
    labels = [c.label for c in cases]
    assert labels == ["all present", *[f"absent {j}" for j in range(k)],
                      *[f"missing {p:g}" for p in MISSING_RATES]]
    first = cases[0].metrics  # the run's own test metrics (the data's own absence only)
    _assert_same(first, summary["test"] | {key: first[key] for key in ("present_fraction",
                                                                        "scored_fraction")}, tol)
    assert first["scored_fraction"] == 1.0
    rob = summary["robustness"]
    assert sorted(rob["absent"]) == [str(j) for j in range(k)]
    assert list(rob["missing_rate"]) == ["0.1", "0.3", "0.5"]
    for j in range(k):
        _assert_same(cases[1 + j].metrics, rob["absent"][str(j)], tol)
    for i, p in enumerate(MISSING_RATES):
        _assert_same(cases[1 + k + i].metrics, rob["missing_rate"][str(p)], tol)


def test_federated_summary_matches_centralized_and_evaluate(tmp_path: Path) -> None:
    cfg = build_config(EXACT, ["views.missing=0.2"])
    run = tmp_path / "fed"
    prepare(cfg, run)
    summary = run_federated(cfg, LocalTransport(cfg.n_clients), run)
    data = central_data(cfg)
    central = train_ensemble(cfg, data, build_ensemble(cfg, data), robust=True)
    for kind in ("absent", "missing_rate"):
        assert summary["robustness"][kind].keys() == central["robustness"][kind].keys()
        for key, metrics in summary["robustness"][kind].items():
            _assert_same(metrics, central["robustness"][kind][key], 1e-9)
    # The data's own absence (views.missing) stays: every case has less than 3/4 present.
    absent = summary["robustness"]["absent"]
    assert all(absent[str(j)]["present_fraction"] < 0.75 for j in range(cfg.n_clients))
    # Some samples only the absent party holds: they are left out of that case.
    assert min(absent[str(j)]["scored_fraction"] for j in range(cfg.n_clients)) < 1.0
    k = cfg.n_clients
    cases = evaluate_run(run, [[j] for j in range(k)], list(MISSING_RATES))
    _assert_cases_match_summary(cases, json.loads((run / "summary.json").read_text()), k, 1e-9)


def test_evaluate_smoothing_cases_pool_by_hand(tmp_path: Path) -> None:
    """``evaluate --smoothing``: every party present, powers p' = (1 - λ) p + λ, pooled as
    ``mix: logits`` by hand (numpy) from the same experts trained in process."""
    cfg = build_config(EXACT, ["ensemble.mix=logits", "ensemble.smoothing=auto"])
    run = tmp_path / "fed"
    prepare(cfg, run)
    summary = run_federated(cfg, LocalTransport(cfg.n_clients), run)
    data = central_data(cfg)
    ensemble = build_ensemble(cfg, data)
    train_ensemble(cfg, data, ensemble)  # the same experts (federated == centralized)
    out = predict(ensemble, data.inputs["test"])
    logits = out.predictions.numpy()  # (B, K, C)
    power = out.power.numpy()  # (B, K), Σ = K
    labels = data.targets["test"].numpy()
    lambdas = [0.0, 0.25, 1.0]
    cases = evaluate_run(run, smoothings=lambdas)
    assert [c.label for c in cases] == ["all present", "smoothing 0", "smoothing 0.25",
                                        "smoothing 1"]
    assert cases[0].metrics["smoothing"] == summary["test"]["smoothing"]
    k = cfg.n_clients
    for lam, case in zip(lambdas, cases[1:], strict=True):
        votes = (1 - lam) * power + lam  # the uniform vote over K present experts is 1 each
        pooled = (votes[:, :, None] * logits).sum(1) / k
        shifted = pooled - pooled.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        assert case.metrics["smoothing"] == lam
        assert case.metrics["accuracy"] == pytest.approx(
            float((pooled.argmax(1) == labels).mean()), abs=1e-12)
        assert case.metrics["nll"] == pytest.approx(
            float(-log_probs[np.arange(len(labels)), labels].mean()), abs=1e-7)
    with pytest.raises(ParameterError, match=r"smoothing must lie in \[0, 1\], got 1.5"):
        evaluate_run(run, smoothings=[1.5])


def test_evaluate_centralized_quickstart_run(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "central"
    assert cli.main(["centralized", str(QUICKSTART), "--set", "train.epochs=1", "--out",
                     str(run), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    cases = evaluate_run(run, [[0], [1], [2], [3]], [0.1, 0.3, 0.5])
    _assert_cases_match_summary(cases, summary, 4, 1e-6)
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--absent", "1", "2", "--missing-rate", "0.3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["case", "accuracy", "nll", "present", "scored"]
    assert table[2].split()[:2] == ["all", "present"]
    assert float(table[2].split()[2]) == pytest.approx(summary["test"]["accuracy"], abs=5e-5)
    assert table[3].split()[:3] == ["absent", "1", "2"]
    assert [float(v) for v in table[3].split()[-2:]] == pytest.approx([0.5, 1.0], abs=5e-4)
    missing = summary["robustness"]["missing_rate"]["0.3"]
    assert table[4].split()[:2] == ["missing", "0.3"]
    assert float(table[4].split()[2]) == pytest.approx(missing["accuracy"], abs=5e-5)
    assert float(table[4].split()[3]) == pytest.approx(missing["nll"], abs=5e-5)


@pytest.mark.parametrize("argv,message", [
    (["--absent", "4"], "absent: party 4 does not exist; the run has 4 parties (0 to 3)"),
    (["--absent", "0", "1", "2", "3"], "leaves no party to predict"),
    (["--missing-rate", "1"], "missing_rate must lie in [0, 1), got 1.0"),
    (["--missing-rate", "-0.2"], "missing_rate must lie in [0, 1), got -0.2"),
])
def test_evaluate_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                             message: str) -> None:
    run = tmp_path / "run"
    cfg = build_config(EXACT, ["train.epochs=1"])
    prepare(cfg, run)
    (run / "summary.json").write_text("{}")  # refused before the checkpoint is looked at
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("liquid-fed: error: ") and message in err[0]


def test_evaluate_refuses_unfinished_folders(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "is not a finished run" in capsys.readouterr().err
    with pytest.raises(RunFolderError, match="is not a finished run"):
        evaluate_run(tmp_path)
    run = tmp_path / "ran"
    prepare(build_config(EXACT), run)
    (run / "summary.json").write_text("{}")
    with pytest.raises(RunFolderError, match="no complete checkpoint"):
        evaluate_run(run)
    # A deployment whose parties keep their own checkpoints: the folder has no experts.
    save_checkpoint(run, Checkpoint(3, {"history": []}))
    with pytest.raises(RunFolderError, match="holds no experts' states"):
        evaluate_run(run)
