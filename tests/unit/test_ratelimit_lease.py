"""Token leasing (gateway/ratelimit/lease.py): the sizing arithmetic, grants, expiry and sweep,
and the limiter deciding from leases against a fake Redis that runs the script's arithmetic
(GCRA in integer microseconds, all under a fake clock)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.ratelimit import Decision, LimitSpec, RedisStore, RouteLimiter
from gateway.ratelimit.lease import SWEEP_INTERVAL, Lease, LeasePolicy, LeaseTable
from gateway.snapshot import _REDIS_STORES, build_snapshot


# -- sizing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("burst", "share", "max_tokens"),
    [
        (1_000_000, 0.05, 50_000),  # one gateway, one worker: 5% of the burst
        (100, 0.05, 5),
        (100, 0.025, 2),  # two holders: 2.5 rounds down
        (25, 0.025, 1),  # rounds down to zero: one token per holder still
        (1, 0.05, 1),
        (60, 0.05, 3),  # 60 * 0.05 = 3.0000000000000004 in floats: exactly 3
    ],
)
def test_max_tokens_is_the_holders_share_of_the_burst(
    burst: int, share: float, max_tokens: int
) -> None:
    assert LeasePolicy(burst, share, 0.1, 1.0).max_tokens == max_tokens


@pytest.mark.parametrize(
    # A lease holding ``tokens`` saw ``used`` requests in the ``elapsed`` seconds since its last
    # sample (first sample: no previous rate); policy: burst 1000 at share 0.05 (50 tokens),
    # horizon 100 ms, ttl 1 s (no lease below 2 requests/s).
    ("previous_rate", "used", "elapsed", "tokens", "want", "low_water", "rate"),
    [
        (0.0, 100, 1.0, 0, 10, 5, 100.0),  # 100/s: 10 tokens = 100 ms, refill at 5
        (0.0, 1, 1.0, 0, 0, 0, 1.0),  # 1/s < 2/ttl: no lease, one request at a time
        (0.0, 2, 1.0, 0, 1, 0, 2.0),  # exactly 2/ttl: a lease of one token
        (0.0, 5, 0.01, 0, 50, 25, 500.0),  # 500/s wants 50: at the cap
        (0.0, 50, 0.01, 0, 50, 25, 5000.0),  # 5000/s: capped at max_tokens
        (0.0, 50, 0.01, 30, 20, 25, 5000.0),  # already holds 30: only the room up to 50
        (0.0, 50, 0.01, 50, 0, 25, 5000.0),  # full: nothing to ask for
        (100.0, 300, 1.0, 0, 20, 10, 200.0),  # moving average: 100 + (300 - 100) / 2
        (100.0, 0, 0.0, 0, 10, 5, 100.0),  # no time elapsed: no sample, the old rate
    ],
)
def test_plan_sizes_the_lease_to_the_horizon_of_the_recent_rate(
    previous_rate: float,
    used: int,
    elapsed: float,
    tokens: int,
    want: int,
    low_water: int,
    rate: float,
) -> None:
    policy = LeasePolicy(1000, 0.05, 0.1, 1.0)
    lease = Lease("k", b"p:k", 10.0)
    lease.rate = previous_rate
    lease.used = used
    lease.tokens = tokens
    assert policy.plan(lease, 10.0 + elapsed) == want
    assert lease.low_water == low_water
    assert lease.rate == pytest.approx(rate)
    if elapsed > 0:
        assert (lease.used, lease.since) == (0, 10.0 + elapsed)  # a new sample starts


@pytest.mark.parametrize(
    # Interval 10 ms (10,000 µs), span 1 s; a call sent at t = 5.0 asked for ``want`` tokens.
    ("got", "x_us", "want", "tokens", "expires", "tat", "denied_until"),
    [
        (4, 40_000, 4, 4, 6.0, 5.04, 0.0),  # granted: the TAT is 40 ms ahead
        (2, 1_000_000, 4, 2, 6.0, 6.0, 0.0),  # partial grant, bucket now empty
        (0, 1_030_000, 4, 0, 0.0, 5.0, 5.03),  # none: next token due 30 ms after the send
        (0, 1_000_000, 0, 0, 0.0, 5.0, 0.0),  # a pure return (want 0) is not a refusal
    ],
)
def test_grant(
    got: int, x_us: int, want: int, tokens: int, expires: float, tat: float, denied_until: float
) -> None:
    lease = Lease("k", b"p:k", 5.0)
    lease.grant(got, x_us, want, 5.0, 1_000_000, 1.0)
    assert lease.tokens == tokens
    assert lease.expires == pytest.approx(expires)
    assert lease.tat == pytest.approx(tat)
    assert lease.denied_until == pytest.approx(denied_until)


def test_x_of_a_leased_request_is_its_token_below_the_tat() -> None:
    lease = Lease("k", b"p:k", 0.0)
    lease.grant(10, 100_000, 10, 0.0, 1_000_000, 1.0)  # TAT 100 ms ahead, 10 ms each
    xs = []
    for _ in range(10):
        lease.tokens -= 1
        xs.append(lease.x(0.0, 0.01))
    # As if Redis had admitted them one by one: x = 10, 20, ..., 100 ms.
    assert xs == pytest.approx([0.01 * i for i in range(1, 11)])
    assert lease.x(5.0, 0.01) == 0.01  # long after: never below one interval


def test_expired_tokens_go_back() -> None:
    lease = Lease("k", b"p:k", 0.0)
    lease.grant(3, 30_000, 3, 0.0, 1_000_000, 1.0)
    lease.expire(0.999)
    assert (lease.tokens, lease.back) == (3, 0)
    lease.expire(1.0)
    assert (lease.tokens, lease.back) == (0, 3)


def test_table_bounds_its_keys_and_sweeps() -> None:
    table = LeaseTable(LeasePolicy(100, 0.05, 0.1, 1.0), b"p:", max_keys=2)
    a, b = table.open("a", 0.0), table.open(b"b", 0.0)
    assert a is not None and b is not None and a.rkey == b"p:a" and b.rkey == b"p:b"
    assert table.open("c", 0.0) is None  # full: decided one request at a time
    assert table.open("a", 0.0) is a
    a.grant(2, 20_000, 2, 0.0, 1_000_000, 1.0)
    assert table.sweep(0.5) == []  # a's tokens are valid, b is not idle for a ttl yet
    assert table.sweep(0.5 + SWEEP_INTERVAL / 2) == []  # not due again yet
    assert table.sweep(1.5) == [a] and a.back == 2  # a's tokens expired: to be given back
    assert "b" not in table.leases and b"b" not in table.leases  # idle: forgotten
    a.back = 0
    assert table.sweep(3.0) == [] and len(table) == 0


# -- the limiter against a fake Redis -----------------------------------------------------------
class FakeRedis(RedisStore):
    """Runs the script's arithmetic (decisions and leases) on its own keys, with the fake clock
    ``now``; answers when ``flush`` is called (the next loop iteration), or never (``down``)."""

    def __init__(self, clock: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self.tats: dict[bytes, int] = {}
        self.queued: list[tuple[list[bytes], list[int], Any]] = []
        self.down = False
        self.entries = 0

    def submit(self, keys: list[bytes], args: list[int], on_done: Any) -> bool:
        if self.down:
            return False
        self.queued.append((keys, args, on_done))
        self.entries += 1
        return True

    def flush(self) -> None:
        queued, self.queued = self.queued, []
        for keys, args, on_done in queued:
            on_done(None if self.down else self.run(keys, args))

    def run(self, keys: list[bytes], args: list[int]) -> list[Any]:
        now = round(self.clock() * 1_000_000)
        if args[0] < 0:
            interval, span, want, back = args[1:5]
            tat = max(self.tats.get(keys[0], now), now)
            tat = max(tat - back * interval, now)
            got = max(0, min(want, (span - (tat - now)) // interval))
            self.tats[keys[0]] = tat + got * interval
            return [[got, tat + got * interval - now] if got else [0, tat + interval - now]]
        out, news, ok = [], {}, True
        for j, key in enumerate(keys):
            interval, span, dry = args[1 + 3 * j : 4 + 3 * j]
            tat = max(self.tats.get(key, now), now)
            out.append(tat + interval - now)
            if tat + interval - now <= span:
                news[key] = tat + interval
            elif not dry:
                ok = False
        if ok:
            self.tats.update(news)
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def leased(store: FakeRedis, rate: int, burst: int, **spec: Any) -> RouteLimiter:
    limit = LimitSpec(rate, 1.0, burst, key="route", store="redis", lease=True, **spec)
    return RouteLimiter("api", [limit], redis=store)


def decide(limiter: RouteLimiter, store: FakeRedis, now: float) -> tuple[Decision, bool]:
    """(decision, decided synchronously)."""
    got: list[Decision] = []
    decision = limiter.check(now, "192.0.2.1", False, [], b"", got.append)
    if decision is not None:
        return decision, True
    store.flush()
    assert len(got) == 1
    return got[0], False


def test_a_busy_key_is_decided_locally_after_warm_up() -> None:
    clock = Clock()
    store = FakeRedis(clock)
    limiter = leased(store, 100_000, 100_000)  # never hit; 5,000 tokens per lease at most
    sync = []
    for _ in range(2000):  # 1000 requests/s: a lease of 100 tokens (100 ms)
        clock.now += 0.001
        decision, at_once = decide(limiter, store, clock.now)
        assert decision.allowed
        sync.append(at_once)
        store.flush()  # the refill's answer, one loop iteration later
    assert sum(sync[100:]) == 1900  # every request after the first ones decided at once
    assert store.entries < 2000 / 40  # one script entry per ~50 requests (refill at half)


def test_a_key_seen_rarely_is_never_leased() -> None:
    clock = Clock()
    store = FakeRedis(clock)
    limiter = leased(store, 100, 100)
    for _ in range(20):  # 1 request/s: below 2 per ttl
        clock.now += 1.0
        decision, at_once = decide(limiter, store, clock.now)
        assert decision.allowed and not at_once
    assert store.entries == 20 and store.lease_calls == 0


@pytest.mark.parametrize(
    # Two gateways (holders) share one key; each offers ``offered`` requests/s in random gaps.
    ("rate", "burst", "offered", "seconds"),
    [
        (200, 100, 2000, 5.0),  # 10x the rate
        (1000, 1000, 1500, 3.0),  # 1.5x
        (50, 25, 500, 5.0),  # the system test's limit: 1 token per lease
        (200, 100, 60, 5.0),  # under the limit: everything passes
    ],
)
def test_two_gateways_stay_within_the_bound(
    rate: int, burst: int, offered: int, seconds: float
) -> None:
    rng = random.Random(f"{rate}/{burst}/{offered}")
    clock = Clock()
    redis = FakeRedis(clock)  # one Redis: the lease answers come from the same bucket
    # Each gateway its own store object (its own leases), fallback_share 1/2 for 2 gateways.
    stores = [FakeRedis(clock, fallback_share=0.5) for _ in range(2)]
    for store in stores:
        store.tats = redis.tats
    limiters = [leased(store, rate, burst) for store in stores]
    start = clock.now
    next_at = [start, start]
    admitted = 0
    offered_total = 0
    while clock.now < start + seconds:
        i = 0 if next_at[0] <= next_at[1] else 1
        clock.now = next_at[i]
        next_at[i] += rng.expovariate(offered)
        got: list[Decision] = []
        decision = limiters[i].check(clock.now, "192.0.2.1", False, [], b"", got.append)
        offered_total += 1
        if rng.random() < 0.5:  # answers arrive in a later loop iteration, or this one
            for store in stores:
                store.flush()
        if decision is not None:
            admitted += decision.allowed
        else:
            stores[i].flush()
            admitted += got[0].allowed
    for store in stores:
        store.flush()
    max_tokens = limiters[0].limits[0].leases.policy.max_tokens  # type: ignore[union-attr]
    allowance = burst + rate * seconds
    if offered * 2 * seconds < rate * seconds:
        assert admitted == offered_total
    else:
        assert admitted <= allowance + 2 * max_tokens
        assert abs(admitted - allowance) <= 0.05 * allowance, (admitted, allowance)


def test_a_refused_key_is_refused_locally_until_its_next_token() -> None:
    clock = Clock()
    store = FakeRedis(clock)
    limiter = leased(store, 10, 2)  # interval 100 ms
    assert decide(limiter, store, clock.now)[0].allowed
    assert decide(limiter, store, clock.now)[0].allowed
    refused, at_once = decide(limiter, store, clock.now)
    assert not refused.allowed and not at_once and refused.status == 429
    entries = store.entries
    clock.now += 0.05
    refused, at_once = decide(limiter, store, clock.now)
    assert not refused.allowed and at_once and refused.retry_after == 1
    assert store.entries == entries  # no script call while Redis's answer holds
    clock.now += 0.06  # the next token is due
    assert decide(limiter, store, clock.now)[0].allowed


def test_a_refusal_by_another_limit_gives_the_leased_token_back() -> None:
    clock = Clock()
    store = FakeRedis(clock)
    specs = [
        LimitSpec(100_000, 1.0, 100_000, key="route", store="redis", lease=True, name="wide"),
        LimitSpec(1, 60.0, 25, key="route", store="local", name="narrow"),
    ]
    limiter = RouteLimiter("api", specs, redis=store)
    for _ in range(25):  # build a lease on "wide" with narrow's burst
        clock.now += 0.001
        decide(limiter, store, clock.now)
        store.flush()
    table = limiter.limits[0].leases
    assert table is not None
    lease = table.leases[b""]  # key "route": one bucket, the empty key value
    assert lease.tokens > 0
    before = lease.tokens
    decision, at_once = decide(limiter, store, clock.now)
    assert at_once and not decision.allowed and decision.limit == "narrow"
    assert lease.tokens == before  # taken, then given back


def test_the_store_going_away_mid_lease() -> None:
    clock = Clock()
    store = FakeRedis(clock)
    limiter = leased(store, 1000, 1000, on_store_error="local")  # 50 tokens per lease at most
    for _ in range(200):
        clock.now += 0.001
        decide(limiter, store, clock.now)
        store.flush()
    table = limiter.limits[0].leases
    assert table is not None
    held = table.held()
    assert held > 0
    store.down = True
    store.available = False  # as the real store marks itself after an error
    decisions = []
    for _ in range(held):  # the lease's tokens still decide: they are counted in Redis
        decision, at_once = decide(limiter, store, clock.now)
        decisions.append((decision.allowed, decision.store_error, at_once))
    assert decisions == [(True, False, True)] * held
    decision, at_once = decide(limiter, store, clock.now)  # then the fallback bucket
    assert at_once and decision.store_error
    # The fallback bucket was debited with every leased token: it admits only what the whole
    # limit has left (1000 burst minus what Redis handed out), not a fresh burst.
    admitted = 1 + sum(decide(limiter, store, clock.now)[0].allowed for _ in range(2000))
    redis_admitted = math.ceil(sum(store.tats.values()) / 1000 - clock.now * 1000)
    assert admitted + redis_admitted <= 1000 + 1


def test_expired_tokens_are_given_back_to_redis() -> None:
    clock = Clock()
    store = FakeRedis(clock, lease_ttl=0.5)
    limiter = leased(store, 1000, 1000)
    for _ in range(100):
        clock.now += 0.001
        decide(limiter, store, clock.now)
        store.flush()
    table = limiter.limits[0].leases
    assert table is not None
    held = table.held()
    key = next(iter(store.tats))
    tat_before = store.tats[key]
    assert held > 0
    clock.now += 0.6  # past the ttl; the bucket has refilled meanwhile
    limiter.expire(clock.now)
    store.flush()
    assert table.held() == 0 and store.lease_returned == held
    # Returned, the TAT moves back (clamped at now: a full bucket cannot overfill).
    assert store.tats[key] == max(round(clock.now * 1e6), tat_before - held * 1000)
    # An expired lease's token is never used: the next request goes to Redis.
    decision, at_once = decide(limiter, store, clock.now)
    assert decision.allowed and not at_once


# -- configuration --------------------------------------------------------------------------------
LEASE_CONFIG = """\
redis: {url: "redis://127.0.0.1:6379/0", fallback_share: 0.5, lease_horizon: 50ms, lease_ttl: 2s}
workers: 2
upstreams:
  app: {instances: ["127.0.0.1:9001"]}
