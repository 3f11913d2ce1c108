"""The request side of a native HTTP/2 stream (gateway/proxy/h2/forward.py), as pure
functions: the client's fields as routing reads them, and the header list toward the upstream
(the HTTP/1.1 path's ``build_request_head`` does the same for its requests)."""

from __future__ import annotations

from gateway.proxy.h2.headers import CONNECTION_SPECIFIC

Headers = list[tuple[bytes, bytes]]

# Request fields not forwarded: hop-by-hop, or rebuilt here.
_REQUEST_DROP = CONNECTION_SPECIFIC | {b"host", b"x-request-id"}


class ClientFields:
    """What routing and the upstream request need of a (validated) client header list:
    ``:authority`` (else ``host``), ``:scheme``, the regular fields (without ``host``), and
    the two a gRPC call is told by."""

    __slots__ = ("authority", "content_type", "grpc_timeout", "regular", "scheme")

    def __init__(self, headers: Headers) -> None:
        authority: bytes | None = None
        scheme = b"http"
        regular: Headers = []
        content_type = b""
        grpc_timeout: bytes | None = None
        for name, value in headers:
            if name[:1] == b":":
                if name == b":authority":
                    authority = value
                elif name == b":scheme":
                    scheme = value
                continue
            if name == b"host":
                if authority is None:
                    authority = value
                continue
            if name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                grpc_timeout = value
            regular.append((name, value))
        self.authority = authority
        self.scheme = scheme
        self.regular = regular
        self.content_type = content_type
        self.grpc_timeout = grpc_timeout


def forwarded_fields(
    regular: Headers, peer_ip: str, peer_trusted: bool, scheme: bytes
) -> tuple[Headers, bytes]:
    """The client's regular fields toward the upstream, without connection-specific ones, then
    ``x-forwarded-for`` (appended to a trusted peer's), ``x-forwarded-proto``; and the client's
    ``x-request-id`` (empty if none), which the caller validates and appends."""
    request_id = b""
    forwarded_for: bytes | None = None
    out: Headers = []
    for name, value in regular:
        if name in _REQUEST_DROP:
            if name == b"x-request-id":
                request_id = value
            continue
        if name == b"x-forwarded-for":
            if peer_trusted:
                forwarded_for = value
            continue
        if name == b"x-forwarded-proto" and peer_trusted:
            continue
        out.append((name, value))
    client = peer_ip.encode("ascii")
    out.append((b"x-forwarded-for", forwarded_for + b", " + client if forwarded_for else client))
    out.append((b"x-forwarded-proto", scheme))
    return out, request_id
