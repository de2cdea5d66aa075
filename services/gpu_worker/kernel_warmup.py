"""Kernel warm-up: an engine whose Triton kernels run compiled compiles every variant before its first request.

Triton compiles a kernel variant at its first launch: 0.2-1 s each in bfloat16 on a GPU host, seconds for float32
attention (bench/device/compile_check.py measures them), and an engine with the Triton backends launches a few dozen
variants: each fused group's rank tiles (16, 32 and 64 rows), segment tiles of <= 16 and > 16 tokens, per-token
decodes, the two attention kernels, the fused layer kernels. Unwarmed, the first requests would pay for them in
their time to first token.

`warm_up(engine)` runs synthetic requests that reach every variant: for each rank of TILE_RANKS up to the engine's
max_lora_rank (and that rank, or 64 if larger: wider ranks use the same tiles) an adapter on every projection, so
each group's stacked rank falls in each of its tiles; per adapter a short prompt prefilled alone (16-token segment
tiles), then a long one (32-token tiles) next to a base-only request, then their decodes (per-token launches). It
leaves nothing behind: the adapters are unloaded, the requests finish and free their KV blocks. That this covers a
real workload rests on the variants depending on launch shapes only, never on the batch: the kernels' metadata is
laid out so that what Triton specializes on (integers equal to 1 or divisible by 16, pointers 16-byte aligned) is
the same at every step (TritonLoRABackend.prepare, lora_shrink, ModelRunner._block_tables).
tests/gpu_worker/lora/test_kernel_warmup.py checks it: after warm_up, a mixed workload launches no variant that
warm-up did not. With decode graphs on (engine/decode_graphs.py), warm-up ends by capturing every batch bucket's.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# every Triton kernel the engine launches: module -> kernel names (compile_check.py and the tests use this list)
KERNELS = {
    "services.gpu_worker.lora.triton_kernels": ("_lora_shrink_kernel", "_lora_shrink_token_kernel",
                                                "_lora_expand_kernel", "_lora_expand_token_kernel"),
    "services.gpu_worker.attention.triton_paged_attention": ("_paged_decode_kernel", "_paged_prefill_kernel"),
    "services.gpu_worker.model.fused_layer_ops": ("_rms_norm_kernel", "_silu_mul_kernel", "_rope_and_cache_kernel"),
}
ADAPTER_PREFIX = "caraserve-warmup-r"
# With q/k/v stacked (3 parts), gate/up (2) and o, down (1 each), these ranks put every group's stacked rank in each
# of its rank tiles (<= 16, <= 32, more) that adapters of rank <= max_lora_rank can reach, with max_lora_rank (at
# most the widest tile, 64) added to them.
TILE_RANKS = (1, 8, 16, 32, 64)
SHORT_PROMPT, LONG_PROMPT = 8, 40  # tokens: prefill segments within one 16-token tile, and beyond it


def compiles_kernels(engine) -> bool:
    """Whether `engine` runs Triton kernels compiled on a GPU (so there is something to warm up)."""
    from services.gpu_worker.lora.triton_kernels import interpreting

    uses_triton = "triton" in (engine.lora_backend, engine.config.resolved_attention_backend())
    return uses_triton and engine.config.torch_device().type == "cuda" and not interpreting()


def warm_up_if_compiled(engine, report: Callable[[str], None] = lambda line: None,
                        should_stop: Callable[[], bool] = lambda: False) -> float | None:
    """warm_up(engine) when it runs compiled Triton kernels (its seconds), else nothing (None)."""
    return warm_up(engine, report, should_stop) if compiles_kernels(engine) else None


def warm_up(engine, report: Callable[[str], None] = lambda line: None,
            should_stop: Callable[[], bool] = lambda: False) -> float:
    """Run the warm-up requests through `engine` (nothing else may be running); returns the seconds it took.
    Stops early, between adapters, once should_stop() is true (a worker told to stop while it starts)."""
    from services.gpu_worker.profiler import random_adapter

    if engine.has_unfinished():
        raise RuntimeError("kernel warm-up needs an idle engine")
    cap = engine.config.max_lora_rank
    ranks = sorted({r for r in TILE_RANKS if r <= cap} | {min(cap, TILE_RANKS[-1])})
    start = time.perf_counter()
    for i, rank in enumerate(ranks):
        if should_stop():
            log.info("kernel warm-up stopped after %d of %d adapter ranks", i, len(ranks))
            break
        report(f"kernel warm-up {i + 1}/{len(ranks)}: rank {rank} ({time.perf_counter() - start:.0f} s)")
        adapter = engine.register_adapter(random_adapter(engine, rank, seed=rank, name=f"{ADAPTER_PREFIX}{rank}"))
        _run_requests(engine, adapter.name)
        engine.unload_adapter(adapter.name)
    graphs = engine.runner.decode_graphs
    if graphs is not None and not should_stop():  # decode steps of every batch bucket, captured now rather than
        graphs.capture_all(report)                # in some request's step
    seconds = time.perf_counter() - start
    log.info("kernel warm-up: %d adapter ranks in %.1f s", len(ranks), seconds)
    return seconds


def _run_requests(engine, adapter: str) -> None:
    from services.gpu_worker.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    vocab = engine.hf_config.vocab_size

    def prompt(n: int) -> list[int]:
        return [(37 * i + 11) % (vocab - 200) + 100 for i in range(n)]

    assist = engine.cpu_assist
    if assist is not None and assist.mode == "auto":
        # a cold adapter's first prefill runs while it loads, its LoRA deltas on the cpu_prefill workers: a one-token
        # request starts the load, which then completes, so that the prefills below reach the device kernels
        engine.add_request(f"{adapter}-load", prompt(2), SamplingParams(max_tokens=1, temperature=0.0), adapter=adapter)
        while engine.has_unfinished():
            engine.step()
        assist.wait_for_loads()
    engine.add_request(f"{adapter}-short", prompt(SHORT_PROMPT), params, adapter=adapter)
    engine.step()  # the short prompt alone: segment tiles of 16 tokens
    engine.add_request(f"{adapter}-long", prompt(LONG_PROMPT), params, adapter=adapter)
    engine.add_request(f"{adapter}-base", prompt(SHORT_PROMPT), params)
    while engine.has_unfinished():  # the long prefill (32-token tiles) beside decodes, then per-token decodes
        engine.step()
