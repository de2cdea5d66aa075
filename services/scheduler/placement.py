"""Where a request runs: the workers the scheduler knows of (from heartbeats) and the placement policy.

Synchronous and free of NATS and asyncio, so it is tested directly. `WorkerRegistry` keeps each worker's last
heartbeat and when it came; `expire` returns the workers that have been silent too long. `LeastLoadPolicy`
sends a request to the ready worker with the fewest requests, counting those placed since its last heartbeat
(a burst must not all land on the worker that looked idle a second ago). Rank-aware placement replaces the
policy later; the registry stays.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.protocol import GenerateRequest, WorkerHeartbeat


@dataclass
class WorkerState:
    heartbeat: WorkerHeartbeat
    last_seen: float  # monotonic time of the last heartbeat
    placed_since: int = 0  # requests placed on it since that heartbeat (not yet in its counts)

    @property
    def load(self) -> int:
        hb = self.heartbeat
        return hb.running + hb.queued + self.placed_since


class WorkerRegistry:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout  # seconds of silence after which a worker is lost
        self.workers: dict[str, WorkerState] = {}

    def update(self, heartbeat: WorkerHeartbeat, now: float) -> bool:
        """Record a heartbeat; True if the worker is new."""
        new = heartbeat.worker_id not in self.workers
        self.workers[heartbeat.worker_id] = WorkerState(heartbeat, now)
        return new

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


class NoWorkerError(LookupError):
    """No ready worker can take the request (the message says why)."""


class LeastLoadPolicy:
    """Fewest requests first; among equals, one that already holds the adapter, then the most free KV blocks."""

    def choose(self, request: GenerateRequest, workers: list[WorkerState]) -> WorkerState:
        if not workers:
            raise NoWorkerError("no GPU worker is ready; retry shortly")
        bases = {w.heartbeat.model for w in workers}
        # `model` names a base model or an adapter; adapters fit every worker of the mesh's one base model
        candidates = [w for w in workers if w.heartbeat.model == request.model] if request.model in bases else workers

        def key(w: WorkerState):
            hb = w.heartbeat
            return (w.load, request.model not in hb.resident_adapters, -hb.free_kv_blocks, hb.worker_id)

        chosen = min(candidates, key=key)
        chosen.placed_since += 1
        return chosen
