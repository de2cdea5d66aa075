"""CUDA graphs of decode-only steps: the whole forward pass of a decode step replayed as one graph launch.

A decode step of a 7B model is a few milliseconds of memory traffic, but launching it costs the host ~300 Triton
launches, ~130 GEMMs and a few dozen torch ops (bench/launch_overhead.py: `decode_step_host`), about as long. A
captured graph replays all of them for the price of one launch, so the host no longer sets the pace.

A graph replays fixed kernels over fixed addresses, so a decode step runs through static buffers, one set sized for
the largest batch and viewed per *bucket* (batch sizes 1, 2, 4, 8, then multiples of 8 up to max_num_seqs; a step
of n sequences runs in the smallest bucket >= n, its extra rows padding):
  input_ids, positions, slot_mapping [B]     a padding row reads token 0 at position 0 and writes its k/v to a
                                             scratch block past the engine's KV blocks (ModelRunner keeps one)
  block_tables [B, max_blocks], context_lens a padding row attends to the one scratch slot
  lora entries [B]                           per-token LoRA launches whatever the batch (-1: base only, padding),
                                             the grids sized for the pool's largest stacked rank of each group (the
                                             kernels' programs past a token's own rank exit at once)
  logits_indices = 0 .. B-1                  every row samples; the padding rows' logits are dropped
A step's metadata goes into the buffers (one host-to-device copy per buffer), then the bucket's graph replays.
Nothing in the forward pass reads the device on the host, and every shape is the bucket's: what capture needs.

`capture=False` runs the same static path eagerly (no graph): how the tests check it on a CPU, in the Triton
interpreter, against ModelRunner's own path; it is also where a failed capture leaves the engine (logged), so a
worker whose graphs cannot be captured serves without them. Graphs are made with `capture=True` on CUDA only, each
bucket after two eager runs of it (Triton compiles its variants and cuBLAS picks its kernels outside the capture),
all buckets sharing one memory pool. Used by ModelRunner when the engine's `cuda_graphs` is on (EngineConfig: auto =
on CUDA with the Triton backends). With CPU assist on, a step first makes the device wait for any pipelined load of
its adapters (the assist backend's on_device hook, as its own prepare does for decodes), then replays.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from services.gpu_worker.engine.forward_batch import ForwardBatch, PagedAttentionInfo
from services.gpu_worker.engine.scheduler import ScheduledBatch
from services.gpu_worker.lora.batch_info import LoRABatchInfo
from services.gpu_worker.lora.triton_backend import TritonLoRABackend, TritonLoRAStep
from services.gpu_worker.lora.triton_kernels import LoRALaunch, round_up

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to the first that holds max_batch."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b = b * 2 if b < 8 else b + 8
    return buckets + [b]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_model_len: int, capture: bool) -> None:
        model = runner.model
        if model.attention_backend != "triton":
            raise ValueError("decode graphs need the triton attention backend (block tables, no host reads)")
        # with CPU assist on, the model's LoRA backend wraps the Triton one; decodes are the inner backend's, once
        # their adapter's pipelined load has completed on the device (its on_device hook, called before each step)
        self.lora_backend = getattr(model.lora_backend, "inner", model.lora_backend)
        self.on_device = getattr(model.lora_backend, "on_device", None)
        if not isinstance(self.lora_backend, TritonLoRABackend):
            raise ValueError("decode graphs need the triton LoRA backend (device pool, per-token launches), not "
                             f"{type(self.lora_backend).__name__}")
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        self.capture = capture
        rows, dev = self.buckets[-1], runner.device
        self.max_blocks = round_up(-(-max_model_len // runner.block_size), 16)  # as ModelRunner._block_tables
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(rows, dtype=torch.long, device=dev)
        self.logits_indices = torch.arange(rows, device=dev)
        self.block_tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(rows, dtype=torch.int32, device=dev)
        self.entries = torch.full((rows,), -1, dtype=torch.int32, device=dev)
        pool = self.lora_backend.pool
        # each group's largest stacked rank the pool can hold: the grids fit any adapters the step has
        self.max_rank = {g: pool.max_lora_rank * len(gp.widths) for g, gp in pool.groups.items()}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # each graph's output buffer
        self._pool = None  # the graphs' shared memory pool

    def bucket_for(self, sched: ScheduledBatch) -> int | None:
        """The bucket a step runs in, or None if it is not a decode-only step that fits one."""
        n = len(sched.seqs)
        if n == 0 or n > self.buckets[-1]:
            return None
        for seq, tokens in zip(sched.seqs, sched.num_tokens):
            if tokens != 1 or seq.num_computed == 0 or seq.num_computed + 1 != seq.num_tokens \
                    or len(seq.block_table) > self.max_blocks:
                return None
        return next(b for b in self.buckets if b >= n)

    def run(self, sched: ScheduledBatch, bucket: int) -> torch.Tensor:
        """Logits [n, vocab] (float32) of a decode-only step (bucket = bucket_for(sched)): the step's metadata into the
        static buffers, then the bucket's graph (or, with capture off, the same forward eagerly)."""
        if self.on_device is not None:  # a load under way completes (on the device stream) before its decodes
            for slot in sorted({seq.adapter_slot for seq in sched.seqs if seq.adapter_slot is not None}):
                self.on_device(slot)
        self._fill(sched, bucket)
        if self.capture and bucket not in self.graphs:
            self._capture(bucket)
            self._fill(sched, bucket)  # capturing (or trying to) ran padding through the buffers
        graph = self.graphs.get(bucket)
        if graph is None:  # capture off, or it failed: the same forward pass, eagerly
            return self._forward(bucket)[: len(sched.seqs)]
        graph.replay()
        return self.logits[bucket][: len(sched.seqs)]

    def capture_all(self, report: Callable[[str], None] = lambda line: None) -> None:
        """Capture every bucket's graph, largest first (the smaller ones reuse its memory)."""
        for i, bucket in enumerate(reversed(self.buckets)):
            if not self.capture:
                return
            if bucket not in self.graphs:
                report(f"capturing decode graphs {i + 1}/{len(self.buckets)}: batch {bucket}")
                self._capture(bucket)

    # ---- internals ----

    def _fill(self, sched: ScheduledBatch, bucket: int) -> None:
        """The step's rows, then padding rows up to `bucket`, into the static buffers (one copy each)."""
        runner, bs = self.runner, self.runner.block_size
        scratch_slot = runner.scratch_block * bs
        n = len(sched.seqs)
        ids, pos, slots, ctx, entries = [], [], [], [], []
        tables = torch.zeros(bucket, self.max_blocks, dtype=torch.int32)
        for r, seq in enumerate(sched.seqs):
            p = seq.num_computed
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            ctx.append(p + 1)
            tables[r, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
            handle = None if seq.adapter_slot is None else runner.lora_slots[seq.adapter_slot]
            entries.append(-1 if handle is None else handle.entry)
        pad = bucket - n
        tables[n:, 0] = runner.scratch_block
        longs = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [scratch_slot] * pad], dtype=torch.long)
        ints = torch.tensor([ctx + [1] * pad, entries + [-1] * pad], dtype=torch.int32)
        for dst, src in ((self.input_ids, longs[0]), (self.positions, longs[1]), (self.slot_mapping, longs[2]),
                         (self.context_lens, ints[0]), (self.entries, ints[1]), (self.block_tables, tables)):
            dst[:bucket].copy_(src, non_blocking=True)

    def _batch(self, bucket: int) -> ForwardBatch:
        """The ForwardBatch of a bucket: views of the static buffers."""
        rows = self.logits_indices[:bucket]
        batch = ForwardBatch(input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
                             slot_mapping=self.slot_mapping[:bucket], logits_indices=rows)
        batch.decode_token_indices = rows
        batch.paged_decode = PagedAttentionInfo(self.runner.block_size, self.block_tables[:bucket],
                                                self.context_lens[:bucket])
        launch = LoRALaunch(True, self.entries[:bucket], None, None, 1)
        batch.lora = LoRABatchInfo([], TritonLoRAStep(launch, self.max_rank))
        return batch

    def _forward(self, bucket: int) -> torch.Tensor:
        runner, model = self.runner, self.runner.model
        outer, model.lora_backend = model.lora_backend, self.lora_backend  # the Triton backend itself (see __init__)
        try:
            return model.forward(self._batch(bucket), runner.k_cache, runner.v_cache, runner.lora_slots)
        finally:
            model.lora_backend = outer

    def _capture(self, bucket: int) -> bool:
        """Two eager runs over padding rows (compiles and tunes outside the capture), then the capture. If that
        fails, decode steps run the static path eagerly from now on (logged): slower, never wrong or down."""
        self._fill(ScheduledBatch(), bucket)
        try:
            for _ in range(2):
                self._forward(bucket)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # thread_local: CUDA calls of the worker's other threads (adapter copies to pinned memory, say) go on;
            # only this thread's must not touch the device unsafely while it captures
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._forward(bucket)
        except Exception as exc:  # noqa: BLE001 - any capture failure: serve without graphs rather than not at all
            log.warning("decode graphs off: capturing batch %d failed (%s: %s); decode steps run eagerly",
                        bucket, type(exc).__name__, exc)
            self.capture = False
            self.graphs.clear()
            self.logits.clear()
            return False
        self.graphs[bucket], self.logits[bucket] = graph, logits
        return True
