"""Node-local rendezvous between engines with CPU assist (gpu_workers) and cpu_prefill processes that join them.

Not NATS: a joiner must share the engine's /dev/shm anyway, so it meets the engine in a directory of the node.

    <data dir>/run/cpu_prefill/         mode 0700: only this user's processes reach the sockets
        authkey                         32 random bytes (0600), created once; both sides prove they read it
                                        (multiprocessing.connection's HMAC challenge) before anything else
        <pid>-<hex8>.sock               one engine's listening Unix socket (multiprocessing.connection.Listener)
        <pid>-<hex8>.lock               held with flock by that engine while it lives; holds its worker count

A crashed engine leaves its .sock and .lock files behind; the kernel drops its flock, so a joiner that cannot
connect takes the lock (works across pid namespaces, unlike the pid in the name) and removes both. The count lets
joiners pick the least-served engine of the node.

This module imports only the standard library (the `caraserve serve cpu_prefill` parser imports it).
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection as mpc
from pathlib import Path

log = logging.getLogger("caraserve.cpu_prefill.rendezvous")

AUTHKEY_FILE = "authkey"
SOCKET_SUFFIX = ".sock"
LOCK_SUFFIX = ".lock"
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with its terminating NUL
NAME_LENGTH = 24  # f"{pid}-{hex8}.sock" with a pid of up to 10 digits
COUNT_BYTES = 12  # the count field at the start of a .lock file, space padded


class RendezvousError(OSError):
    """The rendezvous directory or socket cannot be set up (unwritable, path too long, ...)."""


def run_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """<data dir>/run/cpu_prefill for a --data-dir override (None: $CARASERVE_DATA_DIR or ~/.cache/caraserve)."""
    from shared.paths import data_dir as resolve_data_dir

    return resolve_data_dir(data_dir) / "run" / "cpu_prefill"


def check_path_length(directory: Path) -> None:
    longest = len(os.fsencode(str(directory))) + 1 + NAME_LENGTH
    if longest > MAX_SOCKET_PATH:
        raise RendezvousError(f"{directory}: too long for a Unix socket path ({longest} > {MAX_SOCKET_PATH} "
                              "bytes); use a shorter --data-dir")


def ensure_dir(directory: Path) -> Path:
    """Create the directory (mode 0700) if needed; tighten an existing one of ours to 0700."""
    check_path_length(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = directory.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            directory.chmod(0o700)
    except OSError as exc:
        raise RendezvousError(f"cannot use {directory}: {exc.strerror or exc}") from None
    return directory


def read_authkey(directory: Path, create: bool = False) -> bytes | None:
    """The node's key (created atomically on first use when `create`); None if absent and not created."""
    path = directory / AUTHKEY_FILE
    try:
        key = path.read_bytes()
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    if not create:
        return None
    tmp = directory / f".authkey-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(32))
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # create-if-absent, complete: the first engine's key wins, the others read it
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes()


