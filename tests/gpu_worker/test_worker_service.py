"""The gpu_worker service over a real NATS server: placed requests stream TokenChunks equal to the engine's
offline output, cancels free KV blocks and adapter references, adapters come from the store on first use,
bad requests get an ErrorReply, heartbeats describe the worker."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.llm_engine import LLMEngine
from services.gpu_worker.engine.sequence import SamplingParams
from services.gpu_worker.service import GpuWorkerService
from shared.mesh_config import MeshConfig
from shared.nats_client import connect, publish
from shared.protocol import (
    SUBJECT_GATEWAY_HEARTBEAT,
    SUBJECT_HEARTBEAT,
    CancelRequest,
    ErrorReply,
    GatewayHeartbeat,
    GenerateRequest,
    TokenChunk,
    WorkerHeartbeat,
    worker_subject,
)
from shared.wire import decode

WORKER = "w1"


@pytest.fixture(scope="module")
def engine(default_model_path):
    return LLMEngine(EngineConfig(model=str(default_model_path), max_num_seqs=8, num_kv_blocks=128, max_loras=2))


@pytest.fixture
async def worker(nats_server, engine):
    nc = await connect(nats_server.url, "test-worker")
    service = GpuWorkerService(engine, MeshConfig(nats_url=nats_server.url, heartbeat_interval=0.2, worker_timeout=1.0),
                               WORKER)
    await service.start(nc)
    yield service
    await service.stop()
    await nc.close()


@pytest.fixture
async def client(nats_server):
    nc = await connect(nats_server.url, "test-client")
    yield nc
    await nc.close()


async def send(nc, model="SmolLM2-135M-Instruct", prompt="The capital of France is", gateway_id="", **sampling):
    """Place a request on the worker directly (as the scheduler does); returns (request, queue of messages)."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg):
        await queue.put(decode(msg.data, TokenChunk, ErrorReply))

    await nc.subscribe(inbox, cb=on_msg)
    sampling = {"max_tokens": 8, "temperature": 0.0, **sampling}
    req = GenerateRequest(request_id=uuid.uuid4().hex, kind="completion", model=model, sampling=sampling,
                          reply_to=inbox, prompt=prompt, gateway_id=gateway_id)
    await publish(nc, worker_subject(WORKER, "generate"), req)
    return req, queue


async def collect(queue, timeout=60.0) -> list:
    out = []
    while True:
        msg = await asyncio.wait_for(queue.get(), timeout)
        out.append(msg)
        if isinstance(msg, ErrorReply) or msg.finished:
            return out


async def test_stream_equals_offline_engine(engine, worker, client):
    offline = engine.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0, logprobs=True))
    req, queue = await send(client, logprobs=True)
    chunks = await collect(queue)
    assert all(isinstance(c, TokenChunk) and c.request_id == req.request_id for c in chunks)
    assert "".join(c.text for c in chunks) == offline[0].text
    assert chunks[-1].finish_reason == offline[0].finish_reason.value
    assert chunks[-1].completion_tokens == len(offline[0].token_ids) == sum(c.num_tokens for c in chunks)
    logprobs = [lp.logprob for c in chunks for lp in c.logprobs]
    assert logprobs == pytest.approx([lp.logprob for lp in offline[0].logprobs][: len(logprobs)], abs=1e-4)


async def test_cancel_frees_kv_blocks(engine, worker, client):
    req, queue = await send(client, max_tokens=300, ignore_eos=True)
    first = await asyncio.wait_for(queue.get(), 60)
    assert isinstance(first, TokenChunk) and not first.finished
    await publish(client, worker_subject(WORKER, "cancel"), CancelRequest(req.request_id))
    for _ in range(200):
        if not engine.has_unfinished() and not worker._running:
            break
        await asyncio.sleep(0.05)
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.in_use == {} and engine.adapters.pinned == {}


async def test_bad_requests_get_error_replies(engine, worker, client):
    _, queue = await send(client, model="no-such-adapter")
    (err,) = await collect(queue)
    assert isinstance(err, ErrorReply) and err.status in (404, 503)  # 503 when no store answers
    _, queue = await send(client, prompt="word " * (engine.max_model_len + 10))
    (err,) = await collect(queue)
    assert isinstance(err, ErrorReply) and err.status == 400 and err.code == "context_length_exceeded"
    _, queue = await send(client, temperature=7.0)
    (err,) = await collect(queue)
    assert isinstance(err, ErrorReply) and err.status == 400 and "temperature" in err.message
    # a malformed message is answered with an error, and the worker keeps serving
    reply = await client.request(worker_subject(WORKER, "generate"), b"\x93garbage", timeout=5)
    assert decode(reply.data, ErrorReply).status == 400
    _, queue = await send(client)
    assert (await collect(queue))[-1].finished


