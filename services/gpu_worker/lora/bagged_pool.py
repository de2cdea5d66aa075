"""`BaggedLoRAPool`: the CPU path for a step's short LoRA segments (decode tokens), a few ops per layer however many
adapters the batch mixes.

The reference loop (torch_backend.apply_lora) runs a shrink and an expand GEMM per adapter segment, per layer and
group. A decode token is a segment of one token: each of those GEMMs is a few microseconds of dispatch for
nanoseconds of arithmetic, so on a CPU a decode step with 32 distinct adapters spent ~50 ms in LoRA against ~16 ms
with the same 32 tokens over 8 adapters (SmolLM2-135M, q,v adapters of ranks 8-64), the throughput lost by serving
many adapters at once. Here every short segment of a group is done with `torch.nn.functional.embedding_bag`, which
gathers and sums rows of one weight matrix with per-row weights, reading only the rows the batch uses:

  shrink   t_i = x_i · Aᵀ        = Σ_h x_i[h] · Aᵀ[h, :]       (a bag of H rows of the adapter's Aᵀ, weights x_i)
  expand   y_i += (s·B) · t_i    = Σ_k t_i[k] · (s·B)ᵀ[k, :]   (a bag of r rows of (s·B)ᵀ, weights t_i)

Layout, per fused group and stacked width W (the sum of the group's part ranks; adapters of one width share a class,
so nothing is padded to a maximum rank), for all layers at once, entry e an adapter of the class:
  a    [L, cap·H, W]         rows e·H .. e·H+H-1 hold the adapter's stacked Aᵀ (H = the group's input width)
  b[p] [L, cap·W, width_p]   per output part p (its columns in the fused projection): row e·W + k holds column k of
                             s·B_p, for the rank rows k of p in the stacked A
Only adapters whose group has the same parts and ranks in every layer are pooled (PEFT's rank_pattern can vary them:
those keep the per-segment loop). Entries are filled lazily, the first step a slot's weights appear in, and
freed when the slot holds other weights; classes grow by doubling. Memory: one more copy of the resident slots'
weights (max_loras adapters at most).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.gpu_worker.lora.slot_weights import SlotWeights

# segments of at most this many tokens take the bagged path (longer ones are GEMMs worth their dispatch)
MAX_BAGGED_TOKENS = 8


def _signature(weights: SlotWeights, group: str):
    """(W, in_features, ((out_start, out_end, rank_start, rank_end), ...)) if `group` is the same in every layer."""
    sig = None
    for layer in weights:
        gw = layer.get(group)
        if gw is None:
            return None
        s = (gw.a.shape[0], gw.a.shape[1], tuple((p.out_start, p.out_end, p.rank_start, p.rank_end) for p in gw.parts))
        if sig is None:
            sig = s
        elif s != sig:
            return None
    return sig


class _Class:
    """The pooled weights of one group's adapters of one stacked width."""

    def __init__(self, num_layers: int, in_features: int, width: int, dtype: torch.dtype) -> None:
        self.num_layers, self.in_features, self.width, self.dtype = num_layers, in_features, width, dtype
        self.cap = 0
        self.a = torch.empty(num_layers, 0, width, dtype=dtype)
        self.b: dict[tuple[int, int], torch.Tensor] = {}  # (out_start, out_end) -> [L, cap*W, out width]
        self.free: list[int] = []

    def _grow(self) -> None:
        cap = max(4, 2 * self.cap)
        h, w = self.in_features, self.width
        a = torch.zeros(self.num_layers, cap * h, w, dtype=self.dtype)
        a[:, : self.cap * h] = self.a
        self.a = a
        for key, b in self.b.items():
            nb = torch.zeros(self.num_layers, cap * w, b.shape[2], dtype=self.dtype)
            nb[:, : self.cap * w] = b
            self.b[key] = nb
        self.free.extend(range(cap - 1, self.cap - 1, -1))
        self.cap = cap

    def add(self, weights: SlotWeights, group: str) -> int:
        if not self.free:
            self._grow()
        e = self.free.pop()
        h, w = self.in_features, self.width
        for layer, groups in enumerate(weights):
            gw = groups[group]
            self.a[layer, e * h : (e + 1) * h].copy_(gw.a.t())
            for part in gw.parts:
                key = (part.out_start, part.out_end)
                if key not in self.b:
                    self.b[key] = torch.zeros(self.num_layers, self.cap * w, part.out_end - part.out_start,
                                              dtype=self.dtype)
                self.b[key][layer, e * w + part.rank_start : e * w + part.rank_end].copy_(part.b_scaled.t())
        return e

    def remove(self, e: int) -> None:
        self.free.append(e)


@dataclass
class _PartPlan:
    out: tuple[int, int]  # the part's columns in the fused output
    rows: torch.Tensor  # [n] flat-batch rows of the tokens whose adapter targets the part
    bag_idx: torch.Tensor  # rows of b[out] (the tokens' rank rows), bag after bag
    bag_off: torch.Tensor  # [n] first index of each token's bag
    weight_idx: torch.Tensor  # positions of those ranks in the flattened shrink output [k, W]


@dataclass
class _ClassPlan:
    cls: _Class
    rows: torch.Tensor  # [k] flat-batch rows of the class's tokens
    shrink_idx: torch.Tensor  # [k*H] rows of cls.a: token i's adapter's Aᵀ rows
    shrink_off: torch.Tensor  # [k] = 0, H, 2H, ...
    parts: list[_PartPlan]


