"""gRPC over HTTP/2, the pure parts (no IO): what a gRPC request is, its ``grpc-timeout``, and
the Trailers-Only responses the gateway answers its own errors with.

Wire format: gRPC's PROTOCOL-HTTP2 document. Not wired into the data plane yet (that needs
upstream HTTP/2 and trailers passed through; see docs/http2.md, follow-ups).
"""

from __future__ import annotations

import re

# grpc-status codes (gRPC's statuscodes document).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# A gateway-made HTTP error → the grpc-status a gRPC client gets instead (docs/http2.md).
_STATUS_FOR_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,  # no route: the method is not served here
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    499: CANCELLED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}

# Timeout → TimeoutValue TimeoutUnit; TimeoutValue: at most 8 ASCII digits.
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])\Z")
_UNIT_SECONDS = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}
_CONTENT_TYPE = re.compile(rb"application/grpc(?:[+;].*)?\Z", re.IGNORECASE | re.DOTALL)


class InvalidTimeout(ValueError):
    """A grpc-timeout value that is not TimeoutValue TimeoutUnit."""


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc``, ``application/grpc+proto``, ``application/grpc;...``; not
    gRPC-Web (``application/grpc-web...``), which is another protocol."""
    return content_type is not None and _CONTENT_TYPE.match(content_type.strip()) is not None


def parse_timeout(value: bytes) -> float:
    """Seconds of a ``grpc-timeout`` value (``100m`` = 0.1 s); ``InvalidTimeout`` if malformed."""
    match = _TIMEOUT.match(value.strip())
    if match is None:
        raise InvalidTimeout(f"invalid grpc-timeout {value!r}: want 1-8 digits and one of HMSmun")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def deadline(grpc_timeout: bytes | None, route_timeout: float | None) -> float | None:
    """The request's time budget in seconds: the client's ``grpc-timeout``, capped by the
    route's ``timeout``; None when neither is set. A malformed timeout raises."""
    if grpc_timeout is None:
        return route_timeout
    seconds = parse_timeout(grpc_timeout)
    return seconds if route_timeout is None else min(seconds, route_timeout)


def status_for_http(status: int) -> int:
    """The grpc-status for an HTTP status the gateway itself answered with."""
    if 200 <= status < 300:
        return OK
    return _STATUS_FOR_HTTP.get(status, UNKNOWN)


def encode_message(message: str) -> bytes:
    """grpc-message: UTF-8, percent-encoding every byte outside printable ASCII and '%'."""
    out = bytearray()
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(grpc_status: int, message: str = "") -> list[tuple[bytes, bytes]]:
    """The header list of a Trailers-Only response (one HEADERS frame with END_STREAM): HTTP
    200, the gRPC content type, and the status where trailers would carry it."""
    fields = [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % grpc_status),
    ]
    if message:
        fields.append((b"grpc-message", encode_message(message)))
    return fields


def error_response(http_status: int, message: str = "") -> list[tuple[bytes, bytes]]:
    """A gateway-made error (no route, rate limited, no instance, timeout...) as a gRPC
    client understands it."""
    return trailers_only(status_for_http(http_status), message)
