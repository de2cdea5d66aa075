"""A discrete-event simulator of a cluster of workers under a placement policy (DESIGN.md, "Rank-aware scheduling").

The policies are the live scheduler's own (services/scheduler/policies.py); the simulator hands them its exact
worker state as `WorkerView`s at each arrival and tells them about every finish.

Workload (`generate_workload`, deterministic for (seed, rate)):
  - arrivals: a Poisson process at `rate` requests/s over [0, duration_s);
  - adapters: `adapters` of them, adapter i (0-based) drawn with probability ∝ 1 / (i + 1)^zipf (zipf 0: uniform);
    each adapter's rank is drawn once, uniformly from `ranks` (from the seed alone, so every rate and policy sees
    the same adapters);
  - prompt and output lengths: `length_dist` with means `prompt_len` and `output_len` — "lognormal" (σ =
    `length_sigma`, μ = ln(mean) − σ²/2), "exponential", "uniform" (integers 1 … 2·mean − 1) or "fixed" —
    rounded, prompts clipped to [1, max_prompt_len], outputs to [1, max_tokens]. Every request asks for
    max_tokens and stops (EOS) after its output length; the policies know only max_tokens.
  The same workload (common random numbers) runs under every policy.

Each worker (continuous batching, one `PerfModel` for all):
  - A request placed on a worker joins its FIFO queue (and reserves prompt + max_tokens KV tokens of `kv_tokens`;
    0: unlimited). When the worker is idle it starts a step at once; otherwise the request waits for the end of
    the step in flight.
  - At each step boundary the worker admits queued requests in order while it runs fewer than `max_running` and
    the head's reservation fits (a worker with nothing running always admits its head, so an oversized request
    cannot deadlock it); a request whose adapter is still loading is passed over, not waited for.
  - A step prefills the requests admitted at its start (their prompts in one batch) and decodes one token of each
    request already running: it lasts Pre(admitted) + Dec(running ranks). A request's first token comes at the
    end of its prefill step, then one token per step; it finishes with its output length's last token. Prefill is
    not chunked (a long prompt delays that step's decodes).
  - GPU adapter pool (optional, `gpu_slots` > 0): an LRU of adapters. A request whose adapter is not in the pool
    starts its load at placement: the worker's loads run one after another (one copy stream), each taking
    rank × `load_s_per_rank`, and the request cannot be admitted before its adapter has landed. Adapters in use by
    a placed request are never evicted; if every slot is in use the pool grows past `gpu_slots` until they free.
    With `gpu_slots` = 0 (default) adapters are not modelled: every request starts at once, as CaraServe's
    CPU-assisted prefill aims for. The host cache is not modelled (every adapter is in host memory), so
    `host_adapters` is always empty.
  - The KV cache is only modelled as reservations (no preemption, no paging).

Metrics per request: time per output token TPOT = (finish − arrival) / output tokens (queueing and prefill
included) and TTFT = first token − arrival. `summarize` reports, over the requests that arrived in
[warmup_s, duration_s): mean, p50, p90, p99 TPOT, mean and p99 TTFT, SLO attainment (fraction with TPOT <= the
SLO), requests and output tokens; and over the whole run the mean batch (requests per step), the padding factor
(Σ batch × max rank / Σ ranks over decode steps: how much padded kernels inflate the rank term; 1 = none), the
steps and when the last request finished. Every request placed runs to completion (the simulation drains).

Deterministic for a seed: numpy's generators for the workload, the policy's seeded rng, and an event heap whose
ties are broken by insertion order.
"""
from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np

from services.scheduler.perf_model import PerfModel
from services.scheduler.policies import Policy, RequestView, WorkerView

LENGTH_DISTS = ("lognormal", "exponential", "uniform", "fixed")


