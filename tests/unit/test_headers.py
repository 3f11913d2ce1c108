"""Header rules of the proxy (pure functions)."""

from __future__ import annotations

import re

import pytest

from gateway.proxy import headers as hdr


def _parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    assert head.endswith(b"\r\n\r\n")
    first, *lines = head[:-4].split(b"\r\n")
    return first, [tuple(line.split(b": ", 1)) for line in lines]  # type: ignore[misc]


def _request_head(
    headers: list[tuple[bytes, bytes]], **overrides: object
) -> tuple[bytes, dict[bytes, list[bytes]]]:
    options: dict[str, object] = {
        "host": b"api.example.com",
        "conn_tokens": frozenset(),
        "client_ip": "192.0.2.7",
        "peer_trusted": False,
        "request_id": b"rid-1",
        "framing": b"",
        "upgrade": None,
    }
    options.update(overrides)
    head = hdr.build_request_head(b"GET", b"/x?y=1", headers, **options)  # type: ignore[arg-type]
    first, pairs = _parse_head(head)
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        grouped.setdefault(name, []).append(value)
    return first, grouped


def test_request_line_is_http11_and_host_first() -> None:
    first, grouped = _request_head([(b"accept", b"*/*")])
    assert first == b"GET /x?y=1 HTTP/1.1"
    assert grouped[b"host"] == [b"api.example.com"]
    assert grouped[b"accept"] == [b"*/*"]


@pytest.mark.parametrize(
    "name",
    [
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authorization",
        b"content-length",
    ],
)
def test_hop_by_hop_request_headers_are_dropped(name: bytes) -> None:
    _, grouped = _request_head([(name, b"whatever"), (b"accept", b"*/*")])
    assert name not in grouped


def test_headers_named_in_connection_are_dropped() -> None:
    # RFC 9110 §7.6.1
    _, grouped = _request_head(
        [(b"x-secret", b"1"), (b"x-keep", b"2")],
        conn_tokens=hdr.connection_tokens(b"close, X-Secret"),
    )
    assert b"x-secret" not in grouped
    assert grouped[b"x-keep"] == [b"2"]


def test_untrusted_peer_forwarding_headers_are_replaced() -> None:
    _, grouped = _request_head(
        [
            (b"x-forwarded-for", b"10.9.9.9"),
            (b"forwarded", b"for=10.9.9.9"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"evil"),
            (b"x-request-id", b"spoof"),
        ]
    )
    assert grouped[b"x-forwarded-for"] == [b"192.0.2.7"]
    assert grouped[b"x-forwarded-proto"] == [b"http"]
    assert grouped[b"x-forwarded-host"] == [b"api.example.com"]
    assert grouped[b"forwarded"] == [b"for=192.0.2.7;proto=http;host=api.example.com"]
    assert grouped[b"x-request-id"] == [b"rid-1"]


def test_trusted_peer_forwarding_headers_are_extended() -> None:
    _, grouped = _request_head(
        [
            (b"x-forwarded-for", b"203.0.113.1"),
            (b"forwarded", b"for=203.0.113.1"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"public.example"),
        ],
        peer_trusted=True,
    )
    assert grouped[b"x-forwarded-for"] == [b"203.0.113.1, 192.0.2.7"]
    assert grouped[b"x-forwarded-proto"] == [b"https"]
    assert grouped[b"x-forwarded-host"] == [b"public.example"]
    assert grouped[b"forwarded"] == [
        b"for=203.0.113.1, for=192.0.2.7;proto=http;host=api.example.com"
    ]


def test_forwarded_quotes_ipv6_and_host_with_port() -> None:
    # RFC 7239 §6: IPv6 nodes are bracketed and quoted; host:port is not a token.
    _, grouped = _request_head([], client_ip="2001:db8::1", host=b"example.com:8080")
    assert grouped[b"forwarded"] == [b'for="[2001:db8::1]";proto=http;host="example.com:8080"']


def test_upgrade_is_re_requested_on_the_upstream_hop() -> None:
    _, grouped = _request_head([(b"upgrade", b"websocket")], upgrade=b"websocket")
    assert grouped[b"connection"] == [b"upgrade"]
    assert grouped[b"upgrade"] == [b"websocket"]


