"""Every study method on one run config, side by side, and the observability of its views.

    python -m benchmarks.methods_table CONFIG.yaml [--set key=value ...]
        [--methods liquid,splitnn,...] [--top-hidden 64] [--gate-hidden ...]

Trains each method of :data:`liquid_fed.methods.METHODS` centrally on the run's data, views,
splits and batches (``oracle`` only where the data has ground truth), then prints one row per
method: test and validation score, NLL or MSE, training seconds and the mean share of the say
per party, followed by each view's linear-probe score, importance share and the inter-party
correlation. Seconds are wall time on this machine (indicative on a shared one).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from liquid_fed.centralized import central_data
from liquid_fed.config import load_config
from liquid_fed.data.probe import view_observability, view_summary
from liquid_fed.errors import LiquidFedError
from liquid_fed.federation import load_data, make_plan
from liquid_fed.methods import METHODS, MethodOptions, run_methods
from liquid_fed.metrics import TASK_METRICS


def _widths(text: str | None) -> list[int] | None:
    return None if text is None else [int(w) for w in text.split(",") if w.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--methods", help="comma-separated (default: all that apply)")
    parser.add_argument("--top-hidden", help="splitnn top widths, comma-separated")
    parser.add_argument("--gate-hidden", help="moe gate widths, comma-separated ('' = linear)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        data = central_data(cfg)
        names = args.methods.split(",") if args.methods else [
            m for m in METHODS if m != "oracle" or data.server.informative is not None]
        options = {k: v for k, v in (("top_hidden", _widths(args.top_hidden)),
                                     ("gate_hidden", _widths(args.gate_hidden))) if v is not None}
        t0 = time.perf_counter()
        results = run_methods(names, cfg, data, MethodOptions.from_dict(options))
        total = time.perf_counter() - t0
        ds = load_data(cfg)
        plan = make_plan(cfg, ds)
        probes = view_summary(ds, plan, data.server.splits, cfg.seed)
        obs = view_observability(ds, plan, data.server.splits, cfg.seed)
    except LiquidFedError as exc:
        print(f"methods_table: error: {exc}", file=sys.stderr)
        return 2
    metric = TASK_METRICS[data.server.task]
    loss = "nll" if metric == "accuracy" else "mse"
    print(f"{cfg.name} (seed {cfg.seed}, {cfg.train.epochs} epochs, {cfg.n_clients} parties)")
    print(f"{'method':<10} {'test ' + metric:>13} {'val ' + metric:>12} {'test ' + loss:>9} "
          f"{'seconds':>8}  share of the say per party")
    for name, r in results.items():
        share = "" if r.party_weight is None else " ".join(f"{w:.2f}" for w in r.party_weight)
        if name == "local":
            each = " ".join(f"{p['test'][metric]:.3f}" for p in r.per_party)
            share = f"best: party {int(r.test['best_party'])}; each: {each}"
        print(f"{name:<10} {r.test[metric]:>13.4f} {r.val[metric]:>12.4f} {r.test[loss]:>9.4f} "
              f"{r.train_seconds:>8.2f}  {share}")
    print(f"all methods: {total:.1f} s")
    print(f"{'view':<6} {'probe':>7} {'importance':>11}")
    for k in range(cfg.n_clients):
        print(f"{k:<6} {probes[k]['score']:>7.3f} {obs['importance_share'][k]:>11.3f}")
    print(f"{'all':<6} {probes[-1]['score']:>7.3f}")
    print(f"Icor {obs['icor']:.3f} (inter-party {obs['inter_correlation']:.3f}, "
          f"inner {obs['inner_correlation']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
