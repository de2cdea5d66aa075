"""CPU-assisted prefill: worker pool deltas vs the torch reference, failure handling, and the LoRA backend.

Run with OMP_NUM_THREADS=1 (the workers are single-threaded anyway; the test process should not oversubscribe).
Every test checks that its pools leave no worker process and no /dev/shm segment behind.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the spawned workers (they also set 1 torch thread)

from services.cpu_prefill.backend import CpuAssistLoRABackend
from services.cpu_prefill.handoff import DONE_SEQ, REQ_SEQ
from services.cpu_prefill.host_cache import HostAdapterCache, attach
from services.cpu_prefill.pool import CpuAssistTimeout, CpuPrefillPool
from services.cpu_prefill.segments import SHM_DIR, pid_alive
from services.cpu_prefill.worker import compute_dtype, lora_delta_
from services.gpu_worker.lora.batch_info import LoRABatchInfo
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS, build_slot_weights
from services.gpu_worker.lora.torch_backend import TorchLoRABackend
from shared.adapters import LoRAAdapter, LoRAModuleWeights
from helpers.waiting import wait_for

NUM_LAYERS = 2
HIDDEN, KV, INTER = 64, 32, 96
WIDTHS = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN, "gate_proj": INTER, "up_proj": INTER,
          "down_proj": HIDDEN}
IN_FEATURES = {"q_proj": HIDDEN, "k_proj": HIDDEN, "v_proj": HIDDEN, "o_proj": HIDDEN, "gate_proj": HIDDEN,
               "up_proj": HIDDEN, "down_proj": INTER}
GROUP_IN = {"qkv": HIDDEN, "o": HIDDEN, "gate_up": HIDDEN, "down": INTER}
GROUP_OUT = {"qkv": HIDDEN + 2 * KV, "o": HIDDEN, "gate_up": 2 * INTER, "down": HIDDEN}
MAX_TOKENS = 48

# name -> (module -> rank): ranks 1..64, different target sets (and a per-module rank, as rank_pattern gives)
ADAPTERS = {
    "r1-qv": {"q_proj": 1, "v_proj": 1},
    "r16-all": {"q_proj": 16, "k_proj": 7, "v_proj": 16, "o_proj": 16, "gate_proj": 16, "up_proj": 3,
                "down_proj": 16},
    "r64-mlp-o": {"o_proj": 64, "gate_proj": 64, "down_proj": 64},
}


def make_adapter(name: str, ranks: dict[str, int], seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = [
        LoRAModuleWeights(layer, module, torch.randn(r, IN_FEATURES[module], generator=g) * 0.2,
                          torch.randn(WIDTHS[module], r, generator=g) * 0.2, scale=2.0 / r ** 0.5)
        for layer in range(NUM_LAYERS) for module, r in ranks.items()
    ]
    return LoRAAdapter(name=name, path=Path(name), config={}, modules=modules)


@pytest.fixture(scope="module")
def adapters() -> list[LoRAAdapter]:
    return [make_adapter(name, ranks, seed) for seed, (name, ranks) in enumerate(ADAPTERS.items())]


@pytest.fixture(scope="module")
def host_cache(adapters):
    cache = HostAdapterCache(64 << 20)
    hosts = [cache.put(a, NUM_LAYERS, WIDTHS) for a in adapters]
    yield cache, hosts
    cache.close()
    assert not [h.segment for h in hosts if (SHM_DIR / h.segment).exists()], "an adapter segment was left behind"


@pytest.fixture(scope="module")
def slot_weights(adapters):
    return [build_slot_weights(a, NUM_LAYERS, WIDTHS, torch.float32, torch.device("cpu")) for a in adapters]


def new_pool(workers: int, **kwargs) -> CpuPrefillPool:
    return CpuPrefillPool(workers, MAX_TOKENS, max(GROUP_IN.values()), max(GROUP_OUT.values()), **kwargs)


def assert_closed_clean(pool: CpuPrefillPool, pids: list[int], names: list[str]) -> None:
    pool.close()
    for name in names:
        assert not (SHM_DIR / name).exists(), f"channel {name} left behind"
    for pid in pids:
        assert not pid_alive(pid), f"worker {pid} still alive"


def reference_delta(sw, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
    # torch_backend semantics on a zero output: the delta to add, x @ Aᵀ @ (sB)ᵀ per part
    y = torch.zeros(x.shape[0], GROUP_OUT[group])
    TorchLoRABackend().apply(y, x, [sw], layer, group, LoRABatchInfo([(0, 0, x.shape[0])]))
    return y


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}workers")
def pool(request):
    p = new_pool(request.param)
    pids, names = p.pids(), p.segment_names()
    yield p
    assert_closed_clean(p, pids, names)


@pytest.mark.parametrize("tokens", [1, 3, 37, 2 * MAX_TOKENS + 5])
def test_pool_delta_matches_torch_reference(pool, host_cache, slot_weights, tokens):
    _, hosts = host_cache
    g = torch.Generator().manual_seed(tokens)
    for host, sw in zip(hosts, slot_weights):
        for layer in range(NUM_LAYERS):
            for group in PROJECTION_GROUPS:
                x = torch.randn(tokens, GROUP_IN[group], generator=g)
                delta = pool.compute_delta(host, layer, group, x, out_features=GROUP_OUT[group])
                expected = reference_delta(sw, layer, group, x)
                assert delta.shape == expected.shape
                torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
                y = torch.randn(tokens, GROUP_OUT[group], generator=g)
                got = pool.compute_delta(host, layer, group, x, out_features=GROUP_OUT[group], add_to=y.clone())
                torch.testing.assert_close(got, y + expected, rtol=1e-5, atol=1e-5)
    assert pool.alive() == len(pool.pids())
    if tokens >= len(pool.pids()):  # the tokens were split: every worker answered tasks
        assert all(w.channel.ctrl[DONE_SEQ] > 0 for w in pool._workers)


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs CUDA: on a GPU the copies are async on the stream"))])
def test_handoff_through_the_stream_matches(host_cache, slot_weights, device):
    """signal_through(device): the input slice and the request seq go out by copies on the device's stream (on the
    CPU the same copies run synchronously), the delta comes back into a tensor on the device; same deltas as the
    reference, token splits and several rounds included."""
    _, hosts = host_cache
    p = new_pool(2, device=torch.device(device))
    pids, names = p.pids(), p.segment_names()
    try:
        assert all(w.channel.signals_on_stream for w in p._workers)
        g = torch.Generator().manual_seed(5)
        for tokens in (1, 7, 2 * MAX_TOKENS + 5):
            for host, sw in zip(hosts, slot_weights):
                for group in PROJECTION_GROUPS:
                    x = torch.randn(tokens, GROUP_IN[group], generator=g)
                    y = torch.randn(tokens, GROUP_OUT[group], generator=g)
                    got = p.compute_delta(host, 1, group, x.to(device), out_features=GROUP_OUT[group],
                                          add_to=y.to(device, copy=True))
                    torch.testing.assert_close(got.cpu(), y + reference_delta(sw, 1, group, x), rtol=1e-5,
                                               atol=1e-5)
        for w in p._workers:  # every request seq landed where the worker reads it
            assert w.channel.ctrl[REQ_SEQ] == w.channel.last_seq == w.channel.ctrl[DONE_SEQ] > 0
    finally:
        assert_closed_clean(p, pids, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs CUDA: on a GPU the copies are async on the stream"))])
def test_half_precision_engine_hands_over_its_dtype(adapters, dtype, device):
    """A half-precision engine's pool: host cache and channels in its dtype (the workers read them as such and
    multiply natively where the CPU can), x goes out and the delta comes back in it; the deltas agree with the
    float32 reference within the dtype's rounding."""
    cache = HostAdapterCache(64 << 20, dtype=dtype)
    hosts = [cache.put(a, NUM_LAYERS, WIDTHS) for a in adapters]
    p = new_pool(2, dtype=dtype, device=torch.device(device))
    pids, names = p.pids(), p.segment_names()
    try:
        assert all(w.channel.dtype == dtype for w in p._workers)
        assert all(h.torch_dtype == dtype for h in hosts)
        f32 = HostAdapterCache(64 << 20)
        try:  # the same adapters laid out in float32: the half-precision segments take half the bytes
            assert [h.nbytes for h in hosts] < [f32.put(a, NUM_LAYERS, WIDTHS).nbytes for a in adapters]
        finally:
            f32.close()
        g = torch.Generator().manual_seed(9)
        for tokens in (1, 37):
            for host, adapter in zip(hosts, adapters):
                sw = build_slot_weights(adapter, NUM_LAYERS, WIDTHS, torch.float32, torch.device("cpu"))
                for group in PROJECTION_GROUPS:
                    x = torch.randn(tokens, GROUP_IN[group], generator=g).to(dtype)
                    y = torch.randn(tokens, GROUP_OUT[group], generator=g).to(dtype)
                    got = p.compute_delta(host, 1, group, x.to(device), out_features=GROUP_OUT[group],
                                          add_to=y.to(device, copy=True))
                    assert got.dtype == dtype and got.device.type == device
                    want = y.float() + reference_delta(sw, 1, group, x.float())
                    torch.testing.assert_close(got.cpu().float(), want, rtol=0.0,
                                               atol=2e-2 * want.abs().max().item())
    finally:
        assert_closed_clean(p, pids, names)
        cache.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute", ["native", "float32"])
