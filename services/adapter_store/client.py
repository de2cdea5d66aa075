"""What other services call to reach the adapter store: stage and register files, query, delete, fetch blobs.

Upload path: `stage_adapter` puts the files under staging_object_name(staging_id, file) in ADAPTER_BLOB_BUCKET,
then `register_adapter` asks the store (RegisterAdapter), which validates them, moves them to
adapter_object_name(name, file) and answers AdapterInfo. Workers call `fetch_adapter` on first use: it downloads
the files, checks each sha256 against the AdapterInfo and writes them into a local directory atomically.
Light on imports (no torch): the gateway imports this module.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE, ObjectStore

from shared.nats_client import MeshError, request
from shared.protocol import (
    ADAPTER_BLOB_BUCKET, ADAPTER_FILES, ADAPTER_NAME_PATTERN, SUBJECT_ADAPTER_DELETE, SUBJECT_ADAPTER_GET, SUBJECT_ADAPTER_LIST,
    SUBJECT_ADAPTER_REGISTER, AdapterInfo, AdapterList, AdapterQuery, ListAdapters, RegisterAdapter,
    adapter_object_name, staging_object_name,
)

SAFETENSORS = "adapter_model.safetensors"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def open_blob_bucket(js: JetStreamContext) -> ObjectStore:
    """Bind ADAPTER_BLOB_BUCKET, creating it (file storage, survives restarts) if it does not exist yet."""
    try:
        return await js.object_store(ADAPTER_BLOB_BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_object_store(ADAPTER_BLOB_BUCKET, config=ObjectStoreConfig(storage=StorageType.FILE))
    except BadRequestError:  # another service created it between our two calls
        return await js.object_store(ADAPTER_BLOB_BUCKET)


async def read_blob(js: JetStreamContext, bucket: ObjectStore, object_name: str, batch: int = 64,
                    timeout: float = 10.0) -> bytes:
    """An object's bytes from the blob bucket, its chunks pulled `batch` at a time; NotFoundError if it is absent.

    Not ObjectStore.get: nats-py reads through an ordered push consumer whose flow control stalls it, ~0.5 s for a
    9 MB rank-64 adapter here against ~40 ms this way, and a cold adapter's fetch is on its first request's TTFT.
    The caller checks the content against the registered sha256.
    """
    info = await bucket.get_info(object_name)
    if not info.size:
        return b""
    stream = OBJ_STREAM_TEMPLATE.format(bucket=ADAPTER_BLOB_BUCKET)
    consumer = await js.add_consumer(stream, ConsumerConfig(
        filter_subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=ADAPTER_BLOB_BUCKET, obj=info.nuid),
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True,
        inactive_threshold=60.0,  # the server drops it by itself if we die before deleting it
    ))
    data = bytearray()
    try:
        sub = await js.pull_subscribe_bind(consumer.name, stream)
        try:
            remaining = info.chunks or 0
            while remaining > 0:
                msgs = await sub.fetch(min(batch, remaining), timeout=timeout)
                for msg in msgs:
                    data += msg.data
                remaining -= len(msgs)
        finally:
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):  # cleanup only; the inactive threshold covers a failure here
            await js.delete_consumer(stream, consumer.name)
    return bytes(data)


async def stage_adapter(js: JetStreamContext, files: dict[str, bytes]) -> str:
    """Put an adapter's files in the staging area of the blob bucket; returns the staging id to register."""
    unknown = sorted(set(files) - set(ADAPTER_FILES))
    if unknown:
        raise ValueError(f"unexpected adapter files {unknown}; expected {', '.join(ADAPTER_FILES)}")
    bucket = await open_blob_bucket(js)
    staging_id = uuid.uuid4().hex
    for filename, data in files.items():
        await bucket.put(staging_object_name(staging_id, filename), data)
    return staging_id


async def register_adapter(nc: NATS, name: str, files: dict[str, bytes], timeout: float) -> AdapterInfo:
    """Stage `files` and ask the store to register them as `name`; MeshError with the store's reason if refused."""
    staging_id = await stage_adapter(nc.jetstream(), files)
    return await request(nc, SUBJECT_ADAPTER_REGISTER, RegisterAdapter(name, staging_id), AdapterInfo,
                         timeout=timeout)


