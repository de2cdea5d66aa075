#!/usr/bin/env python
"""Compile every Triton kernel variant the engine launches for CUDA GPUs, on a machine without one.

Triton's compiler (Python source -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, with the ptxas its wheel ships) needs
no GPU: only loading a kernel onto one does. This script drives the kernel wrappers (LoRA shrink and expand, paged
attention decode and prefill, the fused layer ops) over the launch shapes of the model families we serve and, for
each --arch, compiles each launch's variant instead of running it. The specialization is Triton's own (its binder,
as a real launch computes it: dtypes, constexprs, integers equal to 1, 16-byte alignment), so what compiles here is
what a GPU would compile at that launch. A variant that asks for more shared memory than the arch allows one block raises
OutOfResources at its launch, as Triton's loader does on the GPU, so the wrappers' fallbacks (smaller attention
tiles) run as they would there. For each variant it reports that shared memory and, from cuobjdump, its registers
and spilled bytes per thread.

    python bench/device/compile_check.py                       # sm_90, the quick case set (what CI runs)
    python bench/device/compile_check.py --arch 80,86,89,90 --cases full --output bench/results/triton_compile.json

Exit status 1 if a launch fails on an arch: a compile error, or no tile that fits. No GPU, CUDA toolkit or driver
needed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels (JITFunction), not the interpreter's

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from bench.common import git_commit, machine_info, progress, timestamp, write_result  # noqa: E402
from services.gpu_worker.attention import triton_paged_attention as attention  # noqa: E402
from services.gpu_worker.kernel_warmup import KERNELS  # noqa: E402
from services.gpu_worker.lora import triton_kernels as lora  # noqa: E402
from services.gpu_worker.model import fused_layer_ops  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

NAME = "triton_compile"
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
GPUS = {80: "A100", 86: "A10G, A40, RTX 3090", 89: "L4, L40S, RTX 4090", 90: "H100, H200"}


@dataclass(frozen=True)
class Shape:
    """The dimensions of a model family that choose kernel variants."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


SHAPES = {
    "smollm2-135m": Shape(576, 9, 3, 64, 1536),  # the embedded default (GQA 3, head_dim 64)
    "llama-2-7b": Shape(4096, 32, 32, 128, 11008),  # MHA
    "llama-3-8b": Shape(4096, 32, 8, 128, 14336),  # GQA 4
    "head-dim-256": Shape(2048, 8, 1, 256, 16384),  # the widest head the attention kernels take (MQA)
    "head-dim-80": Shape(2560, 32, 32, 80, 10240),  # a head_dim that is not a power of two
}
LAUNCHES = ("token", "segment<=16", "segment>16")
RANKS = (8, 32, 64, 256)  # one per rank tile width (16, 32, 64), and the widest rank
# (dtype, shapes, max ranks): the quick set (CI) covers every kernel and launch kind in each dtype at least once
CASES = {
    "quick": [(torch.bfloat16, ["llama-3-8b"], (8, 64)), (torch.float16, ["llama-2-7b"], (32,)),
              (torch.float32, ["smollm2-135m"], (8, 64))],
    "full": [(dtype, list(SHAPES), RANKS) for dtype in (torch.bfloat16, torch.float16, torch.float32)],
}


@dataclass
class Launch:
    kernel: Any  # the JITFunction
    args: tuple
    kwargs: dict


class CompileFailed(RuntimeError):
    pass


