"""`AdapterStore`: the adapter registry over JetStream — validate staged uploads, keep blobs and metadata.

Blobs live in the object store ADAPTER_BLOB_BUCKET (staged uploads under staging/<id>/, registered adapters under
adapters/<name>/), metadata in the KV bucket ADAPTER_META_BUCKET (adapter name -> msgpack of AdapterInfo). Both
buckets use file storage, so registrations survive restarts of the store and of the NATS server. An adapter is
judged by shared.adapters.load_adapter, the same check the engine applies, against the base model's shape.
Every failure is a MeshError carrying the ErrorReply the gateway shows its caller.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import struct
import tempfile
import time
from pathlib import Path

import msgpack
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services.adapter_store.client import SAFETENSORS, open_blob_bucket, read_blob
from shared.adapters import AdapterValidationError, BaseModelShape, load_adapter
from shared.nats_client import MeshError
from shared.protocol import (
    ADAPTER_FILES, ADAPTER_META_BUCKET, ADAPTER_NAME_PATTERN, AdapterInfo, adapter_object_name, staging_object_name,
)
from shared.wire import ProtocolError, from_dict, to_dict

log = logging.getLogger(__name__)

_STAGING_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# safetensors header dtype -> torch dtype name
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64"}


def _storable(name: str | None) -> bool:
    """A valid adapter name that is also a valid KV key: no empty token ('..', a trailing '.') in its subject."""
    return bool(name and ADAPTER_NAME_PATTERN.match(name)) and ".." not in name and not name.endswith(".")


def _bad_request(message: str, code: str) -> MeshError:
    return MeshError.of(400, message, code=code, param="name" if code == "invalid_adapter_name" else None)


def _not_found(name: str) -> MeshError:
    return MeshError.of(404, f"adapter {name!r} is not registered", code="adapter_not_found", param="name")


def _exists(name: str) -> MeshError:
    return MeshError.of(409, f"adapter {name!r} is already registered; delete it first to replace it",
                        code="adapter_exists", param="name")


def safetensors_dtype(path: Path) -> str:
    """The dtype of the tensors in a safetensors file (from its JSON header), e.g. "float16"; "a+b" when mixed."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    kinds = sorted({_DTYPES.get(t["dtype"], t["dtype"].lower()) for k, t in header.items() if k != "__metadata__"})
    return "+".join(kinds)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def encode_info(info: AdapterInfo) -> bytes:
    """AdapterInfo as stored in the KV bucket."""
    return msgpack.packb(to_dict(info), use_bin_type=True)


def decode_info(value: bytes) -> AdapterInfo:
    return from_dict(AdapterInfo, msgpack.unpackb(value, raw=False))


