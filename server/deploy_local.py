"""Rehearse a real deployment on one machine: a SuperLink, N SuperNodes and ``flwr run``.

    liquid-fed deploy-local [CONFIG] [--set key=value ...] [--clients N] [--out DIR]
        [--timeout SECONDS] [--keep-logs DIR] [--mode fast|warm|stock]
        [--keys DIR | --insecure] [--shards DIR | --no-shards]

The loopback rehearsal composes the two sides of a deployment: the server's SuperLink (this
package) and the parties' SuperNodes (:mod:`clients.host`), all children of one
:class:`liquid_fed.procs.ProcessGroup`.

Starts ``flower-superlink`` (127.0.0.1, a free port) and one ``flower-supernode`` per client
(``--node-config 'partition-id=K num-partitions=N data-dir="<shards>/party-K"'``, each on its
own port), writes the connection into a temporary ``FLWR_HOME/config.toml``, submits the app
with ``flwr run . local-deploy --stream --run-config ...`` and waits for the run to finish.

Secure by default: every API runs over TLS (a CA and a server certificate from
:mod:`server.keys`, new in the work folder unless ``--keys DIR``), the SuperLink runs
with ``--enable-supernode-auth`` and admits only the SuperNodes whose public keys were
registered with ``flwr supernode register``; ``--insecure`` is an explicit opt-in. Private by
default: the config is split (``liquid-fed split``) into the work folder; node K reads only
``party-K`` and the ServerApp only ``server`` (``--shards DIR`` uses an existing split,
``--no-shards`` lets every node load the whole data set).

Every process it started (SuperLink, SuperNodes and what they spawn: SuperExec, ServerApp,
ClientApp processes) carries an environment tag; whatever happens (success, failure, timeout,
Ctrl-C) they are all stopped with SIGTERM, then SIGKILL, before the command returns.

``--mode`` says how the SuperNodes run the ClientApp (:mod:`clients.supernode`): ``fast``
(default) keeps one ClientApp worker per node warm and shortens the SuperNodes' waits, ``warm``
only keeps the worker, ``stock`` is Flower's own process per message. In the warm modes a
SuperNode stops as soon as its worker dies (and signs its node off, so the ServerApp sees it
offline at once). When every party is required (``federation.min_clients`` = the number of
parties) the run then fails at once naming that node; otherwise the exit is logged and the
ServerApp counts the party absent until it rejoins.

The run folder is ``<DIR>/<name>`` (``--out`` is passed to the ServerApp as an absolute
``out``; without it, ``<out>/<name>`` of the config relative to the current directory).
Exit status: 0 when the run finished and wrote its summary, 1 when it failed or timed out
(the ServerApp's error is printed), 2 when the config is rejected before launch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from clients.host import (
    DEFAULT_MODE,
    MODES,
    NODE_ID,
    node_config,
    supernode_command,
    supernode_security_args,
)
from liquid_fed import procs
from liquid_fed.config import ConfigError, RunConfig, load_config
from liquid_fed.errors import DeploymentError
from liquid_fed.procs import APP_DIR, Child, ProcessGroup
from server.keys import KeySet, ServerKeys, make_keys, write_node_key

log = logging.getLogger("liquid_fed.deploy")

CONNECTION = "local-deploy"
ROUND = re.compile(r"\[RUN \d+, ROUND (\d+)\]")
MODE_LINE = re.compile(r"SuperNode \S+: mode (\w+) \(asked")


@dataclass
class DeployResult:
    """What a finished deployment run produced and how long its parts took (seconds)."""

    run_dir: Path
    run_id: str
    status: str
    superlink_ready_seconds: float
    node_connect_seconds: list[float]
    run_seconds: float  # from `flwr run` until the run finished
    total_seconds: float
    exchange_seconds: list[float]  # between successive protocol exchanges (one round trip each)
    ports: list[int]
    tag: str
    summary: dict[str, Any] = field(default_factory=dict)
    secure: bool = False  # TLS and SuperNode authentication
    shards: Path | None = None  # the private shards the nodes and the ServerApp read
    rogue_exits: list[tuple[int | None, str]] = field(default_factory=list)
    mode: str = DEFAULT_MODE  # how the SuperNodes ran the ClientApp (after any fallback)

    @property
    def round_trip_seconds(self) -> float:
        """Median time of one protocol exchange (a round trip to every node)."""
        return statistics.median(self.exchange_seconds) if self.exchange_seconds else float("nan")


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# TLS and SuperNode authentication (the flags every process of a deployment gets)
# --------------------------------------------------------------------------------------------


def superlink_security_args(keys: ServerKeys | None) -> list[str]:
    """``flower-superlink`` flags: TLS on every API and SuperNode authentication, or
    ``--insecure`` when ``keys`` is None."""
    if keys is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(keys.ca), "--ssl-certfile", str(keys.cert),
            "--ssl-keyfile", str(keys.key), "--enable-supernode-auth"]


def connection_toml(name: str, address: str, ca: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: one connection, TLS unless ``ca`` is
    None."""
    security = f"root-certificates = {json.dumps(str(ca))}\n" if ca else "insecure = true\n"
    return (f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
            f'address = "{address}"\n{security}')


