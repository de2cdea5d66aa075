"""The scheduler's synchronous core: worker registry (heartbeats, expiry) and least-load placement."""
from __future__ import annotations

import pytest

from services.scheduler.placement import LeastLoadPolicy, NoWorkerError, WorkerRegistry
from shared.protocol import GenerateRequest, WorkerHeartbeat


def hb(worker_id, running=0, queued=0, model="base", resident=(), free=100, ready=True):
    return WorkerHeartbeat(worker_id=worker_id, model=model, base_fingerprint="f", max_model_len=2048,
                           max_lora_rank=64, running=running, queued=queued, running_ranks=[],
                           resident_adapters=list(resident), free_kv_blocks=free, total_kv_blocks=100,
                           interval_s=1.0, ready=ready)


def req(model="base"):
    return GenerateRequest(request_id="r", kind="completion", model=model, sampling={}, reply_to="_INBOX.x",
                           prompt="hi")


def test_registry_expires_silent_workers_only():
    reg = WorkerRegistry(timeout=3.0)
    assert reg.update(hb("a"), now=0.0) is True
    assert reg.update(hb("b"), now=2.0) is True
    assert reg.update(hb("a"), now=2.5) is False
    assert reg.expire(now=5.1) == ["b"]  # b silent 3.1 s, a only 2.6 s
    assert set(reg.workers) == {"a"}


def test_registry_boundary_and_not_ready():
    reg = WorkerRegistry(timeout=3.0)
    reg.update(hb("a"), 0.0)
    reg.update(hb("b", ready=False), 0.0)
    assert reg.expire(3.0) == []
    assert [w.heartbeat.worker_id for w in reg.ready()] == ["a"]
    assert sorted(reg.expire(3.01)) == ["a", "b"]


def test_least_load_picks_fewest_requests():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", running=5), 0)
    reg.update(hb("b", running=1, queued=1), 0)
    reg.update(hb("c", running=3), 0)
    assert LeastLoadPolicy().choose(req(), reg.ready()).heartbeat.worker_id == "b"


def test_placements_since_heartbeat_count_as_load():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a"), 0)
    reg.update(hb("b"), 0)
    policy = LeastLoadPolicy()
    picks = [policy.choose(req(), reg.ready()).heartbeat.worker_id for _ in range(6)]
    assert picks.count("a") == 3 and picks.count("b") == 3  # a burst spreads out
    reg.update(hb("a"), 1)  # a fresh heartbeat resets the estimate
    assert reg.workers["a"].placed_since == 0


def test_ties_prefer_resident_adapter_then_free_kv():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", free=50), 0)
    reg.update(hb("b", resident=["caps"], free=10), 0)
    reg.update(hb("c", free=90), 0)
    policy = LeastLoadPolicy()
    assert policy.choose(req("caps"), reg.ready()).heartbeat.worker_id == "b"
    reg2 = WorkerRegistry(3.0)
    reg2.update(hb("a", free=50), 0)
    reg2.update(hb("c", free=90), 0)
    assert policy.choose(req("base"), reg2.ready()).heartbeat.worker_id == "c"


def test_base_model_name_selects_workers_serving_it():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", model="llama"), 0)
    reg.update(hb("b", model="smol", running=9), 0)
    assert LeastLoadPolicy().choose(req("smol"), reg.ready()).heartbeat.worker_id == "b"


def test_no_ready_worker_raises():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", ready=False), 0)
    with pytest.raises(NoWorkerError, match="no GPU worker is ready"):
        LeastLoadPolicy().choose(req(), reg.ready())
