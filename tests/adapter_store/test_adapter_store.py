"""The adapter_store service against a real embedded nats-server, on the default model's shape (SmolLM2-135M)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError, ObjectNotFoundError
from transformers import AutoConfig

from services.adapter_store.client import (
    delete_adapter, fetch_adapter, get_adapter, list_adapters, open_blob_bucket, read_blob, register_adapter,
    register_from_dir, stage_adapter,
)
from services.adapter_store.service import AdapterStoreService, build_store_service
from services.adapter_store.store import AdapterStore
from shared.adapters import BaseModelShape
from shared.nats_client import MeshError, connect, request, sync_with_server
from shared.nats_server import EmbeddedNatsServer
from shared.protocol import (
    ADAPTER_BLOB_BUCKET, ADAPTER_FILES, ADAPTER_META_BUCKET, ADAPTER_NAME_PATTERN, SUBJECT_ADAPTER_EVENTS, SUBJECT_ADAPTER_LIST,
    SUBJECT_ADAPTER_REGISTER, AdapterEvent, AdapterInfo, ErrorReply, RegisterAdapter, adapter_object_name,
)
from shared.wire import decode

DEMO = Path(__file__).resolve().parents[2] / "shared" / "demo_adapters"
BASE_NAME = "SmolLM2-135M-Instruct"
T = 10.0  # request timeout


def demo_files(name: str) -> dict[str, bytes]:
    return {f: (DEMO / name / f).read_bytes() for f in ADAPTER_FILES}


@pytest.fixture(scope="module")
def base_shape(default_model_path) -> BaseModelShape:
    return BaseModelShape.from_hf_config(AutoConfig.from_pretrained(default_model_path))


@pytest.fixture
async def mesh(nats_server, base_shape):
    """Start stores with `await mesh.start(max_rank)`; `mesh.nc` is a client connection. All stopped afterwards."""

    class Mesh:
        def __init__(self) -> None:
            self.services: list[AdapterStoreService] = []
            self.conns = []
            self.nc = None

        async def start(self, max_rank: int = 256) -> AdapterStoreService:
            nc = await connect(nats_server.url, "test-store")
            self.conns.append(nc)
            service = AdapterStoreService(AdapterStore(base_shape, BASE_NAME, max_rank))
            await service.start(nc)
            self.services.append(service)
            if self.nc is None:
                self.nc = await connect(nats_server.url, "test-client")
                self.conns.append(self.nc)
            return service

        async def close(self) -> None:
            for service in self.services:
                await service.stop()
            for nc in self.conns:
                if not nc.is_closed:
                    await nc.close()

    m = Mesh()
    yield m
    await m.close()


async def collect_events(nc) -> asyncio.Queue:
    events: asyncio.Queue = asyncio.Queue()

    async def on_event(msg):
        await events.put(decode(msg.data, AdapterEvent))

    await nc.subscribe(SUBJECT_ADAPTER_EVENTS, cb=on_event)
    await sync_with_server(nc)
    return events


async def assert_refused(coro, status: int, code: str, text: str = "") -> ErrorReply:
    with pytest.raises(MeshError) as info:
        await coro
    reply = info.value.reply
    assert (reply.status, reply.code) == (status, code), reply
    assert text in reply.message, reply.message
    assert "\n" not in reply.message
    return reply


async def staged_names(nc) -> list[str]:
    bucket = await nc.jetstream().object_store(ADAPTER_BLOB_BUCKET)
    try:
        objects = await bucket.list(ignore_deletes=True)
    except NotFoundError:  # the bucket holds no live object
        return []
    return sorted(o.name for o in objects if o.name.startswith("staging/"))


def test_name_rule_matches_the_engine():
    from services.gpu_worker.engine import llm_engine

    assert llm_engine.ADAPTER_NAME_PATTERN is ADAPTER_NAME_PATTERN  # one rule, shared/protocol.py


async def test_register_list_get_delete_with_events(mesh):
    await mesh.start()
    nc = mesh.nc
    events = await collect_events(nc)
    files = demo_files("caps")

    info = await register_from_dir(nc, "caps", DEMO / "caps", timeout=T)
    assert info.name == "caps"
    assert info.rank == 8 and info.alpha == 16.0
    assert info.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert info.dtype in ("float32", "float16", "bfloat16")
    assert info.sha256 == {f: hashlib.sha256(data).hexdigest() for f, data in files.items()}
    assert info.size_bytes == sum(len(d) for d in files.values())
    assert info.base_model == BASE_NAME and info.base_fingerprint == mesh.services[0].store.base_fingerprint
    event = await asyncio.wait_for(events.get(), 5)
    assert event.event == "registered" and event.adapter == info

    await register_adapter(nc, "json", demo_files("json"), timeout=T)
    await asyncio.wait_for(events.get(), 5)
    assert [a.name for a in await list_adapters(nc, T)] == ["caps", "json"]
    assert await get_adapter(nc, "caps", T) == info
    assert await staged_names(nc) == []  # staging cleaned after success

    assert await delete_adapter(nc, "caps", T) == info
    event = await asyncio.wait_for(events.get(), 5)
    assert event.event == "deleted" and event.adapter == info
    assert [a.name for a in await list_adapters(nc, T)] == ["json"]
    await assert_refused(get_adapter(nc, "caps", T), 404, "adapter_not_found")
    await assert_refused(delete_adapter(nc, "caps", T), 404, "adapter_not_found")
    blobs = await nc.jetstream().object_store(ADAPTER_BLOB_BUCKET)
    with pytest.raises(ObjectNotFoundError):
        await blobs.get_info(adapter_object_name("caps", "adapter_model.safetensors"))
    # the name is free again
    assert (await register_from_dir(nc, "caps", DEMO / "caps", timeout=T)).sha256 == info.sha256


async def test_list_returns_every_adapter_of_a_large_store(mesh):
    """KeyValue.keys() (a watcher) answered with no key at all once 512 adapters were registered on a loaded machine;
    the list reads the metadata stream's subjects instead."""
    import dataclasses

    from services.adapter_store.store import encode_info

    await mesh.start()
    info = await register_from_dir(mesh.nc, "bulk-template", DEMO / "caps", timeout=T)
    meta = await mesh.nc.jetstream().key_value(ADAPTER_META_BUCKET)
    names = [f"bulk-{i:04d}" for i in range(600)]
    for name in names:
        await meta.put(name, encode_info(dataclasses.replace(info, name=name)))
    await meta.delete("bulk-0003")  # a deleted name keeps a marker in the stream: not listed
    listed = [a.name for a in await list_adapters(mesh.nc, T) if a.name.startswith("bulk-")]
    assert listed == sorted([*names[:3], *names[4:], "bulk-template"])


