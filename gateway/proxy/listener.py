"""Client side of the data plane: an ``asyncio.Protocol`` per client connection, on httptools.

Everything here is callback code: no Task and no coroutine per request on the fast path (a new
upstream connection is the exception, opened by ``InstancePool.connect``). One exchange is proxied
at a time per client connection; pipelined requests wait in order (RFC 9112 §9.3.2) with reading
paused. Requests are dispatched only after the parser accepted the whole chunk of bytes they came
in, so bytes that fail to parse never reach an upstream.

``ClientConnection`` is the connection's lifecycle (accept, loss, keep-alive, the next pipelined
request) and the read loop, ``data_received``. Its other parts are mixins: the request codec
(``h1codec.RequestCodec``, with the pure ``h1.py``), flow control and timeouts
(``flowcontrol.FlowControl``), and the lifecycle phases (``lifecycle``, ``relay``,
``failover``). The listening side, ``ProxyServer``, is server.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

import httptools

from gateway.proxy.exchange import Exchange
from gateway.proxy.flowcontrol import FlowControl
from gateway.proxy.h1 import DATA_AFTER_CLOSE, UNDERSCORE_ACTIONS
from gateway.proxy.h2 import take_over_h2c
from gateway.tls.accept import ListenerState, client_cert_element

if TYPE_CHECKING:
    from gateway.proxy.server import ProxyServer


class ClientConnection(FlowControl, asyncio.Protocol):
    __slots__ = ("h2_sniff",)

    def __init__(self, server: ProxyServer, listener: ListenerState | None = None) -> None:
        self.server = server
        self.listener = listener if listener is not None else server.default_listener
        self.sni = ""  # TLS server name the client sent ("" on plaintext or without SNI)
        self.tls_entry = None  # certificate SNI chose (for 421), if SNI
        self.client_cert = None  # x-forwarded-client-cert element, if verified
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing = None
        self.active = None
        # Pipelined requests waiting their turn; allocated on first use (idle connections are
        # many, and an empty deque costs ~600 bytes).
        self.queue = None
        self.out = []
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
        self.tunnel = None  # after a 101: the transport belongs to it
        self.tunnel_pending = None  # client bytes after an Upgrade request
        self.upgrade_pending = False
        self.pending_error = None
        self.limits = server.snapshot.config.limits  # a reload applies to new connections
        self.head_received = 0  # raw bytes seen while a request head is incomplete
        self.head_limit = self.limits.max_header_bytes + self.limits.max_uri_bytes
        self.underscores = UNDERSCORE_ACTIONS[self.limits.headers_with_underscores]
        allowed = self.limits.allowed_methods
        self.allowed_methods = frozenset(allowed) if allowed is not None else None
        self.method_carry = None  # a method token not complete yet (not fed)
        self.real_method = None  # the extension method fed as STAND_IN_METHOD
        # on_headers_complete has method work: a real_method to restore, or allowed_methods.
        self.method_hook = self.allowed_methods is not None
        self.head_tail = b""  # last bytes of a read that ended inside a head
        self.chunked_walk = None  # chunked bodies to walk after a read
        # The active exchange's filters, on a route with a chain (a slot here rather than a
        # field of every Exchange: routes without filters then pay one slot read per phase).
        self.filters = None
        # An Idempotency-Key arrived on this connection (or a route requires keys): only then
        # are the exchanges' idempotency fields read (sticky: pipelined requests may carry one).
        self.keyed = False
        # HTTP/2 hook: look for the h2c preface in the first bytes (gateway/proxy/h2).
        self.h2_sniff = self.listener.http2 is not None and self.listener.tls is None

    # -- connection lifecycle -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = cast("ProxyServer", self.server)
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
        server = cast("ProxyServer", self.server)
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
        elif parsing is not None and not self._read_inside_head(parsing, data):
            return  # the head grew too large
        if self.to_dispatch:
            self.to_dispatch = False
            ex = self.active
            if ex is not None:
                self._dispatch(ex)
        else:
            ex = self.active
            if ex is not None and ex.body is not None and ex.body.pending:
                self._send_pending(ex)  # (if a connection is attached)

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


class StreamClient(ClientConnection):
    """``ClientConnection`` behind the HTTP/2 bridge (h2/bridge.py), whose request counts as an
    HTTP/2 one (``gateway_downstream_requests_total{protocol="h2"}``), where it is observed: the
    HTTP/1.1 path itself counts nothing for the label; its access-log line says
    ``"protocol": "h2"``. Here rather than in the bridge: an interpreted class cannot subclass a
    compiled one."""

    __slots__ = ()
    log_protocol = "h2"  # (its access-log line)

    def _observe(self, ex: Exchange, status: int) -> None:
        self.server.metrics.h2_requests += 1
        super()._observe(ex, status)
