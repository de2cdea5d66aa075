"""The CPU's bagged path for short LoRA segments (lora/bagged_pool.py) against the per-segment loop, its oracle."""
from __future__ import annotations

import random

import pytest
import torch

from services.gpu_worker.lora.batch_info import LoRABatchInfo
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS, build_slot_weights
from services.gpu_worker.lora.torch_backend import TorchLoRABackend, apply_lora

from tests.gpu_worker.lora.test_gpu_pool import IN, LAYERS, WIDTHS, make_adapter

GROUP_IN = {"qkv": IN["q_proj"], "o": IN["o_proj"], "gate_up": IN["gate_proj"], "down": IN["down_proj"]}
GROUP_OUT = {g: sum(WIDTHS[m] for m in ms) for g, ms in PROJECTION_GROUPS.items()}
SHAPES = [  # ranks per module: q,v; all seven; attention only; a single MLP part; rank 1
    {"q_proj": 4, "v_proj": 4},
    {m: 8 for m in WIDTHS},
    {"q_proj": 2, "k_proj": 6, "v_proj": 3, "o_proj": 5},
    {"up_proj": 7},
    {"q_proj": 1, "down_proj": 1},
]


def slot_weights(adapter):
    return build_slot_weights(adapter, LAYERS, WIDTHS, torch.float32, torch.device("cpu"))


def run(backend, slots, segments, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Every group's y after every layer's delta, from fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    info = LoRABatchInfo(list(segments))
    if backend is not None:
        backend.prepare(info, slots)
    out = {}
    for group in PROJECTION_GROUPS:
        y = torch.randn(tokens, GROUP_OUT[group], generator=g)
        for layer in range(LAYERS):
            x = torch.randn(tokens, GROUP_IN[group], generator=g)
            if backend is None:
                apply_lora(y, x, slots, layer, group, info)
            else:
                backend.apply(y, x, slots, layer, group, info)
        out[group] = y
    return out


def assert_same(got, want):
    for group in want:
        torch.testing.assert_close(got[group], want[group], rtol=1e-5, atol=1e-5, msg=group)


@pytest.mark.parametrize("seed", range(6))
def test_bagged_equals_the_loop_on_random_batches(seed):
    rng = random.Random(seed)
    adapters = [make_adapter(f"a{i}", seed * 100 + i, dict(rng.choice(SHAPES))) for i in range(7)]
    # one adapter whose ranks differ by layer (PEFT rank_pattern): not pooled, the loop does it
    adapters.append(make_adapter("uneven", seed, layer_ranks=[{"q_proj": 2, "v_proj": 4}, {"q_proj": 6}]))
    slots = [slot_weights(a) for a in adapters] + [None]
    segments, start = [], 0
    for slot in rng.sample(range(len(slots)), len(slots)):
        if rng.random() < 0.2:  # base-only tokens between segments
            start += rng.randint(1, 3)
        n = rng.choice([1, 1, 1, 2, 5, 8, 9, 20])  # decode tokens, short and long segments
        segments.append((slot, start, start + n))
        start += n
    tokens = start + rng.randint(0, 2)
    backend = TorchLoRABackend(bagged=True)
    assert_same(run(backend, slots, segments, tokens, seed), run(None, slots, segments, tokens, seed))
    assert backend.bagged._entries  # the short segments really took the bagged path


def test_classes_grow_and_refilled_slots_drop_their_old_rows():
    """Many adapters of one width (the class grows past its first capacity); a slot refilled with another adapter
    is re-pooled, and an emptied slot's entry goes back to its class."""
    shape = {"q_proj": 4, "v_proj": 4}
    backend = TorchLoRABackend(bagged=True)
    slots = [slot_weights(make_adapter(f"a{i}", i, shape)) for i in range(11)]
    segments = [(i, i, i + 1) for i in range(11)]
    assert_same(run(backend, slots, segments, 11, 0), run(None, slots, segments, 11, 0))
    (cls,) = {c for c in backend.bagged._classes.values()}
    assert cls.cap >= 11
    slots[3] = slot_weights(make_adapter("other", 99, shape))  # evicted and refilled
    slots[5] = None  # evicted
    segments = [s for s in segments if s[0] != 5]
    assert_same(run(backend, slots, segments, 11, 1), run(None, slots, segments, 11, 1))
    assert 5 not in backend.bagged._entries
    assert len(cls.free) == cls.cap - 10


def test_without_prepare_the_backend_loops():
    slots = [slot_weights(make_adapter("a", 0, {"q_proj": 4}))]
    y, want = torch.zeros(1, GROUP_OUT["qkv"]), torch.zeros(1, GROUP_OUT["qkv"])
    x = torch.randn(1, GROUP_IN["qkv"])
    info = LoRABatchInfo([(0, 0, 1)])
    TorchLoRABackend(bagged=True).apply(y, x, slots, 0, "qkv", info)
    apply_lora(want, x, slots, 0, "qkv", info)
    assert torch.equal(y, want) and y.abs().sum() > 0
