#!/usr/bin/env python
"""Serving benchmark: an open-loop multi-adapter workload against OpenAI-compatible streaming endpoints, our mesh
and two PEFT baselines started by the harness, in the same run.

Workload (seeded; the same request list for every system at a given adapter count and rate, and the same
arrivals, lengths and prompts at every adapter count: only the adapters the requests use differ):
  arrivals     Poisson: exponential inter-arrival times with mean 1/rate, for --duration seconds (or exactly
               --requests requests) per rate point; a sweep of --rates. A "burst" point (--burst-requests, all sent
               at once) measures saturated throughput; --burst-repeats bursts, each with its own seed (other
               arrivals' lengths, prompts and adapters), the same seeds at every adapter count.
  adapters     --adapters N (a sweep, e.g. 8,64,512): random PEFT LoRA adapters generated for the run (random A,
               small random B, on --target-modules of every layer), ranks from --ranks in equal shares (each block of
               len(ranks) adapters holds every rank once, in a seeded order, so every prefix is mixed). Adapter i's
               popularity is uniform (1/N) or power law (proportional to (i+1)^-alpha, --popularity powerlaw);
               --base-fraction of the requests go to the base model.
  prompts      chat-like English text (sentences built from topics and question templates, no dataset download)
               whose length is checked with the model's tokenizer; lengths log-normal with median --prompt-median
               and log-sigma --prompt-sigma, clipped to [--prompt-min, --prompt-max]. Full run: median 160, sigma
               0.8, 64-1024 tokens (~13% at the 64 floor, 10% over ~450, ~1% at the 1024 cap). --quick: median 96,
               sigma 0.6, 32-256. (On this CPU a prefill costs ~2-5 ms a token, as much as 30-80 decode steps for
               a long prompt: prompts dominate the load.)
  outputs      exactly max_tokens tokens per request (ignore_eos, greedy): log-normal, median --output-median, sigma
                --output-sigma, clipped to [--output-min, --output-max]. Full run: median 48, sigma 0.5, 16-128
               (10% under ~25, 10% over ~90). --quick: median 16, 8-32.
  requests     POST /v1/completions, stream with stream_options.include_usage, temperature 0, ignore_eos.

Systems (--systems; each started by the harness as a subprocess and stopped with SIGTERM at the end, also on
Ctrl-C or error; children die with the harness even if it is killed):
  ours                 `caraserve up` (embedded NATS, adapter_store, scheduler, one gpu_worker, gateway) with
                       --cpu-assist off and --max-loras slots; the adapters are registered through the admin API
                       (POST /v1/adapters) and stay cold: a worker fetches each from the store on its first request
                       (--max-cpu-loras max(64, N): once fetched, an adapter stays in the worker's host tier).
  ours_resident        the all-resident upper bound: the same mesh with --max-loras >= N, and one warm-up request per
                       adapter before measuring, so every adapter is fetched and in a slot.
  ours_cpu_assist      (optional) ours with --cpu-assist always.
  peft_one_at_a_time   bench/baselines/peft_server.py --mode one_at_a_time: transformers + PEFT serving one request
                       at a time, FIFO (set_adapter per request).
  peft_mixed_batch     bench/baselines/peft_server.py --mode mixed_batch: every waiting request in one generate()
                       with adapter_names=[...] (static batches of up to --peft-max-batch-size).
  endpoint             any OpenAI-compatible server already running (--endpoint URL): its adapters are the models
                       --endpoint-models names (default: every model /v1/models lists with a parent).
  The PEFT servers load up to --peft-max-loaded-adapters adapters at start-up (float32; beyond that, load_adapter on
  first use and delete_adapter of the least recently used), so at the default sizes they start warm, which favours
  them over cold `ours`. They run at the smallest adapter count only unless --baseline-adapters all. Every server
  gets --threads torch threads (OMP_NUM_THREADS).

Metrics per request: TTFT (send to first token chunk), TPOT (decode: (last token - first token) / (tokens - 1)),
TPT (time per output token, queueing and prefill included: end-to-end / output tokens, the paper's SLO metric),
end-to-end latency; errors (HTTP status, error event, transport error, timeout after --request-timeout) are
counted, never fatal, and miss the SLO. Per point: p50/p90/p99 of each, output tokens/s and requests/s over the
point's makespan (first send to last completion), goodput, SLO attainment.

SLO: a request meets it when its TPT <= --slo-factor (1.5) x the TPT the same request (its prompt and output
lengths) takes on an unloaded mesh with the base model (no LoRA). The unloaded model comes from calibration at the
start of the run: --calibration-requests requests (prompt lengths evenly spread from --prompt-min to
--prompt-max, the median output length), one at a time, base model, through the --slo-on system (run first; by
default peft_one_at_a_time, the transformers server a user would otherwise write, so that every system meets the
SLO when idle and the sweep measures how each holds it under load; a faster engine gets headroom): TTFT fitted
as a + b * prompt_tokens, decode time per token d (median), so unloaded end-to-end = a + b*P + d*(N-1). Per
request rather than one number because on a CPU prefill is a large, prompt-dependent part of TPT: one TPT bound
would fail long-prompt requests on an idle server. --slo-tpot-ms X instead sets one fixed TPT bound for every
request. The calibration (samples, fit, the unloaded TPOT d) is recorded. Before the first mesh starts, the run
profiles the worker once (`caraserve profile --quick`) and every mesh gets that file (--perf-model).
Sustained rate at the SLO: the highest swept rate whose attainment is >= --slo-attainment (0.9) with every lower
swept rate meeting it too (0 when even the lowest misses; the ratio is then reported as a lower bound). A system's
sweep stops after the first rate that misses (--no-stop-on-break sweeps them all).
Throughput vs adapters: output tokens/s of the burst points at each adapter count, the median of the repeats
(one burst varies by ~10% from run to run on a shared 2-core VM); the largest point throughput when there is no
burst. Headline (DESIGN.md targets, CPU): ours' sustained rate >= 4x peft_one_at_a_time and
>= 1.5x peft_mixed_batch at the smallest adapter count; ours' throughput at the largest adapter count within 10% of
that at the smallest (ratio >= 0.9).

Output: JSON (default bench/results/serve.json: machine, commit, configuration, calibration, every point's metrics
and requests, sustained rates, headline) rewritten after every point, and PNGs beside it: <stem>_latency_cdf.png
(TTFT / TPT / end-to-end CDFs of every system at the smallest adapter count, at the highest rate all of them ran),
<stem>_slo_vs_rate.png, <stem>_throughput_vs_adapters.png. Progress on stderr (tqdm), a summary table on stdout.

Durations on the 2-core CPU (about 70-140 tokens/s through our engine, ~12 through PEFT one at a time), on a
quiet machine: --quick about 10-15 minutes (adapters 8,32; rates 0.2,0.4,0.8,1.6 req/s; 30 s of arrivals a point,
at least 8 requests; a sweep stops where the SLO breaks); the full default run (adapters 8,64,512; rates
0.05-1.6 req/s; 90 s of arrivals a point, at least 16 requests, so 320 s at 0.05 req/s) about 2-2.5 hours, most
of it in the six mesh sweeps (ours and ours_resident at 8, 64 and 512 adapters) and their low rates. Narrow it
with --rates, --adapters or --systems. Other processes on the machine skew every number: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    git_commit, machine_info, percentile, progress, result_path, summarize, timestamp, write_result,
)

NAME = "serve"
SYSTEMS = ("ours", "ours_resident", "ours_cpu_assist", "peft_one_at_a_time", "peft_mixed_batch", "endpoint")
DEFAULT_SYSTEMS = ("ours", "ours_resident", "peft_one_at_a_time", "peft_mixed_batch")
MESH_SYSTEMS = ("ours", "ours_resident", "ours_cpu_assist")
PEFT_SYSTEMS = ("peft_one_at_a_time", "peft_mixed_batch")
TARGETS = {"ours_vs_peft_one_at_a_time": 4.0, "ours_vs_peft_mixed_batch": 1.5, "throughput_max_vs_min_adapters": 0.9}
UP_READY = "caraserve up: ready"
PEFT_READY = "peft_server: ready"

# Full run and --quick; a flag given explicitly wins over both.
DEFAULTS = dict(adapters="8,64,512", rates="0.05,0.1,0.2,0.4,0.6,0.8,1.2,1.6", duration=90.0, requests=None,
                min_requests=16, burst_requests=48, burst_repeats=3,
                prompt_median=160, prompt_sigma=0.8, prompt_min=64, prompt_max=1024,
                output_median=48, output_sigma=0.5, output_min=16, output_max=128,
                calibration_requests=8, request_timeout=300.0)
QUICK = dict(adapters="8,32", rates="0.2,0.4,0.8,1.6", duration=30.0, requests=None, min_requests=8,
             burst_requests=16, burst_repeats=1,
             prompt_median=96, prompt_sigma=0.6, prompt_min=32, prompt_max=256,
             output_median=16, output_sigma=0.4, output_min=8, output_max=32,
             calibration_requests=6, request_timeout=120.0)


def log(message: str) -> None:
    progress(NAME, message)


# ============================================================================================ workload
@dataclass(frozen=True)
class LengthDist:
    """Log-normal lengths: median `median`, log-space sigma `sigma`, rounded and clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng, n: int) -> list[int]:
        import numpy as np

        raw = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=n) if self.sigma > 0 \
            else np.full(n, float(self.median))
        return [int(x) for x in np.clip(np.rint(raw), self.lo, self.hi)]

    def describe(self) -> dict:
        return {"distribution": "lognormal, clipped", "median": self.median, "sigma": self.sigma, "min": self.lo,
                "max": self.hi}


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    seed: int


