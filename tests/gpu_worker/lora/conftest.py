"""Without CUDA the Triton LoRA kernels run in the Triton interpreter on CPU tensors (helpers/triton_mode.py)."""
from __future__ import annotations

import pytest
import torch

from helpers.triton_mode import DEVICE, import_kernels, interpreter_env

import_kernels("services.gpu_worker.lora.triton_kernels")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    interpreter_env(monkeypatch)


@pytest.fixture
def device() -> torch.device:
    return DEVICE
