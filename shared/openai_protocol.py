"""The OpenAI wire format: request parsing/validation and response builders for /v1/chat/completions and
/v1/completions. Pure functions over dicts; no engine, no IO. Used by the gateway and by `caraserve run-batch`.

Parsing turns a request body into a `ParsedRequest` (engine `SamplingParams` included) or raises `OpenAIError`
(status 400, a one-line message naming the parameter). Parameters OpenAI defines but we cannot honour (n > 1,
tools, non-zero penalties, ...) are refused rather than silently ignored; harmless ones (user, store, metadata)
and keys OpenAI does not define are ignored.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.gpu_worker.engine.sequence import SamplingParams, SamplingParamsError

DEFAULT_CHAT_MAX_TOKENS = 1024  # OpenAI's chat default is "up to the context"; the engine also stops there
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_TOP_LOGPROBS = 20
MIN_LOGPROB = -9999.0  # -inf is not JSON; OpenAI reports hopeless tokens as -9999.0
_CHAT_ROLES = ("system", "developer", "user", "assistant")


class OpenAIError(Exception):
    """An error in OpenAI's shape; `to_dict()` is the HTTP response body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        f"The model `{model}` does not exist or you do not have access to it.",
        status=404,
        param="model",
        code="model_not_found",
    )


@dataclass
class ParsedRequest:
    """One validated request. Exactly one of `messages` (chat) and `prompt` (completions) is set."""

    kind: str  # "chat" or "completion"
    model: str  # base model's served name or an adapter name
    params: SamplingParams  # includes max_tokens, stop and the logprobs settings
    messages: list[dict[str, str]] | None = None  # chat: [{"role", "content"}], content flattened to text
    prompt: str | list[int] | None = None  # completions: text or token ids
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage and no choices
    user: str | None = None  # passed by clients for abuse tracking; unused

    @property
    def logprobs(self) -> bool:
        return self.params.logprobs

    @property
    def top_logprobs(self) -> int:
        return self.params.top_logprobs


# ---------------------------------------------------------------- field readers