@dataclass
class SimConfig:
    workers: int = 60
    duration_s: float = 60.0  # arrivals over [0, duration_s); then the cluster drains
    warmup_s: float = 10.0  # requests arriving before this are run but not measured
    adapters: int = 40000
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    zipf: float = 1.0  # popularity exponent: adapter i has weight 1 / (i + 1)^zipf
    prompt_len: float = 128.0  # mean prompt tokens
    output_len: float = 64.0  # mean output tokens
    length_dist: str = "lognormal"
    length_sigma: float = 0.8  # lognormal σ
    max_tokens: int = 512  # every request's max_tokens (outputs are clipped to it)
    max_prompt_len: int = 2048
    max_running: int = 64  # each worker's batch capacity
    kv_tokens: int = 15000  # each worker's KV-cache room in tokens (reservations of prompt + max_tokens); 0: no limit
    max_lora_rank: int = 0  # each worker's highest rank (0: the highest of `ranks`)
    gpu_slots: int = 0  # GPU adapter pool size (0: not modelled, adapters start at once)
    load_s_per_rank: float = 0.00017  # load time per rank unit of an adapter (with gpu_slots)
    slo_factor: float = 1.5  # SLO on TPOT = slo_factor × the model's no-LoRA time per token
    seed: int = 0

    def __post_init__(self) -> None:
        self.ranks = tuple(int(r) for r in self.ranks)
        problems = []
        if self.workers < 1:
            problems.append(f"workers must be at least 1, got {self.workers}")
        if not self.duration_s > 0:
            problems.append(f"duration must be positive, got {self.duration_s}")
        if not 0 <= self.warmup_s < self.duration_s:
            problems.append(f"warmup must be in [0, duration), got {self.warmup_s}")
        if self.adapters < 1:
            problems.append(f"adapters must be at least 1, got {self.adapters}")
        if not self.ranks or min(self.ranks) < 1:
            problems.append(f"ranks must be positive integers, got {self.ranks}")
        if self.zipf < 0:
            problems.append(f"zipf exponent must be >= 0, got {self.zipf}")
        if self.length_dist not in LENGTH_DISTS:
            problems.append(f"length distribution must be one of {', '.join(LENGTH_DISTS)}, got {self.length_dist!r}")
        if not (self.prompt_len >= 1 and self.output_len >= 1):
            problems.append("mean prompt and output lengths must be at least 1")
        if self.length_sigma < 0:
            problems.append(f"length sigma must be >= 0, got {self.length_sigma}")
        if self.max_tokens < 1 or self.max_prompt_len < 1:
            problems.append("max tokens and max prompt length must be at least 1")
        if self.max_running < 1:
            problems.append(f"max running must be at least 1, got {self.max_running}")
        if self.kv_tokens < 0 or self.gpu_slots < 0 or self.load_s_per_rank < 0:
            problems.append("kv tokens, gpu slots and load time must be >= 0")
        if not self.slo_factor > 0:
            problems.append(f"slo factor must be positive, got {self.slo_factor}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def worker_max_rank(self) -> int:
        return self.max_lora_rank or max(self.ranks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        return d


@dataclass
class Workload:
    rate: float
    arrival: np.ndarray  # seconds, ascending
    adapter: np.ndarray  # adapter index
    rank: np.ndarray
    prompt: np.ndarray
    output: np.ndarray  # output tokens the request will generate (<= max_tokens)
    max_tokens: int

    def __len__(self) -> int:
        return len(self.arrival)


def adapter_ranks(cfg: SimConfig) -> np.ndarray:
    """Each adapter's rank, from the seed alone."""
    rng = np.random.default_rng([cfg.seed, 0])
    return np.asarray(cfg.ranks, dtype=np.int64)[rng.integers(0, len(cfg.ranks), cfg.adapters)]


def _lengths(rng: np.random.Generator, dist: str, mean: float, sigma: float, n: int, top: int) -> np.ndarray:
    if dist == "lognormal":
        x = rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, n)
    elif dist == "exponential":
        x = rng.exponential(mean, n)
    elif dist == "uniform":
        hi = max(1, int(round(2 * mean - 1)))
        x = rng.integers(1, hi + 1, n).astype(np.float64)
    else:
        x = np.full(n, float(mean))
    return np.clip(np.rint(x), 1, top).astype(np.int64)


def generate_workload(cfg: SimConfig, rate: float) -> Workload:
    """Poisson arrivals at `rate` over [0, duration_s) with power-law adapter popularity (module docstring)."""
    if not rate > 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    rng = np.random.default_rng([cfg.seed, 1, int(round(rate * 1000))])
    expected = rate * cfg.duration_s
    gaps = rng.exponential(1.0 / rate, int(expected + 10 * math.sqrt(expected) + 100))
    arrival = np.cumsum(gaps)
    while arrival[-1] < cfg.duration_s:  # (practically never) extend
        arrival = np.concatenate([arrival, arrival[-1] + np.cumsum(rng.exponential(1.0 / rate, len(gaps)))])
    arrival = arrival[arrival < cfg.duration_s]
    n = len(arrival)
    weights = 1.0 / np.arange(1, cfg.adapters + 1, dtype=np.float64) ** cfg.zipf
    cdf = np.cumsum(weights)
    adapter = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), cfg.adapters - 1)
    ranks = adapter_ranks(cfg)[adapter]
    prompt = _lengths(rng, cfg.length_dist, cfg.prompt_len, cfg.length_sigma, n, cfg.max_prompt_len)
    output = _lengths(rng, cfg.length_dist, cfg.output_len, cfg.length_sigma, n, cfg.max_tokens)
    return Workload(rate=float(rate), arrival=arrival, adapter=adapter.astype(np.int64), rank=ranks,
                    prompt=prompt, output=output, max_tokens=cfg.max_tokens)