@dataclass
class RequestSpec:
    """One request of a workload: when it is sent (seconds after the point starts), to which model, how long."""

    index: int
    arrival_s: float
    model: str  # adapter name, or the base model's name
    adapter_rank: int | None  # None: the base model (or unknown)
    prompt_tokens: int
    max_tokens: int
    prompt_key: int  # which prompt text (deterministic)


def poisson_arrivals(rng, rate: float, duration: float | None = None, count: int | None = None) -> list[float]:
    """Arrival times (s) of a Poisson process of `rate` per second: all within [0, duration), or exactly `count`.
    rate = inf: `count` arrivals at 0 (a burst)."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        if count is None:
            raise ValueError("a burst (rate inf) needs a count")
        return [0.0] * count
    if count is not None:
        return [float(x) for x in rng.exponential(1.0 / rate, size=count).cumsum()]
    if duration is None or duration <= 0:
        raise ValueError("give a positive duration or a count")
    times, t = [], 0.0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= duration:
            return times
        times.append(t)


def popularity(n: int, kind: str = "uniform", alpha: float = 1.0) -> list[float]:
    """Probabilities of adapters 0..n-1: uniform, or power law (i+1)^-alpha (adapter 0 the most popular)."""
    if n < 1:
        raise ValueError("need at least one adapter")
    if kind == "uniform":
        return [1.0 / n] * n
    if kind == "powerlaw":
        weights = [(i + 1) ** -alpha for i in range(n)]
        total = sum(weights)
        return [w / total for w in weights]
    raise ValueError(f"popularity must be uniform or powerlaw, got {kind!r}")


def make_adapter_specs(n: int, ranks: list[int], seed: int) -> list[AdapterSpec]:
    """n adapters; each consecutive block of len(ranks) holds every rank once, in a seeded order."""
    rng = random.Random(seed)
    out: list[AdapterSpec] = []
    while len(out) < n:
        block = list(ranks)
        rng.shuffle(block)
        for rank in block[: n - len(out)]:
            i = len(out)
            out.append(AdapterSpec(f"a{i:04d}-r{rank}", rank, seed * 100003 + i))
    return out


def point_seed(seed: int, rate: float, repeat: int = 0) -> int:
    """The seed of one rate point (`repeat`: which burst of several): the same for every system and every adapter
    count (build_workload draws only the adapter picks from the count, so the throughput of 8 and of 512 adapters
    is measured on the same arrivals and lengths; with its own lengths per count the 512-adapter burst had 7.5%
    more prompt tokens to prefill)."""
    r = "burst" if math.isinf(rate) else f"{rate:.6g}"
    if repeat:
        r += f"#{repeat}"
    # a digest of the whole key: the key's bytes as an integer modulo 2**63 kept only its first 8 bytes, so bursts
    # 1 and 2 ("0|burst#1", "0|burst#2") got the same requests
    return int.from_bytes(hashlib.sha256(f"{seed}|{r}".encode()).digest()[:8], "little") >> 1


def build_workload(adapters: list[AdapterSpec], *, rate: float, seed: int, prompt: LengthDist, output: LengthDist,
                   duration: float | None = None, count: int | None = None, min_count: int = 0,
                   popularity_kind: str = "uniform", alpha: float = 1.0, base_fraction: float = 0.0,
                   base_model: str = "base") -> list[RequestSpec]:
    """The requests of one rate point, deterministic for (adapters, rate, seed, distributions): Poisson arrivals
    for `duration` seconds (at least `min_count` of them: the window then grows), or exactly `count`. Arrivals,
    lengths and prompts depend on the seed only; which adapter each request uses comes from a second generator
    seeded with the seed and the number of adapters."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(rng, rate, duration, count)
    if count is None and len(arrivals) < min_count:
        rng = np.random.default_rng(seed)
        arrivals = poisson_arrivals(rng, rate, count=min_count)
    n = len(arrivals)
    to_base = rng.random(n) < base_fraction if adapters else np.ones(n, dtype=bool)
    prompt_lens = prompt.sample(rng, n)
    output_lens = output.sample(rng, n)
    keys = rng.integers(0, 2**31, size=n)
    probs = popularity(len(adapters), popularity_kind, alpha) if adapters else []
    picks = (np.random.default_rng([seed, len(adapters)]).choice(len(adapters), size=n, p=probs) if adapters
             else np.zeros(n, dtype=int))
    out = []
    for i in range(n):
        if to_base[i]:
            model, rank = base_model, None
        else:
            a = adapters[int(picks[i])]
            model, rank = a.name, a.rank
        out.append(RequestSpec(i, float(arrivals[i]), model, rank, prompt_lens[i], output_lens[i], int(keys[i])))
    return out


def calibration_specs(k: int, prompt: LengthDist, output: LengthDist, base_model: str) -> list[RequestSpec]:
    """k base-model requests with prompt lengths evenly spread over [prompt.lo, prompt.hi] (so the TTFT fit sees
    the whole range) and the median output length (at least 2, so decode time shows)."""
    n_out = max(2, min(output.hi, int(round(output.median))))
    lengths = [prompt.lo] if k == 1 else [round(prompt.lo + (prompt.hi - prompt.lo) * i / (k - 1)) for i in range(k)]
    return [RequestSpec(i, 0.0, base_model, None, int(p), n_out, 1_000_003 + i) for i, p in enumerate(lengths)]


TOPICS = ["the water cycle", "vaccines", "binary search", "the French revolution", "photosynthesis", "compound "
          "interest", "black holes", "chess openings", "bicycles", "sourdough bread", "plate tectonics", "public-key "
          "cryptography", "Roman aqueducts", "rainbows", "garbage collection", "the immune system", "supply and "
          "demand", "honey bees", "jazz improvisation", "ocean tides", "volcanoes", "the printing press", "tax "
          "returns", "container shipping", "migratory birds", "solar panels", "the stock market", "coral reefs",
          "neural networks", "medieval castles", "coffee roasting", "marathon training", "quantum computing",
          "urban gardening", "the Silk Road", "electric cars", "sleep cycles", "climate models", "origami"]
SENTENCES = [
    "Can you explain {t} to a ten-year-old?", "I am preparing a short lesson about {t} for next week.",
    "My friend and I argued about {t} yesterday and could not agree.", "Please keep the answer friendly.",
    "I have read a couple of articles on {t}, but they were full of jargon.", "What is the history of {t}?",
    "Assume I know basic high-school science but nothing more advanced.", "How does {t} relate to {u}?",
    "It is for a newsletter that goes out to about two hundred readers.", "Give me three facts about {t}.",
    "Avoid lists if you can; I prefer flowing paragraphs.", "Summarize {t} in two sentences.",
    "I want to explain {t} to my grandmother afterwards.", "Use one concrete example people can try at home.",
    "Write a short poem that mentions {t} and {u}.", "What are common misconceptions about {t}?",
    "I am a little sceptical, so point out where the evidence on {t} is strongest.",
    "Here is what I wrote so far: {t} matters because it shapes how we think about {u}.",
    "Compare {t} with something from everyday life.", "List the steps someone should follow to learn {t}.",
    "Earlier you said that {u} was unrelated to {t}; could you clarify?", "Thanks, that helped a lot.",
]


class PromptFactory:
    """Prompt texts of a given token count: a window of a seeded chat-like corpus, trimmed until the tokenizer
    counts exactly the wanted tokens (or the closest count it can find, recorded)."""

    def __init__(self, tokenizer, seed: int = 0, corpus_tokens: int = 60_000) -> None:
        self.tokenizer = tokenizer
        rng = random.Random(seed)
        parts, count = [], 0
        while count < corpus_tokens:
            paragraph = " ".join(rng.choice(SENTENCES).format(t=rng.choice(TOPICS), u=rng.choice(TOPICS))
                                 for _ in range(rng.randint(2, 6)))
            role = rng.choice(("User", "User", "Assistant"))
            parts.append(f"{role}: {paragraph}\n")
            count += len(paragraph) // 4 + 3
        self.ids = tokenizer.encode("".join(parts), add_special_tokens=False)
        self._cache: dict[tuple[int, int], tuple[str, int]] = {}

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, n_tokens: int, key: int) -> tuple[str, int]:
        """(text, its token count) for a prompt of n_tokens; the same for the same (n_tokens, key)."""
        if (n_tokens, key) in self._cache:
            return self._cache[(n_tokens, key)]
        limit = len(self.ids) - n_tokens - 16
        if limit <= 0:
            raise ValueError(f"prompts of {n_tokens} tokens need a larger corpus")
        start = key % limit
        best: tuple[str, int] | None = None
        for delta in (0, -1, 1, -2, 2, -3, 3, -4, 4, 5, 6):
            text = self.tokenizer.decode(self.ids[start:start + n_tokens + delta], skip_special_tokens=True)
            got = self.count(text)
            if best is None or abs(got - n_tokens) < abs(best[1] - n_tokens):
                best = (text, got)
            if got == n_tokens:
                break
        self._cache[(n_tokens, key)] = best
        return best


