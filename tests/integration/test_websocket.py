"""WebSocket through the gateway: Upgrade, a 101, then a two-way byte tunnel (RFC 9110 §7.8)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os

import aiohttp

from tests.integration.conftest import GatewayProcess
from tests.integration.test_http_semantics import ResponseReader
from tests.metrics_text import metric_sum

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def requests_with_code(metrics: str, route: str, code: str) -> float:
    """Sum of gateway_requests_total samples for ``route`` and ``code``."""
    return metric_sum(metrics, "gateway_requests_total", route=route, code=code)


async def requests_101(gateway: GatewayProcess) -> float:
    return requests_with_code(await asyncio.to_thread(gateway.metrics_text), "app", "101")


async def wait_for_requests_101(gateway: GatewayProcess, target: float) -> float:
    """Poll the admin /metrics (up to ~5 s) until the counter reaches ``target``."""
    for _ in range(250):
        value = await requests_101(gateway)
        if value >= target:
            return value
        await asyncio.sleep(0.02)
    return await requests_101(gateway)


async def test_websocket_echo_through_gateway(gateway: GatewayProcess) -> None:
    loop = asyncio.get_running_loop()
    before = requests_with_code(
        await loop.run_in_executor(None, gateway.metrics_text), "app", "101"
    )
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            gateway.base_url + "/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5)
        ) as ws,
    ):
        assert ws.protocol is None
        for index in range(5):
            await ws.send_str(f"hello {index}")
            assert await ws.receive_str(timeout=5) == f"echo:hello {index}"
        payload = os.urandom(100_000)
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=5) == payload
        # Several frames in flight at once come back in order.
        for index in range(20):
            await ws.send_str(f"burst {index}")
        for index in range(20):
            assert await ws.receive_str(timeout=5) == f"echo:burst {index}"
        # Close handshake (RFC 6455 §5.5.1): the backend answers our close frame.
        await ws.close()
        assert ws.closed
        assert ws.close_code == aiohttp.WSCloseCode.OK
    assert await wait_for_requests_101(gateway, before + 1) == before + 1


def masked_text_frame(text: str) -> bytes:
    """A client text frame, FIN set and masked (RFC 6455 §5.2, §5.3); payload < 126 bytes."""
    payload = text.encode()
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def test_raw_upgrade_handshake_and_early_frame(gateway: GatewayProcess) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    sock = gateway.connect()
    reader = ResponseReader(sock)
    try:
        # The first frame rides in the same write as the Upgrade request: the gateway must hold
        # it until the upstream's 101 and then pass it through the tunnel.
        sock.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n"
            ).encode()
            + masked_text_frame("early")
        )
        response = reader.read()
        assert response.status == 101
        assert response.headers["upgrade"].lower() == "websocket"
        assert "upgrade" in response.headers["connection"].lower()
        assert response.headers["x-request-id"]
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        assert response.headers["sec-websocket-accept"] == accept
        expected = b"echo:early"
        # Server frames are unmasked: 0x81, length, payload.
        assert reader.take(2 + len(expected)) == bytes([0x81, len(expected)]) + expected
        sock.sendall(masked_text_frame("second"))
        expected = b"echo:second"
        assert reader.take(2 + len(expected)) == bytes([0x81, len(expected)]) + expected
    finally:
        sock.close()


def test_upgrade_refused_by_upstream_gets_normal_response_then_close(
    gateway: GatewayProcess,
) -> None:
    # /echo does not speak WebSocket: the upstream answers 200, so no tunnel is opened and,
    # since the client may already have sent bytes of the new protocol, the connection closes.
    sock = gateway.connect()
    reader = ResponseReader(sock)
    try:
        sock.sendall(
            b"GET /echo/not-ws HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        response = reader.read()
        assert response.status == 200
        assert response.json()["path"] == "/echo/not-ws"
        seen = {name.lower(): value for name, value in response.json()["headers"]}
        assert seen["upgrade"] == "websocket"  # the gateway re-requested it on its own hop
        assert reader.closed()
    finally:
        sock.close()
