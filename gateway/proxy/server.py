"""The server side of the HTTP/1.1 data plane: ``ProxyServer`` owns the listening sockets, the
live snapshot and the set of client connections (``listener.ClientConnection``).

Timeouts are checked by one periodic sweep per server (``TICK`` seconds) against deadlines stored
on the connections (``FlowControl.check_timeouts``), instead of a timer handle per request. The
sweep also expires refused connections' linger, flushes the access log, and once a second ticks
the upstreams and rate limiters and gives freed heap memory back to the OS after a flood of slow
clients. ``drain`` and ``close`` end it all on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.accesslog import AccessLog
from gateway.proxy import headers as hdr
from gateway.proxy import responses
from gateway.proxy.connlimit import LocalConnectionCount, SharedConnectionCount
from gateway.proxy.listener import ClientConnection
from gateway.tls.accept import ListenerState, start_tls_listener

if TYPE_CHECKING:
    from gateway.config.model import GatewayConfig, ListenerConfig
    from gateway.metrics import GatewayMetrics
    from gateway.snapshot import Snapshot

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
