"""`CpuPrefillPool`: N single-threaded cpu_prefill worker processes, each with its own handoff channel.

`compute_delta(host, layer, group, x)` splits x's tokens into contiguous slices, one per live worker, hands each
slice to its worker through shared memory and waits for all of them; the result is the LoRA delta to add to the
projection output. A worker that dies or stalls does not hang the caller: after `timeout_s` (at once for a dead
one) the call raises CpuAssistTimeout, the worker is retired (killed, its channel unlinked) and later calls use the
others; the engine falls back to its own LoRA path for that call.

Used by one engine thread (not thread-safe). Every segment is named "caraserve-<engine pid>-<hex>" so the
supervisor can unlink them after a crash; close() (also at exit, best effort) stops the workers and unlinks them.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import time
import weakref
from dataclasses import dataclass, field

import torch

from services.cpu_prefill.handoff import REQ_SEQ, STATUS_OK, WORKER_PID, HandoffChannel
from services.cpu_prefill.host_cache import HostAdapter
from services.cpu_prefill.worker import GROUP_NAMES, worker_main

log = logging.getLogger("caraserve.cpu_prefill.pool")

LIVENESS_EVERY_S = 1e-3  # while waiting: how often to check that the pending workers' processes are alive
WAIT_SPIN_S = 50e-6  # while waiting: busy-poll this long, then yield the core in short sleeps
WAIT_MAX_SLEEP_S = 100e-6


class CpuAssistError(RuntimeError):
    """The CPU workers could not produce a delta; the caller falls back to its own LoRA path."""


class CpuAssistTimeout(CpuAssistError):
    """A worker died or did not answer within the timeout (it has been retired), or no worker is alive."""


@dataclass
class _Worker:
    index: int
    process: mp.process.BaseProcess
    channel: HandoffChannel
    conn: object  # the pool's end of the control pipe
    known: set[int] = field(default_factory=set)  # adapter ids already sent to this worker


class CpuPrefillPool:
    """N worker processes (spawn), channels of [max_tokens, max_in] in and [max_tokens, max_out] out each."""

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
    ) -> None:
        if num_workers <= 0:
            raise ValueError(f"num_workers must be positive, got {num_workers}")
        self.max_tokens, self.max_in, self.max_out = max_tokens, max_in, max_out
        self.timeout_s = timeout_s
        self._spin_s = spin_s
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._adapter_ids: dict[str, int] = {}  # segment name -> id sent in task headers
        self._closed = False
        # close at interpreter exit even if the owner forgets (weakref: the hook does not keep the pool alive)
        self._atexit = _make_atexit(weakref.ref(self))
        atexit.register(self._atexit)
        try:
            for i in range(num_workers):
                core = cores[i % len(cores)] if cores else None
                self._workers.append(self._spawn(i, core, spin_s))
            self._wait_started(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _spawn(self, index: int, core: int | None, spin_s: float | None) -> _Worker:
        channel = HandoffChannel.create(self.max_tokens, self.max_in, self.max_out)
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(channel.name, theirs, os.getpid(), core, spin_s),
                                 name=f"cpu_prefill-{index}", daemon=True)
        worker = _Worker(index, proc, channel, ours)
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
                if not w.process.is_alive():
                    raise CpuAssistError(f"cpu_prefill worker {w.index} exited at start (code {w.process.exitcode})")
                if time.monotonic() > deadline:
                    raise CpuAssistTimeout(f"cpu_prefill worker {w.index} did not start in {timeout_s} s")
                time.sleep(0.005)

    def add_workers(self, count: int, cores: list[int] | None = None, start_timeout_s: float = 120.0) -> None:
        """Start `count` more workers (the node scales its CPU side while serving); they take the next call."""
        start = max((w.index for w in self._workers), default=-1) + 1
        new = [self._spawn(start + i, cores[i % len(cores)] if cores else None, self._spin_s) for i in range(count)]
        self._workers.extend(new)
        try:
            self._wait_started(start_timeout_s, new)
        except BaseException:
            for w in new:
                self._retire(w, "failed to start")
            raise

    # ---- queries -----------------------------------------------------------------------------------------------
    def alive(self) -> int:
        """How many workers take tasks (retired ones excluded)."""
        return sum(1 for w in self._workers if w.process.is_alive())

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

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
        """The LoRA delta [n, out_features] (float32, CPU) of `group` of `layer` for x [n, in] — the value to ADD.

        out_features defaults to the group's last part end; columns outside the adapter's parts are zero.
        With add_to ([n, out_features], any device/dtype) the delta is added into it instead (straight from the
        workers' buffers, no intermediate) and add_to is returned; it is left untouched when the call raises.
        Raises CpuAssistTimeout (a worker died or stalled, or none is alive) or CpuAssistError (a worker failed).
        """
        if self._closed:
            raise CpuAssistError("the cpu_prefill pool is closed")
        hg = host.layers[layer].get(group)
        if out_features is None:
            out_features = hg.parts[-1].out_end if hg is not None else 0
        n, width = x.shape
        if hg is None or n == 0:
            return add_to if add_to is not None else torch.zeros(n, out_features, dtype=torch.float32)
        if width > self.max_in or out_features > self.max_out:
            raise ValueError(f"[{n}, {width}] -> {out_features} exceeds the pool's max_in {self.max_in} / "
                             f"max_out {self.max_out}")
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        adapter_id = self._adapter_ids.setdefault(host.segment, len(self._adapter_ids) + 1)
        task = (host, adapter_id, layer, GROUP_NAMES.index(group), out_features)
        live = sum(1 for w in self._workers if w.process.is_alive())
        if add_to is not None and 0 < n <= live * self.max_tokens:  # one round: add from the buffers directly
            pending = self._round(task, x, 0, deadline)
            for w, _, s, e in pending:
                out = w.channel.output_view(e - s, out_features)
                add_to[s:e] += out if add_to.device.type == "cpu" else out.to(add_to.device, add_to.dtype)
            return add_to
        delta = torch.empty(n, out_features, dtype=torch.float32)
        done = 0
        while done < n:  # rounds only when n exceeds max_tokens per live worker
            pending = self._round(task, x, done, deadline)
            for w, _, s, e in pending:
                delta[s:e] = w.channel.output_view(e - s, out_features)
            done = pending[-1][3]
        if add_to is not None:
            add_to += delta.to(add_to.device, add_to.dtype)
            return add_to
        return delta

    def _round(self, task: tuple, x: torch.Tensor, done: int, deadline: float) -> list[tuple[_Worker, int, int, int]]:
        """Hand tokens done.. of x to the live workers (at most max_tokens each), wait for all; (worker, seq, s, e)."""
        host, adapter_id, layer, group_idx, out_features = task
        for w in [w for w in self._workers if not w.process.is_alive()]:
            self._retire(w, "exited")  # died while idle: unlink its channel now
        workers = list(self._workers)
        if not workers:
            raise CpuAssistTimeout("no cpu_prefill worker is alive")
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
                w.conn.send(("adapter", adapter_id, host.to_dict()))
                w.known.add(adapter_id)
            seq = w.channel.submit(x[start : start + size], adapter_id, layer, group_idx, out_features)
            pending.append((w, seq, start, start + size))
            start += size
        self._wait_done(pending, deadline)
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
            self._wait_done([(w, w.channel.ctrl[REQ_SEQ], 0, 0)], deadline, check_status=False)

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
                dead = [w for w, seq, *_ in waiting if not w.process.is_alive() and not w.channel.done(seq)]
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

    def _retire(self, w: _Worker, why: str) -> None:
        """Kill w (if still running), reap it, unlink its channel; the others carry on."""
        log.warning("cpu_prefill worker %d (pid %s) %s; retiring it", w.index, w.process.pid, why)
        if w.process.is_alive():
            w.process.kill()
        w.process.join(timeout=5)
        w.conn.close()
        w.channel.close()
        self._workers.remove(w)

    # ---- teardown ----------------------------------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker (stop flag, then kill after timeout_s) and unlink every channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        for w in self._workers:
            w.channel.request_stop()
        deadline = time.monotonic() + timeout_s
        for w in self._workers:
            if w.process.pid is not None:  # started
                w.process.join(timeout=max(0.0, deadline - time.monotonic()))
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join(timeout=5)
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
