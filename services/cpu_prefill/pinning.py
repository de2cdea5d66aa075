"""Page-locking memory the GPU copies to and from: `pin_host_memory(tensor)` registers an existing host buffer (a
shared-memory segment's mapping) with CUDA (cudaHostRegister), in place, without a copy.

Why: a copy between the GPU and pageable memory is synchronous for the host (the driver stages it), so a copy marked
non_blocking into a plain shared-memory mapping would still stop the engine's thread until the GPU had run every
kernel queued before it. Into registered memory it is a DMA the stream orders like a kernel: the host enqueues it
and goes on (DESIGN.md, "CPU-assisted prefill — the mechanism"). The registration must be undone (`release()`)
before the mapping goes away.
"""
from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)


class PinnedRange:
    """A registered host range; `release()` unregisters it (idempotent)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.ptr, self.nbytes = ptr, nbytes

    def release(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            error = int(torch.cuda.cudart().cudaHostUnregister(ptr))
            if error:
                log.warning("cudaHostUnregister of %d bytes at %#x failed (CUDA error %d)", self.nbytes, ptr, error)


def pin_host_memory(tensor: torch.Tensor) -> PinnedRange | None:
    """Register `tensor`'s bytes (a contiguous CPU tensor over memory it does not own, e.g. torch.frombuffer of a
    shared-memory mapping) as page-locked for every CUDA device. None, with a warning, if CUDA refuses: copies to
    and from it then still work, synchronously."""
    if not torch.cuda.is_available():
        return None
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("pin_host_memory needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    error = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0))
    if error:
        _clear_last_cuda_error()
        log.warning("cudaHostRegister of %d bytes failed (CUDA error %d): copies to and from this memory are "
                    "synchronous", nbytes, error)
        return None
    return PinnedRange(tensor.data_ptr(), nbytes)


def _clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed registration: torch checks cudaGetLastError after its
    kernel launches, and would report this error at the next one. (torch binds no cudaGetLastError: the runtime
    library it loaded is called directly.)"""
    try:
        with open("/proc/self/maps") as maps:
            path = next(line.split()[-1] for line in maps if "libcudart.so" in line)
        ctypes.CDLL(path).cudaGetLastError()
    except (OSError, StopIteration, AttributeError) as exc:
        log.warning("could not reset the CUDA error state (%s): the next kernel launch may report it", exc)
