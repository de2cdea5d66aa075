"""bench/serve.py, the serving benchmark harness: workload statistics, percentile and SLO accounting, determinism,
and one short end-to-end run (slow) against `caraserve up` and the PEFT one-at-a-time baseline server.

Structure only: no timing thresholds (benchmarks are never timed tests; see DESIGN.md "Targets").
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "serve.py"
PEFT_SERVER = REPO / "bench" / "baselines" / "peft_server.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


serve = _load("bench_serve_under_test", SCRIPT)
peft_server = _load("bench_peft_server_under_test", PEFT_SERVER)


# ---------------------------------------------------------------------------------------------- arrivals
def test_poisson_inter_arrivals_have_mean_one_over_rate_and_unit_cv():
    rng = np.random.default_rng(123)
    rate = 2.5
    times = serve.poisson_arrivals(rng, rate, count=20_000)
    gaps = np.diff([0.0] + times)
    assert len(times) == 20_000 and all(g >= 0 for g in gaps)
    assert abs(gaps.mean() - 1 / rate) < 0.03 / rate  # the sample mean's sd is ~0.7% here
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: coefficient of variation 1


def test_poisson_arrivals_in_a_window_count_like_a_poisson_variable():
    rate, duration = 3.0, 2000.0
    times = serve.poisson_arrivals(np.random.default_rng(5), rate, duration=duration)
    assert all(0 <= t < duration for t in times) and times == sorted(times)
    expected = rate * duration
    assert abs(len(times) - expected) < 4 * math.sqrt(expected)
    # counts per unit window: mean ~ variance ~ rate
    counts = np.bincount(np.floor(times).astype(int), minlength=int(duration))
    assert abs(counts.mean() - rate) < 0.15 and abs(counts.var() / counts.mean() - 1.0) < 0.15


def test_burst_and_bad_rates():
    assert serve.poisson_arrivals(np.random.default_rng(0), math.inf, count=5) == [0.0] * 5
    with pytest.raises(ValueError):
        serve.poisson_arrivals(np.random.default_rng(0), 0.0, duration=1.0)
    with pytest.raises(ValueError):
        serve.poisson_arrivals(np.random.default_rng(0), math.inf)
    with pytest.raises(ValueError):
        serve.poisson_arrivals(np.random.default_rng(0), 1.0)


# ---------------------------------------------------------------------------------------------- popularity, adapters
def test_popularity_uniform_and_power_law():
    uniform = serve.popularity(8, "uniform")
    assert len(uniform) == 8 and math.isclose(sum(uniform), 1.0) and len(set(uniform)) == 1
    skewed = serve.popularity(16, "powerlaw", alpha=1.2)
    assert math.isclose(sum(skewed), 1.0)
    assert all(a > b for a, b in zip(skewed, skewed[1:]))
    assert math.isclose(skewed[0] / skewed[1], 2 ** 1.2)
    with pytest.raises(ValueError):
        serve.popularity(4, "zipfish")


def _workload(adapters, **kw):
    prompt = serve.LengthDist(96, 0.6, 32, 256)
    output = serve.LengthDist(16, 0.4, 8, 32)
    kw.setdefault("rate", 4.0)
    kw.setdefault("seed", 7)
    return serve.build_workload(adapters, prompt=prompt, output=output, **kw)


def test_power_law_requests_follow_the_popularity_order():
    adapters = serve.make_adapter_specs(8, [8, 16, 32, 64], seed=0)
    specs = _workload(adapters, count=20_000, popularity_kind="powerlaw", alpha=1.0)
    counts = [sum(1 for s in specs if s.model == a.name) for a in adapters]
    assert counts[0] > counts[1] > counts[2] > counts[4] > counts[7] > 0
    assert abs(counts[0] / counts[1] - 2.0) < 0.15  # (1/1) / (1/2)
    uniform = _workload(adapters, count=20_000)
    ucounts = [sum(1 for s in uniform if s.model == a.name) for a in adapters]
    assert max(ucounts) / min(ucounts) < 1.1
    assert {s.adapter_rank for s in uniform} == {8, 16, 32, 64}
    assert all(s.adapter_rank == next(a.rank for a in adapters if a.name == s.model) for s in uniform[:200])


def test_base_fraction_sends_that_share_to_the_base_model():
    adapters = serve.make_adapter_specs(4, [8], seed=0)
    specs = _workload(adapters, count=10_000, base_fraction=0.25, base_model="Base")
    share = sum(1 for s in specs if s.model == "Base") / len(specs)
    assert abs(share - 0.25) < 0.02
    assert all(s.adapter_rank is None for s in specs if s.model == "Base")


def test_adapter_specs_mix_every_rank_in_every_block():
    from shared.protocol import ADAPTER_NAME_PATTERN

    specs = serve.make_adapter_specs(37, [8, 16, 32, 64], seed=3)
    assert len(specs) == 37 and len({s.name for s in specs}) == 37
    assert all(ADAPTER_NAME_PATTERN.match(s.name) for s in specs)
    for start in range(0, 36, 4):
        assert sorted(s.rank for s in specs[start:start + 4]) == [8, 16, 32, 64]
    assert [s.rank for s in serve.make_adapter_specs(8, [8, 16, 32, 64], seed=3)] == [s.rank for s in specs[:8]]


def test_length_distribution_is_clipped_log_normal():
    dist = serve.LengthDist(256, 0.7, 64, 1024)
    values = dist.sample(np.random.default_rng(1), 20_000)
    assert min(values) == 64 and max(values) == 1024
    assert abs(np.median(values) - 256) < 10
    assert serve.LengthDist(16, 0.0, 8, 32).sample(np.random.default_rng(1), 3) == [16, 16, 16]


def test_workload_is_deterministic_for_a_seed():
    adapters = serve.make_adapter_specs(8, [8, 16, 32, 64], seed=0)
    a = _workload(adapters, duration=30.0, seed=serve.point_seed(0, 0.5), rate=0.5)
    b = _workload(adapters, duration=30.0, seed=serve.point_seed(0, 0.5), rate=0.5)
    c = _workload(adapters, duration=30.0, seed=serve.point_seed(1, 0.5), rate=0.5)
    assert a == b and a != c
    assert serve.point_seed(0, 0.5) != serve.point_seed(0, math.inf)
    # repeated bursts: each its own requests; the first keeps the seed of a single burst
    assert serve.point_seed(0, math.inf, 0) == serve.point_seed(0, math.inf) != serve.point_seed(0, math.inf, 1)
    seeds = {serve.point_seed(s, r, k) for s in (0, 12345) for r in (0.1, 0.15, math.inf) for k in range(3)}
    assert len(seeds) == 18 and all(0 <= s < 2**63 for s in seeds)
    # another adapter count: the same arrivals, lengths and prompts, other adapters (throughput versus adapter count
    # compares like with like)
    more = _workload(serve.make_adapter_specs(64, [8, 16, 32, 64], seed=0), duration=30.0,
                     seed=serve.point_seed(0, 0.5), rate=0.5)
    same = ("arrival_s", "prompt_tokens", "max_tokens", "prompt_key")
    assert [[getattr(s, f) for f in same] for s in more] == [[getattr(s, f) for f in same] for s in a]
    assert [s.model for s in more] != [s.model for s in a]
    # a low rate still gets min_count requests, deterministically
    few = _workload(adapters, duration=5.0, rate=0.1, min_count=6, seed=11)
    assert len(few) == 6 and few == _workload(adapters, duration=5.0, rate=0.1, min_count=6, seed=11)
    assert len(_workload(adapters, count=3, rate=0.1, min_count=6, seed=11)) == 3  # an explicit count wins
    assert all(8 <= s.max_tokens <= 32 and 32 <= s.prompt_tokens <= 256 for s in a)


def test_calibration_specs_span_the_prompt_range():
    specs = serve.calibration_specs(5, serve.LengthDist(96, 0.6, 32, 256), serve.LengthDist(16, 0.4, 8, 32), "Base")
    assert [s.prompt_tokens for s in specs] == [32, 88, 144, 200, 256]
    assert {s.max_tokens for s in specs} == {16} and {s.model for s in specs} == {"Base"}


def test_prompts_have_the_token_count_asked_for(default_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    factory = serve.PromptFactory(tokenizer, seed=0, corpus_tokens=8_000)
    exact = 0
    for i, n in enumerate([32, 64, 100, 257, 512, 1024]):
        text, got = factory.prompt(n, key=i * 7919)
        assert got == len(tokenizer.encode(text, add_special_tokens=False))
        assert abs(got - n) <= 2
        exact += got == n
        assert factory.prompt(n, key=i * 7919) == (text, got)
    assert exact >= 5
    assert serve.PromptFactory(tokenizer, seed=0, corpus_tokens=8_000).prompt(100, 5) == factory.prompt(100, 5)


# ---------------------------------------------------------------------------------------------- percentiles, SLO
def test_percentiles_match_known_values_and_numpy():
    from bench.common import percentile, summarize

    xs = list(range(1, 11))
    assert percentile(xs, 50) == 5.5
    assert math.isclose(percentile(xs, 90), 9.1) and math.isclose(percentile(xs, 99), 9.91)
    assert percentile([3.0], 99) == 3.0 and percentile([5, 1, 3], 0) == 1 and percentile([5, 1, 3], 100) == 5
    rng = np.random.default_rng(0)
    values = list(rng.exponential(size=101))
    for q in (50, 90, 99):
        assert math.isclose(percentile(values, q), float(np.percentile(values, q)))
    s = summarize([4.0, 1.0, 2.0, 3.0])
    assert s["p50"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["mean"] == 2.5
    assert summarize([])["p50"] is None


def _rec(i, tokens=10, e2e=1.0, ttft=0.2, prompt=100, max_tokens=10, send=0.0, error=None):
    r = serve.RequestRecord(i, "a", 8, prompt, max_tokens, arrival_s=send, send_s=send)
    if error is None:
        r.ttft_s, r.e2e_s, r.output_tokens, r.last_token_s, r.chunks = ttft, e2e, tokens, e2e, tokens
    else:
        r.error = error
    return r


def test_slo_limit_is_factor_times_the_unloaded_time_per_token():
    slo = serve.SLO(factor=1.5, ttft_base_s=0.1, ttft_per_prompt_token_s=0.001, tpot_s=0.05)
    # unloaded: 0.1 + 0.1 (100 prompt tokens) + 9 * 0.05 = 0.65 s for 10 tokens -> TPT 0.065, limit 0.0975
    assert math.isclose(slo.unloaded_e2e_s(100, 10), 0.65)
    assert math.isclose(slo.limit_tpt_s(100, 10), 0.0975)
    assert slo.met(_rec(0, e2e=0.97))
    assert not slo.met(_rec(1, e2e=0.98))
    assert not slo.met(_rec(2, error="timeout: 5s"))
    assert not slo.met(_rec(3, tokens=9, e2e=0.1))  # a short output misses, however fast
    fixed = serve.SLO(fixed_tpt_s=0.2)
    assert fixed.limit_tpt_s(1000, 3) == 0.2 and fixed.met(_rec(4, e2e=2.0)) and not fixed.met(_rec(5, e2e=2.1))


def test_fit_unloaded_recovers_a_linear_model():
    a, b, d = 0.08, 0.0015, 0.03
    samples = [{"prompt_tokens": p, "output_tokens": n, "ttft_s": a + b * p, "e2e_s": a + b * p + d * (n - 1)}
               for p, n in ((32, 16), (100, 16), (200, 8), (256, 32))]
    slo = serve.fit_unloaded(samples, 1.5)
    assert math.isclose(slo.ttft_base_s, a, abs_tol=1e-9) and math.isclose(slo.ttft_per_prompt_token_s, b)
    assert math.isclose(slo.tpot_s, d) and slo.factor == 1.5
    # noise that makes the slope negative: a flat TTFT model, never a negative cost
    flat = serve.fit_unloaded([{"prompt_tokens": 10, "output_tokens": 4, "ttft_s": 0.3, "e2e_s": 0.6},
                               {"prompt_tokens": 90, "output_tokens": 4, "ttft_s": 0.2, "e2e_s": 0.5}], 1.5)
    assert flat.ttft_per_prompt_token_s == 0.0 and math.isclose(flat.ttft_base_s, 0.25)


def test_point_metrics_count_errors_as_misses_and_throughput_over_the_makespan():
    slo = serve.SLO(fixed_tpt_s=0.1)
    records = [_rec(0, e2e=0.9, send=0.0), _rec(1, e2e=1.5, send=1.0), _rec(2, error="http 503: busy", send=2.0),
               _rec(3, e2e=0.5, send=3.0)]
    m = serve.point_metrics(records, slo)
    assert m["requests"] == 4 and m["completed"] == 3 and m["errors"] == 1 and m["error_kinds"] == {"http 503": 1}
    assert m["slo_attainment"] == 0.5  # 0.09 and 0.05 s per token meet 0.1; 0.15 and the error miss
    assert math.isclose(m["makespan_s"], 3.5) and m["output_tokens"] == 30
    assert math.isclose(m["throughput_tokens_per_s"], 30 / 3.5)
    assert math.isclose(m["goodput_requests_per_s"], 2 / 3.5)
    assert m["e2e_s"]["p50"] == 0.9 and m["ttft_s"]["p50"] == 0.2
    assert math.isclose(m["tpot_s"]["p50"], (0.9 - 0.2) / 9, abs_tol=1e-6)  # summaries keep 6 decimals
    assert math.isclose(m["offered_rate"], 1.0)
    empty = serve.point_metrics([_rec(0, error="timeout: 1s")], slo)
    assert empty["slo_attainment"] == 0.0 and empty["throughput_tokens_per_s"] == 0.0


def test_sustained_rate_is_the_highest_rate_with_every_lower_one_meeting_the_slo():
    points = [(0.4, 0.85), (0.1, 1.0), (0.2, 0.95), (0.8, 0.97)]
    assert serve.sustained_rate(points, 0.9) == 0.2  # 0.8 meets it again, but 0.4 broke first
    assert serve.sustained_rate(points, 0.8) == 0.8
    assert serve.sustained_rate([(0.1, 0.5)], 0.9) == 0.0
    assert serve.sustained_rate([(0.1, 0.95), (0.2, None)], 0.9) == 0.1
    assert serve.rate_ratio(0.8, 0.2, 0.1) == {"value": 4.0, "at_least": None}
    assert serve.rate_ratio(0.8, 0.0, 0.1) == {"value": None, "at_least": 8.0}
    assert serve.rate_ratio(0.0, 0.0, 0.1) == {"value": None, "at_least": None}


def test_headline_ratios_and_targets_from_points():
    args = serve.parse_args(["--adapters", "8,512", "--rates", "0.1,0.2,0.4", "--burst-requests", "4"])

    def point(system, n, rate, attainment, tps=10.0):
        return {"system": system, "adapters": n, "kind": "burst" if rate is None else "rate", "rate": rate,
                "slo_attainment": attainment, "throughput_tokens_per_s": tps}

    data = {"points": [
        point("ours", 8, 0.1, 1.0), point("ours", 8, 0.2, 0.95), point("ours", 8, 0.4, 0.92), point("ours", 8, None,
                                                                                                   0.0, 100.0),
        point("ours", 512, 0.1, 1.0), point("ours", 512, None, 0.0, 97.0), point("ours", 512, None, 0.0, 60.0),
        point("ours", 512, None, 0.0, 95.0),
        point("peft_one_at_a_time", 8, 0.1, 0.5), point("peft_one_at_a_time", 8, None, 0.0, 12.0),
        point("peft_mixed_batch", 8, 0.1, 0.95), point("peft_mixed_batch", 8, 0.2, 0.3),
    ]}
    serve.finish(data, args)
    h = data["headline"]
    assert data["sustained_rate"]["ours"] == {"8": 0.4, "512": 0.1}
    assert h["sustained_rate_at_slo"] == {"ours": 0.4, "peft_one_at_a_time": 0.0, "peft_mixed_batch": 0.1}
    assert h["ours_vs_peft_one_at_a_time"] == {"value": None, "at_least": 4.0}
    assert math.isclose(h["ours_vs_peft_mixed_batch"]["value"], 4.0)
    assert h["targets"]["ours_vs_peft_one_at_a_time"]["met"] and h["targets"]["ours_vs_peft_mixed_batch"]["met"]
    t = h["throughput_max_vs_min_adapters"]["ours"]
    assert t["adapters"] == [8, 512] and math.isclose(t["ratio"], 0.95)
    assert h["targets"]["throughput_max_vs_min_adapters"]["met"]
    assert data["throughput_vs_adapters"]["peft_mixed_batch"] == {"8": 10.0}  # no burst: the sweep's largest
    assert data["throughput_vs_adapters"]["ours"] == {"8": 100.0, "512": 95.0}  # repeated bursts: their median
    assert data["throughput_vs_adapters_bursts"]["ours"] == {"8": [100.0], "512": [97.0, 60.0, 95.0]}


def test_help_explains_the_flags():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--quick", "--systems", "--rates", "--adapters", "--ranks", "--popularity", "--alpha", "--duration",
                 "--requests", "--burst-requests", "--prompt-median", "--output-max", "--slo-factor", "--slo-tpot-ms",
                 "--slo-on", "--slo-attainment", "--threads", "--max-loras", "--endpoint", "--out", "--work-dir",
                 "--request-timeout", "--baseline-adapters"):
        assert flag in out.stdout, flag
    out = subprocess.run([sys.executable, str(PEFT_SERVER), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--mode" in out.stdout and "adapter_names" in out.stdout


def test_quick_preset_and_explicit_flags():
    quick = serve.parse_args(["--quick", "--rates", "0.3,0.1"])
    assert quick.rate_list == [0.1, 0.3] and quick.adapter_counts == [8, 32] and quick.duration == 30.0
    full = serve.parse_args(["--systems", "peft_mixed_batch,peft_one_at_a_time,ours"])
    assert full.slo_on == "peft_one_at_a_time"  # the SLO system runs first: it calibrates the SLO
    assert full.system_list == ["peft_one_at_a_time", "ours", "peft_mixed_batch"]
    assert serve.parse_args(["--systems", "peft_mixed_batch,ours"]).system_list == ["ours", "peft_mixed_batch"]
    assert serve.parse_args(["--systems", "peft_one_at_a_time,ours", "--slo-on", "ours"]).system_list == [
        "ours", "peft_one_at_a_time"]
    assert full.adapter_counts == [8, 64, 512] and full.threads >= 1
    for bad in (["--systems", "vllm"], ["--rates", "0"], ["--adapters", "0"], ["--systems", "endpoint"],
                ["--systems", "ours", "--slo-on", "peft_mixed_batch"]):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


# ------------------------------------------------------------------------------------ the PEFT server's routing
def test_peft_streamer_routes_tokens_and_finishes_rows():
    import torch

    loop = asyncio.new_event_loop()
    try:
        def job(max_tokens, ignore_eos):
            return peft_server.Job("r", "a", [1, 2], max_tokens, ignore_eos, 0.0, 1.0, -1, None, loop,
                                   asyncio.Queue())

        short, eos_stops, eos_ignored = job(2, True), job(5, False), job(5, True)
        streamer = peft_server._Streamer([short, eos_stops, eos_ignored], eos_ids={0})
        streamer.put(torch.tensor([[1, 2], [1, 2], [1, 2]]))  # the prompt
        streamer.put(torch.tensor([7, 0, 0]))
        streamer.put(torch.tensor([8, 9, 9]))
        streamer.put(torch.tensor([9, 9, 9]))
        loop.run_until_complete(asyncio.sleep(0))
        events = [[q.get_nowait() for _ in range(q.qsize())] for q in (short.events, eos_stops.events,
                                                                      eos_ignored.events)]
    finally:
        loop.close()
    assert events[0] == [("token", 7), ("token", 8), ("finish", "length")]
    assert events[1] == [("finish", "stop")]
    assert events[2] == [("token", 0), ("token", 9), ("token", 9)]
    assert short.done and eos_stops.done and not eos_ignored.done


# ---------------------------------------------------------------------------------------------- end to end
def _mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_short_run_against_the_mesh_and_the_peft_server(tmp_path, default_model_path):
    out = tmp_path / "serve.json"
    work = tmp_path / "work"
    argv = [sys.executable, str(SCRIPT), "--systems", "ours,peft_one_at_a_time", "--adapters", "2",
            "--rates", "2", "--requests", "3", "--burst-requests", "2", "--burst-repeats", "2",
            "--calibration-requests", "2", "--prompt-median", "24", "--prompt-min", "16", "--prompt-max", "32",
            "--output-median", "4", "--output-min", "3", "--output-max", "5", "--threads", "1",
            "--request-timeout", "60", "--out", str(out), "--work-dir", str(work), "--model", str(default_model_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARASERVE_")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert str(out) in proc.stdout
    assert not _mentioning(str(work)), "a server outlived the harness"

    data = json.loads(out.read_text())
    for key in ("benchmark", "timestamp", "finished", "complete", "git", "machine", "config", "workload", "slo",
                "servers", "points", "sustained_rate", "throughput_vs_adapters", "headline", "plots", "adapters"):
        assert key in data, key
    assert data["benchmark"] == "serve" and data["complete"] is True and not data.get("failures")
    assert set(data["git"]) >= {"commit", "dirty"} and data["machine"]["cpu_model"]
    assert data["config"]["systems"] == ["peft_one_at_a_time", "ours"] and data["config"]["adapter_counts"] == [2]
    slo = data["slo"]
    assert slo["measured_on"] == "peft_one_at_a_time" == data["config"]["slo_on"]
    assert slo["factor"] == 1.5 and slo["tpot_s"] > 0
    assert len(slo["calibration_samples"]) == 2
    assert {s["system"] for s in data["servers"]} == {"ours", "peft_one_at_a_time"}
    kinds = {(p["system"], p["kind"]) for p in data["points"]}
    assert kinds == {("ours", "rate"), ("ours", "burst"), ("peft_one_at_a_time", "rate"),
                     ("peft_one_at_a_time", "burst")}
    assert sorted(p["repeat"] for p in data["points"] if p["system"] == "ours" and p["kind"] == "burst") == [0, 1]
    for p in data["points"]:
        assert p["errors"] == 0, p["error_kinds"]
        assert p["requests"] == (3 if p["kind"] == "rate" else 2) == p["completed"] == len(p["records"])
        assert p["short_outputs"] == 0 and 0.0 <= p["slo_attainment"] <= 1.0
        assert p["throughput_tokens_per_s"] > 0 and p["output_tokens"] == sum(r["max_tokens"] for r in p["records"])
        for metric in ("ttft_s", "tpot_s", "tpt_s", "e2e_s"):
            stats = p[metric]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], (p["system"], metric)
        for r in p["records"]:
            assert r["error"] is None and r["output_tokens"] == r["max_tokens"] and r["ttft_s"] <= r["e2e_s"]
            assert r["model"].startswith("a000")
    assert set(data["sustained_rate"]) == {"ours", "peft_one_at_a_time"}
    assert set(data["throughput_vs_adapters"]) == {"ours", "peft_one_at_a_time"}
    assert "ours_vs_peft_one_at_a_time" in data["headline"]
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("latency_cdf", "slo_vs_rate", "throughput_vs_adapters"):
            assert Path(data["plots"][name]).is_file(), name
