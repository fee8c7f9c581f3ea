"""``liquid-fed``: run, check and compare federated Liquid Ensembles from one YAML config.

    liquid-fed run CONFIG.yaml [--set key=value ...] [--out DIR] [--resume] [--force]
    liquid-fed centralized CONFIG.yaml [--set key=value ...] [--out DIR] [--force]
    liquid-fed validate CONFIG.yaml [--set key=value ...]
    liquid-fed plot RUN_DIR [RUN_DIR ...] [--out DIR]
    liquid-fed compare STUDY.yaml [--out DIR] [--workers N] [--resume] [--set key=value ...]
    liquid-fed split CONFIG.yaml --out DIR [--set key=value ...]
    liquid-fed keys DIR --nodes N [--host ADDRESS ...] [--days D]
    liquid-fed deploy-local [CONFIG.yaml] [--set key=value ...] [--keys DIR | --insecure] ...
    liquid-fed server-host CONFIG.yaml --keys DIR --data-dir DIR [--host H] [--port P] ...
    liquid-fed party-host --superlink H:P --keys DIR --data-dir DIR --partition-id K ...

``run`` starts Flower's simulation engine on Ray in a child process that leads its own
session (:mod:`simulations.simulate`); whatever happens (success, error, Ctrl-C, SIGTERM,
SIGHUP), every process of that session and every Ray process of the run is gone when the
command returns, and a launcher killed outright takes its child down with it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from liquid_fed import rundir
from liquid_fed.config import RunConfig, load_config
from liquid_fed.errors import LiquidFedError
from liquid_fed.metrics import primary_metric
from liquid_fed.rundir import RunLock
from simulations.progress import Progress

log = logging.getLogger("liquid_fed.cli")

# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(args.config, args.set or [])
    from liquid_fed.runs import check_run

    check_run(cfg)
    return cfg


def _run_dir(cfg: RunConfig, out: str | None) -> Path:
    return Path(out) if out else Path(cfg.out) / cfg.name


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_centralized(args: argparse.Namespace) -> int:
    import torch

    from liquid_fed.centralized import build_ensemble, central_data, train_ensemble

    cfg = _config(args)
    torch.set_num_threads(cfg.server.threads)
    run_dir = Path(args.out) if args.out else Path(cfg.out) / f"{cfg.name}-centralized"
    with RunLock(run_dir).acquire(f"liquid-fed centralized {args.config}"):
        run = rundir.prepare(cfg, run_dir, resume=False, force=args.force)
        data = central_data(cfg)
        ensemble = build_ensemble(cfg, data)
        bar = Progress(cfg.train.epochs, "centralized", not args.quiet)
        t0 = time.perf_counter()

        def on_epoch(epoch: int, loss: float) -> None:
            bar.bar.set_postfix({"loss": f"{loss:.4f}",
                                 "elapsed": f"{time.perf_counter() - t0:.1f}s"}, refresh=False)
            bar.bar.update(1)

        result = train_ensemble(cfg, data, ensemble, on_epoch=on_epoch)
        bar.close()
        run.write_summary({"name": cfg.name, "mode": "centralized", **result})
    metric = primary_metric(result["test"])
    print(f"centralized {cfg.name}: test {metric} {result['test'][metric]:.4f} "
          f"({result['wall_seconds']:.1f} s) -> {run_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from simulations.simulate import launch

    cfg = _config(args)
    run_dir = _run_dir(cfg, args.out)
    with RunLock(run_dir).acquire(f"liquid-fed run {args.config}") as lock:
        run = rundir.prepare(cfg, run_dir, args.resume, args.force)
        result = launch(cfg, run_dir, args.resume, args.stop_after, args.quiet, lock.fd)
        if result.signal_name is not None:
            print(f"the last checkpoint in {run_dir} is intact; continue with --resume",
                  file=sys.stderr)
            return result.returncode
        if result.returncode != 0:
            print(f"liquid-fed run failed (exit {result.returncode}); see the messages above",
                  file=sys.stderr)
            return result.returncode
        if not run.finished:  # stopped early on purpose
            print(f"stopped after round {args.stop_after}; checkpoint in {run_dir}/checkpoints")
            return 0
        summary = run.update_summary(peak_memory_bytes=result.peak_memory_bytes)
    print(format_summary(summary, run_dir))
    return 0


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    """A short table of the run's test score beside its references."""
    metric = summary["metric"]
    lines = [f"run {summary['name']}: {summary['rounds']} rounds in "
             f"{summary['wall_seconds']:.1f} s, {summary['bytes_per_round'] / 1e3:.1f} kB/round,"
             f" peak memory {summary.get('peak_memory_bytes', 0) / 2**30:.2f} GiB",
             f"  {'model':<34} test {metric}",
             f"  {'liquid ensemble (federated)':<34} {summary['test'][metric]:.4f}"]
    refs = summary.get("references", {})
    for key, value in refs.items():
        if isinstance(value, list):
            for k, v in enumerate(value):
                lines.append(f"  {'single expert ' + str(k) + ' (centralized)':<34} {v:.4f}")
        else:
            label = key.replace("centralized_", "") + " (centralized)"
            lines.append(f"  {label:<34} {value:.4f}")
    leak = summary.get("label_leakage") or {}
    if leak.get("max") is not None:
        lines.append(f"  label leakage: a client recovers {100 * leak['max']:.1f} % of the "
                     "training labels from the gradients it is sent (chance "
                     f"{100 * leak['chance']:.1f} %)")
    lines.append(f"  outputs: {run_dir}")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    """A study: every cell x seed x method, then results.csv, report.md and figures."""
    from liquid_fed import study as studies
    from liquid_fed.report import render

    study = studies.load_study(args.study, args.set or [])
    out = Path(args.out) if args.out else Path(study.base.get("out", "runs")) / study.name
    with RunLock(out).acquire(f"liquid-fed compare {args.study}"):
        studies.prepare_study(study, out, args.resume, args.force)
        jobs = [(setting, seed, [m for m in study.methods
                                 if not studies.finished(out, setting.id, seed, m)])
                for setting, seed in study.cells()]
        jobs = [j for j in jobs if j[2]]
        total = sum(len(j[2]) for j in jobs)
        done = len(list(study.cells())) * len(study.methods) - total
        if done:
            print(f"resuming: {done} finished run(s) skipped, {total} to go", file=sys.stderr)
        bar = Progress(total, f"compare {study.name}", not args.quiet, unit="run")
        try:
            _run_jobs(study, out, jobs, args.workers, bar)
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted: finished runs are kept; continue with --resume --out {out}",
                  file=sys.stderr)
            return 130
        bar.close()
        rows = studies.collect(study, out)
        studies.write_results(rows, out)
        run = rundir.RunDir(out)
        run.write_text(studies.REPORT_FILE, render(study, rows) + "\n")
        figures = _study_figures(study, out)
    print(f"study {study.name}: {len(rows)} runs -> {out}/{studies.RESULTS_FILE}, "
          f"{out}/{studies.REPORT_FILE}, {len(figures)} figure(s) in {out}/figures")
    return 0


