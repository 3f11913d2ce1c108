"""``mirror``: send a sampled copy of requests to another service, fire and forget.

The copy is sent after the exchange (from ``on_log``), so it never delays or fails the real
request; its answer is read and dropped. A request body is copied up to ``max_body_bytes``;
a larger request, or one whose body was not seen to its end, is not mirrored at all (a cut
body would be a different request). At most
``max_in_flight`` copies are outstanding per filter; beyond, copies are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.filters.base import Filter, RequestInfo
from gateway.filters.forward_auth import close_session_soon

if TYPE_CHECKING:
    import aiohttp

__all__ = ["MirrorFilter"]

log = logging.getLogger("gateway.filters.mirror")

# Not copied: hop-by-hop fields (RFC 9110 §7.6.1) and framing, which the mirror request sets.
_SKIPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)


class _Copy:
    __slots__ = ("body", "complete", "headers", "method", "target", "too_large")

    def __init__(
        self, method: str, target: str, headers: list[tuple[str, str]], has_body: bool
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body: list[bytes] = []
        self.too_large = False
        # A request with a body is mirrored only once its last chunk was seen: a copy with
        # a missing or partial body would be another request.
        self.complete = not has_body


class MirrorFilter(Filter):
    name = "mirror"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.url: str = options["url"].rstrip("/")
        self.sample = float(options.get("sample", 1.0))
        self.max_body = int(options.get("max_body_bytes", 64 * 1024))
        self.timeout = float(options.get("timeout", 2.0))
        self.max_in_flight = int(options.get("max_in_flight", 64))
        self._random = random.Random()
        self._state = f"_mirror.{id(self)}"  # request.vars key of a request's copy
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0
        self.dropped = 0

    def on_request_headers(self, request: RequestInfo) -> None:
        if self.sample < 1.0 and self._random.random() >= self.sample:
            return
        headers = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in request.headers
            if n not in _SKIPPED
        ]
        target = request.path + ("?" + request.query if request.query else "")
        has_body = False
        for name, value in request.headers:
            if name == b"transfer-encoding" or (
                name == b"content-length" and value.strip() != b"0"
            ):
                has_body = True
        request.vars[self._state] = _Copy(request.method, target, headers, has_body)

    def on_request_body(self, request: RequestInfo, chunk: bytes, end: bool) -> bytes:
        copy: _Copy | None = request.vars.get(self._state)
        if copy is not None:
            if not copy.too_large and chunk:
                if sum(map(len, copy.body)) + len(chunk) > self.max_body:
                    copy.too_large = True
                    copy.body.clear()
                else:
                    copy.body.append(chunk)
            if end:
                copy.complete = True
        return chunk

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        copy: _Copy | None = request.vars.pop(self._state, None)
        if copy is None:
            return
        if copy.too_large or not copy.complete or len(self._tasks) >= self.max_in_flight:
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._send(copy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, copy: _Copy) -> None:
        import aiohttp

        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(auto_decompress=False)
            async with self._session.request(
                copy.method,
                self.url + copy.target,
                headers=copy.headers,
                data=b"".join(copy.body) if copy.body else None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as answer:
                await answer.read()
            self.sent += 1
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.dropped += 1
            log.debug("mirror: %s failed: %s", self.url, exc)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            close_session_soon(session)