def test_framing_header_is_ours() -> None:
    _, grouped = _request_head([(b"content-length", b"99")], framing=b"content-length: 5\r\n")
    assert grouped[b"content-length"] == [b"5"]


def test_response_head_drops_hop_by_hop_and_adds_request_id_and_close() -> None:
    parsed = hdr.parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nKeep-Alive: timeout=5\r\n"
        b"Connection: keep-alive, X-Private\r\nX-Private: 1\r\nTransfer-Encoding: chunked\r\n"
        b"X-Request-ID: upstream-id\r\nContent-Length: 3\r\nX-Other: kept\r\n"
    )
    assert parsed.reason == b"OK"
    assert parsed.content_length == b"3"
    assert parsed.chunked is True
    assert parsed.fields == b"Content-Type: text/plain\r\nX-Other: kept\r\n"
    head = hdr.build_response_head(
        200, parsed, request_id=b"rid-9", framing=b"content-length: 3\r\n", keep_alive=False
    )
    first, pairs = _parse_head(head)
    assert first == b"HTTP/1.1 200 OK"
    assert pairs == [
        (b"Content-Type", b"text/plain"),
        (b"X-Other", b"kept"),
        (b"x-request-id", b"rid-9"),
        (b"connection", b"close"),
        (b"content-length", b"3"),
    ]


@pytest.mark.parametrize(
    ("raw", "fields"),
    [
        (b"HTTP/1.1 204 No Content\r\n", b""),
        (b"HTTP/1.1 200 \r\nServer: x\r\n", b"Server: x\r\n"),
        (b"HTTP/1.1 200 OK\r\nTE: x\r\nTEST: kept\r\nTrailer: y\r\n", b"TEST: kept\r\n"),
        (b"HTTP/1.1 200 OK\r\nupgrade: h2c\r\nContent-Length:5\r\n", b""),
    ],
)
def test_parse_response_head_fields(raw: bytes, fields: bytes) -> None:
    assert hdr.parse_response_head(raw).fields == fields


def test_parse_response_head_values() -> None:
    parsed = hdr.parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: abc\r\n"
    )
    assert parsed.reason == b"Switching Protocols"
    assert parsed.upgrade == b"WebSocket"
    assert parsed.content_length is None
    assert parsed.chunked is False
    assert parsed.fields == b"Sec-WebSocket-Accept: abc\r\n"


def test_interim_head_keeps_end_to_end_fields() -> None:
    parsed = hdr.parse_response_head(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x\r\n"
    )
    assert hdr.interim_head(103, parsed) == (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    )


def test_connection_tokens_are_lowercased_and_trimmed() -> None:
    assert hdr.connection_tokens(b" Keep-Alive ,Upgrade,, X-Foo") == {
        b"keep-alive",
        b"upgrade",
        b"x-foo",
    }


def test_trusted_proxies_cidrs() -> None:
    trusted = hdr.TrustedProxies(["10.0.0.0/8", "::1/128"])
    assert "10.1.2.3" in trusted
    assert "::1" in trusted
    assert "11.0.0.1" not in trusted
    assert "not-an-ip" not in trusted
    assert "10.1.2.3" not in hdr.TrustedProxies([])


def test_request_ids_are_unique_and_valid() -> None:
    ids = hdr.RequestIds()
    seen = {ids.next() for _ in range(1000)}
    assert len(seen) == 1000
    assert all(hdr.valid_request_id(value) for value in seen)
    assert hdr.RequestIds().next() not in seen


def test_request_ids_are_a_random_prefix_and_a_hex_counter() -> None:
    ids = hdr.RequestIds()
    first, second = ids.next(), ids.next()
    for _ in range(8):
        tenth = ids.next()
    assert re.fullmatch(rb"[0-9a-f]{16}-1", first)
    assert second == first[:-1] + b"2"
    assert tenth == first[:-1] + b"a"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b"abc-123", True),
        (b"", False),
        (b"a b", False),
        (b"x" * 200, True),
        (b"x" * 201, False),
        (b"caf\xc3\xa9", False),
        (b"tab\there", False),
        # VCHAR is %x21-7E (RFC 5234 B.1): DEL, a trailing line end and NUL are not
        (b"!~", True),
        (b"x\x7f", False),
        (b"abc\n", False),
        (b"abc\r\n", False),
        (b"\x00", False),
        (b"x" * 199 + b" ", False),
    ],
)
def test_valid_request_id(value: bytes, valid: bool) -> None:
    assert hdr.valid_request_id(value) is valid


