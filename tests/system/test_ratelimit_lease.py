"""Token leasing against a real redis-server: two gateway processes sharing a leased limit stay
within 5% of it, a busy key costs few script calls, the store going away mid-lease, and lease
expiry giving tokens back (docs/ratelimit.md, "Token leasing")."""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.ratelimit import Decision, LimitSpec, RedisStore, RouteLimiter
from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import metric_value
from tests.system.redis_fixture import RedisServer, redis_server
from tests.system.test_ratelimit_gateways import Load
from tests.system.test_ratelimit_redis import Recorder, wait_until

__all__ = ["redis_server"]  # the fixture, re-exported for pytest


@pytest.fixture
def backend() -> Iterator[AppBackend]:
    app = AppBackend("rl")
    yield app
    app.close()


def start_gateways(
    tmp_path: Path,
    redis: RedisServer,
    backend: AppBackend,
    count: int,
    limit: dict[str, Any],
    workers: int = 1,
) -> list[GatewayProcess]:
    config: dict[str, Any] = {
        "workers": workers,
        # Generous: a healthy Redis on loopback must never time out, even on a busy machine.
        "redis": {"url": redis.url, "timeout": "500ms", "fallback_share": 1 / count},
        "upstreams": {"app": {"instances": [f"127.0.0.1:{backend.port}"]}},
        "routes": [
            {
                "name": "api",
                "upstream": "app",
                "rate_limit": {"key": "route", "store": "redis", **limit},
            }
        ],
    }
    started: list[GatewayProcess] = []
    try:
        for index in range(count):
            workdir = tmp_path / f"gw{index}"
            workdir.mkdir()
            started.append(GatewayProcess(config, workdir))
    except BaseException:
        for gateway in started:
            gateway.stop()
        raise
    return started


@pytest.mark.parametrize(
    ("rate", "burst", "workers"),
    [
        (200, 400, 1),  # 5% of the burst over two gateways: leases of up to 10 tokens
        (200, 400, 2),  # four lease holders: up to 5 tokens each
        (50, 25, 1),  # the two-gateway test's limit: leases of one token
    ],
)
def test_two_gateways_share_a_leased_limit_within_five_percent(
    tmp_path: Path,
    redis_server: RedisServer,
    backend: AppBackend,
    rate: int,
    burst: int,
    workers: int,
) -> None:
    limit = {"rate": f"{rate}/s", "burst": burst}
    gateways = start_gateways(tmp_path, redis_server, backend, 2, limit, workers)
    try:
        load = Load(gateways)
        load.start()
        time.sleep(5.0)  # the scenario itself is a 5-second burst-then-steady load
        load.stop()
    finally:
        for gateway in gateways:
            gateway.stop()
    assert not load.errors, load.errors[:3]
    first = min(stamp for stamp, _ in load.stamps)
    last_admitted = max(stamp for stamp, status in load.stamps if status == 200)
    expected = burst + rate * (last_admitted - first)
    admitted = load.counts[200]
    assert load.counts[429] > admitted / 2, (
        "the load must exceed the limit for the test to mean much"
    )
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected, load.counts)
    assert set(load.counts) <= {200, 429}


def test_a_busy_key_costs_few_script_calls(
    tmp_path: Path, redis_server: RedisServer, backend: AppBackend
) -> None:
    """A limit that is never hit: leased, ~100 ms of a key's rate per script call."""
    (gateway,) = start_gateways(
        tmp_path, redis_server, backend, 1, {"rate": "100000/s", "burst": 100_000}
    )
    try:
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
        before = redis_server.command_calls("evalsha")
        statuses = []
        for _ in range(500):
            connection.request("GET", "/echo/rl")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()
        calls = redis_server.command_calls("evalsha") - before
    finally:
        gateway.stop()
    assert statuses == [200] * 500
    assert calls <= 500 / 5, calls  # one script call per request without leasing


