"""gRPC-Web, sans IO: the ``grpc_web`` filter's request rewrite and config entry, and the
translation helpers of gateway/proxy/h2/from_h1.py (streamed base64 both ways, the trailer
frame, content types), per the gRPC-Web protocol (grpc/grpc PROTOCOL-WEB.md)."""

from __future__ import annotations

import base64
import os

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.filters.grpc_web import GRPC_WEB_VAR, grpc_content_type
from gateway.proxy.h2.from_h1 import (
    Base64Stream,
    grpc_web_content_type,
    grpc_web_trailer_frame,
)
from tests.filters_support import filter_from_yaml, header, request


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"application/grpc-web", (b"application/grpc", "binary")),
        (b"application/grpc-web+proto", (b"application/grpc+proto", "binary")),
        (b"application/grpc-web-text", (b"application/grpc", "text")),
        (b"application/grpc-web-text+proto", (b"application/grpc+proto", "text")),
        (b"Application/GRPC-Web+json; charset=utf-8", (b"application/grpc+json", "binary")),
        (b"application/grpc", None),  # plain gRPC: left alone
        (b"application/grpc-webfoo", None),
        (b"application/json", None),
    ],
)
def test_grpc_content_type(content_type: bytes, expected: tuple[bytes, str] | None) -> None:
    assert grpc_content_type(content_type) == expected


def test_filter_rewrites_a_grpc_web_request() -> None:
    web = filter_from_yaml("grpc_web: {}")
    req = request(
        "POST",
        "/pkg.Svc/Call",
        headers=[
            (b"content-type", b"application/grpc-web-text+proto"),
            (b"content-length", b"12"),
            (b"te", b"gzip"),
        ],
    )
    assert web.on_request_headers(req) is None
    assert header(req.headers, b"content-type") == b"application/grpc+proto"
    assert header(req.headers, b"te") == b"trailers"
    assert header(req.headers, b"content-length") is None  # decoded: another length
    assert req.vars[GRPC_WEB_VAR] == "application/grpc-web-text+proto"


def test_filter_keeps_the_length_of_a_binary_body() -> None:
    web = filter_from_yaml("grpc_web: {}")
    req = request(
        "POST",
        "/pkg.Svc/Call",
        headers=[(b"content-type", b"application/grpc-web"), (b"content-length", b"12")],
    )
    web.on_request_headers(req)
    assert header(req.headers, b"content-length") == b"12"
    assert req.vars[GRPC_WEB_VAR] == "application/grpc-web"


@pytest.mark.parametrize(
    "headers", [[], [(b"content-type", b"application/json")], [(b"content-type", b"text/plain")]]
)
def test_filter_leaves_other_requests_alone(headers: list[tuple[bytes, bytes]]) -> None:
    web = filter_from_yaml("grpc_web: {}")
    req = request("POST", "/x", headers=headers)
    web.on_request_headers(req)
    assert req.headers == headers
    assert GRPC_WEB_VAR not in req.vars


def test_config_entry_takes_no_options() -> None:
    config = load_config_text("filters:\n  - grpc_web:\n")
    assert config.filters[0].kind == "grpc_web"
    with pytest.raises(ConfigInvalid) as info:
        load_config_text("filters:\n  - grpc_web: {text: true}\n", "gw.yaml")
    (error,) = [e for e in info.value.errors if e.path.startswith("filters[0].grpc_web")]
    assert error.line == 2 and "text" in error.path + error.message


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 7, 64, 1000])
def test_base64_encoding_streams_in_any_split(split: int) -> None:
    data = os.urandom(1001)
    encoder = Base64Stream(decoding=False)
    out = b"".join(encoder.feed(data[i : i + split]) for i in range(0, len(data), split))
    out += encoder.end()
    assert out == base64.b64encode(data)


@pytest.mark.parametrize("split", [1, 3, 4, 5, 9, 100])
def test_base64_decoding_streams_in_any_split(split: int) -> None:
    data = os.urandom(700)
    # Two padded segments back to back (one per message) and line breaks are accepted.
    encoded = base64.b64encode(data[:100]) + b"\r\n" + base64.b64encode(data[100:])
    decoder = Base64Stream(decoding=True)
    out = b"".join(decoder.feed(encoded[i : i + split]) for i in range(0, len(encoded), split))
    out += decoder.end()
    assert out == data


@pytest.mark.parametrize("encoded", [b"QUJD*A==", b"QUJDRA", b"QQ==QUJ"])
def test_base64_decoding_refuses_malformed_input(encoded: bytes) -> None:
    decoder = Base64Stream(decoding=True)
    with pytest.raises(ValueError):  # binascii.Error is a ValueError
        decoder.feed(encoded)
        decoder.end()


def test_trailer_frame() -> None:
    frame = grpc_web_trailer_frame(
        [(b"grpc-status", b"0"), (b"grpc-message", b""), (b"x-bad", b"a\r\nb")]
    )
    block = b"grpc-status: 0\r\ngrpc-message: \r\n"  # a value with CR/LF is left out
    assert frame == b"\x80" + len(block).to_bytes(4, "big") + block


@pytest.mark.parametrize(
    ("upstream", "client", "expected"),
    [
        (
            b"application/grpc",
            "application/grpc-web-text+proto",
            b"application/grpc-web-text+proto",
        ),
        (b"application/grpc+proto", "application/grpc-web", b"application/grpc-web"),
        (b"text/plain", "application/grpc-web", b"text/plain"),  # not a gRPC answer
    ],
)
def test_response_content_type(upstream: bytes, client: str, expected: bytes) -> None:
    assert grpc_web_content_type(upstream, client) == expected
