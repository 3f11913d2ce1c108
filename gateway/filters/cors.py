"""``cors``: Cross-Origin Resource Sharing at the gateway (Fetch standard, "CORS protocol").

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered
here, never forwarded: 204 with the allowed origin, methods, headers, credentials and max-age
when the origin is allowed, 403 without CORS headers when it is not. Other requests go
upstream; their responses get ``Access-Control-Allow-Origin`` (and credentials/expose
headers) when the ``Origin`` is allowed. ``Vary: Origin`` is added to every response whose CORS
headers depend on the Origin (all of them unless the policy is ``*`` without credentials), so a
shared cache never serves one origin's answer to another.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.filters.base import Filter, LocalReply, RequestInfo, ResponseInfo, get_header

__all__ = ["CorsFilter", "origin_matcher"]

# Fetch "CORS-safelisted request-header" names (browsers list content-type in
# Access-Control-Request-Headers only when its value is not a safelisted one).
_SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language"})


def origin_matcher(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for the allowed origins; ``*.`` in a pattern stands for one or more labels."""
    alternatives = []
    for pattern in patterns:
        if pattern == "*":
            continue
        if "://*." in pattern:
            scheme, rest = pattern.split("://*.", 1)
            alternatives.append(
                re.escape(scheme.lower() + "://")
                + r"[a-z0-9-]+(?:\.[a-z0-9-]+)*\."
                + re.escape(rest.lower())
            )
        else:
            alternatives.append(re.escape(pattern if pattern == "null" else pattern.lower()))
    if not alternatives:
        return None
    return re.compile("(?:" + "|".join(alternatives) + ")")


def _vary_origin(headers: list[tuple[bytes, bytes]]) -> None:
    """Add Origin to Vary (RFC 9110 §12.5.5: several Vary fields form one list)."""
    for name, value in headers:
        if name == b"vary":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"origin" in tokens or b"*" in tokens:
                return
    headers.append((b"vary", b"Origin"))


class CorsFilter(Filter):
    name = "cors"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        origins: tuple[str, ...] = tuple(options["allow_origins"])
        self.any_origin = "*" in origins
        self.credentials = bool(options.get("allow_credentials", False))
        self.matcher = origin_matcher(origins)
        self.methods = frozenset(
            m.upper() for m in options.get("allow_methods", ("GET", "HEAD", "POST"))
        )
        self.any_method = "*" in self.methods
        self.allowed_headers = frozenset(h.lower() for h in options.get("allow_headers", ()))
        self.any_header = "*" in self.allowed_headers
        self.methods_value = ", ".join(sorted(self.methods)).encode("ascii")
        self.headers_value = ", ".join(sorted(self.allowed_headers)).encode("ascii")
        expose = options.get("expose_headers", ())
        self.expose_value = ", ".join(expose).encode("ascii") if expose else None
        self.max_age = str(int(options.get("max_age", 600))).encode("ascii")
        # The answer depends on Origin unless it is the same '*' for everyone.
        self.varies = not (self.any_origin and not self.credentials)

    def allowed(self, origin: str) -> bool:
        if self.any_origin:
            return True
        return self.matcher is not None and self.matcher.fullmatch(origin) is not None

    def _allow_origin(self, origin: bytes) -> bytes:
        return b"*" if self.any_origin and not self.credentials else origin

    def on_request_headers(self, request: RequestInfo) -> LocalReply | None:
        if request.method != "OPTIONS":
            return None
        headers = request.headers
        origin = get_header(headers, b"origin")
        requested_method = get_header(headers, b"access-control-request-method")
        if origin is None or requested_method is None:
            return None  # a plain OPTIONS request: the upstream answers it
        vary = [(b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")]
        if not self.allowed(origin.decode("latin-1")):
            return LocalReply(403, vary)
        out = [(b"access-control-allow-origin", self._allow_origin(origin)), *vary]
        if self.credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        method = requested_method.decode("latin-1").strip()
        if self.any_method:
            # '*' is literal for credentialed requests (Fetch): name the method instead.
            out.append(
                (
                    b"access-control-allow-methods",
                    method.encode("latin-1") if self.credentials else b"*",
                )
            )
        else:
            # Not listed (and not safelisted): the browser fails the preflight on its own.
            out.append((b"access-control-allow-methods", self.methods_value))
        requested = get_header(headers, b"access-control-request-headers")
        if requested:
            names = [n.strip().lower() for n in requested.decode("latin-1").split(",") if n.strip()]
            if self.any_header and not self.credentials:
                out.append((b"access-control-allow-headers", b"*"))
            elif all(
                self.any_header or n in self.allowed_headers or n in _SAFELISTED_HEADERS
                for n in names
            ):
                out.append((b"access-control-allow-headers", ", ".join(names).encode("latin-1")))
            elif self.headers_value:
                out.append((b"access-control-allow-headers", self.headers_value))
        out.append((b"access-control-max-age", self.max_age))
        return LocalReply(204, out)

    def on_response_headers(self, response: ResponseInfo) -> None:
        headers = response.headers
        origin = get_header(response.request.headers, b"origin")
        if self.varies:
            _vary_origin(headers)
        if origin is None or not self.allowed(origin.decode("latin-1")):
            return
        # The gateway owns the CORS answer: the upstream's own copies go.
        headers[:] = [
            item
            for item in headers
            if item[0]
            not in (
                b"access-control-allow-origin",
                b"access-control-allow-credentials",
                b"access-control-expose-headers",
            )
        ]
        headers.append((b"access-control-allow-origin", self._allow_origin(origin)))
        if self.credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        if self.expose_value is not None:
            headers.append((b"access-control-expose-headers", self.expose_value))
