"""`caraserve profile` and the worker's start-up model: the real engine is measured, the fit is sane, the engine is
left as it was (no adapters, no requests, every KV block free), the model file is cached and reused."""
from __future__ import annotations

import json

import pytest

from services.cli import main
from services.gpu_worker import profiler
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.profiler import ProfileSettings, load_or_profile, profile_engine, random_adapter
from services.scheduler.perf_model import PerfModel, PerfModelError

TINY = ProfileSettings(batch_sizes=(1, 3), ranks=(8, 32), prompt_lengths=(8, 48), repeats=1)


@pytest.fixture(scope="module")
def engine(default_model_path):
    return LLMEngine(EngineConfig(model=str(default_model_path), max_num_seqs=8, num_kv_blocks=64, max_loras=4))


def test_random_adapter_fits_the_base(engine):
    adapter = random_adapter(engine, 16, seed=1)
    assert adapter.max_rank == 16 and len(adapter.modules) == engine.base_shape.num_layers * 7
    for m in adapter.modules:
        fan_in, fan_out = engine.base_shape.module_shapes[m.module]
        assert m.lora_a.shape == (16, fan_in) and m.lora_b.shape == (fan_out, 16)


def test_decode_mixes_cover_base_uniform_cycled_and_skewed():
    mixes = ProfileSettings(batch_sizes=(1, 4), ranks=(8, 64)).decode_mixes()
    assert [0] in mixes and [8] in mixes and [64] * 4 in mixes
    assert [8, 64, 8, 64] in mixes and [64, 8, 8, 8] in mixes
    assert len(mixes) == len({tuple(m) for m in mixes})


def test_settings_fitted_to_the_engine_limits(engine):
    s = ProfileSettings(batch_sizes=(1, 8, 64), ranks=(8, 512), prompt_lengths=(16, 10**6)).fitted_to(engine)
    assert s.batch_sizes == (1, 8) and s.ranks == (8,) and s.prompt_lengths == (16,)
    with pytest.raises(PerfModelError, match="nothing to profile"):
        ProfileSettings(ranks=(1024,)).fitted_to(engine)


def test_profile_measures_the_engine_and_leaves_it_clean(engine):
    free = engine.blocks.num_free
    model = profile_engine(engine, TINY, show_progress=False)
    assert model.form in ("max_rank", "sum_rank") and model.device == "cpu" and model.lora_backend == "torch"
    assert set(model.r2) == {"max_rank", "sum_rank", "prefill"}
    assert model.no_lora_tpot_s > 0 and model.samples > 6 and "caraserve profile" in model.source
    # predictions grow with work (coefficients are non-negative, and something was measured)
    assert model.decode_step_s([32, 32, 32]) >= model.decode_step_s([8]) > 0
    assert model.prefill_s([(48, 32)]) > model.prefill_s([(8, 0)]) > 0
    assert engine.adapter_names() == [] and not engine.has_unfinished() and engine.blocks.num_free == free


def test_the_engine_serves_adapters_after_profiling(engine):
    """A worker profiles itself at its first start, then serves. State the profile's steps leave behind (the CPU's
    bagged LoRA pools, one per adapter width) is written again by the serving steps: the first request for an adapter
    of a profiled width once failed ("Inplace update to inference tensor outside InferenceMode") and killed the
    worker."""
    from services.gpu_worker.engine.sequence import SamplingParams

    profile_engine(engine, TINY, show_progress=False)
    for rank in TINY.ranks:  # the widths the profile pooled
        engine.register_adapter(random_adapter(engine, rank, seed=100 + rank, name=f"served-{rank}"))
    try:
        results = engine.generate(["hello there", "a b c", "what is"], SamplingParams(max_tokens=4),
                                  adapters=["served-8", "served-32", None])
        assert [len(r.token_ids) for r in results] == [4, 4, 4]
    finally:
        for rank in TINY.ranks:
            engine.unload_adapter(f"served-{rank}")
        engine.step()


def test_profiling_stops_between_points_when_told_and_leaves_the_engine_clean(engine, tmp_path):
    """A worker sent SIGTERM while it profiles at start-up stops within a point, not after the whole profile."""
    free = engine.blocks.num_free
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(profiler.ProfilingCancelled):
        profile_engine(engine, TINY, show_progress=False, should_stop=should_stop)
    assert len(asked) == 2
    assert engine.adapter_names() == [] and not engine.has_unfinished() and engine.blocks.num_free == free
    with pytest.raises(profiler.ProfilingCancelled):  # the start-up path: nothing cached
        load_or_profile(engine, None, str(tmp_path), should_stop=lambda: True)
    assert not profiler.default_model_path(engine, str(tmp_path)).exists()


