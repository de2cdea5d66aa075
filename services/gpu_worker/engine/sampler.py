"""Token sampling for one step: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Logprobs are those of the model's own distribution (log-softmax of the raw logits), as OpenAI and vLLM report
them, whatever the sampling settings. Each request with a seed draws from its own generator, so its tokens do not
depend on what else shares the batch.
"""
from __future__ import annotations

import torch

from services.gpu_worker.engine.sequence import SamplingParams, TokenLogprob

# Below this temperature sampling is greedy (as vLLM's _SAMPLING_EPS): dividing by a tinier one overflows the
# logits to inf and the softmax to NaN, which would fail the whole step.
_MIN_TEMPERATURE = 1e-5


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # logits: [V] float32 -> probabilities after temperature, top-k and top-p
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        before = torch.cat([cumulative.new_zeros(1), cumulative[:-1]])  # mass of the more likely tokens
        drop = before >= params.top_p  # keep the smallest prefix reaching top_p (as HF's TopPLogitsWarper)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    # probs: [V] (need not sum to 1), u: [1] uniform in [0, 1) -> [1] token id; never a zero-probability token
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=probs.shape[-1] - 1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # probs: [V] -> [1] token id
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)
    # a seeded request's generator lives on the CPU (Sequence): torch.multinomial refuses it for CUDA probs, so draw
    # the uniform on the CPU (no host sync) and pick on the device
    u = torch.rand(1, generator=generator).to(probs.device, non_blocking=True)
    return _inverse_cdf(probs, u)


def sample(
    logits: torch.Tensor,  # [S, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row; return the ids and, for rows that asked, their logprobs."""
    greedy = torch.argmax(logits, dim=-1)
    chosen = greedy.clone()
    for row, p in enumerate(params):
        if p.temperature >= _MIN_TEMPERATURE:
            probs = _filtered_probs(logits[row], p)
            chosen[row] = _draw(probs, generators[row]).squeeze(0)
    ids = chosen.tolist()
    logprob_rows = [row for row, p in enumerate(params) if p.logprobs]
    out: list[TokenLogprob | None] = [None] * len(params)
    if logprob_rows:
        rows = torch.tensor(logprob_rows)
        lp = torch.log_softmax(logits[rows], dim=-1)
        chosen_lp = lp.gather(1, chosen[rows].unsqueeze(1)).squeeze(1).tolist()
        k = max(params[r].top_logprobs for r in logprob_rows)
        top_vals, top_ids = (lp.topk(k, dim=-1) if k else (None, None))
        for j, row in enumerate(logprob_rows):
            top: list[tuple[int, float]] = []
            n = params[row].top_logprobs
            if n:
                top = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()))
            out[row] = TokenLogprob(ids[row], chosen_lp[j], top)
    return ids, out
