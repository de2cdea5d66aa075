"""How the kernel tests import Triton kernels: interpreted on CPU tensors without CUDA, compiled on a GPU.

Triton decides interpreted-or-compiled when a kernel is defined (@triton.jit, at its module's import) and reads
TRITON_INTERPRET again while running it. So without CUDA, `import_kernels` sets TRITON_INTERPRET=1 only while it
imports triton and the kernel modules (collection time) and restores the environment; the `triton_interpreter`
fixture sets it again around each test that runs them (the engine's config checks it). Other test modules keep
the environment they had. With CUDA nothing is set and the same tests run compiled.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

INTERPRET = (os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
             or not torch.cuda.is_available())
DEVICE = torch.device("cpu" if INTERPRET else "cuda")


def import_kernels(*module_names: str) -> list:
    """The modules `module_names`, their kernels interpreted when INTERPRET; raises if one was already imported in
    the other mode (by a test module that imported it without this). Every kernel module of the engine
    (kernel_warmup.KERNELS) is imported alike, so an engine built in a test finds them all in one mode."""
    from services.gpu_worker.kernel_warmup import KERNELS

    before = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (its own jit functions, tl.cdiv & co., are defined interpreted too)

        for name in KERNELS:
            importlib.import_module(name)
        modules = [importlib.import_module(name) for name in module_names]
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
    for name, kernels in KERNELS.items():
        for kernel in kernels:
            interpreted = type(getattr(importlib.import_module(name), kernel)).__name__ == "InterpretedFunction"
            assert interpreted == INTERPRET, f"{name} was imported before, in the other mode"
    return modules


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 around each test when the kernels run interpreted; autouse in every test module (or
    conftest) that imports it."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
