"""Failover: what happens when a try fails, as a mixin of ``ClientConnection``.

Lost and broken upstream connections, the stale-connection replay (RFC 9112 §9.3.1),
retries (``RetryPolicy``, ``RetryBudget``; the body is sent again from
``RequestBody.rewind``), hedges, upstream timeouts and the gateway's 502/503/504 all go
through here, so that whether another try is made is decided in one place
(``Failover._try_failed``). The attributes and methods it uses of the connection are
declared under ``TYPE_CHECKING`` below. They are what a per-try ``UpstreamAttempt`` will take
over.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway.proxy.downstream import Server
from gateway.proxy.responses import RequestRejected
from gateway.resilience.backoff import parse_retry_after
from gateway.resilience.retry import (
    CONNECT_FAILURE,
    RESET,
    STATUS,
    TIMEOUT,
    is_gateway_failure,
)

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange
    from gateway.proxy.upstream import InstancePool, UpstreamConnection
    from gateway.snapshot import Instance, Upstream


def _retry_after(fields: bytes) -> float | None:
    """Seconds from a Retry-After field (RFC 9110 §10.2.3) in a raw header block, if any."""
    lowered = fields.lower()
    at = lowered.find(b"retry-after:")
    if at < 0 or (at > 0 and lowered[at - 1 : at] != b"\n"):
        return None
    end = lowered.find(b"\r\n", at)
    return parse_retry_after(fields[at + 12 : end].strip(), time.time())


class Failover:
    """Retries, hedges and upstream failures of the active exchange (mixed into
    ``ClientConnection``, which has the slots)."""

    if not TYPE_CHECKING:
        __slots__ = ()  # ClientConnection has the slots (hidden from mypy: it checks them)
    else:
        active: Exchange | None
        closed: bool
        peer_ip: str
        server: Server

        def _connect(self, ex: Exchange, pool: InstancePool) -> None: ...
        def _respond_error(
            self, ex: Exchange, error: RequestRejected, extra_headers: bytes = b""
        ) -> None: ...
        def _observe(self, ex: Exchange, status: int) -> None: ...
        def flush_to_client(self) -> None: ...
        def abort(self) -> None: ...

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
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
            and (ex.body is None or ex.body.replay is not None)
            and ex.idempotent
        ):
            # RFC 9112 §9.3.1: a pooled connection the upstream closed before answering most
            # likely went stale while idle; one retry on a fresh connection is allowed, but
            # RFC 9112 §9.3.1.1 forbids it for non-idempotent requests: the upstream may have
            # processed the request before the connection broke.
            self.server.metrics.retry(ex.upstream_name, "stale_connection")
            ex.stale_retried = True
            ex.conn = None
            if ex.body is not None:
                ex.body.rewind()  # sent again when the fresh connection is attached
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
            conn.discard()
            self._promote_hedge(ex, abort_primary=False)
            return
        if not ex.response_started:
            conn.discard()
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
        replayable = ex.body is None or ex.body.replayable
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
            drop.discard()  # the failed response's body is not wanted: closing beats draining it
        self._release_instance(ex)
        ex.tried += (instance,)
        ex.conn = None
        ex.status = 0
        ex.interim = False
        ex.read_deadline = 0.0
        ex.attempt += 1
        if ex.body is not None:
            ex.body.rewind()
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
        conn.begin_exchange(self, ex.is_head)  # type: ignore[arg-type]  # a ClientConnection
        ex.hedge_conn = conn
        conn.send(ex.head)

    def _promote_hedge(self, ex: Exchange, *, abort_primary: bool) -> None:
        """The hedge becomes the exchange's connection; the first try is abandoned."""
        primary = ex.conn
        if abort_primary and primary is not None:
            primary.discard()
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
            conn.discard()
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
        conn.discard()
        self._upstream_error(ex, 502, "upstream_failure", reason)

    def _upstream_timeout(self, ex: Exchange, reason: str, *, retryable: bool = True) -> None:
        if retryable and ex.hedge_conn is not None and not ex.response_started:
            self._promote_hedge(ex, abort_primary=True)  # the first try timed out, not the hedge
            return
        conn = ex.conn
        if conn is not None:
            conn.discard()
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
