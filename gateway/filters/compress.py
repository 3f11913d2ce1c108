"""``compress``: response bodies compressed with zstd, Brotli or gzip, chunk by chunk.

The coding is chosen from the request's ``Accept-Encoding`` (RFC 9110 §12.5.3): the highest
q-value among the configured ``algorithms``, ties broken by their order; ``*`` covers codings
not named; ``q=0`` refuses one. Responses are left alone when they are already encoded, carry
``Cache-Control: no-transform`` (RFC 9111 §5.2.2.6), answer HEAD, are 1xx/204/206/304, are
not of a listed media type, or say (Content-Length) they are smaller than ``min_bytes``.

A compressed response loses Content-Length (the data plane re-frames it) and Accept-Ranges,
gets a weak ETag (the bytes differ from the identity representation's, RFC 9110 §8.8.1), and
every compressible response gets ``Vary: Accept-Encoding``, the uncompressed ones too, so a
shared cache keeps both variants apart. Each chunk goes through a streaming compressor: no
response is ever held whole.
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import brotli
import zstandard

from gateway.filters.base import Filter, ResponseInfo

__all__ = ["CompressFilter", "choose_encoding"]


class _Compressor(Protocol):
    def compress(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Gzip:
    __slots__ = ("_z",)

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk)

    def finish(self) -> bytes:
        return self._z.flush()


class _Brotli:
    __slots__ = ("_b",)

    def __init__(self, quality: int) -> None:
        self._b = brotli.Compressor(quality=quality)

    def compress(self, chunk: bytes) -> bytes:
        out: bytes = self._b.process(chunk)
        return out

    def finish(self) -> bytes:
        out: bytes = self._b.finish()
        return out


class _Zstd:
    """A stream on a pooled ZstdCompressor: making one costs ~35 µs (its context), a stream
    on an existing one ~1 µs. A compressor serves one stream at a time; it goes back to the
    pool when its stream ends (a response cut short just drops it)."""

    __slots__ = ("_compressor", "_pool", "_z")

    def __init__(self, pool: list[zstandard.ZstdCompressor], level: int) -> None:
        self._pool = pool
        self._compressor = pool.pop() if pool else zstandard.ZstdCompressor(level=level)
        self._z = self._compressor.compressobj()

    def compress(self, chunk: bytes) -> bytes:
        return self._z.compress(chunk)

    def finish(self) -> bytes:
        out = self._z.flush()
        if len(self._pool) < _POOL_SIZE:
            self._pool.append(self._compressor)
        return out


_POOL_SIZE = 64


_Q = re.compile(r"^q=([0-9](?:\.[0-9]{0,3})?)$", re.IGNORECASE)


def parse_accept_encoding(value: str) -> dict[str, float]:
    """coding -> q-value (RFC 9110 §12.5.3; a malformed weight counts as q=0)."""
    weights: dict[str, float] = {}
    for item in value.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        coding = coding.lower()
        if not coding:
            continue
        q = 1.0
        for param in params:
            match = _Q.match(param.replace(" ", ""))
            if param.lower().startswith("q"):
                q = min(float(match.group(1)), 1.0) if match else 0.0
        if coding == "x-gzip":  # §8.4.1.3: x-gzip is gzip
            coding = "gzip"
        weights[coding] = max(q, weights.get(coding, 0.0)) if coding in weights else q
    return weights


def choose_encoding(accept_encoding: str | None, offered: Sequence[str]) -> str | None:
    """The coding to use, or None (identity)."""
    if not accept_encoding:
        return None
    weights = parse_accept_encoding(accept_encoding)
    wildcard = weights.get("*", 0.0)
    best, best_q = None, 0.0
    for coding in offered:
        q = weights.get(coding, wildcard)
        if q > best_q:
            best, best_q = coding, q
    return best


def _media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def _add_vary(headers: list[tuple[bytes, bytes]], token: bytes) -> None:
    for name, value in headers:
        if name == b"vary":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if token.lower() in tokens or b"*" in tokens:
                return
    headers.append((b"vary", token))


class CompressFilter(Filter):
    name = "compress"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.algorithms = tuple(options.get("algorithms") or ("zstd", "br", "gzip"))
        self.min_bytes = int(options.get("min_bytes", 1024))
        patterns = options.get("content_types") or ("text/*", "application/json")
        self.exact_types = frozenset(p.lower() for p in patterns if "*" not in p)
        self.type_patterns = tuple(p.lower() for p in patterns if "*" in p)
        self.gzip_level = int(options.get("gzip_level", 6))
        self.brotli_quality = int(options.get("brotli_quality", 4))
        self.zstd_level = int(options.get("zstd_level", 3))
        self._type_cache: dict[str, bool] = {}
        self._zstd_pool: list[zstandard.ZstdCompressor] = []
        # request.vars key of a response's compressor: one per filter, so that a second
        # compress filter in a chain (global and route) never reads the first one's.
        self._state = f"_compress.{id(self)}"

    def compressible_type(self, media_type: str) -> bool:
        known = self._type_cache.get(media_type)
        if known is None:
            known = media_type in self.exact_types or any(
                fnmatch.fnmatchcase(media_type, p) for p in self.type_patterns
            )
            if len(self._type_cache) < 256:
                self._type_cache[media_type] = known
        return known

    def _compressor(self, coding: str) -> _Compressor:
        if coding == "gzip":
            return _Gzip(self.gzip_level)
        if coding == "br":
            return _Brotli(self.brotli_quality)
        return _Zstd(self._zstd_pool, self.zstd_level)

    def on_response_headers(self, response: ResponseInfo) -> None:
        status = response.status
        request = response.request
        if status < 200 or status in (204, 206, 304) or request.method == "HEAD":
            return
        headers = response.headers
        content_type = content_length = etag = None
        for name, value in headers:
            if name == b"content-encoding":
                if value.strip().lower() != b"identity":
                    return  # already encoded
            elif name == b"cache-control":
                if b"no-transform" in value.lower():
                    return
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
            elif name == b"etag":
                etag = value
        if content_type is None or not self.compressible_type(_media_type(content_type)):
            return
        if content_length is not None:
            try:
                if int(content_length) < self.min_bytes:
                    return
            except ValueError:
                return
        _add_vary(headers, b"Accept-Encoding")
        accept = None
        for name, value in request.headers:
            if name == b"accept-encoding":
                text = value.decode("latin-1")
                accept = text if accept is None else accept + "," + text
        coding = choose_encoding(accept, self.algorithms)
        if coding is None:
            return
        drop = (b"content-length", b"content-encoding", b"accept-ranges", b"etag")
        headers[:] = [item for item in headers if item[0] not in drop]
        headers.append((b"content-encoding", coding.encode("ascii")))
        if etag is not None:
            headers.append((b"etag", etag if etag.startswith(b"W/") else b"W/" + etag))
        request.vars[self._state] = self._compressor(coding)

    def on_response_body(self, response: ResponseInfo, chunk: bytes, end: bool) -> bytes:
        compressor: _Compressor | None = response.request.vars.get(self._state)
        if compressor is None:
            return chunk
        out = compressor.compress(chunk) if chunk else b""
        if end:
            del response.request.vars[self._state]
            out += compressor.finish()
        return out