async def test_duplicate_and_bad_names_refused(mesh):
    await mesh.start()
    nc = mesh.nc
    await register_from_dir(nc, "pirate", DEMO / "pirate", timeout=T)
    await assert_refused(register_from_dir(nc, "pirate", DEMO / "caps", timeout=T), 409, "adapter_exists")
    assert (await get_adapter(nc, "pirate", T)).sha256["adapter_model.safetensors"] == hashlib.sha256(
        demo_files("pirate")["adapter_model.safetensors"]).hexdigest()  # not replaced
    for bad in ("../x", "", "a/b", BASE_NAME, ".hidden", "a..b", "x" * 129, "sp ace"):
        await assert_refused(register_from_dir(nc, bad, DEMO / "caps", timeout=T), 400, "invalid_adapter_name")
    assert await staged_names(nc) == []  # staging cleaned after refusals too
    assert [a.name for a in await list_adapters(nc, T)] == ["pirate"]


def _other_base_adapter(tmp_path: Path) -> dict[str, bytes]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers.lora_factory import make_random_adapter

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    out = make_random_adapter(LlamaForCausalLM(config), tmp_path / "other", seed=0, r=4,
                              target_modules=["q_proj", "v_proj"])
    return {f: (out / f).read_bytes() for f in ADAPTER_FILES}


