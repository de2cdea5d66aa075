"""Pipelined adapter loading (services/gpu_worker/lora/pipelined_load.py): layer groups, landing in order, waits,
failures; torch slot weights written group by group equal the one-shot layout. On CUDA the loads run on a side
stream (the device fixture), on the CPU in a thread."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from shared.adapters import LoRAAdapter, LoRAModuleWeights
from services.gpu_worker.lora.pipelined_load import LoadError, PipelinedLoader, layer_groups
from services.gpu_worker.lora.slot_weights import build_slot_weights, write_slot_layers
from helpers.waiting import wait_for

LAYERS = 6
WIDTHS = {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16, "gate_proj": 24, "up_proj": 24, "down_proj": 16}
IN = {"q_proj": 16, "k_proj": 16, "v_proj": 16, "o_proj": 16, "gate_proj": 16, "up_proj": 16, "down_proj": 24}


def adapter(seed: int = 0) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = [LoRAModuleWeights(layer, m, torch.randn(r, IN[m], generator=g), torch.randn(WIDTHS[m], r, generator=g),
                                 0.5)
               for layer in range(LAYERS) for m, r in (("q_proj", 4), ("v_proj", 2), ("down_proj", 3))]
    return LoRAAdapter("a", Path("/nonexistent"), {}, modules)


def test_layer_groups():
    assert layer_groups(32, 4) == [range(0, 8), range(8, 16), range(16, 24), range(24, 32)]
    assert layer_groups(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert layer_groups(3, 4) == [range(0, 1), range(1, 2), range(2, 3)]
    with pytest.raises(ValueError):
        layer_groups(0, 4)


def test_groups_land_in_order_and_the_layout_equals_build(device):
    a = adapter()
    want = build_slot_weights(a, LAYERS, WIDTHS, torch.float32, device)
    weights = [{} for _ in range(LAYERS)]
    allowed = threading.Semaphore(0)
    loader = PipelinedLoader(device, before_group=lambda g: allowed.acquire(timeout=30))
    load = loader.start(layer_groups(LAYERS, 3),
                        lambda layers: write_slot_layers(weights, a, layers, WIDTHS, torch.float32, device))
    if device.type == "cpu":  # the thread waits for each permission: nothing lands before it
        assert not any(load.landed(layer) for layer in range(LAYERS)) and not load.done()
        assert load.seconds() is None
        allowed.release()
        wait_for(lambda: load.landed(1), 30, "the first layer group to land")
        assert load.landed(0) and load.landed(1) and not load.landed(2)  # group 0 = layers 0-1, only
        threading.Timer(0.2, allowed.release).start()
        load.wait_layer_on_device(3)  # returns once group 1 (layers 2-3) has landed, not the whole load
        assert load.landed(3) and not load.landed(4) and load.group_of(3) == 1
        allowed.release()
    else:
        allowed.release(3)
        load.wait_layer_on_device(3)  # the device waits for group 1's event (nothing to see on the host)
    load.wait()
    assert load.done() and load.seconds() > 0
    for layer in range(LAYERS):
        for group, gw in want[layer].items():
            got = weights[layer][group]
            assert torch.equal(got.a, gw.a)
            assert [(p.out_start, p.rank_start) for p in got.parts] == [(p.out_start, p.rank_start) for p in gw.parts]
            for p, q in zip(got.parts, gw.parts):
                assert torch.equal(p.b_scaled, q.b_scaled)


def test_a_failed_group_is_reported_and_later_groups_never_land():
    calls = []

    def write(layers):
        calls.append(layers)
        if layers.start == 2:
            raise RuntimeError("out of memory")

    load = PipelinedLoader(torch.device("cpu")).start(layer_groups(LAYERS, 3), write)
    with pytest.raises(LoadError, match="out of memory"):
        load.wait()
    assert calls == [range(0, 2), range(2, 4)]
    assert load.landed(0) and not load.landed(2) and not load.landed(5) and not load.done()
    with pytest.raises(LoadError):
        load.wait_on_device()
    load.wait_layer_on_device(1)  # its group landed
    with pytest.raises(LoadError):
        load.wait_layer_on_device(2)  # its group never will
    assert load.seconds() is None


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "inline"])
def test_the_load_thread_does_the_host_side_work(device, threaded):
    """The caller's thread only starts a load: every write runs on the load's own thread (on CUDA with the side
    stream current there), so a step launches its prefill without first enqueueing every copy; the thread's time
    is reported (enqueue_s). Inline (threaded=False), the caller writes them all before start returns."""
    a = adapter(1)
    want = build_slot_weights(a, LAYERS, WIDTHS, torch.float32, device)
    weights = [{} for _ in range(LAYERS)]
    seen = []  # (thread, current stream) of each write
    loader = PipelinedLoader(device, threaded=threaded)

    def write(layers):
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        seen.append((threading.get_ident(), stream))
        write_slot_layers(weights, a, layers, WIDTHS, torch.float32, device)

    load = loader.start(layer_groups(LAYERS, LAYERS), write)
    if not threaded:
        assert len(seen) == LAYERS  # written (enqueued) before start returned
    load.wait_on_device()  # every group enqueued (written, on the CPU), whatever the copies' progress
    assert len(seen) == LAYERS
    assert {thread for thread, _ in seen} == {seen[0][0]}
    assert (seen[0][0] != threading.get_ident()) == threaded
    if device.type == "cuda":
        assert all(stream == loader._stream for _, stream in seen)
    load.wait()
    assert load.done() and load.seconds() > 0 and load.enqueue_s > 0
    for layer in range(LAYERS):
        for group, gw in want[layer].items():
            assert torch.equal(weights[layer][group].a, gw.a)
