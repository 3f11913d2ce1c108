"""Malformed requests over raw sockets: 400 (or the right 4xx), a JSON error, the connection
closed, and not one byte or connection reaching the upstream.

Every route of this module's gateway leads to a ``RawBackend`` that records all it receives, so
"nothing reached the upstream" is checked on the bytes themselves. After each rejection a valid
*barrier* request goes through the same gateway: once its answer is back, anything the gateway
might have forwarded for the bad request has arrived too, and the backend must hold exactly the
barrier's head and nothing else. The positive controls prove those assertions can fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.backends import RawBackend, complete_message_responder
from tests.integration.conftest import GatewayProcess, read_response, read_until_close

BARRIER = b"GET /__barrier__ HTTP/1.1\r\nHost: barrier.test\r\n\r\n"


@pytest.fixture(scope="module")
def raw() -> Iterator[RawBackend]:
    backend = RawBackend(complete_message_responder)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def gw(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], raw: RawBackend
) -> Iterator[GatewayProcess]:
    process = start_gateway(
        {
            "limits": {"max_header_bytes": "16KiB", "max_uri_bytes": "4KiB"},
            "upstreams": {"raw": {"instances": [f"127.0.0.1:{raw.port}"]}},
            "routes": [{"name": "raw", "match": {"path": {"prefix": "/"}}, "upstream": "raw"}],
        }
    )
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _clean_backend(raw: RawBackend) -> None:
    raw.reset()


def parse_one_response(data: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """(status, headers, body, trailing bytes) of the first Content-Length response in ``data``."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), lines[0]
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    return status, headers, rest[:length], rest[length:]


def assert_upstream_saw_only_barrier(gw: GatewayProcess, raw: RawBackend) -> None:
    # Right after the rejection: no connection and no byte for the bad request.
    assert raw.connections == 0, "the gateway opened an upstream connection for a bad request"
    assert raw.all_bytes == b"", f"upstream received {raw.all_bytes!r}"
    # A valid request through the same gateway; when it is answered, anything forwarded earlier
    # has arrived as well.
    sock = gw.connect()
    try:
        sock.sendall(BARRIER)
        status, _, _ = read_response(sock)
        assert status == 200
    finally:
        sock.close()
    received = raw.all_bytes
    assert received.startswith(b"GET /__barrier__ HTTP/1.1\r\n"), received
    assert received.count(b"\r\n\r\n") == 1 and received.endswith(b"\r\n\r\n"), received
    assert raw.connections <= 1


def assert_rejected(
    gw: GatewayProcess, raw: RawBackend, request: bytes, statuses: set[int]
) -> dict[str, Any]:
    """Send ``request`` in one write; expect one JSON error response, then the close."""
    sock = gw.connect()
    try:
        sock.sendall(request)
        data, closed = read_until_close(sock)
    finally:
        sock.close()
    assert data, "the gateway closed the connection without any response"
    status, headers, body, trailing = parse_one_response(data)
    assert status in statuses, f"status {status}, body {body!r}"
    assert headers.get("content-type", "").startswith("application/json")
    document = json.loads(body)
    assert isinstance(document.get("error"), str) and document["error"]
    assert headers.get("connection", "").lower() == "close"
    assert trailing == b"", f"bytes after the error response: {trailing!r}"
    assert closed, "the gateway kept the connection open after rejecting the request"
    assert_upstream_saw_only_barrier(gw, raw)
    return document


def post(headers: bytes, body: bytes = b"", *, target: bytes = b"/raw") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\nHost: t.test\r\n" + headers + b"\r\n" + body


