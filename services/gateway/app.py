"""The gateway's HTTP API (aiohttp): OpenAI-compatible inference routes, models, probes; adapter admin in admin.py.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}], GET /healthz, GET /readyz,
and /v1/adapters* (services/gateway/admin.py). Middlewares, outermost first: a tracing span per request (NATS
messages sent inside it carry its context), OpenAI-shaped error bodies for every failure ({"error": {message,
type, param, code}}, unknown routes and aiohttp's own 413 included), then the Bearer-key checks (auth.py).

A generation request holds one of `max_pending` slots from parsing to its last byte; beyond that it gets 429 at
once (no queue). Errors before the first byte are JSON error responses with their status; once a stream has
started, an error is one SSE event `data: {"error": ...}` followed by `data: [DONE]`.
"""
from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Any

from aiohttp import web
from opentelemetry.trace import SpanKind

from services.adapter_store.client import list_adapters
from services.gateway import admin
from services.gateway.auth import ADMIN_PREFIX, auth_middleware
from services.gateway.mesh_link import GatewayMesh
from shared import telemetry
from shared.mesh_config import MeshConfig
from shared.nats_client import MeshError
from shared.openai_protocol import (
    SSE_DONE, LogprobItem, OpenAIError, ParsedRequest, chat_completion_chunk, chat_completion_response,
    completion_chunk, completion_response, make_id, model_not_found, now, parse_chat_request,
    parse_completion_request, sse_event, usage_chunk,
)
from shared.protocol import AdapterInfo, ErrorReply, TokenChunk

log = logging.getLogger(__name__)

MESH = web.AppKey("mesh", GatewayMesh)
CONFIG = web.AppKey("config", MeshConfig)
MAX_JSON_BYTES = 4 * 2**20  # largest JSON request body; below NATS's 8 MiB message limit once re-encoded


class PendingLimit:
    """Counts generation requests in flight; `try_acquire` is False at the limit (the caller answers 429)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class TooManyPending(OpenAIError):
    """429 with Retry-After: the gateway holds max_pending requests already."""

    def __init__(self) -> None:
        super().__init__("too many requests in flight at this gateway; retry shortly", status=429,
                         type="rate_limit_exceeded", code="too_many_pending_requests")
        self.headers = {"Retry-After": "1"}


PENDING = web.AppKey("pending", PendingLimit)


# ---------------------------------------------------------------- errors


def error_body(reply: ErrorReply) -> dict[str, Any]:
    return {"error": {"message": reply.message, "type": reply.type, "param": reply.param, "code": reply.code}}


def error_response(exc: OpenAIError | MeshError, headers: dict[str, str] | None = None) -> web.Response:
    if isinstance(exc, MeshError):
        return web.json_response(error_body(exc.reply), status=exc.reply.status, headers=headers)
    return web.json_response(exc.to_dict(), status=exc.status, headers=headers)


def _http_error(request: web.Request, exc: web.HTTPException) -> OpenAIError:
    if exc.status == 404:
        return OpenAIError(f"no route {request.method} {request.path}", status=404, code="not_found")
    if exc.status == 405:
        return OpenAIError(f"method {request.method} is not allowed on {request.path}", status=405,
                           code="method_not_allowed")
    if exc.status == 413:
        code = "upload_too_large" if request.path.startswith(ADMIN_PREFIX) else "request_too_large"
        return OpenAIError(f"the request body is too large: {exc.text or exc.reason}", status=413, code=code)
    kind = "invalid_request_error" if exc.status < 500 else "api_error"
    return OpenAIError(exc.text or exc.reason, status=exc.status, type=kind)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure as an OpenAI-shaped JSON error."""
    try:
        return await handler(request)
    except (OpenAIError, MeshError) as exc:
        return error_response(exc, headers=getattr(exc, "headers", None))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_http_error(request, exc), headers={k: v for k, v in exc.headers.items()
                                                                    if k.lower() in ("allow", "retry-after")})
    except Exception as exc:  # a bug must answer 500, not drop the connection
        log.exception("%s %s failed", request.method, request.path)
        return error_response(OpenAIError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                          type="api_error"))


