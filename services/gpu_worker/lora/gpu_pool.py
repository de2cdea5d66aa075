"""`LoRAGpuPool`: resident adapters' weights in buffers preallocated at start-up, which the Triton kernels index.

Layout (S-LoRA-like, nothing padded to the maximum rank). Per fused group g (qkv, o, gate_up, down; P_g parts,
input width K_g, widest part N_g) the pool holds, for all layers at once:
  a[g]  [L, R_g, K_g]   each resident adapter owns one contiguous extent of rows; in layer l its rows
                         off .. off + rank_l hold the A matrices of its targeted parts, stacked in part order
                         (as slot_weights.py stacks them)
  b[g]  [L, R_g, N_g]   the same rows hold each part's (s·B)ᵀ: row off + part_start + j is column j of s·B_p,
                         in columns 0 .. width_p (the PEFT scale folded in)
Metadata per entry e (a resident adapter; E = max_loras entries), on the device:
  row_off [E]                first row of e's extent (one offset for every layer of the group)
  rank [L, E]                stacked rank of e in layer l (0: the adapter does not target g there)
  part_rank, part_start [L, E, P_g]   each part's rank and first row inside the extent
and per group part_out, part_width [P_g] (each part's columns in the fused output).
An extent is as long as the adapter's largest stacked rank over layers (rank_pattern may vary it); rows are
first-fit allocated and compacted (live extents moved down, between steps) when the free rows are fragmented,
so any max_loras adapters of rank <= max_lora_rank always fit.

Memory: R_g = max_loras · max_lora_rank · P_g rows, so the pool takes
  bytes = L · max_loras · max_lora_rank · Σ_g P_g · (K_g + N_g) · dtype_size
  e.g. SmolLM2-135M (L 30, hidden 576, inter 1536, kv 192), bf16, 8 adapters of rank <= 64:
  30 · 8 · 64 · (3·(576+576) + (576+576) + 2·(576+1536) + (1536+576)) · 2 B = 336 MB
— the same as 8 all-linear rank-64 adapters when k/v are as wide as q (GQA's narrower k/v waste N_q - N_kv
columns of their rows). Metadata is O(L · E · P) int32.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.adapters import LoRAAdapter
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS


@dataclass
class PoolHandle:
    """What AdapterCache keeps in a slot when the Triton backend is on: the adapter's pool entry."""

    entry: int
    name: str


