"""The engine on every Llama-family shape we claim, vs. the oracle (HF transformers + PEFT, same weights, float32).

Each family is a tiny random model built from its transformers config class (seeded, no download) and saved as a
safetensors HF directory, with the embedded default's tokenizer copied in (the engine loads one; prompts are given
as token ids, and every id below the tiny vocabulary decodes). Checked per family: identical greedy tokens and
chosen-token logprobs within 1e-3 over a batch of prompts run together, and for Llama 3 and Qwen2 a random
all-linear LoRA adapter in the same batch. Then reduced precision (bfloat16, float16) and the refusal of models we
do not run.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from helpers.lora_factory import make_random_adapter
from helpers.oracle import greedy_reference
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams
from services.gpu_worker.model.rope import rope_tables
from services.gpu_worker.model.weights import UnsupportedModelError

pytestmark = pytest.mark.slow

MAX_NEW = 10
LOGPROB_TOL = 1e-3
VOCAB = 512  # below the default tokenizer's 49152: every id decodes, and the models stay tiny
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
    # HF's default 0.02 gives near-uniform logits on a 64-wide model: greedy would be decided by ties
    initializer_range=0.15,
)
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
FAMILIES = {
    # Llama 2: multi-head attention (kv heads == heads), default RoPE, untied lm_head
    "llama2": ("LlamaConfig", dict(intermediate_size=128, num_key_value_heads=4, rms_norm_eps=1e-5)),
    # Llama 3: GQA, llama3 RoPE scaling, untied lm_head
    "llama3": ("LlamaConfig", dict(intermediate_size=160, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                                   tie_word_embeddings=False)),
    # Llama 3 as its checkpoints ship: config.json with top-level rope_theta and a legacy "rope_scaling" dict
    "llama3-legacy-config": ("LlamaConfig", dict(intermediate_size=160, num_key_value_heads=2,
                                                 rope_parameters=LLAMA3_ROPE)),
    # Mistral: GQA, explicit head_dim (4 x 32 = 128 wide attention on a 64-wide model)
    "mistral": ("MistralConfig", dict(intermediate_size=112, num_key_value_heads=2, head_dim=32,
                                      rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # Qwen2: q/k/v biases (made non-zero below), GQA
    "qwen2": ("Qwen2Config", dict(intermediate_size=96, num_key_value_heads=1, rms_norm_eps=1e-6,
                                  tie_word_embeddings=False)),
    # SmolLM2-like: tied embeddings (lm_head is the embedding), GQA
    "smollm2": ("LlamaConfig", dict(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)),
    # RoPE scalings with fixed tables: linear (positions / factor) on Llama, YaRN (cos/sin scaled too) on Qwen2
    "llama-linear-rope": ("LlamaConfig", dict(intermediate_size=128, num_key_value_heads=2,
                                              rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=1e4))),
    "qwen2-yarn": ("Qwen2Config", dict(intermediate_size=96, num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=1e6))),
    # Llama with attention_bias: q/k/v *and* o_proj biases (InternLM/Llama variants)
    "llama-attn-bias": ("LlamaConfig", dict(intermediate_size=128, num_key_value_heads=2, attention_bias=True)),
}
LORA_FAMILIES = ("llama3", "qwen2")
LORA = dict(r=8, target_modules="all-linear")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: a second intra-op thread only adds synchronisation, which on a busy machine costs 5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompts(seed: int) -> list[list[int]]:
    """Three prompts of different lengths, ids past the special tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 29)]


def build_family(name: str, out_dir, default_model_path):
    """Save a tiny random model of family `name` (and the default tokenizer) into out_dir."""
    import transformers

    cls_name, extra = FAMILIES[name]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # HF inits them to ones: a loader ignoring them would pass
                p.uniform_(0.5, 1.5)
            elif pname.endswith(".bias"):  # HF inits them to zeros: a loader dropping them would pass
                p.normal_(0.0, 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    if name.endswith("-legacy-config"):
        saved = json.loads((out_dir / "config.json").read_text())
        rope = saved.pop("rope_parameters")
        saved["rope_theta"] = rope.pop("rope_theta")
        saved["rope_scaling"] = rope
        (out_dir / "config.json").write_text(json.dumps(saved, indent=2))
    for f in TOKENIZER_FILES:
        if (default_model_path / f).is_file():
            shutil.copy(default_model_path / f, out_dir / f)
    return out_dir


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name, default_model_path) for name in FAMILIES}


