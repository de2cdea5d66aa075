"""OpenTelemetry tracing for the mesh: setup per process, and trace context carried in NATS headers.

One request is one trace: the gateway starts the root span, every NATS message it sends carries the W3C
`traceparent` header (`inject`), and the receiving service starts its span as a child of it (`extract`).
Exporting is off by default (`--trace-exporter none`): then no spans are recorded, but a traceparent that a
client sent still propagates through every service. `console` prints finished spans as JSON on stderr; `otlp` needs the
opentelemetry-exporter-otlp package and sends to $OTEL_EXPORTER_OTLP_ENDPOINT.
"""
from __future__ import annotations

import sys

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter


class TracingSetupError(RuntimeError):
    """The chosen exporter cannot be set up (a one-line reason)."""


def _exporter(kind: str) -> SpanExporter | None:
    if kind == "none":
        return None
    if kind == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    if kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise TracingSetupError(
                "--trace-exporter otlp needs the package opentelemetry-exporter-otlp-proto-http (pip install it)"
            ) from None
        return OTLPSpanExporter()
    raise TracingSetupError(f"unknown trace exporter {kind!r} (none, console or otlp)")


def setup_tracing(service_name: str, exporter: str = "none",
                  span_exporter: SpanExporter | None = None) -> TracerProvider | None:
    """Install a tracer provider for this process; `span_exporter` (tests) is used as given, synchronously.

    With exporter "none" no SDK provider is installed: OpenTelemetry's no-op tracer still passes an incoming
    traceparent on through every service (the caller's trace continues), and nothing is recorded, which keeps
    the request path free of span bookkeeping."""
    if exporter == "none" and span_exporter is None:
        return None
    current = trace.get_tracer_provider()
    # OpenTelemetry allows one provider per process: several services in one process (tests) share the first
    provider = current if isinstance(current, TracerProvider) else TracerProvider(
        resource=Resource.create({"service.name": service_name}))
    if span_exporter is not None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    else:
        chosen = _exporter(exporter)
        if chosen is not None:
            provider.add_span_processor(BatchSpanProcessor(chosen))
    if provider is not current:
        trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """The current trace context as NATS headers (merged into `headers`)."""
    headers = dict(headers or {})
    propagate.inject(headers)
    return headers


def extract(headers: dict[str, str] | None) -> context.Context:
    """The trace context a message carried (an empty context if none)."""
    return propagate.extract(headers or {})
