"""The GPU benchmarks (bench/cold_start.py, bench/decode_step.py) run end to end on the CPU as smoke runs of their
code on a tiny model, so that a lent GPU's time is not lost to a broken script; without a GPU and --allow-cpu they
refuse to pretend."""
from __future__ import annotations

import json

import pytest
import torch

from bench import cold_start, decode_step


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")
def test_needs_a_gpu_unless_allowed(capsys):
    for script in (cold_start, decode_step):
        assert script.main(["--shape", "tiny"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_smoke_run_writes_every_system(tmp_path):
    out = tmp_path / "cold.json"
    assert cold_start.main(["--allow-cpu", "--shape", "tiny", "--adapters", "2", "--requests", "3",
                            "--prompt-tokens", "16", "--cpu-workers", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ttft_ms"]) == {"resident", "off", "auto"}
    assert all(result["ttft_ms"][k]["p50"] > 0 for k in result["ttft_ms"])
    assert set(result["ratio_p50_to_resident"]) == {"auto", "off"} and "met" in result["target"]
    assert result["git"]["commit"] and result["config"]["rank"] == 64
    if not torch.cuda.is_available():
        assert "not a result" in result["note"]


def test_decode_step_smoke_run(tmp_path):
    """Sequences prefilled in several steps (decodes of the first ones interleaved): every one decodes each step."""
    out = tmp_path / "decode.json"
    assert decode_step.main(["--allow-cpu", "--shape", "tiny", "--batch", "12", "--context", "1000", "--warmup", "1",
                             "--steps", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step_ms"]["p50"] > 0 and result["bound_ms"] > 0 and result["config"]["batch"] == 12
