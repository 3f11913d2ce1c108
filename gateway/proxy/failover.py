"""Failover: what happens when a try fails, as a mixin of ``ClientConnection``.

Lost and broken upstream connections, the stale-connection replay (RFC 9112 §9.3.1),
retries (``RetryPolicy``, ``RetryBudget``; the body is sent again from
``RequestBody.rewind``), hedges, upstream timeouts and the gateway's 502/503/504 all go
through here, so that whether another try is made is decided in one place
(``Failover._try_failed``). Each try is an ``UpstreamAttempt`` (attempt.py); a hedge is a
second attempt racing the first, and which one wins is decided in ``Failover._race_won``.
It sees the connection as a ``downstream.Downstream``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway.proxy.attempt import UpstreamAttempt, record_try
from gateway.proxy.lifecycle import RequestPhases
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
    from gateway.proxy.upstream import UpstreamConnection, UpstreamLink, UpstreamPool
    from gateway.snapshot import Instance, Upstream


def _retry_after(fields: bytes) -> float | None:
    """Seconds from a Retry-After field (RFC 9110 §10.2.3) in a raw header block, if any."""
    lowered = fields.lower()
    at = lowered.find(b"retry-after:")
    if at < 0 or (at > 0 and lowered[at - 1 : at] != b"\n"):
        return None
    end = lowered.find(b"\r\n", at)
    return parse_retry_after(fields[at + 12 : end].strip(), time.time())


class Failover(RequestPhases):
    """Retries, hedges and upstream failures of the active exchange (mixed into
    ``ClientConnection``, which has the slots)."""

    __slots__ = ()

    def on_upstream_lost(
        self, attempt: UpstreamAttempt, conn: UpstreamConnection, exc: Exception | None
    ) -> None:
        ex = attempt.ex
        if self.active is not ex:
            return  # a try of an exchange that is over
        if attempt is ex.hedge:
            self._drop_hedge(ex, RESET)  # the hedge failed; the first try goes on alone
            return
        if attempt is not ex.attempt:
            return
        if ex.hedge is not None and not ex.response_started:
            # The first try failed while a hedge is in flight: the hedge carries on alone.
            if attempt.instance is not None and ex.upstream is not None:
                ex.upstream.record_outcome(attempt.instance, False, True)
            self._promote_hedge(ex, abort_primary=False, outcome=RESET)
            return
        if (
            conn.used
            and not ex.stale_retried
            and not ex.response_started
            and ex.status == 0
            and (ex.body is None or ex.body.replay is not None)
            and ex.idempotent
            and attempt.instance is not None
        ):
            # RFC 9112 §9.3.1: a pooled connection the upstream closed before answering most
            # likely went stale while idle; one retry on a fresh connection is allowed, but
            # RFC 9112 §9.3.1.1 forbids it for non-idempotent requests: the upstream may have
            # processed the request before the connection broke. The same try goes on.
            self.server.metrics.retry(ex.upstream_name, "stale_connection")
            ex.stale_retried = True
            attempt.conn = None
            attempt.read_deadline = 0.0
            if ex.body is not None:
                ex.body.rewind()  # sent again when the fresh connection is attached
            self._connect(attempt)
            return
        if not ex.response_started:
            conn.owner = None
            if self._try_failed(ex, RESET):
                return
        reason = f"upstream connection lost: {exc}" if exc else "upstream closed the connection"
        self._upstream_failure(ex, conn, reason)

    def on_upstream_failed(self, attempt: UpstreamAttempt, conn: UpstreamLink, reason: str) -> None:
        ex = attempt.ex
        if self.active is not ex:
            return
        if attempt is ex.hedge:
            self._drop_hedge(ex, RESET)
            return
        if attempt is not ex.attempt:
            return
        if ex.hedge is not None and not ex.response_started:
            conn.discard()
            self._promote_hedge(ex, abort_primary=False, outcome=RESET)
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
        drop: UpstreamLink | None = None,
    ) -> bool:
        """The current try failed before any response byte reached the client. Record it for
        outlier detection and, when the policy, the method, the body, the budget and the route
        deadline all allow, schedule another try on a different instance. True if a retry is
        scheduled (the caller has already detached the failed connection)."""
        upstream = ex.upstream
        attempt = ex.attempt
        instance = attempt.instance if attempt is not None else None
        if upstream is None or attempt is None or instance is None:
            return False
        upstream.record_outcome(instance, False, is_gateway_failure(kind, status))
        policy = ex.retry
        if policy is None or ex.response_started or self.closed:
            return False
        replayable = ex.body is None or ex.body.replayable
        if not policy.should_retry(ex.tries, kind, status, False, replayable):
            return False
        if not (
            ex.idempotent
            or policy.method_retryable(ex.method, False)
            or policy.safe_for_any_method(kind)
        ):
            return False
        if kind == CONNECT_FAILURE:
            # Nothing reached the instance: retry at once elsewhere, outside the budget (the
            # budget protects upstreams from retry storms, and a dead instance gets none).
            delay: float | None = 0.0
        else:
            delay = policy.retry_delay(ex.tries, upstream.rng, retry_after)
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
        attempt.conn = None
        attempt.read_deadline = 0.0
        attempt.release()
        outcome = kind if kind != STATUS else str(status)
        record_try(
            ex, attempt, instance.address, time.perf_counter(), outcome, kind != CONNECT_FAILURE
        )
        ex.tried += (instance,)
        ex.status = 0
        ex.interim = False
        ex.tries += 1
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
        failed = ex.attempt
        attempt = self._pick(ex, upstream, ex.tried)
        if attempt is not None:
            if failed is not None:
                attempt.t_start = failed.t_start  # upstream time runs on until it is attached
                attempt.address = failed.address
            self._retry_head(ex, attempt)
            self._connect(attempt)

    def _retry_head(self, ex: Exchange, attempt: UpstreamAttempt) -> None:
        """A try after the first: a filter may change the head for it (RequestInfo.retry_head:
        tracing gives each try its own span id)."""
        filters = self.filters
        if filters is not None and filters.exchange is ex:
            retry_head = filters.request.retry_head
            if retry_head is not None:
                ex.head, label = retry_head(ex.head)
                if ex.attempt_labels is None:
                    ex.attempt_labels = {}
                ex.attempt_labels[attempt] = label

    def _pick(
        self, ex: Exchange, upstream: Upstream, exclude: tuple[Instance, ...]
    ) -> UpstreamAttempt | None:
        """The exchange's next try, on an instance (none of ``exclude`` when another exists),
        or answer 503."""
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
        instance.active_requests += 1
        attempt = ex.attempt = UpstreamAttempt(self, ex, instance)
        return attempt

    # -- hedging: two attempts race, the first response head wins ------------------------------
    def _hedge(self, primary: UpstreamAttempt) -> None:
        """The first try is slow: send the same request to another instance as well."""
        primary.hedge_timer = None
        ex = primary.ex
        upstream = ex.upstream
        if (
            self.active is not ex
            or self.closed
            or upstream is None
            or ex.attempt is not primary
            or primary.conn is None
            or ex.status
            or ex.response_started
        ):
            return
        metrics = self.server.metrics
        # A hedge is extra load like a retry: the retry budget bounds both.
        if not upstream.budget.try_acquire(time.monotonic()):
            metrics.retry(upstream.name, "budget_exhausted")
            return
        instance = upstream.pick(ex.hash_key, (primary.instance,))
        if instance is None or instance is primary.instance:
            return
        metrics.retry(upstream.name, "hedge")
        instance.active_requests += 1
        hedge = ex.hedge = UpstreamAttempt(self, ex, instance)
        # Its clock starts with the try it races: its latency is what the client waits.
        hedge.t_start = primary.t_start
        self._retry_head(ex, hedge)  # (the first try's head is sent: ex.head is the hedge's)
        pool: UpstreamPool = instance.pool  # type: ignore[assignment]  # see relay._connect
        conn = pool.acquire()
        if conn is not None:
            self._attach_hedge(hedge, conn)
            return

        def connected(conn: UpstreamLink | None, error: BaseException | None) -> None:
            if conn is None:
                if ex.hedge is hedge:
                    hedge.release()
                    ex.hedge = None
                return
            if self.active is not ex or self.closed or ex.hedge is not hedge:
                conn.pool.release(conn)  # never used: clean
                return
            self._attach_hedge(hedge, conn)

        pool.connect(connected)

    def _attach_hedge(self, hedge: UpstreamAttempt, conn: UpstreamLink) -> None:
        ex = hedge.ex
        conn.begin_exchange(hedge, ex.is_head)
        hedge.conn = conn
        conn.send(ex.head)

    def _race_won(self, ex: Exchange, attempt: UpstreamAttempt) -> None:
        """A response head came from ``attempt`` while a hedge was armed or racing: it wins,
        the other attempt (or the hedge timer) is abandoned."""
        if attempt is ex.hedge:
            self._promote_hedge(ex, abort_primary=True)  # the hedge answered first
        else:
            self._cancel_hedge(ex)  # the first try answered first

    def _promote_hedge(
        self, ex: Exchange, *, abort_primary: bool, outcome: str = "cancelled"
    ) -> None:
        """The hedge becomes the exchange's try; the first try is abandoned (``outcome``: why,
        for RequestInfo.attempts)."""
        primary = ex.attempt
        hedge = ex.hedge
        assert hedge is not None
        if primary is not None:
            if primary.instance is not None:
                record_try(
                    ex, primary, primary.instance.address, time.perf_counter(), outcome, True
                )
            if abort_primary:
                primary.abandon()
            else:
                primary.conn = None  # (already lost or discarded)
                primary.read_deadline = 0.0
                primary.release()
        ex.attempt = hedge
        ex.hedge = None
        if hedge.instance is not None:
            hedge.address = hedge.instance.address
        upstream = ex.upstream
        if upstream is not None:
            hedge.read_deadline = time.monotonic() + upstream.read_timeout

    def _drop_hedge(self, ex: Exchange, outcome: str = "cancelled") -> None:
        hedge = ex.hedge
        if hedge is not None:
            ex.hedge = None
            if hedge.conn is not None and hedge.instance is not None:  # it was sent
                record_try(ex, hedge, hedge.instance.address, time.perf_counter(), outcome, True)
            hedge.abandon()

    def _cancel_hedge(self, ex: Exchange) -> None:
        attempt = ex.attempt
        if attempt is not None and attempt.hedge_timer is not None:
            attempt.hedge_timer.cancel()
            attempt.hedge_timer = None
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

    def _upstream_failure(self, ex: Exchange, conn: UpstreamLink, reason: str) -> None:
        conn.discard()
        self._upstream_error(ex, 502, "upstream_failure", reason)

    def _upstream_timeout(self, ex: Exchange, reason: str, *, retryable: bool = True) -> None:
        if retryable and ex.hedge is not None and not ex.response_started:
            # The first try timed out, not the hedge.
            self._promote_hedge(ex, abort_primary=True, outcome=TIMEOUT)
            return
        attempt = ex.attempt
        if attempt is not None:
            conn = attempt.conn
            if conn is not None:
                attempt.conn = None
                conn.discard()
            attempt.read_deadline = 0.0
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
        attempt = ex.attempt
        if attempt is not None:
            attempt.release()
