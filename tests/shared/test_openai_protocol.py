"""The OpenAI wire format: request validation (every refusal names its parameter) and response shapes."""
from __future__ import annotations

import json
import math

import pytest

from services.gpu_worker.engine.sequence import FinishReason
from shared.openai_protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    SSE_DONE,
    LogprobItem,
    OpenAIError,
    chat_completion_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    model_not_found,
    parse_chat_request,
    parse_completion_request,
    sse_event,
    usage_chunk,
)


def chat(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def completion(**extra):
    return {"model": "m", "prompt": "hi", **extra}


# ---------------------------------------------------------------- valid requests


def test_chat_defaults():
    req = parse_chat_request(chat())
    assert req.kind == "chat" and req.model == "m"
    assert req.messages == [{"role": "user", "content": "hi"}] and req.prompt is None
    assert req.params.max_tokens == DEFAULT_CHAT_MAX_TOKENS
    assert req.params.temperature == 1.0 and req.params.top_p == 1.0 and req.params.stop == []
    assert not req.stream and not req.include_usage and not req.logprobs and req.top_logprobs == 0


def test_chat_sampling_fields():
    req = parse_chat_request(chat(max_tokens=7, temperature=0, top_p=0.5, top_k=5, seed=3, stop="\n",
                                  user="u", presence_penalty=0, frequency_penalty=0.0, n=1, logit_bias={},
                                  tool_choice="none", response_format={"type": "text"}, some_future_key=1))
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (7, 0, 0.5, 5, 3, ["\n"])
    assert req.user == "u"


def test_ignore_eos_extension():
    assert parse_completion_request(completion(ignore_eos=True)).params.ignore_eos is True
    assert parse_completion_request(completion()).params.ignore_eos is False
    with pytest.raises(OpenAIError, match="ignore_eos: expected a boolean"):
        parse_completion_request(completion(ignore_eos="yes"))


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse_chat_request(chat(max_tokens=9, max_completion_tokens=4)).params.max_tokens == 4
    unset = parse_chat_request(chat(max_tokens=None, max_completion_tokens=None))
    assert unset.params.max_tokens == DEFAULT_CHAT_MAX_TOKENS


def test_chat_content_parts_and_developer_role():
    req = parse_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": "ok"},
    ]})
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                            {"role": "assistant", "content": "ok"}]


def test_chat_logprobs_and_stream():
    req = parse_chat_request(chat(logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True}))
    assert req.logprobs and req.top_logprobs == 3 and req.params.top_logprobs == 3
    assert req.stream and req.include_usage
    assert parse_chat_request(chat(logprobs=True)).params.logprobs


@pytest.mark.parametrize("prompt, expected", [
    ("hello", "hello"), ([1, 2, 3], [1, 2, 3]), (["hello"], "hello"), ([[4, 5]], [4, 5]),
])
def test_completion_prompts(prompt, expected):
    req = parse_completion_request(completion(prompt=prompt))
    assert req.kind == "completion" and req.prompt == expected and req.messages is None
    assert req.params.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS


def test_completion_logprobs_is_a_count():
    assert parse_completion_request(completion()).params.logprobs is False
    zero = parse_completion_request(completion(logprobs=0)).params
    assert zero.logprobs and zero.top_logprobs == 0
    assert parse_completion_request(completion(logprobs=4)).params.top_logprobs == 4
    ok = parse_completion_request(completion(best_of=1, echo=False, suffix=None, stop=["a", "b"], max_tokens=3))
    assert ok.params.stop == ["a", "b"] and ok.params.max_tokens == 3


# ---------------------------------------------------------------- refusals