# ============================================================================================ SLO and metrics
@dataclass
class RequestRecord:
    """What one request did. Times in seconds; send_s from the point's start, the others from the send."""

    index: int
    model: str
    adapter_rank: int | None
    prompt_tokens: int
    max_tokens: int
    arrival_s: float  # scheduled
    send_s: float = 0.0  # actual
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    chunks: int = 0
    last_token_s: float | None = None  # last token chunk, from the send
    max_itl_s: float | None = None  # largest gap between token chunks
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None and self.output_tokens > 0

    @property
    def tpt_s(self) -> float | None:
        """Time per output token, everything included (the SLO metric)."""
        return self.e2e_s / self.output_tokens if self.ok else None

    @property
    def tpot_s(self) -> float | None:
        """Decode time per output token after the first."""
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.last_token_s is None:
            return None
        return (self.last_token_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 6)
        return d


@dataclass
class SLO:
    """Per-request bound on TPT: factor x the unloaded TPT of a request of its lengths, or one fixed bound."""

    factor: float = 1.5
    fixed_tpt_s: float | None = None
    ttft_base_s: float = 0.0  # unloaded TTFT = ttft_base_s + ttft_per_prompt_token_s * prompt_tokens
    ttft_per_prompt_token_s: float = 0.0
    tpot_s: float = 0.0  # unloaded decode time per token

    def unloaded_e2e_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.ttft_base_s + self.ttft_per_prompt_token_s * prompt_tokens + self.tpot_s * max(output_tokens - 1, 0)

    def limit_tpt_s(self, prompt_tokens: int, output_tokens: int) -> float:
        if self.fixed_tpt_s is not None:
            return self.fixed_tpt_s
        n = max(output_tokens, 1)
        return self.factor * self.unloaded_e2e_s(prompt_tokens, n) / n

    def met(self, record: RequestRecord) -> bool:
        """Errors, timeouts and short outputs miss."""
        if not record.ok or record.output_tokens < record.max_tokens:
            return False
        return record.tpt_s <= self.limit_tpt_s(record.prompt_tokens, record.max_tokens)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fit_unloaded(samples: list[dict], factor: float) -> SLO:
    """SLO from calibration samples {prompt_tokens, output_tokens, ttft_s, e2e_s} (one request at a time):
    TTFT = a + b * prompt_tokens by least squares (a, b >= 0), decode time per token = median over samples."""
    if not samples:
        raise ValueError("no calibration samples")
    xs = [float(s["prompt_tokens"]) for s in samples]
    ys = [float(s["ttft_s"]) for s in samples]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    if b < 0:
        a, b = my, 0.0
    if a < 0:
        a, b = 0.0, sum(x * y for x, y in zip(xs, ys)) / max(sum(x * x for x in xs), 1e-12)
    decode = [(s["e2e_s"] - s["ttft_s"]) / (s["output_tokens"] - 1) for s in samples if s["output_tokens"] > 1]
    d = percentile(decode, 50) if decode else 0.0
    return SLO(factor=factor, ttft_base_s=a, ttft_per_prompt_token_s=b, tpot_s=max(d, 0.0))


def _stats(values: list[float]) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in summarize(values).items()}


def point_metrics(records: list[RequestRecord], slo: SLO | None) -> dict:
    """Latency summaries, throughput and SLO attainment of one point's requests."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kind = (r.error or "no tokens").split(":", 1)[0]
            errors[kind] = errors.get(kind, 0) + 1
    if ok:
        start = min(r.send_s for r in records)
        end = max(r.send_s + r.e2e_s for r in ok)
        makespan = max(end - start, 1e-9)
    else:
        makespan = None
    tokens = sum(r.output_tokens for r in ok)
    met = [slo.met(r) for r in records] if slo is not None else None
    arrivals = [r.arrival_s for r in records]
    window = max(arrivals) - min(arrivals) if arrivals else 0.0
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "short_outputs": sum(1 for r in ok if r.output_tokens < r.max_tokens),
        "offered_rate": (len(records) - 1) / window if window > 0 else None,  # from the mean inter-arrival gap
        "makespan_s": makespan,
        "output_tokens": tokens,
        "throughput_tokens_per_s": tokens / makespan if makespan else 0.0,
        "throughput_requests_per_s": len(ok) / makespan if makespan else 0.0,
        "goodput_requests_per_s": (sum(met) / makespan) if (makespan and met is not None) else None,
        "slo_attainment": (sum(met) / len(records)) if (met is not None and records) else None,
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "tpt_s": _stats([r.tpt_s for r in ok]),
        "e2e_s": _stats([r.e2e_s for r in ok]),
        "max_itl_s": _stats([r.max_itl_s for r in ok if r.max_itl_s is not None]),
        "send_lag_s": _stats([r.send_s - r.arrival_s for r in records]),
    }


def sustained_rate(points: list[tuple[float, float | None]], threshold: float) -> float:
    """The highest rate whose attainment >= threshold with every lower rate meeting it too; 0.0 if none does.
    `points`: (rate, attainment) of finite rates, any order; a missing attainment (None) counts as a miss."""
    best = 0.0
    for rate, attainment in sorted(points):
        if attainment is None or attainment < threshold:
            break
        best = rate
    return best


def rate_ratio(ours: float, other: float, lowest_rate: float | None) -> dict:
    """ours / other; when `other` met the SLO at no swept rate, its sustained rate is below the lowest swept rate,
    so the ratio is only bounded from below: ours / lowest_rate."""
    if other > 0:
        return {"value": ours / other, "at_least": None}
    if ours > 0 and lowest_rate:
        return {"value": None, "at_least": ours / lowest_rate}
    return {"value": None, "at_least": None}


# ============================================================================================ the client
async def stream_request(session, url: str, headers: dict, body: dict, record: RequestRecord, timeout: float) -> None:
    """POST one streamed completion and fill `record` (never raises: errors are recorded)."""
    import aiohttp

    t0 = time.perf_counter()
    last_chunk: float | None = None
    usage_tokens: int | None = None

    async def go() -> None:
        nonlocal last_chunk, usage_tokens
        async with session.post(url, json=body, headers=headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                text = (await resp.text())[:300]
                record.error = f"http {resp.status}: {text}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                event = json.loads(payload)
                if event.get("error"):
                    err = event["error"]
                    record.error = f"error event: {err.get('message') if isinstance(err, dict) else err}"
                    return
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter() - t0
                        if record.ttft_s is None:
                            record.ttft_s = now
                        elif last_chunk is not None:
                            record.max_itl_s = max(record.max_itl_s or 0.0, now - last_chunk)
                        last_chunk = now
                        record.chunks += 1
            if record.error is None:
                record.error = "stream ended without [DONE]"

    try:
        await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        record.error = f"timeout: no complete answer within {timeout:g}s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        record.error = f"transport: {type(exc).__name__}: {exc}"[:300]
    end = time.perf_counter() - t0
    record.output_tokens = usage_tokens if usage_tokens is not None else record.chunks
    record.last_token_s = last_chunk
    if record.error is None:
        record.e2e_s = end
        if record.output_tokens == 0:
            record.error = "no tokens: the stream carried no text"
            record.e2e_s = None


async def run_point(target: "Target", specs: list[RequestSpec], prompts: PromptFactory, timeout: float,
                    desc: str, lead_s: float = 0.3) -> list[RequestRecord]:
    """Send every request at its arrival time; wait for all; return their records in index order."""
    import aiohttp
    from tqdm import tqdm

    texts = [prompts.prompt(s.prompt_tokens, s.prompt_key) for s in specs]
    records = [RequestRecord(s.index, s.model, s.adapter_rank, got, s.max_tokens, s.arrival_s)
               for s, (_, got) in zip(specs, texts)]
    url = f"{target.base_url}/v1/completions"
    bar = tqdm(total=len(specs), desc=desc, unit="req", file=sys.stderr, leave=False, dynamic_ncols=True)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + lead_s
        wall0 = time.perf_counter() + lead_s

        async def one(spec: RequestSpec, text: str, record: RequestRecord) -> None:
            delay = start + spec.arrival_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            record.send_s = time.perf_counter() - wall0
            body = {"model": spec.model, "prompt": text, "max_tokens": spec.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            await stream_request(session, url, target.headers, body, record, timeout)
            bar.update(1)
            if not record.ok:
                bar.set_postfix_str(f"errors {sum(1 for r in records if r.error)}", refresh=False)

        await asyncio.gather(*(one(s, t, r) for s, (t, _), r in zip(specs, texts, records)))
    bar.close()
    return records


# ============================================================================================ servers
def _die_with_parent():
    """preexec_fn: the child gets SIGTERM when this process dies (Linux), so nothing outlives a killed harness."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


