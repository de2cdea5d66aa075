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

from services.scheduler.placement import LeastLoadPolicy, NoWorkerError, WorkerRegistry
from shared.mesh_config import MeshConfig
from shared.nats_client import MeshError, publish, subscribe_handler
from shared.protocol import (
    SCHEDULER_QUEUE,
    SUBJECT_GENERATE,
    SUBJECT_HEARTBEAT,
    SUBJECT_WORKER_LOST,
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
        self.policy = LeastLoadPolicy()
        self._nc: NATS | None = None
        self._subs: list = []
        self._watchdog: asyncio.Task | None = None

    async def start(self, nc: NATS) -> None:
        self._nc = nc
        self._subs = [
            await subscribe_handler(nc, SUBJECT_HEARTBEAT, (WorkerHeartbeat,), self.on_heartbeat, span_name="heartbeat"),
            await subscribe_handler(nc, SUBJECT_GENERATE, (GenerateRequest,), self.on_generate,
                                    queue=SCHEDULER_QUEUE, span_name="scheduler.place"),
        ]
        self._watchdog = asyncio.create_task(self._watch_workers())
        await nc.flush()  # the server has the subscriptions: "started" means requests find us

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
            log.info("worker %s joined (%s on %s)", hb.worker_id, hb.model, hb.device)

    async def on_generate(self, msg, request: GenerateRequest) -> Placement:
        try:
            worker = self.policy.choose(request, self.registry.ready())
        except NoWorkerError as exc:
            raise MeshError.of(503, str(exc), "service_unavailable", "no_worker") from None
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


def serve_command(args) -> int:
    """`caraserve serve scheduler`."""
    from services.cli import mesh_config, run_mesh_service

    config = mesh_config(args)
    return run_mesh_service(lambda: SchedulerService(config), config, "scheduler")
