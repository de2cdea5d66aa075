"""Every message the mesh's services exchange over NATS, and the subjects they travel on.

Wire format and checking: shared/wire.py (msgpack envelope with the protocol version and the message type;
each message is validated against its dataclass on receipt). Nothing but schemas and subject names lives here.

Request path (the stages of one request, named as in the engine's docstrings):
  gateway  --GenerateRequest-->  SUBJECT_GENERATE (queue group SCHEDULER_QUEUE: schedulers are replicas)
  scheduler picks a worker from WorkerHeartbeats, forwards the same GenerateRequest to
           worker_subject(worker_id, "generate") and replies to the gateway with Placement (or ErrorReply)
  worker   --TokenChunk...-->  GenerateRequest.reply_to (the gateway's per-request inbox; the scheduler is not on
           the token path); the last chunk has finished=True. A request that fails ends with one ErrorReply.
  gateway  --CancelRequest--> worker_subject(worker_id, "cancel") when the client disconnects.
  scheduler --WorkerLost--> SUBJECT_WORKER_LOST when a worker misses its heartbeats; gateways end that worker's
           streams with an error.
  gateway  --GatewayHeartbeat--> SUBJECT_GATEWAY_HEARTBEAT; a worker aborts the requests of a silent gateway.
Adapters: the gateway stages uploaded files in the object store bucket ADAPTER_BLOB_BUCKET, then asks the store
(RegisterAdapter on SUBJECT_ADAPTER_REGISTER); metadata (AdapterInfo) lives in the KV bucket ADAPTER_META_BUCKET;
the store announces changes as AdapterEvent; workers fetch blobs on first use and check their sha256.
Trace context (W3C traceparent) rides in NATS headers, not in these messages.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from shared.wire import PROTOCOL_VERSION  # noqa: F401  (re-exported: the version these schemas belong to)

# ---------------------------------------------------------------- subjects

SUBJECT_GENERATE = "caraserve.v1.generate"  # gateway -> scheduler (request/reply)
SCHEDULER_QUEUE = "scheduler"  # queue group of the schedulers on SUBJECT_GENERATE
SUBJECT_HEARTBEAT = "caraserve.v1.worker.heartbeat"  # worker -> schedulers and gateways
SUBJECT_WORKER_LOST = "caraserve.v1.worker.lost"  # scheduler -> gateways
SUBJECT_GATEWAY_HEARTBEAT = "caraserve.v1.gateway.heartbeat"  # gateway -> workers
SUBJECT_ADAPTER_REGISTER = "caraserve.v1.adapters.register"  # gateway -> store (request/reply)
SUBJECT_ADAPTER_LIST = "caraserve.v1.adapters.list"  # anyone -> store (request/reply)
SUBJECT_ADAPTER_GET = "caraserve.v1.adapters.get"  # anyone -> store (request/reply)
SUBJECT_ADAPTER_DELETE = "caraserve.v1.adapters.delete"  # gateway -> store (request/reply)
SUBJECT_ADAPTER_EVENTS = "caraserve.v1.adapters.events"  # store -> workers and gateways
ADAPTER_STORE_QUEUE = "adapter_store"  # queue group of the store replicas
ADAPTER_BLOB_BUCKET = "caraserve_adapter_blobs"  # JetStream object store: adapter files
ADAPTER_META_BUCKET = "caraserve_adapter_meta"  # JetStream key-value: adapter name -> AdapterInfo
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # the PEFT files of one adapter


# A valid adapter name: it is a `model` value, a KV key, part of object names and of a worker's cache path
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def worker_subject(worker_id: str, verb: str) -> str:
    """A worker's own subjects: verb "generate" (scheduler -> worker) or "cancel" (gateway -> worker)."""
    return f"caraserve.v1.worker.{worker_id}.{verb}"


def adapter_object_name(name: str, filename: str) -> str:
    """Where a registered adapter's file lives in ADAPTER_BLOB_BUCKET."""
    return f"adapters/{name}/{filename}"


