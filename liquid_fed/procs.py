"""Processes that must die with whoever started them: the one supervisor of every launcher.

``liquid-fed run`` (:mod:`simulations.simulate`), the hosts (:mod:`server.host`,
:mod:`clients.host`) and the loopback rehearsal (:mod:`server.deploy_local`) start their
processes through this module: a child leads its own session, carries an environment tag that
every descendant inherits, and is stopped — with everything tagged — whatever ends the command.

Linux ``/proc`` only; no third-party dependency.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from liquid_fed.errors import ConfigError, DeploymentError
from liquid_fed.rundir import private_folder

#: The repository root: the Flower App (pyproject.toml) whose packages children import.
APP_DIR = Path(__file__).resolve().parent.parent
#: The environment variable tagging every process of a :class:`ProcessGroup`.
TAG_ENV = "LIQUID_FED_DEPLOY_TAG"
#: Set by ``liquid-fed server-host`` for its SuperLink: the file every ServerApp it spawns
#: appends its per-round progress lines to (Flower does not pass a ServerApp's output on).
PROGRESS_ENV = "LIQUID_FED_PROGRESS_FILE"
#: Lines of a child's output kept in memory (its whole log is on disk).
MAX_LINES = 20_000
CHILD_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a process."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[3])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def tree(root: int, marker: str | None = None) -> set[int]:
    """``root``, its descendants, its session, and processes whose command line has ``marker``."""
    parents: dict[int, int] = {}
    found = {root}
    for pid in _pids():
        st = _stat(pid)
        if st is None:
            continue
        parents[pid] = st[0]
        if st[1] == root:
            found.add(pid)
        elif marker and marker in _read(f"/proc/{pid}/cmdline").replace("\0", " "):
            found.add(pid)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    found.discard(os.getpid())
    return {p for p in found if _stat(p) is not None}


def pss_bytes(pids: set[int]) -> int:
    """Proportional set size of the processes (shared pages split fairly), in bytes."""
    total = 0
    for pid in pids:
        for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pids: set[int]) -> int:
    """Resident set size of the processes, summed (``/proc/PID/statm``: a counter, cheap to
    read, unlike the page-table walk of ``smaps_rollup``), in bytes."""
    total = 0
    for pid in pids:
        fields = _read(f"/proc/{pid}/statm").split()
        if len(fields) > 1:
            total += int(fields[1]) * PAGE_SIZE
    return total


class PeakMemory(threading.Thread):
    """Samples the PSS of a process tree until stopped; ``peak`` is the largest sum seen.

    Reading PSS walks every page table of every process (``smaps_rollup``): at 4 samples a
    second it cost the launcher 15 % of a core during a simulation and holds each process's
    memory-map lock while it reads. So every ``interval`` the tree's resident size (a counter)
    is read, and PSS only when it can have reached a new peak: a process joined or left the
    tree, the resident size grew by more than ``slack`` bytes since the last PSS reading
    (new pages are resident before they count in PSS, and a new page adds the same to both
    sums), or ``refresh`` seconds passed since it.
    """

    def __init__(self, root: int, marker: str | None = None, interval: float = 0.25,
                 slack: int = 4 << 20, refresh: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.root, self.marker, self.interval = root, marker, interval
        self.slack, self.refresh = slack, refresh
        self.peak = 0
        self.ticks = self.pss_reads = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        pids: set[int] = set()
        rss_then, read_at = 0, -float("inf")
        while not self._stop_event.is_set():
            now_pids = tree(self.root, self.marker)
            rss = rss_bytes(now_pids)
            self.ticks += 1
            if (now_pids != pids or rss > rss_then + self.slack
                    or time.monotonic() - read_at >= self.refresh):
                self.peak = max(self.peak, pss_bytes(now_pids))
                self.pss_reads += 1
                pids, rss_then, read_at = now_pids, rss, time.monotonic()
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux prctl).

    Run in the child (e.g. as ``preexec_fn``): a launcher killed with SIGKILL then still
    takes its child down, and the child's handler for ``sig`` cleans up after itself.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def start_session(cmd: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = (),
                  parent_death_signal: int | None = signal.SIGTERM, output: IO | None = None
                  ) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new session (its own process group).

    Args:
        cmd: the command.
        env: its environment.
        pass_fds: descriptors the child inherits (e.g. the run folder's lock).
        parent_death_signal: sent to the child when this process dies, however it dies
            (None: not asked for).
        output: where its stdout and stderr go (None: this process's own).
    """
    parent = os.getpid()

    def prepare() -> None:
        if parent_death_signal is not None:
            die_with_parent(parent_death_signal)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), parent_death_signal)

    return subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=pass_fds,
                            preexec_fn=prepare, stdout=output,
                            stderr=None if output is None else subprocess.STDOUT)


