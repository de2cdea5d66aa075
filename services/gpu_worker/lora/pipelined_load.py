"""Pipelined adapter loading: an adapter's layers go to the device tier in layer groups, and the engine asks per
layer whether its group has landed (DESIGN.md, "Pipelined loading": the artifact splits 32 layers into 4 groups).

`PipelinedLoader.start(groups, write)` begins a load and returns its `LayerGroupLoad` at once; `write(layers)`
copies the adapter's weights for those layers into its slot (torch slot weights or the Triton pool's rows).

- CUDA: every group's `write` is enqueued on a side stream at once, an event recorded after each; the host never
  waits. `landed(layer)` queries the group's event; `wait_on_device()` makes the current stream wait for the last
  event (no host synchronisation), which is what decode and a fallback need; `wait()` blocks the host (before a
  slot's rows may be reused). The sources must be pinned for the copies to be asynchronous.
- CPU device: one background thread writes the groups in order and sets a flag after each. There is nothing to
  overlap on a CPU device (the CPU computes both), so the engine only pipelines on a GPU; the thread loader is the
  same contract on the CPU, for tests.

`wait_layer_on_device(layer)` is the per-group form of `wait_on_device` (the engine's CPU assist uses it when a
range is computed on the device before its adapter has fully landed); `seconds()` is how long the whole load took
once done (the side stream's own timing on CUDA), from which the engine estimates when the next loads' groups land.

A failed write marks the load failed: `landed` stays false for the groups after it and `wait()` raises
LoadError with the reason (the engine then writes the adapter again at once rather than compute with missing layers).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


class LoadError(RuntimeError):
    """Writing an adapter's layers to the device failed."""


def layer_groups(num_layers: int, num_groups: int) -> list[range]:
    """`num_layers` split into at most `num_groups` contiguous groups, sizes differing by at most one."""
    if num_layers < 1 or num_groups < 1:
        raise ValueError(f"need at least one layer and one group, got {num_layers} layers, {num_groups} groups")
    count = min(num_groups, num_layers)
    per, extra = divmod(num_layers, count)
    groups, start = [], 0
    for g in range(count):
        size = per + (g < extra)
        groups.append(range(start, start + size))
        start += size
    return groups


class LayerGroupLoad:
    """The progress of one adapter's load (see the module docstring)."""

    def __init__(self, groups: list[range]) -> None:
        self.groups = groups
        self._group_of = {layer: g for g, layers in enumerate(groups) for layer in layers}
        self.error: BaseException | None = None  # why a group could not be written (the later ones never are)
        self.started = time.monotonic()  # when it was enqueued (host clock)

    def group_of(self, layer: int) -> int:
        return self._group_of[layer]

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise LoadError(f"loading the adapter's layers failed: {self.error}") from self.error

    def landed(self, layer: int) -> bool:
        raise NotImplementedError

    def done(self) -> bool:
        """Every group landed (False after a failure)."""
        return self.landed(self.groups[-1][-1])

    def wait(self) -> None:
        """Block until the whole load is complete; LoadError if it failed."""
        raise NotImplementedError

    def wait_on_device(self) -> None:
        """Work issued on the device from now on sees every layer; on a CPU device this is `wait()`."""
        self.wait()

    def wait_layer_on_device(self, layer: int) -> None:
        """Work issued on the device from now on sees `layer` (its group); LoadError if that group never lands."""
        raise NotImplementedError

    def seconds(self) -> float | None:
        """How long the whole load took, once done (None before, or after a failure)."""
        raise NotImplementedError


class _ThreadLoad(LayerGroupLoad):
    def __init__(self, groups: list[range], write: Callable[[range], None],
                 before_group: Callable[[int], None] | None) -> None:
        super().__init__(groups)
        self._landed = [threading.Event() for _ in groups]
        self._finished = threading.Event()
        self._seconds: float | None = None
        self._thread = threading.Thread(target=self._run, args=(write, before_group), daemon=True,
                                        name="caraserve-adapter-load")
        self._thread.start()

    def _run(self, write: Callable[[range], None], before_group: Callable[[int], None] | None) -> None:
        start = time.perf_counter()
        try:
            for g, layers in enumerate(self.groups):
                if before_group is not None:
                    before_group(g)
                write(layers)
                self._landed[g].set()
            self._seconds = time.perf_counter() - start
        except BaseException as exc:  # reported by wait(); the groups after it never land
            self.error = exc
        finally:
            self._finished.set()

    def landed(self, layer: int) -> bool:
        return self._landed[self._group_of[layer]].is_set()

    def wait(self) -> None:
        self._finished.wait()
        self._raise_if_failed()

    def wait_layer_on_device(self, layer: int) -> None:
        landed = self._landed[self._group_of[layer]]
        while not landed.wait(0.05):
            if self._finished.is_set() and not landed.is_set():
                self._raise_if_failed()

    def seconds(self) -> float | None:
        return self._seconds if self._finished.is_set() else None


class _CudaLoad(LayerGroupLoad):
    def __init__(self, groups: list[range], write: Callable[[range], None], stream: torch.cuda.Stream) -> None:
        super().__init__(groups)
        self.events: list[torch.cuda.Event] = []
        self._device = stream.device
        main = torch.cuda.current_stream(stream.device)
        stream.wait_stream(main)  # rows reserved (and zeroed) on the main stream before are written after
        self._start = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            self._start.record(stream)
            for layers in groups:
                try:
                    write(layers)
                except BaseException as exc:  # a launch failed (out of memory...): later groups never land
                    self.error = exc
                    break
                event = torch.cuda.Event(enable_timing=True)
                event.record(stream)
                self.events.append(event)

    def landed(self, layer: int) -> bool:
        g = self._group_of[layer]
        return g < len(self.events) and self.events[g].query()

    def wait(self) -> None:
        if self.events:
            self.events[-1].synchronize()
        self._raise_if_failed()

    def wait_on_device(self) -> None:
        self._raise_if_failed()
        torch.cuda.current_stream(self._device).wait_event(self.events[-1])

    def wait_layer_on_device(self, layer: int) -> None:
        g = self._group_of[layer]
        if g >= len(self.events):
            self._raise_if_failed()
        torch.cuda.current_stream(self._device).wait_event(self.events[g])

    def seconds(self) -> float | None:
        if self.error is not None or not self.events[-1].query():
            return None
        return self._start.elapsed_time(self.events[-1]) / 1000  # ms, on the side stream's clock


class PipelinedLoader:
    """Starts layer-group loads on `device`: a side stream on CUDA, a thread per load otherwise.

    `before_group(g)` (thread loads only) runs before group g is written: tests use it to hold groups back."""

    def __init__(self, device: torch.device, before_group: Callable[[int], None] | None = None) -> None:
        self.device = device
        self.before_group = before_group
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, groups: list[range], write: Callable[[range], None]) -> LayerGroupLoad:
        if self._stream is not None:
            return _CudaLoad(groups, write, self._stream)
        return _ThreadLoad(groups, write, self.before_group)
