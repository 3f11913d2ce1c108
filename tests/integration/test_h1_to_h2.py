"""HTTP/1.1 clients (curl, aiohttp, raw sockets) → the gateway → HTTP/2 upstreams
(``protocol: h2c``): a real h2 server (tests/integration/h2_http_peer.py) for HTTP semantics,
and a grpcio server for gRPC-Web (gateway/proxy/h2/from_h1.py, gateway/filters/grpc_web.py)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from grpc_health.v1 import health_pb2

from tests.integration.conftest import GatewayProcess, free_ports
from tests.integration.h2_http_peer import H2HttpServer, pattern_bytes
from tests.integration.h2_peers import GrpcServer, grpc_frame

ECHO = "test.Echo"


@dataclass
class Setup:
    gateway: GatewayProcess
    port: int
    peer: H2HttpServer
    grpc: GrpcServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _wait(condition: Any, within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def setup(start_gateway: Any) -> Iterator[Setup]:
    peer = H2HttpServer()
    grpc_server = GrpcServer()
    port, dead = free_ports(2)
    h2c = {"protocol": "h2c", "timeouts": {"read": "5s"}}
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
            "limits": {"max_body_bytes": "1GiB"},
            "access_log": {"path": "-"},
            "upstreams": {
                "h2": {"instances": [f"127.0.0.1:{peer.port}"], **h2c},
                "h2retry": {
                    "instances": [f"127.0.0.1:{peer.port}"],
                    **h2c,
                    "retry": {"attempts": 2, "on": ["connect_failure"]},
                },
                "down": {
                    "instances": [f"127.0.0.1:{dead}"],
                    "protocol": "h2c",
                    "timeouts": {"connect": "1s"},
                },
                "grpc": {"instances": [grpc_server.authority], **h2c},
                "slow": {
                    "instances": [f"127.0.0.1:{peer.port}"],
                    "protocol": "h2c",
                    "timeouts": {"read": "1s"},
                },
            },
            "routes": [
                {
                    "name": "grpc-web",
                    "match": {"path": {"prefix": f"/{ECHO}/"}},
                    "upstream": "grpc",
                    "filters": [
                        {
                            "cors": {
                                "allow_origins": ["https://app.example"],
                                "allow_headers": ["content-type", "x-grpc-web"],
                                "expose_headers": ["grpc-status", "grpc-message"],
                            }
                        },
                        {"grpc_web": {}},
                    ],
                },
                {
                    "name": "health",
                    "match": {"path": {"prefix": "/grpc.health.v1.Health/"}},
                    "upstream": "grpc",
                    "filters": [{"grpc_web": {}}],
                },
                {
                    "name": "retry",
                    "match": {"path": {"prefix": "/retry/"}},
                    "upstream": "h2retry",
                    "rewrite": {"strip_prefix": "/retry"},
                },
                {"name": "slow", "match": {"path": {"prefix": "/silent"}}, "upstream": "slow"},
                {"name": "down", "match": {"path": {"prefix": "/down"}}, "upstream": "down"},
                {"name": "h2", "match": {"path": {"prefix": "/"}}, "upstream": "h2"},
            ],
        }
    )
    ready = Setup(gateway, port, peer, grpc_server)
    yield ready
    peer.close()
    grpc_server.stop(None)


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--http1.1", *args], capture_output=True, timeout=60, check=False
    )


def _raw_exchange(setup: Setup, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection (it says ``connection: close``) and read to EOF."""
    with socket.create_connection(("127.0.0.1", setup.port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


# -- plain HTTP ----------------------------------------------------------------------------


def test_curl_get_translates_the_head(setup: Setup) -> None:
    result = _curl(
        "-D",
        "-",
        "-H",
        "Host: api.example",
        "-H",
        "Connection: keep-alive, x-hop",
        "-H",
        "x-hop: secret",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: gzip",
        f"{setup.url}/echo?q=1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-body-len: 0\r\n" in result.stdout
    headers = dict(setup.peer.seen["/echo"][-1])
    # RFC 9113 §8.3.1 pseudo-headers from the HTTP/1.1 head; Host became :authority.
    assert headers[b":method"] == b"GET"
    assert headers[b":path"] == b"/echo?q=1"
    assert headers[b":authority"] == b"api.example"
    assert headers[b":scheme"] == b"http"
    # RFC 9113 §8.2.2: no connection-specific field; TE only as "trailers".
    for name in (b"host", b"connection", b"keep-alive", b"x-hop", b"te", b"transfer-encoding"):
        assert name not in headers, name
    assert headers[b"x-forwarded-for"] == b"127.0.0.1"
    assert headers[b"x-request-id"]


def test_te_trailers_is_kept(setup: Setup) -> None:
    result = _curl("-o", "/dev/null", "-H", "TE: trailers", f"{setup.url}/echo?te")
    assert result.returncode == 0, result.stderr
    headers = setup.peer.seen["/echo"][-1]
    assert (b"te", b"trailers") in headers


@pytest.mark.parametrize("chunked", [False, True])
def test_curl_post_large_body(setup: Setup, tmp_path: Path, chunked: bool) -> None:
    body = os.urandom(5 << 20)
    path = tmp_path / "body"
    path.write_bytes(body)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    result = _curl(
        "-D", "-", "-o", str(tmp_path / "out"), "--data-binary", f"@{path}", *extra,
        f"{setup.url}/echo",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"x-body-sha256: " + hashlib.sha256(body).hexdigest().encode() in result.stdout
    assert (tmp_path / "out").read_bytes() == body
    headers = dict(setup.peer.seen["/echo"][-1])
    if chunked:
        assert b"content-length" not in headers
    else:
        assert headers[b"content-length"] == b"%d" % len(body)


@pytest.mark.parametrize("with_length", [False, True])
async def test_aiohttp_large_response(setup: Setup, with_length: bool) -> None:
    size = 8 << 20
    query = f"n={size}" + ("&cl=1" if with_length else "")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{setup.url}/big?{query}") as response,
    ):
        body = await response.read()
        assert response.status == 200
        assert response.version == aiohttp.HttpVersion11
        if with_length:
            assert response.headers["content-length"] == str(size)
            assert "transfer-encoding" not in response.headers
        else:
            assert response.headers["transfer-encoding"] == "chunked"
    assert body == pattern_bytes(size)


async def test_aiohttp_keep_alive_reuses_the_client_connection(setup: Setup) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for index in range(20):
            data = b"x" * index * 1000
            async with session.post(f"{setup.url}/echo?cl=1", data=data) as response:
                assert response.status == 200
                assert await response.read() == data


def test_slow_client_stops_the_upstream(setup: Setup) -> None:
    """A client that does not read: the upstream stream's window closes (backpressure)
    instead of the gateway buffering the response."""
    size = 200 << 20
    before = set(setup.peer.sent)
    with socket.create_connection(("127.0.0.1", setup.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % size)
        _wait(lambda: set(setup.peer.sent) - before, what="the upstream to start sending")
        (stream,) = set(setup.peer.sent) - before
        # Poll until the upstream stops: its sent count is steady for a while.
        last, steady_since = -1, time.monotonic()
        while time.monotonic() - steady_since < 0.5:
            now = setup.peer.sent[stream]
            if now != last:
                last, steady_since = now, time.monotonic()
            time.sleep(0.02)
        assert last < 64 << 20, f"upstream sent {last} bytes to a client that read nothing"
        received = 0
        digest = hashlib.sha256()
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += len(data)
            digest.update(data)
    assert setup.peer.sent[stream] == size, setup.gateway.log()[-3000:]
    assert received > size


def test_request_body_backpressure(setup: Setup) -> None:
    """An upstream that does not take the body (its window stays closed): the gateway stops
    reading the client instead of buffering the upload."""
    body = os.urandom(64 << 20)
    with socket.create_connection(("127.0.0.1", setup.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        sock.sendall(
            b"POST /hold HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        sock.setblocking(False)
        sent = 0
        steady_since = time.monotonic()
        while time.monotonic() - steady_since < 0.5 and sent < len(body):
            try:
                count = sock.send(body[sent : sent + (1 << 20)])
            except BlockingIOError:
                time.sleep(0.02)
                continue
            sent += count
            steady_since = time.monotonic()
        assert sent < 32 << 20, f"the client could send {sent} bytes into a closed window"
        setup.peer.release_holds()
        sock.setblocking(True)
        sock.sendall(body[sent:])
        response = b""
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            response += data
    setup.peer.release.clear()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b"x-body-sha256: " + hashlib.sha256(body).hexdigest().encode() in response


def test_trailers_sent_when_the_client_accepts_them(setup: Setup) -> None:
    request = b"GET /trailers HTTP/1.1\r\nhost: x\r\nte: trailers\r\nconnection: close\r\n\r\n"
    response = _raw_exchange(setup, request)
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    # RFC 9112 §7.1.2: the last chunk, then the trailer fields.
    assert body == b"11\r\ntrailer test body\r\n0\r\nx-checksum: abc123\r\ngrpc-status: 0\r\n\r\n"


def test_trailers_dropped_without_te(setup: Setup) -> None:
    request = b"GET /trailers HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    response = _raw_exchange(setup, request)
    _, _, body = response.partition(b"\r\n\r\n")
    assert body == b"11\r\ntrailer test body\r\n0\r\n\r\n"


def test_upstream_reset_is_502(setup: Setup) -> None:
    result = _curl("-D", "-", f"{setup.url}/reset")
    assert result.stdout.startswith(b"HTTP/1.1 502 ")
    assert b'"upstream_failure"' in result.stdout


async def test_upstream_reset_mid_body_aborts_the_client(setup: Setup) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{setup.url}/reset-mid") as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


def test_upstream_down_is_502(setup: Setup) -> None:
    result = _curl("-D", "-", f"{setup.url}/down")
    assert result.stdout.startswith(b"HTTP/1.1 502 ")
    assert b'"upstream_connect_failure"' in result.stdout


def test_upstream_read_timeout_is_504_and_resets_the_stream(setup: Setup) -> None:
    before = len(setup.peer.resets)
    result = _curl("-D", "-", f"{setup.url}/silent")
    assert result.stdout.startswith(b"HTTP/1.1 504 ")
    assert b'"upstream_timeout"' in result.stdout
    _wait(lambda: len(setup.peer.resets) > before, what="RST_STREAM at the upstream")


def test_client_gone_mid_response_resets_the_stream(setup: Setup) -> None:
    before = len(setup.peer.resets)
    with socket.create_connection(("127.0.0.1", setup.port), timeout=10) as sock:
        sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nhost: x\r\n\r\n" % (100 << 20))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    _wait(lambda: len(setup.peer.resets) > before, what="RST_STREAM(CANCEL) at the upstream")


def test_refused_stream_is_retried(setup: Setup) -> None:
    result = _curl("-D", "-", "--data-binary", "once", f"{setup.url}/retry/refuse-once")
    assert result.stdout.startswith(b"HTTP/1.1 200 "), result.stdout
    assert b"x-body-len: 4\r\n" in result.stdout
    assert len(setup.peer.seen["/refuse-once"]) == 2  # REFUSED_STREAM, then answered
    metrics = setup.gateway.metrics_text()
    assert any(
        line.startswith("gateway_retries_total{")
        and 'upstream="h2retry"' in line
        and 'reason="connect_failure"' in line
        for line in metrics.splitlines()
    )


def test_metrics_and_access_count_the_exchanges(setup: Setup) -> None:
    result = _curl("-o", "/dev/null", f"{setup.url}/echo?metrics")
    assert result.returncode == 0
    metrics = setup.gateway.metrics_text()
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("gateway_requests_total{")
        and 'route="h2"' in line
        and 'code="200"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1


# -- gRPC-Web --------------------------------------------------------------------------------


def _web_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while body:
        flag = body[0]
        (length,) = struct.unpack(">I", body[1:5])
        frames.append((flag, body[5 : 5 + length]))
        body = body[5 + length :]
    return frames


def _trailer_map(block: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            out[name.strip()] = value.strip()
    return out


async def _grpc_web(
    setup: Setup, method: str, message: bytes, content_type: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    body = grpc_frame(message)
    if "text" in content_type:
        body = base64.b64encode(body)
    headers = {"content-type": content_type, "x-grpc-web": "1", "origin": "https://app.example"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{setup.url}/{method}", data=body, headers=headers) as response,
    ):
        return response, await response.read()


async def test_grpc_web_binary_unary(setup: Setup) -> None:
    response, body = await _grpc_web(
        setup, f"{ECHO}/Unary", b"hello web", "application/grpc-web+proto"
    )
    assert response.status == 200
    assert response.headers["content-type"] == "application/grpc-web+proto"
    assert response.headers["access-control-expose-headers"] == "grpc-status, grpc-message"
    frames = _web_frames(body)
    assert frames[0] == (0, b"hello web")
    flag, block = frames[1]
    assert flag == 0x80 and len(frames) == 2
    assert _trailer_map(block)[b"grpc-status"] == b"0"


async def test_grpc_web_text_unary_large(setup: Setup) -> None:
    message = os.urandom(300_000)
    response, body = await _grpc_web(setup, f"{ECHO}/Unary", message, "application/grpc-web-text")
    assert response.status == 200
    assert response.headers["content-type"] == "application/grpc-web-text"
    frames = _web_frames(base64.b64decode(body, validate=True))
    assert frames[0] == (0, message)
    assert frames[1][0] == 0x80
    assert _trailer_map(frames[1][1])[b"grpc-status"] == b"0"


async def test_grpc_web_protobuf_health_check(setup: Setup) -> None:
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    response, body = await _grpc_web(
        setup, "grpc.health.v1.Health/Check", request, "application/grpc-web-text+proto"
    )
    assert response.headers["content-type"] == "application/grpc-web-text+proto"
    frames = _web_frames(base64.b64decode(body))
    decoded = health_pb2.HealthCheckResponse.FromString(frames[0][1])
    assert decoded.status == health_pb2.HealthCheckResponse.SERVING
    assert _trailer_map(frames[1][1])[b"grpc-status"] == b"0"


async def test_grpc_web_error_status(setup: Setup) -> None:
    response, body = await _grpc_web(setup, f"{ECHO}/Fail", b"x", "application/grpc-web")
    assert response.status == 200
    # grpcio answers Trailers-Only: the status is in the head (gRPC-Web allows that).
    status = response.headers.get("grpc-status")
    message = response.headers.get("grpc-message")
    if status is None:
        trailers = _trailer_map(_web_frames(body)[-1][1])
        status, message = trailers[b"grpc-status"].decode(), trailers[b"grpc-message"].decode()
    assert status == "9"  # FAILED_PRECONDITION
    assert message == "not today: 100%25 sure"


async def test_grpc_web_text_with_a_malformed_body_is_internal(setup: Setup) -> None:
    headers = {"content-type": "application/grpc-web-text"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{setup.url}/{ECHO}/Unary", data=b"AAAA*AAA", headers=headers) as response,
    ):
        # The gateway's 400 (grpc_web_bad_body), as a gRPC-Web client reads it.
        assert response.status == 200
        assert response.headers["grpc-status"] == "13"  # INTERNAL
        assert response.headers["grpc-message"] == "gRPC-Web text body is not base64"


def test_grpc_web_over_http2_client(setup: Setup, tmp_path: Path) -> None:
    """An HTTP/2 client's gRPC-Web call (the route has filters: the bridge carries it)."""
    path = tmp_path / "req"
    path.write_bytes(grpc_frame(b"via h2"))
    result = subprocess.run(
        [
            "curl", "-sS", "--http2-prior-knowledge", "-o", str(tmp_path / "out"),
            "-w", "%{http_version} %{content_type}",
            "-H", "content-type: application/grpc-web", "--data-binary", f"@{path}",
            f"{setup.url}/{ECHO}/Unary",
        ],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"2 application/grpc-web"
    frames = _web_frames((tmp_path / "out").read_bytes())
    assert frames[0] == (0, b"via h2")
    assert _trailer_map(frames[1][1])[b"grpc-status"] == b"0"


async def test_cors_preflight_for_grpc_web(setup: Setup) -> None:
    headers = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.options(f"{setup.url}/{ECHO}/Unary", headers=headers) as response,
    ):
        assert response.status == 204
        assert response.headers["access-control-allow-origin"] == "https://app.example"
