"""Retry policy: pure decisions on whether, and after how long, an attempt may be retried.

Safety rules (issue 5; RFC 9110 §9.2.2 idempotent methods; RFC 9110 §10.2.3 Retry-After):

- Only idempotent methods are retried (GET HEAD OPTIONS PUT DELETE TRACE); POST/PATCH (and any
  other method) only with an ``Idempotency-Key`` header or when the route opts in. Exception: a
  *connect failure* is retryable for every method, since no byte reached the upstream.
- Never after any byte of the response went to the client (a second response is impossible).
- Only when the request body can be sent again: kept whole (≤ ``max_body_bytes``) or not one
  byte of it sent yet (``gateway.proxy.body.RequestBody.replayable``).
- ``attempts`` counts every try, the first included: ``attempts: 2`` is one retry.

Retry conditions (``on``):

================  ====================================================================
``connect_failure``  the TCP connection to the instance failed (refused, unreachable)
``reset``            the connection closed or reset before a complete response head
``timeout``          ``per_try_timeout`` (or the read timeout) expired on this try
``5xx``              any 5xx response, plus connect_failure, reset and timeout (Envoy's ``5xx``)
``gateway_error``    502, 503, 504 responses, plus connect_failure, reset and timeout: the
                     failures the gateway itself would report as 502/504
``<code>``           that response status (e.g. ``429``, ``503``)
================  ====================================================================
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from gateway.resilience.backoff import full_jitter_backoff

CONNECT_FAILURE = "connect_failure"
RESET = "reset"
TIMEOUT = "timeout"
STATUS = "status"  # failure_kind of a complete response head with a (retryable?) status
FAILURE_KINDS = frozenset({CONNECT_FAILURE, RESET, TIMEOUT, STATUS})

GRPC_UNAVAILABLE = "grpc-unavailable"  # grpc-status 14 before a response message (HTTP/2 path)
CONDITIONS = frozenset({CONNECT_FAILURE, RESET, TIMEOUT, "5xx", "gateway_error", GRPC_UNAVAILABLE})

# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS = frozenset(
    {b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"}
    | {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}
)

GATEWAY_STATUSES = frozenset({502, 503, 504})
# RFC 9110 §10.2.3: Retry-After is meaningful on 503 and on 429 (RFC 6585 §4).
RETRY_AFTER_STATUSES = frozenset({429, 503})


def is_gateway_failure(failure_kind: str, status: int = 0) -> bool:
    """Whether an attempt's failure counts as a gateway failure for outlier detection."""
    if failure_kind == STATUS:
        return status in GATEWAY_STATUSES
    return failure_kind in (CONNECT_FAILURE, RESET, TIMEOUT)


class RetryPolicy:
    __slots__ = (
        "allow_non_idempotent",
        "attempts",
        "backoff_base",
        "backoff_cap",
        "max_body_bytes",
        "on",
        "per_try_timeout",
        "retry_after_cap",
        "retry_kinds",
        "retry_statuses",
    )

    def __init__(
        self,
        attempts: int = 2,
        on: Iterable[str | int] = (CONNECT_FAILURE, RESET, "gateway_error"),
        per_try_timeout: float | None = None,
        max_body_bytes: int = 64 * 1024,
        allow_non_idempotent: bool = False,
        *,
        backoff_base: float = 0.025,
        backoff_cap: float = 0.25,
        retry_after_cap: float = 1.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts counts the first try: it must be at least 1")
        kinds: set[str] = set()
        statuses: set[int] = set()
        conditions: list[str | int] = []
        for condition in on:
            if isinstance(condition, int) or (isinstance(condition, str) and condition.isdigit()):
                code = int(condition)
                if not 100 <= code <= 599:
                    raise ValueError(f"retry on status {code}: not an HTTP status code")
                statuses.add(code)
                conditions.append(code)
                continue
            if condition not in CONDITIONS:
                raise ValueError(
                    f"unknown retry condition {condition!r}: expected one of "
                    f"{sorted(CONDITIONS)} or a status code"
                )
            conditions.append(condition)
            if condition == "5xx":
                statuses.update(range(500, 600))
                kinds.update((CONNECT_FAILURE, RESET, TIMEOUT))
            elif condition == "gateway_error":
                statuses.update(GATEWAY_STATUSES)
                kinds.update((CONNECT_FAILURE, RESET, TIMEOUT))
            else:
                kinds.add(condition)
        self.attempts = attempts
        self.on = tuple(conditions)
        self.per_try_timeout = per_try_timeout
        self.max_body_bytes = max_body_bytes
        self.allow_non_idempotent = allow_non_idempotent
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.retry_kinds = frozenset(kinds)
        self.retry_statuses = frozenset(statuses)

    @property
    def enabled(self) -> bool:
        return self.attempts > 1

    def method_retryable(
        self, method: bytes | str, headers_has_idempotency_key: bool, route_opt_in: bool = False
    ) -> bool:
        """Whether a request with this method may be sent twice (once it may have reached the
        upstream). POST/PATCH and other non-idempotent methods need an ``Idempotency-Key``
        header or an explicit opt-in (route or policy)."""
        if method in IDEMPOTENT_METHODS:
            return True
        return headers_has_idempotency_key or route_opt_in or self.allow_non_idempotent

    @staticmethod
    def safe_for_any_method(failure_kind: str) -> bool:
        """A connect failure sent nothing: retrying it cannot duplicate any request."""
        return failure_kind == CONNECT_FAILURE

    def should_retry(
        self,
        attempt: int,
        failure_kind: str,
        status: int = 0,
        response_started: bool = False,
        body_replayable: bool = True,
    ) -> bool:
        """Whether try number ``attempt`` (1-based), which just failed with ``failure_kind``
        (``status`` for a response), may be followed by another. The method check is separate:
        :meth:`method_retryable` / :meth:`safe_for_any_method`."""
        if attempt >= self.attempts or response_started or not body_replayable:
            return False
        if failure_kind == STATUS:
            return status in self.retry_statuses
        return failure_kind in self.retry_kinds

    def retry_delay(
        self, retry: int, rng: random.Random, retry_after: float | None = None
    ) -> float | None:
        """Seconds to wait before retry number ``retry`` (1 = first retry). ``retry_after`` is a
        parsed ``Retry-After`` of a 503/429: honoured when within ``retry_after_cap``; beyond
        it the answer is None (do not retry: the upstream asked for a longer pause than this
        request can wait, so its response goes to the client)."""
        delay = full_jitter_backoff(retry, rng, self.backoff_base, self.backoff_cap)
        if retry_after is None:
            return delay
        if retry_after > self.retry_after_cap:
            return None
        return max(delay, retry_after)
