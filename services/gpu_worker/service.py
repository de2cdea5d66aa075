"""The gpu_worker service: the engine on the mesh.

Handlers: worker_subject(id, "generate") (requests the scheduler placed here), worker_subject(id, "cancel")
(the gateway's client went away) and SUBJECT_ADAPTER_EVENTS (a deleted adapter is unloaded: running requests
finish, new ones are refused). Tokens go straight to each request's `reply_to` inbox as TokenChunks.

The engine is synchronous and not thread-safe, so one coroutine (`_engine_loop`) owns it, and every engine call
runs on one step thread: each pass takes what queued on the event loop since the last one (admissions,
cancellations, adapter registrations and unloads), carries it out on the step thread followed by one
`engine.step()`, and settles the results on the loop, which keeps moving messages while the model computes.
Adapters come from the adapter store on first use (metadata by request, files from the object store, sha256
checked) and are validated by the engine's loader.
A heartbeat with the worker's load goes out every `heartbeat_interval` seconds. Requests of a gateway whose own
heartbeats stopped for `worker_timeout` are aborted: a crashed gateway cannot send their CancelRequests.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NATS

from services.adapter_store.client import fetch_adapter, get_adapter
from services.gpu_worker.engine.llm_engine import EngineRequestError, LLMEngine
from services.gpu_worker.engine.sequence import FinishReason, RequestOutput, SamplingParams, SamplingParamsError
from services.gpu_worker.output_view import visible_logprobs
from services.scheduler.perf_model import PerfModel
from shared.adapters import LoRAAdapter
from shared.mesh_config import MeshConfig
from shared.nats_client import MeshError, flush_writes, publish, subscribe_handler, sync_with_server
from shared.wire import ProtocolError, decode
from shared.protocol import (
    SUBJECT_ADAPTER_EVENTS,
    SUBJECT_GATEWAY_HEARTBEAT,
    SUBJECT_HEARTBEAT,
    AdapterEvent,
    CancelRequest,
    ErrorReply,
    GatewayHeartbeat,
    GenerateRequest,
    TokenChunk,
    TokenLogprobs,
    WorkerHeartbeat,
    worker_subject,
)

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 10.0  # on stop, in-flight requests get this long to finish before they are failed
MAX_CONCURRENT_FETCHES = 4  # adapters a worker fetches from the store at once (the rest queue)
MAX_FINISHED_REPORTED = 256  # finished requests' output lengths per heartbeat (the schedulers' averages)
# The step thread gives up the GIL at every torch op and must win it back for the model's Python between ops; while
# the event loop is busy (fetching and verifying cold adapters during a burst) each win waited up to Python's
# default 5 ms switch interval. A step of 32 requests took 190 ms next to an idle thread, 11.7 s next to a busy
# Python thread at 5 ms, 0.66 s at 0.5 ms (in-process measurement on the 2-core CPU); a 512-adapter burst through
# the mesh went from 39.6 to 42.0 tokens/s (one burst each, the same requests).
GIL_SWITCH_INTERVAL_S = 0.0005


def _adapter_unavailable(exc: ValueError) -> MeshError:
    """The reply for an adapter the engine refused (EngineRequestError carries its status; validation is 400)."""
    return MeshError.of(getattr(exc, "status", 400), str(exc), code="adapter_unavailable")


def _worker_stopped() -> ErrorReply:
    """The reply for a request the worker stopped before it reached the engine."""
    return ErrorReply(503, "the worker shut down before the request started", "service_unavailable", "worker_stopped")


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "worker"
    return f"{host}-{os.getpid()}"


@dataclass
class _Admission:
    """A placed request waiting for the engine loop to add it."""

    request: GenerateRequest
    params: SamplingParams
    adapter: str | None


@dataclass
class _EnginePass:
    """One trip to the step thread: planned on the event loop from what queued since the last trip, carried out on
    the step thread (engine calls, then one step), settled on the loop. Every engine call runs on the step thread:
    the engine is not thread-safe, and its torch work (registering an adapter copies it into the pools, cpu-assist
    shares it) on another thread starts a second OpenMP team that spins on the cores the step needs."""

    loads: list[tuple[LoRAAdapter, asyncio.Future]]  # fetched, parsed adapters to register (their futures: _load's)
    unloads: list[str]  # deleted from the store
    evictions: list[str]  # least recently used beyond max_cpu_loras
    cancels: set[str]
    admissions: list[_Admission]  # including those waiting for an adapter in `loads`
    stopped: bool
    # written on the step thread
    load_errors: dict[str, ErrorReply] = field(default_factory=dict)  # adapter -> why it was not registered
    errors: list[tuple[GenerateRequest, ErrorReply]] = field(default_factory=list)  # admissions refused
    added: list[_Admission] = field(default_factory=list)
    engine_s_at_admission: float = 0.0
    outputs: list[RequestOutput] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.unloads or self.evictions or self.cancels or self.admissions)


@dataclass
class _Running:
    request: GenerateRequest
    params: SamplingParams
    engine_s_at_admission: float  # GpuWorkerService._engine_s when it was added to the engine
    arrived: float = field(default_factory=time.monotonic)


class GpuWorkerService:
    name = "gpu_worker"

    def __init__(self, engine: LLMEngine, config: MeshConfig, worker_id: str | None = None,
                 step_thread: ThreadPoolExecutor | None = None, perf_model: PerfModel | None = None) -> None:
        self.engine = engine
        self.config = config
        # the step costs rank-aware placement predicts with (None: the schedulers place here by load only)
        self.perf_model = perf_model
        self.slo_tpot_s = (config.slo_tpot_ms / 1e3 if config.slo_tpot_ms
                           else perf_model.default_slo_tpot_s() if perf_model else 0.0)
        self.slo_ttft_s = config.slo_ttft_ms / 1e3 if config.slo_ttft_ms else 0.0
        self._finished: list[tuple[str, int]] = []  # (adapter, output tokens) since the last heartbeat
        self.worker_id = worker_id or config.worker_id or default_worker_id()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.worker_id):
            raise ValueError(f"worker id {self.worker_id!r}: use letters, digits, '_' or '-' (max 64)")
        self.base_fingerprint = engine.base_shape.fingerprint()
        self.device = str(engine.config.torch_device())  # fixed for the engine's life: not re-probed per step
        self._adapter_dir = Path(tempfile.mkdtemp(prefix=f"caraserve-{self.worker_id}-adapters-"))
        self._nc: NATS | None = None
        self._js = None
        self._subs: list = []
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()
        self._admissions: list[_Admission] = []
        self._cancels: list[str] = []
        self._unloads: list[str] = []
        self._running: dict[str, _Running] = {}
        self._engine_s = 0.0  # seconds spent in engine steps so far (TokenChunk.engine_s)
        self._loading: dict[str, asyncio.Task] = {}  # adapter name -> its load (fetch, parse, hand to the loop)
        # at most this many adapters fetched at once: a burst over 50 cold adapters pulled ~400 MB through one
        # connection together, and some fetches timed out before any finished
        self._fetch_slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        self._last_used: OrderedDict[str, None] = OrderedDict()  # adapters requested here, least recent first
        self._wanted: dict[str, int] = {}  # adapter -> requests between arrival and admission
        # requests waiting for their adapter's load (see on_generate): adapter -> its requests; request id -> adapter
        self._awaiting: dict[str, list[_Admission]] = {}
        self._arrivals: dict[str, str] = {}
        self._fetched: dict[str, Path] = {}  # adapter -> its files in _adapter_dir
        self._loads: list[tuple[LoRAAdapter, asyncio.Future]] = []  # fetched, parsed adapters for the loop to register
        # the adapters the engine holds, as the loop sees them: added when a pass registered one, dropped when a pass
        # is planned to unload one (the engine itself is only touched on the step thread)
        self._registered: set[str] = set(engine.adapters.registered)
        self._pass: _EnginePass | None = None  # the pass on the step thread now
        self._gateways_seen: dict[str, float] = {}  # gateway id -> monotonic time of its last heartbeat
        self._accepting = False
        self._stopped = asyncio.Event()
        self.crashed = asyncio.Event()  # the engine loop failed: the process exits 1 (shared/service_runtime.py)
        # Steps always run on one thread, off the event loop. Give the thread that built the engine: on CPU a step
        # runs ~25% slower on another thread than the one that loaded the weights (measured; see build_worker).
        self._step_thread = step_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._perf_model_dict = perf_model.to_dict() if perf_model else None
        self._snapshot: WorkerHeartbeat = self._heartbeat()

    # ---- lifecycle ----
    async def start(self, nc: NATS) -> None:
        self._nc, self._js = nc, nc.jetstream()
        self._subs = [
            await subscribe_handler(nc, worker_subject(self.worker_id, "generate"), (GenerateRequest,),
                                    self.on_generate, span_name="worker.generate"),
            await subscribe_handler(nc, worker_subject(self.worker_id, "cancel"), (CancelRequest,), self.on_cancel,
                                    span_name="worker.cancel"),
            await subscribe_handler(nc, SUBJECT_ADAPTER_EVENTS, (AdapterEvent,), self.on_adapter_event,
                                    span_name="worker.adapter_event"),
            await nc.subscribe(SUBJECT_GATEWAY_HEARTBEAT, cb=self.on_gateway_heartbeat),  # frequent: no span
        ]
        await sync_with_server(nc)  # the server has the subscriptions before we announce ourselves
        self._accepting = True
        self._tasks = [asyncio.create_task(self._engine_loop()), asyncio.create_task(self._heartbeat_loop())]
        await self._publish_heartbeat()
        log.info("worker %s serving %s on %s", self.worker_id, self.engine.model_name, self._snapshot.device)

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish (up to DRAIN_TIMEOUT_S), fail the rest, free all."""
        self._accepting = False
        if self._nc is not None and self._nc.is_connected:
            await self._publish_heartbeat()  # ready=False: schedulers stop placing here
        for sub in self._subs[:1]:
            await sub.unsubscribe()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while ((self._running or self._admissions or self._arrivals or self._pass) and loop.time() < deadline
               and not self._tasks[0].done()):
            await asyncio.sleep(0.05)
        loads = list(self._loading.values())  # adapters still loading: stop them and fail their requests now
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for adapter in list(self._awaiting):
            await self._fail_awaiting(adapter, _worker_stopped())
        if self._tasks[0].done():  # the engine loop failed: nothing else will answer these
            await self._answer_all([a.request for a in self._admissions], _worker_stopped())
            self._admissions.clear()
        self._cancels += [*self._running, *(a.request.request_id for a in self._unadded())]
        self._stopped.set()
        self._wake.set()
        for task in self._tasks:
            if task is not self._tasks[0]:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs[1:]:
            await sub.unsubscribe()
        self._step_thread.shutdown(wait=True)
        shutil.rmtree(self._adapter_dir, ignore_errors=True)

    # ---- handlers ----
    async def on_generate(self, msg, request: GenerateRequest) -> None:
        try:
            if not self._accepting:
                raise MeshError.of(503, "the worker is shutting down; retry", "service_unavailable", "worker_draining")
            try:
                params = SamplingParams(**request.sampling)
            except (SamplingParamsError, TypeError) as exc:
                raise MeshError.of(400, str(exc)) from None
            adapter = None if request.model == self.engine.model_name else request.model
        except MeshError as exc:
            await publish(self._nc, request.reply_to, exc.reply)
            return
        if adapter is None:
            self._admit(request, params, None)
            return
        self._wanted[adapter] = self._wanted.get(adapter, 0) + 1  # not evicted until admitted (or refused)
        if adapter in self._registered:
            self._admit(request, params, adapter)
            return
        # A cold adapter: the request waits in _awaiting while a task loads the adapter (one load however many
        # requests want it), and the engine loop admits it in the pass that registers the adapter. Awaiting the load
        # here held every later request behind it (nats-py runs one subscription's callbacks one at a time), and a
        # task per request that admitted itself after the load reached the engine one step boundary after the
        # registration, 1-2 s into a burst of long prompts on a CPU.
        self._arrivals[request.request_id] = adapter
        self._awaiting.setdefault(adapter, []).append(_Admission(request, params, adapter))
        if adapter not in self._loading:
            self._loading[adapter] = asyncio.create_task(self._load(adapter))
            self._loading[adapter].add_done_callback(lambda _: self._loading.pop(adapter, None))

    def _admit(self, request: GenerateRequest, params: SamplingParams, adapter: str | None) -> None:
        """Hand a request whose adapter (if any) is registered to the engine loop."""
        self._mark_used(adapter)
        self._admissions.append(_Admission(request, params, adapter))
        self._wake.set()

    def _mark_used(self, adapter: str | None) -> None:
        if adapter is not None:
            self._last_used[adapter] = None
            self._last_used.move_to_end(adapter)

    def _unwant(self, adapter: str) -> None:
        self._wanted[adapter] -= 1
        if not self._wanted[adapter]:
            del self._wanted[adapter]

    async def on_cancel(self, msg, cancel: CancelRequest) -> None:
        adapter = self._arrivals.pop(cancel.request_id, None)
        if adapter is not None:  # still waiting for its adapter: never reaches the engine (the load goes on)
            self._awaiting[adapter] = [a for a in self._awaiting.get(adapter, ())
                                       if a.request.request_id != cancel.request_id]
            self._unwant(adapter)
            return
        self._cancels.append(cancel.request_id)
        self._wake.set()

    async def on_gateway_heartbeat(self, msg) -> None:
        try:
            hb = decode(msg.data, GatewayHeartbeat)
        except ProtocolError as exc:
            log.warning("malformed gateway heartbeat: %s", exc)
            return
        self._gateways_seen[hb.gateway_id] = time.monotonic()

    def _orphans(self, now: float) -> list[str]:
        """Running requests whose gateway has been silent for worker_timeout (since the later of its last heartbeat
        and the request's arrival): nobody reads their tokens, so they only hold KV blocks and adapter slots."""
        timeout = self.config.worker_timeout
        return [rid for rid, r in self._running.items() if r.request.gateway_id
                and now - max(self._gateways_seen.get(r.request.gateway_id, 0.0), r.arrived) > timeout]

    async def on_adapter_event(self, msg, event: AdapterEvent) -> None:
        if event.event == "deleted":
            self._unloads.append(event.adapter.name)
            self._wake.set()

    # ---- adapters ----
    async def _load(self, name: str) -> None:
        """Fetch and parse `name` and hand it to the engine loop, which registers it and admits the requests waiting
        for it; if any of that fails, those requests get the error (never silence)."""
        try:
            await self._fetch_and_load(name)
        except MeshError as exc:
            await self._fail_awaiting(name, exc.reply)
        except Exception as exc:  # NATS timeouts, a store gone
            log.warning("adapter %s could not be loaded: %s: %s", name, type(exc).__name__, exc)
            await self._fail_awaiting(name, ErrorReply(
                503, f"adapter {name!r} could not be loaded ({type(exc).__name__}); retry",
                "service_unavailable", "adapter_load_failed"))

    async def _fail_awaiting(self, adapter: str, reply: ErrorReply) -> None:
        """Answer every request waiting for `adapter`'s load with `reply`."""
        waiting = self._take_awaiting(adapter)
        for _ in waiting:
            self._unwant(adapter)
        await self._answer_all([a.request for a in waiting], reply)

    def _take_awaiting(self, adapter: str) -> list[_Admission]:
        """Remove and return the requests waiting for `adapter`'s load."""
        waiting = self._awaiting.pop(adapter, [])
        for a in waiting:
            self._arrivals.pop(a.request.request_id, None)
        return waiting

    def _unadded(self) -> list[_Admission]:
        """Admitted requests the engine has not taken yet: the pass in flight's, then those queued for the next."""
        return (self._pass.admissions if self._pass else []) + self._admissions

    async def _answer_all(self, requests: list[GenerateRequest], reply: ErrorReply) -> None:
        """Send `reply` to each request's client."""
        await self._answer([(request, reply) for request in requests])

    async def _answer(self, answers: list[tuple[GenerateRequest, ErrorReply]]) -> None:
        """Send each request's client its error while the NATS connection lasts (once it is gone, the gateways
        notice the silence instead)."""
        for request, reply in answers:
            if self._nc is None or not self._nc.is_connected:
                return
            try:
                await publish(self._nc, request.reply_to, reply)
            except Exception as exc:  # the connection went away meanwhile
                log.warning("could not answer request %s: %s", request.request_id, exc)
                return

    async def _fetch(self, name: str) -> Path:
        """The adapter's metadata and files from the store, MAX_CONCURRENT_FETCHES at a time (parsing is not held
        by this limit, nor is registration, which waits for a step boundary that many adapters share)."""
        async with self._fetch_slots:
            try:
                info = await get_adapter(self._nc, name, timeout=self.config.request_timeout)
            except MeshError as exc:
                if exc.reply.status == 404:
                    raise MeshError.of(404, f"The model `{name}` does not exist or you do not have access to it.",
                                       code="model_not_found", param="model") from None
                raise
            if info.base_fingerprint != self.base_fingerprint:
                raise MeshError.of(400, f"adapter {name!r} was made for another base model ({info.base_model})",
                                   code="adapter_base_mismatch")
            path = await fetch_adapter(self._js, info, self._adapter_dir)
        self._fetched[name] = path
        return path

    async def _fetch_and_load(self, name: str) -> None:
        t0 = time.perf_counter()
        path = await self._fetch(name)
        t_fetched = time.perf_counter()
        try:  # parsed on a thread of its own while the engine steps: parsing runs no torch op (shared/adapters.py
            # converts with numpy), so it starts no second OpenMP thread team. On the step thread it waited for the
            # step in progress, ~1-2 s into a burst of long prompts on a CPU, for every cold adapter
            adapter = await asyncio.to_thread(self.engine.read_adapter, name, path)
        except ValueError as exc:  # EngineRequestError or AdapterValidationError
            raise _adapter_unavailable(exc) from None
        t_parsed = time.perf_counter()
        loaded = asyncio.get_running_loop().create_future()
        self._loads.append((adapter, loaded))
        self._wake.set()
        await loaded
        log.info("adapter %s (rank %d) loaded in %.0f ms: fetch %.0f (queue included), parse %.0f, register %.0f",
                 name, adapter.max_rank, 1e3 * (time.perf_counter() - t0), 1e3 * (t_fetched - t0),
                 1e3 * (t_parsed - t_fetched), 1e3 * (time.perf_counter() - t_parsed))

    # ---- the engine loop ----
    async def _engine_loop(self) -> None:
        try:
            await self._run_engine()
        except Exception as exc:  # a bug or a device error in step(): the engine's state cannot be trusted
            log.exception("the engine loop failed; this worker stops")
            self._accepting = False
            error = ErrorReply(500, f"the GPU worker's engine failed ({type(exc).__name__}: {exc}); retry",
                               "api_error", "engine_failed")
            lost = [r.request for r in self._running.values()] + [a.request for a in self._unadded()]
            lost += [a.request for waiting in self._awaiting.values() for a in waiting]
            self._running.clear()
            self._admissions.clear()
            self._awaiting.clear()
            self._arrivals.clear()
            await self._answer_all(lost, error)
            self.crashed.set()

    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self._plan_pass()
            if self._stopped.is_set() and plan.is_empty() and not self.engine.has_unfinished():
                return
            if plan.is_empty() and not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            self._pass = plan  # kept if the pass raises: _engine_loop answers its requests
            await loop.run_in_executor(self._step_thread, self._execute_pass, plan)
            self._pass = None
            await self._settle_pass(plan)
            self._snapshot = self._heartbeat()

    def _plan_pass(self) -> _EnginePass:
        """On the loop: take what queued since the last pass (fetched adapters and the requests waiting for them,
        deletions, cancels, admissions) and choose the adapters to evict, for the step thread to carry out."""
        loads, self._loads = [(adapter, f) for adapter, f in self._loads if not f.done()], []  # done: cancelled
        ready = [a for adapter, _ in loads for a in self._take_awaiting(adapter.name)]  # admitted in this pass
        for a in ready:
            self._mark_used(a.adapter)
        unloads, self._unloads = self._unloads, []
        for name in unloads:
            self._last_used.pop(name, None)
        admissions, self._admissions = self._admissions + ready, []
        cancels, self._cancels = set(self._cancels), []
        plan = _EnginePass(loads, unloads, self._evict_idle_adapters(), cancels, admissions,
                           self._stopped.is_set())
        self._registered.difference_update(plan.unloads + plan.evictions)  # refused from now on
        return plan

    def _execute_pass(self, plan: _EnginePass) -> None:
        """On the step thread: every engine call of the pass, then one step if anything is unfinished. Results go
        into `plan` for _settle_pass. The loop touches no engine state meanwhile."""
        engine = self.engine
        for adapter, _ in plan.loads:
            try:
                if adapter.name not in engine.adapters.registered:
                    engine.register_adapter(adapter)
            except ValueError as exc:  # EngineRequestError (409: in use, being removed) or AdapterValidationError
                plan.load_errors[adapter.name] = _adapter_unavailable(exc).reply
        for name in plan.unloads + plan.evictions:
            if name in engine.adapters.registered:
                engine.unload_adapter(name)
        for request_id in plan.cancels:
            engine.abort(request_id)  # frees its KV blocks and adapter reference; final output next step
        plan.engine_s_at_admission = self._engine_s
        for a in plan.admissions:
            req = a.request
            if req.request_id in plan.cancels:
                if plan.stopped:
                    plan.errors.append((req, _worker_stopped()))
                continue
            if a.adapter in plan.load_errors:
                plan.errors.append((req, plan.load_errors[a.adapter]))
                continue
            try:
                prompt = engine.encode_chat(req.messages) if req.kind == "chat" else req.prompt
                engine.add_request(req.request_id, prompt, a.params, adapter=a.adapter)
            except EngineRequestError as exc:
                plan.errors.append((req, ErrorReply(exc.status, str(exc), code=exc.code)))
                continue
            plan.added.append(a)
        if engine.has_unfinished():
            t0 = time.perf_counter()
            plan.outputs = engine.step()
            self._engine_s += time.perf_counter() - t0  # written here only, read on the loop between passes

    async def _settle_pass(self, plan: _EnginePass) -> None:
        """On the loop: answer the adapter loads, admit requests that came for a registered adapter during the
        pass, record the added requests, send the errors and the step's tokens."""
        for adapter, future in plan.loads:
            reply = plan.load_errors.get(adapter.name)
            if reply is None:
                self._registered.add(adapter.name)
                for a in self._take_awaiting(adapter.name):  # arrived during the pass: the next one admits them
                    self._admit(a.request, a.params, a.adapter)
            if future.done():  # its load was cancelled meanwhile (stop)
                continue
            if reply is None:
                future.set_result(None)
            else:
                future.set_exception(MeshError(reply))  # its _load fails the requests that came meanwhile
        for a in plan.admissions:
            if a.adapter is not None:
                self._unwant(a.adapter)  # pinned by the engine from here on, if added
        for a in plan.added:
            self._running[a.request.request_id] = _Running(a.request, a.params, plan.engine_s_at_admission)
        await self._answer(plan.errors)
        await self._publish_outputs(plan.outputs)
        if plan.outputs:  # on the socket before the next step takes the cores: on the 2-core CPU the mesh's
            await flush_writes(self._nc)  # TTFT beyond engine time fell from 6.75-7.4 to 5.3-5.7 ms

    def _evict_idle_adapters(self) -> list[str]:
        """Keep at most max_cpu_loras fetched adapters in host memory: the least recently used ones that no request
        holds or waits for go (a later request fetches them again). Their files go now; the names are returned for
        the pass to unload from the engine."""
        excess = len(self._last_used) - self.config.max_cpu_loras
        if excess <= 0:
            return []
        busy = self.engine.adapters.pinned.keys() | self.engine.adapters.in_use.keys() | self._wanted.keys()
        evicted = [n for n in self._last_used if n not in busy][:excess]
        for name in evicted:
            del self._last_used[name]
            path = self._fetched.pop(name, None)
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            log.info("adapter %s unloaded: least recently used of more than %d", name, self.config.max_cpu_loras)
        return evicted

    async def _publish_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._running.get(out.request_id)
            if entry is None:
                continue
            if out.finished:
                del self._running[out.request_id]
                if out.finish_reason != FinishReason.ABORT:
                    self._finished.append((entry.request.model if entry.request.model != self.engine.model_name
                                           else "", out.completion_tokens))
            if out.finish_reason == FinishReason.ABORT:
                if self._stopped.is_set():
                    await publish(self._nc, entry.request.reply_to, ErrorReply(
                        503, "the worker shut down before the request finished", "service_unavailable",
                        "worker_stopped"))
                continue  # cancelled by the client: nobody is listening
            logprobs = None
            if entry.params.logprobs:
                logprobs = [TokenLogprobs(i.token, i.logprob, list(i.top))
                            for i in visible_logprobs(self.engine, entry.params, out)]
            chunk = TokenChunk(
                request_id=out.request_id, worker_id=self.worker_id, text=out.new_text,
                num_tokens=len(out.new_token_ids), finished=out.finished,
                finish_reason=out.finish_reason.value if out.finish_reason else None, logprobs=logprobs,
                prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                engine_s=self._engine_s - entry.engine_s_at_admission,
            )
            await publish(self._nc, entry.request.reply_to, chunk)

    # ---- heartbeats ----
    def _heartbeat(self) -> WorkerHeartbeat:
        engine = self.engine
        registered = engine.adapters.registered

        def rank(adapter: str | None) -> int:
            return registered[adapter].max_rank if adapter in registered else 0

        ranks = [rank(s.adapter) for s in engine.scheduler.running]
        queued = [(s.prompt_len - s.num_computed, rank(s.adapter)) for s in engine.scheduler.waiting]
        # admitted next pass, or waiting for their adapter's load (rank 0 until it is registered: not known before)
        pending = self._admissions + [a for waiting in self._awaiting.values() for a in waiting]
        queued += [(a.request.prompt_tokens_hint(), rank(a.adapter)) for a in pending]
        return WorkerHeartbeat(
            worker_id=self.worker_id, model=engine.model_name, base_fingerprint=self.base_fingerprint,
            max_model_len=engine.max_model_len, max_lora_rank=engine.config.max_lora_rank,
            running=len(engine.scheduler.running), queued=len(engine.scheduler.waiting) + len(pending),
            running_ranks=ranks, resident_adapters=engine.adapter_names(),
            free_kv_blocks=engine.blocks.num_free, total_kv_blocks=engine.blocks.num_blocks,
            interval_s=self.config.heartbeat_interval, ready=self._accepting,
            device=self.device,
            perf_model=self._perf_model_dict, slo_tpot_s=self.slo_tpot_s, slo_ttft_s=self.slo_ttft_s,
            queued_prompts=queued, gpu_adapters=engine.adapters.resident,
            max_num_seqs=engine.config.max_num_seqs, block_size=engine.config.block_size,
        )

    async def _publish_heartbeat(self) -> None:
        hb = self._snapshot
        hb.ready = self._accepting
        hb.finished, self._finished = self._finished[-MAX_FINISHED_REPORTED:], []
        hb.request_ids = [*self._arrivals, *(a.request.request_id for a in self._unadded()), *self._running]
        await publish(self._nc, SUBJECT_HEARTBEAT, hb)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            orphans = self._orphans(time.monotonic())
            if orphans:
                log.warning("aborting %d request(s) of a gateway gone silent", len(orphans))
                self._cancels.extend(orphans)
                self._wake.set()
            try:
                await self._publish_heartbeat()
            except Exception as exc:  # a reconnecting connection must not end the heartbeats for good
                log.warning("heartbeat not sent: %s", exc)


