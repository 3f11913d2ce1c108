"""Upstream side of the data plane: one keep-alive HTTP/1.1 connection, and a pool per instance.

An ``UpstreamConnection`` parses responses with httptools. It is lent to one try of an
exchange at a time (``owner``: an ``attempt.UpstreamAttempt``, seen here as ``UpstreamTry``) and
reports every event straight to that try's downstream (``owner.client``, seen here as
``UpstreamEvents``: the phases of relay.py and failover.py), naming the try.
Between exchanges it sits idle in its ``InstancePool``; any byte or EOF arriving while idle
means the upstream closed or misbehaved, so the connection leaves the pool at once and is never
reused (stale-connection detection).

Response validation (docs/architecture.md, "Upstream response validation"): a connection whose
upstream broke HTTP/1.1 framing is closed, never pooled, and counted in
``gateway_upstream_protocol_errors_total{upstream,reason}``. In particular no byte that follows
a complete response is ever parsed on behalf of another exchange: the final response is handed
to the client only after ``feed_data`` returned for the whole read, and a message that begins
after it (``on_message_begin``) stops the parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, cast

import httptools
from mypy_extensions import mypyc_attr

from gateway.pools import set_pool_factory
from gateway.proxy.headers import parse_response_head

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics
    from gateway.proxy.headers import ResponseHead


MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# Chunked response framing (RFC 9112 §7.1). httptools reports no chunk extensions, so the bytes
# fed to the parser inside a chunked body that are neither body bytes nor the minimal framing
# of a chunk (hex size, CRLF, CRLF after the data: CHUNK_FRAMING_ALLOWANCE) are counted as
# extension/trailer bytes. Constants, not config: no config key bounds upstream framing yet.
CHUNK_FRAMING_ALLOWANCE = 20  # 16 hex digits (llhttp's 64-bit maximum) + 2 CRLF
MAX_CHUNK_FRAMING_BYTES = 4 * 1024  # per chunk: within one read, or across reads without body
MAX_RESPONSE_FRAMING_BYTES = 64 * 1024  # per response: all extensions and trailers together

# Reasons of gateway_upstream_protocol_errors_total (a fixed set: bounded labels).
DATA_AFTER_RESPONSE = "data_after_response"  # bytes after a complete response, or while idle
INVALID_RESPONSE = "invalid_response"  # the status line or head does not parse
RESPONSE_HEAD_TOO_LARGE = "response_head_too_large"
CHUNK_FRAMING = "chunk_framing"  # malformed chunked body, or beyond the framing limits
UNEXPECTED_SWITCHING_PROTOCOLS = "unexpected_switching_protocols"  # 101 nobody asked for
PROTOCOL_ERROR_REASONS = (
    DATA_AFTER_RESPONSE,
    INVALID_RESPONSE,
    RESPONSE_HEAD_TOO_LARGE,
    CHUNK_FRAMING,
    UNEXPECTED_SWITCHING_PROTOCOLS,
)


# The state of an UpstreamConnection (ints: compared on every read). Transitions happen only in
# UpstreamConnection's methods and its pool's (acquire/release), never in the client side:
#
#   CONNECTING ─connection_made─▶ IDLE ─begin_exchange─▶ WAITING_HEAD ─final head─▶ READING_BODY
#   READING_BODY ─message complete─▶ COMPLETE ─pool.release─▶ IDLE (or CLOSED)
#   WAITING_HEAD ─final head of a HEAD request─▶ COMPLETE;  ─101─▶ (detach_for_tunnel) TUNNELED
#   any ─close/abort/fail/connection_lost─▶ CLOSED
CONNECTING = 0  # the TCP (and TLS) handshake is under way
IDLE = 1  # in its pool, lent to nobody: any byte or EOF means the upstream broke the protocol
WAITING_HEAD = 2  # lent to an exchange; response head bytes are gathered (1xx heads included)
READING_BODY = 3  # the final head was handed over; the body is relayed
COMPLETE = 4  # the final response is complete; handed over after this read; nothing may follow
TUNNELED = 5  # after a 101 the transport belongs to a Tunnel (gateway/proxy/tunnel.py)
CLOSED = 6
STATE_NAMES = (
    "CONNECTING",
    "IDLE",
    "WAITING_HEAD",
    "READING_BODY",
    "COMPLETE",
    "TUNNELED",
    "CLOSED",
)


_Try = TypeVar("_Try", contravariant=True)


class UpstreamEvents(Protocol[_Try]):
    """What a connection reports, and to whom: the downstream of the try it is lent to
    (``downstream.Downstream``), each event naming that try. The downstream tells a try of the
    exchange it is answering from a stale one (whose exchange ended) by the try's exchange.

    Straight to the downstream, not through the try: a forwarding call per event measured
    ~1% of a small GET (docs/instructions.md)."""

    def on_response_head(
        self, attempt: _Try, status: int, head: ResponseHead, keep_alive: bool
    ) -> None: ...
    def on_response_body(self, attempt: _Try, body: bytes) -> None: ...
    def on_response_message_complete(self, attempt: _Try) -> None: ...
    def on_response_complete(self, attempt: _Try) -> None: ...
    def on_upstream_lost(
        self, attempt: _Try, conn: UpstreamConnection, exc: Exception | None
    ) -> None: ...
    def on_upstream_failed(self, attempt: _Try, conn: UpstreamLink, reason: str) -> None: ...
    def on_upstream_upgrade(self, attempt: _Try, conn: UpstreamConnection, tail: bytes) -> None: ...
    def flush_to_client(self) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


class UpstreamTry(Protocol):
    """What a connection is lent to: one try of an exchange (``attempt.UpstreamAttempt``)."""

    @property
    def client(self) -> UpstreamEvents[Self]: ...
    def bind_pool(self, pool: InstancePool) -> None: ...


_Link = TypeVar("_Link", contravariant=True)


class LinkTransport(Protocol):
    """Where the phases write a request: an ``asyncio.Transport`` (``TranslatedStream`` is
    its own)."""

    def write(self, data: bytes, /) -> None: ...
    def writelines(self, pieces: list[bytes], /) -> None: ...


class LinkPool(Protocol[_Link]):
    """Where a connection goes back when its exchange is done (``InstancePool``)."""

    def release(self, conn: _Link, /) -> None: ...


class UpstreamLink(Protocol):
    """The connection of a try as the phases drive it (``UpstreamAttempt.conn``, and the
    ``conn`` of the failure paths): an ``UpstreamConnection``, or the
    ``h2.from_h1.TranslatedStream`` that carries an HTTP/1.1 exchange as an HTTP/2 stream.

    A protocol, not the class: compiled (mypyc), a value stored or passed as an
    ``UpstreamConnection`` is checked to be one, and the stream is not. Events that only an
    ``UpstreamConnection`` reports (``on_upstream_lost``, ``on_upstream_upgrade``) keep the
    class."""

    @property
    def used(self) -> bool:
        """Has carried an exchange before: a failure may mean it went stale while idle."""
        ...

    @property
    def transport(self) -> LinkTransport | None: ...
    @property
    def pool(self) -> LinkPool[Self]: ...
    def begin_exchange(self, owner: UpstreamTry, head_only: bool) -> None: ...
    def send(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def protocol_error(self, reason: str) -> None: ...
    def discard(self) -> None:
        """Given up mid-message: aborted, its events go nowhere."""

    def close(self) -> None:
        """Done with, though the request was not all sent: closed, its events go nowhere."""


class UpstreamPool(Protocol):
    """An instance's pool as the phases take connections from it (``InstancePool``, or
    ``h2.client.H2InstancePool``, which answers with a ``TranslatedStream``)."""

    def acquire(self) -> UpstreamLink | None: ...
    def connect(
        self, on_done: Callable[[UpstreamLink | None, BaseException | None], Any], /
    ) -> object: ...


class LeftoverData(Exception):
    """Raised in a parser callback: a message began after the final response was complete."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "body_seen",
        "body_until_close",
        "chunked",
        "chunks",
        "framing_body_mark",
        "framing_chunk_mark",
        "framing_raw",
        "framing_raw_mark",
        "framing_run",
        "head_buffer",
        "head_start",
        "idle_since",
        "interim",
        "owner",
        "parser",
        "paused",
        "pool",
        "reusable",
        "skip_body",
        "skipped",
        "state",
        "transport",
        "used",
    )

    def __init__(self, pool: InstancePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.owner: UpstreamTry | None = None
        self.state = CONNECTING
        self.reusable = True  # the upstream allows another request on this connection
        self.used = False  # has carried an exchange before: a failure may mean it was stale
        self.body_until_close = False
        self.idle_since = 0.0
        self.head_buffer = b""
        self.head_start = 0
        self.paused = False  # reading paused because the client cannot take more
        self.skip_body = False  # the request was HEAD: the response has no body whatever it says
        self.skipped = False
        self.interim = False  # the head being parsed is a 1xx: its message is not the response
        # Chunked body accounting (see MAX_CHUNK_FRAMING_BYTES); only kept while ``chunked``.
        self.chunked = False
        self.body_seen = 0
        self.chunks = 0
        self.framing_raw = 0  # raw bytes fed since the end of the final head
        self.framing_raw_mark = 0
        self.framing_body_mark = 0
        self.framing_chunk_mark = 0
        self.framing_run = 0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pool.open_count += 1
        self.state = IDLE

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.open_count -= 1
        self.state = CLOSED
        self.reusable = False
        self.pool.forget(self)
        owner = self.owner
        if owner is not None:
            self.owner = None
            if self.body_until_close and exc is None:
                # A response without Content-Length or chunking ends at close (RFC 9112 §6.3);
                # a reset is no end, it truncates the body.
                self.body_until_close = False
                owner.client.on_response_complete(owner)
            else:
                owner.client.on_upstream_lost(owner, self, exc)

    def eof_received(self) -> bool | None:
        return None  # close our side too; a half-closed upstream cannot carry another request

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the upstream broke the exchange protocol. Drop it.
            self.protocol_error(DATA_AFTER_RESPONSE)
            self.close()
            return
        state = self.state
        if state == WAITING_HEAD:
            self.head_buffer = self.head_buffer + data if self.head_buffer else data
        elif self.chunked:
            self.framing_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            owner.client.on_upstream_upgrade(owner, self, data[offset:])
        except httptools.HttpParserError as error:
            if self.state == COMPLETE:
                # RFC 9112 §9.3: the response was complete and more bytes followed in the same
                # read (another response, a 1xx, anything). The client gets its response; the
                # connection is closed, so no other exchange can read those bytes.
                self.reusable = False
                self.protocol_error(DATA_AFTER_RESPONSE)
                if self.owner is owner:
                    self._complete(owner)
                self.close()
            else:
                self.fail(
                    owner,
                    CHUNK_FRAMING if self.chunked else INVALID_RESPONSE,
                    f"invalid response from upstream: {error}",
                )
        else:
            state = self.state
            if state == COMPLETE:
                # The usual end of an exchange; _complete inlined (one call less per response).
                if self.chunked:
                    if self._framing_exceeded():
                        self.fail(owner, CHUNK_FRAMING, "upstream chunk framing exceeds its limits")
                        owner.client.flush_to_client()
                        return
                    self.chunked = False
                if self.owner is owner:
                    if self.skipped:
                        self._reset_after_head()
                    owner.client.on_response_message_complete(owner)
                return  # the completion flushed
            elif (
                state == WAITING_HEAD
                and len(self.head_buffer) - self.head_start > MAX_RESPONSE_HEAD_BYTES
            ):
                # Still no end of head after this many bytes: refuse rather than buffer more.
                self.fail(owner, RESPONSE_HEAD_TOO_LARGE, "upstream response head too large")
            elif self.chunked and self._framing_exceeded():
                self.fail(owner, CHUNK_FRAMING, "upstream chunk framing exceeds its limits")
            owner.client.flush_to_client()

    def _complete(self, owner: UpstreamTry) -> None:
        """The final response ended with this read: hand it over (its body is all out)."""
        if self.skipped:
            self._reset_after_head()
        self.chunked = False
        owner.client.on_response_message_complete(owner)

    def _reset_after_head(self) -> None:
        # llhttp cannot be told a response answers HEAD (httptools gives no way to return
        # "skip body" from on_headers_complete), so it may be waiting for the body that
        # Content-Length announces. The exchange ends here, parser anew.
        self.skipped = False
        self.skip_body = False
        self.parser = httptools.HttpResponseParser(self)

    def _framing_exceeded(self) -> bool:
        """Chunk framing beyond the allowance, per chunk and per response; called after each
        read while a chunked body is parsed.

        Reads are the unit: a read's framing excess is charged both to the run of reads since
        body last moved and, if body moved in it, to the run it starts (where in the read the
        body was is unknown). So an extension or trailer section larger than the limit is always
        caught, whatever the read boundaries; legitimate framing is nowhere near it.
        """
        raw = self.framing_raw
        body = self.body_seen
        chunks = self.chunks
        excess = (
            raw
            - self.framing_raw_mark
            - (body - self.framing_body_mark)
            - CHUNK_FRAMING_ALLOWANCE * (chunks - self.framing_chunk_mark)
        )
        run = self.framing_run + excess
        self.framing_run = excess if body != self.framing_body_mark else run
        self.framing_raw_mark = raw
        self.framing_body_mark = body
        self.framing_chunk_mark = chunks
        return (
            run > MAX_CHUNK_FRAMING_BYTES
            or raw - body - CHUNK_FRAMING_ALLOWANCE * chunks > MAX_RESPONSE_FRAMING_BYTES
        )

    def fail(self, owner: UpstreamTry, reason: str, message: str) -> None:
        """The upstream broke the protocol mid-exchange: count it, close, tell the client side
        (which answers 502, or aborts the client connection if the response already started)."""
        self.reusable = False
        self.state = CLOSED
        self.chunked = False
        self.protocol_error(reason)
        if self.owner is owner:
            self.owner = None
            owner.client.on_upstream_failed(owner, self, message)
        self.abort()

    def protocol_error(self, reason: str) -> None:
        pool = self.pool
        if pool.metrics is not None:
            pool.metrics.upstream_protocol_error(pool.upstream, reason)

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.client.pause_client_reading()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.client.resume_client_reading()

    # -- httptools callbacks ----------------------------------------------------------------
    # No on_header/on_status: the head is read from the raw bytes (see parse_response_head),
    # which costs one regex pass instead of a Python call per header.
    def on_message_begin(self) -> None:
        if self.state == COMPLETE:
            raise LeftoverData  # a message after the final response: nobody asked for it

    def on_headers_complete(self) -> None:
        owner = self.owner
        if owner is None:
            return
        buffer = self.head_buffer
        start = self.head_start
        end = buffer.find(b"\r\n\r\n", start)
        parser = self.parser
        status = parser.get_status_code()
        if end < 0:
            raise ValueError("response head is not CRLF-delimited")
        head = parse_response_head(buffer[start : end + 2])
        if status >= 200:
            self.head_buffer = b""
            keep_alive = self.reusable = parser.should_keep_alive()
            if self.skip_body:
                # A response to HEAD ends at its head (RFC 9110 §9.3.2): any byte after it in
                # this read is not part of it.
                self.skipped = True
                self.state = READING_BODY
                owner.client.on_response_head(owner, status, head, keep_alive)
                if self.state == READING_BODY:  # (not dropped by a retry)
                    self.state = COMPLETE
                if len(buffer) > end + 4 and self.owner is owner:
                    raise LeftoverData
                return
            if head.chunked:
                self.chunked = True
                self.body_seen = self.chunks = 0
                self.framing_raw = len(buffer) - end - 4  # this read's bytes after the head
                self.framing_raw_mark = self.framing_body_mark = self.framing_chunk_mark = 0
                self.framing_run = 0
            elif head.content_length is None and status != 204 and status != 304:
                # Close-delimited (RFC 9112 §6.3 item 8): this connection cannot be reused.
                self.body_until_close = True
                self.reusable = False
            self.state = READING_BODY
            owner.client.on_response_head(owner, status, head, keep_alive)
            return
        if status == 101:
            self.head_buffer = b""
            self.state = READING_BODY  # no body: the parser stops at the upgrade
            self.interim = True  # its "message" ends where the tunnel begins
        else:
            self.interim = True
            self.head_start = end + 4  # an interim response: the final head follows
        owner.client.on_response_head(owner, status, head, parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None and not self.skipped:
            if self.chunked:
                self.body_seen += len(body)
            owner.client.on_response_body(owner, body)

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            owner = self.owner
            if owner is not None:  # a 1xx: the final response follows
                owner.client.on_response_message_complete(owner)
        else:
            # Handed over after feed_data returns: bytes after it in this read must be seen
            # first (on_message_begin), or they would be parsed for the next exchange.
            self.state = COMPLETE

    # -- used by the client side ------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def begin_exchange(self, owner: UpstreamTry, head_only: bool) -> None:
        self.owner = owner
        self.skip_body = head_only
        self.state = WAITING_HEAD
        self.head_buffer = b""
        self.head_start = 0
        pool = self.pool
        if pool.metrics is None:
            owner.bind_pool(pool)

    def detach_for_tunnel(self) -> None:
        """After a 101 the transport goes to a Tunnel (gateway/proxy/tunnel.py): this protocol
        only does its bookkeeping when the connection is lost (the tunnel calls
        ``connection_lost``)."""
        self.owner = None
        self.reusable = False
        self.paused = False
        self.state = TUNNELED

    def discard(self) -> None:
        """The exchange gives this connection up mid-message (a failure, a retry, a lost
        client): it is in an unknown state, so it is aborted, and its events go nowhere."""
        self.owner = None
        self.abort()

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def close(self) -> None:
        self.owner = None  # (a connection that carries on is released, not closed)
        self.reusable = False
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.reusable = False
        self.state = CLOSED
        if self.transport is not None:
            self.transport.abort()


# An OSError subclass cannot be a mypyc native class.
@mypyc_attr(native_class=False)
class UpstreamTLSError(ConnectionError):
    """A TLS handshake with an instance failed; the message says why in plain words."""

    def __init__(self, error: ssl.SSLError, server_name: str | None) -> None:
        detail = getattr(error, "verify_message", None) or getattr(error, "reason", None)
        detail = str(detail or error).lower().replace("_", " ")
        super().__init__(f"TLS handshake with {server_name or 'the instance'} failed: {detail}")
        self.ssl_error = error


# Interpreted subclasses: the sans-IO test harness settles connects itself.
@mypyc_attr(allow_interpreted_subclasses=True)
class InstancePool:
    """Idle keep-alive connections to one instance, most recently used first."""

    __slots__ = (
        "closed",
        "connect_timeout",
        "connecting",
        "host",
        "idle",
        "idle_timeout",
        "max_idle",
        "metrics",
        "open_count",
        "port",
        "server_hostname",
        "ssl_context",
        "upstream",
    )

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
    ) -> None:
        self.host = host
        # upstreams.NAME.tls: connections are TLS, verified against server_hostname (SNI).
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.port = port
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.idle: list[UpstreamConnection] = []
        self.open_count = 0
        self.connecting = 0
        self.closed = False  # the instance left the config: connections close when released
        # Where protocol errors are counted; bound by the first exchange (a pool belongs to one
        # upstream, and a process has one GatewayMetrics), so idle-time errors are counted too.
        self.metrics: GatewayMetrics | None = None
        self.upstream = ""

    def bind_metrics(self, metrics: GatewayMetrics, upstream: str) -> None:
        self.metrics = metrics
        self.upstream = upstream

    def acquire(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        conn.owner = None
        if self.closed or not conn.reusable or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.state = IDLE
        conn.used = True
        conn.resume_reading()  # an idle connection must see the upstream's EOF
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle longer than ``idle_timeout`` (oldest are at the front)."""
        idle = self.idle
        cutoff = now - self.idle_timeout
        while idle and idle[0].idle_since < cutoff:
            idle.pop(0).close()

    def close_idle(self) -> None:
        """Close every idle connection now; the pool stays usable for new ones."""
        while self.idle:
            self.idle.pop().close()

    def close_all(self) -> None:
        self.closed = True
        self.close_idle()

    def connect(
        self,
        on_done: Callable[[UpstreamConnection | None, BaseException | None], Any],
    ) -> asyncio.Task[None]:
        """Open a new connection off the hot path; ``on_done(conn, error)`` runs when it settles."""
        loop = asyncio.get_running_loop()
        self.connecting += 1

        async def open_connection() -> None:
            context = self.ssl_context
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if context is None:
                        _, protocol = await loop.create_connection(
                            lambda: UpstreamConnection(self), self.host, self.port
                        )
                    else:
                        # The handshake is part of connecting: its failure is a connect
                        # failure (retried elsewhere, counted by outlier detection).
                        _, protocol = await loop.create_connection(
                            lambda: UpstreamConnection(self),
                            self.host,
                            self.port,
                            ssl=context,
                            server_hostname=self.server_hostname,
                            ssl_handshake_timeout=self.connect_timeout,
                        )
            except ssl.SSLError as error:
                self.connecting -= 1
                on_done(None, UpstreamTLSError(error, self.server_hostname))
            except (OSError, TimeoutError) as error:
                self.connecting -= 1
                on_done(None, error)
            except asyncio.CancelledError:
                self.connecting -= 1
                raise
            else:
                self.connecting -= 1
                on_done(protocol, None)

        return loop.create_task(open_connection())


# gateway.snapshot creates pools through this factory (gateway/pools.py) and does not import us.
set_pool_factory(InstancePool)