def hf_oracle(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def greedy(engine, requests, dtype_note=""):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=True, ignore_eos=True)
    results = engine.generate([ids for _, ids in requests], params, [a for a, _ in requests])
    for r in results:
        assert len(r.token_ids) == MAX_NEW, f"{dtype_note}{r.finish_reason}"
    return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in results]


def assert_parity(label, got, want):
    (got_tokens, got_lps), (want_tokens, want_lps) = got, want
    assert got_tokens == want_tokens, f"{label}: {got_tokens} != {want_tokens}"
    diff = max(abs(a - b) for a, b in zip(got_lps, want_lps))
    assert diff < LOGPROB_TOL, f"{label}: logprob diff {diff}"


@torch.no_grad()
def teacher_forced_logprobs(model, prompt_ids, tokens) -> list[float]:
    """Logprobs of `tokens` after `prompt_ids` (then each other) in one forward pass of an HF model."""
    logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_hf(family, family_dirs, tmp_path):
    model_dir = family_dirs[family]
    oracle = hf_oracle(model_dir)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.05, max_loras=1))
    check_family_shape(family, engine, oracle)

    requests = [(None, ids) for ids in prompts(1)]
    if family in LORA_FAMILIES:
        adapter_dir = make_random_adapter(oracle, tmp_path / "lora", seed=7, b_std=0.3 / LORA["r"] ** 0.5, **LORA)
        engine.load_adapter("lora", adapter_dir)
        requests += [("lora", ids) for ids in prompts(2)[1:]]
        requests.insert(1, ("lora", prompts(3)[0]))  # base and adapter interleaved in the batch
    got = greedy(engine, requests)

    want = {i: greedy_reference(oracle, ids, MAX_NEW, set()) for i, (a, ids) in enumerate(requests) if a is None}
    if family in LORA_FAMILIES:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(oracle, adapter_dir).eval()
        for i, (a, ids) in enumerate(requests):
            if a is not None:
                want[i] = greedy_reference(peft_model, ids, MAX_NEW, set())
                with peft_model.disable_adapter():  # guard: the adapter must change the output
                    base_lps = teacher_forced_logprobs(peft_model, ids, want[i][0])
                assert max(abs(x - y) for x, y in zip(want[i][1], base_lps)) > 1e-2, "the adapter changes nothing"
    for i, (adapter, _) in enumerate(requests):
        assert_parity(f"{family}/{adapter or 'base'}#{i}", got[i], want[i])
    # not degenerate: the random model does not just repeat one token
    assert len({t for toks, _ in got for t in toks}) > 3
    assert engine.blocks.num_free == engine.blocks.num_blocks