def terminate(proc: subprocess.Popen, marker: str | None = None, grace: float = 10.0,
              settle: float = 0.5) -> int:
    """Stop ``proc``'s whole tree: SIGINT, then SIGTERM, then SIGKILL; returns how many remained
    after SIGINT (0 when the child had already cleaned up after itself).

    ``grace`` is the child's time to clean up after SIGINT. Once the child has exited, what is
    left of its tree is a straggler its cleanup missed, and gets ``settle`` seconds per signal
    instead of the rest of the grace: Ray's dashboard agent, which ignores SIGINT and SIGTERM
    while it shuts down, held a stopped run's launcher for the full 10 + 5 s.
    """
    members = tree(proc.pid, marker)
    exited_at = None
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        members = tree(proc.pid, marker) | {p for p in members if _stat(p) is not None}
        if not members:
            break
        _signal(members, sig)
        sent = time.monotonic()
        deadline = sent + wait
        while time.monotonic() < deadline:
            if proc.poll() is None:
                time.sleep(0.05)
                continue
            if not {p for p in members if _stat(p) is not None and _alive(p)}:
                break
            exited_at = exited_at or time.monotonic()
            deadline = min(deadline, max(exited_at, sent) + settle)
            time.sleep(0.05)
    proc.poll()
    return len(members)


def _signal(pids: set[int], sig: int) -> None:
    """Send ``sig`` to each process that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    """False for zombies (exited, not yet reaped) and vanished processes."""
    text = _read(f"/proc/{pid}/stat")
    return bool(text) and text[text.rfind(")") + 2] != "Z"


def leftovers(root: int, marker: str | None = None) -> set[int]:
    """Live processes still tied to a finished run (its session or its marker), but this one."""
    return {p for p in tree(root, marker) if _alive(p)}


def tagged(name: str, value: str) -> set[int]:
    """Live processes whose environment holds ``name=value`` (inherited by every descendant,
    whatever session or parent it ends up with)."""
    needle = f"{name}={value}".encode()
    found = set()
    for pid in _pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and _alive(pid):
            found.add(pid)
    found.discard(os.getpid())
    return found


def kill_tagged(name: str, value: str, grace: float = 5.0, gentle: bool = True,
                root: int | None = None) -> set[int]:
    """Stop every process tagged ``name=value`` (but this one), and every live process of
    ``root``'s tree when given (:func:`leftovers`: its descendants and its session, found
    whatever they did to their environment; Ray's agents, which set their process titles,
    were now and then not found by their tag while they shut down): SIGTERM, then SIGKILL
    what outlives ``grace`` seconds (``gentle=False``: SIGKILL at once); returns those still
    alive afterwards (normally none)."""

    def members() -> set[int]:
        return tagged(name, value) | (leftovers(root) if root is not None else set())

    steps = ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)) if gentle else (
        (signal.SIGKILL, 2.0),)
    for sig, wait in steps:
        found = members()
        if not found:
            return set()
        _signal(found, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and members():
            time.sleep(0.1)
    return members()


# --------------------------------------------------------------------------------------------
# Supervised children with logs, and ports
# --------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for wildcards and anything else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_insecure(insecure: bool, hosts: list[str], what: str) -> None:
    """Refuse ``--insecure`` unless every address in ``hosts`` is a loopback address."""
    if insecure and not all(is_loopback(h) for h in hosts):
        raise ConfigError(f"--insecure with {what} {', '.join(hosts)}: refused; without TLS "
                          "and SuperNode authentication only loopback (127.0.0.1) is allowed. "
                          "Make keys with `liquid-fed keys` and pass --keys instead")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (it can be bound again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def executable(name: str) -> str:
    """A Flower entry point next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} is not installed (looked in {local.parent} and PATH)")
    return found


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def private_file(path: Path) -> IO[str]:
    """``path`` opened for writing (truncated) as a 0600 file, whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, "w")


def _child_setup(parent: int, parent_death_signal: int | None, umask: int | None
                 ) -> Callable[[], None]:
    """``preexec_fn`` of a supervised child: its umask, and ``parent_death_signal`` when the
    thread that started it dies (the launcher killed with SIGKILL included)."""

    def prepare() -> None:
        if umask is not None:
            os.umask(umask)
        if parent_death_signal is not None:
            die_with_parent(parent_death_signal)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), parent_death_signal)

    return prepare


class Child:
    """A child process in its own session whose output goes, time-stamped, to a log file
    (mode 0600); it receives ``parent_death_signal`` (default SIGTERM) when its launcher dies,
    however it dies. Start children from a thread that lives as long as they should: the kernel
    sends that signal when the *thread* that started the child ends."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path,
                 log_path: Path, echo: IO[str] | None = None,
                 parent_death_signal: int | None = signal.SIGTERM,
                 umask: int | None = None) -> None:
        self.name, self.log_path, self.echo = name, log_path, echo
        self.started = time.time()
        # The latest lines only: a long-lived child (server-host's SuperLink) logs for days;
        # its whole log is in log_path.
        self.lines: collections.deque[tuple[float, str]] = collections.deque(maxlen=MAX_LINES)
        self.written = 0  # lines written in all (the deque keeps the latest)
        self._lock = threading.Lock()
        self._out = private_file(log_path)
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, text=True, errors="replace",
                                     preexec_fn=_child_setup(os.getpid(), parent_death_signal,
                                                             umask))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self._out as out:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                now = time.time()
                with self._lock:
                    self.lines.append((now, line.rstrip("\n")))
                    self.written += 1
                out.write(f"{now:.3f} {line}")
                out.flush()
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()

    def find(self, pattern: re.Pattern[str]) -> list[tuple[float, re.Match[str]]]:
        with self._lock:
            lines = list(self.lines)
        return [(t, m) for t, line in lines if (m := pattern.search(line))]

    def since(self, seen: int) -> tuple[int, list[tuple[float, str]]]:
        """The lines written after the first ``seen`` (those still kept), and how many have
        been written in all: ``seen, new = child.since(seen)`` follows the output."""
        with self._lock:
            new = min(self.written - seen, len(self.lines))
            return self.written, list(self.lines)[len(self.lines) - new:] if new > 0 else []

    def text(self) -> list[str]:
        """The lines it has written so far (the latest :data:`MAX_LINES`)."""
        with self._lock:
            return [line for _, line in self.lines]

    def tail(self, n: int = 15) -> str:
        with self._lock:
            return "\n".join(line for _, line in list(self.lines)[-n:])

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_closed(self, timeout: float) -> None:
        self._reader.join(timeout)


