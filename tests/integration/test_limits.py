"""Client-side limits against real gateway processes: 431, 414, 413, 408 (slowloris), idle and
keep-alive timeouts, and the cap on concurrent client connections.

Timeouts are observed by polling a socket with a generous guard, never by asserting durations.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import pytest

from tests.integration.backends import RawBackend, complete_message_responder
from tests.integration.conftest import GatewayProcess, is_closed, read_response, read_until_close

GUARD = 10.0  # seconds: how long a test waits for something that should happen much sooner


@pytest.fixture(scope="module")
def raw() -> Iterator[RawBackend]:
    backend = RawBackend(complete_message_responder)
    yield backend
    backend.close()


@pytest.fixture(autouse=True)
def _clean_backend(raw: RawBackend) -> None:
    raw.reset()


def _routes(raw: RawBackend) -> dict[str, Any]:
    return {
        "upstreams": {"raw": {"instances": [f"127.0.0.1:{raw.port}"]}},
        "routes": [
            {
                "name": "small-body",
                "match": {"path": {"prefix": "/small-body"}},
                "upstream": "raw",
                "max_body_bytes": "1KiB",
            },
            {"name": "raw", "match": {"path": {"prefix": "/"}}, "upstream": "raw"},
        ],
    }


@pytest.fixture(scope="module")
def sized(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], raw: RawBackend
) -> Iterator[GatewayProcess]:
    # A long header_timeout, so that a head that never ends must be stopped by its size.
    limits = {"max_header_bytes": "16KiB", "max_uri_bytes": "4KiB", "header_timeout": "60s"}
    process = start_gateway({"limits": limits, **_routes(raw)})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def timed(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], raw: RawBackend
) -> Iterator[GatewayProcess]:
    limits = {"header_timeout": "1s", "keepalive_timeout": "1s"}
    process = start_gateway({"limits": limits, **_routes(raw)})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def capped(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], raw: RawBackend
) -> Iterator[GatewayProcess]:
    process = start_gateway({"limits": {"max_connections": 5}, **_routes(raw)})
    yield process
    process.stop()


def expect_error_and_close(sock: socket.socket, status: int) -> dict[str, Any]:
    data, closed = read_until_close(sock)
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no response head (closed={closed}): {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split(" ", 2)[1] == str(status), lines[0]
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    assert headers.get("content-type", "").startswith("application/json")
    length = int(headers["content-length"])
    document = json.loads(rest[:length])
    assert document["error"]
    assert rest[length:] == b"", "bytes after the error response"
    assert closed, "the connection stayed open after the error"
    return document


def send_until_answered(sock: socket.socket, data: bytes, piece: int = 4096) -> int:
    """Send ``data`` in pieces, stopping early once the gateway answers (or closes), so that
    the answer is not destroyed by a reset caused by bytes it never read. Returns bytes sent."""
    sent = 0
    while sent < len(data):
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sent += sock.send(data[sent : sent + piece])
        except (BrokenPipeError, ConnectionResetError):
            break
    return sent


def assert_backend_untouched(raw: RawBackend) -> None:
    assert raw.connections == 0
    assert raw.all_bytes == b""


# -- sizes --------------------------------------------------------------------------------


def test_many_headers_431(sized: GatewayProcess, raw: RawBackend) -> None:
    headers = b"".join(b"X-Header-%04d: %s\r\n" % (i, b"v" * 40) for i in range(400))
    sock = sized.connect()
    send_until_answered(sock, b"GET /raw HTTP/1.1\r\nHost: t.test\r\n" + headers + b"\r\n")
    expect_error_and_close(sock, 431)
    sock.close()
    assert_backend_untouched(raw)


def test_one_huge_header_431(sized: GatewayProcess, raw: RawBackend) -> None:
    sock = sized.connect()
    request = b"GET /raw HTTP/1.1\r\nHost: t.test\r\nX-Big: " + b"v" * (20 * 1024) + b"\r\n\r\n"
    send_until_answered(sock, request)
    expect_error_and_close(sock, 431)
    sock.close()
    assert_backend_untouched(raw)


@pytest.mark.parametrize(
    "prefix",
    [
        # One header value that never ends: the parser holds it until the line is complete.
        b"GET /raw HTTP/1.1\r\nHost: t.test\r\nX-Endless: ",
        # One header name that never ends.
        b"GET /raw HTTP/1.1\r\nHost: t.test\r\nX-Endless-",
        # Complete header lines but never the empty line.
        b"GET /raw HTTP/1.1\r\nHost: t.test\r\n",
    ],
    ids=["endless-value", "endless-name", "endless-lines"],
)
def test_head_that_never_ends_431(sized: GatewayProcess, raw: RawBackend, prefix: bytes) -> None:
    # 64 KiB of head bytes without CRLFCRLF: the gateway must answer 431 and close instead of
    # buffering until the (here 60 s) header timeout.
    if prefix.endswith(b"\r\n"):
        filler = b"".join(b"X-Line-%05d: %s\r\n" % (i, b"v" * 50) for i in range(1100))
    else:
        filler = b"a" * (64 * 1024)
    with closing(sized.connect()) as sock:
        sent = send_until_answered(sock, prefix + filler[: 64 * 1024])
        assert sent > 16 * 1024  # it got past the limit before answering
        expect_error_and_close(sock, 431)
    assert_backend_untouched(raw)


def test_long_uri_414(sized: GatewayProcess, raw: RawBackend) -> None:
    sock = sized.connect()
    send_until_answered(sock, b"GET /raw/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: t.test\r\n\r\n")
    expect_error_and_close(sock, 414)
    sock.close()
    assert_backend_untouched(raw)


def test_uri_that_never_ends_414(sized: GatewayProcess, raw: RawBackend) -> None:
    sock = sized.connect()
    send_until_answered(sock, b"GET /raw/" + b"a" * (64 * 1024))
    expect_error_and_close(sock, 414)
    sock.close()
    assert_backend_untouched(raw)


def test_uri_at_the_limit_passes(sized: GatewayProcess, raw: RawBackend) -> None:
    target = b"/raw/" + b"a" * (4096 - 5)
    sock = sized.connect()
    sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t.test\r\n\r\n")
    assert read_response(sock)[0] == 200
    sock.close()
    assert raw.all_bytes.startswith(b"GET " + target + b" HTTP/1.1\r\n")


def test_body_over_route_limit_by_content_length_413(
    sized: GatewayProcess, raw: RawBackend
) -> None:
    # Only the head is sent: the 413 must come before (and without) the body (RFC 9110 §15.5.14).
    sock = sized.connect()
    sock.sendall(b"POST /small-body HTTP/1.1\r\nHost: t.test\r\nContent-Length: 2048\r\n\r\n")
    document = expect_error_and_close(sock, 413)
    assert document["error"] == "body_too_large"
    sock.close()
    assert_backend_untouched(raw)


def test_body_at_route_limit_passes(sized: GatewayProcess, raw: RawBackend) -> None:
    sock = sized.connect()
    sock.sendall(
        b"POST /small-body HTTP/1.1\r\nHost: t.test\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
    )
    assert read_response(sock)[0] == 200
    sock.close()
    assert raw.all_bytes.endswith(b"x" * 1024)


def test_chunked_body_over_limit_in_one_write_413(sized: GatewayProcess, raw: RawBackend) -> None:
    body = b"400\r\n" + b"x" * 1024 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n"
    sock = sized.connect()
    send_until_answered(
        sock,
        b"POST /small-body HTTP/1.1\r\nHost: t.test\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
    )
    expect_error_and_close(sock, 413)
    sock.close()
    assert_backend_untouched(raw)


def test_chunked_body_growing_past_limit_413(sized: GatewayProcess, raw: RawBackend) -> None:
    # The head is streamed upstream at once (by design); the body then grows chunk by chunk
    # past the 1 KiB cap: 413 to the client, and the upstream exchange is aborted.
    sock = sized.connect()
    sock.sendall(b"POST /small-body HTTP/1.1\r\nHost: t.test\r\nTransfer-Encoding: chunked\r\n\r\n")
    deadline = time.monotonic() + GUARD
    while b"\r\n\r\n" not in raw.all_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.all_bytes.startswith(b"POST /small-body HTTP/1.1\r\n")
    for _ in range(8):
        if send_until_answered(sock, b"100\r\n" + b"z" * 256 + b"\r\n") == 0:
            break
    document = expect_error_and_close(sock, 413)
    assert document["error"] == "body_too_large"
    sock.close()
    # What reached the upstream stays under the cap, and that exchange was never completed.
    _, _, forwarded = raw.all_bytes.partition(b"\r\n\r\n")
    assert forwarded.count(b"z") <= 1024
    assert not forwarded.endswith(b"0\r\n\r\n")


# -- timeouts -----------------------------------------------------------------------------


def test_partial_head_gets_408_then_close(timed: GatewayProcess, raw: RawBackend) -> None:
    sock = timed.connect()
    sock.sendall(b"GET /raw HTTP/1.1\r\nHost: t.test\r\n")
    document = expect_error_and_close(sock, 408)
    assert document["error"] == "request_timeout"
    sock.close()
    assert_backend_untouched(raw)


def test_slowloris_trickle_gets_408(timed: GatewayProcess, raw: RawBackend) -> None:
    # One byte at a time, each well inside any per-read timeout: the head as a whole is late.
    sock = timed.connect()
    sock.sendall(b"GET /raw HTTP/1.1\r\nHost: t.test\r\n")
    deadline = time.monotonic() + GUARD
    answered = False
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.1)
        if readable:
            answered = True
            break
        try:
            sock.send(b"X")
        except (BrokenPipeError, ConnectionResetError):
            break
    assert answered, "no answer while the head trickled in"
    expect_error_and_close(sock, 408)
    sock.close()
    assert_backend_untouched(raw)


def test_silent_connection_closed_after_header_timeout(timed: GatewayProcess) -> None:
    sock = timed.connect()
    # Closed without a response: nothing was asked (recv gives EOF, not bytes).
    assert is_closed(sock, timeout=GUARD)
    sock.close()


def test_idle_keepalive_connection_closed(timed: GatewayProcess, raw: RawBackend) -> None:
    sock = timed.connect()
    sock.sendall(b"GET /raw/1 HTTP/1.1\r\nHost: t.test\r\n\r\n")
    assert read_response(sock)[0] == 200
    # Still usable right away (keep-alive) ...
    sock.sendall(b"GET /raw/2 HTTP/1.1\r\nHost: t.test\r\n\r\n")
    status, headers, _ = read_response(sock)
    assert status == 200 and headers.get("connection", "") != "close"
    # ... and closed by the gateway once idle for keepalive_timeout, without a response.
    assert is_closed(sock, timeout=GUARD)
    sock.close()


# -- connection cap -----------------------------------------------------------------------


def _roundtrip(sock: socket.socket, path: bytes) -> int:
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t.test\r\n\r\n")
    return read_response(sock)[0]


def expect_refused(sock: socket.socket) -> dict[str, Any]:
    """Over limits.max_connections: a 503 with Retry-After and a JSON body, then close."""
    sock.sendall(b"GET /raw/over HTTP/1.1\r\nHost: t.test\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status == 503, (status, body)
    assert headers.get("retry-after") == "1"
    assert headers.get("connection") == "close"
    document = json.loads(body)
    assert document["error"] == "max_connections"
    assert document["request_id"] == headers["x-request-id"]
    assert is_closed(sock, timeout=GUARD)
    return document


def test_max_connections(capped: GatewayProcess) -> None:
    first = [capped.connect() for _ in range(5)]
    try:
        for i, sock in enumerate(first):
            assert _roundtrip(sock, b"/raw/%d" % i) == 200
        extra = capped.connect()
        try:
            expect_refused(extra)  # the 6th: accepted by the kernel, refused by the gateway
        finally:
            extra.close()
        assert 'gateway_connections_refused_total{reason="max_connections"} 1.0' in (
            capped.metrics_text()
        )
        for i, sock in enumerate(first):
            assert _roundtrip(sock, b"/raw/again-%d" % i) == 200
        # A slot freed by a client is available again (poll: the gateway sees the close later).
        first.pop().close()
        deadline = time.monotonic() + GUARD
        while True:
            sock = capped.connect()
            try:
                assert time.monotonic() < deadline, "the freed slot never became available"
                if _roundtrip(sock, b"/raw/late") == 200:
                    break
                time.sleep(0.05)
            finally:
                sock.close()
    finally:
        for sock in first:
            sock.close()
