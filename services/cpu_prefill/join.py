"""A joined cpu_prefill worker: one process of `caraserve serve cpu_prefill`, serving the node's engines in turn.

Loop: find the engines listening in the rendezvous directory (services/cpu_prefill/rendezvous.py), join the
least-served one, map the channel it creates for us, answer its tasks (worker.serve_channel, the same loop as a
spawned worker's); when that engine closes, retires us or disappears, look again. With no engine there, wait (and
say so once). SIGTERM/SIGINT: set the channel's leaving flag, answer what the engine still hands over until it
acknowledges with the stop flag (or LEAVE_GRACE_S passes idle), disconnect and exit 0.

Engines whose shared memory this process cannot map (another IPC namespace: a container not sharing the engine's)
are skipped from then on; stale sockets of crashed engines are removed (rendezvous.remove_if_stale).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from multiprocessing import AuthenticationError
from pathlib import Path

from services.cpu_prefill import rendezvous as rv

log = logging.getLogger("caraserve.cpu_prefill.join")

POLL_S = 0.2  # while waiting for an engine
REPLY_TIMEOUT_S = 30.0  # for the engine's answer to a join
LEAVE_GRACE_S = 2.0  # leaving: exit when the engine has not acknowledged within this, idle


class _State:
    def __init__(self, parent_pid: int | None) -> None:
        self.parent_pid = parent_pid
        self.leaving = False

    def should_leave(self) -> bool:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.leaving = True  # the service process is gone: do not outlive it
        return self.leaving


def join_worker_main(directory: str, index: int, core: int | None = None, log_level: str = "info",
                     parent_pid: int | None = None) -> int:
    """The process entry (multiprocessing spawn target); returns when asked to leave (0)."""
    _setup_logging(log_level, index)
    from services.cpu_prefill.worker import setup_process

    setup_process(core)
    state = _State(parent_pid)

    def on_signal(signum, frame) -> None:
        state.leaving = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run_dir = Path(directory)
    skipped: set[str] = set()  # engines we cannot serve (their shared memory is not ours to map, wrong key)
    waiting_said = False
    while not state.should_leave():
        engines = [e for e in rv.list_engines(run_dir) if e.name not in skipped]
        if not engines:
            if not waiting_said:
                log.info("waiting for a gpu_worker at %s", run_dir)
                waiting_said = True
            time.sleep(POLL_S)
            continue
        engine = rv.choose(engines, index)
        if _serve_engine(run_dir, engine, index, core, state, skipped):
            waiting_said = False
    log.info("stopped")
    return 0


def _serve_engine(run_dir: Path, engine: rv.EngineSocket, index: int, core: int | None, state: _State,
                  skipped: set[str]) -> bool:
    """Join `engine` and serve it until it ends; whether we were joined at all."""
    from services.cpu_prefill.handoff import HandoffChannel
    from services.cpu_prefill.worker import serve_channel

    key = rv.read_authkey(run_dir)
    if key is None:
        time.sleep(POLL_S)
        return False
    try:
        conn = rv.connect(engine, key)
    except (ConnectionRefusedError, FileNotFoundError):
        if rv.remove_if_stale(engine):
            log.info("removed the socket of gpu_worker %s (gone)", engine.name)
        else:
            time.sleep(POLL_S)  # starting or closing: look again
        return False
    except AuthenticationError:
        log.warning("gpu_worker %s: authentication failed (another node's key?); skipping it", engine.name)
        skipped.add(engine.name)
        return False
    except OSError as exc:
        log.warning("gpu_worker %s: cannot connect: %s", engine.name, exc)
        time.sleep(POLL_S)
        return False
    channel = None
    try:
        try:
            conn.send(("join", {"pid": os.getpid(), "host": socket.gethostname(), "core": core, "index": index}))
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while not conn.poll(POLL_S):
                if state.should_leave() or time.monotonic() > deadline:
                    return False
            kind, info = conn.recv()
            if kind != "channel":
                log.warning("gpu_worker %s: unexpected answer %r", engine.name, kind)
                return False
            try:
                channel = HandoffChannel.attach(info["name"])
            except FileNotFoundError:
                log.warning("gpu_worker %s: cannot map its shared memory /dev/shm/%s (not this IPC namespace?); "
                            "skipping it", engine.name, info["name"])
                skipped.add(engine.name)
                return False
        except (EOFError, OSError) as exc:
            log.info("gpu_worker %s: join failed: %s", engine.name, exc)
            time.sleep(POLL_S)
            return False
        log.info("joined gpu_worker %s (engine pid %s) as its worker %s", engine.name, info.get("engine_pid"),
                 info.get("index"))
        leave_since = None

        def should_exit() -> bool:
            nonlocal leave_since
            if not state.should_leave():
                return False
            if leave_since is None:  # tell the engine; keep answering until it says stop
                channel.request_leave()
                leave_since = time.monotonic()
                return False
            return time.monotonic() - leave_since > LEAVE_GRACE_S

        why = serve_channel(channel, conn, should_exit)  # spinning for the engine's window (in the channel)
        if state.leaving:
            log.info("left gpu_worker %s", engine.name)
        else:
            reason = {"stop": "it stopped or retired this worker", "gone": "it closed the connection"}.get(why, why)
            log.info("gpu_worker %s ended this worker's service (%s); looking for a gpu_worker", engine.name, reason)
        return True
    finally:
        if channel is not None:
            channel.close()
        conn.close()


def _setup_logging(level: str, index: int) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), force=True,
                        format=f"%(asctime)s cpu_prefill[{index}] pid {os.getpid()} %(levelname)s: %(message)s")
