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
32 query heads over a 4096-slot cache.

And the host time of a whole decode step with the structure of bench/decode_step.py's case (Llama-2-7B: 32 layers,
32 heads; batch 32, 32 rank-64 adapters on q/k/v/o, context 512): ModelRunner.prepare + LlamaModel.forward with the
Triton kernels stubbed, once with the fused layer kernels (model/fused_layer_ops.py, the Triton path) and once with
their torch twins in their place, in the same run, with the torch ops and Triton launches each issues. The widths
are shrunk (hidden 64: 32 heads of 2, intermediate 128, vocab 512), the tensors are on the CPU (one thread) and the
base model's GEMMs are stubbed too (an empty output; a GEMM is one launch either way), so each remaining torch op
costs its dispatch and a ~1 us kernel: the op count and the Python path are the 7B step's, the arithmetic is not.
(The meta device would skip the arithmetic entirely, but its elementwise ops run Python reference implementations,
~100 us each.) A lower bound of the host time on a GPU, where a CUDA op adds the allocator and the driver's launch
(a few us) and a Triton launch adds Triton's binder (measured: triton_binder_us) and its launcher.

Output: JSON (default bench/results/launch_overhead.json) with machine, git commit, the ratio of checked to
unchecked pairs and of unfused to fused step host time.
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
from bench.device_ops import DeviceOps  # noqa: E402
from services.gpu_worker.attention import triton_paged_attention as attention  # noqa: E402
from services.gpu_worker.lora import triton_kernels as lora  # noqa: E402

NAME = "launch_overhead"


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

    with DeviceOps(run_kernels=False, count_torch=False):  # every kernel of the engine stubbed: nothing runs
        return per_call_us({
            "lora_pair_checked_us": pair(True),
            "lora_pair_unchecked_us": pair(False),
            "attention_decode_us": lambda: attention.paged_attention_decode(q, cache, cache, tables, context, 16, 0.1),
            "triton_binder_us": lambda: binder(*args, BLOCK_R=16, BLOCK_K=128),
        }, calls, repeats)


DECODE_CASE = dict(batch=32, context=512, rank=64, targets=("q_proj", "k_proj", "v_proj", "o_proj"), block_size=16)


