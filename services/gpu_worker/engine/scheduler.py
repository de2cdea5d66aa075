"""Continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest first: a decode
costs one token, an unfinished prefill takes a chunk of what is left of the budget. Then waiting sequences are
admitted (FCFS; one whose adapter cannot get a slot yet is passed over) while budget, sequence slots and KV blocks
last. When a running sequence needs a KV block and none is free, the running sequence that arrived last is
preempted: its blocks are freed, and it will recompute its prompt and generated tokens when admitted again.

A sequence's work is uniform: it feeds `token_ids[num_computed:]`; when the fed tokens reach its end, a token is
sampled and appended. A decode is just a sequence with one token left to feed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.gpu_worker.engine.adapter_cache import AdapterCache
from services.gpu_worker.engine.block_manager import BlockManager
from services.gpu_worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The scheduler's decision for one step."""

    seqs: list[Sequence] = field(default_factory=list)  # sequences that run this step
    num_tokens: list[int] = field(default_factory=list)  # tokens each feeds this step
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting this step

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, blocks: BlockManager, adapters: AdapterCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.adapters.pin(seq.adapter)  # keeps the adapter's weights until seq finishes, even if unloaded
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        running = sorted(self.running, key=lambda s: s.arrival)
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
                victim = running.pop()  # the latest arrival (fair FCFS)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_computed + n)
                out.seqs.append(seq)
                out.num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: it was the last one
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: ScheduledBatch, budget: int) -> None:
        passed_over: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.adapter is not None:
                slot = self.adapters.acquire(seq.adapter)
                if slot is None:  # every slot is held by adapters in use
                    passed_over.append(seq)
                    continue
                seq.adapter_slot = slot
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
                self._release_adapter(seq)
                self.waiting.appendleft(seq)
                break
            self.blocks.grow(seq.block_table, seq.num_computed + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(passed_over))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        self._release_adapter(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Free everything `seq` holds; it may be running or waiting. A second call does nothing."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        self._release_adapter(seq)
        if seq.adapter is not None:
            self.adapters.unpin(seq.adapter)
        seq.status = SequenceStatus.FINISHED

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot is not None:
            self.adapters.release(seq.adapter)
            seq.adapter_slot = None
