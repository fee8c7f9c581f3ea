"""``liquid-fed``: run, check and compare federated Liquid Ensembles from one YAML config.

    liquid-fed run CONFIG.yaml [--set key=value ...] [--out DIR] [--resume] [--force]
    liquid-fed centralized CONFIG.yaml [--set key=value ...] [--out DIR] [--force]
    liquid-fed validate CONFIG.yaml [--set key=value ...]
    liquid-fed plot RUN_DIR [RUN_DIR ...] [--out DIR]
    liquid-fed evaluate RUN_DIR [--absent K [K ...]] ... [--missing-rate P [P ...]]
                        [--smoothing L [L ...]]
    liquid-fed compare STUDY.yaml [--out DIR] [--workers N | --ray ADDRESS] [--resume]
        [--set key=value ...]
    liquid-fed split CONFIG.yaml --out DIR [--set key=value ...]
    liquid-fed keys DIR --nodes N [--host ADDRESS ...] [--days D]
    liquid-fed deploy-local [CONFIG.yaml] [--set key=value ...] [--keys DIR | --insecure] ...
    liquid-fed server-host --keys DIR --work-dir DIR [--host H] [--port P] [--nodes N]
    liquid-fed submit CONFIG.yaml --data-dir DIR --work-dir DIR [--set ...] [--out DIR]
        [--resume RUN_DIR]
    liquid-fed status --work-dir DIR [--stop RUN_ID]
    liquid-fed party-host --superlink H:P --keys DIR --data-dir DIR --partition-id K ...

``run`` starts Flower's simulation engine on Ray in a child process that leads its own
session (:mod:`simulations.simulate`); whatever happens (success, error, Ctrl-C, SIGTERM,
SIGHUP), every process of that session and every Ray process of the run is gone when the
command returns, and a launcher killed outright takes its child down with it.
"""

from __future__ import annotations

# The face of the toolkit: argparse, dispatch and rendering, nothing else. Each command calls
# one function of the room that does the work: the library (liquid_fed), the simulation
# launcher and study runner (simulations/), the server's side of a deployment (server/) or
# the parties' side (clients/). Those rooms are imported inside the commands: `--help` and
# `validate` never pay for Ray, Flower or the TLS stack.
import argparse
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from liquid_fed.config import RunConfig, load_config
from liquid_fed.errors import DeploymentError, LiquidFedError
from liquid_fed.metrics import primary_metric
from liquid_fed.procs import APP_DIR

log = logging.getLogger("liquid_fed.cli")

# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _max_memory(args: argparse.Namespace) -> None:
    """``--max-memory``: the limit every size check holds to, here and in child processes."""
    if getattr(args, "max_memory", None) is not None:
        from liquid_fed.sizes import ENV_MAX_MEMORY, parse_size

        os.environ[ENV_MAX_MEMORY] = str(parse_size(args.max_memory))


def _config(args: argparse.Namespace) -> RunConfig:
    _max_memory(args)
    cfg = load_config(args.config, args.set or [])
    from liquid_fed.runs import check_run

    check_run(cfg)
    return cfg


def _run_dir(cfg: RunConfig, out: str | None) -> Path:
    return Path(out) if out else Path(cfg.out) / cfg.name


def cmd_validate(args: argparse.Namespace) -> int:
    from liquid_fed.sizes import check_run_size

    cfg = _config(args)
    sys.stdout.write(cfg.to_yaml())
    print(check_run_size(cfg).line(cfg.n_clients), file=sys.stderr)
    return 0


