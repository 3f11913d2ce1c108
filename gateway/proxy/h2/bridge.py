"""A temporary bridge: each HTTP/2 stream driven through the HTTP/1.1 ``ClientConnection``.

**To be replaced by the lifecycle's codec-neutral ``Downstream`` seam** (the data-plane
restructure under way): once an exchange can be driven by any codec, an HTTP/2 stream feeds it
directly and this module goes away. Until then, every stream gets the whole existing data plane
(routing, limits, balancing, retries, hedging, idempotency, timeouts, metrics, access log) this
way:

1. the stream's header list is checked and turned into an HTTP/1.1 request head
   (``headers.request_head``: ``:authority`` → Host, cookies joined, ``connection: close``);
2. a ``ClientConnection`` is attached to a ``_StreamTransport`` (in memory) and fed that head,
   then the body (chunked when the client gave no content-length);
3. what the connection writes back is parsed with ``httptools.HttpResponseParser`` and sent as
   HEADERS and DATA on the stream; ``connection: close`` makes the HTTP/1.1 side end the exchange
   by closing the in-memory transport, after it counted and logged the request.

Backpressure maps one to one: the in-memory transport's ``pause_reading`` (the upstream does not
take the body) stops the acknowledging of request DATA, so the client's window closes; a
response the client's window cannot take waits here and the connection's ``pause_writing``
stops reading the upstream (and arms ``limits.send_timeout``). The cost of the double encoding
is measured in docs/http2.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import httptools
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

from gateway.proxy.h2.headers import (
    MalformedRequest,
    count_error,
    request_head,
    response_fields,
)
from gateway.proxy.h2.window import send_within_window

if TYPE_CHECKING:
    import h2.connection

    from gateway.config.model import Http2Config
    from gateway.proxy.listener import ClientConnection
    from gateway.proxy.server import ProxyServer
    from gateway.tls.accept import ListenerState


class StreamOwner(Protocol):
    """What a bridge needs of its HTTP/2 connection (``server.StreamOwner``)."""

    conn: h2.connection.H2Connection
    settings: Http2Config
    server: ProxyServer
    listener: ListenerState
    transport: asyncio.Transport | None
    write_paused: bool

    def flush(self) -> None: ...

    def schedule_flush(self) -> None: ...

    def stream_done(self, stream_id: int) -> None: ...


_LOCAL_REASONS = {431: b"request header fields too large"}


def _stream_client() -> type[ClientConnection]:
    """``listener.StreamClient``: imported on first use (listener.py imports this package)."""
    from gateway.proxy.listener import StreamClient

    return StreamClient


class _StreamTransport(asyncio.Transport):
    """The transport a bridged ``ClientConnection`` writes to: one HTTP/2 stream."""

    __slots__ = ("bridge", "closing", "protocol", "reading", "real")

    def __init__(self, bridge: StreamBridge, real: asyncio.Transport) -> None:
        super().__init__()
        self.bridge = bridge
        self.real = real
        self.closing = False
        self.reading = True
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self.bridge.response_bytes(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.bridge.exchange_closed(abort=False)

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return True

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            self.bridge.exchange_closed(abort=True)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.bridge.feed_pending()

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # peername and ssl_object (SNI, client certificate) are the connection's.
        return self.real.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the stream's flow-control window is the limit

    def get_write_buffer_size(self) -> int:
        return self.bridge.out_bytes

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol


class StreamBridge:
    """One HTTP/2 stream, proxied by a ``ClientConnection`` of its own."""

    __slots__ = (
        "client",
        "closing",
        "end_sent",
        "expected_length",
        "finished",
        "h2conn",
        "headers_sent",
        "informational",
        "is_head",
        "out",
        "out_bytes",
        "parser",
        "pending_in",
        "producer_paused",
        "received",
        "released",
        "request_ended",
        "resp_fields",
        "response_ended",
        "stream_id",
        "transport",
        "use_chunked",
    )

    def __init__(self, h2conn: StreamOwner, stream_id: int) -> None:
        self.h2conn = h2conn
        self.stream_id = stream_id
        self.client: ClientConnection | None = None
        self.transport: _StreamTransport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.resp_fields: list[tuple[bytes, bytes]] = []
        self.out: deque[bytes] = deque()  # response DATA waiting for the client's window
        self.out_bytes = 0
        self.pending_in: list[tuple[bytes, int]] | None = None  # request DATA not handed on
        self.expected_length: int | None = None
        self.received = 0
        self.use_chunked = False
        self.is_head = False
        self.informational = False
        self.headers_sent = False
        self.response_ended = False
        self.end_sent = False
        self.request_ended = False
        self.closing = False  # the HTTP/1.1 side closed its transport (exchange over)
        self.finished = False  # nothing more is sent on the stream
        self.released = False  # the ClientConnection was told connection_lost
        self.producer_paused = False

    # -- request side -------------------------------------------------------------------------
    def start(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        h2conn = self.h2conn
        self.request_ended = end_stream
        try:
            head = request_head(headers, end_stream)
        except MalformedRequest:
            count_error("malformed_request")
            self._reset(ErrorCodes.PROTOCOL_ERROR)  # RFC 9113 §8.1.1: a stream error
            return
        limit = h2conn.settings.max_header_list_size
        if sum(len(name) + len(value) + 32 for name, value in headers) > limit:
            # RFC 9113 §10.5.1 / RFC 6585 §5: over the advertised SETTINGS_MAX_HEADER_LIST_SIZE.
            count_error("header_list_too_large")
            self._local_response(431)
            return
        self.is_head = head.is_head
        self.expected_length = head.content_length
        self.use_chunked = head.content_length is None and not end_stream
        assert h2conn.transport is not None
        client = self.client = _stream_client()(h2conn.server, h2conn.listener)
        client.h2_sniff = False  # (its bytes are the HTTP/1.1 head made above)
        self.transport = _StreamTransport(self, h2conn.transport)
        self.parser = httptools.HttpResponseParser(self)
        client.connection_made(self.transport)
        if not self.closing:  # (not refused: draining, max_connections)
            client.data_received(head.head)

    def request_data(self, data: bytes, flow_length: int) -> None:
        """DATA from the client: handed on now, or kept (unacknowledged) while paused."""
        if self.finished or self.closing:
            self._ack(flow_length)
            return
        self.received += len(data)
        if self.expected_length is not None and self.received > self.expected_length:
            # RFC 9113 §8.1.1: DATA beyond content-length is malformed.
            self._reset(ErrorCodes.PROTOCOL_ERROR)
            return
        if not data:
            self._ack(flow_length)
            return
        piece = b"%x\r\n%s\r\n" % (len(data), data) if self.use_chunked else data
        self._hand_on(piece, flow_length)

    def request_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Request trailers have no place in the HTTP/1.1 request made here: dropped."""

    def request_end(self) -> None:
        self.request_ended = True
        if self.finished or self.closing:
            return
        if self.expected_length is not None and self.received != self.expected_length:
            # RFC 9113 §8.1.1: the body's length differs from content-length.
            self._reset(ErrorCodes.PROTOCOL_ERROR)
            return
        if self.use_chunked:
            self._hand_on(b"0\r\n\r\n", 0)

    def _hand_on(self, piece: bytes, flow_length: int) -> None:
        transport = self.transport
        client = self.client
        assert transport is not None and client is not None
        if transport.reading and self.pending_in is None:
            client.data_received(piece)
            self._ack(flow_length)
        else:
            if self.pending_in is None:
                self.pending_in = []
            self.pending_in.append((piece, flow_length))

    def feed_pending(self) -> None:
        """The HTTP/1.1 side reads again: hand on what waited, acknowledging it."""
        pending = self.pending_in
        transport = self.transport
        client = self.client
        assert transport is not None and client is not None
        while pending and transport.reading and not self.closing:
            piece, flow_length = pending.pop(0)
            client.data_received(piece)
            self._ack(flow_length)
        if not pending:
            self.pending_in = None
        self.h2conn.schedule_flush()

    def _ack(self, flow_length: int) -> None:
        if flow_length:
            self.h2conn.conn.acknowledge_received_data(flow_length, self.stream_id)

    # -- response side ------------------------------------------------------------------------
    def response_bytes(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.finished:
            return
        if self.headers_sent and self.is_head:
            return  # (nothing follows the head of a HEAD response)
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return
        self.h2conn.schedule_flush()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp_fields.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        fields, self.resp_fields = self.resp_fields, []
        tokens = [
            token.strip().lower()
            for name, value in fields
            if name.lower() == b"connection"
            for token in value.split(b",")
        ]
        h2_fields = response_fields(status, fields, tokens)
        conn = self.h2conn.conn
        if status < 200:
            self.informational = True  # 100 Continue, 103 Early Hints: a head of its own
            conn.send_headers(self.stream_id, h2_fields)
            return
        self.headers_sent = True
        if self.is_head:
            self.response_ended = True
            self.end_sent = True
            conn.send_headers(self.stream_id, h2_fields, end_stream=True)
            self._done_if_over()
            return
        conn.send_headers(self.stream_id, h2_fields)

    def on_body(self, body: bytes) -> None:
        if self.out:
            self.out.append(body)
            self.out_bytes += len(body)
            return
        sent = self._push(body)
        if sent < len(body):
            rest = body[sent:]
            self.out.append(rest)
            self.out_bytes += len(rest)
            self.update_producer()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.response_ended = True
        self._end_if_sent()

    def _push(self, data: bytes) -> int:
        """Send as much of ``data`` as the windows allow; how much was sent."""
        return send_within_window(self.h2conn.conn, self.stream_id, data)

    def window_opened(self) -> None:
        out = self.out
        while out:
            data = out[0]
            sent = self._push(data)
            self.out_bytes -= sent
            if sent < len(data):
                out[0] = data[sent:]
                break
            out.popleft()
        if not out:
            self._end_if_sent()
        self.update_producer()

    def check_idle(self) -> None:
        """(Each sweep.) A response answered without closing the exchange (an idempotency
        replay keeps the connection alive regardless of ``connection: close``): close it now,
        so that the stream ends."""
        client = self.client
        if self.response_ended and not self.closing and client is not None and client.is_idle():
            client.close_idle()

    def update_producer(self) -> None:
        """Pause the upstream while this stream's data waits for a window, or while the
        connection's socket buffer is full."""
        client = self.client
        if client is None or self.released:
            return
        want = bool(self.out) or self.h2conn.write_paused
        if want and not self.producer_paused:
            self.producer_paused = True
            client.pause_writing()
        elif not want and self.producer_paused:
            self.producer_paused = False
            client.resume_writing()

    def _end_if_sent(self) -> None:
        if self.response_ended and not self.out and not self.end_sent and not self.finished:
            self.end_sent = True
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.h2conn.conn.end_stream(self.stream_id)
        self._done_if_over()

    def _done_if_over(self) -> None:
        if self.end_sent and self.closing and not self.finished:
            self.finished = True
            if not self.request_ended:
                # RFC 9113 §8.1: a response complete before the request was: stop the body.
                self._rst(ErrorCodes.NO_ERROR)
            self.h2conn.stream_done(self.stream_id)
            self.h2conn.schedule_flush()

    # -- ends ----------------------------------------------------------------------------------
    def exchange_closed(self, *, abort: bool) -> None:
        """The HTTP/1.1 side closed (its exchange is over, counted and logged) or aborted."""
        self.closing = True
        if not self.finished:
            if abort or not self.response_ended:
                self._reset(ErrorCodes.INTERNAL_ERROR)
            else:
                self._end_if_sent()
        # After the ClientConnection's own callback returned: it is still on the stack.
        asyncio.get_running_loop().call_soon(self._release)

    def client_gone(self) -> None:
        """The client reset the stream, or the connection is gone."""
        self.finished = True
        self.closing = True
        if self.transport is not None:
            self.transport.closing = True
        self._release()

    def _release(self) -> None:
        if not self.released:
            self.released = True
            if self.client is not None:
                self.client.connection_lost(None)

    def _rst(self, code: ErrorCodes) -> None:
        with contextlib.suppress(StreamClosedError, ProtocolError):
            self.h2conn.conn.reset_stream(self.stream_id, code)

    def _reset(self, code: ErrorCodes) -> None:
        if self.finished:
            return
        self.finished = True
        self.out.clear()
        self.out_bytes = 0
        self._rst(code)
        self.h2conn.stream_done(self.stream_id)
        if self.transport is not None and not self.transport.closing:
            self.transport.closing = True
            asyncio.get_running_loop().call_soon(self._release)
        self.h2conn.schedule_flush()

    def _local_response(self, status: int) -> None:
        """A response made here, before any ClientConnection (not in metrics or the log)."""
        body = b'{"error":"headers_too_large","message":"%s","status":%d}' % (
            _LOCAL_REASONS[status],
            status,
        )
        conn = self.h2conn.conn
        conn.send_headers(
            self.stream_id,
            [
                (b":status", b"%d" % status),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        )
        conn.send_data(self.stream_id, body, end_stream=True)
        self.end_sent = True
        self.closing = True
        self.released = True
        self._done_if_over()
