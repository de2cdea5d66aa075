#!/usr/bin/env python
"""GPU benchmark: one decode step of a Llama-2-7B-shaped model against the memory-bandwidth bound.

A Llama-2-7B-shaped model (random weights, bfloat16, written once to a temporary HF directory) serves --batch
sequences (default 32), each with its own random LoRA adapter (default rank 64 on q/k/v/o: 32 distinct adapters),
all prefilled to --context tokens. Then engine.step() is timed for --steps decode steps (after --warmup): every
step decodes one token of every sequence, the mixed-adapter batch the multi-LoRA kernels exist for.

The bound: a decode step must read every weight once (the lm_head included; of the embedding only the batch's
rows), every sequence's K and V over its context, and every adapter's A and B for every layer; the bytes over the
device's copy bandwidth measured in the same run (a device-to-device copy of 1 GiB, counted as read + write) is
the time no implementation can beat. Target (issue 4): step time <= 1.3x the bound. Reported: step time
p50/mean/min, the bound and its parts (weights, KV, adapters), the ratio. Steps run as the engine runs them: on a
GPU as CUDA graphs (engine/decode_graphs.py); then as many are timed launched op by op (`eager_step_ms`), the
graphs' gain measured in the same run.

Output: JSON (default bench/results/decode_step.json) with machine info, git commit, config and timestamp.
Needs CUDA: without it the script exits with a message (--allow-cpu --shape tiny is a smoke run of the code only).
"""
from __future__ import annotations

import argparse
import json
import shutil
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

