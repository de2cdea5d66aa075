"""The activation channel between the engine and one cpu_prefill worker: one shared-memory segment, sized once.

Layout (byte offsets; every field int64, each side's fields on their own cache line so the two writers never
share one):

    [0, 64)     engine-written: request seq, stop flag, task header (adapter id, layer, group, tokens, in, out)
    [64, 128)   worker-written: done seq, status, worker pid, leaving flag, sleeping flag
    [128, 192)  fixed at creation: max_tokens, max_in, max_out, dtype (the worker maps its views from these),
                the worker's spin window in µs
    [256, ...)  input  buffer, max_tokens * max_in elements   (a task uses its first n * in as [n, in])
    [...]       output buffer, max_tokens * max_out elements  (a task's delta: its first n * out, [n, out])

The buffers hold the engine's dtype (float32, bfloat16 or float16; CHANNEL_DTYPES): on a GPU in half precision
an activation crosses PCIe in half the bytes of float32, in both directions, and nobody converts it on the way.

Protocol (single writer per field, so plain stores suffice on x86's total store order): the engine writes the
input slice and the header, then bumps the request seq; the worker busy-polls the request seq (for the channel's
spin window after its last task, then backing off to sleeps of up to 1 ms, so idle workers do not burn cores),
computes, writes the delta and its status, then sets done seq = request seq. The engine reads the output only once
done seq equals the seq it wrote. The spin window is the engine's to set, in the channel, so that joined workers
follow it too: short next to a CPU engine (SPIN_S: the workers share its cores), long next to a GPU engine
(GPU_SPIN_S: its workers have cores of their own, and a prefill's layers hand tasks over ~0.1-2 ms apart, which
doubling sleeps after a short window would each delay by up to ~0.3 ms). A worker that sleeps says so (its
sleeping flag) and sleeps waiting on its control connection: the engine, handing it a request, sends a wake
message there, so the first request after an idle period waits for no sleep to end (only for the wake-up).

On a GPU (`signal_through(device)`, the engine's side): the segment is page-locked (cudaHostRegister, pinning.py),
and a request whose input is on that device is handed over by the device's current stream: the input slice is an
async device-to-host copy, then the request seq an async copy of a one-element device tensor into its field. The
stream runs them in order, so the worker sees the new seq only once the slice has landed, and the engine's thread
never waits for the device to hand a request over (DESIGN.md, "CPU-assisted prefill — the mechanism"). The header
fields are plain host stores: the worker reads them only after the seq changes. The engine then waits only where
it adds the delta (the pool: done seq, then an async host-to-device copy of the output, ordered before the stream
writes the worker's next request seq, so the worker cannot overwrite an output still being copied). Until that
seq lands, `last_seq` (what the engine submitted) is ahead of the field: `idle()` compares the done seq with it.

Leaving (a joined worker asked to stop): the worker sets its leaving flag and keeps serving; the engine stops
handing it tasks, and once the channel is idle sets the stop flag and retires it; the worker exits on the stop flag.
So no task is dropped by a worker that leaves.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from services.cpu_prefill.segments import attach_segment, create_segment

# engine-written
REQ_SEQ, STOP, ADAPTER_ID, LAYER, GROUP, N_TOKENS, IN_WIDTH, OUT_WIDTH = range(8)
# worker-written
DONE_SEQ, STATUS, WORKER_PID, LEAVING, SLEEPING = 8, 9, 10, 11, 12
# fixed at creation
MAX_TOKENS, MAX_IN, MAX_OUT, DTYPE, SPIN_US = 16, 17, 18, 19, 20

CHANNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the DTYPE field holds the index here

CONTROL_BYTES = 256
STATUS_STARTING, STATUS_OK, STATUS_ERROR = 0, 1, 2

SPIN_S = 50e-6  # idle worker: busy-poll this long after the last task (next to a CPU engine) ...
GPU_SPIN_S = 5e-3  # (next to a GPU engine: longer than the gaps between a prefill's layers)
MAX_SLEEP_S = 1e-3  # ... then sleep, doubling from MIN_SLEEP_S up to this
MIN_SLEEP_S = 20e-6


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def channel_nbytes(max_tokens: int, max_in: int, max_out: int, dtype: torch.dtype = torch.float32) -> int:
    size = dtype.itemsize
    return CONTROL_BYTES + _align(size * max_tokens * max_in) + _align(size * max_tokens * max_out)


class HandoffChannel:
    """One worker's control block plus its input and output buffers; `create` on the engine, `attach` in the worker."""

    def __init__(self, shm, owner: bool) -> None:
        self.shm = shm
        self.name: str = shm.name.lstrip("/")
        self.owner = owner  # the creator closes AND unlinks; an attacher only closes
        self.ctrl = shm.buf[:CONTROL_BYTES].cast("q")  # int64 fields; indexing gives plain Python ints
        self.max_tokens = self.ctrl[MAX_TOKENS]
        self.max_in = self.ctrl[MAX_IN]
        self.max_out = self.ctrl[MAX_OUT]
        self.dtype: torch.dtype = CHANNEL_DTYPES[self.ctrl[DTYPE]]
        self.spin_s: float = self.ctrl[SPIN_US] / 1e6  # the worker's busy-poll window after a task
        in_count, out_count = self.max_tokens * self.max_in, self.max_tokens * self.max_out
        out_off = CONTROL_BYTES + _align(self.dtype.itemsize * in_count)
        # flat views; a task views its first n * width elements as a contiguous [n, width]
        self._inp = torch.frombuffer(shm.buf, dtype=self.dtype, count=in_count, offset=CONTROL_BYTES)
        self._out = torch.frombuffer(shm.buf, dtype=self.dtype, count=out_count, offset=out_off)
        self._views: dict[tuple[bool, int, int], torch.Tensor] = {}  # a step repeats few shapes: ~2 µs saved a call
        self.last_seq: int = self.ctrl[REQ_SEQ]  # engine side: the seq of its last submit
        self._device_seq: torch.Tensor | None = None  # signal_through: the next seq, on the device
        self._seq_field: torch.Tensor | None = None  # signal_through: the request seq field as a tensor
        self._pinned = None  # signal_through on CUDA: the segment's registration

    @classmethod
    def create(cls, max_tokens: int, max_in: int, max_out: int, dtype: torch.dtype = torch.float32,
               spin_s: float = SPIN_S) -> HandoffChannel:
        if min(max_tokens, max_in, max_out) <= 0:
            raise ValueError("max_tokens, max_in and max_out must be positive")
        if dtype not in CHANNEL_DTYPES:
            raise ValueError(f"a channel holds float32, bfloat16 or float16, not {dtype}")
        shm = create_segment(channel_nbytes(max_tokens, max_in, max_out, dtype))
        ctrl = shm.buf[:CONTROL_BYTES].cast("q")
        ctrl[MAX_TOKENS], ctrl[MAX_IN], ctrl[MAX_OUT] = max_tokens, max_in, max_out
        ctrl[DTYPE] = CHANNEL_DTYPES.index(dtype)
        ctrl[SPIN_US] = max(0, round(spin_s * 1e6))
        ctrl.release()
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> HandoffChannel:
        return cls(attach_segment(name), owner=False)

    # ---- views -------------------------------------------------------------------------------------------------
    def input_view(self, n: int, width: int) -> torch.Tensor:
        """[n, width] over the input buffer (the channel's dtype)."""
        return self._view(True, n, width)

    def output_view(self, n: int, width: int) -> torch.Tensor:
        """[n, width] over the output buffer (the channel's dtype)."""
        return self._view(False, n, width)

    def _view(self, inp: bool, n: int, width: int) -> torch.Tensor:
        key = (inp, n, width)
        v = self._views.get(key)
        if v is None:
            if len(self._views) >= 256:
                self._views.clear()
            v = self._views[key] = (self._inp if inp else self._out)[: n * width].view(n, width)
        return v

    # ---- engine side -------------------------------------------------------------------------------------------
    def signal_through(self, device: torch.device) -> None:
        """Hand requests whose input is on `device` over through its current stream (module docstring); on CUDA
        the segment is page-locked first. (On a CPU device the same copies run synchronously: tests.)"""
        from services.cpu_prefill.pinning import pin_host_memory

        if device.type == "cuda" and self._pinned is None:
            self._pinned = pin_host_memory(torch.frombuffer(self.shm.buf, dtype=torch.uint8))
        self._seq_field = torch.frombuffer(self.shm.buf, dtype=torch.int64, count=1, offset=8 * REQ_SEQ)
        self._device_seq = torch.zeros(1, dtype=torch.int64, device=device)

    @property
    def signals_on_stream(self) -> bool:
        return self._device_seq is not None

    def idle(self) -> bool:
        """Whether the worker has answered every request (the buffers may be rewritten)."""
        return self.ctrl[DONE_SEQ] == self.last_seq

    def submit(self, x: torch.Tensor, adapter_id: int, layer: int, group: int, out_width: int) -> int:
        """Copy x ([n, in], any float dtype/device; converted to the channel's dtype, on x's device) in, write the
        header, then bump the request seq; return it. With signal_through(x's device) both copies are enqueued on
        its stream and this returns at once."""
        n, width = x.shape
        if n > self.max_tokens or width > self.max_in or out_width > self.max_out:
            raise ValueError(f"task [{n}, {width}] -> {out_width} exceeds the channel's "
                             f"[{self.max_tokens}, {self.max_in}] -> {self.max_out}")
        if not self.idle():
            raise RuntimeError("submit on a channel whose worker has not answered its last request")
        on_stream = self._device_seq is not None and x.device == self._device_seq.device
        if on_stream:
            self.input_view(n, width).copy_(x if x.dtype == self.dtype else x.to(self.dtype), non_blocking=True)
        else:
            self.input_view(n, width).copy_(x)
        c = self.ctrl
        c[ADAPTER_ID], c[LAYER], c[GROUP], c[N_TOKENS], c[IN_WIDTH], c[OUT_WIDTH] = (
            adapter_id, layer, group, n, width, out_width)
        seq = self.last_seq + 1
        if on_stream:  # the stream writes it after the slice: the worker cannot see one without the other
            self._device_seq.fill_(seq)
            self._seq_field.copy_(self._device_seq, non_blocking=True)
        else:
            c[REQ_SEQ] = seq  # last: the payload and header are in place before the worker can see it
        self.last_seq = seq
        return seq

    def done(self, seq: int) -> bool:
        return self.ctrl[DONE_SEQ] == seq

    def status(self) -> int:
        return self.ctrl[STATUS]

    def request_stop(self) -> None:
        self.ctrl[STOP] = 1

    def leaving(self) -> bool:
        """Whether the worker asked to leave (it answers what it was given, and takes nothing new)."""
        return self.ctrl[LEAVING] != 0

    def sleeping(self) -> bool:
        """Whether the worker is in an idle sleep (a request handed over now should come with a wake message)."""
        return self.ctrl[SLEEPING] != 0

    # ---- worker side -------------------------------------------------------------------------------------------
    def header(self) -> tuple[int, int, int, int, int, int]:
        """(adapter id, layer, group, n tokens, in width, out width) of the pending request."""
        c = self.ctrl
        return c[ADAPTER_ID], c[LAYER], c[GROUP], c[N_TOKENS], c[IN_WIDTH], c[OUT_WIDTH]

    def wait_request(self, last_seq: int, on_idle: Callable[[], bool], spin_s: float | None = None,
                     sleep: Callable[[float], bool] | None = None) -> int | None:
        """Busy-poll for a request seq other than last_seq; None once stopped or when on_idle() says to exit.

        After spin_s (default: the channel's window) without a request the wait sleeps, doubling from MIN_SLEEP_S
        to MAX_SLEEP_S, with the sleeping flag set; on_idle runs before each sleep (the worker's housekeeping:
        parent liveness, control messages). `sleep(seconds)` sleeps and returns whether it was woken early (the
        worker: a poll of its control connection, where the engine sends its wake messages); woken, the wait spins
        for the window again. Default: time.sleep, never woken.
        """
        c = self.ctrl
        clock = time.perf_counter
        window = self.spin_s if spin_s is None else spin_s
        spin_until = clock() + window
        pause = MIN_SLEEP_S
        while True:
            seq = c[REQ_SEQ]
            if seq != last_seq:
                return seq
            if c[STOP]:
                return None
            if clock() < spin_until:
                continue
            if on_idle():
                return None
            c[SLEEPING] = 1
            woken = sleep(pause) if sleep is not None else time.sleep(pause)
            c[SLEEPING] = 0
            if woken:
                spin_until, pause = clock() + window, MIN_SLEEP_S
            else:
                pause = min(pause * 2, MAX_SLEEP_S)

    def set_worker(self, pid: int) -> None:
        self.ctrl[WORKER_PID] = pid
        self.ctrl[STATUS] = STATUS_OK

    def request_leave(self) -> None:
        self.ctrl[LEAVING] = 1

    def stopped(self) -> bool:
        return self.ctrl[STOP] != 0

    def finish(self, seq: int, status: int) -> None:
        self.ctrl[STATUS] = status
        self.ctrl[DONE_SEQ] = seq  # last: the delta and status are written before the engine can see it

    # ---- teardown ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the views and unmap; the owner also unlinks the segment. Idempotent."""
        if self.shm is None:
            return
        self._views.clear()
        if self._device_seq is not None and self._device_seq.is_cuda:  # no copy into the segment still queued
            torch.cuda.synchronize(self._device_seq.device)
        if self._pinned is not None:  # unregistered before the mapping goes
            self._pinned.release()
            self._pinned = None
        del self._inp, self._out
        self._seq_field = self._device_seq = None
        self.ctrl.release()
        shm, self.shm = self.shm, None
        try:
            shm.close()
        except BufferError:  # a caller still holds a view: the mapping goes with it, the name goes now
            pass
        if self.owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