def decode_step_of_7b_structure():
    """(step, model): `step()` runs ModelRunner.prepare + LlamaModel.forward of DECODE_CASE's decode step with the
    7B's layers, heads and batch but tiny widths, on the CPU (module docstring); the model's `fused` may be set to
    None to run the torch twins of the fused layer kernels instead."""
    from unittest import mock

    from transformers import LlamaConfig

    from bench.decode_step import SHAPES
    from services.gpu_worker.engine.model_runner import ModelRunner
    from services.gpu_worker.engine.scheduler import ScheduledBatch
    from services.gpu_worker.engine.sequence import SamplingParams, Sequence
    from services.gpu_worker.lora.gpu_pool import LoRAGpuPool
    from services.gpu_worker.lora.triton_backend import TritonLoRABackend
    from services.gpu_worker.model import llama
    from services.gpu_worker.model.weights import LayerWeights, ModelWeights
    from shared.adapters import BaseModelShape, LoRAAdapter, LoRAModuleWeights

    case, device, dtype = DECODE_CASE, torch.device("cpu"), torch.bfloat16
    config = LlamaConfig(**{**SHAPES["7b"], "hidden_size": 64, "intermediate_size": 128, "vocab_size": 512})
    h, inter, vocab, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    q_width = kv_width = h  # Llama-2-7B: no GQA

    def empty(*shape):
        return torch.zeros(*shape, dtype=dtype, device=device)

    weights = ModelWeights(empty(vocab, h), [
        LayerWeights(empty(h), empty(q_width + 2 * kv_width, h), None, empty(h, q_width), None, empty(h),
                     empty(2 * inter, h), empty(h, inter)) for _ in range(layers)], empty(h), empty(vocab, h))
    with mock.patch.object(llama, "load_weights", return_value=weights):
        model = llama.LlamaModel(Path("<7b structure>"), config, dtype, device, max_positions=4096,
                                 attention_backend="triton")
    widths = model.lora_part_widths()
    pool = LoRAGpuPool(layers, widths, LoRAGpuPool.in_features_from_widths(widths), case["batch"], case["rank"],
                       dtype, device)
    model.lora_backend = TritonLoRABackend(pool)
    shapes = BaseModelShape.from_hf_config(config).module_shapes
    handles = []
    for i in range(case["batch"]):  # each adapter's metadata in the pool (reserve: its weights are not written)
        modules = [LoRAModuleWeights(layer, target, torch.zeros(case["rank"], shapes[target][0]),
                                     torch.zeros(shapes[target][1], case["rank"]), 2.0)
                   for layer in range(layers) for target in case["targets"]]
        handles.append(pool.reserve(LoRAAdapter(f"a{i}", Path("<7b structure>"), {"r": case["rank"]}, modules)))
    blocks_per_seq = -(-(case["context"] + 1) // case["block_size"])
    runner = ModelRunner(model, case["batch"] * blocks_per_seq, case["block_size"], handles)
    seqs = []
    for i in range(case["batch"]):
        seq = Sequence(f"s{i}", [1] * case["context"], SamplingParams(max_tokens=8), f"a{i}", i)
        seq.token_ids.append(2)  # one generated token: its KV is this step's, the context's is cached
        seq.num_computed = case["context"]
        seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        seq.adapter_slot = i
        seqs.append(seq)
    sched = ScheduledBatch(seqs, [1] * case["batch"])

    def gemm_stub(x, weight, bias=None):  # the base model's GEMMs are stubbed like the Triton kernels (module doc)
        step.gemms += 1
        return x.new_empty(x.shape[0], weight.shape[0])

    def step() -> None:
        batch, _ = runner.prepare(sched)
        with mock.patch.object(llama, "linear", gemm_stub):
            model.forward(batch, runner.k_cache, runner.v_cache, runner.lora_slots)

    step.gemms = 0  # GEMMs stubbed so far
    return step, model


def decode_step_host(repeats: int) -> dict:
    """Host ms of the decode step of the 7B's structure, fused and unfused (interleaved rounds, the fastest kept),
    and the device ops and Triton launches of each."""
    step, model = decode_step_of_7b_structure()
    fused = model.fused

    def variant(use_fused: bool):
        def run():
            model.fused = fused if use_fused else None
            step()
        return run

    variants = {"fused": variant(True), "unfused": variant(False)}
    out: dict = {"case": {k: list(v) if isinstance(v, tuple) else v for k, v in DECODE_CASE.items()}}
    for name, run in variants.items():
        gemms = step.gemms
        with DeviceOps(run_kernels=False) as ops:
            run()
        out[name] = {"torch_ops": sum(ops.torch_ops.values()), "gemms": step.gemms - gemms,
                     "triton_launches": sum(ops.triton.values())}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread team would only add its wake-ups
    try:
        with DeviceOps(run_kernels=False, count_torch=False):  # kernels stubbed, torch ops as they are
            ms = per_call_us(variants, calls=3, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    for name in variants:
        out[name]["host_ms"] = round(ms[name] / 1e3, 2)
    model.fused = fused
    return out


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
    step = decode_step_host(args.repeats)
    for name in ("fused", "unfused"):
        progress(NAME, f"decode step host, {name} layer ops: {step[name]}")
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
                  for groups in (2, 4)},
              "decode_step_host": step,
              "ratio_unfused_over_fused_host": step["unfused"]["host_ms"] / step["fused"]["host_ms"]}
    out = write_result(NAME, result, args.output)
    print(f"checked/unchecked LoRA pair {result['ratio_checked_over_unchecked']:.2f}x; decode step host "
          f"{step['fused']['host_ms']} ms fused vs {step['unfused']['host_ms']} ms unfused -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
