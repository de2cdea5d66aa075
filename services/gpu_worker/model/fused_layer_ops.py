"""Triton kernels fusing the memory-bound steps of a decoder layer that surround its GEMMs and attention.

Besides its four GEMMs, its LoRA launches and attention, the torch path of a layer runs ~35 small device ops: the
two RMSNorms (to float, square, mean, add eps, rsqrt, scale, back to the dtype, weight: 8 each), two residual adds,
RoPE of q and k (negation, concatenation, two products and a sum each), the two cache writes, SiLU and the gate
product. On a GPU each is a launch of ~5-10 us of host time and a round trip through memory: for a 32-layer model
in a decode step that is ~1100 launches, more host time than the step's bandwidth bound (bench/launch_overhead.py
measures a 7B decode step's host time both ways). These kernels do the same work in four launches a layer:

  rms_norm(x, w, eps, residual=None)  one row per program. With `residual`: residual += x first, in place, and the
                                      sum is normalised: the sublayer's residual add folded into the next norm.
  silu_mul(gate_up)                   SiLU(gate) * up, over the fused gate/up projection's output [T, 2I] -> [T, I].
  rope_and_cache(qkv, ...)            one program per (token, q or k head): RoPE of that head in place in the
                                      fused q/k/v projection's output; a k head also goes, with its v head, to the
                                      token's KV cache slot. Returns q as a [T, H, D] view of qkv.

Rounding follows transformers' Llama op by op: each intermediate that HF rounds to the activations' dtype is rounded
here too (the normalised row before the weight, SiLU before the product, each RoPE product before their sum, the
residual sum), so in bf16/fp16 the kernels give HF's values up to float32 summation order and the GPU's approximate
rsqrt/exp. Their torch twins are the model's own torch path (`rms_norm` and `apply_rope` beside the model, F.silu).
Used by LlamaModel on the Triton path (attention_backend "triton", the default on CUDA).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.gpu_worker.lora.triton_kernels import next_power_of_2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SILU_BLOCK = 1024  # columns of the gate/up product per program


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # residual + x in float32, rounded to the dtype (HF's residual add), stored back in place
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(r.dtype)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)  # HF: normalise in float32, back to the dtype, then scale
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_g, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_g + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # F.silu: float32 inside, rounded to the dtype
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """HF's x * cos + rotate_half(x) * sin on the two halves of a head, each product rounded to x's dtype."""
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (x1f * c1).to(dt).to(tl.float32) + (-(x2f * s1)).to(dt).to(tl.float32)
    o2 = (x2f * c2).to(dt).to(tl.float32) + (x1f * s2).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr, positions_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
    stride_t, stride_cos, stride_ks, stride_kh, stride_vs, stride_vh,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid: (tokens, HEADS + KV_HEADS); head h < HEADS is a q head, the others k heads (with their v heads)
    t, h = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    pos = tl.load(positions_ptr + t)
    row = qkv_ptr + t * stride_t
    head = row + h * 2 * HALF  # q heads, then k heads, then v heads along the row
    x1 = tl.load(head + offs, mask=mask, other=0.0)
    x2 = tl.load(head + HALF + offs, mask=mask, other=0.0)
    table = pos * stride_cos + offs  # float32 tables, rounded to the dtype as HF's cos.to(dtype)
    c1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(x1.dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0).to(x1.dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(x1.dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0).to(x1.dtype).to(tl.float32)
    o1, o2 = _rotate(x1, x2, c1, c2, s1, s2)
    if h < HEADS:
        tl.store(head + offs, o1, mask=mask)
        tl.store(head + HALF + offs, o2, mask=mask)
    else:
        kvh = h - HEADS
        slot = tl.load(slots_ptr + t).to(tl.int64)
        k_dst = k_cache_ptr + slot * stride_ks + kvh * stride_kh
        tl.store(k_dst + offs, o1, mask=mask)
        tl.store(k_dst + HALF + offs, o2, mask=mask)
        v_src = row + (HEADS + KV_HEADS + kvh) * 2 * HALF
        v_dst = v_cache_ptr + slot * stride_vs + kvh * stride_vh
        tl.store(v_dst + offs, tl.load(v_src + offs, mask=mask, other=0.0), mask=mask)
        tl.store(v_dst + HALF + offs, tl.load(v_src + HALF + offs, mask=mask, other=0.0), mask=mask)


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.stride(1) != 1 or t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be [T, N] fp16/bf16/fp32, contiguous along N; got {tuple(t.shape)} "
                         f"{t.dtype} strides {t.stride()}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row of x ([T, N]) scaled by weight ([N]); a new [T, N] tensor (or `out`).

    With `residual` ([T, N], x's dtype): residual += x in place first, and the sum is what is normalised."""
    _check_rows("x", x)
    rows, n = x.shape
    if weight.shape != (n,) or weight.device != x.device:
        raise ValueError(f"weight must be [{n}] on {x.device}, got {tuple(weight.shape)} on {weight.device}")
    if residual is not None:
        _check_rows("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError("residual must be like x (shape, dtype, device)")
    if out is None:
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError("out must be like x (shape, dtype), contiguous along N")
    if rows == 0:
        return out
    block = next_power_of_2(n)
    res = x if residual is None else residual
    _rms_norm_kernel[(rows,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), n, eps,
                              HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the fused projection's output [T, 2I] (gate first); a new [T, I] tensor."""
    _check_rows("gate_up", gate_up)
    rows, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up must hold gate and up side by side (an even width), got {width}")
    n = width // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block = min(_SILU_BLOCK, next_power_of_2(n))
    _silu_mul_kernel[(rows, -(-n // block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block,
                                             num_warps=_num_warps(block))
    return out


def rope_and_cache(
    qkv: torch.Tensor,  # [T, (H + 2 KVH) * D]: q heads, k heads, v heads; q and k rotated in place
    positions: torch.Tensor,  # [T] integer position of each token
    cos: torch.Tensor,  # [max_positions, D] float32 (rope.rope_tables)
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, KVH, D] one layer's cache
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] integer cache slot of each token
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """RoPE of the q and k heads of each token at its position (in place in qkv), the token's k and v written to
    its cache slot; returns q, a [T, H, D] view of qkv. Positions must lie inside the tables (not checked: that
    would read the device)."""
    _check_rows("qkv", qkv)
    tokens, width = qkv.shape
    head_dim = k_cache.shape[-1]
    if width != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv must be [T, (heads + 2 kv_heads) * head_dim] with an even head_dim; got width "
                         f"{width} for {heads} + 2 x {kv_heads} heads of {head_dim}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[1:] != (kv_heads, head_dim) or cache.stride(2) != 1:
            raise ValueError(f"{name} must be [slots, {kv_heads}, {head_dim}] contiguous along head_dim, got "
                             f"{tuple(cache.shape)} strides {cache.stride()}")
        if cache.dtype != qkv.dtype or cache.device != qkv.device:
            raise ValueError(f"{name} is {cache.dtype} on {cache.device}, qkv {qkv.dtype} on {qkv.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (cos.shape[0], head_dim) or t.dtype != torch.float32 or t.stride() != (head_dim, 1):
            raise ValueError(f"{name} must be [positions, {head_dim}] float32, contiguous, as cos; got "
                             f"{tuple(t.shape)} {t.dtype}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (tokens,) or t.is_floating_point():
            raise ValueError(f"{name} must be [{tokens}] integers, got {tuple(t.shape)} {t.dtype}")
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    if tokens == 0:
        return q
    half = head_dim // 2
    _rope_and_cache_kernel[(tokens, heads + kv_heads)](
        qkv, positions, cos, sin, slot_mapping, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HEADS=heads, KV_HEADS=kv_heads, HALF=half, BLOCK=max(16, next_power_of_2(half)),
    )
    return q