CHAT_REFUSALS = [
    (None, None, "must be a JSON object"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "model: this parameter is required"),
    (chat(model=3), "model", "model: expected a non-empty string"),
    ({"model": "m"}, "messages", "messages: this parameter is required"),
    (chat(messages=[]), "messages", "non-empty list"),
    (chat(messages=["hi"]), "messages[0]", "messages[0]: expected an object"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "not supported"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role", "expected one of"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content", "expected a string"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0]", "only text content parts"),
    (chat(messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]),
     "messages[0].tool_calls", "tool calls are not supported"),
    (chat(n=2), "n", "only n=1 is supported"),
    (chat(n="1"), "n", "n: expected an integer"),
    (chat(tools=[{"type": "function"}]), "tools", "not supported"),
    (chat(tool_choice="auto"), "tool_choice", "not supported"),
    (chat(functions=[{"name": "f"}]), "functions", "not supported"),
    (chat(response_format={"type": "json_object"}), "response_format", "only type 'text'"),
    (chat(modalities=["text", "audio"]), "modalities", "only ['text']"),
    (chat(audio={"voice": "x"}), "audio", "not supported"),
    (chat(presence_penalty=0.5), "presence_penalty", "only 0 is supported"),
    (chat(frequency_penalty=-1), "frequency_penalty", "only 0 is supported"),
    (chat(logit_bias={"1": 5}), "logit_bias", "not supported"),
    (chat(temperature="hot"), "temperature", "temperature: expected a number, got str"),
    (chat(temperature=True), "temperature", "temperature: expected a number, got true"),
    (chat(temperature=3), "temperature", "temperature must be a number between 0 and 2"),
    (chat(temperature=10**400), "temperature", "temperature: expected a finite number"),
    (chat(top_p=float("nan")), "top_p", "top_p: expected a finite number"),
    (chat(top_p=0), "top_p", "top_p must be a number in (0, 1]"),
    (chat(top_k=-2), "top_k", "top_k must be"),
    (chat(top_k=1.5), "top_k", "top_k: expected an integer"),
    (chat(seed="x"), "seed", "seed: expected an integer"),
    (chat(seed=2**64), "seed", "seed: must fit in 64 bits"),
    (chat(max_tokens=0), "max_tokens", "max_tokens: must be >= 1"),
    (chat(max_completion_tokens=2.5), "max_completion_tokens", "expected an integer"),
    (chat(stop=5), "stop", "stop: expected a string or a list of strings"),
    (chat(stop=["a", 1]), "stop", "stop: expected a string or a list of strings"),
    (chat(stop=[""]), "stop", "non-empty"),
    (chat(logprobs="yes"), "logprobs", "logprobs: expected a boolean"),
    (chat(top_logprobs=2), "top_logprobs", "requires logprobs to be true"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs", "between 0 and 20"),
    (chat(stream="yes"), "stream", "stream: expected a boolean"),
    (chat(stream_options={"include_usage": True}), "stream_options", "only allowed when stream is true"),
]

COMPLETION_REFUSALS = [
    ({"model": "m"}, "prompt", "prompt: this parameter is required"),
    (completion(prompt=["a", "b"]), "prompt", "only one prompt per request"),
    (completion(prompt=[]), "prompt", "expected a string or a non-empty list of token ids"),
    (completion(prompt=[1, "a"]), "prompt", "expected a string or a non-empty list of token ids"),
    (completion(prompt=[3, -1]), "prompt", "token ids must be >= 0"),
    (completion(prompt=7), "prompt", "expected a string"),
    (completion(best_of=2), "best_of", "only best_of=1"),
    (completion(echo=True), "echo", "echo=true is not supported"),
    (completion(suffix="end"), "suffix", "suffix is not supported"),
    (completion(logprobs=True), "logprobs", "logprobs: expected an integer, got true"),
    (completion(logprobs=21), "logprobs", "between 0 and 20"),
    (completion(n=3), "n", "only n=1"),
    (completion(max_tokens=-1), "max_tokens", "must be >= 1"),
    (completion(frequency_penalty=1), "frequency_penalty", "only 0"),
]


@pytest.mark.parametrize("body, param, message", CHAT_REFUSALS)
def test_chat_refusals(body, param, message):
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(body)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert message in err.message and "\n" not in err.message
    assert err.param == param


