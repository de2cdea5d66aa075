"""How every mesh service process runs: logging, tracing, NATS, signals, and a clean stop.

A service is a class with `name`, `async start(nc)` (subscribe its handlers, start its loops) and `async stop()`
(stop taking work, finish or fail what is in flight, free resources), and optionally `crashed`, an asyncio.Event it
sets when a loop it cannot serve without has failed. `run_service` wraps one in a process: on SIGTERM or SIGINT it
calls `stop()`, drains the NATS connection and returns exit code 0; when `crashed` is set, the same but exit code
1, so a supervisor (`caraserve up`, compose's restart policy) starts a fresh process. A signal during `build`
(slow: a worker loads and may profile its model) sets `shutdown_requested`; long start-up work polls it and raises
StartupCancelled, and the process exits 0 without starting.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Protocol

from nats.aio.client import Client as NATS

from shared import telemetry
from shared.mesh_config import MeshConfig
from shared.nats_client import connect, redact

log = logging.getLogger(__name__)
# set on SIGTERM/SIGINT; `build` runs on another thread, so this is a threading.Event it can poll
shutdown_requested = threading.Event()


class StartupCancelled(Exception):
    """Raised by a service's `build` that saw shutdown_requested: the process stops before it starts."""


class MeshService(Protocol):
    name: str

    async def start(self, nc: NATS) -> None: ...

    async def stop(self) -> None: ...


def setup_logging(service: str, level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s", force=True,
    )


def run_service(build: Callable[[], MeshService], config: MeshConfig, name: str) -> int:
    """Run one service until SIGTERM/SIGINT; 0 on a clean stop. `build` may be slow (it loads the model)."""
    setup_logging(name, config.log_level)
    telemetry.setup_tracing(f"caraserve-{name}", config.trace_exporter)
    return asyncio.run(_serve(build, config, name))


async def _serve(build: Callable[[], MeshService], config: MeshConfig, name: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    shutdown_requested.clear()

    def on_signal() -> None:
        shutdown_requested.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        service = await asyncio.to_thread(build)
    except StartupCancelled as exc:
        log.info("%s stopped while starting: %s", name, exc)
        return 0
    if stop.is_set():
        return 0
    # NATS may not be up yet (compose starts everything at once): keep trying, but stop on SIGTERM meanwhile
    connecting = asyncio.create_task(connect(config.nats_url, f"caraserve-{name}"))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        log.info("%s stopped before NATS was reachable", name)
        return 0
    stopping.cancel()
    nc = connecting.result()
    log.info("connected to %s", redact(config.nats_url))
    crashed: asyncio.Event | None = getattr(service, "crashed", None)
    code = 0
    try:
        await service.start(nc)
        log.info("%s ready", name)
        waits = [asyncio.create_task(event.wait()) for event in (stop, crashed) if event is not None]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if crashed is not None and crashed.is_set() and not stop.is_set():
            log.error("%s failed; stopping with exit code 1", name)
            code = 1
        else:
            log.info("%s stopping", name)
    finally:
        await service.stop()
        if not nc.is_closed:
            try:
                await nc.drain()
            except Exception as exc:  # NATS went away first: nothing left to flush
                log.warning("NATS drain failed (%s); closing", type(exc).__name__)
                await nc.close()
    log.info("%s stopped", name)
    return code
