"""Placement policies: which worker runs a request (DESIGN.md, "Rank-aware scheduling").

One synchronous interface, free of NATS and asyncio, drives both the live scheduler and the discrete-event
simulator (services/scheduler/simulator.py). A caller describes the request as a `RequestView` and each worker
of the request's base model as a `WorkerView` (its performance model, SLO, what it runs and queues, which
adapters it holds, its capacity); `policy.choose(request, workers)` returns one of the views, and
`policy.observe_finish(adapter, output_tokens)` reports a finished request. Policies never modify the views (the
simulator hands them its live state) and never reject a request that some worker can take.

Which workers can serve a request (every policy filters by this first):
  - rank: `request.rank <= worker.max_lora_rank` (a worker refuses higher ranks); none left: `NoWorkerError`.
  - memory: `worker.free_kv_tokens >= prompt_tokens + max_tokens`. If no rank-capable worker has the room, the
    rank-capable ones stay candidates (the request will queue there until memory frees up).
  - the base model: the caller passes only workers of the request's base model.

Policies (`make_policy(name, seed)`; `POLICY_NAMES`):
  - rank_aware (the paper's): for each candidate, with Dec and Pre its performance model's decode-step and
    prefill predictions, "all" its running ranks plus its queued ranks:
        Δprefill = Pre(queued + request) − Pre(queued)
        Δdecode  = Dec(all + request) − Dec(all),   or ∞ if Dec(all + request) > the worker's slo_tpot_s
                   (also ∞ if the predicted time to first token, Pre(queued + request) + Dec(running), is above
                   the worker's slo_ttft_s, when one is set)
        cost     = Δprefill / expected output length + Δdecode
        score    = cost × (running + queued requests)
    and picks the minimum of (score, residency, worker_id), residency being 0 if the adapter is in the worker's
    GPU pool (or the request is for the base model), 1 if it is in its node's host cache, 2 otherwise. The score
    is the extra time per token that the request inflicts on the requests already there; an idle worker scores 0.
    If every score is ∞ (every worker would break its SLO) it still serves: the least loaded worker, ties by
    residency then worker_id. Expected output length: the running average of the output tokens observed for the
    request's adapter; while the adapter has none, the average over all adapters; with nothing observed yet, the
    request's max_tokens; always capped at max_tokens (and at least 1).
  - random: uniformly among the candidates, from a `random.Random(seed)`.
  - round_robin: candidates in worker_id order; the first whose id follows the last chosen id, wrapping around
    (stable when workers come and go).
  - most_idle: fewest running + queued requests, ties by worker_id.
  - first_fit: in worker_id order, the first candidate whose predicted Dec(all + request) stays within its
    slo_tpot_s and whose running + queued requests are below max_running (it packs workers); if none, the least
    loaded (as most_idle).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol, Sequence

from services.scheduler.perf_model import PerfModel


class NoWorkerError(LookupError):
    """No ready worker can take the request (the message says why). (Defined here, not in placement.py, which
    imports this module; placement.py re-exports it.)"""


POLICY_NAMES = ("rank_aware", "random", "round_robin", "most_idle", "first_fit")


@dataclass
class RequestView:
    request_id: str
    adapter: str | None  # None: the base model
    rank: int  # the adapter's LoRA rank, 0 for the base model
    prompt_tokens: int  # (an estimate, live)
    max_tokens: int


@dataclass
class WorkerView:
    worker_id: str
    model: PerfModel  # the worker's performance model
    slo_tpot_s: float  # its SLO on time per output token
    running_ranks: list[int]  # rank of each running (decoding) request
    queued: list[tuple[int, int]]  # (prompt tokens, rank) of requests admitted but not yet prefilled
    gpu_adapters: frozenset[str]  # adapters in its GPU adapter pool
    host_adapters: frozenset[str]  # adapters in its node's host cache (CPU-assist can start them at once)
    max_lora_rank: int  # it refuses adapters above this rank
    max_running: int  # batch capacity (max_num_seqs)
    free_kv_tokens: int  # KV-cache room, in tokens
    slo_ttft_s: float = math.inf  # its SLO on time to first token (inf: none)

    @property
    def load(self) -> int:
        """Running + queued requests."""
        return len(self.running_ranks) + len(self.queued)


class Policy(Protocol):
    name: str

    def choose(self, request: RequestView, workers: Sequence[WorkerView]) -> WorkerView:
        """The worker for `request`; NoWorkerError when `workers` is empty or none can take the rank."""
        ...

    def observe_finish(self, adapter: str | None, output_tokens: int) -> None:
        """A request of `adapter` finished after `output_tokens` tokens."""
        ...


_by_id = attrgetter("worker_id")


def candidates(request: RequestView, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """The workers that can serve `request` (module docstring); NoWorkerError if none can take its rank."""
    if not workers:
        raise NoWorkerError("no GPU worker is ready; retry shortly")
    capable = [w for w in workers if request.rank <= w.max_lora_rank]
    if not capable:
        top = max(w.max_lora_rank for w in workers)
        raise NoWorkerError(f"no worker serves LoRA rank {request.rank} (the highest rank served is {top})")
    need = request.prompt_tokens + request.max_tokens
    roomy = [w for w in capable if w.free_kv_tokens >= need]
    return roomy or capable


def residency(request: RequestView, worker: WorkerView) -> int:
    """0: the adapter is in the worker's GPU pool (or the request is for the base model); 1: in its host cache;
    2: neither."""
    if request.adapter is None or request.adapter in worker.gpu_adapters:
        return 0
    return 1 if request.adapter in worker.host_adapters else 2


def _least_loaded_key(request: RequestView):
    return lambda w: (w.load, residency(request, w), w.worker_id)


class _Stateless:
    name = ""

    def observe_finish(self, adapter: str | None, output_tokens: int) -> None:
        pass


class RandomPolicy(_Stateless):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def choose(self, request: RequestView, workers: Sequence[WorkerView]) -> WorkerView:
        return self.rng.choice(candidates(request, workers))


class RoundRobinPolicy(_Stateless):
    name = "round_robin"

    def __init__(self) -> None:
        self.last_id: str | None = None

    def choose(self, request: RequestView, workers: Sequence[WorkerView]) -> WorkerView:
        ordered = sorted(candidates(request, workers), key=_by_id)
        chosen = ordered[0]
        if self.last_id is not None:
            for w in ordered:
                if w.worker_id > self.last_id:
                    chosen = w
                    break
        self.last_id = chosen.worker_id
        return chosen


class MostIdlePolicy(_Stateless):
    name = "most_idle"

    def choose(self, request: RequestView, workers: Sequence[WorkerView]) -> WorkerView:
        return min(candidates(request, workers), key=lambda w: (w.load, w.worker_id))


def _all_ranks(worker: WorkerView) -> list[int]:
    if worker.queued:
        return worker.running_ranks + [rank for _, rank in worker.queued]
    return worker.running_ranks


class FirstFitPolicy(_Stateless):
    name = "first_fit"

    def choose(self, request: RequestView, workers: Sequence[WorkerView]) -> WorkerView:
        cands = candidates(request, workers)
        for w in sorted(cands, key=_by_id):
            if w.load < w.max_running and \
                    w.model.decode_step_s(_all_ranks(w) + [request.rank]) <= w.slo_tpot_s:
                return w
        return min(cands, key=lambda w: (w.load, w.worker_id))


class RankAwarePolicy:
    name = "rank_aware"

    def __init__(self) -> None:
        self._by_adapter: dict[str | None, list[int]] = {}  # adapter -> [output tokens, requests]
        self._total = [0, 0]

    def observe_finish(self, adapter: str | None, output_tokens: int) -> None:
        stats = self._by_adapter.get(adapter)
        if stats is None:
            stats = self._by_adapter[adapter] = [0, 0]
        stats[0] += output_tokens
        stats[1] += 1
        self._total[0] += output_tokens
        self._total[1] += 1

    def expected_output_len(self, request: RequestView) -> float:
        """The adapter's running average of output tokens (else the global one, else max_tokens), capped at the
        request's max_tokens, at least 1."""
        stats = self._by_adapter.get(request.adapter)
        if stats is None:
            stats = self._total
        expected = stats[0] / stats[1] if stats[1] else float(request.max_tokens)
        return max(1.0, min(expected, float(request.max_tokens)))

    def cost(self, request: RequestView, worker: WorkerView, expected_len: float) -> float:
        """The paper's per-token cost of adding `request` to `worker` (∞ if it would break the worker's SLO)."""
        model = worker.model
        ranks = _all_ranks(worker)
        dec_after = model.decode_step_s(ranks + [request.rank])
        if dec_after > worker.slo_tpot_s:
            return math.inf
        d_decode = dec_after - model.decode_step_s(ranks)
        mine = (request.prompt_tokens, request.rank)
        if worker.slo_ttft_s < math.inf and \
                model.prefill_s(worker.queued + [mine]) + model.decode_step_s(worker.running_ranks) > worker.slo_ttft_s:
            return math.inf
        if worker.queued:
            d_prefill = model.prefill_s(worker.queued + [mine]) - model.prefill_s(worker.queued)
        else:
            d_prefill = model.prefill_s([mine])
        return d_prefill / expected_len + d_decode

    def score(self, request: RequestView, worker: WorkerView, expected_len: float) -> float:
        load = worker.load
        if load == 0:  # an idle worker scores 0 unless the request alone would break its SLOs
            model = worker.model
            alone_ok = (model.decode_step_s([request.rank]) <= worker.slo_tpot_s
                        and model.prefill_s([(request.prompt_tokens, request.rank)]) <= worker.slo_ttft_s)
            return 0.0 if alone_ok else math.inf
        return self.cost(request, worker, expected_len) * load

    def choose(self, request: RequestView, workers: Sequence[WorkerView]) -> WorkerView:
        cands = candidates(request, workers)
        expected = self.expected_output_len(request)
        best, best_key = None, None
        for w in cands:
            s = self.score(request, w, expected)
            if s == math.inf:
                continue
            key = (s, residency(request, w), w.worker_id)
            if best_key is None or key < best_key:
                best, best_key = w, key
        if best is None:  # every worker would break its SLO: still serve, on the least loaded
            return min(cands, key=_least_loaded_key(request))
        return best


def make_policy(name: str, seed: int = 0) -> Policy:
    """A fresh policy by name (`POLICY_NAMES`); ValueError naming the choices for an unknown one."""
    if name == "rank_aware":
        return RankAwarePolicy()
    if name == "random":
        return RandomPolicy(seed)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "most_idle":
        return MostIdlePolicy()
    if name == "first_fit":
        return FirstFitPolicy()
    raise ValueError(f"unknown placement policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
