#!/usr/bin/env python
"""Baseline servers for `bench/serve.py`: an OpenAI-compatible streaming server on transformers + PEFT, written
the way a user would write one, in two modes.

  one_at_a_time   requests are served strictly one after the other, first come first served: for each, the adapter
                  is made active with `set_adapter` (loaded with `load_adapter` on first use when it is not yet
                  resident; the base model runs under `disable_adapter()`), then `model.generate()` streams its
                  tokens. Requests that arrive meanwhile wait in a FIFO queue.
  mixed_batch     PEFT's mixed-adapter batch inference: whenever the model is idle, every waiting request (up to
                  --max-batch-size, FIFO) goes into one left-padded `model.generate(..., adapter_names=[...])` call,
                  one adapter name per row ("__base__" for the base model). This is static batching: the batch runs
                  until its longest request is done; a row whose request has all its tokens (or hit EOS) is finished
                  for its client at once (its stream ends) but keeps its place in the batch; requests that arrive
                  meanwhile wait for the next batch. Only requests with the same sampling mode (greedy or not) share
                  a batch.

Both modes: one PeftModel in float32 on the CPU (or --device), generation in one background thread (the model is
not thread-safe), HTTP on aiohttp in the main thread; tokens reach the client as they are generated (a custom
`generate()` streamer). Adapters: --adapter NAME=PATH and/or --adapter-dir DIR (each sub-directory holding an
adapter_config.json is an adapter named after the directory). The first --preload of them are loaded at start-up
(default: as many as --max-loaded-adapters allows), the others on first use; past --max-loaded-adapters the least
recently used adapter is removed with `delete_adapter` (never one the running batch needs).

API (the subset bench/serve.py uses, parsed by shared/openai_protocol.py exactly as the mesh's gateway parses it):
POST /v1/completions and /v1/chat/completions, streaming (SSE in OpenAI's chunk format, usage chunk with
stream_options.include_usage, `data: [DONE]`) or not; `model` is the base model's name or an adapter's;
max_tokens, temperature, top_p, top_k, seed, ignore_eos (vLLM's extension: generation goes on past EOS, which
is neither a stop nor masked: generate() gets an EOS id that cannot occur). Not supported here (400): stop,
logprobs. GET /v1/models, /healthz, /readyz. With --api-key, /v1 routes need `Authorization: Bearer KEY`.
A client that disconnects cancels its request (a queued one is skipped, a running one stops at the next token;
in a batch its row is finished). Prints "peft_server: ready" on stdout once it serves.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from aiohttp import web  # noqa: E402

from shared.openai_protocol import (  # noqa: E402
    SSE_DONE, OpenAIError, chat_completion_chunk, chat_completion_response, completion_chunk, completion_response,
    make_id, model_not_found, now, parse_chat_request, parse_completion_request, sse_event, usage_chunk,
)

READY_MARKER = "peft_server: ready"
MODES = ("one_at_a_time", "mixed_batch")
BASE_ADAPTER_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names
log = logging.getLogger("peft_server")


# ---------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One request: what to generate, and the channel its tokens go back through (an asyncio queue)."""

    request_id: str
    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False  # set by the HTTP side when the client is gone
    generated: int = 0  # tokens sent so far (generation thread)
    done: bool = False  # generation thread: this job gets no more tokens
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def emit(self, event: tuple) -> None:
        """From the generation thread: hand `event` to the request's handler."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Streamer:
    """generate()'s streamer: put #1 is the prompt; each later put is one token per row. Routes tokens to jobs,
    finishing a row at its max_tokens, at EOS (unless ignore_eos) or when its client is gone."""

    def __init__(self, jobs: list[Job], eos_ids: set[int]) -> None:
        self.jobs, self.eos_ids, self.calls = jobs, eos_ids, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 1:
            return
        tokens = value.reshape(-1).tolist()
        for job, token in zip(self.jobs, tokens):
            if job.done:
                continue
            if job.cancelled:
                job.done = True
                continue
            if token in self.eos_ids and not job.ignore_eos:
                job.done = True
                job.emit(("finish", "stop"))
                continue
            job.generated += 1
            job.emit(("token", token))
            if job.generated >= job.max_tokens:
                job.done = True
                job.emit(("finish", "length"))

    def end(self) -> None:
        pass


def _stopping(jobs: list[Job]):
    """A StoppingCriteria marking a row done once its job is (generate() then pads it; stops when all are)."""
    import torch
    from transformers import StoppingCriteria

    class JobsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([j.done or j.cancelled for j in jobs], dtype=torch.bool, device=input_ids.device)

    return JobsDone()


# ---------------------------------------------------------------------------------------------- the model side
class PeftBackend:
    """The PeftModel, its adapters (LRU) and the generation thread that serves the job queue."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import transformers
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from shared.model_provisioning import resolve_model

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.mode = args.mode
        self.model_path = Path(resolve_model(args.model).path)
        self.model_name = args.served_model_name or self.model_path.name
        self.adapter_paths = collect_adapters(args.adapter, args.adapter_dir)
        if not self.adapter_paths:
            raise SystemExit("peft_server: needs at least one adapter (--adapter NAME=PATH or --adapter-dir DIR): "
                             "PEFT builds the PeftModel from one")
        self.ranks = {name: adapter_rank(path) for name, path in self.adapter_paths.items()}
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(args.device).eval()
        self.max_len = int(getattr(base.config, "max_position_embeddings", 2048))
        self.never_eos = int(base.config.vocab_size)  # an id no logits row has: EOS neither stops nor is masked
        eos = self.tokenizer.eos_token_id
        gen_eos = getattr(base.generation_config, "eos_token_id", None)
        self.eos_ids = {t for t in ([eos] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])) if t is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or 0)
        names = list(self.adapter_paths)
        self.capacity = max(2, args.max_loaded_adapters)
        preload = min(len(names), self.capacity if args.preload is None else max(1, args.preload))
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU, least recent first
        self.model = PeftModel.from_pretrained(base, self.adapter_paths[names[0]], adapter_name=names[0]).eval()
        self.loaded[names[0]] = None
        for name in names[1:preload]:
            self._load(name, protect=set())
        self.adapter_loads = 0  # loads after start-up
        self.queue: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.batches = 0
        self.thread = threading.Thread(target=self._serve, name="peft-generate", daemon=True)

    # ---- adapters
    def _load(self, name: str, protect: set[str]) -> None:
        while len(self.loaded) >= self.capacity:
            victim = next((n for n in self.loaded if n not in protect), None)
            if victim is None:
                break  # every resident adapter is needed now: grow past the cap for this batch
            self.model.delete_adapter(victim)
            del self.loaded[victim]
        self.model.load_adapter(self.adapter_paths[name], adapter_name=name)
        self.loaded[name] = None

    def ensure(self, names: set[str]) -> None:
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
            else:
                self._load(name, protect=names)
                self.adapter_loads += 1

    # ---- jobs
    def submit(self, job: Job) -> None:
        with self.cond:
            self.queue.append(job)
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _take(self) -> list[Job] | None:
        """The next batch (one job in one_at_a_time mode); None when stopping."""
        with self.cond:
            while True:
                while self.queue and self.queue[0].cancelled:
                    self.queue.popleft().done = True
                if self.stopping:
                    return None
                if self.queue:
                    break
                self.cond.wait()
            first = self.queue.popleft()
            batch = [first]
            if self.mode == "mixed_batch":
                keep: collections.deque[Job] = collections.deque()
                while self.queue and len(batch) < self.args.max_batch_size:
                    job = self.queue.popleft()
                    if job.cancelled:
                        job.done = True
                    elif job.greedy == first.greedy:
                        batch.append(job)
                    else:
                        keep.append(job)
                self.queue.extendleft(reversed(keep))
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, the server goes on
                log.exception("generation failed")
                for job in batch:
                    if not job.done:
                        job.done = True
                        job.emit(("error", f"{type(exc).__name__}: {exc}"))
            for job in batch:
                if not job.done:  # generate() ended early (cancelled rows)
                    job.done = True
                    job.emit(("finish", "length"))

    def _generate(self, batch: list[Job]) -> None:
        import contextlib

        import torch

        self.batches += 1
        self.ensure({j.adapter for j in batch if j.adapter is not None})
        width = max(len(j.prompt_ids) for j in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, job in enumerate(batch):
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids):] = 1
        first = batch[0]
        kwargs: dict[str, Any] = {}
        if first.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p,
                          top_k=first.top_k if first.top_k > 0 else 0)
            if first.seed is not None:
                torch.manual_seed(first.seed)
        context = contextlib.nullcontext()
        if self.mode == "mixed_batch":
            kwargs["adapter_names"] = [j.adapter or BASE_ADAPTER_NAME for j in batch]
        elif first.adapter is None:
            context = self.model.disable_adapter()
        else:
            self.model.set_adapter(first.adapter)
        with torch.inference_mode(), context:
            self.model.generate(
                input_ids=input_ids.to(self.args.device), attention_mask=mask.to(self.args.device),
                max_new_tokens=max(j.max_tokens for j in batch), eos_token_id=[self.never_eos],
                pad_token_id=self.pad_id,
                streamer=_Streamer(batch, self.eos_ids), stopping_criteria=[_stopping(batch)], **kwargs,
            )


