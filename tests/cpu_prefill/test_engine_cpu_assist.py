"""The engine with cpu_assist=always (every prefill LoRA delta on cpu_prefill worker processes) against
cpu_assist=off: same greedy tokens and logprobs for adapters of several ranks and target sets, several requests in
one step, 1, 2 and 4 workers; a stalled worker falls back; nothing is left in /dev/shm after close().

cpu_assist=auto pipelines cold adapters' loads on a GPU only; here `pipelines_loads` is made true so that the CPU
runs the same code with the thread loader (services/gpu_worker/lora/pipelined_load.py), its groups held back by
the test to fix which layers are on the workers and which landed."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import threading

from services.gpu_worker.engine import llm_engine
from services.gpu_worker.engine.config import ConfigError, EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams
from helpers.lora_factory import make_random_adapter
from helpers.waiting import wait_for

ADAPTERS = {  # name -> LoraConfig kwargs
    "r4-attn": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "r16-all": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]),
    "r8-mlp": dict(r=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
}
ALL_GROUPS = 3  # the tiny model's layers: one load group each (load_group_layers 1)
PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 1, 2, 64, 33], [11, 12, 13], list(range(40, 75)), [7, 7, 7, 7, 9]]
MODELS = ["r4-attn", "r16-all", None, "r8-mlp"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_path) -> tuple[Path, dict[str, Path]]:
    """A tiny random Llama (GQA) with the default model's tokenizer, and three random adapters."""
    from helpers.tiny_models import save_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny_llama(root / "model", default_model_path, vocab_size=128, hidden_size=64,
                            intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, initializer_range=0.02)
    adapters = {name: make_random_adapter(model, root / name, seed=i, b_std=0.2, **kw)
                for i, (name, kw) in enumerate(ADAPTERS.items())}
    return root / "model", adapters


def run(tiny_model, **config) -> tuple[list, LLMEngine]:
    model_dir, adapters = tiny_model
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=24,
                                    **config))
    try:
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
    except BaseException:
        engine.close()
        raise
    return results, engine


def assert_same_outputs(results, reference, abs: float = 1e-4) -> None:
    """Same greedy tokens, logprobs within `abs` (float32: the workers sum in another order than the device)."""
    for got, want in zip(results, reference, strict=True):
        assert got.token_ids == want.token_ids
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=abs)


def shm_entries() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"caraserve-{os.getpid()}-*")}


@pytest.fixture(scope="module")
def reference(tiny_model):
    results, engine = run(tiny_model, cpu_assist="off")
    engine.close()
    return results


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_always_equals_off(tiny_model, reference, workers, tmp_path, monkeypatch):
    from services.cpu_prefill.pool import CpuPrefillPool

    before = shm_entries()
    started = []  # deltas handed over before their base projection (the model's begin)
    start_delta = CpuPrefillPool.start_delta
    monkeypatch.setattr(CpuPrefillPool, "start_delta",
                        lambda *a: started.append(start_delta(*a)) or started[-1])
    results, engine = run(tiny_model, cpu_assist="always", cpu_workers=workers, data_dir=str(tmp_path))
    try:
        assert engine.cpu_assist.pool.alive() == workers
        assert engine.cpu_assist.fallbacks == 0
        assert engine.cpu_assist.backend.cpu_ranges > 0  # the workers really computed the prefill deltas
        assert [p for p in started if p is not None]
    finally:
        engine.close()
    assert_same_outputs(results, reference, abs=1e-4)
    assert shm_entries() <= before  # every segment (host cache, channels) unlinked


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the stream handoff in bfloat16"))])
def test_always_equals_off_in_bfloat16(tiny_model, tmp_path, device):
    """A bfloat16 engine: its host cache and channels hold bfloat16, and the workers' prefill gives the device
    path's first tokens and logprobs within bfloat16's rounding (each rounds its intermediate products apart)."""
    model_dir, adapters = tiny_model
    outputs = {}
    for assist in ("off", "always"):
        engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8,
                                        max_num_batched_tokens=24, dtype="bfloat16", cpu_assist=assist,
                                        cpu_workers=2, data_dir=str(tmp_path), device=device))
        try:
            for name, path in adapters.items():
                engine.load_adapter(name, path)
            # one token: the prefill, which is what the workers compute (decode stays on the device)
            outputs[assist] = engine.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0.0, logprobs=True,
                                                                      top_logprobs=5), MODELS)
            if assist == "always":
                assert engine.cpu_assist.host.dtype == torch.bfloat16
                assert {w.channel.dtype for w in engine.cpu_assist.pool._workers} == {torch.bfloat16}
                assert engine.cpu_assist.backend.cpu_ranges > 0 and engine.cpu_assist.fallbacks == 0
        finally:
            engine.close()
    for got, want in zip(outputs["always"], outputs["off"], strict=True):
        top_got, top_want = dict(got.logprobs[0].top), dict(want.logprobs[0].top)
        if want.logprobs[0].top[0][1] - want.logprobs[0].top[1][1] > 0.1:  # a clear argmax: the same token
            assert got.token_ids == want.token_ids
        shared = top_got.keys() & top_want.keys()
        assert len(shared) >= 3
        assert [top_got[t] for t in shared] == pytest.approx([top_want[t] for t in shared], abs=0.1)


