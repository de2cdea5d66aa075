#!/usr/bin/env python
"""LoRA kernel benchmark (GPU): our unpadded multi-rank kernels vs a padded-to-max-rank layout vs torch gather+bmm.

One LoRA layer of a Llama-2-7B-shaped projection (hidden 4096 -> 4096, bfloat16), decode-shaped batches: B tokens,
each of one of min(B, --adapters) adapters (tokens grouped by adapter, as the engine lays them out), for
B in 1..256 and rank mixes uniform 8/16/32/64/128 and mixed 8-64. Timed per case (median, triton do_bench):
  ours     lora_shrink + lora_expand over the pool, each adapter at its own rank (auto launch shape)
  padded   the same kernels with every adapter padded to the batch's max rank (what a padded layout computes)
  torch    the reference shape of other systems: gather each token's padded A/B, then two bmm
Achieved bytes/s of ours (x, the used adapters' A and B rows, y read and written, t) as a fraction of the
device's copy bandwidth measured in the same run (a 1 GiB device-to-device copy). The rows give the cost curves
over (batch, max rank) and (batch, sum of ranks); a least-squares fit of each is recorded for the rank-aware
scheduler's model: ours ~ c0 + c1·B + c2·Σr, padded ~ c0 + c1·B + c2·B·r_max.

Output: JSON (default bench/results/lora_kernels.json) with machine, git commit, config, rows and fits.
Needs CUDA: exits with a message (code 2) without it. `--allow-cpu` (with TRITON_INTERPRET=1 in the environment,
float32, small --hidden) is a smoke run of the code in the Triton interpreter, timed by the wall clock: no result.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import git_commit, machine_info, progress, timestamp, write_result  # noqa: E402

MIXES = {"uniform-8": [8], "uniform-16": [16], "uniform-32": [32], "uniform-64": [64], "uniform-128": [128],
         "mixed-8-64": [8, 16, 32, 64]}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def time_us(fn, device) -> float:
    """Median microseconds of fn(): triton's do_bench on CUDA; on the CPU (smoke runs) a few wall-clock calls."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[1]


