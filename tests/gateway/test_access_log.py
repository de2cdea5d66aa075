"""The gateway's access log: repeated health/readiness polls are logged once per change of status."""
import logging

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from services.gateway.service import ProbeQuietAccessLogger


def test_probes_logged_only_when_their_status_changes(caplog, monkeypatch):
    monkeypatch.setattr(ProbeQuietAccessLogger, "_last_status", {"/healthz": 200, "/readyz": 200})
    logger = logging.getLogger("test.access")
    polls = [("/readyz", 503), ("/readyz", 503), ("/readyz", 503), ("/healthz", 200), ("/readyz", 200),
             ("/readyz", 200), ("/v1/models", 200), ("/v1/models", 200), ("/readyz", 503)]
    with caplog.at_level(logging.INFO, logger="test.access"):
        for path, status in polls:
            # a logger per poll, as aiohttp makes one per connection
            ProbeQuietAccessLogger(logger, '%r %s').log(make_mocked_request("GET", path),
                                                        web.Response(status=status), 0.001)
    assert [r.getMessage() for r in caplog.records] == [
        "GET /readyz HTTP/1.1 503", "GET /readyz HTTP/1.1 200", "GET /v1/models HTTP/1.1 200",
        "GET /v1/models HTTP/1.1 200", "GET /readyz HTTP/1.1 503"]
