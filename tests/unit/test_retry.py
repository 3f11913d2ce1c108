"""Retry decisions, backoff bounds, Retry-After parsing and the retry budget."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.resilience import (
    CONNECT_FAILURE,
    RESET,
    STATUS,
    TIMEOUT,
    Backoff,
    RetryBudget,
    RetryPolicy,
    full_jitter_backoff,
    is_gateway_failure,
    parse_retry_after,
)
from gateway.resilience.backoff import parse_http_date


# -- methods -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "key", "opt_in", "allowed"),
    [
        (b"GET", False, False, True),
        (b"HEAD", False, False, True),
        (b"OPTIONS", False, False, True),
        (b"PUT", False, False, True),
        (b"DELETE", False, False, True),
        (b"TRACE", False, False, True),
        ("GET", False, False, True),
        (b"POST", False, False, False),
        (b"PATCH", False, False, False),
        (b"CONNECT", False, False, False),
        (b"POST", True, False, True),
        (b"PATCH", False, True, True),
        (b"get", False, False, False),  # methods are case-sensitive (RFC 9110 §9.1)
    ],
)
def test_method_retryable(method: bytes | str, key: bool, opt_in: bool, allowed: bool) -> None:
    assert RetryPolicy().method_retryable(method, key, opt_in) is allowed


def test_policy_level_opt_in_and_connect_failure_is_safe_for_any_method() -> None:
    assert RetryPolicy(allow_non_idempotent=True).method_retryable(b"POST", False)
    assert RetryPolicy.safe_for_any_method(CONNECT_FAILURE)
    assert not RetryPolicy.safe_for_any_method(RESET)
    assert not RetryPolicy.safe_for_any_method(TIMEOUT)


# -- conditions --------------------------------------------------------------------------------
ON_ALL = ["connect_failure", "reset", "timeout"]


@pytest.mark.parametrize(
    ("on", "kind", "status", "retry"),
    [
        (ON_ALL, CONNECT_FAILURE, 0, True),
        (ON_ALL, RESET, 0, True),
        (ON_ALL, TIMEOUT, 0, True),
        (ON_ALL, STATUS, 503, False),
        (["connect_failure"], RESET, 0, False),
        (["reset"], CONNECT_FAILURE, 0, False),
        (["5xx"], STATUS, 500, True),
        (["5xx"], STATUS, 599, True),
        (["5xx"], STATUS, 404, False),
        (["5xx"], RESET, 0, True),
        (["gateway_error"], STATUS, 502, True),
        (["gateway_error"], STATUS, 503, True),
        (["gateway_error"], STATUS, 504, True),
        (["gateway_error"], STATUS, 500, False),
        (["gateway_error"], CONNECT_FAILURE, 0, True),
        ([429, "503"], STATUS, 429, True),
        ([429, "503"], STATUS, 503, True),
        ([429, "503"], STATUS, 502, False),
        ([429], TIMEOUT, 0, False),
    ],
)
def test_should_retry_conditions(on: list[str | int], kind: str, status: int, retry: bool) -> None:
    policy = RetryPolicy(attempts=3, on=on)
    assert policy.should_retry(1, kind, status) is retry


def test_should_retry_limits() -> None:
    policy = RetryPolicy(attempts=3, on=["reset"])
    assert policy.should_retry(1, RESET)
    assert policy.should_retry(2, RESET)
    assert not policy.should_retry(3, RESET)  # attempts counts every try
    assert not policy.should_retry(1, RESET, response_started=True)
    assert not policy.should_retry(1, RESET, body_replayable=False)
    assert not RetryPolicy(attempts=1, on=["reset"]).should_retry(1, RESET)
    assert not RetryPolicy(attempts=1).enabled


def test_bad_policies() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="unknown retry condition"):
        RetryPolicy(on=["sometimes"])
    with pytest.raises(ValueError):
        RetryPolicy(on=[99])


@pytest.mark.parametrize(
    ("kind", "status", "gateway"),
    [
        (CONNECT_FAILURE, 0, True),
        (RESET, 0, True),
        (TIMEOUT, 0, True),
        (STATUS, 503, True),
        (STATUS, 500, False),
        (STATUS, 200, False),
    ],
)
def test_is_gateway_failure(kind: str, status: int, gateway: bool) -> None:
    assert is_gateway_failure(kind, status) is gateway


# -- backoff ----------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_full_jitter_bounds(retry: int, seed: int) -> None:
    delay = full_jitter_backoff(retry, random.Random(seed), base=0.025, cap=0.25)
    assert 0.0 <= delay <= min(0.25, 0.025 * 2 ** (retry - 1))


def test_full_jitter_uses_the_whole_range() -> None:
    backoff = Backoff(rng=random.Random(3))
    delays = [backoff.delay(3) for _ in range(2000)]  # ceiling 0.1
    assert max(delays) > 0.09 and min(delays) < 0.01
    assert sum(delays) / len(delays) == pytest.approx(0.05, abs=0.005)


def test_retry_delay_honours_retry_after_up_to_the_cap() -> None:
    policy = RetryPolicy(retry_after_cap=2.0)
    rng = random.Random(4)
    assert 0.0 <= policy.retry_delay(1, rng) <= 0.025  # type: ignore[operator]
    assert policy.retry_delay(1, rng, retry_after=1.5) == 1.5
    assert policy.retry_delay(1, rng, retry_after=0.0) <= 0.025  # type: ignore[operator]
    assert policy.retry_delay(1, rng, retry_after=5.0) is None  # longer than we wait: no retry


# -- Retry-After ------------------------------------------------------------------------------
NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"120", 120.0),
        (b" 0 ", 0.0),
        (b"Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        (b"Sun, 06 Nov 1994 08:50:07 GMT", 30.0),
        (b"Sunday, 06-Nov-94 08:50:07 GMT", 30.0),  # RFC 850
        (b"Sun Nov  6 08:50:07 1994", 30.0),  # asctime
        (b"Sat, 05 Nov 1994 08:49:37 GMT", 0.0),  # in the past
        (b"-5", None),
        (b"1.5", None),
        (b"soon", None),
        (b"", None),
        (b"Sun, 06 Nov 1994 08:49:37 PST", None),
        (b"Sun, 06 Foo 1994 08:49:37 GMT", None),
        (b"Sun, 06 Nov 1994 25:49:37 GMT", None),
        ("60", 60.0),
    ],
)
def test_parse_retry_after(value: bytes | str, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_cap() -> None:
    assert parse_retry_after(b"3600", NOW, cap=5.0) == 5.0
    assert parse_retry_after(b"2", NOW, cap=5.0) == 2.0


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=4_000_000_000))
def test_http_date_round_trip(epoch: int) -> None:
    assert parse_http_date(formatdate(epoch, usegmt=True).encode()) == float(epoch)


# -- retry budget (token bucket filled by requests, gateway/resilience/budget.py) ---------------
def test_budget_reserve_allows_retries_without_traffic() -> None:
    budget = RetryBudget(budget_percent=20.0, min_retries_per_second=1.0, ttl=10.0, now=0.0)
    granted = sum(budget.try_acquire(0.5) for _ in range(20))
    assert granted == 10 and budget.overflow == 10  # 1/s x 10 s reserve, nothing earned


def test_budget_grants_a_correlated_burst_paid_by_recent_traffic() -> None:
    # 1,000 requests/s for 3 s earn 600 tokens at 20%: 64 requests in flight on an instance
    # that just died are all retried.
    budget = RetryBudget(budget_percent=20.0, min_retries_per_second=0.0, ttl=10.0, now=0.0)
    for second in range(3):
        for _ in range(1000):
            budget.record_request()
        budget.tick(second + 1.0)
    assert all(budget.try_acquire(3.5) for _ in range(64))


def test_budget_bounds_a_retry_storm_to_the_percent_plus_the_reserve() -> None:
    # Every try fails and asks for a retry: over 60 s at 500 requests/s, retries stay within
    # 20% of requests plus min_retries_per_second per second.
    budget = RetryBudget(budget_percent=20.0, min_retries_per_second=5.0, ttl=10.0, now=0.0)
    granted = 0
    for tenth in range(600):
        now = tenth / 10
        budget.tick(now)
        for _ in range(50):
            budget.record_request()
            granted += budget.try_acquire(now)
    requests = 500 * 60
    assert granted <= 0.2 * requests + 5.0 * 60 + 5.0 * 10  # + one reserve at the start
    assert granted >= 0.2 * requests * 0.9  # the share is really granted, not refused


def test_budget_earnings_expire_after_ttl() -> None:
    budget = RetryBudget(budget_percent=100.0, min_retries_per_second=0.0, ttl=2.0, now=0.0)
    for _ in range(10):
        budget.record_request()
    assert budget.balance(0.5) == 10
    assert budget.balance(1.5) == 10  # still inside the 2 s window
    assert budget.balance(2.5) == 0  # expired
    assert not budget.try_acquire(2.5)


def test_budget_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        RetryBudget(budget_percent=-1)
    with pytest.raises(ValueError):
        RetryBudget(ttl=0.5)


@settings(max_examples=60, deadline=None)
@given(
    st.floats(min_value=0, max_value=100),
    st.floats(min_value=0, max_value=20),
    st.integers(min_value=1, max_value=10),
    st.lists(st.tuples(st.booleans(), st.floats(0, 2)), max_size=300),
)
def test_budget_never_exceeds_its_window_bound(
    percent: float, minimum: float, ttl: int, ops: list[tuple[bool, float]]
) -> None:
    budget = RetryBudget(percent, minimum, float(ttl), now=0.0)
    now = 0.0
    events: list[tuple[float, bool]] = []  # (time, is_retry)
    for is_retry, step in ops:
        now += step
        if not is_retry:
            budget.record_request()
            events.append((now, False))
        elif budget.try_acquire(now):
            events.append((now, True))
            # When a retry is granted, the retries of the window it falls in (it included)
            # never exceed what that window's requests earned plus the reserve. (Later, the
            # requests that paid for it may leave the window before it does: the bound is
            # checked at grant time.)
            start = int(now) - ttl + 1
            window = [kind for at, kind in events if int(at) >= start]
            earned = percent / 100 * window.count(False) + minimum * ttl
            assert window.count(True) <= earned + 1e-9
