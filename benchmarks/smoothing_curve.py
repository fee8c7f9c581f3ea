"""The Liquid Ensemble against the uniform vote over many seeds, at every power smoothing λ.

    python -m benchmarks.smoothing_curve CONFIG.yaml [--seeds 0-19] [--set key=value ...]

For each seed, trains the Liquid Ensemble (the config's solver) and the uniform vote
(``ensemble.solver=uniform``) centrally, as a study cell does, and scores the Liquid Ensemble's
trained experts at every ``λ`` of ``ensemble.smoothing_grid`` on the validation and the test
split. It then prints, for the shipped pick (``smoothing: auto``: best validation accuracy,
ties to the smallest ``λ``), for other ways of picking and for every fixed ``λ``: the mean test
accuracy and the paired difference to the uniform vote (mean over seeds, 95 % interval, seeds
won and lost). The ensemble trains with the config's smoothing (``auto`` trains with ``λ = 0``;
``--set ensemble.smoothing=0.5`` trains with 0.5, and the rows then say what each pick would
give after that training).
"oracle" picks each seed's best ``λ`` on the *test* split: not a method, the most any pick of
``λ`` could gain. Classification only. Everything it prints comes from the runs it makes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import numpy as np
import torch

from liquid_fed.centralized import build_ensemble, central_data, train_ensemble
from liquid_fed.config import load_config
from liquid_fed.ensemble import pick_smoothing, task_loss, with_smoothing
from liquid_fed.errors import LiquidFedError
from liquid_fed.metrics import headline_score
from liquid_fed.train import predict


def _seeds(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def curves(config: str, overrides: list[str], seed: int) -> dict[str, np.ndarray | float]:
    """One seed: the Liquid Ensemble's accuracy and NLL at every λ (val, test), the grid, and
    the uniform vote's test accuracy."""
    cfg = load_config(config, overrides + [f"seed={seed}"])
    data = central_data(cfg)
    if data.server.task != "classification":
        raise LiquidFedError(f"smoothing_curve scores accuracy: the task of {config} is "
                             f"{data.server.task}")
    ens = build_ensemble(cfg, data)
    train_ensemble(cfg, data, ens)
    outs = {split: predict(ens, data.inputs[split], present=data.present[split])
            for split in ("val", "test")}
    # The shipped pick is the library's own (what `smoothing: auto` evaluates with).
    pick = pick_smoothing(outs["val"], data.targets["val"], ens.config)
    out: dict[str, np.ndarray | float] = {"grid": np.array(pick.grid),
                                          "shipped": pick.grid.index(pick.value)}
    for split, pooled in outs.items():
        target = data.targets[split]
        each = [with_smoothing(pooled, ens.config, lam) for lam in pick.grid]
        out[f"{split}_acc"] = np.array([headline_score(o, target, "classification")
                                        for o in each])
        out[f"{split}_nll"] = np.array([float(task_loss(o.output, target, "classification"))
                                        for o in each])
    uni_cfg = load_config(config, overrides + [f"seed={seed}", "ensemble.solver=uniform"])
    uni = build_ensemble(uni_cfg, data)
    out["uniform"] = float(train_ensemble(uni_cfg, data, uni)["test"]["accuracy"])
    return out


def _first_best(scores: np.ndarray) -> int:
    return int(np.argmax(scores))


#: Ways of picking λ from one seed's curves (index into the grid).
PICKS = {
    "shipped: val accuracy, ties to smallest λ": lambda c: c["shipped"],
    "val accuracy, ties to largest λ": lambda c: len(c["val_acc"]) - 1
    - _first_best(c["val_acc"][::-1]),
    "val accuracy, ties by val NLL": lambda c: min(
        np.flatnonzero(c["val_acc"] == c["val_acc"].max()), key=lambda i: c["val_nll"][i]),
    "val NLL": lambda c: int(np.argmin(c["val_nll"])),
    "oracle: best test accuracy (not a method)": lambda c: _first_best(c["test_acc"]),
}


def table(runs: list[dict]) -> list[tuple[str, float, float, float, int, int]]:
    """(name, mean test accuracy, mean paired difference to uniform, 95 % half-width, seeds
    won, seeds lost) for each pick and each fixed λ."""
    uniform = np.array([r["uniform"] for r in runs])
    rows = []
    choices = dict(PICKS)
    for i, lam in enumerate(runs[0]["grid"]):
        choices[f"fixed λ = {lam:g}"] = lambda c, i=i: i
    for name, pick in choices.items():
        acc = np.array([r["test_acc"][pick(r)] for r in runs])
        diff = acc - uniform
        half = (1.96 * diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.nan
        rows.append((name, float(acc.mean()), float(diff.mean()), half,
                     int((diff > 0).sum()), int((diff < 0).sum())))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", default="0-19", help="a seed or a range LOW-HIGH (0-19)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    seeds = _seeds(args.seeds)
    try:
        runs = []
        for seed in seeds:
            runs.append(curves(args.config, args.overrides, seed))
            print(f"seed {seed}: uniform {runs[-1]['uniform']:.4f}, LE test accuracy by λ "
                  f"{np.round(runs[-1]['test_acc'], 4).tolist()}", file=sys.stderr, flush=True)
    except LiquidFedError as exc:
        print(f"smoothing_curve: error: {exc}", file=sys.stderr)
        return 2
    uniform = np.mean([r["uniform"] for r in runs])
    print(f"{args.config} {' '.join(args.overrides)}: {len(seeds)} seeds "
          f"({seeds[0]}-{seeds[-1]}); uniform vote test accuracy {uniform:.4f}")
    print(f"{'λ for the Liquid Ensemble':44s} {'test acc':>8s} {'LE - uniform':>18s} "
          f"{'won':>4s} {'lost':>4s}")
    for name, acc, diff, half, won, lost in table(runs):
        print(f"{name:44s} {acc:8.4f} {diff:+8.4f} ± {half:.4f} {won:4d} {lost:4d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
