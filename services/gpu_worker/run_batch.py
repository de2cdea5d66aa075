"""Offline batch inference in OpenAI's batch file format (`caraserve run-batch`) and the offline demo.

`run_batch(engine, lines)` is the core, free of file IO: it validates every input line, adds all valid
requests to the engine up front, steps the engine until all have finished (continuous batching runs them
concurrently) and returns one output record per input line, in input order. A bad line gets an error record
and never stops the others:
- a line that is not a valid batch request (bad JSON, no/duplicate custom_id, wrong method or url) gets
  `"response": null, "error": {"code", "message"}`;
- a request the API would refuse (OpenAIError, unknown model, EngineRequestError) gets
  `"response": {"status_code": 4xx, "body": {"error": ...}}`, as the HTTP API would answer it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from services.cli import CLIError
from services.gpu_worker.engine.sequence import FinishReason, RequestOutput
from services.gpu_worker.output_view import visible_logprobs
from shared.openai_protocol import (
    LogprobItem,
    OpenAIError,
    ParsedRequest,
    chat_completion_response,
    completion_response,
    make_id,
    model_not_found,
    now,
    parse_chat_request,
    parse_completion_request,
)

BATCH_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class _LineError(Exception):
    """A line that is not a valid batch request: reported with `"response": null`."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.custom_id = custom_id  # as far as the line got


@dataclass
class _Pending:
    """One request in flight: where its record goes and what the engine has produced for it so far."""

    index: int  # position among the output records
    custom_id: str
    request_id: str  # engine request id; also the response's request_id
    parsed: ParsedRequest
    created: int
    text: list[str] = field(default_factory=list)  # new_text deltas
    logprobs: list[LogprobItem] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _record(custom_id: Any, response: dict | None = None, error: dict | None = None) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


def _api_error_record(custom_id: str, request_id: str, exc: OpenAIError) -> dict[str, Any]:
    return _record(custom_id, {"status_code": exc.status, "request_id": request_id, "body": exc.to_dict()})


def _parse_line(line: str, seen: set[str]) -> tuple[str, str, Any]:
    """-> (custom_id, kind, body); raises _LineError."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _LineError("invalid_json", f"the line is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _LineError("invalid_request", "the line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineError("missing_custom_id", "custom_id: a non-empty string is required")
    if custom_id in seen:
        raise _LineError("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", custom_id)
    seen.add(custom_id)
    if obj.get("method") != "POST":
        raise _LineError("invalid_method", f"method: only POST is supported, got {obj.get('method')!r}", custom_id)
    kind = BATCH_URLS.get(obj.get("url"))
    if kind is None:
        raise _LineError("invalid_url", f"url: expected one of {', '.join(BATCH_URLS)}, got {obj.get('url')!r}",
                         custom_id)
    if not isinstance(obj.get("body"), dict):
        raise _LineError("invalid_body", "body: a JSON object is required", custom_id)
    return custom_id, kind, obj["body"]


def resolve_adapter(engine, model: str) -> str | None:
    """The adapter a request's `model` names: None for the base model; OpenAIError 404 if unknown."""
    if model == engine.model_name:
        return None
    if model in engine.adapter_names():
        return model
    raise model_not_found(model)


def _submit(engine, kind: str, body: dict, request_id: str) -> ParsedRequest:
    """Validate one request and add it to the engine; raises OpenAIError."""
    parsed = parse_chat_request(body) if kind == "chat" else parse_completion_request(body)
    if parsed.stream:
        raise OpenAIError("stream: not supported in batch requests", param="stream")
    adapter = resolve_adapter(engine, parsed.model)
    try:
        prompt = engine.encode_chat(parsed.messages) if kind == "chat" else parsed.prompt
        engine.add_request(request_id, prompt, parsed.params, adapter=adapter)
    except ValueError as exc:  # EngineRequestError: unknown adapter, empty or too long prompt, ...
        raise OpenAIError(str(exc)) from None
    return parsed


def _collect(engine, pending: _Pending, out: RequestOutput) -> None:
    pending.text.append(out.new_text)
    if pending.parsed.logprobs and out.logprobs:
        pending.logprobs.extend(visible_logprobs(engine, pending.parsed.params, out))
    pending.prompt_tokens = out.prompt_tokens or pending.prompt_tokens
    pending.completion_tokens = out.completion_tokens
    if out.finished:
        pending.finished = True
        pending.finish_reason = out.finish_reason


def _result_record(p: _Pending) -> dict[str, Any]:
    if not p.finished or p.finish_reason == FinishReason.ABORT:
        message = "the request was aborted" if p.finished else "the engine dropped the request"
        return _api_error_record(p.custom_id, p.request_id, OpenAIError(message))
    build = chat_completion_response if p.parsed.kind == "chat" else completion_response
    body = build(
        request_id=make_id("chatcmpl" if p.parsed.kind == "chat" else "cmpl"),
        model=p.parsed.model,
        created=p.created,
        text="".join(p.text),
        finish_reason=p.finish_reason,
        prompt_tokens=p.prompt_tokens,
        completion_tokens=p.completion_tokens,
        logprobs=p.logprobs if p.parsed.logprobs else None,
    )
    return _record(p.custom_id, {"status_code": 200, "request_id": p.request_id, "body": body})


