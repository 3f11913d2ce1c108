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
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from gateway.config.model import UpstreamHttp2Config
from gateway.pools import PoolFactory
from gateway.proxy.h2.errors import UPSTREAM, CountingH2Connection, ErrorCounter

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics

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


class _GoawayTolerantStateMachine(h2.connection.H2ConnectionStateMachine):
    # h2 closes the connection state on RECV_GOAWAY, so the frames that finish the streams
    # below the last-stream-id would be protocol errors. A client keeps it open; we open no new
    # streams on it ourselves (H2ClientConnection.draining).
    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (
            h2.connection.ConnectionState.CLIENT_OPEN,
            h2.connection.ConnectionInputs.RECV_GOAWAY,
        ): (None, h2.connection.ConnectionState.CLIENT_OPEN),
    }


class _ClientH2(CountingH2Connection):
    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.state_machine = _GoawayTolerantStateMachine()

    def clear_outbound_data_buffer(self) -> None:
        # Called by h2 on GOAWAY: it would drop the SETTINGS/PING ACKs and WINDOW_UPDATEs of
        # the same read, which the streams that go on still need.
        pass


_H2_CONFIG = h2.config.H2Configuration(client_side=True, header_encoding=None)


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


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection to an instance, many streams."""

    def __init__(self, pool: H2InstancePool) -> None:
        self.pool = pool
        self.h2 = _ClientH2(_H2_CONFIG)
        self.h2.error_counter = pool.error_counter
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.ready = False  # the server's SETTINGS arrived: max_streams is known
        self.draining = False  # GOAWAY received, or closing: no new streams
        self.closed = False
        self.write_paused = False
        self.max_streams = 0
        self.idle_since = time.monotonic()
        self.goaway_last_stream_id: int | None = None
        self.connect_error: BaseException | None = None
        self.settings_timer: asyncio.TimerHandle | None = None
        # PING keepalive (pool.ping_interval): a connection silent for a whole interval gets a
        # PING; if no frame at all arrives within pool.ping_timeout after it, it is dead.
        self.keepalive_timer: asyncio.TimerHandle | None = None
        self.ping_timer: asyncio.TimerHandle | None = None
        self.read_since_tick = False
        self.read_since_ping = False
        self.ping_outstanding = False

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass: no isinstance).
        self.transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            chosen = ssl_object.selected_alpn_protocol()
            if chosen != "h2":
                self.connect_error = H2ConnectError(
                    f"instance {self.pool.host}:{self.pool.port} did not choose h2 by ALPN"
                    f" (it chose {chosen or 'nothing'})"
                )
                self.closed = True
                transport.abort()
                return
        pool = self.pool
        h2conn = self.h2
        h2conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: pool.stream_window,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: pool.max_header_list_size,
            },
        )
        h2conn.initiate_connection()
        if pool.connection_window > 65535:
            h2conn.increment_flow_control_window(pool.connection_window - 65535)
        self.flush()
        # A server that never sends its SETTINGS is a failed connect, not a hung stream.
        self.settings_timer = pool.loop.call_later(pool.connect_timeout, self._settings_timeout)
        pool.connection_opened(self)

    def _settings_timeout(self) -> None:
        self.settings_timer = None
        if not self.ready and not self.closed:
            self.connect_error = H2ConnectError(
                f"instance {self.pool.host}:{self.pool.port} sent no HTTP/2 SETTINGS within"
                f" {self.pool.connect_timeout:g}s"
            )
            self.close(goaway=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.settings_timer is not None:
            self.settings_timer.cancel()
            self.settings_timer = None
        if self.keepalive_timer is not None:
            self.keepalive_timer.cancel()
            self.keepalive_timer = None
        if self.ping_timer is not None:
            self.ping_timer.cancel()
            self.ping_timer = None
        self.draining = True
        streams = list(self.streams.values())
        self.streams.clear()
        never_ready = not self.ready
        for stream in streams:
            if stream.reset_done or stream.remote_closed:
                continue  # reset by us, or its response is complete
            stream.reset_done = True
            stream.listener.on_reset(CONNECTION_LOST, False)
        self.pool.connection_closed(self, never_ready)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.outbox or stream.end_pending:
                self.push(stream)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.read_since_tick = True
        self.read_since_ping = True
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            # h2 queued a GOAWAY naming the error; every stream fails with the connection.
            self.flush()
            self.close(goaway=False)
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                self._on_data(stream, event)  # type: ignore[arg-type]
            elif kind is h2.events.ResponseReceived:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    self._on_response(stream, event.headers)  # type: ignore[attr-defined]
            elif kind is h2.events.StreamEnded:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream.remote_closed = True
                    if stream.local_closed:
                        self._discard(stream)
                    stream.listener.on_end()
            elif kind is h2.events.TrailersReceived:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream.listener.on_trailers(list(event.headers))  # type: ignore[attr-defined]
            elif kind is h2.events.WindowUpdated:
                self._on_window_update(event.stream_id)  # type: ignore[attr-defined]
            elif kind is h2.events.StreamReset:
                stream = streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    self._on_reset(stream, int(event.error_code))  # type: ignore[attr-defined]
            elif kind is h2.events.RemoteSettingsChanged:
                self._on_settings()
            elif kind is h2.events.ConnectionTerminated:
                self._on_goaway(event.last_stream_id)  # type: ignore[attr-defined]
            elif kind is h2.events.PingAckReceived:
                self.ping_outstanding = False
                if self.ping_timer is not None:
                    self.ping_timer.cancel()
                    self.ping_timer = None
        self.flush()
        if not self.streams and self.ready and not self.closed:
            self.pool.connection_idle(self)

    # -- events ------------------------------------------------------------------------------
    def _on_response(self, stream: H2Stream, raw: Headers) -> None:
        status = 0
        headers: Headers = []
        for name, value in raw:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)
            else:
                headers.append((name, value))
        stream.listener.on_response_headers(status, headers)

    def _on_data(self, stream: H2Stream | None, event: h2.events.DataReceived) -> None:
        data = event.data or b""
        padding = (event.flow_controlled_length or 0) - len(data)
        if stream is None or stream.reset_done:
            # Not ours any more: hand the window straight back.
            if event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        if padding > 0:
            self.h2.acknowledge_received_data(padding, event.stream_id)
        if data:
            stream.unacked += len(data)
            stream.listener.on_data(data)

    def _on_window_update(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and (stream.outbox or stream.end_pending):
                self.push(stream)
            return
        for stream in list(self.streams.values()):
            if stream.outbox:
                self.push(stream)

    def _on_reset(self, stream: H2Stream, error_code: int) -> None:
        self._discard(stream)
        if stream.remote_closed or stream.reset_done:
            # RST_STREAM(NO_ERROR) after a complete response only stops our request body
            # (RFC 9113 §8.1); the response stands.
            stream.reset_done = True
            return
        stream.reset_done = True
        stream.listener.on_reset(error_code, error_code == REFUSED_STREAM)

    def _on_settings(self) -> None:
        self.max_streams = self.h2.remote_settings.max_concurrent_streams
        cap = self.pool.max_concurrent_streams
        if cap is not None and cap < self.max_streams:
            self.max_streams = cap
        if not self.ready and self.pool.ping_interval:
            self.keepalive_timer = self.pool.loop.call_later(
                self.pool.ping_interval, self._keepalive
            )
        self.ready = True
        if self.settings_timer is not None:
            self.settings_timer.cancel()
            self.settings_timer = None
        # A larger INITIAL_WINDOW_SIZE may have opened held-back streams.
        for stream in list(self.streams.values()):
            if stream.outbox:
                self.push(stream)
        if not self.draining:
            self.pool.connection_ready(self)

    def _keepalive(self) -> None:
        self.keepalive_timer = None
        if self.closed:
            return
        pool = self.pool
        if not self.read_since_tick and not self.ping_outstanding:
            self.h2.ping(b"keepaliv")
            self.ping_outstanding = True
            self.read_since_ping = False
            self.ping_timer = pool.loop.call_later(pool.ping_timeout, self._ping_timeout)
            self.flush()
        self.read_since_tick = False
        interval = pool.ping_interval
        assert interval is not None
        self.keepalive_timer = pool.loop.call_later(interval, self._keepalive)

    def _ping_timeout(self) -> None:
        self.ping_timer = None
        if self.closed or not self.ping_outstanding:
            return
        if self.read_since_ping:
            # Frames arrive, the ACK is only late (behind other frames): the peer is alive, and
            # the timeout starts again (as Envoy extends it on any frame).
            self.read_since_ping = False
            self.ping_timer = self.pool.loop.call_later(self.pool.ping_timeout, self._ping_timeout)
            return
        # Nothing heard since the PING: the peer (or the path to it) is gone. Its streams fail
        # now instead of at their timeouts.
        self.close(goaway=False)

    def _on_goaway(self, last_stream_id: int) -> None:
        self.draining = True
        self.goaway_last_stream_id = last_stream_id
        self.pool.connection_draining(self)
        for stream_id in [sid for sid in self.streams if sid > last_stream_id]:
            stream = self.streams.pop(stream_id)
            if stream.reset_done or stream.remote_closed:
                continue
            stream.reset_done = True
            stream.listener.on_reset(REFUSED_STREAM, True)

    # -- the streams' side -------------------------------------------------------------------
    def has_capacity(self) -> bool:
        return self.ready and not self.draining and len(self.streams) < self.max_streams

    def open(self, stream: H2Stream) -> None:
        """Send the stream's HEADERS (and whatever body it already has)."""
        h2conn = self.h2
        stream_id = h2conn.get_next_available_stream_id()
        headers = stream.headers
        assert headers is not None
        stream.headers = None
        end_now = stream.end_pending and not stream.outbox and stream.trailers is None
        try:
            h2conn.send_headers(stream_id, headers, end_stream=end_now)
        except (h2.exceptions.ProtocolError, ValueError, TypeError) as error:
            # Headers h2 will not send (a bug upstream of us): the request never left.
            stream.reset_done = True
            self.pool.loop.call_soon(stream.listener.on_connect_error, error)
            return
        stream.conn = self
        stream.stream_id = stream_id
        self.streams[stream_id] = stream
        if end_now:
            stream.local_closed = True
        elif stream.outbox or stream.end_pending:
            self.push(stream, flush=False)
        self.flush()

    def push(self, stream: H2Stream, flush: bool = True) -> None:
        """Send what the windows allow of the stream's held-back body, then its end."""
        if self.closed or stream.reset_done or stream.local_closed:
            return
        try:
            self._push(stream)
        except h2.exceptions.StreamClosedError:
            # The server reset it in the read being handled; its StreamReset event follows.
            stream.outbox = None
        if flush:
            self.flush()

    def _push(self, stream: H2Stream) -> None:
        h2conn = self.h2
        stream_id = stream.stream_id
        outbox = stream.outbox
        if outbox and not self.write_paused:
            max_frame = h2conn.max_outbound_frame_size
            while outbox:
                window = h2conn.local_flow_control_window(stream_id)
                if window <= 0:
                    break
                chunk = outbox[0]
                offset = stream.offset
                size = min(window, max_frame, len(chunk) - offset)
                piece = (
                    chunk if offset == 0 and size == len(chunk) else chunk[offset : offset + size]
                )
                if offset + size == len(chunk):
                    outbox.popleft()
                    stream.offset = 0
                else:
                    stream.offset = offset + size
                last = not outbox and stream.end_pending and stream.trailers is None
                h2conn.send_data(stream_id, piece, end_stream=last)
                if last:
                    stream.local_closed = True
        if outbox:
            if not stream.paused:
                stream.paused = True
                stream.listener.on_send_paused()
        else:
            if stream.end_pending and not stream.local_closed:
                if stream.trailers is not None:
                    h2conn.send_headers(stream_id, stream.trailers, end_stream=True)
                    stream.trailers = None
                else:
                    h2conn.end_stream(stream_id)
                stream.local_closed = True
            if stream.paused:
                stream.paused = False
                stream.listener.on_send_resumed()
        if stream.local_closed and stream.remote_closed:
            self._discard(stream)

    def reset_stream(self, stream: H2Stream, error_code: int) -> None:
        self._discard(stream)
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream.stream_id, error_code)
        if stream.unacked:  # bytes nobody will take: the connection window gets them back
            self.h2.acknowledge_received_data(stream.unacked, stream.stream_id)
            stream.unacked = 0
        self.flush()
        if not self.streams:
            self.pool.connection_idle(self)

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        self.h2.acknowledge_received_data(size, stream.stream_id)
        self.flush()

    def _discard(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        stream.outbox = None
        if stream.paused:
            stream.paused = False

    # -- connection --------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self, goaway: bool = True) -> None:
        """GOAWAY and close; streams still open fail with ``CONNECTION_LOST``."""
        if self.closed or self.transport is None:
            return
        self.draining = True
        if goaway:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self.flush()
        self.closed = True
        self.transport.close()


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
