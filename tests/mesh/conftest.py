"""The whole mesh in one test process: a real nats-server and the real adapter_store, scheduler, gpu_worker and
gateway services, each with its own NATS connection as separate processes would have. (`caraserve up` with
real processes is tested in tests/test_up.py.)"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from services.adapter_store.service import AdapterStoreService
from services.adapter_store.store import AdapterStore
from services.gateway.service import GatewayService
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.service import GpuWorkerService
from services.scheduler.service import SchedulerService
from shared.demo_adapters import DEMO_ADAPTERS, demo_adapter_path
from shared.mesh_config import MeshConfig
from shared.nats_client import connect

from helpers.http import wait_ready

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"


def engine_config(model_path) -> EngineConfig:
    return EngineConfig(model=str(model_path), max_num_seqs=16, num_kv_blocks=256, max_loras=4)


@pytest.fixture(scope="module")
def mesh_engine(default_model_path):
    """The worker's engine (module-wide: loading it is the slow part)."""
    return LLMEngine(engine_config(default_model_path))


@pytest.fixture(scope="module")
def reference_engine(default_model_path):
    """A second engine with the demo adapters loaded from disk: the offline outputs the mesh must reproduce."""
    engine = LLMEngine(engine_config(default_model_path))
    for name in DEMO_ADAPTERS:
        engine.load_adapter(name, demo_adapter_path(name))
    return engine


@dataclass
class Mesh:
    config: MeshConfig
    engine: LLMEngine
    gateway: GatewayService
    worker: GpuWorkerService | None = None
    connections: list = field(default_factory=list)
    services: list = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    async def start(self, service):
        nc = await connect(self.config.nats_url, f"test-{service.name}")
        await service.start(nc)
        self.connections.append(nc)
        self.services.append(service)
        return nc

    async def start_worker(self, worker_id: str = "w1") -> GpuWorkerService:
        self.worker = GpuWorkerService(self.engine, self.config, worker_id)
        await self.start(self.worker)
        return self.worker

    async def crash_worker(self) -> None:
        """What the mesh sees when a worker process dies: its heartbeats and messages stop at once."""
        worker = self.worker
        nc = self.connections[self.services.index(worker)]
        for task in worker._tasks:
            task.cancel()
        await asyncio.gather(*worker._tasks, return_exceptions=True)
        await nc.close()
        self.services.remove(worker)
        self.connections.remove(nc)
        for request_id in list(self.engine._seqs):  # a new process would start with an empty engine
            self.engine.abort(request_id)
        self.engine.step()
        self.worker = None

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await wait_ready(self.base_url, timeout)


@pytest.fixture
async def mesh(nats_server, mesh_engine):
    config = MeshConfig(nats_url=nats_server.url, port=0, api_key=API_KEY, admin_key=ADMIN_KEY,
                        heartbeat_interval=0.2, worker_timeout=1.0, request_timeout=10.0)
    m = Mesh(config, mesh_engine, GatewayService(config))
    await m.start(AdapterStoreService(AdapterStore(mesh_engine.base_shape, mesh_engine.model_name, 256)))
    await m.start(SchedulerService(config))
    await m.start_worker()
    await m.start(m.gateway)
    await m.wait_ready()
    yield m
    for service, nc in reversed(list(zip(m.services, m.connections))):
        await service.stop()
        await nc.close()