# -- parse_response_head against a line-by-line model ------------------------------------------


def _model_response_head(head: bytes) -> tuple[bytes, bytes, bytes | None, bool, bytes | None]:
    """The rules of parse_response_head spelt out one line at a time (slow and obvious)."""
    status_line, *lines = head[:-2].split(b"\r\n") if head.endswith(b"\r\n") else [head]
    parts = status_line.split(b" ", 2)
    reason = parts[2] if len(parts) > 2 else b""
    content_length: bytes | None = None
    chunked = False
    upgrade: bytes | None = None
    named: set[bytes] = set()
    for line in lines:
        name, _, value = line.partition(b":")
        lowered = name.lower()
        if lowered == b"content-length":
            content_length = value.strip()
        elif lowered == b"transfer-encoding":
            chunked = True
        elif lowered == b"upgrade":
            upgrade = value.strip()
        elif lowered == b"connection":
            named |= {token.strip().lower() for token in value.split(b",") if token.strip()}
    named -= {b"keep-alive", b"close", b"upgrade"}
    kept = [
        line + b"\r\n"
        for line in lines
        if line.partition(b":")[0].lower() not in hdr._RESPONSE_DROP | named
    ]
    return reason, b"".join(kept), content_length, chunked, upgrade


_RESPONSE_HEADS = [
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200\r\n",
    b"HTTP/1.1 200 \r\n",
    b"HTTP/1.1 404 Not Found Here\r\nServer: x\r\n",
    # the usual backend response: Content-Length and Connection go, the rest stays as spelt
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
    b"Connection: keep-alive\r\n",
    b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH:  12 \r\nconnection:close\r\nX-A: 1\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive \r\nContent-Length: 0\r\n",
    # RFC 9110 §7.6.1: hop-by-hop fields, and those named in Connection, are not forwarded
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: trailers\r\n"
    b"Trailer: X-T\r\nProxy-Authenticate: Basic\r\nProxy-Authorization: y\r\nX-Kept: 1\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nX-P: kept\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: X-One\r\nConnection: X-Two\r\nX-One: 1\r\nX-Two: 2\r\n"
    b"X-Three: 3\r\n",
    # RFC 9112 §6.1: chunked framing; the gateway writes its own framing line
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nVary: Accept\r\n",
    # RFC 9110 §7.8: the upgraded protocol keeps its spelling
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n",
    # names that only start like a hop-by-hop name are end-to-end
    b"HTTP/1.1 200 OK\r\nTEST: 1\r\nTrailers: 2\r\nUpgrade-Insecure: 3\r\nConnection2: 4\r\n"
    b"X-Request-Idx: 5\r\nContent-Lengths: 6\r\n",
    # the gateway sets its own X-Request-ID
    b"HTTP/1.1 200 OK\r\nX-Request-ID: upstream\r\nContent-Length: 1\r\n",
    # a value that mentions a hop-by-hop name is not a line that starts with one
    b"HTTP/1.1 200 OK\r\nLink: <x>; rel=connection: y\r\nX-V: content-length: 3\r\n",
]


@pytest.mark.parametrize("raw", _RESPONSE_HEADS)
def test_parse_response_head_matches_the_line_model(raw: bytes) -> None:
    parsed = hdr.parse_response_head(raw)
    got = (parsed.reason, parsed.fields, parsed.content_length, parsed.chunked, parsed.upgrade)
    assert got == _model_response_head(raw)


def test_response_drop_trie_is_the_drop_set() -> None:
    # The scan's trie of names must stay the same set as _RESPONSE_DROP.
    lines = b"".join(name + b": v\r\n" for name in sorted(hdr._RESPONSE_DROP))
    head = b"HTTP/1.1 200 OK\r\n" + lines + b"X-Kept: 1\r\n"
    assert hdr.parse_response_head(head).fields == b"X-Kept: 1\r\n"
    assert hdr.parse_response_head(head.upper()).fields == b"X-KEPT: 1\r\n"