def test_worker_delta_from_half_precision_weights(adapters, dtype, compute):
    """lora_delta_ on half-precision weights, multiplied in their dtype (where the CPU has kernels for it) or
    converted to float32, into a half-precision or a float32 output."""
    cache = HostAdapterCache(64 << 20, dtype=dtype)
    try:
        host = cache.put(adapters[1], NUM_LAYERS, WIDTHS)  # r16-all: every group, ranks 3..16
        shm, layers = attach(host)
        sw = build_slot_weights(adapters[1], NUM_LAYERS, WIDTHS, torch.float32, torch.device("cpu"))
        g = torch.Generator().manual_seed(3)
        for group in PROJECTION_GROUPS:
            x = torch.randn(11, GROUP_IN[group], generator=g)
            want = reference_delta(sw, 0, group, x.to(dtype).float())
            for out_dtype in (dtype, torch.float32):
                out = torch.full((11, GROUP_OUT[group]), float("nan"), dtype=out_dtype)
                lora_delta_(out, x.to(out_dtype), layers[0][group],
                            compute=compute_dtype(dtype) if compute == "native" else torch.float32)
                torch.testing.assert_close(out.float(), want, rtol=0.0, atol=2e-2 * want.abs().max().item())
        layers = None
        shm.close()
    finally:
        cache.close()


