"""The performance model: both decode forms fitted and the better one kept, prefill fit, file round trip, errors."""
from __future__ import annotations

import json
import random

import pytest

from services.scheduler.perf_model import DecodeSample, PerfModel, PerfModelError, PrefillSample, fit_perf_model

MIXES = [[0], [8], [64], [8, 8], [64, 8], [8, 8, 8, 8], [64, 8, 8, 8], [16, 32, 64, 8], [64] * 4, [0] * 8,
         [64] + [8] * 7, [32] * 8]


def prefill_samples(p0=0.01, p1=1e-4, p2=1e-6):
    return [PrefillSample(n, r, p0 + p1 * n + p2 * n * r) for n in (16, 64, 256) for r in (0, 8, 64)]


@pytest.mark.parametrize("form", ["max_rank", "sum_rank"])
def test_fit_recovers_the_form_and_coefficients_of_noiseless_data(form):
    beta, gamma, alpha = 0.02, 0.001, 3e-5

    def step(ranks):
        term = len(ranks) * max(ranks) if form == "max_rank" else sum(ranks)
        return beta + gamma * len(ranks) + alpha * term

    model = fit_perf_model([DecodeSample(m, step(m)) for m in MIXES], prefill_samples(), 0.025)
    assert model.form == form
    assert model.r2[form] == pytest.approx(1.0) and model.r2[form] > model.r2[
        "sum_rank" if form == "max_rank" else "max_rank"]
    assert (model.decode_base_s, model.decode_per_seq_s, model.decode_per_rank_s) == pytest.approx(
        (beta, gamma, alpha), rel=1e-6)
    assert (model.prefill_base_s, model.prefill_per_token_s, model.prefill_per_token_rank_s) == pytest.approx(
        (0.01, 1e-4, 1e-6), rel=1e-6)
    assert model.decode_step_s([64, 8]) == pytest.approx(step([64, 8]))
    assert model.prefill_s([(100, 8), (10, 0)]) == pytest.approx(0.01 + 1e-4 * 110 + 1e-6 * 800)
    assert model.decode_step_s([]) == 0.0 and model.prefill_s([]) == 0.0
    assert model.default_slo_tpot_s() == pytest.approx(0.0375)


def test_noisy_data_gives_a_lower_r2_and_a_forced_form_is_kept():
    rng = random.Random(0)
    samples = [DecodeSample(m, 0.02 + 3e-5 * sum(m) + rng.uniform(0, 0.01)) for m in MIXES]
    model = fit_perf_model(samples, prefill_samples(), 0.025, form="max_rank")
    assert model.form == "max_rank" and 0 < model.r2["sum_rank"] < 1


def test_coefficients_never_negative():
    # step times that fall with batch size would give a negative per-sequence cost: it is clamped, not kept
    samples = [DecodeSample([8] * b, 0.05 - 0.001 * b) for b in (1, 2, 4, 8)]
    model = fit_perf_model(samples, prefill_samples(), 0.025)
    assert min(model.decode_base_s, model.decode_per_seq_s, model.decode_per_rank_s) >= 0


def test_too_few_samples():
    with pytest.raises(PerfModelError, match="at least 3"):
        fit_perf_model([DecodeSample([0], 0.1)], prefill_samples(), 0.02)


def test_file_round_trip_and_errors(tmp_path):
    model = fit_perf_model([DecodeSample(m, 0.02 + 1e-5 * sum(m)) for m in MIXES], prefill_samples(), 0.025,
                           source="test")
    path = tmp_path / "sub" / "model.json"
    model.save(path)
    assert PerfModel.load(path) == model
    assert json.loads(path.read_text())["format"] == 1
    with pytest.raises(PerfModelError, match="no performance model file"):
        PerfModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PerfModelError, match="cannot read"):
        PerfModel.load(tmp_path / "bad.json")
    data = model.to_dict()
    with pytest.raises(PerfModelError, match="unknown performance model fields: colour"):
        PerfModel.from_dict({**data, "colour": "red"})
    with pytest.raises(PerfModelError, match="format 9"):
        PerfModel.from_dict({**data, "format": 9})
    with pytest.raises(PerfModelError, match="form must be"):
        PerfModel.from_dict({**data, "form": "cubic"})
    with pytest.raises(PerfModelError, match="no_lora_tpot_s must be positive"):
        PerfModel.from_dict({**data, "no_lora_tpot_s": 0})
    with pytest.raises(PerfModelError, match="decode_base_s must be a finite number"):
        PerfModel.from_dict({**data, "decode_base_s": "fast"})
    with pytest.raises(PerfModelError, match="missing"):
        PerfModel.from_dict({"form": "sum_rank"})
