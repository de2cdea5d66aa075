"""`caraserve serve cpu_prefill --workers N`: N single-threaded worker processes that join this node's gpu_workers.

A gpu_worker whose engine runs CPU-assisted prefill (`--cpu-assist always`) listens on a Unix socket in
<data dir>/run/cpu_prefill/ (services/cpu_prefill/rendezvous.py). Each process started here joins one of them (the
least-served), gets a shared-memory channel from it and computes LoRA deltas for its token slices
(services/cpu_prefill/join.py); when that gpu_worker goes away it joins another, or waits for the next one. The
processes may be started before or after the gpu_workers, and stopped at any time: SIGTERM/SIGINT make every one
finish the task in hand, leave, and this command exit 0. A process that dies is restarted.

This module is imported when the `caraserve` parser is built: standard library only at the top.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

STOP_TIMEOUT_S = 10.0  # for the processes to leave after SIGTERM, then they are killed
RESTART_DELAY_S = (1.0, 30.0)  # a process that died is restarted after this, doubling while it keeps dying fast
LOG_LEVELS = ("debug", "info", "warning", "error")

EPILOG = """\
The gpu_workers to join are the ones started with --cpu-assist always and the same data directory (use
--cpu-workers 0 on them to have only these processes do the CPU side). They find each other through
DIR/run/cpu_prefill/ (DIR: --data-dir, else $CARASERVE_DATA_DIR, else ~/.cache/caraserve): no NATS involved,
but the processes must share the gpu_worker's /dev/shm (in containers: its IPC namespace) and run as its user.
Start as many as the node has spare cores, one process per core; run the command again (or scale its container)
to add more while the node serves. Status lines go to stderr.

example:
  caraserve serve gpu_worker --cpu-assist always --cpu-workers 0 &
  caraserve serve cpu_prefill --workers 4 --cores 4,5,6,7
"""


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    group = parser.add_argument_group("cpu_prefill")
    group.add_argument("--workers", type=int, default=2, metavar="N",
                       help="worker processes to run, single-threaded each (default: 2)")
    group.add_argument("--cores", metavar="LIST",
                       help="pin worker i to the i-th core of LIST (comma-separated, ranges allowed: 0,2-5; "
                            "default: not pinned)")
    group.add_argument("--data-dir", metavar="DIR",
                       help="the gpu_workers' data directory; their sockets are in DIR/run/cpu_prefill "
                            "(default: $CARASERVE_DATA_DIR or ~/.cache/caraserve)")
    group.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
                       help="debug, info, warning or error (default: $CARASERVE_LOG_LEVEL or info)")


def parse_cores(text: str | None) -> list[int] | None:
    """'0,2-4' -> [0, 2, 3, 4]; ValueError for anything else."""
    if text is None or not text.strip():
        return None
    cores: list[int] = []
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--cores: {item.strip()!r} is not a core number or range")
        cores.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not cores:
        raise ValueError("--cores: empty range")
    return cores


def serve_command(args: argparse.Namespace) -> int:
    """`caraserve serve cpu_prefill`: run the processes until SIGTERM/SIGINT; 0 after a clean stop."""
    from services.cli import CLIError
    from services.cpu_prefill import rendezvous as rv

    if args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    try:
        cores = parse_cores(args.cores)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    level = (args.log_level or os.environ.get("CARASERVE_LOG_LEVEL") or "info").lower()
    if level not in LOG_LEVELS:
        raise CLIError(f"CARASERVE_LOG_LEVEL must be debug, info, warning or error, got {level!r}")
    directory = rv.run_dir(args.data_dir).absolute()
    try:
        rv.ensure_dir(directory)
    except rv.RendezvousError as exc:
        raise CLIError(str(exc)) from None
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise CLIError(f"{directory} belongs to uid {directory.stat().st_uid}: run as the gpu_workers' user")
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(message)s")
    return Service(args.workers, cores, directory, level).run()


def _say(message: str) -> None:
    print(f"caraserve cpu_prefill: {message}", file=sys.stderr, flush=True)


class Service:
    """The parent of the worker processes: starts them, restarts one that dies, stops them all on a signal."""

    def __init__(self, workers: int, cores: list[int] | None, directory, log_level: str) -> None:
        import multiprocessing as mp

        self.count = workers
        self.cores = cores
        self.directory = directory
        self.log_level = log_level
        self._ctx = mp.get_context("spawn")
        self._procs: list = [None] * workers
        self._started = [0.0] * workers
        self._delay = [RESTART_DELAY_S[0]] * workers
        self._restart_at: list[float | None] = [None] * workers
        self._stopping = False

    def _start(self, index: int) -> None:
        from services.cpu_prefill.join import join_worker_main

        core = self.cores[index % len(self.cores)] if self.cores else None
        proc = self._ctx.Process(target=join_worker_main, name=f"cpu_prefill-{index}", daemon=True,
                                 args=(str(self.directory), index, core, self.log_level, os.getpid()))
        proc.start()
        self._procs[index] = proc
        self._started[index] = time.monotonic()

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            _say(f"starting {self.count} worker process(es); gpu_workers are found in {self.directory}"
                 + (f"; cores {','.join(map(str, self.cores))}" if self.cores else ""))
            for i in range(self.count):
                if self._stopping:
                    break
                self._start(i)
            while not self._stopping:
                time.sleep(0.1)
                self._watch()
            _say("stopping: every worker leaves its gpu_worker")
        finally:
            self._stop_all()  # (also when starting one failed)
            for s, handler in previous.items():
                signal.signal(s, handler)
        _say("stopped")
        return 0

    def _watch(self) -> None:
        now = time.monotonic()
        for i, proc in enumerate(self._procs):
            if self._restart_at[i] is not None:
                if now >= self._restart_at[i]:
                    self._restart_at[i] = None
                    self._start(i)
                continue
            if proc is None or proc.is_alive():
                continue
            proc.join()
            fast = now - self._started[i] < 10.0
            self._delay[i] = min(self._delay[i] * 2, RESTART_DELAY_S[1]) if fast else RESTART_DELAY_S[0]
            _say(f"worker {i} (pid {proc.pid}) exited with code {proc.exitcode}; restarting it in "
                 f"{self._delay[i]:g} s")
            self._restart_at[i] = now + self._delay[i]

    def _stop_all(self) -> None:
        procs = [p for p in self._procs if p is not None and p.pid is not None]
        for p in procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                _say(f"worker pid {p.pid} did not leave in {STOP_TIMEOUT_S:g} s; killing it")
                p.kill()
                p.join(timeout=5)