@web.middleware
async def tracing_middleware(request: web.Request, handler) -> web.StreamResponse:
    """One span per HTTP request, continuing the caller's trace when it sent a traceparent header."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    parent = telemetry.extract({k.lower(): v for k, v in request.headers.items()})
    tracer = telemetry.tracer("caraserve.gateway")
    with tracer.start_as_current_span(f"{request.method} {route}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"http.method": request.method, "http.route": route}) as span:
        response = await handler(request)
        span.set_attribute("http.status_code", response.status)
        return response


# ---------------------------------------------------------------- generation


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()  # bounded by client_max_size (413 beyond)
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise OpenAIError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _items(chunk: TokenChunk) -> list[LogprobItem]:
    return [LogprobItem(lp.token, lp.logprob, [tuple(t) for t in lp.top]) for lp in chunk.logprobs or []]


def _check_finish(chunk: TokenChunk) -> None:
    if chunk.finished and chunk.finish_reason == "abort":
        raise MeshError.of(503, "the request was aborted by the worker", "service_unavailable", "request_aborted")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat_request(await _json_body(request)))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion_request(await _json_body(request)))


async def _generate(request: web.Request, parsed: ParsedRequest) -> web.StreamResponse:
    pending = request.app[PENDING]
    if not pending.try_acquire():
        raise TooManyPending()
    try:
        async with aclosing(request.app[MESH].generate(parsed)) as chunks:
            first = await anext(chunks)  # placement and prompt errors surface here, before any byte is sent
            if parsed.stream:
                return await _stream(request, parsed, first, chunks)
            return await _complete(parsed, first, chunks)
    except StopAsyncIteration:
        raise MeshError.of(502, "the worker ended the stream without a result", "api_error") from None
    finally:
        pending.release()


def server_timing(chunk: TokenChunk) -> dict[str, str]:
    """The Server-Timing header for a response whose headers go out with `chunk` (a stream: its first chunk; a
    complete answer: its last): the worker's engine time (TokenChunk.engine_s) so far, in ms. The rest of the
    latency the client sees is transport and service code (bench/mesh_overhead.py measures it this way)."""
    return {"Server-Timing": f'engine;dur={chunk.engine_s * 1000:.3f};desc="engine steps since admission"'}


async def _complete(parsed: ParsedRequest, first: TokenChunk, chunks) -> web.Response:
    """A non-streaming answer: gather every chunk, then build the response as run_batch does."""
    collected = [first]
    if not first.finished:
        async for chunk in chunks:
            collected.append(chunk)
    last = collected[-1]
    _check_finish(last)
    chat = parsed.kind == "chat"
    build = chat_completion_response if chat else completion_response
    body = build(
        request_id=make_id("chatcmpl" if chat else "cmpl"), model=parsed.model, created=now(),
        text="".join(c.text for c in collected), finish_reason=last.finish_reason,
        prompt_tokens=max(c.prompt_tokens for c in collected), completion_tokens=last.completion_tokens,
        logprobs=[it for c in collected for it in _items(c)] if parsed.logprobs else None,
    )
    return web.json_response(body, headers=server_timing(last))


class _SSEBuilder:
    """The SSE events of one streamed response, chunk by chunk (chat and completions shapes)."""

    def __init__(self, parsed: ParsedRequest) -> None:
        self.parsed = parsed
        self.chat = parsed.kind == "chat"
        self.common = {"request_id": make_id("chatcmpl" if self.chat else "cmpl"), "model": parsed.model,
                       "created": now()}
        self.text_offset = 0  # completions: where the next logprob token starts in the completion
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def opening(self) -> list[bytes]:
        if not self.chat:
            return []
        return [sse_event(chat_completion_chunk(role="assistant", content="",
                                                include_usage=self.parsed.include_usage, **self.common))]

    def events(self, chunk: TokenChunk) -> list[bytes]:
        _check_finish(chunk)
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        items = _items(chunk) if self.parsed.logprobs else None
        usage_null = self.parsed.include_usage
        events = []
        if self.chat:
            if chunk.text or items:
                events.append(sse_event(chat_completion_chunk(content=chunk.text, logprobs=items,
                                                              include_usage=usage_null, **self.common)))
            if chunk.finished:
                events.append(sse_event(chat_completion_chunk(finish_reason=chunk.finish_reason,
                                                              include_usage=usage_null, **self.common)))
        elif chunk.text or items or chunk.finished:
            events.append(sse_event(completion_chunk(
                text=chunk.text, finish_reason=chunk.finish_reason if chunk.finished else None, logprobs=items,
                text_offset=self.text_offset, include_usage=usage_null, **self.common)))
            self.text_offset += sum(len(it.token) for it in items or [])
        if chunk.finished and self.parsed.include_usage:
            events.append(sse_event(usage_chunk(chat=self.chat, prompt_tokens=self.prompt_tokens,
                                                completion_tokens=self.completion_tokens, **self.common)))
        return events


async def _stream(request: web.Request, parsed: ParsedRequest, first: TokenChunk, chunks) -> web.StreamResponse:
    """Server-sent events until [DONE]. A client that goes away ends it quietly; the caller cancels the request."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **server_timing(first)})
    await response.prepare(request)
    builder = _SSEBuilder(parsed)
    try:
        try:
            for event in builder.opening():
                await response.write(event)
            chunk = first
            while True:
                for event in builder.events(chunk):
                    await response.write(event)
                if chunk.finished:
                    break
                chunk = await anext(chunks)
        except MeshError as exc:
            await response.write(sse_event(error_body(exc.reply)))
        except StopAsyncIteration:
            await response.write(sse_event(error_body(ErrorReply(502, "the worker ended the stream without a result",
                                                                 "api_error"))))
        except ConnectionResetError:
            raise
        except Exception as exc:  # a bug after the headers went out: still end the stream properly
            log.exception("stream failed")
            await response.write(sse_event(error_body(ErrorReply(500, f"internal error: {type(exc).__name__}: {exc}",
                                                                 "api_error"))))
        await response.write(SSE_DONE)
        await response.write_eof()
    except ConnectionResetError:  # the client disconnected (aiohttp's ClientConnectionResetError included)
        log.info("client disconnected mid-stream")
    return response


