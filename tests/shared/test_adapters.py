"""shared.adapters against PEFT itself: adapters saved by peft.save_pretrained must load with PEFT's ranks, scales and
weights, and every broken or unsupported adapter must be refused with a one-line reason."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from shared.adapters import (LORA_TARGETS, AdapterValidationError, BaseModelShape, LoRAAdapter, load_adapter)

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)
PREFIX = "base_model.model."
ST, CFG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def base() -> BaseModelShape:
    return BaseModelShape.from_hf_config(LlamaConfig(**LLAMA))


def save_peft_adapter(directory, dtype: torch.dtype | None = None, **lora_kwargs):
    """Save a tiny random Llama LoRA adapter with PEFT; return the PeftModel, the oracle for the checks."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**LLAMA)), LoraConfig(**lora_kwargs),
                           autocast_adapter_dtype=dtype is None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for lora_b in module.lora_B.values():  # PEFT initialises B to zero, which would hide A/B mix-ups
                    lora_b.weight.copy_(torch.randn(lora_b.weight.shape, generator=gen))
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(directory)
    return model


def peft_modules(model) -> dict[tuple[int, str], LoraLayer]:
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)", name)
            found[int(m[1]), m[2]] = module
    return found


def assert_matches_peft(adapter: LoRAAdapter, model) -> None:
    expected = peft_modules(model)
    order = sorted(expected, key=lambda k: (k[0], LORA_TARGETS.index(k[1])))
    assert [(w.layer, w.module) for w in adapter.modules] == order
    for w in adapter.modules:
        layer = expected[w.layer, w.module]
        assert w.rank == layer.r["default"]
        assert w.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        assert w.lora_a.dtype == w.lora_b.dtype == torch.float32
        assert w.lora_a.is_contiguous() and w.lora_b.is_contiguous()
        assert torch.equal(w.lora_a, layer.lora_A["default"].weight.float())
        assert torch.equal(w.lora_b, layer.lora_B["default"].weight.float())
    assert adapter.nbytes == sum(4 * (w.lora_a.numel() + w.lora_b.numel()) for w in adapter.modules)


def edit_config(directory, **changes) -> None:
    path = directory / CFG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory, edit) -> None:
    tensors = load_file(directory / ST)
    save_file(edit(tensors), directory / ST)


