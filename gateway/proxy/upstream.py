"""Upstream side of the data plane: one keep-alive HTTP/1.1 connection, and a pool per instance.

An ``UpstreamConnection`` parses responses with httptools and forwards every event to the
``ClientConnection`` it is currently lent to (``owner``). Between exchanges it sits idle in its
``InstancePool``; any byte or EOF arriving while idle means the upstream closed or misbehaved, so
the connection leaves the pool at once and is never reused (stale-connection detection).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools

from gateway.proxy.headers import parse_response_head

if TYPE_CHECKING:
    from gateway.proxy.listener import ClientConnection


MAX_RESPONSE_HEAD_BYTES = 64 * 1024


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "body_until_close",
        "collecting",
        "head_buffer",
        "head_start",
        "idle_since",
        "owner",
        "parser",
        "paused",
        "pool",
        "reusable",
        "skip_body",
        "skipped",
        "transport",
        "tunnel",
        "used",
    )

    def __init__(self, pool: InstancePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.owner: ClientConnection | None = None
        self.reusable = True
        self.tunnel = False
        self.used = False  # has carried an exchange before: a failure may mean it was stale
        self.body_until_close = False
        self.idle_since = 0.0
        self.collecting = False  # response head bytes are being gathered
        self.head_buffer = b""
        self.head_start = 0
        self.paused = False  # reading paused because the client cannot take more
        self.skip_body = False  # the request was HEAD: the response has no body whatever it says
        self.skipped = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pool.open_count += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.open_count -= 1
        self.reusable = False
        self.pool.forget(self)
        owner = self.owner
        if owner is not None:
            self.owner = None
            if self.body_until_close:
                # A response without Content-Length or chunking ends at close (RFC 9112 §6.3).
                self.body_until_close = False
                owner.on_response_complete(self)
            else:
                owner.on_upstream_lost(self, exc)

    def eof_received(self) -> bool | None:
        return None  # close our side too; a half-closed upstream cannot carry another request

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the upstream broke the exchange protocol. Drop it.
            self.close()
            return
        if self.tunnel:
            owner.tunnel_to_client(data)
            return
        if self.collecting:
            self.head_buffer = self.head_buffer + data if self.head_buffer else data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            owner.on_upstream_upgrade(self, data[offset:])
        except httptools.HttpParserError as error:
            self.reusable = False
            if self.owner is not None:
                self.owner = None
                owner.on_upstream_failed(self, f"invalid response from upstream: {error}")
            self.close()
        else:
            if self.skipped:
                # llhttp cannot be told a response answers HEAD (httptools gives no way to
                # return "skip body" from on_headers_complete), so it may be waiting for the
                # body that Content-Length announces. The exchange ends here, parser anew.
                self.skipped = False
                self.skip_body = False
                self.parser = httptools.HttpResponseParser(self)
                owner.on_response_message_complete(self)
            elif (
                self.collecting
                and len(self.head_buffer) - self.head_start > MAX_RESPONSE_HEAD_BYTES
            ):
                # Still no end of head after this many bytes: refuse rather than buffer more.
                self.reusable = False
                self.owner = None
                owner.on_upstream_failed(self, "upstream response head too large")
                self.close()
            owner.flush_to_client()

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_client_reading()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_client_reading()

    # -- httptools callbacks ----------------------------------------------------------------
    # No on_header/on_status: the head is read from the raw bytes (see parse_response_head),
    # which costs one regex pass instead of a Python call per header.
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
        if status >= 200 or status == 101:
            self.collecting = False
            self.head_buffer = b""
        else:
            self.head_start = end + 4  # an interim response: the final head follows
        if self.skip_body and status >= 200:
            self.skipped = True
        owner.on_response_head(self, status, head, parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None and not self.skipped:
            owner.on_response_body(body)

    def on_message_complete(self) -> None:
        owner = self.owner
        if owner is not None and not self.skipped:
            owner.on_response_message_complete(self)

    # -- used by the client side ------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def begin_exchange(self, owner: ClientConnection, head_only: bool) -> None:
        self.owner = owner
        self.skip_body = head_only
        self.collecting = True
        self.head_buffer = b""
        self.head_start = 0

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


class UpstreamTLSError(ConnectionError):
    """A TLS handshake with an instance failed; the message says why in plain words."""

    def __init__(self, error: ssl.SSLError, server_name: str | None) -> None:
        detail = getattr(error, "verify_message", None) or getattr(error, "reason", None)
        detail = str(detail or error).lower().replace("_", " ")
        super().__init__(f"TLS handshake with {server_name or 'the instance'} failed: {detail}")
        self.ssl_error = error


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
        "open_count",
        "port",
        "server_hostname",
        "ssl_context",
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

    def close_all(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()

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
