"""The base model's linear layers: y = x·Wᵀ (+ b).

On a CPU in float32 the weights are reordered once, at load, into oneDNN's blocked layout, and every call goes to
oneDNN's linear primitive with that prepacked weight. The plain path, F.linear, is an MKL GEMM that packs the whole
weight again on every call: for the few rows of a decode step that packing costs more than the product. Measured on
the 2-core AMD EPYC we develop on (torch 2.13, fp32, SmolLM2-135M shapes): the fused gate/up projection
[3072 x 576] at 2 / 8 rows takes 0.47 / 0.58 ms with F.linear and 0.11 / 0.32 ms prepacked, the 49152-wide
lm_head at 1 / 3 rows 11.7 / 39.9 ms against 5.7 / 7.4 ms; a 512-row prefill chunk gains ~10%.

Elsewhere (CUDA, or half precision) the weights stay plain tensors and F.linear runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The row count oneDNN tunes the blocked layout for; any count works with it. Decode batches are a few to a few
# dozen rows, the case the reorder is for (prefill chunks of hundreds of rows gain little either way).
PACK_ROWS_HINT = 64


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """True where weights are prepacked: float32 on a CPU with oneDNN (torch's mkldnn) built in."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, in], float32, CPU) in oneDNN's layout: an opaque tensor only `linear` below reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ b) for a plain or a prepacked weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
