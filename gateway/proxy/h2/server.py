"""The server side of one HTTP/2 connection: an ``asyncio.Protocol`` over ``h2``'s sans-IO
``H2Connection``.

Framing, HPACK and stream states are h2's; the limits that make a public endpoint safe are
ours (docs/http2.md):

- **Advertised vs enforced.** h2 would turn an extra stream or a large header list into a
  connection error. We advertise the configured SETTINGS ourselves and give h2 looser internal
  limits, so that an extra stream gets RST_STREAM REFUSED_STREAM (RFC 9113 §5.1.2) and a header
  list over ``max_header_list_size`` gets 431 on its stream, while a block that decodes far
  beyond it (an HPACK bomb) still ends the connection (h2: ENHANCE_YOUR_CALM).
- **CONTINUATION flood** (CVE-2024-27316): h2 caps a header block at 64 frames, but each may be
  ``max_frame_size`` long; ``_CappedFrameBuffer`` also caps the encoded bytes before
  END_HEADERS.
- **Rapid reset** (CVE-2023-44487), **PING** and **SETTINGS** floods: per-second caps per
  connection; beyond them GOAWAY ENHANCE_YOUR_CALM, queued replies dropped, and close.
- **Malformed requests** (§8.1.1, §8.2, §8.3): checked by ``headers.request_head``; a stream
  error PROTOCOL_ERROR, the connection lives on.
- **Graceful drain**: a GOAWAY (NO_ERROR, last stream id) written as a raw frame, since h2's
  ``close_connection`` moves its state machine to CLOSED and would refuse the frames of the
  streams still finishing; streams opened after it are refused.

Flow control: request DATA is acknowledged (WINDOW_UPDATE) only once handed on to the HTTP/1.1
machinery, which stops taking it when the upstream is slow, so a client can never have more
than its window outstanding. Response DATA is sent as the peer's windows allow; the rest waits
on the stream, whose producer is paused (see ``bridge.StreamBridge``). A full socket buffer
(``pause_writing``) pauses every stream's producer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from gateway.proxy.h2.bridge import StreamBridge
from gateway.proxy.h2.errors import DOWNSTREAM, GOAWAY, SENT, CountingH2Connection, ErrorCounter
from gateway.proxy.h2.forward import NativeStream
from gateway.proxy.h2.headers import count_error

LINGER = 2.0  # seconds a connection closed after an error keeps reading (and dropping) bytes
LINGER_MAX = 1024

if TYPE_CHECKING:
    from gateway.config.model import Http2Config
    from gateway.proxy.server import ProxyServer
    from gateway.tls.accept import ListenerState

log = logging.getLogger("gateway.proxy.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
# The window every connection starts with (RFC 9113 §6.9.2), before any WINDOW_UPDATE.
_DEFAULT_WINDOW = 65535
# h2's own cap on a decoded header list, as a multiple of the advertised one: between the two a
# request gets 431 on its stream; beyond it the block is a bomb and the connection ends.
HPACK_BOMB_FACTOR = 4
_INTERNAL_MAX_STREAMS = 2**31 - 1  # h2 does not refuse streams: we do (REFUSED_STREAM)

_H2_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    # Validation is ours (headers.request_head): stream errors rather than h2's connection
    # errors, in one pass instead of a chain of generators.
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class RateCap:
    """At most ``limit`` events per one-second window (time passed in)."""

    __slots__ = ("count", "limit", "window_end")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.window_end = 0.0

    def exceeded(self, now: float) -> bool:
        """Count one event; True once the window holds more than ``limit``."""
        if now >= self.window_end:
            self.window_end = now + 1.0
            self.count = 0
        self.count += 1
        return self.count > self.limit


class _CappedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, with a cap on the encoded bytes of a header block still waiting for
    END_HEADERS (CVE-2024-27316: CONTINUATION frames without end)."""

    def __init__(self, max_block: int) -> None:
        super().__init__(server=True)
        self.max_block = max_block
        self.block_bytes = 0

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, HeadersFrame | ContinuationFrame):
            if "END_HEADERS" in f.flags:
                self.block_bytes = 0
            else:
                self.block_bytes += len(f.data)
                if self.block_bytes > self.max_block:
                    msg = "header block over max_header_block before END_HEADERS"
                    raise h2.exceptions.DenialOfServiceError(msg)
        return super()._update_header_buffer(f)