NAME = "decode_step"
SHAPES = {
    # Llama-2-7B: 32 layers, 32 heads of 128 (no GQA), SwiGLU 11008, vocab 32000
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_model(out: Path, shape: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """A random Llama of `shape` as an HF directory (one safetensors file a layer); returns the HF config dict."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from shared.model_provisioning import resolve_model

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config.save_pretrained(out)
    h, inter, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    kv_width = kv * h // shape["num_attention_heads"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size):
        return (torch.randn(size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    top = {"model.embed_tokens.weight": rand(shape["vocab_size"], h), "lm_head.weight": rand(shape["vocab_size"], h),
           "model.norm.weight": torch.ones(h, dtype=dtype)}
    save_file(top, out / "model-top.safetensors", metadata={"format": "pt"})
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv_width, h),
            p + "self_attn.v_proj.weight": rand(kv_width, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        }
        save_file(layer, out / f"model-layer{i:03d}.safetensors", metadata={"format": "pt"})
    tokenizer_dir = resolve_model().path  # the embedded default's tokenizer: prompts are ids, outputs only decoded
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, out / f)
    return config.to_dict()


def write_adapter(out: Path, shape: dict, rank: int, targets: list[str], seed: int) -> None:
    """A PEFT LoRA adapter directory with random A and B (B non-zero) on `targets` of every layer."""
    from safetensors.torch import save_file

    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv_width = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv_width), "v_proj": (h, kv_width), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # (in, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(shape["num_hidden_layers"]):
        for t in targets:
            parent = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{i}.{parent}.{t}"
            fan_in, fan_out = dims[t]
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in**0.5).bfloat16()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).bfloat16()
    out.mkdir(parents=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none",
         "task_type": "CAUSAL_LM"}))


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, reps: int = 20) -> float:
    """Bytes/s of a device-to-device copy (read + write both counted)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bytes(engine, shape: dict, batch: int, rank: int, targets: list[str], keys: float) -> dict[str, int]:
    """Bytes one decode step must read: the weights, K and V of `keys` cached tokens (summed over the batch), and
    A and B of every adapter in the batch (counted from the shape: the adapter pool's layout may pad, the bound
    does not)."""
    m, w = engine.model, engine.model.weights
    elt = torch.empty((), dtype=m.dtype).element_size()
    layer_bytes = sum(t.numel() * t.element_size() for lw in w.layers for t in vars(lw).values()
                      if isinstance(t, torch.Tensor))
    weights = layer_bytes + (w.norm.numel() + w.lm_head.numel() + batch * w.embed.shape[1]) * elt
    kv = int(2 * m.num_layers * m.num_kv_heads * m.head_dim * elt * keys)
    h, inter, kvw = shape["hidden_size"], shape["intermediate_size"], m.kv_width
    dims = {"q_proj": h + h, "k_proj": h + kvw, "v_proj": h + kvw, "o_proj": h + h,
            "gate_proj": h + inter, "up_proj": h + inter, "down_proj": inter + h}  # in + out
    adapters = batch * m.num_layers * rank * sum(dims[t] for t in targets) * elt
    return {"weights": weights, "kv": kv, "adapters": adapters}


PROFILED_STEPS = 3  # after the timed ones, under torch.profiler
KERNEL_KINDS = (("lora (triton)", ("_lora_",)), ("attention (triton)", ("_paged_",)),
                ("gemm", ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma", "ampere_", "cublas")),
                ("attention (torch sdpa)", ("flash", "fmha", "attention")))


def step_breakdown(engine, device: torch.device, steps: int) -> dict:
    """Where a decode step's time goes, from torch.profiler over `steps` more steps: per step the device's kernel
    time (busy), by kind (Triton LoRA, Triton attention, GEMMs, other), and the number of kernels launched. A step
    much longer than its busy time is bound by the host (Python, launches), not by memory bandwidth. A diagnosis
    only: its failure is recorded, not raised."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                engine.step()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        by_kind: dict[str, float] = {}
        for e in kernels:
            name = e.name.lower()
            kind = next((k for k, keys in KERNEL_KINDS if any(key.lower() in name for key in keys)), "other")
            by_kind[kind] = by_kind.get(kind, 0.0) + e.time_range.elapsed_us() / 1e3 / steps
        return {"steps": steps, "device_busy_ms": sum(by_kind.values()), "device_ms_by_kind": by_kind,
                "kernels_per_step": len(kernels) / steps}
    except Exception as exc:  # noqa: BLE001 (the measurement above stands without it)
        return {"error": f"{type(exc).__name__}: {exc}"}


def timed_steps(engine, device: torch.device, batch: int, warmup: int, steps: int) -> tuple[list[float], list[int]]:
    """Seconds of each of `steps` decode steps after `warmup` untimed ones, and the keys each attended over."""
    times, keys = [], []
    for i in range(warmup + steps):
        step_keys = sum(len(seq.token_ids) for seq in engine._seqs.values())  # each query sees all its tokens
        sync(device)
        t0 = time.perf_counter()
        outs = engine.step()  # ends in the step's one host sync (.tolist() of the sampled ids)
        sync(device)
        dt = time.perf_counter() - t0
        if len(outs) != batch:
            raise RuntimeError(f"step {i} decoded {len(outs)} sequences, not {batch}")
        if i >= warmup:
            times.append(dt)
            keys.append(step_keys)
    return times, keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--batch", type=int, default=32, help="sequences decoding together, one adapter each")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="LoRA target modules, comma-separated")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens of every sequence")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"))
    ap.add_argument("--lora-backend", default="auto", choices=("auto", "torch", "triton"))
    ap.add_argument("--cuda-graphs", default="auto", choices=("auto", "off"),
                    help="decode steps as CUDA graphs (auto: on a GPU with the triton backends); with graphs, as many "
                         "steps are then timed without them, in the same run")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (a smoke run of the code, no result)")
    ap.add_argument("--output", help=f"JSON path (default {result_path(NAME)})")
    args = ap.parse_args(argv)
    chosen = gpu_or_smoke(NAME, args.allow_cpu, "this benchmark measures GPU memory bandwidth")
    if chosen is None:
        return 2
    device, dtype = chosen
    shape = SHAPES[args.shape]
    targets = args.targets.split(",")

    from services.gpu_worker.engine.config import EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.engine.sequence import SamplingParams
    from services.gpu_worker.kernel_warmup import warm_up_if_compiled

    with tempfile.TemporaryDirectory(prefix="decode-step-") as tmp:
        tmp = Path(tmp)
        progress(NAME, f"writing a random {args.shape} model and {args.batch} rank-{args.rank} adapters")
        write_model(tmp / "model", shape, device, dtype)
        for a in range(args.batch):
            write_adapter(tmp / f"lora{a}", shape, args.rank, targets, seed=a)
        # sequences prefilled early decode while the others prefill: room for those extra tokens too
        extra = args.batch * args.context // max(2048, args.context) + 2 + PROFILED_STEPS
        total = args.context + args.warmup + 2 * args.steps + extra
        kv_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["hidden_size"] \
            // shape["num_attention_heads"] * torch.empty((), dtype=dtype).element_size()
        config = EngineConfig(
            model=str(tmp / "model"), device=device.type, dtype=str(dtype).removeprefix("torch."),
            max_loras=args.batch, max_lora_rank=max(args.rank, 1), max_num_seqs=args.batch,
            max_num_batched_tokens=max(2048, args.context),
            # every sequence's blocks (rounded up to whole blocks of 16), one spare each
            kv_cache_memory_gb=args.batch * ((total + 15) // 16 + 1) * 16 * kv_token / 2**30,
            attention_backend=args.attention_backend, lora_backend=args.lora_backend, cuda_graphs=args.cuda_graphs,
            cpu_assist="off",  # decode steps of resident adapters: the prefills need no cpu_prefill workers
        )
        progress(NAME, "loading the engine")
        engine = LLMEngine(config)
        warm_up_if_compiled(engine, report=lambda line: progress(NAME, line))
        for a in range(args.batch):
            engine.load_adapter(f"lora{a}", tmp / f"lora{a}")
        gen = torch.Generator().manual_seed(1)
        params = SamplingParams(max_tokens=args.warmup + 2 * args.steps + extra, temperature=0.0, ignore_eos=True)
        for a in range(args.batch):
            prompt = torch.randint(3, shape["vocab_size"], (args.context,), generator=gen).tolist()
            engine.add_request(f"r{a}", prompt, params, adapter=f"lora{a}")
        progress(NAME, "prefilling")
        started: set[str] = set()
        while len(started) < args.batch:  # every sequence has sampled its first token: from now on, decodes only
            started.update(out.request_id for out in engine.step() if out.new_token_ids)
        graphs = engine.runner.decode_graphs
        times, keys = timed_steps(engine, device, args.batch, args.warmup, args.steps)
        eager_times = None
        if graphs is not None:  # the same steps launched op by op: what the graphs save
            engine.runner.decode_graphs = None
            eager_times, _ = timed_steps(engine, device, args.batch, 1, args.steps)
            engine.runner.decode_graphs = graphs
        progress(NAME, f"profiling {PROFILED_STEPS} more steps (where the step's time goes)")
        breakdown = step_breakdown(engine, device, steps=PROFILED_STEPS)
        nbytes = step_bytes(engine, shape, args.batch, args.rank, targets, sum(keys) / len(keys))
        bw = copy_bandwidth(device, nbytes=2**30 if device.type == "cuda" else 2**26)
        attention = engine.model.attention_backend
        lora = getattr(engine, "lora_backend", None)  # resolved (auto -> torch or triton)
        del engine

    step = summarize(times)
    bound = sum(nbytes.values()) / bw
    result = {
        "benchmark": NAME, "timestamp": timestamp(), "machine": machine_info(), "git": git_commit(),
        "config": {"shape": args.shape, **shape, "dtype": str(dtype), "batch": args.batch, "rank": args.rank,
                   "targets": targets, "context": args.context, "warmup": args.warmup, "steps": args.steps,
                   "attention_backend": attention, "lora_backend": lora, "cuda_graphs": graphs is not None},
        "copy_bandwidth_gb_s": bw / 1e9,
        "bytes_per_step": {**nbytes, "total": sum(nbytes.values())},
        "bound_ms": bound * 1e3,
        "step_ms": {k: (v * 1e3 if v is not None else None) for k, v in step.items()},
        "ratio_p50_to_bound": step["p50"] / bound,
        "target_ratio": 1.3,
        "breakdown": breakdown,
    }
    if eager_times is not None:  # the same decode steps without graphs, measured after them in this run
        eager = summarize(eager_times)
        result["eager_step_ms"] = {k: (v * 1e3 if v is not None else None) for k, v in eager.items()}
        result["ratio_eager_over_graphs_p50"] = eager["p50"] / step["p50"]
    if breakdown.get("device_busy_ms"):  # what the device did vs what the step took: the rest is the host's
        breakdown["host_only_ms"] = result["step_ms"]["p50"] - breakdown["device_busy_ms"]
    if device.type != "cuda":
        result["note"] = "CPU smoke run (--allow-cpu): not a result"
    out = write_result(NAME, result, args.output)
    print(f"step p50 {step['p50'] * 1e3:.2f} ms, bound {bound * 1e3:.2f} ms "
          f"(weights {nbytes['weights'] / 1e9:.2f} GB, KV {nbytes['kv'] / 1e9:.2f} GB, adapters "
          f"{nbytes['adapters'] / 1e9:.2f} GB at {bw / 1e9:.0f} GB/s): {step['p50'] / bound:.2f}x the bound "
          f"(target <= 1.3x); attention {attention}, lora {lora} -> {out}")
    if breakdown.get("device_busy_ms"):
        print(f"device busy {breakdown['device_busy_ms']:.2f} ms a step ({breakdown['kernels_per_step']:.0f} kernels): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(breakdown["device_ms_by_kind"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
