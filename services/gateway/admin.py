"""The adapter admin API (admin key only, see auth.py): upload, list, get and delete LoRA adapters.

`POST /v1/adapters` takes multipart/form-data: a `name` field and the two PEFT files, each part named (by field
name or by filename) adapter_config.json or adapter_model.safetensors. The files are read with a byte budget of
--max-upload-mb (413 beyond it, before anything is staged), staged in the JetStream object store and registered
with the adapter store (services/adapter_store/client.py), whose validation errors pass through as they are.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from services.adapter_store.client import delete_adapter, get_adapter, list_adapters, register_adapter
from services.gateway.mesh_link import GatewayMesh
from shared.mesh_config import MeshConfig
from shared.nats_client import MeshError
from shared.openai_protocol import OpenAIError
from shared.protocol import ADAPTER_FILES, ADAPTER_NAME_PATTERN, AdapterInfo

log = logging.getLogger(__name__)

FORM_OVERHEAD = 64 * 2**10  # multipart boundaries, part headers and the name field, on top of the files
MAX_NAME_BYTES = 1024
READ_CHUNK = 256 * 2**10


def adapter_json(info: AdapterInfo) -> dict[str, Any]:
    return {"id": info.name, "object": "adapter", **dataclasses.asdict(info)}


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(f"the adapter upload is larger than the limit of {limit} bytes (--max-upload-mb)",
                       status=413, code="upload_too_large")


class _Budget:
    """Bytes an upload may still read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    async def read(self, part: BodyPartReader, field_limit: int | None = None) -> bytes:
        """The part's bytes; 413 once the whole upload passes the limit, 400 past `field_limit` for this part."""
        data = bytearray()
        while chunk := await part.read_chunk(READ_CHUNK):
            self.used += len(chunk)
            data += chunk
            if self.used > self.limit:
                raise too_large(self.limit)
            if field_limit is not None and len(data) > field_limit:
                raise OpenAIError(f"form field {part.name!r} is too long", param=part.name, code="invalid_upload")
        return bytes(data)


def _file_key(part: BodyPartReader) -> str | None:
    """Which adapter file a part holds: its field name, else its file name (without directories), if known."""
    if part.name in ADAPTER_FILES:
        return part.name
    filename = (part.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return filename if filename in ADAPTER_FILES else None


async def read_upload(request: web.Request, limit: int) -> tuple[str, dict[str, bytes]]:
    """(name, files) of a multipart adapter upload; OpenAIError 400 (malformed) or 413 (over `limit`)."""
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD:
        raise too_large(limit)
    if not request.content_type.startswith("multipart/"):
        raise OpenAIError("expected multipart/form-data with a `name` field and the files "
                          f"{' and '.join(ADAPTER_FILES)}", code="invalid_upload")
    budget = _Budget(limit)
    name: str | None = None
    files: dict[str, bytes] = {}
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise OpenAIError("nested multipart bodies are not supported", code="invalid_upload")
            key = _file_key(part)
            if key is not None:
                if key in files:
                    raise OpenAIError(f"{key} is given twice", param=key, code="invalid_upload")
                files[key] = await budget.read(part)
            elif part.name == "name" and not part.filename:
                raw = await budget.read(part, MAX_NAME_BYTES)
                name = raw.decode("utf-8", errors="replace").strip()
            else:
                raise OpenAIError(f"unexpected form part {part.name or part.filename!r}; expected `name`, "
                                  f"{' and '.join(ADAPTER_FILES)}", code="invalid_upload")
    except (ValueError, RuntimeError, HttpProcessingError) as exc:  # aiohttp: malformed multipart
        raise OpenAIError(f"malformed multipart body: {exc}", code="invalid_upload") from None
    if not name:
        raise OpenAIError("name: the form field `name` (the adapter's name) is required", param="name")
    if not ADAPTER_NAME_PATTERN.match(name):
        raise OpenAIError(f"name: {name!r} is not a valid adapter name (letters, digits, '.', '_', '-'; "
                          "at most 128 characters, starting with a letter or digit)", param="name",
                          code="invalid_adapter_name")
    missing = [f for f in ADAPTER_FILES if f not in files]
    if missing:
        raise OpenAIError(f"missing file part {' and '.join(missing)}", param=missing[0], code="invalid_upload")
    return name, files


async def _store(call) -> Any:
    """Await a store call; MeshError passes through, anything else (JetStream trouble) becomes 503."""
    try:
        return await call
    except MeshError:
        raise
    except Exception as exc:  # nats.js errors: no JetStream, bucket trouble, connection closed
        log.warning("adapter store call failed: %s: %s", type(exc).__name__, exc)
        raise MeshError.of(503, f"the adapter store is unavailable: {type(exc).__name__}: {exc}",
                           "service_unavailable", "store_unavailable") from None


class AdminRoutes:
    """Handlers of /v1/adapters*."""

    def __init__(self, mesh: GatewayMesh, config: MeshConfig) -> None:
        self.mesh = mesh
        self.config = config

    async def upload(self, request: web.Request) -> web.Response:
        name, files = await read_upload(request, self.config.max_upload_bytes)
        # shielded: a client that hangs up mid-registration must not leave it half done
        info = await asyncio.shield(_store(register_adapter(self.mesh.nc, name, files,
                                                            timeout=self.config.request_timeout)))
        self.mesh.adapters[info.name] = info
        log.info("adapter %s registered (rank %d, %d bytes)", info.name, info.rank, info.size_bytes)
        return web.json_response(adapter_json(info), status=201)

    async def list(self, request: web.Request) -> web.Response:
        adapters = await _store(list_adapters(self.mesh.nc, timeout=self.config.request_timeout))
        return web.json_response({"object": "list", "data": [adapter_json(info) for info in adapters]})

    async def get(self, request: web.Request) -> web.Response:
        info = await _store(get_adapter(self.mesh.nc, request.match_info["name"],
                                        timeout=self.config.request_timeout))
        return web.json_response(adapter_json(info))

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await asyncio.shield(_store(delete_adapter(self.mesh.nc, name, timeout=self.config.request_timeout)))
        self.mesh.adapters.pop(name, None)
        return web.json_response({"id": name, "object": "adapter", "deleted": True})


def add_routes(app: web.Application, mesh: GatewayMesh, config: MeshConfig) -> None:
    routes = AdminRoutes(mesh, config)
    app.router.add_post("/v1/adapters", routes.upload)
    app.router.add_get("/v1/adapters", routes.list)
    app.router.add_get("/v1/adapters/{name}", routes.get)
    app.router.add_delete("/v1/adapters/{name}", routes.delete)