class ProcessGroup:
    """Children started in their own sessions, all tagged ``LIQUID_FED_DEPLOY_TAG=<tag>``.

    Use as a context manager: every process started through :meth:`spawn` (and every process
    those spawn, whatever session they end up in) is gone after ``__exit__``. Each child's output
    goes, time-stamped, to ``<work_dir>/<name>.log`` (0600; the work folder, when this creates
    it, and each child's home are 0700).

    Whatever kills the launcher (SIGKILL included), its children go too: each child gets
    SIGTERM from the kernel when the launcher dies (``PR_SET_PDEATHSIG``), and a guard process
    started with the first child (a reaper, :func:`start_reaper`) then stops everything carrying the
    tag, grandchildren in other sessions included (SuperExec, ClientApp processes, workers).

    Args:
        work_dir: the logs' folder and the children's working directory.
        echo: where children started with ``echo=True`` copy their output.
        umask: the children's umask (e.g. 0o077: every file they write is 0600, every folder
            0700); None keeps this process's.
        guard: start the guard, a reaper (:func:`start_reaper`) that stops the group once this
            process is gone (False: only the kernel's parent-death signal).
        reaper_hook: what the guard runs first when this process dies (see
            :func:`start_reaper`; e.g. ``flwr stop`` of a run this process submitted).
    """

    def __init__(self, work_dir: Path, echo: IO[str] | None = None,
                 umask: int | None = None, guard: bool = True,
                 reaper_hook: Path | None = None) -> None:
        self.work_dir = Path(work_dir).absolute()
        self.echo = echo
        self.tag = f"lf-deploy-{uuid.uuid4().hex}"
        self.children: list[Child] = []
        self.ports: list[int] = []
        self.umask = umask
        self.use_guard = guard
        self.reaper_hook = reaper_hook
        self.guard: subprocess.Popen | None = None

    def env(self, home: Path) -> dict[str, str]:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        # clients.supernode / clients.worker come from this app, not another install.
        pythonpath = os.pathsep.join(p for p in (str(APP_DIR), os.environ.get("PYTHONPATH"))
                                     if p)
        return {**os.environ, **CHILD_ENV, TAG_ENV: self.tag, "FLWR_HOME": str(home),
                "PATH": path, "PYTHONPATH": pythonpath}

    def start_guard(self) -> None:
        """Start the guard that stops this group when the launcher dies (once)."""
        if self.guard is not None or not self.use_guard:
            return
        self.guard = start_reaper(self.tag, self.reaper_hook)

    def spawn(self, name: str, cmd: list[str], home: Path, echo: bool = False) -> Child:
        """Start ``cmd`` with ``FLWR_HOME=home``; its log is ``<work_dir>/<name>.log``."""
        private_folder(self.work_dir, claim=False)
        # Children run in work_dir: no relative home.
        home = private_folder(Path(home).absolute(), claim=False)
        self.start_guard()
        child = Child(name, cmd, self.env(home), self.work_dir, self.work_dir / f"{name}.log",
                      self.echo if echo else None, umask=self.umask)
        self.children.append(child)
        return child

    def check_alive(self, child: Child, during: str = "start-up") -> None:
        """Raise :class:`DeploymentError` with ``child``'s last lines if it has exited."""
        if child.proc.poll() is not None:
            child.wait_closed(2)
            raise DeploymentError(
                f"{child.name} exited with status {child.proc.returncode} during {during}:\n"
                f"{child.tail()}"
            )

    def stop(self, grace: float = 8.0) -> set[int]:
        """SIGTERM every child's session, then SIGTERM/SIGKILL anything tagged that is left;
        returns the pids still alive afterwards (normally none)."""
        for child in reversed(self.children):
            child.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in self.children):
            time.sleep(0.1)
        left = kill_tagged(TAG_ENV, self.tag, grace=3.0)
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
            child.proc.wait(timeout=5)
            child.wait_closed(2)
        if self.guard is not None:  # its work is done; SIGKILL: no sweep of its own
            self.guard.kill()
            self.guard.wait(timeout=5)
            self.guard = None
        return left

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        left = self.stop()
        if left:
            import logging

            logging.getLogger(__name__).warning("processes still alive after cleanup: %s",
                                                sorted(left))



