"""The gateway's HTTP API against a real embedded nats-server, with a scripted stand-in for scheduler and worker.

`ScriptedWorker` is a TEST DOUBLE, not a worker: it plays the scheduler (answers GenerateRequest with a
Placement) and one GPU worker (heartbeats, scripted TokenChunks to the request's reply_to, records
CancelRequests), so the gateway's behaviour can be checked token by token without a model. Happy paths go
through the official `openai` client; raw checks use aiohttp.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from nats.aio.msg import Msg

from services.gateway.service import GatewayService
from shared.mesh_config import MeshConfig
from shared.nats_client import connect, publish, respond, sync_with_server
from shared.protocol import (
    SCHEDULER_QUEUE, SUBJECT_GENERATE, SUBJECT_HEARTBEAT, SUBJECT_WORKER_LOST, CancelRequest, ErrorReply,
    GenerateRequest, Placement, TokenChunk, TokenLogprobs, WorkerHeartbeat, WorkerLost, worker_subject,
)
from shared.wire import decode

from helpers.http import wait_ready

DEMO = Path(__file__).resolve().parents[2] / "shared" / "demo_adapters"
BASE = "SmolLM2-135M-Instruct"
API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
HANG = "HANG"  # plan step: send nothing more until the request is cancelled
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class ScriptedWorker:
    """TEST DOUBLE playing scheduler + one GPU worker. `plan` lists, per request, the steps to send:
    a str is one token chunk, ("finish", reason) the last chunk, an ErrorReply ends the stream with it,
    a float sleeps, HANG waits for the CancelRequest."""

    def __init__(self, nc, worker_id: str = "worker-1", model: str = BASE, interval: float = 0.2) -> None:
        self.nc = nc
        self.worker_id = worker_id
        self.model = model
        self.interval = interval
        self.plan: list[Any] = ["Hello", " world", "!", ("finish", "stop")]
        self.requests: list[GenerateRequest] = []
        self.headers: list[dict] = []
        self.cancels: asyncio.Queue[CancelRequest] = asyncio.Queue()
        self.received = asyncio.Event()  # set at each GenerateRequest
        self._cancelled: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self._subs: list = []
        self._beating: asyncio.Task | None = None

    async def start(self) -> ScriptedWorker:
        self._subs.append(await self.nc.subscribe(SUBJECT_GENERATE, queue=SCHEDULER_QUEUE, cb=self._on_generate))
        self._subs.append(await self.nc.subscribe(worker_subject(self.worker_id, "cancel"), cb=self._on_cancel))
        await self.heartbeat()
        self._beating = asyncio.create_task(self._beat())
        await sync_with_server(self.nc)
        return self

    async def heartbeat(self) -> None:
        await publish(self.nc, SUBJECT_HEARTBEAT, WorkerHeartbeat(
            worker_id=self.worker_id, model=self.model, base_fingerprint="f" * 16, max_model_len=2048,
            max_lora_rank=64, running=0, queued=0, running_ranks=[], resident_adapters=[], free_kv_blocks=100,
            total_kv_blocks=100, interval_s=self.interval))
        await sync_with_server(self.nc)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.heartbeat()

    def stop_heartbeats(self) -> None:
        if self._beating is not None:
            self._beating.cancel()

    async def stop(self) -> None:
        self.stop_heartbeats()
        for task in self._tasks:
            task.cancel()
        for sub in self._subs:
            await sub.unsubscribe()

    async def _on_generate(self, msg: Msg) -> None:
        req = decode(msg.data, GenerateRequest)
        self.requests.append(req)
        self.headers.append(dict(msg.headers or {}))
        self._cancelled[req.request_id] = asyncio.Event()
        await respond(self.nc, msg, Placement(req.request_id, self.worker_id))
        self._tasks.append(asyncio.create_task(self._play(req, list(self.plan))))
        self.received.set()

    async def _on_cancel(self, msg: Msg) -> None:
        cancel = decode(msg.data, CancelRequest)
        self._cancelled.get(cancel.request_id, asyncio.Event()).set()
        await self.cancels.put(cancel)

    async def _play(self, req: GenerateRequest, plan: list[Any]) -> None:
        generated = 0
        want = req.sampling.get("logprobs")
        top = req.sampling.get("top_logprobs", 0)
        for step in plan:
            if step == HANG:
                await self._cancelled[req.request_id].wait()
                return
            if isinstance(step, float):
                await asyncio.sleep(step)
                continue
            if isinstance(step, ErrorReply):
                await publish(self.nc, req.reply_to, step)
                return
            finished = isinstance(step, tuple)
            text = "" if finished else step
            generated += 0 if finished else 1
            logprobs = None
            if want and not finished:
                logprobs = [TokenLogprobs(text, -0.25, [(text, -0.25), ("alt", -2.0)][:top])]
            await publish(self.nc, req.reply_to, TokenChunk(
                request_id=req.request_id, worker_id=self.worker_id, text=text, num_tokens=0 if finished else 1,
                finished=finished, finish_reason=step[1] if finished else None, logprobs=logprobs,
                prompt_tokens=5, completion_tokens=generated))


# ---------------------------------------------------------------- harness


class Mesh:
    """A NATS client connection plus the gateways, scripted workers and stores a test starts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conns: list = []
        self.gateways: list[GatewayService] = []
        self.workers: list[ScriptedWorker] = []
        self.stores: list = []

    async def conn(self, name: str):
        nc = await connect(self.url, name)
        self.conns.append(nc)
        return nc

    async def gateway(self, **overrides: Any) -> GatewayService:
        settings = dict(port=0, api_key=API_KEY, admin_key=ADMIN_KEY, heartbeat_interval=0.2, worker_timeout=1.5,
                        request_timeout=5.0, max_upload_mb=5.0)
        settings.update(overrides)
        gateway = GatewayService(MeshConfig(**settings))
        await gateway.start(await self.conn("gateway"))
        self.gateways.append(gateway)
        return gateway

    async def worker(self, **kwargs: Any) -> ScriptedWorker:
        worker = await ScriptedWorker(await self.conn("scripted-worker"), **kwargs).start()
        self.workers.append(worker)
        return worker

    async def close(self) -> None:
        for worker in self.workers:
            await worker.stop()
        for gateway in self.gateways:
            await gateway.stop()
        for store in self.stores:
            await store.stop()
        for nc in self.conns:
            if not nc.is_closed:
                await nc.close()


