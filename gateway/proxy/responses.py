"""Responses the gateway makes itself: error pages, refusals, redirects, filter replies.

Pure functions from facts to bytes, so the lifecycle decides *when* to answer and this module
*what* the answer looks like. Every gateway-made error has a JSON body
``{"error", "message", "status", "request_id"}`` and an ``x-request-id`` header; the connection
survives it only if the request was read whole and framed unambiguously (``keeps_alive``).
"""

from __future__ import annotations

import re

import orjson

REASONS = {
    200: b"OK",
    204: b"No Content",
    301: b"Moved Permanently",
    302: b"Found",
    304: b"Not Modified",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
# Error statuses after which the request's framing cannot be trusted: the connection closes.
CLOSING_STATUSES = frozenset({400, 408, 413, 414, 431, 505})

MISDIRECTED = "the certificate of this connection does not cover the requested host"
_REDIRECT_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+")

# Rate-limit refusals: metric label and the message of the JSON error body.
REFUSAL_RESULTS = {
    "rate_limited": "limited",
    "store_unavailable": "store_error",
    "max_in_flight": "max_in_flight",
    "missing_key": "missing_key",
}
REFUSAL_MESSAGES = {
    429: "rate limit exceeded",
    503: "too many requests in flight, or the rate-limit store is unavailable",
    400: "the request lacks the value its rate limit is keyed on",
}


class RequestRejected(Exception):
    """Raised inside a parser callback to stop parsing with a specific status; also the
    description of any gateway-made error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = b""  # extra header lines of the error response (e.g. Allow)


def reason(status: int) -> bytes:
    return REASONS.get(status, b"Error")


def keeps_alive(status: int, keep_alive: bool, request_complete: bool, upgrading: bool) -> bool:
    """Whether the client connection survives a gateway-made error with ``status``."""
    return keep_alive and request_complete and not upgrading and status not in CLOSING_STATUSES


def error_body(status: int, code: str, message: str, request_id: bytes) -> bytes:
    return orjson.dumps(
        {
            "error": code,
            "message": message,
            "status": status,
            "request_id": request_id.decode("ascii"),
        }
    )


def error_head(
    status: int,
    body_length: int,
    request_id: bytes,
    *,
    keep_alive: bool,
    http10: bool,
    extra_headers: bytes = b"",
) -> bytes:
    """The head of a JSON error response (``extra_headers``: whole header lines)."""
    head = [
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nx-request-id: %s\r\n"
        % (status, reason(status), body_length, request_id)
    ]
    head.append(connection_field(keep_alive, http10))
    if extra_headers:
        head.append(extra_headers)
    head.append(b"\r\n")
    return b"".join(head)


def connection_field(keep_alive: bool, http10: bool) -> bytes:
    """The Connection line of a gateway-made response: close, keep-alive for an HTTP/1.0
    client that keeps the connection (RFC 9112 §9.3), else none (HTTP/1.1 persists)."""
    if not keep_alive:
        return b"connection: close\r\n"
    return b"connection: keep-alive\r\n" if http10 else b""


def refusal_response(request_id: bytes, reason_code: str) -> bytes:
    """The whole 503 for a connection refused over ``max_connections`` or while draining."""
    body = orjson.dumps(
        {
            "error": reason_code,
            "message": "the gateway is at its connection limit"
            if reason_code == "max_connections"
            else "the gateway is shutting down",
            "status": 503,
            "request_id": request_id.decode("ascii"),
        }
    )
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: 1\r\nx-request-id: %s\r\n"
        b"connection: close\r\n\r\n%s" % (len(body), request_id, body)
    )


def redirect_location(template: str, host: bytes | None, url: bytes) -> bytes | None:
    """``redirect_to`` of a plaintext listener applied to a request's Host and target (RFC
    9110 §15.4.9: 308 keeps the method and body); None when there is no usable host name."""
    name = (host or b"").decode("latin-1")
    name = name[: name.rfind("]") + 1] if name.startswith("[") else name.split(":", 1)[0]
    if not name or not _REDIRECT_HOST.fullmatch(name):
        return None
    return template.replace("{host}", name).encode("latin-1") + url


# Response header fields a filter's LocalReply may not set: the gateway frames the reply.
_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def local_reply_head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body_length: int,
    request_id: bytes,
    *,
    keep_alive: bool,
    http10: bool,
) -> bytes:
    """The head of a filter's ``LocalReply``: its own fields, framed by the gateway."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
    has_request_id = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in _FRAMING_FIELDS:
            continue
        if lowered == b"x-request-id":
            has_request_id = True
        lines.append(b"%s: %s\r\n" % (name, value))
    if not has_request_id:
        lines.append(b"x-request-id: %s\r\n" % request_id)
    if status >= 200 and status not in (204, 304):
        lines.append(b"content-length: %d\r\n" % body_length)
    lines.append(connection_field(keep_alive, http10))
    lines.append(b"\r\n")
    return b"".join(lines)
