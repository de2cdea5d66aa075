"""The GPU benchmarks (bench/cold_start.py, bench/decode_step.py, bench/lora_kernels.py) run end to end on the CPU
as smoke runs of their code on a tiny model, so that a lent GPU's time is not lost to a broken script; without a GPU
and --allow-cpu they refuse to pretend."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.triton_mode import import_kernels

# the kernel modules in the mode of this machine (interpreted without CUDA) before anything imports them: the
# benchmarks' engines import them, and the decode-graphs smoke run needs them interpreted, whatever runs first
decode_graphs, = import_kernels("services.gpu_worker.engine.decode_graphs")

from bench import cold_start, decode_step, lora_kernels  # noqa: E402


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
    # auto: one layer per load group, enqueued by the loads' threads; the others each change one of those
    assert set(result["ttft_ms"]) == {"resident", "off", "auto", "auto_g8", "auto_inline"}
    assert all(result["ttft_ms"][k]["p50"] > 0 for k in result["ttft_ms"])
    assert set(result["ratio_p50_to_resident"]) == set(result["ttft_ms"]) - {"resident"} and "met" in result["target"]
    assert result["config"]["load_group_layers"] == [1, 8]
    assert result["config"]["systems"]["auto_inline"] == {"load_enqueue": "inline"}
    assert result["git"]["commit"] and result["config"]["rank"] == 64
    if not torch.cuda.is_available():
        assert "not a result" in result["note"]


@pytest.mark.parametrize("value", ["8", "0,1", "one"])
def test_cold_start_refuses_bad_load_groups_at_once(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cold_start.main(["--allow-cpu", "--load-group-layers", value])
    assert exit_info.value.code == 2 and "--load-group-layers" in capsys.readouterr().err


def test_decode_step_smoke_run(tmp_path):
    """Sequences prefilled in several steps (decodes of the first ones interleaved): every one decodes each step."""
    out = tmp_path / "decode.json"
    assert decode_step.main(["--allow-cpu", "--shape", "tiny", "--batch", "12", "--context", "1000", "--warmup", "1",
                             "--steps", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step_ms"]["p50"] > 0 and result["bound_ms"] > 0 and result["config"]["batch"] == 12
    breakdown = result["breakdown"]  # torch.profiler ran over the extra steps (no device kernels on a CPU)
    assert "error" not in breakdown and breakdown["steps"] == decode_step.PROFILED_STEPS


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark runs for real (session.sh decode)")
def test_decode_step_smoke_run_with_decode_graphs(tmp_path, monkeypatch):
    """The graphs-then-eager timing of decode_step.py, with the decode graphs' static path run eagerly (no CUDA:
    capture off) and the Triton backends interpreted."""
    from services.gpu_worker.engine.config import EngineConfig

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(EngineConfig, "resolved_cuda_graphs", lambda self: self.cuda_graphs == "auto")

    class Eager(decode_graphs.DecodeGraphs):
        def __init__(self, runner, max_batch, max_model_len, capture):
            super().__init__(runner, max_batch, max_model_len, capture=False)
            self.steps = 0

        def run(self, sched, bucket):
            self.steps += 1
            return super().run(sched, bucket)

    made = []
    monkeypatch.setattr(decode_graphs, "DecodeGraphs", lambda *a, **kw: made.append(Eager(*a, **kw)) or made[-1])
    out = tmp_path / "decode.json"
    assert decode_step.main(["--allow-cpu", "--shape", "tiny", "--batch", "3", "--context", "20", "--warmup", "1",
                             "--steps", "2", "--attention-backend", "triton", "--lora-backend", "triton",
                             "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["cuda_graphs"] and made and made[0].steps >= 3 + decode_step.PROFILED_STEPS
    assert result["eager_step_ms"]["p50"] > 0 and result["ratio_eager_over_graphs_p50"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark runs for real (session.sh kernels)")
def test_lora_kernels_smoke_run(tmp_path):
    """bench/lora_kernels.py end to end in the Triton interpreter (a subprocess: Triton decides at import whether the
    kernels are interpreted): every rank mix and batch has a row, the cost fits are written."""
    out = tmp_path / "kernels.json"
    script = Path(__file__).resolve().parents[2] / "bench" / "lora_kernels.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script), "--allow-cpu", "--quick", "--hidden", "48", "--adapters", "4",
                           "--dtype", "float32", "--output", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {(r["mix"], r["batch"]) for r in result["rows"]} == {(m, b) for m in lora_kernels.MIXES
                                                                for b in (1, 16, 256)}
    assert all(r["ours_us"] > 0 and r["padded_us"] > 0 and r["torch_us"] > 0 for r in result["rows"])
    assert len(result["fits"]) == 2 and "not a result" in result["note"]
    without = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert without.returncode == 2 and "needs a CUDA GPU" in without.stderr


def test_launch_overhead_runs_anywhere(tmp_path):
    """bench/launch_overhead.py (the kernels stubbed: it needs no GPU) writes each per-call cost and the ratio."""
    out = tmp_path / "launch.json"
    script = Path(__file__).resolve().parents[2] / "bench" / "launch_overhead.py"
    done = subprocess.run([sys.executable, str(script), "--calls", "20", "--repeats", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["per_call_us"]) == {"lora_pair_checked_us", "lora_pair_unchecked_us", "attention_decode_us",
                                          "triton_binder_us"}
    assert all(v > 0 for v in result["per_call_us"].values()) and result["ratio_checked_over_unchecked"] > 0
    # the decode step of the 7B's structure: 32 layers' GEMMs (4 each, and the lm_head) either way; the fused path
    # launches 5 layer kernels a layer (and the last norm) where the unfused one runs ~30 torch ops; 2 LoRA groups
    step = result["decode_step_host"]
    fused, unfused = step["fused"], step["unfused"]
    assert fused["gemms"] == unfused["gemms"] == 4 * 32 + 1
    assert fused["triton_launches"] == 32 * (5 + 4) + 1 and unfused["triton_launches"] == 32 * (1 + 4)
    assert unfused["torch_ops"] > 25 * 32 > fused["torch_ops"]
    assert fused["host_ms"] > 0 and result["ratio_unfused_over_fused_host"] > 0
    bad = subprocess.run([sys.executable, str(script), "--calls", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--calls" in bad.stderr
