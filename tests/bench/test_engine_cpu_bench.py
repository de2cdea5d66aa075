"""Smoke test of bench/engine_cpu.py: `--quick` runs all three systems and writes a well-formed JSON.

Structure only: no timing thresholds (benchmarks are never timed tests; see DESIGN.md "Targets").
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "engine_cpu.py"
SYSTEMS = ("ours", "peft_batch", "peft_single")


def test_help_explains_the_flags():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--quick", "--out", "--requests", "--adapters", "--ranks", "--target-modules", "--peft-batch-size",
                 "--systems", "--min-tokens", "--max-tokens"):
        assert flag in out.stdout


@pytest.mark.slow
def test_quick_run_writes_complete_results(tmp_path):
    out = tmp_path / "engine_cpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert str(out) in proc.stdout
    data = json.loads(out.read_text())

    for key in ("benchmark", "timestamp", "git", "machine", "config", "workload", "systems", "ratios",
                "token_agreement", "requests"):
        assert key in data, key
    assert data["benchmark"] == "engine_cpu"
    assert set(data["git"]) >= {"commit", "dirty"}
    machine = data["machine"]
    assert machine["logical_cpus"] >= 1 and machine["torch_threads"] >= 1
    assert machine["versions"]["torch"] and machine["cpu_model"]
    assert data["config"]["quick"] is True

    n = data["workload"]["requests"]
    tokens = data["workload"]["generated_tokens"]
    assert n == len(data["requests"]) > 0 and tokens >= n
    assert set(data["systems"]) == set(SYSTEMS)
    for name, s in data["systems"].items():
        assert s["generated_tokens"] == tokens, name
        assert s["computed_tokens"] >= tokens, name
        assert s["all_lengths_exact"] is True, name
        for key in ("wall_s", "tokens_per_s", "requests_per_s"):
            assert s[key] > 0, (name, key)
        for metric in ("latency_s", "ttft_s"):
            stats = s[metric]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"], (name, metric)
            assert stats["mean"] > 0
        assert s["ttft_s"]["max"] <= s["latency_s"]["max"] + 1e-9
    for key in ("tokens_per_s_ours_vs_peft_batch", "tokens_per_s_ours_vs_peft_single"):
        assert data["ratios"][key] > 0
    for pair in ("ours_vs_peft_batch", "ours_vs_peft_single"):
        agreement = data["token_agreement"][pair]
        assert 0.0 <= agreement["exact_fraction"] <= 1.0
        assert 0.0 <= agreement["mean_common_prefix_fraction"] <= 1.0
    for r in data["requests"]:
        assert set(r["latency_s"]) == set(SYSTEMS) and all(v > 0 for v in r["latency_s"].values())
        assert r["prompt_tokens"] > 0 and r["max_tokens"] > 0

    if importlib.util.find_spec("matplotlib") is not None:
        assert data["plot"] and Path(data["plot"]).is_file()
    else:
        assert data["plot"] is None and "matplotlib" in data["plot_skipped"]
