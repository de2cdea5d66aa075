"""`CpuAssistLoRABackend`: a LoRA backend that sends the prefill tokens of CPU-assisted adapters to the workers.

Same contract as TorchLoRABackend / TritonLoRABackend: the runner calls `prepare(info, slots)` once per step and
the model calls `apply(y, x, slots, layer, group, info)` per layer and fused group. For each adapter token range
of the step:

- its prefill tokens, when `host_adapter_of(slot)` names a host-cache copy (the adapter is CPU-assisted this step)
  and `on_cpu(slot, layer, group, tokens)` holds (its layer group has not landed on the device yet, and the workers
  are expected to be done before it lands), get their delta from the
  cpu_prefill pool: y[range] += pool.compute_delta(host, layer, group, x[range]);
- everything else — decode tokens, adapters not assisted, layers already loaded — goes to the inner backend, with
  a LoRABatchInfo holding only those ranges (prepared lazily, once per distinct set, per step).

With `out_widths`, the model's `begin(x, ...)` before each base projection hands the first such range to the
workers at once (pool.start_delta), so they compute while the device runs the projection; `apply` waits for it.

`prefill_ranges` (token ranges [start, end) of the step's prefill chunks in the flat batch) tells prefill from
decode; None treats every token as prefill (cpu_assist=always on a CPU machine with prefill-only steps).
`on_layer_device(slot, layer)`, when given, is called before the inner backend computes a CPU-assisted range of a
layer (the engine's hook to make the device wait for that layer's group, if it has not landed).
`on_device(slot)`, when given, is called in prepare for every slot with ranges on the inner backend this step (the
engine's hook to make a slot that is still loading complete first: decode tokens need every layer).
When the pool raises CpuAssistError (a worker died, stalled or failed) the range falls back to the inner backend
for that call, after `on_fallback(slot)` (the engine's hook to wait for the adapter's load), with a warning.
Workers come and go (joined cpu_prefill processes): a step that starts with none alive is not assisted at all
(checked once, in prepare: no failed call, no warning), and a step whose last worker goes mid-way runs its
remaining layers on the inner backend.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.cpu_prefill.host_cache import HostAdapter
from services.cpu_prefill.pool import CpuAssistError, CpuPrefillPool
from services.gpu_worker.lora.batch_info import LoRABatchInfo

log = logging.getLogger("caraserve.cpu_prefill.backend")

Segment = tuple[int, int, int]  # (slot, start, end) as in LoRABatchInfo.segments


@dataclass
class CpuAssistStep:
    """The backend's per-step context, kept on the step's LoRABatchInfo.kernel_meta."""

    rest: list[Segment]  # ranges always on the inner backend (decode tokens, adapters not assisted)
    assisted: list[tuple[Segment, HostAdapter]]  # prefill ranges of CPU-assisted adapters
    slots: list  # the step's slot list, for preparing inner infos lazily
    inner_infos: dict[tuple[Segment, ...], LoRABatchInfo | None] = field(default_factory=dict)
    started: tuple | None = None  # (layer, group, segment, PendingDelta) handed to the workers by `begin`
    decided: tuple | None = None  # (layer, group, [(segment, host, on the workers?)]): `begin`'s, for `apply`


def _split(segment: Segment, prefill: list[tuple[int, int]] | None) -> tuple[list[Segment], list[Segment]]:
    """(prefill parts, other parts) of segment, given sorted disjoint prefill ranges (None: all prefill)."""
    slot, start, end = segment
    if prefill is None:
        return [segment], []
    pre, other, pos = [], [], start
    for ps, pe in prefill:
        s, e = max(ps, start), min(pe, end)
        if s >= e:
            continue
        if s > pos:
            other.append((slot, pos, s))
        pre.append((slot, s, e))
        pos = e
    if pos < end:
        other.append((slot, pos, end))
    return pre, other


class CpuAssistLoRABackend:
    """The model's LoRA backend while CPU assist is on: workers for assisted prefill ranges, `inner` for the rest."""

    def __init__(
        self,
        inner,
        pool: CpuPrefillPool,
        host_adapter_of: Callable[[int], HostAdapter | None],
        on_cpu: Callable[[int, int, str, int], bool] | None = None,
        on_fallback: Callable[[int], None] | None = None,
        on_device: Callable[[int], None] | None = None,
        out_widths: dict[str, int] | None = None,
        on_layer_device: Callable[[int, int], None] | None = None,
    ) -> None:
        self.inner = inner  # TorchLoRABackend or TritonLoRABackend: decode, resident adapters, fallback
        self.pool = pool
        self.host_adapter_of = host_adapter_of  # slot -> its host-cache copy if CPU-assisted this step, else None
        self.on_cpu = on_cpu  # (slot, layer, group, tokens) -> whether the workers compute it; None: always
        self.on_layer_device = on_layer_device  # (slot, layer): before the inner backend computes such a range
        self.on_fallback = on_fallback  # called with the slot before a range falls back to the inner backend
        self.on_device = on_device  # called (in prepare) with each slot whose ranges the inner backend will compute
        self.out_widths = out_widths  # group -> its fused projection's width; None: `begin` starts nothing
        self.landed_ranges = 0  # assisted ranges of layers already loaded, so on the inner backend (likewise)
        self.fallbacks = 0  # ranges that fell back (a counter for tests and metrics)
        self.cpu_ranges = 0  # ranges whose delta the workers computed (likewise)

    def prepare(
        self, info: LoRABatchInfo, slots: list, prefill_ranges: list[tuple[int, int]] | None = None
    ) -> None:
        """Split the step's ranges into CPU-assisted prefill ranges and the rest; keep them in info.kernel_meta."""
        prefill = sorted(prefill_ranges) if prefill_ranges is not None else None
        rest: list[Segment] = []
        assisted: list[tuple[Segment, HostAdapter]] = []
        workers = self.pool.alive()  # once a step: none there (yet, or any more) -> every range on the inner backend
        for seg in info.segments:
            if seg[2] <= seg[1]:
                continue
            host = self.host_adapter_of(seg[0]) if workers else None
            if host is None:
                rest.append(seg)
                continue
            pre, other = _split(seg, prefill)
            assisted.extend((p, host) for p in pre)
            rest.extend(other)
        if self.on_device is not None:  # e.g. a slot still loading: its decode waits for the load
            for slot in sorted({seg[0] for seg in rest}):
                self.on_device(slot)
        step = CpuAssistStep(rest, assisted, slots)
        info.kernel_meta = step
        self._inner_info(step, ())  # the common case (every assisted range on the CPU), prepared up front

    def _inner_info(self, step: CpuAssistStep, extra: tuple[Segment, ...]) -> LoRABatchInfo | None:
        """The inner backend's prepared info for step.rest plus `extra` (None when that holds no range)."""
        if extra not in step.inner_infos:
            segments = sorted(step.rest + list(extra), key=lambda s: s[1])
            sub = None
            if segments:
                sub = LoRABatchInfo(segments)
                self.inner.prepare(sub, step.slots)
            step.inner_infos[extra] = sub
        return step.inner_infos[extra]

    def _decide(self, step: CpuAssistStep, layer: int, group: str, keep: bool = False) -> list:
        """[(segment, host, whether the workers compute it)] for this projection's assisted ranges: `on_cpu` asked
        once per range and projection (`begin` keeps its answers for `apply`, which uses and drops them)."""
        decided, step.decided = step.decided, None
        if decided is None or decided[:2] != (layer, group):
            ranges = []
            for seg, host in step.assisted:
                cpu = self.on_cpu is None or self.on_cpu(seg[0], layer, group, seg[2] - seg[1])
                ranges.append((seg, host, cpu))
            decided = (layer, group, ranges)
        if keep:
            step.decided = decided
        return decided[2]

    def begin(self, x: torch.Tensor, slots: list, layer: int, group: str, info: LoRABatchInfo) -> None:
        """Called before the base projection of `group`: the first range whose delta the workers compute is handed
        to them now, so they work while the device runs the projection (DESIGN.md: copy out, signal, then launch
        the base GEMMs); `apply` waits for it. (Each worker holds one task: later ranges go in `apply`.)"""
        step = info.kernel_meta
        if self.out_widths is None or not isinstance(step, CpuAssistStep):
            return
        step.started = None
        for (slot, start, end), host, cpu in self._decide(step, layer, group, keep=True):
            if not cpu:
                continue
            try:
                pending = self.pool.start_delta(host, layer, group, x[start:end], self.out_widths[group])
            except CpuAssistError:
                return  # apply asks again, and falls back as it does
            if pending is not None:
                step.started = (layer, group, (slot, start, end), pending)
                return

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, slots: list, layer: int, group: str, info: LoRABatchInfo
    ) -> None:
        """y [T, out] += every adapter's LoRA delta for `group` of `layer`, given the group input x [T, in]."""
        step = info.kernel_meta
        if not isinstance(step, CpuAssistStep):
            raise RuntimeError("CpuAssistLoRABackend.prepare was not called for this step")
        started, step.started = step.started, None
        if started is not None and started[:2] != (layer, group):
            started = None  # begun for another projection and never applied: its workers finish it unread
        on_cpu, on_gpu = [], []
        for seg, host, cpu in self._decide(step, layer, group):
            (on_cpu if cpu else on_gpu).append((seg, host))
        if self.on_layer_device is not None:
            for slot in sorted({seg[0] for seg, _ in on_gpu}):
                self.on_layer_device(slot, layer)
        failed: list[Segment] = []
        called: set[int] = set()  # slots on_fallback was called for
        workers_gone = False
        for (slot, start, end), host in on_cpu:
            if workers_gone:
                failed.append((slot, start, end))  # not tried: its delta comes from the inner backend below
                continue
            if host.layers[layer].get(group) is None:
                continue  # the adapter does not target this group in this layer
            try:  # adds into y[start:end] only once every slice is back; untouched when it raises
                if started is not None and started[2] == (slot, start, end):
                    self.pool.finish_delta(started[3], y[start:end])
                    started = None
                else:
                    self.pool.compute_delta(host, layer, group, x[start:end], out_features=y.shape[1],
                                            add_to=y[start:end])
                self.cpu_ranges += 1
            except CpuAssistError as e:
                workers_gone = self.pool.alive() == 0
                log.warning("CPU-assisted LoRA failed for layer %d %s (slot %d, tokens %d-%d): %s; falling back%s",
                            layer, group, slot, start, end, e,
                            " (no cpu_prefill worker left: the rest of this step runs on the device)"
                            if workers_gone else "")
                self.fallbacks += 1
                if self.on_fallback is not None:
                    self.on_fallback(slot)
                    called.add(slot)
                failed.append((slot, start, end))
        self.landed_ranges += len(on_gpu)
        extra = tuple(seg for seg, _ in on_gpu) + tuple(failed)
        sub = self._inner_info(step, tuple(sorted(extra, key=lambda s: s[1])))
        if sub is not None:
            self.inner.apply(y, x, slots, layer, group, sub)
        if workers_gone:  # later layers of this step: every range on the inner backend, without asking the pool
            if self.on_fallback is not None:
                for slot in sorted({seg[0] for seg, _ in step.assisted} - called):
                    self.on_fallback(slot)
            step.rest = step.rest + [seg for seg, _ in step.assisted]
            step.assisted = []
            step.inner_infos = {}