def test_stalled_worker_falls_back_and_completes(tiny_model, reference, tmp_path):
    model_dir, adapters = tiny_model
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=24,
                                    cpu_assist="always", cpu_workers=2, data_dir=str(tmp_path)))
    try:
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        engine.cpu_assist.pool.timeout_s = 0.5
        stalled = engine.cpu_assist.pool.pids()[0]
        os.kill(stalled, signal.SIGSTOP)  # alive but never answering: only the timeout can notice it
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
        assert engine.cpu_assist.fallbacks >= 1  # that range ran on the device instead
        assert engine.cpu_assist.pool.alive() == 1  # the stalled worker was dropped; the other kept serving
        assert engine.cpu_assist.backend.cpu_ranges > 0
    finally:
        try:
            os.kill(stalled, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass
        engine.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="cpu_assist must be off, auto or always"):
        EngineConfig(cpu_assist="sometimes")
    with pytest.raises(ConfigError, match="cpu_workers must be >= 0"):
        EngineConfig(cpu_assist="always", cpu_workers=-1)
    EngineConfig(cpu_assist="always", cpu_workers=0)  # only `caraserve serve cpu_prefill` processes then


def test_no_worker_means_device_path(tiny_model, reference, tmp_path):
    """cpu_workers 0 and nobody joined: every prefill on the device, with no failed call and no warning."""
    results, engine = run(tiny_model, cpu_assist="always", cpu_workers=0, data_dir=str(tmp_path))
    try:
        assert engine.cpu_assist.pool.alive() == 0 and engine.cpu_assist.pool.socket_path.exists()
        assert engine.cpu_assist.backend.cpu_ranges == 0 and engine.cpu_assist.fallbacks == 0
    finally:
        engine.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    assert not list(tmp_path.glob("run/cpu_prefill/*.sock"))


class GroupGate:
    """before_group for the thread loader: group g of every load is written once `allow(g + 1)` was called."""

    def __init__(self) -> None:
        self.allowed = 0
        self.cond = threading.Condition()

    def __call__(self, group: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.allowed > group, timeout=60):
                raise TimeoutError("the test never allowed this group")

    def allow(self, groups: int) -> None:
        with self.cond:
            self.allowed = groups
            self.cond.notify_all()


def auto_engine(tiny_model, tmp_path, monkeypatch, **config) -> LLMEngine:
    monkeypatch.setattr(llm_engine, "pipelines_loads", lambda device: True)
    model_dir, adapters = tiny_model
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=24,
                                    cpu_assist="auto", data_dir=str(tmp_path), **config))
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    return engine


def test_auto_is_the_default_and_off_without_a_gpu(tiny_model, tmp_path):
    assert EngineConfig(model="m").cpu_assist == "auto"  # the paper's mechanism wherever there is a GPU
    results, engine = run(tiny_model, data_dir=str(tmp_path))
    try:
        assert engine.cpu_assist is None  # nothing to overlap on a CPU device: no workers spawned
    finally:
        engine.close()


