"""Errors the gateway makes reach gRPC-Web clients as gRPC-Web Trailers-Only responses (HTTP 200,
``grpc-status`` / ``grpc-message`` in the head), not JSON error pages: HTTP/1.1 clients
(aiohttp) and HTTP/2 clients through the bridge (curl), in front of a grpcio server."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import GatewayProcess, free_ports
from tests.integration.h2_peers import GrpcServer, grpc_frame

ECHO = "test.Echo"
ORIGIN = "https://app.example"
CORS = {
    "cors": {
        "allow_origins": [ORIGIN],
        "allow_headers": ["content-type", "x-grpc-web"],
        "expose_headers": ["grpc-status", "grpc-message"],
    }
}


@dataclass
class Setup:
    gateway: GatewayProcess
    port: int
    grpc: GrpcServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def setup(start_gateway: Any) -> Iterator[Setup]:
    grpc_server = GrpcServer()
    port, dead = free_ports(2)
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
            "upstreams": {
                "grpc": {"instances": [grpc_server.authority], "protocol": "h2c"},
                "down": {
                    "instances": [f"127.0.0.1:{dead}"],
                    "protocol": "h2c",
                    "timeouts": {"connect": "1s"},
                },
            },
            "routes": [
                {
                    "name": "limited",
                    "match": {"path": {"prefix": "/limited/"}},
                    "upstream": "grpc",
                    "rewrite": {"strip_prefix": "/limited"},
                    "rate_limit": {"rate": "1/min", "burst": 1},
                    "filters": [CORS, {"grpc_web": {}}],
                },
                {
                    # No filters: HTTP/2 streams are exchanged natively (forward.py).
                    "name": "native-limited",
                    "match": {"path": {"prefix": "/nlimited/"}},
                    "upstream": "grpc",
                    "rewrite": {"strip_prefix": "/nlimited"},
                    "rate_limit": {"rate": "1/min", "burst": 1},
                },
                {
                    "name": "slow",
                    "match": {"path": {"exact": f"/{ECHO}/Wait"}},
                    "upstream": "grpc",
                    "timeout": "300ms",
                    "filters": [CORS, {"grpc_web": {}}],
                },
                {
                    "name": "down",
                    "match": {"path": {"prefix": "/down/"}},
                    "upstream": "down",
                    "filters": [CORS, {"grpc_web": {}}],
                },
                {
                    "name": "echo",
                    "match": {"path": {"prefix": f"/{ECHO}/"}},
                    "upstream": "grpc",
                    "filters": [CORS, {"grpc_web": {}}],
                },
            ],
        }
    )
    yield Setup(gateway, port, grpc_server)
    grpc_server.state.gate.set()
    grpc_server.stop(None)


async def _post(
    setup: Setup, path: str, content_type: str = "application/grpc-web+proto"
) -> tuple[aiohttp.ClientResponse, bytes]:
    headers = {"content-type": content_type, "x-grpc-web": "1", "origin": ORIGIN}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{setup.url}{path}", data=grpc_frame(b"m"), headers=headers) as response,
    ):
        return response, await response.read()


def _assert_web_error(
    response: aiohttp.ClientResponse, body: bytes, grpc_status: int, content_type: str
) -> None:
    assert response.status == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["grpc-status"] == str(grpc_status)
    assert response.headers["grpc-message"]
    assert response.headers["x-request-id"]
    assert body == b""
    # The route's cors filter answered for the error too: a browser may read it.
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-expose-headers"] == "grpc-status, grpc-message"


async def test_no_route_is_unimplemented(setup: Setup) -> None:
    response, body = await _post(setup, "/other.Service/Method")
    assert response.status == 200
    assert response.headers["content-type"] == "application/grpc-web+proto"
    assert response.headers["grpc-status"] == "12"  # UNIMPLEMENTED
    assert response.headers["grpc-message"] == "no route matches the request"
    assert body == b""


async def test_rate_limited_is_resource_exhausted(setup: Setup) -> None:
    first, _ = await _post(setup, f"/limited/{ECHO}/Unary")
    assert first.status == 200 and first.headers.get("grpc-status") in (None, "0")
    response, body = await _post(setup, f"/limited/{ECHO}/Unary", "application/grpc-web-text")
    _assert_web_error(response, body, 8, "application/grpc-web-text")  # RESOURCE_EXHAUSTED


async def test_route_timeout_is_deadline_exceeded(setup: Setup) -> None:
    response, body = await _post(setup, f"/{ECHO}/Wait")
    _assert_web_error(response, body, 4, "application/grpc-web+proto")  # DEADLINE_EXCEEDED


async def test_upstream_down_is_unavailable(setup: Setup) -> None:
    response, body = await _post(setup, f"/down/{ECHO}/Unary", "application/grpc-web")
    _assert_web_error(response, body, 14, "application/grpc-web")  # UNAVAILABLE (502)


async def test_other_clients_still_get_json(setup: Setup) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{setup.url}/down/x", data=b"{}") as response,
    ):
        assert response.status == 502
        assert (await response.json())["error"]


def test_http2_client_through_the_bridge(setup: Setup, tmp_path: Path) -> None:
    """An HTTP/2 gRPC-Web call (filters: the bridge) that the gateway answers itself."""
    path = tmp_path / "req"
    path.write_bytes(grpc_frame(b"via h2"))
    result = subprocess.run(
        [
            "curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", str(tmp_path / "out"),
            "-H", "content-type: application/grpc-web", "--data-binary", f"@{path}",
            f"{setup.url}/down/{ECHO}/Unary",
        ],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    head = result.stdout.decode().lower()
    assert head.startswith("http/2 200")
    assert "grpc-status: 14\r\n" in head
    assert "content-type: application/grpc-web\r\n" in head
    assert (tmp_path / "out").read_bytes() == b""


def test_native_stream_error_for_a_grpc_web_client(setup: Setup, tmp_path: Path) -> None:
    """A route without filters: an HTTP/2 stream goes the native way, whose own errors (here
    its local rate limit) answer a gRPC-Web client in its content type too."""
    # Bodiless (END_STREAM on HEADERS): an answer decided before a body arrived would end
    # with RST_STREAM(NO_ERROR) (RFC 9113 §8.1), which curl reports as an error.
    command = [
        "curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", str(tmp_path / "out"),
        "-X", "POST", "-H", "content-type: application/grpc-web-text",
        f"{setup.url}/nlimited/{ECHO}/Unary",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, timeout=30, check=False)
    assert first.returncode == 0, first.stderr
    result = subprocess.run(command, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    head = result.stdout.decode().lower()
    assert head.startswith("http/2 200")
    assert "grpc-status: 8\r\n" in head  # RESOURCE_EXHAUSTED
    assert "content-type: application/grpc-web-text\r\n" in head
    assert (tmp_path / "out").read_bytes() == b""