@dataclass
class SimResult:
    policy: str
    rate: float
    slo_tpot_s: float
    workload: Workload
    first_token: np.ndarray  # time of each request's first token
    finish: np.ndarray  # time of its last token
    tokens: np.ndarray  # tokens it generated (counted by the steps it took part in)
    finishes: np.ndarray  # how many times it finished (1 for every request)
    worker: np.ndarray  # the worker it ran on
    step_tokens: int  # tokens generated, counted step by step over all workers
    steps: int  # steps run over all workers
    end_time: float  # when the last request finished
    wall_s: float  # how long the simulation took to run
    warmup_s: float
    duration_s: float
    extra: dict = field(default_factory=dict)

    def tpot(self) -> np.ndarray:
        return (self.finish - self.workload.arrival) / self.workload.output

    def measured(self) -> np.ndarray:
        a = self.workload.arrival
        return (a >= self.warmup_s) & (a < self.duration_s)


def summarize(result: SimResult) -> dict:
    """The measured requests' metrics (module docstring); times in seconds."""
    mask = result.measured()
    tpot = result.tpot()[mask]
    ttft = (result.first_token - result.workload.arrival)[mask]
    if len(tpot) == 0:
        return {"requests": 0}
    p50, p90, p99 = np.percentile(tpot, [50, 90, 99])
    return {
        "requests": int(mask.sum()),
        "output_tokens": int(result.workload.output[mask].sum()),
        "mean_tpot_s": float(tpot.mean()),
        "p50_tpot_s": float(p50),
        "p90_tpot_s": float(p90),
        "p99_tpot_s": float(p99),
        "mean_ttft_s": float(ttft.mean()),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "slo_tpot_s": result.slo_tpot_s,
        "slo_attainment": float((tpot <= result.slo_tpot_s).mean()),
        "mean_batch": result.extra.get("mean_batch"),
        "padding_factor": result.extra.get("padding_factor"),
        "steps": result.steps,
        "drain_end_s": result.end_time,
    }


