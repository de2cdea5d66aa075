"""The scheduler service: places each GenerateRequest on a GPU worker and notices workers that die.

Handlers: SUBJECT_HEARTBEAT (every replica hears every worker) and SUBJECT_GENERATE (queue group
SCHEDULER_QUEUE: replicas share requests). A request is forwarded unchanged to the chosen worker, and the gateway
gets a Placement so it knows where to send a cancel; tokens then flow worker -> gateway without the scheduler.
A watchdog declares a worker lost after `worker_timeout` seconds without a heartbeat and publishes WorkerLost,
so gateways end that worker's streams with an error while the mesh keeps serving on the others.
"""
from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS

from services.adapter_store.client import get_adapter
from services.scheduler.placement import NoWorkerError, Placer, RankTooHighError, WorkerRegistry
from shared.mesh_config import MeshConfig
from shared.nats_client import MeshError, publish, subscribe_handler, sync_with_server
from shared.protocol import (
    SCHEDULER_QUEUE,
    SUBJECT_ADAPTER_EVENTS,
    SUBJECT_GENERATE,
    SUBJECT_HEARTBEAT,
    SUBJECT_WORKER_LOST,
    AdapterEvent,
    GenerateRequest,
    Placement,
    WorkerHeartbeat,
    WorkerLost,
    worker_subject,
)

log = logging.getLogger(__name__)


class SchedulerService:
    name = "scheduler"

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.registry = WorkerRegistry(config.worker_timeout)
        self.placer = Placer(config.placement_policy)
        self._ranks: dict[str, int] = {}  # adapter -> LoRA rank (from the store; kept fresh by its events)
        self._nc: NATS | None = None
        self._subs: list = []
        self._watchdog: asyncio.Task | None = None

    async def start(self, nc: NATS) -> None:
        self._nc = nc
        self._subs = [
            await subscribe_handler(nc, SUBJECT_HEARTBEAT, (WorkerHeartbeat,), self.on_heartbeat, span_name="heartbeat"),
            await subscribe_handler(nc, SUBJECT_GENERATE, (GenerateRequest,), self.on_generate,
                                    queue=SCHEDULER_QUEUE, span_name="scheduler.place"),
            await subscribe_handler(nc, SUBJECT_ADAPTER_EVENTS, (AdapterEvent,), self.on_adapter_event,
                                    span_name="scheduler.adapter_event"),
        ]
        self._watchdog = asyncio.create_task(self._watch_workers())
        await sync_with_server(nc)  # the server has the subscriptions: "started" means requests find us

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs = []
        if self._watchdog:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)

    # ---- handlers ----
    async def on_heartbeat(self, msg, hb: WorkerHeartbeat) -> None:
        if self.registry.update(hb, time.monotonic()):
            log.info("worker %s joined (%s on %s%s)", hb.worker_id, hb.model, hb.device,
                     "" if hb.perf_model else "; no performance model: placed by load only")
        self.placer.observe(hb)

    async def on_adapter_event(self, msg, event: AdapterEvent) -> None:
        if event.event == "registered":
            self._ranks[event.adapter.name] = event.adapter.rank
        else:
            self._ranks.pop(event.adapter.name, None)

    async def _rank_of(self, request: GenerateRequest) -> int:
        """The LoRA rank of the request's model: 0 for a base model, else the adapter's (asked of the store once)."""
        if any(w.heartbeat.model == request.model for w in self.registry.workers.values()):
            return 0
        rank = self._ranks.get(request.model)
        if rank is None:
            try:
                rank = (await get_adapter(self._nc, request.model, timeout=self.config.request_timeout)).rank
            except MeshError as exc:
                if exc.reply.status == 404:
                    raise MeshError.of(404, f"The model `{request.model}` does not exist or you do not have access "
                                            "to it.", code="model_not_found", param="model") from None
                log.warning("rank of %s unknown (%s); placing it as rank 0", request.model, exc.reply.message)
                return 0
            self._ranks[request.model] = rank
        return rank

    async def on_generate(self, msg, request: GenerateRequest) -> Placement:
        rank = await self._rank_of(request) if self.registry.ready() else 0
        try:
            worker = self.placer.choose(request, rank, self.registry.ready())
        except NoWorkerError as exc:
            raise MeshError.of(503, str(exc), "service_unavailable", "no_worker") from None
        except RankTooHighError as exc:
            raise MeshError.of(400, str(exc), code="adapter_rank_too_high", param="model") from None
        worker_id = worker.heartbeat.worker_id
        await publish(self._nc, worker_subject(worker_id, "generate"), request)
        return Placement(request.request_id, worker_id)

    # ---- dead workers ----
    async def _watch_workers(self) -> None:
        period = min(0.5, self.config.worker_timeout / 4)
        while True:
            await asyncio.sleep(period)
            for worker_id in self.registry.expire(time.monotonic()):
                reason = f"no heartbeat for {self.config.worker_timeout:g}s"
                log.warning("worker %s lost: %s", worker_id, reason)
                await publish(self._nc, SUBJECT_WORKER_LOST, WorkerLost(worker_id, reason))


def check_placement_policy(config: MeshConfig) -> None:
    """CLIError (one line) unless config.placement_policy names a policy (`serve scheduler` and `up` check it)."""
    from services.cli import CLIError
    from services.scheduler.policies import POLICY_NAMES

    if config.placement_policy not in POLICY_NAMES:
        raise CLIError(f"--placement-policy must be one of {', '.join(POLICY_NAMES)}, got {config.placement_policy!r}")


def serve_command(args) -> int:
    """`caraserve serve scheduler`."""
    from services.cli import mesh_config, run_mesh_service

    config = mesh_config(args)
    check_placement_policy(config)
    return run_mesh_service(lambda: SchedulerService(config), config, "scheduler")
