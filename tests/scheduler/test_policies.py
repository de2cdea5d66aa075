"""Placement policies on hand-built worker states where the right choice is known."""
from __future__ import annotations

import copy

import pytest

from services.scheduler.perf_model import PerfModel
from services.scheduler.placement import NoWorkerError
from services.scheduler.policies import (POLICY_NAMES, RankAwarePolicy, RequestView, WorkerView, candidates,
                                         make_policy)

# Dec(S) = 10 ms + 1 ms·|S| + 0.1 ms·|S|·max rank;  Pre(Q) = 5 ms + Σ 0.1 ms·n
MODEL = PerfModel(form="max_rank", decode_base_s=0.010, decode_per_seq_s=0.001, decode_per_rank_s=0.0001,
                  prefill_base_s=0.005, prefill_per_token_s=0.0001, prefill_per_token_rank_s=0.0,
                  no_lora_tpot_s=0.010)


def wv(worker_id, running=(), queued=(), gpu=(), host=(), max_rank=64, max_running=64, free=10**6, slo=1.0,
       model=MODEL):
    return WorkerView(worker_id=worker_id, model=model, slo_tpot_s=slo, running_ranks=list(running),
                      queued=list(queued), gpu_adapters=frozenset(gpu), host_adapters=frozenset(host),
                      max_lora_rank=max_rank, max_running=max_running, free_kv_tokens=free)


def req(rank=8, adapter="a", prompt=100, max_tokens=100, rid="r"):
    return RequestView(request_id=rid, adapter=adapter, rank=rank, prompt_tokens=prompt, max_tokens=max_tokens)


def test_rank_aware_avoids_a_high_rank_hotspot():
    hot, cool = wv("a", running=[64, 64]), wv("b", running=[8, 8])
    policy = make_policy("rank_aware")
    # a rank-8 request would be padded to 64 on "a" (Δdecode 7.4 ms) but not on "b" (1.8 ms)
    assert policy.choose(req(rank=8), [hot, cool]) is cool
    # a rank-64 request costs "a" one more rank-64 row (7.4 ms) but would pad all of "b" (18.6 ms)
    assert policy.choose(req(rank=64), [hot, cool]) is hot
    # load-only policies do not see the difference: most_idle takes the first by id
    assert make_policy("most_idle").choose(req(rank=8), [hot, cool]) is hot


def test_rank_aware_sum_rank_model_has_no_padding_to_avoid():
    model = PerfModel.from_dict({**MODEL.to_dict(), "form": "sum_rank"})
    hot, cool = wv("a", running=[64, 64], model=model), wv("b", running=[8, 8], model=model)
    # with unpadded kernels the request adds its own rank wherever it goes: equal scores, ties by worker id
    assert make_policy("rank_aware").choose(req(rank=8), [cool, hot]) is hot


def test_rank_aware_prefers_the_worker_holding_the_adapter():
    policy = make_policy("rank_aware")
    plain, on_host, on_gpu = wv("a", running=[8]), wv("b", running=[8], host={"x"}), wv("c", running=[8], gpu={"x"})
    assert policy.choose(req(adapter="x"), [plain, on_host, on_gpu]) is on_gpu
    assert policy.choose(req(adapter="x"), [plain, on_host]) is on_host
    assert policy.choose(req(adapter="y"), [plain, on_host, on_gpu]) is plain  # nobody holds it: by id
    # residency only breaks ties: a cheaper worker still wins over a resident but busier one
    busy_resident = wv("a", running=[8, 8, 8], gpu={"x"})
    assert policy.choose(req(adapter="x"), [busy_resident, wv("b", running=[8])]).worker_id == "b"


def test_rank_aware_skips_a_worker_whose_slo_would_break():
    # "a" is the lighter one, but one more request takes its step to 10 + 2 + 1.6 = 13.6 ms > its 13 ms SLO
    tight, loose = wv("a", running=[8], slo=0.013), wv("b", running=[8, 8, 8], slo=1.0)
    assert make_policy("rank_aware").choose(req(rank=8), [tight, loose]) is loose
    # without the SLO check "a" would have won
    assert make_policy("rank_aware").choose(req(rank=8), [wv("a", running=[8]), loose]).worker_id == "a"


def test_rank_aware_still_serves_when_every_worker_would_break_its_slo():
    a, b = wv("a", running=[8, 8, 8], slo=0.001), wv("b", running=[8], slo=0.001)
    assert make_policy("rank_aware").choose(req(), [a, b]) is b  # the least loaded


def test_rank_aware_idle_worker_scores_zero():
    busy, idle = wv("a", running=[8]), wv("b")
    assert make_policy("rank_aware").choose(req(), [busy, idle]) is idle


def test_rank_aware_counts_queued_requests_and_their_prefill():
    policy = RankAwarePolicy()
    w = wv("a", running=[8], queued=[(50, 64)])
    # Δdecode over running + queued ranks [8, 64] + 8: 1 ms + 0.1 ms·(3·64 − 2·64) = 7.4 ms;
    # Δprefill: 100 more tokens, 10 ms (the queue already pays the 5 ms base)
    cost = policy.cost(req(rank=8, prompt=100, max_tokens=10), w, expected_len=10)
    assert cost == pytest.approx(0.0074 + 0.010 / 10)
    assert policy.score(req(rank=8, prompt=100, max_tokens=10), w, 10) == pytest.approx(2 * cost)