def adapter_rank(path: Path) -> int | None:
    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def collect_adapters(pairs: list[str] | None, dirs: list[str] | None) -> dict[str, Path]:
    """name -> adapter directory, from NAME=PATH pairs and directories of adapter directories (in name order)."""
    found: dict[str, Path] = {}
    for d in dirs or []:
        for sub in sorted(Path(d).iterdir()):
            if (sub / "adapter_config.json").is_file():
                found[sub.name] = sub
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"peft_server: --adapter takes NAME=PATH, got {pair!r}")
        found[name] = Path(path)
    return found


# ---------------------------------------------------------------------------------------------- HTTP
BACKEND = web.AppKey("backend", PeftBackend)
API_KEY = web.AppKey("api_key", str)


def _error(exc: OpenAIError) -> web.Response:
    return web.json_response(exc.to_dict(), status=exc.status)


@web.middleware
async def _errors(request: web.Request, handler):
    key = request.app[API_KEY]
    if key and request.path.startswith("/v1") and request.headers.get("Authorization", "") != f"Bearer {key}":
        return _error(OpenAIError("invalid API key", status=401, type="authentication_error", code="invalid_api_key"))
    try:
        return await handler(request)
    except OpenAIError as exc:
        return _error(exc)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError("the request body is not valid JSON") from None


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion_request(await _body(request)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat_request(await _body(request)))


