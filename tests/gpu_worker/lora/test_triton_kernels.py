"""The Triton LoRA kernels against their torch twins, over randomized batches (interpreter on CPU, compiled on CUDA).

A case is a pool of adapter entries (each with per-part ranks; extents at random, gapped row offsets) and a flat
batch of segments (entry, length) with base-only tokens between them; the same case runs in both launch shapes.
Tolerances: shrink t is float32 accumulated from exact products of the inputs, as the twin: only summation order
differs (1e-4 relative). Expand rounds once into y's dtype, and compiled half-precision kernels round t to the
weight dtype before the tensor-core dot: a few ulps of the dtype relative to the output's scale (fp32 1e-5,
fp16 4 ulps of 2^-11 = 2e-3, bf16 4 ulps of 2^-8 = 1.6e-2). Rows of base-only tokens must stay bit-identical.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from services.gpu_worker.lora.triton_kernels import (
    LoRALaunch, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref,
)

EXPAND_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(EXPAND_TOL)


@dataclass
class Case:
    x: torch.Tensor  # [T, K]
    y: torch.Tensor  # [T, sum(widths)]
    a: torch.Tensor  # [R, K]
    b: torch.Tensor  # [R, max(widths)]
    row_off: torch.Tensor  # [E]
    rank: torch.Tensor  # [E]
    part_rank: torch.Tensor  # [E, P]
    part_start: torch.Tensor  # [E, P]
    part_out: torch.Tensor  # [P]
    part_width: torch.Tensor  # [P]
    segments: list[tuple[int, int, int]]  # (entry, start, length)
    max_rank: int
    lora_rows: list[int]  # tokens that use an adapter


def make_case(seed, entry_ranks, seg_spec, K, widths, dtype, device, base_gap=(0, 2)) -> Case:
    """entry_ranks: per entry, its per-part ranks; seg_spec: (entry, length) in batch order."""
    g = random.Random(seed)
    torch.manual_seed(seed)
    i32 = dict(dtype=torch.int32, device=device)
    offs, pos = [], 0
    for ranks in entry_ranks:  # extents in shuffled order, with gaps
        pos += g.randint(0, 5)
        offs.append(pos)
        pos += sum(ranks)
    perm = list(range(len(entry_ranks)))
    g.shuffle(perm)
    offs = [offs[p] for p in perm]
    rows = pos + 8
    offs = [o if sum(r) else 0 for o, r in zip(offs, entry_ranks)]
    shift = rows - max((o + sum(r) for o, r in zip(offs, entry_ranks)), default=0)
    segments, start = [], g.randint(*base_gap)
    for entry, length in seg_spec:
        segments.append((entry, start, length))
        start += length + g.randint(*base_gap)
    T = max(start, 1)
    lora_rows = [s + i for _, s, n in segments for i in range(n)]
    starts = [[sum(r[:p]) for p in range(len(r))] for r in entry_ranks]
    max_rank = max((sum(entry_ranks[e]) for e, _, _ in segments), default=0)
    return Case(
        x=torch.randn(T, K, device=device).to(dtype),
        y=torch.randn(T, sum(widths), device=device).to(dtype),
        a=(torch.randn(rows + max(shift, 0), K, device=device) / K**0.5).to(dtype),
        b=torch.randn(rows + max(shift, 0), max(widths), device=device).to(dtype),
        row_off=torch.tensor(offs, **i32), rank=torch.tensor([sum(r) for r in entry_ranks], **i32),
        part_rank=torch.tensor(entry_ranks, **i32).view(len(entry_ranks), len(widths)),
        part_start=torch.tensor(starts, **i32).view(len(entry_ranks), len(widths)),
        part_out=torch.tensor([sum(widths[:p]) for p in range(len(widths))], **i32),
        part_width=torch.tensor(widths, **i32), segments=segments, max_rank=max_rank, lora_rows=lora_rows,
    )


def launch_of(case: Case, per_token: bool) -> LoRALaunch:
    dev = case.x.device
    if per_token:
        entries = [-1] * case.x.shape[0]
        for e, s, n in case.segments:
            entries[s : s + n] = [e] * n
        return LoRALaunch(True, torch.tensor(entries, dtype=torch.int32, device=dev), None, None, 1)
    cols = list(zip(*case.segments)) or [(), (), ()]
    t = [torch.tensor(list(c), dtype=torch.int32, device=dev) for c in cols]
    return LoRALaunch(False, t[0], t[1], t[2], max((n for _, _, n in case.segments), default=0))


def check_case(case: Case, per_token: bool) -> None:
    launch = launch_of(case, per_token)
    t_ref = lora_shrink_ref(case.x, case.a, case.row_off, case.rank, launch, case.max_rank)
    t = lora_shrink(case.x, case.a, case.row_off, case.rank, launch, case.max_rank, out=torch.full_like(t_ref, 7.0))
    written = ~t_ref.isnan()
    assert torch.isfinite(t[written]).all()
    assert (t[~written] == 7.0).all(), "shrink wrote past a token's rank or into a base-only token's row"
    if written.any():
        scale = t_ref[written].abs().max().item()
        torch.testing.assert_close(t[written], t_ref[written], rtol=1e-4, atol=1e-4 * scale)

    t_in = torch.where(written, t_ref, 0.0)  # the same t into both: expand is checked on its own
    y, y_ref = case.y.clone(), case.y.clone()
    lora_expand(y, t_in, case.b, case.row_off, case.part_rank, case.part_start, case.part_out, case.part_width,
                launch, int(case.part_width.max()), case.max_rank)
    lora_expand_ref(y_ref, t_in, case.b, case.row_off, case.part_rank, case.part_start, case.part_out,
                    case.part_width, launch)
    base = [i for i in range(case.x.shape[0]) if i not in set(case.lora_rows)]
    assert torch.equal(y[base], case.y[base]), "a base-only token was written"
    tol = EXPAND_TOL[case.y.dtype]
    scale = max((y_ref.float() - case.y.float()).abs().max().item(), 1.0)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol * scale)
    if case.max_rank and any(n for _, _, n in case.segments) and bool((case.part_rank > 0).any()):
        assert not torch.equal(y, case.y), "the expand changed nothing"


SHAPES = [False, True]  # per segment, per token


@pytest.mark.parametrize("per_token", SHAPES, ids=["segment", "token"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fused_mixed_ranks(dtype, per_token, device):
    # q/k/v-like fused group (widths 48/16/16, odd input 72): parts of one adapter differ in rank, an untargeted
    # part (rank 0), an empty segment, base-only tokens between segments
    ranks = [[4, 2, 2], [1, 0, 3], [16, 8, 0], [0, 0, 0], [33, 5, 7]]
    segs = [(2, 3), (0, 1), (3, 2), (1, 0), (4, 4), (1, 2)]
    check_case(make_case(1, ranks, segs, K=72, widths=[48, 16, 16], dtype=dtype, device=device), per_token)


@pytest.mark.parametrize("per_token", SHAPES, ids=["segment", "token"])
def test_ranks_1_to_256_in_one_batch(per_token, device):
    ranks = [[r] for r in (1, 3, 16, 64, 100, 256)]
    segs = [(5, 2), (0, 1), (3, 2), (1, 1), (4, 1), (2, 2)]
    check_case(make_case(2, ranks, segs, K=64, widths=[40], dtype=torch.float32, device=device), per_token)


@pytest.mark.parametrize("per_token", SHAPES, ids=["segment", "token"])
def test_odd_hidden_sizes(per_token, device):
    ranks = [[5, 3], [9, 0]]
    segs = [(0, 3), (1, 18)]  # a segment longer than one 16-token tile
    check_case(make_case(3, ranks, segs, K=100, widths=[100, 72], dtype=torch.bfloat16, device=device), per_token)


@pytest.mark.parametrize("per_token", SHAPES, ids=["segment", "token"])
def test_all_tokens_base_only(per_token, device):
    case = make_case(4, [[8]], [], K=32, widths=[32], dtype=torch.float16, device=device, base_gap=(5, 5))
    check_case(case, per_token)
    # also: entries that exist but every launched segment is empty
    check_case(make_case(4, [[8]], [(0, 0)], K=32, widths=[32], dtype=torch.float16, device=device), per_token)


@pytest.mark.parametrize("per_token", SHAPES, ids=["segment", "token"])
def test_one_token(per_token, device):
    check_case(make_case(5, [[7, 2]], [(0, 1)], K=48, widths=[24, 24], dtype=torch.float32, device=device,
                         base_gap=(0, 0)), per_token)


@pytest.mark.parametrize("per_token", SHAPES, ids=["segment", "token"])
def test_many_adapters(per_token, device):
    g = random.Random(6)
    ranks = [[g.choice((1, 2, 4, 8, 12, 16, 24, 32))] for _ in range(24)]
    segs = [(e, g.randint(1, 2)) for e in g.sample(range(24), 24)]
    check_case(make_case(6, ranks, segs, K=32, widths=[32], dtype=torch.float32, device=device), per_token)


def test_wrappers_refuse_bad_inputs(device):
    case = make_case(7, [[4]], [(0, 2)], K=16, widths=[16], dtype=torch.float32, device=device)
    launch = launch_of(case, False)
    with pytest.raises(ValueError, match="share a dtype"):
        lora_shrink(case.x.half(), case.a, case.row_off, case.rank, launch, 4)
    with pytest.raises(ValueError, match=r"x \[T, K\]"):
        lora_shrink(case.x[:, :8], case.a, case.row_off, case.rank, launch, 4)
    with pytest.raises(ValueError, match="unit stride"):
        lora_shrink(case.x.t().contiguous().t(), case.a, case.row_off, case.rank, launch, 4)
    with pytest.raises(ValueError, match="int32"):
        lora_shrink(case.x, case.a, case.row_off.long(), case.rank, launch, 4)
    t = lora_shrink(case.x, case.a, case.row_off, case.rank, launch, 4)
    with pytest.raises(ValueError, match="float32"):
        lora_expand(case.y, t.half(), case.b, case.row_off, case.part_rank, case.part_start, case.part_out,
                    case.part_width, launch, 16, 4)
    with pytest.raises(ValueError, match="t \\[T, >= 8\\]"):
        lora_expand(case.y, t, case.b, case.row_off, case.part_rank, case.part_start, case.part_out,
                    case.part_width, launch, 16, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("per_token", SHAPES, ids=["segment", "token"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_compiled_at_model_size(dtype, per_token):
    # Llama-7B-like qkv group (hidden 4096), 32 adapters of ranks 8..128, prefill-sized segments
    g = random.Random(8)
    ranks = [[r, r, r] for r in (g.choice((8, 16, 32, 64, 128)) for _ in range(32))]
    segs = [(e, g.randint(1, 40)) for e in range(32)]
    check_case(make_case(8, ranks, segs, K=4096, widths=[4096, 1024, 1024], dtype=dtype,
                         device=torch.device("cuda")), per_token)
