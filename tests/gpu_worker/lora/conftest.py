"""Without CUDA the Triton LoRA kernels run in the Triton interpreter on CPU tensors.

Triton decides interpreted-or-compiled when its functions are defined (when triton and the kernel module are
imported) and reads TRITON_INTERPRET again while running them. So without CUDA: TRITON_INTERPRET=1 is set while
triton and the kernels are imported here (collection time), then the environment is restored, and set again
(monkeypatch) only around each test of this directory: other test modules run with the environment they had.
With CUDA nothing is set and the same tests run compiled.
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = (os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
             or not torch.cuda.is_available())
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

if INTERPRET:
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401  (its own jit functions, tl.cdiv & co., are defined interpreted too)

        import services.gpu_worker.lora.triton_kernels as _kernels
    finally:
        if _before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _before
    assert _kernels.interpreting(), "triton was imported before this conftest, without TRITON_INTERPRET=1"


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
