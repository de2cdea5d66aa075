"""The gateway service: the OpenAI-compatible HTTP front door of the mesh (`caraserve serve gateway`).

`GatewayService.start(nc)` joins the mesh (services/gateway/mesh_link.py) and serves the HTTP API
(services/gateway/app.py) on config.host:config.port; `.port` is the port actually bound (config.port may be 0).
`stop()` stops accepting connections, ends every stream in flight with an error event (and cancels its request
on the worker), waits briefly for the handlers to finish and leaves the mesh.
"""
from __future__ import annotations

import argparse
import errno
import logging

from aiohttp import web
from aiohttp.web_log import AccessLogger
from nats.aio.client import Client as NATS

from services.gateway.app import build_app
from services.gateway.mesh_link import GatewayMesh
from shared.mesh_config import MeshConfig

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 5.0  # seconds handlers get to finish once their streams were ended


class ProbeQuietAccessLogger(AccessLogger):
    """aiohttp's access log without the repeated /healthz and /readyz polls (orchestrators, and `caraserve up`
    while a worker loads, poll every second): a probe is logged only when its status differs from the previous
    poll's, so "became unready" and "ready again" still show, and a successful first poll does not."""

    # aiohttp makes a logger per connection and probes often come on fresh connections: the last status seen is
    # kept per process (one gateway per process), by probe path
    _last_status = {"/healthz": 200, "/readyz": 200}

    def log(self, request, response, time: float) -> None:
        if request.path in self._last_status:
            if self._last_status[request.path] == response.status:
                return
            self._last_status[request.path] = response.status
        super().log(request, response, time)


class GatewayService:
    name = "gateway"

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.mesh: GatewayMesh | None = None
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, nc: NATS) -> None:
        self.mesh = GatewayMesh(nc, self.config)
        await self.mesh.start()
        # handler_cancellation: a client that disconnects cancels its handler, so its request is cancelled
        # on the worker at once instead of at the next token written
        self.runner = web.AppRunner(build_app(self.mesh, self.config), handler_cancellation=True,
                                    shutdown_timeout=SHUTDOWN_TIMEOUT, access_log_class=ProbeQuietAccessLogger)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"port {self.config.port} is already in use on {self.config.host}: "
                                         "stop what uses it or pass --port") from None
            raise OSError(exc.errno, f"cannot listen on {self.config.host}:{self.config.port}: "
                                     f"{exc.strerror or exc}") from None
        self.port = self.runner.addresses[0][1]
        if self.config.api_key is None:
            log.warning("no API key configured (--api-key / CARASERVE_API_KEY): /v1 inference routes are open "
                        "to anyone who can reach %s:%d", self.config.host, self.port)
        log.info("gateway %s listening on http://%s:%d", self.mesh.gateway_id, self.config.host, self.port)

    async def stop(self) -> None:
        if self.mesh is not None:
            self.mesh.end_all("the gateway is shutting down")  # streaming handlers write their error and end
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None


def serve_command(args: argparse.Namespace) -> int:
    """`caraserve serve gateway`."""
    from services.cli import mesh_config, run_mesh_service

    config = mesh_config(args)
    return run_mesh_service(lambda: GatewayService(config), config, "gateway")
