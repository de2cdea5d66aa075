"""`ModelRunner`: owns the model, the KV cache tensors and the adapter slots' weights; runs one step.

`run(batch)` lays the scheduled sequences out as a `ForwardBatch` (grouped by adapter slot), runs the forward
pass and samples one token for each sequence whose fed tokens reach its end. The only host sync of a step is the
`.tolist()` of the sampled ids (and of logprobs when asked). Decode-only steps go through `decode_graphs` when the
engine set it (decode_graphs.py: CUDA graphs over static buffers).
"""
from __future__ import annotations

import torch

from services.gpu_worker.engine.forward_batch import ForwardBatch, PagedAttentionInfo, PrefillSeqInfo
from services.gpu_worker.engine.sampler import sample
from services.gpu_worker.engine.scheduler import ScheduledBatch
from services.gpu_worker.engine.sequence import Sequence, TokenLogprob
from services.gpu_worker.lora.batch_info import LoRABatchInfo
from services.gpu_worker.lora.slot_weights import SlotWeights
from services.gpu_worker.model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, lora_slots: list[SlotWeights | None]):
        self.model = model
        self.block_size = block_size
        self.device = model.device
        # one block more than the BlockManager hands out: the scratch block, where the padding rows of a decode
        # graph's batch write their k/v (decode_graphs.py); no sequence ever owns it
        self.scratch_block = num_blocks
        shape = (model.num_layers, (num_blocks + 1) * block_size, model.num_kv_heads, model.head_dim)
        self.k_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.lora_slots = lora_slots  # shared with the AdapterCache, which fills and empties the slots
        self.paged = model.attention_backend == "triton"  # block tables for the kernels, not padded slot lists
        self.decode_graphs = None  # a DecodeGraphs, set by the engine when config.cuda_graphs is on

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _context_slots(self, tables: list[list[int]], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slots of each context, padded to the longest ([B, L]), and the mask of real ones ([B, L])."""
        bs = self.block_size
        width = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), width, dtype=torch.long)
        for r, t in enumerate(tables):
            padded[r, : len(t)] = torch.tensor(t, dtype=torch.long)
        slots = (padded[:, :, None] * bs + torch.arange(bs)).view(len(tables), -1)
        longest = max(lengths)
        mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        return slots[:, :longest], mask

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        """[S, max_blocks] int32 on the device: each sequence's blocks, padded with 0 (never read: past its length).

        max_blocks is rounded up to a multiple of 16: a row stride of 1, or of a multiple of 16, would each make
        Triton compile the attention kernels anew (it specializes on both), so steps would not share one variant."""
        padded = torch.zeros(len(tables), -(-max(len(t) for t in tables) // 16) * 16, dtype=torch.int32)
        for r, t in enumerate(tables):
            padded[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return padded.to(self.device)

    def _int32(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(self.device)

    def prepare(self, sched: ScheduledBatch) -> tuple[ForwardBatch, list[int]]:
        """Build the step's ForwardBatch; also return the indices (into sched.seqs) of the sequences that sample."""
        order = sorted(range(len(sched.seqs)), key=lambda j: -1 if sched.seqs[j].adapter_slot is None else sched.seqs[j].adapter_slot)
        ids, positions, slots, logits_idx, samplers = [], [], [], [], []
        prefills: list[PrefillSeqInfo] = []
        decode_idx, decode_tables, decode_lens = [], [], []
        prefill_tables: list[list[int]] = []
        segments: list[tuple[int, int, int]] = []
        for j in order:
            seq, n = sched.seqs[j], sched.num_tokens[j]
            start, ctx = len(ids), seq.num_computed
            ids.extend(seq.token_ids[ctx : ctx + n])
            positions.extend(range(ctx, ctx + n))
            slots.extend(self._slots(seq, ctx, ctx + n))
            if n == 1 and ctx > 0:
                decode_idx.append(start)
                decode_tables.append(seq.block_table)
                decode_lens.append(ctx + 1)
            else:
                ctx_slots = mask = None
                if self.paged:
                    prefill_tables.append(seq.block_table)
                elif ctx:
                    ctx_slots = self._context_slots([seq.block_table], [ctx + n])[0][0].to(self.device)
                    mask = torch.ones(n, ctx + n, dtype=torch.bool, device=self.device).tril(ctx)
                prefills.append(PrefillSeqInfo(start, n, ctx, ctx_slots, mask))
            if ctx + n == seq.num_tokens:
                logits_idx.append(start + n - 1)
                samplers.append(j)
            if seq.adapter_slot is not None:
                if segments and segments[-1][0] == seq.adapter_slot:
                    segments[-1] = (seq.adapter_slot, segments[-1][1], start + n)
                else:
                    segments.append((seq.adapter_slot, start, start + n))
        dev = self.device
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            logits_indices=torch.tensor(logits_idx, device=dev, dtype=torch.long),
            prefills=prefills,
            lora=LoRABatchInfo(segments) if segments else None,
        )
        if batch.lora is not None:  # the LoRA backend's kernel metadata: once per step, not per layer
            self.model.lora_backend.prepare(batch.lora, self.lora_slots,
                                            prefill_ranges=[(p.start, p.start + p.length) for p in prefills])
        bs = self.block_size
        if prefills and self.paged:
            batch.paged_prefill = PagedAttentionInfo(
                bs, self._block_tables(prefill_tables), self._int32([p.context for p in prefills]),
                self._int32([p.start for p in prefills]), self._int32([p.length for p in prefills]),
                max(p.length for p in prefills),
            )
        if decode_idx and self.paged:
            batch.decode_token_indices = torch.tensor(decode_idx, device=dev)
            batch.paged_decode = PagedAttentionInfo(bs, self._block_tables(decode_tables), self._int32(decode_lens))
        elif decode_idx:
            slots_, mask = self._context_slots(decode_tables, decode_lens)
            batch.decode_token_indices = torch.tensor(decode_idx, device=dev)
            batch.decode_slots = slots_.to(dev)
            batch.decode_mask = mask[:, None, None, :].to(dev)
        return batch, samplers

    def run(self, sched: ScheduledBatch) -> dict[int, tuple[int, TokenLogprob | None]]:
        """Run one step; return {index into sched.seqs: (sampled token id, its logprob info)}."""
        bucket = None if self.decode_graphs is None else self.decode_graphs.bucket_for(sched)
        if bucket is not None:  # decodes only: every sequence samples, in sched order
            logits = self.decode_graphs.run(sched, bucket)
            samplers = list(range(len(sched.seqs)))
        else:
            batch, samplers = self.prepare(sched)
            logits = self.model.forward(batch, self.k_cache, self.v_cache, self.lora_slots)
            if not samplers:
                return {}
        seqs = [sched.seqs[j] for j in samplers]
        ids, logprobs = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return {j: (ids[r], logprobs[r]) for r, j in enumerate(samplers)}
