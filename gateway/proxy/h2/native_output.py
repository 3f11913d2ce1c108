"""The downstream side of a native HTTP/2 stream (gateway/proxy/h2/forward.py,
``NativeStream``): frames toward the client, response DATA within the client's windows (the
rest waits in ``out``), and the acknowledgements both ways. A mixin of ``NativeStream``, whose
state it uses (declared here for the type checker only)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

from gateway.proxy.h2.window import send_within_window

if TYPE_CHECKING:
    from collections import deque

    from gateway.proxy.h2.bridge import StreamOwner
    from gateway.proxy.h2.client import H2Stream

    Headers = list[tuple[bytes, bytes]]

    class _State:
        """The ``NativeStream`` fields and methods the mixin uses."""

        owner: StreamOwner
        stream_id: int
        stream: H2Stream | None
        out: deque[bytes]
        unacked_up: int
        finished: bool
        headers_out: bool
        held_head: Headers | None
        trailers: Headers | None
        response_ended: bool
        end_sent: bool
        request_ended: bool
        status: int

        def _complete(self, status: int) -> None: ...

    _Base = _State
else:
    _Base = object


class NativeOutput(_Base):
    __slots__ = ()

    def window_opened(self) -> None:
        out = self.out
        while out:
            data = out[0]
            sent = self._push(data)
            if sent < len(data):
                out[0] = data[sent:]
                break
            out.popleft()
        self._ack_upstream()
        if not out:
            self._end_if_sent()

    # -- downstream output --------------------------------------------------------------------
    def _send(self, action: object) -> None:
        conn = self.owner.conn
        with contextlib.suppress(StreamClosedError, ProtocolError):
            action(conn)  # type: ignore[operator]
        self.owner.schedule_flush()

    def _send_head(self, fields: Headers) -> None:
        self.held_head = None
        self.headers_out = True
        self._send(lambda conn: conn.send_headers(self.stream_id, fields))

    def _push(self, data: bytes) -> int:
        size = send_within_window(self.owner.conn, self.stream_id, data)
        self.unacked_up += size
        return size

    def _ack_upstream(self) -> None:
        """Give the upstream window back for what went to the client, unless the client's
        socket is paused (the bytes would pile up in its buffer)."""
        if self.unacked_up and not self.owner.write_paused:
            stream = self.stream
            if stream is not None:
                stream.acknowledge(self.unacked_up)
            self.unacked_up = 0

    def _ack_client(self, flow_length: int) -> None:
        if flow_length and not self.finished:
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.owner.conn.acknowledge_received_data(flow_length, self.stream_id)

    def _end_if_sent(self) -> None:
        if not self.response_ended or self.out or self.end_sent or self.finished:
            return
        self.end_sent = True
        trailers = self.trailers
        if trailers is not None:
            self._send(lambda conn: conn.send_headers(self.stream_id, trailers, end_stream=True))
        else:
            self._send(lambda conn: conn.end_stream(self.stream_id))
        self._finish_stream()

    def _finish_stream(self) -> None:
        if not self.request_ended:
            # RFC 9113 §8.1: a response complete before the request was: stop the body.
            self._send(lambda conn: conn.reset_stream(self.stream_id, ErrorCodes.NO_ERROR))
        self._complete(self.status)

    def _reset_client(self, code: int) -> None:
        if self.finished:
            return
        self.out.clear()
        self._send(lambda conn: conn.reset_stream(self.stream_id, code))
        self._complete(self.status or 502)
