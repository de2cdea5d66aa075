"""Tracing setup: off by default (no SDK provider, context still passes through), clear errors for bad exporters."""
from __future__ import annotations

import pytest
from shared import telemetry

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_exporter_none_installs_nothing_and_still_propagates():
    assert telemetry.setup_tracing("t", "none") is None
    with telemetry.tracer("t").start_as_current_span("s", context=telemetry.extract({"traceparent": PARENT})):
        headers = telemetry.inject()
    assert headers["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


def test_unknown_exporter_is_refused():
    with pytest.raises(telemetry.TracingSetupError, match="unknown trace exporter 'zipkin'"):
        telemetry.setup_tracing("t", "zipkin")
