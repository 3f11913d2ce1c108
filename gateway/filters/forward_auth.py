"""``forward_auth``: ask an auth service about each request (Traefik ForwardAuth, nginx
``auth_request``, Envoy ext_authz over HTTP).

The subrequest carries the chosen request headers plus ``X-Forwarded-Method``,
``X-Forwarded-Proto``, ``X-Forwarded-Host``, ``X-Forwarded-Uri`` and ``X-Forwarded-For``, and no
body. A 2xx answer lets the request through, with the chosen answer headers copied onto it
(replacing the client's copies); any other answer goes back to the client as it is (status,
body up to 64 KiB, and its WWW-Authenticate, Location, Set-Cookie, Content-Type, Retry-After).
When the auth service cannot be reached in ``timeout``: 503 (``on_error: deny``) or the request
goes on (``on_error: allow``).

The subrequest runs in a task only for requests that need it: with ``cache_ttl``, a 2xx answer
is remembered by the values of the forwarded headers and later requests with the same values
pass synchronously.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.filters.base import Filter, LocalReply, Pending, RequestInfo

if TYPE_CHECKING:
    import aiohttp

__all__ = ["ForwardAuthFilter", "close_session_soon"]

log = logging.getLogger("gateway.filters.forward_auth")

_MAX_BODY = 64 * 1024
_CACHE_ENTRIES = 4096
_PASSED_BACK = frozenset(
    {b"www-authenticate", b"location", b"set-cookie", b"content-type", b"retry-after"}
)


class ForwardAuthFilter(Filter):
    name = "forward_auth"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.url: str = options["url"]
        self.method: str = options.get("method", "GET")
        self.request_headers = tuple(
            h.encode("ascii") for h in options.get("request_headers", ("authorization", "cookie"))
        )
        self.response_headers = frozenset(
            h.encode("ascii") for h in options.get("response_headers", ())
        )
        self.timeout = float(options.get("timeout", 1.0))
        self.allow_on_error = options.get("on_error", "deny") == "allow"
        ttl = options.get("cache_ttl")
        self.cache_ttl: float | None = float(ttl) if ttl else None
        # key -> (headers to add, valid until (monotonic))
        self._cache: dict[bytes, tuple[list[tuple[bytes, bytes]], float]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.calls = 0  # subrequests sent, for tests

    def _cache_key(self, request: RequestInfo) -> bytes:
        digest = hashlib.blake2b(digest_size=16)
        for wanted in self.request_headers:
            for name, value in request.headers:
                if name == wanted:
                    digest.update(name + b":" + value + b"\x00")
        return digest.digest()

    def on_request_headers(self, request: RequestInfo) -> Pending | None:
        key = None
        if self.cache_ttl is not None:
            key = self._cache_key(request)
            cached = self._cache.get(key)
            if cached is not None:
                if cached[1] > time.monotonic():
                    self._apply(request, cached[0])
                    return None
                del self._cache[key]
        return Pending(self._check(request, key))

    def _apply(self, request: RequestInfo, extra: list[tuple[bytes, bytes]]) -> None:
        if extra:
            names = {name for name, _ in extra}
            request.headers[:] = [item for item in request.headers if item[0] not in names]
            request.headers.extend(extra)

    async def _check(self, request: RequestInfo, key: bytes | None) -> LocalReply | None:
        import aiohttp

        headers: list[tuple[str, str]] = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers
            if name in self.request_headers
        ]
        uri = request.path + ("?" + request.query if request.query else "")
        headers += [
            ("X-Forwarded-Method", request.method),
            ("X-Forwarded-Proto", "https" if request.tls else "http"),
            ("X-Forwarded-Host", request.host),
            ("X-Forwarded-Uri", uri),
            ("X-Forwarded-For", request.client_ip),
        ]
        self.calls += 1
        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(auto_decompress=False)
            async with self._session.request(
                self.method,
                self.url,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as answer:
                body = await answer.content.read(_MAX_BODY)
                status = answer.status
                raw = [(n.lower(), v) for n, v in answer.raw_headers]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("forward_auth: %s failed: %s", self.url, exc or type(exc).__name__)
            if self.allow_on_error:
                return None
            return LocalReply(
                503,
                [(b"content-type", b"text/plain; charset=utf-8")],
                b"authorization service unavailable\n",
            )
        if 200 <= status < 300:
            extra = [(n, v) for n, v in raw if n in self.response_headers]
            self._apply(request, extra)
            if key is not None and self.cache_ttl is not None:
                if len(self._cache) >= _CACHE_ENTRIES:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = (extra, time.monotonic() + self.cache_ttl)
            return None
        return LocalReply(status, [(n, v) for n, v in raw if n in _PASSED_BACK], body)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            close_session_soon(session)


_CLOSING: set[asyncio.Task[None]] = set()


def close_session_soon(session: aiohttp.ClientSession) -> None:
    """Close an aiohttp session from a synchronous ``close()`` (the config was replaced)."""
    if session.closed:
        return
    try:
        task = asyncio.get_running_loop().create_task(session.close())
    except RuntimeError:
        return  # no loop any more: the process is ending
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