async def register_from_dir(nc: NATS, name: str, path: str | os.PathLike, timeout: float) -> AdapterInfo:
    """Register the PEFT adapter directory `path` (its files among ADAPTER_FILES that exist) as `name`."""
    directory = Path(path)
    files = {f: (directory / f).read_bytes() for f in ADAPTER_FILES if (directory / f).is_file()}
    return await register_adapter(nc, name, files, timeout)


async def list_adapters(nc: NATS, timeout: float) -> list[AdapterInfo]:
    """Every registered adapter, sorted by name."""
    answer = await request(nc, SUBJECT_ADAPTER_LIST, ListAdapters(), AdapterList, timeout=timeout)
    return answer.adapters


async def get_adapter(nc: NATS, name: str, timeout: float) -> AdapterInfo:
    """One adapter's metadata; MeshError 404 (code adapter_not_found) if it is not registered."""
    return await request(nc, SUBJECT_ADAPTER_GET, AdapterQuery(name), AdapterInfo, timeout=timeout)


async def delete_adapter(nc: NATS, name: str, timeout: float) -> AdapterInfo:
    """Unregister an adapter and delete its blobs; returns what it was. MeshError 404 if it is not registered."""
    return await request(nc, SUBJECT_ADAPTER_DELETE, AdapterQuery(name), AdapterInfo, timeout=timeout)


def _integrity_error(message: str) -> MeshError:
    return MeshError.of(502, message, "api_error", "adapter_integrity")


def _verify_dir(directory: Path, info: AdapterInfo) -> bool:
    """True when `directory` holds every file of `info` with the registered sha256."""
    for filename in ADAPTER_FILES:
        path = directory / filename
        if not path.is_file() or sha256_hex(path.read_bytes()) != info.sha256.get(filename):
            return False
    return True


def _install(dest: Path, target: Path, blobs: dict[str, bytes], info: AdapterInfo) -> Path:
    """Write `blobs` into a temporary directory beside `target`, then rename it into place (atomic)."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".tmp-{info.name}-"))
    try:
        for filename, data in blobs.items():
            (tmp / filename).write_bytes(data)
        os.chmod(tmp, 0o755)
        if target.exists():  # left by an interrupted or tampered earlier fetch: replace it
            if _verify_dir(target, info):
                return target
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:  # a concurrent fetch renamed first
            if not _verify_dir(target, info):
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def fetch_adapter(js: JetStreamContext, info: AdapterInfo, dest_dir: str | os.PathLike) -> Path:
    """The adapter's files in `dest_dir/<name>-<sha12>/`, downloaded and checked against `info.sha256`.

    Reuses the directory when it already holds the right files. MeshError 502 (code adapter_integrity) when a
    blob is missing or its sha256 differs from the registered one; nothing is written then.
    """
    if not ADAPTER_NAME_PATTERN.match(info.name):  # the name becomes a path component
        raise _integrity_error(f"adapter {info.name!r}: invalid name in its metadata")
    missing = [f for f in ADAPTER_FILES if not re.fullmatch(r"[0-9a-f]{64}", info.sha256.get(f, ""))]
    if missing:
        raise _integrity_error(f"adapter {info.name}: no valid sha256 registered for {missing[0]}")
    dest = Path(dest_dir)
    target = dest / f"{info.name}-{info.sha256[SAFETENSORS][:12]}"
    if target.is_dir() and await asyncio.to_thread(_verify_dir, target, info):
        return target
    bucket = await open_blob_bucket(js)
    blobs: dict[str, bytes] = {}
    for filename in ADAPTER_FILES:
        try:
            data = await read_blob(js, bucket, adapter_object_name(info.name, filename))
        except NotFoundError:  # ObjectNotFoundError, ObjectDeletedError
            raise _integrity_error(f"adapter {info.name}: {filename} is missing from the blob store") from None
        digest = await asyncio.to_thread(sha256_hex, data)
        if digest != info.sha256[filename]:
            raise _integrity_error(f"adapter {info.name}: sha256 mismatch for {filename} "
                                   f"(registered {info.sha256[filename][:12]}, got {digest[:12]})")
        blobs[filename] = data
    return await asyncio.to_thread(_install, dest, target, blobs, info)
