"""The fallback bucket of a Redis limit: debited by Redis admissions, at ``fallback_share``,
with a bounded debt; the error bound of docs/ratelimit.md; the store's RESP2 reply parser."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from gateway.ratelimit import Decision, LimitSpec, LocalStore, RedisStore, RouteLimiter
from gateway.ratelimit.gcra import Gcra
from gateway.ratelimit.local import BucketStore
from gateway.ratelimit.redis_store import ReplyError, parse_reply
from gateway.ratelimit.shared import SharedTable

RATE, BURST = 10, 10  # interval 0.1 s, span 1.0 s


class FakeRedis(RedisStore):
    """Answers decisions from a GCRA of its own (what the Lua script computes), or not at all
    (``down``): no IO."""

    def __init__(self, fallback_share: float = 1.0) -> None:
        super().__init__(fallback_share=fallback_share)
        self.gcra = Gcra(RATE, 1.0, BURST)
        self.tat: float | None = None
        self.down = False
        self.now = 0.0

    def submit(self, keys: list[bytes], args: list[int], on_done: object) -> bool:
        if self.down:
            return False
        result = self.gcra.decide(self.tat, self.now)
        if result.allowed:
            self.tat = result.tat
        x_us = round((result.reset if result.allowed else result.reset + self.gcra.interval) * 1e6)
        on_done([x_us])  # type: ignore[operator]
        return True


def limiter(store: FakeRedis) -> RouteLimiter:
    spec = LimitSpec(RATE, 1.0, BURST, key="route", store="redis", on_store_error="local")
    return RouteLimiter("api", [spec], redis=store)


def decide(route: RouteLimiter, store: FakeRedis, now: float) -> Decision:
    store.now = now
    got: list[Decision] = []
    decision = route.check(now, "192.0.2.1", False, [], b"", got.append)
    return decision if decision is not None else got[0]


def test_a_fallback_right_after_redis_decisions_does_not_readmit_their_budget() -> None:
    store = FakeRedis()
    route = limiter(store)
    assert all(decide(route, store, 0.0).allowed for _ in range(BURST))  # Redis: the burst
    store.down = True
    fallback = decide(route, store, 0.0)
    assert fallback.store_error and not fallback.allowed and fallback.status == 429
    # One interval later the fallback bucket has refilled by exactly one request.
    assert decide(route, store, 0.1 + 1e-6).allowed
    assert not decide(route, store, 0.1 + 1e-6).allowed


def test_fallback_share_scales_rate_and_burst() -> None:
    store = FakeRedis(fallback_share=0.5)
    store.down = True
    route = limiter(store)
    admitted = [decide(route, store, 0.0).allowed for _ in range(BURST)]
    assert admitted == [True] * (BURST // 2) + [False] * (BURST - BURST // 2)
    assert not decide(route, store, 0.1 + 1e-6).allowed  # the share refills every 0.2 s
    assert decide(route, store, 0.2 + 1e-6).allowed


def test_redis_admissions_beyond_the_share_leave_a_debt_of_one_burst_at_most() -> None:
    store = FakeRedis(fallback_share=0.5)  # local: 5 per 0.5 s, span 1.0 s
    route = limiter(store)
    assert all(decide(route, store, 0.0).allowed for _ in range(BURST))  # twice the share
    store.down = True
    # Capped at now + 2 * span: admits again once the TAT is within span - interval.
    assert not decide(route, store, 1.0).allowed
    assert decide(route, store, 1.2 + 1e-6).allowed


@pytest.fixture(params=["local", "shared"])
def bucket(request: pytest.FixtureRequest) -> Iterator[BucketStore]:
    if request.param == "local":
        yield LocalStore()
        return
    table = SharedTable.create(1 << 16)
    try:
        yield table.view("fallback")
    finally:
        table.close()


@pytest.mark.parametrize(
    ("debits", "expected_tat"),
    [
        (1, 10.1),  # a full bucket: one interval
        (10, 11.0),  # the burst: empty
        (15, 11.5),  # in debt
        (30, 12.0),  # capped at now + cap
    ],
)
def test_debit_advances_unconditionally_up_to_the_cap(
    bucket: BucketStore, debits: int, expected_tat: float
) -> None:
    for _ in range(debits):
        bucket.debit("k", 10.0, 0.1, 2.0)
    tat = bucket.peek("k")
    assert tat == pytest.approx(expected_tat)
    refused = bucket.take("k", 10.0, 0.1, 1.0 + 1e-9) > 1.0 + 1e-9
    assert refused == (debits >= BURST)  # empty or in debt: refused


def test_error_bound_under_random_outages() -> None:
    """Random Redis outages while the load is 5x the limit: in every 1 s window (and over the
    whole run) the admitted count stays within burst + rate * t + one more burst."""
    rng = random.Random(3)
    store = FakeRedis()
    route = limiter(store)
    stamps: list[float] = []
    now = 0.0
    while now < 30.0:
        if rng.random() < 0.02:  # flip every ~50 ms on average
            store.down = not store.down
        for _ in range(rng.randint(0, 1)):
            if decide(route, store, now).allowed:
                stamps.append(now)
        now += 0.02
    assert len(stamps) <= BURST + RATE * 30.0 + BURST
    assert len(stamps) >= RATE * 30.0 * 0.9  # not starved
    for start in [i * 0.5 for i in range(58)]:
        inside = sum(1 for stamp in stamps if start <= stamp < start + 1.0)
        assert inside <= BURST + RATE * 1.0 + BURST, (start, inside)


# RESP2 replies as Redis sends them (https://redis.io/docs/reference/protocol-spec/).
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"*2\r\n:-5\r\n:100000\r\n", ([-5, 100000], 18)),
        (b"*2\r\n:-5\r\n:100", None),  # incomplete: wait for more bytes
        (b"*0\r\n", ([], 4)),
        (b"+PONG\r\n", (b"PONG", 7)),
        (b"$4\r\nabcd\r\n", (b"abcd", 10)),
        (b"$4\r\nab", None),
        (b"$-1\r\n", (None, 5)),
        (b":7", None),
    ],
)
def test_parse_reply(raw: bytes, expected: tuple[object, int] | None) -> None:
    assert parse_reply(raw, 0) == expected


def test_parse_error_reply() -> None:
    parsed = parse_reply(b"-NOSCRIPT No matching script\r\n", 0)
    assert parsed is not None and isinstance(parsed[0], ReplyError)
    assert parsed[0].message.startswith("NOSCRIPT") and parsed[1] == 30


def test_what_the_fallback_admits_while_redis_is_down_is_owed_to_redis() -> None:
    store = FakeRedis()
    store.down = True
    route = limiter(store)
    admitted = sum(decide(route, store, 0.0).allowed for _ in range(BURST + 5))
    assert admitted == BURST
    # Only what was admitted, at the limit's own interval (not the share's), once per key.
    # (key: route has no value of its own: the owner, the route, is in the prefix)
    assert store._owed == {b"gateway:api:limit0:": [100_000, 1_000_000, BURST]}
