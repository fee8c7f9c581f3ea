"""A client's expert and optimizer as flat numpy arrays and back (no pickling).

What Flower's ``Context.state`` and the checkpoints hold: parameters as ``model/<name>``,
optimizer tensors as ``optimizer/<param>/<name>``, the optimizer's param groups and scalars as
JSON text in ``optimizer/groups``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from liquid_fed.optim import Optimizer

Arrays = dict[str, np.ndarray]


OPT_GROUPS = "optimizer/groups"


def state_to_arrays(module: torch.nn.Module, optimizer: Optimizer) -> Arrays:
    """Expert parameters and optimizer state as flat numpy arrays (no pickling).

    Tensors of the optimizer state become ``optimizer/<param>/<name>`` arrays; its param
    groups and non-tensor entries travel as JSON text in ``optimizer/groups``.
    """
    arrays = {f"model/{k}": v.detach().cpu().numpy().copy()
              for k, v in module.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for idx, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                arrays[f"optimizer/{idx}/{name}"] = value.detach().cpu().numpy().copy()
            else:
                scalars[f"{idx}/{name}"] = value
    text = json.dumps({"groups": opt["param_groups"], "scalars": scalars})
    arrays[OPT_GROUPS] = np.frombuffer(text.encode(), dtype=np.uint8).copy()
    return arrays


def arrays_to_state(arrays: Arrays, module: torch.nn.Module,
                    optimizer: Optimizer) -> None:
    """Load what :func:`state_to_arrays` wrote."""
    module.load_state_dict({k[6:]: torch.from_numpy(np.array(v)) for k, v in arrays.items()
                            if k.startswith("model/")})
    meta = json.loads(arrays[OPT_GROUPS].tobytes().decode())
    state: dict[int, dict[str, Any]] = {}
    for key, value in arrays.items():
        if key.startswith("optimizer/") and key != OPT_GROUPS:
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = torch.from_numpy(np.array(value))
    for key, value in meta["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["groups"]})
