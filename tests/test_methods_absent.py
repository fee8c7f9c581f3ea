"""The study methods under absent parties: the same training absences and test masks for every
method of a seed, plugvfl's party-wise dropout and laser's subset predictors by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from liquid_fed import optim
from liquid_fed.availability import drop_keeping_one, round_presence, stream_rng
from liquid_fed.centralized import build_ensemble, central_data
from liquid_fed.config import build_config
from liquid_fed.errors import ConfigError, ParameterError
from liquid_fed.methods import (
    _PLUG_STREAM,
    Laser,
    MethodContext,
    MethodOptions,
    PlugVFL,
    _fit,
    build_joint,
    run_methods,
)
from liquid_fed.robustness import absent_key, absent_mask, missing_mask, rate_key

DROPOUT = 0.4


def _cfg(dropout: float = DROPOUT, k: int = 3, epochs: int = 2, hidden: int = 4):
    options = {"n_samples": 120, "n_regions": k, "n_groups": k, "features_per_group": 2,
               "n_classes": 3}
    return build_config({
        "seed": 5,
        "data": {"name": "synthetic_regions", "options": options},
        "views": {"kind": "groups", "n_views": k, "options": {}},
        "experts": {"kind": "mlp", "options": {"hidden": [hidden]}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": epochs, "batch_size": 16, "chunk_size": 16, "eval_every": 0},
        "availability": {"dropout": dropout},
    })


def _after_every_step(monkeypatch, hook) -> None:
    """Call ``hook`` after every optimizer step (the toolkit's optimizers share one ``step``)."""
    step = optim.Optimizer.step

    def stepped(self) -> None:
        step(self)
        hook()

    monkeypatch.setattr(optim.Optimizer, "step", stepped)


def _expected_rounds(cfg, n: int) -> list[np.ndarray]:
    """(K,) the parties of every training step: one round per mini-batch (chunk = batch)."""
    steps = cfg.train.epochs * -(-n // cfg.train.batch_size)
    return [round_presence(cfg.availability.dropout, [], cfg.n_clients, s, cfg.seed)
            for s in range(steps)]


@pytest.mark.parametrize("name", ["splitnn", "plugvfl", "laser", "aggvfl", "moe"])
def test_jointly_trained_methods_lose_the_rounds_parties(name: str, monkeypatch) -> None:
    cfg = _cfg()
    data = central_data(cfg)
    n = int(data.targets["train"].shape[0])
    expected = _expected_rounds(cfg, n)
    assert any(not e.all() for e in expected)  # the draw does drop parties
    model = build_joint(name, cfg, data)
    seen: list[Tensor | None] = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(args[1]) if module.training else None)

    def snapshot() -> list[Tensor]:
        return [torch.cat([p.detach().reshape(-1) for p in party.parameters()]).clone()
                for party in model.parties]

    snaps = [snapshot()]
    _after_every_step(monkeypatch, lambda: snaps.append(snapshot()))
    _fit(cfg, model, data.inputs["train"], data.targets["train"], None, rounds=True)
    assert len(seen) == len(expected) == len(snaps) - 1
    for step, (mask, who) in enumerate(zip(seen, expected, strict=True)):
        got = np.ones((1, cfg.n_clients), dtype=bool) if mask is None else mask.numpy()
        assert (got == who[None]).all()  # the round's parties, on every row of the batch
        # an absent party's network and optimizer state are untouched (Adam would move it
        # with its momentum if it got a zero gradient)
        moved = [not torch.equal(a, b) for a, b in zip(snaps[step], snaps[step + 1],
                                                       strict=True)]
        assert moved == who.tolist(), step


def test_the_ensemble_runs_only_the_rounds_parties(monkeypatch) -> None:
    cfg = _cfg()
    data = central_data(cfg)
    n = int(data.targets["train"].shape[0])
    expected = _expected_rounds(cfg, n)
    ens = build_ensemble(cfg, data, solver="uniform")
    steps: list[set[int]] = [set()]
    for j, expert in enumerate(ens.experts):
        expert.register_forward_hook(
            lambda module, args, out, j=j: steps[-1].add(j) if module.training else None)
    _after_every_step(monkeypatch, lambda: steps.append(set()))
    _fit(cfg, ens, data.inputs["train"], data.targets["train"], None, rounds=True)
    assert steps[-1] == set()
    assert steps[:-1] == [set(np.flatnonzero(w).tolist()) for w in expected]


def test_every_method_is_scored_on_the_same_test_masks() -> None:
    cfg = _cfg(dropout=0.0)
    data = central_data(cfg)
    ctx = MethodContext(cfg, data, test_missing=[0.0, 0.3])
    masks = ctx.missing_masks()
    n = int(data.targets["test"].shape[0])
    assert set(masks) == {rate_key(0.3), *(absent_key(j) for j in range(3))}
    assert torch.equal(masks[rate_key(0.3)], missing_mask(n, 3, 0.3, cfg.seed))
    assert torch.equal(masks[absent_key(1)], absent_mask(n, 3, [1]))
    assert (masks[rate_key(0.3)].sum(-1) >= 1).all() and not masks[rate_key(0.3)].all()
    # a pooling variant's context and a fresh one draw the same masks
    twin = ctx.for_config(cfg)
    again = MethodContext(cfg, central_data(cfg), test_missing=[0.3]).missing_masks()
    for key, mask in masks.items():
        assert torch.equal(twin.missing_masks()[key], mask) and torch.equal(again[key], mask)


def test_test_missing_scores_against_an_independent_computation() -> None:
    cfg = _cfg(dropout=0.0, epochs=1)
    data = central_data(cfg)
    results = run_methods(["averaged", "splitnn", "local"], cfg, data, test_missing=[0.5])
    mask = missing_mask(int(data.targets["test"].shape[0]), 3, 0.5, cfg.seed)
    y = data.targets["test"].numpy()
    # splitnn: the trained model with the absent parties' embeddings zero-filled, by hand
    model = results["splitnn"].model
    model.eval()
    with torch.no_grad():
        embeds = [party(x)[0] * mask[:, [k]].to(x.dtype)
                  for k, (party, x) in enumerate(zip(model.parties, data.inputs["test"],
                                                     strict=True))]
        logits = model.top(torch.cat(embeds, -1)).numpy()
    acc = float((logits.argmax(-1) == y).mean())
    assert results["splitnn"].test_missing[rate_key(0.5)]["accuracy"] == pytest.approx(acc)
    # local: the best party by validation, else the best present one
    local = results["local"]
    order = np.argsort([-p["val"]["accuracy"] for p in local.per_party], kind="stable")
    experts = local.model
    with torch.no_grad():
        preds = [experts[k](data.inputs["test"][k])[0].numpy() for k in range(3)]
    m = mask.numpy()
    pick = [next(k for k in order if m[i, k]) for i in range(m.shape[0])]
    acc = float(np.mean([preds[k][i].argmax() == y[i] for i, k in enumerate(pick)]))
    assert local.test_missing[rate_key(0.5)]["accuracy"] == pytest.approx(acc)
    # averaged: the mean of the present experts' logits (ensemble.mix: logits)
    assert cfg.ensemble.mix == "logits"
    stacked = np.stack(preds, 1)  # (n, K, C)
    mean = (stacked * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    acc = float((mean.argmax(-1) == y).mean())
    assert results["averaged"].test_missing[rate_key(0.5)]["accuracy"] == pytest.approx(acc)


class _Given(nn.Module):
    """A party whose embedding is its input (and whose own head outputs zeros)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.scale, torch.zeros(x.shape[0], 3, dtype=x.dtype)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _laser(k: int, h: int = 2, c: int = 3) -> tuple[Laser, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    heads, params = [], []
    for _ in range(k):
        w, b = rng.normal(size=(c, h)), rng.normal(size=c)
        head = nn.Linear(h, c).double()
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(w))
            head.bias.copy_(torch.from_numpy(b))
        heads.append(head)
        params.append((w, b))
    return Laser([_Given() for _ in range(k)], heads, "classification", seed=1), params


def test_laser_predicts_over_the_present_parties_by_hand() -> None:
    model, params = _laser(3)
    xs = [torch.from_numpy(np.random.default_rng(j + 10).normal(size=(2, 2))) for j in range(3)]
    present = torch.tensor([[True, False, True], [False, True, False]])
    model.eval()
    out = model(xs, present)
    h = [x.numpy() for x in xs]
    for b, parties in enumerate([[0, 2], [1]]):
        fused = np.mean([h[j][b] for j in parties], 0)
        probs = [np.exp(_log_softmax(params[i][0] @ fused + params[i][1])) for i in parties]
        expected = np.log(np.mean(probs, 0))
        assert np.allclose(out.output[b].detach().numpy(), expected)
        assert np.allclose(out.gate[b].numpy(), [1 / len(parties) if j in parties else 0
                                                 for j in range(3)])


def test_laser_training_objective_by_hand_with_two_parties() -> None:
    """Two parties: the subsets are fixed (each alone, then both), so the objective is
    L_0({0}) + L_1({1}) + (L_0({0,1}) + L_1({0,1})) / 2; with party 1 absent, L_0({0})."""
    model, params = _laser(2)
    xs = [torch.from_numpy(np.random.default_rng(j + 20).normal(size=(2, 2))) for j in range(2)]
    y = torch.tensor([2, 0])
    present = torch.tensor([[True, True], [True, False]])
    model.train()
    loss = model.loss(model(xs, present), y)
    h = [x.numpy() for x in xs]

    def nll(i: int, emb: np.ndarray, target: int) -> float:
        w, b = params[i]
        return -_log_softmax(w @ emb + b)[target]

    both = (h[0][0] + h[1][0]) / 2
    first = (nll(0, h[0][0], 2) + nll(1, h[1][0], 2)
             + (nll(0, both, 2) + nll(1, both, 2)) / 2)
    second = nll(0, h[0][1], 0)
    assert float(loss.detach()) == pytest.approx((first + second) / 2)


def test_laser_draws_weigh_every_subset_once() -> None:
    """The weights C(n-1, s-1)/s summed over the n heads and sizes count the 2^n - 1
    subsets of the n present parties (the draws estimate a sum over all of them)."""
    model, _ = _laser(4)
    xs = [torch.ones(5, 2, dtype=torch.float64) for _ in range(4)]
    present = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0],
                            [1, 1, 0, 1]], dtype=torch.bool)
    model.train()
    out = model(xs, present)
    n = present.sum(-1).double()
    assert torch.allclose(out.subset_weights.sum(-1), 2 ** n - 1)
    # an absent party's predictor never enters
    w = out.subset_weights.reshape(5, 4, 4)
    assert (w[~present] == 0).all()


def test_plugvfl_zeroes_exactly_the_drawn_parties_embeddings() -> None:
    cfg = _cfg(dropout=0.0)
    data = central_data(cfg)
    model = build_joint("plugvfl", cfg, data, MethodOptions(party_dropout=0.5))
    assert isinstance(model, PlugVFL)
    xs = [x[:12] for x in data.inputs["train"]]
    held = np.ones((12, 3), dtype=bool)
    held[0, 1] = held[3, 0] = False
    seen: list[Tensor] = []
    model.top.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model.steps = 7
    model.train()
    model(xs, torch.from_numpy(held))
    keep = drop_keeping_one(stream_rng(cfg.seed, _PLUG_STREAM, 7), held, 0.5)
    assert (keep & ~held).sum() == 0 and (keep.sum(-1) >= 1).all()
    assert (keep != held).any()  # some present embeddings were dropped
    with torch.no_grad():
        embeds = [party(x)[0] for party, x in zip(model.parties, xs, strict=True)]
    expected = torch.cat([e * torch.from_numpy(keep[:, [k]]).to(e.dtype)
                          for k, e in enumerate(embeds)], -1)
    assert torch.equal(seen[0], expected)
    assert model.steps == 8
    # at test: no dropout, only the given absences (zero-filled)
    model.eval()
    with torch.no_grad():
        model(xs, torch.from_numpy(held))
    expected = torch.cat([e * torch.from_numpy(held[:, [k]]).to(e.dtype)
                          for k, e in enumerate(embeds)], -1)
    assert torch.equal(seen[1], expected)


def test_bad_absence_options_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"method_options.party_dropout: got 1.5"):
        MethodOptions.from_dict({"party_dropout": 1.5})
    cfg = _cfg(dropout=0.0)
    data = central_data(cfg)
    with pytest.raises(ParameterError, match="missing_rate must lie in"):
        MethodContext(cfg, data, test_missing=[1.0])
    uneven = build_config({**cfg.to_dict(), "experts": {"kind": "mlp", "options": {},
                                                       "per_client": [
                                                           {"options": {"hidden": [4]}},
                                                           {"options": {"hidden": [5]}},
                                                           {"options": {"hidden": [4]}}]}})
    with pytest.raises(ConfigError, match=r"laser averages .* widths are \[4, 5, 4\]"):
        build_joint("laser", uneven, central_data(uneven))
