"""Centralized Liquid Ensemble on digits: four experts, each sees one 4×4 quadrant.

Interim main job until the federation lands; prints test accuracy of the Liquid Ensemble, the
uniform vote and every single-quadrant expert.
"""

from __future__ import annotations

import argparse
import logging

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from liquid_fed import LiquidEnsemble, MLPExpert
from liquid_fed.train import evaluate, fit


def quadrants(images):
    x = torch.as_tensor(images, dtype=torch.float32)
    return [x[:, r : r + 4, c : c + 4] for r in (0, 4) for c in (0, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=args.seed,
                                          stratify=y)
    vtr, vte = quadrants(xtr), quadrants(xte)
    ytr, yte = torch.as_tensor(ytr), torch.as_tensor(yte)
    rows = []
    for name, options in [("liquid (sink_one)", {}), ("uniform vote", {"solver": "uniform"})]:
        torch.manual_seed(args.seed)
        experts = [MLPExpert((4, 4), 10, 4, i, hidden=(128,)) for i in range(4)]
        ens = LiquidEnsemble(experts, expert_loss_weight=0.5, **options)
        fit(ens, vtr, ytr, epochs=args.epochs, batch_size=64, lr=3e-3, weight_decay=1e-4,
            optimizer="adamw", seed=args.seed)
        rows.append((name, evaluate(ens, vte, yte)["accuracy"]))
    for q in range(4):
        torch.manual_seed(args.seed)
        solo = LiquidEnsemble([MLPExpert((4, 4), 10, 1, 0, hidden=(128,))])
        fit(solo, [vtr[q]], ytr, epochs=args.epochs, batch_size=64, lr=3e-3, weight_decay=1e-4,
            optimizer="adamw", seed=args.seed)
        rows.append((f"quadrant {q} alone", evaluate(solo, [vte[q]], yte)["accuracy"]))
    print(f"{'model':<22} test accuracy")
    for name, acc in rows:
        print(f"{name:<22} {acc:.3f}")


if __name__ == "__main__":
    main()
