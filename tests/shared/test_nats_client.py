"""shared.nats_client against a real embedded nats-server."""
from __future__ import annotations

from shared.nats_client import connect, flush_writes, sync_with_server


async def test_sync_with_server_sends_the_subscriptions_before_its_ping(nats_server):
    """nats-py's flush() writes PING past the pending SUBs; a PONG would then not mean the server has them."""
    nc = await connect(nats_server.url, "test-sync")
    try:
        written: list[bytes] = []
        transport = nc._transport
        write, writelines = transport.write, transport.writelines
        transport.write = lambda data: (written.append(bytes(data)), write(data))[1]
        transport.writelines = lambda lines: (written.extend(bytes(x) for x in lines), writelines(lines))[1]

        async def answer(msg):
            await msg.respond(b"ok")

        await nc.subscribe("probe.subject", queue="q", cb=answer)
        await sync_with_server(nc)
        sub_at = next(i for i, data in enumerate(written) if data.startswith(b"SUB probe.subject"))
        ping_at = next(i for i, data in enumerate(written) if data.startswith(b"PING"))
        assert sub_at < ping_at, written
        other = await connect(nats_server.url, "test-requester")
        try:
            assert (await other.request("probe.subject", b"x", timeout=5)).data == b"ok"
        finally:
            await other.close()
    finally:
        await nc.close()


async def test_flush_writes_puts_what_publish_buffered_on_the_socket(nats_server):
    """The worker flushes a step's tokens before the next step takes the CPU; publish alone only buffers them."""
    nc = await connect(nats_server.url, "test-flush")
    try:
        written: list[bytes] = []
        transport = nc._transport
        writelines = transport.writelines
        transport.writelines = lambda lines: (written.extend(bytes(x) for x in lines), writelines(lines))[1]
        await nc.publish("flush.subject", b"token")
        assert not any(b"flush.subject" in data for data in written)  # still in nats-py's buffer
        await flush_writes(nc)
        assert any(b"flush.subject" in data for data in written) and nc._pending_data_size == 0
    finally:
        await nc.close()
