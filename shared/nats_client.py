"""NATS helpers every service uses: connect, send typed messages with trace context, answer, and dispatch.

`publish`/`request` encode a protocol message (shared/wire.py) and put the current trace context in the
headers. `request` returns the decoded reply, or raises MeshError when the other side answered ErrorReply, did
not answer in time, or nobody listens. `subscribe_handler` wraps a service's handler: it decodes and validates
the message, runs the handler inside a span that continues the sender's trace, and answers an ErrorReply
(never crashes the service) when the message is malformed or the handler fails.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

from shared import telemetry
from shared.protocol import ErrorReply
from shared.wire import ProtocolError, decode, encode

log = logging.getLogger(__name__)


class MeshError(Exception):
    """A request over the mesh failed; carries the ErrorReply to show the API caller."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.message)
        self.reply = reply

    @classmethod
    def of(cls, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> MeshError:
        return cls(ErrorReply(status=status, message=message, type=type, code=code, param=param))


def redact(url: str) -> str:
    """A NATS URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.partition(":")[0]
    return f"{scheme}://{user}:***@{host}"


async def connect(url: str, name: str, **options: Any) -> NATS:
    """Connect to NATS (reconnecting forever once connected); ConnectionError with one line if it cannot."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    try:
        return await nats.connect(
            url, name=name, error_cb=on_error, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            connect_timeout=options.pop("connect_timeout", 5), allow_reconnect=True, **options,
        )
    except Exception as exc:  # nats raises NoServersError, OSError, auth errors...
        reason = str(exc) or type(exc).__name__
        raise ConnectionError(f"cannot connect to NATS at {redact(url)}: {reason}") from None


async def sync_with_server(nc: NATS) -> None:
    """Return once the server has processed everything sent on `nc` so far (subscriptions included).

    nats-py's own `flush()` is not enough: it writes its PING straight to the socket while the SUB commands may
    still sit in the client's pending buffer, so the PONG can come back before the server knows the
    subscriptions, and a request sent right after "started" gets no_responders. Writing the pending buffer first
    (and waiting for it) puts the PING behind them.
    """
    if nc.is_closed:
        raise ConnectionError("the NATS connection is closed")
    if nc.is_connected:
        await nc._flush_pending(force_flush=True)  # noqa: SLF001 - see the docstring; no public call does this
    await nc.flush()


async def flush_writes(nc: NATS) -> None:
    """Write what `nc` has buffered to its socket now, and return once written (no server round trip, unlike
    `nc.flush()`). nats-py's publish only buffers; its flusher task writes on a later turn of the event loop."""
    if nc.is_connected:
        await nc._flush_pending(force_flush=True)  # noqa: SLF001 - the public flush() also waits for a PONG


async def publish(nc: NATS, subject: str, message: Any, reply: str = "") -> None:
    await nc.publish(subject, encode(message), reply=reply, headers=telemetry.inject())


async def request(nc: NATS, subject: str, message: Any, *expected: type, timeout: float) -> Any:
    """Send `message` and return the reply (one of `expected`); MeshError for ErrorReply, timeout, no responders."""
    try:
        msg = await nc.request(subject, encode(message), timeout=timeout, headers=telemetry.inject())
    except NoRespondersError:
        raise MeshError.of(503, f"no service is listening on {subject}; is the mesh up?", "service_unavailable",
                           "no_responders") from None
    except NatsTimeoutError:
        raise MeshError.of(503, f"no answer on {subject} within {timeout:g}s", "service_unavailable",
                           "timeout") from None
    try:
        reply = decode(msg.data, ErrorReply, *expected)
    except ProtocolError as exc:
        raise MeshError.of(502, f"bad answer on {subject}: {exc}", "api_error") from None
    if isinstance(reply, ErrorReply):
        raise MeshError(reply)
    return reply


async def respond(nc: NATS, msg: Msg, message: Any) -> None:
    """Answer a request (no-op when the sender did not ask for an answer)."""
    if msg.reply:
        await nc.publish(msg.reply, encode(message), headers=telemetry.inject())


Handler = Callable[[Msg, Any], Awaitable[Any]]


async def subscribe_handler(nc: NATS, subject: str, expected: tuple[type, ...], handler: Handler,
                            queue: str = "", span_name: str | None = None):
    """Subscribe `handler(msg, message)`; its return value (if any) is the reply. Errors become ErrorReply."""
    tracer = telemetry.tracer("caraserve")
    name = span_name or subject

    async def callback(msg: Msg) -> None:
        with tracer.start_as_current_span(name, context=telemetry.extract(msg.headers)):
            try:
                message = decode(msg.data, *expected)
            except ProtocolError as exc:
                log.warning("malformed message on %s: %s", msg.subject, exc)
                await respond(nc, msg, ErrorReply(400, f"malformed message: {exc}", code="malformed_message"))
                return
            try:
                answer = await handler(msg, message)
            except MeshError as exc:
                answer = exc.reply
            except Exception as exc:  # a handler bug must not take the service down
                log.exception("handler for %s failed", msg.subject)
                answer = ErrorReply(500, f"internal error: {type(exc).__name__}: {exc}", "api_error")
            if answer is not None:
                await respond(nc, msg, answer)

    return await nc.subscribe(subject, queue=queue, cb=callback)