def run_batch(engine, lines: Iterable[str], *, progress: bool = False) -> list[dict[str, Any]]:
    """Run OpenAI batch input lines through `engine`; one output record per non-blank line, in order."""
    records: list[dict[str, Any] | None] = []
    pending: dict[str, _Pending] = {}
    seen: set[str] = set()
    for line in lines:
        if not line.strip():
            continue  # blank lines (a trailing newline) are not requests
        try:
            custom_id, kind, body = _parse_line(line, seen)
        except _LineError as exc:
            records.append(_record(exc.custom_id, error={"code": exc.code, "message": str(exc)}))
            continue
        request_id = f"req_{uuid.uuid4().hex}"
        try:
            parsed = _submit(engine, kind, body, request_id)
        except OpenAIError as exc:
            records.append(_api_error_record(custom_id, request_id, exc))
            continue
        pending[request_id] = _Pending(len(records), custom_id, request_id, parsed, now())
        records.append(None)

    bar = tqdm(total=len(pending), desc="requests", unit="req", file=sys.stderr, disable=not progress)
    tokens = 0
    try:
        while engine.has_unfinished():
            for out in engine.step():
                p = pending.get(out.request_id)
                if p is None or p.finished:
                    continue
                tokens += len(out.new_token_ids)
                _collect(engine, p, out)
                if p.finished:
                    bar.update()
                    bar.set_postfix(tokens=tokens, refresh=False)
    finally:
        bar.close()
        for p in pending.values():
            if not p.finished:
                engine.abort(p.request_id)  # interrupted: leave the engine clean
    for p in pending.values():
        records[p.index] = _result_record(p)
    return records  # type: ignore[return-value]


# ---------------------------------------------------------------- commands (see services/cli.py)


def parse_lora_modules(specs: list[str] | None) -> list[tuple[str, Path]]:
    """NAME=PATH strings -> (name, path); CLIError for a malformed entry or a missing path."""
    modules: list[tuple[str, Path]] = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise CLIError(f"--lora-modules: expected NAME=PATH, got {spec!r}")
        if any(name == other for other, _ in modules):
            raise CLIError(f"--lora-modules: adapter name {name!r} is given twice")
        if not Path(path).expanduser().exists():
            raise CLIError(f"--lora-modules: {name}={path}: no such file or directory")
        modules.append((name, Path(path).expanduser()))
    return modules


def build_engine(args: argparse.Namespace, should_stop: Callable[[], bool] = lambda: False):
    """An LLMEngine from the engine options of services/cli.py, its Triton kernels compiled when it runs them on a
    GPU (kernel_warmup.py; cut short once should_stop() is true); CLIError for a bad model or setting."""
    from services.gpu_worker.engine.config import ConfigError, EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine
    from services.gpu_worker.kernel_warmup import warm_up_if_compiled
    from services.gpu_worker.model.weights import UnsupportedModelError
    from shared.model_provisioning import ModelNotFoundError

    names = ("model", "served_model_name", "dtype", "device", "data_dir", "max_lora_rank", "max_loras",
             "max_num_seqs", "max_num_batched_tokens", "attention_backend", "lora_backend", "cuda_graphs",
             "cpu_assist", "cpu_workers")
    settings = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "threads", None) is not None:
        settings["num_threads"] = args.threads
    start = time.perf_counter()
    try:
        engine = LLMEngine(EngineConfig(**settings))
    except (ConfigError, ModelNotFoundError, UnsupportedModelError) as exc:
        raise CLIError(str(exc)) from None
    print(f"loaded {engine.model_name} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    seconds = warm_up_if_compiled(engine, lambda line: print(line, file=sys.stderr), should_stop)
    if seconds is not None:  # before the first request, not in its time to first token
        print(f"Triton kernels compiled (or loaded from Triton's cache) in {seconds:.1f}s", file=sys.stderr)
    return engine


def load_adapter(engine, name: str, path: Path) -> None:
    """engine.load_adapter with its validation error turned into a one-line CLIError."""
    if name == engine.model_name:
        raise CLIError(f"--lora-modules: {name!r} is the base model's served name")
    try:
        engine.load_adapter(name, str(path))
    except (ValueError, OSError) as exc:  # AdapterValidationError included
        raise CLIError(f"--lora-modules: {name}={path}: {exc}") from None


def _write_jsonl(records: list[dict[str, Any]], output: str) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)  # ASCII: no raw U+2028 to split a line
    if output == "-":
        sys.stdout.write(text)
        return
    target = Path(output).expanduser()
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")  # write then rename: a crash never leaves half a results file
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CLIError(f"--output: cannot write {output}: {exc.strerror}") from None


