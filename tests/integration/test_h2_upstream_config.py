"""``upstreams.NAME.http2`` settings, from config text through ``build_snapshot`` to the pool,
against real h2c peers: a grpcio server, and a raw h2 server that counts PINGs."""

from __future__ import annotations

import asyncio
import textwrap

from gateway.config import load_config_text
from gateway.proxy.h2.client import CONNECTION_LOST, H2InstancePool
from gateway.snapshot import build_snapshot
from tests.integration.h2_peers import (
    GrpcServer,
    RawH2Server,
    Recorder,
    grpc_frame,
    grpc_messages,
    grpc_request_headers,
    poll,
)


def pool_from_config(port: int, http2: str) -> H2InstancePool:
    text = textwrap.dedent(
        f"""
        upstreams:
          rpc:
            instances: [127.0.0.1:{port}]
            protocol: h2c
            http2: {http2}
        routes: [{{name: rpc, upstream: rpc}}]
        """
    )
    snapshot = build_snapshot(load_config_text(text, "gateway.yaml"))
    pool = snapshot.upstreams["rpc"].instances[0].pool
    assert isinstance(pool, H2InstancePool)
    return pool


async def test_max_connections_and_max_concurrent_streams_bound_the_connections() -> None:
    server = GrpcServer()  # grpcio's own stream limit is far above 1
    try:
        pool = pool_from_config(server.port, "{max_connections: 2, max_concurrent_streams: 1}")
        calls = []
        for i in range(4):
            call = Recorder()
            call.stream = pool.open_stream(
                grpc_request_headers(server.authority, "Wait"), False, call
            )
            call.stream.send_data(grpc_frame(b"w%d" % i), end=True)
            calls.append(call)
        # One stream per connection, two connections: two calls at the server, two waiting.
        await poll(lambda: pool.active_streams == 2 and len(pool.pending) == 2, what="2 + 2")
        assert pool.open_count == 2 and pool.connections_opened == 2
        assert all(conn.max_streams == 1 for conn in pool.connections)
        server.state.gate.set()
        await asyncio.wait_for(asyncio.gather(*(c.done for c in calls)), 20)
        assert [grpc_messages(bytes(c.body)) for c in calls] == [[b"w%d" % i] for i in range(4)]
        assert pool.connections_opened == 2  # the waiting calls took the same connections
        pool.close_all()
    finally:
        server.stop(None)


async def test_ping_interval_keeps_pinging_and_ping_timeout_finds_a_hung_peer() -> None:
    servers: list[RawH2Server] = []

    def on_request(server: RawH2Server, stream_id: int, headers: object) -> None:
        if stream_id == 1:
            server.respond(stream_id, b"alive")
        else:
            assert server.transport is not None
            server.transport.pause_reading()  # hung: no frame reaches the gateway any more

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: RawH2Server(on_request, servers), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]
    try:
        pool = pool_from_config(port, "{ping_interval: 50ms, ping_timeout: 300ms}")
        assert (pool.ping_interval, pool.ping_timeout) == (0.05, 0.3)
        first = Recorder()
        first.stream = pool.open_stream(headers, True, first)
        await asyncio.wait_for(first.done, 10)
        assert bytes(first.body) == b"alive"
        # Idle and quiet: PINGs go out every interval, are answered, and the connection stays.
        await poll(lambda: servers[0].pings >= 3, what="keepalive PINGs")
        assert pool.open_count == 1 and len(pool.idle) == 1
        hung = Recorder()
        hung.stream = pool.open_stream(headers, True, hung)
        started = loop.time()
        await asyncio.wait_for(hung.done, 10)
        # Failed by the keepalive (a silent interval, then ping_timeout), not by a stream
        # timeout (there is none here).
        assert hung.reset == (CONNECTION_LOST, False)
        assert 0.3 <= loop.time() - started < 5
        assert pool.open_count == 0
    finally:
        listener.close()
