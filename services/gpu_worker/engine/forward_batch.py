"""`ForwardBatch`: one step's flattened tokens and attention metadata as device tensors.

Built once per step from the scheduler's output and shared by every layer (the per-step context of STYLE.md):
the model reads it, never module globals. Sequences are laid out grouped by adapter slot so every adapter's
tokens form one contiguous range of the flat batch (the LoRA backend then works on views, not gathers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.gpu_worker.lora.batch_info import LoRABatchInfo


@dataclass
class PrefillSeqInfo:
    """Attention metadata of one sequence that feeds more than one token this step (a prefill chunk)."""

    start: int  # first index of its tokens in the flat batch
    length: int  # tokens fed this step
    context: int  # tokens already in the KV cache before this step
    # torch attention backend only (None under triton, which reads `ForwardBatch.paged_prefill`):
    slots: torch.Tensor | None  # [context + length] cache slots of the whole context; None when context == 0
    mask: torch.Tensor | None  # [length, context + length] bool: query j sees keys 0 .. context + j; None likewise


@dataclass
class PagedAttentionInfo:
    """Block-table metadata of the triton attention backend, for a step's decodes or for its prefill chunks.

    The kernels read the cache through the tables (services/gpu_worker/attention/triton_paged_attention.py).
    """

    block_size: int
    block_tables: torch.Tensor  # [S, max_blocks] int32 cache blocks of each sequence in position order (0-padded)
    context_lens: torch.Tensor  # [S] int32 decode: keys its query sees (itself included); prefill: cached before
    query_start: torch.Tensor | None = None  # [S] int32 prefill only: flat index of each chunk's first token
    query_lens: torch.Tensor | None = None  # [S] int32 prefill only: tokens of each chunk
    max_query_len: int = 1  # prefill only: the longest chunk, on the host (the kernel grid needs no device sync)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] token ids, flattened over sequences
    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] KV cache slot each token's k/v is written to
    logits_indices: torch.Tensor  # [S] flat index of each sequence's last token, for those that sample
    prefills: list[PrefillSeqInfo] = field(default_factory=list)
    decode_token_indices: torch.Tensor | None = None  # [B] flat indices of single-token (decode) sequences
    decode_slots: torch.Tensor | None = None  # [B, L] cache slots of each decode sequence's context (padded)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] bool: True where the slot belongs to the context
    # triton backend only (the torch backend uses the slots and masks above, and these stay None):
    paged_decode: PagedAttentionInfo | None = None  # block tables of the decodes (rows: decode_token_indices)
    paged_prefill: PagedAttentionInfo | None = None  # block tables of the prefill chunks (the order of `prefills`)
    lora: LoRABatchInfo | None = None  # adapter token ranges; None when no token uses an adapter

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
