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
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools
import orjson

from gateway.accesslog import AccessLog, iso_time
from gateway.proxy import headers as hdr
from gateway.proxy.connlimit import LocalConnectionCount, SharedConnectionCount
from gateway.proxy.h2 import take_over_h2c
from gateway.proxy.normalize import InvalidTarget, normalize_rewritten, parse_target
from gateway.proxy.upstream import (
    UNEXPECTED_SWITCHING_PROTOCOLS,
    InstancePool,
    UpstreamConnection,
)
from gateway.ratelimit import Decision, RouteLimiter
from gateway.resilience.backoff import parse_retry_after
from gateway.resilience.retry import (
    CONNECT_FAILURE,
    GATEWAY_STATUSES,
    IDEMPOTENT_METHODS,
    RESET,
    STATUS,
    TIMEOUT,
    RetryPolicy,
    is_gateway_failure,
)
from gateway.tls.accept import ListenerState, client_cert_element, start_tls_listener

if TYPE_CHECKING:
    from gateway.config.model import GatewayConfig, ListenerConfig
    from gateway.idempotency.policy import Recorder
    from gateway.metrics import GatewayMetrics
    from gateway.routing import Route
    from gateway.snapshot import Instance, Snapshot, Upstream
    from gateway.tls.contexts import CertEntry

log = logging.getLogger("gateway.proxy")

TICK = 0.1  # seconds between timeout sweeps; deadlines are this coarse
REPLAY_LIMIT = (
    64 * 1024
)  # request body kept to replay once on a fresh connection if a pooled one was stale
PENDING_BODY_LIMIT = (
    256 * 1024
)  # body buffered before the upstream is ready; beyond, reading pauses

# Connections refused over limits.max_connections get one small 503 and a half-close, then their
# bytes are read and dropped for up to LINGER seconds so that closing does not reset the answer
# away; beyond LINGER_MAX such connections at once they are closed right after the write.
LINGER = 2.0
LINGER_MAX = 1024
# Give freed heap memory back to the OS (glibc malloc_trim) once this many connections closed
# and the open count fell to half its recent peak: after a flood of slow clients, not under churn.
TRIM_AFTER_CLOSED = 100

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# An extension method (RFC 9110 §9.1) llhttp does not know is fed to it as this one, which it
# parses the same way (request framing does not depend on the method), and restored afterwards.
_STAND_IN_METHOD = b"GET"
MAX_METHOD_BYTES = 64  # a longer method token is refused (400)
_MAX_PREFIX_BYTES = 1024  # request-line bytes kept across reads for a method llhttp refuses
# llhttp's errors for a method it does not know: at the method, or (RTSP names) at the version.
_UNKNOWN_METHOD_ERRORS = (
    "Invalid method encountered",
    "Expected space after method",
    "Invalid method for HTTP/x.x request",
)
# Headers of the underscore option, as ints for a cheap compare per header.
_UNDERSCORE_ALLOW = 0
_UNDERSCORE_DROP = 1
_UNDERSCORE_REJECT = 2
_UNDERSCORE_ACTIONS = {"allow": _UNDERSCORE_ALLOW, "drop": _UNDERSCORE_DROP, "reject": 2}
# An int: ``b"_" in name`` costs ~0.2 µs more, as bytes.__contains__ first tries its argument
# as an integer and raises (and clears) a TypeError for a bytes one.
_UNDERSCORE = ord("_")

# Where the chunked-body walker is (see ``ClientConnection._walk_chunked``).
_CW_START = -1  # the head ended in this read; where the body starts is still to be found
_CW_LINE = 0  # in a chunk-size line
_CW_DATA = 1  # in chunk data
_CW_DATA_CRLF = 2  # in the CRLF after chunk data
_CW_TRAILER = 3  # in the trailer section
_CW_DONE = 4
_CW_MAX_CANDIDATES = 8  # head ends tried when a chunked head ended mid-read (pipelining)

# Response body framing toward the client.
FRAME_NONE = 0  # no body (HEAD, 1xx, 204, 304)
FRAME_RAW = 1  # bytes as they come: Content-Length known, or close-delimited toward the client
FRAME_CHUNKED = 2  # re-encoded as chunked

_H_HOST = 1
_H_CONTENT_LENGTH = 2
_H_TRANSFER_ENCODING = 3
_H_CONNECTION = 4
_H_UPGRADE = 5
_H_REQUEST_ID = 6
_H_IDEMPOTENCY_KEY = 7
_SPECIAL_HEADERS = {
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"upgrade": _H_UPGRADE,
    b"x-request-id": _H_REQUEST_ID,
    b"idempotency-key": _H_IDEMPOTENCY_KEY,
}

_REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    501: b"Not Implemented",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
    308: b"Permanent Redirect",
}
_MISDIRECTED = "the certificate of this connection does not cover the requested host"
_REDIRECT_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+")


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


def _refusal_response(request_id: bytes, reason: str) -> bytes:
    body = orjson.dumps(
        {
            "error": reason,
            "message": "the gateway is at its connection limit"
            if reason == "max_connections"
            else "the gateway is shutting down",
            "status": 503,
            "request_id": request_id.decode("ascii"),
        }
    )
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nretry-after: 1\r\nx-request-id: %s\r\n"
        b"connection: close\r\n\r\n%s" % (len(body), request_id, body)
    )


def _retry_after(fields: bytes) -> float | None:
    """Seconds from a Retry-After field (RFC 9110 §10.2.3) in a raw header block, if any."""
    lowered = fields.lower()
    at = lowered.find(b"retry-after:")
    if at < 0 or (at > 0 and lowered[at - 1 : at] != b"\n"):
        return None
    end = lowered.find(b"\r\n", at)
    return parse_retry_after(fields[at + 12 : end].strip(), time.time())


# Rate-limit refusals: metric label and the message of the JSON error body.
_REFUSAL_RESULTS = {
    "rate_limited": "limited",
    "store_unavailable": "store_error",
    "max_in_flight": "max_in_flight",
    "missing_key": "missing_key",
}
_REFUSAL_MESSAGES = {
    429: "rate limit exceeded",
    503: "too many requests in flight, or the rate-limit store is unavailable",
    400: "the request lacks the value its rate limit is keyed on",
}


# Methods llhttp parses (its HTTP method table): an llhttp error on one of these is not about
# an unknown method, so no stand-in is tried.
_LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH"
    b" SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY"
    b" SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY PRI".split()
)
_VALID_HOSTS = hdr.VALID_AUTHORITY_CACHE  # membership first: the same few Hosts repeat


def _checked_host(value: bytes) -> bytes:
    """A Host value not seen valid before: valid (maybe without its trailing OWS), or 400."""
    if hdr.valid_authority(value):
        return value
    stripped = value.strip(b" \t")  # RFC 9110 §5.5: OWS around a value is not part of it
    if stripped != value and hdr.valid_authority(stripped):
        return stripped
    raise RequestRejected(400, "bad_request", "invalid Host header")