def get_with(headers: bytes, *, target: bytes = b"/raw", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\nHost: t.test\r\n" + headers + b"\r\n"


BAD_400: dict[str, bytes] = {
    # RFC 9112 §6.3 item 3: both framings at once is a smuggling vector; a proxy must not
    # forward it (the design rejects it outright).
    "cl-and-te": post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "te-and-cl": post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
    # RFC 9110 §8.6 / RFC 9112 §6.3 item 5: repeated lengths (same or different values).
    "duplicate-cl-same": post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
    "duplicate-cl-different": post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    "cl-list": post(b"Content-Length: 5, 6\r\n", b"hello!"),
    # RFC 9110 §8.6: Content-Length = 1*DIGIT.
    "cl-negative": post(b"Content-Length: -1\r\n"),
    "cl-exponent": post(b"Content-Length: 1e3\r\n", b"x" * 1000),
    "cl-hex": post(b"Content-Length: 0x10\r\n", b"x" * 16),
    "cl-plus": post(b"Content-Length: +5\r\n", b"hello"),
    "cl-inner-space": post(b"Content-Length: 5 5\r\n", b"hello"),
    "cl-letters": post(b"Content-Length: five\r\n", b"hello"),
    "cl-empty": post(b"Content-Length:\r\n", b"hello"),
    # RFC 9112 §5.2: obs-fold in a request -> 400 (or unfold; this gateway rejects).
    "obs-fold-space": get_with(b"X-Folded: first\r\n second\r\n"),
    "obs-fold-tab": get_with(b"X-Folded: first\r\n\tsecond\r\n"),
    # RFC 9112 §2.2: whitespace before the first header line must be rejected (or the line
    # ignored, which leaves the request without Host: 400 either way).
    "space-after-request-line": b"GET /raw HTTP/1.1\r\n Host: t.test\r\n\r\n",
    # RFC 9112 §2.2: bare LF / bare CR as line terminators (this gateway is strict).
    "bare-lf-everywhere": b"GET /raw HTTP/1.1\nHost: t.test\n\n",
    "bare-lf-request-line": b"GET /raw HTTP/1.1\nHost: t.test\r\n\r\n",
    "bare-lf-header": b"GET /raw HTTP/1.1\r\nHost: t.test\nX-A: b\r\n\r\n",
    "bare-lf-end-of-head": b"GET /raw HTTP/1.1\r\nHost: t.test\r\n\n",
    "bare-cr-in-header": b"GET /raw HTTP/1.1\r\nHost: t.test\r\nX-A: b\rX-B: c\r\n\r\n",
    # RFC 9112 §6.3 item 4 and §6.1: chunked must be the final coding, applied once; other
    # codings cannot frame a request.
    "te-chunked-then-identity": post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
    "te-xchunked": post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
    "te-second-header": post(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n"
    ),
    "te-gzip-only": post(b"Transfer-Encoding: gzip\r\n", b"0\r\n\r\n"),
    "te-identity": post(b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n"),
    "te-chunked-twice": post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
    "te-vertical-tab": post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"),
    # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
    "http10-with-te": b"POST /raw HTTP/1.0\r\nHost: t.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    # RFC 9112 §3.2: exactly one Host in HTTP/1.1.
    "missing-host": b"GET /raw HTTP/1.1\r\nX-A: b\r\n\r\n",
    "two-hosts": get_with(b"Host: other.test\r\n"),
    "two-hosts-same": get_with(b"Host: t.test\r\n"),
    # RFC 9110 §5.5 (field-vchar) and §5.1 (field-name = token): control characters.
    "nul-in-value": get_with(b"X-A: a\x00b\r\n"),
    "soh-in-value": get_with(b"X-A: a\x01b\r\n"),
    "del-in-value": get_with(b"X-A: a\x7fb\r\n"),
    "soh-in-name": get_with(b"X-\x01A: b\r\n"),
    "del-in-name": get_with(b"X-\x7fA: b\r\n"),
    "nul-in-name": get_with(b"X-\x00A: b\r\n"),
    "separator-in-name": get_with(b"X(A): b\r\n"),
    "empty-name": get_with(b": b\r\n"),
    # RFC 9112 §3.2: the request target has no control characters or whitespace.
    "nul-in-target": get_with(b"", target=b"/raw\x00x"),
    "soh-in-target": get_with(b"", target=b"/raw\x01x"),
    "del-in-target": get_with(b"", target=b"/raw\x7fx"),
    "tab-in-target": get_with(b"", target=b"/raw\tx"),
    # Chunked body errors (RFC 9112 §7.1), head and body in one write.
    "chunk-size-not-hex": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-negative": post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"),
    "chunk-size-overflow": post(
        b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk-size-0x-prefix": post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk-data-without-crlf": post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"),
    "chunk-size-bare-lf": post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
    "chunk-trailer-control-char": post(
        b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-T: a\x01b\r\n\r\n"
    ),
    # RFC 9112 §5.1: no whitespace between field name and colon; MUST answer 400.
    "space-before-colon": get_with(b"X-A : b\r\n"),
    "space-before-colon-te": post(
        b"Content-Length: 5\r\nTransfer-Encoding : chunked\r\n", b"0\r\n\r\n"
    ),
    "tab-before-colon": get_with(b"X-A\t: b\r\n"),
    # RFC 9110 §9.1: method = token.
    "method-separator": b"G(T /raw HTTP/1.1\r\nHost: t.test\r\n\r\n",
    "method-control-char": b"GE\x01T /raw HTTP/1.1\r\nHost: t.test\r\n\r\n",
    "method-space-prefix": b" GET /raw HTTP/1.1\r\nHost: t.test\r\n\r\n",
    # RFC 9112 §2.3: HTTP-version is case-sensitive "HTTP/" DIGIT "." DIGIT.
    "version-lowercase": get_with(b"", version=b"http/1.1"),
    "version-garbage": get_with(b"", version=b"HTTP/1.x"),
}


@pytest.mark.parametrize("request_bytes", BAD_400.values(), ids=BAD_400.keys())
def test_malformed_request_is_rejected_with_400(
    gw: GatewayProcess, raw: RawBackend, request_bytes: bytes
) -> None:
    assert_rejected(gw, raw, request_bytes, {400})


# Versions this gateway does not speak: 400 from the parser, or 505 (RFC 9110 §15.6.6).
BAD_VERSION: dict[str, bytes] = {
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http-9.9": get_with(b"", version=b"HTTP/9.9"),
    "http-2.0-request-line": get_with(b"", version=b"HTTP/2.0"),
}


@pytest.mark.parametrize("request_bytes", BAD_VERSION.values(), ids=BAD_VERSION.keys())
def test_unsupported_version_is_rejected(
    gw: GatewayProcess, raw: RawBackend, request_bytes: bytes
) -> None:
    assert_rejected(gw, raw, request_bytes, {400, 505})


def test_content_length_overflow_is_rejected(gw: GatewayProcess, raw: RawBackend) -> None:
    # Larger than any integer type: unparseable as a length (400) or over the body cap (413).
    assert_rejected(gw, raw, post(b"Content-Length: 99999999999999999999999999\r\n"), {400, 413})


def test_connect_is_405(gw: GatewayProcess, raw: RawBackend) -> None:
    request = b"CONNECT t.test:443 HTTP/1.1\r\nHost: t.test:443\r\n\r\n"
    document = assert_rejected(gw, raw, request, {405})
    assert document["error"] == "method_not_allowed"


def test_smuggled_request_is_not_forwarded(gw: GatewayProcess, raw: RawBackend) -> None:
    # CL.TE: a front end honouring Content-Length and a back end honouring chunked would see a
    # second request "GET /raw/admin". The gateway must answer once and close (RFC 9112 §6.3).
    smuggled = b"GET /raw/admin HTTP/1.1\r\nHost: t.test\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    request = post(b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(body[:5]), body)
    assert_rejected(gw, raw, request, {400})
    assert b"/raw/admin" not in raw.all_bytes


def test_smuggled_request_te_cl(gw: GatewayProcess, raw: RawBackend) -> None:
    # TE.CL: the chunked body carries a request a Content-Length reader would see as the next one.
    inner = b"GET /raw/admin HTTP/1.1\r\nHost: t.test\r\n\r\n"
    body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(inner), inner)
    request = post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", body)
    assert_rejected(gw, raw, request, {400})
    assert b"/raw/admin" not in raw.all_bytes


def test_bad_request_pipelined_after_good_one(gw: GatewayProcess, raw: RawBackend) -> None:
    # Both requests in one write. The valid first one may be answered (RFC 9112 §9.3.2) or,
    # conservatively, dropped with the bad one; either way the malformed second request gets a
    # 400 in order, the connection closes, and nothing of it reaches the upstream. Silence on
    # an open connection is the one wrong answer.
    good = b"GET /raw/first HTTP/1.1\r\nHost: t.test\r\n\r\n"
    bad = post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")
    sock = gw.connect()
    try:
        sock.sendall(good + bad)
        data, closed = read_until_close(sock)
    finally:
        sock.close()
    assert data, f"no response at all (connection {'closed' if closed else 'left open'})"
    received = raw.all_bytes
    if data.startswith(b"HTTP/1.1 200 "):
        _, _, rest = data.partition(b"\r\n\r\n")
        assert rest.startswith(b"ok")
        data = rest[2:]
        assert received.startswith(b"GET /raw/first HTTP/1.1\r\n"), received
        assert received.count(b"\r\n\r\n") == 1, received
    else:
        assert received == b"", received
    status, _, body, trailing = parse_one_response(data)
    assert status == 400 and "error" in json.loads(body) and trailing == b""
    assert closed


def test_bad_request_after_answered_one_on_same_connection(
    gw: GatewayProcess, raw: RawBackend
) -> None:
    sock = gw.connect()
    try:
        sock.sendall(b"GET /raw/first HTTP/1.1\r\nHost: t.test\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"))
        data, closed = read_until_close(sock)
    finally:
        sock.close()
    status, _, body, trailing = parse_one_response(data)
    assert status == 400 and "error" in json.loads(body) and trailing == b""
    assert closed
    received = raw.all_bytes
    assert received.startswith(b"GET /raw/first HTTP/1.1\r\n"), received
    assert received.count(b"\r\n\r\n") == 1, received