def test_lease_counters_on_metrics_add_up_over_workers(
    tmp_path: Path, redis_server: RedisServer, backend: AppBackend
) -> None:
    """gateway_ratelimit_lease_*_total: what the workers' leases took from Redis and gave back,
    summed on the supervisor's /metrics."""
    (gateway,) = start_gateways(
        tmp_path, redis_server, backend, 1, {"rate": "100000/s", "burst": 100_000}, workers=2
    )
    try:
        before = redis_server.command_calls("evalsha")
        for _ in range(4):  # new connections: both workers get requests
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
            for _ in range(150):
                connection.request("GET", "/echo/rl")
                response = connection.getresponse()
                response.read()
                assert response.status == 200
            connection.close()
        text = gateway.metrics_text()
        calls = metric_value(text, "gateway_ratelimit_lease_calls_total")
        granted = metric_value(text, "gateway_ratelimit_lease_tokens_granted_total")
        assert calls is not None and granted is not None
        # Lease entries ride in script calls; at least one, at most a few per call.
        assert 0 < calls <= 4 * (redis_server.command_calls("evalsha") - before), calls
        assert granted > 0
        # Idle for more than the 1 s lease ttl: unused tokens go back and are counted.
        deadline = time.monotonic() + 15
        while not metric_value(
            gateway.metrics_text(), "gateway_ratelimit_lease_tokens_returned_total"
        ):
            assert time.monotonic() < deadline, "no returned lease tokens on /metrics"
            time.sleep(0.1)
    finally:
        gateway.stop()


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[list[RedisStore]]:
    made: list[RedisStore] = []
    yield made
    for store in made:
        await store.close()


async def warm_lease(limiter: RouteLimiter, recorder: Recorder, seconds: float) -> None:
    """Requests at ~1000/s for ``seconds``, so the key gets a lease and keeps it topped up."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        recorder.run(limiter)
        await asyncio.sleep(0.001)
    await wait_until(lambda: recorder.outstanding == 0)


async def test_redis_going_away_mid_lease(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    """The tokens a gateway holds are counted in Redis: they keep deciding, synchronously and
    without a store error, after Redis stopped; then the fallback bucket (debited with every
    leased token) decides, within the limit."""
    store = RedisStore(redis_server.url, prefix="gwtest", timeout=0.25, backoff_min=5.0)
    stores.append(store)
    spec = LimitSpec(1000, 1.0, 1000, key="route", store="redis", lease=True)
    limiter = RouteLimiter("api", [spec], redis=store)
    recorder = Recorder()
    await warm_lease(limiter, recorder, 0.5)
    table = limiter.limits[0].leases
    assert table is not None and store.leased > 0
    await wait_until(lambda: table.held() > 0)
    held = table.held()
    redis_server.stop()
    at = len(recorder.decisions)
    for _ in range(held):
        recorder.run(limiter)
    from_lease = recorder.decisions[at:]
    assert len(from_lease) == held and recorder.outstanding == 0  # all decided at once
    assert all(d.allowed and not d.store_error for d in from_lease)
    # Past the lease: the store notices Redis is gone, the fallback decides.
    await warm_lease(limiter, recorder, 0.3)
    after = recorder.decisions[at + held :]
    fallback = [d for d in after if d.store_error]
    assert fallback and not store.available
    assert sum(d.allowed for d in fallback) <= 1000 * (0.3 + 0.25) + 50
    assert all(d.status == 429 for d in fallback if not d.allowed)


async def stored_tat(client: aioredis.Redis, key: bytes) -> int:
    value = await client.get(key)
    assert value is not None, f"no bucket at {key!r}"
    return int(value)


async def test_expired_lease_tokens_go_back_to_redis(
    redis_server: RedisServer, stores: list[RedisStore]
) -> None:
    store = RedisStore(redis_server.url, prefix="gwtest", timeout=1.0, lease_ttl=0.2)
    stores.append(store)
    # 1000/min (interval 60 ms): the TAT runs far ahead of now, so the returned tokens show
    # in it exactly (a return never moves it below now).
    spec = LimitSpec(1000, 60.0, 1000, key="route", store="redis", lease=True)
    limiter = RouteLimiter("api", [spec], redis=store)
    recorder = Recorder()
    await warm_lease(limiter, recorder, 0.3)
    table = limiter.limits[0].leases
    assert table is not None
    await wait_until(
        lambda: table.held() > 0 and not any(x.refilling for x in table.leases.values())
    )
    held = table.held()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        key = b"gwtest:api:limit0:"
        tat_before = await stored_tat(client, key)
        await asyncio.sleep(0.25)  # past the ttl, with no requests
        limiter.expire(time.monotonic())
        await wait_until(lambda: store.lease_returned == held)
        tat_after = await stored_tat(client, key)
        # One interval (60,000 µs) back per returned token.
        assert tat_after == tat_before - held * 60_000, (tat_before, tat_after, held)
    finally:
        await client.aclose()
    assert table.held() == 0
    # An expired lease does not decide: the next request asks Redis.
    got: list[Decision] = []
    assert limiter.check(time.monotonic(), "192.0.2.1", False, [], b"", got.append) is None
    await wait_until(lambda: bool(got))
    assert got[0].allowed and not got[0].store_error
