"""Paged attention in Triton: decode and prefill-over-cached-blocks, reading the engine's block tables. GQA aware.

The cache of one layer is `k_cache`, `v_cache`: [slots, KVH, D] with slot = block * block_size + offset, the
layout of ModelRunner's KV tensors (one layer's view). A sequence's token at position p lives in slot
`block_tables[s, p // block_size] * block_size + p % block_size`; the kernels compute that address per key tile,
so the cache is read in place (no gathered copy) and block_size need not be a power of two.

Both kernels run one program per (sequence, kv head): the GROUP = H / KVH query heads that share a kv head are
rows of one query tile, so each K/V tile is loaded once for the whole group (decode is bound by those loads; a
program per query head would read the same K/V GROUP times). For decode the tile is the group padded to
BLOCK_H >= 16 rows (tl.dot's minimum; the extra rows are masked and cost no memory traffic). For prefill the rows
are (query, head-in-group) pairs, row r = query (r // GROUP), head (r % GROUP), tiled BLOCK_M at a time along a
third grid axis. Softmax is online (flash-attention style) in float32 with exp2; scores accumulate in float32;
P is cast to the cache dtype for the P·V product (as flash attention does: on tensor cores for fp16/bf16).
fp32 dots use input_precision="ieee" (no TF32), so the fp32 kernels match the reference to float32 rounding.

Limits: head_dim up to 256 (padded to a power of two, masked: 72, 80, 96 ... work); dtypes fp16, bf16, fp32.
No split-K: a batch of very few long sequences runs B x KVH programs only (flash-decoding would split the keys).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from services.gpu_worker.lora.triton_kernels import next_power_of_2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# Tiles (query rows, keys; decode uses the keys) tried in order until the kernel fits the GPU's shared memory: Triton
# raises OutOfResources when it loads a kernel that asks for more than one block may have (99 KB on A10G/L4-class
# GPUs, 163 KB on A100, 227 KB on H100: 64 x 64 prefill tiles of head_dim 256 in bf16 need 107-164 KB, of head_dim
# 128 in fp32 115 KB). The first that fits is remembered per variant. float32 starts at 32 x 32: at 64 x 64 its
# tiles spill registers. bench/device/compile_check.py compiles every variant for each arch and reports both.
_TILES = {torch.float32: ((32, 32), (16, 16))}
_HALF_TILES = ((64, 64), (32, 32), (16, 16))
_fitting_tile: dict[tuple, int] = {}  # (kernel, device, dtype, head_dim, group) -> index in the dtype's tiles


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    # DOT_F32: the interpreter multiplies bfloat16 (held as uint16) as integers in tl.dot (triton 3.9), so there the
    # operands go through float32: exact products of the same bf16 values, as the tensor cores compute them.
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _key_slots(tables_ptr, table_row, pos, n_mask, block_size):
    """Cache slots of key positions `pos` [BLOCK_N] through one sequence's block table row (masked: slot 0)."""
    block = tl.load(tables_ptr + table_row + pos // block_size, mask=n_mask, other=0)
    return block.to(tl.int64) * block_size + pos % block_size


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, slot, kv_mask, visible, m_i, l_i, acc, kvh, stride_ks, stride_kh, stride_vs,
                 stride_vh, offs_d, scale_log2, DOT_F32: tl.constexpr):
    """One key tile of online softmax: scores of q [ROWS, BLOCK_D] against the keys at `slot` where `visible`
    [ROWS, BLOCK_N], folded into the running max m_i, sum l_i [ROWS] and output acc [ROWS, BLOCK_D]."""
    k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), DOT_F32) * scale_log2  # [ROWS, BLOCK_N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one visible key per row
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, context_lens_ptr,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ob, stride_oh, stride_tb,
    scale_log2,  # softmax scale * log2(e): scores go through exp2
    block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    context = tl.load(context_lens_ptr + b)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(0, context, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N] key positions
        n_mask = pos < context
        slot = _key_slots(tables_ptr, b * stride_tb, pos, n_mask, block_size)
        m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, slot, n_mask[:, None] & d_mask[None, :], n_mask[None, :],
                                     m_i, l_i, acc, kvh, stride_ks, stride_kh, stride_vs, stride_vh, offs_d,
                                     scale_log2, DOT_F32)
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty context gives zeros, not NaN
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, context_lens_ptr, query_start_ptr, query_lens_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_tb,
    scale_log2,
    block_size,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    c = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    n_queries = tl.load(query_lens_ptr + c)
    q_start = tl.load(query_start_ptr + c)
    context = tl.load(context_lens_ptr + c)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (query, head-in-group) pairs
    row_mask = rows < n_queries * GROUP
    qi = rows // GROUP  # query index within the chunk
    heads = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    # keys this tile needs: 0 .. context + its last query (causal); none for a tile past the chunk's end
    last_q = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, n_queries - 1)
    kv_end = tl.where(tile * BLOCK_M < n_queries * GROUP, context + last_q + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < kv_end
        slot = _key_slots(tables_ptr, c * stride_tb, pos, n_mask, block_size)
        visible = n_mask[None, :] & (pos[None, :] <= context + qi[:, None])  # key 0 is visible to every row
        m_i, l_i, acc = _attend_tile(q, k_ptr, v_ptr, slot, n_mask[:, None] & d_mask[None, :], visible,
                                     m_i, l_i, acc, kvh, stride_ks, stride_kh, stride_vs, stride_vh, offs_d,
                                     scale_log2, DOT_F32)
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# Whether the kernels above were defined under TRITON_INTERPRET (triton decides when @triton.jit runs).
_INTERPRETED = type(_paged_decode_kernel).__name__ == "InterpretedFunction"


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _INTERPRETED


def _check_common(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  block_size: int) -> tuple[int, int]:
    """Checks shared by both wrappers; returns (GROUP, KVH)."""
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q must be [T, H, D] and k/v caches [slots, KVH, D] alike, got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"head_dim differs: q has {head_dim}, the cache {k_cache.shape[2]}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported (1..{_MAX_HEAD_DIM})")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and the caches must share one dtype of fp16/bf16/fp32, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {t.stride(2)})")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be [S, max_blocks] int32, contiguous along blocks")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return heads // kv_heads, kv_heads


