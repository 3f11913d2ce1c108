"""gateway/proxy/grpc.py against the gRPC protocol documents, table by table.

[proto] is gRPC's "gRPC over HTTP2" (PROTOCOL-HTTP2.md); [mapping] is its "HTTP to gRPC Status
Code Mapping" (http-grpc-status-mapping.md)."""

from __future__ import annotations

import pytest

from gateway.proxy.grpc import (
    GRPC_CODE_LABELS,
    GrpcStatus,
    GrpcTimeoutError,
    decode_grpc_message,
    encode_grpc_message,
    gateway_error_status,
    grpc_code_label,
    grpc_web_client_type,
    grpc_web_error,
    http_to_grpc_status,
    is_grpc,
    parse_grpc_timeout,
    request_deadline,
    trailers_only,
)

# [proto] "Requests": Timeout = "grpc-timeout" TimeoutValue TimeoutUnit;
# TimeoutValue = at most 8 ASCII digits; TimeoutUnit = H / M / S / m / u / n.
VALID_TIMEOUTS = [
    (b"1H", 3600.0),
    (b"2M", 120.0),
    (b"30S", 30.0),
    (b"250m", 0.25),
    (b"1500u", 0.0015),
    (b"1000000n", 0.001),
    (b"99999999S", 99999999.0),  # 8 digits, the most allowed
    (b"00000001m", 0.001),  # leading zeros are still digits
    (b"0m", 0.0),  # zero: accepted as grpc-go/grpc-java do (an expired deadline)
    ("5S", 5.0),  # str as well as bytes
]

INVALID_TIMEOUTS = [
    b"",  # no value
    b"S",  # no digits
    b"10",  # no unit
    b"123456789S",  # 9 digits
    b"1s",  # units are case-sensitive: s is not a unit
    b"1h",
    b"1.5S",  # integers only
    b"-1S",
    b"+1S",
    b" 1S",  # no whitespace in the grammar
    b"1S ",
    b"1 S",
    b"1SS",
    b"0x10S",
    "\u0661S",  # a non-ASCII digit (ARABIC-INDIC ONE)
]


@pytest.mark.parametrize(("raw", "seconds"), VALID_TIMEOUTS)
def test_grpc_timeout_parses(raw: bytes | str, seconds: float) -> None:
    assert parse_grpc_timeout(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", INVALID_TIMEOUTS)
def test_grpc_timeout_rejects_malformed(raw: bytes | str) -> None:
    with pytest.raises(GrpcTimeoutError, match="grpc-timeout"):
        parse_grpc_timeout(raw)


@pytest.mark.parametrize(
    ("header", "route_timeout", "deadline"),
    [
        (None, None, None),  # neither: no deadline
        (None, 15.0, 15.0),  # the route's timeout alone
        (b"5S", None, 5.0),  # the client's alone
        (b"5S", 15.0, 5.0),  # the shorter wins: the client's
        (b"1M", 15.0, 15.0),  # the shorter wins: the route caps the client
        (b"15S", 15.0, 15.0),
    ],
)
def test_request_deadline_is_grpc_timeout_capped_by_route(
    header: bytes | None, route_timeout: float | None, deadline: float | None
) -> None:
    assert request_deadline(header, route_timeout) == deadline


def test_request_deadline_rejects_a_malformed_header() -> None:
    with pytest.raises(GrpcTimeoutError):
        request_deadline(b"soon", 10.0)


# The table for errors the gateway makes, and what the gRPC libraries call the rest.
GATEWAY_ERRORS = [
    (404, GrpcStatus.UNIMPLEMENTED),  # no route for /package.Service/Method
    (429, GrpcStatus.RESOURCE_EXHAUSTED),  # rate limited
    (503, GrpcStatus.UNAVAILABLE),  # no healthy instance, circuit open
    (504, GrpcStatus.DEADLINE_EXCEEDED),  # upstream timeout
    (502, GrpcStatus.UNAVAILABLE),  # upstream failed
    (401, GrpcStatus.UNAUTHENTICATED),
    (403, GrpcStatus.PERMISSION_DENIED),
    (400, GrpcStatus.INTERNAL),  # [mapping]
    (408, GrpcStatus.DEADLINE_EXCEEDED),
    (413, GrpcStatus.RESOURCE_EXHAUSTED),  # message larger than allowed
    (431, GrpcStatus.RESOURCE_EXHAUSTED),
    (500, GrpcStatus.INTERNAL),
    (405, GrpcStatus.UNKNOWN),  # anything else
    (418, GrpcStatus.UNKNOWN),
]


@pytest.mark.parametrize(("http_status", "grpc_status"), GATEWAY_ERRORS)
def test_gateway_error_status(http_status: int, grpc_status: GrpcStatus) -> None:
    assert gateway_error_status(http_status) is grpc_status


# [mapping]: an HTTP response that is not gRPC, as a gRPC client maps it.
HTTP_MAPPING = [
    (400, GrpcStatus.INTERNAL),
    (401, GrpcStatus.UNAUTHENTICATED),
    (403, GrpcStatus.PERMISSION_DENIED),
    (404, GrpcStatus.UNIMPLEMENTED),
    (429, GrpcStatus.UNAVAILABLE),
    (502, GrpcStatus.UNAVAILABLE),
    (503, GrpcStatus.UNAVAILABLE),
    (504, GrpcStatus.UNAVAILABLE),
    (500, GrpcStatus.UNKNOWN),  # "all other codes": UNKNOWN
    (302, GrpcStatus.UNKNOWN),
]


@pytest.mark.parametrize(("http_status", "grpc_status"), HTTP_MAPPING)
def test_http_to_grpc_status_follows_the_mapping_document(
    http_status: int, grpc_status: GrpcStatus
) -> None:
    assert http_to_grpc_status(http_status) is grpc_status


# [proto] "Responses": Percent-Byte-Unencoded = 1*( %x20-%x24 / %x26-%x7E ); everything else,
# of the message's UTF-8 bytes, is "%" 2HEXDIGIT.
MESSAGES = [
    ("no route", b"no route"),
    ("100% sure", b"100%25 sure"),  # % itself is encoded
    ("line\nbreak", b"line%0Abreak"),  # controls are encoded
    ("tab\there", b"tab%09here"),
    ("caf\u00e9", b"caf%C3%A9"),  # UTF-8 bytes, each encoded
    ("\u2603", b"%E2%98%83"),
    ("~!$&'()*+,;=:@/?#[]", b"~!$&'()*+,;=:@/?#[]"),  # VCHAR other than % stays
    ("\x7f", b"%7F"),  # DEL is not VCHAR
    (" ", b" "),  # space (0x20) stays
    ("", b""),
]


@pytest.mark.parametrize(("message", "encoded"), MESSAGES)
def test_grpc_message_percent_encoding(message: str, encoded: bytes) -> None:
    assert encode_grpc_message(message) == encoded
    assert decode_grpc_message(encoded) == message


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (b"50%", "50%"),  # a truncated escape stays as it is
        (b"%zz", "%zz"),  # not hex
        (b"%4", "%4"),
        (b"%c3", "\ufffd"),  # half a UTF-8 sequence: replaced, not an error
        (b"%41%42", "AB"),  # lower/upper hex both decode
        (b"%e2%98%83", "\u2603"),
    ],
)
def test_grpc_message_decoding_is_lenient(raw: bytes, decoded: str) -> None:
    assert decode_grpc_message(raw) == decoded


