"""LLMEngine request lifecycle on the embedded default model: seeds, stop conditions, abort, preemption, adapter
unload, errors. One small engine for the module (a small KV cache, so preemption happens); few tokens per request.
"""
from __future__ import annotations

import pytest

from helpers.lora_factory import make_random_adapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import EngineRequestError, LLMEngine
from services.gpu_worker.engine.sequence import FinishReason, RequestOutput, SamplingParams

pytestmark = pytest.mark.slow

BLOCK = 4
NUM_BLOCKS = 28  # 112 tokens of KV in all: the context limit too
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "List three primary colors:",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def adapter_dir(hf_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("lifecycle") / "lora"
    return make_random_adapter(hf_base, path, seed=3, b_std=0.1, r=4, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def engine(default_model_path, adapter_dir):
    eng = LLMEngine(EngineConfig(
        model=str(default_model_path), dtype="float32", num_kv_blocks=NUM_BLOCKS, block_size=BLOCK,
        max_num_batched_tokens=96, max_num_seqs=8, max_loras=2,
    ))
    eng.load_adapter("ad", adapter_dir)
    return eng


@pytest.fixture(autouse=True)
def engine_is_idle_after(engine):
    """Every test leaves the shared engine drained: no request, block, slot reference or pin left behind."""
    yield
    assert_idle(engine)


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.in_use == {}
    assert engine.adapters.pinned == {}
    assert not engine.scheduler.waiting and not engine.scheduler.running


def run(engine: LLMEngine, max_steps: int = 500) -> dict[str, list[RequestOutput]]:
    """Step until nothing is left; every output grouped by request."""
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish")


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def text(outs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outs)


def final(outs: list[RequestOutput]) -> RequestOutput:
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]  # exactly one final output, last
    return outs[-1]


def greedy(engine, prompt, n, **kw):
    engine.add_request("g", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw))
    return run(engine)["g"]


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(engine):
    p = SamplingParams(max_tokens=6, temperature=0.8, seed=1234, ignore_eos=True)
    engine.add_request("alone", PROMPTS[0], p)
    alone = tokens(run(engine)["alone"])

    engine.add_request("other-1", PROMPTS[1], SamplingParams(max_tokens=6, temperature=1.0))
    engine.add_request("other-2", PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    engine.step()  # the seeded request joins a batch already running
    engine.add_request("mixed", PROMPTS[0], p)
    engine.add_request("other-3", PROMPTS[3], SamplingParams(max_tokens=5, temperature=0.0), adapter="ad")
    engine.add_request("different-seed", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.8, seed=99,
                                                                   ignore_eos=True))
    outs = run(engine)
    assert tokens(outs["mixed"]) == alone
    assert tokens(outs["different-seed"]) != alone  # guards the test: the seed matters


def test_max_tokens_finishes_with_length(engine):
    outs = greedy(engine, PROMPTS[0], 5)
    assert len(tokens(outs)) == 5 and len(outs) == 5
    last = final(outs)
    assert last.finish_reason == FinishReason.LENGTH == "length"
    assert last.completion_tokens == 5 and last.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[0]))


def test_stop_string_finishes_with_stop_and_is_excluded(engine):
    reference = greedy(engine, PROMPTS[1], 12)
    full = text(reference)
    # a stop string that starts a few tokens in and spans token boundaries
    start = len(text(reference[:3]))
    stop = full[start : start + 4]
    assert stop.strip() and full.find(stop) == start
    engine.add_request("s", PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop]))
    outs = run(engine)["s"]
    last = final(outs)
    assert last.finish_reason == FinishReason.STOP == "stop"
    assert text(outs) == full[:start]
    assert stop not in text(outs)
    assert len(tokens(outs)) < 12


def test_stop_token_id_finishes_with_stop(engine):
    reference = greedy(engine, PROMPTS[2], 10)
    ids = tokens(reference)
    stop_id = ids[3]
    at = ids.index(stop_id)
    engine.add_request("t", PROMPTS[2], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_id]))
    outs = run(engine)["t"]
    assert final(outs).finish_reason == FinishReason.STOP
    assert tokens(outs) == ids[: at + 1]  # the stop token is reported as a token ...
    assert text(outs) == engine.tokenizer.decode(ids[:at])  # ... but not as text


