"""The engine in bfloat16 vs. the oracle (HF transformers + PEFT, same weights, float32), with an adapter of every
shape the float32 suite has (helpers/peft_cases.py), base-model and adapter requests in one batch: on the CPU (torch
LoRA backend, runs everywhere) and on CUDA (Triton LoRA backend; the oracles run there too).

bfloat16 moves logprobs by tenths and can flip a greedy token, so the float32 suite's identical tokens and 1e-3 do not
apply. Instead, on the tokens where the engine and float32 agree (after a flip the continuations differ), the engine's
logprobs must be within BOUND of float32's and no further off than transformers + PEFT's own in bfloat16.
"""
from __future__ import annotations

import pytest
import torch

from helpers.oracle import greedy_reference, teacher_forced_log_softmax
from helpers.peft_cases import ADAPTERS, adapter_selected, load_peft_model, make_adapters
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW = 8
# The bound on |engine - float32| over the compared logprobs. A bfloat16 rounding has relative error up to 2^-8
# (~4e-3, 8 significant bits); about ten values are rounded on the way through each of the 30 layers (norms, q/k/v,
# RoPE, attention, o, SwiGLU, residuals, plus each LoRA shrink and expand), and 300 such errors, adding up like a
# random walk, make a relative error of ~sqrt(300) * 2^-8 ~ 7% in the final hidden state: a few tenths on logits of
# ~10, most of it common to all logits and cancelled by the softmax. Measured on these requests (CPU), over 80
# tokens: transformers + PEFT in bfloat16 is up to 0.19 off its float32 logprobs, the engine up to 0.21 (typically
# 0.03-0.08, growing along the sequence). 0.35 leaves a margin of ~1.7x over both, yet a dropped or half-scaled
# adapter is further off (the guard below). On top of it the engine must be no worse than transformers at the same
# precision (twice its error, plus 5e-3 for the different summation orders).
BOUND = 0.35
# B 2.5x the float32 suite's (whose adapters move logprobs by as little as ~0.1, within bfloat16's noise); 4x for
# patterns-regex, whose alpha_pattern makes its v_proj scale 3/8 where the others' are ~2.
STRENGTH = {name: 2.5 for name in ADAPTERS} | {"patterns-regex": 4.0}
# One request per adapter, and two on the base model. The guard asserts what the prompts were chosen for: the float32
# first token is decided (top-2 margin >= 2 * BOUND: a flip then means errors beyond the bound, not a tie), and the
# adapter moves its logprob by more than 3 * BOUND. The first token is always compared, so an adapter dropped flips
# it or is that far off there, and one at half its scale about half as far.
REQUESTS = [
    (None, "What is the boiling point of water?"),
    (None, "What is the largest ocean?"),
    ("r1-qv", "What is photosynthesis?"),
    ("r7-all-linear", "Write a haiku about the sea."),
    ("r8-attention", "Name three primary colors."),
    ("r64-mlp", "How do plants make food?"),
    ("r256-qv", "How do I boil an egg?"),
    ("rslora", "What language is spoken in Brazil?"),
    ("patterns-regex", "What is the capital of France?"),
    ("fan-in-fan-out-layers", "What is the capital of France?"),
]


@pytest.fixture(scope="module")
def adapter_dirs(hf_base, tmp_path_factory):
    """The suite's adapters at STRENGTH, made once for both cases."""
    return make_adapters(hf_base, tmp_path_factory.mktemp("adapters-bf16"), STRENGTH)


@pytest.mark.parametrize("device, lora_backend", [
    pytest.param("cpu", "torch", id="cpu"),
    pytest.param("cuda", "triton", id="cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_bfloat16_close_to_float32_peft(device, lora_backend, adapter_dirs, default_model_path):
    """One mixed batch in a bfloat16 engine vs. float32 transformers + PEFT (the truth), with transformers + PEFT in
    bfloat16, teacher-forced on the float32 tokens, as the error to be no worse than.

    The first token of every request and at least half of all tokens must agree with float32."""
    assert sorted(a for a, _ in REQUESTS if a) == sorted(ADAPTERS)
    engine = LLMEngine(EngineConfig(dtype="bfloat16", device=device, lora_backend=lora_backend,
                                    max_loras=len(adapter_dirs), max_num_batched_tokens=2048, kv_cache_memory_gb=0.25))
    assert engine.model.weights.embed.dtype == torch.bfloat16
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    requests = [(a, engine.encode_chat([{"role": "user", "content": p}])) for a, p in REQUESTS]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=True)
    results = engine.generate([ids for _, ids in requests], params, [a for a, _ in requests])

    fp32 = load_peft_model(default_model_path, adapter_dirs, torch.float32, device)
    bf16 = load_peft_model(default_model_path, adapter_dirs, torch.bfloat16, device)
    engine_err = hf_err = 0.0
    compared = total = 0
    effects = {}
    for (adapter, ids), got in zip(requests, results):
        label = adapter or "base"
        with adapter_selected(fp32, adapter):
            want, _ = greedy_reference(fp32, ids, MAX_NEW, engine.eos_ids)
            truth = teacher_forced_log_softmax(fp32, ids, want)
        chosen = torch.arange(len(want)), torch.tensor(want)
        want_lps = truth[chosen]
        top2 = truth[0].topk(2).values
        assert top2[0] - top2[1] >= 2 * BOUND, f"{label}: the float32 first token is a near tie, choose another prompt"
        if adapter is not None:  # guard: a dropped or half-scaled adapter must be off by more than the bound
            with adapter_selected(fp32, None):
                base_lp = teacher_forced_log_softmax(fp32, ids, want[:1])[0, want[0]]
            effects[adapter] = (want_lps[0] - base_lp).abs().item()
            assert effects[adapter] > 3 * BOUND, f"{label} moves the first logprob by only {effects[adapter]:.3f}"
        with adapter_selected(bf16, adapter):
            hf_lps = teacher_forced_log_softmax(bf16, ids, want)[chosen]

        got_lps = torch.tensor([lp.logprob for lp in got.logprobs])
        assert torch.isfinite(got_lps).all() and (got_lps <= 0).all(), f"{label}: {got_lps}"
        assert got.token_ids[:1] == want[:1], f"{label}: the first token differs from float32"
        n = next((i for i, (a, b) in enumerate(zip(got.token_ids, want)) if a != b), min(len(got.token_ids), len(want)))
        engine_err = max(engine_err, (got_lps[:n] - want_lps[:n]).abs().max().item())
        hf_err = max(hf_err, (hf_lps[:n] - want_lps[:n]).abs().max().item())
        compared += n
        total += len(want)
    print(f"{device}: off float32 over {compared}/{total} tokens: engine {engine_err:.4f}, transformers + PEFT "
          f"{hf_err:.4f}; first-token adapter effects {', '.join(f'{a} {e:.2f}' for a, e in effects.items())}")
    assert compared >= total // 2, f"only {compared} of {total} tokens agree with float32"
    assert engine_err < BOUND, f"engine logprobs {engine_err:.4f} off float32 (bound {BOUND})"
    assert engine_err <= 2 * hf_err + 5e-3, f"engine {engine_err:.4f} vs transformers {hf_err:.4f} off float32"
