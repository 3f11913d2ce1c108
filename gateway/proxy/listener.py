"""Client side of the data plane: an ``asyncio.Protocol`` per client connection, on httptools.

Everything here is callback code: no Task and no coroutine per request on the fast path (a new
upstream connection is the exception, opened by ``InstancePool.connect``). One exchange is proxied
at a time per client connection; pipelined requests wait in order (RFC 9112 §9.3.2) with reading
paused. Requests are dispatched only after the parser accepted the whole chunk of bytes they came
in, so bytes that fail to parse never reach an upstream.

Timeouts are checked by one periodic sweep per server (``TICK`` seconds) against deadlines stored
on the connection, instead of a timer handle per request. A slow client is never blamed on an
upstream: the upstream read timer starts once the whole request was sent (see
docs/slow-clients.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools

from gateway.accesslog import AccessLog
from gateway.proxy import filtering, responses
from gateway.proxy import headers as hdr
from gateway.proxy.body import PENDING_BODY_LIMIT, RequestBody
from gateway.proxy.connlimit import LocalConnectionCount, SharedConnectionCount
from gateway.proxy.exchange import (
    CW_DONE,
    CW_START,
    Exchange,
)
from gateway.proxy.failover import Failover
from gateway.proxy.filtering import FilterState
from gateway.proxy.h1 import (
    CW_DESYNC,
    CW_EXTENSIONS_TOO_LONG,
    CW_LINE_TOO_LONG,
    CW_MAX_CANDIDATES,
    CW_TRAILER_TOO_LARGE,
    DATA_AFTER_CLOSE,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_HOST,
    H_IDEMPOTENCY_KEY,
    H_REQUEST_ID,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    HELD_METHOD_PARSER,
    KNOWN_METHODS,
    LLHTTP_METHODS,
    MAX_METHOD_BYTES,
    MAX_PREFIX_BYTES,
    METHOD_HELD,
    SPECIAL_HEADERS,
    STAND_IN_METHOD,
    UNDERSCORE,
    UNDERSCORE_ACTIONS,
    UNDERSCORE_ALLOW,
    UNDERSCORE_REJECT,
    UNKNOWN_METHOD_ERRORS,
    VALID_HOSTS,
    HeadFields,
    checked_host,
    reset_walk,
    walk_framing,
)
from gateway.proxy.h2 import take_over_h2c
from gateway.proxy.lifecycle import RequestPhases
from gateway.proxy.relay import ResponsePhases
from gateway.proxy.responses import RequestRejected
from gateway.proxy.tunnel import Tunnel
from gateway.tls.accept import ListenerState, client_cert_element, start_tls_listener

if TYPE_CHECKING:
    from gateway.config.model import GatewayConfig, ListenerConfig
    from gateway.metrics import GatewayMetrics
    from gateway.snapshot import Snapshot
    from gateway.tls.contexts import CertEntry

log = logging.getLogger("gateway.proxy")

TICK = 0.1  # seconds between timeout sweeps; deadlines are this coarse

# Connections refused over limits.max_connections get one small 503 and a half-close, then their
# bytes are read and dropped for up to LINGER seconds so that closing does not reset the answer
# away; beyond LINGER_MAX such connections at once they are closed right after the write.
LINGER = 2.0
LINGER_MAX = 1024
# Give freed heap memory back to the OS (glibc malloc_trim) once this many connections closed
# and the open count fell to half its recent peak: after a flood of slow clients, not under churn.
TRIM_AFTER_CLOSED = 100


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_malloc_trim = _load_malloc_trim()


class _Refused(asyncio.Protocol):
    """A connection refused over ``max_connections``: its request bytes are read and dropped
    until the client closes (it got its 503 and our FIN) or the linger time is over."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close


