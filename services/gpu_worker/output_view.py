"""What a client sees of an engine output's logprobs: token texts, with the hidden stop token left out."""
from __future__ import annotations

from services.gpu_worker.engine.sequence import FinishReason, RequestOutput, SamplingParams
from shared.openai_protocol import LogprobItem


def visible_logprobs(engine, params: SamplingParams, out: RequestOutput) -> list[LogprobItem]:
    """`out`'s logprobs as LogprobItems. EOS or a stop token id that ended the request is not part of the answer's
    text, so (as OpenAI does) not of its logprobs either."""
    items = out.logprobs or []
    if items and out.finish_reason == FinishReason.STOP:
        hidden = set(engine.tokenizer.all_special_ids) | set(params.stop_token_ids)
        if items[-1].token_id in hidden:
            items = items[:-1]
    return [
        LogprobItem(engine.token_text(lp.token_id), lp.logprob, [(engine.token_text(t), v) for t, v in lp.top])
        for lp in items
    ]
