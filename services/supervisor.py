"""Process supervision for `caraserve up`: start the mesh services as child processes, restart the ones that
crash, and stop them all, in reverse order, without leaving orphans.

Each child runs in its own session and process group (`start_new_session=True`), so a Ctrl-C in the terminal
reaches only `up`, which then stops the children in order; signals go to the child's whole group, so whatever
a service spawned goes with it. On Linux each child also gets PR_SET_PDEATHSIG=SIGTERM: if `up` itself dies
(even by SIGKILL) the kernel sends the child SIGTERM, and it stops as on a normal shutdown.

The supervisor is synchronous and single-threaded: `poll()` is called in the caller's loop every few hundred
milliseconds; it notices exits, schedules restarts (after `restart_delay`) and raises GiveUp when one child
crashed `max_crashes` times within `crash_window` seconds. Use it from the main thread: the death signal fires
when the *thread* that started the child ends, and a preexec_fn is only safe without other threads running.
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from services.cpu_prefill.segments import cleanup_stale_segments

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "caraserve"  # services name their POSIX shared memory segments caraserve-...


class GiveUp(RuntimeError):
    """A child keeps crashing; the message says which, how often and its last exit code."""


@dataclass
class ChildSpec:
    """How to start one service process. `env(n)` is its environment for its n-th start (0: the first)."""

    name: str  # shown in messages: "gateway", "gpu_worker[0]"
    argv: list[str]
    env: Callable[[int], dict[str, str]]


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen | None = None
    starts: int = 0  # how many times it was started
    crashes: collections.deque = field(default_factory=collections.deque)  # monotonic times of unexpected exits
    restart_at: float | None = None  # monotonic time of a scheduled restart

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def describe_exit(returncode: int) -> str:
    """'code 1' or 'signal SIGKILL' for a Popen returncode."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGTERM when this process dies (Linux only; else None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: nothing to load in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody would tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (the child and what it spawned); ignore a gone group."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Starts `specs` in order, restarts crashed ones, stops them in reverse order."""

    def __init__(self, specs: list[ChildSpec], *, out: TextIO | None = None, restart_delay: float = 1.0,
                 max_crashes: int = 5, crash_window: float = 60.0, stop_timeout: float = 15.0) -> None:
        self.children = [Child(spec) for spec in specs]
        self.out = out or sys.stderr
        self.restart_delay = restart_delay
        self.max_crashes = max_crashes
        self.crash_window = crash_window
        self.stop_timeout = stop_timeout
        self._preexec = _die_with_parent_preexec()

    def _say(self, message: str) -> None:
        print(f"caraserve up: {message}", file=self.out, flush=True)

    def _start(self, child: Child) -> None:
        child.process = subprocess.Popen(
            child.spec.argv, env=child.spec.env(child.starts), stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=self._preexec,  # output: inherited, the services' lines name them
        )
        child.starts += 1
        child.restart_at = None

    def start(self, name: str) -> Child:
        """Start the child `name` (once; later starts are restarts, which poll() does)."""
        child = next(c for c in self.children if c.spec.name == name)
        if child.process is None:
            self._start(child)
        return child

    def start_all(self) -> None:
        """Start, in order, every child not started yet."""
        for child in self.children:
            if child.process is None:
                self._start(child)

    def running(self, prefix: str) -> bool:
        """Whether some child whose name starts with `prefix` is running now."""
        return any(c.running() for c in self.children if c.spec.name.startswith(prefix))

    def poll(self) -> None:
        """Notice exited children, restart the due ones; GiveUp when one crashed too often."""
        now = time.monotonic()
        for child in self.children:
            if child.process is not None and child.restart_at is None and child.process.poll() is not None:
                code = child.process.returncode
                _signal_group(child.process.pid, signal.SIGKILL)  # what it spawned goes with it
                for name in cleanup_stale_segments():  # its shared memory (cpu_prefill channels, host cache)
                    self._say(f"removed shared memory /dev/shm/{name} of a dead process")
                child.crashes.append(now)
                while child.crashes and now - child.crashes[0] > self.crash_window:
                    child.crashes.popleft()
                if len(child.crashes) >= self.max_crashes:
                    raise GiveUp(f"{child.spec.name} exited {len(child.crashes)} times within "
                                 f"{self.crash_window:g}s (last: {describe_exit(code)}); giving up")
                self._say(f"{child.spec.name} (pid {child.process.pid}) exited unexpectedly with "
                          f"{describe_exit(code)}; restarting it in {self.restart_delay:g}s")
                child.restart_at = now + self.restart_delay
            if child.restart_at is not None and now >= child.restart_at:
                self._start(child)
                self._say(f"{child.spec.name} restarted (pid {child.process.pid})")

    def stop_all(self) -> None:
        """SIGTERM each child in reverse start order, SIGKILL after `stop_timeout`; reap everything."""
        for child in reversed(self.children):
            process = child.process
            child.restart_at = None
            if process is None:
                continue
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._say(f"{child.spec.name} did not stop within {self.stop_timeout:g}s; killing it")
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
                if process.returncode not in (0, -signal.SIGTERM):
                    self._say(f"{child.spec.name} stopped with {describe_exit(process.returncode)}")
            _signal_group(process.pid, signal.SIGKILL)  # stragglers of its group, if any


def shm_entries() -> set[str]:
    """Names in /dev/shm now (empty where there is none)."""
    try:
        return {entry.name for entry in SHM_DIR.iterdir()}
    except OSError:
        return set()


def remove_new_shm(before: set[str]) -> list[str]:
    """Remove the caraserve-* shared memory segments created since `before` (a crashed or killed service's
    leftovers: its children are all gone when this runs); return their names. Others' segments stay."""
    removed = []
    for name in sorted(shm_entries() - before):
        if name.startswith(SHM_PREFIX):
            try:
                (SHM_DIR / name).unlink()
                removed.append(name)
            except OSError:
                pass
    return removed
