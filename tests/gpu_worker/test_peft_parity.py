"""Engine vs. the oracle (HF transformers + PEFT, same weights, float32): identical greedy tokens, and logprobs of
the chosen tokens within 1e-3, for the base model and adapters of every shape we claim to support."""
from __future__ import annotations

import pytest

from helpers.oracle import greedy_reference
from helpers.peft_cases import ADAPTERS, adapter_selected, load_peft_model, make_adapters
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams

pytestmark = pytest.mark.slow

MAX_NEW = 8
LOGPROB_TOL = 1e-3
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "How do I boil an egg?",
]


@pytest.fixture(scope="module")
def adapter_dirs(hf_base, tmp_path_factory):
    return make_adapters(hf_base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def peft_oracle(default_model_path, adapter_dirs):
    """One PeftModel holding every test adapter (its own copy of the base weights)."""
    return load_peft_model(default_model_path, adapter_dirs)


def oracle(peft_model, adapter: str | None, prompt_ids: list[int], eos: set[int]):
    with adapter_selected(peft_model, adapter):
        return greedy_reference(peft_model, prompt_ids, MAX_NEW, eos)


@pytest.fixture(scope="module")
def engine(adapter_dirs):
    eng = LLMEngine(EngineConfig(max_loras=len(adapter_dirs), max_num_batched_tokens=2048, kv_cache_memory_gb=0.25))
    for name, path in adapter_dirs.items():
        eng.load_adapter(name, path)
    return eng


def record_steps(engine):
    """Spy on the scheduler: the list of (adapter, tokens fed, num_computed before, num_tokens) per step."""
    steps = []
    schedule = engine.scheduler.schedule

    def spy():
        batch = schedule()
        steps.append([(s.adapter, n, s.num_computed, s.num_tokens) for s, n in zip(batch.seqs, batch.num_tokens)])
        return batch

    engine.scheduler.schedule = spy
    return steps


def assert_matches(engine, peft_oracle, requests, results):
    for (adapter, ids), got in zip(requests, results):
        want_tokens, want_lps = oracle(peft_oracle, adapter, ids, engine.eos_ids)
        assert got.token_ids == want_tokens, f"{adapter}: {got.token_ids} != {want_tokens}"
        got_lps = [lp.logprob for lp in got.logprobs]
        diff = max(abs(a - b) for a, b in zip(got_lps, want_lps))
        assert diff < LOGPROB_TOL, f"{adapter}: logprob diff {diff}"


def test_adapters_change_the_output(engine, peft_oracle):
    """Guards the parity tests: every test adapter must change the base model's logprobs (or they prove nothing)."""
    ids = engine.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    _, base_lps = oracle(peft_oracle, None, ids, engine.eos_ids)
    for name in ADAPTERS:
        _, lps = oracle(peft_oracle, name, ids, engine.eos_ids)
        assert max(abs(a - b) for a, b in zip(lps, base_lps)) > 1e-2, name


def test_mixed_adapters_and_base_in_one_step(engine, peft_oracle):
    requests = [(None, PROMPTS[0]), (None, PROMPTS[1])] + [(name, PROMPTS[i % 4]) for i, name in enumerate(ADAPTERS)]
    requests = [(a, engine.encode_chat([{"role": "user", "content": p}])) for a, p in requests]
    steps = record_steps(engine)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=True)
    results = engine.generate([ids for _, ids in requests], params, [a for a, _ in requests])
    first = steps[0]
    assert len(first) == len(requests), "every request should be prefilled in the first step"
    assert {a for a, *_ in first} == {None, *ADAPTERS}
    assert_matches(engine, peft_oracle, requests, results)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.in_use == {}


def test_raw_prompt_base_model(engine, peft_oracle):
    prompt = "The quick brown fox"
    results = engine.generate([prompt], SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=True))
    assert_matches(engine, peft_oracle, [(None, engine.tokenizer.encode(prompt))], results)


def test_chunked_prefill_matches(engine, peft_oracle, monkeypatch):
    monkeypatch.setattr(engine.scheduler, "max_num_batched_tokens", 7)
    long_prompt = " ".join(PROMPTS) + " Answer each question briefly, one line each."
    requests = [(a, engine.encode_chat([{"role": "user", "content": long_prompt}])) for a in ("r8-attention", None, "r64-mlp")]
    steps = record_steps(engine)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=True)
    results = engine.generate([ids for _, ids in requests], params, [a for a, _ in requests])
    chunked = [e for step in steps for e in step if 1 < e[1] < e[3] - e[2]]
    assert chunked, "prompts longer than the budget must be prefilled in chunks"
    mixed = [step for step in steps if any(e[1] == 1 for e in step) and any(e[1] > 1 for e in step)]
    assert mixed, "a prefill chunk and a decode should share a step"
    assert_matches(engine, peft_oracle, requests, results)


def test_preempted_request_resumes_and_matches(adapter_dirs, peft_oracle):
    # Prompts of 35-38 tokens take 10 blocks of 4; two are admitted (20 of 22 blocks) and both grow to 12 blocks
    # while generating, which cannot fit: the later one is preempted and later recomputed.
    eng = LLMEngine(EngineConfig(max_loras=2, num_kv_blocks=22, block_size=4, max_num_batched_tokens=256))
    for name in ("r7-all-linear", "rslora"):
        eng.load_adapter(name, adapter_dirs[name])
    requests = [(a, eng.encode_chat([{"role": "user", "content": p}]))
                for a, p in zip(["r7-all-linear", None, "rslora", "r7-all-linear"], PROMPTS)]
    seqs = []
    add = eng.scheduler.add
    eng.scheduler.add = lambda s: (seqs.append(s), add(s))
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=True, ignore_eos=True)
    results = eng.generate([ids for _, ids in requests], params, [a for a, _ in requests])
    assert sum(s.num_preemptions for s in seqs) > 0, "the KV cache was sized to force a preemption"
    for (adapter, ids), got in zip(requests, results):
        with adapter_selected(peft_oracle, adapter):
            want, lps = greedy_reference(peft_oracle, ids, MAX_NEW, set())
        assert got.token_ids == want
        assert max(abs(a.logprob - b) for a, b in zip(got.logprobs, lps)) < LOGPROB_TOL
    assert eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.adapters.in_use == {}
