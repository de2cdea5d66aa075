"""The wire codec and the protocol schemas: every message round-trips; bad messages raise ProtocolError."""
from __future__ import annotations

import dataclasses

import msgpack
import pytest

from shared import protocol
from shared.protocol import (
    AdapterEvent,
    AdapterInfo,
    AdapterList,
    GenerateRequest,
    TokenChunk,
    TokenLogprobs,
    WorkerHeartbeat,
)
from shared.wire import PROTOCOL_VERSION, ProtocolError, decode, encode

INFO = AdapterInfo(name="caps", rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"], dtype="float16",
                   size_bytes=10, sha256={"adapter_config.json": "ab"}, base_model="m", base_fingerprint="f",
                   created=1.5)
SAMPLES = [
    protocol.ErrorReply(404, "no such model", code="model_not_found", param="model"),
    GenerateRequest(request_id="r1", kind="chat", model="caps", sampling={"max_tokens": 4, "stop": ["\n"]},
                    reply_to="_INBOX.a.b", messages=[{"role": "user", "content": "hi"}], gateway_id="g", sent_at=1.0),
    GenerateRequest(request_id="r2", kind="completion", model="m", sampling={}, reply_to="x", prompt=[1, 2, 3]),
    protocol.Placement("r1", "w1"),
    TokenChunk("r1", "w1", "héllo", 2, True, "stop", [TokenLogprobs("h", -0.5, [("h", -0.5), ("x", -2.0)])], 5, 2),
    protocol.CancelRequest("r1"),
    WorkerHeartbeat(worker_id="w1", model="m", base_fingerprint="f", max_model_len=2048, max_lora_rank=64,
                    running=1, queued=2, running_ranks=[0, 8], resident_adapters=["caps"], free_kv_blocks=3,
                    total_kv_blocks=9, interval_s=1.0),
    protocol.WorkerLost("w1", "silent"),
    protocol.GatewayHeartbeat("g1", 1.0, 3),
    INFO,
    protocol.RegisterAdapter("caps", "abc"),
    protocol.AdapterQuery("caps"),
    protocol.ListAdapters(),
    AdapterList([INFO, INFO]),
    AdapterEvent("deleted", INFO),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert decode(encode(message), type(message)) == message


def test_every_message_class_has_a_sample():
    classes = {c for c in vars(protocol).values() if dataclasses.is_dataclass(c) and c.__module__ == protocol.__name__}
    assert classes - {TokenLogprobs} == {type(m) for m in SAMPLES}  # TokenLogprobs rides inside TokenChunk


def _raw(t, body, v=PROTOCOL_VERSION):
    return msgpack.packb({"v": v, "t": t, "b": body})


@pytest.mark.parametrize("data, match", [
    (b"\xc1", "not a msgpack message"),
    (msgpack.packb([1, 2]), "envelope"),
    (_raw("Placement", {"request_id": "r", "worker_id": "w"}, v=99), "protocol version 99"),
    (_raw("CancelRequest", {"request_id": "r"}), "unexpected message type 'CancelRequest'"),
    (_raw("Placement", {"request_id": "r"}), "missing field 'worker_id'"),
    (_raw("Placement", {"request_id": 5, "worker_id": "w"}), r"Placement.request_id: expected str, got int"),
    (_raw("Placement", []), "expected a map"),
])
def test_bad_messages_raise_protocol_error(data, match):
    with pytest.raises(ProtocolError, match=match):
        decode(data, protocol.Placement)


def test_nested_and_typed_fields_are_checked():
    body = dataclasses.asdict(SAMPLES[4])
    body["logprobs"][0]["top"] = [["h", "not a number"]]
    with pytest.raises(ProtocolError, match=r"logprobs\[0\].top\[0\]\[1\]: expected a number"):
        decode(_raw("TokenChunk", body), TokenChunk)
    hb = dataclasses.asdict(SAMPLES[6])
    hb["running"] = True  # a bool is not an integer here
    with pytest.raises(ProtocolError, match="expected an integer"):
        decode(_raw("WorkerHeartbeat", hb), WorkerHeartbeat)


def test_schema_invariants_are_enforced_on_receipt():
    body = dataclasses.asdict(SAMPLES[2])
    body["messages"] = [{"role": "user", "content": "x"}]  # both prompt and messages
    with pytest.raises(ProtocolError, match="exactly one of messages"):
        decode(_raw("GenerateRequest", body), GenerateRequest)
    with pytest.raises(ProtocolError, match="event must be"):
        decode(_raw("AdapterEvent", {"event": "renamed", "adapter": dataclasses.asdict(INFO)}), AdapterEvent)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    body = {"request_id": "r", "worker_id": "w", "added_later": 1}
    assert decode(_raw("Placement", body), protocol.Placement) == protocol.Placement("r", "w")