def test_the_spin_window_is_the_engines_and_travels_in_the_channel():
    """The worker's busy-poll window after a task is set by the engine in the channel (so joined workers follow it
    too): short next to a CPU engine, long next to a GPU engine; an attached worker waits that long before its
    first idle check."""
    from services.cpu_prefill.handoff import GPU_SPIN_S, SPIN_S, HandoffChannel

    p = new_pool(1)
    try:
        assert p.spin_s == SPIN_S and all(w.channel.spin_s == SPIN_S for w in p._workers)
    finally:
        p.close()
    if CUDA:
        p = new_pool(1, device=torch.device("cuda"))
        try:
            assert all(w.channel.spin_s == GPU_SPIN_S for w in p._workers)
        finally:
            p.close()
    channel = HandoffChannel.create(4, 8, 8, spin_s=0.25)
    worker_side = HandoffChannel.attach(channel.name)
    try:
        assert worker_side.spin_s == 0.25
        idle_at = []
        started = time.perf_counter()
        assert worker_side.wait_request(0, lambda: idle_at.append(time.perf_counter()) or True) is None
        assert idle_at[0] - started >= 0.25  # busy-polled the whole window before going idle
    finally:
        worker_side.close()
        channel.close()


def test_an_idle_worker_sleeps_said_and_wakes_to_spin_again():
    """Past its window the worker sleeps with its sleeping flag set; a sleep that was woken (the engine's wake
    message on its connection) is followed by a whole window of spinning, not by a longer sleep."""
    from services.cpu_prefill.handoff import HandoffChannel

    channel = HandoffChannel.create(4, 8, 8, spin_s=0.1)
    worker_side = HandoffChannel.attach(channel.name)
    sleeps, idles = [], []

    def sleep(seconds: float) -> bool:
        assert channel.sleeping()  # as the engine sees it
        sleeps.append(time.perf_counter())
        if len(sleeps) == 1:
            return True  # woken
        time.sleep(seconds)
        return False

    try:
        assert not channel.sleeping()
        assert worker_side.wait_request(0, lambda: idles.append(1) or len(idles) == 3, sleep=sleep) is None
        assert len(sleeps) == 2 and sleeps[1] - sleeps[0] >= 0.1  # spun the window again after the wake
        assert not channel.sleeping()
    finally:
        worker_side.close()
        channel.close()


