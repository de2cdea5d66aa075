#!/usr/bin/env python
"""Host cost of launching the Triton kernels: the Python time per call that a GPU step spends before the device
works, measured on any machine (the kernels themselves are stubbed out: nothing is launched).

A decode step of a Llama-7B-shaped model launches a LoRA shrink + expand pair per layer and targeted group (64-128
pairs) and a paged-attention decode per layer (32); without CUDA graphs their Python cost is on the step's path.
Measured, in the same run, per call (the fastest of --repeats interleaved rounds of --calls calls):
  lora_pair_checked     lora_shrink + lora_expand with every argument checked (the public wrappers' default)
  lora_pair_unchecked   the same with validate=False, as TritonLoRABackend calls them after each group's first launch
  attention_decode      paged_attention_decode's wrapper
  triton_binder         Triton's own specialization of one launch's arguments (its binder, run by every launch
                        before the launcher; what JITFunction.run adds on top of ours, in part)
Shapes: 32 decode tokens over 8 adapters of stacked rank 192 into a q/k/v-fused 3 x 4096 projection (bfloat16),
32 query heads over a 4096-slot cache. Output: JSON (default bench/results/launch_overhead.json) with machine, git
commit and the ratio of checked to unchecked pairs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the wrappers as they run on a GPU (kernels stubbed below)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import git_commit, machine_info, progress, timestamp, write_result  # noqa: E402
from services.gpu_worker.attention import triton_paged_attention as attention  # noqa: E402
from services.gpu_worker.kernel_warmup import KERNELS  # noqa: E402
from services.gpu_worker.lora import triton_kernels as lora  # noqa: E402

NAME = "launch_overhead"


class _Stub:
    """Stands in for a kernel: `kernel[grid](...)` records nothing and runs nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fns: dict, calls: int, repeats: int) -> dict[str, float]:
    """Microseconds per call of each function: rounds interleaved (so a slow spell of the machine hits them alike),
    the fastest round kept (the cost itself; slower rounds are the machine's noise)."""
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: min(values) for name, values in rounds.items()}


def measure(calls: int, repeats: int) -> dict[str, float]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    i32 = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    tokens, adapters, stacked, width = 32, 8, 192, 4096
    x = torch.zeros(tokens, width, dtype=torch.bfloat16)
    a = torch.zeros(adapters * stacked, width, dtype=torch.bfloat16)
    b = torch.zeros(adapters * stacked, width, dtype=torch.bfloat16)
    y = torch.zeros(tokens, 3 * width, dtype=torch.bfloat16)
    row_off, rank = i32(list(range(0, adapters * stacked, stacked))), i32([stacked] * adapters)
    part_rank, part_start = i32([[64] * 3] * adapters), i32([[0, 64, 128]] * adapters)
    part_out, part_width = i32([0, width, 2 * width]), i32([width] * 3)
    launch = lora.LoRALaunch(True, i32([i % adapters for i in range(tokens)]), None, None, 1)
    q = torch.zeros(tokens, 32, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4096, 32, 128, dtype=torch.bfloat16)
    tables, context = torch.zeros(tokens, 64, dtype=torch.int32), i32([500] * tokens)

    def pair(validate: bool):
        def run():
            t = lora.lora_shrink(x, a, row_off, rank, launch, stacked, validate=validate)
            lora.lora_expand(y, t, b, row_off, part_rank, part_start, part_out, part_width, launch, width, stacked,
                             validate=validate)
        return run

    kernel = lora._lora_shrink_token_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    t = torch.empty(tokens, stacked, dtype=torch.float32)
    args = (x, a, t, launch.entries, row_off, rank, width, *x.stride(), *a.stride(), *t.stride())

    saved = [(module, n, getattr(module, n)) for module in (lora, attention) for n in KERNELS[module.__name__]]
    for module, n, _ in saved:  # every kernel of the engine stubbed: nothing runs
        setattr(module, n, _Stub())
    try:
        return per_call_us({
            "lora_pair_checked_us": pair(True),
            "lora_pair_unchecked_us": pair(False),
            "attention_decode_us": lambda: attention.paged_attention_decode(q, cache, cache, tables, context, 16, 0.1),
            "triton_binder_us": lambda: binder(*args, BLOCK_R=16, BLOCK_K=128),
        }, calls, repeats)
    finally:
        for module, n, fn in saved:
            setattr(module, n, fn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per round (default: 2000)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds; the fastest is kept (default: 7)")
    ap.add_argument("--output", help="JSON path (default: bench/results/launch_overhead.json)")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        print("launch_overhead: --calls and --repeats must be >= 1", file=sys.stderr)
        return 2
    us = measure(args.calls, args.repeats)
    for name, value in us.items():
        progress(NAME, f"{name}: {value:.1f}")
    import triton

    result = {"benchmark": NAME, "timestamp": timestamp(), "machine": machine_info(), "git": git_commit(),
              "triton": triton.__version__, "config": {"calls": args.calls, "repeats": args.repeats},
              "per_call_us": us,
              "ratio_checked_over_unchecked": us["lora_pair_checked_us"] / us["lora_pair_unchecked_us"],
              # a 7B decode step's Triton launches (32 layers; q/k/v/o adapters: 2 groups, all-linear: 4), our
              # wrappers and Triton's binder only: not Triton's launcher, not the model's torch ops
              "decode_step_7b_wrappers_and_binder_ms": {
                  f"{groups}_groups": round(32 * (groups * (us["lora_pair_unchecked_us"] + 2 * us["triton_binder_us"])
                                                  + us["attention_decode_us"] + us["triton_binder_us"]) / 1e3, 2)
                  for groups in (2, 4)}}
    out = write_result(NAME, result, args.output)
    print(f"checked/unchecked LoRA pair {result['ratio_checked_over_unchecked']:.2f}x -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
