"""Sampler (greedy, temperature, top-k, top-p, seeds, logprobs) and SamplingParams validation (CPU, no model)."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from services.gpu_worker.engine.sampler import _filtered_probs, _inverse_cdf, sample
from services.gpu_worker.engine.sequence import SamplingParams, SamplingParamsError, Sequence

V = 50


def random_logits(rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * scale


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """n tokens sampled from one row, all from one seeded generator (as one request's steps would)."""
    g = gen(seed)
    return [sample(logits_row[None], [params], [g])[0][0] for _ in range(n)]


def test_greedy_is_argmax_per_row():
    logits = random_logits(6)
    ids, lps = sample(logits, [SamplingParams(temperature=0.0)] * 6, [None] * 6)
    assert ids == logits.argmax(-1).tolist()
    assert lps == [None] * 6  # not asked for


def test_greedy_ignores_its_generator_and_the_other_rows():
    logits = random_logits(3)
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.0)]
    ids, _ = sample(logits, mixed, [gen(5), gen(1), None])
    assert ids[0] == logits[0].argmax().item() and ids[2] == logits[2].argmax().item()


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(1, scale=0.5)[0]  # flat enough that draws vary
    p = SamplingParams(temperature=1.0)
    a = draws(logits, p, 200, seed=123)
    b = draws(logits, p, 200, seed=123)
    c = draws(logits, p, 200, seed=124)
    assert a == b
    assert a != c
    assert len(set(a)) > 10  # it really samples


def test_seeded_row_does_not_depend_on_the_rest_of_the_batch():
    logits = random_logits(4, scale=0.5)
    p = SamplingParams(temperature=0.9, top_p=0.95)
    alone = [sample(logits[1:2], [p], [g])[0][0] for g in [gen(7)] for _ in range(50)]
    g = gen(7)
    together = []
    for _ in range(50):
        # unseeded neighbours draw from the global RNG; a seeded neighbour from its own
        ids, _ = sample(logits, [SamplingParams(), p, SamplingParams(temperature=0.5), p], [None, g, None, gen(99)])
        together.append(ids[1])
    assert alone == together


def test_top_k_1_equals_greedy():
    logits = random_logits(8)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    for s in range(5):
        ids, _ = sample(logits, params, [gen(s + r) for r in range(8)])
        assert ids == logits.argmax(-1).tolist()


def test_top_k_restricts_the_support_to_the_k_best():
    logits = random_logits(1, scale=0.3)[0]  # nearly flat: without the cut every token would show up
    top5 = set(torch.topk(logits, 5).indices.tolist())
    seen = set(draws(logits, SamplingParams(temperature=2.0, top_k=5), 400))
    assert seen == top5
    probs = _filtered_probs(logits, SamplingParams(top_k=5))
    assert set(torch.nonzero(probs).flatten().tolist()) == top5
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-5)
    # top_k=0 and -1 mean no cut
    assert SamplingParams(top_k=0).top_k == -1
    assert torch.count_nonzero(_filtered_probs(logits, SamplingParams(top_k=-1))) == V


def nucleus_logits() -> torch.Tensor:
    # token 3: 0.5, token 10: 0.3, token 20: 0.1, the 47 others share 0.1
    probs = torch.full((V,), 0.1 / 47)
    probs[3], probs[10], probs[20] = 0.5, 0.3, 0.1
    return probs.log()


@pytest.mark.parametrize(
    "top_p, nucleus",
    [(0.3, {3}), (0.5, {3}), (0.6, {3, 10}), (0.85, {3, 10, 20}), (0.95, None)],
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, nucleus):
    logits = nucleus_logits()
    probs = _filtered_probs(logits, SamplingParams(top_p=top_p))
    kept = set(torch.nonzero(probs).flatten().tolist())
    if nucleus is None:  # 0.9 is not enough: some of the tail is kept too
        assert {3, 10, 20} < kept
    else:
        assert kept == nucleus
        assert set(draws(logits, SamplingParams(top_p=top_p), 300)) == nucleus
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-5)
    if nucleus == {3, 10}:  # renormalised in proportion
        assert probs[3].item() == pytest.approx(0.5 / 0.8, rel=1e-5)


