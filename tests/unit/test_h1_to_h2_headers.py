"""HTTP/1.1 heads translated for HTTP/2 upstreams (gateway/proxy/h2/from_h1.py), sans IO:
the request head the lifecycle built becomes a header list without connection-specific fields
(RFC 9113 §8.2.2), and an HTTP/2 response head a ``ResponseHead`` for the HTTP/1.1 phases."""

from __future__ import annotations

import pytest

from gateway.proxy.h2.from_h1 import h2_request_headers, response_head, wants_trailers


def test_request_head_to_pseudo_headers() -> None:
    head = (
        b"POST /a/b?c=1 HTTP/1.1\r\nhost: api.example:8080\r\ncontent-type: text/plain\r\n"
        b"cookie: a=1\r\ncookie: b=2\r\nx-forwarded-for: 192.0.2.1\r\nx-request-id: r1\r\n"
        b"content-length: 5\r\n\r\n"
    )
    headers = h2_request_headers(head, b"http", client_te_trailers=False)
    # RFC 9113 §8.3.1: pseudo-headers first; Host becomes :authority (§8.3.1, "authority").
    assert headers[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"api.example:8080"),
        (b":path", b"/a/b?c=1"),
    ]
    assert headers[4:] == [
        (b"content-type", b"text/plain"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"x-forwarded-for", b"192.0.2.1"),
        (b"x-request-id", b"r1"),
        (b"content-length", b"5"),
    ]


# RFC 9113 §8.2.2: connection-specific fields are malformed in HTTP/2; TE only as "trailers".
@pytest.mark.parametrize(
    "line",
    [
        b"connection: keep-alive",
        b"keep-alive: timeout=5",
        b"proxy-connection: keep-alive",
        b"transfer-encoding: chunked",
        b"upgrade: websocket",
        b"te: trailers",
        b"te: gzip",
        b"http2-settings: AAMAAABkAAQAoAAAAAIAAAAA",
        b"Connection: close",
    ],
)
def test_connection_specific_fields_are_dropped(line: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nhost: h\r\n" + line + b"\r\n\r\n"
    headers = h2_request_headers(head, b"https", client_te_trailers=False)
    assert [name for name, _ in headers] == [b":method", b":scheme", b":authority", b":path"]


def test_te_trailers_is_sent_when_the_client_asked() -> None:
    head = b"GET / HTTP/1.1\r\nhost: h\r\n\r\n"
    assert (b"te", b"trailers") in h2_request_headers(head, b"http", client_te_trailers=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"te", b"trailers")], True),
        ([(b"te", b"gzip, Trailers")], True),
        ([(b"te", b"gzip")], False),
        ([], False),
    ],
)
def test_wants_trailers(headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert wants_trailers(headers) is expected


def test_response_head_keeps_content_length_apart() -> None:
    head = response_head(
        200,
        [(b"content-type", b"text/plain"), (b"content-length", b"42"), (b"set-cookie", b"a=1")],
        None,
    )
    assert head.reason == b"OK"
    assert head.content_length == b"42"
    assert head.fields == b"content-type: text/plain\r\nset-cookie: a=1\r\n"


def test_response_head_drops_what_the_http1_side_sets_and_unsafe_values() -> None:
    head = response_head(
        599,
        [(b"x-request-id", b"upstream's"), (b"x-ok", b"1"), (b"x-bad", b"a\r\nb: c")],
        None,
    )
    assert head.reason == b""
    assert head.content_length is None
    assert head.fields == b"x-ok: 1\r\n"


def test_response_head_for_grpc_web_maps_the_type_and_drops_the_length() -> None:
    head = response_head(
        200,
        [(b"content-type", b"application/grpc"), (b"content-length", b"7")],
        "application/grpc-web-text",
    )
    assert head.content_length is None  # the body gains the trailer frame (and base64)
    assert head.fields == b"content-type: application/grpc-web-text\r\n"
