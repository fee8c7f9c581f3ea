"""Centralized training: a Liquid Ensemble of four quadrant experts learns load_digits.

Each expert sees one 4×4 quadrant of the 8×8 images. The ensemble must reach ≥ 0.85 test
accuracy and beat every quadrant's expert trained alone by a clear margin.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from liquid_fed import LiquidEnsemble, MLPExpert
from liquid_fed.train import evaluate, fit

EPOCHS = 40
TRAIN = {"epochs": EPOCHS, "batch_size": 64, "lr": 3e-3, "optimizer": "adamw",
         "weight_decay": 1e-4, "seed": 0}


def quadrants(images) -> list[torch.Tensor]:
    x = torch.as_tensor(images, dtype=torch.float32)  # (N, 8, 8)
    return [x[:, r : r + 4, c : c + 4] for r in (0, 4) for c in (0, 4)]


def test_liquid_ensemble_learns_digits_from_quadrants():
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    vtr, vte = quadrants(xtr), quadrants(xte)
    ytr, yte = torch.as_tensor(ytr), torch.as_tensor(yte)

    torch.manual_seed(0)
    experts = [MLPExpert((4, 4), 10, 4, i, hidden=(64,)) for i in range(4)]
    ens = LiquidEnsemble(experts, expert_loss_weight=0.5)
    history = fit(ens, vtr, ytr, **TRAIN)
    assert history[-1] < 0.5 * history[0]  # it trained
    metrics = evaluate(ens, vte, yte)
    assert metrics["accuracy"] >= 0.85, metrics

    solo = []
    for q in range(4):
        torch.manual_seed(0)
        alone = LiquidEnsemble([MLPExpert((4, 4), 10, 1, 0, hidden=(64,))])
        fit(alone, [vtr[q]], ytr, **TRAIN)
        solo.append(evaluate(alone, [vte[q]], yte)["accuracy"])
    assert metrics["accuracy"] >= max(solo) + 0.1, (metrics["accuracy"], solo)
    # Powers are a proper distribution of K votes on the test split.
    assert abs(sum(metrics[f"mean_power_{j}"] for j in range(4)) - 4) < 1e-4
