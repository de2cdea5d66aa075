"""Validate and load PEFT LoRA adapter directories for Llama-style base models (Llama, Mistral, Qwen2).

The engine and the adapter store share this module so that an adapter is judged the same way everywhere. It
refuses anything whose forward pass would differ from plain PEFT LoRA (`y += scale * B @ A @ x` on the seven
linear projections of each decoder layer), and anything that does not fit the base model, with a one-line reason.

Targeting, rank/alpha patterns and scaling follow peft 0.21: `check_target_module_exists`
(peft/tuners/tuners_utils.py), `get_pattern_key` (peft/utils/other.py) and `LoraLayer.update_layer`
(peft/tuners/lora/layer.py), applied to module names as PEFT sees them on the base model, e.g.
`model.layers.0.self_attn.q_proj`.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# PEFT saves keys as `base_model.model.<module>.lora_A.weight`; the adapter-name infix (`lora_A.default.weight`)
# appears in state dicts taken from a live PeftModel, so accept both, with or without the wrapper prefix.
_TENSOR_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
_MODULE_NAME = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<short>\w+)")

# LoraConfig options that change the forward pass or add weights the engine does not apply; each is refused when
# set to anything truthy. Init-only options (loftq, eva, corda, lora_ga, init_lora_weights) need no support.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}


class AdapterValidationError(ValueError):
    """Why an adapter is refused, as ONE line of text (str(err) is shown to users)."""

    def __init__(self, reason: str):
        # Reasons sometimes quote library errors that span lines; users get a single line.
        super().__init__(" ".join(str(reason).split()))


@dataclass(frozen=True)
class BaseModelShape:
    """What an adapter must fit: the number of decoder layers and the (in, out) features of each LoRA target."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # short name -> (in_features, out_features), for all LORA_TARGETS

    @classmethod
    def from_hf_config(cls, config) -> BaseModelShape:
        """Shapes of a transformers Llama/Mistral/Qwen2 config; head_dim is explicit or hidden_size / heads."""
        hidden, inter = config.hidden_size, config.intermediate_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        q_out, kv_out = heads * head_dim, kv_heads * head_dim
        return cls(
            num_layers=config.num_hidden_layers,
            module_shapes={
                "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
                "o_proj": (q_out, hidden),
                "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
            },
        )

    def fingerprint(self) -> str:
        """A short digest of the shapes an adapter must fit: two bases with one fingerprint take the same adapters."""
        canonical = json.dumps({"num_layers": self.num_layers, "modules": sorted(self.module_shapes.items())})
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class LoRAModuleWeights:
    """One adapted linear layer: delta(x) = scale * lora_b @ lora_a @ x."""

    layer: int  # decoder layer index
    module: str  # one of LORA_TARGETS
    lora_a: torch.Tensor  # [r, in_features], float32, contiguous
    lora_b: torch.Tensor  # [out_features, r], float32, contiguous
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class LoRAAdapter:
    """A validated adapter, its weights in float32 on the CPU."""

    name: str
    path: Path
    config: dict  # parsed adapter_config.json
    modules: list[LoRAModuleWeights]  # sorted by (layer, LORA_TARGETS order); never empty

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)

    @property
    def target_modules(self) -> list[str]:
        """Short names of the adapted modules, in LORA_TARGETS order."""
        present = {m.module for m in self.modules}
        return [t for t in LORA_TARGETS if t in present]

    @property
    def nbytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in self.modules)