@pytest.fixture
async def mesh(nats_server):
    m = Mesh(nats_server.url)
    yield m
    await m.close()


@pytest.fixture
async def served(mesh):
    """(gateway base URL, scripted worker), ready to serve."""
    gateway = await mesh.gateway()
    worker = await mesh.worker()
    base = f"http://127.0.0.1:{gateway.port}"
    await wait_ready(base)
    return base, worker


def client(base: str, key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=10)


def assert_openai_error(body: dict, code: str | None = None) -> dict:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


async def read_sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Every event's payload (JSON, or the string "[DONE]"); checks the framing."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = (await resp.read()).decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-200:]
    events = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events.count("[DONE]") == 1
    return events


async def next_event(resp: aiohttp.ClientResponse) -> Any:
    line = b""
    while not line.strip():
        line = await asyncio.wait_for(resp.content.readline(), 5)
        assert line, "the stream ended"
    payload = line.decode().strip()[len("data: "):]
    return payload if payload == "[DONE]" else json.loads(payload)


# ---------------------------------------------------------------- happy paths (official client)


async def test_chat_non_streaming(served):
    base, worker = served
    answer = await client(base).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=8, temperature=0)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "Hello world!"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (5, 3, 8)
    req = worker.requests[0]
    assert (req.kind, req.model, req.messages) == ("chat", BASE, [{"role": "user", "content": "hi"}])
    assert req.sampling["max_tokens"] == 8 and req.sampling["temperature"] == 0
    assert req.reply_to.endswith(req.request_id) and req.gateway_id


