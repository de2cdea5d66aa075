"""The correctness oracle: greedy generation with HF transformers (+ PEFT for adapters) on the same weights."""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs (log-softmax of the raw logits), stopping at EOS like the engine.

    With no eos_ids it never stops early (the engine's ignore_eos): an id past the vocabulary stands in for EOS.
    """
    stop = sorted(eos_ids) or [model.config.vocab_size]
    out = model.generate(
        torch.tensor([prompt_ids], device=model.device),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=stop,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, tokens)]
    return tokens, logprobs


@torch.no_grad()
def teacher_forced_log_softmax(model, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-softmax (float32, on the CPU) over the vocabulary at each of `tokens`, fed after `prompt_ids` (then each
    other) in one forward pass of an HF model: row i is the distribution tokens[i] was chosen from."""
    logits = model(torch.tensor([prompt_ids + tokens], device=model.device)).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).cpu()
