"""The LoRA device pool (layout = slot_weights content, alloc/free/reuse/compaction, AdapterCache plug-in) and the
Triton backend against the torch backend on fused groups (interpreter on CPU, compiled on CUDA)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from shared.adapters import LoRAAdapter, LoRAModuleWeights
from services.gpu_worker.engine.adapter_cache import AdapterCache
from services.gpu_worker.lora.batch_info import LoRABatchInfo
from services.gpu_worker.lora.gpu_pool import LoRAGpuPool
from services.gpu_worker.lora.slot_weights import PROJECTION_GROUPS, build_slot_weights
from services.gpu_worker.lora.torch_backend import apply_lora
from services.gpu_worker.lora.triton_backend import PER_TOKEN_BELOW, TritonLoRABackend

LAYERS = 2
HIDDEN, Q, KV, INTER = 40, 40, 24, 56  # GQA-like: k/v narrower than q; sizes off the block multiples
WIDTHS = {"q_proj": Q, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN, "gate_proj": INTER, "up_proj": INTER,
          "down_proj": HIDDEN}
IN = {"q_proj": HIDDEN, "k_proj": HIDDEN, "v_proj": HIDDEN, "o_proj": Q, "gate_proj": HIDDEN, "up_proj": HIDDEN,
      "down_proj": INTER}
MAX_RANK = 16


def make_adapter(name: str, seed: int, ranks: dict[str, int] | None = None, layer_ranks: list | None = None):
    """An adapter with per-module ranks (a module missing from `ranks` is not targeted); per-layer overrides."""
    g = torch.Generator().manual_seed(seed)
    modules = []
    for layer in range(LAYERS):
        for module, r in ((layer_ranks or [None] * LAYERS)[layer] or ranks).items():
            modules.append(LoRAModuleWeights(layer, module, torch.randn(r, IN[module], generator=g) / 4,
                                             torch.randn(WIDTHS[module], r, generator=g) / 4, 2.0 / r))
    return LoRAAdapter(name, Path("/nonexistent"), {}, modules)


def make_pool(device, max_loras=3, dtype=torch.float32) -> LoRAGpuPool:
    return LoRAGpuPool(LAYERS, WIDTHS, LoRAGpuPool.in_features_from_widths(WIDTHS), max_loras, MAX_RANK, dtype, device)


def assert_layout(pool: LoRAGpuPool, handle, adapter: LoRAAdapter) -> None:
    """The pool rows of `handle` hold exactly what build_slot_weights lays out for `adapter`."""
    sw = build_slot_weights(adapter, LAYERS, WIDTHS, pool.dtype, pool.device)
    e = handle.entry
    for group in PROJECTION_GROUPS:
        g = pool.groups[group]
        off = int(g.row_off[e])
        for layer in range(LAYERS):
            gw = sw[layer].get(group)
            if gw is None:
                assert int(g.rank[layer, e]) == 0 and int(g.part_rank[layer, e].sum()) == 0
                continue
            r = gw.a.shape[0]
            assert int(g.rank[layer, e]) == r
            assert torch.equal(g.a[layer, off : off + r], gw.a)
            targeted = {p.out_start: p for p in gw.parts}
            for p, width in enumerate(g.widths):
                part = targeted.get(int(g.part_out[p]))
                if part is None:
                    assert int(g.part_rank[layer, e, p]) == 0
                    continue
                s = int(g.part_start[layer, e, p])
                assert (s, s + int(g.part_rank[layer, e, p])) == (part.rank_start, part.rank_end)
                assert torch.equal(g.b[layer, off + s : off + part.rank_end, :width], part.b_scaled.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_equals_slot_weights(device, dtype):
    pool = make_pool(device, dtype=dtype)
    a = make_adapter("a", 1, {"q_proj": 4, "v_proj": 16, "o_proj": 1, "up_proj": 3, "down_proj": 7})
    b = make_adapter("b", 2, layer_ranks=[{"k_proj": 2, "gate_proj": 5}, {"q_proj": 9, "k_proj": 1, "v_proj": 3}])
    ha, hb = pool.build(a), pool.build(b)
    assert ha.entry != hb.entry
    assert_layout(pool, ha, a)
    assert_layout(pool, hb, b)
    # b's qkv extent is its largest stacked rank over layers (13 in layer 1), its gate_up extent 5 (layer 0 only)
    assert pool.groups["qkv"].extents[hb.entry][1] == 13 and pool.groups["gate_up"].extents[hb.entry][1] == 5
    assert hb.entry not in pool.groups["o"].extents and pool.groups["o"].max_rank[hb.entry] == 0


def test_alloc_free_reuse_and_compaction(device):
    pool = make_pool(device, max_loras=3)
    qkv = pool.groups["qkv"]
    assert qkv.rows == 3 * MAX_RANK * 3  # max_loras x max_lora_rank x parts
    full = {"q_proj": 16, "k_proj": 16, "v_proj": 16}
    small, big1, big2, big3 = (make_adapter("s", 3, {"q_proj": 8}), make_adapter("b1", 4, full),
                               make_adapter("b2", 5, full), make_adapter("b3", 6, full))
    compactions = []
    pool.before_compact = lambda: compactions.append(len(qkv.extents))  # what a pipelined load waits on
    h_small, h1, h2 = pool.build(small), pool.build(big1), pool.build(big2)
    assert [qkv.extents[h.entry] for h in (h_small, h1, h2)] == [(0, 8), (8, 48), (56, 48)]
    assert compactions == []
    with pytest.raises(RuntimeError, match="no free entry"):
        pool.build(big3)
    pool.free(h_small)  # 48 rows free, but as 8 + 40: the next full adapter needs a compaction
    h3 = pool.build(big3)
    assert compactions == [2]  # called once, before the two live extents moved
    assert h3.entry == h_small.entry  # the entry is reused
    assert sorted(qkv.extents.values()) == [(0, 48), (48, 48), (96, 48)]
    assert int(qkv.row_off[h1.entry]) == 0 and int(qkv.row_off[h2.entry]) == 48
    for h, a in ((h1, big1), (h2, big2), (h3, big3)):
        assert_layout(pool, h, a)  # moved by the compaction, still intact
    pool.free(h3)
    with pytest.raises(ValueError, match="exceeds max_lora_rank"):
        pool.build(make_adapter("huge", 9, {"q_proj": MAX_RANK + 1}))
    assert len(pool._free_entries) == 1 and h3.entry not in qkv.extents, "a failed build gives its entry back"


def test_adapter_cache_frees_pool_entries(device):
    pool = make_pool(device, max_loras=2)
    cache = AdapterCache(2, pool.build, pool.free)
    adapters = [make_adapter(f"a{i}", 10 + i, {"q_proj": 4 + 4 * i, "down_proj": 2}) for i in range(3)]
    for a in adapters:
        cache.register(a)
    s0 = cache.acquire("a0")
    s1 = cache.acquire("a1")
    assert cache.acquire("a2") is None  # both in use
    cache.release("a0")
    s2 = cache.acquire("a2")  # evicts a0: its pool entry is reused
    assert s2 == s0 and cache.slots[s2].entry in range(2)
    assert_layout(pool, cache.slots[s2], adapters[2])
    assert_layout(pool, cache.slots[s1], adapters[1])
    cache.release("a1")
    cache.unregister("a1")  # idle: evicted at once, entry freed
    assert len(pool._free_entries) == 1 and pool.groups["down"].max_rank[cache.slots[s2].entry] == 2


@pytest.mark.parametrize("launch", ["segment", "token", "auto"])
def test_backend_matches_torch_backend(launch, device):
    dtype = torch.float32
    pool = make_pool(device, max_loras=4, dtype=dtype)
    adapters = [
        make_adapter("qv", 20, {"q_proj": 2, "v_proj": 2}),
        make_adapter("all", 21, {m: 16 for m in WIDTHS}),
        make_adapter("mlp", 22, {"gate_proj": 5, "up_proj": 1, "down_proj": 9}),
        make_adapter("layered", 23, layer_ranks=[{"o_proj": 3}, {"k_proj": 7, "up_proj": 11}]),
    ]
    cache_torch = [build_slot_weights(a, LAYERS, WIDTHS, dtype, device) for a in adapters]
    cache_pool = [None] * 4
    for slot in (2, 0, 3, 1):  # pool entries in another order than the slots
        cache_pool[slot] = pool.build(adapters[slot])
    backend = TritonLoRABackend(pool, launch)
    g = random.Random(launch)
    segments, pos = [], 1  # token 0 is base-only
    for slot in g.sample(range(4), 4):
        n = g.randint(1, 5)
        segments.append((slot, pos, pos + n))
        pos += n + g.randint(0, 2)
    T = pos
    info_t, info_p = LoRABatchInfo(segments), LoRABatchInfo(segments)
    backend.prepare(info_p, cache_pool)
    short = sum(e - s for _, s, e in segments) < PER_TOKEN_BELOW * len(segments)
    assert info_p.kernel_meta.launch.per_token == (launch == "token" or (launch == "auto" and short))
    torch.manual_seed(24)
    for layer in range(LAYERS):
        for group, names in PROJECTION_GROUPS.items():
            x = torch.randn(T, IN[names[0]], device=device, dtype=dtype)
            y = torch.randn(T, sum(WIDTHS[n] for n in names), device=device, dtype=dtype)
            want, got = y.clone(), y.clone()
            apply_lora(want, x, cache_torch, layer, group, info_t)
            backend.apply(got, x, cache_pool, layer, group, info_p)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(got[0], y[0])


def prescaled(adapter: LoRAAdapter, dtype: torch.dtype) -> LoRAAdapter:
    """The adapter as a pipelined load's source holds it (the host cache): in the pool's dtype, B times the scale."""
    modules = [LoRAModuleWeights(m.layer, m.module, m.lora_a.to(dtype), (m.lora_b * m.scale).to(dtype), 1.0)
               for m in adapter.modules]
    return LoRAAdapter(adapter.name, adapter.path, adapter.config, modules)


@pytest.mark.parametrize("source", ["adapter", "host-cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipelined_writes_equal_build(device, dtype, source):
    """reserve + write_layers group by group (as a pipelined load writes) lays out what build does, from an adapter
    as loaded (float32, scale apart) or from the host cache (the pool's dtype, B scaled: no cast, no scaling kernel);
    the metadata is set by reserve, before any weight lands."""
    from services.gpu_worker.lora.pipelined_load import PipelinedLoader, layer_groups

    pool = make_pool(device, dtype=dtype)
    a = make_adapter("a", 1, {"q_proj": 4, "v_proj": 16, "o_proj": 1, "up_proj": 3, "down_proj": 7})
    b = make_adapter("b", 2, layer_ranks=[{"k_proj": 2, "gate_proj": 5}, {"q_proj": 9, "k_proj": 1, "v_proj": 3}])
    for adapter in (a, b):
        handle = pool.reserve(adapter)
        qkv = pool.groups["qkv"]
        off, rows = qkv.extents[handle.entry]
        assert int(qkv.rank[:, handle.entry].sum()) > 0  # the metadata is set at once ...
        assert not qkv.a[:, off : off + rows].any()  # ... the weights not yet
        src = adapter if source == "adapter" else prescaled(adapter, dtype)
        load = PipelinedLoader(device).start(layer_groups(LAYERS, 4),
                                             lambda layers, h=handle, ad=src: pool.write_layers(h, ad, layers))
        load.wait()
        assert load.done() and all(load.landed(layer) for layer in range(LAYERS))
        assert_layout(pool, handle, adapter)
