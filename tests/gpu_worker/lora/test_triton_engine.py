"""The engine with lora_backend="triton" (the interpreter on CPU, compiled on CUDA) against lora_backend="torch":
same greedy tokens for a batch mixing adapters of different ranks and targets with base-only requests, through
chunked prefill and decode steps. Plus the backend setting and its CLI flag."""
from __future__ import annotations


import pytest
import torch

from helpers.lora_factory import make_random_adapter
from helpers.tiny_models import TINY_GQA, save_tiny_gqa_llama
from services.cli import build_parser
from services.gpu_worker.engine.config import ConfigError, EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams
from services.gpu_worker.lora import triton_kernels
from services.gpu_worker.lora.triton_backend import TritonLoRABackend

VOCAB = TINY_GQA["vocab_size"]
MAX_NEW = 6
ADAPTERS = {  # name -> LoraConfig kwargs: ranks 2..16, different targets, rsLoRA scaling
    "qv": dict(r=2, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=16, target_modules="all-linear"),
    "mlp": dict(r=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_path):
    """A tiny random GQA Llama (hidden 48, odd intermediate 72) saved as an HF directory, and three adapters."""
    root = tmp_path_factory.mktemp("tiny_llama")
    model = save_tiny_gqa_llama(root / "model", default_model_path)
    adapters = {name: make_random_adapter(model, root / name, seed=i, b_std=0.4 / kw["r"] ** 0.5, **kw)
                for i, (name, kw) in enumerate(ADAPTERS.items())}
    return root / "model", adapters


def run_engine(model_dir, adapters, backend: str, device, dtype: str = "float32"):
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_gb=0.02, max_loras=3, max_lora_rank=16,
                                    max_num_batched_tokens=24, lora_backend=backend, dtype=dtype,
                                    device=str(device)))
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 17, 6, 3)]
    requests = [(None, prompts[0]), ("all", prompts[0]), ("qv", prompts[1]), ("mlp", prompts[2]),
                (None, prompts[3]), ("all", prompts[4]), ("qv", prompts[3])]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=True, ignore_eos=True)
    results = engine.generate([p for _, p in requests], params, [a for a, _ in requests])
    return engine, [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in results]


def test_engine_triton_matches_torch(tiny_llama, monkeypatch, device):
    model_dir, adapters = tiny_llama
    torch_engine, want = run_engine(model_dir, adapters, "torch", device)
    shapes = []  # per step: True for the per-token launch (decodes), False per segment (prefill chunks)
    prepare = TritonLoRABackend.prepare

    def spy(self, info, slots, prefill_ranges=None):
        prepare(self, info, slots, prefill_ranges)
        shapes.append(info.kernel_meta.launch.per_token)

    monkeypatch.setattr(TritonLoRABackend, "prepare", spy)
    checked = []  # the kernels' metadata checks: the backend has each group's first launch checked, then skips them
    check_meta = triton_kernels._check_meta
    monkeypatch.setattr(triton_kernels, "_check_meta", lambda *a, **k: (checked.append(1), check_meta(*a, **k))[1])
    triton_engine, got = run_engine(model_dir, adapters, "triton", device)
    assert len(checked) == 2 * 4, "one shrink and one expand checked per group (qkv, o, gate_up, down)"
    assert True in shapes and False in shapes, "both launch shapes ran"
    assert isinstance(triton_engine.model.lora_backend, TritonLoRABackend)
    assert triton_engine.lora_backend == "triton" and torch_engine.lora_backend == "torch"
    for i, ((gt, glp), (wt, wlp)) in enumerate(zip(got, want)):
        assert gt == wt, f"request {i}: {gt} != {wt}"
        assert max(abs(a - b) for a, b in zip(glp, wlp)) < 1e-4, f"request {i}"
    # guards: the adapters change the output (same prompt with and without), and the model is not degenerate
    assert want[0][1] != want[1][1] and want[4][1] != want[6][1]
    assert len({t for toks, _ in got for t in toks}) > 3
    pool = triton_engine.model.lora_backend.pool
    assert len(pool._free_entries) == 0 and triton_engine.adapters.loads == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_triton_matches_torch_bfloat16_on_gpu(tiny_llama):
    # bfloat16: the kernels round t to bf16 and add in fp32 where torch's addmm rounds differently; one bf16 ulp
    # (2^-8 relative) on logits of magnitude ~5 moves a logprob by ~2e-2. Tokens are compared up to the first
    # near-tie divergence, which then changes everything after it.
    model_dir, adapters = tiny_llama
    _, want = run_engine(model_dir, adapters, "torch", "cuda", "bfloat16")
    _, got = run_engine(model_dir, adapters, "triton", "cuda", "bfloat16")
    matched = 0
    for (gt, glp), (wt, wlp) in zip(got, want):
        for a, b, x, y in zip(gt, wt, glp, wlp):
            assert abs(x - y) < 5e-2
            if a != b:
                break
            matched += 1
    assert matched >= 0.8 * sum(len(t) for t, _ in want)


def test_lora_backend_setting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert EngineConfig(device="cpu").resolved_lora_backend() == "torch"  # auto on the CPU
    assert EngineConfig(device="cpu", lora_backend="torch").resolved_lora_backend() == "torch"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        EngineConfig(device="cpu", lora_backend="triton")
    with pytest.raises(ConfigError, match="lora_backend must be"):
        EngineConfig(lora_backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert EngineConfig(device="cpu", lora_backend="triton").resolved_lora_backend() == "triton"
    if torch.cuda.is_available():
        assert EngineConfig(device="cuda").resolved_lora_backend() == "triton"
    args = build_parser().parse_args(["run-batch", "-i", "in", "-o", "out", "--lora-backend", "triton"])
    assert args.lora_backend == "triton"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run-batch", "-i", "in", "-o", "out", "--lora-backend", "fast"])
