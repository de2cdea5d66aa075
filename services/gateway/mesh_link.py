"""The gateway's side of the mesh: send GenerateRequests, receive their token streams, track workers and adapters.

One `GatewayMesh` per gateway process. Every request's TokenChunks arrive on one wildcard subscription,
`_INBOX.caraserve.<gateway_id>.*`, and are dispatched by request id to a per-request queue (`_Stream`). The
worker table is fed by WorkerHeartbeats; WorkerLost (from a scheduler) and a local watchdog (for a worker that
went silent, which works even with no scheduler running) end the streams of requests placed on a dead worker
with an ErrorReply. Adapter names are cached from AdapterEvents, with a lookup in the store on a miss.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.adapter_store.client import get_adapter
from shared.mesh_config import MeshConfig
from shared.nats_client import MeshError, publish, request, subscribe_handler, sync_with_server
from shared.openai_protocol import ParsedRequest, model_not_found
from shared.protocol import (
    SUBJECT_ADAPTER_EVENTS, SUBJECT_GATEWAY_HEARTBEAT, SUBJECT_GENERATE, SUBJECT_HEARTBEAT, SUBJECT_WORKER_LOST,
    AdapterEvent, AdapterInfo, CancelRequest, ErrorReply, GatewayHeartbeat, GenerateRequest, Placement, TokenChunk,
    WorkerHeartbeat, WorkerLost, worker_subject,
)
from shared.wire import ProtocolError, decode

log = logging.getLogger(__name__)

INBOX_PREFIX = "_INBOX.caraserve"


def worker_lost_error(reason: str) -> ErrorReply:
    return ErrorReply(503, f"the GPU worker running this request was lost: {reason}", "service_unavailable",
                      "worker_lost")


def request_lost_error(worker_id: str, silent_s: float) -> ErrorReply:
    return ErrorReply(503, f"GPU worker {worker_id} has not listed this request in its heartbeats for "
                           f"{silent_s:.1f}s (it restarted or dropped it); retry",
                      "service_unavailable", "request_lost")


@dataclass
class _Stream:
    """One request in flight: where its chunks go and which worker runs it (once the scheduler said)."""

    request_id: str
    queue: asyncio.Queue  # TokenChunk | ErrorReply, in arrival order
    worker_id: str | None = None  # from Placement, or from the first TokenChunk
    # placement, the latest chunk, or the latest heartbeat of its worker that listed it
    last_heard: float = field(default_factory=time.monotonic)
    ended: bool = False  # an ErrorReply was queued by the gateway itself (worker lost, shutdown)


@dataclass
class WorkerState:
    """What the gateway knows of one worker: its latest heartbeat and when it arrived."""

    heartbeat: WorkerHeartbeat
    last_seen: float  # time.monotonic() of the latest heartbeat


class GatewayMesh:
    """NATS plumbing of one gateway: `start()`, then `generate()` per request; `stop()` ends everything."""

    def __init__(self, nc: NATS, config: MeshConfig) -> None:
        self.nc = nc
        self.config = config
        self.gateway_id = uuid.uuid4().hex
        self.workers: dict[str, WorkerState] = {}
        self.adapters: dict[str, AdapterInfo] = {}  # registered adapters seen (events, lookups)
        self.model_first_seen: dict[str, int] = {}  # base model name -> time.time() first seen (for /v1/models)
        self._streams: dict[str, _Stream] = {}
        self._subs: list = []
        self._watchdog: asyncio.Task | None = None
        self._heartbeats: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.closing = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._subs.append(await self.nc.subscribe(f"{INBOX_PREFIX}.{self.gateway_id}.*", cb=self._on_inbox))
        # heartbeats (every worker, every second) and token chunks are too frequent to each get a span: plain
        # callbacks; the rare control messages go through subscribe_handler
        self._subs.append(await self.nc.subscribe(SUBJECT_HEARTBEAT, cb=self._on_heartbeat))
        self._subs.append(await subscribe_handler(self.nc, SUBJECT_WORKER_LOST, (WorkerLost,), self._on_worker_lost))
        self._subs.append(await subscribe_handler(self.nc, SUBJECT_ADAPTER_EVENTS, (AdapterEvent,),
                                                  self._on_adapter_event))
        self._watchdog = asyncio.create_task(self._watch_workers(), name="gateway-watchdog")
        self._heartbeats = asyncio.create_task(self._send_heartbeats(), name="gateway-heartbeats")
        await sync_with_server(self.nc)  # the server has the subscriptions before the first request goes out

    async def _send_heartbeats(self) -> None:
        """Tell the workers this gateway still reads its streams (they abort the requests of a silent one)."""
        while True:
            try:
                await publish(self.nc, SUBJECT_GATEWAY_HEARTBEAT,
                              GatewayHeartbeat(self.gateway_id, self.config.heartbeat_interval, len(self._streams)))
            except Exception as exc:  # reconnecting: the next one may go through
                log.debug("gateway heartbeat not sent: %s", exc)
            await asyncio.sleep(self.config.heartbeat_interval)

    def end_all(self, reason: str) -> None:
        """Refuse new requests and end every stream in flight with a 503 (the gateway is stopping)."""
        self.closing = True
        for stream in list(self._streams.values()):
            self._end(stream, ErrorReply(503, reason, "service_unavailable", "shutting_down"))

    async def stop(self) -> None:
        self.end_all("the gateway is shutting down")
        for task in (self._watchdog, self._heartbeats):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may already be closed
                log.debug("unsubscribe failed: %s", exc)
        self._subs.clear()

    # ------------------------------------------------------------ handlers

    async def _on_inbox(self, msg: Msg) -> None:
        try:
            message = decode(msg.data, TokenChunk, ErrorReply)
        except ProtocolError as exc:
            log.warning("malformed message on %s: %s", msg.subject, exc)
            return
        request_id = msg.subject.rsplit(".", 1)[-1]
        stream = self._streams.get(request_id)
        if stream is None or stream.ended:
            return  # a late chunk of a request that was cancelled or failed
        if isinstance(message, TokenChunk):
            stream.worker_id = stream.worker_id or message.worker_id
            stream.last_heard = time.monotonic()
        stream.queue.put_nowait(message)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, WorkerHeartbeat)
        except ProtocolError as exc:
            log.warning("malformed heartbeat: %s", exc)
            return
        now = time.monotonic()
        self.workers[hb.worker_id] = WorkerState(hb, now)
        for request_id in hb.request_ids or ():
            stream = self._streams.get(request_id)
            if stream is not None and stream.worker_id == hb.worker_id:
                stream.last_heard = now
        self.model_first_seen.setdefault(hb.model, int(time.time()))

    async def _on_worker_lost(self, msg: Msg, lost: WorkerLost) -> None:
        log.warning("worker %s lost: %s", lost.worker_id, lost.reason)
        self.workers.pop(lost.worker_id, None)
        self._fail_worker(lost.worker_id, lost.reason)

    async def _on_adapter_event(self, msg: Msg, event: AdapterEvent) -> None:
        if event.event == "registered":
            self.adapters[event.adapter.name] = event.adapter
        else:
            self.adapters.pop(event.adapter.name, None)

    def _fail_worker(self, worker_id: str, reason: str) -> None:
        for stream in list(self._streams.values()):
            if stream.worker_id == worker_id:
                self._end(stream, worker_lost_error(reason))

    def _end(self, stream: _Stream, error: ErrorReply) -> None:
        if not stream.ended:
            stream.ended = True
            stream.queue.put_nowait(error)

    async def _watch_workers(self) -> None:
        """End streams whose worker has been silent (no heartbeat, no chunk) for worker_timeout, or whose worker
        keeps sending heartbeats that do not list them (it restarted under the same id); forget silent workers."""
        timeout = self.config.worker_timeout
        while True:
            await asyncio.sleep(min(0.5, timeout / 4))
            now = time.monotonic()
            for stream in list(self._streams.values()):
                if stream.worker_id is None or stream.ended:
                    continue
                state = self.workers.get(stream.worker_id)
                heard = max(stream.last_heard, state.last_seen if state else 0.0)
                if now - heard > timeout:
                    self._end(stream, worker_lost_error(f"no heartbeat for {now - heard:.1f}s"))
                elif state is not None and state.heartbeat.request_ids is not None \
                        and now - stream.last_heard > timeout:
                    self._end(stream, request_lost_error(stream.worker_id, now - stream.last_heard))
            for worker_id, state in list(self.workers.items()):
                if now - state.last_seen > 10 * timeout:
                    del self.workers[worker_id]

    # ------------------------------------------------------------ workers and models

    def ready_workers(self) -> list[WorkerHeartbeat]:
        """Workers that sent a heartbeat within worker_timeout and accept requests."""
        now = time.monotonic()
        return [s.heartbeat for s in self.workers.values()
                if s.heartbeat.ready and now - s.last_seen <= self.config.worker_timeout]

    def base_models(self) -> list[str]:
        return sorted({hb.model for hb in self.ready_workers()})

    async def resolve_model(self, model: str) -> AdapterInfo | None:
        """None for a base model, the AdapterInfo for an adapter; MeshError 503 (no worker) or 404 (unknown)."""
        if self.closing:
            raise MeshError.of(503, "the gateway is shutting down", "service_unavailable", "shutting_down")
        bases = self.base_models()
        if not bases:
            raise MeshError.of(503, "no GPU worker is ready; try again shortly", "service_unavailable",
                               "no_workers")
        if model in bases:
            return None
        if model in self.adapters:
            return self.adapters[model]
        try:
            info = await get_adapter(self.nc, model, timeout=self.config.request_timeout)
        except MeshError as exc:
            if exc.reply.status == 404:
                raise _not_found(model) from None
            raise
        self.adapters[info.name] = info
        return info

    # ------------------------------------------------------------ generation

    def _inbox(self, request_id: str) -> str:
        return f"{INBOX_PREFIX}.{self.gateway_id}.{request_id}"

    async def generate(self, parsed: ParsedRequest) -> AsyncIterator[TokenChunk]:
        """Run one request on the mesh, yielding its TokenChunks until the finished one.

        MeshError when it cannot be placed or fails on the way (ErrorReply in the stream). Closing the iterator
        early (client went away) or cancelling the consumer sends CancelRequest to the worker.
        """
        await self.resolve_model(parsed.model)
        request_id = uuid.uuid4().hex
        req = GenerateRequest(
            request_id=request_id, kind=parsed.kind, model=parsed.model,
            sampling=dataclasses.asdict(parsed.params), reply_to=self._inbox(request_id),
            messages=parsed.messages, prompt=parsed.prompt, gateway_id=self.gateway_id, sent_at=time.time(),
        )
        stream = _Stream(request_id, asyncio.Queue())
        self._streams[request_id] = stream  # before sending: a fast worker may answer before the placement
        worker_done = False  # the worker ended the request itself (finished chunk or its ErrorReply)
        placing: asyncio.Task | None = asyncio.create_task(
            request(self.nc, SUBJECT_GENERATE, req, Placement, timeout=self.config.request_timeout))
        try:
            placement = await asyncio.shield(placing)
            placing = None
            stream.worker_id = placement.worker_id
            stream.last_heard = time.monotonic()
            while True:
                item = await stream.queue.get()
                if isinstance(item, ErrorReply):
                    worker_done = not stream.ended
                    raise MeshError(item)
                yield item
                if item.finished:
                    worker_done = True
                    return
        except MeshError:
            if placing is not None:  # the scheduler refused it or did not answer: nothing runs
                worker_done = True
            raise
        finally:
            self._streams.pop(request_id, None)
            if not worker_done:
                if placing is not None:  # cancelled while the scheduler was placing it: cancel once placed
                    self._cancel_when_placed(placing, request_id)
                elif stream.worker_id is not None:
                    await self._send_cancel(stream.worker_id, request_id)

    async def _send_cancel(self, worker_id: str, request_id: str) -> None:
        try:
            await publish(self.nc, worker_subject(worker_id, "cancel"), CancelRequest(request_id))
        except Exception as exc:  # the connection is gone: the worker will be lost too
            log.warning("cannot cancel request %s on %s: %s", request_id, worker_id, exc)

    def _cancel_when_placed(self, placing: asyncio.Task, request_id: str) -> None:
        async def wait_and_cancel() -> None:
            try:
                placement = await placing
            except Exception:  # MeshError: it was never placed
                return
            await self._send_cancel(placement.worker_id, request_id)

        task = asyncio.create_task(wait_and_cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _not_found(model: str) -> MeshError:
    error = model_not_found(model)
    return MeshError(ErrorReply(error.status, error.message, error.type, error.code, error.param))
