"""The study methods: each training path against a hand-written or independent computation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from liquid_fed.centralized import baselines, build_ensemble, central_data, train_ensemble
from liquid_fed.config import build_config
from liquid_fed.ensemble import LiquidEnsemble
from liquid_fed.errors import ConfigError
from liquid_fed.experts import build_expert
from liquid_fed.methods import (
    METHODS,
    MethodOptions,
    PartyNet,
    build_joint,
    run_method,
    run_methods,
)
from liquid_fed.train import batch_order


def _cfg(task: str = "classification", missing: float = 0.0, hidden: list[int] | None = None,
         epochs: int = 2, batch: int = 16, optim: dict | None = None, n: int = 90,
         classes: int = 3, kind: str = "groups", dtype: str = "float64"):
    options = {"n_samples": n, "n_regions": 2, "n_groups": 2, "features_per_group": 3,
               "task": task, "n_classes": classes}
    return build_config({
        "seed": 3,
        "data": {"name": "synthetic_regions", "options": options},
        "views": {"kind": kind, "n_views": 2, "options": {}, "missing": missing},
        "experts": {"kind": "mlp", "options": {"hidden": [] if hidden is None else hidden}},
        "optim": optim or {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        "train": {"epochs": epochs, "batch_size": batch, "chunk_size": max(batch, 64),
                  "dtype": dtype},
    })


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def _mask(data, split: str) -> np.ndarray:
    m = data.present[split]
    n = data.targets[split].shape[0]
    return np.ones((n, len(data.views)), dtype=bool) if m is None else m.numpy()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _output_grad(out: np.ndarray, y: np.ndarray, task: str) -> np.ndarray:
    """d(mean loss)/d(output): softmax - onehot over B, or 2 (out - y) / (B C)."""
    b = out.shape[0]
    if task == "classification":
        g = _softmax(out)
        g[np.arange(b), y] -= 1.0
        return g / b
    return 2.0 * (out - y.reshape(out.shape)) / out.size


def _sgd_linear_parties(xs, y, mask, params, task, cfg):
    """Hand-written SGD (momentum, weight decay) for logits = Σ_k m_k (X_k W_kᵀ + b_k)."""
    o = cfg.optim
    bufs = [[None, None] for _ in params]
    n = y.shape[0]
    for epoch in range(cfg.train.epochs):
        for rows in batch_order(n, cfg.train.batch_size, epoch, cfg.seed):
            m = mask[rows].astype(np.float64)
            out = sum(m[:, [k]] * (x[rows] @ w.T + b) for k, (x, (w, b)) in
                      enumerate(zip(xs, params, strict=True)))
            g = _output_grad(out, y[rows], task)
            for k, (x, (w, b)) in enumerate(zip(xs, params, strict=True)):
                gk = g * m[:, [k]]
                for j, (p, grad) in enumerate(((w, gk.T @ x[rows]), (b, gk.sum(0)))):
                    grad = grad + o.weight_decay * p
                    bufs[k][j] = grad if bufs[k][j] is None else o.momentum * bufs[k][j] + grad
                    p -= o.lr * bufs[k][j]
    return params


@pytest.mark.parametrize("task,missing", [("classification", 0.0), ("classification", 0.3),
                                          ("regression", 0.0)])
def test_aggvfl_equals_hand_written_linear_model(task: str, missing: float) -> None:
    cfg = _cfg(task, missing, epochs=3)
    data = central_data(cfg)
    init = build_joint("aggvfl", cfg, data)
    params = [(_np(p.expert.head.weight), _np(p.expert.head.bias)) for p in init.parties]
    result = run_method("aggvfl", cfg, data)
    xs = [_np(x) for x in data.inputs["train"]]
    expect = _sgd_linear_parties(xs, data.targets["train"].numpy(), _mask(data, "train"),
                                 params, task, cfg)
    assert len(result.epoch_losses) == 3
    for party, before, (w, b) in zip(result.model.parties, init.parties, expect, strict=True):
        np.testing.assert_allclose(_np(party.expert.head.weight), w, rtol=0, atol=1e-10)
        np.testing.assert_allclose(_np(party.expert.head.bias), b, rtol=0, atol=1e-10)
        assert not np.allclose(w, _np(before.expert.head.weight))  # it did train
        # the delegation head is never used, so never moves (no gradient, no decay)
        np.testing.assert_array_equal(_np(party.expert.delegate.linear.weight),
                                      _np(before.expert.delegate.linear.weight))


def test_central_equals_hand_written_softmax_regression() -> None:
    cfg = _cfg(epochs=2, missing=0.2)
    data = central_data(cfg)
    init = build_joint("central", cfg, data)
    head = init.parties[0].expert.head
    x = np.concatenate([_np(x) for x in data.inputs["train"]], 1)
    assert head.weight.shape == (3, x.shape[1])  # one linear model on all 2 x 5 features
    (w, b), = _sgd_linear_parties([x], data.targets["train"].numpy(),
                                  np.ones((x.shape[0], 1), dtype=bool),
                                  [(_np(head.weight), _np(head.bias))], "classification", cfg)
    trained = run_method("central", cfg, data).model.parties[0].expert.head
    np.testing.assert_allclose(_np(trained.weight), w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(_np(trained.bias), b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("missing", [0.0, 0.25])
def test_splitnn_first_step_is_the_hand_computed_gradient_step(missing: float) -> None:
    cfg = _cfg(missing=missing, hidden=[3], epochs=1, batch=256,
               optim={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.05})
    data = central_data(cfg)
    opts = MethodOptions(top_hidden=[4])
    init = build_joint("splitnn", cfg, data, opts)
    n = data.targets["train"].shape[0]
    assert n <= cfg.train.batch_size  # one full-batch step
    xs, y, m = [_np(x) for x in data.inputs["train"]], data.targets["train"].numpy(), \
        _mask(data, "train").astype(np.float64)
    trunks = [(_np(p.expert.trunk[1].weight), _np(p.expert.trunk[1].bias)) for p in init.parties]
    t1w, t1b = _np(init.top[0].weight), _np(init.top[0].bias)
    t2w, t2b = _np(init.top[2].weight), _np(init.top[2].bias)
    # forward
    pre = [x @ w.T + b for x, (w, b) in zip(xs, trunks, strict=True)]
    hs = [np.maximum(a, 0) * m[:, [k]] for k, a in enumerate(pre)]
    z = np.concatenate(hs, 1)
    u_pre = z @ t1w.T + t1b
    u = np.maximum(u_pre, 0)
    g = _output_grad(u @ t2w.T + t2b, y, "classification")
    # backward
    grads = {"t2w": g.T @ u, "t2b": g.sum(0)}
    du = (g @ t2w) * (u_pre > 0)
    grads.update({"t1w": du.T @ z, "t1b": du.sum(0)})
    dz = du @ t1w
    lr, wd = cfg.optim.lr, cfg.optim.weight_decay
    step = {name: p - lr * (grads[name] + wd * p) for name, p in
            {"t1w": t1w, "t1b": t1b, "t2w": t2w, "t2b": t2b}.items()}

    result = run_method("splitnn", cfg, data, MethodOptions(top_hidden=[4]))
    top = result.model.top
    for name, p in {"t1w": top[0].weight, "t1b": top[0].bias, "t2w": top[2].weight,
                    "t2b": top[2].bias}.items():
        np.testing.assert_allclose(_np(p), step[name], rtol=0, atol=1e-10, err_msg=name)
    for k, (party, (w, b)) in enumerate(zip(result.model.parties, trunks, strict=True)):
        dh = dz[:, 3 * k:3 * k + 3] * m[:, [k]] * (pre[k] > 0)
        np.testing.assert_allclose(_np(party.expert.trunk[1].weight),
                                   w - lr * (dh.T @ xs[k] + wd * w), rtol=0, atol=1e-10)
        np.testing.assert_allclose(_np(party.expert.trunk[1].bias),
                                   b - lr * (dh.sum(0) + wd * b), rtol=0, atol=1e-10)
        # the expert's own heads are not part of split learning
        np.testing.assert_array_equal(_np(party.expert.head.weight),
                                      _np(init.parties[k].expert.head.weight))


@pytest.mark.parametrize("task,missing", [("classification", 0.0), ("classification", 0.3),
                                          ("regression", 0.3)])
def test_moe_with_a_constant_gate_equals_the_uniform_vote(task: str, missing: float) -> None:
    """Output and expert gradients equal those of a Liquid Ensemble with ``solver=uniform``."""
    cfg = _cfg(task, missing, hidden=[5])
    data = central_data(cfg)
    model = build_joint("moe", cfg, data)
    with torch.no_grad():
        for p in model.gate.parameters():
            p.zero_()
    # moe mixes probabilities: the vote it equals pools the same way
    vote = LiquidEnsemble([p.expert for p in model.parties],
                          dataclasses.replace(cfg.ensemble, task=task, mix="probs"),
                          batched=False,
                          solver="uniform", expert_loss_weight=0.0)
    xs, y, present = data.inputs["train"], data.targets["train"], data.present["train"]
    if missing:
        assert present is not None and not bool(present.all())
    grads = []
    for forward in (lambda: model(xs, present), lambda: vote(xs, present)):
        model.zero_grad()
        out = forward()
        loss = model.loss(out, y) if hasattr(out, "gate") else vote.loss(out, y)
        loss.backward()
        grads.append((_np(out.output), [_np(p.grad) for p in model.parties.parameters()
                                        if p.grad is not None]))
    (out_moe, g_moe), (out_vote, g_vote) = grads
    np.testing.assert_allclose(out_moe, out_vote, rtol=0, atol=1e-12)
    assert len(g_moe) == len(g_vote) == 8  # trunk and head of both parties
    for a, b in zip(g_moe, g_vote, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("missing", [0.0, 0.4])
def test_oracle_predicts_with_the_informative_expert(missing: float) -> None:
    cfg = _cfg(missing=missing, hidden=[4], epochs=3)
    data = central_data(cfg)
    result = run_method("oracle", cfg, data)
    experts = result.model
    inf = data.server.informative_of(data.server.splits.test)
    present = _mask(data, "test")
    with torch.no_grad():
        probs = np.stack([_softmax(_np(e(x)[0])) for e, x in
                          zip(experts, data.inputs["test"], strict=True)], 1)  # (n, K, C)
    rows = np.arange(len(inf))
    held = present[rows, inf]
    fallback = (probs * present[..., None]).sum(1) / present.sum(1, keepdims=True)
    expect = np.log(np.where(held[:, None], probs[rows, inf], fallback))
    np.testing.assert_allclose(result.arrays["output"], expect, rtol=0, atol=1e-12)
    assert held.all() == (missing == 0.0)
    np.testing.assert_allclose(result.arrays["power"][held],
                               2 * np.eye(2)[inf[held]], rtol=0, atol=0)
    accuracy = float((expect.argmax(1) == data.targets["test"].numpy()).mean())
    assert result.test["accuracy"] == pytest.approx(accuracy, abs=1e-12)


def test_oracle_without_ground_truth_is_a_clear_error_before_training() -> None:
    cfg = _cfg(kind="blocks")
    data = central_data(cfg)
    match = r'method "oracle" needs the ground truth.*views.kind "blocks"'
    with pytest.raises(ConfigError, match=match):
        run_method("oracle", cfg, data)
    trained: list[str] = []
    original = METHODS["liquid"]
    METHODS["liquid"] = lambda ctx: trained.append("liquid")  # would record any training
    try:
        with pytest.raises(ConfigError, match=match):
            run_methods(["liquid", "oracle"], cfg, data)
    finally:
        METHODS["liquid"] = original
    assert trained == []


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_averaged_and_local_match_the_existing_baselines(task: str) -> None:
    """With every view complete, the same experts as ``centralized.baselines`` train."""
    cfg = _cfg(task, hidden=[6], epochs=3)
    data = central_data(cfg)
    old = baselines(cfg, data)
    new = run_methods(["averaged", "local"], cfg, data)
    key = "accuracy" if task == "classification" else "rmse"
    assert new["averaged"].test[key] == pytest.approx(old["averaged"], abs=1e-9)
    singles = [p["test"][key] for p in new["local"].per_party]
    np.testing.assert_allclose(singles, old["single"], rtol=0, atol=1e-9)
    vals = [p["val"][key] for p in new["local"].per_party]
    best = int(np.argmax(vals) if task == "classification" else np.argmin(vals))
    assert new["local"].test[key] == singles[best]
    assert new["local"].test["best_party"] == best
    # shared experts: averaged and local report the same training
    assert new["averaged"].model is not None
    assert all(a is b for a, b in zip(new["averaged"].model, new["local"].model, strict=True))


def test_liquid_and_uniform_are_the_centralized_ensembles() -> None:
    cfg = _cfg(hidden=[6], epochs=2, missing=0.2)
    data = central_data(cfg)
    for name, overrides in (("liquid", {}), ("uniform", {"solver": "uniform"})):
        result = run_method(name, cfg, data)
        ref = train_ensemble(cfg, data, build_ensemble(cfg, data, **overrides))
        assert result.test["accuracy"] == ref["test"]["accuracy"]
        assert result.test["loss"] == pytest.approx(ref["test"]["loss"], abs=1e-12)
        assert result.epoch_losses == pytest.approx(ref["epoch_losses"], abs=1e-12)
        n = data.targets["test"].shape[0]
        assert result.arrays["power"].shape == (n, 2)
        assert result.arrays["delegation"].shape == (n, 2, 2)
        assert result.arrays["error"].shape == (n,)
        assert sum(result.party_weight) == pytest.approx(1.0)


@pytest.mark.parametrize("task,missing", [("classification", 0.0), ("classification", 0.3),
                                          ("regression", 0.0), ("regression", 0.3)])
def test_every_method_learns_a_tiny_task(task: str, missing: float) -> None:
    cfg = _cfg(task, missing, hidden=[16], epochs=10, batch=32, n=600, classes=2,
               optim={"name": "adamw", "lr": 0.01, "momentum": 0.0, "weight_decay": 1e-4},
               dtype="float32")
    data = central_data(cfg)
    results = run_methods(list(METHODS), cfg, data)
    assert list(results) == list(METHODS)
    y = data.targets["test"].numpy()
    n = len(y)
    for name, r in results.items():
        assert r.method == name
        if task == "classification":
            majority = np.bincount(y).max() / n
            assert r.test["accuracy"] >= majority + 0.1, (name, r.test)
            assert math.isfinite(r.test["nll"]) and math.isfinite(r.val["nll"])
        else:
            assert r.test["rmse"] <= 0.85 * y.std(), (name, r.test["rmse"], y.std())
            assert r.test["mse"] == pytest.approx(r.test["rmse"] ** 2)
        assert math.isfinite(r.test["loss"]) and r.train_seconds > 0
        assert r.arrays["error"].shape == r.arrays["ids"].shape == (n,)
        assert r.arrays["output"].shape[0] == n
        if r.party_weight is not None:
            assert sum(r.party_weight) == pytest.approx(1.0, abs=1e-6)
            assert len(r.party_weight) == 2
    assert len(results["local"].per_party) == 2
    gate = results["moe"].arrays["gate"]
    np.testing.assert_allclose(gate.sum(1), 1.0, atol=1e-6)
    if missing:  # an absent party gets no say
        present = _mask(data, "test")
        assert np.all(gate[~present] == 0)
        assert np.all(results["liquid"].arrays["power"][~present] == 0)


def test_party_net_reads_the_trunk_of_every_expert_kind() -> None:
    torch.manual_seed(0)
    cases = [("mlp", (6,), {"hidden": [5]}), ("cnn", (4, 4), {"channels": [3]}),
             ("esn", (5, 2), {"units": 7}), ("ltc", (3, 2), {"units": 4})]
    for kind, shape, options in cases:
        expert = build_expert(kind, shape, 3, 2, 0, **options)
        x = torch.randn(4, *shape)
        h, pred = PartyNet(expert)(x)
        assert h.shape == (4, expert.head.in_features), kind
        torch.testing.assert_close(pred, expert(x)[0])
        torch.testing.assert_close(expert.head(h), pred)


def test_bad_method_names_and_options_name_the_key() -> None:
    cfg = _cfg()
    data = central_data(cfg)
    with pytest.raises(ConfigError, match=r'unknown method "split"; accepted: liquid'):
        run_methods(["liquid", "split"], cfg, data)
    with pytest.raises(ConfigError, match=r'unknown key "method_options.top"'):
        run_method("splitnn", cfg, data, {"top": [3]})
    with pytest.raises(ConfigError, match=r"method_options.gate_hidden: got \[0\]"):
        MethodOptions.from_dict({"gate_hidden": [0]})
    assert MethodOptions.from_dict({"top_hidden": [8, 4]}).top_hidden == [8, 4]
