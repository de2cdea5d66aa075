"""Without CUDA the Triton LoRA kernels run in the Triton interpreter on CPU tensors (helpers/triton_mode.py)."""
from __future__ import annotations

import pytest
import torch

from helpers.triton_mode import DEVICE, import_kernels, triton_interpreter  # noqa: F401 (autouse)

import_kernels("services.gpu_worker.lora.triton_kernels")


@pytest.fixture
def device() -> torch.device:
    return DEVICE
