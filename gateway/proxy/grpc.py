"""gRPC over HTTP/2, the parts the gateway needs to understand (pure: no IO, no clock).

References are to the gRPC project's "gRPC over HTTP2" protocol document (PROTOCOL-HTTP2.md,
cited as [proto]) and its "HTTP to gRPC Status Code Mapping" (http-grpc-status-mapping.md,
cited as [mapping]).

- ``parse_grpc_timeout``: the ``grpc-timeout`` request header ([proto] "Requests":
  ``TimeoutValue TimeoutUnit``, at most 8 ASCII digits, unit one of ``H M S m u n``) in seconds;
  ``request_deadline`` caps it by the route's ``timeout``.
- ``gateway_error_status``: the ``grpc-status`` a gRPC client gets for an error the gateway
  itself made (no route, rate limited, no healthy instance, ...); ``http_to_grpc_status`` is
  [mapping] for a non-gRPC HTTP response from an upstream.
- ``trailers_only``: a Trailers-Only response ([proto] "Responses": one HEADERS frame with
  END_STREAM carrying ``:status 200``, ``content-type`` and the status), with ``grpc-message``
  percent-encoded ([proto] "Responses": ``Percent-Encoded``).
- ``is_grpc``: whether a request's content-type makes it gRPC.
- ``grpc_code_label``: a bounded label value for metrics (17 code names and ``INVALID``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import IntEnum
from typing import TYPE_CHECKING

from gateway.proxy.responses import connection_field

if TYPE_CHECKING:
    from gateway.proxy.filtering import FilterState


class GrpcStatus(IntEnum):
    """The canonical status codes ([proto] "Status codes", google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# -- grpc-timeout ------------------------------------------------------------------------------

# Seconds per unit ([proto] "Requests": TimeoutUnit).
_TIMEOUT_UNITS: dict[str, float] = {
    "H": 3600.0,
    "M": 60.0,
    "S": 1.0,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
}
# TimeoutValue: "positive integer as ASCII string of at most 8 digits". Zero is accepted as
# grpc-go and grpc-java accept it (a deadline already past), so it fails as DEADLINE_EXCEEDED
# instead of as a malformed header.
_TIMEOUT_RE = re.compile(r"([0-9]{1,8})([HMSmun])")


class GrpcTimeoutError(ValueError):
    """A malformed ``grpc-timeout``; gRPC servers answer it with INTERNAL."""


def parse_grpc_timeout(value: bytes | str) -> float:
    """``grpc-timeout`` in seconds. Raises ``GrpcTimeoutError`` naming what is wrong."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    match = _TIMEOUT_RE.fullmatch(text)
    if match is None:
        raise GrpcTimeoutError(
            f"grpc-timeout {text!r} is not 1 to 8 digits followed by one of H, M, S, m, u, n"
        )
    return int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]


def request_deadline(grpc_timeout: bytes | str | None, route_timeout: float | None) -> float | None:
    """The seconds a gRPC request may take: its ``grpc-timeout`` capped by the route's timeout
    (either may be absent; ``None``: no deadline)."""
    if grpc_timeout is None:
        return route_timeout
    seconds = parse_grpc_timeout(grpc_timeout)
    if route_timeout is not None and route_timeout < seconds:
        return route_timeout
    return seconds


# -- status mapping ----------------------------------------------------------------------------

# [mapping]: what a gRPC client makes of an HTTP status that is not a gRPC response.
_HTTP_TO_GRPC: dict[int, GrpcStatus] = {
    400: GrpcStatus.INTERNAL,
    401: GrpcStatus.UNAUTHENTICATED,
    403: GrpcStatus.PERMISSION_DENIED,
    404: GrpcStatus.UNIMPLEMENTED,
    429: GrpcStatus.UNAVAILABLE,
    502: GrpcStatus.UNAVAILABLE,
    503: GrpcStatus.UNAVAILABLE,
    504: GrpcStatus.UNAVAILABLE,
}

# Errors the gateway makes know their cause, so some map more precisely than [mapping]:
# 429 is a quota (RESOURCE_EXHAUSTED, as grpc-go's and Envoy's rate limiters answer), 504 is
# the deadline (DEADLINE_EXCEEDED), a too-large request or header list is RESOURCE_EXHAUSTED
# (what gRPC itself answers for a message above its size limit), 408 (client too slow) and 500
# as the gRPC libraries name them.
_GATEWAY_ERROR_TO_GRPC: dict[int, GrpcStatus] = {
    **_HTTP_TO_GRPC,
    404: GrpcStatus.UNIMPLEMENTED,  # no route for /package.Service/Method
    408: GrpcStatus.DEADLINE_EXCEEDED,
    413: GrpcStatus.RESOURCE_EXHAUSTED,
    429: GrpcStatus.RESOURCE_EXHAUSTED,
    431: GrpcStatus.RESOURCE_EXHAUSTED,
    500: GrpcStatus.INTERNAL,
    504: GrpcStatus.DEADLINE_EXCEEDED,
}


def http_to_grpc_status(http_status: int) -> GrpcStatus:
    """[mapping]: an upstream's non-gRPC HTTP response as a gRPC client sees it (UNKNOWN for
    every status the table does not name)."""
    return _HTTP_TO_GRPC.get(http_status, GrpcStatus.UNKNOWN)


def gateway_error_status(http_status: int) -> GrpcStatus:
    """The ``grpc-status`` of an error the gateway made, given the HTTP status it would have
    answered an HTTP client with."""
    return _GATEWAY_ERROR_TO_GRPC.get(http_status, GrpcStatus.UNKNOWN)


# -- Trailers-Only -----------------------------------------------------------------------------

# Percent-Byte-Unencoded = 1*( %x20-%x24 / %x26-%x7E ): space and VCHAR, except "%".
_UNENCODED = frozenset(range(0x20, 0x25)) | frozenset(range(0x26, 0x7F))
_PERCENT_TABLE: tuple[str, ...] = tuple(
    chr(byte) if byte in _UNENCODED else f"%{byte:02X}" for byte in range(256)
)


def encode_grpc_message(message: str) -> bytes:
    """``grpc-message``: the UTF-8 bytes of ``message``, each byte outside space/VCHAR (and
    ``%`` itself) written as ``%XX`` ([proto] "Responses")."""
    table = _PERCENT_TABLE
    return "".join(table[byte] for byte in message.encode("utf-8")).encode("ascii")


def decode_grpc_message(value: bytes) -> str:
    """The inverse of ``encode_grpc_message``; a malformed escape is kept as it is, and bytes
    that are not UTF-8 are replaced ([proto]: "decode ... and ignore errors")."""
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        byte = value[i]
        if byte == 0x25 and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(byte)
        i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


GRPC_CONTENT_TYPE = b"application/grpc"


def trailers_only(
    status: int,
    message: str | None = None,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """The header list of a Trailers-Only response (sent as one HEADERS frame with END_STREAM):
    ``:status 200``, ``content-type: application/grpc``, ``grpc-status`` and, when given, the
    percent-encoded ``grpc-message``; ``extra`` (e.g. ``x-request-id``) follows."""
    headers = [
        (b":status", b"200"),
        (b"content-type", GRPC_CONTENT_TYPE),
        (b"grpc-status", str(int(status)).encode("ascii")),
    ]
    if message:
        headers.append((b"grpc-message", encode_grpc_message(message)))
    headers.extend(extra)
    return headers


# -- content type ------------------------------------------------------------------------------


def is_grpc(content_type: bytes | str | None) -> bool:
    """[proto] "Requests": ``application/grpc``, optionally ``+proto``/``+json``/... or with
    parameters; case-insensitive. gRPC-Web (``application/grpc-web...``) is not gRPC here."""
    if not content_type:
        return False
    if isinstance(content_type, str):
        content_type = content_type.encode("latin-1", "replace")
    value = content_type.lower()
    if not value.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = value[len(GRPC_CONTENT_TYPE) :]
    return not rest or rest[0] in b"+;"


# -- metrics -----------------------------------------------------------------------------------

_CODE_LABELS: dict[bytes, str] = {str(code.value).encode(): code.name for code in GrpcStatus}
_INT_LABELS: dict[int, str] = {code.value: code.name for code in GrpcStatus}
INVALID_LABEL = "INVALID"  # a grpc-status that is not one of the 17 codes
GRPC_CODE_LABELS: tuple[str, ...] = (*(code.name for code in GrpcStatus), INVALID_LABEL)


def grpc_code_label(grpc_status: bytes | str | int | None) -> str:
    """``grpc_code`` label of a finished gRPC request: the code's name, ``INVALID`` for
    anything else (so the label has at most 18 values). A missing status is UNKNOWN, as a gRPC
    client reports a response that ends without one ([proto] "Responses")."""
    if grpc_status is None:
        return "UNKNOWN"
    if isinstance(grpc_status, int):
        return _INT_LABELS.get(grpc_status, INVALID_LABEL)
    if isinstance(grpc_status, str):
        grpc_status = grpc_status.encode("latin-1", "replace")
    return _CODE_LABELS.get(grpc_status.strip(), INVALID_LABEL)


# -- gRPC-Web errors ---------------------------------------------------------------------------

_WEB_TYPE = b"application/grpc-web"
# Fields of a gateway-made gRPC-Web error that response filters may not replace: the gateway
# frames it, and the status is the point of it.
_WEB_ERROR_FIXED = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"grpc-status", b"grpc-message"}
)


def grpc_web_client_type(
    headers: Iterable[tuple[bytes, bytes]], marked: object = None
) -> bytes | None:
    """The gRPC-Web content type a client sent (lowercase, no parameters), or None when the
    request is not gRPC-Web. ``marked``: what the ``grpc_web`` filter left in
    ``request.vars`` (it rewrote the header to ``application/grpc``), when it ran."""
    if isinstance(marked, str):
        return marked.encode("latin-1")
    for name, value in headers:
        if name == b"content-type" or name.lower() == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media.startswith(_WEB_TYPE):
                rest = media[len(_WEB_TYPE) :]
                if not rest or rest.startswith((b"+", b"-text")):
                    return media
            return None
    return None


def grpc_web_error(
    web_type: bytes,
    http_status: int,
    message: str,
    request_id: bytes,
    *,
    keep_alive: bool,
    http10: bool,
    extra_headers: bytes = b"",
    filters: FilterState | None = None,
) -> bytes:
    """A gateway-made error as a whole gRPC-Web Trailers-Only response (PROTOCOL-WEB.md:
    trailers may come with the head, and no body): HTTP 200, the client's gRPC-Web content
    type, the ``grpc-status`` of ``gateway_error_status(http_status)`` and ``grpc-message``.
    The route's response-headers filters (``filters``, when they ran for the request) see it
    as they see an upstream's answer, so ``cors`` adds what a browser needs to read it."""
    code = gateway_error_status(http_status)
    fields: list[tuple[bytes, bytes]] = [(b"content-type", web_type), (b"x-request-id", request_id)]
    if filters is not None and filters.chain.wants_response_headers:
        from gateway.filters.api import ResponseInfo

        response = ResponseInfo(filters.request, 200, fields)
        filters.chain.on_response_headers(response)
        fields = response.headers
    head = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ngrpc-status: %d\r\ngrpc-message: %s\r\n"
        % (int(code), encode_grpc_message(message))
    ]
    head.append(connection_field(keep_alive, http10))
    if extra_headers:
        head.append(extra_headers)
    for name, value in fields:
        if name.lower() not in _WEB_ERROR_FIXED:
            head.append(b"%s: %s\r\n" % (name, value))
    head.append(b"\r\n")
    return b"".join(head)