def test_auto_prefills_on_the_workers_while_the_layers_land(tiny_model, tmp_path, monkeypatch):
    """One cold adapter, a prompt of three chunks: chunk 1 with no layer landed (all on the workers), chunk 2 with
    the first group landed (layer 0 on the device, 1-2 on the workers), chunk 3 loaded (all on the device); then
    decode. Tokens and logprobs equal cpu_assist off."""
    prompt = list(range(5, 65))  # 60 tokens: chunks of 24, 24, 12
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=True)
    model_dir, adapters = tiny_model
    off = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64, block_size=8, max_num_batched_tokens=24))
    off.load_adapter("r16-all", adapters["r16-all"])
    want = off.generate([prompt], params, ["r16-all"])[0]

    before = shm_entries()
    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=2)
    assist = engine.cpu_assist
    gate = GroupGate()
    assist.loader.before_group = gate
    try:
        engine.add_request("r", prompt, params, adapter="r16-all")
        out = engine.step()  # chunk 1: the load starts; no group landed yet
        assert assist.loading == ["r16-all"] and assist.pipelined_loads == 1
        cpu_after_1 = assist.backend.cpu_ranges
        assert cpu_after_1 > 0 and assist.backend.landed_ranges == 0 and not out
        gate.allow(1)
        load = assist._loads["r16-all"][0]
        wait_for(lambda: load.landed(0), 30, "the first layer group to land")
        assert not load.landed(1)
        engine.step()  # chunk 2: layer 0 on the device, layers 1 and 2 on the workers
        assert assist.backend.landed_ranges > 0 and assist.backend.cpu_ranges > cpu_after_1
        gate.allow(3)
        wait_for(load.done, 30, "the whole load")
        cpu_after_2, landed_after_2 = assist.backend.cpu_ranges, assist.backend.landed_ranges
        tokens, logprobs = [], []
        while engine.has_unfinished():
            for o in engine.step():
                tokens += o.new_token_ids
                logprobs += [lp.logprob for lp in o.logprobs or []]
        assert assist.loading == [] and assist.backend.cpu_ranges == cpu_after_2  # loaded: nothing more assisted
        assert assist.backend.landed_ranges == landed_after_2 and assist.fallbacks == 0
    finally:
        engine.close()
    assert tokens == want.token_ids
    assert logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    assert shm_entries() <= before


def test_auto_equals_off(tiny_model, reference, tmp_path, monkeypatch):
    """Several cold adapters and a base request in the same steps, loads landing whenever they do."""
    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=2)
    try:
        assist = engine.cpu_assist
        for name, source in assist._sources.items():  # the loads copy from the host cache, not from a copy of it
            host = assist._held[name]
            base = torch.frombuffer(source._shm.buf, dtype=torch.uint8).data_ptr()
            for m in source.adapter.modules:
                assert base <= m.lora_a.data_ptr() < base + host.nbytes and m.scale == 1.0
        assert sorted(assist._sources) == sorted(n for n in MODELS if n)
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
        assert engine.cpu_assist.pipelined_loads == 3 and engine.cpu_assist.loading == []
    finally:
        engine.close()
    assert not assist._sources
    assert_same_outputs(results, reference, abs=1e-4)


def test_load_group_layers_sets_the_groups_of_a_load(tiny_model, reference, tmp_path, monkeypatch):
    """load_group_layers: how many layers each event of a pipelined load covers; outputs do not depend on it."""
    with pytest.raises(ConfigError, match="load_group_layers must be >= 1"):
        EngineConfig(load_group_layers=0)
    for layers, groups in ((1, [range(0, 1), range(1, 2), range(2, 3)]), (8, [range(0, 3)]),
                           (2, [range(0, 2), range(2, 3)])):
        engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=1, load_group_layers=layers)
        try:
            assert engine.cpu_assist._groups == groups
            if layers == 2:
                results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True),
                                          MODELS)
                assert engine.cpu_assist.pipelined_loads == 3
        finally:
            engine.close()
    assert_same_outputs(results, reference, abs=1e-4)


def test_inline_load_enqueue_equals_off(tiny_model, reference, tmp_path, monkeypatch):
    """load_enqueue inline: the engine's thread writes (enqueues) a load's groups when it starts, no load thread."""
    with pytest.raises(ConfigError, match="load_enqueue must be thread or inline"):
        EngineConfig(load_enqueue="later")
    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=1, load_enqueue="inline")
    try:
        assert not engine.cpu_assist.loader.threaded
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
        assert engine.cpu_assist.pipelined_loads == 3
    finally:
        engine.close()
    assert_same_outputs(results, reference, abs=1e-4)


def test_auto_leaves_a_range_to_the_device_when_its_group_lands_first(tiny_model, reference, tmp_path, monkeypatch):
    """Where the workers are measured slower than the loads, a range of a layer still loading is not sent to them:
    the device waits for that layer's group and computes it (on a GPU with fast copies, waiting can beat the CPU).
    Same outputs as off."""
    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=1)
    assist = engine.cpu_assist
    assist.load_bytes_per_s = 1e18  # as measured: a group lands at once ...
    assist.pool.seconds_per_work = 1.0  # ... and the workers are slow
    gate = GroupGate()
    assist.loader.before_group = gate
    threading.Timer(0.3, gate.allow, args=(ALL_GROUPS,)).start()  # (here the groups land 0.3 s later)
    try:
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
        assert assist.pipelined_loads == 3 and assist.device_waits > 0
        assert assist.backend.cpu_ranges == 0 and assist.fallbacks == 0
    finally:
        engine.close()
    assert_same_outputs(results, reference, abs=1e-4)