# ---- the engine side ---------------------------------------------------------------------------------------------
class RendezvousListener:
    """An engine's socket: a background thread accepts joiners; each gets its own thread for the handshake and
    `on_join(conn, info)` (info: the joiner's dict), which owns conn from then on (closes it if it refuses)."""

    HANDSHAKE_TIMEOUT_S = 10.0  # for the join message, after the authentication

    def __init__(self, directory: str | os.PathLike, on_join: Callable[[mpc.Connection, dict], None]) -> None:
        self.directory = ensure_dir(Path(directory))
        self.on_join = on_join
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = self.directory / (self.name + SOCKET_SUFFIX)
        self.lock_path = self.directory / (self.name + LOCK_SUFFIX)
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._lock_fd = -1
        self._listener = None
        for engine in list_engines(self.directory):  # tidy up after crashed engines
            if remove_if_stale(engine):
                log.info("removed the socket of a gone engine: %s", engine.path)
        try:
            self._key = read_authkey(self.directory, create=True)
            tmp = self.directory / f".{self.name}{LOCK_SUFFIX}"
            self._lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.set_count(0)
            os.rename(tmp, self.lock_path)  # visible only once locked: never mistaken for a dead engine's
            self._listener = mpc.Listener(str(self.path), family="AF_UNIX", backlog=32)
        except OSError as exc:
            self._cleanup_files()
            raise RendezvousError(f"cannot listen at {self.path}: {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._accept_loop, name=f"cpu_prefill-rendezvous-{self.name}",
                                        daemon=True)

    def start(self) -> RendezvousListener:
        """Start accepting (a separate step, so that the owner holds this object before on_join can run)."""
        self._thread.start()
        return self

    def set_count(self, count: int) -> None:
        """Publish how many workers serve this engine (joiners prefer the engine with fewest)."""
        if self._lock_fd >= 0:
            try:
                os.pwrite(self._lock_fd, str(count).ljust(COUNT_BYTES).encode(), 0)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            if self._closed:
                conn.close()
                return
            t = threading.Thread(target=self._handshake, args=(conn,), name="cpu_prefill-join", daemon=True)
            with self._threads_lock:
                self._threads.add(t)
            t.start()

    def _handshake(self, conn: mpc.Connection) -> None:
        try:
            try:
                mpc.deliver_challenge(conn, self._key)  # what Listener(authkey=...) does, off the accept thread
                mpc.answer_challenge(conn, self._key)
                if not conn.poll(self.HANDSHAKE_TIMEOUT_S):
                    raise TimeoutError("no join message")
                msg = conn.recv()
                if not (isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "join" and isinstance(msg[1], dict)):
                    raise ValueError(f"unexpected message {type(msg).__name__}")
            except (OSError, EOFError, mpc.AuthenticationError, ValueError, TimeoutError) as exc:
                log.warning("rendezvous %s: refused a connection: %s", self.name, exc)
                conn.close()
                return
            if self._closed:
                conn.close()
                return
            try:
                self.on_join(conn, msg[1])
            except Exception:  # noqa: BLE001 - a bad joiner must not take the engine down
                log.exception("rendezvous %s: join failed", self.name)
                conn.close()
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def close(self) -> None:
        """Stop accepting, remove the socket and lock files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None and self._thread.is_alive():
            try:  # wake the accept() (closing the listener from here would not)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(str(self.path))
            except OSError:
                pass
            self._thread.join(timeout=2.0)
        if self._listener is not None:
            self._listener.close()  # unlinks the socket file
        with self._threads_lock:
            threads = list(self._threads)
        for t in threads:  # joins in progress see _closed and give up; a stuck client is left to its daemon thread
            t.join(timeout=1.0)
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        for path in (self.path, self.lock_path, self.directory / f".{self.name}{LOCK_SUFFIX}"):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


# ---- the joiner side ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSocket:
    name: str  # "<pid>-<hex8>"
    path: Path
    count: int  # workers serving it, as it last published


def list_engines(directory: Path) -> list[EngineSocket]:
    """The engines listening in directory (stale ones included until someone removes them), sorted by name."""
    out = []
    try:
        entries = sorted(directory.glob("*" + SOCKET_SUFFIX))
    except OSError:
        return out
    for path in entries:
        name = path.name[: -len(SOCKET_SUFFIX)]
        try:
            count = int((directory / (name + LOCK_SUFFIX)).read_bytes()[:COUNT_BYTES].strip() or 0)
        except (OSError, ValueError):
            count = 0
        out.append(EngineSocket(name, path, count))
    return out


def choose(engines: list[EngineSocket], index: int) -> EngineSocket:
    """The least-served engine; ties spread by the joiner's index (workers started together land on different
    engines)."""
    least = min(e.count for e in engines)
    ties = [e for e in engines if e.count == least]
    return ties[index % len(ties)]


def remove_if_stale(engine: EngineSocket) -> bool:
    """Whether engine's owner is gone (its flock is free): then its socket and lock files are removed."""
    lock_path = engine.path.with_name(engine.name + LOCK_SUFFIX)
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False  # closing right now: its socket goes with it
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held: the owner lives (maybe busy)
        for path in (engine.path, lock_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        return True
    finally:
        os.close(fd)


def connect(engine: EngineSocket, key: bytes) -> mpc.Connection:
    """Connect and authenticate (raises ConnectionRefusedError/FileNotFoundError for a gone engine,
    multiprocessing.AuthenticationError for a wrong key)."""
    return mpc.Client(str(engine.path), family="AF_UNIX", authkey=key)
