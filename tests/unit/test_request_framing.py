"""Request framing at exact read boundaries: the client side of the data plane fed byte
ranges directly (sockets faked, as in ``loadtest.bench_dataplane``), so every split point of a
request is a separate ``data_received``. The integration suite (test_request_validation.py)
covers the same rules over real sockets, where read boundaries cannot be chosen.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import load_config_text
from gateway.metrics import GatewayMetrics
from gateway.proxy.listener import ClientConnection
from gateway.proxy.server import ProxyServer
from gateway.proxy.upstream import UpstreamConnection
from gateway.snapshot import build_snapshot

CONFIG = """
listen: 127.0.0.1:0
admin: 127.0.0.1:0
limits: {max_header_bytes: 1KiB, max_chunk_line_bytes: 64, max_chunk_extensions_bytes: 200}
upstreams:
  origin: {instances: [127.0.0.1:9]}
routes:
  - {name: all, match: {path: {prefix: /}}, upstream: origin}
"""


class RecordingTransport:
    """Enough of asyncio.Transport for the data plane; keeps every byte written."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, data: Any) -> None:
        for piece in data:
            self.data += piece

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_limits = (high, low)


class Wire:
    """A client connection whose upstream pool holds one connection with a recording transport."""

    def __init__(self) -> None:
        snapshot = build_snapshot(load_config_text(CONFIG))
        self.client = ClientConnection(ProxyServer(snapshot, GatewayMetrics()))
        self.to_client = RecordingTransport()
        self.client.connection_made(self.to_client)  # type: ignore[arg-type]
        pool = snapshot.upstreams["origin"].instances[0].pool
        self.upstream = UpstreamConnection(pool)
        self.to_upstream = RecordingTransport()
        self.upstream.transport = self.to_upstream  # type: ignore[assignment]
        pool.open_count += 1
        pool.release(self.upstream)

    def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            if piece and not self.to_client.closing:
                self.client.data_received(piece)

    def status(self) -> int | None:
        data = bytes(self.to_client.data)
        return int(data.split(b" ", 2)[1]) if data else None


def forwarded_body(sent: bytes) -> bytes | None:
    """The payload of the chunked body the upstream received, or None if it is incomplete.

    The gateway re-frames: each piece llhttp delivered becomes one chunk, so chunk boundaries
    follow the reads, not the client's chunks.
    """
    _, sep, rest = sent.partition(b"\r\n\r\n")
    payload = b""
    while sep:
        line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            return None
        size = int(line, 16)
        if size == 0:
            return payload if rest == b"\r\n" else None
        payload += rest[:size]
        rest = rest[size + 2 :]
    return None


def splits(request: bytes, step: int = 1) -> list[tuple[bytes, bytes]]:
    return [(request[:at], request[at:]) for at in range(1, len(request), step)]


CHUNKED = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk_with_line(line_bytes: int) -> bytes:
    """A 5-byte chunk whose size line (size, extension, CRLF) is ``line_bytes`` long."""
    return b"5;e=" + b"x" * (line_bytes - 6) + b"\r\nhello\r\n"


@pytest.mark.parametrize("line_bytes", [64, 65])
def test_chunk_line_bound_at_every_read_boundary(line_bytes: int) -> None:
    # RFC 9112 §7.1: chunk-size line; bounded by limits.max_chunk_line_bytes (64 here).
    request = CHUNKED + chunk_with_line(line_bytes) + b"0\r\n\r\n"
    for first, second in splits(request):
        wire = Wire()
        wire.feed(first, second)
        sent = bytes(wire.to_upstream.data)
        if line_bytes <= 64:
            assert wire.status() is None, (first, wire.to_client.data)
            assert forwarded_body(sent) == b"hello", (first, sent)
        else:
            assert wire.status() == 400, first
            assert forwarded_body(sent) is None, (first, sent)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (chunk_with_line(64) + b"0\r\n\r\n", None),
        (chunk_with_line(65) + b"0\r\n\r\n", 400),
        (chunk_with_line(30) + b"0\r\nX-A: 1\r\n\r\n", None),
        (chunk_with_line(30) + b"0\r\nCookie: 1\r\n\r\n", 400),
        (b"5\r\nhello\r\n0\r\nX-A: " + b"v" * 1100 + b"\r\n\r\n", 431),
    ],
    ids=["line-64", "line-65", "trailer", "forbidden-trailer", "trailer-too-large"],
)
def test_chunked_body_in_single_byte_reads(body: bytes, expected: int | None) -> None:
    wire = Wire()
    request = CHUNKED + body
    wire.feed(*(request[at : at + 1] for at in range(len(request))))
    assert wire.status() == expected
    sent = forwarded_body(bytes(wire.to_upstream.data))
    assert sent == (b"hello" if expected is None else None)


