"""Upstream HTTP/2: multiplexed client connections to one instance, and their pool.

``H2InstancePool`` keeps a small set of ``H2ClientConnection`` (an ``asyncio.Protocol`` driving
the sans-IO ``h2`` state machine, ``client_side=True``) to one instance, over h2c (prior
knowledge, plaintext) or h2 (TLS, ALPN ``h2``). A data-plane attempt opens a stream with
``pool.open_stream(headers, end_stream, listener)`` and drives it with plain calls; events come
back as listener callbacks (``StreamListener``). No task or coroutine per request: a task runs
only while a *connection* is being opened.

- **Capacity.** A connection takes new streams once the server's first SETTINGS arrived (so its
  ``SETTINGS_MAX_CONCURRENT_STREAMS`` is known) and while it has fewer open streams than that.
  Streams that find every connection full wait in the pool (at most ``max_pending``); another
  connection is opened for them while the pool has fewer than ``max_connections``.
- **GOAWAY.** The connection takes no new streams; streams above the GOAWAY's last-stream-id
  end with ``on_reset(REFUSED_STREAM, never_processed=True)`` (RFC 9113 §6.8: the server did not
  and will not process them, so any method may be retried); streams at or below it run to
  their end, then the connection closes. A ``RST_STREAM(REFUSED_STREAM)`` is never-processed
  too (RFC 9113 §8.7). ``h2`` treats a received GOAWAY as the end of the connection (every later
  frame is a protocol error); ``_ClientH2`` keeps the connection open instead so that streams
  below the last-stream-id can finish, which servers such as grpcio rely on when they drain.
- **Flow control, sending.** ``stream.send_data`` writes what the stream's and the connection's
  windows allow and keeps the rest; while anything is kept, the producer is paused
  (``on_send_paused``), and resumed (``on_send_resumed``) once a WINDOW_UPDATE (or the
  transport's ``resume_writing``) let it all out.
- **Flow control, receiving.** ``on_data(chunk)`` hands over bytes that the server may not
  replace until the consumer calls ``stream.acknowledge(len(chunk))``: a consumer that stops
  acknowledging (its client reads slowly) stops the upstream after one stream window, without
  stalling the other streams (the connection window is ``connection_window``, large).
- **Idle.** A connection without streams is idle; ``sweep(now)`` closes those idle longer than
  ``idle_timeout``, as for HTTP/1.1 pools (``gateway.pools.ConnectionPool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.config.model import UpstreamHttp2Config
from gateway.pools import PoolFactory
from gateway.proxy.h2.connection import H2ClientConnection
from gateway.proxy.h2.errors import UPSTREAM, ErrorCounter
from gateway.proxy.h2.stream import (
    CANCEL,
    CONNECTION_LOST,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    H2ConnectError,
    H2Stream,
    Headers,
    PoolUnavailable,
    StreamListener,
    request_headers,
)

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

# The module's surface, where the upstream HTTP/2 client is imported from (the pool here, the
# connection and stream types from connection.py and stream.py).
__all__ = [
    "CANCEL",
    "CONNECTION_LOST",
    "H2_POOL_FACTORY",
    "PROTOCOL_ERROR",
    "REFUSED_STREAM",
    "H2ClientConnection",
    "H2ConnectError",
    "H2InstancePool",
    "H2Stream",
    "Headers",
    "PoolUnavailable",
    "StreamListener",
    "h2_pool_factory",
    "request_headers",
]


class H2InstancePool:
    """HTTP/2 connections to one instance (``gateway.pools.ConnectionPool``): a few, each
    carrying up to the server's stream limit; ``idle`` lists those without streams."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int,
        idle_timeout: float,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_connections: int = 4,
        max_pending: int = 1024,
        stream_window: int = 1 << 20,
        connection_window: int = 16 << 20,
        max_header_list_size: int = 64 << 10,
        ping_interval: float | None = None,
        ping_timeout: float = 20.0,
        max_concurrent_streams: int | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.host = host
        self.port = port
        # ssl_context must offer ALPN h2 (gateway.tls.upstream.upstream_tls(..., alpn=H2_ALPN)).
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max(1, max_connections)
        self.max_pending = max_pending
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_header_list_size = max_header_list_size
        self.ping_interval = ping_interval  # seconds; None: no keepalive PINGs
        self.ping_timeout = ping_timeout  # seconds without a frame after a PING: dead
        # Our cap on streams per connection (below the server's limit); None: the server's.
        self.max_concurrent_streams = max_concurrent_streams
        self._loop = loop
        self.connections: list[H2ClientConnection] = []  # open, taking new streams when ready
        self.draining: list[H2ClientConnection] = []  # GOAWAY'd, finishing their streams
        self.idle: list[H2ClientConnection] = []  # open, no streams; oldest first
        self.pending: deque[H2Stream] = deque()
        self.connecting = 0
        self.closed = False
        # What a connection being opened is expected to carry: the last server's limit.
        self.expected_streams = 100
        self.connections_opened = 0  # total, for tests and the admin view
        # RST_STREAM / GOAWAY counts (gateway_http2_errors_total{side="upstream"}); its metrics
        # are bound by the first stream of the data plane (``bind_metrics``).
        self.error_counter = ErrorCounter(UPSTREAM)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def open_count(self) -> int:
        return len(self.connections) + len(self.draining)

    @property
    def active_streams(self) -> int:
        return sum(len(c.streams) for c in self.connections) + sum(
            len(c.streams) for c in self.draining
        )

    # -- streams -----------------------------------------------------------------------------
    def open_stream(self, headers: Headers, end_stream: bool, listener: StreamListener) -> H2Stream:
        """Start a request. ``headers`` include the pseudo-headers (``request_headers``);
        ``end_stream``: there is no body. Events go to ``listener``; a failure to connect is
        reported from the event loop, never from inside this call."""
        stream = H2Stream(self, headers, end_stream, listener)
        if self.closed or len(self.pending) >= self.max_pending:
            stream.reset_done = True
            reason = "closed" if self.closed else f"full ({self.max_pending} streams waiting)"
            error = PoolUnavailable(f"HTTP/2 pool of {self.host}:{self.port} is {reason}")
            self.loop.call_soon(listener.on_connect_error, error)
            return stream
        conn = self._available()
        if conn is not None:
            self._take(conn)
            conn.open(stream)
            return stream
        self.pending.append(stream)
        self._maybe_connect()
        return stream

    def _available(self) -> H2ClientConnection | None:
        for conn in self.connections:
            if conn.has_capacity():
                return conn
        return None

    def _take(self, conn: H2ClientConnection) -> None:
        if not conn.streams and self.idle:
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)

    def _dispatch(self) -> None:
        pending = self.pending
        while pending:
            conn = self._available()
            if conn is None:
                break
            stream = pending.popleft()
            self._take(conn)
            conn.open(stream)
        if pending:
            self._maybe_connect()

    def _maybe_connect(self) -> None:
        if self.closed:
            return
        # Connections without the server's SETTINGS yet are as good as connecting.
        coming = self.connecting + sum(1 for conn in self.connections if not conn.ready)
        while (
            len(self.pending) > coming * self.expected_streams
            and len(self.connections) + self.connecting < self.max_connections
        ):
            self._connect()
            coming += 1

    # -- connection events (from H2ClientConnection) ---------------------------------------
    def connection_opened(self, conn: H2ClientConnection) -> None:
        self.connections_opened += 1
        self.connections.append(conn)

    def connection_ready(self, conn: H2ClientConnection) -> None:
        if conn.max_streams > 0:
            self.expected_streams = min(conn.max_streams, 1000)
        self._dispatch()
        if not conn.streams:
            self.connection_idle(conn)

    def connection_draining(self, conn: H2ClientConnection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if conn not in self.draining:
            self.draining.append(conn)
        # Streams still waiting need another connection.
        self._maybe_connect()

    def connection_idle(self, conn: H2ClientConnection) -> None:
        """``conn`` has no streams left (or never had any)."""
        if conn.closed:
            return
        if conn.draining or self.closed:
            conn.close()
            return
        if self.pending:
            self._dispatch()
            if conn.streams:
                return
        if conn in self.idle:
            return
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def connection_closed(self, conn: H2ClientConnection, never_ready: bool = False) -> None:
        for group in (self.connections, self.draining, self.idle):
            with contextlib.suppress(ValueError):
                group.remove(conn)
        if never_ready:
            # Closed before its SETTINGS (not an HTTP/2 server?): a failed connect, not a
            # reason to open another connection at once.
            self._connect_failed(
                conn.connect_error
                or H2ConnectError(
                    f"instance {self.host}:{self.port} closed the connection before its"
                    " HTTP/2 SETTINGS (does it speak HTTP/2?)"
                )
            )
        elif self.pending:
            self._maybe_connect()

    # -- opening -----------------------------------------------------------------------------
    def _connect(self) -> None:
        self.connecting += 1
        self.loop.create_task(self._open_connection(), name=f"h2 connect {self.host}:{self.port}")

    async def _open_connection(self) -> None:
        loop = self.loop
        protocol: H2ClientConnection | None = None
        error: BaseException | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.ssl_context is None:
                    _, protocol = await loop.create_connection(
                        lambda: H2ClientConnection(self), self.host, self.port
                    )
                else:
                    _, protocol = await loop.create_connection(
                        lambda: H2ClientConnection(self),
                        self.host,
                        self.port,
                        ssl=self.ssl_context,
                        server_hostname=self.server_hostname,
                        ssl_handshake_timeout=self.connect_timeout,
                    )
        except ssl.SSLError as exc:
            error = ConnectionError(
                f"TLS handshake with {self.server_hostname or self.host} failed: {exc}"
            )
        except (OSError, TimeoutError) as exc:
            error = exc
        finally:
            self.connecting -= 1
        if error is None and protocol is not None and protocol.connect_error is not None:
            error = protocol.connect_error
        if error is not None:
            self._connect_failed(error)

    def _connect_failed(self, error: BaseException) -> None:
        if self.connections or self.connecting:
            return  # the streams waiting may still get a place there
        waiting = list(self.pending)
        self.pending.clear()
        for stream in waiting:
            stream.reset_done = True
            stream.listener.on_connect_error(error)

    # -- gateway.pools.ConnectionPool ----------------------------------------------------
    def sweep(self, now: float) -> None:
        cutoff = now - self.idle_timeout
        idle = self.idle
        while idle and idle[0].idle_since < cutoff:
            idle.pop(0).close()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()

    def close_all(self) -> None:
        """The instance left the config: idle connections close now, busy ones once their
        streams are done; waiting streams fail."""
        self.closed = True
        self.close_idle()
        for conn in list(self.connections):
            conn.draining = True
            self.connection_draining(conn)
        waiting = list(self.pending)
        self.pending.clear()
        error = PoolUnavailable(f"HTTP/2 pool of {self.host}:{self.port} is closed")
        for stream in waiting:
            stream.reset_done = True
            stream.listener.on_connect_error(error)

    # -- what the HTTP/1.1 data plane asks of an instance's pool ---------------------------
    # An HTTP/1.1 request (or an HTTP/2 stream the bridge carries: filters, Redis limits) is
    # translated to one stream: gateway/proxy/h2/from_h1.py.
    def acquire(self) -> None:
        return None

    def bind_metrics(self, metrics: GatewayMetrics, upstream: str = "") -> None:
        """Where its connections count RST_STREAM and GOAWAY frames (the first stream's)."""
        self.error_counter.metrics = metrics

    def connect(self, callback: Callable[[Any, BaseException | None], None]) -> None:
        from gateway.proxy.h2.from_h1 import connect_translated

        connect_translated(self, callback)


# The snapshot builds pools through gateway.pools' factory protocol: mypy checks here that this
# pool fits it (constructor and ConnectionPool surface), for the data plane to register it for
# upstreams.NAME.protocol h2c/h2.
H2_POOL_FACTORY: PoolFactory = H2InstancePool


def h2_pool_factory(settings: UpstreamHttp2Config) -> PoolFactory:
    """``H2InstancePool`` with an upstream's ``http2`` settings (``upstreams.NAME.http2``)."""
    return functools.partial(
        H2InstancePool,
        max_connections=settings.max_connections,
        max_pending=settings.max_pending,
        stream_window=settings.initial_window,
        connection_window=settings.connection_window,
        max_header_list_size=settings.max_header_list_size,
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        max_concurrent_streams=settings.max_concurrent_streams,
    )
