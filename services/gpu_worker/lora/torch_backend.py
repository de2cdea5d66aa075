"""Reference multi-LoRA backend in torch: shrink then expand, one adapter's token range at a time.

y[tokens of adapter i] += (x[tokens] @ A_iᵀ) @ (s_i · B_i)ᵀ, for each adapter in the step at its own rank.
It is the CPU runtime backend and the oracle for the GPU kernels.
"""
from __future__ import annotations

import torch

from services.gpu_worker.lora.bagged_pool import BaggedLoRAPool, BaggedStep
from services.gpu_worker.lora.batch_info import LoRABatchInfo
from services.gpu_worker.lora.slot_weights import SlotWeights


def lora_shrink(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # x: [n, in], a: [r, in] -> [n, r]
    return x @ a.t()


def lora_expand_(y: torch.Tensor, t: torch.Tensor, b_scaled: torch.Tensor) -> None:
    # y: [n, out] (a view into the projection output), t: [n, r], b_scaled: [out, r]; y += t @ b_scaledᵀ in place
    y.addmm_(t, b_scaled.t())


def apply_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    slots: list[SlotWeights | None],
    layer: int,
    group: str,
    info: LoRABatchInfo,
) -> None:
    """Add every adapter's LoRA delta for `group` of `layer` into `y` ([T, out]) given the group input x ([T, in])."""
    apply_segments(y, x, slots, layer, group, info.segments)


def apply_segments(y, x, slots: list[SlotWeights | None], layer: int, group: str,
                   segments: list[tuple[int, int, int]]) -> None:
    for slot, start, end in segments:
        weights = slots[slot]
        if weights is None:
            continue
        gw = weights[layer].get(group)
        if gw is None:
            continue
        t = lora_shrink(x[start:end], gw.a)
        ys = y[start:end]
        for part in gw.parts:
            lora_expand_(ys[:, part.out_start : part.out_end], t[:, part.rank_start : part.rank_end], part.b_scaled)


class TorchLoRABackend:
    """The backend interface the model calls (`prepare` once per step, `apply` per layer and group).

    bagged=True (the engine sets it on the CPU): segments of a few tokens (decode) go through BaggedLoRAPool, a few
    embedding_bag ops per layer for all of them, instead of two GEMMs per segment (see bagged_pool.py)."""

    def __init__(self, bagged: bool = False) -> None:
        self.bagged = BaggedLoRAPool() if bagged else None

    def prepare(self, info: LoRABatchInfo, slots: list[SlotWeights | None],
                prefill_ranges: list[tuple[int, int]] | None = None) -> None:
        if self.bagged is not None:
            info.kernel_meta = self.bagged.prepare(info.segments, slots)

    def apply(self, y, x, slots, layer: int, group: str, info: LoRABatchInfo) -> None:
        step = info.kernel_meta
        if not isinstance(step, BaggedStep):  # no bagging, or a caller that did not prepare: the loop
            apply_segments(y, x, slots, layer, group, info.segments)
            return
        plans = step.groups.get(group)
        if plans:
            BaggedLoRAPool.apply(y, x, layer, plans)
        rest = step.rest.get(group)
        if rest:
            apply_segments(y, x, slots, layer, group, rest)