async def test_malformed_adapters_refused_with_reason(mesh, tmp_path):
    await mesh.start()
    nc = mesh.nc
    caps = demo_files("caps")
    cases = [
        (_other_base_adapter(tmp_path), "does not fit the base model"),
        ({"adapter_config.json": caps["adapter_config.json"]}, "adapter_model.safetensors is missing"),
        ({"adapter_model.safetensors": caps["adapter_model.safetensors"]}, "adapter_config.json is missing"),
        ({**caps, "adapter_model.safetensors": caps["adapter_model.safetensors"][:1000]}, "unreadable or truncated"),
        ({**caps, "adapter_model.safetensors": b"garbage bytes, not safetensors"}, "unreadable or truncated"),
        ({**caps, "adapter_config.json": b"{not json"}, "adapter_config.json is not valid JSON"),
    ]
    for files, reason in cases:
        staging_id = await stage_adapter(nc.jetstream(), files)
        await assert_refused(request(nc, SUBJECT_ADAPTER_REGISTER, RegisterAdapter("bad", staging_id), AdapterInfo,
                                     timeout=T), 400, "invalid_adapter", reason)
        assert await staged_names(nc) == [], reason  # staging cleaned after the failure
    assert await list_adapters(nc, T) == []
    # still serving, and "bad" was never half-registered
    assert (await register_from_dir(nc, "bad", DEMO / "caps", timeout=T)).rank == 8


async def test_rank_above_max_refused(mesh):
    await mesh.start(max_rank=4)
    await assert_refused(register_from_dir(mesh.nc, "caps", DEMO / "caps", timeout=T), 400, "invalid_adapter",
                         "has rank 8, above the maximum rank 4")
    assert await list_adapters(mesh.nc, T) == []


async def test_unknown_staging_files_and_ids(mesh):
    await mesh.start()
    with pytest.raises(ValueError, match="unexpected adapter files"):
        await stage_adapter(mesh.nc.jetstream(), {"adapter_model.bin": b"x"})
    await assert_refused(request(mesh.nc, SUBJECT_ADAPTER_REGISTER, RegisterAdapter("x", "no-such-id"), AdapterInfo,
                                 timeout=T), 400, "invalid_adapter", "is missing")
    await assert_refused(request(mesh.nc, SUBJECT_ADAPTER_REGISTER, RegisterAdapter("x", "../../y"), AdapterInfo,
                                 timeout=T), 400, "invalid_staging_id")


async def test_malformed_message_answered_and_service_keeps_serving(mesh):
    await mesh.start()
    for subject in (SUBJECT_ADAPTER_LIST, SUBJECT_ADAPTER_REGISTER):
        msg = await mesh.nc.request(subject, b"garbage", timeout=T)
        reply = decode(msg.data, ErrorReply)
        assert reply.status == 400 and reply.code == "malformed_message"
    assert await list_adapters(mesh.nc, T) == []
    assert (await register_from_dir(mesh.nc, "caps", DEMO / "caps", timeout=T)).name == "caps"


async def test_survives_service_restart(mesh):
    first = await mesh.start()
    info = await register_from_dir(mesh.nc, "caps", DEMO / "caps", timeout=T)
    await first.stop()
    with pytest.raises(MeshError) as refused:
        await list_adapters(mesh.nc, 2)
    assert refused.value.reply.code in ("no_responders", "timeout")
    await mesh.start()
    assert await list_adapters(mesh.nc, T) == [info]


async def test_survives_nats_server_restart(tmp_path, base_shape):
    store_dir = tmp_path / "persistent-nats"
    with EmbeddedNatsServer(store_dir, port=0) as server:
        port = server.port
        nc = await connect(server.url, "test")
        service = AdapterStoreService(AdapterStore(base_shape, BASE_NAME))
        await service.start(nc)
        info = await register_from_dir(nc, "caps", DEMO / "caps", timeout=T)
        await service.stop()
        await nc.close()
    with EmbeddedNatsServer(store_dir, port=port) as server:
        nc = await connect(server.url, "test")
        service = AdapterStoreService(AdapterStore(base_shape, BASE_NAME))
        await service.start(nc)
        try:
            assert await list_adapters(nc, T) == [info]
            fetched = await fetch_adapter(nc.jetstream(), info, tmp_path / "cache")
            assert (fetched / "adapter_model.safetensors").read_bytes() == demo_files("caps")["adapter_model.safetensors"]
        finally:
            await service.stop()
            await nc.close()


