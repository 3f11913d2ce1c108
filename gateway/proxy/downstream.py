"""The downstream seam: what the lifecycle phases need of the client side, written once.

The phases (``lifecycle.RequestPhases``, ``failover.Failover``, ``relay.ResponsePhases``) and
the HTTP/1.1 parts (``h1codec.RequestCodec``, ``flowcontrol.FlowControl``) are one chain of
classes that ends in ``ClientConnection``, each the base of the next, starting from
``Downstream`` (one chain rather than mixins: mypyc compiles it, and gives a native class one
base). ``Downstream`` is the interface a client-side codec implements to drive the same phases,
and the one an HTTP/2 stream would implement (docs/architecture.md, "The downstream seam"): the
state the phases read and write (its slots are here), the codec's own operations
(``flush_to_client``, reading pause/resume, ``_finish``), and the phases' methods, which the
classes of the chain provide to each other.

``Server`` is what they use of the server (``ProxyServer``: server.py imports listener.py, which
imports the mixins, so they cannot import it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio
    from collections import deque

    from gateway.accesslog import AccessLog
    from gateway.metrics import GatewayMetrics
    from gateway.proxy.attempt import UpstreamAttempt
    from gateway.proxy.exchange import Exchange
    from gateway.proxy.filtering import FilterState
    from gateway.proxy.headers import RequestIds, ResponseHead
    from gateway.proxy.responses import RequestRejected
    from gateway.proxy.tunnel import Tunnel
    from gateway.proxy.upstream import UpstreamConnection, UpstreamLink
    from gateway.snapshot import Instance, Snapshot, Upstream
    from gateway.tls.accept import ListenerState
    from gateway.tls.contexts import CertEntry


class Server(Protocol):
    @property
    def metrics(self) -> GatewayMetrics: ...
    @property
    def snapshot(self) -> Snapshot: ...
    @property
    def clock(self) -> float: ...
    @property
    def draining(self) -> bool: ...
    @property
    def request_ids(self) -> RequestIds: ...
    @property
    def access_log(self) -> AccessLog | None: ...


class Downstream:
    """One client-side connection (or stream) as the lifecycle phases see it.

    A typed base rather than a ``Protocol``: the mixins assign some of these attributes, and
    mypy checks such assignments against a base class's declarations, not a protocol's. The
    base of the phases' classes and ``ClientConnection`` (one chain: mypyc compiles it, and a
    native class has one base), so it has the slots of the state it declares.
    """

    __slots__ = (
        "active",
        "client_cert",
        "closed",
        "filters",
        "keyed",
        "listener",
        "out",
        "parsing",
        "peer_ip",
        "peer_trusted",
        "queue",
        "reading_paused",
        "server",
        "sni",
        "tls_entry",
        "transport",
        "tunnel",
        "tunnel_pending",
        "upgrade_pending",
        "upstream_write_paused",
        "writing_paused",
    )

    # -- state the phases read and write ----------------------------------------------------
    server: Server
    listener: ListenerState  # TLS facts, proto, redirect, name (access log)
    transport: asyncio.Transport | None
    active: Exchange | None  # the exchange being answered
    parsing: Exchange | None  # the request being received
    queue: deque[Exchange] | None  # pipelined requests waiting their turn
    out: list[bytes]  # bytes for the client, flushed by ``flush_to_client`` once per read
    peer_ip: str
    peer_trusted: bool
    sni: str
    tls_entry: CertEntry | None
    client_cert: bytes | None
    closed: bool
    reading_paused: bool
    writing_paused: bool  # the client does not read: upstream reads are paused
    upstream_write_paused: bool
    upgrade_pending: bool
    tunnel: Tunnel | None
    tunnel_pending: list[bytes] | None
    filters: FilterState | None  # the active exchange's filters, on a route with a chain
    keyed: bool  # an Idempotency-Key was seen: the exchanges' idempotency fields are read

    # -- the codec's operations -------------------------------------------------------------
    def flush_to_client(self) -> None: ...
    def abort(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...
    def _update_reading(self) -> None: ...
    def _finish(self, ex: Exchange) -> None: ...

    # -- request phases (lifecycle.py) ------------------------------------------------------
    def _dispatch(self, ex: Exchange) -> None: ...
    def _observe(self, ex: Exchange, status: int) -> None: ...
    def _respond_error(
        self, ex: Exchange, error: RequestRejected, extra_headers: bytes = b""
    ) -> None: ...
    def request_id_of(self, ex: Exchange) -> bytes:
        raise NotImplementedError

    def resume_forward(self, resume: tuple[Any, ...]) -> None: ...

    # -- upstream request and response phases (relay.py) ------------------------------------
    def _connect(self, attempt: UpstreamAttempt) -> None: ...
    def _start_read_timer(self, attempt: UpstreamAttempt) -> None: ...
    def _send_pending(self, ex: Exchange) -> None: ...
    def on_response_head(
        self, attempt: UpstreamAttempt, status: int, head: ResponseHead, keep_alive: bool
    ) -> None: ...
    def on_response_body(self, attempt: UpstreamAttempt, body: bytes) -> None: ...
    def on_response_message_complete(self, attempt: UpstreamAttempt) -> None: ...
    def on_response_complete(self, attempt: UpstreamAttempt) -> None: ...
    def on_upstream_upgrade(
        self, attempt: UpstreamAttempt, conn: UpstreamConnection, tail: bytes
    ) -> None: ...

    # -- failures, retries and hedges (failover.py) -----------------------------------------
    def on_upstream_lost(
        self, attempt: UpstreamAttempt, conn: UpstreamConnection, exc: Exception | None
    ) -> None: ...
    def on_upstream_failed(
        self, attempt: UpstreamAttempt, conn: UpstreamLink, reason: str
    ) -> None: ...
    def _pick(
        self, ex: Exchange, upstream: Upstream, exclude: tuple[Instance, ...]
    ) -> UpstreamAttempt | None:
        raise NotImplementedError

    def _hash_key(
        self, ex: Exchange, upstream: Upstream, path: bytes, query: bytes
    ) -> bytes | None:
        raise NotImplementedError

    def _try_failed(
        self,
        ex: Exchange,
        kind: str,
        status: int = 0,
        retry_after: float | None = None,
        drop: UpstreamLink | None = None,
    ) -> bool:
        raise NotImplementedError

    def _race_won(self, ex: Exchange, attempt: UpstreamAttempt) -> None: ...
    def _hedge(self, attempt: UpstreamAttempt) -> None: ...
    def _cancel_hedge(self, ex: Exchange) -> None: ...
    def _upstream_failure(self, ex: Exchange, conn: UpstreamLink, reason: str) -> None: ...
    def _upstream_timeout(self, ex: Exchange, reason: str, *, retryable: bool = True) -> None: ...
    def _upstream_error(self, ex: Exchange, status: int, code: str, message: str) -> None: ...
    def _release_instance(self, ex: Exchange) -> None: ...
