"""The Upgrade tunnel (gateway/proxy/tunnel.py) driven with fake transports: relay, backpressure
both ways, FIN passed on (RFC 9110 §7.8: after 101 the connection carries the new protocol's
bytes, and TCP half-close is that protocol's business), and close of both sides."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.proxy.tunnel import Tunnel


class FakeTransport:
    def __init__(self) -> None:
        self.protocol: asyncio.BaseProtocol | None = None
        self.written: list[bytes] = []
        self.reading = False  # as the HTTP side leaves it around an upgrade: paused
        self.closed = False
        self.aborted = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def _open(*, client_paused: bool = False) -> tuple[Tunnel, FakeTransport, FakeTransport, list[str]]:
    client = FakeTransport()
    upstream = FakeTransport()
    lost: list[str] = []
    tunnel = Tunnel.open(
        client,  # type: ignore[arg-type]
        upstream,  # type: ignore[arg-type]
        client_lost=lambda exc: lost.append("client"),
        upstream_lost=lambda exc: lost.append("upstream"),
        to_client=[b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"", b"early-server"],
        to_upstream=[b"early-client"],
        client_writing_paused=client_paused,
    )
    return tunnel, client, upstream, lost


def test_open_switches_both_protocols_and_writes_the_held_bytes() -> None:
    tunnel, client, upstream, _ = _open()
    assert client.protocol is tunnel.client and upstream.protocol is tunnel.upstream
    assert client.written == [b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"early-server"]
    assert upstream.written == [b"early-client"]
    assert client.reading and upstream.reading


def test_bytes_are_relayed_both_ways() -> None:
    tunnel, client, upstream, _ = _open()
    tunnel.client.data_received(b"ping")
    tunnel.upstream.data_received(b"pong")
    assert upstream.written[-1] == b"ping"
    assert client.written[-1] == b"pong"


@pytest.mark.parametrize(
    ("full_side", "paused_side"),
    [("client", "upstream"), ("upstream", "client")],
)
def test_a_full_write_buffer_pauses_the_other_side_until_it_drains(
    full_side: str, paused_side: str
) -> None:
    tunnel, client, upstream, _ = _open()
    transports: dict[str, Any] = {"client": client, "upstream": upstream}
    end = getattr(tunnel, full_side)
    end.pause_writing()
    assert transports[paused_side].reading is False
    end.resume_writing()
    assert transports[paused_side].reading is True


def test_a_client_that_could_not_take_more_keeps_the_upstream_paused() -> None:
    tunnel, client, upstream, _ = _open(client_paused=True)
    assert upstream.reading is False and client.reading is True
    tunnel.client.resume_writing()
    assert upstream.reading is True


def test_fin_from_either_side_closes_the_other_after_its_buffered_bytes() -> None:
    tunnel, client, _upstream, _ = _open()
    tunnel.upstream.data_received(b"last words")
    assert tunnel.upstream.eof_received() is False  # the transport closes this side
    tunnel.upstream.connection_lost(None)
    assert client.closed and not client.aborted and client.written[-1] == b"last words"


def test_a_reset_is_passed_on_as_an_abort() -> None:
    tunnel, _client, upstream, _ = _open()
    tunnel.client.connection_lost(ConnectionResetError())
    assert upstream.aborted


@pytest.mark.parametrize(("side", "other"), [("client", "upstream"), ("upstream", "client")])
def test_losing_one_side_closes_the_other_and_each_bookkeeping_runs_once(
    side: str, other: str
) -> None:
    tunnel, client, upstream, lost = _open()
    transports: dict[str, Any] = {"client": client, "upstream": upstream}
    getattr(tunnel, side).connection_lost(None)
    assert transports[other].closed
    getattr(tunnel, side).connection_lost(None)
    getattr(tunnel, other).connection_lost(None)
    assert sorted(lost) == ["client", "upstream"]
    getattr(tunnel, other).data_received(b"late")  # nothing is written to a lost side
    assert transports[side].written[-1] != b"late"


def test_abort_aborts_both_live_sides() -> None:
    tunnel, client, upstream, _ = _open()
    tunnel.upstream.connection_lost(None)
    tunnel.abort()
    assert client.aborted and not upstream.aborted