def test_a_sleeping_worker_is_woken_with_its_task(host_cache, slot_weights):
    _, hosts = host_cache
    p = new_pool(1)
    pids, names = p.pids(), p.segment_names()
    try:
        worker = p._workers[0]
        x = torch.randn(5, GROUP_IN["o"])
        p.compute_delta(hosts[1], 0, "o", x, out_features=GROUP_OUT["o"])  # (the adapter's layout sent: known)
        wait_for(worker.channel.sleeping, 10, "the idle worker to sleep")  # past its 50 us window
        sent = []
        send = worker.conn.send
        worker.conn.send = lambda message: sent.append(message[0]) or send(message)
        got = p.compute_delta(hosts[1], 0, "o", x, out_features=GROUP_OUT["o"])
        torch.testing.assert_close(got, reference_delta(slot_weights[1], 0, "o", x), rtol=1e-5, atol=1e-5)
        assert sent == ["wake"]  # with the task, since it slept
    finally:
        assert_closed_clean(p, pids, names)


def test_channel_is_busy_until_the_submitted_seq_is_answered():
    """With requests handed over by the stream, the request seq field lags what the engine submitted until the
    device writes it: whether the buffers may be rewritten is decided by the engine's own count."""
    from services.cpu_prefill.handoff import HandoffChannel

    channel = HandoffChannel.create(4, 8, 8)
    try:
        channel.signal_through(torch.device("cpu"))
        seq = channel.submit(torch.ones(2, 8), adapter_id=1, layer=0, group=0, out_width=8)
        assert channel.ctrl[REQ_SEQ] == seq == channel.last_seq == 1
        assert channel.input_view(2, 8).eq(1).all()
        channel.ctrl[REQ_SEQ] = 0  # as if the device had not yet written it: the worker saw nothing
        assert not channel.idle()
        with pytest.raises(RuntimeError, match="not answered"):
            channel.submit(torch.ones(2, 8), adapter_id=1, layer=0, group=0, out_width=8)
        channel.ctrl[REQ_SEQ] = seq
        channel.finish(seq, 1)  # (the worker's side)
        assert channel.idle()
    finally:
        channel.close()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_stream_handoff_never_waits_for_the_device(host_cache):
    """The engine's thread enqueues a request behind ~0.2 s of device work and goes on at once: no synchronising
    call (torch's sync debug mode would raise), the worker sees the request only once the device has run up to it,
    and the segment is page-locked (else the driver would make the copies synchronous)."""
    from services.cpu_prefill.handoff import HandoffChannel

    channel = HandoffChannel.create(MAX_TOKENS, HIDDEN, HIDDEN)
    try:
        channel.signal_through(torch.device("cuda"))
        assert channel._pinned is not None and channel.input_view(1, HIDDEN).is_pinned()
        x = torch.randn(3, HIDDEN, device="cuda", dtype=torch.bfloat16)
        warm = channel.submit(x, adapter_id=1, layer=0, group=0, out_width=HIDDEN)  # first allocations, untimed
        torch.cuda.synchronize()
        channel.finish(warm, 1)  # (as the worker would)
        torch.cuda._sleep(400_000_000)  # cycles: 0.2-0.3 s of device time at 1.4-2 GHz
        torch.cuda.set_sync_debug_mode("error")
        try:
            t0 = time.perf_counter()
            seq = channel.submit(x, adapter_id=1, layer=0, group=0, out_width=HIDDEN)
            submitted_s = time.perf_counter() - t0
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert submitted_s < 0.05 and channel.ctrl[REQ_SEQ] != seq  # enqueued, not landed
        torch.cuda.synchronize()
        assert channel.ctrl[REQ_SEQ] == seq
        torch.testing.assert_close(channel.input_view(3, HIDDEN), x.float().cpu())
    finally:
        channel.close()