def test_top_p_boundary_exactly_reached_keeps_no_extra_token():
    """Uniform over 4 tokens: top_p=0.5 is reached exactly by 2 of them (as HF's TopPLogitsWarper keeps).

    Regression: the sampler kept a third token when the mass before it equalled top_p.
    """
    logits = torch.zeros(4)
    probs = _filtered_probs(logits, SamplingParams(top_p=0.5))
    assert torch.count_nonzero(probs).item() == 2
    assert torch.count_nonzero(_filtered_probs(logits, SamplingParams(top_p=0.75))).item() == 3
    assert torch.count_nonzero(_filtered_probs(logits, SamplingParams(top_p=0.76))).item() == 4


def test_top_k_and_top_p_combine():
    logits = nucleus_logits()
    probs = _filtered_probs(logits, SamplingParams(top_k=2, top_p=0.9))
    assert set(torch.nonzero(probs).flatten().tolist()) == {3, 10}  # top_k cuts first, top_p over what is left


def entropy(counter: Counter, n: int) -> float:
    return -sum(c / n * math.log(c / n) for c in counter.values())


def test_temperature_sharpens_or_flattens_the_draws():
    logits = random_logits(1, scale=1.0)[0]
    n = 2000
    best = logits.argmax().item()
    counts = {t: Counter(draws(logits, SamplingParams(temperature=t), n, seed=0)) for t in (0.3, 1.0, 2.0)}
    assert counts[0.3][best] > counts[1.0][best] > counts[2.0][best]
    assert entropy(counts[0.3], n) < entropy(counts[1.0], n) < entropy(counts[2.0], n)
    # the probabilities themselves: softmax(logits / t)
    for t in (0.3, 2.0):
        expected = torch.softmax(logits / t, -1)
        assert torch.allclose(_filtered_probs(logits, SamplingParams(temperature=t)), expected, atol=1e-6)


def test_sampling_frequencies_follow_the_probabilities():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    counts = Counter(draws(logits, SamplingParams(), n, seed=3))
    expected = torch.softmax(logits, -1).tolist()
    for token, p in enumerate(expected):
        assert abs(counts[token] / n - p) < 0.03


def test_logprobs_are_log_softmax_of_the_raw_logits_whatever_the_sampling():
    logits = random_logits(3)
    params = [
        SamplingParams(temperature=0.0, logprobs=True),
        SamplingParams(temperature=0.5, top_k=3, top_p=0.5, logprobs=True),  # sampling settings do not change them
        SamplingParams(temperature=2.0, logprobs=True),
    ]
    ids, lps = sample(logits, params, [gen(0), gen(1), gen(2)])
    raw = torch.log_softmax(logits, -1)
    for row in range(3):
        assert lps[row].token_id == ids[row]
        assert lps[row].logprob == pytest.approx(raw[row, ids[row]].item(), abs=1e-5)
        assert lps[row].top == []  # top_logprobs not asked for


def test_logprobs_only_for_rows_that_ask():
    logits = random_logits(3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=True), SamplingParams()]
    _, lps = sample(logits, params, [None] * 3)
    assert lps[0] is None and lps[2] is None and lps[1] is not None


@pytest.mark.parametrize("n", [1, 5, 20])
def test_top_logprobs_are_sorted_best_first_with_length_n(n):
    logits = random_logits(2)
    params = [SamplingParams(temperature=0.0, top_logprobs=n), SamplingParams(temperature=0.0, top_logprobs=2)]
    _, lps = sample(logits, params, [None, None])
    raw = torch.log_softmax(logits, -1)
    top = lps[0].top
    assert len(top) == n and len(lps[1].top) == 2
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    expected = torch.topk(raw[0], n)
    assert [t for t, _ in top] == expected.indices.tolist()
    assert values == pytest.approx(expected.values.tolist(), abs=1e-5)
    assert top[0][0] == lps[0].token_id  # greedy: the chosen token is the best one


