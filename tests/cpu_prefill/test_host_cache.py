"""The node host adapter cache: the slot-weights layout in shared memory, zero-copy attach from another process,
LRU eviction that never drops an adapter in use, and no segment left behind (close, dead creators)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import msgpack
import pytest
import torch

from services.cpu_prefill.host_cache import (ALIGN, HostAdapter, HostAdapterCache, HostCacheError,
                                             HostCacheFullError, attach, cleanup_stale_segments)
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS, build_slot_weights
from shared.adapters import LORA_TARGETS, BaseModelShape, LoRAAdapter, LoRAModuleWeights, load_adapter
from helpers.lora_factory import make_random_adapter

SHM = Path("/dev/shm")
REPO = Path(__file__).resolve().parents[2]


def own_segments(prefix: str = "caraserve") -> list[str]:
    return sorted(p.name for p in SHM.glob(f"{prefix}-{os.getpid()}-*"))


@pytest.fixture(autouse=True)
def no_leftover_segments():
    before = own_segments()
    yield
    assert own_segments() == before


@pytest.fixture
def prefix():
    """A prefix of this test's own, so that its segments never mix with anyone else's."""
    return f"caraservetest{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def base(default_model_path):
    """A random Llama with the default model's shapes (576 hidden, 9/3 heads, 1536 MLP), 3 layers, tiny vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(default_model_path)
    config.num_hidden_layers, config.vocab_size = 3, 512
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def widths(shape: BaseModelShape) -> dict[str, int]:
    return {name: out for name, (_, out) in shape.module_shapes.items()}


ADAPTER_CONFIGS = {
    # every target; ranks differ per module and per layer
    "all-rank-pattern": dict(r=8, target_modules=list(LORA_TARGETS),
                             rank_pattern={"model.layers.1.self_attn.q_proj": 4, "down_proj": 12},
                             alpha_pattern={"up_proj": 5.0}),
    # a qkv group without k (q and v keep their output columns), no o/gate_up, layer 1 untouched
    "some-groups": dict(r=16, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 2],
                        rank_pattern={"model.layers.2.self_attn.v_proj": 2}, use_rslora=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(ADAPTER_CONFIGS))
