"""Helpers shared by every benchmark: machine and commit info, result files, small statistics.

Every benchmark writes one JSON file under bench/results/ that records what ran where: `machine_info()` (CPU,
cores, memory, load, library versions, torch threads, GPU if any), `git_commit()` (HEAD and whether the tree was
dirty) and a UTC timestamp, so results from different machines or commits are never mixed up silently.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where that is not available."""
    try:
        cores, phys = set(), "0"
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        return len(cores) or None
    except OSError:
        return None


def _memory_gib() -> dict[str, float] | None:
    try:
        info = {}
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    info[key] = int(value.split()[0]) * 1024 / 2**30
        available = info.get("MemAvailable")
        return {"total": round(info["MemTotal"], 2), "available": None if available is None else round(available, 2)}
    except (OSError, KeyError, ValueError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            return {"total": round(total, 2), "available": None}
        except (ValueError, OSError, AttributeError):
            return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or metadata missing
        return None


def machine_info() -> dict[str, Any]:
    """What the benchmark ran on. Imports torch (every benchmark here needs it anyway)."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {m: _version(m) for m in ("torch", "transformers", "peft", "numpy", "triton")},
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda_version"] = torch.version.cuda
    except ImportError:
        info["torch_threads"] = None
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ}
    return info


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """{"commit": HEAD sha or None, "dirty": True if tracked files differ from HEAD (None if unknown)}. Without git
    (a copy of the tree on a GPU machine: bench/device/session.sh), the commit the caller names in CARASERVE_COMMIT."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None and os.environ.get("CARASERVE_COMMIT"):  # a copy of the tree without git (a GPU machine)
        return {"commit": os.environ["CARASERVE_COMMIT"], "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def result_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_result(name: str, data: dict[str, Any], path: str | os.PathLike | None = None) -> Path:
    """Write `data` as indented JSON to bench/results/<name>.json (or to `path`); return the path written."""
    out = Path(path) if path is not None else result_path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99, min, max of `values` (all None when there are none: JSON has no NaN)."""
    if not values:
        return {k: None for k in ("mean", "p50", "p90", "p99", "min", "max")}
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


def progress(prefix: str, message: str) -> None:
    """One progress line on stderr, flushed."""
    print(f"[{prefix}] {message}", file=sys.stderr, flush=True)


def gpu_or_smoke(name: str, allow_cpu: bool, why: str):
    """(device, dtype) for a GPU benchmark: CUDA and bfloat16; with `allow_cpu` and no GPU, the CPU and float32 (a
    smoke run of the code). None, after a one-line message on stderr, when there is no GPU and no permission."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if not allow_cpu:
        print(f"{name}: needs a CUDA GPU ({why}); none is available", file=sys.stderr)
        return None
    return torch.device("cpu"), torch.float32
