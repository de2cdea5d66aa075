"""Smoke test of bench/handoff.py: `--quick` measures every channel and the LoRA rates and writes them (structure
only, no timing thresholds). It drives HandoffChannel directly, so a change of the channel's protocol that the
benchmark does not follow fails here rather than on the next measuring run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "handoff.py"


def test_quick_run_writes_every_channel(tmp_path):
    out = tmp_path / "handoff.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    channels = {row["channel"] for row in result["round_trips"]}
    assert {"shm-signal", "shm"} <= channels and len(channels) >= 4  # and the pipe and socket baselines
    assert all(row["us"]["p50"] > 0 for row in result["round_trips"])
    assert result["lora_rate"] and all(r["worker_tokens_per_s"] > 0 for r in result["lora_rate"])
    rates = {(r["dtype"], r["rank"]): r for r in result["lora_rate"]}
    assert {d for d, _ in rates} == {"float32", "bfloat16", "float16"}  # every engine dtype, ratios to float32
    assert all(r["worker_rate_vs_float32"] > 0 for r in result["lora_rate"])
    assert rates["bfloat16", 8]["adapter_layer_bytes"] < rates["float32", 8]["adapter_layer_bytes"]