class LocalDeployment(ProcessGroup):
    """A SuperLink and ``n_nodes`` SuperNodes on 127.0.0.1, stopped by :meth:`stop`.

    Use as a context manager: every process started (and every process they spawn) carries
    ``LIQUID_FED_DEPLOY_TAG=<tag>`` and is gone after ``__exit__``.

    With ``keys`` every API runs over TLS, the SuperLink admits only SuperNodes whose public
    key it registered (party k signs with ``keys.party(k)``); ``keys=None`` is insecure.
    ``shards``: party k's node config names ``<shards>/party-k`` as its ``data-dir``.
    ``rogue``: that many extra SuperNodes with fresh keys the SuperLink never registered,
    started after the others connected (each must be refused: see :attr:`rogue_exits`).
    """

    def __init__(self, n_nodes: int, work_dir: Path, echo: IO[str] | None = None,
                 keys: KeySet | None = None, shards: Path | None = None,
                 rogue: int = 0, host: str = "127.0.0.1", port: int | None = None,
                 server_keys: ServerKeys | None = None, mode: str = DEFAULT_MODE,
                 tolerate_exits: bool = False, database: Path | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"--mode: got {mode!r}; accepted: {', '.join(MODES)}")
        super().__init__(work_dir, echo)
        self.n_nodes = n_nodes
        self.mode = mode
        self.host, self.port = host, port
        self.server_keys = server_keys or (keys.server if keys is not None else None)
        self.keys = keys
        self.shards = shards
        self.rogue = rogue
        self.rogue_exits: list[tuple[int | None, str]] = []  # (exit status, log tail) each
        self.superlink_port = 0
        self.superlink_ready_seconds = float("nan")
        self.node_connect_seconds: list[float] = []
        self.nodes: list[Child] = []
        self.flwr_home = self.work_dir / "flwr-cli"  # the `flwr` CLI's home: the connection
        self.tolerate_exits = tolerate_exits
        self.exits_seen: list[Child] = []
        self.restarts: dict[int, int] = {}
        # The SuperLink's state (runs, registered keys, nodes) in a SQLite file that outlives
        # it (the long-lived server host); None: in memory, gone with the SuperLink.
        self.database = database

    def check_nodes(self) -> None:
        """Raise :class:`DeploymentError` naming the first SuperNode that has exited (in warm
        modes a SuperNode stops as soon as its ClientApp worker dies).

        With :attr:`tolerate_exits` (a run that goes on over the parties present) an exit is
        logged once, naming the party, and the run goes on: the ServerApp counts the party
        absent until it rejoins (:meth:`restart_node`)."""
        for k, node in enumerate(self.nodes):
            if not self.tolerate_exits:
                self.check_alive(node, "the run")
            elif node.proc.poll() is not None and node not in self.exits_seen:
                self.exits_seen.append(node)
                node.wait_closed(2)
                log.warning("party %d's SuperNode (%s) exited with status %s during the run; "
                            "the run goes on without it until it rejoins. Its last lines:\n%s",
                            k, node.name, node.proc.returncode, node.tail(5))

    def kill_node(self, k: int, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to party ``k``'s SuperNode process (tests: a crash); its pid."""
        pid = self.nodes[k].proc.pid
        os.kill(pid, sig)
        return pid

    def restart_node(self, k: int) -> Child:
        """Start party ``k``'s SuperNode again, same key and shard, on a new port (what a
        person does with ``liquid-fed party-host`` after a crash); the new process."""
        self.restarts[k] = self.restarts.get(k, 0) + 1
        port = procs.free_port()
        self.ports.append(port)
        name = f"supernode-{k}-restart{self.restarts[k]}"
        child = self.spawn(name, self.supernode_command(k, port),
                           self.work_dir / f"supernode-{k}-home")
        self.nodes[k] = child
        return child

    def supernode_command(self, k: int, port: int) -> list[str]:
        """The command of SuperNode ``k`` for :attr:`mode` (its Runtime API on ``port``)."""
        flower = [*supernode_security_args(self.keys.party(k) if self.keys else None),
                  "--superlink", f"127.0.0.1:{self.superlink_port}", "--port", str(port),
                  "--node-config", self.node_config(k)]
        return supernode_command(self.mode, f"supernode-{k}", flower)

    def start(self, wait: float = 60.0) -> None:
        """Start the SuperLink, then the SuperNodes; return once every node is connected."""
        t0 = time.time()
        self.superlink_port = self.port or procs.free_port()
        self.ports.append(self.superlink_port)
        link = self.spawn("superlink", [
            procs.executable("flower-superlink"), *superlink_security_args(self.server_keys),
            "--host", self.host,
            "--port", str(self.superlink_port), "--disable-runtime-dependency-installation",
            *(["--database", str(self.database)] if self.database is not None else []),
        ], self.work_dir / "superlink-home")
        deadline = time.time() + wait
        while not procs.accepts(self.superlink_port, self.local_host):
            self.check_alive(link)
            if time.time() > deadline:
                raise DeploymentError(f"the SuperLink did not open port {self.superlink_port} "
                                      f"within {wait:.0f} s:\n{link.tail()}")
            time.sleep(0.1)
        self.superlink_ready_seconds = time.time() - t0
        self.write_connection()
        if self.server_keys is not None:
            self.register(self.server_keys.node_public_keys()[:self.n_nodes])
        for k in range(self.n_nodes):
            port = procs.free_port()
            self.ports.append(port)
            self.nodes.append(self.spawn(f"supernode-{k}", self.supernode_command(k, port),
                                          self.work_dir / f"supernode-{k}-home"))
        connected: dict[int, float] = {}
        while len(connected) < self.n_nodes:
            for k, node in enumerate(self.nodes):
                if k not in connected:
                    self.check_alive(node)
                    if hits := node.find(NODE_ID):
                        connected[k] = hits[0][0] - node.started
            if time.time() > deadline:
                missing = sorted(set(range(self.n_nodes)) - set(connected))
                raise DeploymentError(
                    f"SuperNodes {missing} did not connect within {wait:.0f} s:\n"
                    f"{self.nodes[missing[0]].tail()}")
            time.sleep(0.1)
        self.node_connect_seconds = [connected[k] for k in range(self.n_nodes)]
        self.check_alive(link)
        if self.rogue:
            self.start_rogues(deadline)

    def node_config(self, k: int) -> str:
        shard = self.shards / f"party-{k}" if self.shards is not None else None
        return node_config(k, self.n_nodes, shard)

    def register(self, public_keys: list[Path]) -> None:
        """Let the SuperNodes holding these keys' private halves in (Control API; one ``flwr``
        CLI process per key, all at once: each spends seconds importing Flower). A key the
        SuperLink's database already holds (a restarted long-lived server) stays registered."""
        regs = [(pub, self.flwr("supernode", "register", str(pub), CONNECTION,
                                name=f"flwr-register-{pub.stem}")) for pub in public_keys]
        for pub, reg in regs:
            rc = reg.proc.wait(timeout=120)
            reg.wait_closed(5)
            if rc != 0 and "already in use" in reg.tail(40):
                log.info("%s: already registered (the SuperLink's database kept it)", pub)
            elif rc != 0:
                raise DeploymentError(f"`flwr supernode register {pub}` failed (exit "
                                      f"{rc}):\n{reg.tail()}")

    def start_rogues(self, deadline: float) -> None:
        """SuperNodes with keys nobody registered; wait until the SuperLink turned each away.

        A rogue claims a partition-id beyond the parties': were it let in, the ServerApp
        would refuse to start the run.
        """
        if self.keys is None:
            raise DeploymentError("rogue nodes need a secure deployment (keys)")
        rogues = []
        for i in range(self.rogue):
            key, _ = write_node_key(self.work_dir / "rogue-keys", f"rogue-{i}")
            port = procs.free_port()
            self.ports.append(port)
            rogues.append(self.spawn(f"rogue-{i}", [
                procs.executable("flower-supernode"),
                *supernode_security_args(self.keys.party(0), private_key=key),
                "--superlink", f"127.0.0.1:{self.superlink_port}", "--port", str(port),
                "--node-config", f"partition-id={self.n_nodes + i} "
                                 f"num-partitions={self.n_nodes}",
            ], self.work_dir / f"rogue-{i}-home"))
        for child in rogues:
            while child.proc.poll() is None and time.time() < deadline:
                if child.find(NODE_ID):
                    raise DeploymentError(f"{child.name}, whose key was never registered, "
                                          f"was let in:\n{child.tail()}")
                time.sleep(0.1)
            child.wait_closed(2)
            self.rogue_exits.append((child.proc.poll(), child.tail()))

    def node_modes(self) -> list[str]:
        """The mode each SuperNode runs in: the one asked for unless the installed Flower
        did not fit it (then the SuperNode fell back and logged why)."""
        if self.mode == "stock":
            return ["stock"] * len(self.nodes)
        return [hits[0][1].group(1) if (hits := node.find(MODE_LINE)) else "unknown"
                for node in self.nodes]

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: one connection (TLS with keys)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        path.write_text(connection_toml(CONNECTION, f"{host}:{self.superlink_port}",
                                        self.server_keys.ca if self.server_keys else None))
        return path

    @property
    def local_host(self) -> str:
        """How processes on this machine reach the SuperLink (a wildcard bind: loopback)."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    def flwr(self, *args: str, name: str = "flwr", echo: bool = False) -> Child:
        """Start the ``flwr`` CLI against this deployment's connection."""
        return self.spawn(name, [procs.executable("flwr"), *args], self.flwr_home, echo)

    def flwr_list(self, *args: str, key: str, name: str, timeout: float = 120.0
                  ) -> list[dict[str, Any]]:
        """Run ``flwr ARGS --format json`` to the end and return its list under ``key``.

        Raises:
            DeploymentError: the output holds no such list (its tail is in the message).
        """
        ls = self.flwr(*args, "--format", "json", name=name)
        ls.proc.wait(timeout=timeout)
        ls.wait_closed(5)
        text = "\n".join(line for _, line in ls.lines)
        try:
            return json.loads(text[text.index("{"):])[key]
        except (ValueError, KeyError) as exc:
            raise DeploymentError(f"`flwr {' '.join(args)}` gave no {key} list:\n"
                                  f"{text[-2000:]}") from exc

    def exchange_seconds(self) -> list[float]:
        """Time between successive protocol exchanges, from the nodes' time-stamped logs.

        A node logs ``[RUN r, ROUND g]`` when it sends its reply to exchange ``g``; an exchange
        ends when the last node has replied.
        """
        ends: dict[int, float] = {}
        for node in self.nodes:
            for t, m in node.find(ROUND):
                g = int(m.group(1))
                ends[g] = max(ends.get(g, 0.0), t)
        times = [ends[g] for g in sorted(ends)]
        return [b - a for a, b in zip(times[:-1], times[1:], strict=True)]

# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def resolve(config: str | Path | None, overrides: list[str], out: str | Path | None,
            clients: int | None = None) -> tuple[RunConfig, list[str], int]:
    """Validate the config here, before any process starts.

    Returns:
        The resolved config, the overrides to send (with an absolute ``out``), and the number
        of SuperNodes to start.

    Raises:
        ConfigError: for a bad key or value, data, view or expert option (names the key).
    """
    from liquid_fed.runs import check_run

    overrides = list(overrides)
    if out is not None:
        overrides.append(f"out={Path(out).resolve()}")
    cfg = load_config(config, overrides)
    if out is None and not Path(cfg.out).is_absolute():
        overrides.append(f"out={Path(cfg.out).resolve()}")  # the SuperLink has another cwd
        cfg = load_config(config, overrides)
    check_run(cfg)
    n = cfg.n_clients if clients is None else clients
    if n < cfg.n_clients:
        raise ConfigError(f"--clients: got {n}; the config needs at least {cfg.n_clients} "
                          "(views.n_views)")
    return cfg, overrides, n