def serve_command(args) -> int:
    """`caraserve serve gpu_worker`."""
    from services.cli import CLIError, mesh_config, run_mesh_service
    from services.gpu_worker.profiler import ProfilingCancelled, load_or_profile
    from services.gpu_worker.run_batch import build_engine
    from services.scheduler.perf_model import PerfModelError
    from shared.service_runtime import StartupCancelled, shutdown_requested

    config = mesh_config(args)
    args.served_model_name, args.data_dir = config.served_model_name, config.data_dir
    worker_id = config.worker_id or default_worker_id()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

    engines = []

    def build() -> GpuWorkerService:
        step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        engine = step_thread.submit(build_engine, args, shutdown_requested.is_set).result()  # on the step thread
        engines.append(engine)
        try:  # profiled on the step thread too: the times it measures are the ones requests will see
            perf_model = step_thread.submit(load_or_profile, engine, config.perf_model, config.data_dir,
                                            shutdown_requested.is_set).result()
        except PerfModelError as exc:
            raise CLIError(f"--perf-model: {exc}") from None
        except ProfilingCancelled as exc:  # SIGTERM while profiling: stop now, not after the whole profile
            raise StartupCancelled(str(exc)) from None
        return GpuWorkerService(engine, config, worker_id, step_thread, perf_model)

    try:
        return run_mesh_service(build, config, "gpu_worker")
    finally:
        for engine in engines:
            engine.close()  # cpu_prefill workers and shared-memory segments
