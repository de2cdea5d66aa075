"""A service process told to stop while it is still building (a worker loading or profiling its model) exits 0 at
once instead of finishing its start-up first."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

from shared import service_runtime
from shared.mesh_config import MeshConfig


def test_a_signal_during_build_stops_the_service_before_it_starts():
    seen = []

    def build():
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        seen.append(service_runtime.shutdown_requested.wait(10))  # long start-up work polls this
        raise service_runtime.StartupCancelled("told to stop")

    start = time.monotonic()
    config = MeshConfig(nats_url="nats://127.0.0.1:9")  # never reached: the service stops before connecting
    assert asyncio.run(service_runtime._serve(build, config, "test")) == 0
    assert seen == [True] and time.monotonic() - start < 5


class _CrashingService:
    """Starts, then fails a loop it cannot serve without (what the worker does when its engine step raises)."""

    name = "crashing"

    def __init__(self) -> None:
        self.crashed = asyncio.Event()
        self.stopped = False

    async def start(self, nc) -> None:
        asyncio.get_running_loop().call_later(0.1, self.crashed.set)

    async def stop(self) -> None:
        self.stopped = True


def test_a_service_that_crashes_is_stopped_and_exits_1(nats_server):
    service = _CrashingService()
    config = MeshConfig(nats_url=nats_server.url)
    assert asyncio.run(service_runtime._serve(lambda: service, config, "crashing")) == 1
    assert service.stopped