class _Connection(CountingH2Connection):
    """h2's connection, without its per-stream O(open streams) count: h2 walks every stream
    it holds on each new one (to refuse streams over its limit, which we do ourselves). Closed
    streams are still purged from ``streams``, once their number doubled."""

    purge_at = 256

    @property
    def open_inbound_streams(self) -> int:
        if len(self.streams) >= self.purge_at:
            self._open_streams(1)  # (drops closed streams)
            self.purge_at = max(256, 2 * len(self.streams))
        return 0  # never over h2's internal limit: H2ServerConnection enforces the real one


class H2ServerConnection(asyncio.Protocol):
    """One client's HTTP/2 connection; each stream is driven by a ``StreamBridge``."""

    def __init__(self, server: ProxyServer, listener: ListenerState, settings: Http2Config) -> None:
        self.server = server
        self.listener = listener
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamBridge | NativeStream] = {}
        self.closed = False
        self.counted = False  # holds a slot of server.connection_count
        self.write_paused = False
        self.flush_pending = False
        self.goaway_sent = False
        self.last_stream_id = 0  # highest stream id handed to the data plane
        self.limits = server.snapshot.config.limits
        self.idle_deadline = 0.0
        self.resets = RateCap(settings.max_resets_per_second)
        self.pings = RateCap(settings.max_pings_per_second)
        self.settings_frames = RateCap(settings.max_settings_per_second)
        self.peer_ip = ""
        conn = _Connection(_H2_CONFIG)
        conn.error_counter = self.error_counter = ErrorCounter(DOWNSTREAM, server.metrics)
        self.conn: h2.connection.H2Connection = conn
        # h2's limits (looser: see the module docstring); the SETTINGS frame we send carries
        # the configured ones.
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _INTERNAL_MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.initial_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size
                * HPACK_BOMB_FACTOR,
            },
        )
        conn.max_inbound_frame_size = settings.max_frame_size
        conn.decoder.max_header_list_size = settings.max_header_list_size * HPACK_BOMB_FACTOR
        conn.incoming_buffer = _CappedFrameBuffer(settings.max_header_block)
        conn.incoming_buffer.max_frame_size = settings.max_frame_size

    # -- what ProxyServer asks of every connection (sweep, drain, close) ---------------------
    def is_idle(self) -> bool:
        return not self.streams

    def close_idle(self) -> None:
        self.flush()  # (the last stream's frames may still wait for a scheduled flush)
        self.send_goaway()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def check_timeouts(self, now: float) -> None:
        if self.closed:
            return
        if self.server.draining and not self.goaway_sent:
            self.send_goaway()
        for bridge in list(self.streams.values()):
            bridge.check_idle()
        if not self.streams and (
            self.goaway_sent or (self.idle_deadline and now > self.idle_deadline)
        ):
            self.close_idle()

    # -- connection lifecycle ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A fresh connection (TLS with ALPN h2): count it like any client connection."""
        transport = cast(asyncio.Transport, transport)
        server = self.server
        if server.draining or not server.connection_count.try_open(self.limits.max_connections):
            self.closed = True
            self.transport = transport
            server.metrics.connection_refused("draining" if server.draining else "max_connections")
            transport.abort()
            return
        self.counted = True
        server.connections.add(self)  # type: ignore[arg-type]  # duck-typed: see above
        server.metrics.connections_open += 1
        self.start(transport, b"")

    def adopt(self, transport: asyncio.Transport, first: bytes) -> None:
        """Take over a plaintext connection whose first bytes are the h2c preface; the
        ``ClientConnection`` that accepted it hands over its slot in the connection count."""
        self.counted = True
        self.server.connections.add(self)  # type: ignore[arg-type]
        transport.set_protocol(self)
        self.start(transport, first)

    def start(self, transport: asyncio.Transport, first: bytes) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(self.limits.client_write_buffer)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "0.0.0.0"
        self.idle_deadline = self.server.clock + self.limits.header_timeout
        conn = self.conn
        settings = self.settings
        conn.initiate_connection()
        conn.data_to_send()  # h2's SETTINGS carries the internal limits: ours goes instead
        frame = SettingsFrame(0)
        frame.settings = {
            SettingsFrame.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingsFrame.INITIAL_WINDOW_SIZE: settings.initial_window,
            SettingsFrame.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingsFrame.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            SettingsFrame.ENABLE_PUSH: 0,
        }
        transport.write(frame.serialize())
        if settings.connection_window > _DEFAULT_WINDOW:
            conn.increment_flow_control_window(settings.connection_window - _DEFAULT_WINDOW)
        self.flush()
        if first:
            self.data_received(first)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and not self.counted:
            return
        self.closed = True
        server = self.server
        if self.counted:
            self.counted = False
            server.connections.discard(self)
            server.connection_count.close()
            server.closed_since_trim += 1
            server.metrics.connections_open -= 1
        streams, self.streams = self.streams, {}
        for bridge in streams.values():
            bridge.client_gone()
        if server.draining and not server.connections:
            server._drained.set()

    def eof_received(self) -> bool:
        return False  # close: an HTTP/2 client that half-closes is done

    def pause_writing(self) -> None:
        self.write_paused = True
        for bridge in self.streams.values():
            bridge.update_producer()

    def resume_writing(self) -> None:
        self.write_paused = False
        for bridge in list(self.streams.values()):
            bridge.update_producer()

    # -- frames in -----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        conn = self.conn
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            # h2 queued a GOAWAY with the error's code; send it and close.
            log.debug("h2 connection error from %s: %s", self.peer_ip, error)
            count_error(_error_name(error))
            self.flush()
            self.close_now()
            return
        now = self.server.clock
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                event = cast(h2.events.DataReceived, event)
                bridge = self.streams.get(event.stream_id)
                if bridge is not None:
                    bridge.request_data(event.data or b"", event.flow_controlled_length or 0)
                else:
                    conn.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id
                    )
            elif kind is h2.events.RequestReceived:
                self._request(cast(h2.events.RequestReceived, event))
            elif kind is h2.events.StreamEnded:
                bridge = self.streams.get(event.stream_id)  # type: ignore[attr-defined]
                if bridge is not None:
                    bridge.request_end()
            elif kind is h2.events.WindowUpdated:
                stream_id = event.stream_id  # type: ignore[attr-defined]
                if stream_id == 0:
                    self.window_opened_all()
                else:
                    bridge = self.streams.get(stream_id)
                    if bridge is not None:
                        bridge.window_opened()
            elif kind is h2.events.StreamReset:
                stream_id = event.stream_id  # type: ignore[attr-defined]
                bridge = self.streams.pop(stream_id, None)
                if bridge is not None:
                    bridge.client_gone()
                if event.remote_reset and self.resets.exceeded(now):  # type: ignore[attr-defined]
                    self.calm_down("rapid_reset")
                    return
            elif kind is h2.events.PingReceived:
                if self.pings.exceeded(now):
                    self.calm_down("ping_flood")
                    return
            elif kind is h2.events.RemoteSettingsChanged:
                if self.settings_frames.exceeded(now):
                    self.calm_down("settings_flood")
                    return
                # A new SETTINGS_INITIAL_WINDOW_SIZE changes every stream's window.
                self.window_opened_all()
            elif kind is h2.events.ConnectionTerminated:
                self.flush()
                self.close_now()
                return
            elif kind is h2.events.TrailersReceived:
                # Forwarded by a native exchange; the bridge (HTTP/1.1 upstream) drops them.
                # The stream's end follows as StreamEnded.
                bridge = self.streams.get(event.stream_id)  # type: ignore[attr-defined]
                if bridge is not None:
                    bridge.request_trailers(list(event.headers or []))  # type: ignore[attr-defined]
            # Others (priority, ACKs) need nothing.
        self.flush()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        conn = self.conn
        if self.goaway_sent or len(self.streams) >= self.settings.max_concurrent_streams:
            # RFC 9113 §5.1.2: over the advertised limit, REFUSED_STREAM (the client may retry
            # it: nothing was processed). §6.8: streams after our GOAWAY are not processed.
            conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            count_error("refused_stream")
            # Streams we refuse cost work too: they count toward the rapid-reset cap.
            if self.resets.exceeded(self.server.clock):
                self.calm_down("rapid_reset")
            return
        self.last_stream_id = stream_id
        self.idle_deadline = 0.0
        if self.server.snapshot.h2_upstreams:
            # Routed to an HTTP/2 upstream: exchanged natively (trailers and all).
            native = NativeStream(self, stream_id)
            self.streams[stream_id] = native
            if native.start(event.headers or [], event.stream_ended is not None):
                return
            del self.streams[stream_id]
        bridge = StreamBridge(self, stream_id)
        self.streams[stream_id] = bridge
        bridge.start(event.headers or [], event.stream_ended is not None)

    # -- frames out ---------------------------------------------------------------------------
    def flush(self) -> None:
        self.flush_pending = False
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def schedule_flush(self) -> None:
        """Frames made outside ``data_received`` (responses arriving from upstreams) are
        written once per event-loop iteration: one write for all the streams that answered in
        it, instead of one per stream."""
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def window_opened_all(self) -> None:
        for bridge in list(self.streams.values()):
            bridge.window_opened()

    def stream_done(self, stream_id: int) -> None:
        """A bridge finished (response sent, or reset)."""
        self.streams.pop(stream_id, None)
        if not self.streams:
            if self.goaway_sent:
                self.close_idle()
            else:
                self.idle_deadline = self.server.clock + self.limits.keepalive_timeout

    def send_goaway(self, error: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """GOAWAY with the last stream we process (RFC 9113 §6.8), as a raw frame: h2 would
        move to CLOSED and refuse the frames of the streams still finishing."""
        if self.goaway_sent or self.transport is None or self.transport.is_closing():
            return
        self.goaway_sent = True
        self.flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream_id
        frame.error_code = error
        self.transport.write(frame.serialize())
        if error:
            self.error_counter.count(SENT, GOAWAY, error)

    def calm_down(self, reason: str) -> None:
        """A flood cap was passed: drop the replies h2 queued for it, GOAWAY
        ENHANCE_YOUR_CALM, close."""
        count_error(reason)
        log.info("h2 %s from %s: closing the connection", reason, self.peer_ip)
        self.conn.data_to_send()  # PING ACKs and the like are not owed to a flooder
        self.send_goaway(ErrorCodes.ENHANCE_YOUR_CALM)
        self.close_now()

    def close_now(self) -> None:
        """End the connection after an error. Where the transport can half-close, it lingers:
        closing with unread client bytes would send a TCP RST, and the client would lose the
        GOAWAY telling it why (the gateway's refusals do the same)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if not transport.can_write_eof() or transport.is_closing():
            self.connection_lost(None)
            transport.close()
            return
        self.connection_lost(None)
        server = self.server
        transport.set_protocol(_Discard())
        transport.write_eof()
        if len(server.lingering) >= LINGER_MAX:
            transport.close()
            return
        server.lingering.append((server.clock + LINGER, transport))


class _Discard(asyncio.Protocol):
    """What is left of a connection closed after an error: its bytes go nowhere."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False


def _error_name(error: h2.exceptions.ProtocolError) -> str:
    code = getattr(error, "error_code", ErrorCodes.PROTOCOL_ERROR)
    try:
        return ErrorCodes(code).name.lower()
    except ValueError:
        return "protocol_error"