_LIVE: list["Target"] = []


@dataclass
class Target:
    """A server the workload runs against."""

    system: str
    base_url: str
    headers: dict
    base_model: str = ""
    adapters: list[AdapterSpec] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    info: dict = field(default_factory=dict)
    stop_timeout: float = 60.0

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if self in _LIVE:
            _LIVE.remove(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.system}: no exit {self.stop_timeout:g}s after SIGTERM, killing its process group")
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def stop_all() -> None:
    for target in list(_LIVE):
        with contextlib.suppress(Exception):
            target.stop()


def _spawn(argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    out = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=REPO_ROOT, start_new_session=True, preexec_fn=_die_with_parent())
    finally:
        out.close()


def _wait_marker(target: Target, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = target.log_path.read_text(errors="replace") if target.log_path.exists() else ""
        if marker in text:
            return
        if target.proc is not None and target.proc.poll() is not None:
            raise RuntimeError(f"{target.system} exited with code {target.proc.returncode} before it was ready:\n"
                               f"{target.log_tail()}")
        time.sleep(0.5)
    raise RuntimeError(f"{target.system} was not ready within {timeout:g}s:\n{target.log_tail()}")


def _server_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARASERVE_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def profile_worker(args, workdir: Path) -> tuple[Path, float]:
    """`caraserve profile --quick` once for the run, so that no mesh profiles its worker at start-up (on a busy
    machine that can outlast `caraserve up`'s readiness timeout) and every mesh uses the same model."""
    from shared.model_provisioning import resolve_model

    out = workdir / "perf_model.json"
    argv = [sys.executable, "-m", "services.cli", "profile", "--quick", "-o", str(out), "--model",
            str(resolve_model(args.model).path), "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--data-dir", str(workdir / "profile-data")]
    t = time.perf_counter()
    with open(workdir / "profile.log", "w", encoding="utf-8") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
                              env=_server_env(args.threads), timeout=args.start_timeout,
                              preexec_fn=_die_with_parent())
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((workdir / "profile.log").read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"caraserve profile failed with code {proc.returncode}:\n{tail}")
    return out, time.perf_counter() - t