@contextlib.contextmanager
def intercepting(handler: Callable[[Launch], None]) -> Iterator[None]:
    """Within: each kernel launch through a wrapper goes to `handler` instead of a device (nothing runs)."""

    class Intercepted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: handler(Launch(self.kernel, args, kwargs))

    modules = [(importlib.import_module(module), names) for module, names in KERNELS.items()]
    saved = [(module, name, getattr(module, name)) for module, names in modules for name in names]
    for module, name, kernel in saved:
        if type(kernel).__name__ != "JITFunction":
            raise RuntimeError(f"{name} is a {type(kernel).__name__}: import this module without TRITON_INTERPRET")
        setattr(module, name, Intercepted(kernel))
    fitting = dict(attention._fitting_tile)
    attention._fitting_tile.clear()  # tiles that fit another arch say nothing of this one
    try:
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
        attention._fitting_tile.clear()
        attention._fitting_tile.update(fitting)


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def drive_lora(dtype: torch.dtype, shape: Shape, max_rank: int, launch_kind: str) -> None:
    """Shrink and expand of each projection group of `shape` (q/k/v fused, o, gate/up fused, down), two adapters."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    groups = [(shape.hidden, [q, kv, kv]), (q, [shape.hidden]), (shape.hidden, [shape.intermediate] * 2),
              (shape.intermediate, [shape.hidden])]
    tokens = 40
    if launch_kind == "token":
        launch = lora.LoRALaunch(True, _i32([0, 1, -1, 1] * (tokens // 4)), None, None, 1)
    else:
        length = 10 if launch_kind == "segment<=16" else 20
        launch = lora.LoRALaunch(False, _i32([0, 1]), _i32([0, length]), _i32([length, length]), length)
    for in_features, widths in groups:
        parts, stacked = len(widths), max_rank * len(widths)
        x = torch.zeros(tokens, in_features, dtype=dtype)
        a = torch.zeros(2 * stacked, in_features, dtype=dtype)
        b = torch.zeros(2 * stacked, max(widths), dtype=dtype)
        y = torch.zeros(tokens, sum(widths), dtype=dtype)
        t = lora.lora_shrink(x, a, _i32([0, stacked]), _i32([stacked, stacked]), launch, stacked)
        part_rank = _i32([[max_rank] * parts] * 2)
        part_start = _i32([[max_rank * p for p in range(parts)]] * 2)
        part_out = _i32([sum(widths[:p]) for p in range(parts)])
        lora.lora_expand(y, t, b, _i32([0, stacked]), part_rank, part_start, part_out, _i32(widths), launch,
                         max(widths), stacked)


def drive_attention(dtype: torch.dtype, shape: Shape) -> None:
    """Decode and chunked prefill over a paged cache of `shape`'s heads (the engine's cache layout)."""
    block_size, batch = 16, 4
    k_cache = torch.zeros(64 * block_size, shape.kv_heads, shape.head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    q = torch.zeros(batch, shape.heads, shape.head_dim, dtype=dtype)
    tables = torch.zeros(batch, 8, dtype=torch.int32)
    attention.paged_attention_decode(q, k_cache, v_cache, tables, _i32([5] * batch), block_size, 0.1)
    attention.paged_attention_prefill(q, k_cache, v_cache, tables[:2], _i32([0, 2]), _i32([2, 2]), _i32([0, 3]), 2,
                                      block_size, 0.1)


def drive_layer_ops(dtype: torch.dtype, shape: Shape) -> None:
    """The fused layer kernels of `shape`: both RMSNorms (with and without the residual), SiLU·mul, RoPE + cache."""
    tokens, slots = 8, 64
    h = torch.zeros(tokens, shape.hidden, dtype=dtype)
    w = torch.zeros(shape.hidden, dtype=dtype)
    fused_layer_ops.rms_norm(h, w, 1e-5)
    fused_layer_ops.rms_norm(h, w, 1e-5, residual=torch.zeros_like(h))
    fused_layer_ops.silu_mul(torch.zeros(tokens, 2 * shape.intermediate, dtype=dtype))
    qkv = torch.zeros(tokens, (shape.heads + 2 * shape.kv_heads) * shape.head_dim, dtype=dtype)
    cos = torch.zeros(256, shape.head_dim)
    cache = torch.zeros(slots, shape.kv_heads, shape.head_dim, dtype=dtype)
    index = torch.zeros(tokens, dtype=torch.long)
    fused_layer_ops.rope_and_cache(qkv, index, cos, cos, cache, cache, index, shape.heads, shape.kv_heads)


def cases(name: str) -> list[tuple[str, Callable[[], None]]]:
    """(label, drive) of every wrapper call in the case set `name`."""
    out = []
    for dtype, shapes, ranks in CASES[name]:
        label = str(dtype).removeprefix("torch.")
        for shape in shapes:
            for max_rank in ranks:
                for kind in LAUNCHES:
                    out.append((f"lora {label} {shape} rank {max_rank} {kind}",
                                lambda d=dtype, s=SHAPES[shape], r=max_rank, k=kind: drive_lora(d, s, r, k)))
            out.append((f"attention {label} {shape}", lambda d=dtype, s=SHAPES[shape]: drive_attention(d, s)))
            out.append((f"layer ops {label} {shape}", lambda d=dtype, s=SHAPES[shape]: drive_layer_ops(d, s)))
    return out


class Loader:
    """Stands in for a GPU of one compute capability at each launch: compiles the launch's variant (Triton's own
    specialization, each variant once) and, as Triton's loader does, raises OutOfResources when it asks for more
    shared memory than the arch has (the attention wrappers then try smaller tiles) or the compile error."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.variants: dict[str, dict[str, Any]] = {}

    def __call__(self, launch: Launch) -> None:
        signature, constexprs, attrs, options = self.specialize(launch)
        key = repr((launch.kernel.fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items())))
        if key not in self.variants:
            self.variants[key] = {"arch": f"sm_{self.arch}", **describe(launch, constexprs),
                                  **self.compile(launch, signature, constexprs, attrs, options)}
        row = self.variants[key]
        if "error" in row:
            raise CompileFailed(row["error"])
        if not row["fits"]:
            raise OutOfResources(row["shared_bytes"], SHARED_LIMIT[self.arch], "shared memory")

    def specialize(self, launch: Launch) -> tuple[dict, dict, dict, Any]:
        """(signature, constexprs, attrs, options) exactly as JITFunction.run computes them before compiling."""
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, specialization, options = binder(*launch.args, **launch.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, launch.kwargs, bound,
                                                                  specialization, options)
        return signature, constexprs, attrs, options

    def compile(self, launch: Launch, signature: dict, constexprs: dict, attrs: dict, options) -> dict[str, Any]:
        from triton.compiler import ASTSource

        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=self.target,
                                      options=options.__dict__)
        except Exception as e:  # a compile error is this script's finding, reported with the variant
            return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}",
                    "compile_s": round(time.perf_counter() - start, 2)}
        shared = int(compiled.metadata.shared)
        return {"fits": shared <= SHARED_LIMIT[self.arch], "shared_bytes": shared,
                "compile_s": round(time.perf_counter() - start, 2), **resource_usage(compiled.asm["cubin"])}


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers and stack bytes per thread of a cubin, as cuobjdump reads them. A Triton kernel calls nothing and
    holds no local arrays, so its stack is spilled registers: local memory traffic in the kernel's loops."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(found.group(1)), "spill_bytes": int(found.group(2))} if found else {}


