"""Pipelined adapter loading: an adapter's layers go to the device tier in layer groups, and the engine asks per
layer whether its group has landed (DESIGN.md, "Pipelined loading": the artifact splits 32 layers into 4 groups).

`PipelinedLoader.start(groups, write)` begins a load and returns its `LayerGroupLoad` at once; `write(layers)`
copies the adapter's weights for those layers into its slot (torch slot weights or the Triton pool's rows).

Each load has a thread of its own that calls `write` for the groups in order and publishes each group once
written, so the engine's thread does none of a load's host-side work: enqueueing the copies of a 7B adapter is
hundreds of torch operations (milliseconds), which the engine would otherwise spend before it launches the step's
prefill (`enqueue_s`: what the thread spent). (`threaded=False`, EngineConfig load_enqueue "inline": the caller
writes every group in `start`, as before; kept to measure the two against each other.)
- CUDA: the thread enqueues each group's copies on one side stream and records an event after them.
  `landed(layer)` is: its group published and its event complete; `wait_layer_on_device(layer)` makes the current
  stream wait for that event (the host blocks only until the thread has enqueued the group, never for the copies),
  which is what a range computed on the device while its adapter loads needs; `wait_on_device()` the same for the
  last group (decode, a fallback); `wait()` blocks the host for the whole load (before a slot's rows may be
  reused). The sources must be pinned for the copies to be asynchronous.
- CPU device: the thread's writes are the copies; a group has landed once written. There is nothing to overlap on
  a CPU device (the CPU computes both), so the engine only pipelines on a GPU; this is the same contract on the
  CPU, for tests.

`wait_layer_on_device(layer)` is the per-group form of `wait_on_device` (the engine's CPU assist uses it when a
range is computed on the device before its adapter has fully landed); `seconds()` is how long the whole load took
once done (the side stream's own timing on CUDA), from which the engine estimates when the next loads' groups land.

A failed write marks the load failed: `landed` stays false for the groups after it and `wait()` raises
LoadError with the reason (the engine then writes the adapter again at once rather than compute with missing layers).
"""
from __future__ import annotations

import contextlib
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
        self.enqueue_s: float | None = None  # host seconds its thread spent writing, up to its last group published

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


class _ThreadedLoad(LayerGroupLoad):
    """A load whose groups one thread of its own writes in order, publishing each group once written (module
    docstring). Subclasses say what a written group is: its marker, whether it is complete, and how the device
    waits for it."""

    def __init__(self, groups: list[range], write: Callable[[range], None],
                 before_group: Callable[[int], None] | None, threaded: bool = True) -> None:
        super().__init__(groups)
        self._published: list = []  # per written group, in order: its marker
        self._cond = threading.Condition()
        self._finished = False  # the thread has written every group, or failed
        self._thread = threading.Thread(target=self._run, args=(write, before_group), daemon=True,
                                        name="caraserve-adapter-load")
        if threaded:
            self._thread.start()
        else:  # inline: every group written (enqueued, on CUDA) by the caller, now; the thread is never started
            self._run(write, before_group)

    # what subclasses define
    def _context(self):
        """The context the thread writes in (CUDA: the side stream)."""
        return contextlib.nullcontext()

    def _mark(self):
        """After a group's write: its marker (CUDA: an event recorded on the side stream)."""
        return None

    def _complete(self, marker) -> bool:
        return True

    def _device_wait(self, marker) -> None:
        """Work issued on the device from now on sees the group of `marker`."""

    def _run(self, write: Callable[[range], None], before_group: Callable[[int], None] | None) -> None:
        start = time.perf_counter()
        try:
            with self._context():
                for g, layers in enumerate(self.groups):
                    if before_group is not None:
                        before_group(g)
                    write(layers)
                    marker = self._mark()
                    with self._cond:
                        self.enqueue_s = time.perf_counter() - start  # final once the last group is published
                        self._published.append(marker)
                        self._cond.notify_all()
        except BaseException as exc:  # reported by the waits; the groups after it never land
            self.error = exc
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _written(self, g: int):
        """Block until group g is written (its marker) or the thread failed before it (LoadError)."""
        with self._cond:
            self._cond.wait_for(lambda: g < len(self._published) or self._finished)
            if g < len(self._published):
                return self._published[g]
        self._raise_if_failed()
        raise LoadError(f"group {g} was never written")  # (unreachable: the thread writes every group or fails)

    def landed(self, layer: int) -> bool:
        g = self._group_of[layer]
        published = self._published  # appended by the thread only; a read of its length is atomic
        return g < len(published) and self._complete(published[g])

    def wait_layer_on_device(self, layer: int) -> None:
        self._device_wait(self._written(self._group_of[layer]))

    def wait_on_device(self) -> None:
        self._device_wait(self._written(len(self.groups) - 1))

    def _join(self) -> None:
        if self._thread.ident is not None:  # (never started: inline)
            self._thread.join()

    def wait(self) -> None:
        self._join()
        self._raise_if_failed()


class _HostLoad(_ThreadedLoad):
    """CPU device: the thread's writes are the copies; a group has landed once written."""

    def seconds(self) -> float | None:
        return self.enqueue_s if self._finished and self.error is None else None


class _CudaLoad(_ThreadedLoad):
    """CUDA: the thread enqueues each group's copies on the side stream and records an event after them."""

    def __init__(self, groups: list[range], write: Callable[[range], None], stream: torch.cuda.Stream,
                 before_group: Callable[[int], None] | None, threaded: bool = True) -> None:
        self._stream = stream
        self._device = stream.device
        # rows reserved (and zeroed) on the main stream before are written after: ordered here, on the engine's
        # thread, before the load's thread enqueues anything
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        self._start = torch.cuda.Event(enable_timing=True)
        self._start.record(stream)
        self._last = len(groups) - 1
        super().__init__(groups, write, before_group, threaded)

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self._device))  # a new thread's current device is not the engine's
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _mark(self):
        event = torch.cuda.Event(enable_timing=len(self._published) == self._last)  # timed: the last one only
        event.record(self._stream)
        return event

    def _complete(self, event) -> bool:
        return event.query()

    def _device_wait(self, event) -> None:
        torch.cuda.current_stream(self._device).wait_event(event)

    def wait(self) -> None:
        self._join()
        if self._published:
            self._published[-1].synchronize()
        self._raise_if_failed()

    def seconds(self) -> float | None:
        if self.error is not None or len(self._published) <= self._last or not self._published[-1].query():
            return None
        return self._start.elapsed_time(self._published[-1]) / 1000  # ms, on the side stream's clock


class PipelinedLoader:
    """Starts layer-group loads on `device`, a thread per load (on CUDA enqueueing on one side stream); with
    threaded=False the caller's thread writes (enqueues) every group in `start` instead.

    `before_group(g)` runs on a load's thread before group g is written: tests use it to hold groups back."""

    def __init__(self, device: torch.device, before_group: Callable[[int], None] | None = None,
                 threaded: bool = True) -> None:
        self.device = device
        self.before_group = before_group
        self.threaded = threaded
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, groups: list[range], write: Callable[[range], None]) -> LayerGroupLoad:
        if self._stream is not None:
            return _CudaLoad(groups, write, self._stream, self.before_group, self.threaded)
        return _HostLoad(groups, write, self.before_group, self.threaded)
