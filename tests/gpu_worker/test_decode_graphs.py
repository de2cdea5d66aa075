"""Decode graphs (engine/decode_graphs.py): decode-only steps through static, padded buffers give the engine's own
results. Without CUDA the static path runs eagerly (capture=False) with the Triton kernels interpreted; with CUDA
the same comparison runs with the graphs captured and replayed.

Tolerance: the graph path launches LoRA per token with the pool's widest grids where the regular path may launch
per segment, so float32 sums run in another order: logprobs within 1e-4 (as the other backend comparisons), the
same greedy tokens.
"""
from __future__ import annotations

import pytest
import torch

from helpers.lora_factory import make_random_adapter
from helpers.tiny_models import TINY_GQA, save_tiny_gqa_llama
from helpers.triton_mode import DEVICE, INTERPRET, import_kernels, triton_interpreter  # noqa: F401 (autouse)
from services.gpu_worker.engine.config import ConfigError, EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams

decode_graphs, = import_kernels("services.gpu_worker.engine.decode_graphs")
VOCAB = TINY_GQA["vocab_size"]
# adapters of several ranks and target sets (stacked ranks up to the pool's widest grid)
ADAPTERS = {"r4-attn": dict(r=4, target_modules=["q_proj", "v_proj"]),
            "r16-all": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]),
            "r8-mlp": dict(r=8, target_modules=["gate_proj", "down_proj"])}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("graphs_llama")
    model = save_tiny_gqa_llama(root / "model", default_model_path, max_position_embeddings=256)
    return root / "model", {name: make_random_adapter(model, root / name, seed=i, **kw)
                            for i, (name, kw) in enumerate(ADAPTERS.items())}


def make_engine(model_dir, adapters, graphs: bool, **config) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=DEVICE.type, kv_cache_memory_gb=0.02, block_size=8,
                                    max_loras=3, max_lora_rank=16, max_num_seqs=6, max_num_batched_tokens=40,
                                    lora_backend="triton", attention_backend="triton",
                                    cuda_graphs="auto" if graphs else "off", **config))
    if graphs and engine.runner.decode_graphs is None:  # no CUDA: the static path, eagerly
        engine.runner.decode_graphs = decode_graphs.DecodeGraphs(engine.runner, 6, engine.max_model_len,
                                                                 capture=False)
    assert (engine.runner.decode_graphs is not None) == graphs
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


def record_runs(graphs) -> list[tuple[int, int]]:
    """(sequences, bucket) of each step `graphs` runs from now on."""
    runs, original = [], graphs.run
    graphs.run = lambda sched, bucket: (runs.append((len(sched.seqs), bucket)), original(sched, bucket))[1]
    return runs


def run(engine, requests):
    params = SamplingParams(max_tokens=7, temperature=0.0, logprobs=True, ignore_eos=True)
    results = engine.generate([p for _, p in requests], params, [a for a, _ in requests])
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished()
    return [(r.token_ids, [lp.logprob for lp in r.logprobs]) for r in results]


def test_decode_steps_through_the_graph_path_give_the_engines_results(tiny_llama):
    model_dir, adapters = tiny_llama
    g = torch.Generator().manual_seed(2)
    names = [None, *ADAPTERS]
    # 5 requests (a padded bucket of 8), contexts across block boundaries (block_size 8), one adapter twice
    requests = [(names[i % len(names)], torch.randint(3, VOCAB, (n,), generator=g).tolist())
                for i, n in enumerate([1, 7, 8, 15, 30])]
    want = run(make_engine(model_dir, adapters, graphs=False), requests)

    engine = make_engine(model_dir, adapters, graphs=True)
    graphs = engine.runner.decode_graphs
    buckets = record_runs(graphs)
    k_scratch = engine.runner.k_cache[:, engine.runner.scratch_block * 8:]
    k_scratch.fill_(float("nan"))  # a sequence that read the scratch block would turn NaN
    got = run(engine, requests)
    assert buckets and all(n <= b for n, b in buckets) and any(n < b for n, b in buckets), buckets
    assert {b for _, b in buckets} <= set(graphs.buckets)
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-4
    assert not k_scratch[:, 0].isnan().any()  # the padding rows wrote their k/v to the scratch slot
    assert len({t for tokens, _ in got for t in tokens}) > 3


def test_with_cpu_assist_the_graphs_run_the_triton_backend_inside_it(tiny_llama, tmp_path):
    """cpu_assist wraps the model's LoRA backend; decodes through the graphs use the Triton backend it wraps, the
    prefills the workers, and the results are the engine's without graphs."""
    model_dir, adapters = tiny_llama
    g = torch.Generator().manual_seed(4)
    requests = [(name, torch.randint(3, VOCAB, (n,), generator=g).tolist())
                for name, n in [("r16-all", 9), (None, 5), ("r8-mlp", 12)]]
    want = run(make_engine(model_dir, adapters, graphs=False), requests)
    engine = make_engine(model_dir, adapters, graphs=True, cpu_assist="always", cpu_workers=1,
                         data_dir=str(tmp_path))
    try:
        wrapper = engine.model.lora_backend
        assert engine.runner.decode_graphs.lora_backend is wrapper.inner
        runs = record_runs(engine.runner.decode_graphs)
        got = run(engine, requests)
        assert runs and engine.model.lora_backend is wrapper and wrapper.cpu_ranges > 0  # prefills on the workers
    finally:
        engine.close()
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-4