routes:
  - name: leased
    upstream: app
    match: {path: {prefix: /a}}
    rate_limit: {rate: 100/s, burst: 400, store: redis}
  - name: per-request
    upstream: app
    match: {path: {prefix: /b}}
    rate_limit: {rate: 100/s, burst: 400, store: redis, lease: false}
"""


def test_config_leases_redis_limits_by_default_and_lease_false_turns_it_off() -> None:
    before = set(_REDIS_STORES)
    snapshot = build_snapshot(load_config_text(LEASE_CONFIG, "t.yaml"))
    try:
        table = snapshot.limiters["leased"].limits[0].leases
        assert table is not None
        # 400 * 5% * fallback_share 0.5 / 2 workers = 5 tokens per lease holder.
        assert table.policy.max_tokens == 5
        assert (table.policy.horizon, table.policy.ttl) == (0.05, 2.0)
        assert snapshot.limiters["per-request"].limits[0].leases is None
    finally:
        for config in set(_REDIS_STORES) - before:  # never connected: nothing to close
            del _REDIS_STORES[config]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("lease: maybe", "t.yaml:13: routes[1].rate_limit.lease: expected true or false"),
        ("lease: 1", "t.yaml:13: routes[1].rate_limit.lease: expected true or false"),
    ],
)
def test_bad_lease_values_name_file_line_and_key(line: str, error: str) -> None:
    text = LEASE_CONFIG.replace("store: redis, lease: false", f"store: redis, {line}")
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "t.yaml")
    messages = [str(e) for e in info.value.errors]
    assert any(m.startswith(error) for m in messages), messages


def test_bad_lease_durations_are_refused() -> None:
    text = LEASE_CONFIG.replace("lease_ttl: 2s", "lease_ttl: soon")
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "t.yaml")
    messages = [str(e) for e in info.value.errors]
    assert any(m.startswith("t.yaml:1: ") and "redis.lease_ttl" in m for m in messages), messages


@pytest.mark.parametrize(("headers", "legacy"), [(False, False), (True, False), (True, True)])
def test_each_admission_is_counted_once(headers: bool, legacy: bool) -> None:
    clock = Clock()
    store = FakeRedis(clock)
    spec = LimitSpec(100_000, 1.0, 100_000, key="route", store="redis", lease=True)
    limiter = RouteLimiter("api", [spec], redis=store, headers=headers, legacy_headers=legacy)
    local = RouteLimiter(
        "local", [LimitSpec(100_000, 1.0, 100_000)], headers=headers, legacy_headers=legacy
    )
    synchronous = 0
    for _ in range(300):
        clock.now += 0.001
        synchronous += decide(limiter, store, clock.now)[1]
        store.flush()
        assert local.check_local(clock.now, "192.0.2.1", False, [], b"").allowed
    assert synchronous > 250  # most of them from the lease: the fast path is what is counted
    assert limiter.stats()["allowed"] == 300
    assert local.stats()["allowed"] == 300
