"""Delegation patterns under different kinds of partial observability, side by side.

Runs ``configs/regions.yaml`` once per region visibility (every view sees the region exactly:
``shared``; through noise: ``noisy``; not at all: ``none``), optionally with the uniform vote as
a baseline, each into its own run folder; then prints a table and writes the comparison figure.

    python -m simulations.compare_observability [--out runs/observability] [--epochs N]
        [--seed S] [--uniform] [--engine local|ray] [--force | --reuse]

``--engine local`` (default) runs the exact federated protocol in this process
(:class:`liquid_fed.federation.LocalTransport`); ``--engine ray`` runs each setting through
``liquid-fed run`` (Flower's simulation engine on Ray) in a child process.
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from liquid_fed.config import ConfigError, RunConfig, config_from_yaml_text, load_config
from liquid_fed.data.synthetic import VISIBILITIES
from liquid_fed.plots import delegation_summary, load_run, plot_comparison, plot_run
from liquid_fed.rundir import RunDir

log = logging.getLogger("simulations.compare_observability")

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "regions.yaml"


@dataclass(frozen=True)
class Setting:
    """One run of the sweep: its folder name and its overrides of the config."""

    name: str
    overrides: tuple[str, ...]


def settings(uniform: bool) -> list[Setting]:
    """One setting per region visibility, plus the uniform vote (shared) when asked."""
    out = [Setting(v, (f"data.options.region_visibility={v}",)) for v in VISIBILITIES]
    if uniform:
        out.append(Setting("uniform-shared", ("data.options.region_visibility=shared",
                                              "ensemble.solver=uniform")))
    return out


def _overrides(setting: Setting, args: argparse.Namespace) -> list[str]:
    extra = [f"name={setting.name}", *setting.overrides]
    if not args.baselines:  # centralized references: not needed for the table, and slow
        extra += ["baselines.uniform=false", "baselines.independent=false"]
    if args.epochs is not None:
        extra.append(f"train.epochs={args.epochs}")
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    return extra


def _finished(run_dir: Path, cfg: RunConfig) -> bool:
    """The folder holds a complete run of exactly this config."""
    saved = run_dir / "config.yaml"
    if not ((run_dir / "summary.json").is_file() and (run_dir / "test_outputs.npz").is_file()
            and saved.is_file()):
        return False
    return config_from_yaml_text(saved.read_text()).to_dict() == cfg.to_dict()


def run_local(cfg: RunConfig, run_dir: Path, force: bool) -> None:
    """The federated protocol in this process, writing the same run folder as ``run``."""
    from liquid_fed.federation import LocalTransport
    from liquid_fed.runs import prepare_folder, run_federated

    prepare_folder(cfg, run_dir, resume=False, force=force)
    run_federated(cfg, LocalTransport(cfg.n_clients), run_dir)


def run_ray(overrides: list[str], run_dir: Path, force: bool) -> None:
    """``liquid-fed run`` (Flower on Ray) in a child process."""
    cmd = [sys.executable, "-m", "simulations.cli", "run", str(CONFIG), "--out", str(run_dir),
           "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    if force:
        cmd.append("--force")
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"liquid-fed run failed (exit {rc}) for {run_dir}")


def table_row(run_dir: Path) -> dict[str, float | str]:
    """The table's numbers for one finished run folder."""
    run = load_run(run_dir)
    s = delegation_summary(run.arrays["delegation"], run.arrays["power"], run.informative)
    metric = run.metric
    return {
        "setting": run.name,
        "solver": str(run.config.get("ensemble", {}).get("solver", "?")),
        "metric": metric[0] if metric else "?",
        "test": metric[1] if metric else math.nan,
        "informative_top_power": (math.nan if s.informative_top_power is None
                                  else s.informative_top_power),
        "power_entropy": s.power_entropy,
        "speaker_entropy": s.speaker_entropy,
        "self_delegation": s.mean_self_delegation,
        "to_informative": math.nan if s.to_informative is None else s.to_informative,
    }


def format_table(rows: list[dict[str, float | str]]) -> str:
    """Rows as an aligned text table."""
    metric = rows[0]["metric"] if rows else "accuracy"
    head = (f"{'setting':<16} {'solver':<9} {'test ' + str(metric):>13} "
            f"{'informative_top':>15} {'power_H':>8} {'speaker_H':>9} {'self_del':>8} "
            f"{'to_inf':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['setting']:<16} {r['solver']:<9} {r['test']:>13.4f} "
                     f"{r['informative_top_power']:>15.3f} {r['power_entropy']:>8.3f} "
                     f"{r['speaker_entropy']:>9.3f} {r['self_delegation']:>8.3f} "
                     f"{r['to_informative']:>7.3f}")
    lines.append("informative_top: share of samples whose most powerful expert is the "
                 "informative one (ties go to expert 0)")
    lines.append("power_H: mean entropy of p/K; speaker_H: entropy of the most powerful "
                 f"expert's histogram (nats; ln 4 = {math.log(4):.3f} is the maximum for K=4)")
    lines.append("self_del: mean share an expert keeps; to_inf: mean share an expert hands "
                 "to the sample's informative expert")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/observability", help="folder of the run folders")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--uniform", action="store_true",
                        help="add the uniform vote (shared visibility) as a baseline")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: in-process protocol (fast); ray: liquid-fed run")
    parser.add_argument("--baselines", action="store_true",
                        help="also compute the config's centralized references per run")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help="overwrite finished runs")
    group.add_argument("--reuse", action="store_true",
                       help="keep finished runs of the same config; run only the others")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("liquid_fed.federation", "liquid_fed.runs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    run_dirs = []
    try:
        for setting in settings(args.uniform):
            overrides = _overrides(setting, args)
            cfg = load_config(CONFIG, overrides)
            run_dir = out / setting.name
            run_dirs.append(run_dir)
            if args.reuse and _finished(run_dir, cfg):
                log.info("%s: reusing the finished run in %s", setting.name, run_dir)
                continue
            log.info("%s: %d epochs (%s engine) -> %s", setting.name, cfg.train.epochs,
                     args.engine, run_dir)
            t0 = time.perf_counter()
            if args.engine == "local":
                run_local(cfg, run_dir, args.force)
            else:
                run_ray(overrides, run_dir, args.force)
            log.info("%s: done in %.1f s", setting.name, time.perf_counter() - t0)
        for run_dir in run_dirs:
            plot_run(run_dir)
        rows = [table_row(d) for d in run_dirs]
        figure = plot_comparison(run_dirs, out / "comparison.png")
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        hint = ""
        if type(exc).__name__ == "RunFolderError":
            hint = " (here: --force overwrites, --reuse keeps finished runs of the same config)"
        print(f"compare_observability: error: {exc}{hint}", file=sys.stderr)
        return 2
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
             for r in rows]
    RunDir(out).write_json("table.json", clean)
    print(format_table(rows))
    print(f"comparison figure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