def refused(directory, base, match: str, **kwargs) -> str:
    with pytest.raises(AdapterValidationError, match=match) as info:
        load_adapter(directory, base, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_base_model_shape_from_configs():
    from transformers import MistralConfig, Qwen2Config

    llama = BaseModelShape.from_hf_config(LlamaConfig(**LLAMA))
    assert llama.num_layers == 2
    assert llama.module_shapes == {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
                                   "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    # An explicit head_dim need not equal hidden_size / heads (Mistral-Nemo, Qwen3 style).
    mistral = BaseModelShape.from_hf_config(MistralConfig(**LLAMA, head_dim=32))
    assert mistral.module_shapes["q_proj"] == (64, 128) and mistral.module_shapes["o_proj"] == (128, 64)
    assert mistral.module_shapes["k_proj"] == (64, 64)
    qwen = BaseModelShape.from_hf_config(Qwen2Config(**LLAMA))
    assert qwen.module_shapes == llama.module_shapes


def test_list_targets(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = load_adapter(tmp_path, base)
    assert adapter.name == tmp_path.name and adapter.path == tmp_path
    assert adapter.target_modules == ["q_proj", "v_proj", "down_proj"]
    assert adapter.max_rank == 8 and {w.scale for w in adapter.modules} == {2.0}
    assert adapter.config["peft_type"] == "LORA"
    assert_matches_peft(adapter, model)
    assert load_adapter(tmp_path, base, name="sql").name == "sql"


def test_regex_targets(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=4, target_modules=r".*\.1\.self_attn\.(k|o)_proj")
    adapter = load_adapter(tmp_path, base)
    assert {(w.layer, w.module) for w in adapter.modules} == {(1, "k_proj"), (1, "o_proj")}
    assert_matches_peft(adapter, model)


def test_all_linear(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules="all-linear")
    adapter = load_adapter(tmp_path, base)
    assert adapter.target_modules == list(LORA_TARGETS) and len(adapter.modules) == 14
    assert_matches_peft(adapter, model)
    # PEFT saves the expanded names; a config that kept the shorthand means the same.
    edit_config(tmp_path, target_modules="all-linear")
    assert_matches_peft(load_adapter(tmp_path, base), model)


def test_rank_and_alpha_patterns(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                              rank_pattern={"model.layers.0.self_attn.q_proj": 4, "up_proj": 12},
                              alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3})
    adapter = load_adapter(tmp_path, base)
    ranks = {(w.layer, w.module): w.rank for w in adapter.modules}
    assert ranks[0, "q_proj"] == 4 and ranks[1, "q_proj"] == 8 and ranks[0, "up_proj"] == 12
    assert adapter.max_rank == 12
    assert_matches_peft(adapter, model)


def test_rslora(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj"])
    adapter = load_adapter(tmp_path, base)
    assert adapter.modules[0].scale == pytest.approx(8 / math.sqrt(16))
    assert_matches_peft(adapter, model)


def test_layers_to_transform(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=4, target_modules=["q_proj", "gate_proj"], layers_to_transform=[1])
    adapter = load_adapter(tmp_path, base)
    assert {w.layer for w in adapter.modules} == {1}
    assert_matches_peft(adapter, model)
    # A tensor for a layer the config leaves alone is refused.
    edit_config(tmp_path, layers_to_transform=[0])
    refused(tmp_path, base, r"^weights for model\.layers\.1\.\w+\.\w+_proj do not belong to a module that target_")


def test_bf16_weights_and_fan_in_fan_out(tmp_path, base):
    model = save_peft_adapter(tmp_path, dtype=torch.bfloat16, r=4, target_modules=["k_proj"], fan_in_fan_out=True)
    assert load_file(tmp_path / ST)[f"{PREFIX}model.layers.0.self_attn.k_proj.lora_A.weight"].dtype == torch.bfloat16
    assert_matches_peft(load_adapter(tmp_path, base), model)


def test_key_variants(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=4, target_modules=["v_proj"])
    # No wrapper prefix, and the adapter-name infix of a live PeftModel's state dict.
    edit_tensors(tmp_path, lambda t: {k.removeprefix(PREFIX).replace(".weight", ".default.weight"): v
                                      for k, v in t.items()})
    assert_matches_peft(load_adapter(tmp_path, base), model)


def test_legacy_bin(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=4, target_modules=["q_proj"])
    torch.save(load_file(tmp_path / ST), tmp_path / "adapter_model.bin")
    (tmp_path / ST).unlink()
    assert_matches_peft(load_adapter(tmp_path, base), model)


class _Payload:
    def __reduce__(self):  # what a hostile pickle does; harmless here, and weights_only never calls it
        return (os.getcwd, ())


def test_legacy_bin_with_pickled_code_is_unsafe(tmp_path, base):
    save_peft_adapter(tmp_path, r=4, target_modules=["q_proj"])
    torch.save({**load_file(tmp_path / ST), "payload": _Payload()}, tmp_path / "adapter_model.bin")
    (tmp_path / ST).unlink()
    refused(tmp_path, base, r"^adapter_model\.bin is unsafe: it contains pickled code")


@pytest.fixture
def saved(tmp_path):
    """A valid r=8 adapter on q_proj and v_proj of both layers."""
    save_peft_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return tmp_path


def test_missing_config(saved, base):
    (saved / CFG).unlink()
    refused(saved, base, r"^adapter_config\.json is missing")


def test_invalid_json(saved, base):
    (saved / CFG).write_text('{"r": 8,\n')
    refused(saved, base, r"^adapter_config\.json is not valid JSON: ")


@pytest.mark.parametrize(("changes", "match"), [
    ({"peft_type": "IA3"}, r"^peft_type is 'IA3'; only LORA adapters are supported$"),
    ({"use_dora": True}, r"^DoRA \(use_dora\) is not supported$"),
    ({"bias": "all"}, r"^bias='all' is not supported; only bias='none' is$"),
    ({"modules_to_save": ["lm_head"]}, r"^modules_to_save=\['lm_head'\] is not supported$"),
    ({"target_modules": ["q_proj", "lm_head", "embed_tokens"]},
     r"^unsupported target modules \['embed_tokens', 'lm_head'\]; supported: q_proj, k_proj"),
    ({"r": 16}, r"^model\.layers\.0\.self_attn\.q_proj has rank 8 in its weights, but the config says r=16$"),
    ({"rank_pattern": {"v_proj": 4}},
     r"^model\.layers\.0\.self_attn\.v_proj has rank 8 in its weights, but the config says r=4$"),
    ({"target_modules": ["q_proj"]}, r"^weights for model\.layers\.0\.self_attn\.v_proj do not belong to a module"),
    ({"target_modules": "(q_proj"}, r"^adapter_config\.json holds an invalid regex: "),
])
def test_config_rejections(saved, base, changes, match):
    edit_config(saved, **changes)
    refused(saved, base, match)


def test_rank_above_max_rank(saved, base):
    refused(saved, base, r"^model\.layers\.0\.self_attn\.q_proj has rank 8, above the maximum rank 4$", max_rank=4)


def test_unsupported_target_in_weights(tmp_path, base):
    save_peft_adapter(tmp_path, r=4, target_modules=r".*(q_proj|lm_head)")
    refused(tmp_path, base, r"^unsupported target module lm_head; supported: q_proj, k_proj")


def test_shapes_that_do_not_fit_the_base(saved):
    wider = BaseModelShape.from_hf_config(LlamaConfig(**{**LLAMA, "hidden_size": 128}))
    refused(saved, wider, r"^model\.layers\.0\.self_attn\.q_proj does not fit the base model: "
                          r"expects in=128 out=128, weights have in=64 out=64$")
    shallow = BaseModelShape.from_hf_config(LlamaConfig(**{**LLAMA, "num_hidden_layers": 1}))
    refused(saved, shallow, r"^model\.layers\.1\.self_attn\.q_proj is in layer 1, but the base model has 1 layers$")


def _key(module: str, ab: str) -> str:
    return f"{PREFIX}model.layers.0.self_attn.{module}.lora_{ab}.weight"


def test_ab_rank_mismatch(saved, base):
    edit_tensors(saved, lambda t: {**t, _key("q_proj", "B"): t[_key("q_proj", "B")][:, :4].contiguous()})
    refused(saved, base, r"^model\.layers\.0\.self_attn\.q_proj A/B rank mismatch: lora_A has rank 8, lora_B has 4$")


def test_missing_lora_b(saved, base):
    edit_tensors(saved, lambda t: {k: v for k, v in t.items() if k != _key("v_proj", "B")})
    refused(saved, base, r"^model\.layers\.0\.self_attn\.v_proj has no lora_B weight$")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(saved, base, bad):
    def poison(tensors):
        tensors[_key("v_proj", "A")][3, 5] = bad
        return tensors
    edit_tensors(saved, poison)
    refused(saved, base, r"^model\.layers\.0\.self_attn\.v_proj has non-finite weights \(NaN or inf\)$")


def test_truncated_safetensors(saved, base):
    data = (saved / ST).read_bytes()
    (saved / ST).write_bytes(data[: len(data) // 2])
    refused(saved, base, r"^adapter_model\.safetensors is unreadable or truncated: ")


def test_garbage_safetensors(saved, base):
    (saved / ST).write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8).numpy().tobytes())
    refused(saved, base, r"^adapter_model\.safetensors is unreadable or truncated: ")


def test_no_weights_file(saved, base):
    (saved / ST).unlink()
    refused(saved, base, r"^no weights file: expected adapter_model\.safetensors \(or legacy adapter_model\.bin\)$")


def test_no_lora_tensors(saved, base):
    save_file({"model.embed_tokens.weight": torch.zeros(128, 64)}, saved / ST)
    refused(saved, base, r"^weights file holds no LoRA tensors$")


def test_stray_tensor_beside_lora_tensors(saved, base):
    edit_tensors(saved, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(128, 64)})
    refused(saved, base, r"^weights file holds tensor 'base_model\.model\.lm_head\.weight', which is not a LoRA")


def test_error_is_one_line():
    assert str(AdapterValidationError("bad\n  thing\ttoo")) == "bad thing too"
    assert isinstance(AdapterValidationError("x"), ValueError)


def test_exclude_modules(tmp_path, base):
    model = save_peft_adapter(tmp_path, r=4, target_modules=["q_proj", "v_proj"],
                              exclude_modules=r".*\.0\.self_attn\.q_proj")
    adapter = load_adapter(tmp_path, base)
    assert (0, "q_proj") not in {(w.layer, w.module) for w in adapter.modules} and len(adapter.modules) == 3
    assert_matches_peft(adapter, model)
    edit_config(tmp_path, exclude_modules=["v_proj"])
    refused(tmp_path, base, r"^weights for model\.layers\.0\.self_attn\.v_proj do not belong")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_parsing_on_another_thread_starts_no_openmp_team(tmp_path, dtype):
    """The worker parses adapters on a thread of its own while its engine steps: a torch op there would leave a
    second OpenMP thread team on the cores (and every later step ran 1.5-2x slower on a 2-core CPU)."""
    import threading

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: OpenMP starts no team to detect")
    hidden, rank = 1024, 64  # 64 x 1024 elements: above the size at which torch ops run in parallel
    shape = BaseModelShape.from_hf_config(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                      num_hidden_layers=1, num_attention_heads=8,
                                                      num_key_value_heads=8, vocab_size=128))
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{PREFIX}model.layers.0.self_attn.q_proj.lora_{ab}.weight": torch.randn(dims, generator=gen).to(dtype)
               for ab, dims in (("A", (rank, hidden)), ("B", (hidden, rank)))}
    save_file(tensors, tmp_path / ST)
    (tmp_path / CFG).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16,
                                            "target_modules": ["q_proj"]}))
    (torch.randn(512, 512) @ torch.randn(512, 512)).sum()  # this thread's team exists before counting

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    # counted while the parsing thread lives (an OpenMP team lasts as long as the thread that started it, and the
    # worker parses on pooled threads that live on)
    go, parsed_event, leave, parsed = threading.Event(), threading.Event(), threading.Event(), []

    def parse() -> None:
        go.wait()
        parsed.append(load_adapter(tmp_path, shape))
        parsed_event.set()
        leave.wait()

    worker = threading.Thread(target=parse)
    worker.start()
    before = threads()
    go.set()
    assert parsed_event.wait(30)
    after = threads()
    leave.set()
    worker.join()
    assert after == before
    (w,) = parsed[0].modules
    assert w.lora_a.dtype == w.lora_b.dtype == torch.float32
    assert torch.equal(w.lora_a, tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"].float())
    assert torch.equal(w.lora_b, tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"].float())