def start_mesh(system: str, adapters: list[AdapterSpec], adapter_root: Path, args, workdir: Path,
               perf_model: Path | None) -> Target:
    from shared.mesh_config import MeshConfig
    from shared.model_provisioning import resolve_model
    from shared.nats_server import free_port

    port, nats_port = free_port(), free_port()
    data_dir = workdir / f"{system}-{len(adapters)}-data"
    api_key, admin_key = "bench-api-key", "bench-admin-key"
    max_loras = max(args.max_loras, len(adapters)) if system == "ours_resident" else args.max_loras
    max_cpu_loras = max(MeshConfig.max_cpu_loras, len(adapters))  # the host tier holds every adapter of the run
    argv = [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--nats-port", str(nats_port),
            "--data-dir", str(data_dir), "--api-key", api_key, "--admin-key", admin_key, "--no-demo-adapters",
            "--workers", "1", "--model", str(resolve_model(args.model).path), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max_cpu_loras),
            "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--cpu-assist", "always" if system == "ours_cpu_assist" else "off", "--log-level", "warning"]
    if perf_model is not None:
        argv += ["--perf-model", str(perf_model)]
    argv += args.mesh_arg or []
    target = Target(system, f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {api_key}"},
                    log_path=workdir / f"{system}-{len(adapters)}.log", adapters=adapters)
    shown = ["***" if prev in ("--api-key", "--admin-key") else a for prev, a in zip([""] + argv, argv)]
    target.info = {"command": " ".join(shown),
                   "max_loras": max_loras, "max_cpu_loras": max_cpu_loras, "data_dir": str(data_dir)}
    t = time.perf_counter()
    target.proc = _spawn(argv, _server_env(args.threads), target.log_path)
    _LIVE.append(target)
    try:
        _wait_marker(target, UP_READY, args.start_timeout)
        target.info["startup_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        asyncio.run(register_adapters(target, adapters, adapter_root, admin_key))
        target.info["register_s"] = round(time.perf_counter() - t, 2)
        target.base_model = asyncio.run(discover_base(target))
    except BaseException:
        target.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return target


def start_peft(system: str, adapters: list[AdapterSpec], adapter_root: Path, args, workdir: Path) -> Target:
    from shared.nats_server import free_port

    port = free_port()
    mode = system.removeprefix("peft_")
    adapter_dir = workdir / f"{system}-{len(adapters)}-adapters"  # links to this point's adapters
    shutil.rmtree(adapter_dir, ignore_errors=True)
    adapter_dir.mkdir(parents=True)
    for a in adapters:
        (adapter_dir / a.name).symlink_to(adapter_root / a.name)
    argv = [sys.executable, str(REPO_ROOT / "bench" / "baselines" / "peft_server.py"), "--mode", mode,
            "--adapter-dir", str(adapter_dir), "--port", str(port), "--threads", str(args.threads),
            "--max-batch-size", str(args.peft_max_batch_size), "--max-loaded-adapters",
            str(args.peft_max_loaded_adapters), "--api-key", "bench-api-key"]
    if args.model:
        argv += ["--model", args.model]
    target = Target(system, f"http://127.0.0.1:{port}", {"Authorization": "Bearer bench-api-key"},
                    log_path=workdir / f"{system}-{len(adapters)}.log", adapters=adapters, stop_timeout=30.0)
    target.info = {"command": " ".join(argv), "max_batch_size": args.peft_max_batch_size,
                   "max_loaded_adapters": args.peft_max_loaded_adapters}
    t = time.perf_counter()
    target.proc = _spawn(argv, _server_env(args.threads), target.log_path)
    _LIVE.append(target)
    try:
        _wait_marker(target, PEFT_READY, args.start_timeout)
        target.info["startup_s"] = round(time.perf_counter() - t, 2)
        target.base_model = asyncio.run(discover_base(target))
    except BaseException:
        target.stop()
        raise
    return target


def external_target(args) -> Target:
    headers = {"Authorization": f"Bearer {args.endpoint_api_key}"} if args.endpoint_api_key else {}
    target = Target("endpoint", args.endpoint.rstrip("/").removesuffix("/v1"), headers)
    models = asyncio.run(list_models(target))
    base = args.endpoint_base_model or next((m["id"] for m in models if not m.get("parent")), None)
    if base is None:
        raise SystemExit("serve.py: --endpoint lists no base model; pass --endpoint-base-model")
    target.base_model = base
    if args.endpoint_models:
        names = [x.strip() for x in args.endpoint_models.split(",") if x.strip()]
    else:
        names = [m["id"] for m in models if m.get("parent")]
    ranks = {m["id"]: m.get("rank") for m in models}
    target.adapters = [AdapterSpec(n, ranks.get(n) or 0, 0) for n in names]
    target.info = {"url": target.base_url, "base_model": base, "adapters": len(names)}
    return target


async def list_models(target: Target) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.get(f"{target.base_url}/v1/models", headers=target.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{target.system}: GET /v1/models answered {resp.status}: {await resp.text()}")
            return (await resp.json())["data"]


async def discover_base(target: Target) -> str:
    models = await list_models(target)
    names = {m["id"] for m in models}
    missing = [a.name for a in target.adapters if a.name not in names]
    if missing:
        raise RuntimeError(f"{target.system}: /v1/models lacks {len(missing)} adapters, e.g. {missing[:3]}")
    return next(m["id"] for m in models if not m.get("parent"))


async def register_adapters(target: Target, adapters: list[AdapterSpec], root: Path, admin_key: str,
                            concurrency: int = 4) -> None:
    """Upload every adapter through the admin API (multipart: name, adapter_config.json, adapter_model.safetensors)."""
    import aiohttp
    from tqdm import tqdm

    bar = tqdm(total=len(adapters), desc=f"{target.system}: registering adapters", unit="adapter", file=sys.stderr,
               leave=False, dynamic_ncols=True)
    gate = asyncio.Semaphore(concurrency)

    async def one(session, a: AdapterSpec) -> None:
        async with gate:
            form = aiohttp.FormData()
            form.add_field("name", a.name)
            for fname in ("adapter_config.json", "adapter_model.safetensors"):
                form.add_field(fname, (root / a.name / fname).read_bytes(), filename=fname,
                               content_type="application/octet-stream")
            async with session.post(f"{target.base_url}/v1/adapters", data=form,
                                    headers={"Authorization": f"Bearer {admin_key}"}) as resp:
                if resp.status not in (200, 201):
                    raise RuntimeError(f"registering {a.name}: {resp.status} {(await resp.text())[:300]}")
            bar.update(1)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(one(session, a) for a in adapters))
    bar.close()


async def warm_up(target: Target, models: list[str], prompts: PromptFactory, timeout: float,
                  concurrency: int = 4) -> list[RequestRecord]:
    """One short request per model (untimed), a few at a time."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    records = [RequestRecord(i, m, None, 0, 2, 0.0) for i, m in enumerate(models)]
    text, got = prompts.prompt(24, 7)

    async def one(session, record):
        async with gate:
            body = {"model": record.model, "prompt": text, "max_tokens": 2, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
            record.prompt_tokens = got
            await stream_request(session, f"{target.base_url}/v1/completions", target.headers, body, record, timeout)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session, r) for r in records))
    return records


async def calibrate(target: Target, specs: list[RequestSpec], prompts: PromptFactory, timeout: float) -> list[dict]:
    """The requests one at a time on the base model: the unloaded samples the SLO is fitted on."""
    import aiohttp

    samples = []
    async with aiohttp.ClientSession() as session:
        for s in specs:
            text, got = prompts.prompt(s.prompt_tokens, s.prompt_key)
            record = RequestRecord(s.index, target.base_model, None, got, s.max_tokens, 0.0)
            body = {"model": target.base_model, "prompt": text, "max_tokens": s.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            await stream_request(session, f"{target.base_url}/v1/completions", target.headers, body, record, timeout)
            if not record.ok or record.ttft_s is None:
                raise RuntimeError(f"calibration request failed on {target.system}: {record.error}")
            samples.append({"prompt_tokens": got, "output_tokens": record.output_tokens,
                            "ttft_s": round(record.ttft_s, 6), "e2e_s": round(record.e2e_s, 6),
                            "tpt_s": round(record.e2e_s / record.output_tokens, 6)})
    return samples


# ============================================================================================ adapters on disk
def write_adapters(specs: list[AdapterSpec], root: Path, model_path: Path, targets: list[str]) -> float:
    """Random PEFT adapters (bench/decode_step.write_adapter: bf16 A and B, B small) for the base model's shape."""
    from tqdm import tqdm

    from bench.decode_step import write_adapter

    shape = json.loads((Path(model_path) / "config.json").read_text())
    t = time.perf_counter()
    todo = [s for s in specs if not (root / s.name / "adapter_model.safetensors").exists()]
    for s in tqdm(todo, desc="writing random adapters", unit="adapter", file=sys.stderr, leave=False,
                  dynamic_ncols=True):
        shutil.rmtree(root / s.name, ignore_errors=True)
        write_adapter(root / s.name, shape, s.rank, targets, s.seed)
    return time.perf_counter() - t


# ============================================================================================ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="bench/serve.py", description=doc.split("\n\n")[0],
                                epilog="\n\n".join(doc.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--quick", action="store_true",
                   help="the ~10-15 minute preset on a 2-core CPU: adapters 8,32, rates 0.2-1.6 req/s, 30 s points, "
                        "prompts 32-256 tokens, outputs 8-32 (flags given explicitly still win)")
    w.add_argument("--adapters", help=f"adapter counts to sweep, comma-separated (default {DEFAULTS['adapters']}; "
                                      f"--quick {QUICK['adapters']})")
    w.add_argument("--ranks", default="8,16,32,64", help="LoRA ranks in equal shares (default 8,16,32,64)")
    w.add_argument("--target-modules", default="q_proj,v_proj",
                   help="modules the random adapters adapt (default q_proj,v_proj: with 512 adapters the worker "
                        "holds every fetched adapter in float32, ~3.5 GB; q,k,v,o doubles it)")
    w.add_argument("--popularity", choices=("uniform", "powerlaw"), default="uniform",
                   help="adapter popularity: uniform (default), or power law (i+1)^-alpha")
    w.add_argument("--alpha", type=float, default=1.0, help="power-law exponent (default 1.0)")
    w.add_argument("--base-fraction", type=float, default=0.0,
                   help="fraction of requests for the base model instead of an adapter (default 0)")
    w.add_argument("--rates", help=f"request rates (req/s) to sweep, ascending (default {DEFAULTS['rates']}; "
                                   f"--quick {QUICK['rates']})")
    w.add_argument("--duration", type=float, help=f"seconds of Poisson arrivals per rate point (default "
                                                  f"{DEFAULTS['duration']:g}; --quick {QUICK['duration']:g}); the "
                                                  "point then waits for its requests to finish")
    w.add_argument("--requests", type=int, help="exactly this many requests per rate point instead of --duration")
    w.add_argument("--min-requests", type=int,
                   help=f"at least this many requests per rate point: at low rates the arrival window grows beyond "
                        f"--duration (default {DEFAULTS['min_requests']}; --quick {QUICK['min_requests']})")
    w.add_argument("--burst-requests", type=int, help=f"requests of the burst point, all sent at once, for the "
                                                      f"saturated throughput (default {DEFAULTS['burst_requests']}; "
                                                      f"--quick {QUICK['burst_requests']}; 0: no burst point)")
    w.add_argument("--burst-repeats", type=int, help=f"burst points per system and adapter count, each with its own "
                                                     f"requests; throughput is their median (default "
                                                     f"{DEFAULTS['burst_repeats']}; --quick {QUICK['burst_repeats']})")
    for kind, what in (("prompt", "prompt tokens"), ("output", "output tokens (max_tokens, exact)")):
        w.add_argument(f"--{kind}-median", type=float,
                       help=f"median {what} (default {DEFAULTS[kind + '_median']}; --quick {QUICK[kind + '_median']})")
        w.add_argument(f"--{kind}-sigma", type=float,
                       help=f"log-normal sigma of {what} (default {DEFAULTS[kind + '_sigma']}; --quick "
                            f"{QUICK[kind + '_sigma']}; 0: all the median)")
        w.add_argument(f"--{kind}-min", type=int,
                       help=f"fewest {what} (default {DEFAULTS[kind + '_min']}; --quick {QUICK[kind + '_min']})")
        w.add_argument(f"--{kind}-max", type=int,
                       help=f"most {what} (default {DEFAULTS[kind + '_max']}; --quick {QUICK[kind + '_max']})")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload, prompts and adapters (default 0)")
    w.add_argument("--model", default=None, help="base model for every system (default: the embedded "
                                                 "SmolLM2-135M-Instruct); its tokenizer sizes the prompts")
    s = p.add_argument_group("systems")
    s.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, from {','.join(SYSTEMS)} (default {','.join(DEFAULT_SYSTEMS)})")
    s.add_argument("--baseline-adapters", choices=("min", "all"), default="min",
                   help="adapter counts the PEFT baselines run at: the smallest only (default) or all")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads of every server (OMP_NUM_THREADS; default: the usable CPUs)")
    s.add_argument("--max-loras", type=int, default=64,
                   help="ours: resident adapter slots, LRU (default 64, --max-num-seqs: a batch is never short of "
                        "slots; the engine's own default, 8, suits a GPU's memory); ours_resident uses "
                        "max(this, adapters)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="ours: sequences running at once (default 64)")
    s.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="ours: token budget of an engine step (default 512)")
    s.add_argument("--perf-model", type=Path, default=None,
                   help="ours: the worker's performance model file, from `caraserve profile` (default: the run "
                        "profiles the worker once with `caraserve profile --quick` and every mesh uses that)")
    s.add_argument("--mesh-arg", action="append", metavar="ARG",
                   help="extra argument for `caraserve up` (repeatable, e.g. --mesh-arg=--placement-policy "
                        "--mesh-arg=random)")
    s.add_argument("--peft-max-batch-size", type=int, default=16,
                   help="peft_mixed_batch: most requests in one generate() (default 16)")
    s.add_argument("--peft-max-loaded-adapters", type=int, default=64,
                   help="PEFT baselines: adapters resident at once, LRU beyond (default 64)")
    s.add_argument("--endpoint", help="system 'endpoint': base URL of a running OpenAI-compatible server")
    s.add_argument("--endpoint-api-key", default=os.environ.get("OPENAI_API_KEY", ""),
                   help="its API key (default $OPENAI_API_KEY)")
    s.add_argument("--endpoint-models", help="its adapter model names, comma-separated (default: every /v1/models "
                                             "entry with a parent); --adapters is capped at their number")
    s.add_argument("--endpoint-base-model", help="its base model's name (default: the /v1/models entry without a "
                                                 "parent)")
    s.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to start")
    m = p.add_argument_group("SLO")
    m.add_argument("--slo-factor", type=float, default=1.5,
                   help="SLO: TPT <= this x the request's unloaded TPT on the base model (default 1.5)")
    m.add_argument("--slo-on", metavar="SYSTEM",
                   help="the system whose unloaded base-model requests calibrate the SLO, run first (default: "
                        "peft_one_at_a_time when it runs, the server a user would otherwise write, so that every "
                        "system meets the SLO when idle; else the first system)")
    m.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="a fixed TPT bound (ms) for every request instead of the calibrated one")
    m.add_argument("--slo-attainment", type=float, default=0.9,
                   help="attainment a rate must reach to count as sustained (default 0.9)")
    m.add_argument("--calibration-requests", type=int,
                   help=f"unloaded requests measured for the SLO (default {DEFAULTS['calibration_requests']}; "
                        f"--quick {QUICK['calibration_requests']})")
    m.add_argument("--no-stop-on-break", action="store_true",
                   help="run every rate even after a system misses the SLO (default: stop its sweep there)")
    m.add_argument("--request-timeout", type=float,
                   help=f"seconds a request may take in all (default {DEFAULTS['request_timeout']:g}; --quick "
                        f"{QUICK['request_timeout']:g}); later it counts as an error")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None,
                   help=f"JSON path (default {result_path(NAME).relative_to(REPO_ROOT)}); plots beside it")
    o.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    o.add_argument("--work-dir", type=Path, default=None,
                   help="adapters, server data and logs (default: a temporary directory, removed at the end); "
                        "adapters already there are reused")
    args = p.parse_args(argv)

    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)

    def ints(text: str, flag: str) -> list[int]:
        try:
            values = [int(x) for x in str(text).split(",") if x.strip()]
        except ValueError:
            p.error(f"{flag} takes comma-separated integers, got {text!r}")
        if not values or min(values) < 1:
            p.error(f"{flag} takes positive integers, got {text!r}")
        return values

    args.adapter_counts = sorted(set(ints(args.adapters, "--adapters")))
    args.rank_list = ints(args.ranks, "--ranks")
    try:
        args.rate_list = sorted({float(x) for x in str(args.rates).split(",") if x.strip()})
    except ValueError:
        p.error(f"--rates takes comma-separated numbers, got {args.rates!r}")
    if not args.rate_list or min(args.rate_list) <= 0 or any(math.isinf(r) for r in args.rate_list):
        p.error("--rates takes positive finite rates")
    args.system_list = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in args.system_list if x not in SYSTEMS]
    if unknown or not args.system_list:
        p.error(f"--systems takes names from {','.join(SYSTEMS)}, got {args.systems!r}")
    args.system_list = [x for x in SYSTEMS if x in args.system_list]
    if args.slo_on is None:
        args.slo_on = "peft_one_at_a_time" if "peft_one_at_a_time" in args.system_list else args.system_list[0]
    if args.slo_on not in args.system_list:
        p.error(f"--slo-on {args.slo_on!r} is not among --systems ({','.join(args.system_list)})")
    args.system_list.remove(args.slo_on)
    args.system_list.insert(0, args.slo_on)  # first: it calibrates the SLO
    if "endpoint" in args.system_list and not args.endpoint:
        p.error("system 'endpoint' needs --endpoint URL")
    args.target_list = [x.strip() for x in args.target_modules.split(",") if x.strip()]
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if (args.requests is not None and args.requests < 1) or args.min_requests < 0:
        p.error("--requests must be >= 1, --min-requests >= 0")
    if args.duration <= 0 or args.request_timeout <= 0 or args.calibration_requests < 1 or args.burst_requests < 0 \
            or args.burst_repeats < 1:
        p.error("--duration, --request-timeout, --calibration-requests and --burst-repeats must be positive, "
                "--burst-requests >= 0")
    if not 0 <= args.base_fraction <= 1 or not 0 < args.slo_attainment <= 1 or args.slo_factor <= 0:
        p.error("--base-fraction must be in [0, 1], --slo-attainment in (0, 1], --slo-factor > 0")
    for kind in ("prompt", "output"):
        lo, hi, med = getattr(args, f"{kind}_min"), getattr(args, f"{kind}_max"), getattr(args, f"{kind}_median")
        if not 1 <= lo <= hi or getattr(args, f"{kind}_sigma") < 0 or med <= 0:
            p.error(f"--{kind}-min must be >= 1 and <= --{kind}-max, --{kind}-median > 0, --{kind}-sigma >= 0")
    if args.out is None:
        args.out = result_path(NAME)
    return args


