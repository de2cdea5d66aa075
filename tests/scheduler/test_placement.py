"""The scheduler's synchronous core: worker registry (heartbeats, expiry) and live placement (Placer) over the
policies of services/scheduler/policies.py (tested on their own in test_policies.py)."""
from __future__ import annotations

import pytest

from services.scheduler.perf_model import PerfModel
from services.scheduler.placement import NoWorkerError, Placer, RankTooHighError, WorkerRegistry
from shared.protocol import GenerateRequest, WorkerHeartbeat

MODEL = PerfModel(form="max_rank", decode_base_s=0.02, decode_per_seq_s=0.0005, decode_per_rank_s=2e-5,
                  prefill_base_s=0.01, prefill_per_token_s=1e-4, prefill_per_token_rank_s=1e-7, no_lora_tpot_s=0.025)


def hb(worker_id, running=0, queued=0, model="base", resident=(), free=100, ready=True, ranks=None, perf=MODEL,
       gpu=(), finished=()):
    ranks = list(ranks) if ranks is not None else [0] * running
    return WorkerHeartbeat(worker_id=worker_id, model=model, base_fingerprint="f", max_model_len=2048,
                           max_lora_rank=64, running=len(ranks), queued=queued, running_ranks=ranks,
                           resident_adapters=list(resident), free_kv_blocks=free, total_kv_blocks=100,
                           interval_s=1.0, ready=ready, perf_model=perf.to_dict() if perf else None,
                           slo_tpot_s=perf.default_slo_tpot_s() if perf else 0.0, gpu_adapters=list(gpu),
                           max_num_seqs=64, block_size=16, finished=list(finished))


def req(model="base", max_tokens=32, prompt="hello there"):
    return GenerateRequest(request_id="r", kind="completion", model=model, sampling={"max_tokens": max_tokens},
                           reply_to="_INBOX.x", prompt=prompt)


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


def test_most_idle_picks_fewest_requests():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", running=5), 0)
    reg.update(hb("b", running=1, queued=1), 0)
    reg.update(hb("c", running=3), 0)
    assert Placer("most_idle").choose(req(), 0, reg.ready()).worker_id == "b"


@pytest.mark.parametrize("policy", ["rank_aware", "most_idle"])
def test_placements_since_heartbeat_count_as_load(policy):
    reg = WorkerRegistry(3.0)
    reg.update(hb("a"), 0)
    reg.update(hb("b"), 0)
    placer = Placer(policy)
    picks = [placer.choose(req(), 0, reg.ready()).worker_id for _ in range(6)]
    assert picks.count("a") == 3 and picks.count("b") == 3  # a burst spreads out
    view = reg.workers["a"].view()
    assert len(view.queued) == 3  # placed requests wait as prefills in the view
    assert view.free_kv_tokens == 100 * 16 - 3 * (req().prompt_tokens_hint() + 32)
    reg.update(hb("a"), 1)  # a fresh heartbeat resets the estimate
    assert reg.workers["a"].placed == [] and reg.workers["a"].view().queued == []


def test_rank_aware_avoids_a_high_rank_hotspot_that_load_alone_cannot_see():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", ranks=[64, 64, 64, 64]), 0)  # same load as b, but every step pays for rank 64 x 5
    reg.update(hb("b", ranks=[8, 8, 8, 8]), 0)
    assert Placer("most_idle").choose(req("small"), 8, reg.ready()).worker_id == "a"  # a tie: first by id
    reg.update(hb("a", ranks=[64, 64, 64, 64]), 1)
    reg.update(hb("b", ranks=[8, 8, 8, 8]), 1)
    assert Placer("rank_aware").choose(req("small"), 8, reg.ready()).worker_id == "b"


def test_rank_aware_prefers_the_worker_holding_the_adapter():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a"), 0)
    reg.update(hb("b", resident=["caps"], gpu=["caps"]), 0)
    assert Placer("rank_aware").choose(req("caps"), 8, reg.ready()).worker_id == "b"


def test_a_worker_without_a_model_means_placement_by_load():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", ranks=[64, 64, 64, 64]), 0)
    reg.update(hb("b", ranks=[8, 8, 8, 8], perf=None), 0)
    assert reg.workers["b"].model is None
    assert Placer("rank_aware").choose(req("small"), 8, reg.ready()).worker_id == "a"  # most_idle: tie, first id


def test_an_unusable_model_is_ignored_not_fatal():
    reg = WorkerRegistry(3.0)
    bad = hb("a")
    bad.perf_model = {"form": "cubic"}
    reg.update(bad, 0)
    assert reg.workers["a"].model is None
    assert Placer().choose(req(), 0, reg.ready()).worker_id == "a"


def test_model_is_parsed_once_per_distinct_dict():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a"), 0)
    first = reg.workers["a"].model
    reg.update(hb("a"), 1)
    assert reg.workers["a"].model is first and first == MODEL


def test_base_model_name_selects_workers_serving_it():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", model="llama"), 0)
    reg.update(hb("b", model="smol", running=9), 0)
    assert Placer().choose(req("smol"), 0, reg.ready()).worker_id == "b"


def test_no_ready_worker_raises():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a", ready=False), 0)
    with pytest.raises(NoWorkerError, match="no GPU worker is ready"):
        Placer().choose(req(), 0, reg.ready())


def test_rank_above_every_worker_is_refused():
    reg = WorkerRegistry(3.0)
    reg.update(hb("a"), 0)
    with pytest.raises(RankTooHighError, match="rank 128; the workers take at most 64"):
        Placer().choose(req("huge"), 128, reg.ready())


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="rank_aware"):
        Placer("fastest")


def test_finished_lengths_reach_the_policy():
    placer = Placer("rank_aware")
    seen = []
    placer.policy.observe_finish = lambda adapter, tokens: seen.append((adapter, tokens))
    placer.observe(hb("a", finished=[("caps", 12), ("", 40)]))
    assert seen == [("caps", 12), (None, 40)]