def _study_figures(study: Any, out: Path) -> list[Path]:
    from liquid_fed.study_plots import plot_study

    return plot_study(study, out)


def _run_jobs(study: Any, out: Path, jobs: list, workers: int, bar: Progress) -> None:
    """Run every (cell, seed, methods) job: in this process, or in ``workers`` processes."""
    from liquid_fed.study import run_cell

    federated = _federated_runner if study.engine == "federated" else None

    def tick(method: str, seconds: float) -> None:
        bar.bar.set_postfix({"last": method, "s": f"{seconds:.1f}"}, refresh=False)
        bar.bar.update(1)

    if workers <= 1 or len(jobs) <= 1:
        for setting, seed, methods in jobs:
            run_cell(study, setting, seed, methods, out, federated, tick)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = mp.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        queue = manager.Queue()
        running = {pool.submit(_job, study, setting, seed, methods, out, queue)
                   for setting, seed, methods in jobs}
        bar.bar.set_description(f"compare {study.name} ({workers} workers)")
        while running:
            finished, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            while not queue.empty():
                tick(*queue.get())
            for future in finished:
                future.result()  # a failed cell stops the study, with its error
        while not queue.empty():
            tick(*queue.get())


def _job(study: Any, setting: Any, seed: int, methods: list[str], out: Path, queue: Any) -> None:
    """One cell in a worker process (module level: picklable for ``spawn``)."""
    from liquid_fed.study import run_cell

    federated = _federated_runner if study.engine == "federated" else None
    run_cell(study, setting, seed, methods, out, federated,
             lambda method, seconds: queue.put((method, seconds)))


def _federated_runner(cfg: RunConfig, run_dir: Path) -> None:
    """The Liquid Ensemble of a cell through Flower on Ray (``engine: federated``)."""
    from liquid_fed.errors import ClientFailure
    from simulations.simulate import launch

    with RunLock(run_dir).acquire("liquid-fed compare (federated cell)") as lock:
        result = launch(cfg, run_dir, quiet=True, lock_fd=lock.fd)
        run = rundir.RunDir(run_dir)
        if result.returncode != 0 or not run.finished:
            raise ClientFailure(f"the federated run of {run_dir} failed (exit "
                                f"{result.returncode}); see the messages above")
        run.update_summary(peak_memory_bytes=result.peak_memory_bytes)