def test_busy_engine_is_not_profiled(engine):
    from services.gpu_worker.engine.sequence import SamplingParams

    engine.add_request("busy", "hello", SamplingParams(max_tokens=2))
    try:
        with pytest.raises(PerfModelError, match="busy"):
            profile_engine(engine, TINY, show_progress=False)
    finally:
        engine.abort("busy")
        engine.step()


def test_load_or_profile_uses_the_file_then_the_cache(engine, tmp_path, monkeypatch):
    with pytest.raises(PerfModelError, match="no performance model file"):
        load_or_profile(engine, str(tmp_path / "missing.json"), str(tmp_path))
    calls = []

    def fake_profile(eng, settings, **kw):  # counts calls; returns a real measurement of a tiny profile
        calls.append(settings)
        return profile_engine(eng, TINY, show_progress=False)

    monkeypatch.setattr(profiler, "profile_engine", fake_profile)
    first = load_or_profile(engine, None, str(tmp_path))
    assert len(calls) == 1 and calls[0] == ProfileSettings.quick()  # no file: the quick profile, then cached
    cached = profiler.default_model_path(engine, str(tmp_path))
    assert cached.is_relative_to(tmp_path / "perf_models") and PerfModel.load(cached) == first
    assert load_or_profile(engine, None, str(tmp_path)) == first and len(calls) == 1  # reused, not re-measured
    explicit = tmp_path / "given.json"
    first.save(explicit)
    assert load_or_profile(engine, str(explicit), str(tmp_path)) == first and len(calls) == 1


def test_workers_starting_together_profile_once(engine, tmp_path, monkeypatch):
    """`caraserve up --workers 2`: the second worker waits while the first profiles, then loads its model rather
    than profiling beside it (each would measure the other's load); a worker told to stop stops waiting."""
    import threading

    started, release, calls = threading.Event(), threading.Event(), []
    measured = profile_engine(engine, TINY, show_progress=False)

    def slow_profile(eng, settings, **kw):  # the first worker's profile, held until the second is waiting
        calls.append(settings)
        started.set()
        assert release.wait(30)
        return measured

    monkeypatch.setattr(profiler, "profile_engine", slow_profile)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", load_or_profile(engine, None, str(tmp_path))))
    first.start()
    assert started.wait(30)
    with pytest.raises(profiler.ProfilingCancelled, match="waiting"):  # SIGTERM while waiting
        load_or_profile(engine, None, str(tmp_path), should_stop=lambda: True)
    second = threading.Thread(target=lambda: results.setdefault("second", load_or_profile(engine, None, str(tmp_path))))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first
    release.set()
    first.join(30)
    second.join(30)
    assert results == {"first": measured, "second": measured} and len(calls) == 1


def test_profile_command_writes_the_model(default_model_path, tmp_path, capsys):
    out = tmp_path / "m.json"
    code = main(["profile", "--model", str(default_model_path), "-o", str(out), "--batch-sizes", "1,2",
                 "--ranks", "8", "--prompt-lengths", "8,32", "--repeats", "1", "--data-dir", str(tmp_path)])
    assert code == 0
    model = PerfModel.load(out)
    assert json.loads(out.read_text())["form"] == model.form
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "R²" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--ranks", "8,x", "--ranks must be a comma-separated list of integers"),
    ("--batch-sizes", "0", "--batch-sizes must list positive integers"),
    ("--repeats", "0", "--repeats must be >= 1"),
])
def test_profile_command_bad_flags(flag, value, message, capsys):
    assert main(["profile", flag, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"caraserve profile: error: {message}, got {value!r}" if flag != "--repeats"
                   else f"caraserve profile: error: {message}, got {value}"]


def test_a_poor_fit_is_flagged():
    from services.gpu_worker.profiler import poor_fit_warning
    from services.scheduler.perf_model import PerfModel

    base = dict(form="sum_rank", decode_base_s=0.03, decode_per_seq_s=0.001, decode_per_rank_s=1e-5,
                prefill_base_s=0.02, prefill_per_token_s=2e-4, prefill_per_token_rank_s=1e-7, no_lora_tpot_s=0.04)
    assert poor_fit_warning(PerfModel(**base, r2={"sum_rank": 0.97, "max_rank": 0.9, "prefill": 0.99})) is None
    warning = poor_fit_warning(PerfModel(**base, r2={"sum_rank": 0.35, "max_rank": 0.3, "prefill": 0.99}))
    assert "R² 0.35" in warning and "idle machine" in warning