class GroupPool:
    """One fused group's buffers and metadata (see the module docstring for shapes)."""

    def __init__(self, num_layers: int, in_features: int, widths: list[int], rows: int, entries: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        parts = len(widths)
        self.rows = rows
        self.widths = widths
        self.a = torch.zeros(num_layers, rows, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_layers, rows, max(widths), dtype=dtype, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.row_off = torch.zeros(entries, **i32)
        self.rank = torch.zeros(num_layers, entries, **i32)
        self.part_rank = torch.zeros(num_layers, entries, parts, **i32)
        self.part_start = torch.zeros(num_layers, entries, parts, **i32)
        starts = [sum(widths[:p]) for p in range(parts)]
        self.part_out = torch.tensor(starts, **i32)
        self.part_width = torch.tensor(widths, **i32)
        self.max_width = max(widths)
        self.extents: dict[int, tuple[int, int]] = {}  # entry -> (first row, rows), host side
        self.max_rank = [0] * entries  # entry -> its largest stacked rank over layers (host: sizes the grid)

    def allocate(self, entry: int, length: int, before_compact: Callable[[], None] | None = None) -> int:
        """Reserve `length` contiguous rows for `entry`; returns the first row. `before_compact` runs before live
        rows are moved (a pipelined load still writing into them must finish first)."""
        off = self._first_fit(length)
        if off is None:
            if before_compact is not None:
                before_compact()
            self._compact()
            off = self._first_fit(length)
        if off is None:
            raise RuntimeError(f"LoRA pool full: {length} rows asked, {self.rows - self._used()} free of {self.rows}")
        self.extents[entry] = (off, length)
        self.row_off[entry] = off
        return off

    def release(self, entry: int) -> None:
        self.extents.pop(entry, None)
        self.rank[:, entry] = 0
        self.part_rank[:, entry] = 0
        self.max_rank[entry] = 0

    def _used(self) -> int:
        return sum(n for _, n in self.extents.values())

    def _first_fit(self, length: int) -> int | None:
        pos = 0
        for off, n in sorted(self.extents.values()):
            if off - pos >= length:
                return pos
            pos = off + n
        return pos if self.rows - pos >= length else None

    def _compact(self) -> None:
        """Move live extents down to row 0 in order; only between steps (no kernel reads a moved row mid-step)."""
        pos = 0
        for entry, (off, n) in sorted(self.extents.items(), key=lambda kv: kv[1][0]):
            if off != pos:
                self.a[:, pos : pos + n] = self.a[:, off : off + n].clone()
                self.b[:, pos : pos + n] = self.b[:, off : off + n].clone()
                self.extents[entry] = (pos, n)
                self.row_off[entry] = pos
            pos += n


class LoRAGpuPool:
    """Every group's pool; `build` (AdapterCache's slot filler) writes an adapter in, `free` takes it out."""

    def __init__(self, num_layers: int, part_widths: dict[str, int], in_features: dict[str, int], max_loras: int,
                 max_lora_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers = num_layers
        self.max_lora_rank = max_lora_rank
        self.dtype, self.device = dtype, device
        self.groups: dict[str, GroupPool] = {}
        for group, names in PROJECTION_GROUPS.items():
            rows = max_loras * max_lora_rank * len(names)
            widths = [part_widths[n] for n in names]
            self.groups[group] = GroupPool(num_layers, in_features[group], widths, rows, max_loras, dtype, device)
        self._free_entries = list(range(max_loras))
        self.before_compact: Callable[[], None] | None = None  # the pipelined loader's "finish what you write"

    @staticmethod
    def in_features_from_widths(part_widths: dict[str, int]) -> dict[str, int]:
        """Each group's input width, from LlamaModel.lora_part_widths (o reads attention, down the MLP)."""
        return {"qkv": part_widths["o_proj"], "o": part_widths["q_proj"], "gate_up": part_widths["o_proj"],
                "down": part_widths["gate_proj"]}

    def nbytes(self) -> int:
        return sum(g.a.nbytes + g.b.nbytes for g in self.groups.values())

    def build(self, adapter: LoRAAdapter) -> PoolHandle:
        """Write `adapter` into a free entry; raises (leaving the pool unchanged) if none is free or it is too big."""
        handle = self.reserve(adapter)
        self.write_layers(handle, adapter, range(self.num_layers))
        return handle

    def reserve(self, adapter: LoRAAdapter) -> PoolHandle:
        """Take an entry and rows for `adapter` and set its metadata, without writing any weights (a pipelined load
        then writes them with `write_layers`, group by group); raises, leaving the pool unchanged, if it cannot."""
        if not self._free_entries:
            raise RuntimeError("LoRA pool: no free entry (more resident adapters than max_loras)")
        entry = self._free_entries.pop(0)
        try:
            by_key = {(m.layer, m.module): m for m in adapter.modules}
            for group, names in PROJECTION_GROUPS.items():
                self._reserve_group(self.groups[group], entry, names, by_key)
        except Exception:
            self._release(entry)
            raise
        return PoolHandle(entry, adapter.name)

    def write_layers(self, handle: PoolHandle, adapter: LoRAAdapter, layers: range) -> None:
        """Copy `adapter`'s weights for `layers` into the rows `reserve` gave `handle`. Copies go to the device
        first and are scaled and cast there: from pinned host tensors (on a side stream) they never block the host.
        A pipelined load's source (the host cache: the pool's dtype, B already scaled) takes one copy per A and two
        per B (to the device, then transposed into its rows): the host enqueues as few operations as it can."""
        entry = handle.entry
        by_key = {(m.layer, m.module): m for m in adapter.modules if m.layer in layers}
        for group, names in PROJECTION_GROUPS.items():
            g = self.groups[group]
            if entry not in g.extents:
                continue  # the adapter does not target this group anywhere
            off = g.extents[entry][0]
            for layer in layers:
                start = 0  # the parts' rows follow each other in part order, as reserve's part_start says
                for p, name in enumerate(names):
                    m = by_key.get((layer, name))
                    if m is None:
                        continue
                    rows = slice(off + start, off + start + m.rank)
                    a = m.lora_a  # same dtype: straight into its (contiguous) rows; else cast on the device
                    g.a[layer, rows].copy_(a if a.dtype == self.dtype else a.to(self.device, non_blocking=True),
                                           non_blocking=True)
                    b = m.lora_b.to(device=self.device, non_blocking=True)
                    if m.scale != 1.0:
                        b = b.mul(m.scale)  # in B's own dtype, then rounded once by the copy, as build_slot_weights
                    g.b[layer, rows, : g.widths[p]].copy_(b.t())
                    start += m.rank

    def free(self, handle: PoolHandle) -> None:
        """The slot holding `handle` was emptied: its rows and entry become reusable."""
        self._release(handle.entry)

    def _release(self, entry: int) -> None:
        for g in self.groups.values():
            g.release(entry)
        if entry not in self._free_entries:
            self._free_entries.append(entry)

    def _reserve_group(self, g: GroupPool, entry: int, names: tuple[str, ...], by_key: dict) -> None:
        layer_ranks = []
        for layer in range(self.num_layers):
            ranks = [by_key[(layer, n)].rank if (layer, n) in by_key else 0 for n in names]
            if max(ranks) > self.max_lora_rank:
                raise ValueError(f"adapter rank {max(ranks)} exceeds max_lora_rank {self.max_lora_rank}")
            layer_ranks.append(ranks)
        length = max(sum(r) for r in layer_ranks)
        if length == 0:
            return
        g.allocate(entry, length, self.before_compact)
        g.max_rank[entry] = length
        rank_host, ps_host = [], []
        for ranks in layer_ranks:
            rank_host.append(sum(ranks))
            ps_host.append([sum(ranks[:p]) for p in range(len(ranks))])
        i32 = dict(dtype=torch.int32, device=self.device)
        g.rank[:, entry] = torch.tensor(rank_host, **i32)
        g.part_rank[:, entry] = torch.tensor(layer_ranks, **i32)
        g.part_start[:, entry] = torch.tensor(ps_host, **i32)