def copy_bandwidth(torch, device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted; 64 MiB on the CPU)."""
    src = torch.empty(2**30 if device == "cuda" else 2**26, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_us(lambda: dst.copy_(src), device) * 1e-6)


def make_case(torch, batch, ranks, hidden, dtype, padded: bool, dev: str):
    """Pool tensors, metadata and inputs for one case; `ranks` per adapter (padded: all set to the max)."""
    from services.gpu_worker.lora.triton_kernels import LoRALaunch
    from services.gpu_worker.lora.triton_backend import PER_TOKEN_BELOW

    n = len(ranks)
    eff = [max(ranks)] * n if padded else list(ranks)
    offs = [sum(eff[:i]) for i in range(n)]
    rows = sum(eff)
    i32 = dict(dtype=torch.int32, device=dev)
    owner = sorted(i % n for i in range(batch))  # grouped by adapter, as ModelRunner lays tokens out
    segs = [(e, owner.index(e), owner.count(e)) for e in sorted(set(owner))]
    if batch < PER_TOKEN_BELOW * len(segs):
        launch = LoRALaunch(True, torch.tensor(owner, **i32), None, None, 1)
    else:
        launch = LoRALaunch(False, torch.tensor([s[0] for s in segs], **i32), torch.tensor([s[1] for s in segs], **i32),
                            torch.tensor([s[2] for s in segs], **i32), max(s[2] for s in segs))
    return dict(
        x=torch.randn(batch, hidden, device=dev, dtype=dtype), y=torch.randn(batch, hidden, device=dev, dtype=dtype),
        a=torch.randn(rows, hidden, device=dev, dtype=dtype) / hidden**0.5,
        b=torch.randn(rows, hidden, device=dev, dtype=dtype) / 64,
        row_off=torch.tensor(offs, **i32), rank=torch.tensor(eff, **i32),
        part_rank=torch.tensor(eff, **i32).view(n, 1), part_start=torch.zeros(n, 1, **i32),
        part_out=torch.zeros(1, **i32), part_width=torch.tensor([hidden], **i32),
        launch=launch, max_rank=max(eff), used=sorted(set(owner)), eff=eff, owner=owner,
    )


def run_ours(c, hidden):
    from services.gpu_worker.lora.triton_kernels import lora_expand, lora_shrink

    t = lora_shrink(c["x"], c["a"], c["row_off"], c["rank"], c["launch"], c["max_rank"])
    lora_expand(c["y"], t, c["b"], c["row_off"], c["part_rank"], c["part_start"], c["part_out"], c["part_width"],
                c["launch"], hidden, c["max_rank"])


def torch_reference(torch, c):
    """Padded [n, r_max, K] / [n, N, r_max] stacks, then gather per token + bmm (built once, timed per call)."""
    n, r, hidden, dev = len(c["eff"]), c["max_rank"], c["x"].shape[1], c["x"].device
    a_pad = torch.zeros(n, r, hidden, device=dev, dtype=c["x"].dtype)
    b_pad = torch.zeros(n, hidden, r, device=dev, dtype=c["x"].dtype)
    for e, (off, rank) in enumerate(zip(c["row_off"].tolist(), c["eff"])):
        a_pad[e, :rank] = c["a"][off : off + rank]
        b_pad[e, :, :rank] = c["b"][off : off + rank].t()
    idx = torch.tensor(c["owner"], device=dev)

    def fn():
        t = torch.bmm(c["x"][:, None, :], a_pad[idx].transpose(1, 2))  # [B, 1, r]
        c["y"] += torch.bmm(t, b_pad[idx].transpose(1, 2))[:, 0]

    return fn


def lstsq_fit(torch, features: list[list[float]], times: list[float]) -> list[float]:
    X = torch.tensor(features, dtype=torch.float64)
    return torch.linalg.lstsq(X, torch.tensor(times, dtype=torch.float64)[:, None]).solution[:, 0].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096, help="projection width, in and out (default: 4096)")
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters at most per batch (default: 32)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="a smoke run: batches 1, 16, 256 only")
    parser.add_argument("--output", help="JSON path (default: bench/results/lora_kernels.json)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA: a smoke run of the code in the Triton interpreter (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.allow_cpu and os.environ.get("TRITON_INTERPRET") == "1"):
        print("bench/lora_kernels.py needs a CUDA GPU (the Triton kernels are timed compiled); none found "
              "(--allow-cpu with TRITON_INTERPRET=1 is a smoke run of the code)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(torch, device)
    progress("lora_kernels", f"copy bandwidth {bw / 1e9:.0f} GB/s")
    size = torch.empty((), dtype=dtype).element_size()
    rows, g = [], random.Random(0)
    for mix, choices in MIXES.items():
        for batch in [1, 16, 256] if args.quick else BATCHES:
            n = min(batch, args.adapters)
            ranks = [g.choice(choices) for _ in range(n)]
            ours = make_case(torch, batch, ranks, args.hidden, dtype, padded=False, dev=device)
            padded = make_case(torch, batch, ranks, args.hidden, dtype, padded=True, dev=device)
            us_ours = time_us(lambda: run_ours(ours, args.hidden), device)
            us_padded = time_us(lambda: run_ours(padded, args.hidden), device)
            us_torch = time_us(torch_reference(torch, ours), device)
            sum_r = sum(ranks[e] for e in ours["used"])
            nbytes = (batch * args.hidden * size * 3 + 2 * sum_r * args.hidden * size
                      + 2 * batch * max(ranks) * 4)
            row = dict(mix=mix, batch=batch, adapters=n, max_rank=max(ranks), sum_ranks=sum_r,
                       launch="token" if ours["launch"].per_token else "segment",
                       ours_us=us_ours, padded_us=us_padded, torch_us=us_torch, bytes=nbytes,
                       achieved_bytes_per_s=nbytes / (us_ours * 1e-6),
                       fraction_of_copy_bandwidth=nbytes / (us_ours * 1e-6) / bw)
            rows.append(row)
            progress("lora_kernels", f"{mix:12s} B={batch:3d} ours {us_ours:7.1f} us  padded {us_padded:7.1f} us  "
                                     f"torch {us_torch:7.1f} us  {row['fraction_of_copy_bandwidth']:.2f} of copy bw")
    fits = {
        "ours_us ~ c0 + c1*batch + c2*sum_ranks": lstsq_fit(
            torch, [[1, r["batch"], r["sum_ranks"]] for r in rows], [r["ours_us"] for r in rows]),
        "padded_us ~ c0 + c1*batch + c2*batch*max_rank": lstsq_fit(
            torch, [[1, r["batch"], r["batch"] * r["max_rank"]] for r in rows], [r["padded_us"] for r in rows]),
    }
    result = dict(benchmark="lora_kernels", timestamp=timestamp(), machine=machine_info(), git=git_commit(),
                  config=dict(hidden=args.hidden, adapters=args.adapters, dtype=args.dtype, quick=args.quick),
                  copy_bandwidth_bytes_per_s=bw, rows=rows, fits=fits)
    if device == "cpu":
        result["note"] = "CPU smoke run (--allow-cpu, Triton interpreter): not a result"
    out = write_result("lora_kernels", result, args.output)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
