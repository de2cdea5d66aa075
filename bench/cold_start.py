#!/usr/bin/env python
"""GPU benchmark: time to first token for cold adapters with CPU-assisted prefill (cpu_assist auto), with the
S-LoRA-style load-then-prefill (off), and with every adapter already resident — in the same run.

A Llama-2-7B-shaped model (random weights, bfloat16, written once to a temporary HF directory; bench/decode_step.py
writes it) and --adapters random rank-64 adapters (q/k/v/o by default) registered in host memory. Requests come one
at a time, each for an adapter that is not in a GPU slot (the slot is emptied before every request), with a
--prompt-token prompt and one output token; TTFT is from add_request to the step that sampled it, the device
synchronised. Three systems:

  resident  cpu_assist off, the adapter put in its slot before the clock starts (the bound to compare with)
  off       cpu_assist off: the step loads the adapter to its slot, then prefills (S-LoRA-style on-demand loading)
  auto      cpu_assist auto: the load runs by layer groups on a side stream while the prefill starts at once, the
            layers not landed computed by --cpu-workers cpu_prefill processes (or waited for on the device, when
            that is expected sooner); its groups of the engine's default size (load_group_layers 1)
  auto_gN   the same with groups of N layers, for each other N in --load-group-layers (the artifact's 8: 32 layers
            in 4 groups)
  auto_inline  auto with the engine's thread enqueueing every copy of a load when it starts, before the step's
            forward pass (load_enqueue inline), against auto's load threads (--no-inline skips it)

Target (DESIGN.md, issue 5): auto within +5% of resident, clearly ahead of off. Output: JSON (default
bench/results/cold_start.json) with machine info, git commit, config, each system's TTFT summary, the ratios and the
auto engines' counters (ranges on the workers, ranges on landed layers, device waits, fallbacks, the loads'
measured bandwidth, the engine thread's time to start a load, which the step spends before it launches the
prefill, and the time the loads' own threads spent enqueueing their copies).
Needs CUDA: without it the script exits with a message (--allow-cpu --shape tiny is a smoke run of the code only;
on a CPU auto is off, so it measures nothing).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    git_commit, gpu_or_smoke, machine_info, progress, result_path, summarize, timestamp, write_result,
)
from bench.decode_step import SHAPES, sync, write_adapter, write_model  # noqa: E402

NAME = "cold_start"


def measure(engine, names: list[str], prompts: list[list[int]], resident: bool, device: torch.device) -> list[float]:
    """TTFT (s) of one request per adapter in `names`, each from an empty slot (or put in its slot first)."""
    from services.gpu_worker.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        engine.adapters.evict_if_idle(name)  # cold: registered (host memory), not in a GPU slot
        if resident:
            engine.adapters.acquire(name)  # in its slot before the clock starts
            engine.adapters.release(name)
        sync(device)
        t0 = time.perf_counter()
        engine.add_request(f"{name}-{i}", prompt, params, adapter=name)
        while not any(out.new_token_ids for out in engine.step()):
            pass
        sync(device)
        times.append(time.perf_counter() - t0)
        while engine.has_unfinished():
            engine.step()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters (each request one of them, cold)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="LoRA target modules, comma-separated")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--requests", type=int, default=24, help="measured requests per system (after 2 warm-up ones)")
    ap.add_argument("--cpu-workers", type=int, default=8, help="cpu_prefill processes of the auto engine")
    ap.add_argument("--load-group-layers", default="1,8",
                    help="layers per load group of the auto engines, comma-separated; must include the engine's "
                         "default, 1, reported as 'auto' (the others as auto_gN) (default: 1,8)")
    ap.add_argument("--no-inline", action="store_true",
                    help="skip auto_inline (auto with the engine's thread enqueueing the loads' copies)")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a smoke run of the code, no result)")
    ap.add_argument("--output", help=f"JSON path (default {result_path(NAME)})")
    args = ap.parse_args(argv)
    from services.gpu_worker.engine.config import EngineConfig

    try:
        group_layers = [int(v) for v in args.load_group_layers.split(",")]
        if not group_layers or min(group_layers) < 1:
            raise ValueError
    except ValueError:
        ap.error(f"--load-group-layers: positive integers, comma-separated, got {args.load_group_layers!r}")
    default_group = EngineConfig.load_group_layers
    if default_group not in group_layers:
        ap.error(f"--load-group-layers must include the engine's default, {default_group} (its 'auto' system)")
    # (system name, cpu_assist, EngineConfig overrides)
    engines = [("off", "off", {})] + [
        ("auto" if g == default_group else f"auto_g{g}", "auto", {"load_group_layers": g})
        for g in sorted(set(group_layers), key=group_layers.index)]
    if not args.no_inline:
        engines.append(("auto_inline", "auto", {"load_enqueue": "inline"}))
    chosen = gpu_or_smoke(NAME, args.allow_cpu, "it measures loading adapters to the GPU")
    if chosen is None:
        return 2
    device, dtype = chosen
    shape = SHAPES[args.shape]
    targets = args.targets.split(",")

    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.kernel_warmup import warm_up_if_compiled

    gen = torch.Generator().manual_seed(1)
    total = args.requests + 2
    names = [f"lora{i % args.adapters}" for i in range(total)]
    prompts = [torch.randint(3, shape["vocab_size"], (args.prompt_tokens,), generator=gen).tolist()
               for _ in range(total)]
    ttft: dict[str, list[float]] = {}
    counters: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        tmp = Path(tmp)
        progress(NAME, f"writing a random {args.shape} model and {args.adapters} rank-{args.rank} adapters")
        write_model(tmp / "model", shape, device, dtype)
        for a in range(args.adapters):
            write_adapter(tmp / f"lora{a}", shape, args.rank, targets, seed=a)
        for name, assist, overrides in engines:
            config = EngineConfig(
                model=str(tmp / "model"), device=device.type, dtype=str(dtype).removeprefix("torch."),
                max_loras=args.adapters, max_lora_rank=args.rank, max_num_seqs=8,
                max_num_batched_tokens=max(2048, args.prompt_tokens), kv_cache_memory_gb=2.0,
                cpu_assist=assist, cpu_workers=args.cpu_workers, data_dir=str(tmp / "data"),
                **overrides,
            )
            progress(NAME, f"loading the engine (cpu_assist {assist}"
                           f"{f', {overrides}' if overrides else ''})")
            engine = LLMEngine(config)
            try:
                warm_up_if_compiled(engine, report=lambda line: progress(NAME, line))  # no compiling in a TTFT
                for a in range(args.adapters):
                    engine.load_adapter(f"lora{a}", tmp / f"lora{a}")
                systems = ("resident", "off") if assist == "off" else (name,)
                for system in systems:
                    progress(NAME, f"{system}: {total} requests")
                    ttft[system] = measure(engine, names, prompts, system == "resident", device)[2:]
                if engine.cpu_assist is not None:
                    b = engine.cpu_assist.backend
                    counters[name] = {
                        "pipelined_loads": engine.cpu_assist.pipelined_loads, "cpu_ranges": b.cpu_ranges,
                        "landed_ranges": b.landed_ranges, "device_waits": engine.cpu_assist.device_waits,
                        "fallbacks": b.fallbacks, "load_bytes_per_s": engine.cpu_assist.load_bytes_per_s,
                        "load_start_ms_mean": 1e3 * engine.cpu_assist.load_enqueue_s
                        / max(1, engine.cpu_assist.pipelined_loads),
                        "load_thread_s_total": engine.cpu_assist.load_thread_s,
                        "host_adapter_bytes": max((h.nbytes for h in engine.cpu_assist._held.values()), default=0)}
            finally:
                engine.close()
                del engine
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    ms = {k: summarize([t * 1e3 for t in v]) for k, v in ttft.items()}
    auto_ratio = ms["auto"]["p50"] / ms["resident"]["p50"]
    off_ratio = ms["off"]["p50"] / ms["resident"]["p50"]
    result = {
        "benchmark": NAME, "timestamp": timestamp(), "machine": machine_info(), "git": git_commit(),
        "config": {"shape": args.shape, **shape, "dtype": str(dtype), "adapters": args.adapters, "rank": args.rank,
                   "targets": targets, "prompt_tokens": args.prompt_tokens, "requests": args.requests,
                   "cpu_workers": args.cpu_workers, "load_group_layers": group_layers,
                   "systems": {name: overrides for name, assist, overrides in engines if assist == "auto"}},
        "ttft_ms": ms,
        "ratio_p50_to_resident": {k: v["p50"] / ms["resident"]["p50"] for k, v in ms.items() if k != "resident"},
        "target": {"auto_over_resident_max": 1.05, "met": auto_ratio <= 1.05 and auto_ratio < off_ratio},
        "auto_counters": counters,
    }
    if device.type != "cuda":
        result["note"] = "CPU smoke run (--allow-cpu): cpu_assist auto is off without a GPU; not a result"
    out = write_result(NAME, result, args.output)
    print(f"TTFT p50: resident {ms['resident']['p50']:.1f} ms, off {ms['off']['p50']:.1f} ms ({off_ratio:.2f}x), "
          f"auto {ms['auto']['p50']:.1f} ms ({auto_ratio:.2f}x; target <= 1.05x)"
          + "".join(f", {k} {v['p50']:.1f} ms" for k, v in ms.items() if k.startswith("auto_")) + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
