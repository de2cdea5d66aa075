"""The engine with cpu_assist=always (every prefill LoRA delta on cpu_prefill worker processes) against
cpu_assist=off: same greedy tokens and logprobs for adapters of several ranks and target sets, several requests in
one step, 1, 2 and 4 workers; a stalled worker falls back; nothing is left in /dev/shm after close()."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from services.gpu_worker.engine.config import ConfigError, EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams
from helpers.lora_factory import make_random_adapter

ADAPTERS = {  # name -> LoraConfig kwargs
    "r4-attn": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]),
    "r8-mlp": dict(r=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
}
PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 1, 2, 64, 33], [11, 12, 13], list(range(40, 75)), [7, 7, 7, 7, 9]]
MODELS = ["r4-attn", "r16-all", None, "r8-mlp"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_path) -> tuple[Path, dict[str, Path]]:
    """A tiny random Llama (GQA) with the default model's tokenizer, and three random adapters."""
    from helpers.tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_llama(root / "model", default_model_path, vocab_size=128, hidden_size=64,
                            intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, initializer_range=0.02)
    adapters = {name: make_random_adapter(model, root / name, seed=i, b_std=0.2, **kw)
                for i, (name, kw) in enumerate(ADAPTERS.items())}
    return root / "model", adapters


def run(tiny_model, **config) -> tuple[list, LLMEngine]:
    model_dir, adapters = tiny_model
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=24,
                                    **config))
    try:
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
    except BaseException:
        engine.close()
        raise
    return results, engine


def shm_entries() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"caraserve-{os.getpid()}-*")}


@pytest.fixture(scope="module")
def reference(tiny_model):
    results, engine = run(tiny_model, cpu_assist="off")
    engine.close()
    return results


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_always_equals_off(tiny_model, reference, workers, tmp_path):
    before = shm_entries()
    results, engine = run(tiny_model, cpu_assist="always", cpu_workers=workers, data_dir=str(tmp_path))
    try:
        assert engine.cpu_assist.pool.alive() == workers
        assert engine.cpu_assist.fallbacks == 0
        assert engine.cpu_assist.backend.cpu_ranges > 0  # the workers really computed the prefill deltas
    finally:
        engine.close()
    for got, want in zip(results, reference):
        assert got.token_ids == want.token_ids
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    assert shm_entries() <= before  # every segment (host cache, channels) unlinked


def test_stalled_worker_falls_back_and_completes(tiny_model, reference, tmp_path):
    model_dir, adapters = tiny_model
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=24,
                                    cpu_assist="always", cpu_workers=2, data_dir=str(tmp_path)))
    try:
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        engine.cpu_assist.pool.timeout_s = 0.5
        stalled = engine.cpu_assist.pool.pids()[0]
        os.kill(stalled, signal.SIGSTOP)  # alive but never answering: only the timeout can notice it
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
        assert engine.cpu_assist.fallbacks >= 1  # that range ran on the device instead
        assert engine.cpu_assist.pool.alive() == 1  # the stalled worker was dropped; the other kept serving
        assert engine.cpu_assist.backend.cpu_ranges > 0
    finally:
        try:
            os.kill(stalled, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass
        engine.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="cpu_assist must be off or always"):
        EngineConfig(cpu_assist="sometimes")
    with pytest.raises(ConfigError, match="cpu_workers must be >= 0"):
        EngineConfig(cpu_assist="always", cpu_workers=-1)
    EngineConfig(cpu_assist="always", cpu_workers=0)  # only `caraserve serve cpu_prefill` processes then


def test_no_worker_means_device_path(tiny_model, reference, tmp_path):
    """cpu_workers 0 and nobody joined: every prefill on the device, with no failed call and no warning."""
    results, engine = run(tiny_model, cpu_assist="always", cpu_workers=0, data_dir=str(tmp_path))
    try:
        assert engine.cpu_assist.pool.alive() == 0 and engine.cpu_assist.pool.socket_path.exists()
        assert engine.cpu_assist.backend.cpu_ranges == 0 and engine.cpu_assist.fallbacks == 0
    finally:
        engine.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    assert not list(tmp_path.glob("run/cpu_prefill/*.sock"))
