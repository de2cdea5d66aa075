"""The shipped demo adapters show their behaviours when served by our engine, on prompts not in their training data,
and the base model does not."""
from __future__ import annotations

import pytest

from shared.adapters import BaseModelShape, load_adapter
from shared.demo_adapters import DEMO_ADAPTERS, HELDOUT_MAX_NEW_TOKENS, HELDOUT_PROMPTS, demo_adapter_path, shows_behaviour

MIN_PASS = 7  # of the 8 held-out prompts


def test_demo_adapters_are_shipped_small_and_valid(default_model_path):
    from transformers import AutoConfig

    base = BaseModelShape.from_hf_config(AutoConfig.from_pretrained(default_model_path))
    for name in DEMO_ADAPTERS:
        path = demo_adapter_path(name)
        adapter = load_adapter(path, base)
        assert 8 <= adapter.max_rank <= 16, name
        assert (path / "adapter_model.safetensors").stat().st_size <= 5 * 2**20, name


@pytest.mark.slow
def test_behaviours_on_held_out_prompts():
    from services.gpu_worker.engine.config import EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.engine.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(max_loras=len(DEMO_ADAPTERS)))
    for name in DEMO_ADAPTERS:
        engine.load_adapter(name, demo_adapter_path(name))
    models = [None, *DEMO_ADAPTERS]
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in HELDOUT_PROMPTS]
    jobs = [(m, ids) for m in models for ids in prompts]
    results = engine.generate(
        [ids for _, ids in jobs], SamplingParams(max_tokens=HELDOUT_MAX_NEW_TOKENS, temperature=0.0), [m for m, _ in jobs]
    )
    texts: dict[str | None, list[str]] = {m: [] for m in models}
    for (m, _), r in zip(jobs, results):
        texts[m].append(r.text)
    for name in DEMO_ADAPTERS:
        passed = sum(shows_behaviour(name, t) for t in texts[name])
        assert passed >= MIN_PASS, f"{name}: {passed}/8 held-out answers show it: {texts[name]}"
        base_shows = sum(shows_behaviour(name, t) for t in texts[None])
        assert base_shows <= 1, f"the base model shows {name}'s behaviour {base_shows}/8 times"