def _check_vector(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    if t.shape != (n,) or t.dtype != torch.int32 or t.device != device:
        raise ValueError(f"{name} must be [{n}] int32 on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def _out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError("out must be like q (shape, dtype, device), contiguous in head_dim")
    return out


def paged_attention_decode(
    q: torch.Tensor,  # [B, H, D] one query token per sequence
    k_cache: torch.Tensor,  # [slots, KVH, D] one layer's cache, slot = block * block_size + offset
    v_cache: torch.Tensor,  # [slots, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32 cache blocks of each sequence, in position order
    context_lens: torch.Tensor,  # [B] int32 keys each query sees (its own token included, already in the cache)
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,  # [B, H, D] written in place when given
    block_n: int | None = None,  # keys per tile (a power of two >= 16); default: the largest that fits the GPU
) -> torch.Tensor:
    """Attention of each sequence's single query over its cached keys 0 .. context_lens[b] - 1; [B, H, D].

    Needs max_blocks * block_size >= every context length (not checked: it would cost a device sync).
    """
    group, kv_heads = _check_common(q, k_cache, v_cache, block_tables, block_size)
    batch, heads, head_dim = q.shape
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for a batch of {batch}")
    _check_vector("context_lens", context_lens, batch, q.device)
    out = _out(q, out)
    if batch == 0:
        return out
    _launch_fitting("decode", q, head_dim, group, None if block_n is None else (0, block_n), lambda _, keys: (
        _paged_decode_kernel[(batch, kv_heads)](
            q, k_cache, v_cache, out, block_tables, context_lens,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            out.stride(0), out.stride(1), block_tables.stride(0),
            scale * _LOG2E, block_size,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, next_power_of_2(group)),
            BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_N=keys, DOT_F32=_dot_f32(q.dtype),
        )))
    return out


def paged_attention_prefill(
    q: torch.Tensor,  # [T, H, D] queries of one or several chunks (other rows, e.g. decodes, are left alone)
    k_cache: torch.Tensor,  # [slots, KVH, D] holding the cached prefix and the chunks' own keys
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [C, max_blocks] int32 blocks of each chunk's sequence
    query_start: torch.Tensor,  # [C] int32 row in q of each chunk's first query
    query_lens: torch.Tensor,  # [C] int32 queries of each chunk
    context_lens: torch.Tensor,  # [C] int32 tokens cached before each chunk (the chunk's positions follow them)
    max_query_len: int,  # >= every query_lens (host-side, so the grid needs no device sync)
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D]; only the chunks' rows are written
    block_m: int | None = None,  # (query, head) rows per tile (a power of two >= 16); default: see block_n
    block_n: int | None = None,  # keys per tile; default (with block_m): the largest tile that fits the GPU
) -> torch.Tensor:
    """Chunked-prefill attention: query j of chunk c sees keys 0 .. context_lens[c] + j; [T, H, D].

    Causal within the chunk, full over the cached prefix. Chunks need not be contiguous or in order in q.
    """
    group, kv_heads = _check_common(q, k_cache, v_cache, block_tables, block_size)
    chunks, head_dim = block_tables.shape[0], q.shape[2]
    for name, t in (("query_start", query_start), ("query_lens", query_lens), ("context_lens", context_lens)):
        _check_vector(name, t, chunks, q.device)
    out = _out(q, out)
    if chunks == 0 or max_query_len == 0:
        return out
    tile = None if block_m is None and block_n is None else (block_m or 64, block_n or 64)
    _launch_fitting("prefill", q, head_dim, group, tile, lambda rows, keys: (
        _paged_prefill_kernel[(chunks, kv_heads, math.ceil(max_query_len * group / rows))](
            q, k_cache, v_cache, out, block_tables, context_lens, query_start, query_lens,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            out.stride(0), out.stride(1), block_tables.stride(0),
            scale * _LOG2E, block_size,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_M=rows,
            BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_N=keys, DOT_F32=_dot_f32(q.dtype),
        )))
    return out


