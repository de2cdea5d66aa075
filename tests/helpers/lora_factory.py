"""Random PEFT LoRA adapters for tests and benchmarks, made by PEFT itself so its key names and config are real."""
from __future__ import annotations

from pathlib import Path

import torch


def make_random_adapter(base_model, out_dir: Path, seed: int, b_std: float = 0.02, **lora_kwargs) -> Path:
    """Save a LoRA adapter with random A and B for `base_model` (an HF model, left unchanged) into out_dir.

    lora_kwargs go to peft.LoraConfig (r, lora_alpha, target_modules, use_rslora, rank_pattern, ...).
    PEFT initialises B to zero; a random B makes the adapter change the model's outputs.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("lora_alpha", 2 * lora_kwargs.get("r", 8))
    peft_model = get_peft_model(base_model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(out_dir)
    peft_model.unload()  # restores the base model's modules in place
    (Path(out_dir) / "README.md").unlink(missing_ok=True)
    return Path(out_dir)
