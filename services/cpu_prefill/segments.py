"""Named POSIX shared-memory segments of the node's data plane: naming, untracked attach, and stale-segment cleanup.

Every segment is named f"{prefix}-{creator pid}-{suffix}" so that the supervisor can find the segments of a process
that died without unlinking them (cleanup_stale_segments).

Ownership: the process that creates a segment owns it and unlinks it. A creator's segment is registered with its
multiprocessing resource tracker (the standard library's safety net: the tracker unlinks it if the creator exits
without doing so). Processes that only attach must NOT be tracked: on Python < 3.13 `SharedMemory(name)` registers
the segment with the attaching process's tracker too, which then unlinks it (with a "leaked shared_memory" warning)
when that process exits, under the creator's feet. Unregistering after the fact is no fix either: a process started
by multiprocessing shares its parent's tracker, so the unregister would drop the creator's registration.
attach_segment therefore opens the segment without registering it (track=False on 3.13+; on 3.11/3.12 by
suppressing the register call for the duration of the constructor, under a lock).
"""
from __future__ import annotations

import os
import sys
import threading
import uuid
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

SHM_DIR = Path("/dev/shm")
DEFAULT_PREFIX = "caraserve"

_untracked_lock = threading.Lock()


def new_segment_name(prefix: str = DEFAULT_PREFIX) -> str:
    """A fresh name f"{prefix}-{pid}-{8 hex}"; POSIX names stay well under the 255-byte limit."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def create_segment(nbytes: int, prefix: str = DEFAULT_PREFIX) -> SharedMemory:
    """Create (and own) a zero-filled segment of at least nbytes > 0 bytes."""
    return SharedMemory(name=new_segment_name(prefix), create=True, size=nbytes)


def attach_segment(name: str) -> SharedMemory:
    """Map an existing segment without registering it with this process's resource tracker (see module doc).

    The caller closes the handle when done (after dropping every view into shm.buf) and never unlinks it.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    with _untracked_lock:
        register = resource_tracker.register
        resource_tracker.register = _register_except_shared_memory(register)
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = register


def _register_except_shared_memory(register):
    def patched(name, rtype):
        if rtype != "shared_memory":
            register(name, rtype)
    return patched


def segment_creator_pid(name: str, prefix: str = DEFAULT_PREFIX) -> int | None:
    """The creator pid encoded in a segment name, or None if the name is not one of ours."""
    if not name.startswith(prefix + "-"):
        return None
    pid = name[len(prefix) + 1:].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether pid is a live process of this pid namespace (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def cleanup_stale_segments(prefix: str = DEFAULT_PREFIX, alive_pids: set[int] | None = None) -> list[str]:
    """Unlink the /dev/shm segments named f"{prefix}-{pid}-..." whose creator pid is dead; return their names.

    alive_pids, when given, is the set of pids to treat as alive (e.g. the supervisor's children plus itself);
    otherwise a pid is alive if the process exists and is not a zombie. This process's own pid is never stale.
    """
    removed = []
    try:
        entries = sorted(p.name for p in SHM_DIR.iterdir())
    except FileNotFoundError:
        return removed
    for name in entries:
        pid = segment_creator_pid(name, prefix)
        if pid is None or pid == os.getpid():
            continue
        alive = pid in alive_pids if alive_pids is not None else pid_alive(pid)
        if alive:
            continue
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            continue  # someone else cleaned it first
        removed.append(name)
    return removed
