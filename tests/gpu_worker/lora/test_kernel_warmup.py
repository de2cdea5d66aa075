"""Kernel warm-up (services/gpu_worker/kernel_warmup.py): after it, a mixed workload launches no Triton kernel variant
that warm-up did not, so on a GPU nothing compiles in a request's time; and it leaves nothing behind.

The kernels run in the Triton interpreter here (compiled on CUDA); the variants compared are the specializations
Triton would compile for each launch on a GPU (helpers/triton_variants.py), which do not depend on where they run."""
from __future__ import annotations

import pytest
import torch

from helpers.lora_factory import make_random_adapter
from helpers.tiny_models import TINY_GQA, save_tiny_gqa_llama
from helpers.triton_variants import LaunchVariants
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams
from services.gpu_worker.kernel_warmup import ADAPTER_PREFIX, KERNELS, compiles_kernels, warm_up

VOCAB = TINY_GQA["vocab_size"]
ADAPTERS = {  # ranks and targets unlike the warm-up's (every projection, ranks 1, 8, 16, 32)
    "qv2": dict(r=2, target_modules=["q_proj", "v_proj"]),
    "all5": dict(r=5, target_modules="all-linear"),
    "mlp12": dict(r=12, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "attn24": dict(r=24, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all32": dict(r=32, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("warmup_llama")
    model = save_tiny_gqa_llama(root / "model", default_model_path, max_position_embeddings=256)
    adapters = {name: make_random_adapter(model, root / name, seed=i, **kw)
                for i, (name, kw) in enumerate(ADAPTERS.items())}
    return root / "model", adapters


def test_warm_up_compiles_every_variant_a_workload_launches(tiny_llama, monkeypatch, device):
    model_dir, adapters = tiny_llama
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.02, max_loras=3, max_lora_rank=32,
                                    max_num_batched_tokens=48, lora_backend="triton", attention_backend="triton",
                                    device=str(device)))
    variants = LaunchVariants().install(monkeypatch)
    free_blocks = engine.blocks.num_free
    warm_up(engine)
    warmed = set(variants.seen)
    assert {name for name, _ in warmed} == {n for names in KERNELS.values() for n in names}
    # nothing left behind: no adapter registered or resident, every KV block and pool entry free
    assert engine.adapter_names() == [] and engine.adapters.resident == [] and not engine.has_unfinished()
    assert engine.blocks.num_free == free_blocks
    assert len(engine.model.lora_backend.pool._free_entries) == 3

    for name, path in adapters.items():
        engine.load_adapter(name, path)
    g = torch.Generator().manual_seed(3)
    lengths = [1, 3, 9, 16, 17, 33, 70, 130]  # one token to several chunks of 48 (prefill over cached blocks)
    names = [None, *ADAPTERS]
    requests = [(names[i % len(names)], torch.randint(3, VOCAB, (n,), generator=g).tolist())
                for i, n in enumerate(lengths * 2)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    results = engine.generate([p for _, p in requests], params, [a for a, _ in requests])
    assert all(len(r.token_ids) == 5 for r in results)
    launched = set(variants.seen)
    new = sorted(launched - warmed)
    assert not new, f"{len(new)} variant(s) first compiled by the workload, e.g. {new[0]}"
    assert len(launched) > 10  # guard: the recorder saw the workload's launches


def test_nothing_to_warm_up_without_compiled_kernels(tiny_llama, device):
    """On the CPU (torch backends, or Triton interpreted) there is nothing to compile: the worker skips warm-up."""
    model_dir, _ = tiny_llama
    for backend in ("torch", "triton"):
        engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.02, lora_backend=backend,
                                        attention_backend=backend, device=str(device)))
        assert compiles_kernels(engine) is (device.type == "cuda" and backend == "triton")


def test_warm_up_refuses_a_busy_engine(tiny_llama, device):
    model_dir, _ = tiny_llama
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.02, device=str(device)))
    engine.add_request("user-1", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up(engine)
    assert not any(n.startswith(ADAPTER_PREFIX) for n in engine.adapter_names())


def test_warm_up_stops_early_when_told(tiny_llama, device):
    """A worker told to stop while it warms up stops between adapters, with nothing left behind."""
    model_dir, _ = tiny_llama
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.02, max_lora_rank=16,
                                    device=str(device)))
    asked = []
    warm_up(engine, report=asked.append, should_stop=lambda: len(asked) >= 1)
    assert len(asked) == 1 and "1/3: rank 1" in asked[0]  # ranks 1, 8, 16: stopped after the first
    assert engine.adapter_names() == [] and not engine.has_unfinished()


@pytest.mark.parametrize("cap, ranks", [(256, [1, 8, 16, 32, 64]), (48, [1, 8, 16, 32, 48]), (20, [1, 8, 16, 20]),
                                        (1, [1])])
def test_warm_up_ranks_cover_each_tile_up_to_the_cap(tiny_llama, device, cap, ranks):
    """The adapters' ranks: each tile's up to max_lora_rank, that rank too (an o_proj adapter of rank 48 uses the 64-row
    tile, which rank 32 does not reach), but nothing past the widest tile (rank 256 adds no variant over 64)."""
    model_dir, _ = tiny_llama
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.02, max_lora_rank=cap,
                                    device=str(device)))
    asked = []
    warm_up(engine, report=asked.append)
    # (with decode graphs, on CUDA, warm-up then reports their capture too: not adapter lines)
    adapter_lines = [line for line in asked if line.startswith("kernel warm-up")]
    assert [int(line.split("rank ")[1].split()[0]) for line in adapter_lines] == ranks