# Outcomes of _walk_framing below zero (a non-negative outcome is where the walk stopped).
_CW_DESYNC = -1
_CW_LINE_TOO_LONG = -2
_CW_EXTENSIONS_TOO_LONG = -3
_CW_TRAILER_TOO_LARGE = -4
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]+")


def _walk_framing(
    ex: Exchange, data: bytes, position: int, max_line: int, max_extensions: int, max_trailer: int
) -> int:
    """Walk the chunked framing of ``ex`` in ``data`` from ``position`` (state kept on ``ex``).

    Returns where the walk stopped (``len(data)``, or the end of the message), or a negative
    outcome. Checked against llhttp: the data bytes skipped must be those it delivered, and the
    walk must end the message exactly when llhttp did.
    """
    size = len(data)
    state = _CW_LINE if ex.cw_state == _CW_START else ex.cw_state
    line = ex.cw_line
    skipped = 0
    while position < size:
        if state == _CW_DATA:
            take = min(ex.cw_left, size - position)
            position += take
            skipped += take
            ex.cw_left -= take
            if ex.cw_left == 0:
                state = _CW_DATA_CRLF
                ex.cw_crlf = 2
        elif state == _CW_DATA_CRLF:
            take = min(ex.cw_crlf, size - position)
            position += take
            ex.cw_crlf -= take
            if ex.cw_crlf == 0:
                state = _CW_LINE
        elif state == _CW_LINE:
            newline = data.find(b"\n", position)
            if newline < 0:
                if len(ex.cw_prefix) < 20:
                    ex.cw_prefix += data[position : position + 20]
                line += size - position
                if line > max_line:
                    return _CW_LINE_TOO_LONG
                position = size
                break
            end = newline + 1
            line += end - position
            if line > max_line:
                return _CW_LINE_TOO_LONG
            start = data[position : min(end, position + 20)]
            if ex.cw_prefix:
                start = ex.cw_prefix + start
                ex.cw_prefix = b""
            digits = _CHUNK_SIZE_RE.match(start)
            if digits is None:
                return _CW_DESYNC
            ex.cw_extensions += line - len(digits.group()) - 2
            if ex.cw_extensions > max_extensions:
                return _CW_EXTENSIONS_TOO_LONG
            line = 0
            position = end
            ex.cw_left = int(digits.group(), 16)
            state = _CW_DATA if ex.cw_left else _CW_TRAILER
        else:  # _CW_TRAILER: field lines up to an empty line
            newline = data.find(b"\n", position)
            end = size if newline < 0 else newline + 1
            line += end - position
            ex.cw_trailer += end - position
            if ex.cw_trailer > max_trailer:
                return _CW_TRAILER_TOO_LARGE
            position = end
            if newline >= 0:
                if line == 2:
                    state = _CW_DONE
                    line = 0
                    break
                line = 0
    ex.cw_state = state
    ex.cw_line = line
    delivered = ex.body_bytes - ex.cw_body_mark
    ex.cw_body_mark = ex.body_bytes
    if skipped != delivered or (state == _CW_DONE) != ex.request_complete:
        return _CW_DESYNC
    return position


def _reset_walk(ex: Exchange) -> None:
    """Back to the start, after a walk from a wrong candidate position."""
    for name in (
        "cw_state",
        "cw_line",
        "cw_prefix",
        "cw_left",
        "cw_crlf",
        "cw_extensions",
        "cw_trailer",
        "cw_body_mark",
    ):
        ex.__dict__.pop(name, None)