def tolerates_absence(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s rounds go on while some parties are missing (then a SuperNode that
    exits mid-run is not the end of the run)."""
    return cfg.federation.min_clients < cfg.n_clients


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that already holds results (nothing there is overwritten)."""
    if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
        raise ConfigError(f"run folder {run_dir} already holds results; choose another --out "
                          "or --set name=...")


@contextlib.contextmanager
def stage_app(dest: Path, app: Path = APP_DIR) -> Iterator[Path]:
    """The files of the Flower App ``app`` that ``flwr run`` packs, copied into ``dest``
    (yielded, and removed on exit), or ``app`` itself (left as it is) where they cannot be
    picked out.

    ``flwr run DIR`` (flwr 1.41, ``collect_files``) walks and resolves every file under DIR
    before it filters them: from the checkout, the virtual environment and every run folder,
    61 000 files and 3.6 s of CPU before each run starts. Here only the top-level files and
    the folders that the ``fab-include`` patterns begin with are listed, Flower's own filters
    pick from them, and the picked files (with ``pyproject.toml`` and ``.gitignore``) are
    copied: the bundle built from ``dest`` is the bundle built from ``app``, byte for byte
    (``tests/test_bundle.py`` compares them). Where ``pyproject.toml`` cannot be read, a
    pattern does not begin with a plain folder name, or Flower's filters cannot be imported,
    ``app`` is returned and ``flwr run`` walks it (and reports on it) as before.
    """
    import glob

    import tomli  # a dependency of flwr (tomllib from Python 3.11)

    try:
        config = tomli.loads((app / "pyproject.toml").read_text())
    except (OSError, ValueError):  # flwr run says what is wrong with it, as it did before
        yield app
        return
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include", [])
    tops = {str(p).split("/", 1)[0] for p in patterns if "/" in str(p)}
    if not patterns or any(glob.has_magic(t) or t in ("", ".", "..") for t in tops):
        yield app
        return
    try:
        from flwr.cli.build import get_filtered_fab_paths
        from flwr.cli.utils import filter_paths_for_publish
    except ImportError as exc:
        log.warning("bundling from the whole app folder (%s)", exc)
        yield app
        return
    files: dict[str, Path] = {}
    for entry in os.scandir(app):
        if entry.is_file(follow_symlinks=False):
            files[entry.name] = Path(entry.path)
    for top in sorted(tops):
        for dirpath, _, names in os.walk(app / top, followlinks=False):
            for name in names:
                path = Path(dirpath) / name
                if not path.is_symlink():
                    files[path.relative_to(app).as_posix()] = path
    kept = filter_paths_for_publish(files)
    chosen = {"pyproject.toml", *get_filtered_fab_paths(kept, config)}
    if ".gitignore" in kept:
        chosen.add(".gitignore")  # the copy is filtered as the folder was
    shutil.rmtree(dest, ignore_errors=True)
    try:
        for rel in sorted(chosen):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[rel], target)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _config_for_app(config: str | Path | None) -> str:
    """The ``config`` run-config value: relative to the app when the file lies inside it."""
    if config is None:
        return ""
    path = Path(config).resolve()
    try:
        return str(path.relative_to(APP_DIR))
    except ValueError:
        return str(path)