@pytest.mark.parametrize("body, param, message", COMPLETION_REFUSALS)
def test_completion_refusals(body, param, message):
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(body)
    assert info.value.status == 400 and message in info.value.message and info.value.param == param


def test_unsupported_parameters_have_a_code():
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(chat(n=2))
    assert info.value.code == "unsupported_parameter"


def test_error_shapes():
    err = OpenAIError("bad thing", param="x", code="c")
    assert err.to_dict() == {
        "error": {"message": "bad thing", "type": "invalid_request_error", "param": "x", "code": "c"}}
    missing = model_not_found("foo")
    assert missing.status == 404 and missing.code == "model_not_found" and "`foo`" in missing.message


# ---------------------------------------------------------------- responses

ITEMS = [LogprobItem("Hi", -0.25, [("Hi", -0.25), ("Hey", -1.5)]), LogprobItem(" é", -math.inf, [("x", -0.1)])]


def test_chat_completion_response_shape():
    body = chat_completion_response(request_id="chatcmpl-1", model="m", created=5, text="Hi é",
                                    finish_reason=FinishReason.STOP, prompt_tokens=3, completion_tokens=2)
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1" and body["created"] == 5
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi é", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    json.dumps(body, allow_nan=False)


def test_chat_logprobs_shape():
    body = chat_completion_response(request_id="c", model="m", created=0, text="Hi é", finish_reason="length",
                                    prompt_tokens=1, completion_tokens=2, logprobs=ITEMS)
    lp = body["choices"][0]["logprobs"]
    assert lp["content"][0] == {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
        {"token": "Hey", "logprob": -1.5, "bytes": [72, 101, 121]}]}
    assert lp["content"][1]["bytes"] == [32, 0xC3, 0xA9] and lp["content"][1]["logprob"] == -9999.0
    assert body["choices"][0]["finish_reason"] == "length"
    json.dumps(body, allow_nan=False)  # -inf never reaches the wire


def test_completion_response_and_logprobs_shape():
    body = completion_response(request_id="cmpl-1", model="m", created=0, text="Hi é", finish_reason="stop",
                               prompt_tokens=4, completion_tokens=2, logprobs=ITEMS)
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == "Hi é" and choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["logprobs"] == {
        "tokens": ["Hi", " é"],
        "token_logprobs": [-0.25, -9999.0],
        "top_logprobs": [{"Hi": -0.25, "Hey": -1.5}, {"x": -0.1, " é": -9999.0}],  # the sampled token always in
        "text_offset": [0, 2],
    }
    assert body["usage"]["total_tokens"] == 6
    assert completion_response(request_id="c", model="m", created=0, text="", finish_reason="length",
                               prompt_tokens=1, completion_tokens=0)["choices"][0]["logprobs"] is None


def test_stream_chunks():
    first = chat_completion_chunk(request_id="c", model="m", created=1, role="assistant", content="",
                                  include_usage=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    mid = chat_completion_chunk(request_id="c", model="m", created=1, content="Hi", logprobs=ITEMS[:1])
    assert mid["choices"][0]["delta"] == {"content": "Hi"} and "usage" not in mid
    assert mid["choices"][0]["logprobs"]["content"][0]["token"] == "Hi"
    last = chat_completion_chunk(request_id="c", model="m", created=1, finish_reason=FinishReason.LENGTH)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"

    text = completion_chunk(request_id="d", model="m", created=1, text=" é", logprobs=ITEMS[1:], text_offset=2)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == " é"
    assert text["choices"][0]["logprobs"]["text_offset"] == [2]

    final = usage_chunk(chat=True, request_id="c", model="m", created=1, prompt_tokens=2, completion_tokens=3)
    assert final["choices"] == [] and final["usage"]["total_tokens"] == 5
    assert usage_chunk(chat=False, request_id="d", model="m", created=1, prompt_tokens=0,
                       completion_tokens=0)["object"] == "text_completion"


def test_sse_encoding():
    event = sse_event({"a": "é"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == {"a": "é"}
    assert SSE_DONE == b"data: [DONE]\n\n"