def cmd_split(args: argparse.Namespace) -> int:
    """Private shards for a deployment: a folder per party, one for the server."""
    from liquid_fed.shards import write_shards

    cfg = _config(args)
    folders = write_shards(cfg, args.out)
    for folder in folders:
        print(folder)
    print(f"give party k's host only {Path(args.out)}/party-k (node config data-dir), and the "
          f"server's host only {Path(args.out)}/server (run config data-dir)", file=sys.stderr)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """A CA, the SuperLink's certificate and one auth key pair per party."""
    from simulations.keys import DEFAULT_HOSTS, make_keys

    keys = make_keys(args.dir, args.nodes, [*DEFAULT_HOSTS, *(args.host or [])], args.days)
    print(keys.server.folder)
    for k in range(args.nodes):
        print(keys.party(k).folder)
    print(f"copy {keys.server.folder} to the server host and {keys.root}/party-k to party k's "
          f"host; keep {keys.root}/ca (the CA's private key) off both", file=sys.stderr)
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from simulations.deploy_local import run_args

    return run_args(args)


def cmd_server_host(args: argparse.Namespace) -> int:
    from simulations.hosts import run_command, server_host

    return run_command(server_host, args, "server-host")


def cmd_party_host(args: argparse.Namespace) -> int:
    from simulations.hosts import party_host, run_command

    return run_command(party_host, args, "party-host")


def cmd_plot(args: argparse.Namespace) -> int:
    """Figures of finished runs: each run's own, plus a comparison when given several."""
    from liquid_fed.plots import load_run, plot_comparison, plot_run

    for run_dir in args.run_dirs:  # every folder checked before anything is drawn
        load_run(run_dir)
    written = []
    if len(args.run_dirs) == 1:
        written += plot_run(args.run_dirs[0], args.out)
    else:
        for run_dir in args.run_dirs:
            written += plot_run(run_dir)
        out = Path(args.out) if args.out else Path("figures")
        written.append(plot_comparison(args.run_dirs, out / "comparison.png"))
    for path in written:
        print(path)
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liquid-fed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="YAML config (keys override the defaults)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one key, e.g. --set train.epochs=5 (repeatable)")

    p = sub.add_parser("run", help="federated run on Flower's simulation engine (Ray)")
    common(p)
    p.add_argument("--out", help="run folder (default: <out>/<name> from the config)")
    p.add_argument("--resume", action="store_true", help="continue from the folder's checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a folder holding results")
    p.add_argument("--stop-after", type=int, metavar="ROUNDS",
                   help="stop after ROUNDS rounds, leaving a checkpoint to --resume from")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("centralized", help="train the same experts centrally (reference)")
    common(p)
    p.add_argument("--out", help="output folder (default: <out>/<name>-centralized)")
    p.add_argument("--force", action="store_true", help="overwrite a folder holding results")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_centralized)

    p = sub.add_parser("validate", help="print the resolved config, or what is wrong with it")
    common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("split", help="private shards: one folder per party, one for the server")
    common(p)
    p.add_argument("--out", required=True, help="where the shards go (a new folder)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("keys", help="TLS certificates and SuperNode auth keys for a deployment")
    p.add_argument("dir", help="a new folder (one subfolder per machine)")
    p.add_argument("--nodes", type=int, required=True, help="number of parties")
    p.add_argument("--host", action="append", metavar="ADDRESS",
                   help="an IP address or DNS name the parties use to reach the server "
                        "(repeatable; 127.0.0.1 and localhost are always included)")
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    p.set_defaults(func=cmd_keys)

    from simulations.deploy_local import add_arguments as deploy_arguments
    from simulations.hosts import add_party_arguments, add_server_arguments

    p = sub.add_parser("deploy-local", help="a real deployment on this machine (SuperLink, "
                       "SuperNodes, flwr run): TLS, authentication and private shards")
    deploy_arguments(p)
    p.set_defaults(func=cmd_deploy_local)

    p = sub.add_parser("server-host", help="on the server's machine: SuperLink (TLS + auth), "
                       "then the run")
    add_server_arguments(p)
    p.set_defaults(func=cmd_server_host)

    p = sub.add_parser("party-host", help="on party K's machine: its SuperNode with its shard")
    add_party_arguments(p)
    p.set_defaults(func=cmd_party_host)

    p = sub.add_parser("compare", help="a study: methods x settings x seeds, report, figures")
    p.add_argument("study", help="study YAML (see liquid_fed/study.py and configs/studies/)")
    p.add_argument("--out", help="study folder (default: <out of the base config>/<name>)")
    p.add_argument("--workers", type=int, default=1,
                   help="cells trained in parallel processes (default 1)")
    p.add_argument("--resume", action="store_true", help="skip the runs already finished")
    p.add_argument("--force", action="store_true", help="start over a folder holding a study")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override the study file, e.g. --set seeds=2 --set set.train.epochs=5")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="figures of delegation patterns from finished run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folder(s) holding test_outputs.npz")
    p.add_argument("--out", help="one run: where its figures go (default RUN_DIR/figures); "
                                 "several: where comparison.png goes (default ./figures), each "
                                 "run's own figures going to RUN_DIR/figures")
    p.set_defaults(func=cmd_plot)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (LiquidFedError, ValueError, FileNotFoundError) as exc:
        print(f"liquid-fed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
