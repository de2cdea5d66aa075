"""`CpuPrefillPool`: single-threaded cpu_prefill worker processes, each with its own handoff channel.

Workers come two ways and are then handled alike:
- spawned: the pool starts `num_workers` children (multiprocessing spawn) and talks to each over a pipe;
- joined: with `rendezvous_dir`, the pool listens on a Unix socket there (services/cpu_prefill/rendezvous.py) and
  `caraserve serve cpu_prefill` processes join while the engine serves. A background thread authenticates a joiner,
  creates its channel and waits until it has mapped it; the engine thread adopts it at the start of its next call
  (`alive()` or `compute_delta`). Its connection replaces the pipe; it is alive while the connection is open.
  A joiner that is asked to stop sets its channel's leaving flag: it gets no new task, and is retired once idle.

`compute_delta(host, layer, group, x)` splits x's tokens into contiguous slices, one per live worker, hands each
slice to its worker through shared memory and waits for all of them; the result is the LoRA delta to add to the
projection output. `start_delta` hands them over and returns at once (the caller runs the base projection
meanwhile), `finish_delta` waits and adds. With `device` a GPU, every channel hands requests over through the
device's stream, without synchronising the engine's thread (handoff.py, `signal_through`). A worker that dies or
stalls does not hang the caller: after `timeout_s` (at once for a dead one) the call raises CpuAssistTimeout, the
worker is retired (a spawned one killed; a joined one disconnected; its channel unlinked) and later calls use the
others; the engine falls back to its own LoRA path for that call.

Used by one engine thread (not thread-safe; joiners are handed over under a lock). Every segment, joiners' channels
included, is created here and named "caraserve-<engine pid>-<hex>" so the supervisor can unlink them after a crash;
close() (also at exit, best effort) stops the workers, disconnects the joined ones and unlinks every channel.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import select
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.cpu_prefill.handoff import GPU_SPIN_S, SPIN_S, STATUS_OK, WORKER_PID, HandoffChannel
from services.cpu_prefill.host_cache import HostAdapter
from services.cpu_prefill.rendezvous import RendezvousError, RendezvousListener
from services.cpu_prefill.worker import GROUP_NAMES, worker_main

log = logging.getLogger("caraserve.cpu_prefill.pool")

LIVENESS_EVERY_S = 1e-3  # while waiting: how often to check that the pending workers' processes are alive
WAIT_SPIN_S = 50e-6  # while waiting: busy-poll this long, then yield the core in short sleeps
WAIT_MAX_SLEEP_S = 100e-6
JOIN_ATTACH_TIMEOUT_S = 30.0  # a joiner must map its channel within this


class CpuAssistError(RuntimeError):
    """The CPU workers could not produce a delta; the caller falls back to its own LoRA path."""


class CpuAssistTimeout(CpuAssistError):
    """A worker died or did not answer within the timeout (it has been retired), or no worker is alive."""


class _Spawned:
    """A worker process this pool started: alive while the process runs; killed and reaped when retired."""

    def __init__(self, process: mp.process.BaseProcess) -> None:
        self.process = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def describe(self) -> str:
        return f"pid {self.process.pid}"

    def stop(self, timeout_s: float) -> None:
        """Wait up to timeout_s for it to exit (after the stop flag), then kill it."""
        if self.process.pid is None:
            return  # never started
        self.process.join(timeout=max(0.0, timeout_s))
        self.kill()

    def kill(self) -> None:
        if self.process.pid is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


class _Joined:
    """A process that joined through the rendezvous socket: not our child (maybe in another pid namespace), so it
    is alive while its connection is open. It sends nothing after joining: a readable connection means EOF."""

    def __init__(self, conn, info: dict) -> None:
        self.conn = conn
        self.pid = info.get("pid")
        self.host = info.get("host")
        self._gone = False
        # checked on every call: a poll object kept for it costs ~0.6 µs where Connection.poll() costs ~4 µs
        self._poller = select.poll()
        self._poller.register(conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)

    def alive(self) -> bool:
        if not self._gone and self._poller.poll(0):
            try:
                if self.conn.poll():
                    self.conn.recv()  # EOF raises; anything else is ignored
            except (EOFError, OSError):
                self._gone = True
        return not self._gone

    def describe(self) -> str:
        return f"joined, pid {self.pid} on {self.host}"

    def stop(self, timeout_s: float) -> None:
        self.kill()  # the stop flag, then its connection closing, make it leave

    def kill(self) -> None:
        self._gone = True  # its connection is about to be closed: never poll its (reusable) fd again


def _work(hg, tokens: int) -> int:
    """A slice's work for host group hg: tokens x stacked rank x (input width + the parts' output widths)."""
    rank, width = hg.a.shape
    return max(1, tokens * rank * (width + sum(p.out_end - p.out_start for p in hg.parts)))


@dataclass
class PendingDelta:
    """A delta handed to the workers by `start_delta`, not yet waited for."""

    tasks: list  # (worker, seq, start, end) of each token slice
    deadline: float  # time.monotonic() after which its workers count as stalled
    out_features: int
    work: int  # its largest slice's tokens x rank x (in + out widths): what its time is proportional to
    submitted: float  # time.perf_counter() when handed over


@dataclass
class _Worker:
    index: int
    handle: _Spawned | _Joined
    channel: HandoffChannel
    conn: object  # the pool's end of the control pipe or of the joined connection (send/recv/poll/close)
    known: set[int] = field(default_factory=set)  # adapter ids already sent to this worker

    @property
    def joined(self) -> bool:
        return isinstance(self.handle, _Joined)


class CpuPrefillPool:
    """Spawned and joined workers, channels of [max_tokens, max_in] in and [max_tokens, max_out] out each, in
    `dtype` (the engine's: x arrives in it, and the delta is added in it).

    num_workers processes are spawned at once (0 is allowed with a rendezvous_dir: only joiners then). With
    rendezvous_dir, `caraserve serve cpu_prefill` processes may join and leave at any time; if the socket cannot
    be set up the pool logs a warning and serves with its spawned workers (with none: RendezvousError).
    """

    def __init__(
        self,
        num_workers: int,
        max_tokens: int,
        max_in: int,
        max_out: int,
        *,
        timeout_s: float = 5.0,
        cores: list[int] | None = None,
        spin_s: float | None = None,
        start_timeout_s: float = 120.0,
        rendezvous_dir: str | os.PathLike | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_workers < 0 or (num_workers == 0 and rendezvous_dir is None):
            raise ValueError(f"num_workers must be positive (or 0 with a rendezvous_dir), got {num_workers}")
        self.max_tokens, self.max_in, self.max_out = max_tokens, max_in, max_out
        self.timeout_s = timeout_s
        self.device = device  # a GPU: every channel hands requests over through its stream (handoff.py)
        self.dtype = dtype  # of the channels: activations out and deltas back (the engine's dtype)
        # the workers' busy-poll window after a task (handoff.py), set in each channel: joined workers follow it too
        self.spin_s = spin_s if spin_s is not None else \
            GPU_SPIN_S if device is not None and device.type == "cuda" else SPIN_S
        self.seconds_per_work: float | None = None  # measured: a slice's seconds per token x rank x width (EWMA)
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._adapter_ids: dict[str, int] = {}  # segment name -> id sent in task headers
        self._closed = False
        self._lock = threading.Lock()  # guards _joining, _next_index and _closed against the join threads
        self._joining: list[_Worker] = []  # joined and attached, not yet adopted by the engine thread
        self._next_index = 0
        self._rendezvous: RendezvousListener | None = None
        # close at interpreter exit even if the owner forgets (weakref: the hook does not keep the pool alive)
        self._atexit = _make_atexit(weakref.ref(self))
        atexit.register(self._atexit)
        try:
            for _ in range(num_workers):
                core = cores[len(self._workers) % len(cores)] if cores else None
                self._workers.append(self._spawn(self._new_index(), core))
            self._wait_started(start_timeout_s)
            if rendezvous_dir is not None:
                try:
                    self._rendezvous = RendezvousListener(Path(rendezvous_dir), self._on_join).start()
                except RendezvousError as exc:
                    if num_workers == 0:
                        raise
                    log.warning("cpu_prefill workers cannot join this engine: %s", exc)
                self._publish_count()
        except BaseException:
            self.close()
            raise

    def _new_index(self) -> int:
        with self._lock:
            self._next_index += 1
            return self._next_index - 1

    def _spawn(self, index: int, core: int | None) -> _Worker:
        channel = self._engine_channel(self._new_channel())
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(channel.name, theirs, os.getpid(), core),
                                 name=f"cpu_prefill-{index}", daemon=True)
        worker = _Worker(index, _Spawned(proc), channel, ours)
        try:
            proc.start()
        except BaseException:
            channel.close()
            raise
        theirs.close()
        return worker

    def _wait_started(self, timeout_s: float, workers: list[_Worker] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        for w in self._workers if workers is None else workers:
            while w.channel.ctrl[WORKER_PID] == 0:
                if not w.handle.alive():
                    raise CpuAssistError(f"cpu_prefill worker {w.index} exited at start "
                                         f"(code {w.handle.process.exitcode})")
                if time.monotonic() > deadline:
                    raise CpuAssistTimeout(f"cpu_prefill worker {w.index} did not start in {timeout_s} s")
                time.sleep(0.005)

    def add_workers(self, count: int, cores: list[int] | None = None, start_timeout_s: float = 120.0) -> None:
        """Start `count` more workers (the node scales its CPU side while serving); they take the next call."""
        new = [self._spawn(self._new_index(), cores[i % len(cores)] if cores else None)
               for i in range(count)]
        self._workers.extend(new)
        try:
            self._wait_started(start_timeout_s, new)
        except BaseException:
            for w in new:
                self._retire(w, "failed to start")
            raise
        self._publish_count()

    # ---- joiners (on the rendezvous' threads, then adopted by the engine thread) ---------------------------------
    @property
    def socket_path(self) -> Path | None:
        """Where `caraserve serve cpu_prefill` processes join this pool (None: they cannot)."""
        return self._rendezvous.path if self._rendezvous is not None else None

    def _on_join(self, conn, info: dict) -> None:
        """A joiner authenticated: give it a channel, wait until it has mapped it, queue it for the engine thread."""
        if self._closed:
            conn.close()
            return
        index = self._new_index()
        channel = self._new_channel()
        try:
            conn.send(("channel", {"name": channel.name, "index": index, "engine": self._rendezvous.name,
                                   "engine_pid": os.getpid()}))
            deadline = time.monotonic() + JOIN_ATTACH_TIMEOUT_S
            while channel.ctrl[WORKER_PID] == 0:
                if self._closed:
                    raise CpuAssistError("the pool closed")
                if conn.poll(0.005):  # it sends nothing more: EOF (it could not map the channel) or a bad peer
                    raise CpuAssistError("disconnected before mapping its channel")
                if time.monotonic() > deadline:
                    raise CpuAssistTimeout(f"did not map its channel in {JOIN_ATTACH_TIMEOUT_S} s")
            worker = _Worker(index, _Joined(conn, info), channel, conn)
            with self._lock:
                if self._closed:
                    raise CpuAssistError("the pool closed")
                self._joining.append(worker)
        except (CpuAssistError, OSError, EOFError) as exc:
            log.info("cpu_prefill joiner (pid %s on %s) not taken: %s", info.get("pid"), info.get("host"), exc)
            conn.close()
            channel.close()
            return
        log.info("cpu_prefill worker %d joined (pid %s on %s)", index, info.get("pid"), info.get("host"))
        self._publish_count()

    def _adopt(self) -> None:
        with self._lock:
            new, self._joining = self._joining, []
        for w in new:
            self._engine_channel(w.channel)
        self._workers.extend(new)

    def _new_channel(self) -> HandoffChannel:
        return HandoffChannel.create(self.max_tokens, self.max_in, self.max_out, self.dtype, self.spin_s)

    def _engine_channel(self, channel: HandoffChannel) -> HandoffChannel:
        """The engine thread's set-up of a new worker's channel: on a GPU, requests go through its stream."""
        if self.device is not None:
            channel.signal_through(self.device)
        return channel

    def _publish_count(self) -> None:
        if self._rendezvous is not None:
            self._rendezvous.set_count(len(self._workers) + len(self._joining))

    def _usable(self) -> list[_Worker]:
        """Adopt new joiners, retire the dead and the idle leavers; the workers that take tasks now."""
        if self._joining:
            self._adopt()
        usable = []
        for w in list(self._workers):
            if w.channel.leaving() and w.channel.idle():
                self._retire(w, "left", level=logging.INFO)
            elif not w.handle.alive():
                self._retire(w, "disconnected" if w.joined else "exited")
            elif not w.channel.leaving():
                usable.append(w)  # (a leaving one still busy with an abandoned call's task goes once idle)
        return usable

    # ---- queries -----------------------------------------------------------------------------------------------
    def alive(self) -> int:
        """How many workers take tasks (retired and leaving ones excluded); adopts workers that joined meanwhile.
        Engine thread only."""
        return len(self._usable())

    def pids(self) -> list[int]:
        """The workers' pids (a joined worker's as it reported it: maybe of another pid namespace)."""
        return [w.handle.pid for w in self._workers]

    def segment_names(self) -> list[str]:
        return [w.channel.name for w in self._workers]

    # ---- the call ----------------------------------------------------------------------------------------------
    def compute_delta(
        self,
        host: HostAdapter,
        layer: int,
        group: str,
        x: torch.Tensor,
        out_features: int | None = None,
        timeout_s: float | None = None,
        add_to: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LoRA delta [n, out_features] (the pool's dtype, CPU) of `group` of `layer` for x [n, in] — the value
        to ADD.

        out_features defaults to the group's last part end; columns outside the adapter's parts are zero.
        With add_to ([n, out_features], any device/dtype) the delta is added into it instead (straight from the
        workers' buffers, no intermediate) and add_to is returned; it is left untouched when the call raises.
        Raises CpuAssistTimeout (a worker died or stalled, or none is alive) or CpuAssistError (a worker failed).
        """
        hg = self._check(host, layer, group, x, out_features)
        if out_features is None:
            out_features = hg.parts[-1].out_end if hg is not None else 0
        n = x.shape[0]
        if hg is None or n == 0:
            return add_to if add_to is not None else torch.zeros(n, out_features, dtype=self.dtype)
        deadline = self._deadline(timeout_s)
        task = self._task(host, layer, group, out_features)
        workers = self._usable_or_raise()
        if add_to is not None and n <= len(workers) * self.max_tokens:  # one round: add from the buffers
            return self.finish_delta(self._pending(task, x, deadline, workers, hg), add_to)
        delta = torch.empty(n, out_features, dtype=self.dtype)
        done = 0
        while done < n:  # rounds only when n exceeds max_tokens per live worker
            pending = self._submit_round(task, x, done, deadline, workers)
            self._wait_done(pending, deadline)  # a worker lost raises: the set holds
            for w, _, s, e in pending:
                delta[s:e] = w.channel.output_view(e - s, out_features)
            done = pending[-1][3]
        if add_to is not None:
            add_to += delta.to(add_to.device, add_to.dtype)
            return add_to
        return delta

    def start_delta(self, host: HostAdapter, layer: int, group: str, x: torch.Tensor, out_features: int,
                    timeout_s: float | None = None) -> PendingDelta | None:
        """Hand the delta of x [n, in] to the workers and return at once (with signal_through, without waiting for
        the device either): the caller runs the base projection meanwhile, then `finish_delta` waits and adds.
        None when it cannot start so (nothing to compute: the adapter does not target the group; or more tokens
        than one round takes: compute_delta does those). Raises as compute_delta."""
        hg = self._check(host, layer, group, x, out_features)
        n = x.shape[0]
        if hg is None or n == 0:
            return None
        workers = self._usable_or_raise()
        if n > len(workers) * self.max_tokens:
            return None
        deadline = self._deadline(timeout_s)
        return self._pending(self._task(host, layer, group, out_features), x, deadline, workers, hg)

    def finish_delta(self, pending: PendingDelta, add_to: torch.Tensor) -> torch.Tensor:
        """Wait for a started delta and add it into add_to ([n, out_features], any device/dtype); add_to is left
        untouched when this raises (as compute_delta)."""
        self._wait_done(pending.tasks, pending.deadline)
        seconds = (time.perf_counter() - pending.submitted) / pending.work
        self.seconds_per_work = seconds if self.seconds_per_work is None else \
            0.8 * self.seconds_per_work + 0.2 * seconds
        for w, _, s, e in pending.tasks:
            out = w.channel.output_view(e - s, pending.out_features)
            # from a page-locked output the copy is async: the stream orders it before the worker's next seq
            add_to[s:e] += out if add_to.device.type == "cpu" else \
                out.to(add_to.device, add_to.dtype, non_blocking=w.channel.signals_on_stream)
        return add_to

    def estimate_s(self, host: HostAdapter, layer: int, group: str, tokens: int) -> float | None:
        """Seconds the live workers would take for this delta, from what earlier ones took (None: nothing measured
        yet, or no worker)."""
        hg = host.layers[layer].get(group)
        if hg is None:
            return 0.0
        workers = len(self._workers)
        if self.seconds_per_work is None or workers == 0:
            return None
        return _work(hg, -(-tokens // workers)) * self.seconds_per_work

    def _pending(self, task: tuple, x: torch.Tensor, deadline: float, workers: list[_Worker], hg) -> PendingDelta:
        submitted = time.perf_counter()
        tasks = self._submit_round(task, x, 0, deadline, workers)
        return PendingDelta(tasks, deadline, task[4], _work(hg, max(e - s for _, _, s, e in tasks)), submitted)

    def _check(self, host: HostAdapter, layer: int, group: str, x: torch.Tensor, out_features: int | None):
        """The host group of the task (None: not targeted); raises if the pool is closed or the task too wide."""
        if self._closed:
            raise CpuAssistError("the cpu_prefill pool is closed")
        width = x.shape[1]
        if width > self.max_in or (out_features or 0) > self.max_out:
            raise ValueError(f"[{x.shape[0]}, {width}] -> {out_features} exceeds the pool's max_in {self.max_in} / "
                             f"max_out {self.max_out}")
        return host.layers[layer].get(group)

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def _task(self, host: HostAdapter, layer: int, group: str, out_features: int) -> tuple:
        adapter_id = self._adapter_ids.setdefault(host.segment, len(self._adapter_ids) + 1)
        return host, adapter_id, layer, GROUP_NAMES.index(group), out_features

    def _usable_or_raise(self) -> list[_Worker]:
        workers = self._usable()
        if not workers:
            raise CpuAssistTimeout("no cpu_prefill worker is alive")
        return workers

    def _submit_round(self, task: tuple, x: torch.Tensor, done: int, deadline: float, workers: list[_Worker]
                      ) -> list[tuple[_Worker, int, int, int]]:
        """Hand tokens done.. of x to `workers` (at most max_tokens each); (worker, seq, s, e) of each slice."""
        host, adapter_id, layer, group_idx, out_features = task
        count = min(x.shape[0] - done, len(workers) * self.max_tokens)
        per, extra = divmod(count, len(workers))
        pending: list[tuple[_Worker, int, int, int]] = []
        start = done
        for i, w in enumerate(workers):
            size = per + (i < extra)
            if size == 0:
                break
            self._wait_idle(w, deadline)
            if adapter_id not in w.known:  # the layout travels once, before the first task that needs it
                try:
                    w.conn.send(("adapter", adapter_id, host.to_dict()))
                except OSError:  # its end closed (it died or left) since it was last seen alive
                    self._retire(w, "disconnected")
                    raise CpuAssistTimeout(f"cpu_prefill worker {w.index} is gone") from None
                w.known.add(adapter_id)
            seq = w.channel.submit(x[start : start + size], adapter_id, layer, group_idx, out_features)
            if w.channel.sleeping():  # in an idle sleep (up to 1 ms): woken now, it is spinning when the slice lands
                try:
                    w.conn.send(("wake", 0, None))
                except OSError:
                    pass  # gone: the wait notices
            pending.append((w, seq, start, start + size))
            start += size
        return pending

    def forget(self, host: HostAdapter) -> None:
        """Tell the workers to unmap host's segment (after the host cache evicted it)."""
        adapter_id = self._adapter_ids.pop(host.segment, None)
        if adapter_id is None:
            return
        for w in self._workers:
            if adapter_id in w.known:
                w.known.discard(adapter_id)
                try:
                    w.conn.send(("forget", adapter_id, None))
                except (OSError, BrokenPipeError):
                    pass

    def _wait_idle(self, w: _Worker, deadline: float) -> None:
        """A worker still busy with a task of an abandoned call must finish it before its buffers are rewritten."""
        if not w.channel.idle():
            self._wait_done([(w, w.channel.last_seq, 0, 0)], deadline, check_status=False)

    def _wait_done(self, pending: list[tuple[_Worker, int, int, int]], deadline: float, check_status: bool = True
                   ) -> None:
        waiting = list(pending)
        spin_until = time.perf_counter() + WAIT_SPIN_S
        next_check = time.monotonic() + LIVENESS_EVERY_S
        sleep = 5e-6
        while waiting:
            waiting = [p for p in waiting if not p[0].channel.done(p[1])]
            if not waiting:
                break
            if time.perf_counter() < spin_until:
                continue
            now = time.monotonic()
            if now >= next_check:
                next_check = now + LIVENESS_EVERY_S
                dead = [w for w, seq, *_ in waiting if not w.handle.alive() and not w.channel.done(seq)]
                if dead:
                    for w in dead:
                        self._retire(w, "died")
                    raise CpuAssistTimeout(f"cpu_prefill worker(s) {[w.index for w in dead]} died mid-task")
                if now > deadline:
                    for w, *_ in waiting:
                        self._retire(w, "stalled")
                    raise CpuAssistTimeout(f"cpu_prefill worker(s) {[w.index for w, *_ in waiting]} did not "
                                           f"answer in time")
            time.sleep(sleep)
            sleep = min(sleep * 2, WAIT_MAX_SLEEP_S)
        failed = [w.index for w, *_ in pending if w.channel.status() != STATUS_OK]
        if failed and check_status:
            raise CpuAssistError(f"cpu_prefill worker(s) {failed} failed the task (see their log)")

    def _retire(self, w: _Worker, why: str, level: int = logging.WARNING) -> None:
        """Stop w (a spawned one killed and reaped, a joined one disconnected), unlink its channel; the others carry
        on. A joined worker that is still there sees the stop flag or the closed connection and looks for an
        engine again."""
        log.log(level, "cpu_prefill worker %d (%s) %s; retiring it", w.index, w.handle.describe(), why)
        w.channel.request_stop()
        w.handle.kill()
        w.conn.close()
        w.channel.close()
        self._workers.remove(w)
        self._publish_count()

    # ---- teardown ----------------------------------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting joiners, stop every worker (stop flag, then kill a spawned one after timeout_s), disconnect
        the joined ones and unlink every channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit)
        if self._rendezvous is not None:
            self._rendezvous.close()  # no join in progress after this (they see _closed and give up)
        with self._lock:
            workers, self._joining = self._workers + self._joining, []
        for w in workers:
            w.channel.request_stop()
        deadline = time.monotonic() + timeout_s
        for w in workers:
            w.handle.stop(deadline - time.monotonic())
            w.conn.close()
            w.channel.close()
        self._workers.clear()

    def __enter__(self) -> CpuPrefillPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _make_atexit(ref: weakref.ref):
    def hook() -> None:
        pool = ref()
        if pool is not None:
            pool.close()
    return hook