@pytest.mark.parametrize(("chunks", "expected"), [(4, None), (5, 400)])
def test_extension_total_at_every_read_boundary(chunks: int, expected: int | None) -> None:
    # 49 extension bytes per chunk: 4 chunks = 196 <= 200, 5 chunks = 245 > 200.
    body = b"".join(b"1;" + b"e" * 48 + b"\r\nx\r\n" for _ in range(chunks)) + b"0\r\n\r\n"
    for first, second in splits(CHUNKED + body, step=3):
        wire = Wire()
        wire.feed(first, second)
        assert wire.status() == expected, first
        sent = bytes(wire.to_upstream.data)
        assert forwarded_body(sent) == (b"x" * chunks if expected is None else None)


@pytest.mark.parametrize("padding", [0, 10, 200])
def test_leading_zeros_do_not_count_as_extensions(padding: int) -> None:
    size = b"0" * padding + b"5"
    for first, second in splits(CHUNKED + size + b"\r\nhello\r\n0\r\n\r\n", step=7):
        wire = Wire()
        wire.feed(first, second)
        expected = None if len(size) + 2 <= 64 else 400  # the line bound still holds
        assert wire.status() == expected, first


def test_trailer_section_bound_and_trailers_dropped() -> None:
    ok = CHUNKED + b"5\r\nhello\r\n0\r\nX-A: 1\r\nX-B: 2\r\n\r\n"
    for first, second in splits(ok):
        wire = Wire()
        wire.feed(first, second)
        sent = bytes(wire.to_upstream.data)
        assert wire.status() is None and forwarded_body(sent) == b"hello", first
        assert b"x-a" not in sent.lower()
    too_big = CHUNKED + b"5\r\nhello\r\n0\r\nX-A: " + b"v" * 2000 + b"\r\n\r\n"
    for first, second in splits(too_big, step=97):
        wire = Wire()
        wire.feed(first, second)
        assert wire.status() == 431, first
        assert forwarded_body(bytes(wire.to_upstream.data)) is None


def test_forbidden_trailer_at_every_read_boundary() -> None:
    request = CHUNKED + b"5\r\nhello\r\n0\r\nCookie: a=b\r\n\r\n"
    for first, second in splits(request):
        wire = Wire()
        wire.feed(first, second)
        assert wire.status() == 400, first
        assert forwarded_body(bytes(wire.to_upstream.data)) is None


def test_pipelined_chunked_requests_in_one_read() -> None:
    get = b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"
    first = CHUNKED + chunk_with_line(40) + b"0\r\n\r\n"
    wire = Wire()
    wire.feed(get + first + first)
    assert wire.status() is None  # nothing refused; the GET went upstream, the rest is queued
    assert bytes(wire.to_upstream.data).startswith(b"GET /y HTTP/1.1\r\n")


@pytest.mark.parametrize("method", [b"FOO", b"PROPFOO", b"M-SEARCHES", b"DESCRIBE", b"get"])
def test_extension_method_split_at_every_byte(method: bytes) -> None:
    request = method + b" /x HTTP/1.1\r\nHost: a\r\n\r\n"
    for first, second in splits(request):
        wire = Wire()
        wire.feed(first, second)
        assert wire.status() is None, (first, wire.to_client.data)
        assert bytes(wire.to_upstream.data).startswith(method + b" /x HTTP/1.1\r\n"), first
    wire = Wire()
    wire.feed(*(request[at : at + 1] for at in range(len(request))))
    assert bytes(wire.to_upstream.data).startswith(method + b" /x HTTP/1.1\r\n")


def test_partial_method_token_is_held_not_refused() -> None:
    wire = Wire()
    wire.feed(b"FO")
    assert wire.status() is None and not wire.to_client.closing
    wire.feed(b"O /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bytes(wire.to_upstream.data).startswith(b"FOO /x HTTP/1.1\r\n")


@pytest.mark.parametrize("method", [b"F@O", b"FO\x7fO", b"M" * 65])
def test_invalid_method_split_at_every_byte_is_400(method: bytes) -> None:
    request = method + b" /x HTTP/1.1\r\nHost: a\r\n\r\n"
    for first, second in splits(request, step=5):
        wire = Wire()
        wire.feed(first, second)
        assert wire.status() == 400, first
        assert wire.to_upstream.data == b""