def test_rank_aware_expected_output_length():
    policy = RankAwarePolicy()
    assert policy.expected_output_len(req(adapter="x", max_tokens=50)) == 50  # nothing known: max_tokens
    policy.observe_finish("y", 10)
    policy.observe_finish("y", 30)
    assert policy.expected_output_len(req(adapter="x", max_tokens=50)) == 20  # global average
    policy.observe_finish("x", 100)
    assert policy.expected_output_len(req(adapter="x", max_tokens=500)) == 100  # the adapter's own
    assert policy.expected_output_len(req(adapter="x", max_tokens=40)) == 40  # capped at max_tokens
    assert policy.expected_output_len(req(adapter="y", max_tokens=500)) == 20


def test_first_fit_packs_workers_in_id_order():
    # SLO 15 ms: Dec of n rank-8 requests = 10 + n·1.8 ms, so 2 fit (13.6 ms), a third (15.4 ms) does not
    workers = [wv(i, slo=0.015) for i in ("c", "a", "b")]
    policy = make_policy("first_fit")
    chosen = []
    for _ in range(6):
        w = policy.choose(req(rank=8), workers)
        w.running_ranks.append(8)
        chosen.append(w.worker_id)
    assert chosen == ["a", "a", "b", "b", "c", "c"]
    assert policy.choose(req(rank=8), workers).worker_id == "a"  # none fits: the least loaded, by id
    workers[0].running_ranks.pop()  # "c" has room again
    assert policy.choose(req(rank=8), workers).worker_id == "c"


def test_first_fit_respects_max_running():
    a, b = wv("a", running=[8], max_running=1), wv("b", running=[8, 8], max_running=64)
    assert make_policy("first_fit").choose(req(), [a, b]) is b


def test_most_idle_fewest_requests_ties_by_id():
    a, b, c = wv("a", running=[8, 8]), wv("b", running=[8], queued=[(10, 8)]), wv("c", queued=[(10, 8)])
    assert make_policy("most_idle").choose(req(), [a, b, c]) is c
    c.queued.append((10, 8))
    assert make_policy("most_idle").choose(req(), [c, b, a]) is a  # all at 2: lowest id


def test_round_robin_cycles_in_id_order_and_survives_membership_changes():
    workers = [wv(i) for i in ("b", "c", "a")]
    policy = make_policy("round_robin")
    assert [policy.choose(req(), workers).worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    without_b = [w for w in workers if w.worker_id != "b"]
    assert policy.choose(req(), without_b).worker_id == "c"
    assert policy.choose(req(), workers + [wv("d")]).worker_id == "d"
    assert policy.choose(req(), workers).worker_id == "a"


def test_random_is_deterministic_per_seed():
    workers = [wv(f"w{i}") for i in range(8)]

    def picks(seed):
        policy = make_policy("random", seed=seed)
        return [policy.choose(req(), workers).worker_id for _ in range(50)]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)
    assert len(set(picks(1))) > 4


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_filters_by_rank_and_memory(name):
    policy = make_policy(name)
    assert policy.name == name
    small = wv("a", max_rank=16)
    full = wv("b", free=50)  # needs prompt + max_tokens = 200
    roomy = wv("c", running=[64] * 10, free=1000)
    for _ in range(3):
        assert policy.choose(req(rank=32), [small, full, roomy]) is roomy
    # nobody has the room: the rank-capable ones stay candidates (it queues)
    assert policy.choose(req(rank=32), [small, full]) is full
    with pytest.raises(NoWorkerError, match="rank 128"):
        policy.choose(req(rank=128), [small, full])
    with pytest.raises(NoWorkerError):
        policy.choose(req(), [])


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policies_do_not_modify_the_views(name):
    workers = [wv("a", running=[8, 64], queued=[(10, 16)], gpu={"x"}), wv("b", running=[32])]
    before = copy.deepcopy(workers)
    policy = make_policy(name)
    policy.choose(req(adapter="x"), workers)
    policy.observe_finish("x", 12)
    policy.observe_finish(None, 3)
    assert workers == before


def test_base_model_request_counts_as_resident_everywhere():
    w = wv("a")
    assert candidates(req(rank=0, adapter=None), [w]) == [w]
    assert make_policy("rank_aware").choose(req(rank=0, adapter=None), [wv("b", running=[8]), w]) is w


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="rank_aware, random, round_robin, most_idle, first_fit"):
        make_policy("fastest")


def test_rank_aware_skips_a_worker_whose_ttft_slo_would_break():
    import dataclasses

    # "a" has a long prompt queued: the request's first token would come after Pre(5 + 0.1·(2000 + 100) ms) = 215 ms
    queued = wv("a", queued=[(2000, 8)])
    busy = wv("b", running=[8, 8, 8])
    policy = make_policy("rank_aware")
    assert policy.choose(req(), [queued, busy]) is queued  # no TTFT SLO: the shorter decode batch wins
    with_slo = [dataclasses.replace(w, slo_ttft_s=0.1) for w in (queued, busy)]
    assert policy.choose(req(), with_slo).worker_id == "b"
    # an idle worker whose lone prefill is already over the TTFT SLO is skipped too
    idle = dataclasses.replace(wv("a"), slo_ttft_s=0.001)
    assert policy.choose(req(), [idle, with_slo[1]]).worker_id == "b"