def test_eos_finishes_with_stop_unless_ignored(engine):
    ids = engine.encode_chat([{"role": "user", "content": "What is 2+2? Answer with just the number."}])
    engine.add_request("e", ids, SamplingParams(max_tokens=12, temperature=0.0))
    outs = run(engine)["e"]
    assert final(outs).finish_reason == FinishReason.STOP
    assert tokens(outs)[-1] in engine.eos_ids and len(tokens(outs)) < 12
    assert "4" in text(outs) and "<|im_end|>" not in text(outs)
    n = len(tokens(outs))
    engine.add_request("i", ids, SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True))
    outs = run(engine)["i"]
    assert final(outs).finish_reason == FinishReason.LENGTH and len(tokens(outs)) == n + 1


def test_top_logprobs_have_the_right_length(engine):
    engine.add_request("lp", PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, top_logprobs=3, ignore_eos=True))
    engine.add_request("no", PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.add_request("one", PROMPTS[2], SamplingParams(max_tokens=4, temperature=0.7, logprobs=True, ignore_eos=True))
    outs = run(engine)
    for o in outs["lp"]:
        assert len(o.logprobs) == 1
        lp = o.logprobs[0]
        assert lp.token_id == o.new_token_ids[0]
        assert len(lp.top) == 3
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0] == (lp.token_id, pytest.approx(lp.logprob, abs=1e-6))  # greedy picks the best
        assert lp.logprob <= 0.0
    assert all(o.logprobs is None for o in outs["no"])
    assert all(len(o.logprobs) == 1 and o.logprobs[0].top == [] for o in outs["one"])


