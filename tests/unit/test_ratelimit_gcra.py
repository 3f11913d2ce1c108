"""GCRA arithmetic and the local bucket table: exact, table-driven, bounded."""

from __future__ import annotations

import os
import socket
import tracemalloc

import pytest

from gateway.ratelimit.gcra import Gcra, retry_after_seconds
from gateway.ratelimit.local import LocalStore

# 10/s (one request every 0.1 s) with a burst of 3, driven from an idle bucket at t=0.
# (time, allowed, remaining, reset, retry_after)
TABLE = [
    (0.0, True, 2, 0.1, 0.0),
    (0.0, True, 1, 0.2, 0.0),
    (0.0, True, 0, 0.3, 0.0),
    (0.0, False, 0, 0.3, 0.1),
    (0.05, False, 0, 0.25, 0.05),
    (0.1, True, 0, 0.3, 0.0),  # one interval later, exactly one more passes
    (0.1, False, 0, 0.3, 0.1),
    (0.35, True, 1, 0.15, 0.0),  # 0.25 s of refill: 2.5 slots, one used now
    (0.35, True, 0, 0.25, 0.0),
    (0.35, False, 0, 0.25, 0.05),
    (10.0, True, 2, 0.1, 0.0),  # idle: full bucket again
]


def test_gcra_table() -> None:
    gcra = Gcra(10, 1.0, 3)
    tat: float | None = None
    for now, allowed, remaining, reset, retry_after in TABLE:
        result = gcra.decide(tat, now)
        assert result.allowed is allowed, now
        assert result.remaining == remaining, now
        assert result.reset == pytest.approx(reset), now
        assert result.retry_after == pytest.approx(retry_after), now
        tat = result.tat


@pytest.mark.parametrize(
    ("count", "period", "burst", "step", "duration"),
    [(10, 1.0, 5, 0.01, 10.0), (100, 1.0, 50, 0.001, 3.0), (5, 60.0, 1, 0.5, 600.0)],
)
def test_burst_then_steady_rate(
    count: int, period: float, burst: int, step: float, duration: float
) -> None:
    """Saturated load admits exactly ``burst + duration / interval`` (plus the t=0 request)."""
    gcra = Gcra(count, period, burst)
    tat: float | None = None
    admitted = 0
    for _ in range(burst * 3):  # a burst at t=0: only ``burst`` pass
        result = gcra.decide(tat, 0.0)
        admitted += result.allowed
        tat = result.tat
    assert admitted == burst
    for i in range(1, round(duration / step) + 1):
        result = gcra.decide(tat, i * step)
        admitted += result.allowed
        tat = result.tat
    assert admitted == burst + round(duration * count / period)


def test_retry_after_is_an_integer_of_at_least_one_second() -> None:
    assert retry_after_seconds(0.0001) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(1.2) == 2
    assert retry_after_seconds(59.99) == 60


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        Gcra(0, 1.0, 1)
    with pytest.raises(ValueError):
        Gcra(1, 1.0, 0)


def test_local_store_matches_gcra() -> None:
    gcra = Gcra(10, 1.0, 3)
    store = LocalStore()
    tat: float | None = None
    for now, allowed, *_ in TABLE:
        x = store.take("k", now, gcra.interval, gcra.span_cmp)
        result = gcra.decide(tat, now)
        tat = result.tat
        assert (x <= gcra.span_cmp) is allowed is result.allowed
        assert store.peek("k") == pytest.approx(tat)


def test_local_store_refund_and_expire() -> None:
    store = LocalStore()
    store.take("a", 0.0, 1.0, 1.0 + 1e-9)
    assert store.take("a", 0.0, 1.0, 1.0 + 1e-9) > 1.0  # denied
    store.refund("a", 1.0)
    assert store.take("a", 0.0, 1.0, 1.0 + 1e-9) <= 1.0  # the refunded slot is usable
    store.take("b", 5.0, 1.0, 1.0 + 1e-9)
    assert store.expire(2.0) == 1  # "a" is idle (full again) at t=2, "b" is not
    assert len(store) == 1 and store.peek("b") is not None


def test_lru_keeps_the_recently_used_keys() -> None:
    store = LocalStore(max_keys=3)
    for key in ("a", "b", "c"):
        store.take(key, 0.0, 1.0, 5.0)
    store.take("a", 0.0, 1.0, 5.0)  # "a" becomes the most recent
    store.take("d", 0.0, 1.0, 5.0)  # evicts "b", the least recent
    assert store.peek("b") is None
    assert all(store.peek(key) is not None for key in ("a", "c", "d"))
    assert store.evicted == 1


def test_memory_is_bounded_under_a_million_random_client_ips() -> None:
    cap = 100_000
    store = LocalStore(max_keys=cap)
    raw = os.urandom(4_000_000)
    ntoa = socket.inet_ntoa
    take = store.take
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(raw), 4):
            take(ntoa(raw[i : i + 4]), i * 1e-7, 0.01, 1.0)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == cap
    # Measured ~240 bytes per key (str key, float TAT, OrderedDict entry): bound at 300.
    assert current - base < cap * 300, (current - base) / cap
    assert peak - base < cap * 450, (peak - base) / cap
