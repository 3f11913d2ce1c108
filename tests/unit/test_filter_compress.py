"""The compress filter: Accept-Encoding negotiation (RFC 9110 §12.5.3), which responses are
left alone, header changes (Vary, weak ETag, no Content-Length), and streamed bodies that the
real decompressors (zlib, brotli, zstandard) read back."""

from __future__ import annotations

import os
import zlib

import brotli
import pytest
import zstandard

from gateway.filters.api import Headers
from gateway.filters.chain import Chain
from gateway.filters.compress import choose_encoding
from tests.filters_support import filter_from_yaml, header, request, response

OFFERED = ("zstd", "br", "gzip")


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, None),  # no header: identity
        ("", None),
        ("gzip", "gzip"),
        ("gzip, br", "br"),  # equal q: the gateway's order
        ("gzip;q=1.0, br;q=0.5", "gzip"),
        ("br;q=0, gzip", "gzip"),  # q=0: not acceptable
        ("*", "zstd"),
        ("*;q=0.1, gzip;q=0.5", "gzip"),
        ("*, zstd;q=0", "br"),
        ("identity", None),
        ("x-gzip", "gzip"),  # §8.4.1.3
        ("GZIP;Q=0.8", "gzip"),  # case-insensitive
        ("gzip;q=2", "gzip"),  # out of range: read as at most 1
        ("gzip;q=abc", None),  # malformed weight: not acceptable
        ("deflate, compress", None),
        ("gzip ; q=0.5 , br ; q=0.4", "gzip"),  # OWS around ';'
    ],
)
def test_accept_encoding(accept: str | None, chosen: str | None) -> None:
    assert choose_encoding(accept, OFFERED) == chosen


DECOMPRESS = {
    "gzip": lambda data: zlib.decompress(data, 31),
    "br": brotli.decompress,
    "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
}


def _run(
    accept: str | None,
    headers: Headers,
    chunks: list[bytes],
    *,
    method: str = "GET",
    status: int = 200,
    options: str = "{min_bytes: 100}",
) -> tuple[Headers, bytes]:
    chain = Chain("r", [filter_from_yaml(f"compress: {options}")])
    req = request(method, headers=[(b"accept-encoding", accept.encode())] if accept else [])
    resp = response(req, status, headers)
    chain.on_response_headers(resp)
    out = b"".join(
        chain.on_response_body(resp, chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks)
    )
    return resp.headers, out


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_streamed_bodies_decompress_to_the_original(coding: str) -> None:
    body = [b'{"n": %d, "pad": "%s"}\n' % (i, os.urandom(8).hex().encode()) for i in range(500)]
    headers, out = _run(
        coding,
        [(b"content-type", b"application/json"), (b"content-length", b"99999"), (b"etag", b'"v1"')],
        [*body, b""],  # the data plane's last call may carry no bytes
    )
    assert header(headers, b"content-encoding") == coding.encode()
    assert header(headers, b"content-length") is None
    assert header(headers, b"etag") == b'W/"v1"'
    assert header(headers, b"vary") == b"Accept-Encoding"
    assert DECOMPRESS[coding](out) == b"".join(body)
    assert len(out) < len(b"".join(body))


def test_each_chunk_is_compressed_as_it_comes() -> None:
    chain = Chain("r", [filter_from_yaml("compress: {min_bytes: 0, gzip_level: 1}")])
    req = request(headers=[(b"accept-encoding", b"gzip")])
    resp = response(req, 200, [(b"content-type", b"text/plain")])
    chain.on_response_headers(resp)
    produced = 0
    for _ in range(64):  # 4 MiB of incompressible data: output must flow before the end
        produced += len(chain.on_response_body(resp, os.urandom(65536), False))
    assert produced > 2 * 1024 * 1024
    chain.on_response_body(resp, b"", True)
    assert "_compress" not in req.vars


@pytest.mark.parametrize(
    ("accept", "headers", "method", "status", "why"),
    [
        (
            "gzip",
            [(b"content-type", b"text/html"), (b"content-encoding", b"br")],
            "GET",
            200,
            "encoded",
        ),
        ("gzip", [(b"content-type", b"image/png")], "GET", 200, "type"),
        (
            "gzip",
            [(b"content-type", b"text/html"), (b"content-length", b"50")],
            "GET",
            200,
            "small",
        ),
        (
            "gzip",
            [(b"content-type", b"text/html"), (b"cache-control", b"no-transform")],
            "GET",
            200,
            "no-transform",
        ),
        ("gzip", [(b"content-type", b"text/html")], "HEAD", 200, "head"),
        ("gzip", [(b"content-type", b"text/html")], "GET", 204, "204"),
        ("gzip", [(b"content-type", b"text/html")], "GET", 206, "partial"),
        ("gzip", [(b"content-type", b"text/html")], "GET", 304, "304"),
        ("gzip", [], "GET", 200, "no content-type"),
    ],
)
def test_left_alone(accept: str, headers: Headers, method: str, status: int, why: str) -> None:
    out_headers, out = _run(accept, list(headers), [b"x" * 500, b""], method=method, status=status)
    assert out_headers == headers, why
    assert out == b"x" * 500


def test_not_accepted_still_varies() -> None:
    headers, out = _run(
        "identity", [(b"content-type", b"text/css; charset=utf-8")], [b"a" * 500, b""]
    )
    assert header(headers, b"content-encoding") is None
    assert header(headers, b"vary") == b"Accept-Encoding"
    assert out == b"a" * 500


def test_vary_is_merged_not_duplicated() -> None:
    headers, _ = _run(
        "gzip",
        [(b"content-type", b"text/plain"), (b"vary", b"Origin, accept-encoding")],
        [b"a" * 500, b""],
    )
    assert [v for n, v in headers if n == b"vary"] == [b"Origin, accept-encoding"]


@pytest.mark.parametrize(
    ("content_type", "compressed"),
    [
        (b"application/problem+json", True),  # application/*+json
        (b"text/event-stream", True),  # text/*
        (b"application/octet-stream", False),
        (b"APPLICATION/JSON; charset=utf-8", True),
    ],
)
def test_content_type_patterns(content_type: bytes, compressed: bool) -> None:
    headers, _ = _run("gzip", [(b"content-type", content_type)], [b"a" * 500, b""])
    assert (header(headers, b"content-encoding") is not None) == compressed


def test_two_compress_filters_in_one_chain_compress_once() -> None:
    chain = Chain(
        "r",
        [
            filter_from_yaml("compress: {min_bytes: 0}"),
            filter_from_yaml("compress: {min_bytes: 0}"),
        ],
    )
    req = request(headers=[(b"accept-encoding", b"gzip")])
    resp = response(req, 200, [(b"content-type", b"text/plain")])
    chain.on_response_headers(resp)
    out = chain.on_response_body(resp, b"hello " * 100, False) + chain.on_response_body(
        resp, b"", True
    )
    assert [v for n, v in resp.headers if n == b"content-encoding"] == [b"gzip"]
    assert zlib.decompress(out, 31) == b"hello " * 100
