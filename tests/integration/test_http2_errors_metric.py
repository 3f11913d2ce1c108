"""``gateway_http2_errors_total{side, direction, frame, code}`` (gateway/proxy/h2/errors.py): a
raw h2 client provokes stream and connection errors toward the gateway, and an h2c upstream
(tests/integration/h2_http_peer.py) resets streams; each frame is counted on its side."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.conftest import GatewayProcess, free_ports
from tests.integration.h2_http_peer import H2HttpServer
from tests.integration.h2_support import (
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RawH2,
)

MAX_STREAMS = 2
_SAMPLE = re.compile(r"^gateway_http2_errors_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Setup:
    gateway: GatewayProcess
    port: int
    peer: H2HttpServer

    def client(self) -> RawH2:
        return RawH2(self.port)

    def counts(self) -> dict[tuple[str, str, str, str], float]:
        out = {}
        for labels, value in _SAMPLE.findall(self.gateway.metrics_text()):
            found = dict(_LABEL.findall(labels))
            key = (found["side"], found["direction"], found["frame"], found["code"])
            out[key] = float(value)
        return out

    def wait_for(self, before: dict[tuple[str, str, str, str], float], *keys: str) -> None:
        """Poll until the series ``side/direction/frame/code`` each grew by at least one."""
        wanted = []
        for key in keys:
            side, direction, frame, code = key.split("/")
            wanted.append((side, direction, frame, code))
        deadline = time.monotonic() + 10
        while True:
            now = self.counts()
            if all(now.get(key, 0) > before.get(key, 0) for key in wanted):
                return
            assert time.monotonic() < deadline, f"not counted: {keys}; now {now}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def setup(start_gateway: Any) -> Iterator[Setup]:
    peer = H2HttpServer()
    (port,) = free_ports(1)
    gateway = start_gateway(
        {
            "listen": [
                {
                    "address": f"127.0.0.1:{port}",
                    "http2": {
                        "enabled": True,
                        "max_concurrent_streams": MAX_STREAMS,
                        "max_pings_per_second": 5,
                    },
                }
            ],
            "upstreams": {
                "peer": {
                    "instances": [f"127.0.0.1:{peer.port}"],
                    "protocol": "h2c",
                    "timeouts": {"read": "5s"},
                    "retry": {"attempts": 1},
                }
            },
            "routes": [{"name": "all", "upstream": "peer"}],
        }
    )
    yield Setup(gateway, port, peer)
    peer.close()


def test_malformed_request_is_a_sent_protocol_error(setup: Setup) -> None:
    before = setup.counts()
    client = setup.client()
    try:
        # RFC 9113 §8.2.1: an upper-case field name makes the request malformed.
        client.request(1, "/echo", extra=[(b"X-Upper", b"1")])
        assert client.response(1).reset == PROTOCOL_ERROR
    finally:
        client.close()
    setup.wait_for(before, "downstream/sent/RST_STREAM/PROTOCOL_ERROR")


def test_client_cancel_is_received_and_passed_upstream(setup: Setup) -> None:
    before = setup.counts()
    client = setup.client()
    try:
        client.request(1, "/silent")
        deadline = time.monotonic() + 10
        while not any(conn.paths for conn in setup.peer.connections):
            assert time.monotonic() < deadline, "the request never reached the upstream"
            time.sleep(0.01)
        client.reset(1)  # CANCEL
        # Received from the client, and sent on to the upstream stream.
        setup.wait_for(
            before, "downstream/received/RST_STREAM/CANCEL", "upstream/sent/RST_STREAM/CANCEL"
        )
    finally:
        client.close()


def test_upstream_reset_is_received_upstream(setup: Setup) -> None:
    before = setup.counts()
    client = setup.client()
    try:
        client.request(1, "/reset")  # the peer answers RST_STREAM(INTERNAL_ERROR)
        assert client.response(1).status == 502
    finally:
        client.close()
    setup.wait_for(before, "upstream/received/RST_STREAM/INTERNAL_ERROR")


def test_refused_stream_is_counted(setup: Setup) -> None:
    before = setup.counts()
    client = setup.client()
    try:
        ids = [1 + 2 * n for n in range(MAX_STREAMS + 1)]
        for stream_id in ids:
            client.request(stream_id, "/silent")
        assert client.response(ids[-1]).reset == REFUSED_STREAM
    finally:
        client.close()
    setup.wait_for(before, "downstream/sent/RST_STREAM/REFUSED_STREAM")


def test_connection_error_is_a_sent_goaway(setup: Setup) -> None:
    before = setup.counts()
    client = setup.client()
    try:
        # §8.1.1: more DATA than content-length (h2 makes it a connection error).
        client.request(1, "/echo", method="POST", extra=[(b"content-length", b"2")], body=b"xyz")
        goaway = client.wait_closed()
        assert goaway is not None and goaway.error_code == PROTOCOL_ERROR
    finally:
        client.close()
    setup.wait_for(before, "downstream/sent/GOAWAY/PROTOCOL_ERROR")


def test_ping_flood_goaway_is_counted(setup: Setup) -> None:
    before = setup.counts()
    client = setup.client()
    try:
        client.send_raw(b"".join(client.ping().serialize() for _ in range(20)))
        goaway = client.wait_closed()
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    finally:
        client.close()
    setup.wait_for(before, "downstream/sent/GOAWAY/ENHANCE_YOUR_CALM")
    # A graceful close is not an error: no GOAWAY NO_ERROR series ever appears.
    assert not [key for key in setup.counts() if key[2] == "GOAWAY" and key[3] == "NO_ERROR"]