def check_family_shape(family, engine, oracle):
    """Guards: the tiny model really has the feature its family is here to test."""
    m, c = engine.model, engine.hf_config
    assert c.model_type == ("qwen2" if family.startswith("qwen2") else "mistral" if family == "mistral" else "llama")
    if family == "llama2":
        assert m.num_kv_heads == m.num_heads
    else:
        assert m.num_kv_heads < m.num_heads
    if c.rope_parameters["rope_type"] != "default":
        theta = c.rope_parameters["rope_theta"]
        default = type(c)(**{**c.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": theta}})
        cos_default, _ = rope_tables(default, engine.max_model_len, torch.device("cpu"))
        assert not torch.allclose(m.cos, cos_default), "the RoPE scaling should change the tables"
    if family == "mistral":
        assert m.head_dim == 32 and m.q_width != c.hidden_size
    if family.startswith("qwen2"):
        assert all(lw.qkv_bias is not None and lw.qkv_bias.abs().max() > 0.1 for lw in m.weights.layers)
    if family == "smollm2":
        assert m.weights.lm_head is m.weights.embed
        assert oracle.lm_head.weight.data_ptr() == oracle.model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(m.weights.lm_head, m.weights.embed)


# Tolerances vs. float32. A bfloat16 rounding has relative error up to 2^-8 (~4e-3); the values rounded on the way
# to a logit (norms, q/k/v, RoPE, attention, o, SwiGLU, residuals, over 2 layers) add up to an error of a few 1e-2
# on logits and logprobs of magnitude ~3: transformers itself, in bfloat16 on these weights, is ~4e-2 off its
# float32 logprobs. 0.1 leaves a margin over that, yet a wrong cast or a dropped scale moves logprobs by tenths.
# float16 rounds 4x finer (2^-11): transformers is ~1.6e-2 off, bound 5e-2. On top of the bounds, the engine must
# be no worse than transformers at the same dtype (twice its error, plus 5e-3 for the different summation orders).
REDUCED = {"bfloat16": 0.1, "float16": 5e-2}


def test_reduced_precision_close_to_float32(family_dirs):
    """bfloat16 and float16 engines run the tiny Llama 3 and stay near the float32 engine's logprobs.

    Compared while the float32 and reduced runs pick the same tokens (after a greedy flip the continuations differ);
    at least the first token of every prompt and half of all tokens must agree.
    """
    from transformers import AutoModelForCausalLM

    model_dir = family_dirs["llama3"]
    requests = [(None, ids) for ids in prompts(4)]
    ref = greedy(LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.05, dtype="float32")), requests)
    for dtype, bound in REDUCED.items():
        engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.05, dtype=dtype))
        assert engine.model.weights.embed.dtype == getattr(torch, dtype)
        got = greedy(engine, requests, f"{dtype}: ")
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        engine_err = hf_err = 0.0
        compared = 0
        for (_, ids), (tokens, lps), (ref_tokens, ref_lps) in zip(requests, got, ref):
            assert all(math.isfinite(x) and x <= 0.0 for x in lps), dtype
            assert tokens[0] == ref_tokens[0], f"{dtype}: the first token differs from float32"
            n = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
            hf_lps = teacher_forced_logprobs(hf, ids, ref_tokens[:n])
            engine_err = max(engine_err, *(abs(a - b) for a, b in zip(lps[:n], ref_lps[:n])))
            hf_err = max(hf_err, *(abs(a - b) for a, b in zip(hf_lps, ref_lps[:n])))
            compared += n
        assert compared >= len(requests) * MAX_NEW // 2, f"{dtype}: only {compared} tokens agree with float32"
        assert engine_err < bound, f"{dtype}: logprobs {engine_err} off float32 (bound {bound})"
        assert engine_err <= 2 * hf_err + 5e-3, f"{dtype}: engine {engine_err} vs transformers {hf_err} off float32"


def config_dir(tmp_path, config) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(
    "kind, needle",
    [("gpt2", "'gpt2' is not supported"), ("gelu", "hidden_act"), ("mlp_bias", "mlp_bias"),
     ("dynamic-rope", "rope_type 'dynamic'"), ("qwen2-sliding-window", "sliding-window")],
    ids=["gpt2", "gelu", "mlp_bias", "dynamic-rope", "qwen2-sliding-window"],
)
def test_unsupported_model_is_refused(kind, needle, tmp_path):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    config = {
        "gpt2": lambda: GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB),
        "gelu": lambda: LlamaConfig(**COMMON, intermediate_size=128, hidden_act="gelu"),
        "mlp_bias": lambda: LlamaConfig(**COMMON, intermediate_size=128, mlp_bias=True),
        # dynamic NTK scaling recomputes the tables as the sequence grows: fixed tables would be wrong past the limit
        "dynamic-rope": lambda: LlamaConfig(**COMMON, intermediate_size=128,
                                            rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)),
        "qwen2-sliding-window": lambda: Qwen2Config(**COMMON, intermediate_size=96, use_sliding_window=True,
                                                    sliding_window=16, max_window_layers=0),
    }[kind]()
    with pytest.raises(UnsupportedModelError) as err:
        LLMEngine(EngineConfig(model=config_dir(tmp_path / kind, config), kv_cache_memory_gb=0.05))
    message = str(err.value)
    assert needle in message and "\n" not in message, message


def test_unknown_weights_are_refused(family_dirs, tmp_path):
    """A checkpoint holding weights the engine would not use is refused, not run with them silently dropped."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "extra"
    shutil.copytree(family_dirs["llama2"], model_dir)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError) as err:
        LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.05))
    assert "o_proj.bias" in str(err.value) and "\n" not in str(err.value)