async def test_fetch_adapter_verifies_and_reuses(mesh, tmp_path):
    await mesh.start()
    js = mesh.nc.jetstream()
    info = await register_from_dir(mesh.nc, "caps", DEMO / "caps", timeout=T)
    originals = demo_files("caps")

    path = await fetch_adapter(js, info, tmp_path / "cache")
    assert path == tmp_path / "cache" / f"caps-{info.sha256['adapter_model.safetensors'][:12]}"
    assert {f: (path / f).read_bytes() for f in ADAPTER_FILES} == originals
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]  # no temp dirs left
    (path / "adapter_config.json").write_bytes(b"{}")  # a damaged local copy is replaced
    assert await fetch_adapter(js, info, tmp_path / "cache") == path
    assert (path / "adapter_config.json").read_bytes() == originals["adapter_config.json"]

    blobs = await js.object_store(ADAPTER_BLOB_BUCKET)
    await blobs.put(adapter_object_name("caps", "adapter_model.safetensors"), b"tampered")
    await assert_refused(fetch_adapter(js, info, tmp_path / "fresh"), 502, "adapter_integrity",
                         "sha256 mismatch for adapter_model.safetensors")
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    await blobs.delete(adapter_object_name("caps", "adapter_config.json"))
    await assert_refused(fetch_adapter(js, info, tmp_path / "fresh"), 502, "adapter_integrity", "missing")


async def test_read_blob_returns_every_chunk_and_leaves_no_consumer(mesh):
    await mesh.start()
    js = mesh.nc.jetstream()
    blobs = await open_blob_bucket(js)
    big = os.urandom(5 * 128 * 1024 + 7)  # 6 chunks of the store's 128 KiB: several fetches at batch=4
    await blobs.put("t/big", big)
    await blobs.put("t/empty", b"")
    assert await read_blob(js, blobs, "t/big", batch=4) == big
    assert await read_blob(js, blobs, "t/big") == big
    assert await read_blob(js, blobs, "t/empty") == b""
    await blobs.put("t/big", b"replaced")  # a rewritten object: only its new chunks are read
    assert await read_blob(js, blobs, "t/big") == b"replaced"
    with pytest.raises(NotFoundError):
        await read_blob(js, blobs, "t/absent")
    stream = f"OBJ_{ADAPTER_BLOB_BUCKET}"
    assert (await js.stream_info(stream)).state.consumer_count == 0  # each read deletes its consumer


def test_build_store_service_from_cli_flags(default_model_path, base_shape):
    from services.cli import CLIError, build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "adapter_store", "--model", str(default_model_path),
                              "--served-model-name", "base", "--max-lora-rank", "16"])
    service = build_store_service(args)
    assert service.name == "adapter_store"
    assert (service.store.base_model, service.store.max_lora_rank) == ("base", 16)
    assert service.store.base_fingerprint == base_shape.fingerprint()
    args = parser.parse_args(["serve", "adapter_store", "--model", str(default_model_path)])
    service = build_store_service(args)
    assert (service.store.base_model, service.store.max_lora_rank) == (Path(default_model_path).name, 256)
    with pytest.raises(CLIError, match="not found"):
        build_store_service(parser.parse_args(["serve", "adapter_store", "--model", "/nonexistent/model"]))


@pytest.mark.slow
async def test_serve_command_runs_and_stops_cleanly(nats_server):
    """`caraserve serve adapter_store` as its own process: answers, registers, exits 0 on SIGTERM."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "adapter_store", "--nats-url",
                             nats_server.url, "--log-level", "warning"], env=env, cwd=DEMO.parents[1])
    nc = await connect(nats_server.url, "test")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert await list_adapters(nc, 1) == []
                break
            except MeshError:
                assert proc.poll() is None and time.monotonic() < deadline, "the store did not come up"
                await asyncio.sleep(0.2)
        assert (await register_from_dir(nc, "pirate", DEMO / "pirate", timeout=T)).name == "pirate"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await nc.close()
