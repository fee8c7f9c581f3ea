"""Label leakage against accuracy as the defence on the returned gradients grows.

    python -m benchmarks.privacy_tradeoff [--config configs/quickstart.yaml] [--clip 4]
        [--noise 0 0.01 0.025 0.05 0.1 0.25] [--set key=value ...]

Trains the config's federation once per noise level (``privacy.clip`` fixed, ``privacy.noise``
swept) with the protocol's own server and client code in one process (what ``liquid-fed run``
runs through Flower and Ray, without them) and prints one table: the share of training labels
the most successful client recovers from everything it was sent by the strongest attack of
:mod:`liquid_fed.privacy` (and which attack that was), what the attack on the latest gradient
alone recovers (the figure reported before the attacks accumulated), the chance level, the
label-DP ε of one client at δ = 1e-5 over every round a sample was sent ("none" where no
guarantee holds), and the test metric. A first row with no clipping and no noise is the
undefended protocol.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from liquid_fed.config import load_config
from liquid_fed.federation import Federation, LocalTransport
from liquid_fed.metrics import primary_metric
from liquid_fed.privacy import DELTA

ROOT = Path(__file__).resolve().parent.parent


def measure(config: str | Path, overrides: list[str]) -> dict[str, float]:
    """One federation: label leakage, chance, the test metric and the seconds it took."""
    cfg = load_config(config, [*overrides, "baselines.uniform=false",
                               "baselines.independent=false"])
    torch.set_num_threads(cfg.server.threads)  # tiny experts: threads only add overhead
    t0 = time.perf_counter()
    result = Federation(cfg, LocalTransport(cfg.n_clients)).run()
    metric = primary_metric(result.test)
    leak = result.label_leakage
    return {"leakage": leak["max"], "attack": leak["best_attack"],
            "latest": leak["attacks"]["latest"]["max"], "chance": leak["chance"],
            "epsilon": leak["guarantee"]["epsilon"], "metric": metric,
            "score": result.test[metric], "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy_tradeoff",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--clip", type=float, default=4.0,
                        help="privacy.clip of the defended rows (default 4)")
    parser.add_argument("--noise", type=float, nargs="+",
                        default=[0.0, 0.01, 0.025, 0.05, 0.1, 0.25],
                        help="privacy.noise levels (default 0 0.01 0.025 0.05 0.1 0.25)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = [("none", 0.0, 0.0)] + [(f"{args.clip:g}", args.clip, n) for n in args.noise]
    print(f"{'clip':>6} {'noise':>6} {'label leakage':>14} {'best attack':>15} "
          f"{'latest only':>12} {'chance':>7} {'epsilon':>9} {'test':>9} {'seconds':>8}")
    for label, clip, noise in settings:
        row = measure(args.config, [*args.set, f"privacy.clip={clip}",
                                    f"privacy.noise={noise}"])
        eps = "none" if row["epsilon"] is None else f"{row['epsilon']:.4g}"
        print(f"{label:>6} {noise:>6g} {row['leakage']:>14.3f} {row['attack']:>15} "
              f"{row['latest']:>12.3f} {row['chance']:>7.3f} {eps:>9} {row['score']:>9.4f} "
              f"{row['seconds']:>8.1f}", flush=True)
    print(f"(test metric: {row['metric']}; label leakage: share of training labels the most "
          "successful client recovers by the strongest attack on all it received; latest "
          "only: by the latest gradient alone; chance: the majority class share; epsilon: "
          f"label-DP of one client at delta {DELTA:g}, 'none' where no guarantee holds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