class RequestRejected(Exception):
    """Raised inside a parser callback to stop parsing with a specific status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = b""  # extra header lines of the error response (e.g. Allow)


class _HeldMethodParser:
    """Stands in for the parser while a method token is incomplete and held back: the next read
    is refused with ``_METHOD_HELD``, and the error path feeds the held bytes and the new ones
    to a fresh parser."""

    def feed_data(self, data: bytes) -> None:
        raise _METHOD_HELD


_METHOD_HELD = httptools.HttpParserError("method token held for more bytes")
_HELD_METHOD_PARSER = _HeldMethodParser()


class HeadFields(list[tuple[bytes, bytes]]):
    """The head fields of a chunked request, once the head is complete. What on_header appends
    after that is a trailer field: never merged into the head nor forwarded (the gateway drops
    request trailers), and RFC 9110 §6.5.1 fields are refused as they arrive, before the read
    they came in can dispatch anything. (A subclass only for chunked requests: a second list
    attribute on every Exchange cost ~0.15 µs per request in instance-dict growth.)"""

    def append(self, item: tuple[bytes, bytes]) -> None:
        name = item[0]
        if hdr.forbidden_trailer(name):
            raise RequestRejected(
                400, "bad_request", f"{name.decode('latin-1')} is not allowed in trailers"
            )


class Exchange:
    """One request/response pair and everything the proxy tracks about it.

    Defaults live on the class and only the fields a request touches get an instance value:
    creating one per request then costs a few stores instead of forty.
    """

    url = b""
    header_bytes = 0
    host: bytes | None = None
    host_count = 0
    content_length: bytes | None = None
    cl_count = 0
    chunked = False
    te_count = 0
    conn_tokens: frozenset[bytes] = frozenset()
    upgrade: bytes | None = None
    request_id: bytes | None = None
    method = b""
    method_name = ""
    version = "1.1"
    keep_alive = True
    is_head = False
    error: RequestRejected | None = None
    body_bytes = 0
    pending: list[bytes] | None = None  # framed body bytes waiting for the upstream
    pending_bytes = 0
    replay: list[bytes] | None = None  # framed body bytes sent, for a stale-connection retry
    request_complete = False
    route: Route | None = None
    route_name = "<none>"
    upstream: Upstream | None = None
    upstream_name = "<none>"
    instance: Instance | None = None
    conn: UpstreamConnection | None = None
    head = b""
    status = 0
    interim = False
    response_started = False
    response_complete = False
    response_frame = FRAME_NONE
    stale_retried = False
    deadline = 0.0
    read_deadline = 0.0
    t_upstream = 0.0
    t_upstream_done = 0.0
    # Retries (RFC 9110 §9.2.2 decides which methods may be repeated).
    retry: RetryPolicy | None = None
    retry_method_ok = False
    attempt = 1
    hash_key: bytes | None = None
    tried: tuple[Instance, ...] = ()  # instances whose try failed: retries avoid them
    body_sent = False  # a body byte went to some upstream
    replay_limit = REPLAY_LIMIT
    retry_timer: asyncio.TimerHandle | None = None
    counted = False  # upstream-level counters (active requests, breaker) were taken
    idempotent = False  # RFC 9110 §9.2.2 method, or an Idempotency-Key header
    # Idempotency-Key (gateway/idempotency): field values, body digest, the route's recorder.
    idem_keys: list[bytes] | None = None
    body_hash: hashlib._Hash | None = None
    idem_checked = False
    hedge_conn: UpstreamConnection | None = None  # a second, hedged try in flight
    hedge_instance: Instance | None = None
    hedge_timer: asyncio.TimerHandle | None = None
    hedged = False
    limiter: RouteLimiter | None = None  # holds a max_in_flight slot to give back
    ratelimit = ""  # the rate-limit decision, for the access log
    ratelimit_headers = b""  # RateLimit header lines for the admitted response
    bytes_out = 0  # response body bytes relayed to the client
    instance_address = ""
    error_code = ""  # why the gateway answered itself (no_route, upstream_timeout, ...)
    method_prefix = b""  # the bytes of this read when it ended inside the method (split token)
    # Chunked body walker (framing bytes are measured: llhttp reports no extensions).
    cw_state = _CW_START
    cw_line = 0  # bytes of the current chunk-size or trailer line so far
    cw_prefix = b""  # the start of a chunk-size line that spans reads (its hex size)
    cw_left = 0  # data bytes left in the current chunk
    cw_crlf = 0  # bytes left of the CRLF after chunk data
    cw_extensions = 0  # chunk-extension bytes so far
    cw_trailer = 0  # trailer section bytes so far
    cw_body_mark = 0  # body_bytes when the last read was walked
    cw_tail = b""  # the last bytes of the read before the one that ended the head

    def __init__(self, now: float, max_body: int) -> None:
        self.t_start = now
        self.max_body = max_body
        self.headers: list[tuple[bytes, bytes]] = []
        # An instance value, not a class default: the hooks read it per response chunk, and a
        # class attribute read through the instance is not specialised (~300 instructions).
        self.recorder: Recorder | None = None


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
        transport.write(_refusal_response(self.request_ids.next(), reason))
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


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "active",
        "allowed_methods",
        "body_deadline",
        "chunked_walk",
        "client_cert",
        "closed",
        "h2_sniff",
        "head_deadline",
        "head_limit",
        "head_received",
        "head_tail",
        "idle_deadline",
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
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_pending: list[bytes] | None = None
        self.upgrade_pending = False
        self.pending_error: RequestRejected | None = None
        self.limits = server.snapshot.config.limits  # a reload applies to new connections
        self.head_received = 0  # raw bytes seen while a request head is incomplete
        self.head_limit = self.limits.max_header_bytes + self.limits.max_uri_bytes
        self.underscores = _UNDERSCORE_ACTIONS[self.limits.headers_with_underscores]
        allowed = self.limits.allowed_methods
        self.allowed_methods = frozenset(allowed) if allowed is not None else None
        self.method_carry: bytes | None = None  # a method token not complete yet (not fed)
        self.real_method: bytes | None = None  # the extension method fed as _STAND_IN_METHOD
        # on_headers_complete has method work: a real_method to restore, or allowed_methods.
        self.method_hook = self.allowed_methods is not None
        self.head_tail = b""  # last bytes of a read that ended inside a head
        self.chunked_walk: list[Exchange] | None = None  # chunked bodies to walk after a read
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
        if self.tunnel is not None:
            self.tunnel.owner = None
            self.tunnel.abort()
            self.tunnel = None
        ex = self.active
        if ex is not None:
            self.active = None
            conn = ex.conn
            if conn is not None and not ex.response_complete:
                # The client went away mid-exchange: the upstream connection is in an unknown
                # state, so it is closed rather than pooled.
                conn.owner = None
                conn.abort()
                self._release_instance(ex)
            if not ex.response_complete:
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
            ex.read_deadline = 0.0  # the upstream is not slow, the client is
            conn = ex.conn
            if conn is not None:
                conn.pause_reading()
        if self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.send_deadline = 0.0
        ex = self.active
        if ex is not None and not ex.response_complete:
            conn = ex.conn
            if conn is not None:
                if ex.upstream is not None and (ex.request_complete or ex.response_started):
                    ex.read_deadline = self.server.clock + ex.upstream.read_timeout
                conn.resume_reading()
        if self.tunnel is not None:
            self.tunnel.resume_reading()

    def pause_client_reading(self) -> None:
        """Upstream's socket buffer is full (large upload): stop reading the client."""
        self.upstream_write_paused = True
        ex = self.active
        if ex is not None and not ex.read_deadline and ex.upstream is not None:
            # The upstream does not take the body: now the upstream is the slow party.
            ex.read_deadline = self.server.clock + ex.upstream.read_timeout
        self._update_reading()

    def resume_client_reading(self) -> None:
        self.upstream_write_paused = False
        ex = self.active
        if ex is not None and not ex.request_complete and not ex.response_started:
            ex.read_deadline = 0.0  # back to waiting for the client's body
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
            if parsing is not None and parsing.pending_bytes > PENDING_BODY_LIMIT:
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
            if ex.read_deadline and now > ex.read_deadline:
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
        if self.tunnel is not None:
            self.tunnel.send(data)
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
                    parsing.method_prefix = prefix if len(prefix) <= _MAX_PREFIX_BYTES else b""
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
            if ex is not None and ex.conn is not None and ex.pending:
                self._send_pending(ex)

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
        if error is _METHOD_HELD:
            candidate = self.method_carry + data  # type: ignore[operator]
            self.method_carry = None
        elif error.args and error.args[0] in _UNKNOWN_METHOD_ERRORS and parsing is not None:
            if self.head_received < 0:
                candidate = data  # the refused message began in this read
            elif parsing.method_prefix:
                candidate = parsing.method_prefix + data  # the token began in an earlier read
        if candidate is not None:
            space = candidate.find(b" ", 0, MAX_METHOD_BYTES + 1)
            token = candidate[:space] if space > 0 else candidate
            if (
                token not in _LLHTTP_METHODS
                and len(token) <= MAX_METHOD_BYTES
                and hdr.valid_token(token)
            ):
                self.parsing = None
                self.head_received = 0
                if space < 0:
                    # Wait for the rest of the token: the next read goes to a stand-in parser
                    # that refuses it, which brings it back here (no check per read).
                    self.method_carry = candidate
                    self.parser = _HELD_METHOD_PARSER  # type: ignore[assignment]
                    return None
                self.parser = httptools.HttpRequestParser(self)
                self.real_method = token
                self.method_hook = True
                fed = _STAND_IN_METHOD + candidate[space:]
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
            if ex.cw_state == _CW_START:
                # The head ended in this read: the body starts after its blank line. If the
                # head began here behind other requests, the first blank line may be theirs;
                # candidates are tried until one walks in agreement with llhttp.
                tail = ex.cw_tail
                buffer = tail + data if tail else data
                search = position  # (with a tail, position is 0: the head began earlier)
                outcome = _CW_DESYNC
                for _ in range(_CW_MAX_CANDIDATES):
                    found = buffer.find(b"\r\n\r\n", search)
                    if found < 0:
                        break
                    outcome = _walk_framing(
                        ex, data, found + 4 - len(tail), max_line, max_extensions, max_trailer
                    )
                    if outcome != _CW_DESYNC:
                        break
                    _reset_walk(ex)
                    search = found + 1
            else:
                outcome = _walk_framing(ex, data, position, max_line, max_extensions, max_trailer)
            if outcome < 0:
                self._reject_walked(ex, outcome)
                return False
            position = outcome
            if ex.cw_state == _CW_DONE:
                walk.remove(ex)
        if not walk:
            self.chunked_walk = None
        return True

    def _reject_walked(self, ex: Exchange, outcome: int) -> None:
        if outcome == _CW_LINE_TOO_LONG:
            rejected = RequestRejected(400, "bad_request", "chunk-size line too long")
        elif outcome == _CW_EXTENSIONS_TOO_LONG:
            rejected = RequestRejected(400, "bad_request", "chunk extensions too long")
        elif outcome == _CW_TRAILER_TOO_LARGE:
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
        if _UNDERSCORE in name:
            # Backends that read "_" as "-" would see another field (a smuggling vector).
            action = self.underscores
            if action == _UNDERSCORE_REJECT:
                raise RequestRejected(400, "bad_request", "header field name with '_'")
            if action == _UNDERSCORE_ALLOW and not hdr.underscore_lookalike(name):
                ex.headers.append((name, value))
            return
        special = _SPECIAL_HEADERS.get(name)
        if special is not None:
            if special == _H_HOST:
                if value not in _VALID_HOSTS:
                    value = _checked_host(value)  # RFC 9112 §3.2: an invalid Host gets 400
                ex.host = value
                ex.host_count += 1
            elif special == _H_CONTENT_LENGTH:
                ex.content_length = value
                ex.cl_count += 1
            elif special == _H_TRANSFER_ENCODING:
                ex.chunked = True
                ex.te_count += 1
            elif special == _H_CONNECTION:
                ex.conn_tokens = ex.conn_tokens | hdr.connection_tokens(value)
            elif special == _H_UPGRADE:
                ex.upgrade = value
            elif special == _H_REQUEST_ID:
                ex.request_id = value
            elif special == _H_IDEMPOTENCY_KEY:
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
        ex.version = version = parser.get_http_version()
        ex.keep_alive = parser.should_keep_alive()
        ex.is_head = method == b"HEAD"
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
            method = real  # an extension method llhttp parsed as _STAND_IN_METHOD
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
        if ex.body_hash is not None:
            ex.body_hash.update(body)
            if ex.recorder is not None:
                ex.recorder.request_body(ex)
        framed = b"%x\r\n%b\r\n" % (size, body) if ex.chunked else body
        conn = ex.conn
        # Chunked bytes wait for the end of the read: its framing is checked first (see
        # _walk_chunked), and ``data_received`` sends them on.
        if conn is not None and not ex.pending and not ex.chunked:
            conn.send(framed)
            ex.body_sent = True
            replay = ex.replay
            if replay is not None:
                if ex.body_bytes <= ex.replay_limit:
                    replay.append(framed)
                else:
                    ex.replay = None
        else:
            if ex.pending is None:
                ex.pending = [framed]
            else:
                ex.pending.append(framed)
            ex.pending_bytes += len(framed)
            if ex.pending_bytes > PENDING_BODY_LIMIT:
                self._update_reading()

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        ex.request_complete = True
        self.parsing = None
        if ex.conn is not None and not ex.read_deadline and not ex.response_started:
            self._start_read_timer(ex)  # the upstream has all it needs: now it may be slow
        if ex.chunked:
            # Sent with the rest of the read once its framing is checked (data_received).
            if ex.pending is None:
                ex.pending = [b"0\r\n\r\n"]
            else:
                ex.pending.append(b"0\r\n\r\n")
        if ex.recorder is not None:
            ex.recorder.body_complete()  # a held keyed request is claimed now
        if ex.response_complete:
            # The response finished before the request body did (early reply).
            self._finish(ex)

    # -- dispatch -------------------------------------------------------------------------
    def _dispatch(self, ex: Exchange) -> None:
        if ex.error is not None:
            self._respond_error(ex, ex.error)
            return
        snapshot = self.server.snapshot
        # One normalisation before routing (gateway/proxy/normalize.py): the route table, the
        # rewrite and the upstream all see the same path; the query goes on untouched.
        try:
            url, path, path_text, query, authority = parse_target(
                ex.url, ex.method, snapshot.config.paths
            )
        except InvalidTarget as exc:
            self._respond_error(ex, RequestRejected(400, "invalid_target", str(exc)))
            return
        # RFC 9112 §3.2.2: the authority of an absolute-form target replaces the Host header.
        host = ex.host if authority is None else authority
        if self.listener.redirect is not None:
            self._redirect(ex, host, url)
            return
        entry = self.tls_entry
        if entry is not None and host is not None and not entry.covers_host(host):
            # RFC 9110 §15.5.20: this connection's certificate (chosen by SNI) does not cover
            # the Host the request names; the client should open a connection for that host.
            self._respond_error(ex, RequestRejected(421, "misdirected_request", _MISDIRECTED))
            return
        route = snapshot.routes.match(
            ex.method_name,
            host.decode("latin-1") if host is not None else "",
            path_text,
            query.decode("latin-1") if query else "",
            ex.headers,
            self.sni,
        )
        if route is None:
            self._respond_error(
                ex, RequestRejected(404, "no_route", "no route matches the request")
            )
            return
        ex.route = route
        ex.route_name = route.name
        if route.rewrites_path:
            # Rewrites run on the normalised path; their result must stay a normal origin-form
            # path too (a strip_prefix can cut a segment: "/api../x" minus "/api").
            try:
                new_path = normalize_rewritten(
                    route.rewrite_path(path_text).encode("latin-1"), snapshot.config.paths
                )
            except InvalidTarget as exc:
                self._respond_error(ex, RequestRejected(400, "invalid_target", str(exc)))
                return
            url = new_path + (b"?" + query if query else b"")
        if route.max_body_bytes is not None:
            ex.max_body = route.max_body_bytes
        if ex.content_length is not None:
            try:
                declared = int(ex.content_length)
            except ValueError:
                declared = -1
            if declared < 0:
                self._respond_error(
                    ex, RequestRejected(400, "bad_request", "invalid Content-Length")
                )
                return
            if declared > ex.max_body:
                self._respond_error(
                    ex, RequestRejected(413, "body_too_large", "request body exceeds the limit")
                )
                return
        elif ex.body_bytes > ex.max_body:
            self._respond_error(
                ex, RequestRejected(413, "body_too_large", "request body exceeds the limit")
            )
            return
        limiter = snapshot.limiters.get(route.name) if snapshot.limiters else None
        if limiter is not None:
            if limiter.uses_redis:

                def decided(decision: Decision) -> None:
                    # Redis answered (or its timeout fell back) after this callback returned.
                    if self.active is not ex or self.closed:
                        if decision.holds_slot:
                            limiter.release()
                        return
                    if self._admit(ex, limiter, decision):
                        self._forward(ex, snapshot, route, url, host, path, query)

                decision = limiter.check(
                    time.monotonic(), self.peer_ip, self.peer_trusted, ex.headers, query, decided
                )
                if decision is None:
                    return  # the decision arrives through ``decided``
            else:
                decision = limiter.check_local(
                    time.monotonic(), self.peer_ip, self.peer_trusted, ex.headers, query
                )
            if not self._admit(ex, limiter, decision):
                return
        self._forward(ex, snapshot, route, url, host, path, query)

    def _redirect(self, ex: Exchange, host: bytes | None, url: bytes) -> None:
        """``redirect_to`` on a plaintext listener: 308 to the HTTPS URL (RFC 9110 §15.4.9
        keeps the method and body)."""
        template = self.listener.redirect
        assert template is not None
        name = (host or b"").decode("latin-1")
        name = name[: name.rfind("]") + 1] if name.startswith("[") else name.split(":", 1)[0]
        if not name or not _REDIRECT_HOST.fullmatch(name):
            self._respond_error(ex, RequestRejected(400, "bad_request", "no Host to redirect to"))
            return
        location = template.replace("{host}", name).encode("latin-1") + url
        self._respond_error(
            ex,
            RequestRejected(308, "https_redirect", "use HTTPS"),
            extra_headers=b"location: " + location + b"\r\n",
        )

    def _admit(self, ex: Exchange, limiter: RouteLimiter, decision: Decision) -> bool:
        """Apply a rate-limit decision: count it, answer a refusal, keep headers to add."""
        if decision.holds_slot:
            ex.limiter = limiter
        if decision.allowed:
            if decision.dry_run:
                result = "dry_run"
            elif decision.store_error:
                result = "store_error"
            else:
                result = "allowed"
        else:
            result = _REFUSAL_RESULTS.get(decision.reason, decision.reason)
        ex.ratelimit = result
        self.server.metrics.ratelimit(ex.route_name, result)
        if decision.allowed:
            ex.ratelimit_headers = decision.headers
            return True
        self._respond_error(
            ex,
            RequestRejected(decision.status, decision.reason, _REFUSAL_MESSAGES[decision.status]),
            extra_headers=decision.headers,
        )
        return False

    def _forward(
        self,
        ex: Exchange,
        snapshot: Snapshot,
        route: Route,
        url: bytes,
        host: bytes | None,
        path: bytes,
        query: bytes,
    ) -> None:
        """Pick an instance of the route's upstream and send the request there.

        ``url`` is the origin-form target to send (normalised and rewritten path + query),
        ``path`` the normalised path the route matched.
        """
        if snapshot.idempotency and not ex.idem_checked:
            idempotency = snapshot.idempotency.get(route.name)
            if (
                idempotency is not None
                and (ex.idem_keys is not None or idempotency.required)
                and not idempotency.begin(self, ex, (ex, snapshot, route, url, host, path, query))
            ):
                return  # claimed at the store first (or answered: 4xx, replay)
        upstream = snapshot.upstreams[route.upstream]
        ex.upstream = upstream
        ex.upstream_name = upstream.name
        breaker = upstream.breaker
        if breaker.max_requests and breaker.requests >= breaker.max_requests:
            breaker.requests_overflow += 1
            self.server.metrics.breaker_overflow(upstream.name, "requests")
            self._respond_error(
                ex,
                RequestRejected(
                    503, "circuit_open", f"upstream '{upstream.name}' is at max_requests"
                ),
            )
            return
        ex.counted = True
        breaker.requests += 1  # also the upstream's active-request count
        upstream.budget.requests_now += 1  # RetryBudget.record_request, inlined: per request
        if upstream.hash_key is not None:
            ex.hash_key = self._hash_key(ex, upstream, path, query)
        instance = self._pick(ex, upstream, ())
        if instance is None:
            return
        policy = (
            snapshot.route_retry.get(route.name, upstream.retry)
            if snapshot.route_retry
            else upstream.retry
        )
        method = ex.method
        ex.idempotent = method in IDEMPOTENT_METHODS or ex.idem_keys is not None
        if policy is not None:
            ex.retry = policy
            ex.replay_limit = max(policy.max_body_bytes, REPLAY_LIMIT)
            ex.retry_method_ok = ex.idempotent or policy.method_retryable(method, False)
        ex.replay = []
        if ex.upgrade is not None:
            framing = b""
        elif ex.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif ex.content_length is not None:
            framing = b"content-length: %d\r\n" % int(ex.content_length)
        else:
            framing = b""
        request_id = ex.request_id
        if request_id is None or not hdr.valid_request_id(request_id):
            request_id = ex.request_id = self.server.request_ids.next()
        host_out = route.host_rewrite.encode("latin-1") if route.host_rewrite else host
        if host_out is None:
            host_out = instance.address.encode("ascii")
        ex.head = hdr.build_request_head(
            ex.method,
            url,
            ex.headers,
            host=host_out,
            client_host=host if host_out is not host else None,
            conn_tokens=ex.conn_tokens,
            client_ip=self.peer_ip,
            peer_trusted=self.peer_trusted,
            request_id=request_id,
            framing=framing,
            upgrade=ex.upgrade,
            proto=self.listener.proto,
            client_cert=self.client_cert,
        )
        if route.timeout:
            ex.deadline = time.monotonic() + route.timeout  # exact: the tick clock may lag
        self._connect(ex, instance.pool)  # type: ignore[arg-type]  # see _connect

    def _connect(self, ex: Exchange, pool: InstancePool) -> None:
        # Callers pass ``instance.pool``, typed as the snapshot's ConnectionPool protocol
        # (gateway/pools.py): every pool is an InstancePool, built by the factory this package
        # registers. Their ``type: ignore`` says so for free, where a cast() would be a call.
        conn = pool.acquire()
        if conn is not None:
            self._attach(ex, conn)
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

        def connected(conn: UpstreamConnection | None, error: BaseException | None) -> None:
            breaker.release_pending()
            if conn is None:
                if self.active is ex and not self.closed:
                    if self._try_failed(ex, CONNECT_FAILURE):
                        return
                    if isinstance(error, TimeoutError):
                        self._upstream_error(
                            ex, 504, "upstream_timeout", "upstream connect timeout"
                        )
                    else:
                        self._upstream_error(
                            ex,
                            502,
                            "upstream_connect_failure",
                            f"cannot connect to upstream: {error}",
                        )
                return
            if self.active is not ex or self.closed:
                pool.release(conn)  # never used: clean and safe to pool
                return
            self._attach(ex, conn)

        pool.connect(connected)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        conn.begin_exchange(self, ex.is_head)
        if ex.instance is not None:
            ex.instance_address = ex.instance.address
        ex.conn = conn
        ex.t_upstream = time.perf_counter()
        upstream = ex.upstream
        assert upstream is not None
        if self.writing_paused:
            conn.pause_reading()  # the client still has not read what it was sent before
        elif ex.request_complete:
            self._start_read_timer(ex)
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
            ex.hedge_timer = asyncio.get_running_loop().call_later(
                upstream.hedge_delay, self._hedge, ex
            )
        if ex.pending:
            pending = ex.pending
            ex.pending = None
            ex.pending_bytes = 0
            ex.body_sent = True
            if ex.replay is not None:
                if ex.body_bytes <= ex.replay_limit:
                    ex.replay.extend(pending)
                else:
                    ex.replay = None
            assert conn.transport is not None
            conn.transport.writelines([ex.head, *pending])
            self._update_reading()
        else:
            conn.send(ex.head)

    def _start_read_timer(self, ex: Exchange) -> None:
        upstream = ex.upstream
        assert upstream is not None
        first_read = upstream.read_timeout
        policy = ex.retry
        if policy is not None and policy.per_try_timeout and policy.per_try_timeout < first_read:
            first_read = policy.per_try_timeout
        ex.read_deadline = time.monotonic() + first_read

    def _send_pending(self, ex: Exchange) -> None:
        conn = ex.conn
        pending = ex.pending
        if conn is None or not pending or conn.transport is None:
            return
        ex.pending = None
        ex.pending_bytes = 0
        ex.body_sent = True
        if ex.replay is not None:
            if ex.body_bytes <= ex.replay_limit:
                ex.replay.extend(pending)
            else:
                ex.replay = None
        conn.transport.writelines(pending)
        self._update_reading()

    # -- upstream events ----------------------------------------------------------------------
    def on_response_head(
        self,
        conn: UpstreamConnection,
        status: int,
        head: hdr.ResponseHead,
        upstream_keep_alive: bool,
    ) -> None:
        ex = self.active
        if ex is None:
            return
        if ex.conn is not conn:
            if conn is not ex.hedge_conn:
                return
            self._promote_hedge(ex, abort_primary=True)  # the hedge answered first
        elif ex.hedge_conn is not None or ex.hedge_timer is not None:
            self._cancel_hedge(ex)  # the first try answered first
        upstream = ex.upstream
        assert upstream is not None
        if status < 200 and status != 101:
            if ex.request_complete and not self.writing_paused:
                ex.read_deadline = self.server.clock + upstream.read_timeout
            else:
                ex.read_deadline = 0.0  # 100 Continue: now the upstream waits for the body
            ex.interim = True
            # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client.
            if ex.version != "1.0":
                self.out.append(hdr.interim_head(status, head))
            return
        # A final response: the upstream is answering; it is slow if the body stalls. A paused
        # client is the slow party, though (pause_writing cleared the timer).
        ex.read_deadline = 0.0 if self.writing_paused else self.server.clock + upstream.read_timeout
        instance = ex.instance
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
        conn.reusable = upstream_keep_alive
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
            if not head.chunked:
                # Close-delimited (RFC 9112 §6.3 item 8): this connection cannot be reused.
                conn.body_until_close = True
                conn.reusable = False
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
            upstream_ms = (now - ex.t_upstream) * 1000.0
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
        if ex.recorder is not None:
            ex.recorder.on_head(status, head.reason, head.fields)

    def on_response_body(self, body: bytes) -> None:
        ex = self.active
        if ex is None:
            return
        frame = ex.response_frame
        ex.bytes_out += len(body)
        if ex.recorder is not None:
            ex.recorder.on_body(body)
        if frame == FRAME_RAW:
            self.out.append(body)
        elif frame == FRAME_CHUNKED:
            self.out.append(b"%x\r\n" % len(body))
            self.out.append(body)
            self.out.append(b"\r\n")
        upstream = ex.upstream
        if upstream is not None and not self.writing_paused:
            ex.read_deadline = self.server.clock + upstream.read_timeout

    def on_response_message_complete(self, conn: UpstreamConnection) -> None:
        ex = self.active
        if ex is None or ex.conn is not conn:
            return
        if ex.interim:
            ex.interim = False
            return
        if ex.status == 101:
            return  # the parser raises HttpParserUpgrade next; on_upstream_upgrade takes over
        if ex.response_frame == FRAME_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._response_done(ex, conn)

    def on_response_complete(self, conn: UpstreamConnection) -> None:
        """Close-delimited response ended with the upstream connection."""
        ex = self.active
        if ex is None or ex.conn is not conn:
            return
        if ex.response_frame == FRAME_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self._response_done(ex, conn)

    def _response_done(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.response_complete = True
        ex.t_upstream_done = done = time.perf_counter()
        instance = ex.instance
        if instance is not None:
            sample = done - ex.t_upstream
            previous = instance.latency
            instance.latency = sample if not previous else previous * 0.8 + sample * 0.2
            upstream = ex.upstream
            if upstream is not None and upstream.latency_samples is not None:
                upstream.latency_samples.append(sample)
            if upstream is not None and upstream.observes_latency:
                upstream.balancer.observe(instance, sample, time.monotonic())  # type: ignore[attr-defined]
        ex.read_deadline = 0.0
        # Flush first: a full client buffer pauses the upstream's reading, which must happen
        # while the connection is still ours, not after it went back to the pool.
        self.flush_to_client()
        self.upstream_write_paused = False
        if ex.request_complete and not ex.pending:
            conn.pool.release(conn)
        else:
            # The upstream answered before the whole request body arrived: that connection is
            # mid-message, and so is the client's; both close after this response.
            conn.owner = None
            conn.close()
            ex.keep_alive = False
        self._release_instance(ex)
        if ex.request_complete or not ex.keep_alive:
            self._finish(ex)

    def on_upstream_upgrade(self, conn: UpstreamConnection, tail: bytes) -> None:
        ex = self.active
        if ex is None or ex.conn is not conn or ex.status != 101:
            conn.owner = None
            conn.abort()
            return
        # From here on both connections are a byte tunnel (RFC 9110 §7.8).
        conn.tunnel = True
        conn.reusable = False
        self.tunnel = conn
        self.upgrade_pending = False
        if tail:
            self.out.append(tail)
        self.flush_to_client()
        pending = self.tunnel_pending or []
        self.tunnel_pending = None
        for chunk in pending:
            if chunk:
                conn.send(chunk)
        ex.response_complete = True
        ex.t_upstream_done = time.perf_counter()
        ex.read_deadline = 0.0
        ex.deadline = 0.0
        self._observe(ex, 101)
        self._release_instance(ex)
        self.active = None
        self._update_reading()

    def tunnel_to_client(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.tunnel is conn:
            self.tunnel = None
            if self.transport is not None:
                self.transport.close()
            return
        ex = self.active
        if ex is None:
            return
        if conn is ex.hedge_conn:
            self._drop_hedge(ex)  # the hedge failed; the first try goes on alone
            return
        if ex.conn is not conn:
            return
        if ex.hedge_conn is not None and not ex.response_started:
            # The first try failed while a hedge is in flight: the hedge carries on alone.
            if ex.instance is not None and ex.upstream is not None:
                ex.upstream.record_outcome(ex.instance, False, True)
            self._promote_hedge(ex, abort_primary=False)
            return
        if (
            conn.used
            and not ex.stale_retried
            and not ex.response_started
            and ex.status == 0
            and ex.replay is not None
            and ex.idempotent
        ):
            # RFC 9112 §9.3.1: a pooled connection the upstream closed before answering most
            # likely went stale while idle; one retry on a fresh connection is allowed, but
            # RFC 9112 §9.3.1.1 forbids it for non-idempotent requests: the upstream may have
            # processed the request before the connection broke.
            self.server.metrics.retry(ex.upstream_name, "stale_connection")
            ex.stale_retried = True
            ex.conn = None
            replay = ex.replay
            ex.replay = []  # refilled from pending when the fresh connection is attached
            pending = ex.pending or []
            ex.pending = replay + pending if replay or pending else None
            ex.pending_bytes = sum(len(chunk) for chunk in ex.pending) if ex.pending else 0
            assert ex.instance is not None
            self._connect(ex, ex.instance.pool)  # type: ignore[arg-type]  # see _connect
            return
        if not ex.response_started:
            conn.owner = None
            if self._try_failed(ex, RESET):
                return
        reason = f"upstream connection lost: {exc}" if exc else "upstream closed the connection"
        self._upstream_failure(ex, conn, reason)

    def on_upstream_failed(self, conn: UpstreamConnection, reason: str) -> None:
        ex = self.active
        if ex is None:
            return
        if conn is ex.hedge_conn:
            self._drop_hedge(ex)
            return
        if ex.conn is not conn:
            return
        if ex.hedge_conn is not None and not ex.response_started:
            conn.owner = None
            conn.abort()
            self._promote_hedge(ex, abort_primary=False)
            return
        if not ex.response_started:
            conn.owner = None
            conn.abort()
            if self._try_failed(ex, RESET):
                return
        self._upstream_failure(ex, conn, reason)

    # -- retries ------------------------------------------------------------------------------
    def _try_failed(
        self,
        ex: Exchange,
        kind: str,
        status: int = 0,
        retry_after: float | None = None,
        drop: UpstreamConnection | None = None,
    ) -> bool:
        """One try failed before any response byte reached the client. Record it for outlier
        detection and, when the policy, the method, the body, the budget and the route deadline
        all allow, schedule another try on a different instance. True if a retry is scheduled
        (the caller has already detached the failed connection)."""
        upstream = ex.upstream
        instance = ex.instance
        if upstream is None or instance is None:
            return False
        upstream.record_outcome(instance, False, is_gateway_failure(kind, status))
        policy = ex.retry
        if policy is None or ex.response_started or self.closed:
            return False
        replayable = ex.replay is not None or not ex.body_sent
        if not policy.should_retry(ex.attempt, kind, status, False, replayable):
            return False
        if not (ex.retry_method_ok or policy.safe_for_any_method(kind)):
            return False
        if kind == CONNECT_FAILURE:
            # Nothing reached the instance: retry at once elsewhere, outside the budget (the
            # budget protects upstreams from retry storms, and a dead instance gets none).
            delay: float | None = 0.0
        else:
            delay = policy.retry_delay(ex.attempt, upstream.rng, retry_after)
        if delay is None:
            return False
        if ex.deadline and time.monotonic() + delay >= ex.deadline:
            return False
        metrics = self.server.metrics
        if kind != CONNECT_FAILURE and not upstream.budget.try_acquire(time.monotonic()):
            metrics.retry(upstream.name, "budget_exhausted")
            return False
        metrics.retry(upstream.name, kind if kind != STATUS else str(status))
        if drop is not None:
            drop.owner = None
            drop.abort()  # the failed response's body is not wanted: closing beats draining it
        self._release_instance(ex)
        ex.tried += (instance,)
        ex.conn = None
        ex.status = 0
        ex.interim = False
        ex.read_deadline = 0.0
        ex.attempt += 1
        replay = ex.replay or []
        pending = ex.pending or []
        ex.pending = replay + pending if replay or pending else None
        ex.pending_bytes = sum(len(chunk) for chunk in ex.pending) if ex.pending else 0
        ex.replay = [] if ex.replay is not None else None
        ex.retry_timer = asyncio.get_running_loop().call_later(delay, self._retry_now, ex)
        return True

    def _retry_now(self, ex: Exchange) -> None:
        ex.retry_timer = None
        if self.active is not ex or self.closed:
            return
        upstream = ex.upstream
        assert upstream is not None
        instance = self._pick(ex, upstream, ex.tried)
        if instance is not None:
            self._connect(ex, instance.pool)  # type: ignore[arg-type]  # see _connect

    def _pick(
        self, ex: Exchange, upstream: Upstream, exclude: tuple[Instance, ...]
    ) -> Instance | None:
        """The instance for this try (none of ``exclude`` when another exists), or answer 503."""
        instance = upstream.pick(ex.hash_key, exclude)
        if instance is None:
            self._respond_error(
                ex,
                RequestRejected(
                    503,
                    "no_healthy_instance",
                    f"upstream '{upstream.name}' has no available instance",
                ),
            )
            return None
        ex.instance = instance
        instance.active_requests += 1
        return instance

    # -- hedging ------------------------------------------------------------------------------
    def _hedge(self, ex: Exchange) -> None:
        """The first try is slow: send the same request to another instance as well."""
        ex.hedge_timer = None
        upstream = ex.upstream
        if (
            self.active is not ex
            or self.closed
            or upstream is None
            or ex.conn is None
            or ex.status
            or ex.response_started
        ):
            return
        metrics = self.server.metrics
        # A hedge is extra load like a retry: the retry budget bounds both.
        if not upstream.budget.try_acquire(time.monotonic()):
            metrics.retry(upstream.name, "budget_exhausted")
            return
        instance = upstream.pick(ex.hash_key, (ex.instance,))
        if instance is None or instance is ex.instance:
            return
        metrics.retry(upstream.name, "hedge")
        instance.active_requests += 1
        ex.hedge_instance = instance
        pool: InstancePool = instance.pool  # type: ignore[assignment]  # see _connect
        conn = pool.acquire()
        if conn is not None:
            self._attach_hedge(ex, conn)
            return

        def connected(conn: UpstreamConnection | None, error: BaseException | None) -> None:
            if conn is None:
                if ex.hedge_instance is instance and ex.hedge_conn is None:
                    instance.active_requests -= 1
                    ex.hedge_instance = None
                return
            if self.active is not ex or self.closed or ex.hedge_instance is not instance:
                pool.release(conn)  # never used: clean
                return
            self._attach_hedge(ex, conn)

        pool.connect(connected)

    def _attach_hedge(self, ex: Exchange, conn: UpstreamConnection) -> None:
        conn.begin_exchange(self, ex.is_head)
        ex.hedge_conn = conn
        conn.send(ex.head)

    def _promote_hedge(self, ex: Exchange, *, abort_primary: bool) -> None:
        """The hedge becomes the exchange's connection; the first try is abandoned."""
        primary = ex.conn
        if abort_primary and primary is not None:
            primary.owner = None
            primary.abort()
        if ex.instance is not None:
            ex.instance.active_requests -= 1
        ex.instance = ex.hedge_instance
        if ex.instance is not None:
            ex.instance_address = ex.instance.address
        ex.conn = ex.hedge_conn
        ex.hedge_conn = None
        ex.hedge_instance = None
        upstream = ex.upstream
        if upstream is not None:
            ex.read_deadline = time.monotonic() + upstream.read_timeout

    def _drop_hedge(self, ex: Exchange) -> None:
        conn = ex.hedge_conn
        if conn is not None:
            ex.hedge_conn = None
            conn.owner = None
            conn.abort()
        if ex.hedge_instance is not None:
            ex.hedge_instance.active_requests -= 1
            ex.hedge_instance = None

    def _cancel_hedge(self, ex: Exchange) -> None:
        if ex.hedge_timer is not None:
            ex.hedge_timer.cancel()
            ex.hedge_timer = None
        self._drop_hedge(ex)

    def _hash_key(
        self, ex: Exchange, upstream: Upstream, path: bytes, query: bytes
    ) -> bytes | None:
        assert upstream.hash_key is not None
        cookies = b"; ".join(value for name, value in ex.headers if name == b"cookie")
        return upstream.hash_key(
            headers=ex.headers,
            cookies_header=cookies or None,
            client_ip=self.peer_ip,
            path=path,
            query=query,
        )

    def _upstream_failure(self, ex: Exchange, conn: UpstreamConnection, reason: str) -> None:
        conn.owner = None
        conn.abort()
        self._upstream_error(ex, 502, "upstream_failure", reason)

    def _upstream_timeout(self, ex: Exchange, reason: str, *, retryable: bool = True) -> None:
        if retryable and ex.hedge_conn is not None and not ex.response_started:
            self._promote_hedge(ex, abort_primary=True)  # the first try timed out, not the hedge
            return
        conn = ex.conn
        if conn is not None:
            conn.owner = None
            conn.abort()
        if retryable and not ex.response_started and self._try_failed(ex, TIMEOUT):
            return
        self._upstream_error(ex, 504, "upstream_timeout", reason)

    def _upstream_error(self, ex: Exchange, status: int, code: str, message: str) -> None:
        self._release_instance(ex)
        if ex.response_started:
            # Part of the response is already out: a second response is impossible, so the only
            # honest signal left is closing the connection mid-body.
            self.flush_to_client()
            self._observe(ex, ex.status)
            self.active = None
            self.abort()
            return
        ex.keep_alive = False
        self._respond_error(ex, RequestRejected(status, code, message))

    def _release_instance(self, ex: Exchange) -> None:
        instance = ex.instance
        if instance is not None:
            instance.active_requests -= 1
            ex.instance = None

    # -- responses produced by the gateway ----------------------------------------------------
    def request_id_of(self, ex: Exchange) -> bytes:
        request_id = ex.request_id
        if request_id is None or not hdr.valid_request_id(request_id):
            request_id = ex.request_id = self.server.request_ids.next()
        return request_id

    def resume_forward(self, resume: tuple[Any, ...]) -> None:
        """Forward an exchange whose idempotency claim succeeded (arguments of ``_forward``)."""
        self._forward(*resume)

    def respond_bytes(
        self, ex: Exchange, status: int, data: bytes, keep_alive: bool, code: str
    ) -> None:
        """Answer with a whole response built elsewhere (an idempotency replay or problem)."""
        ex.status = status
        ex.error_code = code
        ex.keep_alive = keep_alive
        self.out.append(data)
        ex.response_started = True
        ex.response_complete = True
        self.flush_to_client()
        self._finish(ex)

    def _respond_error(
        self, ex: Exchange, error: RequestRejected, extra_headers: bytes = b""
    ) -> None:
        request_id = ex.request_id
        if request_id is None or not hdr.valid_request_id(request_id):
            request_id = ex.request_id = self.server.request_ids.next()
        body = orjson.dumps(
            {
                "error": error.code,
                "message": error.message,
                "status": error.status,
                "request_id": request_id.decode("ascii"),
            }
        )
        # The connection survives only if the request was read whole and framed unambiguously.
        keep_alive = (
            ex.keep_alive
            and ex.request_complete
            and not self.upgrade_pending
            and error.status not in (400, 408, 413, 414, 431, 505)
            and not self.server.draining
        )
        ex.keep_alive = keep_alive
        ex.status = error.status
        ex.error_code = error.code
        head = [
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nx-request-id: %s\r\n"
            % (error.status, _REASONS.get(error.status, b"Error"), len(body), request_id)
        ]
        if not keep_alive:
            head.append(b"connection: close\r\n")
        elif ex.version == "1.0":
            head.append(b"connection: keep-alive\r\n")
        if extra_headers:
            head.append(extra_headers)
        if error.headers:
            head.append(error.headers)
        head.append(b"\r\n")
        self.out.append(b"".join(head))
        if not ex.is_head:
            self.out.append(body)
        ex.response_started = True
        ex.response_complete = True
        self.flush_to_client()
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
            conn = ex.conn
            if conn is not None:
                # The error is inside a body already streaming upstream: abort that exchange.
                conn.owner = None
                conn.abort()
                ex.conn = None
            self._release_instance(ex)
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

    def _observe(self, ex: Exchange, status: int) -> None:
        """The exchange is over (answered, failed or abandoned): count it and give back the
        upstream-level slots it held."""
        if ex.counted:
            ex.counted = False
            upstream = ex.upstream
            assert upstream is not None
            upstream.breaker.requests -= 1
        if ex.retry_timer is not None:
            ex.retry_timer.cancel()
            ex.retry_timer = None
        if ex.hedge_conn is not None or ex.hedge_timer is not None or ex.hedge_instance is not None:
            self._cancel_hedge(ex)
        if ex.limiter is not None:
            ex.limiter.release()
            ex.limiter = None
        if ex.recorder is not None:
            ex.recorder.finish(ex)  # store the response, or free the key for a retry
        now = time.perf_counter()
        total = now - ex.t_start
        upstream_time: float | None  # declared apart, so the assignment below narrows it
        if ex.t_upstream:
            upstream_time = (ex.t_upstream_done or now) - ex.t_upstream
            overhead = total - upstream_time
        else:
            upstream_time = None
            overhead = total
        method = ex.method_name if ex.method_name in KNOWN_METHODS else "OTHER"
        server = self.server
        server.metrics.observe_request(
            ex.route_name,
            ex.upstream_name,
            method,
            status,
            total,
            upstream_time,
            overhead,
            ex.body_bytes,
            ex.bytes_out,
        )
        access_log = server.access_log
        if access_log is not None:
            access_log.record(
                {
                    "time": iso_time(time.time()),
                    "request_id": (ex.request_id or b"").decode("ascii", "replace"),
                    "client": self.peer_ip,
                    "listener": self.listener.name,
                    "method": ex.method_name,
                    "path": ex.url.decode("latin-1"),
                    "route": ex.route_name,
                    "upstream": ex.upstream_name,
                    "instance": ex.instance_address,
                    "status": status,
                    "bytes_in": ex.body_bytes,
                    "bytes_out": ex.bytes_out,
                    "duration": round(total, 6),
                    "upstream_duration": None if upstream_time is None else round(upstream_time, 6),
                    "retries": ex.attempt - 1,
                    "rate_limit": ex.ratelimit or None,
                    "error": ex.error_code or None,
                }
            )

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
