"""How much device work a decode step issues per layer, on the Triton path (the GPU's) and on the torch path.

On a GPU every launch costs host time (~5-10 us for a torch op, more for a Triton kernel), and a decode step of a
7B model is a few milliseconds of memory traffic: the count per layer decides whether the host keeps up. Counted
here by a dispatch mode and by wrapping the Triton kernels (bench/device_ops.py), the difference between models
of 3 and 2 layers being one layer's share. Interpreted on the CPU without CUDA, compiled on a GPU: the counts are
the same.
"""
from __future__ import annotations

import pytest

from bench.device_ops import DeviceOps
from helpers.lora_factory import make_random_adapter
from helpers.tiny_models import save_tiny_gqa_llama
from helpers.triton_mode import DEVICE, import_kernels, triton_interpreter  # noqa: F401 (autouse)
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams

import_kernels()
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, default_model_path):
    """{layers: (model dir, adapter dir)} for 2 and 3 layers (same seed: the first layers agree)."""
    root = tmp_path_factory.mktemp("launches")
    out = {}
    for layers in (2, 3):
        model = save_tiny_gqa_llama(root / f"model{layers}", default_model_path, num_hidden_layers=layers)
        out[layers] = (root / f"model{layers}",
                       make_random_adapter(model, root / f"adapter{layers}", seed=1, r=8, target_modules=ALL_TARGETS))
    return out


def decode_step_ops(model_dir, adapter_dir, backend: str) -> DeviceOps:
    """The device work of one decode-only step of 4 sequences, 2 of them with an adapter on every projection."""
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=DEVICE.type, kv_cache_memory_gb=0.02,
                                    lora_backend=backend, attention_backend=backend))
    engine.load_adapter("a", adapter_dir)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", [5 + i, 7, 9, 11], params, adapter="a" if i % 2 else None)
    engine.step()  # the prefills (and the first tokens)
    with DeviceOps() as ops:
        engine.step()  # decodes only
    while engine.has_unfinished():
        engine.step()
    return ops


def per_layer(models, backend: str) -> tuple[dict, dict]:
    """(torch ops, Triton launches) of one layer in a decode step: 3 layers' counts minus 2 layers'."""
    three = decode_step_ops(*models[3], backend)
    two = decode_step_ops(*models[2], backend)
    return dict(three.torch_ops - two.torch_ops), dict(three.triton - two.triton)


def test_a_layer_of_a_decode_step_on_the_triton_path(models):
    torch_ops, triton = per_layer(models, "triton")
    # the four GEMMs of the base model, nothing else from torch
    assert sum(torch_ops.values()) == 4, torch_ops
    # two norms (the residual adds folded in), RoPE with the cache write, attention, SiLU·mul, and a shrink and an
    # expand for each of the four LoRA groups (q/k/v, o, gate/up, down): per-token launches, decodes only
    assert triton == {"_rms_norm_kernel": 2, "_rope_and_cache_kernel": 1, "_paged_decode_kernel": 1,
                      "_silu_mul_kernel": 1, "_lora_shrink_token_kernel": 4, "_lora_expand_token_kernel": 4}


def test_the_torch_path_takes_several_times_more(models):
    torch_ops, triton = per_layer(models, "torch")
    assert not triton
    assert sum(torch_ops.values()) > 3 * 17, torch_ops  # the Triton path's 17 (test above)
