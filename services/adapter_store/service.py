"""The adapter_store service: answers RegisterAdapter, ListAdapters and AdapterQuery (get, delete) over NATS.

Replicas share the work in the queue group ADAPTER_STORE_QUEUE; their state is all in JetStream (store.py), so
any replica answers any request. After a registration or a deletion the store publishes an AdapterEvent on
SUBJECT_ADAPTER_EVENTS, which workers and gateways follow.
"""
from __future__ import annotations

import argparse
import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.adapter_store.store import AdapterStore
from shared.adapters import BaseModelShape
from shared.mesh_config import MeshConfig
from shared.nats_client import publish, subscribe_handler, sync_with_server
from shared.protocol import (
    ADAPTER_STORE_QUEUE, SUBJECT_ADAPTER_DELETE, SUBJECT_ADAPTER_EVENTS, SUBJECT_ADAPTER_GET, SUBJECT_ADAPTER_LIST,
    SUBJECT_ADAPTER_REGISTER, AdapterEvent, AdapterInfo, AdapterList, AdapterQuery, ListAdapters, RegisterAdapter,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_LORA_RANK = 256
_DRAIN_TIMEOUT_S = 30.0  # how long stop() lets a registration in flight finish


class AdapterStoreService:
    """A handler per message type over one AdapterStore."""

    name = "adapter_store"

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self._nc: NATS | None = None
        self._subs: list = []

    async def start(self, nc: NATS) -> None:
        """Open the buckets, then answer the store's subjects (queue group: replicas share them)."""
        self._nc = nc
        await self.store.open(nc.jetstream())
        log.info("adapter store for %s (fingerprint %s, max rank %d)", self.store.base_model,
                 self.store.base_fingerprint, self.store.max_lora_rank)
        routes = [
            (SUBJECT_ADAPTER_REGISTER, RegisterAdapter, self.on_register),
            (SUBJECT_ADAPTER_LIST, ListAdapters, self.on_list),
            (SUBJECT_ADAPTER_GET, AdapterQuery, self.on_get),
            (SUBJECT_ADAPTER_DELETE, AdapterQuery, self.on_delete),
        ]
        for subject, message_type, handler in routes:
            self._subs.append(await subscribe_handler(nc, subject, (message_type,), handler, queue=ADAPTER_STORE_QUEUE,
                                                      span_name=f"adapter_store {subject.rsplit('.', 1)[-1]}"))
        await sync_with_server(nc)  # the server has the subscriptions: "started" means requests find us

    async def stop(self) -> None:
        """Stop taking requests; a request being handled finishes (up to _DRAIN_TIMEOUT_S)."""
        subs, self._subs = self._subs, []
        if self._nc is None or self._nc.is_closed:
            return
        for sub in subs:
            try:
                await asyncio.wait_for(sub.drain(), _DRAIN_TIMEOUT_S)
            except Exception as exc:  # timed out, or the connection is draining/closing already
                log.debug("drain of %s: %r", sub.subject, exc)
                try:
                    await sub.unsubscribe()
                except Exception:
                    pass

    async def on_register(self, msg: Msg, req: RegisterAdapter) -> AdapterInfo:
        info = await self.store.register(req.name, req.staging_id)
        log.info("registered adapter %s (rank %d, %s, %d bytes)", info.name, info.rank, info.dtype, info.size_bytes)
        await publish(self._nc, SUBJECT_ADAPTER_EVENTS, AdapterEvent("registered", info))
        return info

    async def on_list(self, msg: Msg, req: ListAdapters) -> AdapterList:
        return AdapterList(await self.store.list())

    async def on_get(self, msg: Msg, req: AdapterQuery) -> AdapterInfo:
        return await self.store.get(req.name)

    async def on_delete(self, msg: Msg, req: AdapterQuery) -> AdapterInfo:
        info = await self.store.delete(req.name)
        log.info("deleted adapter %s", info.name)
        await publish(self._nc, SUBJECT_ADAPTER_EVENTS, AdapterEvent("deleted", info))
        return info


def build_store_service(args: argparse.Namespace, config: MeshConfig | None = None) -> AdapterStoreService:
    """The service for the engine flags in `args` (--model, --served-model-name, --max-lora-rank, --data-dir).

    Reads only the base model's config.json (converting the default GGUF model once if needed). CLIError when
    the model cannot be found or read.
    """
    from transformers import AutoConfig

    from services.cli import CLIError, mesh_config
    from shared.model_provisioning import ModelNotFoundError, resolve_model

    config = config or mesh_config(args)
    try:
        resolved = resolve_model(getattr(args, "model", None), config.data_dir)
        shape = BaseModelShape.from_hf_config(AutoConfig.from_pretrained(resolved.path))
    except ModelNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except (OSError, ValueError, AttributeError) as exc:  # unreadable or non-Llama config.json
        raise CLIError(f"cannot read the base model's config: {exc}") from None
    max_rank = getattr(args, "max_lora_rank", None) or DEFAULT_MAX_LORA_RANK
    if max_rank < 1:
        raise CLIError(f"--max-lora-rank must be >= 1, got {max_rank}")
    base_model = config.served_model_name or resolved.name
    return AdapterStoreService(AdapterStore(shape, base_model, max_rank))


def serve_command(args: argparse.Namespace) -> int:
    """`caraserve serve adapter_store`: run the store until SIGTERM/SIGINT."""
    from services.cli import mesh_config, run_mesh_service

    config = mesh_config(args)
    # Built before run_service so a bad --model fails as a one-line CLIError, not inside the event loop.
    service = build_store_service(args, config)
    return run_mesh_service(lambda: service, config, "adapter_store")
