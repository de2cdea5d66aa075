"""Paged-attention kernels vs. their torch twins, and the engine with attention_backend="triton" vs. "torch".

Without CUDA the kernels run in the Triton interpreter on CPU tensors (helpers/triton_mode.py). With CUDA the same
tests run compiled on the GPU, and the `gpu`-marked one adds a Llama-2-7B-shaped comparison.

Tolerances: the kernels are compared with the float32 attention of the same (already rounded) inputs. The dots
multiply the inputs exactly and accumulate in float32; what differs is (a) the output's rounding to the dtype,
at most u·|out|, and (b) the probabilities P rounded to the dtype for the P·V product, each by at most u relative:
at most u·max|v| on the output (the P sum to 1). So |kernel - exact| <= u·(|exact| + max|v|), with u the unit
roundoff: 2^-8 bfloat16, 2^-11 float16, 2^-24 float32. The tests allow twice that plus 1e-5 (float32 summation
order over a few hundred keys); a wrong key, block or head moves outputs by O(1).
"""
from __future__ import annotations

import random

import pytest
import torch

from helpers.triton_mode import DEVICE, INTERPRET, import_kernels, triton_interpreter  # noqa: F401 (autouse)
from services.gpu_worker.engine.config import ConfigError, EngineConfig

tpa, = import_kernels("services.gpu_worker.attention.triton_paged_attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# (kv heads, GQA group = heads / kv heads, head_dim, block_size)
SHAPES = [(4, 1, 64, 16), (2, 3, 72, 16), (2, 4, 64, 5), (1, 4, 80, 16)]
SHAPE_IDS = [f"kvh{k}-g{g}-d{d}-bs{b}" for k, g, d, b in SHAPES]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def paged_cache(lengths: list[int], kv_heads: int, head_dim: int, block_size: int, dtype, seed: int):
    """K/V caches and scattered block tables for sequences of `lengths` tokens.

    Blocks come from a shuffled pool with spare blocks (non-contiguous, out of order), tables carry unused padding
    columns, and every cache slot outside the sequences' tokens holds NaN: a kernel that reads a slot it should
    not turns its output NaN.
    -> k_cache, v_cache: [slots, KVH, D]; block_tables: [S, max_blocks] int32
    """
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 3
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lengths), max(need) + 2, dtype=torch.int32)
    used = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for s, (n, nb) in enumerate(zip(lengths, need)):
        blocks, pool = pool[:nb], pool[nb:]
        tables[s, :nb] = torch.tensor(blocks, dtype=torch.int32)
        pos = torch.arange(n)
        used[torch.tensor(blocks)[pos // block_size] * block_size + pos % block_size] = True
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    k[~used] = float("nan")
    v[~used] = float("nan")
    return k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), tables.to(DEVICE)


def assert_within_bound(got: torch.Tensor, exact: torch.Tensor, v_cache: torch.Tensor, dtype) -> None:
    """|got - exact| <= 2u(|exact| + max|v|) + 1e-5 elementwise (module docstring)."""
    assert not got.isnan().any(), "NaN: a kernel read a slot outside the context"
    vmax = v_cache.float().nan_to_num(0.0).abs().max()
    bound = 2 * UNIT_ROUNDOFF[dtype] * (exact.abs() + vmax) + 1e-5
    err = (got.float() - exact).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), f"error {err.flatten()[worst]:.3g} over bound {bound.flatten()[worst]:.3g}"


def f32(*tensors):
    return [t.float() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_decode_matches_twin(shape, dtype):
    kv_heads, group, head_dim, bs = shape
    # 1, block_size - 1, block_size, block_size + 1, many blocks (several key tiles), a random one
    lengths = [1, bs - 1, bs, bs + 1, 23 * bs + 3, random.Random(bs).randint(2, 6 * bs)]
    lengths = [n for n in lengths if n >= 1]
    k, v, tables = paged_cache(lengths, kv_heads, head_dim, bs, dtype, seed=head_dim + group)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lengths), kv_heads * group, head_dim, generator=g).to(dtype).to(DEVICE)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    got = tpa.paged_attention_decode(q, k, v, tables, ctx, bs, scale)
    assert got.shape == q.shape and got.dtype == dtype
    exact = tpa.paged_attention_decode_ref(*f32(q, k, v), tables, ctx, bs, scale)
    assert_within_bound(got, exact, v, dtype)
    # the twin in the kernel's dtype agrees too (it is the oracle the engine's tests lean on)
    twin = tpa.paged_attention_decode_ref(q, k, v, tables, ctx, bs, scale)
    assert_within_bound(twin, exact, v, dtype)