def test_top_logprobs_turns_logprobs_on():
    assert SamplingParams(top_logprobs=3).logprobs is True
    assert SamplingParams().logprobs is False


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    for u in (0.0, 1e-9, 0.2499, 0.25, 0.5, 0.999999, 1.0 - 2**-24):
        token = _inverse_cdf(probs, torch.tensor([u])).item()
        assert probs[token] > 0
    assert _inverse_cdf(probs, torch.tensor([0.1])).item() == 1
    assert _inverse_cdf(probs, torch.tensor([0.3])).item() == 3
    unnormalised = probs * 8
    assert _inverse_cdf(unnormalised, torch.tensor([0.3])).item() == 3


def test_sequence_seed_gives_a_generator_and_none_gives_none():
    with_seed = Sequence("a", [1], SamplingParams(seed=5), None, 0)
    without = Sequence("b", [1], SamplingParams(), None, 1)
    assert with_seed.generator is not None and without.generator is None
    assert torch.equal(torch.rand(3, generator=with_seed.generator), torch.rand(3, generator=gen(5)))


# ---- SamplingParams validation ----

@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"max_tokens": -3}, "max_tokens must be an integer >= 1, got -3"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer >= 1, got 2.5"),
        ({"temperature": -0.1}, "temperature must be a number between 0 and 2, got -0.1"),
        ({"temperature": 2.5}, "temperature must be a number between 0 and 2, got 2.5"),
        ({"temperature": float("nan")}, "temperature must be a number between 0 and 2"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
        ({"top_p": float("nan")}, r"top_p must be a number in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be -1 \\(off\\) or a positive integer, got -2"),
        ({"top_k": 1.5}, "top_k must be -1 \\(off\\) or a positive integer, got 1.5"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"seed": "7"}, "seed must be an integer, got '7'"),
        ({"stop": [""]}, "stop must be a non-empty string or a list of at most 16 non-empty strings"),
        ({"stop": ""}, "stop must be a non-empty string"),
        ({"stop": ["a", 3]}, "stop must be a non-empty string"),
        ({"stop": [f"s{i}" for i in range(17)]}, "at most 16"),
        ({"top_logprobs": 21}, "top_logprobs must be an integer between 0 and 20, got 21"),
        ({"top_logprobs": -1}, "top_logprobs must be an integer between 0 and 20, got -1"),
        ({"top_logprobs": 2.5}, "top_logprobs must be an integer between 0 and 20, got 2.5"),
        ({"temperature": "1"}, "temperature must be a number between 0 and 2, got '1'"),
        ({"top_p": "0.5"}, r"top_p must be a number in \(0, 1\], got '0.5'"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1, got True"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids must be a list of integers"),
    ],
)
def test_sampling_params_validation_messages(kwargs, message):
    with pytest.raises(SamplingParamsError, match=message) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)  # one line for the client
    assert isinstance(info.value, ValueError)


def test_sampling_params_valid_edges_and_normalisation():
    p = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=1, seed=0, stop="x", top_logprobs=20)
    assert p.greedy and p.stop == ["x"] and p.logprobs
    assert SamplingParams(temperature=2.0, top_p=1e-6).temperature == 2.0
    assert not SamplingParams(temperature=0.01).greedy
    assert len(SamplingParams(stop=[f"s{i}" for i in range(16)]).stop) == 16


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 1e-40, 1e-45])
def test_tiny_temperature_is_greedy_not_nan(temperature):
    """Regression: logits / 1e-40 overflow to inf, and the NaN probabilities failed the whole step."""
    logits = random_logits(3)
    params = [SamplingParams(temperature=temperature, top_p=0.9, logprobs=True)] * 3
    ids, lps = sample(logits, params, [gen(0), None, gen(1)])
    assert ids == logits.argmax(-1).tolist()
    assert all(math.isfinite(lp.logprob) for lp in lps)