def _job(backend: PeftBackend, parsed) -> Job:
    params = parsed.params
    if params.stop or params.stop_token_ids:
        raise OpenAIError("stop: not supported by this baseline server", param="stop", code="unsupported_parameter")
    if params.logprobs:
        raise OpenAIError("logprobs: not supported by this baseline server", param="logprobs",
                          code="unsupported_parameter")
    if parsed.model == backend.model_name:
        adapter = None
    elif parsed.model in backend.adapter_paths:
        adapter = parsed.model
    else:
        raise model_not_found(parsed.model)
    tok = backend.tokenizer
    if parsed.kind == "chat":
        text = tok.apply_chat_template(parsed.messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok.encode(text, add_special_tokens=False)
    elif isinstance(parsed.prompt, str):
        prompt_ids = tok.encode(parsed.prompt, add_special_tokens=False)
    else:
        prompt_ids = list(parsed.prompt)
    if not prompt_ids:
        raise OpenAIError("prompt: is empty", param="prompt")
    if len(prompt_ids) + params.max_tokens > backend.max_len:
        raise OpenAIError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceed the "
                          f"context of {backend.max_len} tokens", param="max_tokens")
    return Job(make_id("cmpl"), adapter, prompt_ids, params.max_tokens, params.ignore_eos, params.temperature,
               params.top_p, params.top_k, params.seed, asyncio.get_running_loop(), asyncio.Queue())


async def _events(request: web.Request, job: Job):
    """(kind, value) events of `job`; marks it cancelled when the client goes away while it waits."""
    while True:
        getter = asyncio.ensure_future(job.events.get())
        while not getter.done():
            await asyncio.wait({getter}, timeout=0.5)
            transport = request.transport
            if not getter.done() and (transport is None or transport.is_closing()):
                getter.cancel()
                job.cancelled = True
                return
        event = getter.result()
        yield event
        if event[0] in ("finish", "error"):
            return