def load_adapter(path: str | Path, base: BaseModelShape, max_rank: int = 256, name: str | None = None) -> LoRAAdapter:
    """Validate and load a PEFT LoRA adapter directory; raise AdapterValidationError with a one-line reason.

    `name` defaults to the directory name. Weights stored as fp16/bf16/fp32 are returned as float32.
    """
    path = Path(path)
    config = _read_config(path)
    tensors = _read_tensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, tensor in tensors.items():
        m = _TENSOR_KEY.fullmatch(key)
        if m is None:
            others.append(key)
            continue
        pair = pairs.setdefault(m["module"], {})
        if m["ab"] in pair:
            raise AdapterValidationError(f"weights file holds more than one lora_{m['ab']} for {m['module']}")
        pair[m["ab"]] = tensor
    if not pairs:
        raise AdapterValidationError("weights file holds no LoRA tensors")
    try:
        modules = [_module_weights(module, pair, config, base, max_rank) for module, pair in pairs.items()]
    except re.error as e:  # from target_modules, exclude_modules, layers_pattern or a rank/alpha pattern
        raise AdapterValidationError(f"{CONFIG_FILE} holds an invalid regex: {e}") from None
    # Checked after the LoRA tensors: an adapter on lm_head also saves lm_head's base weight, and "unsupported
    # target module lm_head" says more than "stray tensor".
    if others:
        raise AdapterValidationError(f"weights file holds tensor {others[0]!r}, which is not a LoRA A/B weight")
    modules.sort(key=lambda w: (w.layer, LORA_TARGETS.index(w.module)))
    return LoRAAdapter(name=name or path.name, path=path, config=config, modules=modules)


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterValidationError(f"{CONFIG_FILE} is missing in {path.name}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterValidationError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{CONFIG_FILE} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterValidationError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for option, label in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterValidationError(f"{label} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(f"bias={config['bias']!r} is not supported; only bias='none' is")
    if config.get("modules_to_save"):
        raise AdapterValidationError(f"modules_to_save={config['modules_to_save']} is not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterValidationError(f"r={r!r} is not a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterValidationError(f"lora_alpha={alpha!r} is not a number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterValidationError(f"{key} is not a JSON object")
    targets = config.get("target_modules")
    if not targets:
        raise AdapterValidationError("target_modules is not set")
    if not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
        raise AdapterValidationError("target_modules is neither a string nor a list of strings")
    # A regex or "all-linear" cannot be checked here; each tensor's module is checked when the weights load.
    if isinstance(targets, list):
        unsupported = sorted({t for t in targets if t.rsplit(".", 1)[-1] not in LORA_TARGETS})
        if unsupported:
            raise AdapterValidationError(
                f"unsupported target modules {unsupported}; supported: {', '.join(LORA_TARGETS)}")
    # fan_in_fan_out is accepted: for nn.Linear targets PEFT resets it to False (with a warning) and stores
    # lora_A as [r, in] and lora_B as [out, r] either way, so it never changes the forward pass here.
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    # PEFT prefers safetensors when both files exist, and so do we.
    st_path, bin_path = path / SAFETENSORS_FILE, path / BIN_FILE
    if st_path.is_file():
        try:
            return load_file(st_path)
        except Exception as e:  # SafetensorError, OSError, ... depending on how the file is broken
            raise AdapterValidationError(f"{SAFETENSORS_FILE} is unreadable or truncated: {e}") from None
    if bin_path.is_file():
        try:
            # weights_only refuses pickled code, so a hostile .bin cannot run anything here.
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise AdapterValidationError(
                f"{BIN_FILE} is unsafe: it contains pickled code, not just tensors; re-save it as safetensors"
            ) from None
        except Exception as e:
            raise AdapterValidationError(f"{BIN_FILE} is unreadable or truncated: {e}") from None
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise AdapterValidationError(f"{BIN_FILE} is not a state dict of named tensors")
        return tensors
    raise AdapterValidationError(f"no weights file: expected {SAFETENSORS_FILE} (or legacy {BIN_FILE})")


def _is_targeted(config: dict, key: str) -> bool:
    """PEFT's check_target_module_exists for a LoraConfig given as a dict."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = config["target_modules"]
    # PEFT expands "all-linear" into the set of linear layer names before saving; older saves may keep the string.
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = list(LORA_TARGETS)
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match["idx"])
    return idx == layers if isinstance(layers, int) else idx in layers


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key + dict lookup: the first pattern matching a dotted suffix of `key` wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _float32(t: torch.Tensor, module: str) -> torch.Tensor:
    """`t` as a contiguous float32 tensor, converted by numpy rather than by a torch op: a torch op of this size
    runs OpenMP-parallel, and run on a thread other than the engine's it starts a second OpenMP thread team, which
    made every later engine step 1.5-2x slower on a 2-core CPU. With no torch op, a worker can parse adapters on a
    thread of their own while its engine steps (services/gpu_worker/service.py)."""
    try:
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits are the high half of a float32's
            bits = np.ascontiguousarray(t.view(torch.int16).numpy()).view(np.uint16)
            array = (bits.astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.ascontiguousarray(t.numpy(), dtype=np.float32)
    except TypeError:  # a dtype numpy cannot hold (float8, ...)
        raise AdapterValidationError(f"{module} has weights of dtype {t.dtype}, which is not supported") from None
    return torch.from_numpy(array)


def _module_weights(module: str, pair: dict[str, torch.Tensor], config: dict, base: BaseModelShape,
                    max_rank: int) -> LoRAModuleWeights:
    m = _MODULE_NAME.fullmatch(module)
    if m is None or m["short"] not in LORA_TARGETS or _PARENT[m["short"]] != m["parent"]:
        raise AdapterValidationError(
            f"unsupported target module {module}; supported: {', '.join(LORA_TARGETS)} in model.layers.N")
    layer, short = int(m["layer"]), m["short"]
    if not _is_targeted(config, module):
        raise AdapterValidationError(f"weights for {module} do not belong to a module that target_modules selects")
    if layer >= base.num_layers:
        raise AdapterValidationError(
            f"{module} is in layer {layer}, but the base model has {base.num_layers} layers")
    for ab in "AB":
        if ab not in pair:
            raise AdapterValidationError(f"{module} has no lora_{ab} weight")
    a, b = pair["A"], pair["B"]
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterValidationError(f"{module} LoRA weights are not matrices: A {tuple(a.shape)}, B {tuple(b.shape)}")
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise AdapterValidationError(f"{module} A/B rank mismatch: lora_A has rank {rank}, lora_B has {b.shape[1]}")
    in_features, out_features = base.module_shapes[short]
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise AdapterValidationError(
            f"{module} does not fit the base model: expects in={in_features} out={out_features}, "
            f"weights have in={a.shape[1]} out={b.shape[0]}")
    expected = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if rank != expected:
        raise AdapterValidationError(f"{module} has rank {rank} in its weights, but the config says r={expected}")
    if rank > max_rank:
        raise AdapterValidationError(f"{module} has rank {rank}, above the maximum rank {max_rank}")
    a, b = _float32(a, module), _float32(b, module)
    if not (np.isfinite(a.numpy()).all() and np.isfinite(b.numpy()).all()):
        raise AdapterValidationError(f"{module} has non-finite weights (NaN or inf)")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAModuleWeights(layer=layer, module=short, lora_a=a, lora_b=b, scale=scale)