async def test_heartbeats_describe_the_worker(engine, worker, client):
    got: asyncio.Queue = asyncio.Queue()

    async def on_hb(msg):
        await got.put(decode(msg.data, WorkerHeartbeat))

    await client.subscribe(SUBJECT_HEARTBEAT, cb=on_hb)
    hb = await asyncio.wait_for(got.get(), 5)
    assert hb.worker_id == WORKER and hb.ready and hb.model == engine.model_name
    assert hb.total_kv_blocks == 128 and hb.free_kv_blocks == 128 and hb.running == 0
    assert hb.base_fingerprint == engine.base_shape.fingerprint()


async def test_requests_of_a_silent_gateway_are_aborted(engine, worker, client):
    """A gateway that crashed cannot cancel its requests: the worker notices its heartbeats stopped."""
    alive = "gw-alive"

    async def beat():
        while True:
            await publish(client, SUBJECT_GATEWAY_HEARTBEAT, GatewayHeartbeat(alive, 0.2))
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(beat())
    try:
        kept, kept_queue = await send(client, gateway_id=alive, max_tokens=60, ignore_eos=True)
        orphan, orphan_queue = await send(client, gateway_id="gw-crashed", max_tokens=1000, ignore_eos=True)
        await asyncio.wait_for(orphan_queue.get(), 60)  # both run
        for _ in range(200):  # worker_timeout is 1 s here
            if orphan.request_id not in worker._running:
                break
            await asyncio.sleep(0.05)
        assert orphan.request_id not in worker._running
        chunks = await collect(kept_queue)  # the live gateway's request is untouched
        assert chunks[-1].finished and chunks[-1].completion_tokens == 60
    finally:
        beating.cancel()
    for _ in range(100):
        if not engine.has_unfinished():
            break
        await asyncio.sleep(0.05)
    assert engine.blocks.num_free == engine.blocks.num_blocks and engine.adapters.pinned == {}


async def test_heartbeats_carry_what_rank_aware_placement_needs(nats_server, engine, client):
    from services.scheduler.perf_model import PerfModel

    model = PerfModel(form="sum_rank", decode_base_s=0.03, decode_per_seq_s=0.001, decode_per_rank_s=1e-5,
                      prefill_base_s=0.02, prefill_per_token_s=2e-4, prefill_per_token_rank_s=1e-7,
                      no_lora_tpot_s=0.04)
    nc = await connect(nats_server.url, "test-worker-model")
    service = GpuWorkerService(engine, MeshConfig(nats_url=nats_server.url, heartbeat_interval=0.2, worker_timeout=1.0,
                                                  slo_ttft_ms=500), "w-model", perf_model=model)
    got: asyncio.Queue = asyncio.Queue()

    async def on_hb(msg):
        hb = decode(msg.data, WorkerHeartbeat)
        if hb.worker_id == "w-model":
            await got.put(hb)

    await client.subscribe(SUBJECT_HEARTBEAT, cb=on_hb)
    await service.start(nc)
    try:
        hb = await asyncio.wait_for(got.get(), 5)
        assert PerfModel.from_dict(hb.perf_model) == model
        assert hb.slo_tpot_s == pytest.approx(1.5 * 0.04) and hb.slo_ttft_s == pytest.approx(0.5)
        assert hb.max_num_seqs == 8 and hb.block_size == engine.config.block_size
        inbox = client.new_inbox()
        done = asyncio.Event()

        async def on_chunk(msg):
            if decode(msg.data, TokenChunk, ErrorReply).finished:
                done.set()

        await client.subscribe(inbox, cb=on_chunk)
        await publish(client, worker_subject("w-model", "generate"), GenerateRequest(
            request_id="fin-1", kind="completion", model=engine.model_name, reply_to=inbox, prompt="Hello",
            sampling={"max_tokens": 3, "temperature": 0.0, "ignore_eos": True}))
        await asyncio.wait_for(done.wait(), 60)
        for _ in range(50):  # the output length reaches the schedulers once, with the next heartbeat
            hb = await asyncio.wait_for(got.get(), 5)
            if hb.finished:
                break
        assert hb.finished == [("", 3)]
        hb = await asyncio.wait_for(got.get(), 5)
        assert hb.finished == []
    finally:
        await service.stop()
        await nc.close()