def dists(args) -> tuple[LengthDist, LengthDist]:
    return (LengthDist(args.prompt_median, args.prompt_sigma, args.prompt_min, args.prompt_max),
            LengthDist(args.output_median, args.output_sigma, args.output_min, args.output_max))


# ============================================================================================ the run
class Run:
    """Holds the results as they come and writes them after every point."""

    def __init__(self, args, machine: dict, git: dict, model_path: Path) -> None:
        self.args = args
        prompt, output = dists(args)
        self.data: dict[str, Any] = {
            "benchmark": NAME,
            "timestamp": timestamp(),
            "finished": None,
            "complete": False,
            "git": git,
            "machine": machine,
            "config": {
                "quick": args.quick, "model": str(model_path), "systems": args.system_list,
                "adapter_counts": args.adapter_counts, "ranks": args.rank_list, "target_modules": args.target_list,
                "popularity": args.popularity, "alpha": args.alpha, "base_fraction": args.base_fraction,
                "rates": args.rate_list, "duration_s": args.duration, "requests_per_point": args.requests,
                "min_requests_per_point": args.min_requests,
                "burst_requests": args.burst_requests, "burst_repeats": args.burst_repeats, "seed": args.seed,
                "threads": args.threads,
                "max_loras": args.max_loras, "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens, "mesh_args": args.mesh_arg or [],
                "peft_max_batch_size": args.peft_max_batch_size,
                "peft_max_loaded_adapters": args.peft_max_loaded_adapters, "baseline_adapters": args.baseline_adapters,
                "request_timeout_s": args.request_timeout, "slo_on": args.slo_on,
                "stop_on_break": not args.no_stop_on_break,
                "endpoint": args.endpoint, "sampling": "greedy (temperature 0), ignore_eos, exact max_tokens",
                "api": "POST /v1/completions, stream, stream_options.include_usage",
            },
            "workload": {"arrivals": "Poisson (exponential inter-arrival times, mean 1/rate)",
                         "prompt_tokens": prompt.describe(), "output_tokens": output.describe(),
                         "prompt_text": "chat-like English sentences (topics x templates), token count checked with "
                                        "the model's tokenizer",
                         "adapter_popularity": args.popularity if args.popularity == "uniform"
                         else f"power law, alpha {args.alpha}"},
            "slo": None,
            "servers": [],
            "points": [],
            "sustained_rate": {},
            "throughput_vs_adapters": {},
            "headline": {},
            "plots": {},
        }

    def save(self) -> Path:
        return write_result(NAME, self.data, self.args.out)

    def add_point(self, system: str, n: int, rate: float, records: list[RequestRecord], slo: SLO | None,
                  wall_s: float, repeat: int = 0) -> dict:
        point = {"system": system, "adapters": n, "kind": "burst" if math.isinf(rate) else "rate",
                 "rate": None if math.isinf(rate) else rate, "repeat": repeat, "wall_s": round(wall_s, 2),
                 **point_metrics(records, slo), "records": [r.to_json() for r in records]}
        self.data["points"].append(point)
        self.save()
        return point


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _rate_points(data: dict, system: str, n: int) -> list[dict]:
    return sorted((p for p in data["points"] if p["system"] == system and p["adapters"] == n and p["kind"] == "rate"),
                  key=lambda p: p["rate"])


def finish(data: dict, args) -> None:
    """Sustained rates, throughput vs adapters and the headline ratios from the points."""
    threshold = args.slo_attainment
    systems = sorted({p["system"] for p in data["points"]}, key=SYSTEMS.index)
    sustained: dict[str, dict[str, float]] = {}
    tva: dict[str, dict[str, float]] = {}
    tva_bursts: dict[str, dict[str, list[float]]] = {}  # every burst's tokens/s, in the order they ran
    for system in systems:
        counts = sorted({p["adapters"] for p in data["points"] if p["system"] == system})
        for n in counts:
            pts = _rate_points(data, system, n)
            if pts:
                sustained.setdefault(system, {})[str(n)] = sustained_rate(
                    [(p["rate"], p["slo_attainment"]) for p in pts], threshold)
            bursts = [p["throughput_tokens_per_s"] for p in data["points"]
                      if p["system"] == system and p["adapters"] == n and p["kind"] == "burst"]
            if bursts:
                tva.setdefault(system, {})[str(n)] = statistics.median(bursts)
                tva_bursts.setdefault(system, {})[str(n)] = bursts
            elif pts:
                tva.setdefault(system, {})[str(n)] = max(p["throughput_tokens_per_s"] for p in pts)
    data["sustained_rate"] = sustained
    data["throughput_vs_adapters"] = tva
    data["throughput_vs_adapters_bursts"] = tva_bursts
    data["throughput_source"] = (f"median of {args.burst_repeats} burst point(s)" if args.burst_requests
                                 else "largest point throughput of the sweep")

    headline: dict[str, Any] = {"slo_attainment_threshold": threshold, "targets": {}}
    n_min = min(args.adapter_counts)
    lowest = min(args.rate_list)
    ours = sustained.get("ours", {}).get(str(n_min))
    headline["adapters_for_rate_comparison"] = n_min
    headline["sustained_rate_at_slo"] = {s: sustained[s].get(str(n_min)) for s in sustained}
    for other in PEFT_SYSTEMS:
        theirs = sustained.get(other, {}).get(str(n_min))
        if ours is None or theirs is None:
            continue
        key = f"ours_vs_{other}"
        ratio = rate_ratio(ours, theirs, lowest)
        met = (ratio["value"] is not None and ratio["value"] >= TARGETS[key]) or \
              (ratio["at_least"] is not None and ratio["at_least"] >= TARGETS[key])
        headline[key] = ratio
        headline["targets"][key] = {"target": TARGETS[key], "met": met}
    for system, by_n in tva.items():
        if len(by_n) >= 2:
            lo, hi = min(by_n, key=int), max(by_n, key=int)
            if by_n[lo] > 0:
                ratio = by_n[hi] / by_n[lo]
                headline.setdefault("throughput_max_vs_min_adapters", {})[system] = {
                    "adapters": [int(lo), int(hi)], "tokens_per_s": [by_n[lo], by_n[hi]], "ratio": ratio}
                if system == "ours":
                    headline["targets"]["throughput_max_vs_min_adapters"] = {
                        "target": TARGETS["throughput_max_vs_min_adapters"],
                        "met": ratio >= TARGETS["throughput_max_vs_min_adapters"]}
    data["headline"] = headline


