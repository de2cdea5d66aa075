"""Triton multi-LoRA kernels: shrink (t = x·Aᵀ) and expand (y[:, part] += t[:, part ranks]·(s·B)ᵀ).

They read adapter weights from the pool of gpu_pool.py, for one (layer, group) at a time:
  a     [R, K]      pool rows: entry e's stacked A occupies rows row_off[e] .. row_off[e] + rank[e]
  b     [R, Nmax]   the same rows hold (s·B)ᵀ of each part, part columns 0 .. part_width[p]
  rank  [E] int32   stacked rank of entry e in this layer (0: the adapter does not target the group)
  part_rank, part_start [E, P] int32: each part's rank and first row inside the entry's extent
  part_out, part_width  [P] int32: each part's first column in y and its width
Two launch shapes (`LoRALaunch`): per segment (contiguous tokens sharing one entry: prefill chunks, or runs of
decodes of one adapter; tiles of BLOCK_M tokens use tl.dot) and per token (each token carries its entry, -1 for
base-only; one program per token, vector-matrix products). Every program reads its own adapter's rank and exits
when its rank tile lies past it, so a batch mixing ranks 1 and 256 pays for 1 and 256, not 256 twice.
Accumulation is float32; t is float32. Each kernel has a wrapper that checks and launches it and a torch twin.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Triton decides at definition (this import) whether kernels are interpreted; the wrappers follow that choice even
# if the environment changes later (tests set TRITON_INTERPRET only while importing this module).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether these kernels run in the Triton interpreter (on CPU tensors) rather than compiled."""
    return _INTERPRETED