def test_auto_measures_its_loads_and_workers(tiny_model, tmp_path, monkeypatch):
    """The estimates behind that choice come from the engine's own loads and deltas."""
    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=1)
    assist = engine.cpu_assist
    gate = GroupGate()  # the loads land 0.3 s after they start: the first prefills are the workers'
    assist.loader.before_group = gate
    threading.Timer(0.3, gate.allow, args=(ALL_GROUPS,)).start()
    try:
        assert assist.load_bytes_per_s is None and assist.pool.seconds_per_work is None
        engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0), MODELS)
        assert assist.backend.cpu_ranges > 0
        assert assist.load_bytes_per_s > 0 and assist.pool.seconds_per_work > 0
        assert assist.pipelined_loads == 3 and assist.load_enqueue_s > 0  # the engine thread's share of starting
        assert assist.load_thread_s > 0  # ... and the loads' own threads' (counted as their loads are measured)
    finally:
        engine.close()


def test_auto_failed_load_is_written_again(tiny_model, reference, tmp_path, monkeypatch, caplog):
    """A load whose second group fails: the workers keep covering its layers, and the device path (decode)
    writes the adapter again at once instead of computing with missing layers."""
    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=1)

    def fail_group_1(group: int) -> None:
        if group == 1:
            raise RuntimeError("simulated copy failure")

    engine.cpu_assist.loader.before_group = fail_group_1
    try:
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
        assert engine.cpu_assist.loading == []
    finally:
        engine.close()
    assert "simulated copy failure" in caplog.text and "loading it again" in caplog.text
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]


def test_auto_without_workers_loads_at_once(tiny_model, reference, tmp_path, monkeypatch):
    """cpu_workers 0 and nobody joined: nothing could cover the missing layers, so a cold adapter loads whole."""
    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=0)
    try:
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True), MODELS)
        assert engine.cpu_assist.pipelined_loads == 0 and engine.cpu_assist.backend.cpu_ranges == 0
    finally:
        engine.close()
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA: auto pipelines loads on a GPU")
def test_auto_on_cuda_equals_off(tiny_model, tmp_path):
    """The real thing: side-stream loads, the workers for layers not landed, the Triton kernels for the rest."""
    model_dir, adapters = tiny_model
    off, _ = run(tiny_model, cpu_assist="off", device="cuda", dtype="float32")
    results, engine = run(tiny_model, cpu_assist="auto", cpu_workers=2, device="cuda", dtype="float32",
                          data_dir=str(tmp_path))
    try:
        assert engine.cpu_assist.pipelined_loads == 3 and engine.cpu_assist.loading == []
        for source in engine.cpu_assist._sources.values():  # page-locked in place: the side stream's copies are async
            assert source._pinned is not None and source.adapter.modules[0].lora_a.is_pinned()
    finally:
        engine.close()
    assert_same_outputs(results, off, abs=1e-3)


def test_kernel_warm_up_loads_each_adapter_before_its_prefills(tiny_model, tmp_path, monkeypatch):
    """With auto, a cold adapter's first prefill runs on the workers while it loads: kernel warm-up (which exists to
    compile the device kernels' variants before the first request) first loads each of its adapters with a
    one-token request, so its prefills and decodes all run on the device."""
    from services.gpu_worker.kernel_warmup import warm_up

    engine = auto_engine(tiny_model, tmp_path, monkeypatch, cpu_workers=1)
    assist = engine.cpu_assist
    added = []
    add_request = engine.add_request

    def recording_add(request_id, *args, **kwargs):
        loading = [name for name, (load, _, _) in assist._loads.items() if not load.done()]
        added.append((request_id, loading, assist.backend.cpu_ranges))
        add_request(request_id, *args, **kwargs)

    monkeypatch.setattr(engine, "add_request", recording_add)
    try:
        warm_up(engine)
        added.append(("end", [], assist.backend.cpu_ranges))
        assert assist.pipelined_loads == 5  # one per warm-up adapter
    finally:
        engine.close()
    for (rid, loading, cpu), (next_rid, _, next_cpu) in zip(added, added[1:]):
        if not rid.endswith("-load"):
            assert loading == [], rid  # loaded before the warm-up's own requests
            assert next_cpu == cpu, rid  # and nothing of theirs computed on the workers