def test_layout_equals_slot_weights(base, tmp_path, prefix, kind, dtype):
    """The segment holds what a device slot of the cache's dtype holds, value for value."""
    shape = BaseModelShape.from_hf_config(base.config)
    path = make_random_adapter(base, tmp_path / kind, seed=3, **ADAPTER_CONFIGS[kind])
    adapter = load_adapter(path, shape, name=kind)
    expected = build_slot_weights(adapter, shape.num_layers, widths(shape), dtype, torch.device("cpu"))
    with HostAdapterCache(1 << 30, prefix=prefix, dtype=dtype) as cache:
        host = cache.put(adapter, shape.num_layers, widths(shape))
        assert host.segment.startswith(prefix + "-") and host.name == kind
        wire = HostAdapter.from_dict(msgpack.unpackb(msgpack.packb(host.to_dict())))
        assert wire == host
        shm, layers = attach(wire)
        try:
            assert len(layers) == shape.num_layers == len(expected)
            spans = []
            for got, want, meta in zip(layers, expected, host.layers):
                assert list(got) == list(want) == list(meta)  # same groups, PROJECTION_GROUPS order
                for group, (a, parts) in got.items():
                    assert group in PROJECTION_GROUPS
                    assert a.dtype == dtype and a.is_contiguous() and torch.equal(a, want[group].a)
                    assert [p[:4] for p in parts] == [(p.out_start, p.out_end, p.rank_start, p.rank_end)
                                                      for p in want[group].parts]
                    for (*_, b), p in zip(parts, want[group].parts):
                        assert b.is_contiguous() and torch.equal(b, p.b_scaled)
                    refs = [meta[group].a] + [p.b for p in meta[group].parts]
                    spans += [(r.offset, r.offset + r.numel * dtype.itemsize) for r in refs]
            spans.sort()
            assert all(start % ALIGN == 0 for start, _ in spans)
            assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no overlap
            assert spans[-1][1] <= host.nbytes <= shm.size
            # packed: the segment ends where its last tensor (of the cache's dtype's size) does, aligned
            assert host.nbytes == -(-spans[-1][1] // ALIGN) * ALIGN
            if kind == "some-groups":
                assert [sorted(layer) for layer in layers] == [["down", "qkv"], [], ["down", "qkv"]]
                assert [p[:4] for p in layers[2]["qkv"][1]] == [(0, 576, 0, 16), (768, 960, 16, 18)]
        finally:
            layers = a = parts = b = None  # drop every view before closing the mapping
            shm.close()


def random_adapter(name: str, rank: int, seed: int, num_layers: int = 2, hidden: int = 32) -> LoRAAdapter:
    """A LoRAAdapter on a 32-wide base (every target 32 -> 32) with random weights, made without PEFT."""
    g = torch.Generator().manual_seed(seed)
    modules = [LoRAModuleWeights(layer, m, torch.randn(rank, hidden, generator=g),
                                 torch.randn(hidden, rank, generator=g), scale=0.5)
               for layer in range(num_layers) for m in LORA_TARGETS]
    return LoRAAdapter(name=name, path=Path(name), config={}, modules=modules)


SMALL_WIDTHS = {m: 32 for m in LORA_TARGETS}


def test_odd_shapes_stay_aligned(prefix):
    """Tensors whose byte sizes are not multiples of 64 still start on 64-byte boundaries, values intact."""
    adapter = random_adapter("odd", rank=3, seed=5, hidden=5)
    odd_widths = {m: 5 for m in LORA_TARGETS}
    expected = build_slot_weights(adapter, 2, odd_widths, torch.float32, torch.device("cpu"))
    with HostAdapterCache(1 << 20, prefix=prefix) as cache:
        host = cache.put(adapter, 2, odd_widths)
        refs = [r for layer in host.layers for grp in layer.values() for r in [grp.a] + [p.b for p in grp.parts]]
        assert all(r.offset % ALIGN == 0 for r in refs) and refs[0].numel * 4 % ALIGN != 0
        shm, layers = attach(host)
        try:
            got = [t for layer in layers for a, parts in layer.values() for t in [a] + [p[4] for p in parts]]
            want = [t for layer in expected for w in layer.values() for t in [w.a] + [p.b_scaled for p in w.parts]]
            assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
        finally:
            got = layers = None
            shm.close()


def _child_reads(wire: dict, to_parent, from_parent) -> None:
    """Spawned child: attach, report every tensor and its address in the mapping, then re-read after a write."""
    import ctypes

    shm, layers = attach(HostAdapter.from_dict(wire))
    base_addr = ctypes.addressof(ctypes.c_char.from_buffer(shm.buf))
    tensors = [t for layer in layers for a, parts in layer.values() for t in [a] + [p[4] for p in parts]]
    to_parent.put(([t.clone() for t in tensors], [t.data_ptr() - base_addr for t in tensors]))
    from_parent.get(timeout=60)  # the parent has written into the segment
    to_parent.put(float(layers[0]["qkv"][0][0, 0]))
    del tensors, layers
    shm.close()


def test_other_process_attaches_without_copy(prefix):
    adapter = random_adapter("a", rank=8, seed=1)
    ctx = mp.get_context("spawn")
    to_parent, from_parent = ctx.Queue(), ctx.Queue()
    with HostAdapterCache(1 << 24, prefix=prefix) as cache:
        cache.put(adapter, 2, SMALL_WIDTHS)
        host = cache.acquire("a")
        child = ctx.Process(target=_child_reads, args=(host.to_dict(), to_parent, from_parent))
        child.start()
        shm, layers = attach(host)
        try:
            tensors, offsets = to_parent.get(timeout=60)
            mine = [t for layer in layers for a, parts in layer.values() for t in [a] + [p[4] for p in parts]]
            refs = [r for layer in host.layers for grp in layer.values() for r in [grp.a] + [p.b for p in grp.parts]]
            assert len(tensors) == len(mine) == 2 * 4 * 1 + 2 * 7  # per layer 4 A's and 7 B's
            assert all(torch.equal(t, m) for t, m in zip(tensors, mine))
            assert offsets == [r.offset for r in refs]  # the child's views point into the mapping itself
            mine[0][0, 0] = 1234.5
            from_parent.put("written")
            assert to_parent.get(timeout=60) == 1234.5  # the child sees the write: shared, not copied
        finally:
            mine = layers = None
            shm.close()
            child.join(timeout=60)
            if child.is_alive():  # only when an assertion above failed
                child.kill()
                child.join()
            cache.release("a")
        assert child.exitcode == 0


CHILD = """
import sys, time
from services.cpu_prefill.host_cache import HostAdapterCache, HostAdapter, attach
from test_host_cache import SMALL_WIDTHS, random_adapter
mode, prefix = sys.argv[1], sys.argv[2]
if mode == "attach":  # attach to a segment of the parent, read it, exit without closing
    shm, layers = attach(HostAdapter(name="x", segment=sys.argv[3], nbytes=1, layers=()))
    print(shm.size, flush=True)
else:  # own a cache, then wait to be killed
    cache = HostAdapterCache(1 << 24, prefix=prefix)
    print(" ".join(cache.put(random_adapter(n, 4, i), 2, SMALL_WIDTHS).segment for i, n in enumerate("ab")), flush=True)
    time.sleep(600)
"""


def run_child(*args: str, **kwargs) -> subprocess.Popen:
    path = os.pathsep.join(map(str, [REPO, REPO / "tests", Path(__file__).parent]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            text=True, **kwargs)


def test_attaching_process_exit_does_not_unlink(prefix):
    """A process with its own resource tracker attaches and exits: the segment must survive, silently."""
    with HostAdapterCache(1 << 24, prefix=prefix) as cache:
        host = cache.put(random_adapter("a", rank=8, seed=1), 2, SMALL_WIDTHS)
        child = run_child("attach", prefix, host.segment, stderr=subprocess.PIPE)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0 and int(out) >= host.nbytes
        assert "leaked" not in err and "Traceback" not in err, err
        assert (SHM / host.segment).exists()
    assert not (SHM / host.segment).exists()


def test_lru_eviction_order(prefix):
    size = HostAdapterCache(1 << 24, prefix=prefix)
    one = size.put(random_adapter("probe", 8, 0), 2, SMALL_WIDTHS).nbytes
    size.close()
    with HostAdapterCache(3 * one, prefix=prefix) as cache:
        hosts = {n: cache.put(random_adapter(n, 8, i), 2, SMALL_WIDTHS) for i, n in enumerate("abc")}
        assert cache.names() == ["a", "b", "c"]
        cache.acquire("a")
        cache.release("a")  # a becomes the most recent
        cache.put(random_adapter("d", 8, 3), 2, SMALL_WIDTHS)
        assert cache.names() == ["c", "a", "d"] and not cache.contains("b")
        assert not (SHM / hosts["b"].segment).exists()
        cache.put(random_adapter("e", 8, 4), 2, SMALL_WIDTHS)
        assert cache.names() == ["a", "d", "e"]
        assert not (SHM / hosts["c"].segment).exists()
        assert cache.evict("d") and cache.names() == ["a", "e"]
        stats = cache.stats()
        assert stats["evictions"] == 3 and stats["entries"] == 2 and stats["used_bytes"] == 2 * one
        assert cache.acquire("zzz") is None and cache.stats()["misses"] == 1


def test_eviction_never_drops_in_use(prefix):
    probe = HostAdapterCache(1 << 24, prefix=prefix)
    one = probe.put(random_adapter("probe", 8, 0), 2, SMALL_WIDTHS).nbytes
    probe.close()
    with HostAdapterCache(2 * one, prefix=prefix) as cache:
        a = cache.put(random_adapter("a", 8, 1), 2, SMALL_WIDTHS)
        cache.put(random_adapter("b", 8, 2), 2, SMALL_WIDTHS)
        assert cache.acquire("a") == a and cache.acquire("b") is not None
        with pytest.raises(HostCacheFullError, match="in use"):
            cache.put(random_adapter("c", 8, 3), 2, SMALL_WIDTHS)
        assert cache.names() == ["a", "b"] and cache.refcount("a") == 1
        assert not cache.evict("a") and cache.contains("a")
        with pytest.raises(HostCacheError, match="in use"):
            cache.put(random_adapter("a", 8, 9), 2, SMALL_WIDTHS)  # replacing an adapter in use
        cache.release("b")
        cache.put(random_adapter("c", 8, 3), 2, SMALL_WIDTHS)  # evicts b, the only idle one, though a is older
        assert cache.names() == ["a", "c"] and (SHM / a.segment).exists()
        with pytest.raises(HostCacheFullError):
            cache.put(random_adapter("huge", 64, 4), 2, SMALL_WIDTHS)  # bigger than the whole cache
        cache.release("a")
        with pytest.raises(HostCacheError):
            cache.release("a")  # no reference left
        new_a = cache.put(random_adapter("a", 8, 9), 2, SMALL_WIDTHS)  # idle now: replaced, old segment gone
        assert new_a.segment != a.segment and not (SHM / a.segment).exists()


def test_close_leaves_no_segment():
    cache = HostAdapterCache(1 << 24)
    hosts = [cache.put(random_adapter(n, 4, i), 2, SMALL_WIDTHS) for i, n in enumerate("abc")]
    cache.acquire("a")
    assert len(own_segments()) == 3 and all(h.segment.startswith(f"caraserve-{os.getpid()}-") for h in hosts)
    cache.close()
    assert own_segments() == []
    with pytest.raises(HostCacheError, match="closed"):
        cache.put(random_adapter("d", 4, 3), 2, SMALL_WIDTHS)


def test_cleanup_stale_segments_of_killed_process(prefix):
    child = run_child("own", prefix, start_new_session=True)
    try:
        segments = child.stdout.readline().split()
        assert len(segments) == 2 and all(s.startswith(f"{prefix}-{child.pid}-") for s in segments)
        assert cleanup_stale_segments(prefix) == []  # its creator is alive
        assert cleanup_stale_segments(prefix, alive_pids={child.pid}) == []
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its resource tracker: a hard crash
        child.wait(timeout=30)
        child.stdout.close()
    assert all((SHM / s).exists() for s in segments)
    with HostAdapterCache(1 << 24, prefix=prefix) as mine:  # a live creator's segment is kept
        kept = mine.put(random_adapter("m", 4, 0), 2, SMALL_WIDTHS)
        assert sorted(cleanup_stale_segments(prefix)) == sorted(segments)
        assert not any((SHM / s).exists() for s in segments) and (SHM / kept.segment).exists()
        assert cleanup_stale_segments(prefix) == []