def test_trailers_only_response() -> None:
    # [proto] "Responses": Trailers-Only = HTTP-Status Content-Type Trailers, in one HEADERS.
    headers = trailers_only(
        GrpcStatus.UNIMPLEMENTED, "no route for /pkg.Svc/Do", [(b"x-request-id", b"abc")]
    )
    assert headers == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"12"),
        (b"grpc-message", b"no route for /pkg.Svc/Do"),
        (b"x-request-id", b"abc"),
    ]
    assert trailers_only(GrpcStatus.OK) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"0"),
    ]


@pytest.mark.parametrize(
    ("content_type", "grpc"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc+json", True),
        (b"application/grpc; charset=utf-8", True),
        (b"Application/GRPC", True),  # media types are case-insensitive (RFC 9110 §8.3.1)
        ("application/grpc", True),
        (b"application/grpc-web", False),  # gRPC-Web is another protocol
        (b"application/grpc-web+proto", False),
        (b"application/grpcx", False),
        (b"application/json", False),
        (b"", False),
        (None, False),
    ],
)
def test_is_grpc(content_type: bytes | str | None, grpc: bool) -> None:
    assert is_grpc(content_type) is grpc


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (b"0", "OK"),
        (b"14", "UNAVAILABLE"),
        (b"16", "UNAUTHENTICATED"),
        ("4", "DEADLINE_EXCEEDED"),
        (12, "UNIMPLEMENTED"),
        (None, "UNKNOWN"),  # a response that ended without grpc-status
        (b"17", "INVALID"),  # not a code: bounded, not echoed
        (b"-1", "INVALID"),
        (b"014", "INVALID"),
        (b"OK", "INVALID"),
        (b"9" * 40, "INVALID"),
        (99, "INVALID"),
    ],
)
def test_grpc_code_label(value: bytes | str | int | None, label: str) -> None:
    assert grpc_code_label(value) == label
    assert label in GRPC_CODE_LABELS


def test_grpc_code_labels_are_bounded() -> None:
    assert len(GRPC_CODE_LABELS) == 18 and len(set(GRPC_CODE_LABELS)) == 18


# -- gRPC-Web errors ---------------------------------------------------------------------------


WEB = b"application/grpc-web"


@pytest.mark.parametrize(
    ("name", "value", "marked", "expected"),
    [
        (b"content-type", WEB, None, WEB),
        (b"content-type", b"Application/gRPC-Web+proto; x=1", None, WEB + b"+proto"),
        (b"content-type", WEB + b"-text", None, WEB + b"-text"),
        (b"Content-Type", WEB + b"-text+json", None, WEB + b"-text+json"),
        (b"content-type", WEB + b"foo", None, None),
        (b"content-type", b"application/grpc", None, None),
        (b"content-type", b"application/json", None, None),
        (b"accept", WEB, None, None),
        # The grpc_web filter rewrote the header; its mark is what the client sent.
        (b"content-type", b"application/grpc", "application/grpc-web-text", WEB + b"-text"),
    ],
)
def test_grpc_web_client_type(
    name: bytes, value: bytes, marked: str | None, expected: bytes | None
) -> None:
    assert grpc_web_client_type([(name, value)], marked) == expected


def test_grpc_web_error_is_trailers_only() -> None:
    head = grpc_web_error(
        b"application/grpc-web-text",
        429,
        "rate limit exceeded: 100%",
        b"rid",
        keep_alive=False,
        http10=False,
        extra_headers=b"retry-after: 1\r\n",
    )
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert head.endswith(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in lines[1:] if line)
    assert fields == {
        b"content-length": b"0",
        b"grpc-status": b"8",  # RESOURCE_EXHAUSTED
        b"grpc-message": b"rate limit exceeded: 100%25",
        b"connection": b"close",
        b"retry-after": b"1",
        b"content-type": b"application/grpc-web-text",
        b"x-request-id": b"rid",
    }
