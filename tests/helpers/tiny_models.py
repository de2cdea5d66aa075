"""Tiny random Llama models saved as HF directories, with the embedded default's tokenizer copied in (the engine
loads one; tests give prompts as token ids below the tiny vocabulary)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def copy_tokenizer(default_model_path, out_dir) -> None:
    for f in TOKENIZER_FILES:
        if (Path(default_model_path) / f).is_file():
            shutil.copy(Path(default_model_path) / f, Path(out_dir) / f)


def save_tiny_llama(out_dir, default_model_path, seed: int = 0, **config):
    """Save a random LlamaForCausalLM (float32, eval) built from LlamaConfig(**config) plus the default tokenizer
    into out_dir; returns the model (e.g. to make PEFT adapters for it). initializer_range defaults to 0.15: HF's
    0.02 gives near-uniform logits, so greedy choices would be decided by ties."""
    import transformers

    config = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.15, **config}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config),
                                                          dtype=torch.float32).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(default_model_path, out_dir)
    return model


# A tiny GQA Llama for the Triton backend tests (the interpreter is slow): hidden 48, odd intermediate 72, 2 layers,
# 4 query heads over 2 kv heads, a 512-token vocabulary.
TINY_GQA = dict(vocab_size=512, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)


def save_tiny_gqa_llama(out_dir, default_model_path, **overrides):
    """save_tiny_llama with the TINY_GQA configuration (entries of `overrides` replace its)."""
    return save_tiny_llama(out_dir, default_model_path, **{**TINY_GQA, **overrides})

