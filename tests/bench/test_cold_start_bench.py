"""bench/cold_start.py runs end to end (a CPU smoke run of its code on a tiny model) and refuses to pretend
without a GPU."""
from __future__ import annotations

import json

import pytest
import torch

from bench import cold_start


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")
def test_needs_a_gpu_unless_allowed(capsys):
    assert cold_start.main(["--shape", "tiny"]) == 2
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