class _Worker:
    __slots__ = ("view", "busy", "step", "queue", "prefilling", "finish_at", "run_kv", "queue_kv", "pool", "refs",
                 "loading", "load_free_at")

    def __init__(self, view: WorkerView) -> None:
        self.view = view
        self.busy = False
        self.step = 0  # index of the step in flight (or the next one)
        self.queue: list[int] = []  # request indices, parallel to view.queued
        self.prefilling: list[int] = []  # requests prefilled by the step in flight
        self.finish_at: dict[int, list[int]] = {}  # step index -> requests whose last token it produces
        self.run_kv = 0  # KV tokens reserved by admitted, unfinished requests
        self.queue_kv = 0  # ... and by queued ones
        self.pool: OrderedDict[int, None] = OrderedDict()  # GPU adapter pool, LRU first
        self.refs: dict[int, int] = {}  # adapter -> placed, unfinished requests using it
        self.loading: dict[int, float] = {}  # adapter -> when its load completes
        self.load_free_at = 0.0


def simulate(cfg: SimConfig, model: PerfModel, policy: Policy, workload: Workload,
             slo_tpot_s: float | None = None) -> SimResult:
    """Run `workload` on `cfg.workers` workers under `policy` until every request has finished."""
    started = time.perf_counter()
    slo = model.default_slo_tpot_s(cfg.slo_factor) if slo_tpot_s is None else slo_tpot_s
    n = len(workload)
    arrival = workload.arrival.tolist()
    adapter = workload.adapter.tolist()
    rank = workload.rank.tolist()
    prompt = workload.prompt.tolist()
    output = workload.output.tolist()
    max_tokens = workload.max_tokens
    kv = cfg.kv_tokens or (1 << 62)
    max_running = cfg.max_running
    slots = cfg.gpu_slots
    load_per_rank = cfg.load_s_per_rank
    decode_s = model.decode_step_s
    prefill_s = model.prefill_s
    observe = policy.observe_finish
    choose = policy.choose
    names: dict[int, str] = {}

    width = len(str(cfg.workers - 1))
    workers = [_Worker(WorkerView(
        worker_id=f"w{i:0{width}d}", model=model, slo_tpot_s=slo, running_ranks=[], queued=[],
        gpu_adapters=frozenset(), host_adapters=frozenset(), max_lora_rank=cfg.worker_max_rank,
        max_running=max_running, free_kv_tokens=kv if cfg.kv_tokens else 1 << 40,
    )) for i in range(cfg.workers)]
    by_view = {id(w.view): w for w in workers}
    index_of = {id(w.view): i for i, w in enumerate(workers)}
    views = [w.view for w in workers]

    first_token = [math.nan] * n
    finish = [math.nan] * n
    tokens = [0] * n
    finishes = [0] * n
    prefill_step = [0] * n
    worker_of = [-1] * n
    ready_at = [0.0] * n
    events: list[tuple[float, int, int]] = []  # (time, seq, worker index): step ends and adapter landings
    seq = 0
    step_tokens = 0
    steps = 0
    batch_sum = 0
    padded_sum = 0  # over decode steps: Σ batch × max rank ...
    rank_sum = 0  # ... and Σ ranks
    end_time = 0.0

    def finish_request(w: _Worker, i: int, t: float) -> None:
        nonlocal end_time
        finish[i] = t
        finishes[i] += 1
        tokens[i] = w.step - prefill_step[i] + 1
        view = w.view
        view.running_ranks.remove(rank[i])
        w.run_kv -= prompt[i] + max_tokens
        if cfg.kv_tokens:
            view.free_kv_tokens = kv - w.run_kv - w.queue_kv
        if slots:
            a = adapter[i]
            left = w.refs[a] - 1
            if left:
                w.refs[a] = left
            else:
                del w.refs[a]
        observe(names.get(adapter[i]), output[i])
        end_time = t

    def start_step(w: _Worker, wi: int, t: float) -> None:
        nonlocal seq, steps, batch_sum, padded_sum, rank_sum
        view = w.view
        running = view.running_ranks
        if running:
            dec = decode_s(running)
            padded_sum += len(running) * max(running)
            rank_sum += sum(running)
        else:
            dec = 0.0
        admitted = []
        if w.queue:
            queue = w.queue
            queued = view.queued
            j = 0
            while j < len(queue) and len(running) < max_running:
                i = queue[j]
                if slots and ready_at[i] > t:
                    j += 1
                    continue
                need = prompt[i] + max_tokens
                if running and w.run_kv + need > kv:
                    break
                w.run_kv += need
                w.queue_kv -= need
                del queue[j]
                del queued[j]
                running.append(rank[i])
                prefill_step[i] = w.step
                admitted.append(i)
        n_decode = len(running) - len(admitted)
        if not admitted and not n_decode:
            w.busy = False
            return
        pre = prefill_s([(prompt[i], rank[i]) for i in admitted]) if admitted else 0.0
        w.prefilling = admitted
        w.busy = True
        steps += 1
        batch_sum += len(running)
        seq += 1
        heapq.heappush(events, (t + pre + dec, seq, wi))

    def end_step(w: _Worker, wi: int, t: float) -> None:
        nonlocal step_tokens
        step = w.step
        step_tokens += len(w.view.running_ranks)  # one token for each request prefilled or decoded
        for i in w.prefilling:
            first_token[i] = t
            if output[i] == 1:
                finish_request(w, i, t)
            else:
                w.finish_at.setdefault(step + output[i] - 1, []).append(i)
        w.prefilling = []
        done = w.finish_at.pop(step, None)
        if done:
            for i in done:
                finish_request(w, i, t)
        w.step = step + 1
        start_step(w, wi, t)

    def place(i: int, t: float) -> None:
        nonlocal seq
        a = adapter[i]
        name = names.get(a)
        if name is None:
            name = names[a] = f"adapter-{a}"
        view = choose(RequestView(str(i), name, rank[i], prompt[i], max_tokens), views)
        w = by_view[id(view)]
        wi = index_of[id(view)]
        worker_of[i] = wi
        w.queue.append(i)
        view.queued.append((prompt[i], rank[i]))
        w.queue_kv += prompt[i] + max_tokens
        if cfg.kv_tokens:
            view.free_kv_tokens = kv - w.run_kv - w.queue_kv
        if slots:
            w.refs[a] = w.refs.get(a, 0) + 1
            landing = w.loading.get(a)
            if landing is not None and landing <= t:
                del w.loading[a]
                landing = None
            if a in w.pool and landing is None:
                w.pool.move_to_end(a)
            elif landing is not None:
                ready_at[i] = landing
            else:
                landing = max(t, w.load_free_at) + rank[i] * load_per_rank
                w.load_free_at = landing
                w.loading[a] = landing
                ready_at[i] = landing
                w.pool[a] = None
                if len(w.pool) > slots:
                    for old in list(w.pool):
                        if len(w.pool) <= slots:
                            break
                        if old not in w.refs:
                            del w.pool[old]
                            w.loading.pop(old, None)
                view.gpu_adapters = frozenset(names[x] for x in w.pool)
                seq += 1
                heapq.heappush(events, (landing, seq, -1 - wi))  # negative: an adapter landed on worker wi
        if not w.busy:
            start_step(w, wi, t)

    next_i = 0
    while True:
        t_arr = arrival[next_i] if next_i < n else math.inf
        if events and events[0][0] <= t_arr:
            t, _, wi = heapq.heappop(events)
            if wi >= 0:
                end_step(workers[wi], wi, t)
            else:
                w = workers[-1 - wi]
                if not w.busy:
                    start_step(w, -1 - wi, t)
        elif next_i < n:
            place(next_i, t_arr)
            next_i += 1
        else:
            break

    return SimResult(
        policy=getattr(policy, "name", type(policy).__name__), rate=workload.rate, slo_tpot_s=slo,
        workload=workload, first_token=np.asarray(first_token), finish=np.asarray(finish),
        tokens=np.asarray(tokens, dtype=np.int64), finishes=np.asarray(finishes, dtype=np.int64),
        worker=np.asarray(worker_of, dtype=np.int64), step_tokens=step_tokens, steps=steps, end_time=end_time,
        wall_s=time.perf_counter() - started, warmup_s=cfg.warmup_s, duration_s=cfg.duration_s,
        extra={"mean_batch": batch_sum / steps if steps else 0.0,
               "padding_factor": padded_sum / rank_sum if rank_sum else 1.0},
    )
