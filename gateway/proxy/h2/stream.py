"""Upstream HTTP/2 streams: what an attempt holds (``H2Stream``), what it hears
(``StreamListener``), and the names they share (gateway/proxy/h2/client.py has the overview).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from h2.errors import ErrorCodes

if TYPE_CHECKING:
    from gateway.proxy.h2.client import H2InstancePool
    from gateway.proxy.h2.connection import H2ClientConnection

# on_reset's error_code when the connection ended under the stream (no HTTP/2 code applies).
CONNECTION_LOST = -1
REFUSED_STREAM = int(ErrorCodes.REFUSED_STREAM)
CANCEL = int(ErrorCodes.CANCEL)
PROTOCOL_ERROR = int(ErrorCodes.PROTOCOL_ERROR)

Headers = list[tuple[bytes, bytes]]


class StreamListener(Protocol):
    """What a stream reports to the attempt that opened it. After ``on_end``, ``on_reset`` or
    ``on_connect_error`` nothing more is reported; after ``stream.reset()`` nothing at all."""

    def on_response_headers(self, status: int, headers: Headers) -> None:
        """The final response head (1xx heads are skipped); ``headers`` without pseudo-headers."""

    def on_data(self, chunk: bytes) -> None:
        """Response body bytes; call ``stream.acknowledge(len(chunk))`` once they are taken."""

    def on_trailers(self, headers: Headers) -> None: ...

    def on_end(self) -> None:
        """The response is complete (after its trailers, if any)."""

    def on_reset(self, error_code: int, never_processed: bool) -> None:
        """The stream ended before its response did: RST_STREAM from the server, a GOAWAY that
        excluded it, or the connection lost (``CONNECTION_LOST``). ``never_processed``: the
        server did not act on the request, so it may be retried whatever the method."""

    def on_connect_error(self, error: BaseException) -> None:
        """No connection could be opened for the stream (refused, timeout, TLS, no h2 by ALPN,
        or the pool is closed/full); the request was never sent."""

    def on_send_paused(self) -> None:
        """Flow control holds request bytes back: stop producing until ``on_send_resumed``."""

    def on_send_resumed(self) -> None: ...


class H2ConnectError(ConnectionError):
    """An instance that cannot be spoken to over HTTP/2 (e.g. it chose no h2 by ALPN)."""


class PoolUnavailable(ConnectionError):
    """The pool is closed, or too many streams already wait for a connection."""


def request_headers(
    method: bytes,
    scheme: bytes,
    authority: bytes,
    path: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> Headers:
    """A request header list: the four pseudo-headers first (RFC 9113 §8.3.1), then
    ``headers`` (lower-case names, no connection-specific fields)."""
    out = [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", path)]
    out.extend(headers)
    return out


class H2Stream:
    """One request/response exchange on a connection (or waiting in the pool for one)."""

    __slots__ = (
        "conn",
        "end_pending",
        "headers",
        "listener",
        "local_closed",
        "offset",
        "outbox",
        "paused",
        "pool",
        "remote_closed",
        "reset_done",
        "stream_id",
        "trailers",
        "unacked",
    )

    def __init__(
        self, pool: H2InstancePool, headers: Headers, end_stream: bool, listener: StreamListener
    ) -> None:
        self.pool = pool
        self.conn: H2ClientConnection | None = None
        self.stream_id = 0  # 0 until it is sent on a connection
        self.headers: Headers | None = headers  # until sent
        self.listener = listener
        self.outbox: deque[bytes] | None = None  # request bytes flow control holds back
        self.offset = 0  # sent bytes of outbox[0]
        self.end_pending = end_stream  # END_STREAM wanted once the outbox is out
        self.trailers: Headers | None = None
        self.local_closed = False  # our END_STREAM sent
        self.remote_closed = False  # the response ended
        self.reset_done = False  # reset by us, or ended by the server/connection
        self.paused = False
        self.unacked = 0  # response bytes handed to the listener and not yet acknowledged

    # -- the attempt's side ------------------------------------------------------------------
    def send_data(self, chunk: bytes, end: bool = False) -> None:
        """Send request body bytes (``end``: the body is complete)."""
        if self.reset_done or self.local_closed or self.end_pending:
            return
        if chunk:
            if self.outbox is None:
                self.outbox = deque()
            self.outbox.append(chunk)
        self.end_pending = end
        conn = self.conn
        if conn is not None:
            conn.push(self)
        elif chunk and not self.paused:
            # Still waiting for a connection: hold the producer until the bytes can go.
            self.paused = True
            self.listener.on_send_paused()

    def send_trailers(self, headers: Headers) -> None:
        """End the request with trailers (after any body bytes still held back)."""
        if self.reset_done or self.local_closed or self.end_pending:
            return
        self.trailers = headers
        self.end_pending = True
        conn = self.conn
        if conn is not None:
            conn.push(self)

    def reset(self, error_code: int = CANCEL) -> None:
        """Abandon the stream (the client went away, a timeout, another try won): RST_STREAM
        if it was sent, and nothing more is reported."""
        if self.reset_done:
            return
        self.reset_done = True
        conn = self.conn
        if conn is None:
            with contextlib.suppress(ValueError):
                self.pool.pending.remove(self)
            return
        conn.reset_stream(self, error_code)

    def acknowledge(self, size: int) -> None:
        """``size`` bytes of the response were taken: the server may send that many more."""
        size = min(size, self.unacked)
        if size <= 0:
            return
        self.unacked -= size
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.acknowledge(self, size)

    @property
    def pending_bytes(self) -> int:
        """Request bytes held back by flow control."""
        if not self.outbox:
            return 0
        return sum(len(chunk) for chunk in self.outbox) - self.offset