def cmd_centralized(args: argparse.Namespace) -> int:
    from liquid_fed.centralized import run_centralized
    from liquid_fed.progress import Progress

    cfg = _config(args)
    run_dir = Path(args.out) if args.out else Path(cfg.out) / f"{cfg.name}-centralized"
    bar = Progress(cfg.train.epochs, "centralized", not args.quiet)
    t0 = time.perf_counter()

    def on_epoch(epoch: int, loss: float) -> None:
        bar.bar.set_postfix({"loss": f"{loss:.4f}",
                             "elapsed": f"{time.perf_counter() - t0:.1f}s"}, refresh=False)
        bar.bar.update(1)

    try:
        result = run_centralized(cfg, run_dir, args.force, f"liquid-fed centralized {args.config}",
                                 on_epoch)
    finally:
        bar.close()
    metric = primary_metric(result["test"])
    print(f"centralized {cfg.name}: test {metric} {result['test'][metric]:.4f} "
          f"({result['wall_seconds']:.1f} s) -> {run_dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from simulations.simulate import run

    cfg = _config(args)
    if args.ray is not None:  # --ray ADDRESS: join a running cluster (simulation.ray_address)
        import dataclasses

        from liquid_fed.config import check_ray_address

        cfg.simulation = dataclasses.replace(
            cfg.simulation, ray_address=check_ray_address(args.ray, "--ray"))
    run_dir = _run_dir(cfg, args.out)
    outcome = run(cfg, run_dir, args.resume, args.force, args.stop_after, args.quiet,
                  f"liquid-fed run {args.config}")
    if outcome.message is not None:
        print(outcome.message, file=sys.stderr)
        return outcome.returncode
    if outcome.summary is None:  # stopped early on purpose
        print(f"stopped after round {outcome.stopped_after}; checkpoint in {run_dir}/checkpoints")
        return 0
    print(format_summary(outcome.summary, run_dir))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """A study: every cell x seed x method, then results.csv, report.md and figures."""
    from liquid_fed import study as studies
    from simulations.studies import compare

    _max_memory(args)
    outcome = compare(args.study, args.set or [], args.out, args.workers, args.resume,
                      args.force, args.quiet, f"liquid-fed compare {args.study}", args.ray)
    if outcome.interrupted:
        print(f"\ninterrupted: finished runs are kept; continue with --resume --out "
              f"{outcome.out}", file=sys.stderr)
        return 130
    print(f"study {outcome.name}: "
          f"{outcome.rows} result rows -> {outcome.out}/{studies.RESULTS_FILE}, "
          f"{outcome.out}/{studies.REPORT_FILE}, {outcome.figures} figure(s) in "
          f"{outcome.out}/figures")
    return 0


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
    from server.keys import DEFAULT_HOSTS, make_keys

    keys = make_keys(args.dir, args.nodes, [*DEFAULT_HOSTS, *(args.host or [])], args.days)
    print(keys.server.folder)
    for k in range(args.nodes):
        print(keys.party(k).folder)
    print(f"copy {keys.server.folder} to the server host and {keys.root}/party-k to party k's "
          f"host; keep {keys.root}/ca (the CA's private key) off both", file=sys.stderr)
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from server.deploy_local import deploy

    result = deploy(args.config_arg or args.config, args.set, args.clients, args.out,
                    args.timeout, args.keep_logs, None if args.quiet else sys.stderr,
                    keys=args.keys, insecure=args.insecure,
                    shards=args.shards or not args.no_shards, mode=args.mode)
    print(format_result(result))
    return 0


def cmd_server_host(args: argparse.Namespace) -> int:
    from server.host import server_host

    return server_host(args.keys, args.work_dir, args.host, args.port, args.nodes,
                       args.insecure, args.quiet)


def cmd_submit(args: argparse.Namespace) -> int:
    from server.submit import submit

    done = submit(args.config, args.set or [], args.data_dir, args.work_dir, args.out,
                  args.resume, args.timeout, None if args.quiet else sys.stderr)
    print(format_summary(done.summary, done.run_dir))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from server.host import find_server
    from server.submit import list_runs, stop_run

    state = find_server(args.work_dir)
    if args.stop is not None:
        stop_run(state, args.stop)
        print(f"run {args.stop}: stop requested")
        return 0
    print(format_runs(list_runs(state)))
    return 0


def cmd_party_host(args: argparse.Namespace) -> int:
    from clients.host import party_host

    return party_host(args.superlink, args.keys, args.data_dir, args.partition_id,
                      args.num_partitions, args.port, args.mode, args.work_dir, args.insecure,
                      args.quiet, args.connect_timeout)


def cmd_plot(args: argparse.Namespace) -> int:
    """Figures of finished runs: each run's own, plus a comparison when given several."""
    from liquid_fed.plots import plot_runs

    for path in plot_runs(args.run_dirs, args.out):
        print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """A finished run's test score with parties absent (powers re-solved over the present)."""
    from liquid_fed.robustness import evaluate_run

    cases = evaluate_run(args.run_dir, args.absent or [],
                         [p for group in args.missing_rate or [] for p in group],
                         [v for group in args.smoothing or [] for v in group])
    print(format_cases(cases, Path(args.run_dir)))
    return 0


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    """A short table of the run's test score beside its references."""
    metric = summary["metric"]
    lines = [f"run {summary['name']}: {summary['rounds']} rounds in "
             f"{summary['wall_seconds']:.1f} s, {summary['bytes_per_round'] / 1e3:.1f} kB/round"
             + (f", peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB"
                if summary.get("peak_memory_bytes") else ""),
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
    for party in summary.get("parties") or []:
        if party["absent"]:
            causes = ", ".join(f"{n} {cause}" for cause, n in party["absent"].items())
            lines.append(f"  client {party['client']} answered {party['rounds_present']} of "
                         f"{summary['rounds']} rounds (absent: {causes}"
                         + (f"; rejoined {party['rejoined']}x" if party["rejoined"] else "")
                         + ")")
    lines.append(f"  outputs: {run_dir}")
    return "\n".join(lines)



def format_runs(rows: list[dict[str, Any]]) -> str:
    """The table of ``liquid-fed status``: one row per run on the server host."""
    lines = [f"{'run id':<22} {'status':<20} {'name':<20} run folder"]
    for row in rows:
        lines.append(f"{row.get('run-id', '?')!s:<22} {row.get('status', '?')!s:<20} "
                     f"{row.get('name', '-')!s:<20} {row.get('run_dir', '-')}")
    if not rows:
        lines.append("(no runs yet)")
    return "\n".join(lines)


def format_cases(cases: list[Any], run_dir: Path) -> str:
    """The table of ``liquid-fed evaluate``: one row per case, the task metric and NLL/RMSE."""
    first = cases[0].metrics
    metric = primary_metric(first)
    second = "nll" if "nll" in first else "loss"
    lines = [f"run {run_dir}: test split, parties absent (powers re-solved over the present)",
             f"  {'case':<22} {metric:>9} {second:>9} {'present':>8} {'scored':>7}"]
    for case in cases:
        m = case.metrics
        lines.append(f"  {case.label:<22} {m[metric]:>9.4f} {m[second]:>9.4f} "
                     f"{m['present_fraction']:>8.3f} {m['scored_fraction']:>7.3f}")
    lines.append("  present: share of (sample, party) pairs present; scored: share of samples "
                 "some present party holds")
    return "\n".join(lines)


def format_result(result: Any) -> str:
    """A few lines: where the outputs are, the test score and the deployment's timings."""
    summary = result.summary
    metric = summary.get("metric", "accuracy")
    score = summary.get("test", {}).get(metric, float("nan"))
    connect = ", ".join(f"{s:.1f}" for s in result.node_connect_seconds)
    security = "TLS + SuperNode authentication" if result.secure else "INSECURE (no TLS/auth)"
    data = "the whole data set"
    if result.shards is not None:
        data = (f"private shards in {result.shards}" if result.shards.exists()
                else "private shards (split into the work folder, now removed)")
    return "\n".join([
        f"run {result.run_id} {result.status}: {summary.get('rounds', 0)} rounds, "
        f"test {metric} {score:.4f}",
        f"  {security}; nodes read {data}",
        f"  SuperLink ready {result.superlink_ready_seconds:.1f} s; nodes connected after "
        f"[{connect}] s",
        f"  flwr run until finished {result.run_seconds:.1f} s; round trip per exchange "
        f"{result.round_trip_seconds:.1f} s (median of {len(result.exchange_seconds)}); "
        f"total {result.total_seconds:.1f} s",
        f"  outputs: {result.run_dir}",
    ])

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
        max_memory(p)

    def max_memory(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-memory", metavar="SIZE",
                       help="refuse data and experts estimated (from file headers and "
                            "shapes, before loading) to need more memory than SIZE, e.g. 8G "
                            "or 500M (default: what this machine has available; also "
                            "$LIQUID_FED_MAX_MEMORY)")

    p = sub.add_parser("run", help="federated run on Flower's simulation engine (Ray)")
    common(p)
    p.add_argument("--out", help="run folder (default: <out>/<name> from the config)")
    p.add_argument("--resume", action="store_true", help="continue from the folder's checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite a folder holding results")
    p.add_argument("--stop-after", type=int, metavar="ROUNDS",
                   help="stop after ROUNDS rounds, leaving a checkpoint to --resume from")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", metavar="HOST:PORT",
                   help="run on this running Ray cluster (its head's address, as `ray start "
                        "--head` prints it) instead of a private Ray; sets "
                        "simulation.ray_address. With token auth, export RAY_AUTH_MODE=token "
                        "and RAY_AUTH_TOKEN_PATH first")
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

    p = sub.add_parser("deploy-local", help="a real deployment on this machine (SuperLink, "
                       "SuperNodes, flwr run): TLS, authentication and private shards")
    add_deploy_arguments(p)
    p.set_defaults(func=cmd_deploy_local, supervises=True)

    p = sub.add_parser("server-host", help="on the server's machine: the long-lived server "
                       "(SuperLink + TLS gate + party keys) that runs are submitted to")
    add_server_arguments(p)
    p.set_defaults(func=cmd_server_host, supervises=True)

    p = sub.add_parser("submit", help="on the server's machine: one run on the running "
                       "server-host, with progress and the summary table")
    p.add_argument("config", help="YAML config (the same file the shards were split from)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one key (repeatable; the same as for `liquid-fed split`)")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="the server's label folder of `liquid-fed split`")
    p.add_argument("--work-dir", required=True, metavar="DIR",
                   help="the server-host's --work-dir (how the running server is found)")
    p.add_argument("--out", help="parent of the run folder (default: the config's out)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue this run folder from its last complete checkpoint (same "
                        "CONFIG and --set as its first submit)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds the run may take; then it is stopped (default 3600)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_submit, supervises=True)

    p = sub.add_parser("status", help="on the server's machine: the runs of the running "
                       "server-host; --stop RUN_ID stops one")
    p.add_argument("--work-dir", required=True, metavar="DIR",
                   help="the server-host's --work-dir")
    p.add_argument("--stop", metavar="RUN_ID", help="stop this run (flwr stop)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("party-host", help="on party K's machine: its SuperNode with its shard")
    add_party_arguments(p)
    p.set_defaults(func=cmd_party_host, supervises=True)

    p = sub.add_parser("compare", help="a study: methods x settings x seeds, report, figures")
    p.add_argument("study", help="study YAML (see liquid_fed/study.py and configs/studies/)")
    p.add_argument("--out", help="study folder (default: <out of the base config>/<name>)")
    p.add_argument("--workers", type=int, default=1,
                   help="cells trained in parallel processes (default 1)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run the cells as Ray Tune trials on the running Ray cluster at ADDRESS "
                        "(host:port of its head, or auto; needs the extra 'cluster'; engine: "
                        "centralized only); the cluster is joined, never started or stopped")
    p.add_argument("--resume", action="store_true", help="skip the runs already finished")
    p.add_argument("--force", action="store_true", help="start over a folder holding a study")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override the study file, e.g. --set seeds=2 --set set.train.epochs=5")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    max_memory(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="a finished run's test score with parties absent")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a folder of `liquid-fed run` or `liquid-fed centralized`")
    p.add_argument("--absent", action="append", nargs="+", type=int, metavar="K",
                   help="parties absent together from every sample (repeatable: one case each)")
    p.add_argument("--missing-rate", action="append", nargs="+", type=float, metavar="P",
                   help="each sample loses each party with probability P in [0, 1), one kept "
                        "(one case per P; seeded by the run's seed)")
    p.add_argument("--smoothing", action="append", nargs="+", type=float, metavar="L",
                   help="every party present, pooled with power smoothing L in [0, 1] (0: the "
                        "learned powers, 1: the uniform vote) instead of the run's own")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="figures of delegation patterns from finished run folders")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run folder(s) holding test_outputs.npz")
    p.add_argument("--out", help="one run: where its figures go (default RUN_DIR/figures); "
                                 "several: where comparison.png goes (default ./figures), each "
                                 "run's own figures going to RUN_DIR/figures")
    p.set_defaults(func=cmd_plot)

    return parser


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``liquid-fed deploy-local``."""
    parser.add_argument("config_arg", nargs="?", metavar="CONFIG",
                        help="YAML config (same as --config)")
    parser.add_argument("--config", default=str(APP_DIR / "configs" / "quickstart.yaml"),
                        help="YAML config (default: configs/quickstart.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.epochs=1 (repeatable)")
    parser.add_argument("--clients", type=int, help="SuperNodes to start "
                        "(default: the config's views.n_views)")
    parser.add_argument("--out", help="parent of the run folder (default: the config's out)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds the run may take once submitted (default: 900)")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="keep the processes' logs and Flower homes in DIR")
    from clients.host import DEFAULT_MODE, MODES

    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                        help="how SuperNodes run the ClientApp: fast (default: a long-lived "
                        "worker per node, shorter waits), warm (the worker only) or stock "
                        "(Flower's process per message)")
    parser.add_argument("--quiet", action="store_true", help="don't stream the run's logs")
    parser.add_argument("--keys", metavar="DIR", help="keys written by `liquid-fed keys` "
                        "(default: new keys in the work folder)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication (explicit opt-in)")
    shard = parser.add_mutually_exclusive_group()
    shard.add_argument("--shards", metavar="DIR", help="shards written by `liquid-fed split` "
                       "for this config (default: split into the work folder)")
    shard.add_argument("--no-shards", action="store_true",
                       help="every node loads the whole data set (a rehearsal, not private)")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", metavar="DIR", help="the server folder of `liquid-fed keys`")
    p.add_argument("--work-dir", required=True, metavar="DIR",
                   help="the server's folder (state database, logs; `submit` and `status` "
                        "find the server through it)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the parties' port binds to (default 127.0.0.1; 0.0.0.0 "
                        "for all)")
    p.add_argument("--port", type=int, default=9092,
                   help="the parties' port: the public Fleet API (the TLS gate; the "
                        "SuperLink itself listens on 127.0.0.1 only). Default 9092")
    p.add_argument("--nodes", type=int, help="register only the first N party keys "
                   "(default: every key in supernodes/)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no SuperNode authentication (only with --host 127.0.0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_party_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--superlink", required=True, metavar="HOST:PORT",
                   help="the server host's address, as named in its certificate")
    p.add_argument("--keys", metavar="DIR", help="this party's folder of `liquid-fed keys`")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="this party's shard (party-K of `liquid-fed split`)")
    p.add_argument("--partition-id", type=int, required=True, metavar="K")
    p.add_argument("--num-partitions", type=int, required=True, metavar="N")
    p.add_argument("--port", type=int, help="the SuperNode's local runtime API port on "
                   "127.0.0.1 (default: a free one)")
    from clients.host import DEFAULT_MODE, MODES

    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="how the SuperNode runs the ClientApp: fast (default: a warm worker, "
                   "shorter waits), warm, or stock (Flower's process per message)")
    p.add_argument("--work-dir", help="logs and Flower home (default: a new temporary folder)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no authentication (only with a 127.0.0.1 SuperLink)")
    p.add_argument("--quiet", action="store_true", help="don't echo the SuperNode's log")
    p.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up, saying why, when the SuperLink has not answered, been "
                   "verified and let this party in within SECONDS (default 60)")



def format_os_error(exc: OSError) -> str:
    """An OSError as one line naming the file(s) and the system's words, e.g.
    ``data.csv: Input/output error [errno 5]``."""
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    what = exc.strerror or str(exc) or type(exc).__name__
    code = f" [errno {exc.errno}]" if exc.errno else ""
    return f"{files}: {what}{code}" if files else f"{what}{code}"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _dispatch(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; its errors as one line and an exit status, never a traceback.

    Exit status: 2 for input refused (a :class:`LiquidFedError`, a bad value, a missing file,
    a file it may not read), 1 for a deployment that failed at run time or a read or write the
    operating system failed (EIO, a full disk: one line naming the file), 130 when
    interrupted. Commands that supervise
    processes (deploy-local and the hosts) treat SIGTERM like Ctrl-C: the processes they
    started are stopped (:class:`liquid_fed.procs.ProcessGroup`) before they return.
    """
    supervises = getattr(args, "supervises", False)
    name = f"liquid-fed {args.command}" if supervises else "liquid-fed"
    if supervises:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return func(args)
    except (LiquidFedError, ValueError, FileNotFoundError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except DeploymentError as exc:
        print(f"{name}: failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a read or write the operating system failed (EIO, ENOSPC, ...)
        print(f"{name}: error: {format_os_error(exc)}", file=sys.stderr)
        return 2 if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOENT) else 1
    except KeyboardInterrupt:
        if not supervises:
            raise
        print(f"{name}: stopped; every process it started is gone", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return _dispatch(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