class _Detok:
    """Incremental detokenization: the new text of each token, holding back incomplete UTF-8."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.sent = text[self.sent:], len(text)
        return new


async def _serve(request: web.Request, parsed) -> web.StreamResponse:
    backend = request.app[BACKEND]
    job = _job(backend, parsed)
    chat = parsed.kind == "chat"
    common = {"request_id": job.request_id, "model": parsed.model, "created": now()}
    detok = _Detok(backend.tokenizer)
    response: web.StreamResponse | None = None
    backend.submit(job)
    try:
        if not parsed.stream:
            finish, error, parts = None, None, []
            async for kind, value in _events(request, job):
                if kind == "token":
                    parts.append(detok.add(value))
                elif kind == "finish":
                    finish = value
                else:
                    error = value
            if error is not None or finish is None:
                raise OpenAIError(f"generation failed: {error}", status=500, type="server_error")
            parts.append(detok.flush())
            body = (chat_completion_response if chat else completion_response)(
                text="".join(parts), finish_reason=finish, prompt_tokens=len(job.prompt_ids),
                completion_tokens=job.generated, **common)
            return web.json_response(body)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        usage_null = parsed.include_usage
        if chat:
            await response.write(sse_event(chat_completion_chunk(role="assistant", content="",
                                                                 include_usage=usage_null, **common)))
        text_offset = 0
        async for kind, value in _events(request, job):
            if kind == "error":
                await response.write(sse_event({"error": {"message": f"generation failed: {value}",
                                                          "type": "server_error", "param": None, "code": None}}))
                break
            if kind == "token":
                text, finish = detok.add(value), None
            else:
                text, finish = detok.flush(), value
            if chat:
                if text:
                    await response.write(sse_event(chat_completion_chunk(content=text, include_usage=usage_null,
                                                                         **common)))
                if finish:
                    await response.write(sse_event(chat_completion_chunk(finish_reason=finish,
                                                                         include_usage=usage_null, **common)))
            elif text or finish or kind == "token":
                await response.write(sse_event(completion_chunk(text=text, finish_reason=finish,
                                                                text_offset=text_offset, include_usage=usage_null,
                                                                **common)))
                text_offset += len(text)
            if finish and parsed.include_usage:
                await response.write(sse_event(usage_chunk(chat=chat, prompt_tokens=len(job.prompt_ids),
                                                           completion_tokens=job.generated, **common)))
        await response.write(SSE_DONE)
        await response.write_eof()
        return response
    except ConnectionError:  # the client went away mid-stream (aiohttp's ClientConnectionResetError is one)
        job.cancelled = True
        if response is None:
            raise
        return response
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    finally:
        if not job.done:
            job.cancelled = True


async def list_models(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    data = [{"id": backend.model_name, "object": "model", "created": now(), "owned_by": "peft_server",
             "root": backend.model_name, "parent": None}]
    data += [{"id": name, "object": "model", "created": now(), "owned_by": "peft_server", "root": backend.model_name,
              "parent": backend.model_name, "rank": backend.ranks[name]} for name in backend.adapter_paths]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stats(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    return web.json_response({"mode": backend.mode, "queued": len(backend.queue), "batches": backend.batches,
                              "adapters_loaded": len(backend.loaded), "adapter_loads": backend.adapter_loads})


def build_app(backend: PeftBackend, api_key: str) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=16 * 2**20)
    app[BACKEND] = backend
    app[API_KEY] = api_key
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    app.router.add_get("/stats", stats)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/baselines/peft_server.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, required=True, help="one_at_a_time (set_adapter, one request after the "
                   "other) or mixed_batch (generate with adapter_names over the waiting requests)")
    p.add_argument("--model", default=None, help="base model: local HF directory or .gguf (default: the embedded "
                                                 "SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in requests (default: the model "
                                                             "directory's name, as the mesh names it)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="a PEFT LoRA adapter (repeatable)")
    p.add_argument("--adapter-dir", action="append", metavar="DIR",
                   help="a directory of adapter directories, each named after its adapter (repeatable)")
    p.add_argument("--preload", type=int, default=None, help="adapters loaded at start-up, in name order (default: "
                                                             "up to --max-loaded-adapters)")
    p.add_argument("--max-loaded-adapters", type=int, default=64,
                   help="adapters resident at once; beyond, the least recently used is deleted (default 64)")
    p.add_argument("--max-batch-size", type=int, default=16, help="mixed_batch: most requests per generate() call "
                                                                  "(default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="HTTP port (default 8001)")
    p.add_argument("--api-key", default=os.environ.get("PEFT_SERVER_API_KEY", ""),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default $PEFT_SERVER_API_KEY; empty: none)")
    args = p.parse_args(argv)
    if args.max_batch_size < 1 or args.max_loaded_adapters < 1:
        p.error("--max-batch-size and --max-loaded-adapters must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="peft_server %(levelname)s %(message)s")
    t = time.perf_counter()
    backend = PeftBackend(args)
    backend.thread.start()

    async def serve() -> None:
        runner = web.AppRunner(build_app(backend, args.api_key), handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"{READY_MARKER} mode={args.mode} model={backend.model_name} adapters={len(backend.adapter_paths)} "
              f"loaded={len(backend.loaded)} url=http://{args.host}:{args.port}/v1 "
              f"startup_s={time.perf_counter() - t:.1f}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        backend.stop()
        await runner.cleanup()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
