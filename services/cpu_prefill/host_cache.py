"""The node's host adapter cache: each adapter's LoRA weights in one shared-memory segment, laid out for the engine.

An adapter's segment holds exactly the tensors of `gpu_worker.lora.slot_weights.build_slot_weights`: per layer and
fused group ("qkv", "o", "gate_up", "down", in PROJECTION_GROUPS order) the parts' A matrices stacked, then each
part's B pre-multiplied by the PEFT scale (in float32, then rounded once to the cache's dtype); each tensor
C-contiguous at a 64-byte-aligned offset. The cache's dtype is the engine's (CpuAssist): the same values the device
slots hold, so a pipelined load copies half the bytes of float32 on a half-precision GPU engine and converts
nothing, and the workers compute from the weights the device would use. The
`HostAdapter` metadata (plain data, `to_dict`/`from_dict` for msgpack) tells another process where each tensor
lies; `attach` maps the segment there and returns torch views into it, with no copy. The GPU side copies the same
tensors into its slots; the cpu_prefill workers compute x·A·B from them directly.

`HostAdapterCache` (a plain synchronous class, thread-safe) creates and owns the segments: least-recently-used
eviction of idle adapters under a byte capacity, reference counts for adapters in use (never evicted), and
`close()` unlinking everything it created. Segment naming, untracked attach and the supervisor's cleanup of dead
creators' segments live in `segments.py` (cleanup_stale_segments is re-exported here).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch

from services.cpu_prefill.segments import (DEFAULT_PREFIX, attach_segment, cleanup_stale_segments,
                                           create_segment)
from services.gpu_worker.lora.slot_weights import build_slot_weights
from shared.adapters import LoRAAdapter

__all__ = ["TensorRef", "HostPart", "HostGroup", "HostAdapter", "attach", "HostAdapterCache", "HostCacheError",
           "HostCacheFullError", "cleanup_stale_segments"]

ALIGN = 64  # bytes: every tensor starts on a cache line
HOST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# per layer: group name -> (stacked A view, [(out_start, out_end, rank_start, rank_end, B view)])
AttachedLayers = list[dict[str, tuple[torch.Tensor, list[tuple[int, int, int, int, torch.Tensor]]]]]


@dataclass(frozen=True)
class TensorRef:
    """A C-contiguous tensor inside an adapter's shared-memory segment (of its HostAdapter's dtype)."""

    offset: int  # byte offset in the segment (64-byte aligned)
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_dict(self) -> dict:
        return {"offset": self.offset, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorRef:
        return cls(offset=int(d["offset"]), shape=tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class HostPart:
    """One projection of a fused group (same meaning as slot_weights.LoRAPart)."""

    out_start: int  # first output column of this part in the fused projection
    out_end: int
    rank_start: int  # this part's rows in the group's stacked A
    rank_end: int
    b: TensorRef  # [out_end - out_start, rank]: B times the PEFT scale

    def to_dict(self) -> dict:
        return {"out_start": self.out_start, "out_end": self.out_end, "rank_start": self.rank_start,
                "rank_end": self.rank_end, "b": self.b.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> HostPart:
        return cls(int(d["out_start"]), int(d["out_end"]), int(d["rank_start"]), int(d["rank_end"]),
                   TensorRef.from_dict(d["b"]))


@dataclass(frozen=True)
class HostGroup:
    """One fused group's LoRA weights for one layer."""

    a: TensorRef  # [sum of the parts' ranks, in_features]: the parts' A stacked
    parts: tuple[HostPart, ...]

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "parts": [p.to_dict() for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict) -> HostGroup:
        return cls(TensorRef.from_dict(d["a"]), tuple(HostPart.from_dict(p) for p in d["parts"]))