def describe(launch: Launch, constexprs: dict) -> dict[str, Any]:
    """The variant in words: kernel, data dtype (the floating dtype other than float32, else float32), constexprs."""
    floats = {a.dtype for a in launch.args if isinstance(a, torch.Tensor) and a.is_floating_point()}
    params = launch.kernel.params
    return {"kernel": launch.kernel.fn.__name__,
            "dtype": str(next(iter(floats - {torch.float32}), torch.float32)).removeprefix("torch."),
            "constexprs": {params[k[0]].name: v for k, v in constexprs.items()
                           if len(k) == 1 and params[k[0]].is_constexpr}}


def check(arches: list[int], case_set: str, only: str = "",
          report: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run every wrapper call of `case_set` (whose label holds `only`) against a Loader of each arch; the variants
    compiled and the calls that failed (a compile error, or no tile that fits), as a dict."""
    variants, failed = [], []
    chosen = [(label, drive) for label, drive in cases(case_set) if only in label]
    if not chosen:
        raise ValueError(f"no case of the {case_set} set matches {only!r}")
    for arch in arches:
        loader = Loader(arch)
        with intercepting(loader):
            for label, drive in chosen:
                try:
                    drive()
                except (CompileFailed, OutOfResources) as e:
                    failed.append({"arch": f"sm_{arch}", "case": label, "error": str(e)})
                    report(f"sm_{arch} FAILED {label}: {e}")
        for row in loader.variants.values():
            report(f"sm_{arch} {'error' if 'error' in row else 'fits' if row['fits'] else 'over'} {row['kernel']} "
                   f"{row['dtype']} {row['constexprs']} shared {row.get('shared_bytes', '-')} regs "
                   f"{row.get('registers', '-')} spill {row.get('spill_bytes', '-')} {row['compile_s']}s "
                   f"{row.get('error', '')}")
        variants.extend(loader.variants.values())
    return {"variants": variants, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="90",
                    help="compute capabilities, comma separated, of " + ", ".join(
                        f"{a} ({g})" for a, g in GPUS.items()) + " (default 90)")
    ap.add_argument("--cases", choices=sorted(CASES), default="quick",
                    help="quick: each kernel, launch kind and dtype once (CI); full: every shape, rank tile and dtype")
    ap.add_argument("--only", default="", metavar="TEXT",
                    help='only the cases whose label holds TEXT, e.g. "attention bfloat16 head-dim-256" or "lora"')
    ap.add_argument("--output", help="write the JSON result here (default: print a summary only)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per variant")
    args = ap.parse_args(argv)
    try:
        arches = [int(a) for a in args.arch.split(",")]
        unknown = [a for a in arches if a not in SHARED_LIMIT]
        if unknown:
            raise ValueError(f"unknown arch {unknown[0]}")
    except ValueError as e:
        print(f"compile_check: {e}; known: {', '.join(map(str, SHARED_LIMIT))}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        result = check(arches, args.cases, args.only, report=(lambda line: None) if args.quiet else
                       (lambda line: progress(NAME, line)))
    except ValueError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    over = sum(1 for v in result["variants"] if not v.get("fits", True))
    summary = (f"{len(result['variants'])} variants compiled for {', '.join(f'sm_{a}' for a in arches)} "
               f"({over} over its shared memory per block); "
               f"{len(result['failed'])} launches failed ({time.perf_counter() - started:.0f} s)")
    print(summary)
    if args.output:
        write_result(NAME, {"benchmark": NAME, "timestamp": timestamp(), "machine": machine_info(),
                            "commit": git_commit(), "triton": triton.__version__, "cases": args.cases,
                            "only": args.only,
                            "shared_limit_bytes": {f"sm_{a}": SHARED_LIMIT[a] for a in arches}, **result},
                     args.output)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
