"""One request is one trace: the gateway's HTTP span, the scheduler's placement and the worker's admission share
a trace id, carried across NATS in message headers."""
from __future__ import annotations

import aiohttp
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import telemetry


@pytest.fixture(scope="module")
def spans():
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("caraserve-test", span_exporter=exporter)
    return exporter


@pytest.mark.slow
async def test_one_request_is_one_trace_across_services(spans, mesh):
    spans.clear()
    body = {"model": mesh.engine.model_name, "prompt": "Hello", "max_tokens": 2}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {mesh.config.api_key}"}) as http:
        async with http.post(f"{mesh.base_url}/v1/completions", json=body) as resp:
            assert resp.status == 200
    finished = {s.name: s for s in spans.get_finished_spans()}
    http_span = finished["POST /v1/completions"]
    place, admit = finished["scheduler.place"], finished["worker.generate"]
    trace_id = http_span.context.trace_id
    assert place.context.trace_id == trace_id and admit.context.trace_id == trace_id
    assert place.parent is not None and admit.parent is not None  # children, not new roots
