"""The Triton kernels compile for CUDA GPUs on this machine, which has none (bench/device/compile_check.py): every
kernel, launch kind and dtype for sm_90 (H100/H200, the lent machines), within its shared memory; and on an sm_86
GPU (99 KB per block) the attention wrappers' smaller tiles take over where the largest do not fit.

Run in a subprocess: Triton decides at import whether kernels are compiled or interpreted, and other tests import
them interpreted. No timing is checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from services.gpu_worker.kernel_warmup import KERNELS as KERNEL_MODULES

KERNELS = {name for names in KERNEL_MODULES.values() for name in names}


def compile_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "compile.json"
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(REPO / "bench/device/compile_check.py"), "-q", "--output", str(out),
                           *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    return done, json.loads(out.read_text()) if out.exists() else None


def test_every_kernel_compiles_for_hopper(tmp_path):
    done, result = compile_check(tmp_path, "--arch", "90", "--cases", "quick")
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout.strip())
    variants = result["variants"]
    assert {v["kernel"] for v in variants} == KERNELS
    assert {(v["kernel"], v["dtype"]) for v in variants} == {(k, d) for k in KERNELS
                                                            for d in ("bfloat16", "float16", "float32")}
    assert not result["failed"] and all(v["fits"] and "error" not in v for v in variants)
    assert all(v["shared_bytes"] <= result["shared_limit_bytes"]["sm_90"] for v in variants)
    assert all(v["shared_bytes"] > 0 for v in variants if "lora" in v["kernel"] or "paged" in v["kernel"])
    # the half-precision kernels the GPU serves with do not spill registers
    assert all(v["spill_bytes"] == 0 for v in variants if v["dtype"] != "float32"), \
        [v for v in variants if v["dtype"] != "float32" and v["spill_bytes"]]


def test_attention_falls_back_to_tiles_that_fit_a_small_gpu(tmp_path):
    done, result = compile_check(tmp_path, "--arch", "86", "--cases", "full", "--only",
                                 "attention bfloat16 head-dim-256")
    assert done.returncode == 0, done.stdout + done.stderr
    prefill = [v for v in result["variants"] if v["kernel"] == "_paged_prefill_kernel"]
    tiles = [(v["constexprs"]["BLOCK_M"], v["constexprs"]["BLOCK_N"], v["fits"]) for v in prefill]
    assert tiles == [(64, 64, False), (32, 32, True)], tiles


def test_refuses_what_it_does_not_know(tmp_path):
    done, _ = compile_check(tmp_path, "--arch", "75")
    assert done.returncode == 2 and "unknown arch 75" in done.stderr
    done, _ = compile_check(tmp_path, "--only", "no such case")
    assert done.returncode == 2 and "no case" in done.stderr


def test_help_names_the_arches_and_case_sets():
    done = subprocess.run([sys.executable, str(REPO / "bench/device/compile_check.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0
    assert all(f"{arch} (" in done.stdout for arch in (80, 86, 89, 90)) and "quick" in done.stdout