class AdapterStore:
    """Registers, lists and deletes adapters for one base model; `open(js)` before use."""

    def __init__(self, base_shape: BaseModelShape, base_model: str, max_lora_rank: int = 256) -> None:
        self.base_shape = base_shape
        self.base_model = base_model
        self.max_lora_rank = max_lora_rank
        self.base_fingerprint = base_shape.fingerprint()
        self._js: JetStreamContext | None = None
        self._blobs: ObjectStore | None = None
        self._meta: KeyValue | None = None
        self._registering: set[str] = set()  # names with a registration in flight in this process

    async def open(self, js: JetStreamContext) -> None:
        """Bind (or create, with file storage) the blob and metadata buckets."""
        self._js = js
        self._blobs = await open_blob_bucket(js)
        try:
            self._meta = await js.key_value(ADAPTER_META_BUCKET)
        except BucketNotFoundError:
            try:
                self._meta = await js.create_key_value(
                    KeyValueConfig(bucket=ADAPTER_META_BUCKET, storage=StorageType.FILE, history=1))
            except BadRequestError:  # another replica created it first
                self._meta = await js.key_value(ADAPTER_META_BUCKET)

    # ------------------------------------------------------------ names

    def check_name(self, name: str) -> None:
        """400 invalid_adapter_name unless `name` is a valid adapter name (the engine's rule, and a KV key)."""
        if not ADAPTER_NAME_PATTERN.match(name or ""):
            raise _bad_request(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (max 128)",
                               "invalid_adapter_name")
        if not _storable(name):
            raise _bad_request(f"invalid adapter name {name!r}: no '..' and no trailing '.'", "invalid_adapter_name")
        if name == self.base_model:
            raise _bad_request(f"adapter name {name!r} is the base model's name", "invalid_adapter_name")

    # ------------------------------------------------------------ queries

    async def get(self, name: str) -> AdapterInfo:
        """The registered adapter `name`; 404 adapter_not_found otherwise."""
        if not _storable(name):
            raise _not_found(name)
        try:
            entry = await self._meta.get(name)
        except NotFoundError:  # KeyNotFoundError, also for a deleted key
            raise _not_found(name) from None
        try:
            return decode_info(entry.value)
        except (ProtocolError, ValueError) as exc:
            raise MeshError.of(500, f"adapter {name!r}: stored metadata is unreadable: {exc}", "api_error") from None

    async def list(self) -> list[AdapterInfo]:
        """Every registered adapter, sorted by name.

        The names come from the metadata stream's subjects (one STREAM.INFO request), not KeyValue.keys(): nats-py
        reads keys through a watcher that decides it has seen them all from a pending count, and with 512 adapters
        on a loaded machine it answered with none (a benchmark's GET /v1/models listed no adapter after 512 were
        registered; nats-io/nats.py users report lost keys too). Deleted names keep a marker there: get() skips them.
        """
        prefix = f"$KV.{ADAPTER_META_BUCKET}."
        info = await self._js.stream_info(f"KV_{ADAPTER_META_BUCKET}", subjects_filter=f"{prefix}>")
        names = [subject[len(prefix):] for subject in (info.state.subjects or {})]
        infos = []
        for name in sorted(set(names)):
            try:
                infos.append(await self.get(name))
            except MeshError as exc:
                if exc.reply.status != 404:  # 404: deleted since keys() answered
                    log.warning("skipping adapter %r in the list: %s", name, exc)
        return infos

    async def delete(self, name: str) -> AdapterInfo:
        """Unregister `name` and delete its blobs; returns its metadata. 404 adapter_not_found if not registered."""
        info = await self.get(name)
        await self._meta.delete(name)
        for filename in ADAPTER_FILES:
            await self._delete_object(adapter_object_name(name, filename))
        return info

    # ------------------------------------------------------------ registration

    async def register(self, name: str, staging_id: str) -> AdapterInfo:
        """Validate the files staged under `staging_id` and register them as `name`.

        400 invalid_adapter_name / invalid_adapter (with load_adapter's one-line reason), 409 adapter_exists.
        The staged objects are deleted whatever the outcome.
        """
        try:
            self.check_name(name)
            if not _STAGING_ID.match(staging_id or ""):
                raise _bad_request(f"invalid staging id {staging_id!r}", "invalid_staging_id")
            if name in self._registering:
                raise _exists(name)
            self._registering.add(name)
            try:
                return await self._register(name, staging_id)
            finally:
                self._registering.discard(name)
        finally:
            if _STAGING_ID.match(staging_id or ""):
                for filename in ADAPTER_FILES:
                    await self._delete_object(staging_object_name(staging_id, filename))

    async def _register(self, name: str, staging_id: str) -> AdapterInfo:
        try:
            await self._meta.get(name)
            raise _exists(name)
        except NotFoundError:
            pass
        with tempfile.TemporaryDirectory(prefix="caraserve-adapter-") as tmp:
            directory = Path(tmp)
            for filename in ADAPTER_FILES:
                try:
                    data = await read_blob(self._js, self._blobs, staging_object_name(staging_id, filename))
                except NotFoundError:
                    raise _bad_request(f"{filename} is missing", "invalid_adapter") from None
                (directory / filename).write_bytes(data)
            info = await asyncio.to_thread(self._validate, directory, name)
            for filename in ADAPTER_FILES:
                with open(directory / filename, "rb") as f:
                    await self._blobs.put(adapter_object_name(name, filename), f)
        try:
            await self._meta.create(name, encode_info(info))
        except KeyWrongLastSequenceError:  # another replica registered the same name meanwhile
            raise _exists(name) from None
        return info

    def _validate(self, directory: Path, name: str) -> AdapterInfo:
        """load_adapter's verdict on `directory`, and the AdapterInfo of an adapter that passes (blocking)."""
        try:
            adapter = load_adapter(directory, self.base_shape, self.max_lora_rank, name)
            dtype = safetensors_dtype(directory / SAFETENSORS)
        except AdapterValidationError as exc:
            raise _bad_request(str(exc), "invalid_adapter") from None
        paths = [directory / f for f in ADAPTER_FILES]
        return AdapterInfo(
            name=name,
            rank=adapter.max_rank,
            alpha=float(adapter.config["lora_alpha"]),
            target_modules=sorted(adapter.target_modules),
            dtype=dtype,
            size_bytes=sum(p.stat().st_size for p in paths),
            sha256={p.name: _file_sha256(p) for p in paths},
            base_model=self.base_model,
            base_fingerprint=self.base_fingerprint,
            created=time.time(),
        )

    async def _delete_object(self, object_name: str) -> None:
        try:
            await self._blobs.delete(object_name)
        except NotFoundError:
            pass
        except Exception as exc:  # cleanup must not hide the registration's own outcome
            log.warning("could not delete %s: %s", object_name, exc)
