"""The discrete-event cluster simulator: invariants, exact timing on a tiny case, determinism, and the CLI."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from services.scheduler.perf_model import PerfModel
from services.scheduler.policies import POLICY_NAMES, make_policy
from services.scheduler.simulator import SimConfig, Workload, generate_workload, simulate, summarize

MODEL = PerfModel(form="max_rank", decode_base_s=0.020, decode_per_seq_s=0.0005, decode_per_rank_s=0.00002,
                  prefill_base_s=0.005, prefill_per_token_s=0.0002, prefill_per_token_rank_s=0.000001,
                  no_lora_tpot_s=0.022, source="test")
SMALL = SimConfig(workers=4, duration_s=6.0, warmup_s=1.0, adapters=50, ranks=(8, 16, 32, 64), prompt_len=64,
                  output_len=24, max_tokens=128, kv_tokens=4000, seed=3)


def check_invariants(result, workload):
    assert (result.finishes == 1).all()  # every request finished exactly once
    assert np.isfinite(result.finish).all() and np.isfinite(result.first_token).all()
    assert (result.first_token >= workload.arrival).all()
    assert (result.finish >= result.first_token).all()
    assert (result.worker >= 0).all()
    # conservation of tokens: per request (steps it took part in) and in total (counted step by step)
    assert (result.tokens == workload.output).all()
    assert result.step_tokens == int(workload.output.sum())


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_request_finishes_once_and_tokens_are_conserved(name):
    workload = generate_workload(SMALL, rate=40)
    assert len(workload) > 150
    result = simulate(SMALL, MODEL, make_policy(name, seed=1), workload)
    check_invariants(result, workload)
    m = summarize(result)
    assert 0 < m["requests"] < len(workload)  # the warm-up requests are not measured
    assert 0 <= m["slo_attainment"] <= 1
    assert m["p99_tpot_s"] >= m["p50_tpot_s"] > 0


@pytest.mark.parametrize("name", ["rank_aware", "random"])
def test_invariants_hold_with_an_adapter_pool_and_tight_memory(name):
    cfg = replace(SMALL, gpu_slots=3, load_s_per_rank=0.001, kv_tokens=600, max_running=4)
    workload = generate_workload(cfg, rate=60)
    result = simulate(cfg, MODEL, make_policy(name), workload)
    check_invariants(result, workload)
    # loads delay first tokens: some request waited for its adapter before its prefill
    no_pool = simulate(replace(cfg, gpu_slots=0), MODEL, make_policy(name), workload)
    assert summarize(result)["mean_ttft_s"] > summarize(no_pool)["mean_ttft_s"]


def test_step_timing_of_a_lone_request_is_exact():
    cfg = replace(SMALL, workers=1, warmup_s=0.0)
    workload = Workload(rate=1.0, arrival=np.array([0.5]), adapter=np.array([0]), rank=np.array([16]),
                        prompt=np.array([100]), output=np.array([10]), max_tokens=128)
    result = simulate(cfg, MODEL, make_policy("rank_aware"), workload)
    prefill, decode = MODEL.prefill_s([(100, 16)]), MODEL.decode_step_s([16])
    assert result.first_token[0] == pytest.approx(0.5 + prefill)
    assert result.finish[0] == pytest.approx(0.5 + prefill + 9 * decode)
    assert result.steps == 10


def test_requests_join_a_running_batch_at_the_next_step():
    cfg = replace(SMALL, workers=1, warmup_s=0.0)
    workload = Workload(rate=1.0, arrival=np.array([0.0, 0.001]), adapter=np.array([0, 1]), rank=np.array([8, 64]),
                        prompt=np.array([10, 20]), output=np.array([3, 2]), max_tokens=128)
    result = simulate(cfg, MODEL, make_policy("first_fit"), workload)
    p1 = MODEL.prefill_s([(10, 8)])  # step 1: prefill of the first request only
    p2 = MODEL.prefill_s([(20, 64)]) + MODEL.decode_step_s([8])  # step 2: prefill of the second + one decode
    d3 = MODEL.decode_step_s([8, 64])  # step 3: both decode (the first finishes)
    assert result.first_token.tolist() == pytest.approx([p1, p1 + p2])
    assert result.finish.tolist() == pytest.approx([p1 + p2 + d3, p1 + p2 + d3])
    check_invariants(result, workload)


def test_an_oversized_request_does_not_deadlock_a_worker():
    cfg = replace(SMALL, workers=1, kv_tokens=50, warmup_s=0.0)
    workload = Workload(rate=1.0, arrival=np.array([0.0, 0.0, 0.1]), adapter=np.array([0, 1, 2]),
                        rank=np.array([8, 8, 8]), prompt=np.array([40, 40, 40]), output=np.array([5, 5, 5]),
                        max_tokens=20)
    result = simulate(cfg, MODEL, make_policy("random"), workload)
    check_invariants(result, workload)
    assert result.first_token[1] >= result.finish[0]  # it waited for the room, one at a time


def test_policies_are_told_about_every_finish():
    seen = []
    policy = make_policy("rank_aware")
    observe = policy.observe_finish

    def spy(adapter, tokens):
        seen.append((adapter, tokens))
        observe(adapter, tokens)

    policy.observe_finish = spy
    workload = generate_workload(SMALL, rate=20)
    simulate(SMALL, MODEL, policy, workload)
    assert len(seen) == len(workload)
    assert sorted(t for _, t in seen) == sorted(workload.output.tolist())
    assert all(a.startswith("adapter-") for a, _ in seen)


def test_workload_follows_the_configuration():
    cfg = replace(SMALL, duration_s=50.0, adapters=1000, zipf=1.2, output_len=30, max_tokens=100)
    w = generate_workload(cfg, rate=50)
    assert abs(len(w) - 2500) < 4 * 50  # Poisson: 2500 ± a few σ
    assert (np.diff(w.arrival) >= 0).all() and w.arrival[-1] < cfg.duration_s
    assert set(np.unique(w.rank)) <= set(cfg.ranks)
    counts = np.bincount(w.adapter, minlength=cfg.adapters)
    assert counts[0] > 10 * counts[100:].mean()  # skewed popularity
    assert w.output.max() <= 100 and w.output.min() >= 1
    assert 20 < w.output.mean() < 40 and 40 < w.prompt.mean() < 90
    # every adapter keeps its rank across rates
    w2 = generate_workload(cfg, rate=80)
    ranks = dict(zip(w.adapter.tolist(), w.rank.tolist()))
    assert all(ranks.get(a, r) == r for a, r in zip(w2.adapter.tolist(), w2.rank.tolist()))
    fixed = generate_workload(replace(cfg, length_dist="fixed"), rate=50)
    assert set(fixed.output.tolist()) == {30}


def _metrics(cfg, name):
    workload = generate_workload(cfg, rate=40)
    return summarize(simulate(cfg, MODEL, make_policy(name, seed=cfg.seed), workload))


@pytest.mark.parametrize("name", ["rank_aware", "random"])
def test_same_seed_same_result_different_seed_different(name):
    assert _metrics(SMALL, name) == _metrics(SMALL, name)
    assert _metrics(SMALL, name) != _metrics(replace(SMALL, seed=4), name)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="warmup"):
        SimConfig(duration_s=5, warmup_s=5)
    with pytest.raises(ValueError, match="length distribution"):
        SimConfig(length_dist="pareto")
    with pytest.raises(ValueError, match="rate"):
        generate_workload(SMALL, rate=0)


TINY = ["simulate", "--workers", "3", "--rps", "10,20", "--duration", "4", "--warmup", "1", "--adapters", "30",
        "--prompt-len", "32", "--output-len", "16"]


def test_cli_writes_json_and_plots(tmp_path, capsys):
    from services.cli import main

    out = tmp_path / "sim.json"
    assert main(TINY + ["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == set(POLICY_NAMES)
    for by_rate in report["results"].values():
        assert set(by_rate) == {"10", "20"}
        for m in by_rate.values():
            assert {"mean_tpot_s", "p99_tpot_s", "slo_attainment", "requests", "mean_ttft_s"} <= set(m)
    assert set(report["rank_aware_vs"]) == set(POLICY_NAMES) - {"rank_aware"}
    assert report["perf_model"]["source"]
    assert report["config"]["workers"] == 3 and report["config"]["rates"] == [10.0, 20.0]
    assert "node" in report["machine"] and "commit" in report
    pytest.importorskip("matplotlib")
    for suffix in ("slo_vs_rate", "tpot_cdf"):
        png = tmp_path / f"sim_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rank_aware" in capsys.readouterr().out


def test_cli_is_deterministic(tmp_path):
    from services.cli import main

    args = TINY + ["--policy", "random,rank_aware", "--no-plots", "--seed", "7"]
    assert main(args + ["--out", str(tmp_path / "a.json")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["results"] == b["results"] and a["rank_aware_vs"] == b["rank_aware_vs"]
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("flags, message", [
    (["--policy", "fastest"], "unknown policy fastest"),
    (["--ranks", "8,sixteen"], "--ranks"),
    (["--rps", "0"], "--rps"),
    (["--perf-model", "/nonexistent/model.json"], "no performance model file"),
    (["--warmup", "10"], "warmup"),
    (["--max-lora-rank", "16"], "--max-lora-rank"),
])
def test_cli_bad_flags_are_one_line_errors(flags, message, capsys):
    from services.cli import main

    assert main(TINY + ["--no-plots"] + flags) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0] and err[0].startswith("caraserve simulate: error:")
