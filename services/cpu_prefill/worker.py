"""One cpu_prefill worker process: busy-polls its handoff channel and computes LoRA deltas from host adapters.

The process is single-threaded (torch.set_num_threads(1)), optionally pinned to one core; the pool runs one per
core and splits a segment's tokens across them. Per task (adapter id, layer, group, n tokens):

    t     = x @ Aᵀ                                  # x: [n, in] (input buffer), A: [sum of ranks, in] -> [n, R]
    delta[:, out_start:out_end] = t[:, rank_start:rank_end] @ bᵀ   per part, b: [part out, r] (B · scale)
    delta[:, other columns]     = 0                                  # delta: [n, out] (output buffer)

— the delta to ADD to the projection output, as torch_backend.apply_lora adds it. x and delta are in the channel's
dtype, the weights in the host cache's (both the engine's dtype). Half-precision weights are multiplied as they are
where this CPU has native kernels for them (oneDNN: AVX512-BF16/AMX for bfloat16, AVX512-FP16/AMX-FP16 for float16;
products accumulated in float32, as on the GPU), else converted to float32 per task. Adapter weights are read in
place from the host cache's segments (mapped once per adapter, cached). Which adapter an id names arrives over a
control pipe before the first task that uses it: ("adapter", id, HostAdapter.to_dict()) and ("forget", id); an idle
worker sleeps polling that pipe, and ("wake", 0, None), sent with a task, only ends its sleep.

A spawned worker (the pool's child, `worker_main`) exits on the channel's stop flag, when its parent dies
(reparented: getppid changes), or when the control pipe closes. A joined worker (`caraserve serve cpu_prefill`,
services/cpu_prefill/join.py) runs the same loop, `serve_channel`, over the connection it joined through, and
looks for the next engine when that loop ends.
"""
from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable

import torch

from services.cpu_prefill.handoff import DONE_SEQ, STATUS_ERROR, STATUS_OK, HandoffChannel
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS

GROUP_NAMES: tuple[str, ...] = tuple(PROJECTION_GROUPS)  # the header carries a group as its index here
MAX_ATTACHED = 64  # adapter segments kept mapped per worker (least recently used dropped beyond this)

log = logging.getLogger("caraserve.cpu_prefill.worker")

# (a [R, in], [(out_start, out_end, rank_start, rank_end, b [out, r])]) for one layer's group
GroupView = tuple[torch.Tensor, list[tuple[int, int, int, int, torch.Tensor]]]


@functools.cache
def compute_dtype(weights: torch.dtype) -> torch.dtype:
    """The dtype a worker multiplies weights of `weights` dtype in: theirs where this CPU has native kernels for it,
    else float32."""
    try:
        if weights == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return weights
        if weights == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
            return weights
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: float32, which is always there
        pass
    return torch.float32


def lora_delta_(out: torch.Tensor, x: torch.Tensor, gv: GroupView, compute: torch.dtype | None = None) -> None:
    """Write the group's LoRA delta for x ([n, in]) into out ([n, out_width]), zeros outside its parts; the
    products in `compute` (default: compute_dtype of the weights')."""
    a, parts = gv
    compute = compute_dtype(a.dtype) if compute is None else compute
    t = x.to(compute) @ a.to(compute).t()  # [n, R] (.to is a no-op where the dtype already is)
    col = 0
    for out_start, out_end, rank_start, rank_end, b in parts:  # parts are in output order
        if out_start > col:
            out[:, col:out_start].zero_()
        if out.dtype == compute:
            out[:, out_start:out_end].addmm_(t[:, rank_start:rank_end], b.to(compute).t(), beta=0)
        else:
            out[:, out_start:out_end].copy_(t[:, rank_start:rank_end] @ b.to(compute).t())
        col = out_end
    if col < out.shape[1]:
        out[:, col:].zero_()


def _as_tensor(view) -> torch.Tensor:
    return view if isinstance(view, torch.Tensor) else torch.from_numpy(view)


class PoolGone(Exception):
    """The control pipe closed: the pool (engine) is gone, the worker exits."""


