"""liquid_fed.optim against torch.optim: the same bits step after step, the same state dicts
both ways, and no torch._dynamo import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from liquid_fed import optim
from liquid_fed.federation.state import arrays_to_state, state_to_arrays
from liquid_fed.train import make_optimizer

#: (config name, keyword arguments, the torch.optim twin).
CASES = [
    ("sgd", {"lr": 0.05}, torch.optim.SGD),
    ("sgd", {"lr": 0.05, "momentum": 0.9}, torch.optim.SGD),
    ("sgd", {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3}, torch.optim.SGD),
    ("adam", {"lr": 1e-2}, torch.optim.Adam),
    ("adam", {"lr": 1e-2, "weight_decay": 1e-2}, torch.optim.Adam),
    ("adamw", {"lr": 1e-2, "weight_decay": 1e-2}, torch.optim.AdamW),
    ("adamw", {"lr": 3e-3}, torch.optim.AdamW),
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for name, kw, _ in CASES]


def _model(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),
                               ).to(dtype)


def _loss(model: torch.nn.Module, step: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 7, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (32,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def _train(model: torch.nn.Module, opt, steps: range, dtype: torch.dtype,
           frozen: int | None = None) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, step, dtype)
        loss.backward()
        if frozen is not None:  # a parameter without a gradient this step is left alone
            list(model.parameters())[frozen].grad = None
        opt.step()
        losses.append(loss.item())
    return losses


def _kwargs(name: str, kw: dict) -> dict:
    return {"lr": kw["lr"], "weight_decay": kw.get("weight_decay", 0.0),
            **({"momentum": kw.get("momentum", 0.0)} if name == "sgd" else {})}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "kw", "twin"), CASES, ids=IDS)
def test_steps_equal_torch_optim_bit_for_bit(name, kw, twin, dtype):
    ours, theirs = _model(0, dtype), _model(0, dtype)
    opt = make_optimizer(name, ours.parameters(), **_kwargs(name, kw))
    assert isinstance(opt, optim.Optimizer)
    ref = twin(theirs.parameters(), **_kwargs(name, kw))
    # The first steps with one parameter frozen: it gets its state later, as in torch.
    for steps, frozen in ((range(0, 5), 2), (range(5, 60), None)):
        assert _train(ours, opt, steps, dtype, frozen) == _train(theirs, ref, steps, dtype,
                                                                 frozen)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert a.dtype == dtype and torch.equal(a, b)
    mine, torchs = opt.state_dict(), ref.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for idx, entries in torchs["state"].items():
        assert mine["state"][idx].keys() == entries.keys()
        for key, value in entries.items():
            assert value.dtype == mine["state"][idx][key].dtype, key
            assert torch.equal(mine["state"][idx][key], value), (idx, key)


@pytest.mark.parametrize(("name", "kw", "twin"), CASES, ids=IDS)
def test_state_dicts_load_both_ways_and_through_a_checkpoint(name, kw, twin):
    dtype = torch.float32
    ours, theirs = _model(1, dtype), _model(1, dtype)
    opt = make_optimizer(name, ours.parameters(), **_kwargs(name, kw))
    ref = twin(theirs.parameters(), **_kwargs(name, kw))
    _train(ours, opt, range(10), dtype)
    _train(theirs, ref, range(10), dtype)
    # torch's state (an older checkpoint) into ours, ours into torch's, ours through the
    # arrays a checkpoint holds: each pair then trains on step for step.
    pairs = []
    for source_model, source_opt, make in (
            (theirs, ref, lambda m: make_optimizer(name, m.parameters(), **_kwargs(name, kw))),
            (ours, opt, lambda m: twin(m.parameters(), **_kwargs(name, kw)))):
        model = _model(2, dtype)
        model.load_state_dict(source_model.state_dict())
        loaded = make(model)
        loaded.load_state_dict(source_opt.state_dict())
        pairs.append((model, loaded))
    model = _model(3, dtype)
    restored = make_optimizer(name, model.parameters(), lr=99.0)  # the state brings lr back
    arrays_to_state(state_to_arrays(ours, opt), model, restored)
    pairs.append((model, restored))
    expected = _train(theirs, ref, range(10, 30), dtype)
    for model, loaded in pairs:
        assert _train(model, loaded, range(10, 30), dtype) == expected
        for a, b in zip(model.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_state_for_another_variant_or_other_parameters_is_refused():
    model = _model(0, torch.float32)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    amsgrad = torch.optim.Adam(_model(0, torch.float32).parameters(), lr=1e-3, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True: Adam here implements False only"):
        opt.load_state_dict(amsgrad.state_dict())
    fewer = torch.optim.Adam(list(_model(0, torch.float32).parameters())[:2], lr=1e-3)
    with pytest.raises(ValueError, match=r"\[2\] saved, \[4\] here"):
        opt.load_state_dict(fewer.state_dict())
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)


def test_training_with_them_imports_no_torch_dynamo():
    code = ("import sys, torch\n"
            "from liquid_fed.train import make_optimizer\n"
            "m = torch.nn.Linear(3, 2)\n"
            "for name in ('sgd', 'adam', 'adamw'):\n"
            "    opt = make_optimizer(name, m.parameters(), lr=0.1, momentum=0.0)\n"
            "    m(torch.ones(4, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "    opt.load_state_dict(opt.state_dict())\n"
            "print('torch._dynamo' in sys.modules)\n"
            "torch.optim.SGD(m.parameters(), lr=0.1)\n"  # the check itself can fail
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "True"]
