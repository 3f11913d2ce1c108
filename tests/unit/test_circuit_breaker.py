"""Circuit breaker: counters with caps and overflow counts."""

from __future__ import annotations

import pytest

from gateway.resilience import CircuitBreaker

KINDS = [
    ("requests", "try_request", "release_request"),
    ("pending", "try_pending", "release_pending"),
]


@pytest.mark.parametrize(("kind", "take", "give"), KINDS)
def test_cap_overflow_and_release(kind: str, take: str, give: str) -> None:
    breaker = CircuitBreaker(max_connections=2, max_pending=2, max_requests=2)
    assert getattr(breaker, take)() and getattr(breaker, take)()
    assert not getattr(breaker, take)()
    assert not getattr(breaker, take)()
    assert getattr(breaker, f"{kind}_overflow") == 2
    assert breaker.requests_overflow + breaker.pending_overflow == 2  # other kind untouched
    getattr(breaker, give)()
    assert getattr(breaker, take)()
    for _ in range(5):
        getattr(breaker, give)()
    assert getattr(breaker, kind) == 0  # never negative


def test_zero_means_unlimited() -> None:
    breaker = CircuitBreaker(max_connections=0, max_pending=0, max_requests=0)
    assert all(breaker.try_request() for _ in range(10_000))
    assert breaker.requests_overflow == 0


def test_kinds_are_independent() -> None:
    breaker = CircuitBreaker(max_connections=1, max_pending=1, max_requests=1)
    assert breaker.try_request()
    assert breaker.try_pending()
    assert not breaker.try_request()
    assert (breaker.requests_overflow, breaker.pending_overflow) == (1, 0)
