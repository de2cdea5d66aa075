"""Where a request runs, live: the workers the scheduler knows of (from heartbeats) and the placement policy.

Synchronous and free of NATS and asyncio, so it is tested directly. `WorkerRegistry` keeps each worker's last
heartbeat (with its performance model, parsed once per heartbeat) and when it came; `expire` returns the workers
that have been silent too long. `Placer` turns a GenerateRequest and the registry's ready workers into the
policies' views (services/scheduler/policies.py — the same code the simulator runs) and asks the configured
policy. Requests placed since a worker's last heartbeat count in its view (as queued prefills), so a burst does
not all land on the worker that looked idle a second ago. A worker without a performance model in its
heartbeats makes that placement fall back to most_idle (load only).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from services.scheduler.perf_model import PerfModel, PerfModelError
from services.scheduler.policies import NoWorkerError, RequestView, WorkerView, make_policy
from shared.protocol import GenerateRequest, WorkerHeartbeat

log = logging.getLogger(__name__)

__all__ = ["NoWorkerError", "Placer", "WorkerRegistry", "WorkerState"]


@dataclass
class WorkerState:
    heartbeat: WorkerHeartbeat
    last_seen: float  # monotonic time of the last heartbeat
    model: PerfModel | None = None  # parsed from the heartbeat's perf_model
    placed: list[RequestView] = field(default_factory=list)  # placed here since that heartbeat (not in its counts)

    @property
    def worker_id(self) -> str:
        return self.heartbeat.worker_id

    @property
    def load(self) -> int:
        hb = self.heartbeat
        return hb.running + hb.queued + len(self.placed)

    def view(self) -> WorkerView:
        """The policies' view: the heartbeat's state plus what was placed here since."""
        hb = self.heartbeat
        placed_tokens = sum(r.prompt_tokens + r.max_tokens for r in self.placed)
        return WorkerView(
            worker_id=hb.worker_id,
            model=self.model,
            slo_tpot_s=hb.slo_tpot_s or math.inf,
            running_ranks=list(hb.running_ranks),
            queued=[tuple(q) for q in hb.queued_prompts] + [(r.prompt_tokens, r.rank) for r in self.placed],
            gpu_adapters=frozenset(hb.gpu_adapters),
            host_adapters=frozenset(hb.resident_adapters) - frozenset(hb.gpu_adapters),
            max_lora_rank=hb.max_lora_rank,
            max_running=hb.max_num_seqs or 2**31,
            free_kv_tokens=max(0, hb.free_kv_blocks * hb.block_size - placed_tokens),
            slo_ttft_s=hb.slo_ttft_s or math.inf,
        )


class WorkerRegistry:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout  # seconds of silence after which a worker is lost
        self.workers: dict[str, WorkerState] = {}
        self._bad_models: set[str] = set()  # workers whose model we already warned about

    def update(self, heartbeat: WorkerHeartbeat, now: float) -> bool:
        """Record a heartbeat; True if the worker is new."""
        new = heartbeat.worker_id not in self.workers
        self.workers[heartbeat.worker_id] = WorkerState(heartbeat, now, self._model_of(heartbeat))
        return new

    def _model_of(self, heartbeat: WorkerHeartbeat) -> PerfModel | None:
        if heartbeat.perf_model is None:
            return None
        previous = self.workers.get(heartbeat.worker_id)
        if previous is not None and previous.model is not None and previous.heartbeat.perf_model == heartbeat.perf_model:
            return previous.model
        try:
            return PerfModel.from_dict(heartbeat.perf_model)
        except PerfModelError as exc:
            if heartbeat.worker_id not in self._bad_models:
                self._bad_models.add(heartbeat.worker_id)
                log.warning("worker %s sent an unusable performance model (%s); placing there by load only",
                            heartbeat.worker_id, exc)
            return None

    def expire(self, now: float) -> list[str]:
        """Forget and return the workers silent for longer than `timeout`."""
        lost = [wid for wid, w in self.workers.items() if now - w.last_seen > self.timeout]
        for wid in lost:
            del self.workers[wid]
        return lost

    def remove(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def ready(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.heartbeat.ready]


class RankTooHighError(ValueError):
    """No worker of the mesh takes an adapter of this rank."""


class Placer:
    """The live placement: `policy` (a name from policies.POLICY_NAMES) over the ready workers' views."""

    def __init__(self, policy: str = "rank_aware", seed: int | None = None) -> None:
        self.policy = make_policy(policy, seed or 0)
        self.by_load = self.policy if policy == "most_idle" else make_policy("most_idle")

    def observe(self, heartbeat: WorkerHeartbeat) -> None:
        """Feed the output lengths a worker reports (the policy's expected-output-length averages)."""
        for adapter, tokens in heartbeat.finished:
            self.policy.observe_finish(adapter or None, tokens)

    def choose(self, request: GenerateRequest, rank: int, workers: list[WorkerState]) -> WorkerState:
        """The worker for `request` (its adapter has LoRA rank `rank`, 0 for the base model); it is counted there
        until that worker's next heartbeat. NoWorkerError if none is ready; RankTooHighError if none takes it."""
        if not workers:
            raise NoWorkerError("no GPU worker is ready; retry shortly")
        bases = {w.heartbeat.model for w in workers}
        # `model` names a base model or an adapter; adapters fit every worker of the mesh's one base model
        base_request = request.model in bases
        candidates = [w for w in workers if w.heartbeat.model == request.model] if base_request else workers
        largest = max(w.heartbeat.max_lora_rank for w in candidates)
        if rank > largest:
            raise RankTooHighError(f"adapter {request.model!r} has LoRA rank {rank}; the workers take at most {largest}")
        view = RequestView(request.request_id, None if base_request else request.model, rank,
                           request.prompt_tokens_hint(), request.max_tokens_hint())
        policy = self.policy if all(w.model is not None for w in candidates) else self.by_load
        chosen_id = policy.choose(view, [w.view() for w in candidates]).worker_id
        chosen = next(w for w in candidates if w.worker_id == chosen_id)
        chosen.placed.append(view)
        return chosen