# ---------------------------------------------------------------- models and probes


def _adapter_entry(info: AdapterInfo) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": int(info.created), "owned_by": "caraserve",
            "root": info.base_model, "parent": info.base_model, "rank": info.rank,
            "target_modules": list(info.target_modules)}


async def _model_entries(request: web.Request) -> list[dict[str, Any]]:
    mesh = request.app[MESH]
    config = request.app[CONFIG]
    entries = [{"id": base, "object": "model", "created": mesh.model_first_seen.get(base, now()),
                "owned_by": "caraserve", "root": base, "parent": None} for base in mesh.base_models()]
    try:
        adapters = await list_adapters(mesh.nc, timeout=config.request_timeout)
        mesh.adapters = {info.name: info for info in adapters}
    except MeshError as exc:  # the store is down: answer with the adapters this gateway knows of
        log.warning("cannot list adapters: %s", exc)
        adapters = sorted(mesh.adapters.values(), key=lambda info: info.name)
    return entries + [_adapter_entry(info) for info in adapters]


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": await _model_entries(request)})


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    for entry in await _model_entries(request):
        if entry["id"] == model:
            return web.json_response(entry)
    raise model_not_found(model)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when connected to NATS with at least one ready worker heard from recently; 503 with the reason."""
    mesh = request.app[MESH]
    if mesh.closing:
        reason = "the gateway is shutting down"
    elif not mesh.nc.is_connected:
        reason = "not connected to NATS"
    elif not mesh.ready_workers():
        reason = "no GPU worker is ready (no fresh heartbeat)"
    else:
        return web.json_response({"status": "ready", "workers": len(mesh.ready_workers()),
                                  "models": mesh.base_models()})
    raise OpenAIError(reason, status=503, type="service_unavailable", code="not_ready")


# ---------------------------------------------------------------- application


def build_app(mesh: GatewayMesh, config: MeshConfig) -> web.Application:
    app = web.Application(
        middlewares=[tracing_middleware, error_middleware, auth_middleware(config.api_key, config.admin_key)],
        client_max_size=MAX_JSON_BYTES,
    )
    app[MESH] = mesh
    app[CONFIG] = config
    app[PENDING] = PendingLimit(config.max_pending)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    admin.add_routes(app, mesh, config)
    return app