def make_plots(data: dict, args, out: Path) -> dict:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install matplotlib, or the [bench] extra)"}
    stem = out.with_suffix("")
    colors = {s: f"C{i}" for i, s in enumerate(SYSTEMS)}
    m = data["machine"]
    git = data["git"]
    subtitle = (f"{m.get('cpu_model')}, {args.threads} threads; commit {(git.get('commit') or '?')[:10]}"
                f"{' dirty' if git.get('dirty') else ''}; {data['workload']['adapter_popularity']} popularity, ranks "
                f"{','.join(map(str, args.rank_list))}")
    plots = {}
    n_min = min(args.adapter_counts)
    systems = [s for s in SYSTEMS if any(p["system"] == s for p in data["points"])]

    # latency CDFs at the highest rate every system ran at the smallest adapter count
    cdf_systems = [s for s in systems if _rate_points(data, s, n_min)]
    rates_by_system = [{p["rate"] for p in _rate_points(data, s, n_min)} for s in cdf_systems]
    common = set.intersection(*rates_by_system) if rates_by_system else set()
    if common:
        rate = max(common)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
        for s in cdf_systems:
            point = next(p for p in _rate_points(data, s, n_min) if p["rate"] == rate)
            recs = [r for r in point["records"] if r["error"] is None and r["e2e_s"] is not None]
            for ax, key in zip(axes, ("ttft_s", "tpt_s", "e2e_s")):
                if key == "tpt_s":
                    vals = sorted(r["e2e_s"] / r["output_tokens"] for r in recs if r["output_tokens"])
                else:
                    vals = sorted(r[key] for r in recs if r[key] is not None)
                if vals:
                    ax.step(vals, [(i + 1) / len(point["records"]) for i in range(len(vals))], where="post",
                            label=s, color=colors[s])
        for ax, label in zip(axes, ("time to first token, s", "time per output token (e2e / tokens), s",
                                    "end-to-end latency, s")):
            ax.set_xlabel(label)
            ax.set_ylabel("fraction of requests")
            ax.set_ylim(0, 1.02)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"latency CDFs at {rate:g} req/s, {n_min} adapters (errors never reach 1.0)\n{subtitle}",
                     fontsize=9)
        fig.tight_layout()
        path = Path(f"{stem}_latency_cdf.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots["latency_cdf"] = str(path)

    # SLO attainment vs rate
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for s in systems:
        for n in sorted({p["adapters"] for p in data["points"] if p["system"] == s}):
            pts = _rate_points(data, s, n)
            if not pts:
                continue
            style = "-" if n == n_min else ("--" if n == max(args.adapter_counts) else ":")
            ax.plot([p["rate"] for p in pts], [p["slo_attainment"] or 0.0 for p in pts], style, marker="o",
                    color=colors[s], label=f"{s}, {n} adapters")
    ax.axhline(args.slo_attainment, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("request rate, req/s (Poisson)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    slo = data.get("slo") or {}
    what = (f"TPT <= {slo.get('fixed_tpt_s', 0) * 1000:.0f} ms" if slo.get("fixed_tpt_s") else
            f"TPT <= {args.slo_factor:g}x unloaded (base model)")
    ax.set_title(f"SLO attainment vs rate ({what})\n{subtitle}", fontsize=9)
    fig.tight_layout()
    path = Path(f"{stem}_slo_vs_rate.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    plots["slo_vs_rate"] = str(path)

    # throughput vs adapters
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, by_n in data["throughput_vs_adapters"].items():
        ns = sorted(by_n, key=int)
        ax.plot([int(n) for n in ns], [by_n[n] for n in ns], marker="o", color=colors[s], label=s)
        repeats = data.get("throughput_vs_adapters_bursts", {}).get(s, {})
        for n, values in repeats.items():  # every burst, around the median the line joins
            ax.scatter([int(n)] * len(values), values, marker="_", s=80, color=colors[s], alpha=0.7)
    ax.set_xscale("log", base=2)
    counts = sorted({int(n) for by_n in data["throughput_vs_adapters"].values() for n in by_n})
    if counts:
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
    ax.set_xlabel("adapters (log scale)")
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"throughput vs number of adapters ({data['throughput_source']})\n{subtitle}", fontsize=9)
    fig.tight_layout()
    path = Path(f"{stem}_throughput_vs_adapters.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    plots["throughput_vs_adapters"] = str(path)
    return plots


def print_summary(data: dict, out: Path) -> None:
    slo = data.get("slo") or {}
    example = slo.get("example") or {}
    limit, unloaded = (example.get("slo_tpt_s") or 0) * 1000, (example.get("unloaded_tpt_s") or 0) * 1000
    print(f"serve: {len(data['points'])} points; SLO: {slo.get('definition', 'none')}; e.g. "
          f"{example.get('prompt_tokens')} prompt + {example.get('output_tokens')} output tokens: TPT <= "
          f"{limit:.1f} ms (unloaded {unloaded:.1f} ms)")
    print(f"{'system':<20} {'N':>4} {'rate':>6} {'req':>4} {'err':>3} {'SLO':>5} {'tok/s':>7} {'ttft p50':>8} "
          f"{'tpot p50':>8} {'e2e p50':>8} {'e2e p99':>8}")
    for p in data["points"]:
        rate = "burst" if p["kind"] == "burst" else f"{p['rate']:g}"
        print(f"{p['system']:<20} {p['adapters']:>4} {rate:>6} {p['requests']:>4} {p['errors']:>3} "
              f"{_fmt(p['slo_attainment'], '.2f'):>5} {p['throughput_tokens_per_s']:>7.1f} "
              f"{_fmt(p['ttft_s']['p50']):>8} {_fmt(p['tpot_s']['p50']):>8} {_fmt(p['e2e_s']['p50']):>8} "
              f"{_fmt(p['e2e_s']['p99']):>8}")
    h = data["headline"]
    print(f"sustained rate at the SLO ({h.get('adapters_for_rate_comparison')} adapters): "
          f"{json.dumps(h.get('sustained_rate_at_slo'))}")
    for key in ("ours_vs_peft_one_at_a_time", "ours_vs_peft_mixed_batch"):
        if key in h:
            r = h[key]
            value = f"{r['value']:.2f}x" if r["value"] is not None else (
                f">= {r['at_least']:.2f}x" if r["at_least"] is not None else "n/a")
            print(f"{key}: {value} (target {TARGETS[key]}x: {'met' if h['targets'][key]['met'] else 'not met'})")
    for system, t in h.get("throughput_max_vs_min_adapters", {}).items():
        print(f"{system} throughput {t['adapters'][1]} vs {t['adapters'][0]} adapters: {t['tokens_per_s'][1]:.1f} vs "
              f"{t['tokens_per_s'][0]:.1f} tokens/s, ratio {t['ratio']:.3f}")
    for name, path in data.get("plots", {}).items():
        print(f"plot {name}: {path}")
    print(f"results: {out}")


def _install_signal_handlers() -> None:
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_term)


def run_system(run: Run, system: str, n: int, adapters: list[AdapterSpec], adapter_root: Path, workdir: Path,
               prompts: PromptFactory, state: dict) -> None:
    """Start `system` with `adapters`, (calibrate,) sweep the rates, burst, stop."""
    args = run.args
    prompt_d, output_d = dists(args)
    log(f"{system} with {n} adapters: starting")
    if system in MESH_SYSTEMS:
        if state.get("perf_model") is None:
            log("profiling the worker once for every mesh of the run (caraserve profile --quick)")
            state["perf_model"], seconds = profile_worker(args, workdir)
            run.data["perf_model"] = {"path": "caraserve profile --quick (this run)", "seconds": round(seconds, 1),
                                      "model": json.loads(Path(state["perf_model"]).read_text())}
            log(f"profiled in {seconds:.0f}s")
        target = start_mesh(system, adapters, adapter_root, args, workdir, state.get("perf_model"))
    elif system in PEFT_SYSTEMS:
        target = start_peft(system, adapters, adapter_root, args, workdir)
    else:
        target = state["endpoint"]
        target.adapters = adapters
    try:
        info = {"system": system, "adapters": n, "base_model": target.base_model, **target.info}
        log(f"{system}: up in {info.get('startup_s', 0)}s (register {info.get('register_s', 0)}s), base model "
            f"{target.base_model}")
        t = time.perf_counter()
        warm = asyncio.run(warm_up(target, [target.base_model] * 2, prompts, args.request_timeout))
        if system == "ours_resident":
            warm += asyncio.run(warm_up(target, [a.name for a in adapters], prompts, args.request_timeout))
        failed = [r for r in warm if not r.ok]
        if failed:
            raise RuntimeError(f"{system}: {len(failed)} warm-up requests failed, e.g. {failed[0].model}: "
                               f"{failed[0].error}")
        info["warmup_s"] = round(time.perf_counter() - t, 2)
        info["warmup_requests"] = len(warm)
        run.data["servers"].append(info)

        if run.data["slo"] is None and system == args.slo_on:
            specs = calibration_specs(args.calibration_requests, prompt_d, output_d, target.base_model)
            log(f"calibration: {len(specs)} unloaded base-model requests on {system}")
            samples = asyncio.run(calibrate(target, specs, prompts, args.request_timeout))
            if args.slo_tpot_ms is not None:
                slo = SLO(factor=args.slo_factor, fixed_tpt_s=args.slo_tpot_ms / 1000.0)
                fitted = fit_unloaded(samples, args.slo_factor)
            else:
                slo = fitted = fit_unloaded(samples, args.slo_factor)
            med_p, med_n = int(prompt_d.median), int(output_d.median)
            run.data["slo"] = {
                "definition": ("TPT (end-to-end / output tokens) <= fixed_tpt_s" if slo.fixed_tpt_s is not None else
                               "TPT (end-to-end / output tokens) <= factor x unloaded TPT of the request, unloaded "
                               "end-to-end = ttft_base_s + ttft_per_prompt_token_s * prompt_tokens + tpot_s * "
                               "(output_tokens - 1), fitted on the calibration samples"),
                **slo.to_json(), "measured_on": system, "model": target.base_model,
                "unloaded_tpot_s": fitted.tpot_s,
                "unloaded_fit": fitted.to_json(),
                "example": {"prompt_tokens": med_p, "output_tokens": med_n,
                            "unloaded_tpt_s": fitted.unloaded_e2e_s(med_p, med_n) / med_n,
                            "slo_tpt_s": slo.limit_tpt_s(med_p, med_n)},
                "attainment_threshold": args.slo_attainment,
                "calibration_samples": samples,
            }
            state["slo"] = slo
            log(f"SLO: unloaded TPOT {fitted.tpot_s * 1000:.1f} ms, TTFT {fitted.ttft_base_s * 1000:.0f} ms + "
                f"{fitted.ttft_per_prompt_token_s * 1e6:.0f} us/prompt token; a {med_p}-token prompt with {med_n} "
                f"outputs must reach TPT <= {slo.limit_tpt_s(med_p, med_n) * 1000:.1f} ms")
        slo: SLO = state["slo"]

        for rate in args.rate_list:
            specs = build_workload(adapters, rate=rate, seed=point_seed(args.seed, rate), prompt=prompt_d,
                                   output=output_d, duration=args.duration, count=args.requests,
                                   min_count=args.min_requests, popularity_kind=args.popularity, alpha=args.alpha,
                                   base_fraction=args.base_fraction, base_model=target.base_model)
            if not specs:
                continue
            t = time.perf_counter()
            records = asyncio.run(run_point(target, specs, prompts, args.request_timeout,
                                            f"{system} N={n} {rate:g} req/s"))
            point = run.add_point(system, n, rate, records, slo, time.perf_counter() - t)
            log(f"{system} N={n} rate {rate:g}: {point['requests']} requests, {point['errors']} errors, SLO "
                f"{_fmt(point['slo_attainment'], '.2f')}, {point['throughput_tokens_per_s']:.1f} tokens/s, TTFT p50 "
                f"{_fmt(point['ttft_s']['p50'])} s, TPT p50 {_fmt(point['tpt_s']['p50'])} s, e2e p99 "
                f"{_fmt(point['e2e_s']['p99'])} s")
            if not target.alive():
                raise RuntimeError(f"{system} exited during the run:\n{target.log_tail()}")
            if not args.no_stop_on_break and (point["slo_attainment"] or 0.0) < args.slo_attainment:
                log(f"{system} N={n}: SLO broken at {rate:g} req/s; higher rates skipped")
                break
        for repeat in range(args.burst_repeats if args.burst_requests else 0):
            specs = build_workload(adapters, rate=math.inf, seed=point_seed(args.seed, math.inf, repeat),
                                   prompt=prompt_d, output=output_d, count=args.burst_requests,
                                   popularity_kind=args.popularity, alpha=args.alpha, base_fraction=args.base_fraction,
                                   base_model=target.base_model)
            t = time.perf_counter()
            what = f"burst {repeat + 1}/{args.burst_repeats}"
            records = asyncio.run(run_point(target, specs, prompts, args.request_timeout, f"{system} N={n} {what}"))
            point = run.add_point(system, n, math.inf, records, slo, time.perf_counter() - t, repeat)
            log(f"{system} N={n} {what} of {len(specs)}: {point['throughput_tokens_per_s']:.1f} tokens/s, "
                f"{point['errors']} errors")
    finally:
        if system != "endpoint":
            log(f"{system}: stopping")
            target.stop()
        if system in MESH_SYSTEMS:  # its JetStream store holds a copy of every adapter: free the disk now
            shutil.rmtree(target.info.get("data_dir", workdir / "-"), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers
    from transformers import AutoTokenizer

    from shared.model_provisioning import resolve_model

    transformers.logging.set_verbosity_error()
    _install_signal_handlers()
    machine, git = machine_info(), git_commit()
    model_path = Path(resolve_model(args.model).path)
    log(f"machine: {machine['cpu_model']}, {machine['usable_cpus']} cpus, load {machine['load_average']}; servers get "
        f"{args.threads} threads; commit {(git['commit'] or '?')[:10]}{' dirty' if git['dirty'] else ''}")
    run = Run(args, machine, git, model_path)
    state: dict[str, Any] = {"perf_model": args.perf_model}
    if args.perf_model is not None:
        run.data["perf_model"] = {"path": str(args.perf_model)}
    if args.endpoint:
        state["endpoint"] = external_target(args)
        cap = len(state["endpoint"].adapters)
        if cap and max(args.adapter_counts) > cap:
            args.adapter_counts = sorted({min(n, cap) for n in args.adapter_counts})
            run.data["config"]["adapter_counts"] = args.adapter_counts
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = PromptFactory(tokenizer, seed=args.seed)

    tmp = None
    if args.work_dir is None:
        tmp = tempfile.mkdtemp(prefix="caraserve-serve-bench-")
        workdir = Path(tmp)
    else:
        workdir = args.work_dir
        workdir.mkdir(parents=True, exist_ok=True)
    adapter_root = workdir / "adapters"
    adapter_root.mkdir(exist_ok=True)
    status = 1
    try:
        n_max = max(args.adapter_counts)
        specs = make_adapter_specs(n_max, args.rank_list, args.seed)
        if any(s in MESH_SYSTEMS + PEFT_SYSTEMS for s in args.system_list):
            seconds = write_adapters(specs, adapter_root, model_path, args.target_list)
            log(f"adapters: {n_max} random (ranks {','.join(map(str, args.rank_list))} on "
                f"{','.join(args.target_list)}) in {seconds:.1f}s under {adapter_root}")
        run.data["adapters"] = [{"name": s.name, "rank": s.rank} for s in specs]
        run.save()
        for n in args.adapter_counts:
            for system in args.system_list:
                if system in PEFT_SYSTEMS and args.baseline_adapters == "min" and n != min(args.adapter_counts):
                    continue
                if system == "endpoint":
                    adapters = state["endpoint"].adapters[:n]
                else:
                    adapters = specs[:n]
                try:
                    run_system(run, system, n, adapters, adapter_root, workdir, prompts, state)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others' results
                    log(f"{system} with {n} adapters failed: {type(exc).__name__}: {exc}")
                    run.data.setdefault("failures", []).append(
                        {"system": system, "adapters": n, "error": f"{type(exc).__name__}: {exc}"[:4000]})
                    run.save()
        status = 0
    except KeyboardInterrupt:
        log("interrupted: stopping the servers; partial results are kept")
        status = 130
    finally:
        stop_all()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    run.data["finished"] = timestamp()
    run.data["complete"] = status == 0 and not run.data.get("failures")
    run.data["load_average_end"] = machine_info()["load_average"]
    finish(run.data, args)
    if not args.no_plots and run.data["points"]:
        run.data["plots"] = make_plots(run.data, args, Path(args.out))
    out = run.save()
    print_summary(run.data, out)
    if status == 0 and run.data.get("failures"):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