def staging_object_name(staging_id: str, filename: str) -> str:
    """Where the gateway puts an uploaded file before the store has validated it."""
    return f"staging/{staging_id}/{filename}"


# ---------------------------------------------------------------- errors


@dataclass
class ErrorReply:
    """A failed request, in OpenAI's error terms; also the last message of a token stream that failed."""

    status: int  # HTTP status the gateway answers with (400, 404, 409, 413, 429, 500, 503, ...)
    message: str  # one line, shown to the API caller
    type: str = "invalid_request_error"  # OpenAI error type
    code: str | None = None  # OpenAI error code, e.g. "model_not_found"
    param: str | None = None  # the request parameter at fault, if one is


# ---------------------------------------------------------------- generation


@dataclass
class GenerateRequest:
    """One generation request, as the gateway validated it. Sent to the scheduler, forwarded as is to a worker."""

    request_id: str  # unique per request; the engine's request id
    kind: str  # "chat" (messages) or "completion" (prompt)
    model: str  # the base model's served name or an adapter name
    sampling: dict[str, Any]  # SamplingParams fields (max_tokens, temperature, top_p, seed, stop, logprobs, ...)
    reply_to: str  # the gateway inbox that receives this request's TokenChunks
    messages: list[dict[str, str]] | None = None  # chat: [{"role", "content"}]
    prompt: str | list[int] | None = None  # completion: text or token ids
    gateway_id: str = ""  # the gateway that holds the client connection
    sent_at: float = 0.0  # gateway's time.time() when sent, for queueing metrics

    def __post_init__(self) -> None:
        if self.kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', got {self.kind!r}")
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of messages (chat) and prompt (completion) must be set")

    def prompt_tokens_hint(self) -> int:
        """A rough prompt size in tokens before tokenization (about 4 characters a token), for placement."""
        if isinstance(self.prompt, list):
            return len(self.prompt)
        if self.prompt is not None:
            return max(1, len(self.prompt) // 4)
        return max(1, sum(len(m.get("content", "")) + 8 for m in self.messages or []) // 4)

    def max_tokens_hint(self, default: int = 256) -> int:
        """The request's max_tokens, or `default` when it sets none."""
        value = self.sampling.get("max_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


@dataclass
class Placement:
    """The scheduler's answer to a GenerateRequest: which worker runs it (the request has been forwarded)."""

    request_id: str
    worker_id: str


@dataclass
class TokenLogprobs:
    """One generated token for logprobs output: its text, its logprob and the most likely alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # (token text, logprob), best first


@dataclass
class TokenChunk:
    """Tokens a worker generated for one request since its last chunk; the last one has finished=True."""

    request_id: str
    worker_id: str
    text: str  # detokenized text added (never a broken UTF-8 sequence; stop strings already cut)
    num_tokens: int  # tokens this chunk adds
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last chunk
    logprobs: list[TokenLogprobs] | None = None  # when the request asked for logprobs
    prompt_tokens: int = 0  # the prompt's length in tokens
    completion_tokens: int = 0  # tokens generated so far, in total
    # seconds the worker's engine spent in steps since it admitted the request (queueing behind other requests and
    # computing): the rest of the time to this chunk is transport and service code. The gateway reports it in a
    # Server-Timing header
    engine_s: float = 0.0


@dataclass
class CancelRequest:
    """Stop a request (the client went away); the worker frees its KV blocks and adapter reference."""

    request_id: str
    reason: str = "client disconnected"


# ---------------------------------------------------------------- workers


@dataclass
class WorkerHeartbeat:
    """A worker's state, published every `interval_s`; missing several in a row means the worker is gone."""

    worker_id: str
    model: str  # the base model's served name
    base_fingerprint: str  # BaseModelShape.fingerprint() (shared/adapters.py) of the base model; adapters must match it
    max_model_len: int  # context limit in tokens
    max_lora_rank: int  # adapters above this rank are refused
    running: int  # requests being generated
    queued: int  # requests accepted, waiting for KV blocks or a batch slot
    running_ranks: list[int]  # LoRA rank of each running request (0 for the base model)
    resident_adapters: list[str]  # adapters loaded on the worker (ready without a fetch)
    free_kv_blocks: int
    total_kv_blocks: int
    interval_s: float  # time between heartbeats
    ready: bool = True  # False while starting or draining: send no new requests
    device: str = "cpu"  # where the engine runs, e.g. "cpu" or "cuda:0"
    # --- what rank-aware placement needs (services/scheduler/policies.py) ---
    perf_model: dict[str, Any] | None = None  # services/scheduler/perf_model.py PerfModel.to_dict(): its step costs
    slo_tpot_s: float = 0.0  # its SLO on time per output token, prefill included (0: none)
    slo_ttft_s: float = 0.0  # its SLO on time to first token (0: none)
    queued_prompts: list[tuple[int, int]] = field(default_factory=list)  # (prompt tokens, rank) of each queued request
    # adapters in its GPU adapter pool (no load needed); the rest of resident_adapters wait in host memory
    gpu_adapters: list[str] = field(default_factory=list)
    max_num_seqs: int = 0  # batch capacity (0: unknown)
    block_size: int = 16  # tokens per KV block (free_kv_blocks × block_size = room in tokens)
    # (adapter, output tokens) of requests finished since the last heartbeat ("" for the base model)
    finished: list[tuple[str, int]] = field(default_factory=list)
    # every request it holds (waiting for its adapter, queued or running) when the heartbeat was sent; gateways end
    # the streams of placed requests missing from it (a worker restarted under the same id). None: not reported
    request_ids: list[str] | None = None


@dataclass
class WorkerLost:
    """A worker stopped sending heartbeats; its in-flight requests will never finish."""

    worker_id: str
    reason: str


@dataclass
class GatewayHeartbeat:
    """A gateway is alive. Workers abort the requests of a gateway silent for worker_timeout: nobody is left to
    read their tokens (the gateway crashed, or lost its NATS connection, and could not send CancelRequests)."""

    gateway_id: str
    interval_s: float  # time between heartbeats
    in_flight: int = 0  # requests it is streaming


# ---------------------------------------------------------------- adapters


@dataclass
class AdapterInfo:
    """A registered adapter's metadata (the KV bucket's value; also the admin API's answer)."""

    name: str
    rank: int  # the largest rank of its modules
    alpha: float  # lora_alpha
    target_modules: list[str]  # projections it adapts (q_proj, ..., down_proj)
    dtype: str  # dtype of its weights, e.g. "float16"
    size_bytes: int  # both files together
    sha256: dict[str, str]  # file name -> sha256 hex digest of its bytes
    base_model: str  # the base model's served name when registered
    base_fingerprint: str  # BaseModelShape.fingerprint() (shared/adapters.py) of the base model it fits
    created: float  # time.time() of registration


@dataclass
class RegisterAdapter:
    """Register the adapter whose files the gateway staged under staging_object_name(staging_id, file)."""

    name: str
    staging_id: str


@dataclass
class AdapterQuery:
    """Get (SUBJECT_ADAPTER_GET) or delete (SUBJECT_ADAPTER_DELETE) one adapter by name."""

    name: str


@dataclass
class ListAdapters:
    """Ask the store for every registered adapter."""


@dataclass
class AdapterList:
    """The store's answer to ListAdapters, sorted by name."""

    adapters: list[AdapterInfo]


@dataclass
class AdapterEvent:
    """An adapter was registered or deleted; workers drop deleted ones (in-flight requests finish)."""

    event: str  # "registered" or "deleted"
    adapter: AdapterInfo

    def __post_init__(self) -> None:
        if self.event not in ("registered", "deleted"):
            raise ValueError(f"event must be 'registered' or 'deleted', got {self.event!r}")