def run_batch_command(args: argparse.Namespace) -> int:
    modules = parse_lora_modules(args.lora_modules)
    if args.output != "-" and Path(args.output).expanduser().is_dir():
        raise CLIError(f"--output: {args.output} is a directory")
    if args.input == "-":
        lines = sys.stdin.read().split("\n")
    else:
        try:
            # split on "\n" only: str.splitlines() would also split inside strings holding U+2028 and such
            lines = Path(args.input).expanduser().read_text(encoding="utf-8").split("\n")
        except OSError as exc:
            raise CLIError(f"--input: {exc.strerror}: {args.input}") from None
        except UnicodeDecodeError:
            raise CLIError(f"--input: {args.input} is not UTF-8 text") from None
    engine = build_engine(args)
    try:
        for name, path in modules:
            load_adapter(engine, name, path)
        start = time.perf_counter()
        records = run_batch(engine, lines, progress=True)
    finally:
        engine.close()
    _write_jsonl(records, args.output)
    failed = sum(1 for r in records if r["error"] is not None or r["response"]["status_code"] != 200)
    print(f"{len(records)} requests ({failed} failed) in {time.perf_counter() - start:.1f}s -> {args.output}",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------- demo

DEMO_QUESTIONS = (  # the last two are held-out prompts of shared/demo_adapters (not in their training data)
    "What is the capital of France?",
    "Give me one tip for staying healthy.",
    "Describe the ocean in one sentence.",
)


def _demo_adapters(engine) -> dict[str, str]:
    """Load the shipped demo adapters that exist; returns name -> description."""
    try:
        from shared.demo_adapters import DEMO_ADAPTERS, demo_adapter_path
    except ImportError:
        print("demo adapters are not available: showing the base model only", file=sys.stderr)
        return {}
    loaded = {}
    for name, description in DEMO_ADAPTERS.items():
        path = Path(demo_adapter_path(name))
        if not path.exists():
            print(f"demo adapter {name!r} is missing ({path}): run `make demo-adapters`", file=sys.stderr)
            continue
        load_adapter(engine, name, path)
        loaded[name] = description
    return loaded


def demo_lines(models: list[str], questions: Iterable[str], max_tokens: int) -> list[str]:
    """Batch input lines: every question to every model, greedy."""
    lines = []
    for i, question in enumerate(questions):
        for model in models:
            body = {"model": model, "messages": [{"role": "user", "content": question}],
                    "max_tokens": max_tokens, "temperature": 0}
            lines.append(json.dumps({"custom_id": f"q{i}-{model}", "method": "POST",
                                     "url": "/v1/chat/completions", "body": body}))
    return lines


def _answer(record: dict[str, Any]) -> str:
    response = record["response"]
    if response is None:
        return f"[error: {record['error']['message']}]"
    if response["status_code"] != 200:
        return f"[error: {response['body']['error']['message']}]"
    return response["body"]["choices"][0]["message"]["content"].strip()


def format_table(rows: list[tuple[str, str, str]], width: int) -> str:
    """Rows of (question, model, answer) as a wrapped three-column table; repeated questions are blanked."""
    qw = min(28, max(len("Question"), *(len(q) for q, _, _ in rows)))
    mw = max(len("Model"), *(len(m) for _, m, _ in rows))
    aw = max(30, width - qw - mw - 4)
    out = [f"{'Question':<{qw}}  {'Model':<{mw}}  Answer", "-" * min(width, qw + mw + aw + 4)]
    previous = None
    for question, model, answer in rows:
        qlines = textwrap.wrap(question, qw) if question != previous else []
        if question != previous and previous is not None:
            out.append("")
        previous = question
        alines = [w for para in answer.splitlines() or [""] for w in textwrap.wrap(para, aw) or [""]]
        for i in range(max(len(qlines), len(alines), 1)):
            q = qlines[i] if i < len(qlines) else ""
            a = alines[i] if i < len(alines) else ""
            out.append(f"{q:<{qw}}  {model if i == 0 else '':<{mw}}  {a}".rstrip())
    return "\n".join(out)


def demo_command(args: argparse.Namespace) -> int:
    engine = build_engine(args)
    try:
        adapters = _demo_adapters(engine)
        models = [engine.model_name, *adapters]
        questions = args.question or list(DEMO_QUESTIONS)
        lines = demo_lines(models, questions, args.max_tokens)
        records = run_batch(engine, lines, progress=True)
    finally:
        engine.close()
    if args.output:
        _write_jsonl(records, args.output)
    print()
    print(f"Base model: {engine.model_name}")
    for name, description in adapters.items():
        print(f"Adapter {name}: {description}")
    print()
    rows = [(q, m, _answer(r)) for r, (q, m) in zip(records, [(q, m) for q in questions for m in models])]
    print(format_table(rows, shutil.get_terminal_size((120, 24)).columns))
    if args.output:
        print(f"\nresults written to {args.output}", file=sys.stderr)
    return 0