async def test_chat_streaming_with_usage(served):
    base, _ = served
    stream = await client(base).chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world!"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_chat_logprobs(served):
    base, _ = served
    answer = await client(base).chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hello", " world", "!"]
    assert content[0].logprob == -0.25 and content[0].bytes == list(b"Hello")
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hello", -0.25), ("alt", -2.0)]


async def test_completions_non_streaming_and_streaming(served):
    base, worker = served
    api = client(base)
    answer = await api.completions.create(model=BASE, prompt="Say", max_tokens=4, logprobs=1)
    assert answer.object == "text_completion"
    choice = answer.choices[0]
    assert choice.text == "Hello world!" and choice.finish_reason == "stop"
    assert choice.logprobs.tokens == ["Hello", " world", "!"]
    assert choice.logprobs.text_offset == [0, 5, 11]
    assert choice.logprobs.top_logprobs[0] == {"Hello": -0.25}
    assert worker.requests[0].prompt == "Say" and worker.requests[0].messages is None

    stream = await api.completions.create(model=BASE, prompt=[1, 2, 3], logprobs=1, stream=True,
                                          stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world!"
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == [0, 5, 11]  # as in the non-streaming answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3
    assert worker.requests[1].prompt == [1, 2, 3]


@pytest.fixture
def spans():
    """An in-memory span exporter on a tracer provider installed for this test only; the process's tracing
    state (set-once in OpenTelemetry) is put back afterwards so other tests can install theirs."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    from shared import telemetry

    saved = trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("caraserve-gateway-test", span_exporter=exporter)
    yield exporter
    trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved


async def test_trace_context_reaches_the_scheduler(spans, served):
    base, worker = served
    await client(base).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
    http_spans = [s for s in spans.get_finished_spans() if s.name == "POST /v1/chat/completions"]
    assert len(http_spans) == 1 and http_spans[0].attributes["http.status_code"] == 200
    trace_id = format(http_spans[0].context.trace_id, "032x")
    assert worker.headers[-1]["traceparent"].split("-")[1] == trace_id


# ---------------------------------------------------------------- errors before the first byte


async def test_request_errors(served):
    base, worker = served
    url = f"{base}/v1/chat/completions"
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert_openai_error(await resp.json(), "invalid_json")
        async with http.post(url, json={**CHAT, "n": 2}) as resp:
            assert resp.status == 400
            assert assert_openai_error(await resp.json())["param"] == "n"
        async with http.post(url, json={**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}) as resp:
            assert resp.status == 400
            assert assert_openai_error(await resp.json(), "unsupported_parameter")["param"] == "tools"
        async with http.post(url, data=b'{"model": "' + b"x" * (5 * 2**20) + b'"}') as resp:
            assert resp.status == 413  # aiohttp's own limit, in OpenAI's shape
            assert_openai_error(await resp.json(), "request_too_large")
        async with http.get(f"{base}/v1/nothing-here") as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), "not_found")
        async with http.get(url) as resp:
            assert resp.status == 405
            assert_openai_error(await resp.json(), "method_not_allowed")
        worker.plan = [ErrorReply(400, "the prompt is too long", code="context_length_exceeded")]
        async with http.post(url, json={**CHAT, "stream": True}) as resp:
            assert resp.status == 400  # failed before the first byte: a JSON error, not an event stream
            assert_openai_error(await resp.json(), "context_length_exceeded")
    assert len(worker.requests) == 1  # nothing invalid reached the mesh


async def test_auth(served):
    base, _ = served
    async with aiohttp.ClientSession() as http:
        url = f"{base}/v1/chat/completions"
        async with http.post(url, json=CHAT) as resp:
            assert resp.status == 401
            assert_openai_error(await resp.json(), "missing_api_key")
        async with http.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
            assert_openai_error(await resp.json(), "invalid_api_key")
        async with http.post(url, json=CHAT, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
            assert resp.status == 200  # the admin key works on inference routes too
        async with http.get(f"{base}/v1/adapters", headers=AUTH) as resp:
            assert resp.status == 403
            assert_openai_error(await resp.json(), "admin_key_required")
        async with http.get(f"{base}/v1/adapters") as resp:
            assert resp.status == 401
        async with http.get(f"{base}/v1/adapters", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
            assert_openai_error(await resp.json(), "invalid_api_key")
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError):
        await client(base, key="wrong").models.list()


async def test_admin_disabled_without_admin_key(mesh):
    gateway = await mesh.gateway(admin_key=None)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gateway.port}/v1/adapters", headers=AUTH) as resp:
            assert resp.status == 403
            assert "adapter admin is disabled" in assert_openai_error(await resp.json())["message"]


async def test_no_workers_then_ready(mesh):
    gateway = await mesh.gateway(api_key=None)
    base = f"http://127.0.0.1:{gateway.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503
            assert "no GPU worker" in assert_openai_error(await resp.json(), "not_ready")["message"]
        async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 503
            assert_openai_error(await resp.json(), "no_workers")
        await mesh.worker()
        await wait_ready(base)
        async with http.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200  # no API key configured: open
        async with http.get(f"{base}/v1/models") as resp:
            models = (await resp.json())["data"]
            assert models == [{"id": BASE, "object": "model", "created": models[0]["created"],
                               "owned_by": "caraserve", "root": BASE, "parent": None}]


async def test_backpressure_429(mesh):
    gateway = await mesh.gateway(max_pending=2)
    worker = await mesh.worker()
    base = f"http://127.0.0.1:{gateway.port}"
    await wait_ready(base)
    worker.plan = [HANG]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        hung = [asyncio.create_task(http.post(f"{base}/v1/chat/completions", json=CHAT)) for _ in range(2)]
        while len(worker.requests) < 2:
            await asyncio.wait_for(worker.received.wait(), 5)
            worker.received.clear()
        async with http.post(f"{base}/v1/completions", json={"model": BASE, "prompt": "x"}) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            assert assert_openai_error(await resp.json())["type"] == "rate_limit_exceeded"
        for task in hung:
            task.cancel()  # the clients give up: their slots come free and the worker is told
        await asyncio.gather(*hung, return_exceptions=True)
    cancelled = {(await asyncio.wait_for(worker.cancels.get(), 5)).request_id for _ in range(2)}
    assert cancelled == {r.request_id for r in worker.requests}
    worker.plan = ["ok", ("finish", "stop")]
    answer = await client(base).completions.create(model=BASE, prompt="x")
    assert answer.choices[0].text == "ok"


# ---------------------------------------------------------------- streams that fail or are abandoned


async def test_sse_framing_and_error_event_mid_stream(served):
    base, worker = served
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            events = await read_sse(resp)
        assert [e["choices"][0]["delta"] for e in events[:-1]] == [
            {"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": " world"}, {"content": "!"}, {}]
        worker.plan = ["Hel", ErrorReply(500, "engine failure: out of KV blocks", "api_error", "engine_error")]
        async with http.post(f"{base}/v1/completions", json={"model": BASE, "prompt": "p", "stream": True}) as resp:
            assert resp.status == 200
            events = await read_sse(resp)
        assert events[0]["choices"][0]["text"] == "Hel"
        assert assert_openai_error(events[1], "engine_error")["message"] == "engine failure: out of KV blocks"
        assert events[2] == "[DONE]"


async def test_worker_lost_ends_the_stream(served, mesh):
    base, worker = served
    worker.plan = ["a", HANG]
    nc = await mesh.conn("scheduler")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            assert (await next_event(resp))["choices"][0]["delta"]["role"] == "assistant"
            assert (await next_event(resp))["choices"][0]["delta"]["content"] == "a"
            await publish(nc, SUBJECT_WORKER_LOST, WorkerLost(worker.worker_id, "missed 3 heartbeats"))
            error = assert_openai_error(await next_event(resp), "worker_lost")
            assert error["message"] == "the GPU worker running this request was lost: missed 3 heartbeats"
            assert await next_event(resp) == "[DONE]"


async def test_silent_worker_detected_without_a_scheduler(served):
    base, worker = served
    worker.plan = ["a", HANG]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            await next_event(resp)
            await next_event(resp)
            worker.stop_heartbeats()
            assert_openai_error(await next_event(resp), "worker_lost")
            assert await next_event(resp) == "[DONE]"
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503


async def test_client_disconnect_cancels_on_the_worker(served):
    base, worker = served
    worker.plan = ["a", HANG]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        resp = await http.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True})
        await next_event(resp)
        await next_event(resp)
        resp.close()  # drop the connection mid-stream
    cancel = await asyncio.wait_for(worker.cancels.get(), 5)
    assert cancel.request_id == worker.requests[0].request_id
    # the gateway keeps serving
    worker.plan = ["b", ("finish", "length")]
    answer = await client(base).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == ("b", "length")


async def test_port_in_use_is_one_clear_error(served, mesh):
    base, _ = served
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"port {port} is already in use"):
        await mesh.gateway(port=port)


# ---------------------------------------------------------------- adapter admin, with the real adapter store


@pytest.fixture(scope="module")
def base_shape(default_model_path):
    from transformers import AutoConfig

    from shared.adapters import BaseModelShape

    return BaseModelShape.from_hf_config(AutoConfig.from_pretrained(default_model_path))


@pytest.fixture
async def with_store(served, mesh, base_shape):
    """`served` plus a real AdapterStoreService for the default model's shape."""
    from services.adapter_store.service import AdapterStoreService
    from services.adapter_store.store import AdapterStore

    store = AdapterStoreService(AdapterStore(base_shape, BASE))
    await store.start(await mesh.conn("adapter-store"))
    mesh.stores.append(store)
    return served


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field name, file name or None, bytes) parts, and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "application/octet-stream" if filename else "text/plain"
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {kind}\r\n\r\n".encode()
        body += data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def adapter_parts(adapter: str, name: str, by: str = "filename") -> list[tuple[str, str | None, bytes]]:
    files = [(f, (DEMO / adapter / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")]
    if by == "filename":
        return [("name", None, name.encode())] + [("file", f, data) for f, data in files]
    return [("name", None, name.encode())] + [(f, "upload.bin", data) for f, data in files]


async def upload(http, base: str, parts, chunked: bool = False) -> tuple[int, dict]:
    body, content_type = multipart(parts)

    async def pieces():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    async with http.post(f"{base}/v1/adapters", data=pieces() if chunked else body,
                         headers={"Content-Type": content_type}) as resp:
        return resp.status, await resp.json()


async def test_adapter_admin_lifecycle(with_store):
    base, worker = with_store
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        status, info = await upload(http, base, adapter_parts("caps", "caps"))
        assert status == 201, info
        assert (info["id"], info["object"], info["name"], info["rank"], info["base_model"]) == \
            ("caps", "adapter", "caps", 8, BASE)
        status, info = await upload(http, base, adapter_parts("json", "json-mode", by="field"), chunked=True)
        assert status == 201, info
        status, again = await upload(http, base, adapter_parts("caps", "caps"))
        assert status == 409 and assert_openai_error(again)["code"] == "adapter_exists"
        async with http.get(f"{base}/v1/adapters") as resp:
            listed = await resp.json()
        assert [a["id"] for a in listed["data"]] == ["caps", "json-mode"]
        async with http.get(f"{base}/v1/adapters/caps") as resp:
            assert resp.status == 200 and (await resp.json())["sha256"].keys() == {
                "adapter_config.json", "adapter_model.safetensors"}

        models = await client(base).models.list()
        by_id = {m.id: m.model_dump() for m in models.data}
        assert by_id[BASE]["parent"] is None
        assert by_id["caps"]["parent"] == BASE and by_id["caps"]["root"] == BASE and by_id["caps"]["rank"] == 8
        assert "q_proj" in by_id["caps"]["target_modules"]

        answer = await client(base).chat.completions.create(model="caps", messages=[{"role": "user", "content": "x"}])
        assert answer.model == "caps" and worker.requests[-1].model == "caps"

        async with http.delete(f"{base}/v1/adapters/caps") as resp:
            assert resp.status == 200
            assert await resp.json() == {"id": "caps", "object": "adapter", "deleted": True}
        async with http.get(f"{base}/v1/adapters/caps") as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), "adapter_not_found")
        async with http.delete(f"{base}/v1/adapters/caps") as resp:
            assert resp.status == 404
    for _ in range(50):  # the deletion event reaches the gateway's cache
        try:
            await client(base).chat.completions.create(model="caps", messages=[{"role": "user", "content": "x"}])
        except openai.NotFoundError as exc:
            assert exc.body["code"] == "model_not_found"
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a deleted adapter is still served")


async def test_adapter_upload_refusals(with_store):
    base, worker = with_store
    caps = adapter_parts("caps", "caps")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        too_big = [("name", None, b"big"), ("file", "adapter_config.json", b"{}"),
                   ("file", "adapter_model.safetensors", b"\0" * (5 * 2**20 + 1))]
        for chunked in (False, True):  # refused by Content-Length, and by the byte budget while reading
            status, body = await upload(http, base, too_big, chunked=chunked)
            assert status == 413 and assert_openai_error(body)["code"] == "upload_too_large", body
        status, body = await upload(http, base, caps[:1] + [("file", "adapter_config.json", caps[1][2]),
                                                            ("file", "adapter_model.safetensors", b"garbage")])
        assert status == 400 and assert_openai_error(body)["code"] == "invalid_adapter"
        assert "unreadable or truncated" in body["error"]["message"]
        status, body = await upload(http, base, caps[1:])
        assert status == 400 and assert_openai_error(body)["param"] == "name"
        status, body = await upload(http, base, caps[:2])
        assert status == 400 and "adapter_model.safetensors" in assert_openai_error(body)["message"]
        status, body = await upload(http, base, [("name", None, b"../etc")] + caps[1:])
        assert status == 400 and assert_openai_error(body)["code"] == "invalid_adapter_name"
        async with http.post(f"{base}/v1/adapters", json={"name": "x"}) as resp:
            assert resp.status == 400
            assert_openai_error(await resp.json(), "invalid_upload")
        async with http.get(f"{base}/v1/adapters") as resp:
            assert (await resp.json())["data"] == []
    # still serving
    answer = await client(base).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Hello world!"


async def test_unknown_model_404(with_store):
    base, worker = with_store
    with pytest.raises(openai.NotFoundError) as info:
        await client(base).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"
    assert worker.requests == []


async def test_stop_ends_streams_and_cancels_them(mesh):
    gateway = await mesh.gateway()
    worker = await mesh.worker()
    base = f"http://127.0.0.1:{gateway.port}"
    await wait_ready(base)
    worker.plan = ["a", HANG]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            await next_event(resp)
            await next_event(resp)
            stopping = asyncio.create_task(gateway.stop())
            assert_openai_error(await next_event(resp), "shutting_down")
            assert await next_event(resp) == "[DONE]"
        await asyncio.wait_for(stopping, 10)
        assert (await asyncio.wait_for(worker.cancels.get(), 5)).request_id == worker.requests[0].request_id
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{base}/healthz")  # no longer listening