# (tokens cached before the chunk, chunk length): fresh prompts, one-token chunks, chunks after partial blocks,
# a long chunk after a long prefix (several row and key tiles)
CHUNKS = [(0, 1), (0, 21), (16, 3), (15, 1), (37, 30), (5, 17)]


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_prefill_matches_twin(shape, dtype, block_m):
    kv_heads, group, head_dim, bs = shape
    k, v, tables = paged_cache([c + n for c, n in CHUNKS], kv_heads, head_dim, bs, dtype, seed=head_dim * group)
    # chunks placed out of order in q, with rows between them that are not theirs (decodes, in the engine)
    order = [3, 0, 5, 1, 4, 2]
    start, row = [0] * len(CHUNKS), 2
    for c in order:
        start[c] = row
        row += CHUNKS[c][1] + 1
    g = torch.Generator().manual_seed(2)
    q = torch.randn(row + 1, kv_heads * group, head_dim, generator=g).to(dtype).to(DEVICE)
    meta = (
        tables,
        torch.tensor(start, dtype=torch.int32, device=DEVICE),
        torch.tensor([n for _, n in CHUNKS], dtype=torch.int32, device=DEVICE),
        torch.tensor([c for c, _ in CHUNKS], dtype=torch.int32, device=DEVICE),
    )
    sentinel = 7.0
    out = torch.full_like(q, sentinel)
    scale = head_dim**-0.5
    tpa.paged_attention_prefill(q, k, v, *meta, max(n for _, n in CHUNKS), bs, scale, out=out, block_m=block_m)
    chunk_rows = torch.zeros(q.shape[0], dtype=torch.bool)
    for c, (_, n) in enumerate(CHUNKS):
        chunk_rows[start[c] : start[c] + n] = True
    assert (out[~chunk_rows.to(DEVICE)] == sentinel).all(), "rows outside the chunks were written"
    exact = tpa.paged_attention_prefill_ref(*f32(q, k, v), *meta, bs, scale)
    assert_within_bound(out[chunk_rows.to(DEVICE)], exact[chunk_rows.to(DEVICE)], v, dtype)


def test_prefill_is_causal_and_sees_the_prefix():
    """Guard on the twin itself: the last query of a chunk equals a decode at that position; the first does not."""
    k, v, tables = paged_cache([20], 2, 64, 8, torch.float32, seed=3)
    q = torch.randn(6, 4, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    got = tpa.paged_attention_prefill(q, k, v, tables, i32(0), i32(6), i32(14), 6, 8, 0.125)
    last = tpa.paged_attention_decode(q[5:], k, v, tables, i32(20), 8, 0.125)
    first = tpa.paged_attention_decode(q[:1], k, v, tables, i32(20), 8, 0.125)
    torch.testing.assert_close(got[5:], last, atol=1e-5, rtol=1e-5)
    assert (got[:1] - first).abs().max() > 1e-2


class SmallSharedMemory:
    """Stands in for a kernel on a GPU with little shared memory: a launch with a tile over `fits` (rows, keys) raises
    OutOfResources, as Triton does when it loads such a kernel; smaller tiles run the real kernel. Records each try."""

    def __init__(self, kernel, fits: tuple[int, int]):
        self.kernel, self.fits, self.tried = kernel, fits, []

    def __getitem__(self, grid):
        def launch(*args, **meta):
            tile = (meta.get("BLOCK_M", 0), meta["BLOCK_N"])  # decode tiles keys only
            self.tried.append(tile if "BLOCK_M" in meta else tile[1])
            if tile[0] > self.fits[0] or tile[1] > self.fits[1]:
                raise tpa.OutOfResources(200_000, 101_376, "shared memory")
            return self.kernel[grid](*args, **meta)
        return launch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tiles_shrink_until_the_kernel_fits(monkeypatch, dtype):
    """A kernel too big for the GPU's shared memory is retried with the next smaller tile, the one that fit is kept
    for later launches of the variant, and the result is the same attention; with no tile fitting, the error says so."""
    monkeypatch.setattr(tpa, "_fitting_tile", {})
    prefill = SmallSharedMemory(tpa._paged_prefill_kernel, fits=(16, 16))
    decode = SmallSharedMemory(tpa._paged_decode_kernel, fits=(16, 32))
    monkeypatch.setattr(tpa, "_paged_prefill_kernel", prefill)
    monkeypatch.setattr(tpa, "_paged_decode_kernel", decode)
    k, v, tables = paged_cache([40, 21], 2, 64, 8, dtype, seed=5)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(6)).to(dtype).to(DEVICE)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    ctx = i32(40, 21)
    for _ in range(2):
        got = tpa.paged_attention_decode(q, k, v, tables, ctx, 8, 0.125)
        assert_within_bound(got, tpa.paged_attention_decode_ref(*f32(q, k, v), tables, ctx, 8, 0.125), v, dtype)
        got = tpa.paged_attention_prefill(q, k, v, tables, i32(0, 1), i32(1, 1), i32(39, 20), 1, 8, 0.125)
        exact = tpa.paged_attention_prefill_ref(*f32(q, k, v), tables, i32(0, 1), i32(1, 1), i32(39, 20), 8, 0.125)
        assert_within_bound(got, exact, v, dtype)
    # the first launch walks down the dtype's tiles; the second starts from the one that fit
    if dtype == torch.float32:
        assert decode.tried == [32, 32] and prefill.tried == [(32, 32), (16, 16), (16, 16)]
    else:
        assert decode.tried == [64, 32, 32] and prefill.tried == [(64, 64), (32, 32), (16, 16), (16, 16)]
    # an explicit tile is launched as asked, with no fallback; nothing fitting raises Triton's own error
    with pytest.raises(tpa.OutOfResources, match="shared memory"):
        tpa.paged_attention_decode(q, k, v, tables, ctx, 8, 0.125, block_n=64)
    monkeypatch.setattr(tpa, "_fitting_tile", {})
    prefill.fits = (8, 8)
    with pytest.raises(tpa.OutOfResources, match="shared memory"):
        tpa.paged_attention_prefill(q, k, v, tables, i32(0, 1), i32(1, 1), i32(39, 20), 1, 8, 0.125)


