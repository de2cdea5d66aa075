"""Scheduler: continuous batching, chunked prefill, preemption, adapter slots — driven by hand, no model.

`Driver.step()` does what `LLMEngine._postprocess` does with a runner's output: every scheduled sequence has its
fed tokens computed, and those that reached their end get one (fake) sampled token; a sequence finishes after
`max_tokens` generated tokens.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.adapters import LoRAAdapter
from services.gpu_worker.engine.adapter_cache import AdapterCache
from services.gpu_worker.engine.block_manager import BlockManager
from services.gpu_worker.engine.scheduler import ScheduledBatch, Scheduler
from services.gpu_worker.engine.sequence import SamplingParams, Sequence, SequenceStatus

TOKEN = 7  # the fake sampled token


class Driver:
    def __init__(self, num_blocks=64, block_size=4, max_num_seqs=8, budget=32, num_slots=2, adapters=()):
        self.blocks = BlockManager(num_blocks, block_size)
        self.adapters = AdapterCache(num_slots, lambda a: a.name)
        for name in adapters:
            self.adapters.register(LoRAAdapter(name, Path("/fake"), {}, []))
        self.sched = Scheduler(self.blocks, self.adapters, max_num_seqs, budget)
        self.arrival = 0
        self.finished: list[Sequence] = []

    def add(self, rid: str, prompt_len: int, max_tokens: int = 4, adapter: str | None = None) -> Sequence:
        seq = Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), adapter, self.arrival)
        self.arrival += 1
        self.sched.add(seq)
        return seq

    def step(self) -> ScheduledBatch:
        out = self.sched.schedule()
        self.check_invariants(out)
        for seq, n in zip(out.seqs, out.num_tokens):
            seq.num_computed += n
        for seq in out.seqs:
            if seq.num_computed == seq.num_tokens:
                seq.token_ids.append(TOKEN)
                if seq.num_generated >= seq.params.max_tokens:
                    self.sched.finish(seq)
                    self.finished.append(seq)
        return out

    def check_invariants(self, out: ScheduledBatch) -> None:
        assert sum(out.num_tokens) <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        assert len(set(map(id, out.seqs))) == len(out.seqs)
        held = [b for s in self.sched.running for b in s.block_table]
        assert len(held) == len(set(held))  # no block shared
        assert len(held) + self.blocks.num_free == self.blocks.num_blocks  # none leaked
        for seq, n in zip(out.seqs, out.num_tokens):
            assert n >= 1
            assert seq.status == SequenceStatus.RUNNING
            assert len(seq.block_table) * self.blocks.block_size >= seq.num_computed + n  # room for its KV
            assert seq.num_computed + n <= seq.num_tokens
        for seq in self.sched.waiting:
            assert seq.block_table == [] and seq.adapter_slot is None and seq.num_computed == 0

    def run_to_end(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler did not drain")


def scheduled(out: ScheduledBatch) -> dict[str, int]:
    return {s.request_id: n for s, n in zip(out.seqs, out.num_tokens)}


def test_short_prompts_prefill_together_then_decode_one_token_each():
    d = Driver()
    a, b = d.add("a", 5), d.add("b", 3)
    assert scheduled(d.step()) == {"a": 5, "b": 3}
    assert a.num_generated == b.num_generated == 1
    assert scheduled(d.step()) == {"a": 1, "b": 1}
    assert a.num_generated == b.num_generated == 2


def test_token_budget_is_respected_and_fills_in_fcfs_order():
    d = Driver(budget=10)
    for i in range(4):
        d.add(f"r{i}", 4)
    out = d.step()
    assert sum(out.num_tokens) == 10
    assert scheduled(out) == {"r0": 4, "r1": 4, "r2": 2}  # r2's prompt is chunked to the budget's remainder
    assert [s.request_id for s in d.sched.waiting] == ["r3"]
    for _ in range(20):
        assert sum(d.step().num_tokens) <= 10
    d.run_to_end()
    assert sorted(s.request_id for s in d.finished) == ["r0", "r1", "r2", "r3"]


def test_decodes_are_scheduled_before_new_prefills():
    d = Driver(budget=8)
    d.add("a", 3, max_tokens=10)
    d.add("b", 3, max_tokens=10)
    d.step()  # both prefilled
    d.add("c", 20)
    out = d.step()
    assert [s.request_id for s in out.seqs] == ["a", "b", "c"]
    assert scheduled(out) == {"a": 1, "b": 1, "c": 6}  # the new prompt gets what the decodes left


def test_long_prompt_is_chunked_and_chunks_share_steps_with_decodes():
    d = Driver(budget=6)
    a = d.add("a", 2, max_tokens=20)
    d.step()
    long = d.add("long", 17, max_tokens=2)
    chunks = []
    while long.num_generated == 0:
        out = d.step()
        got = scheduled(out)
        assert got["a"] == 1  # the running decode advances every step
        chunks.append(got["long"])
    assert chunks == [5, 5, 5, 2]
    assert sum(chunks) == 17
    assert long.num_computed == 17 and long.num_tokens == 18
    assert scheduled(d.step()) == {"a": 1, "long": 1}  # now a decode too
    assert a.num_generated == 6


def test_prefill_chunk_samples_only_at_the_end_of_the_prompt():
    d = Driver(budget=4)
    s = d.add("s", 10)
    d.step()
    d.step()
    assert s.num_generated == 0 and s.in_prefill
    d.step()
    assert s.num_generated == 1 and not s.in_prefill


def test_max_num_seqs_is_respected():
    d = Driver(max_num_seqs=2, budget=100)
    for i in range(5):
        d.add(f"r{i}", 2, max_tokens=3)
    out = d.step()
    assert [s.request_id for s in out.seqs] == ["r0", "r1"]
    assert len(d.sched.running) == 2 and len(d.sched.waiting) == 3
    for _ in range(2):
        assert len(d.step().seqs) == 2
    # r0 and r1 finished on the last step; the next two are admitted
    out = d.step()
    assert [s.request_id for s in out.seqs] == ["r2", "r3"]
    d.run_to_end()
    assert len(d.finished) == 5


def test_preemption_picks_the_most_recently_admitted_and_resets_it():
    # 4 blocks of 4 tokens: three sequences of 5 tokens take 2 blocks each as they grow
    d = Driver(num_blocks=4, block_size=4, budget=64)
    a = d.add("a", 4, max_tokens=8)
    b = d.add("b", 4, max_tokens=8)
    d.step()  # 1 block each, 5 tokens each now
    c = d.add("c", 4, max_tokens=8)
    d.step()  # a and b decode (2 blocks each): 4 used, c cannot be admitted
    assert c.status == SequenceStatus.WAITING and d.blocks.num_free == 0
    for _ in range(3):
        d.step()  # a, b reach 9 tokens: 8 stored, the 9th needs a third block
    assert a.num_tokens == b.num_tokens == 9
    b_blocks = list(b.block_table)
    b_tokens = list(b.token_ids)
    out = d.step()
    assert out.preempted == [b]  # the most recently admitted running sequence
    assert scheduled(out) == {"a": 1}  # no admission in a step that preempted
    assert b.status == SequenceStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert b.num_preemptions == 1
    assert b.token_ids == b_tokens  # generated tokens are kept and recomputed
    assert set(b_blocks) <= set(a.block_table) | set(d.blocks._free)  # its blocks were freed (one went to a)
    assert list(d.sched.waiting)[:2] == [b, c]  # back at the head of the queue, before later arrivals
    d.run_to_end()
    assert {s.request_id for s in d.finished} == {"a", "b", "c"}
    assert b.generated_ids == [TOKEN] * 8
    assert d.blocks.num_free == d.blocks.num_blocks


def test_a_lone_sequence_that_runs_out_of_blocks_preempts_the_youngest_even_if_that_is_itself():
    d = Driver(num_blocks=2, block_size=4, budget=64)
    old = d.add("old", 7, max_tokens=3)
    young = d.add("young", 1, max_tokens=3)
    out = d.step()  # old takes 2 blocks; young cannot be admitted
    assert scheduled(out) == {"old": 7}
    out = d.step()  # old (8 tokens) decodes into its 2 blocks
    out = d.step()  # old needs a third block; it is the only running sequence: it preempts itself
    assert out.preempted == [old] and out.seqs == []
    assert d.blocks.num_free == 2 and old.num_computed == 0
    assert [s.request_id for s in d.sched.waiting] == ["old", "young"]


def test_sequence_whose_adapter_has_no_slot_is_passed_over_without_blocking_others():
    d = Driver(num_slots=1, adapters=("x", "y"))
    d.add("x1", 3, max_tokens=3, adapter="x")
    d.add("y1", 3, max_tokens=3, adapter="y")
    d.add("base", 3, max_tokens=3)
    d.add("x2", 3, max_tokens=3, adapter="x")
    out = d.step()
    assert [s.request_id for s in out.seqs] == ["x1", "base", "x2"]  # y1 waits for a slot, the rest go on
    assert [s.request_id for s in d.sched.waiting] == ["y1"]
    assert out.seqs[0].adapter_slot == out.seqs[2].adapter_slot == 0 and out.seqs[1].adapter_slot is None
    assert d.adapters.in_use == {"x": 2}
    d.step()
    d.step()  # x1, base, x2 finish: x's slot is released
    assert d.adapters.in_use == {}
    out = d.step()
    assert scheduled(out) == {"y1": 3} and out.seqs[0].adapter_slot == 0
    d.run_to_end()
    assert d.adapters.in_use == {} and d.adapters.pinned == {}


def test_passed_over_sequence_keeps_its_place_at_the_head():
    d = Driver(num_slots=1, adapters=("x", "y"), max_num_seqs=2)
    d.add("x1", 2, max_tokens=2, adapter="x")
    d.add("y1", 2, max_tokens=2, adapter="y")
    d.add("b1", 2, max_tokens=2)
    d.add("b2", 2, max_tokens=2)
    d.step()
    assert [s.request_id for s in d.sched.waiting] == ["y1", "b2"]


def test_finish_frees_blocks_and_adapter_refs_running_or_waiting():
    d = Driver(adapters=("x",), budget=64)
    r = d.add("r", 9, max_tokens=50, adapter="x")
    w = d.add("w", 5, adapter="x")
    d.sched.max_num_seqs = 1
    d.step()
    assert r.status == SequenceStatus.RUNNING and len(r.block_table) == 3
    assert d.adapters.in_use == {"x": 1} and d.adapters.pinned == {"x": 2}
    d.sched.finish(r)
    assert r.status == SequenceStatus.FINISHED and r.block_table == [] and r.adapter_slot is None
    assert d.blocks.num_free == d.blocks.num_blocks
    assert d.adapters.in_use == {} and d.adapters.pinned == {"x": 1}
    assert r not in d.sched.running
    d.sched.finish(r)  # twice: nothing more is released
    assert d.adapters.pinned == {"x": 1}
    d.sched.finish(w)  # a waiting sequence
    assert w not in d.sched.waiting and w.status == SequenceStatus.FINISHED
    assert d.adapters.pinned == {} and not d.sched.has_unfinished()


def test_preemption_releases_the_adapter_slot_and_readmission_reacquires_it():
    d = Driver(num_blocks=2, block_size=4, num_slots=1, adapters=("x",), budget=64)
    s = d.add("s", 7, max_tokens=3, adapter="x")
    d.step()
    d.step()
    out = d.step()
    assert out.preempted == [s]
    assert d.adapters.in_use == {} and s.adapter_slot is None
    assert d.adapters.pinned == {"x": 1}


def test_unloading_an_adapter_lets_its_accepted_requests_finish():
    """Regression: a queued request whose adapter was unloaded made schedule() raise KeyError."""
    d = Driver(num_slots=1, adapters=("x", "y"), max_num_seqs=1)
    d.add("y1", 2, max_tokens=2, adapter="y")
    d.add("x1", 2, max_tokens=2, adapter="x")  # accepted, waiting behind y1
    d.step()
    d.adapters.unregister("x")
    with pytest.raises(KeyError):
        d.add("x2", 2, adapter="x")  # the engine checks is_available first; the scheduler refuses too
    d.run_to_end()
    assert [s.request_id for s in d.finished] == ["y1", "x1"]
    assert d.adapters.in_use == {} and d.adapters.pinned == {} and "x" not in d.adapters.resident


def test_random_workload_drains_and_frees_everything():
    import random

    rng = random.Random(0)
    d = Driver(num_blocks=12, block_size=4, max_num_seqs=4, budget=10, num_slots=2, adapters=("x", "y", "z"))
    seqs = []
    for i in range(40):
        seqs.append(d.add(f"r{i}", rng.randint(1, 20), max_tokens=rng.randint(1, 12),
                          adapter=rng.choice([None, "x", "y", "z"])))
        if rng.random() < 0.5:
            d.step()
    d.run_to_end(max_steps=5000)
    assert len(d.finished) == 40
    assert all(s.num_generated == s.params.max_tokens for s in seqs)
    assert any(s.num_preemptions for s in seqs)  # the small cache forced some
    assert d.blocks.num_free == d.blocks.num_blocks
    assert d.adapters.in_use == {} and d.adapters.pinned == {}