def test_killed_worker_raises_quickly_and_leaves_nothing(host_cache, slot_weights):
    _, hosts = host_cache
    p = new_pool(2, timeout_s=30.0)
    pids, names = p.pids(), p.segment_names()
    victim = p._workers[0]
    os.kill(victim.handle.pid, signal.SIGSTOP)  # it cannot answer: the kill below lands mid-task for sure

    def kill_when_submitted() -> None:
        deadline = time.monotonic() + 10
        while victim.channel.ctrl[REQ_SEQ] == victim.channel.ctrl[DONE_SEQ] and time.monotonic() < deadline:
            time.sleep(1e-4)
        os.kill(victim.handle.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_submitted)
    killer.start()
    x = torch.randn(20, HIDDEN)
    t0 = time.monotonic()
    with pytest.raises(CpuAssistTimeout):
        p.compute_delta(hosts[1], 0, "qkv", x, out_features=GROUP_OUT["qkv"])
    elapsed = time.monotonic() - t0
    killer.join()
    assert elapsed < 2.0, f"took {elapsed:.2f} s to notice a dead worker (timeout 30 s)"
    assert p.alive() == 1
    assert not (SHM_DIR / names[0]).exists()  # the dead worker's channel is unlinked at once
    # the survivor takes every token
    delta = p.compute_delta(hosts[1], 0, "qkv", x, out_features=GROUP_OUT["qkv"])
    torch.testing.assert_close(delta, reference_delta(slot_weights[1], 0, "qkv", x), rtol=1e-5, atol=1e-5)
    p.add_workers(1)  # the node scales back up while serving
    assert p.alive() == 2
    delta = p.compute_delta(hosts[2], 1, "gate_up", x, out_features=GROUP_OUT["gate_up"])
    torch.testing.assert_close(delta, reference_delta(slot_weights[2], 1, "gate_up", x), rtol=1e-5, atol=1e-5)
    assert_closed_clean(p, pids + p.pids(), names + p.segment_names())