@pytest.mark.skipif(not INTERPRET, reason="a capture that fails needs a machine without CUDA")
def test_a_failed_capture_leaves_the_static_path_running_eagerly(tiny_llama, caplog):
    """capture=True where capturing cannot work (no CUDA here): logged once, then the same results, eagerly."""
    model_dir, adapters = tiny_llama
    g = torch.Generator().manual_seed(8)
    requests = [(name, torch.randint(3, VOCAB, (n,), generator=g).tolist())
                for name, n in [("r4-attn", 6), (None, 3), ("r16-all", 10)]]
    want = run(make_engine(model_dir, adapters, graphs=False), requests)
    engine = make_engine(model_dir, adapters, graphs=True)
    graphs = engine.runner.decode_graphs = decode_graphs.DecodeGraphs(engine.runner, 6, engine.max_model_len,
                                                                      capture=True)
    runs = record_runs(graphs)
    with caplog.at_level("WARNING", logger=decode_graphs.__name__):
        got = run(engine, requests)
    assert runs and not graphs.capture and not graphs.graphs
    assert len([r for r in caplog.records if "decode graphs off" in r.getMessage()]) == 1
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
        assert tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(lps, want_lps)) < 1e-4


def test_the_static_forward_never_reads_the_device_on_the_host(tiny_llama):
    """What capture needs: no .item()/.tolist()/nonzero-style op (a host sync, illegal while capturing) anywhere in
    the forward pass of a bucket; the kernels' launches counted apart (bench/device_ops.py)."""
    from bench.device_ops import DeviceOps

    model_dir, adapters = tiny_llama
    engine = make_engine(model_dir, adapters, graphs=True)
    graphs = engine.runner.decode_graphs
    from services.gpu_worker.engine.scheduler import ScheduledBatch

    graphs._fill(ScheduledBatch(), 4)
    with DeviceOps() as ops:
        graphs._forward(4)
    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "_assert_async"}
    assert not syncing & set(ops.torch_ops), ops.torch_ops
    assert sum(ops.triton.values()) > 0


def test_what_takes_the_graph_path(tiny_llama):
    from services.gpu_worker.engine.scheduler import ScheduledBatch
    from services.gpu_worker.engine.sequence import Sequence

    engine = make_engine(tiny_llama[0], {}, graphs=True)
    graphs = engine.runner.decode_graphs
    params = SamplingParams(max_tokens=4)

    def seq(prompt: int, computed: int, generated: int = 1) -> Sequence:
        s = Sequence("s", [5] * prompt, params, None, 0)
        s.token_ids += [6] * generated
        s.num_computed = computed
        return s

    assert graphs.buckets == [1, 2, 4, 8]
    assert graphs.bucket_for(ScheduledBatch([seq(4, 4)] * 3, [1] * 3)) == 4  # decodes: the bucket that holds them
    assert graphs.bucket_for(ScheduledBatch([seq(4, 4)], [1])) == 1
    assert graphs.bucket_for(ScheduledBatch([seq(4, 0, 0)], [4])) is None  # a prefill
    assert graphs.bucket_for(ScheduledBatch([seq(4, 4), seq(9, 0, 0)], [1, 9])) is None  # mixed
    assert graphs.bucket_for(ScheduledBatch([seq(4, 4)] * 9, [1] * 9)) is None  # more than the largest bucket
    assert graphs.bucket_for(ScheduledBatch()) is None
    long = seq(4, 4)
    long.block_table = list(range(graphs.max_blocks + 1))  # more blocks than the static tables hold
    assert graphs.bucket_for(ScheduledBatch([long], [1])) is None


def test_cuda_graphs_setting(monkeypatch):
    with pytest.raises(ConfigError, match="cuda_graphs must be auto or off"):
        EngineConfig(cuda_graphs="on")
    assert not EngineConfig(device="cpu").resolved_cuda_graphs()  # auto: CUDA only
    from services.cli import build_parser

    assert build_parser().parse_args(["run-batch", "-i", "x", "-o", "y", "--cuda-graphs", "off"]).cuda_graphs == "off"
    if not INTERPRET:  # on CUDA: auto turns them on with the triton backends
        assert EngineConfig(device="cuda").resolved_cuda_graphs()
        assert EngineConfig(device="cuda", cpu_assist="auto").resolved_cuda_graphs()
        assert not EngineConfig(device="cuda", lora_backend="torch").resolved_cuda_graphs()


def test_decode_graphs_need_the_triton_backends(tiny_llama):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama[0]), device=DEVICE.type, kv_cache_memory_gb=0.02,
                                    lora_backend="torch", attention_backend="triton", cuda_graphs="off"))
    with pytest.raises(ValueError, match="triton LoRA backend"):
        decode_graphs.DecodeGraphs(engine.runner, 4, engine.max_model_len, capture=False)
