"""The adapters of the engine's PEFT parity suites (float32 and bfloat16), one of every shape we claim to support,
and the oracle model (HF transformers + PEFT) holding them."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from helpers.lora_factory import make_random_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "r1-qv": dict(r=1, target_modules=["q_proj", "v_proj"]),
    "r7-all-linear": dict(r=7, target_modules="all-linear"),
    "r8-attention": dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r64-mlp": dict(r=64, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r256-qv": dict(r=256, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL),
    "patterns-regex": dict(
        r=8,
        target_modules=r".*\.(q_proj|v_proj|up_proj)",
        rank_pattern={"layers.1.self_attn.q_proj": 4, "up_proj": 12},
        alpha_pattern={"v_proj": 3, "layers.2.mlp.up_proj": 40},
    ),
    "fan-in-fan-out-layers": dict(r=4, target_modules=["o_proj", "down_proj"], fan_in_fan_out=True,
                                  layers_to_transform=[0, 5, 29]),
}


def make_adapters(hf_base, root: Path, strength: dict[str, float] | None = None) -> dict[str, Path]:
    """Every adapter of ADAPTERS saved under root (name -> directory), seeded by its position.

    B is drawn with standard deviation 0.3 / sqrt(r) (the delta's size then hardly depends on the rank), times
    strength[name] where given."""
    strength = strength or {}
    return {
        name: make_random_adapter(hf_base, root / name, seed=i, b_std=strength.get(name, 1.0) * 0.3 / spec["r"] ** 0.5,
                                  **spec)
        for i, (name, spec) in enumerate(ADAPTERS.items())
    }


def load_peft_model(model_path, adapter_dirs: dict[str, Path], dtype: torch.dtype = torch.float32,
                    device: str = "cpu"):
    """One PeftModel holding every adapter of adapter_dirs, on its own copy of the base weights in `dtype`.

    The adapter weights get `dtype` too (PEFT would otherwise keep them in float32 over a reduced-precision base), as
    the engine casts them to its own dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0],
                                      autocast_adapter_dtype=False)
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name, autocast_adapter_dtype=False)
    return model.eval()


@contextmanager
def adapter_selected(peft_model, adapter: str | None):
    """Run peft_model with `adapter` active, or with none (the base model) for None."""
    if adapter is None:
        with peft_model.disable_adapter():
            yield peft_model
    else:
        peft_model.set_adapter(adapter)
        yield peft_model