def run_status(dep: LocalDeployment, run_id: str | None, wait: float = 20.0) -> dict[str, Any]:
    """The run's row from ``flwr ls --format json`` once it has finished."""
    deadline = time.time() + wait
    row: dict[str, Any] = {}
    while True:
        runs = dep.flwr_list("ls", CONNECTION, key="runs", name="flwr-ls", timeout=60)
        rows = [r for r in runs if run_id is None or str(r["run-id"]) == run_id]
        if rows:
            row = rows[-1]
            if str(row.get("status", "")).startswith("finished") or time.time() > deadline:
                return row
        elif time.time() > deadline:
            return row
        time.sleep(1.0)


def submit_run(dep: LocalDeployment, config: str | Path | None, overrides: list[str],
               run_dir: Path, timeout: float, server_data: Path | None = None
               ) -> tuple[str, str, dict[str, Any]]:
    """``flwr run`` the app on ``dep``'s SuperLink and wait until the run has finished.

    Args:
        server_data: the server's label folder (the ServerApp's run config ``data-dir``).

    Returns:
        The run id, its final status and its ``summary.json``.

    Raises:
        DeploymentError: the run failed, ended otherwise than completed, or took longer than
            ``timeout`` seconds.
    """
    run_config = dep.work_dir / "run-config.toml"
    settings = {"config": _config_for_app(config), "set": shlex.join(overrides)}
    if server_data is not None:
        settings["data-dir"] = str(Path(server_data).resolve())
    write_toml(run_config, settings)
    with stage_app(dep.work_dir / "app") as app:
        runner = dep.flwr("run", str(app), CONNECTION, "--stream",
                          "--run-config", str(run_config), name="flwr-run", echo=True)
        deadline = time.time() + timeout
        while (rc := runner.proc.poll()) is None:
            dep.check_nodes()  # a node (or its worker) died: fail now, naming it
            if time.time() > deadline:
                raise DeploymentError(
                    f"the run did not finish within {timeout:.0f} s (--timeout); stopped it. "
                    f"Logs: {dep.work_dir}")
            time.sleep(0.2)
    runner.wait_closed(5)
    started = runner.find(re.compile(r"Successfully started run (\d+)"))
    if rc != 0 or not started:
        raise DeploymentError(f"`flwr run` failed (exit {rc}):\n{runner.tail(25)}")
    run_id = started[0][1].group(1)
    row = run_status(dep, run_id)
    status = str(row.get("status", "unknown"))
    if status != "finished:completed":
        raise DeploymentError(
            f"run {run_id} ended as {status}: {row.get('status-details', '')}")
    summary_file = run_dir / "summary.json"
    if not summary_file.exists():
        raise DeploymentError(f"run {run_id} completed but wrote no {summary_file}")
    return run_id, status, json.loads(summary_file.read_text())


