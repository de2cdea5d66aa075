"""Prepacked CPU linear layers (services/gpu_worker/model/linear.py): same products as F.linear, and used."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.gpu_worker.model.linear import can_prepack, linear, prepack

pytestmark = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 64, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_prepacked_linear_equals_f_linear(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, 96, generator=g)
    bias = torch.randn(200, generator=g) if with_bias else None
    x = torch.randn(rows, 96, generator=g)
    packed = prepack(weight)
    assert packed.is_mkldnn and tuple(packed.shape) == (200, 96)
    torch.testing.assert_close(linear(x, packed, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=0, atol=0)  # plain path


def test_prepacked_linear_reads_strided_rows():
    weight = torch.randn(64, 32)
    x = torch.randn(10, 64)[:, :32]  # a column slice, as a split of a fused projection gives
    torch.testing.assert_close(linear(x, prepack(weight)), F.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_only_float32_cpu_weights_are_prepacked():
    assert can_prepack(torch.device("cpu"), torch.float32)
    assert not can_prepack(torch.device("cpu"), torch.bfloat16)
    assert not can_prepack(torch.device("cuda"), torch.float32)


def test_engine_on_cpu_runs_prepacked_weights(default_model_path):
    from services.gpu_worker.engine.config import EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.profiler import default_model_path as cached_profile_path

    engine = LLMEngine(EngineConfig(model=str(default_model_path), num_kv_blocks=16))
    model = engine.model
    assert model.linear_kernels == "onednn" and "-onednn-" in cached_profile_path(engine).name  # a new profile
    assert all(t.is_mkldnn for lw in model.weights.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down))
    assert model.lm_head.is_mkldnn
    assert not model.weights.embed.is_mkldnn and model.weights.lm_head is model.weights.embed  # tied: rows looked up
