"""Process-tree helpers for launchers: run a child in its own session, measure, clean up.

Linux ``/proc`` only; no third-party dependency.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path


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


class PeakMemory(threading.Thread):
    """Samples the PSS of a process tree until stopped; ``peak`` is the largest sum seen."""

    def __init__(self, root: int, marker: str | None = None, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.marker, self.interval = root, marker, interval
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, pss_bytes(tree(self.root, self.marker)))
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
                  parent_death_signal: int | None = signal.SIGTERM) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new session (its own process group).

    Args:
        cmd: the command.
        env: its environment.
        pass_fds: descriptors the child inherits (e.g. the run folder's lock).
        parent_death_signal: sent to the child when this process dies, however it dies
            (None: not asked for).
    """
    parent = os.getpid()

    def prepare() -> None:
        if parent_death_signal is not None:
            die_with_parent(parent_death_signal)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), parent_death_signal)

    return subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=pass_fds,
                            preexec_fn=prepare)


def terminate(proc: subprocess.Popen, marker: str | None = None, grace: float = 10.0) -> int:
    """Stop ``proc``'s whole tree: SIGINT, then SIGTERM, then SIGKILL; returns how many remained
    after SIGINT (0 when the child had already cleaned up after itself)."""
    members = tree(proc.pid, marker)
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        members = tree(proc.pid, marker) | {p for p in members if _stat(p) is not None}
        if not members:
            break
        _signal(members, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is None:
                time.sleep(0.05)
                continue
            if not {p for p in members if _stat(p) is not None and _alive(p)}:
                break
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


def leftovers(root: int, marker: str) -> set[int]:
    """Live processes still tied to a finished run (its session or its marker)."""
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


def kill_tagged(name: str, value: str, grace: float = 5.0, gentle: bool = True) -> set[int]:
    """Stop every process tagged ``name=value`` (but this one): SIGTERM, then SIGKILL what
    outlives ``grace`` seconds (``gentle=False``: SIGKILL at once); returns those still alive
    afterwards (normally none)."""
    steps = ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)) if gentle else (
        (signal.SIGKILL, 2.0),)
    for sig, wait in steps:
        members = tagged(name, value)
        if not members:
            return set()
        _signal(members, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and tagged(name, value):
            time.sleep(0.1)
    return tagged(name, value)
