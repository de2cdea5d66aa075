"""The fused layer kernels (RMSNorm with the residual add, SiLU·mul, RoPE with the KV cache write) vs. their torch
twins, the model's own torch path. Interpreted on CPU tensors without CUDA, compiled on a GPU
(helpers/triton_mode.py).

Tolerances: the kernels round where the twins round (module docstring of fused_layer_ops), so what may differ is
float32 arithmetic inside: the order of the sum of squares, the GPU's approximate rsqrt and exp, a fused
multiply-add. That can flip a rounding to the dtype by one unit in the last place (up to 2u relative, u the unit
roundoff), and where two roundings follow each other (the normalised row, then its product with the weight; SiLU,
then its product with up; each RoPE product, then their sum) the second can add one more unit: the tests allow 4u
relative, plus 1e-6 absolute in float32 (summation order). Measured in the interpreter over 20 seeds: 3.9u bf16,
2.8u fp16. A RoPE output is a sum that may cancel, so its bound is relative to the terms' magnitudes
(|x|·|cos| + |rotate_half(x)|·|sin|) rather than to the sum. Where no float arithmetic happens (v copied into the
cache, the residual sum's single rounding) the tests check equality. Except in the interpreter for bfloat16: its
float32 -> bfloat16 casts truncate where the GPU rounds to nearest (triton 3.9), each one unit in the last place at
most, and RoPE has up to four in sequence (cos, sin, the products, their sum): there 8u, and one unit for "equal".
A wrong row, head, half or slot moves outputs by O(1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.triton_mode import DEVICE, INTERPRET, import_kernels, triton_interpreter  # noqa: F401 (autouse)
from services.gpu_worker.model.llama import rms_norm as rms_norm_twin
from services.gpu_worker.model.rope import apply_rope

fused, = import_kernels("services.gpu_worker.model.fused_layer_ops")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def randn(*shape, dtype, seed, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype).to(DEVICE)


def assert_close(got: torch.Tensor, twin: torch.Tensor, dtype, magnitude: torch.Tensor | None = None) -> None:
    """|got - twin| <= 4u·magnitude (default |twin|), + 1e-6 in float32; 8u for bf16 interpreted (docstring)."""
    assert got.dtype == twin.dtype and got.shape == twin.shape
    assert not got.isnan().any()
    magnitude = twin.float().abs() if magnitude is None else magnitude
    units = 8 if INTERPRET and dtype == torch.bfloat16 else 4
    bound = units * UNIT_ROUNDOFF[dtype] * magnitude + (1e-6 if dtype == torch.float32 else 0.0)
    err = (got.float() - twin.float()).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), f"error {err.flatten()[worst]:.3g} over bound {bound.flatten()[worst]:.3g}"


def assert_rounded_alike(got: torch.Tensor, twin: torch.Tensor, dtype) -> None:
    """Equal, but in the interpreter bfloat16 roundings may differ by one unit (module docstring)."""
    if INTERPRET and dtype == torch.bfloat16:
        assert ((got.float() - twin.float()).abs() <= 2 * UNIT_ROUNDOFF[dtype] * twin.float().abs()).all()
    else:
        assert torch.equal(got, twin)


# hidden sizes: the tiny test models', a power of two, one that is not a multiple of any block, SmolLM2's
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [48, 64, 100, 576])
def test_rms_norm_matches_twin(dtype, hidden):
    x = randn(7, hidden, dtype=dtype, seed=hidden, scale=3.0)
    w = randn(hidden, dtype=dtype, seed=hidden + 1)
    assert_close(fused.rms_norm(x, w, 1e-5), rms_norm_twin(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [48, 100])
def test_rms_norm_adds_the_residual_in_place(dtype, hidden):
    delta = randn(5, hidden, dtype=dtype, seed=1)
    residual = randn(5, hidden, dtype=dtype, seed=2, scale=4.0)
    w = randn(hidden, dtype=dtype, seed=3)
    summed = residual + delta  # torch rounds the sum to the dtype once, as the kernel does
    before = residual.data_ptr()
    got = fused.rms_norm(delta, w, 1e-6, residual=residual)
    assert residual.data_ptr() == before
    assert_rounded_alike(residual, summed, dtype)
    assert_close(got, rms_norm_twin(residual, w, 1e-6), dtype)


def test_rms_norm_strided_rows_and_out():
    # rows of a wider tensor (a gathered view is contiguous, but the kernel takes any row stride)
    wide = randn(4, 80, dtype=torch.float32, seed=5)
    x, w = wide[:, :48], randn(48, dtype=torch.float32, seed=6)
    out = torch.full((4, 48), float("nan"), device=DEVICE)
    assert fused.rms_norm(x, w, 1e-5, out=out) is out
    assert_close(out, rms_norm_twin(x, w, 1e-5), torch.float32)
    assert fused.rms_norm(x[:0], w, 1e-5).shape == (0, 48)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("intermediate", [72, 1100])  # the tiny model's; one past a 1024-column program
def test_silu_mul_matches_twin(dtype, intermediate):
    gate_up = randn(3, 2 * intermediate, dtype=dtype, seed=intermediate, scale=4.0)
    gate, up = gate_up.split([intermediate, intermediate], dim=-1)
    assert_close(fused.silu_mul(gate_up), F.silu(gate) * up, dtype)
    assert fused.silu_mul(gate_up[:0]).shape == (0, intermediate)


def rope_tables(positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(positions, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def rope_magnitude(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """|x|·|cos| + |rotate_half(x)|·|sin|: the size of the terms each RoPE output sums."""
    x, cos, sin = x.float().abs(), cos.float().abs()[:, None, :], sin.float().abs()[:, None, :]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# (heads, kv heads, head_dim): MHA, GQA, MQA with a head_dim whose half is not a power of two, a small head
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(3, 3, 64), (4, 2, 16), (4, 1, 80)])
def test_rope_and_cache_matches_twin(dtype, heads, kv_heads, head_dim):
    tokens, slots = 9, 40
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=head_dim, scale=2.0)
    g = torch.Generator().manual_seed(heads)
    positions = torch.randint(0, 100, (tokens,), generator=g).to(DEVICE)
    slot_mapping = torch.randperm(slots, generator=g)[:tokens].to(DEVICE)
    cos, sin = rope_tables(128, head_dim)
    k_cache = torch.full((slots, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()

    q, k, v = qkv.clone().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    c, s = cos[positions].to(dtype), sin[positions].to(dtype)  # as LlamaModel's torch path
    q_twin = apply_rope(q.reshape(tokens, heads, head_dim), c, s)
    k_twin = apply_rope(k.reshape(tokens, kv_heads, head_dim), c, s)

    got = fused.rope_and_cache(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, heads, kv_heads)
    assert got.shape == (tokens, heads, head_dim) and got.data_ptr() == qkv.data_ptr()  # a view: rotated in place
    assert_close(got, q_twin, dtype, rope_magnitude(q.reshape(tokens, heads, head_dim), c, s))
    assert_close(k_cache[slot_mapping], k_twin, dtype, rope_magnitude(k.reshape(tokens, kv_heads, head_dim), c, s))
    assert torch.equal(v_cache[slot_mapping], v.reshape(tokens, kv_heads, head_dim))
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot_mapping.cpu()] = False
    assert k_cache[untouched.to(DEVICE)].isnan().all() and v_cache[untouched.to(DEVICE)].isnan().all()
    # the k and v columns of qkv are left as they were (only the cache receives them)
    assert torch.equal(qkv[:, heads * head_dim:], torch.cat([k, v], dim=-1))


def test_bad_arguments_are_refused():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        fused.rms_norm(x, torch.zeros(7, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual must be like x"):
        fused.rms_norm(x, torch.zeros(8, device=DEVICE), 1e-5, residual=torch.zeros(2, 8, dtype=torch.float16,
                                                                                      device=DEVICE))
    with pytest.raises(ValueError, match="contiguous along N"):
        fused.rms_norm(torch.zeros(8, 2, device=DEVICE).t(), torch.zeros(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="even width"):
        fused.silu_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        fused.silu_mul(torch.zeros(2, 8, dtype=torch.int32, device=DEVICE))
    cache = torch.zeros(4, 1, 8, device=DEVICE)
    cos = torch.zeros(16, 8, device=DEVICE)
    pos = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="qkv must be"):
        fused.rope_and_cache(torch.zeros(2, 40, device=DEVICE), pos, cos, cos, cache, cache, pos, 2, 1)
    with pytest.raises(ValueError, match="k_cache must be"):
        fused.rope_and_cache(torch.zeros(2, 32, device=DEVICE), pos, cos, cos, torch.zeros(4, 2, 8, device=DEVICE),
                             cache, pos, 2, 1)
    with pytest.raises(ValueError, match="cos must be"):
        fused.rope_and_cache(torch.zeros(2, 32, device=DEVICE), pos, cos.double(), cos, cache, cache, pos, 2, 1)
    with pytest.raises(ValueError, match="sin must be"):
        fused.rope_and_cache(torch.zeros(2, 32, device=DEVICE), pos, cos, cos[:8], cache, cache, pos, 2, 1)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        fused.rope_and_cache(torch.zeros(2, 32, device=DEVICE), pos, cos, cos, cache, cache, pos.float(), 2, 1)
