"""SGD, Adam and AdamW for the experts, without ``torch.optim``.

The arithmetic is ``torch.optim``'s single-tensor path (the one torch takes for CPU tensors),
operation for operation, so a step gives the same bits (``tests/test_optim.py`` checks it
against ``torch.optim`` over many steps, with and without weight decay and momentum, in float32
and float64); :meth:`Optimizer.state_dict` and :meth:`Optimizer.load_state_dict` use
``torch.optim``'s format, so checkpoints written before load unchanged.

Why not ``torch.optim`` itself: every one of its optimizers imports ``torch._dynamo`` when it is
built or stepped (its ``add_param_group``, ``zero_grad`` and ``step`` wrappers do), about 0.9 s
of CPU for a module the experts never use. Every process that trains pays it once: each client
actor of a simulation, each ClientApp worker of a deployment (a stock deployment: each
message), each study worker. Only what the toolkit configures is implemented: SGD with
momentum and L2 weight decay; Adam with L2 weight decay; AdamW with decoupled weight decay;
default betas and epsilon (``amsgrad``, ``nesterov``, ``maximize``, dampening: not offered).
On CUDA, ``torch.optim`` would take its multi-tensor path, equal up to rounding; this one
takes the single-tensor path everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

#: Hyper-parameters a loaded state may carry, and the only values this module implements.
_FIXED = {"amsgrad": False, "maximize": False, "nesterov": False, "dampening": 0,
          "capturable": False, "differentiable": False}


class Optimizer:
    """One parameter group, ``torch.optim``'s ``param_groups``/``state`` layout; ``defaults``
    are the group's hyper-parameters (each subclass's, in ``torch.optim``'s names)."""

    def __init__(self, params: Iterable[Tensor], defaults: dict[str, Any]) -> None:
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups: list[dict[str, Any]] = [{**defaults, "params": params}]
        self.state: dict[Tensor, dict[str, Any]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state.setdefault(p, {}), group)

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s layout: state by parameter index, groups with index lists."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` (or the same ``torch.optim`` class) wrote.

        Raises:
            ValueError: the groups do not match this optimizer's parameters, or ask for a
                variant this module does not implement.
        """
        saved = state_dict["param_groups"]
        if [len(s["params"]) for s in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded optimizer state does not match the parameters: "
                             f"{[len(s['params']) for s in saved]} saved, "
                             f"{[len(g['params']) for g in self.param_groups]} here")
        params: dict[int, Tensor] = {}
        for s, group in zip(saved, self.param_groups, strict=True):
            for key, value in s.items():
                if key in _FIXED and value != _FIXED[key]:
                    raise ValueError(f"loaded optimizer state has {key}={value!r}: "
                                     f"{type(self).__name__} here implements {_FIXED[key]!r} only")
            group.update({k: v for k, v in s.items() if k != "params"})
            params.update(zip(s["params"], group["params"], strict=True))
        self.state = {}
        for idx, entries in state_dict["state"].items():
            p = params[int(idx)]
            self.state[p] = {name: _to_param(p, name, value) for name, value in entries.items()}


def _to_param(p: Tensor, name: str, value: Any) -> Any:
    """A loaded state entry on ``p``'s device: moment buffers also in its dtype; Adam's step
    count stays as saved (torch keeps it a CPU scalar)."""
    if not isinstance(value, Tensor):
        return value
    if name == "step":
        return value.detach().clone()
    return value.detach().to(device=p.device, dtype=p.dtype).clone()


class SGD(Optimizer):
    """``torch.optim.SGD`` (momentum, L2 weight decay; no dampening or Nesterov)."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": 0,
                                  "weight_decay": weight_decay, "nesterov": False,
                                  "maximize": False, "foreach": None, "differentiable": False,
                                  "fused": None})

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(group["momentum"]).add_(grad)
            grad = buf
        p.add_(grad, alpha=-group["lr"])


class Adam(Optimizer):
    """``torch.optim.Adam``: L2 weight decay added to the gradient (``decoupled=False``), or
    AdamW's decoupled decay (``decoupled=True``)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, weight_decay: float = 0.0,
                 decoupled: bool = False) -> None:
        super().__init__(params, {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8,
                                  "weight_decay": weight_decay, "amsgrad": False,
                                  "maximize": False, "foreach": None, "capturable": False,
                                  "differentiable": False, "fused": None,
                                  "decoupled_weight_decay": decoupled})

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        if not state:
            dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=dtype)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        decay = group["weight_decay"]
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        if decay != 0:
            if group["decoupled_weight_decay"]:
                p.mul_(1 - lr * decay)
            else:
                grad = grad.add(p, alpha=decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, decoupled=True)