def deploy(config: str | Path | None, overrides: list[str] = (), clients: int | None = None,
           out: str | Path | None = None, timeout: float = 900.0,
           work_dir: str | Path | None = None, echo: IO[str] | None = None,
           keys: str | Path | None = None, insecure: bool = False,
           shards: str | Path | bool = True, rogue: int = 0, mode: str = DEFAULT_MODE,
           after_run: Callable[[LocalDeployment], None] | None = None,
           check_run_dir: bool = True, tolerate_exits: bool | None = None) -> DeployResult:
    """Run the federation on a real SuperLink and SuperNodes on this machine.

    By default every API runs over TLS, the SuperLink admits only the SuperNodes whose keys it
    registered, and each node reads only its private shard (written by ``liquid-fed split``
    into the work folder) while the ServerApp reads only the server's label folder.

    Args:
        config: YAML config (inside the app, or any path on this machine).
        overrides: ``key=value`` strings (sent to the ServerApp in the run config's ``set``).
        clients: SuperNodes to start (default: the config's ``views.n_views``).
        out: parent folder of the run folder (default: the config's ``out``).
        timeout: seconds the run may take once submitted.
        work_dir: where logs and the Flower homes go (default: a new temporary folder,
            removed afterwards).
        echo: a stream that receives the run's logs as ``flwr run --stream`` prints them.
        keys: a folder written by ``liquid-fed keys`` (default: new keys in the work folder).
        insecure: no TLS, no SuperNode authentication (explicit opt-in; ``keys`` must be None).
        shards: a folder written by ``liquid-fed split`` for this config, True to split into
            the work folder, False to let every node load the whole data set (a rehearsal
            that is not private).
        rogue: extra SuperNodes with unregistered keys, each of which must be refused.
        mode: how SuperNodes run the ClientApp: ``"fast"`` (default: a long-lived worker per
            node and shorter SuperNode waits), ``"warm"`` (the worker, Flower's waits) or
            ``"stock"`` (Flower's process per message). A faster mode falls back to
            ``"stock"`` with a warning when the installed Flower does not fit it.
        after_run: called with the still running deployment once the run has finished
            (e.g. to measure it while idle).
        check_run_dir: refuse a run folder holding results here, before anything starts
            (False leaves the refusal to the ServerApp, on the SuperLink).
        tolerate_exits: a SuperNode that exits during the run is logged and the run goes on
            (the ServerApp counts the party absent); False fails the run at once naming it.
            Default: True when the config lets rounds go on with parties missing
            (``federation.min_clients`` below the number of parties).

    Returns:
        A :class:`DeployResult` (run folder, timings, the run's summary).

    Raises:
        ConfigError: the config is rejected before anything starts.
        DeploymentError: a process did not start, the run failed or did not finish in time;
            the message carries the ServerApp's error. Every process is stopped either way.
    """
    cfg, overrides, n_nodes = resolve(config, list(overrides), out, clients)
    if insecure and (keys is not None or rogue):
        raise ConfigError("--insecure: cannot be combined with --keys or rogue nodes")
    key_set = None if insecure or keys is None else KeySet(Path(keys), n_nodes)
    if key_set is not None:
        key_set.server.check()
        for k in range(n_nodes):
            key_set.party(k).check()
    shard_dir = None if shards is True or shards is False else Path(shards)
    if shard_dir is not None:
        from liquid_fed.shards import load_party_shard, load_server_shard

        load_server_shard(shard_dir / "server", cfg)  # refused here, before anything starts
        for k in range(cfg.n_clients):
            load_party_shard(shard_dir / f"party-{k}", k, cfg)
    run_dir = Path(cfg.out) / cfg.name
    if check_run_dir:
        check_new_run_dir(run_dir)
    own_dir = work_dir is None
    base = Path(tempfile.mkdtemp(prefix="lf-deploy-")) if own_dir else Path(work_dir)
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        if key_set is None and not insecure:
            key_set = make_keys(base / "keys", n_nodes)
        if shards is True:
            from liquid_fed.shards import write_shards

            shard_dir = base / "shards"
            write_shards(cfg, shard_dir)
    except BaseException:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
        raise
    if tolerate_exits is None:
        tolerate_exits = tolerates_absence(cfg)
    dep = LocalDeployment(n_nodes, base, echo, keys=key_set, shards=shard_dir, rogue=rogue,
                          mode=mode, tolerate_exits=tolerate_exits)
    try:
        with dep:
            dep.start()
            t_run = time.time()
            run_id, status, summary = submit_run(
                dep, config, overrides, run_dir, timeout,
                shard_dir / "server" if shard_dir is not None else None)
            run_seconds = time.time() - t_run
            exchanges = dep.exchange_seconds()
            if after_run is not None:
                after_run(dep)
            return DeployResult(
                run_dir=run_dir, run_id=run_id, status=status,
                superlink_ready_seconds=dep.superlink_ready_seconds,
                node_connect_seconds=dep.node_connect_seconds, run_seconds=run_seconds,
                total_seconds=time.time() - t0, exchange_seconds=exchanges,
                ports=list(dep.ports), tag=dep.tag,
                summary=summary, mode=",".join(sorted(set(dep.node_modes()))),
                secure=key_set is not None, shards=shard_dir,
                rogue_exits=list(dep.rogue_exits))
    except DeploymentError as exc:
        exc.tag, exc.ports = dep.tag, tuple(dep.ports)
        raise
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """``data`` as a TOML file (Flower's run config and connections)."""
    import tomli_w  # a dependency of flwr

    path.write_text(tomli_w.dumps(data))


