"""What other services call to reach the adapter store: stage and register files, query, delete, fetch blobs.

Upload path: `stage_adapter` puts the files under staging_object_name(staging_id, file) in ADAPTER_BLOB_BUCKET,
then `register_adapter` asks the store (RegisterAdapter), which validates them, moves them to
adapter_object_name(name, file) and answers AdapterInfo. Workers call `fetch_adapter` on first use: it downloads
the files, checks each sha256 against the AdapterInfo and writes them into a local directory atomically.
Light on imports (no torch): the gateway imports this module.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, DigestMismatchError, NotFoundError
from nats.js.object_store import ObjectStore

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
            result = await bucket.get(adapter_object_name(info.name, filename))
        except NotFoundError:  # ObjectNotFoundError, ObjectDeletedError
            raise _integrity_error(f"adapter {info.name}: {filename} is missing from the blob store") from None
        except DigestMismatchError:  # the stored chunks do not match the object's own digest
            raise _integrity_error(f"adapter {info.name}: sha256 mismatch for {filename} (corrupt chunks)") from None
        data = bytes(result.data or b"")
        digest = await asyncio.to_thread(sha256_hex, data)
        if digest != info.sha256[filename]:
            raise _integrity_error(f"adapter {info.name}: sha256 mismatch for {filename} "
                                   f"(registered {info.sha256[filename][:12]}, got {digest[:12]})")
        blobs[filename] = data
    return await asyncio.to_thread(_install, dest, target, blobs, info)