def test_stalled_worker_times_out(host_cache):
    _, hosts = host_cache
    p = new_pool(1, timeout_s=0.3)
    pids, names = p.pids(), p.segment_names()
    os.kill(pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(CpuAssistTimeout):
        p.compute_delta(hosts[0], 1, "qkv", torch.randn(4, HIDDEN), out_features=GROUP_OUT["qkv"])
    assert 0.25 < time.monotonic() - t0 < 3.0
    assert p.alive() == 0
    with pytest.raises(CpuAssistTimeout):  # nobody left: refuse at once
        p.compute_delta(hosts[0], 1, "qkv", torch.randn(4, HIDDEN), out_features=GROUP_OUT["qkv"])
    assert_closed_clean(p, pids, names)


# ---- the backend ---------------------------------------------------------------------------------------------
# flat batch of 40 tokens: adapter 0 prefill [0, 9) + decode [9, 11); base-only [11, 14); adapter 1 prefill
# [14, 30); adapter 2 decode [30, 32) + prefill [32, 40)
SEGMENTS = [(0, 0, 11), (1, 14, 30), (2, 30, 40)]
PREFILLS = [(0, 9), (11, 14), (14, 30), (32, 40)]
T = 40


def run_model_layers(backend, slots, info: LoRABatchInfo, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    outs = []
    for layer in range(NUM_LAYERS):
        for group in PROJECTION_GROUPS:
            x = torch.randn(T, GROUP_IN[group], generator=g)
            y = torch.randn(T, GROUP_OUT[group], generator=g)
            backend.apply(y, x, slots, layer, group, info)
            outs.append(y)
    return outs


@pytest.fixture(scope="module")
def pool2():
    p = new_pool(2)
    pids, names = p.pids(), p.segment_names()
    yield p
    assert_closed_clean(p, pids, names)


def test_task_failure_is_reported_and_the_worker_keeps_serving(pool2, host_cache, slot_weights):
    import dataclasses

    from services.cpu_prefill.pool import CpuAssistError

    _, hosts = host_cache
    missing = dataclasses.replace(hosts[0], segment=f"caraserve-{os.getpid()}-nosuchsegment")
    x = torch.randn(6, HIDDEN)
    with pytest.raises(CpuAssistError) as err:
        pool2.compute_delta(missing, 0, "qkv", x, out_features=GROUP_OUT["qkv"])
    assert not isinstance(err.value, CpuAssistTimeout)
    assert pool2.alive() == 2
    delta = pool2.compute_delta(hosts[0], 0, "qkv", x, out_features=GROUP_OUT["qkv"])
    torch.testing.assert_close(delta, reference_delta(slot_weights[0], 0, "qkv", x), rtol=1e-5, atol=1e-5)


def expected_outputs(slot_weights) -> list[torch.Tensor]:
    return run_model_layers(TorchLoRABackend(), slot_weights, LoRABatchInfo(SEGMENTS))


def test_backend_matches_torch_backend(pool2, host_cache, slot_weights):
    _, hosts = host_cache
    backend = CpuAssistLoRABackend(TorchLoRABackend(), pool2, lambda slot: hosts[slot])
    info = LoRABatchInfo(SEGMENTS)
    backend.prepare(info, slot_weights, prefill_ranges=PREFILLS)
    for got, want in zip(run_model_layers(backend, slot_weights, info), expected_outputs(slot_weights)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert backend.fallbacks == 0


def test_backend_begin_hands_the_first_range_over_before_the_projection(pool2, host_cache, slot_weights):
    """begin() (the model calls it before each base projection) hands the first CPU range to the workers at once;
    apply() waits for that one and computes the others: same outputs, as many ranges on the workers."""
    _, hosts = host_cache
    asked = []  # on_cpu's questions: once per range and projection, begin's answers serving apply too
    backend = CpuAssistLoRABackend(TorchLoRABackend(), pool2, lambda slot: hosts[slot], out_widths=GROUP_OUT,
                                   on_cpu=lambda *question: asked.append(question) or True)
    info = LoRABatchInfo(SEGMENTS)
    backend.prepare(info, slot_weights, prefill_ranges=PREFILLS)
    g = torch.Generator().manual_seed(0)  # run_model_layers' inputs, with begin() before each apply()
    outs, handed = [], 0
    for layer in range(NUM_LAYERS):
        for group in PROJECTION_GROUPS:
            x = torch.randn(T, GROUP_IN[group], generator=g)
            y = torch.randn(T, GROUP_OUT[group], generator=g)
            seqs = [w.channel.last_seq for w in pool2._workers]
            backend.begin(x, slot_weights, layer, group, info)
            started = info.kernel_meta.started
            if started is not None:  # handed over: every worker got its slice before the projection
                handed += 1
                first = next(r for r in ((0, 0, 9), (1, 14, 30), (2, 32, 40))  # the prefill ranges, in order
                             if hosts[r[0]].layers[layer].get(group) is not None)
                assert started[:3] == (layer, group, first)
                assert [w.channel.last_seq for w in pool2._workers] == [q + 1 for q in seqs]
            backend.apply(y, x, slot_weights, layer, group, info)
            assert info.kernel_meta.started is None
            outs.append(y)
    assert handed == NUM_LAYERS * len(PROJECTION_GROUPS)  # adapter 0 targets every group in every layer
    for got, want in zip(outs, expected_outputs(slot_weights)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert backend.fallbacks == 0 and backend.cpu_ranges > handed
    assert len(asked) == len(set(asked)) == NUM_LAYERS * len(PROJECTION_GROUPS) * len(info.kernel_meta.assisted)


def test_backend_routes_prefill_to_workers_and_decode_to_inner(pool2, host_cache, slot_weights):
    """With the adapters absent from the inner backend's slots, only the workers can produce prefill deltas."""
    _, hosts = host_cache
    backend = CpuAssistLoRABackend(TorchLoRABackend(), pool2, lambda slot: hosts[slot])
    absent = [None] * len(slot_weights)
    info = LoRABatchInfo(SEGMENTS)
    backend.prepare(info, absent, prefill_ranges=PREFILLS)
    got = run_model_layers(backend, absent, info)
    want = expected_outputs(slot_weights)
    base = run_model_layers(TorchLoRABackend(), absent, LoRABatchInfo(SEGMENTS))  # y untouched
    decode_rows = [9, 10, 30, 31]
    prefill_rows = [r for r in range(T) if r not in decode_rows]
    for g, w, b in zip(got, want, base):
        torch.testing.assert_close(g[prefill_rows], w[prefill_rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g[decode_rows], b[decode_rows])  # decode went to the inner backend only


def test_backend_pipelined_layers_and_fallback(host_cache, slot_weights):
    """Layer 1 'landed' (inner backend), layer 0 on the CPU; then a dead worker: every range falls back."""
    _, hosts = host_cache
    p = new_pool(1, timeout_s=5.0)
    pids, names = p.pids(), p.segment_names()
    calls = []
    backend = CpuAssistLoRABackend(TorchLoRABackend(), p, lambda slot: hosts[slot],
                                   on_cpu=lambda slot, layer, group, tokens: layer == 0, on_fallback=calls.append)
    info = LoRABatchInfo(SEGMENTS)
    backend.prepare(info, slot_weights, prefill_ranges=None)
    want = expected_outputs(slot_weights)
    for got, w in zip(run_model_layers(backend, slot_weights, info), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    assert backend.fallbacks == 0

    info = LoRABatchInfo(SEGMENTS)
    backend.prepare(info, slot_weights)  # the worker is alive: the step is assisted
    os.kill(pids[0], signal.SIGKILL)  # ... and dies mid-step
    p._workers[0].handle.process.join(5)
    for got, w in zip(run_model_layers(backend, slot_weights, info), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    # one failed call; then, no worker left, the rest of the step runs on the inner backend without asking again
    assert backend.fallbacks == 1 and sorted(calls) == [0, 1, 2]
    info = LoRABatchInfo(SEGMENTS)
    backend.prepare(info, slot_weights)  # a step that starts with no worker is not assisted: no failure at all
    for got, w in zip(run_model_layers(backend, slot_weights, info), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    assert backend.fallbacks == 1
    assert_closed_clean(p, pids, names)


ENGINE_SCRIPT = """
import json, sys, time
from services.cpu_prefill.pool import CpuPrefillPool
if __name__ == "__main__":
    pool = CpuPrefillPool(2, 4, 8, 8)
    print(json.dumps({"pids": pool.pids(), "segments": pool.segment_names()}), flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_the_engine_dies(tmp_path):
    """An engine killed with SIGKILL: its workers notice (reparented) and exit; its segments can be cleaned up."""
    import json
    import subprocess
    import sys

    from services.cpu_prefill.segments import cleanup_stale_segments

    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    engine = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=repo)
    try:
        info = json.loads(engine.stdout.readline())
    finally:
        engine.kill()
        engine.wait()
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in info["pids"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in info["pids"]), "a worker outlived its engine"
    cleanup_stale_segments()  # the supervisor's job (the engine's resource tracker may already have done it)
    assert not [s for s in info["segments"] if (SHM_DIR / s).exists()]