# -- positive controls: valid requests do reach the backend -----------------------------------


def test_valid_request_reaches_backend(gw: GatewayProcess, raw: RawBackend) -> None:
    sock = gw.connect()
    try:
        sock.sendall(b"GET /raw/ok HTTP/1.1\r\nHost: t.test\r\n\r\n")
        status, _, body = read_response(sock)
    finally:
        sock.close()
    assert (status, body) == (200, b"ok")
    assert raw.all_bytes.startswith(b"GET /raw/ok HTTP/1.1\r\n")
    with pytest.raises(AssertionError):
        assert_upstream_saw_only_barrier(gw, raw)


VALID: dict[str, bytes] = {
    # RFC 9110 §5.5: optional whitespace around a field value is not part of it.
    "cl-with-ows": post(b"Content-Length:  5 \r\n", b"hello"),
    "cl-leading-zeros": post(b"Content-Length: 005\r\n", b"hello"),
    "chunked-body": post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    "chunked-case-insensitive": post(b"Transfer-Encoding: Chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    "chunk-extension": post(b"Transfer-Encoding: chunked\r\n", b"5;a=b\r\nhello\r\n0\r\n\r\n"),
    "http10-without-host": b"GET /raw HTTP/1.0\r\n\r\n",
    "obs-text-in-value": get_with(b"X-A: caf\xe9\r\n"),
    "tab-in-value": get_with(b"X-A: a\tb\r\n"),
}


@pytest.mark.parametrize("request_bytes", VALID.values(), ids=VALID.keys())
def test_valid_variants_are_forwarded(
    gw: GatewayProcess, raw: RawBackend, request_bytes: bytes
) -> None:
    sock = gw.connect()
    try:
        sock.sendall(request_bytes)
        status, _, body = read_response(sock)
    finally:
        sock.close()
    assert (status, body) == (200, b"ok")
    received = raw.all_bytes
    assert received.startswith(request_bytes.split(b" ", 1)[0] + b" /raw HTTP/1.1\r\n"), received
    if b"hello" in request_bytes:
        assert b"hello" in received
