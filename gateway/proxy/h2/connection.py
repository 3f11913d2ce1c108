"""One upstream HTTP/2 connection: an ``asyncio.Protocol`` driving the sans-IO ``h2`` state
machine (``client_side=True``) for the streams of an ``H2InstancePool`` (overview:
gateway/proxy/h2/client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from gateway.proxy.h2.errors import CountingH2Connection
from gateway.proxy.h2.stream import (
    CONNECTION_LOST,
    REFUSED_STREAM,
    H2ConnectError,
    H2Stream,
    Headers,
)

if TYPE_CHECKING:
    from gateway.proxy.h2.client import H2InstancePool


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
