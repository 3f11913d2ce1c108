"""The upstream HTTP/2 client (gateway/proxy/h2/client.py) against real peers: grpcio servers
(h2c and TLS with ALPN h2) and a raw h2 server for GOAWAY with a chosen last-stream-id."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
import time
from pathlib import Path

import grpc
import pytest

from gateway.proxy.h2.client import (
    CONNECTION_LOST,
    REFUSED_STREAM,
    H2ConnectError,
    H2InstancePool,
)
from tests.integration.h2_peers import (
    GrpcServer,
    RawH2Server,
    Recorder,
    grpc_frame,
    grpc_messages,
    grpc_request_headers,
    poll,
)
from tests.integration.tls_support import CertFiles


def make_pool(port: int, **options: object) -> H2InstancePool:
    settings: dict[str, object] = {"max_idle": 4, "idle_timeout": 60.0, "connect_timeout": 2.0}
    settings.update(options)
    return H2InstancePool("127.0.0.1", port, **settings)  # type: ignore[arg-type]


def unary(
    pool: H2InstancePool, authority: str, method: str, message: bytes, **recorder: bool
) -> Recorder:
    listener = Recorder(**recorder)
    listener.stream = pool.open_stream(grpc_request_headers(authority, method), False, listener)
    listener.stream.send_data(grpc_frame(message), end=True)
    return listener


@pytest.fixture
def grpc_server() -> object:
    server = GrpcServer()
    yield server
    server.stop(None)


async def test_unary_call_over_h2c_returns_message_and_trailers(grpc_server: GrpcServer) -> None:
    pool = make_pool(grpc_server.port)
    call = unary(pool, grpc_server.authority, "Unary", b"hello over h2c")
    await asyncio.wait_for(call.done, 10)
    assert call.ended and call.reset is None
    assert call.status == 200
    assert call.header(b"content-type") == b"application/grpc"
    assert grpc_messages(bytes(call.body)) == [b"hello over h2c"]
    assert call.trailers is not None and (b"grpc-status", b"0") in call.trailers
    # The connection stays for the next call: one connection, now idle.
    second = unary(pool, grpc_server.authority, "Unary", b"again")
    await asyncio.wait_for(second.done, 10)
    assert grpc_messages(bytes(second.body)) == [b"again"]
    assert pool.connections_opened == 1
    await poll(lambda: len(pool.idle) == 1, what="the connection to be idle")
    pool.close_all()


async def test_error_status_arrives_in_trailers(grpc_server: GrpcServer) -> None:
    pool = make_pool(grpc_server.port)
    call = unary(pool, grpc_server.authority, "Fail", b"x")
    await asyncio.wait_for(call.done, 10)
    assert call.ended
    # grpcio answers an abort Trailers-Only: the status is in the one HEADERS frame.
    assert call.header(b"grpc-status") == b"9"  # FAILED_PRECONDITION
    assert call.header(b"grpc-message") == b"not today: 100%25 sure"
    pool.close_all()


async def test_many_streams_share_one_connection(grpc_server: GrpcServer) -> None:
    pool = make_pool(grpc_server.port)
    calls = [unary(pool, grpc_server.authority, "Unary", b"m%d" % i) for i in range(50)]
    await asyncio.wait_for(asyncio.gather(*(c.done for c in calls)), 20)
    for index, call in enumerate(calls):
        assert grpc_messages(bytes(call.body)) == [b"m%d" % index]
    assert pool.connections_opened == 1
    pool.close_all()


async def test_concurrency_above_max_concurrent_streams_opens_a_second_connection() -> None:
    import threading

    server = GrpcServer(max_concurrent_streams=2)
    try:
        # All four calls must be at the server at once to pass the barrier: with 2 streams per
        # connection, that takes two connections.
        server.state.barrier = threading.Barrier(4)
        pool = make_pool(server.port, max_connections=4)
        calls = [unary(pool, server.authority, "Barrier", b"b%d" % i) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(c.done for c in calls)), 20)
        assert all(c.ended and c.reset is None for c in calls)
        assert [grpc_messages(bytes(c.body)) for c in calls] == [[b"b%d" % i] for i in range(4)]
        assert pool.connections_opened == 2
        assert all(conn.max_streams == 2 for conn in pool.connections)
        pool.close_all()
    finally:
        server.stop(None)


async def test_streams_wait_for_a_place_when_the_connection_cap_is_reached() -> None:
    server = GrpcServer(max_concurrent_streams=1)
    try:
        pool = make_pool(server.port, max_connections=1)
        calls = [unary(pool, server.authority, "Unary", b"q%d" % i) for i in range(5)]
        await poll(lambda: len(pool.pending) >= 3, what="streams waiting in the pool")
        await asyncio.wait_for(asyncio.gather(*(c.done for c in calls)), 20)
        assert [grpc_messages(bytes(c.body)) for c in calls] == [[b"q%d" % i] for i in range(5)]
        assert pool.connections_opened == 1
        pool.close_all()
    finally:
        server.stop(None)


async def test_goaway_refuses_streams_above_last_stream_id_as_never_processed() -> None:
    servers: list[RawH2Server] = []
    answered = 0

    def on_request(server: RawH2Server, stream_id: int, headers: object) -> None:
        nonlocal answered
        if server is servers[0] and len(server.requests) == 3:
            # RFC 9113 §6.8: streams 1 and 3 will be processed, stream 5 will not.
            server.goaway(last_stream_id=3)
            for sid in server.requests[:2]:
                server.respond(sid, b"done %d" % sid)
                answered += 1
        elif server is not servers[0]:
            server.respond(stream_id, b"fresh %d" % stream_id)

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: RawH2Server(on_request, servers), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        pool = make_pool(port)
        calls = []
        for _ in range(3):
            call = Recorder()
            call.stream = pool.open_stream(
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":authority", b"t"),
                    (b":path", b"/p"),
                ],
                True,
                call,
            )
            calls.append(call)
        await asyncio.wait_for(asyncio.gather(*(c.done for c in calls)), 10)
        assert [c.stream.stream_id for c in calls if c.stream] == [1, 3, 5]
        assert calls[0].ended and bytes(calls[0].body) == b"done 1"
        assert calls[1].ended and bytes(calls[1].body) == b"done 3"
        assert calls[2].reset == (REFUSED_STREAM, True)
        assert not calls[2].ended
        # The GOAWAY'd connection takes no new stream: the retry goes on a new connection.
        retry = Recorder()
        retry.stream = pool.open_stream(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", b"t"),
                (b":path", b"/p"),
            ],
            True,
            retry,
        )
        await asyncio.wait_for(retry.done, 10)
        assert bytes(retry.body) == b"fresh 1"
        assert pool.connections_opened == 2
        # ... and the drained one closes once its streams are done.
        await poll(lambda: pool.open_count == 1, what="the drained connection to close")
        pool.close_all()
    finally:
        listener.close()


async def test_grpcio_graceful_stop_lets_the_call_in_flight_finish() -> None:
    server = GrpcServer()
    pool = make_pool(server.port)
    call = unary(pool, server.authority, "Wait", b"in flight")
    # The handler must be running: grpcio cancels calls it has not started when it stops.
    await poll(server.state.entered.is_set, what="the call to reach its handler")
    assert pool.active_streams == 1 and pool.connections_opened == 1
    stopped = server.stop(grace=10)
    # grpcio drains with GOAWAY (and a PING) before the call ends; the call must survive it.
    await poll(lambda: pool.draining != [], what="the GOAWAY to arrive")
    server.state.gate.set()
    await asyncio.wait_for(call.done, 10)
    assert call.ended and call.reset is None
    assert grpc_messages(bytes(call.body)) == [b"in flight"]
    assert call.trailers is not None and (b"grpc-status", b"0") in call.trailers
    await asyncio.get_running_loop().run_in_executor(None, stopped.wait, 10)
    await poll(lambda: pool.open_count == 0, what="the connection to close")


async def test_large_streamed_response_stops_at_the_stream_window_until_acknowledged(
    grpc_server: GrpcServer,
) -> None:
    window = 64 * 1024
    pool = make_pool(grpc_server.port, stream_window=window)
    count, size = 200, 64 * 1024  # 12.8 MB of response
    call = unary(
        pool, grpc_server.authority, "StreamOut", struct.pack(">II", count, size), auto_ack=False
    )
    # Nothing acknowledged: the server may send one stream window and no more.
    await poll(lambda: len(call.body) >= window, what="a window of data")
    stream = call.stream
    assert stream is not None
    # Other streams on the same connection are not stalled by this one.
    other = unary(pool, grpc_server.authority, "Unary", b"side by side")
    await asyncio.wait_for(other.done, 10)
    assert grpc_messages(bytes(other.body)) == [b"side by side"]
    assert len(call.body) == window and stream.unacked == window
    # Take the data as a slow consumer would: a window at a time.
    taken = 0
    expected = (5 + size) * count
    while not call.done.done():
        if stream.unacked:
            taken += stream.unacked
            stream.acknowledge(stream.unacked)
        await asyncio.sleep(0)
        assert len(call.body) - taken <= window
    assert call.ended and len(call.body) == expected
    messages = grpc_messages(bytes(call.body))
    assert [m[:1] for m in messages] == [bytes([i % 251]) for i in range(count)]
    assert pool.connections_opened == 1
    pool.close_all()


async def test_large_request_is_paused_by_flow_control_and_arrives_whole(
    grpc_server: GrpcServer,
) -> None:
    pool = make_pool(grpc_server.port)
    listener = Recorder()
    stream = pool.open_stream(
        grpc_request_headers(grpc_server.authority, "DigestIn"), False, listener
    )
    listener.stream = stream
    digest = hashlib.sha256()
    total = 0
    for index in range(64):  # 64 messages of 128 KiB: 8 MiB, far above any initial window
        message = bytes([index]) * (128 * 1024)
        digest.update(message)
        total += len(message)
        stream.send_data(grpc_frame(message))
    stream.send_data(b"", end=True)
    assert listener.paused >= 1 and stream.pending_bytes > 0
    await asyncio.wait_for(listener.done, 20)
    assert listener.resumed >= 1 and stream.pending_bytes == 0
    [reply] = grpc_messages(bytes(listener.body))
    assert reply == struct.pack(">Q", total) + digest.digest()
    pool.close_all()


async def test_bidirectional_stream_interleaves_requests_and_replies(
    grpc_server: GrpcServer,
) -> None:
    pool = make_pool(grpc_server.port)
    chat = Recorder()
    stream = pool.open_stream(grpc_request_headers(grpc_server.authority, "Chat"), False, chat)
    chat.stream = stream
    for turn in range(5):
        stream.send_data(grpc_frame(b"turn %d" % turn))
        # Each reply arrives while the request stream is still open: full duplex.
        replies = turn + 1
        await poll(lambda n=replies: len(grpc_messages(bytes(chat.body))) == n, what="a reply")
        assert not chat.ended
    stream.send_data(b"", end=True)
    await asyncio.wait_for(chat.done, 10)
    assert grpc_messages(bytes(chat.body)) == [b"re: turn %d" % t for t in range(5)]
    assert chat.trailers is not None and (b"grpc-status", b"0") in chat.trailers
    pool.close_all()


async def test_idle_connections_close_after_the_idle_timeout(grpc_server: GrpcServer) -> None:
    pool = make_pool(grpc_server.port, idle_timeout=5.0)
    call = unary(pool, grpc_server.authority, "Unary", b"x")
    await asyncio.wait_for(call.done, 10)
    await poll(lambda: len(pool.idle) == 1)
    pool.sweep(time.monotonic())  # not yet past the timeout
    assert pool.open_count == 1
    pool.sweep(time.monotonic() + 5.1)
    await poll(lambda: pool.open_count == 0 and not pool.idle, what="the idle connection to close")


async def test_connect_refused_is_reported_to_every_waiting_stream() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    pool = make_pool(port)
    calls = [unary(pool, f"127.0.0.1:{port}", "Unary", b"x") for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*(c.done for c in calls)), 10)
    assert all(isinstance(c.connect_error, ConnectionRefusedError) for c in calls)
    assert pool.open_count == 0 and not pool.pending


async def test_an_http1_server_is_a_connect_error_not_a_reconnect_loop() -> None:
    async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(http1, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = make_pool(port)
        call = unary(pool, f"127.0.0.1:{port}", "Unary", b"x")
        await asyncio.wait_for(call.done, 10)
        assert isinstance(call.connect_error, H2ConnectError)
        assert "before its HTTP/2 SETTINGS" in str(call.connect_error)
        assert pool.connections_opened == 1 and pool.open_count == 0
    finally:
        server.close()


async def test_connection_loss_resets_the_streams_in_flight_as_maybe_processed() -> None:
    servers: list[RawH2Server] = []

    def on_request(server: RawH2Server, stream_id: int, headers: object) -> None:
        if len(server.requests) == 2:
            assert server.transport is not None
            server.transport.abort()  # the instance died with two requests in flight

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: RawH2Server(on_request, servers), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        pool = make_pool(port)
        calls = [unary(pool, f"127.0.0.1:{port}", "Unary", b"x") for _ in range(2)]
        await asyncio.wait_for(asyncio.gather(*(c.done for c in calls)), 10)
        # The server may have acted on them: retry only what is safe to repeat.
        assert [c.reset for c in calls] == [(CONNECTION_LOST, False)] * 2
        assert pool.open_count == 0
    finally:
        listener.close()


async def test_a_server_that_sends_no_settings_fails_the_connect() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)  # reads the preface, answers nothing
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = make_pool(port, connect_timeout=0.3)
        call = unary(pool, f"127.0.0.1:{port}", "Unary", b"x")
        await asyncio.wait_for(call.done, 5)
        assert isinstance(call.connect_error, H2ConnectError)
        assert "sent no HTTP/2 SETTINGS" in str(call.connect_error)
        assert pool.connections_opened == 1
    finally:
        server.close()


async def test_local_reset_stops_the_stream_and_reports_nothing(grpc_server: GrpcServer) -> None:
    pool = make_pool(grpc_server.port)
    call = unary(pool, grpc_server.authority, "Wait", b"x")
    await poll(lambda: pool.active_streams == 1)
    assert call.stream is not None
    call.stream.reset()
    assert pool.active_streams == 0
    grpc_server.state.gate.set()
    after = unary(pool, grpc_server.authority, "Unary", b"next")
    await asyncio.wait_for(after.done, 10)
    assert grpc_messages(bytes(after.body)) == [b"next"]
    assert not call.done.done() and call.reset is None
    assert pool.connections_opened == 1
    pool.close_all()


POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/p")]


async def raw_server(on_request: object, servers: list[RawH2Server]) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: RawH2Server(on_request, servers),  # type: ignore[arg-type]
        "127.0.0.1",
        0,
    )


async def test_refused_stream_is_never_processed() -> None:
    servers: list[RawH2Server] = []

    def on_request(server: RawH2Server, stream_id: int, headers: object) -> None:
        # RFC 9113 §8.7: REFUSED_STREAM means no application processing happened.
        if stream_id == 1:
            server.refuse(stream_id)
        else:
            server.respond(stream_id, b"ok")

    listener = await raw_server(on_request, servers)
    port = listener.sockets[0].getsockname()[1]
    try:
        pool = make_pool(port)
        refused, served = Recorder(), Recorder()
        refused.stream = pool.open_stream(POST, True, refused)
        await asyncio.wait_for(refused.done, 10)
        served.stream = pool.open_stream(POST, True, served)
        await asyncio.wait_for(served.done, 10)
        assert refused.reset == (REFUSED_STREAM, True) and not refused.ended
        assert served.ended and bytes(served.body) == b"ok"
        assert pool.connections_opened == 1  # a refused stream leaves the connection usable
        pool.close_all()
    finally:
        listener.close()


async def test_request_body_and_trailers_reach_the_server() -> None:
    servers: list[RawH2Server] = []
    listener = await raw_server(lambda server, sid, headers: None, servers)
    port = listener.sockets[0].getsockname()[1]
    try:
        pool = make_pool(port)
        call = Recorder()
        stream = pool.open_stream(POST, False, call)
        call.stream = stream
        # Sent while the connection is still being opened: held, then sent in order.
        stream.send_data(b"part one, ")
        stream.send_data(b"part two")
        stream.send_trailers([(b"grpc-status", b"0"), (b"x-sum", b"18")])
        stream.send_data(b"ignored: the request already ended")
        await poll(lambda: bool(servers) and 1 in servers[0].ended, what="the request's end")
        server = servers[0]
        assert bytes(server.bodies[1]) == b"part one, part two"
        assert server.trailers[1] == [(b"grpc-status", b"0"), (b"x-sum", b"18")]
        server.respond(1, b"thanks")
        await asyncio.wait_for(call.done, 10)
        assert bytes(call.body) == b"thanks" and call.paused == call.resumed == 1
        pool.close_all()
    finally:
        listener.close()


async def test_a_waiting_stream_that_is_reset_is_never_sent() -> None:
    server = GrpcServer(max_concurrent_streams=1)
    try:
        pool = make_pool(server.port, max_connections=1)
        first = unary(pool, server.authority, "Wait", b"first")
        second = unary(pool, server.authority, "Unary", b"second")
        await poll(lambda: pool.active_streams == 1 and len(pool.pending) == 1)
        assert second.stream is not None
        second.stream.reset()
        assert not pool.pending
        server.state.gate.set()
        await asyncio.wait_for(first.done, 10)
        assert grpc_messages(bytes(first.body)) == [b"first"]
        assert server.state.calls == 0  # "second" (a Unary call) never reached the server
        assert not second.done.done()
        pool.close_all()
    finally:
        server.stop(None)


async def test_pool_limits_waiting_streams_and_refuses_after_close(
    grpc_server: GrpcServer,
) -> None:
    from gateway.proxy.h2.client import PoolUnavailable

    pool = make_pool(grpc_server.port, max_pending=2)
    calls = [unary(pool, grpc_server.authority, "Unary", b"%d" % i) for i in range(3)]
    await asyncio.wait_for(calls[2].done, 10)
    assert isinstance(calls[2].connect_error, PoolUnavailable)
    assert "2 streams waiting" in str(calls[2].connect_error)
    await asyncio.wait_for(asyncio.gather(calls[0].done, calls[1].done), 10)
    assert [grpc_messages(bytes(c.body)) for c in calls[:2]] == [[b"0"], [b"1"]]
    # close_all: idle connections close now; new streams are refused.
    busy = unary(pool, grpc_server.authority, "Wait", b"busy")
    await poll(lambda: pool.active_streams == 1)
    pool.close_all()
    late = unary(pool, grpc_server.authority, "Unary", b"late")
    await asyncio.wait_for(late.done, 10)
    assert isinstance(late.connect_error, PoolUnavailable)
    # ... while the busy stream finishes on its connection, which closes after it.
    grpc_server.state.gate.set()
    await asyncio.wait_for(busy.done, 10)
    assert grpc_messages(bytes(busy.body)) == [b"busy"]
    await poll(lambda: pool.open_count == 0, what="the busy connection to close")


# (Keepalive PINGs and ping_timeout: test_h2_upstream_config.py, from config.)


# -- h2 over TLS (ALPN) ---------------------------------------------------------------------


def _tls_context(certs: CertFiles, alpn: list[str]) -> ssl.SSLContext:
    context = certs.client_context()
    context.set_alpn_protocols(alpn)
    return context


async def test_h2_over_tls_negotiated_by_alpn(tmp_path: Path) -> None:
    certs = CertFiles(tmp_path)
    cert, key = certs.issue("server", "localhost", "127.0.0.1")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = GrpcServer(credentials=credentials)
    try:
        pool = make_pool(
            server.port, ssl_context=_tls_context(certs, ["h2"]), server_hostname="localhost"
        )
        call = unary(pool, f"localhost:{server.port}", "Unary", b"over TLS")
        await asyncio.wait_for(call.done, 10)
        assert grpc_messages(bytes(call.body)) == [b"over TLS"]
        conn = pool.connections[0]
        assert conn.transport is not None
        assert conn.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        pool.close_all()
    finally:
        server.stop(None)


async def test_upstream_tls_context_with_h2_alpn_from_config(tmp_path: Path) -> None:
    from gateway.config import load_config_text
    from gateway.tls.upstream import H2_ALPN, upstream_tls

    certs = CertFiles(tmp_path)
    cert, key = certs.issue("server", "users.internal")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = GrpcServer(credentials=credentials)
    try:
        config = load_config_text(
            "upstreams:\n"
            f"  users: {{instances: [127.0.0.1:{server.port}], protocol: h2,"
            f" tls: {{ca: {certs.ca_path}, sni: users.internal}}}}\n"
            "routes: []\n",
            str(tmp_path / "gateway.yaml"),
        )
        upstream = config.upstreams["users"]
        tls = upstream_tls(upstream, config, alpn=H2_ALPN)
        http1 = upstream_tls(upstream, config)
        assert tls.key != http1.key and tls.context is not http1.context
        pool = make_pool(
            server.port, ssl_context=tls.context, server_hostname=tls.server_hostname("127.0.0.1")
        )
        call = unary(pool, "users.internal", "Unary", b"configured")
        await asyncio.wait_for(call.done, 10)
        assert grpc_messages(bytes(call.body)) == [b"configured"]
        pool.close_all()
    finally:
        server.stop(None)


async def test_tls_server_without_h2_alpn_is_a_clear_connect_error(tmp_path: Path) -> None:
    certs = CertFiles(tmp_path)
    cert, key = certs.issue("server", "localhost")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    server_context.set_alpn_protocols(["http/1.1"])

    async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(http1, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = make_pool(port, ssl_context=_tls_context(certs, ["h2"]), server_hostname="localhost")
        call = unary(pool, f"localhost:{port}", "Unary", b"x")
        await asyncio.wait_for(call.done, 10)
        assert isinstance(call.connect_error, H2ConnectError)
        assert "did not choose h2 by ALPN" in str(call.connect_error)
    finally:
        server.close()


def test_the_client_runs_on_uvloop() -> None:
    # The gateway's workers run uvloop, whose transports are not asyncio.Transport subclasses.
    import uvloop

    server = GrpcServer()

    async def scenario() -> tuple[list[bytes], int]:
        pool = make_pool(server.port, stream_window=64 * 1024)
        small = unary(pool, server.authority, "Unary", b"on uvloop")
        big = unary(pool, server.authority, "StreamOut", struct.pack(">II", 20, 64 * 1024))
        await asyncio.wait_for(asyncio.gather(small.done, big.done), 10)
        pool.close_all()
        return grpc_messages(bytes(small.body)), len(grpc_messages(bytes(big.body)))

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(scenario()) == ([b"on uvloop"], 20)
    finally:
        server.stop(None)
