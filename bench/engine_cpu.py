#!/usr/bin/env python
"""CPU benchmark: a mixed-adapter workload through our engine and two PEFT baselines, in the same run.

The same requests (chat prompts of varying length, each for one of several random LoRA adapters of mixed ranks,
each with its own output length) go through three systems, one after the other, in one process:

  ours         LLMEngine (services/gpu_worker): every request added at t0, then engine.step() until all finish
               (continuous batching, chunked prefill, heterogeneous-rank multi-LoRA in one batch).
  peft_batch   one PeftModel holding every adapter; model.generate(..., adapter_names=[...]) with left padding,
               in batches of --peft-batch-size (default: all requests in one batch, as a user would do offline).
               A batch runs until its longest request is done; each request finishes when its batch does.
  peft_single  the same PeftModel, one request at a time in submission order, set_adapter() then generate():
               the naive server a user would write.

All requests count as submitted at t0, so a request's latency is t(finish) - t0 and its TTFT is
t(first generated token) - t0. Every system generates exactly max_tokens tokens per request (greedy; our engine
with ignore_eos=True, HF with an EOS id that cannot occur, so that EOS neither stops nor is masked and the greedy
tokens stay comparable). Generated tokens count only the requested tokens; peft_batch also reports the tokens it
computed and threw away past a request's max_tokens.

Reported per system: wall time, generated tokens, tokens/s, requests/s, latency / TTFT / time-per-output-token
mean p50 p90 p99; the tokens/s ratios ours vs peft_batch and ours vs peft_single (DESIGN.md targets: >= 1.5x and
>= 4x, measured as ratios in one run because the machines are noisy); and token agreement (fraction of requests
whose greedy tokens are identical between two systems; ~1.0 expected in float32, left padding can flip a rare
near-tie).

Output: JSON (default bench/results/engine_cpu.json) with machine info, git commit, config, timestamp, per-system
summaries, ratios, agreement and per-request details; a PNG next to it (same name, .png) when matplotlib is
installed. Progress goes to stderr, a summary table to stdout. Use --quick for a smoke run (seconds to a minute).
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.append(str(REPO_ROOT / "tests"))  # helpers.lora_factory

from bench.common import git_commit, machine_info, progress, result_path, summarize, timestamp, write_result  # noqa: E402

NAME = "engine_cpu"
SYSTEMS = ("ours", "peft_batch", "peft_single")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# Full run and --quick defaults; a flag given explicitly wins over both.
DEFAULTS = dict(requests=32, adapters=8, ranks="8,16,32,64", min_tokens=16, max_tokens=96, max_context=10)
QUICK = dict(requests=8, adapters=4, ranks="8,16,32,64", min_tokens=8, max_tokens=16, max_context=3)

TOPICS = [
    "the water cycle", "how vaccines work", "binary search", "the French revolution", "photosynthesis",
    "compound interest", "black holes", "the rules of chess", "how a bicycle stays upright", "sourdough bread",
    "plate tectonics", "public-key cryptography", "the Roman aqueducts", "how rainbows form", "garbage collection",
    "the immune system", "supply and demand", "the life of bees", "jazz improvisation", "ocean tides",
]
TASKS = [
    "Explain {t} to a ten-year-old.",
    "Write a short poem about {t}.",
    "Give me three surprising facts about {t}.",
    "Summarize {t} in two sentences.",
    "What are common misconceptions about {t}?",
    "Write a short story in which {t} plays a key role.",
    "Compare {t} with something from everyday life.",
    "List the steps someone should follow to learn about {t}.",
]
CONTEXT = [
    "I am preparing a lesson for my class next week.",
    "Please keep the answer friendly and easy to follow.",
    "My friend and I had a long argument about this yesterday and could not agree.",
    "I have read a couple of articles already, but they were full of jargon.",
    "Assume I know basic high-school science but nothing more advanced.",
    "It is for a newsletter that goes out to about two hundred readers.",
    "Avoid lists if you can; I prefer flowing paragraphs.",
    "If there is a historical angle, mention it briefly.",
    "I want to be able to explain it again to my grandmother afterwards.",
    "Use one concrete example, ideally something people can try at home.",
    "Please do not use more than a few short paragraphs.",
    "I am a little sceptical, so point out where the evidence is strongest.",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a patient teacher who explains things clearly and accurately.",
    "You are a concise assistant. Answer in plain language.",
]


@dataclass
class Request:
    index: int
    request_id: str
    adapter: str
    rank: int
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class RunResult:
    """One system's run: wall time, and per request the finish time, first-token time and tokens."""

    system: str
    wall_s: float
    warmup_s: float
    latency_s: list[float]  # per request, in request order
    ttft_s: list[float]
    tokens: list[list[int]]
    computed_tokens: int  # tokens the system actually generated, including any thrown away
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/engine_cpu.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = p.add_argument_group("workload")
    w.add_argument("--quick", action="store_true",
                   help=f"smoke-test sizes: {QUICK['requests']} requests, {QUICK['adapters']} adapters, max_tokens "
                        f"{QUICK['min_tokens']}-{QUICK['max_tokens']}, short prompts (flags given explicitly still win)")
    w.add_argument("--requests", type=int, help=f"concurrent requests, all submitted at t0 (default {DEFAULTS['requests']})")
    w.add_argument("--adapters", type=int, help=f"number of random LoRA adapters; requests spread evenly over them "
                                                f"(default {DEFAULTS['adapters']})")
    w.add_argument("--ranks", help=f"comma-separated ranks, assigned to adapters cyclically (default {DEFAULTS['ranks']}: "
                                   "with 8 adapters, two of each)")
    w.add_argument("--target-modules", choices=["attention", "all-linear"], default="attention",
                   help="LoRA targets: attention = q,k,v,o projections (default); all-linear adds gate, up, down")
    w.add_argument("--min-tokens", type=int, help=f"smallest max_tokens of a request (default {DEFAULTS['min_tokens']})")
    w.add_argument("--max-tokens", type=int, help=f"largest max_tokens of a request; each request draws its own "
                                                  f"uniformly (default {DEFAULTS['max_tokens']})")
    w.add_argument("--max-context", type=int,
                   help="most context sentences added before a prompt's task sentence; each prompt draws 0..N, which "
                        f"varies the prompt length (default {DEFAULTS['max_context']}, about 30-230 tokens)")
    w.add_argument("--seed", type=int, default=0, help="seed of prompts, output lengths and adapter weights (default 0)")
    w.add_argument("--model", default=None, help="base model: local HF directory or .gguf (default: the embedded "
                                                 "SmolLM2-135M-Instruct); always run in float32")
    s = p.add_argument_group("systems")
    s.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)} to run, in that order (default: all three; "
                        "ratios and agreement need the pairs)")
    s.add_argument("--peft-batch-size", type=int, default=0,
                   help="requests per PEFT generate() call in peft_batch, in submission order (default 0 = all at once)")
    s.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="our engine's token budget per step (prefill chunks + decodes; default 512)")
    s.add_argument("--kv-cache-gb", type=float, default=1.0, help="our engine's KV cache size in GiB (default 1.0)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for all systems (default: torch's default, usually the core count)")
    s.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up of each system (by default each system first runs one short request "
                        "per adapter, so one-time costs such as putting adapters in our engine's slots are not timed)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None, help=f"JSON path (default {result_path(NAME).relative_to(REPO_ROOT)})")
    o.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    o.add_argument("--adapter-dir", type=Path, default=None,
                   help="where to write the random adapters (default: a temporary directory, removed afterwards)")
    args = p.parse_args(argv)

    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.rank_list = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    except ValueError:
        p.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    args.system_list = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in args.system_list if x not in SYSTEMS]
    if unknown or not args.system_list:
        p.error(f"--systems takes a non-empty subset of {','.join(SYSTEMS)}, got {args.systems!r}")
    args.system_list = [x for x in SYSTEMS if x in args.system_list]
    if not args.rank_list or min(args.rank_list) < 1:
        p.error("--ranks must list positive integers")
    for key in ("requests", "adapters", "min_tokens", "max_tokens", "max_num_batched_tokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.min_tokens > args.max_tokens:
        p.error("--min-tokens must not exceed --max-tokens")
    if args.max_context < 0 or args.peft_batch_size < 0 or (args.threads is not None and args.threads < 1):
        p.error("--max-context and --peft-batch-size must be >= 0, --threads >= 1")
    if args.out is None:
        args.out = result_path(NAME)
    return args


def log(message: str) -> None:
    progress(NAME, message)


# ---------------------------------------------------------------------------------------------- workload
def build_prompts(args, tokenizer) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request: deterministic for a seed."""
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.requests):
        task = rng.choice(TASKS).format(t=rng.choice(TOPICS))
        context = rng.sample(CONTEXT, k=min(len(CONTEXT), rng.randint(0, args.max_context)))
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
        messages.append({"role": "user", "content": " ".join(context + [task])})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append((ids, rng.randint(args.min_tokens, args.max_tokens)))
    return out


def make_adapters(args, hf_model, root: Path) -> list[dict]:
    from helpers.lora_factory import make_random_adapter

    targets = ATTENTION if args.target_modules == "attention" else "all-linear"
    specs = []
    for i in range(args.adapters):
        rank = args.rank_list[i % len(args.rank_list)]
        name = f"r{rank}-{i}"
        path = make_random_adapter(
            hf_model, root / name, seed=args.seed * 1000 + i, b_std=0.3 / rank**0.5, r=rank, target_modules=targets
        )
        specs.append({"name": name, "rank": rank, "path": path})
    return specs


def build_requests(args, prompts, adapters) -> list[Request]:
    """Each adapter gets requests/adapters of them (the rest spread one each), in a seeded random order."""
    rng = random.Random(args.seed + 1)
    order = [adapters[i % len(adapters)] for i in range(args.requests)]
    rng.shuffle(order)
    return [
        Request(i, f"req-{i}", a["name"], a["rank"], ids, max_tokens)
        for i, (a, (ids, max_tokens)) in enumerate(zip(order, prompts))
    ]


# ---------------------------------------------------------------------------------------------- systems
def run_ours(args, adapters, requests: list[Request]) -> RunResult:
    from services.gpu_worker.engine.config import EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.engine.sequence import SamplingParams

    engine = LLMEngine(EngineConfig(
        model=args.model, dtype="float32", device="cpu", max_loras=max(len(adapters), 1),
        max_num_seqs=max(64, len(requests)), max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gb=args.kv_cache_gb, num_threads=args.threads,
    ))
    for a in adapters:
        engine.load_adapter(a["name"], a["path"])

    warmup_s = 0.0
    if not args.no_warmup:  # one short request per adapter: puts every adapter in a slot, warms the kernels
        t = time.perf_counter()
        engine.generate([requests[0].prompt_ids] * len(adapters), SamplingParams(max_tokens=2, temperature=0.0),
                        [a["name"] for a in adapters])
        warmup_s = time.perf_counter() - t

    n = len(requests)
    index = {r.request_id: r.index for r in requests}
    tokens: list[list[int]] = [[] for _ in range(n)]
    latency, ttft = [0.0] * n, [0.0] * n
    steps = 0
    t0 = time.perf_counter()
    for r in requests:
        params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(r.request_id, r.prompt_ids, params, r.adapter)
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter() - t0
        steps += 1
        for out in outputs:
            i = index[out.request_id]
            if out.new_token_ids and not tokens[i]:
                ttft[i] = now
            tokens[i].extend(out.new_token_ids)
            if out.finished:
                latency[i] = now
    wall = time.perf_counter() - t0
    result = RunResult("ours", wall, warmup_s, latency, ttft, tokens, sum(len(t) for t in tokens),
                       {"engine_steps": steps, "max_num_batched_tokens": args.max_num_batched_tokens,
                        "max_loras": engine.config.max_loras})
    del engine
    gc.collect()
    return result


class _TokenClock:
    """A generate() streamer that notes when the first generated tokens arrive (put #1 is the prompt)."""

    def __init__(self, t0: float) -> None:
        self.t0, self.calls, self.first = t0, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter() - self.t0

    def end(self) -> None:
        pass


def _peft_generate(model, batch: list[Request], pad_id: int, never_eos: int, t0: float):
    """Left-padded greedy generate of `batch` with per-row adapters; returns (tokens per request, first-token time)."""
    import torch

    width = max(len(r.prompt_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        input_ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids):] = 1
    new = max(r.max_tokens for r in batch)
    clock = _TokenClock(t0)
    kwargs = {"adapter_names": [r.adapter for r in batch]} if len(batch) > 1 else {}
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
            eos_token_id=[never_eos], pad_token_id=pad_id, streamer=clock, **kwargs,
        )
    generated = out[:, width:].tolist()
    return [generated[row][: r.max_tokens] for row, r in enumerate(batch)], clock.first, len(batch) * new


def run_peft_batch(args, model, requests: list[Request], pad_id: int, never_eos: int) -> RunResult:
    size = args.peft_batch_size or len(requests)
    warmup_s = 0.0
    if not args.no_warmup:
        t = time.perf_counter()
        names = sorted({r.adapter for r in requests})
        warm = [Request(-1, "warm", a, 0, requests[0].prompt_ids, 2) for a in names]
        _peft_generate(model, warm + warm[:1], pad_id, never_eos, t)  # >= 2 rows, so adapter_names is used
        warmup_s = time.perf_counter() - t
    n = len(requests)
    tokens: list[list[int]] = [[] for _ in range(n)]
    latency, ttft = [0.0] * n, [0.0] * n
    computed = 0
    t0 = time.perf_counter()
    for start in range(0, n, size):
        batch = requests[start:start + size]
        if len(batch) == 1:  # adapter_names with one row is fine too, but keep the same path as peft_single
            model.set_adapter(batch[0].adapter)
        toks, first, count = _peft_generate(model, batch, pad_id, never_eos, t0)
        done = time.perf_counter() - t0
        computed += count
        for r, t in zip(batch, toks):
            tokens[r.index], latency[r.index], ttft[r.index] = t, done, first
    wall = time.perf_counter() - t0
    return RunResult("peft_batch", wall, warmup_s, latency, ttft, tokens, computed,
                     {"batch_size": size, "batches": (n + size - 1) // size})


def run_peft_single(args, model, requests: list[Request], pad_id: int, never_eos: int) -> RunResult:
    warmup_s = 0.0
    if not args.no_warmup:
        t = time.perf_counter()
        model.set_adapter(requests[0].adapter)
        _peft_generate(model, [Request(-1, "warm", requests[0].adapter, 0, requests[0].prompt_ids, 2)], pad_id, never_eos, t)
        warmup_s = time.perf_counter() - t
    n = len(requests)
    tokens: list[list[int]] = [[] for _ in range(n)]
    latency, ttft = [0.0] * n, [0.0] * n
    t0 = time.perf_counter()
    for r in requests:
        model.set_adapter(r.adapter)
        toks, first, _ = _peft_generate(model, [r], pad_id, never_eos, t0)
        tokens[r.index], latency[r.index], ttft[r.index] = toks[0], time.perf_counter() - t0, first
    wall = time.perf_counter() - t0
    return RunResult("peft_single", wall, warmup_s, latency, ttft, tokens, sum(len(t) for t in tokens))


def load_peft(model_path, adapters):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapters[0]["path"], adapter_name=adapters[0]["name"])
    for a in adapters[1:]:
        model.load_adapter(a["path"], adapter_name=a["name"])
    return model.eval()


# ---------------------------------------------------------------------------------------------- report
def summarize_run(run: RunResult, requests: list[Request]) -> dict:
    generated = sum(r.max_tokens for r in requests)
    tpot = [
        (lat - first) / (r.max_tokens - 1)
        for r, lat, first in zip(requests, run.latency_s, run.ttft_s) if r.max_tokens > 1
    ]
    return {
        "wall_s": run.wall_s,
        "warmup_s": run.warmup_s,
        "generated_tokens": generated,
        "computed_tokens": run.computed_tokens,
        "tokens_per_s": generated / run.wall_s,
        "requests_per_s": len(requests) / run.wall_s,
        "latency_s": summarize(run.latency_s),
        "ttft_s": summarize(run.ttft_s),
        "tpot_s": summarize(tpot),
        "all_lengths_exact": all(len(t) == r.max_tokens for t, r in zip(run.tokens, requests)),
        **run.extra,
    }


def agreement(a: RunResult, b: RunResult, requests: list[Request]) -> dict:
    exact, prefix, mismatched = 0, [], []
    for r, x, y in zip(requests, a.tokens, b.tokens):
        common = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        if x == y:
            exact += 1
        else:
            mismatched.append({"request_id": r.request_id, "adapter": r.adapter, "first_difference_at": common})
        prefix.append(common / max(len(x), len(y), 1))
    return {
        "exact_fraction": exact / len(requests),
        "mean_common_prefix_fraction": sum(prefix) / len(prefix),
        "mismatched": mismatched,
    }


def make_plot(path: Path, systems: dict, runs: dict[str, RunResult], title: str) -> tuple[Path | None, str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install matplotlib, or the [bench] extra)"
    names = list(systems)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = ax1.bar(names, [systems[s]["tokens_per_s"] for s in names], color=["C0", "C1", "C2"][: len(names)])
    ax1.bar_label(bars, fmt="%.1f")
    ax1.set_ylabel("generated tokens / s")
    ax1.set_title("throughput")
    for k, s in enumerate(names):
        lat = sorted(runs[s].latency_s)
        ax2.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=s, color=f"C{k}")
    ax2.set_xlabel("request latency, s (all submitted at t0)")
    ax2.set_ylabel("fraction of requests finished")
    ax2.set_title("latency CDF")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None


def print_summary(data: dict, out: Path) -> None:
    print(f"engine_cpu: {data['workload']['requests']} requests over {data['workload']['adapters']} adapters "
          f"(ranks {data['config']['ranks']}), {data['workload']['generated_tokens']} generated tokens each system")
    print(f"{'system':<12} {'wall s':>8} {'tok/s':>8} {'req/s':>7} {'lat p50':>8} {'lat p90':>8} {'lat p99':>8} "
          f"{'ttft p50':>8} {'tpot p50':>9}")
    for name, s in data["systems"].items():
        lat, ttft, tpot = s["latency_s"], s["ttft_s"], s["tpot_s"]
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(f"{name:<12} {s['wall_s']:>8.2f} {s['tokens_per_s']:>8.1f} {s['requests_per_s']:>7.2f} "
              f"{fmt(lat['p50']):>8} {fmt(lat['p90']):>8} {fmt(lat['p99']):>8} {fmt(ttft['p50']):>8} {fmt(tpot['p50']):>9}")
    for key, value in data["ratios"].items():
        print(f"{key}: {value:.2f}x")
    for key, value in data["token_agreement"].items():
        print(f"token agreement {key}: {value['exact_fraction']:.3f} exact "
              f"(mean common prefix {value['mean_common_prefix_fraction']:.3f})")
    if data.get("plot"):
        print(f"plot: {data['plot']}")
    elif data.get("plot_skipped"):
        print(f"plot skipped: {data['plot_skipped']}")
    print(f"results: {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.model_provisioning import resolve_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from transformers via peft
    if args.threads:
        torch.set_num_threads(args.threads)
    started = timestamp()
    machine = machine_info()
    git = git_commit()
    log(f"machine: {machine['cpu_model']}, {machine['usable_cpus']} cpus, torch {machine['versions']['torch']} "
        f"with {torch.get_num_threads()} threads, load average {machine['load_average']}")

    model_path = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = build_prompts(args, tokenizer)
    log(f"workload: {args.requests} requests, prompt tokens {min(len(p) for p, _ in prompts)}-"
        f"{max(len(p) for p, _ in prompts)}, max_tokens {min(m for _, m in prompts)}-{max(m for _, m in prompts)}")

    with tempfile.TemporaryDirectory(prefix="caraserve-bench-") as tmp:
        adapter_root = args.adapter_dir or Path(tmp)
        t = time.perf_counter()
        hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        adapters = make_adapters(args, hf_model, adapter_root)
        del hf_model
        gc.collect()
        log(f"adapters: {len(adapters)} random ({args.target_modules}, ranks "
            f"{','.join(str(a['rank']) for a in adapters)}) in {time.perf_counter() - t:.1f}s")
        requests = build_requests(args, prompts, adapters)

        runs: dict[str, RunResult] = {}
        if "ours" in args.system_list:
            log("ours: loading the engine and running")
            runs["ours"] = run_ours(args, adapters, requests)
            log(f"ours: {runs['ours'].wall_s:.2f}s")
        if "peft_batch" in args.system_list or "peft_single" in args.system_list:
            t = time.perf_counter()
            peft_model = load_peft(model_path, adapters)
            log(f"peft: model with {len(adapters)} adapters loaded in {time.perf_counter() - t:.1f}s")
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            never_eos = peft_model.config.vocab_size  # an id no logits row has: EOS neither stops nor is masked
            if "peft_batch" in args.system_list:
                log(f"peft_batch: running (batch size {args.peft_batch_size or len(requests)})")
                runs["peft_batch"] = run_peft_batch(args, peft_model, requests, pad_id, never_eos)
                log(f"peft_batch: {runs['peft_batch'].wall_s:.2f}s")
            if "peft_single" in args.system_list:
                log("peft_single: running, one request at a time")
                runs["peft_single"] = run_peft_single(args, peft_model, requests, pad_id, never_eos)
                log(f"peft_single: {runs['peft_single'].wall_s:.2f}s")
            del peft_model
            gc.collect()

    systems = {name: summarize_run(run, requests) for name, run in runs.items()}
    ratios = {}
    for other in ("peft_batch", "peft_single"):
        if "ours" in systems and other in systems:
            ratios[f"tokens_per_s_ours_vs_{other}"] = systems["ours"]["tokens_per_s"] / systems[other]["tokens_per_s"]
            ratios[f"latency_p50_{other}_vs_ours"] = systems[other]["latency_s"]["p50"] / systems["ours"]["latency_s"]["p50"]
    names = list(runs)
    token_agreement = {
        f"{a}_vs_{b}": agreement(runs[a], runs[b], requests) for i, a in enumerate(names) for b in names[i + 1:]
    }
    prompt_lens = [len(r.prompt_ids) for r in requests]
    data = {
        "benchmark": NAME,
        "timestamp": started,
        "finished": timestamp(),
        "git": git,
        "machine": machine,
        "load_average_end": machine_info()["load_average"],
        "config": {
            "quick": args.quick, "model": str(model_path), "dtype": "float32", "requests": args.requests,
            "adapters": args.adapters, "ranks": args.rank_list, "target_modules": args.target_modules,
            "min_tokens": args.min_tokens, "max_tokens": args.max_tokens, "max_context": args.max_context,
            "seed": args.seed, "systems": args.system_list, "peft_batch_size": args.peft_batch_size or args.requests,
            "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_gb": args.kv_cache_gb,
            "threads": torch.get_num_threads(), "warmup": not args.no_warmup, "greedy": True,
            "adapter_list": [{"name": a["name"], "rank": a["rank"]} for a in adapters],
        },
        "workload": {
            "requests": len(requests), "adapters": len(adapters),
            "generated_tokens": sum(r.max_tokens for r in requests),
            "prompt_tokens": {"total": sum(prompt_lens), **summarize([float(x) for x in prompt_lens])},
            "max_tokens": summarize([float(r.max_tokens) for r in requests]),
        },
        "systems": systems,
        "ratios": ratios,
        "token_agreement": token_agreement,
        "requests": [
            {
                "request_id": r.request_id, "adapter": r.adapter, "rank": r.rank, "prompt_tokens": len(r.prompt_ids),
                "max_tokens": r.max_tokens,
                "latency_s": {s: runs[s].latency_s[r.index] for s in runs},
                "ttft_s": {s: runs[s].ttft_s[r.index] for s in runs},
            }
            for r in requests
        ],
        "plot": None,
    }
    if not args.no_plot:
        title = (f"{len(requests)} requests, {len(adapters)} adapters (ranks {args.ranks}), {machine['cpu_model']}, "
                 f"{torch.get_num_threads()} threads, commit {(git['commit'] or '?')[:10]}{' dirty' if git['dirty'] else ''}")
        png, why = make_plot(Path(args.out).with_suffix(".png"), systems, runs, title)
        data["plot"] = str(png) if png else None
        if why:
            data["plot_skipped"] = why
            log(f"plot skipped: {why}")
    out = write_result(NAME, data, args.out)
    log(f"wrote {out}")
    print_summary(data, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