def _opt(body: dict, key: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[key] if present and not null, checked against `kinds` (bool is never taken for a number)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise OpenAIError(f"{key}: expected {what}, got {json.dumps(value)}", param=key)
    if not isinstance(value, kinds):
        raise OpenAIError(f"{key}: expected {what}, got {type(value).__name__}", param=key)
    return value


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def _unsupported(key: str, why: str) -> OpenAIError:
    return OpenAIError(f"{key}: {why}", param=key, code="unsupported_parameter")


def _check_common(body: Any) -> dict:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise OpenAIError("model: this parameter is required", param="model")
    if not isinstance(model, str) or not model:
        raise OpenAIError("model: expected a non-empty string", param="model")
    n = _opt(body, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise _unsupported("n", f"only n=1 is supported, got {n}")
    for key in ("presence_penalty", "frequency_penalty"):
        value = _opt(body, key, (int, float), "a number")
        if value:
            raise _unsupported(key, "only 0 is supported")
    if _opt(body, "logit_bias", (dict,), "an object"):
        raise _unsupported("logit_bias", "logit_bias is not supported")
    return body


def _sampling(body: dict, max_tokens: int, logprobs: bool, top: int) -> SamplingParams:
    kwargs: dict[str, Any] = {"max_tokens": max_tokens}
    for key, kinds, what in (
        ("temperature", (int, float), "a number"),
        ("top_p", (int, float), "a number"),
        ("top_k", (int,), "an integer"),
        ("seed", (int,), "an integer"),
    ):
        value = _opt(body, key, kinds, what)
        if value is not None and float in kinds and not _finite(value):
            raise OpenAIError(f"{key}: expected a finite number", param=key)
        if value is not None:
            kwargs[key] = value
    if not -(2**63) <= kwargs.get("seed", 0) < 2**64:
        raise OpenAIError("seed: must fit in 64 bits", param="seed")
    ignore_eos = _opt(body, "ignore_eos", (bool,), "a boolean")  # vLLM's extension, for benchmarks
    if ignore_eos:
        kwargs["ignore_eos"] = True
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise OpenAIError("stop: expected a string or a list of strings", param="stop")
        kwargs["stop"] = stop
    try:
        return SamplingParams(logprobs=logprobs, top_logprobs=top, **kwargs)
    except SamplingParamsError as exc:
        message = str(exc)
        param = message.split(" ", 1)[0]  # SamplingParams messages start with the field name
        raise OpenAIError(message, param=param if param.isidentifier() else None) from None


def _max_tokens(body: dict, *keys: str) -> int | None:
    for key in keys:  # first present wins (max_completion_tokens supersedes max_tokens)
        value = _opt(body, key, (int,), "an integer")
        if value is not None:
            if value < 1:
                raise OpenAIError(f"{key}: must be >= 1, got {value}", param=key)
            return value
    return None


def _stream(body: dict) -> tuple[bool, bool]:
    stream = bool(_opt(body, "stream", (bool,), "a boolean"))
    options = _opt(body, "stream_options", (dict,), "an object")
    if options is not None and not stream:
        raise OpenAIError("stream_options: only allowed when stream is true", param="stream_options")
    include_usage = bool(_opt(options or {}, "include_usage", (bool,), "a boolean"))
    return stream, include_usage


# ---------------------------------------------------------------- parsers


def _chat_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise OpenAIError("messages: expected a non-empty list of messages", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"{where}: expected an object", param=where)
        role = message.get("role")
        if role not in _CHAT_ROLES:
            if role in ("tool", "function"):
                raise _unsupported(f"{where}.role", f"role {role!r} is not supported (no tool calling)")
            raise OpenAIError(f"{where}.role: expected one of {', '.join(_CHAT_ROLES)}, got {role!r}",
                              param=f"{where}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise _unsupported(f"{where}.tool_calls", "tool calls are not supported")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _unsupported(f"{where}.content[{j}]", "only text content parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise OpenAIError(f"{where}.content: expected a string or a list of text parts", param=f"{where}.content")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def parse_chat_request(body: Any, *, default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS) -> ParsedRequest:
    """Validate a /v1/chat/completions body."""
    body = _check_common(body)
    if body.get("messages") is None:
        raise OpenAIError("messages: this parameter is required", param="messages")
    messages = _chat_messages(body["messages"])
    for key in ("tools", "functions"):
        if body.get(key):
            raise _unsupported(key, "tool and function calling are not supported")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise _unsupported(key, "tool and function calling are not supported")
    response_format = _opt(body, "response_format", (dict,), "an object")
    if response_format is not None and response_format.get("type") != "text":
        raise _unsupported("response_format", f"only type 'text' is supported, got {response_format.get('type')!r}")
    modalities = _opt(body, "modalities", (list,), "a list")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", "only ['text'] is supported")
    for key in ("audio", "prediction", "web_search_options"):
        if body.get(key) is not None:
            raise _unsupported(key, f"{key} is not supported")
    logprobs = bool(_opt(body, "logprobs", (bool,), "a boolean"))
    top = _opt(body, "top_logprobs", (int,), "an integer")
    if top is not None:
        if not logprobs:
            raise OpenAIError("top_logprobs: requires logprobs to be true", param="top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise OpenAIError(f"top_logprobs: must be between 0 and {MAX_TOP_LOGPROBS}, got {top}",
                              param="top_logprobs")
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens") or default_max_tokens
    params = _sampling(body, max_tokens, logprobs, top or 0)
    stream, include_usage = _stream(body)
    return ParsedRequest("chat", body["model"], params, messages=messages, stream=stream,
                         include_usage=include_usage, user=body.get("user"))


def _completion_prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if min(value) < 0:
            raise OpenAIError("prompt: token ids must be >= 0", param="prompt")
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise _unsupported("prompt", "only one prompt per request is supported")
    raise OpenAIError("prompt: expected a string or a non-empty list of token ids", param="prompt")


def parse_completion_request(body: Any, *, default_max_tokens: int = DEFAULT_COMPLETION_MAX_TOKENS) -> ParsedRequest:
    """Validate a /v1/completions body. `logprobs` is an integer here: how many alternatives per token."""
    body = _check_common(body)
    if body.get("prompt") is None:
        raise OpenAIError("prompt: this parameter is required", param="prompt")
    prompt = _completion_prompt(body["prompt"])
    best_of = _opt(body, "best_of", (int,), "an integer")
    if best_of is not None and best_of != 1:
        raise _unsupported("best_of", f"only best_of=1 is supported, got {best_of}")
    if _opt(body, "echo", (bool,), "a boolean"):
        raise _unsupported("echo", "echo=true is not supported")
    if _opt(body, "suffix", (str,), "a string"):
        raise _unsupported("suffix", "suffix is not supported")
    logprobs = _opt(body, "logprobs", (int,), "an integer")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise OpenAIError(f"logprobs: must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}", param="logprobs")
    max_tokens = _max_tokens(body, "max_tokens") or default_max_tokens
    params = _sampling(body, max_tokens, logprobs is not None, logprobs or 0)
    stream, include_usage = _stream(body)
    return ParsedRequest("completion", body["model"], params, prompt=prompt, stream=stream,
                         include_usage=include_usage, user=body.get("user"))


# ---------------------------------------------------------------- responses


@dataclass
class LogprobItem:
    """One generated token for a logprobs display: its text, logprob and the top alternatives (best first)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


def make_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _lp(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else float(value)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(items: list[LogprobItem]) -> dict[str, Any]:
    """Chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    return {
        "content": [
            {
                "token": it.token,
                "logprob": _lp(it.logprob),
                "bytes": _bytes(it.token),
                "top_logprobs": [{"token": t, "logprob": _lp(lp), "bytes": _bytes(t)} for t, lp in it.top],
            }
            for it in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: list[LogprobItem], text_offset: int = 0) -> dict[str, Any]:
    """Legacy completions shape. The sampled token is always in its top_logprobs dict (so up to k+1 entries)."""
    offsets = []
    for it in items:
        offsets.append(text_offset)
        text_offset += len(it.token)
    tops = []
    for it in items:
        top = {t: _lp(lp) for t, lp in it.top}
        top.setdefault(it.token, _lp(it.logprob))
        tops.append(top)
    return {
        "tokens": [it.token for it in items],
        "token_logprobs": [_lp(it.logprob) for it in items],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _reason(finish_reason: Any) -> str | None:
    return None if finish_reason is None else str(getattr(finish_reason, "value", finish_reason))


def chat_completion_response(
    *, request_id: str, model: str, created: int, text: str, finish_reason: Any,
    prompt_tokens: int, completion_tokens: int, logprobs: list[LogprobItem] | None = None,
) -> dict[str, Any]:
    """A non-streaming /v1/chat/completions response (object "chat.completion")."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None if logprobs is None else chat_logprobs(logprobs),
        "finish_reason": _reason(finish_reason),
    }
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def completion_response(
    *, request_id: str, model: str, created: int, text: str, finish_reason: Any,
    prompt_tokens: int, completion_tokens: int, logprobs: list[LogprobItem] | None = None,
) -> dict[str, Any]:
    """A non-streaming /v1/completions response (object "text_completion")."""
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None if logprobs is None else completion_logprobs(logprobs),
        "finish_reason": _reason(finish_reason),
    }
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chat_completion_chunk(
    *, request_id: str, model: str, created: int, content: str | None = None, role: str | None = None,
    finish_reason: Any = None, logprobs: list[LogprobItem] | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed chat delta. The first chunk carries role="assistant" (content ""), the last the finish_reason."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None if logprobs is None else chat_logprobs(logprobs),
              "finish_reason": _reason(finish_reason)}
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [choice], "system_fingerprint": None}
    if include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the final usage chunk
    return chunk


def completion_chunk(
    *, request_id: str, model: str, created: int, text: str, finish_reason: Any = None,
    logprobs: list[LogprobItem] | None = None, text_offset: int = 0, include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed completions delta; `text_offset` is where this chunk's text starts in the completion."""
    choice = {"index": 0, "text": text,
              "logprobs": None if logprobs is None else completion_logprobs(logprobs, text_offset),
              "finish_reason": _reason(finish_reason)}
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model,
             "choices": [choice], "system_fingerprint": None}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(*, chat: bool, request_id: str, model: str, created: int,
                prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The final chunk sent when stream_options.include_usage: no choices, the request's usage."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens)}


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