@dataclass(frozen=True)
class HostAdapter:
    """Where one cached adapter's tensors lie; plain data, sent to the cpu_prefill workers."""

    name: str
    segment: str  # shared-memory segment name (starts with the cache's prefix, "caraserve" by default)
    nbytes: int  # bytes of the segment used by the layout
    layers: tuple[dict[str, HostGroup], ...]  # per layer: group name -> HostGroup (absent if untargeted)
    dtype: str = "float32"  # of every tensor (a HOST_DTYPES key)

    @property
    def torch_dtype(self) -> torch.dtype:
        return HOST_DTYPES[self.dtype]

    def to_dict(self) -> dict:
        """Plain data (str, int, list, dict) for msgpack or pickle."""
        return {"name": self.name, "segment": self.segment, "nbytes": self.nbytes, "dtype": self.dtype,
                "layers": [{g: grp.to_dict() for g, grp in layer.items()} for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> HostAdapter:
        layers = tuple({g: HostGroup.from_dict(grp) for g, grp in layer.items()} for layer in d["layers"])
        if d["dtype"] not in HOST_DTYPES:
            raise ValueError(f"host adapter {d['name']}: unknown dtype {d['dtype']!r}")
        return cls(name=d["name"], segment=d["segment"], nbytes=int(d["nbytes"]), layers=layers, dtype=d["dtype"])


def _view(shm: SharedMemory, ref: TensorRef, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ref.shape and `dtype` aliasing the segment's bytes (no copy)."""
    return torch.frombuffer(shm.buf, dtype=dtype, count=ref.numel, offset=ref.offset).view(ref.shape)


def attach(host: HostAdapter) -> tuple[SharedMemory, AttachedLayers]:
    """Map the segment (no copy) and return (shm handle to keep alive/close, per layer: group -> (a view,
    [(out_start, out_end, rank_start, rank_end, b view)])).

    Views: a [sum of ranks, in_features], b [out_end - out_start, rank], host.dtype, aliasing the segment; treat them
    as read-only. The segment is attached untracked (see segments.py), so this process's exit never unlinks it.
    Drop every view before `shm.close()` (the views hold exports of shm.buf; close raises BufferError otherwise).
    """
    shm = attach_segment(host.segment)
    if shm.size < host.nbytes:
        shm.close()
        raise ValueError(f"segment {host.segment} holds {shm.size} bytes, adapter {host.name} needs {host.nbytes}")
    layers: AttachedLayers = []
    dtype = host.torch_dtype
    for layer in host.layers:
        layers.append({g: (_view(shm, grp.a, dtype),
                           [(p.out_start, p.out_end, p.rank_start, p.rank_end, _view(shm, p.b, dtype))
                            for p in grp.parts])
                       for g, grp in layer.items()})
    return shm, layers


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_layout(adapter: LoRAAdapter, num_layers: int, part_widths: dict[str, int],
                dtype: torch.dtype = torch.float32
                ) -> tuple[list[dict[str, tuple[HostGroup, list[torch.Tensor]]]], int]:
    """build_slot_weights (float32, CPU) with a segment offset per tensor, laid out for `dtype`.

    Returns (per layer: group -> (HostGroup, [a, b of each part] float32 tensors in offset order), total bytes).
    """
    slot = build_slot_weights(adapter, num_layers, part_widths, torch.float32, torch.device("cpu"))
    offset = 0

    def place(t: torch.Tensor) -> TensorRef:
        nonlocal offset
        ref = TensorRef(offset, tuple(t.shape))
        offset = _align(offset + ref.numel * dtype.itemsize)
        return ref

    plan = []
    for groups in slot:
        layer = {}
        for g, w in groups.items():
            a = place(w.a)
            parts = tuple(HostPart(p.out_start, p.out_end, p.rank_start, p.rank_end, place(p.b_scaled))
                          for p in w.parts)
            layer[g] = (HostGroup(a, parts), [w.a] + [p.b_scaled for p in w.parts])
        plan.append(layer)
    return plan, max(offset, ALIGN)


class HostCacheError(RuntimeError):
    """The host cache refused an operation (e.g. replacing or evicting an adapter in use)."""


class HostCacheFullError(HostCacheError):
    """An adapter does not fit: even with every idle adapter evicted, the in-use ones leave too little room."""


@dataclass
class _Entry:
    host: HostAdapter
    shm: SharedMemory
    refs: int = 0


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0


class HostAdapterCache:
    """Adapters in shared memory under a byte capacity; LRU eviction of idle adapters; reference counts.

    Synchronous and thread-safe. Every segment is created and owned by the process holding this cache, and
    unlinked when its adapter is evicted or replaced, or on close(). Tensors are stored in `dtype`.
    """

    def __init__(self, capacity_bytes: int, prefix: str = DEFAULT_PREFIX, dtype: torch.dtype = torch.float32):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        names = {d: n for n, d in HOST_DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"the host cache holds float32, bfloat16 or float16, not {dtype}")
        self.capacity_bytes = capacity_bytes
        self.prefix = prefix
        self.dtype = dtype
        self._dtype_name = names[dtype]
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._used = 0
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._closed = False

    def put(self, adapter: LoRAAdapter, num_layers: int, part_widths: dict[str, int]) -> HostAdapter:
        """Copy adapter into a new segment and cache it (idle, most recent); return its metadata.

        An idle entry of the same name is replaced (its segment unlinked); an in-use one raises HostCacheError.
        Least-recently-used idle adapters are evicted to make room; HostCacheFullError if it still does not fit.
        """
        plan, nbytes = plan_layout(adapter, num_layers, part_widths, self.dtype)
        with self._lock:
            self._check_open()
            old = self._entries.get(adapter.name)
            if old is not None and old.refs > 0:
                raise HostCacheError(f"adapter {adapter.name} is in use ({old.refs} references); cannot replace it")
            freeable = sum(e.host.nbytes for e in self._entries.values() if e.refs == 0)
            if self._used - freeable + nbytes > self.capacity_bytes:
                in_use = self._used - freeable
                raise HostCacheFullError(
                    f"adapter {adapter.name} needs {nbytes} bytes; host cache capacity {self.capacity_bytes}, "
                    f"{in_use} bytes held by adapters in use")
            if old is not None:
                self._drop(adapter.name)
            for name in [n for n, e in self._entries.items() if e.refs == 0]:
                if self._used + nbytes <= self.capacity_bytes:
                    break
                self._drop(name)
                self._counters.evictions += 1
            shm = create_segment(nbytes, self.prefix)
            try:
                layers = []
                for layer in plan:
                    for group, tensors in layer.values():
                        refs = [group.a] + [p.b for p in group.parts]
                        for ref, t in zip(refs, tensors):
                            _view(shm, ref, self.dtype).copy_(t)  # rounded once, as the device slot
                    layers.append({g: group for g, (group, _) in layer.items()})
            except BaseException:
                shm.close()
                shm.unlink()
                raise
            host = HostAdapter(name=adapter.name, segment=shm.name, nbytes=nbytes, layers=tuple(layers),
                               dtype=self._dtype_name)
            self._entries[adapter.name] = _Entry(host, shm)
            self._used += nbytes
            self._counters.puts += 1
            return host

    def acquire(self, name: str) -> HostAdapter | None:
        """Take a reference (the adapter cannot be evicted until released) and mark it recent; None if absent."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                self._counters.misses += 1
                return None
            entry.refs += 1
            self._entries.move_to_end(name)
            self._counters.hits += 1
            return entry.host

    def release(self, name: str) -> None:
        """Drop one reference taken by acquire."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.refs == 0:
                raise HostCacheError(f"release of adapter {name}, which holds no reference")
            entry.refs -= 1

    def contains(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def refcount(self, name: str) -> int:
        """References held on name (0 if idle or absent)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry.refs if entry is not None else 0

    def evict(self, name: str) -> bool:
        """Drop name and unlink its segment if it is cached and idle; True if it was dropped."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.refs > 0:
                return False
            self._drop(name)
            self._counters.evictions += 1
            return True

    def names(self) -> list[str]:
        """Cached adapter names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict:
        """Plain-data counters: entries, in_use, used/capacity bytes, hits, misses, puts, evictions."""
        with self._lock:
            c = self._counters
            return {"entries": len(self._entries), "in_use": sum(1 for e in self._entries.values() if e.refs),
                    "used_bytes": self._used, "capacity_bytes": self.capacity_bytes, "hits": c.hits,
                    "misses": c.misses, "puts": c.puts, "evictions": c.evictions}

    def close(self) -> None:
        """Unlink every segment this cache created, in use or not; the cache refuses further puts."""
        with self._lock:
            for name in list(self._entries):
                self._drop(name)
            self._closed = True

    def __enter__(self) -> HostAdapterCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        self._used -= entry.host.nbytes
        entry.shm.close()
        try:
            entry.shm.unlink()
        except FileNotFoundError:  # already removed (e.g. by a supervisor that thought us dead)
            resource_tracker.unregister(entry.shm._name, "shared_memory")  # unlink() skips this when it raises

    def _check_open(self) -> None:
        if self._closed:
            raise HostCacheError("host cache is closed")