def test_abort_mid_generation(engine):
    engine.add_request("keep", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    engine.add_request("kill", PROMPTS[1], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    seen: list[RequestOutput] = []
    for _ in range(3):
        seen += [o for o in engine.step() if o.request_id == "kill"]
    assert seen and not seen[-1].finished
    assert engine.abort("kill")
    assert not engine.abort("kill")  # gone
    assert not engine.abort("never-added")
    outs = run(engine)
    last = final(seen + outs["kill"])
    assert last.finish_reason == FinishReason.ABORT == "abort"
    assert last.new_token_ids == []
    assert last.completion_tokens == len(tokens(seen))
    assert final(outs["keep"]).finish_reason == FinishReason.LENGTH
    engine.add_request("kill", PROMPTS[1], SamplingParams(max_tokens=2))  # the id can be reused
    run(engine)


def test_abort_a_waiting_request(engine):
    engine.add_request("w", PROMPTS[0], SamplingParams(max_tokens=3))
    assert engine.abort("w")
    outs = run(engine)
    assert final(outs["w"]).finish_reason == FinishReason.ABORT
    assert final(outs["w"]).completion_tokens == 0


def test_finished_aborted_and_preempted_mix_frees_everything(engine):
    """Six greedy requests of 24 + 6 tokens overflow the 112-token cache: one is preempted and recomputed. One is
    aborted while running, one while still waiting. Survivors, preempted or not, match a request run alone."""
    prompt = " ".join(PROMPTS)
    assert len(engine.tokenizer.encode(prompt)) == 24  # the sizes above assume it
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("solo-base", prompt, params)
    engine.add_request("solo-ad", prompt, params, adapter="ad")
    solo = run(engine)
    seqs = {}
    add = engine.scheduler.add
    engine.scheduler.add = lambda s: (seqs.__setitem__(s.request_id, s), add(s))
    try:
        for i in range(6):
            engine.add_request(f"m{i}", prompt, params, adapter="ad" if i % 2 else None)
    finally:
        engine.scheduler.add = add
    outs: dict[str, list[RequestOutput]] = {}
    for step in range(200):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if step == 2:
            assert seqs["m1"].num_generated > 0  # running
            assert seqs["m5"].num_generated == 0 and seqs["m5"].block_table == []  # waiting
            assert engine.abort("m1") and engine.abort("m5")
    preempted = [rid for rid, s in seqs.items() if s.num_preemptions]
    assert preempted, "the KV cache was sized to force preemption"
    for rid in ("m1", "m5"):
        assert final(outs[rid]).finish_reason == FinishReason.ABORT
    survivors = ["m0", "m2", "m3", "m4"]
    assert set(preempted) <= set(survivors)
    for i, rid in ((int(r[1]), r) for r in survivors):
        assert final(outs[rid]).finish_reason == FinishReason.LENGTH
        assert tokens(outs[rid]) == tokens(solo["solo-ad" if i % 2 else "solo-base"]), rid
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.in_use == {}


def test_unknown_adapter_is_refused(engine):
    with pytest.raises(EngineRequestError, match="unknown model or adapter 'nope'"):
        engine.add_request("u", PROMPTS[0], SamplingParams(), adapter="nope")
    assert not engine.has_unfinished()


def test_too_long_prompt_is_refused(engine):
    ids = [100] * engine.max_model_len
    assert engine.max_model_len == NUM_BLOCKS * BLOCK
    with pytest.raises(EngineRequestError, match=f"the prompt has {len(ids)} tokens; this model's context is "
                                                  f"{engine.max_model_len} tokens"):
        engine.add_request("long", ids, SamplingParams())
    assert not engine.has_unfinished()
    engine.add_request("fits", ids[:-1], SamplingParams(max_tokens=5))  # one token of room: finishes at the limit
    out = final(run(engine)["fits"])
    assert out.finish_reason == FinishReason.LENGTH and out.completion_tokens == 1


def test_other_request_errors(engine):
    with pytest.raises(EngineRequestError, match="the prompt is empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(EngineRequestError, match="prompt token ids must be integers"):
        engine.add_request("e", [1, engine.hf_config.vocab_size], SamplingParams())
    engine.add_request("dup", PROMPTS[0], SamplingParams(max_tokens=2))
    with pytest.raises(EngineRequestError, match="request id 'dup' is already running"):
        engine.add_request("dup", PROMPTS[0], SamplingParams(max_tokens=2))
    run(engine)


def test_unload_adapter_in_use(engine, adapter_dir):
    engine.load_adapter("tmp", adapter_dir)
    try:
        engine.add_request("running", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                           adapter="tmp")
        engine.add_request("queued", PROMPTS[1], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                           adapter="tmp")
        first = engine.step()
        assert {o.request_id for o in first} == {"running", "queued"}
        engine.unload_adapter("tmp")
        assert "tmp" not in engine.adapter_names()
        with pytest.raises(EngineRequestError, match="unknown model or adapter 'tmp'"):
            engine.add_request("new", PROMPTS[2], SamplingParams(), adapter="tmp")
        with pytest.raises(EngineRequestError, match="being removed"):
            engine.load_adapter("tmp", adapter_dir)  # not while its requests still run
        outs = run(engine)
        assert final(outs["running"]).finish_reason == FinishReason.LENGTH
        assert len(tokens(first[:1] + outs["running"])) + len(tokens(first[1:] + outs["queued"])) == 6 + 3
        assert "tmp" not in engine.adapters.resident
        with pytest.raises(EngineRequestError, match="adapter 'tmp' is not loaded"):
            engine.unload_adapter("tmp")
    finally:
        if "tmp" in engine.adapters.registered:
            engine.unload_adapter("tmp")


def test_unload_adapter_with_only_queued_requests(engine, adapter_dir):
    """Regression: a request accepted for an adapter unloaded before it was scheduled crashed step() (KeyError)."""
    engine.load_adapter("tmp2", adapter_dir)
    engine.add_request("q", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), adapter="tmp2")
    engine.unload_adapter("tmp2")
    outs = run(engine)
    assert final(outs["q"]).finish_reason == FinishReason.LENGTH
    assert "tmp2" not in engine.adapters.resident
    engine.load_adapter("tmp2", adapter_dir)  # loadable again once its requests are done
    engine.unload_adapter("tmp2")


def test_adapter_changes_the_output(engine):
    """Guards the adapter tests: the test adapter is not a no-op."""
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, ignore_eos=True)
    base, lora = engine.generate([PROMPTS[3], PROMPTS[3]], params, [None, "ad"])
    assert max(abs(a.logprob - b.logprob) for a, b in zip(base.logprobs, lora.logprobs)) > 1e-3


def test_invalid_adapter_name_is_refused(engine, adapter_dir):
    with pytest.raises(EngineRequestError, match="invalid adapter name"):
        engine.load_adapter("bad name!", adapter_dir)
    with pytest.raises(EngineRequestError, match="is the base model's name"):
        engine.load_adapter(engine.model_name, adapter_dir)
