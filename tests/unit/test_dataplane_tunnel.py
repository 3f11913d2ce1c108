"""Sans-IO: the Upgrade tunnel (RFC 9110 §7.8): 101 relays bytes both ways until either side
closes; a refused upgrade closes the client connection."""

from __future__ import annotations

import pytest

from tests.unit.dataplane_harness import (
    NOTHING_IN_FLIGHT,
    Client,
    Harness,
    UpstreamEnd,
    config,
    request,
    response,
)

UPGRADE = request(
    "GET",
    "/ws",
    headers=(
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ),
)
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def open_tunnel(h: Harness, early: bytes = b"", tail: bytes = b"") -> tuple[Client, UpstreamEnd]:
    c = h.client()
    c.send(UPGRADE + early)
    u = h.upstream()
    u.respond(SWITCHING + tail)
    return c, u


def test_upgrade_request_is_forwarded_with_its_upgrade_fields() -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(UPGRADE)
        fields = h.upstream().request_headers()
        assert fields[b"upgrade"] == b"websocket"
        assert fields[b"connection"].lower() == b"upgrade"
        assert fields[b"sec-websocket-key"] == b"dGhlIHNhbXBsZSBub25jZQ=="
        assert c.responses() == []


def test_101_relays_bytes_both_ways() -> None:
    with Harness(config()) as h:
        c, u = open_tunnel(h, early=b"early-frame", tail=b"server-hello")
        [switch] = c.responses()
        assert switch.status == 101
        assert switch.header(b"upgrade") == b"websocket"
        assert switch.header(b"connection") == b"upgrade"
        assert switch.header(b"sec-websocket-accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        # Bytes the upstream sent right behind its 101, and those the client sent before it.
        assert c.received().endswith(b"\r\n\r\nserver-hello")
        assert u.received().endswith(b"\r\n\r\nearly-frame")
        c.send(b"\x81\x05hello")
        assert u.received().endswith(b"early-frame\x81\x05hello")
        u.respond(b"\x81\x05world")
        assert c.received().endswith(b"server-hello\x81\x05world")
        # The exchange is over for the counters; the tunnel holds no request slot.
        assert h.statuses() == {101: 1}
        assert h.in_flight() == dict(NOTHING_IN_FLIGHT, client_connections=1)
        assert not u.pooled


@pytest.mark.parametrize("closing_side", ["client-fin", "client-reset", "upstream-fin"])
def test_tunnel_closes_when_either_side_closes(closing_side: str) -> None:
    with Harness(config()) as h:
        c, u = open_tunnel(h)
        if closing_side == "client-fin":
            c.disconnect()
            assert u.closed
        elif closing_side == "client-reset":
            c.reset()
            assert u.aborted
        else:
            u.close()
            assert c.closed
        h.run()
        assert h.in_flight() == NOTHING_IN_FLIGHT
        assert h.open_count("10.0.0.1:80") == 0


def test_tunnel_backpressure_follows_the_client() -> None:
    with Harness(config()) as h:
        c, u = open_tunnel(h)
        c.pause_writing()
        assert u.reading_paused
        c.resume_writing()
        assert not u.reading_paused


@pytest.mark.parametrize("status", [200, 400, 426])
def test_refused_upgrade_is_relayed_and_closes_the_client(status: int) -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(UPGRADE + b"not-http-after-all")
        u = h.upstream()
        u.respond(response(status, b"no tunnel"))
        [answer] = c.responses()
        assert (answer.status, answer.body) == (status, b"no tunnel")
        # The bytes behind the upgrade request were for the new protocol: never parsed as HTTP.
        assert answer.header(b"connection") == b"close"
        assert c.closed
        assert b"not-http-after-all" not in u.received()
        h.run()
        assert h.in_flight() == NOTHING_IN_FLIGHT


def test_101_without_an_upgrade_request_is_a_bad_gateway() -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(SWITCHING)
        [answer] = c.responses()
        assert answer.status == 502
        assert u.aborted