def test_wrappers_refuse_bad_inputs():
    k = torch.zeros(32, 2, 64, device=DEVICE)
    tables = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    ctx = torch.ones(1, dtype=torch.int32, device=DEVICE)
    q = torch.zeros(1, 4, 64, device=DEVICE)
    decode = tpa.paged_attention_decode
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode(torch.zeros(1, 3, 64, device=DEVICE), k, k, tables, ctx, 16, 1.0)
    with pytest.raises(ValueError, match="head_dim differs"):
        decode(torch.zeros(1, 4, 32, device=DEVICE), k, k, tables, ctx, 16, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        decode(q.half(), k, k, tables, ctx, 16, 1.0)
    with pytest.raises(ValueError, match="contiguous in head_dim"):
        decode(torch.zeros(1, 64, 4, device=DEVICE).transpose(1, 2), k, k, tables, ctx, 16, 1.0)
    with pytest.raises(ValueError, match="int32"):
        decode(q, k, k, tables.long(), ctx, 16, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        decode(q, k, k, tables, ctx.long(), 16, 1.0)
    with pytest.raises(ValueError, match="not supported"):
        big = torch.zeros(32, 1, 512, device=DEVICE)
        decode(torch.zeros(1, 1, 512, device=DEVICE), big, big, tables, ctx, 16, 1.0)
    with pytest.raises(ValueError, match="query_lens"):
        tpa.paged_attention_prefill(q, k, k, tables, ctx, ctx[:0], ctx, 1, 16, 1.0)


# ---- the engine ----

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_gqa_llama(tmp_path_factory, default_model_path):
    """A tiny random Llama with GQA (6 heads over 2 kv heads: group 3) and head_dim 20 (padded in the kernels)."""
    from helpers.tiny_models import save_tiny_llama

    out = tmp_path_factory.mktemp("tiny-gqa-llama")
    save_tiny_llama(out, default_model_path, vocab_size=VOCAB, hidden_size=120, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256)
    return out


def run_engine(model_dir, backend: str, prompts, dtype: str = "float32", monkeypatch=None):
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.engine.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(
        model=str(model_dir), device=DEVICE.type, dtype=dtype, attention_backend=backend, block_size=8,
        num_kv_blocks=48, max_num_batched_tokens=24,  # the 41-token prompt is prefilled in chunks
    ))
    assert engine.model.attention_backend == backend
    random.Random(5).shuffle(engine.blocks._free)  # scattered block tables (the kernels must not assume order)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, ignore_eos=True)
    results = engine.generate(prompts, params)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in results]


