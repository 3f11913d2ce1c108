"""HTTP/2 request header sections → HTTP/1.1 heads (gateway.proxy.h2.headers), rule by rule."""

from __future__ import annotations

import pytest
from hpack import NeverIndexedHeaderTuple

from gateway.proxy.h2.headers import MalformedRequest, request_head, response_fields

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=1")]
AUTH = [(b":authority", b"api.example")]


def test_request_head_translates_authority_and_joins_cookies() -> None:
    head = request_head(
        [*BASE, *AUTH, (b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")],
        end_stream=True,
    )
    assert head.head == (
        b"GET /a?b=1 HTTP/1.1\r\nhost: api.example\r\naccept: */*\r\n"
        b"cookie: a=1; b=2\r\nconnection: close\r\n\r\n"
    )
    assert head.content_length is None and not head.is_head


def test_body_without_length_goes_chunked_and_te_trailers_is_dropped() -> None:
    head = request_head(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/p"),
            *AUTH,
            (b"te", b"trailers"),
        ],
        end_stream=False,
    )
    assert b"transfer-encoding: chunked\r\n" in head.head
    assert b"te:" not in head.head


def test_content_length_is_kept_and_parsed() -> None:
    head = request_head([*BASE, *AUTH, (b"content-length", b"12")], end_stream=False)
    assert head.content_length == 12
    assert b"content-length: 12\r\n" in head.head and b"chunked" not in head.head


def test_host_without_authority_is_used() -> None:
    head = request_head([*BASE, (b"host", b"h.example")], end_stream=True)
    assert b"\r\nhost: h.example\r\n" in head.head


def test_options_asterisk() -> None:
    head = request_head(
        [(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*"), *AUTH], True
    )
    assert head.head.startswith(b"OPTIONS * HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        # RFC 9113 §8.2.1: upper case in a field name is malformed.
        ([*BASE, *AUTH, (b"X-Upper", b"1")], "8.2.1 upper-case name"),
        # RFC 9113 §8.2.1: NUL, CR, LF in a value; leading/trailing whitespace.
        ([*BASE, *AUTH, (b"x-a", b"a\r\nx-b: 1")], "8.2.1 CRLF in value"),
        ([*BASE, *AUTH, (b"x-a", b"a\x00b")], "8.2.1 NUL in value"),
        ([*BASE, *AUTH, (b"x-a", b" padded")], "8.2.1 leading space"),
        ([*BASE, *AUTH, (b"x a", b"1")], "8.2.1 space in name"),
        # RFC 9113 §8.2.2: connection-specific fields.
        ([*BASE, *AUTH, (b"connection", b"keep-alive")], "8.2.2 connection"),
        ([*BASE, *AUTH, (b"keep-alive", b"timeout=5")], "8.2.2 keep-alive"),
        ([*BASE, *AUTH, (b"proxy-connection", b"close")], "8.2.2 proxy-connection"),
        ([*BASE, *AUTH, (b"transfer-encoding", b"chunked")], "8.2.2 transfer-encoding"),
        ([*BASE, *AUTH, (b"upgrade", b"websocket")], "8.2.2 upgrade"),
        ([*BASE, *AUTH, (b"te", b"gzip")], "8.2.2 te other than trailers"),
        # RFC 9113 §8.3: pseudo-headers first, defined ones only, once each.
        (
            [(b":method", b"GET"), (b"accept", b"*/*"), (b":scheme", b"https"), (b":path", b"/")],
            "8.3 pseudo after regular",
        ),
        ([*BASE, *AUTH, (b":foo", b"1")], "8.3 unknown pseudo"),
        ([*BASE, *AUTH, (b":status", b"200")], "8.3 response pseudo in request"),
        ([*BASE, *AUTH, (b":protocol", b"websocket")], "8.3 :protocol without RFC 8441"),
        ([*BASE, (b":method", b"POST"), *AUTH], "8.3 duplicate :method"),
        ([*BASE, *AUTH, *AUTH], "8.3 duplicate :authority"),
        # RFC 9113 §8.3.1: :method, :scheme, :path present; :path not empty; "*" only with
        # OPTIONS; no userinfo; Host agreeing with :authority.
        ([(b":scheme", b"https"), (b":path", b"/"), *AUTH], "8.3.1 missing :method"),
        ([(b":method", b"GET"), (b":scheme", b"https"), *AUTH], "8.3.1 missing :path"),
        ([(b":method", b"GET"), (b":path", b"/"), *AUTH], "8.3.1 missing :scheme"),
        (
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b""), *AUTH],
            "8.3.1 empty :path",
        ),
        (
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"*"), *AUTH],
            "8.3.1 * without OPTIONS",
        ),
        (
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a b"), *AUTH],
            "8.3.1 space in :path",
        ),
        ([*BASE, (b":authority", b"user@api.example")], "8.3.1 userinfo"),
        ([*BASE, *AUTH, (b"host", b"other.example")], "8.3.1 host differs"),
        (
            [(b":method", b"GET"), (b":scheme", b"ftp"), (b":path", b"/"), *AUTH],
            "scheme other than http(s)",
        ),
        (
            [(b":method", b"G T"), (b":scheme", b"https"), (b":path", b"/"), *AUTH],
            "RFC 9110 §9.1 method token",
        ),
        # RFC 9113 §8.5: CONNECT (the gateway tunnels nothing over HTTP/2).
        ([(b":method", b"CONNECT"), *AUTH], "8.5 CONNECT"),
        # RFC 9110 §8.6: one content-length, digits only.
        (
            [*BASE, *AUTH, (b"content-length", b"1"), (b"content-length", b"1")],
            "duplicate content-length",
        ),
        ([*BASE, *AUTH, (b"content-length", b"-1")], "negative content-length"),
    ],
)
def test_malformed_requests_are_refused(headers: list[tuple[bytes, bytes]], rule: str) -> None:
    with pytest.raises(MalformedRequest):
        request_head(headers, end_stream=True)


def test_response_fields_drop_connection_specific_and_named_ones() -> None:
    fields = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Hop", b"1"),
        (b"Set-Cookie", b"a=1"),
    ]
    assert response_fields(200, fields, [b"close", b"x-hop"]) == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
    ]


def test_request_id_is_kept_out_of_the_hpack_table() -> None:
    """RFC 7541 §6.2.3: a value new in every response is sent as a never-indexed literal."""
    fields = response_fields(200, [(b"X-Request-ID", b"abc-1"), (b"Server", b"nginx")])
    assert fields == [(b":status", b"200"), (b"x-request-id", b"abc-1"), (b"server", b"nginx")]
    assert isinstance(fields[1], NeverIndexedHeaderTuple)
    assert not isinstance(fields[2], NeverIndexedHeaderTuple)