@dataclass
class LoRALaunch:
    """One step's token -> pool entry map, built once per step (device tensors) plus host-known grid sizes."""

    per_token: bool
    entries: torch.Tensor  # int32; per segment: [N] entry of segment i; per token: [T] entry of token i or -1
    starts: torch.Tensor | None  # int32 [N]: first token of segment i (per segment only)
    lengths: torch.Tensor | None  # int32 [N]: tokens of segment i (per segment only)
    max_len: int  # longest segment (1 per token): sizes the grid without reading the device

    @property
    def num_programs(self) -> int:
        return self.entries.shape[0]


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, starts_ptr, lengths_ptr, entries_ptr, row_off_ptr, rank_ptr, K,
    stride_xm, stride_xk, stride_am, stride_ak, stride_tm, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, CAST_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # grid: (segments, token tiles, rank tiles); t[seg tokens, r] = sum_k x[tok, k] * a[row_off + r, k]
    seg, pid_m, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + seg)
    entry = tl.load(entries_ptr + seg)
    rank = tl.load(rank_ptr + entry)
    if (pid_m * BLOCK_M >= length) | (pid_r * BLOCK_R >= rank):
        return
    off = tl.load(row_off_ptr + entry)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, r_mask = offs_m < length, offs_r < rank
    rows = tl.load(starts_ptr + seg) + offs_m
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptr + (off + offs_r)[None, :] * stride_am + (k0 + offs_k)[:, None] * stride_ak,
                    mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]: Aᵀ tile
        if CAST_F32:  # the interpreter's tl.dot mishandles bfloat16
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(x, a, input_precision=PRECISION)
    tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, acc,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_shrink_token_kernel(
    x_ptr, a_ptr, t_ptr, entries_ptr, row_off_ptr, rank_ptr, K,
    stride_xm, stride_xk, stride_am, stride_ak, stride_tm, stride_tr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (tokens, rank tiles); one token against its own adapter's A
    tok, pid_r = tl.program_id(0), tl.program_id(1)
    entry = tl.load(entries_ptr + tok)
    if entry < 0:
        return
    rank = tl.load(rank_ptr + entry)
    if pid_r * BLOCK_R >= rank:
        return
    off = tl.load(row_off_ptr + entry)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        x = tl.load(x_ptr + tok * stride_xm + (k0 + offs_k) * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (off + offs_r)[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(t_ptr + tok * stride_tm + offs_r * stride_tr, acc, mask=r_mask)


@triton.jit
def _lora_expand_kernel(
    t_ptr, b_ptr, y_ptr, starts_ptr, lengths_ptr, entries_ptr, row_off_ptr, part_rank_ptr, part_start_ptr,
    part_out_ptr, part_width_ptr, n_tiles,
    stride_tm, stride_tr, stride_bm, stride_bn, stride_ym, stride_yn,
    NUM_PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # grid: (segments, token tiles, parts x column tiles); y[tok, out_p + n] += sum_r t[tok, start_p + r] * b[.., n]
    seg, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    part, tile = pid_n // n_tiles, pid_n % n_tiles
    length = tl.load(lengths_ptr + seg)
    entry = tl.load(entries_ptr + seg)
    width = tl.load(part_width_ptr + part)
    prank = tl.load(part_rank_ptr + entry * NUM_PARTS + part)
    if (pid_m * BLOCK_M >= length) | (tile * BLOCK_N >= width) | (prank == 0):
        return
    pstart = tl.load(part_start_ptr + entry * NUM_PARTS + part)
    brow = tl.load(row_off_ptr + entry) + pstart
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask, n_mask = offs_m < length, offs_n < width
    rows = tl.load(starts_ptr + seg) + offs_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, prank, BLOCK_R):
        r_mask = r0 + offs_r < prank
        t = tl.load(t_ptr + rows[:, None] * stride_tm + (pstart + r0 + offs_r)[None, :] * stride_tr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_ptr + (brow + r0 + offs_r)[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if CAST_F32:
            b = b.to(tl.float32)
        else:
            t = t.to(b.dtype)  # half weights: t rounded to them, for the tensor-core path (as torch rounds t)
        acc += tl.dot(t, b, input_precision=PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + (tl.load(part_out_ptr + part) + offs_n)[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


@triton.jit
def _lora_expand_token_kernel(
    t_ptr, b_ptr, y_ptr, entries_ptr, row_off_ptr, part_rank_ptr, part_start_ptr, part_out_ptr, part_width_ptr,
    n_tiles, stride_tm, stride_tr, stride_bm, stride_bn, stride_ym, stride_yn,
    NUM_PARTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # grid: (tokens, parts x column tiles)
    tok, pid_n = tl.program_id(0), tl.program_id(1)
    part, tile = pid_n // n_tiles, pid_n % n_tiles
    entry = tl.load(entries_ptr + tok)
    if entry < 0:
        return
    width = tl.load(part_width_ptr + part)
    prank = tl.load(part_rank_ptr + entry * NUM_PARTS + part)
    if (tile * BLOCK_N >= width) | (prank == 0):
        return
    pstart = tl.load(part_start_ptr + entry * NUM_PARTS + part)
    brow = tl.load(row_off_ptr + entry) + pstart
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < width
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, prank, BLOCK_R):
        r_mask = r0 + offs_r < prank
        t = tl.load(t_ptr + tok * stride_tm + (pstart + r0 + offs_r) * stride_tr, mask=r_mask, other=0.0)
        b = tl.load(b_ptr + (brow + r0 + offs_r)[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(t[:, None] * b, axis=0)
    y_ptrs = y_ptr + tok * stride_ym + (tl.load(part_out_ptr + part) + offs_n) * stride_yn
    y = tl.load(y_ptrs, mask=n_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=n_mask)


# VALIDATE_NOTE: the wrappers check every argument (shapes, dtypes, devices, strides, int32 metadata), ~10 us of
# Python per call; TritonLoRABackend, which launches them for every layer and group of every step with arguments
# that keep their properties (pool buffers built once, metadata built by its prepare, the model's activations),
# checks its first call of each group and passes validate=False after it.
def _check_rows(**tensors: torch.Tensor) -> None:
    # rows may be strided (views into wider buffers), elements within a row must be adjacent: coalesced loads
    for name, t in tensors.items():
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dimension, got strides {t.stride()}")
        if t.shape[0] * t.stride(0) >= 2**31:  # the kernels compute offsets in int32
            raise ValueError(f"{name} spans more than 2^31 elements")


def _check_meta(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != torch.int32 or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor on {device}, got {t.dtype} on {t.device}")


def _precision(dtype: torch.dtype, cast: bool) -> str | None:
    # float32 operands: exact products (no TF32 rounding), as the torch backend computes; half types: the default
    return "ieee" if cast or dtype == torch.float32 else None


# Host-side arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are Triton functions whose calls
# cost microseconds each, and a step launches these kernels for every layer and group.
def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    return _cdiv(n, multiple) * multiple


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _rank_block(max_rank: int) -> int:
    return min(64, max(16, next_power_of_2(max_rank)))


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, row_off: torch.Tensor, rank: torch.Tensor, launch: LoRALaunch, max_rank: int,
    out: torch.Tensor | None = None, validate: bool = True,
) -> torch.Tensor:
    """t[tok, :rank(e)] = x[tok] · A_eᵀ for every token with an adapter entry e; returns t [T, max_rank] float32.

    x: [T, K] (fp16/bf16/fp32); a: [R, K] pool rows, same dtype; row_off, rank: [E] int32; max_rank >= every
    rank of the launched entries (host-known; it sizes the grid). Columns past a token's rank, and rows of
    base-only tokens, are left unwritten. validate=False skips the argument checks (VALIDATE_NOTE).
    """
    if validate:
        if x.dim() != 2 or a.dim() != 2 or x.shape[1] != a.shape[1]:
            raise ValueError(f"x [T, K] and a [R, K] expected, got {tuple(x.shape)} and {tuple(a.shape)}")
        if x.dtype not in _DTYPES or a.dtype != x.dtype or a.device != x.device:
            raise ValueError(f"x and a must share a dtype in {_DTYPES} and a device, got {x.dtype}, {a.dtype}")
        _check_rows(x=x, a=a)
        _check_meta(x.device, row_off=row_off, rank=rank, entries=launch.entries, starts=launch.starts,
                    lengths=launch.lengths)
    T, K = x.shape
    if out is None:  # rows 64-byte aligned: coalesced, and one compiled variant whatever max_rank is (a row stride
        # of 1, or a multiple of 16 elements, would each make Triton specialize the kernels anew)
        cols = max(max_rank, 1)
        out = torch.empty(T, round_up(cols, 16), dtype=torch.float32, device=x.device)[:, :cols]
    if validate and (out.dtype != torch.float32 or out.shape[0] != T or out.shape[1] < max_rank):
        raise ValueError(f"out must be float32 [T, >= {max_rank}], got {out.dtype} {tuple(out.shape)}")
    if launch.num_programs == 0 or max_rank == 0 or T == 0:
        return out
    strides = (*x.stride(), *a.stride(), *out.stride())
    if launch.per_token:  # 16-row rank tiles: more programs to stream a few tokens' A matrices in parallel
        grid = (launch.num_programs, _cdiv(max_rank, 16))
        _lora_shrink_token_kernel[grid](x, a, out, launch.entries, row_off, rank, K, *strides,
                                        BLOCK_R=16, BLOCK_K=128)
    else:
        block_m, block_r = 16 if launch.max_len <= 16 else 32, _rank_block(max_rank)
        grid = (launch.num_programs, _cdiv(launch.max_len, block_m), _cdiv(max_rank, block_r))
        cast = interpreting() and x.dtype == torch.bfloat16
        _lora_shrink_kernel[grid](x, a, out, launch.starts, launch.lengths, launch.entries, row_off, rank, K,
                                  *strides, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64, CAST_F32=cast,
                                  PRECISION=_precision(x.dtype, cast))
    return out


def lora_expand(
    y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, row_off: torch.Tensor, part_rank: torch.Tensor,
    part_start: torch.Tensor, part_out: torch.Tensor, part_width: torch.Tensor, launch: LoRALaunch,
    max_width: int, max_rank: int, validate: bool = True,
) -> None:
    """y[tok, part_out[p] + n] += sum_r t[tok, start_ep + r] · b[row_off[e] + start_ep + r, n] (start_ep =
    part_start[e, p]), in place, for every token with an adapter entry e and every part p it targets.

    y: [T, N] (the fused projection output); t: [T, >= max_rank] float32 from lora_shrink; b: [R, >= max_width]
    pool rows of (s·B)ᵀ, y's dtype; part_rank, part_start: [E, P] int32; part_out, part_width: [P] int32;
    max_width = max(part_width) and max_rank >= every stacked rank launched (host-known, for the grid).
    validate=False skips the argument checks (VALIDATE_NOTE).
    """
    parts = part_out.shape[0]
    if validate:
        if y.dim() != 2 or t.dim() != 2 or b.dim() != 2 or t.shape[0] != y.shape[0]:
            raise ValueError(f"y [T, N], t [T, r], b [R, N] expected, got {tuple(y.shape)}, {tuple(t.shape)}, "
                             f"{tuple(b.shape)}")
        if y.dtype not in _DTYPES or b.dtype != y.dtype or t.dtype != torch.float32 or b.device != y.device:
            raise ValueError(f"y and b must share a dtype in {_DTYPES}, t must be float32; got {y.dtype}, "
                             f"{b.dtype}, {t.dtype}")
        _check_rows(y=y, t=t, b=b)
        if b.shape[1] < max_width or t.shape[1] < max_rank:
            raise ValueError(f"b must be [R, >= {max_width}] and t [T, >= {max_rank}]")
        if part_rank.shape[1] != parts or part_start.shape != part_rank.shape or part_width.shape[0] != parts:
            raise ValueError("part_rank/part_start must be [E, P] and part_out/part_width [P]")
        _check_meta(y.device, row_off=row_off, part_rank=part_rank, part_start=part_start, part_out=part_out,
                    part_width=part_width, entries=launch.entries, starts=launch.starts, lengths=launch.lengths)
    if launch.num_programs == 0 or max_rank == 0 or y.shape[0] == 0:
        return
    block_n = min(128 if launch.per_token else 64, max(16, next_power_of_2(max_width)))
    block_r = _rank_block(max_rank)
    n_tiles = _cdiv(max_width, block_n)
    strides = (*t.stride(), *b.stride(), *y.stride())
    if launch.per_token:
        grid = (launch.num_programs, parts * n_tiles)
        _lora_expand_token_kernel[grid](t, b, y, launch.entries, row_off, part_rank, part_start, part_out, part_width,
                                        n_tiles, *strides, NUM_PARTS=parts, BLOCK_N=block_n, BLOCK_R=block_r)
    else:
        block_m = 16 if launch.max_len <= 16 else 32
        grid = (launch.num_programs, _cdiv(launch.max_len, block_m), parts * n_tiles)
        cast = interpreting() and y.dtype == torch.bfloat16
        _lora_expand_kernel[grid](t, b, y, launch.starts, launch.lengths, launch.entries, row_off, part_rank,
                                  part_start, part_out, part_width, n_tiles, *strides, NUM_PARTS=parts,
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, CAST_F32=cast,
                                  PRECISION=_precision(y.dtype, cast))


# ---- torch twins (the oracle for the kernels; host loops, not for the step loop) ----
def _token_entries(launch: LoRALaunch, num_tokens: int) -> list[tuple[int, int, int]]:
    """(entry, start, end) ranges of the launch."""
    if launch.per_token:
        return [(e, i, i + 1) for i, e in enumerate(launch.entries.tolist()) if e >= 0]
    return [(e, s, s + n) for e, s, n in zip(launch.entries.tolist(), launch.starts.tolist(), launch.lengths.tolist())]


def lora_shrink_ref(x, a, row_off, rank, launch: LoRALaunch, max_rank: int) -> torch.Tensor:
    """lora_shrink in torch; unwritten places are NaN (so a test sees a kernel write where it should not)."""
    out = torch.full((x.shape[0], max(max_rank, 1)), float("nan"), dtype=torch.float32, device=x.device)
    offs, ranks = row_off.tolist(), rank.tolist()
    for e, s, end in _token_entries(launch, x.shape[0]):
        r = ranks[e]
        if r and end > s:
            out[s:end, :r] = x[s:end].float() @ a[offs[e] : offs[e] + r].float().t()
    return out


def lora_expand_ref(y, t, b, row_off, part_rank, part_start, part_out, part_width, launch: LoRALaunch) -> None:
    """lora_expand in torch (float32 math, one rounding into y's dtype), in place on y."""
    offs, pr, ps = row_off.tolist(), part_rank.tolist(), part_start.tolist()
    outs, widths = part_out.tolist(), part_width.tolist()
    for e, s, end in _token_entries(launch, y.shape[0]):
        for p, (o, w) in enumerate(zip(outs, widths)):
            r, st = pr[e][p], ps[e][p]
            if r == 0 or end == s:
                continue
            delta = t[s:end, st : st + r] @ b[offs[e] + st : offs[e] + st + r, :w].float()
            y[s:end, o : o + w] = (y[s:end, o : o + w].float() + delta).to(y.dtype)