def spy_on_fused_layer_ops(monkeypatch) -> dict[str, int]:
    """Counts of the calls of each fused layer kernel (model/fused_layer_ops.py) from now on."""
    from services.gpu_worker.model import fused_layer_ops

    calls = {}
    for name in ("rms_norm", "rope_and_cache", "silu_mul"):
        calls[name] = 0

        def spy(*args, _name=name, _kernel=getattr(fused_layer_ops, name), **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(fused_layer_ops, name, spy)
    return calls


def test_engine_triton_backend_matches_torch(tiny_gqa_llama, monkeypatch):
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 41)]
    seen = {"prefill_context": 0, "decodes": 0}
    prefill, decode = tpa.paged_attention_prefill, tpa.paged_attention_decode

    def prefill_spy(q, k, v, tables, starts, lens, ctx, *args, **kw):
        seen["prefill_context"] = max(seen["prefill_context"], int(ctx.max()))
        return prefill(q, k, v, tables, starts, lens, ctx, *args, **kw)

    def decode_spy(q, *args, **kw):
        seen["decodes"] += q.shape[0]
        return decode(q, *args, **kw)

    monkeypatch.setattr(tpa, "paged_attention_prefill", prefill_spy)
    monkeypatch.setattr(tpa, "paged_attention_decode", decode_spy)
    fused_calls = spy_on_fused_layer_ops(monkeypatch)
    got = run_engine(tiny_gqa_llama, "triton", prompts)
    assert seen["prefill_context"] >= 24 and seen["decodes"] > 0, f"the kernels did not see it all: {seen}"
    assert all(fused_calls.values()), f"the fused layer kernels did not all run: {fused_calls}"
    monkeypatch.undo()
    want = run_engine(tiny_gqa_llama, "torch", prompts)
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-4
    assert len({t for tokens, _ in got for t in tokens}) > 3  # not a degenerate model repeating one token


def test_attention_backend_config(monkeypatch):
    with pytest.raises(ConfigError, match="attention_backend must be"):
        EngineConfig(attention_backend="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="needs a CUDA device") as err:
        EngineConfig(device="cpu", attention_backend="triton")
    assert "\n" not in str(err.value)
    assert EngineConfig(device="cpu").resolved_attention_backend() == "torch"
    assert EngineConfig(device="cpu", attention_backend="torch").resolved_attention_backend() == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert EngineConfig(device="cpu", attention_backend="triton").resolved_attention_backend() == "triton"


def test_cli_attention_backend_flag():
    from services.cli import build_parser

    args = build_parser().parse_args(["run-batch", "-i", "x", "-o", "y", "--attention-backend", "triton"])
    assert args.attention_backend == "triton"
    assert build_parser().parse_args(["run-batch", "-i", "x", "-o", "y"]).attention_backend is None


# ---- compiled, on the GPU ----

@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs CUDA (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_llama7b_shaped_kernels_on_gpu(dtype):
    """Llama-2-7B attention (32 heads, head_dim 128) with GQA 4, contexts up to 2k, a 256-token chunk."""
    bs, kv_heads, group, head_dim = 16, 8, 4, 128
    lengths = [1, 15, 16, 17, 700, 2048, 1234, 333]
    k, v, tables = paged_cache(lengths, kv_heads, head_dim, bs, dtype, seed=7)
    q = torch.randn(len(lengths), kv_heads * group, head_dim, device=DEVICE).to(dtype)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    got = tpa.paged_attention_decode(q, k, v, tables, ctx, bs, head_dim**-0.5)
    assert_within_bound(got, tpa.paged_attention_decode_ref(*f32(q, k, v), tables, ctx, bs, head_dim**-0.5), v, dtype)
    qp = torch.randn(256 + 3, kv_heads * group, head_dim, device=DEVICE).to(dtype)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    meta = (tables[[5, 4]], i32(0, 256), i32(256, 3), i32(2048 - 256, 0))
    got = tpa.paged_attention_prefill(qp, k, v, *meta, 256, bs, head_dim**-0.5)
    exact = tpa.paged_attention_prefill_ref(*f32(qp, k, v), *meta, bs, head_dim**-0.5)
    assert_within_bound(got, exact, v, dtype)