@dataclass
class BaggedStep:
    """A step's plan: per group, the classes its bagged tokens use; `rest` the segments left to the loop."""

    groups: dict[str, list[_ClassPlan]] = field(default_factory=dict)
    rest: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)


class BaggedLoRAPool:
    """The pools and the per-step plan: `prepare(segments, slots)` once per step (pools new slot weights, drops
    replaced ones, splits the segments into bagged tokens and the rest), `apply` per layer and group."""

    def __init__(self, max_tokens: int = MAX_BAGGED_TOKENS) -> None:
        self.max_tokens = max_tokens
        self._classes: dict[tuple[str, int, int], _Class] = {}  # (group, W, in_features) -> class
        # slot -> (its weights object, {group: (class, entry, signature)}, its groups); refreshed when the slot's
        # weights change
        self._entries: dict[int, tuple[SlotWeights, dict, set[str]]] = {}

    def _entry(self, slot: int, weights: SlotWeights) -> tuple[dict, set[str]]:
        """The slot's pooled groups ({group: (class, entry, signature)}) and every group it has in some layer."""
        held = self._entries.get(slot)
        if held is not None and held[0] is weights:
            return held[1], held[2]
        if held is not None:
            self._release(slot)
        all_groups = {group for layer in weights for group in layer}
        groups = {}
        for group in sorted(all_groups):
            sig = _signature(weights, group)
            if sig is None:
                continue
            width, in_features, _ = sig
            key = (group, width, in_features)
            cls = self._classes.get(key)
            if cls is None:
                cls = self._classes[key] = _Class(len(weights), in_features, width, weights[0][group].a.dtype)
            groups[group] = (cls, cls.add(weights, group), sig)
        self._entries[slot] = (weights, groups, all_groups)
        return groups, all_groups

    def _release(self, slot: int) -> None:
        _, groups, _ = self._entries.pop(slot)
        for cls, e, _ in groups.values():
            cls.remove(e)

    def prepare(self, segments: list[tuple[int, int, int]], slots: list[SlotWeights | None]) -> BaggedStep:
        for slot in [s for s in self._entries if s >= len(slots) or slots[s] is not self._entries[s][0]]:
            self._release(slot)  # the slot was emptied or refilled: its entries go back to their classes
        step = BaggedStep()
        tokens: dict[str, dict[_Class, list[tuple[int, int, tuple]]]] = {}  # group -> class -> (row, entry, sig)
        for seg in segments:
            slot, start, end = seg
            weights = slots[slot]
            if not weights:
                continue
            pooled_groups, all_groups = self._entry(slot, weights)
            if end - start > self.max_tokens:
                pooled_groups = {}
            for group in all_groups:
                pooled = pooled_groups.get(group)
                if pooled is None:
                    step.rest.setdefault(group, []).append(seg)
                    continue
                cls, e, sig = pooled
                tokens.setdefault(group, {}).setdefault(cls, []).extend((row, e, sig) for row in range(start, end))
        for group, by_class in tokens.items():
            step.groups[group] = [self._class_plan(cls, items) for cls, items in by_class.items()]
        return step

    @staticmethod
    def _class_plan(cls: _Class, items: list[tuple[int, int, tuple]]) -> _ClassPlan:
        h, w = cls.in_features, cls.width
        rows = torch.tensor([row for row, _, _ in items], dtype=torch.long)
        entries = torch.tensor([e for _, e, _ in items], dtype=torch.long)
        shrink_idx = (entries[:, None] * h + torch.arange(h)).reshape(-1)
        shrink_off = torch.arange(0, len(items) * h, h, dtype=torch.long)
        per_part: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
        for i, (_, e, sig) in enumerate(items):
            for out_start, out_end, rank_start, rank_end in sig[2]:
                per_part.setdefault((out_start, out_end), []).append((i, e, rank_start, rank_end))
        parts = []
        for out, members in per_part.items():
            bag_idx, weight_idx, offsets, n = [], [], [], 0
            for i, e, rs, re in members:
                offsets.append(n)
                bag_idx.extend(range(e * w + rs, e * w + re))
                weight_idx.extend(range(i * w + rs, i * w + re))
                n += re - rs
            parts.append(_PartPlan(out, rows[[i for i, _, _, _ in members]], torch.tensor(bag_idx),
                                   torch.tensor(offsets), torch.tensor(weight_idx)))
        return _ClassPlan(cls, rows, shrink_idx, shrink_off, parts)

    @staticmethod
    def apply(y: torch.Tensor, x: torch.Tensor, layer: int, plans: list[_ClassPlan]) -> None:
        """y[rows] += the LoRA deltas of the bagged tokens of one group in `layer`."""
        for plan in plans:
            cls = plan.cls
            xs = x.index_select(0, plan.rows).reshape(-1)
            t = F.embedding_bag(plan.shrink_idx, cls.a[layer], plan.shrink_off, mode="sum",
                                per_sample_weights=xs).reshape(-1)
            for part in plan.parts:
                delta = F.embedding_bag(part.bag_idx, cls.b[part.out][layer], part.bag_off, mode="sum",
                                        per_sample_weights=t.index_select(0, part.weight_idx))
                y[:, part.out[0] : part.out[1]].index_add_(0, part.rows, delta)
