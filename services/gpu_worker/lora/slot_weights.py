"""The weights of one resident adapter laid out for the engine's fused projections.

The engine fuses q/k/v into one GEMM and gate/up into another, so an adapter's LoRA for a layer is grouped the
same way: one input shared by the group, the A matrices of its targeted parts stacked (one shrink GEMM for the
group), and per part a B matrix pre-multiplied by the PEFT scale (one expand GEMM per part, into its output
columns). Ranks differ freely between adapters, layers and parts: nothing is padded to a maximum rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.adapters import LoRAAdapter

# fused projection -> its parts, in the order their outputs are stacked in the fused base weight
PROJECTION_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


@dataclass
class LoRAPart:
    out_start: int  # first output column of this part in the fused projection
    out_end: int
    rank_start: int  # this part's rows in the group's stacked A
    rank_end: int
    b_scaled: torch.Tensor  # [out_end - out_start, rank]: B times the PEFT scale


@dataclass
class LoRAGroupWeights:
    a: torch.Tensor  # [sum of the parts' ranks, in_features]: the parts' A matrices stacked
    parts: list[LoRAPart]


# per layer: fused projection name -> its LoRA weights (absent when the adapter does not target that group)
SlotWeights = list[dict[str, LoRAGroupWeights]]


def build_slot_weights(
    adapter: LoRAAdapter,
    num_layers: int,
    part_widths: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
) -> SlotWeights:
    """Lay `adapter` out for the fused projections; `part_widths` gives each target's output width."""
    weights: SlotWeights = [{} for _ in range(num_layers)]
    write_slot_layers(weights, adapter, range(num_layers), part_widths, dtype, device)
    return weights


def write_slot_layers(
    weights: SlotWeights,
    adapter: LoRAAdapter,
    layers: range,
    part_widths: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Fill weights[layer] for `layers` (a pipelined load writes an adapter's layers group by group).

    Copies go to the device first and are scaled and cast there: from pinned host tensors they are asynchronous
    (on a side stream, a pipelined load never blocks the host)."""
    by_key = {(m.layer, m.module): m for m in adapter.modules if m.layer in layers}
    for layer in layers:
        groups: dict[str, LoRAGroupWeights] = {}
        for group, names in PROJECTION_GROUPS.items():
            a_list, parts, out_start, rank_start = [], [], 0, 0
            for name in names:
                width = part_widths[name]
                module = by_key.get((layer, name))
                if module is not None:
                    a_list.append(module.lora_a.to(device=device, non_blocking=True))
                    b = module.lora_b.to(device=device, non_blocking=True)
                    if module.scale != 1.0:  # (a host cache's B is scaled already: no kernel for it)
                        b = b.mul(module.scale)
                    b = b.to(dtype).contiguous()
                    parts.append(LoRAPart(out_start, out_start + width, rank_start, rank_start + module.rank, b))
                    rank_start += module.rank
                out_start += width
            if parts:
                a = torch.cat(a_list).to(dtype).contiguous()
                groups[group] = LoRAGroupWeights(a=a, parts=parts)
        weights[layer] = groups
