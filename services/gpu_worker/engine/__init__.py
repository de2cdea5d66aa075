"""The synchronous engine core.

Batch stages, owner and device:
- `Sequence` (sequence.py, CPU): one request's state, tokens and sampling parameters.
- `ScheduledBatch` (scheduler.py, CPU): which sequences run this step and how many tokens each (prefill chunks
  and decodes share a step under a token budget).
- `ForwardBatch` (forward_batch.py, device): the flattened token batch and attention/KV metadata as tensors.
- `LoRABatchInfo` (lora/batch_info.py, device): per-adapter token groups for the LoRA backend.
"""
from services.gpu_worker.engine.sequence import FinishReason, RequestOutput, SamplingParams, TokenLogprob

__all__ = ["FinishReason", "RequestOutput", "SamplingParams", "TokenLogprob"]