class ProxyServer:
    """The listening socket, the live snapshot and the set of client connections."""

    def __init__(self, snapshot: Snapshot, metrics: GatewayMetrics) -> None:
        self.snapshot = snapshot
        self.metrics = metrics
        self.connections: set[ClientConnection] = set()
        self.request_ids = hdr.RequestIds()
        self.clock = time.monotonic()
        self.access_log: AccessLog | None = None
        self._next_second = 0.0
        self.draining = False
        self._drained = asyncio.Event()
        self._server: asyncio.Server | None = None  # the first listener's server
        self.servers: list[asyncio.Server] = []
        self.listeners: dict[str, ListenerState] = {}
        self.default_listener = ListenerState("default")
        self.handshakes: set[Any] = set()  # TLS handshakes under way (gateway.tls.accept)
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # limits.max_connections: this process's count, or the gateway-wide one of workers.
        self.connection_count: LocalConnectionCount | SharedConnectionCount = LocalConnectionCount()
        self.lingering: deque[tuple[float, asyncio.Transport]] = deque()  # refused, FIN sent
        self.closed_since_trim = 0
        self.open_peak = 0  # most connections open since the last malloc_trim

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    async def start(
        self,
        host: str = "",
        port: int = 0,
        *,
        reuse_port: bool = False,
        listeners: list[ListenerConfig] | None = None,
    ) -> None:
        """Listen on ``host:port`` (plaintext), or on every one of ``listeners`` (plaintext or
        TLS; their addresses as given, ports already resolved by the caller)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if listeners is None:
            self._server = await loop.create_server(
                lambda: ClientConnection(self),
                host,
                port,
                reuse_port=reuse_port or None,
                backlog=4096,
            )
            self.servers.append(self._server)
        else:
            config = self.snapshot.config
            for listener in listeners:
                state = ListenerState.build(listener, config)
                self.listeners[listener.name] = state
                if state.tls is not None:
                    server = await start_tls_listener(self, state, listener, reuse_port)
                else:

                    def plain(state: ListenerState = state) -> ClientConnection:
                        return ClientConnection(self, state)

                    server = await loop.create_server(
                        plain,
                        listener.address.host,
                        listener.address.port,
                        reuse_port=reuse_port or None,
                        backlog=4096,
                    )
                self.servers.append(server)
            self._server = self.servers[0]
        self._sweeper = loop.call_later(TICK, self._sweep)

    def apply_tls(self, config: GatewayConfig) -> None:
        """Reload: new certificates for new handshakes (raises, changing nothing, if one of
        them does not load)."""
        updates = []
        for listener in config.all_listeners:
            state = self.listeners.get(listener.name)
            if state is not None:
                updates.append((state, listener))
        prepared = [(state, state.prepare(listener, config)) for state, listener in updates]
        for state, ready in prepared:
            state.commit(ready)

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self.servers for sock in server.sockets]

    def listener_sockets(self) -> dict[str, list[socket.socket]]:
        """Sockets by listener name (a plain ``start(host, port)`` has one, "default")."""
        if not self.listeners:
            return {"default": self.sockets}
        return {
            name: list(server.sockets)
            for name, server in zip(self.listeners, self.servers, strict=False)
        }

    def refuse(self, transport: asyncio.Transport, reason: str) -> None:
        """Answer a connection over the limit (or arriving while draining) with 503 and close."""
        self.metrics.connection_refused(reason)
        transport.write(responses.refusal_response(self.request_ids.next(), reason))
        lingering = self.lingering
        if len(lingering) >= LINGER_MAX:
            transport.close()
            return
        transport.set_protocol(_Refused())
        transport.write_eof()
        lingering.append((self.clock + LINGER, transport))

    def _sweep(self) -> None:
        now = self.clock = time.monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        lingering = self.lingering
        while lingering and lingering[0][0] < now:
            lingering.popleft()[1].abort()
        metrics = self.metrics
        if self.access_log is not None:
            self.access_log.flush()
        once_a_second = now >= self._next_second
        if once_a_second:
            self._next_second = now + 1.0
        if once_a_second:
            for limiter in self.snapshot.limiters.values():
                limiter.expire(now)
            self._maybe_trim()
        for upstream in self.snapshot.upstreams.values():
            if once_a_second:
                upstream.tick(now)
                metrics.upstream_instances(upstream.name, upstream.state_counts())
            idle = open_count = 0
            for instance in upstream.instances:
                pool = instance.pool
                if pool.idle:
                    pool.sweep(now)
                idle += len(pool.idle)
                open_count += pool.open_count
            metrics.upstream_connections(upstream.name, open_count - idle, idle)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(TICK, self._sweep)

    def _maybe_trim(self) -> None:
        """After many connections closed (a flood of slow clients is over), hand the heap pages
        their buffers used back to the OS: glibc keeps freed memory in its arenas otherwise."""
        open_now = len(self.connections)
        if open_now > self.open_peak:
            self.open_peak = open_now
        if (
            self.closed_since_trim >= TRIM_AFTER_CLOSED
            and open_now * 2 <= self.open_peak
            and _malloc_trim is not None
        ):
            _malloc_trim(0)
            self.metrics.malloc_trims += 1
            self.closed_since_trim = 0
            self.open_peak = open_now

    async def drain(self, grace_period: float) -> None:
        """Stop accepting, let in-flight exchanges finish (up to ``grace_period``), then close.

        Responses sent while draining carry ``Connection: close``; idle keep-alive connections
        are closed at once.
        """
        self.draining = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.is_idle():
                conn.close_idle()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_period):
                    await self._drained.wait()
        await self.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for handshake in list(self.handshakes):
            handshake.abort()
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        for conn in list(self.connections):
            conn.abort()
        while self.lingering:
            self.lingering.popleft()[1].abort()
        for pool in self.snapshot.pools():
            pool.close_all()


class ClientConnection(RequestPhases, ResponsePhases, Failover, asyncio.Protocol):
    __slots__ = (
        "active",
        "allowed_methods",
        "body_deadline",
        "chunked_walk",
        "client_cert",
        "closed",
        "filters",
        "h2_sniff",
        "head_deadline",
        "head_limit",
        "head_received",
        "head_tail",
        "idle_deadline",
        "keyed",
        "limits",
        "listener",
        "method_carry",
        "method_hook",
        "out",
        "parser",
        "parsing",
        "peer_ip",
        "peer_trusted",
        "pending_error",
        "queue",
        "reading_paused",
        "real_method",
        "send_deadline",
        "server",
        "sni",
        "tls_entry",
        "to_dispatch",
        "transport",
        "tunnel",
        "tunnel_pending",
        "underscores",
        "upgrade_pending",
        "upstream_write_paused",
        "writing_paused",
    )
    server: ProxyServer  # (narrows Failover's view of it)

    def __init__(self, server: ProxyServer, listener: ListenerState | None = None) -> None:
        self.server = server
        self.listener = listener if listener is not None else server.default_listener
        self.sni = ""  # TLS server name the client sent ("" on plaintext or without SNI)
        self.tls_entry: CertEntry | None = None  # certificate SNI chose (for 421), if SNI
        self.client_cert: bytes | None = None  # x-forwarded-client-cert element, if verified
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        # Pipelined requests waiting their turn; allocated on first use (idle connections are
        # many, and an empty deque costs ~600 bytes).
        self.queue: deque[Exchange] | None = None
        self.out: list[bytes] = []
        self.peer_ip = ""
        self.peer_trusted = False
        self.reading_paused = False
        self.writing_paused = False
        self.upstream_write_paused = False
        self.to_dispatch = False
        self.closed = False
        self.head_deadline = 0.0
        self.idle_deadline = 0.0
        self.body_deadline = 0.0  # next request body bytes due (limits.client_body_timeout)
        self.send_deadline = 0.0  # client must have read by then (limits.send_timeout)
        self.tunnel: Tunnel | None = None  # after a 101: the transport belongs to it
        self.tunnel_pending: list[bytes] | None = None  # client bytes after an Upgrade request
        self.upgrade_pending = False
        self.pending_error: RequestRejected | None = None
        self.limits = server.snapshot.config.limits  # a reload applies to new connections
        self.head_received = 0  # raw bytes seen while a request head is incomplete
        self.head_limit = self.limits.max_header_bytes + self.limits.max_uri_bytes
        self.underscores = UNDERSCORE_ACTIONS[self.limits.headers_with_underscores]
        allowed = self.limits.allowed_methods
        self.allowed_methods = frozenset(allowed) if allowed is not None else None
        self.method_carry: bytes | None = None  # a method token not complete yet (not fed)
        self.real_method: bytes | None = None  # the extension method fed as STAND_IN_METHOD
        # on_headers_complete has method work: a real_method to restore, or allowed_methods.
        self.method_hook = self.allowed_methods is not None
        self.head_tail = b""  # last bytes of a read that ended inside a head
        self.chunked_walk: list[Exchange] | None = None  # chunked bodies to walk after a read
        # The active exchange's filters, on a route with a chain (a slot here rather than a
        # field of every Exchange: routes without filters then pay one slot read per phase).
        self.filters: FilterState | None = None
        # An Idempotency-Key arrived on this connection (or a route requires keys): only then
        # are the exchanges' idempotency fields read (sticky: pipelined requests may carry one).
        self.keyed = False
        # HTTP/2 hook: look for the h2c preface in the first bytes (gateway/proxy/h2).
        self.h2_sniff = self.listener.http2 is not None and self.listener.tls is None

    # -- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self.server
        limits = self.limits
        if server.draining or not server.connection_count.try_open(limits.max_connections):
            self.closed = True
            server.refuse(transport, "draining" if server.draining else "max_connections")
            return
        server.connections.add(self)
        server.metrics.connections_open += 1
        # Bounded memory per slow reader: above this the upstream is no longer read.
        transport.set_write_buffer_limits(limits.client_write_buffer)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "0.0.0.0"
        self.peer_trusted = self.peer_ip in server.snapshot.trusted_proxies
        tls = self.listener.tls
        if tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                # TLS facts, once per connection: the server name (routing, 421), and the
                # verified client certificate to forward.
                self.sni = getattr(ssl_object, "gateway_sni", None) or ""
                if self.sni:
                    self.tls_entry = tls.entry_for(ssl_object)
                if tls.forward_client_cert:
                    self.client_cert = client_cert_element(ssl_object)
        # The first request line must arrive as fast as any later request head (slowloris).
        self.idle_deadline = server.clock + limits.header_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        server = self.server
        server.connections.discard(self)
        server.connection_count.close()
        server.closed_since_trim += 1
        server.metrics.connections_open -= 1
        if server.draining and not server.connections:
            server._drained.set()
        ex = self.active
        if ex is not None:
            self.active = None
            if not ex.response_complete:
                attempt = ex.attempt
                if attempt is not None:
                    # The client went away mid-exchange: the upstream connection is in an
                    # unknown state, so it is closed rather than pooled. Also with no
                    # connection yet (one still being opened): the instance slot taken at pick
                    # is given back here, the connect callback finds the client gone. A racing
                    # hedge is abandoned by _observe.
                    attempt.abandon()
                self._observe(ex, 499)
        self.queue = None
        self.parsing = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def is_idle(self) -> bool:
        return self.active is None and self.parsing is None and self.tunnel is None

    def close_idle(self) -> None:
        if self.transport is not None:
            self.transport.close()

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

    # -- client bytes -----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.h2_sniff:  # HTTP/2 hook: h2c with prior knowledge (gateway/proxy/h2)
            self.h2_sniff = False
            if take_over_h2c(self, data):
                return
        if self.upgrade_pending:
            # Bytes after an Upgrade request belong to the new protocol; hold them until the
            # upstream agrees (101) or refuses (then the connection closes).
            assert self.tunnel_pending is not None
            self.tunnel_pending.append(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._begin_upgrade(data, upgrade.args[0])
        except httptools.HttpParserError as error:
            if error.args and error.args[0] == DATA_AFTER_CLOSE:
                # RFC 9112 §9.6: after a request with "close" the server does not process
                # further requests. The messages before it were parsed (and go on as usual);
                # llhttp stopped at the first byte after it, which never reaches an upstream,
                # and so does every later read. The connection closes after the response.
                pass
            else:
                refed = self._refeed_extension_method(error, data)
                if refed is None:
                    return
                data = refed
        if self.chunked_walk is not None and not self._walk_chunked(data):
            return
        parsing = self.parsing
        if parsing is not None and parsing.method:
            # Inside a request body: the client must send more within client_body_timeout.
            self.body_deadline = self.server.clock + self.limits.client_body_timeout
        elif parsing is not None:
            if not parsing.headers:
                # The read ended inside the request line of a message that began with it: keep
                # the bytes, in case llhttp refuses its method once it has it all (extension
                # method; llhttp refuses its RTSP names only at the version).
                if self.head_received < 0:  # (a message pipelined mid-read: see below)
                    parsing.method_prefix = data
                elif parsing.method_prefix:
                    prefix = parsing.method_prefix + data
                    parsing.method_prefix = prefix if len(prefix) <= MAX_PREFIX_BYTES else b""
            # The last 3 bytes of the head so far: its blank line may straddle the next read.
            if len(data) >= 3:
                self.head_tail = data[-3:]
            else:
                tail = self.head_tail + data if self.head_received >= 0 else data
                self.head_tail = tail[-3:]
            # Still inside a request head. httptools hands over a header only once it is
            # complete, so an endless header line would grow unchecked: count raw bytes.
            if self.head_received < 0:
                # The head began in this chunk, after any earlier messages in it: estimate its
                # size from the last end of a head (an underestimate only delays by a chunk).
                end = data.rfind(b"\r\n\r\n")
                self.head_received = len(data) - (end + 4 if end >= 0 else 0)
            else:
                self.head_received += len(data)
            if self.head_received > self.head_limit:
                self._reject_parsing(
                    RequestRejected(431, "headers_too_large", "request header fields too large")
                )
                return
        if self.to_dispatch:
            self.to_dispatch = False
            ex = self.active
            if ex is not None:
                self._dispatch(ex)
        else:
            ex = self.active
            if ex is not None and ex.body is not None and ex.body.pending:
                self._send_pending(ex)  # (if a connection is attached)

    def _begin_upgrade(self, data: bytes, offset: int) -> None:
        self.head_received = 0
        self.upgrade_pending = True
        self.tunnel_pending = [data[offset:]]
        self._update_reading()

    def _refeed_extension_method(
        self, error: httptools.HttpParserError, data: bytes
    ) -> bytes | None:
        """llhttp refused a method: if it is a token llhttp does not know (an extension method,
        RFC 9110 §9.1) beginning the first message of this read, parse the read again with a
        stand-in method and restore the real one in ``on_headers_complete``.

        Returns the bytes fed (for the rest of ``data_received``), or None when the request was
        rejected or the token is not complete yet. An unknown method later in a read (behind a
        pipelined request) cannot be re-fed (llhttp does not say where it stopped): 400. (A
        message begun mid-read has the earlier message's method as first token: known, so 400.)
        """
        candidate: bytes | None = None
        parsing = self.parsing
        if error is METHOD_HELD:
            candidate = self.method_carry + data  # type: ignore[operator]
            self.method_carry = None
        elif error.args and error.args[0] in UNKNOWN_METHOD_ERRORS and parsing is not None:
            if self.head_received < 0:
                candidate = data  # the refused message began in this read
            elif parsing.method_prefix:
                candidate = parsing.method_prefix + data  # the token began in an earlier read
        if candidate is not None:
            space = candidate.find(b" ", 0, MAX_METHOD_BYTES + 1)
            token = candidate[:space] if space > 0 else candidate
            if (
                token not in LLHTTP_METHODS
                and len(token) <= MAX_METHOD_BYTES
                and hdr.valid_token(token)
            ):
                self.parsing = None
                self.head_received = 0
                if space < 0:
                    # Wait for the rest of the token: the next read goes to a stand-in parser
                    # that refuses it, which brings it back here (no check per read).
                    self.method_carry = candidate
                    self.parser = HELD_METHOD_PARSER  # type: ignore[assignment]
                    return None
                self.parser = httptools.HttpRequestParser(self)
                self.real_method = token
                self.method_hook = True
                fed = STAND_IN_METHOD + candidate[space:]
                try:
                    self.parser.feed_data(fed)
                except httptools.HttpParserUpgrade as upgrade:
                    self._begin_upgrade(fed, upgrade.args[0])
                except httptools.HttpParserError as second:
                    self._on_parse_error(second)
                    return None
                return fed
        self._on_parse_error(error)
        return None

    def _walk_chunked(self, data: bytes) -> bool:
        """Measure the chunked framing this read carried for each chunked request body.

        llhttp validated the bytes, but it reports neither chunk extensions nor the raw size of
        trailer lines, so the framing is walked here: chunk-size lines against
        ``max_chunk_line_bytes``, their extensions against ``max_chunk_extensions_bytes``, the
        trailer section against ``max_header_bytes``. Data bytes are skipped by count, never
        scanned. The walk must agree with llhttp (same body bytes, same end) or the request is
        refused. False: a request was rejected.
        """
        walk = self.chunked_walk
        assert walk is not None
        limits = self.limits
        max_line = limits.max_chunk_line_bytes
        max_extensions = limits.max_chunk_extensions_bytes
        max_trailer = limits.max_header_bytes
        position = 0
        for ex in list(walk):
            if ex.cw_state == CW_START:
                # The head ended in this read: the body starts after its blank line. If the
                # head began here behind other requests, the first blank line may be theirs;
                # candidates are tried until one walks in agreement with llhttp.
                tail = ex.cw_tail
                buffer = tail + data if tail else data
                search = position  # (with a tail, position is 0: the head began earlier)
                outcome = CW_DESYNC
                for _ in range(CW_MAX_CANDIDATES):
                    found = buffer.find(b"\r\n\r\n", search)
                    if found < 0:
                        break
                    outcome = walk_framing(
                        ex, data, found + 4 - len(tail), max_line, max_extensions, max_trailer
                    )
                    if outcome != CW_DESYNC:
                        break
                    reset_walk(ex)
                    search = found + 1
            else:
                outcome = walk_framing(ex, data, position, max_line, max_extensions, max_trailer)
            if outcome < 0:
                self._reject_walked(ex, outcome)
                return False
            position = outcome
            if ex.cw_state == CW_DONE:
                walk.remove(ex)
        if not walk:
            self.chunked_walk = None
        return True

    def _reject_walked(self, ex: Exchange, outcome: int) -> None:
        if outcome == CW_LINE_TOO_LONG:
            rejected = RequestRejected(400, "bad_request", "chunk-size line too long")
        elif outcome == CW_EXTENSIONS_TOO_LONG:
            rejected = RequestRejected(400, "bad_request", "chunk extensions too long")
        elif outcome == CW_TRAILER_TOO_LARGE:
            rejected = RequestRejected(431, "headers_too_large", "trailer section too large")
        else:
            rejected = RequestRejected(400, "bad_request", "chunked framing not understood")
        self.chunked_walk = None
        if ex is self.active:
            self.parsing = ex  # an exchange streaming upstream is aborted with it
        self._reject_parsing(rejected)

    # -- httptools callbacks (request) -------------------------------------------------------
    def on_message_begin(self) -> None:
        server = self.server
        limits = self.limits
        self.head_received = -1  # "began in the current chunk"
        self.parsing = Exchange(time.perf_counter(), limits.max_body_bytes)
        self.head_deadline = server.clock + limits.header_timeout

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url
        if len(ex.url) > self.limits.max_uri_bytes:
            raise RequestRejected(414, "uri_too_long", "request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        name = name.lower()
        ex.header_bytes += len(name) + len(value) + 4
        if ex.header_bytes > self.limits.max_header_bytes:
            raise RequestRejected(431, "headers_too_large", "request header fields too large")
        if UNDERSCORE in name:
            # Backends that read "_" as "-" would see another field (a smuggling vector).
            action = self.underscores
            if action == UNDERSCORE_REJECT:
                raise RequestRejected(400, "bad_request", "header field name with '_'")
            if action == UNDERSCORE_ALLOW and not hdr.underscore_lookalike(name):
                ex.headers.append((name, value))
            return
        special = SPECIAL_HEADERS.get(name)
        if special is not None:
            if special == H_HOST:
                if value not in VALID_HOSTS:
                    value = checked_host(value)  # RFC 9112 §3.2: an invalid Host gets 400
                ex.host = value
                ex.host_count += 1
            elif special == H_CONTENT_LENGTH:
                ex.content_length = value
                ex.cl_count += 1
            elif special == H_TRANSFER_ENCODING:
                ex.chunked = True
                ex.te_count += 1
            elif special == H_CONNECTION:
                ex.conn_tokens = ex.conn_tokens | hdr.connection_tokens(value)
            elif special == H_UPGRADE:
                ex.upgrade = value
            elif special == H_REQUEST_ID:
                ex.request_id = value
            elif special == H_IDEMPOTENCY_KEY:
                self.keyed = True
                if ex.idem_keys is None:
                    ex.idem_keys = [value]
                    ex.body_hash = hashlib.sha256()  # the fingerprint may cover the body
                else:
                    ex.idem_keys.append(value)
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        parser = self.parser
        method = parser.get_method()
        if self.method_hook:
            method = self._method_hook(ex, method)
        ex.method = method
        ex.method_name = method.decode("ascii")
        version = parser.get_http_version()
        if version != "1.1":  # (defaults are not stored: exchange.py, lifecycle._forward)
            ex.version = version
        ex.keep_alive = parser.should_keep_alive()
        if method == b"HEAD":
            ex.is_head = True
        upgrading = parser.should_upgrade()
        # Framing checks llhttp leaves to us. RFC 9112 §3.2: exactly one Host in HTTP/1.1.
        if ex.host_count > 1 or (ex.host_count == 0 and version == "1.1"):
            ex.error = RequestRejected(400, "bad_request", "exactly one Host header is required")
        elif ex.cl_count > 1:
            # RFC 9112 §6.3: differing or repeated lengths make the framing ambiguous.
            ex.error = RequestRejected(400, "bad_request", "more than one Content-Length header")
        elif ex.chunked and ex.content_length is not None:
            ex.error = RequestRejected(
                400, "bad_request", "both Content-Length and Transfer-Encoding"
            )
        elif ex.chunked and version == "1.0":
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message signals faulty framing.
            ex.error = RequestRejected(
                400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request"
            )
        elif ex.chunked and ex.te_count > 1:
            ex.error = RequestRejected(400, "bad_request", "more than one Transfer-Encoding header")
        elif version != "1.1" and version != "1.0":
            # RFC 9110 §15.6.6: llhttp parses "HTTP/2.0" in a request line; this is HTTP/1.x only.
            ex.error = RequestRejected(
                505, "version_not_supported", f"HTTP/{version} is not supported"
            )
        elif method == b"CONNECT":
            ex.error = RequestRejected(405, "method_not_allowed", "CONNECT is not supported")
        if ex.chunked:
            # llhttp reports trailer fields through on_header too (appending to ex.headers):
            # this list keeps the head's fields and checks, then drops, what is appended later.
            ex.headers = HeadFields(ex.headers)
            if ex.error is None and not upgrading:
                if self.head_received >= 0:
                    ex.cw_tail = self.head_tail  # the head began in an earlier read
                if self.chunked_walk is None:
                    self.chunked_walk = [ex]
                else:
                    self.chunked_walk.append(ex)
        if not upgrading or ex.error is not None or b"upgrade" not in ex.conn_tokens:
            ex.upgrade = None
        self.head_deadline = 0.0
        if self.active is None and self.pending_error is None:
            self.active = ex
            self.to_dispatch = True
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self._update_reading()

    def _method_hook(self, ex: Exchange, method: bytes) -> bytes:
        """The real method of a request parsed with a stand-in, and limits.allowed_methods
        (errors found later in on_headers_complete take precedence)."""
        real = self.real_method
        if real is not None:
            method = real  # an extension method llhttp parsed as STAND_IN_METHOD
            self.real_method = None
            self.method_hook = self.allowed_methods is not None
        allowed = self.allowed_methods
        if allowed is not None:
            name = method.decode("ascii")
            if name not in allowed:
                ex.error = self._method_refused(name)
        return method

    def _method_refused(self, method: str) -> RequestRejected:
        allowed = self.allowed_methods
        assert allowed is not None
        if method in KNOWN_METHODS:
            # RFC 9110 §15.5.6: a known method not allowed here; Allow lists what is.
            rejected = RequestRejected(405, "method_not_allowed", f"method {method} is not allowed")
            rejected.headers = b"allow: %s\r\n" % ", ".join(sorted(allowed)).encode("ascii")
            return rejected
        # RFC 9110 §15.6.2: a method the server does not recognise or implement.
        return RequestRejected(501, "not_implemented", f"method {method} is not implemented")

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        size = len(body)
        ex.body_bytes += size
        if ex.body_bytes > ex.max_body:
            raise RequestRejected(413, "body_too_large", "request body exceeds the limit")
        if self.keyed and ex.body_hash is not None:
            ex.body_hash.update(body)
            if ex.recorder is not None:
                ex.recorder.request_body(ex)
        filters = self.filters
        if filters is not None and filters.request_body and filters.exchange is ex:
            # Filtered before it is framed; chunks before the request phase passed are held
            # and filtered then (filtering.filter_held_body).
            body = filtering.filter_request_chunk(filters, ex, body)
            if not body:
                return
            size = len(body)
        framed = b"%x\r\n%b\r\n" % (size, body) if ex.chunked else body
        attempt = ex.attempt
        conn = attempt.conn if attempt is not None else None
        request_body = ex.body
        if request_body is None:
            request_body = ex.body = RequestBody(ex.replay_limit)
        # Chunked bytes wait for the end of the read: its framing is checked first (see
        # _walk_chunked), and ``data_received`` sends them on.
        if conn is not None and not request_body.pending and not ex.chunked:
            conn.send(framed)
            request_body.sent_now(framed, ex.body_bytes)
        elif request_body.hold(framed):
            self._update_reading()

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        ex.request_complete = True
        self.parsing = None
        attempt = ex.attempt
        if (
            attempt is not None
            and attempt.conn is not None
            and not attempt.read_deadline
            and not ex.response_started
        ):
            self._start_read_timer(attempt)  # the upstream has all it needs: now it may be slow
        filters = self.filters
        tail = b""
        if filters is not None and filters.request_body and filters.exchange is ex:
            tail = filtering.end_request_body(filters, ex)  # (else: filter_held_body calls it)
        if ex.chunked:
            # Sent with the rest of the read once its framing is checked (data_received).
            if ex.body is None:
                ex.body = RequestBody(ex.replay_limit)
            if tail:
                ex.body.hold(b"%x\r\n%b\r\n" % (len(tail), tail))
            ex.body.hold(b"0\r\n\r\n")
        if self.keyed and ex.recorder is not None:
            ex.recorder.body_complete()  # a held keyed request is claimed now
        if ex.response_complete:
            # The response finished before the request body did (early reply).
            self._finish(ex)

    def _on_parse_error(self, error: httptools.HttpParserError) -> None:
        cause = error.__context__
        if isinstance(cause, RequestRejected):
            rejected = cause
        else:
            rejected = RequestRejected(400, "bad_request", f"malformed request: {error}")
        self._reject_parsing(rejected)

    def _reject_parsing(self, rejected: RequestRejected) -> None:
        """The request being parsed is bad: answer it (in order) and close the connection.

        Requests parsed from the same bytes are never dispatched: their framing is suspect.
        """
        undispatched = self.to_dispatch
        self.to_dispatch = False
        ex = self.parsing
        self.parsing = None
        self.queue = None
        if undispatched and self.active is not None:
            # The active request arrived in the same bytes as the bad one and was not sent
            # yet: it is dropped too, answered with the error.
            ex = self.active
        if ex is not None and ex is self.active:
            attempt = ex.attempt
            if attempt is not None:
                # The error may be inside a body already streaming upstream: abort that try.
                attempt.abandon()
            if ex.response_started:
                self._observe(ex, ex.status)
                self.active = None
                self.abort()
                return
            ex.keep_alive = False
            self._respond_error(ex, rejected)
            return
        if self.active is None:
            failed = ex if ex is not None else Exchange(time.perf_counter(), 0)
            failed.keep_alive = False
            self.active = failed
            self._respond_error(failed, rejected)
        else:
            # An earlier request is still being answered; the error follows it, in order.
            self.pending_error = rejected
            self._update_reading()

    # -- completion ---------------------------------------------------------------------------
    def flush_to_client(self) -> None:
        out = self.out
        if out:
            self.out = []
            transport = self.transport
            if transport is not None and not self.closed:
                if len(out) == 1:
                    transport.write(out[0])
                else:
                    transport.writelines(out)

    def _finish(self, ex: Exchange) -> None:
        if self.active is not ex:
            return
        self._observe(ex, ex.status)
        self.active = None
        if not ex.keep_alive or self.closed:
            if self.transport is not None:
                self.transport.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            self._update_reading()
            self._dispatch(nxt)
            return
        if self.pending_error is not None:
            error = self.pending_error
            self.pending_error = None
            failed = Exchange(time.perf_counter(), 0)
            failed.keep_alive = False
            self.active = failed
            self._respond_error(failed, error)
            return
        self.idle_deadline = self.server.clock + self.limits.keepalive_timeout
        self._update_reading()
