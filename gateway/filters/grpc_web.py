"""``grpc_web``: gRPC-Web (browser) requests bridged to a gRPC upstream (docs/grpc.md).

A request with ``content-type: application/grpc-web[+proto]`` or
``application/grpc-web-text[+proto]`` is rewritten here to what a gRPC server takes
(``application/grpc[+proto]``, ``te: trailers``) and marked in ``request.vars``; the body work
is done where the request becomes an HTTP/2 stream (``gateway/proxy/h2/from_h1.py``): a
``-text`` body is base64-decoded as it streams, the response content type is mapped back, the
response trailers become the trailer frame at the end of the body, and a ``-text`` response is
base64-encoded. Other requests on the route pass untouched, so one route can serve gRPC-Web and
gRPC (HTTP/2 clients) alike. The route's upstream must speak HTTP/2 (``protocol: h2c | h2``).
CORS preflights are the ``cors`` filter's (put it first and expose ``grpc-status`` and
``grpc-message``).
"""

from __future__ import annotations

from gateway.filters.base import Filter, RequestInfo, get_header, remove_header, set_header

__all__ = [
    "BINARY",
    "GRPC_WEB_VAR",
    "TEXT",
    "TEXT_TYPE",
    "GrpcWebFilter",
    "grpc_content_type",
    "web_content_type",
]

# request.vars key: the client's content type (lowercase, no parameters), which the response
# carries back; it starts with TEXT_TYPE for the base64 variant.
GRPC_WEB_VAR = "grpc_web"
TEXT = "text"
BINARY = "binary"
TEXT_TYPE = "application/grpc-web-text"

_WEB = b"application/grpc-web"
_WEB_TEXT = b"application/grpc-web-text"


def web_content_type(content_type: bytes) -> bytes:
    """The media type of a Content-Type value: lowercase, without parameters."""
    return content_type.split(b";", 1)[0].strip().lower()


def grpc_content_type(content_type: bytes) -> tuple[bytes, str] | None:
    """``application/grpc-web[-text][+codec][; params]`` → (the gRPC content type, TEXT or
    BINARY); None for anything else."""
    value = web_content_type(content_type)
    if value.startswith(_WEB_TEXT):
        suffix, mode = value[len(_WEB_TEXT) :], TEXT
    elif value.startswith(_WEB):
        suffix, mode = value[len(_WEB) :], BINARY
    else:
        return None
    if suffix and not suffix.startswith(b"+"):
        return None  # application/grpc-webfoo is not gRPC-Web
    return b"application/grpc" + suffix, mode


class GrpcWebFilter(Filter):
    name = "grpc_web"

    def on_request_headers(self, request: RequestInfo) -> None:
        content_type = get_header(request.headers, b"content-type")
        if content_type is None:
            return None
        translated = grpc_content_type(content_type)
        if translated is None:
            return None
        grpc_type, mode = translated
        headers = request.headers
        set_header(headers, b"content-type", grpc_type)
        set_header(headers, b"te", b"trailers")
        if mode == TEXT:
            # The upstream sees the decoded body; its length is not the client's.
            remove_header(headers, b"content-length")
        request.vars[GRPC_WEB_VAR] = web_content_type(content_type).decode("latin-1")
        return None
