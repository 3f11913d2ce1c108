"""HTTP/2 request and response header sections ↔ HTTP/1.1 heads (pure functions, no IO).

One pass over a decoded header list checks what RFC 9113 requires of a request (§8.2, §8.3)
and builds the HTTP/1.1 head the existing data plane parses. Anything malformed raises
``MalformedRequest``; the server answers it with RST_STREAM PROTOCOL_ERROR, a stream error as
§8.1.1 says (the header block was decoded whole, so the HPACK state stays consistent and the
connection lives on).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from hpack import NeverIndexedHeaderTuple

# RFC 9113 §8.2.2: connection-specific fields MUST NOT appear in HTTP/2 ("te" only as
# "te: trailers").
CONNECTION_SPECIFIC: frozenset[bytes] = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
# RFC 9110 §5.1 token, lower case only (RFC 9113 §8.2.1: upper case in a name is malformed).
_NAME_OK = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+\Z").match
# RFC 9113 §8.2.1: no NUL, CR or LF in a value, no leading or trailing SP/HTAB.
_VALUE_BAD = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z").search
_METHOD_OK = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z").match
_DIGITS = re.compile(rb"[0-9]{1,18}\Z").match
_SCHEMES = frozenset({b"http", b"https"})


# Connection and stream errors by reason, per process. Not exported yet: gateway/metrics.py is
# being reworked by its owner; the follow-up is gateway_http2_errors_total{reason}
# (docs/http2.md).
ERRORS: dict[str, int] = {}


def count_error(reason: str) -> None:
    ERRORS[reason] = ERRORS.get(reason, 0) + 1


class MalformedRequest(Exception):
    """A request header section RFC 9113 calls malformed (stream error PROTOCOL_ERROR)."""


class RequestHead:
    """What the bridge needs of one HTTP/2 request: its HTTP/1.1 head and body framing."""

    __slots__ = ("content_length", "head", "is_head", "method", "path")

    def __init__(self, method: bytes, path: bytes, head: bytes, content_length: int | None) -> None:
        self.method = method
        self.path = path
        self.head = head
        self.is_head = method == b"HEAD"
        # None: no content-length; the body (if any) goes upstream-side as chunked.
        self.content_length = content_length


def request_head(headers: Iterable[tuple[bytes, bytes]], end_stream: bool) -> RequestHead:
    """Validate a request header list and build the HTTP/1.1 request head for it.

    ``end_stream``: the HEADERS frame ended the stream (no body follows). The head ends with
    ``connection: close`` so that the HTTP/1.1 machinery ends its exchange by closing the
    (in-memory) connection, which is how the bridge learns the stream is done.
    """
    method = scheme = path = authority = None
    host: bytes | None = None
    content_length: bytes | None = None
    cookies: list[bytes] | None = None
    fields: list[bytes] = []
    regular_seen = False
    for name, value in headers:
        if name[:1] == b":":
            # §8.3: pseudo-header fields come first, once each, and only the defined ones.
            if regular_seen:
                raise MalformedRequest(f"pseudo-header {name!r} after a regular field")
            if name == b":method":
                if method is not None:
                    raise MalformedRequest("duplicate :method")
                method = value
            elif name == b":scheme":
                if scheme is not None:
                    raise MalformedRequest("duplicate :scheme")
                scheme = value
            elif name == b":path":
                if path is not None:
                    raise MalformedRequest("duplicate :path")
                path = value
            elif name == b":authority":
                if authority is not None:
                    raise MalformedRequest("duplicate :authority")
                authority = value
            else:
                # :status is a response field; :protocol needs SETTINGS_ENABLE_CONNECT_PROTOCOL
                # (RFC 8441), which is not offered.
                raise MalformedRequest(f"pseudo-header {name!r} not allowed in a request")
            continue
        regular_seen = True
        if not _NAME_OK(name):
            raise MalformedRequest(f"invalid field name {name!r}")
        if value and _VALUE_BAD(value):
            raise MalformedRequest(f"invalid value of field {name!r}")
        if name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific field {name!r}")
        if name == b"te":
            if value.lower() != b"trailers":
                raise MalformedRequest("te other than 'trailers'")
            continue  # hop-by-hop toward the upstream anyway
        if name == b"cookie":
            # §8.2.3: cookie crumbs may arrive as separate fields; rejoined with "; ".
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise MalformedRequest("duplicate host")
            host = value
            continue
        if name == b"content-length":
            if content_length is not None or not _DIGITS(value):
                raise MalformedRequest("invalid content-length")
            content_length = value
        fields.append(b"%s: %s\r\n" % (name, value))
    if method is None:
        raise MalformedRequest("missing :method")
    if not _METHOD_OK(method):
        raise MalformedRequest("invalid :method")
    if method == b"CONNECT":
        # §8.5: CONNECT carries only :method and :authority; the gateway tunnels nothing.
        raise MalformedRequest("CONNECT is not supported")
    if scheme is None or path is None:
        raise MalformedRequest("missing :scheme or :path")  # §8.3.1
    if scheme not in _SCHEMES:
        raise MalformedRequest("unsupported :scheme")
    if not path or (path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS")):
        # §8.3.1: not empty for http(s); "*" only for OPTIONS.
        raise MalformedRequest("invalid :path")
    if _VALUE_BAD(path) or b" " in path:
        raise MalformedRequest("invalid :path")
    if authority is not None:
        if not authority or b"@" in authority or _VALUE_BAD(authority) or b" " in authority:
            # §8.3.1: no userinfo in :authority.
            raise MalformedRequest("invalid :authority")
        if host is not None and host != authority:
            # §8.3.1: a Host naming another entity than :authority is malformed.
            raise MalformedRequest("host differs from :authority")
        host = authority
    out = [b"%s %s HTTP/1.1\r\n" % (method, path)]
    if host is not None:
        out.append(b"host: %s\r\n" % host)
    out += fields
    if cookies is not None:
        out.append(b"cookie: %s\r\n" % b"; ".join(cookies))
    length = int(content_length) if content_length is not None else None
    if length is None and not end_stream:
        out.append(b"transfer-encoding: chunked\r\n")
    out.append(b"connection: close\r\n\r\n")
    return RequestHead(method, path, b"".join(out), length)


# Fields of an HTTP/1.1 response that mean nothing on an HTTP/2 stream (§8.2.2).
RESPONSE_DROP: frozenset[bytes] = CONNECTION_SPECIFIC | {b"te"}
# Values new in every response: kept out of the HPACK dynamic table (RFC 7541 §6.2.3), where
# each would evict a useful entry and lengthen the encoder's table search (measured: ~4 % of
# a stream's cost).
_UNINDEXED: frozenset[bytes] = frozenset({b"x-request-id"})


def response_fields(
    status: int, fields: list[tuple[bytes, bytes]], connection_tokens: Iterable[bytes] = ()
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header list of an HTTP/1.1 response: ``:status`` first, names lower case,
    connection-specific fields (and the ones its Connection field named) removed."""
    drop = RESPONSE_DROP
    extra = frozenset(connection_tokens)
    out = [(b":status", b"%d" % status)]
    for name, value in fields:
        lower = name.lower()
        if lower in drop or lower in extra:
            continue
        if lower in _UNINDEXED:
            out.append(NeverIndexedHeaderTuple(lower, value))
        else:
            out.append((lower, value))
    return out
