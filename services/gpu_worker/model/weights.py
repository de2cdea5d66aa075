"""Read a Llama-family HF directory (config + safetensors) into plain tensors, fusing q/k/v and gate/up."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose tables are fixed per position (see rope.py); "dynamic" and "longrope" change with the length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The model is not a Llama-family architecture we run; the message is one line."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_out + 2 * kv_out, hidden]: q, k, v stacked on the output axis (the four projections
    # are prepacked, opaque oneDNN tensors on a CPU in float32: see model/linear.py)
    qkv_bias: torch.Tensor | None  # [q_out + 2 * kv_out] (Qwen2)
    o: torch.Tensor  # [hidden, q_out]
    o_bias: torch.Tensor | None  # [hidden] (Llama with attention_bias: o_proj has a bias too; Qwen2 has none)
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate then up
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("models with mlp_bias are not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor) are not supported")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError("sliding-window attention (use_sliding_window) is not supported")


def _tensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} holds no .safetensors weights")
    return files


def load_weights(model_dir: Path, config, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """Load and fuse the weights of a Llama-family model directory."""
    check_supported(config)
    raw: dict[str, torch.Tensor] = {}
    for path in _tensor_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                raw[key.removeprefix("model.") if key.startswith("model.") else key] = f.get_tensor(key)

    def take(key: str) -> torch.Tensor:
        if key not in raw:
            raise UnsupportedModelError(f"weight {key!r} is missing from {model_dir}")
        return raw.pop(key).to(device=device, dtype=dtype)

    # As transformers: Qwen2 has q/k/v biases only; Llama with attention_bias has q/k/v *and* o_proj biases;
    # Mistral has none (its modelling code ignores attention_bias).
    llama_bias = config.model_type == "llama" and bool(getattr(config, "attention_bias", False))
    qkv_bias = llama_bias or config.model_type == "qwen2"
    o_bias = llama_bias
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        qkv = torch.cat([take(p + f"self_attn.{m}_proj.weight") for m in "qkv"]).contiguous()
        bias = None
        if qkv_bias:
            bias = torch.cat([take(p + f"self_attn.{m}_proj.bias") for m in "qkv"]).contiguous()
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=qkv,
                qkv_bias=bias,
                o=take(p + "self_attn.o_proj.weight"),
                o_bias=take(p + "self_attn.o_proj.bias") if o_bias else None,
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]).contiguous(),
                down=take(p + "mlp.down_proj.weight"),
            )
        )
    embed = take("embed_tokens.weight")
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        raw.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
    lm_head = embed if tied else take("lm_head.weight")
    norm = take("norm.weight")
    # Weights we would not use mean an architecture we do not run (e.g. a bias the config does not announce):
    # refuse rather than silently compute something else. Old checkpoints carry RoPE buffers: those are ignored.
    unused = sorted(k for k in raw if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        raise UnsupportedModelError(f"{model_dir} holds weights this engine does not use: {shown}")
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)
