"""Flow control and timeouts of an HTTP/1.1 client connection, as a mixin of
``ClientConnection``: who is slow, the client or the upstream, decides both.

Backpressure both ways: a client that does not read pauses the upstream read
(``pause_writing``), an upstream that does not take the body pauses the client read
(``pause_client_reading``), and ``_update_reading`` pauses the client for pipelined requests,
a pending Upgrade, a pending error or a large pending body. ``check_timeouts``, called by the
server's sweep (server.py), holds the deadlines against the clock: a slow client is never blamed
on an upstream, since the upstream read timer starts only once the whole request was sent
(docs/slow-clients.md).
"""

from __future__ import annotations

from gateway.proxy.body import PENDING_BODY_LIMIT
from gateway.proxy.h1codec import RequestCodec
from gateway.proxy.responses import RequestRejected


class FlowControl(RequestCodec):
    """Backpressure both ways and the connection's deadlines (mixed into ``ClientConnection``,
    which has the slots)."""

    __slots__ = ()

    def pause_writing(self) -> None:
        # Client's socket buffer is full: stop reading the upstream so it cannot pile up here.
        self.writing_paused = True
        self.send_deadline = self.server.clock + self.limits.send_timeout
        ex = self.active
        if ex is not None and not ex.response_complete:
            attempt = ex.attempt
            if attempt is not None:
                attempt.read_deadline = 0.0  # the upstream is not slow, the client is
                conn = attempt.conn
                if conn is not None:
                    conn.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.send_deadline = 0.0
        ex = self.active
        if ex is not None and not ex.response_complete:
            attempt = ex.attempt
            conn = attempt.conn if attempt is not None else None
            if attempt is not None and conn is not None:
                if ex.upstream is not None and (ex.request_complete or ex.response_started):
                    attempt.read_deadline = self.server.clock + ex.upstream.read_timeout
                conn.resume_reading()

    def pause_client_reading(self) -> None:
        """Upstream's socket buffer is full (large upload): stop reading the client."""
        self.upstream_write_paused = True
        ex = self.active
        if ex is not None and ex.upstream is not None:
            attempt = ex.attempt
            if attempt is not None and not attempt.read_deadline:
                # The upstream does not take the body: now the upstream is the slow party.
                attempt.read_deadline = self.server.clock + ex.upstream.read_timeout
        self._update_reading()

    def resume_client_reading(self) -> None:
        self.upstream_write_paused = False
        ex = self.active
        if ex is not None and not ex.request_complete and not ex.response_started:
            attempt = ex.attempt
            if attempt is not None:
                attempt.read_deadline = 0.0  # back to waiting for the client's body
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        want_pause = (
            self.upstream_write_paused
            or bool(self.queue)
            or self.upgrade_pending
            or self.pending_error is not None
        )
        if not want_pause:
            parsing = self.parsing
            body = parsing.body if parsing is not None else None
            if body is not None and body.pending_bytes > PENDING_BODY_LIMIT:
                want_pause = True
        if want_pause and not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()
        elif not want_pause and self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        ex = self.active
        if ex is not None:
            if ex.deadline and now > ex.deadline:
                if not ex.request_complete and not ex.response_started:
                    # Still waiting for the client's body: the client is slow, not the upstream.
                    self._client_timeout(
                        "body", "request body not received within the route timeout"
                    )
                else:
                    self._upstream_timeout(ex, "route timeout exceeded", retryable=False)
                return
            attempt = ex.attempt
            if attempt is not None and attempt.read_deadline and now > attempt.read_deadline:
                self._upstream_timeout(ex, "upstream read timeout")
                return
        if self.send_deadline and now > self.send_deadline and self.writing_paused:
            self._send_timeout()
            return
        parsing = self.parsing
        if parsing is not None:
            if parsing.method:  # the head is in: its body is being read
                if self.tunnel is not None or self.upgrade_pending:
                    pass  # bytes after an Upgrade are the new protocol's, not a body
                elif self.reading_paused:
                    # Paused by us (backpressure, pipelining): the client is not the slow one.
                    self.body_deadline = now + self.limits.client_body_timeout
                elif self.body_deadline and now > self.body_deadline:
                    self._client_timeout("body", "request body not received in time")
                return
            if ex is None and self.head_deadline and now > self.head_deadline:
                if parsing.headers or parsing.url:
                    self.server.metrics.client_timeout("header")
                    self._reject_parsing(
                        RequestRejected(408, "request_timeout", "request head not received in time")
                    )
                else:
                    self.abort()
                return
        if self.idle_deadline and now > self.idle_deadline and self.is_idle():
            transport = self.transport
            if transport is not None and transport.is_closing():
                # We closed it, but its last bytes are still unread: the send timeout decides.
                if not self.send_deadline:
                    self.send_deadline = now + self.limits.send_timeout
                elif now > self.send_deadline:
                    self._send_timeout()
            else:
                self.close_idle()

    def _client_timeout(self, kind: str, message: str) -> None:
        """The client is too slow sending its request body: 408 and close. Nothing is recorded
        against the upstream (no outlier failure, no retry): it was waiting for the client."""
        self.server.metrics.client_timeout(kind)
        self._reject_parsing(RequestRejected(408, "client_body_timeout", message))

    def _send_timeout(self) -> None:
        """The client read nothing for ``send_timeout`` while we had bytes for it: drop it and
        the bytes buffered for it."""
        self.server.metrics.client_timeout("send")
        ex = self.active
        if ex is not None:
            ex.error_code = "client_send_timeout"
        self.abort()