class _Attachments:
    """Host adapters known to this worker (id -> HostAdapter) and their mapped segments (LRU)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.hosts: dict[int, object] = {}
        self.mapped: OrderedDict[int, tuple[object, list[dict[str, GroupView]]]] = OrderedDict()

    def drain(self, block_for: int | None = None) -> None:
        """Apply pending control messages; with block_for, wait until that adapter id is known."""
        from services.cpu_prefill.host_cache import HostAdapter

        while (block_for is not None and block_for not in self.hosts) or self.conn.poll():
            try:
                kind, adapter_id, payload = self.conn.recv()
            except (EOFError, OSError) as e:
                raise PoolGone from e
            if kind == "adapter":
                self.hosts[adapter_id] = HostAdapter.from_dict(payload)
            elif kind == "forget":
                self.hosts.pop(adapter_id, None)
                self._unmap(adapter_id)

    def group(self, adapter_id: int, layer: int, group: str) -> GroupView | None:
        if adapter_id not in self.mapped:
            self.drain(block_for=adapter_id)
            self._map(adapter_id)
        self.mapped.move_to_end(adapter_id)
        return self.mapped[adapter_id][1][layer].get(group)

    def _map(self, adapter_id: int) -> None:
        from services.cpu_prefill.host_cache import attach

        shm, layers = attach(self.hosts[adapter_id])
        views = [
            {g: (_as_tensor(a), [(s, e, rs, re, _as_tensor(b)) for s, e, rs, re, b in parts])
             for g, (a, parts) in groups.items()}
            for groups in layers
        ]
        self.mapped[adapter_id] = (shm, views)
        while len(self.mapped) > MAX_ATTACHED:
            self._unmap(next(iter(self.mapped)))

    def _unmap(self, adapter_id: int) -> None:
        entry = self.mapped.pop(adapter_id, None)
        if entry is None:
            return
        shm, views = entry
        views.clear()
        del views, entry
        try:
            shm.close()
        except BufferError:
            pass  # a view still alive somewhere: the mapping goes when it does

    def close(self) -> None:
        for adapter_id in list(self.mapped):
            self._unmap(adapter_id)


def setup_process(core: int | None) -> None:
    """One torch thread; pinned to `core` when given (a warning if that fails)."""
    torch.set_num_threads(1)
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except (OSError, AttributeError) as e:  # no such core, or not Linux: run unpinned
            log.warning("cpu_prefill worker: cannot pin to core %s: %s", core, e)


def serve_channel(channel: HandoffChannel, conn, should_exit: Callable[[], bool] | None = None) -> str:
    """Answer the channel's tasks until told to stop; why it ended: "stop" (the channel's stop flag), "gone" (the
    control connection closed) or "exit" (should_exit(), asked while idle, said so)."""
    adapters = _Attachments(conn)
    channel.set_worker(os.getpid())
    why = "stop"

    def on_idle() -> bool:  # True: exit
        nonlocal why
        if should_exit is not None and should_exit():
            why = "exit"
            return True
        try:
            adapters.drain()
        except PoolGone:
            why = "gone"
            return True
        return False

    last = channel.ctrl[DONE_SEQ]  # a fresh channel starts at 0
    try:
        with torch.inference_mode():
            while True:
                # spinning for the channel's window, then sleeping on the control connection (the engine's wake)
                seq = channel.wait_request(last, on_idle, sleep=conn.poll)
                if seq is None:
                    return why
                status = STATUS_OK
                try:
                    adapter_id, layer, group, n, in_w, out_w = channel.header()
                    gv = adapters.group(adapter_id, layer, GROUP_NAMES[group])
                    out = channel.output_view(n, out_w)
                    if gv is None:
                        out.zero_()
                    else:
                        lora_delta_(out, channel.input_view(n, in_w), gv)
                except PoolGone:
                    return "gone"
                except Exception:  # noqa: BLE001 - report the task as failed, keep serving
                    log.exception("cpu_prefill worker: task %d failed", seq)
                    status = STATUS_ERROR
                channel.finish(seq, status)
                last = seq
    finally:
        adapters.close()


def worker_main(channel_name: str, conn, parent_pid: int, core: int | None = None) -> None:
    """The process entry of a spawned worker (multiprocessing spawn target)."""
    setup_process(core)
    channel = HandoffChannel.attach(channel_name)
    try:
        serve_channel(channel, conn, lambda: os.getppid() != parent_pid)
    finally:
        channel.close()
