"""The upstream request and the response phases of the lifecycle, as a mixin of
``ClientConnection``.

upstream request (``_connect``, ``_attach``, ``_send_pending``) → response headers
(``on_response_head``; the filters' response phase) → response body (``on_response_body``) →
done (``_response_done``), or the switch to a tunnel (``on_upstream_upgrade``). The upstream
connection calls these (``upstream.UpstreamEvents``) with the ``UpstreamAttempt`` it is lent to
as the first argument; an event of a try whose exchange is over (not ``self.active``) is
ignored. They see the connection as a ``downstream.Downstream``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway.proxy import filtering
from gateway.proxy import headers as hdr
from gateway.proxy.exchange import FRAME_CHUNKED, FRAME_NONE, FRAME_RAW, Exchange
from gateway.proxy.failover import Failover, _retry_after
from gateway.proxy.filtering import FilterState
from gateway.proxy.tunnel import Tunnel
from gateway.proxy.upstream import UNEXPECTED_SWITCHING_PROTOCOLS
from gateway.resilience.retry import CONNECT_FAILURE, GATEWAY_STATUSES, STATUS

if TYPE_CHECKING:
    from gateway.proxy.attempt import UpstreamAttempt
    from gateway.proxy.upstream import UpstreamConnection, UpstreamLink, UpstreamPool


class ResponsePhases(Failover):
    """Upstream request, response headers, response body, done."""

    __slots__ = ()

    def _filter_body(self, ex: Exchange, state: FilterState, body: bytes, end: bool) -> bytes:
        response = state.response
        assert response is not None
        return state.chain.on_response_body(response, body, end)

    def _filter_body_end(self, ex: Exchange, attempt: UpstreamAttempt, state: FilterState) -> None:
        """The last call of on_response_body: its bytes go out before the end of the body."""
        tail = self._filter_body(ex, state, b"", True)
        if tail:
            attempt.bytes_out += len(tail)
            if self.keyed and ex.recorder is not None:
                ex.recorder.on_body(tail)
            if ex.response_frame == FRAME_RAW:
                self.out.append(tail)
            elif ex.response_frame == FRAME_CHUNKED:
                self.out += (b"%x\r\n" % len(tail), tail, b"\r\n")

    def _connect(self, attempt: UpstreamAttempt) -> None:
        ex = attempt.ex
        instance = attempt.instance
        assert instance is not None
        # ``instance.pool`` is typed as the snapshot's ConnectionPool protocol (gateway/pools.py):
        # every pool is an InstancePool or an H2InstancePool, built by the factories this
        # package registers. The ``type: ignore`` says so for free, where a cast() would be a
        # call (and a protocol, not InstancePool: compiled code would check the class).
        pool: UpstreamPool = instance.pool  # type: ignore[assignment]
        conn = pool.acquire()
        if conn is not None:
            self._attach(attempt, conn)
            return

        upstream = ex.upstream
        assert upstream is not None
        breaker = upstream.breaker
        if not breaker.try_pending():
            self.server.metrics.breaker_overflow(upstream.name, "pending")
            self._upstream_error(
                ex, 503, "circuit_open", f"upstream '{upstream.name}' is at max_pending"
            )
            return
        if breaker.max_connections and (
            sum(i.pool.open_count + i.pool.connecting for i in upstream.instances)
            >= breaker.max_connections
        ):
            breaker.release_pending()
            self.server.metrics.breaker_overflow(upstream.name, "connections")
            self._upstream_error(
                ex, 503, "circuit_open", f"upstream '{upstream.name}' is at max_connections"
            )
            return

        def connected(conn: UpstreamLink | None, error: BaseException | None) -> None:
            breaker.release_pending()
            if conn is None:
                if self.active is ex and not self.closed:
                    self._connect_failed(ex, error)
                return
            if self.active is not ex or self.closed:
                conn.pool.release(conn)  # never used: clean and safe to pool
                attempt.release()  # (idempotent: connection_lost gave it back)
                return
            self._attach(attempt, conn)

        pool.connect(connected)

    def _connect_failed(self, ex: Exchange, error: BaseException | None) -> None:
        """The try's connection could not be opened: another try, or a 504/502."""
        if self._try_failed(ex, CONNECT_FAILURE):
            return
        if isinstance(error, TimeoutError):
            self._upstream_error(ex, 504, "upstream_timeout", "upstream connect timeout")
        else:
            self._upstream_error(
                ex, 502, "upstream_connect_failure", f"cannot connect to upstream: {error}"
            )

    def _attach(self, attempt: UpstreamAttempt, conn: UpstreamLink) -> None:
        ex = attempt.ex
        conn.begin_exchange(attempt, ex.is_head)
        instance = attempt.instance
        if instance is not None:
            attempt.address = instance.address
        attempt.conn = conn
        attempt.t_start = time.perf_counter()
        upstream = ex.upstream
        assert upstream is not None
        if self.writing_paused:
            conn.pause_reading()  # the client still has not read what it was sent before
        elif ex.request_complete:
            # _start_read_timer, inlined (a call less per GET).
            first_read = upstream.read_timeout
            policy = ex.retry
            per_try = policy.per_try_timeout if policy is not None else 0.0
            if per_try and per_try < first_read:
                first_read = per_try
            attempt.read_deadline = time.monotonic() + first_read
        # else: the upstream waits for the client's body; its timer starts when that is sent.
        if (
            upstream.hedge_delay
            and not ex.hedged
            and ex.idempotent
            and ex.request_complete
            and not ex.body_bytes
            and ex.upgrade is None
        ):
            ex.hedged = True
            attempt.hedge_timer = asyncio.get_running_loop().call_later(
                upstream.hedge_delay, self._hedge, attempt
            )
        pending = ex.body.take_pending(ex.body_bytes) if ex.body is not None else None
        if pending is not None:
            assert conn.transport is not None
            conn.transport.writelines([ex.head, *pending])
            self._update_reading()
        else:
            transport = conn.transport  # conn.send, inlined
            if transport is not None:
                transport.write(ex.head)

    def _start_read_timer(self, attempt: UpstreamAttempt) -> None:
        # (Inlined in _attach: keep the two alike.)
        ex = attempt.ex
        upstream = ex.upstream
        assert upstream is not None
        first_read = upstream.read_timeout
        policy = ex.retry
        if policy is not None and policy.per_try_timeout and policy.per_try_timeout < first_read:
            first_read = policy.per_try_timeout
        attempt.read_deadline = time.monotonic() + first_read

    def _send_pending(self, ex: Exchange) -> None:
        attempt = ex.attempt
        conn = attempt.conn if attempt is not None else None
        request_body = ex.body
        if conn is None or request_body is None or conn.transport is None:
            return
        pending = request_body.take_pending(ex.body_bytes)
        if pending is None:
            return
        conn.transport.writelines(pending)
        self._update_reading()

    def on_response_head(
        self,
        attempt: UpstreamAttempt,
        status: int,
        head: hdr.ResponseHead,
        upstream_keep_alive: bool,
    ) -> None:
        ex = attempt.ex
        if self.active is not ex:
            return
        if ex.hedge is not None or attempt.hedge_timer is not None:
            self._race_won(ex, attempt)
        upstream = ex.upstream
        assert upstream is not None
        if status < 200 and status != 101:
            if ex.request_complete and not self.writing_paused:
                attempt.read_deadline = self.server.clock + upstream.read_timeout
            else:
                attempt.read_deadline = 0.0  # 100 Continue: now the upstream waits for the body
            ex.interim = True
            # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client.
            if ex.version != "1.0":
                self.out.append(hdr.interim_head(status, head))
            return
        # A final response: the upstream is answering; it is slow if the body stalls. A paused
        # client is the slow party, though (pause_writing cleared the timer).
        attempt.read_deadline = (
            0.0 if self.writing_paused else self.server.clock + upstream.read_timeout
        )
        instance = attempt.instance
        conn = attempt.conn
        assert conn is not None
        policy = ex.retry
        if policy is not None and status in policy.retry_statuses:
            retry_after = _retry_after(head.fields) if status == 503 or status == 429 else None
            if self._try_failed(ex, STATUS, status, retry_after, drop=conn):
                return
            # Not retried: this response goes to the client (the failure is already recorded).
        elif instance is not None and (status >= 500 or instance.failing):
            # Successes matter to outlier detection only when they end a failure streak.
            upstream.record_outcome(instance, status < 500, status in GATEWAY_STATUSES)
        ex.status = status
        keep_alive = ex.keep_alive and not self.server.draining
        if status == 101:
            if ex.upgrade is None or head.upgrade is None:
                conn.protocol_error(UNEXPECTED_SWITCHING_PROTOCOLS)
                self._upstream_failure(
                    ex, conn, "upstream switched protocols without an upgrade request"
                )
                return
            self.out.append(
                hdr.build_response_head(
                    101,
                    head,
                    request_id=ex.request_id or b"",
                    framing=b"",
                    keep_alive=True,
                    upgrade=head.upgrade,
                )
            )
            ex.response_started = True
            return
        if ex.upgrade is not None:
            keep_alive = False  # upgrade refused: the bytes that followed were not HTTP
        filters = self.filters
        if filters is not None and filters.chain.wants_response_headers:
            # The response-headers phase (the head as a list only here); a removed
            # content-length re-frames the body below (chunked, or close-delimited for 1.0).
            status, head = filtering.response_phase(filters, status, head)
            ex.status = status
        content_length = head.content_length
        if ex.is_head or status == 204 or status == 304:
            ex.response_frame = FRAME_NONE
            if content_length is not None and status != 204:
                framing = b"content-length: " + content_length + b"\r\n"
            else:
                framing = b""
        elif content_length is not None:
            ex.response_frame = FRAME_RAW
            framing = b"content-length: " + content_length + b"\r\n"
        else:
            # (Close-delimited from the upstream: the UpstreamConnection saw that already.)
            if ex.version == "1.0":
                ex.response_frame = FRAME_RAW
                keep_alive = False
                framing = b""
            else:
                ex.response_frame = FRAME_CHUNKED
                framing = b"transfer-encoding: chunked\r\n"
        if keep_alive and ex.version == "1.0":
            framing += b"connection: keep-alive\r\n"
        if ex.ratelimit_headers:
            framing += ex.ratelimit_headers
        route = ex.route
        if route is not None and route.config.server_timing:
            # W3C Server-Timing: the gateway's own share and the upstream's, in milliseconds.
            now = time.perf_counter()
            upstream_ms = (now - attempt.t_start) * 1000.0
            gateway_ms = (now - ex.t_start) * 1000.0 - upstream_ms
            framing += b"server-timing: gateway;dur=%.3f, upstream;dur=%.3f\r\n" % (
                gateway_ms,
                upstream_ms,
            )
        ex.keep_alive = keep_alive
        self.out.append(
            hdr.build_response_head(
                status,
                head,
                request_id=ex.request_id or b"",
                framing=framing,
                keep_alive=keep_alive,
            )
        )
        ex.response_started = True
        if self.keyed and ex.recorder is not None:
            ex.recorder.on_head(status, head.reason, head.fields)

    def on_response_body(self, attempt: UpstreamAttempt, body: bytes) -> None:
        ex = attempt.ex
        if self.active is not ex:
            return
        filters = self.filters
        if filters is not None and filters.body_hook:
            body = self._filter_body(ex, filters, body, False)
            if not body:
                return  # (an empty chunk would end a chunked body)
        frame = ex.response_frame
        attempt.bytes_out += len(body)
        if self.keyed and ex.recorder is not None:
            ex.recorder.on_body(body)
        if frame == FRAME_RAW:
            self.out.append(body)
        elif frame == FRAME_CHUNKED:
            self.out.append(b"%x\r\n" % len(body))
            self.out.append(body)
            self.out.append(b"\r\n")
        upstream = ex.upstream
        if upstream is not None and not self.writing_paused:
            attempt.read_deadline = self.server.clock + upstream.read_timeout

    def on_response_message_complete(self, attempt: UpstreamAttempt) -> None:
        ex = attempt.ex
        if self.active is not ex:
            return
        if ex.interim:
            ex.interim = False
            return
        if ex.status == 101:
            return  # the parser raises HttpParserUpgrade next; on_upstream_upgrade takes over
        filters = self.filters
        if filters is not None and filters.body_hook:
            self._filter_body_end(ex, attempt, filters)
        if ex.response_frame == FRAME_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._response_done(ex, attempt)

    def on_response_complete(self, attempt: UpstreamAttempt) -> None:
        """Close-delimited response ended with the upstream connection."""
        ex = attempt.ex
        if self.active is not ex:
            return
        filters = self.filters
        if filters is not None and filters.body_hook:
            self._filter_body_end(ex, attempt, filters)
        if ex.response_frame == FRAME_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._response_done(ex, attempt)

    def _response_done(self, ex: Exchange, attempt: UpstreamAttempt) -> None:
        ex.response_complete = True
        attempt.t_done = done = time.perf_counter()
        instance = attempt.instance
        if instance is not None:
            sample = done - attempt.t_start
            previous = instance.latency
            instance.latency = sample if not previous else previous * 0.8 + sample * 0.2
            upstream = ex.upstream
            if upstream is not None and upstream.latency_samples is not None:
                upstream.latency_samples.append(sample)
            if upstream is not None and upstream.observes_latency:
                upstream.balancer.observe(instance, sample, time.monotonic())  # type: ignore[attr-defined]
        attempt.read_deadline = 0.0
        # Flush first: a full client buffer pauses the upstream's reading, which must happen
        # while the connection is still ours, not after it went back to the pool.
        self.flush_to_client()
        self.upstream_write_paused = False
        conn = attempt.conn
        assert conn is not None
        attempt.conn = None
        if ex.request_complete and (ex.body is None or not ex.body.pending):
            conn.pool.release(conn)
        else:
            # The upstream answered before the whole request body arrived: that connection is
            # mid-message, and so is the client's; both close after this response.
            conn.close()
            ex.keep_alive = False
        instance = attempt.instance
        if instance is not None:  # attempt.release, inlined: a call less per request
            instance.active_requests -= 1
            attempt.instance = None
        if ex.request_complete or not ex.keep_alive:
            self._finish(ex)

    def on_upstream_upgrade(
        self, attempt: UpstreamAttempt, conn: UpstreamConnection, tail: bytes
    ) -> None:
        ex = self.active
        transport = self.transport
        upstream_transport = conn.transport
        if (
            ex is None
            or ex is not attempt.ex
            or attempt is not ex.attempt
            or ex.status != 101
            or transport is None
            or upstream_transport is None
            or self.closed
        ):
            conn.discard()
            return
        # From here on both connections are a byte tunnel (RFC 9110 §7.8), run by tunnel.py.
        conn.detach_for_tunnel()
        attempt.conn = None
        self.upgrade_pending = False
        self.reading_paused = False  # the tunnel resumes reading
        out = self.out
        self.out = []
        out.append(tail)
        self.tunnel = Tunnel.open(
            transport,
            upstream_transport,
            client_lost=self.connection_lost,
            upstream_lost=conn.connection_lost,
            to_client=out,
            to_upstream=self.tunnel_pending or (),
            client_writing_paused=self.writing_paused,
        )
        self.tunnel_pending = None
        ex.response_complete = True
        attempt.t_done = time.perf_counter()
        attempt.read_deadline = 0.0
        ex.deadline = 0.0
        self._observe(ex, 101)
        attempt.release()
        self.active = None