def _launch_fitting(kernel: str, q: torch.Tensor, head_dim: int, group: int, tile: tuple[int, int] | None,
                    launch) -> None:
    """launch(rows, keys) with `tile` if given, else with the first of the dtype's tiles whose kernel fits the GPU
    (OutOfResources from the largest moves on to the next; the one that fit is remembered for this variant)."""
    if tile is not None:
        launch(*tile)
        return
    tiles = _TILES.get(q.dtype, _HALF_TILES)
    key = (kernel, q.device, q.dtype, head_dim, group)
    for i in range(_fitting_tile.get(key, 0), len(tiles)):
        try:
            launch(*tiles[i])
        except OutOfResources:
            if i + 1 == len(tiles):
                raise
            continue
        _fitting_tile[key] = i
        return


# ---- torch reference twins: plain gathers + softmax in float32, one sequence at a time ----

def _gather(cache: torch.Tensor, table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[length, KVH, D]: the cache rows of positions 0 .. length - 1 of the sequence holding `table`."""
    pos = torch.arange(length, device=cache.device)
    return cache[table.long()[pos // block_size] * block_size + pos % block_size]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [n, H, D]; k, v: [L, KVH, D]; visible: [n, L] bool -> [n, H, D] float32
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", p, v)


def paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, block_size: int,
                               scale: float) -> torch.Tensor:
    """Twin of paged_attention_decode: [B, H, D] in q's dtype."""
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = _gather(k_cache, block_tables[b], length, block_size)
        v = _gather(v_cache, block_tables[b], length, block_size)
        visible = torch.ones(1, length, dtype=torch.bool, device=q.device)
        out[b] = _attend(q[b : b + 1], k, v, visible, scale)[0].to(q.dtype)
    return out


def paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, query_start, query_lens, context_lens,
                                block_size: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of paged_attention_prefill: [T, H, D] in q's dtype; rows outside the chunks are those of `out`."""
    out = torch.zeros_like(q) if out is None else out
    for c, (start, n, ctx) in enumerate(zip(query_start.tolist(), query_lens.tolist(), context_lens.tolist())):
        k = _gather(k_cache, block_tables[c], ctx + n, block_size)
        v = _gather(v_cache, block_tables[c], ctx + n, block_size)
        visible = torch.ones(n, ctx + n, dtype=torch.bool, device=q.device).tril(ctx)
        out[start : start + n] = _attend(q[start : start + n], k, v, visible, scale).to(q.dtype)
    return out