# --------------------------------------------------------------------------------------------
# A reaper: what a launcher killed with SIGKILL started still goes
# --------------------------------------------------------------------------------------------

#: Seconds the reaper gives its hook (e.g. ``flwr stop``) before it stops the tagged processes.
REAPER_HOOK_TIMEOUT = 60.0

# The reaper runs as ``python -c REAPER_SOURCE``: standard library only, so it starts in tens
# of milliseconds and a few MB (importing this package would pull in torch).
REAPER_SOURCE = r"""
import json, os, signal, subprocess, sys, time
pid, start, tag, hook, poll, hook_timeout = sys.argv[1:7]
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
def stat(p):
    try:
        text = open(f"/proc/{p}/stat").read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()
def alive(p, start=None):
    f = stat(p)
    return f is not None and f[0] != "Z" and (start is None or f[19] == start)
while alive(int(pid), start):
    time.sleep(float(poll))
if hook and os.path.isfile(hook):
    try:
        spec = json.load(open(hook))
        subprocess.run(spec["argv"], env={**os.environ, **spec.get("env", {})},
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=float(hook_timeout))
    except Exception:
        pass  # nobody is left to tell; the tagged processes are stopped all the same
needle = f"LIQUID_FED_DEPLOY_TAG={tag}".encode()
def tagged():
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if needle in env and alive(int(p)):
                found.append(int(p))
    return found
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
    for p in tagged():
        try:
            os.kill(p, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and tagged():
        time.sleep(0.1)
"""


def start_reaper(tag: str, hook: Path | None = None, poll: float = 0.5) -> subprocess.Popen:
    """Start a small process that outlives this one and, once this one is gone however it
    went (SIGKILL included), stops every process tagged ``TAG_ENV=tag``.

    A SuperLink's grandchildren (SuperExec, ServerApp) are not this process's children and
    do not see it die: ``PR_SET_PDEATHSIG`` cannot reach them, the tag can. The reaper leads
    its own session (Ctrl-C on the terminal does not reach it), carries no tag itself, and
    exits once its work is done: after a clean stop it finds nothing tagged.

    Args:
        tag: the :class:`ProcessGroup` tag to stop.
        hook: a JSON file ``{"argv": [...], "env": {...}}``; when it exists at the launcher's
            death the reaper runs that command first (at most :data:`REAPER_HOOK_TIMEOUT`
            seconds), e.g. ``flwr stop RUN`` for a run whose submitter died.
        poll: seconds between checks of the launcher.

    Returns:
        The reaper's process (it ends by itself).
    """
    assert TAG_ENV == "LIQUID_FED_DEPLOY_TAG"  # REAPER_SOURCE spells it out
    env = {k: v for k, v in os.environ.items() if k != TAG_ENV}
    cmd = [sys.executable, "-S", "-c", REAPER_SOURCE, str(os.getpid()),
           start_time(os.getpid()), tag, str(hook or ""), str(poll), str(REAPER_HOOK_TIMEOUT)]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" when it is gone): tells a
    process apart from a later one that got the same pid."""
    text = _read(f"/proc/{pid}/stat")
    return text[text.rfind(")") + 2:].split()[19] if text else ""


def pid_alive(pid: int, started: str | None = None) -> bool:
    """True while ``pid`` runs (not a zombie) and, if given, is still the process that
    started at ``started`` (see :func:`start_time`)."""
    return _alive(pid) and (started is None or start_time(pid) == started)
