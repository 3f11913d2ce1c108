"""The grpc active health check against grpcio-health-checking's real servicer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from gateway.health.active import ActiveHealthChecker
from gateway.health.grpc_check import probe_grpc
from tests.integration.h2_peers import GrpcServer, poll
from tests.integration.tls_support import CertFiles


@pytest.fixture
def grpc_server() -> object:
    server = GrpcServer()
    yield server
    server.stop(None)


async def test_serving_service_passes(grpc_server: GrpcServer) -> None:
    grpc_server.set_health("pkg.Users", serving=True)
    assert await probe_grpc("127.0.0.1", grpc_server.port, "pkg.Users", 2.0) == (True, 200, None)


async def test_whole_server_is_the_empty_service_name(grpc_server: GrpcServer) -> None:
    # grpcio's servicer reports "" as SERVING from the start.
    assert await probe_grpc("127.0.0.1", grpc_server.port, "", 2.0) == (True, 200, None)


async def test_not_serving_fails(grpc_server: GrpcServer) -> None:
    grpc_server.set_health("pkg.Users", serving=False)
    ok, status, error = await probe_grpc("127.0.0.1", grpc_server.port, "pkg.Users", 2.0)
    assert (ok, status, error) == (False, 200, "status NOT_SERVING")


async def test_unknown_service_fails_with_not_found(grpc_server: GrpcServer) -> None:
    ok, status, error = await probe_grpc("127.0.0.1", grpc_server.port, "pkg.Nobody", 2.0)
    assert not ok and status == 200
    assert error is not None and error.startswith("grpc-status 5 (NOT_FOUND)")


async def test_refused_connection_fails(unused_tcp_port: int) -> None:
    ok, status, error = await probe_grpc("127.0.0.1", unused_tcp_port, "", 1.0)
    assert not ok and status is None
    assert error is not None and "ConnectionRefusedError" in error


async def test_a_hung_server_fails_by_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok, _, error = await probe_grpc("127.0.0.1", port, "", 0.3)
        assert not ok and error is not None
        assert error == "timeout" or "sent no HTTP/2 SETTINGS" in error
    finally:
        server.close()


async def test_probe_over_tls_offers_h2(tmp_path: Path) -> None:
    certs = CertFiles(tmp_path)
    cert, key = certs.issue("server", "localhost")
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = GrpcServer(credentials=credentials)
    try:
        context = certs.client_context()
        context.set_alpn_protocols(["h2"])
        result = await probe_grpc(
            "127.0.0.1", server.port, "", 2.0, ssl_context=context, server_hostname="localhost"
        )
        assert result == (True, 200, None)
    finally:
        server.stop(None)


async def test_checker_follows_the_servicer_both_ways(grpc_server: GrpcServer) -> None:
    transitions: list[bool] = []
    grpc_server.set_health("pkg.Users", serving=True)
    checker = ActiveHealthChecker(
        [grpc_server.authority],
        interval=0.05,
        timeout=1.0,
        healthy_threshold=1,
        unhealthy_threshold=1,
        on_transition=lambda target, healthy: transitions.append(healthy),
        check_type="grpc",
        grpc_service="pkg.Users",
    )
    await checker.start()
    try:
        await poll(lambda: checker.state(grpc_server.authority).probes >= 2)
        assert checker.is_healthy(grpc_server.authority) and transitions == []
        grpc_server.set_health("pkg.Users", serving=False)
        await poll(lambda: transitions == [False], what="the instance to turn unhealthy")
        assert checker.state(grpc_server.authority).last_error == "status NOT_SERVING"
        grpc_server.set_health("pkg.Users", serving=True)
        await poll(lambda: transitions == [False, True], what="the instance to recover")
    finally:
        await checker.stop()
