"""The shared-memory bucket table (``workers: N``), bucket sharing between routes, and the
outlier-ejection hooks the supervisor uses to spread an ejection to every worker."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config_text
from gateway.ratelimit import shared
from gateway.ratelimit.gcra import SLACK
from gateway.ratelimit.limiter import BucketStores, LimitSpec, RouteLimiter
from gateway.ratelimit.local import LocalStore
from gateway.ratelimit.shared import WINDOW, SharedBuckets, SharedTable, table_slots
from gateway.snapshot import build_snapshot, set_ejection_listener

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def table() -> Iterator[SharedTable]:
    created = SharedTable.create(1 << 16)
    yield created
    created.close()


def test_table_slots_are_a_bounded_power_of_two() -> None:
    assert table_slots(0) == 1 << 16
    assert table_slots(100_000) == 1 << 18
    assert table_slots(10**9) == 1 << 22


def test_shared_buckets_decide_like_local_store(table: SharedTable) -> None:
    view, local = table.view("r\x00l"), LocalStore()
    rng = random.Random(7)
    interval, span_cmp = 0.1, 0.5 + SLACK
    now = 1000.0
    for _ in range(3000):
        now += rng.choice((0.0, 0.0, 0.01, 0.05, 0.3))
        key = rng.choice(("1.2.3.4", "5.6.7.8", b"k", b""))
        assert view.take(key, now, interval, span_cmp) == local.take(key, now, interval, span_cmp)
        if rng.random() < 0.05:
            view.refund(key, interval)
            local.refund(key, interval)
        assert view.peek(key) == local.peek(key)
    assert view.evicted == 0
    assert table.lock_timeouts == 0


def test_prefixes_separate_buckets(table: SharedTable) -> None:
    one, two = table.view("route-a\x00limit0"), table.view("route-b\x00limit0")
    assert one.take("k", 10.0, 1.0, 1.0 + SLACK) == 1.0
    assert one.take("k", 10.0, 1.0, 1.0 + SLACK) > 1.0 + SLACK  # burst of 1 used up
    assert two.take("k", 10.0, 1.0, 1.0 + SLACK) == 1.0  # its own bucket
    assert table.view("route-a\x00limit0").peek("k") == 11.0  # same prefix, same bucket
    assert table.used(10.0) == 2


def test_a_full_window_evicts_the_bucket_closest_to_idle() -> None:
    tiny = SharedTable.create(WINDOW)  # one group: every key competes for the same 8 slots
    try:
        view = tiny.view("p")
        for i in range(WINDOW):  # TATs 110.0, 110.1, ... 110.7
            view.take(f"k{i}", 100.0 + i / 10, 10.0, 100.0)
        view.take("k0", 101.0, 10.0, 100.0)  # k0 used again: TAT 120, k1 is now the oldest
        view.take("new", 101.0, 10.0, 100.0)
        assert view.peek("k1") is None
        assert view.peek("k0") == 120.0 and view.peek("new") == 111.0
        assert view.evicted == 1  # k1's TAT (110.1) was still ahead of now (101)
        # Slots whose TAT is in the past are free: reusing them evicts nothing that matters.
        for i in range(WINDOW):
            view.take(f"later{i}", 500.0, 1.0, 100.0)
        assert view.evicted == 1
        assert tiny.used(500.0) == WINDOW
    finally:
        tiny.close()


def test_blake2b_hashing_for_processes_without_a_common_seed() -> None:
    keyed = SharedTable.create(1 << 16, hashing="blake2b")
    try:
        one, two = keyed.view("a"), keyed.view("b")
        assert one.take(b"x", 1.0, 1.0, 1.0 + SLACK) == 1.0
        assert one.take("x", 1.0, 1.0, 1.0 + SLACK) == 2.0  # str and bytes keys agree
        assert two.take("x", 1.0, 1.0, 1.0 + SLACK) == 1.0
        other = SharedTable.attach(keyed.spec())
        assert other.hashing == "blake2b"
        assert other.view("a").peek("x") == 2.0
    finally:
        keyed.close()


def test_a_lock_left_taken_by_a_dead_worker_is_recovered(
    table: SharedTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "LOCK_TIMEOUT", 0.01)
    assert table._lock.acquire(False)  # as if a worker died inside take()
    view = table.view("p")
    assert view.take("k", 1.0, 1.0, 1.0 + SLACK) == 1.0
    assert table.lock_timeouts == 1
    assert table._lock.acquire(False)  # the lock works again
    table._lock.release()
    assert view.take("k", 1.0, 1.0, 1.0 + SLACK) > 1.0 + SLACK
    assert table.lock_timeouts == 1


_HAMMER = """
import json, sys, time
from gateway.ratelimit.shared import SharedTable
spec, start, stop, interval, span_cmp = json.loads(sys.argv[1])
try:
    view = SharedTable.attach(spec).view("route\\x00limit0")
except ValueError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(3)
while time.monotonic() < start:
    pass
admitted = takes = 0
first = last = None
take = view.take
while True:
    now = time.monotonic()
    if now >= stop:
        break
    if first is None:
        first = now
    last = now
    takes += 1
    if take("10.0.0.1", now, interval, span_cmp) <= span_cmp:
        admitted += 1
print(json.dumps({"admitted": admitted, "takes": takes, "first": first, "last": last}))
"""


def _hammer(table: SharedTable, args: list[object], seed: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _HAMMER, json.dumps([table.spec(), *args])],
        cwd=ROOT,
        pass_fds=(table.fd,),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": seed},
    )


def test_two_processes_on_one_key_admit_exactly_burst_plus_rate_times_t(
    table: SharedTable,
) -> None:
    rate, burst, seconds = 2000, 100, 1.0
    interval = 1.0 / rate
    span_cmp = burst * interval + SLACK
    start = time.monotonic() + 1.0  # both have attached and wait; CLOCK_MONOTONIC is shared
    args: list[object] = [start, start + seconds, interval, span_cmp]
    workers = [_hammer(table, args, "4242") for _ in range(2)]
    results = []
    for worker in workers:
        out, _ = worker.communicate(timeout=30)
        assert worker.returncode == 0, out
        results.append(json.loads(out))
    assert all(r["takes"] > 10 * r["admitted"] for r in results), results  # both saturate
    admitted = sum(r["admitted"] for r in results)
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    # GCRA from a full bucket: the n-th request passes once n <= burst + (now - first) / T.
    expected = burst + int((last - first) / interval + 1e-6)
    # Never more (the safety property). A few fewer when a process is descheduled between
    # reading the clock and taking the bucket (it then takes with an older `now`): 0.5%.
    assert expected - max(1, expected // 200) <= admitted <= expected + 1, (
        admitted,
        expected,
        results,
    )
    assert table.lock_timeouts == 0
    # A process started without the workers' hash seed would put keys elsewhere: refused.
    stranger = _hammer(table, args, "7")
    out, _ = stranger.communicate(timeout=30)
    assert stranger.returncode == 3 and "PYTHONHASHSEED" in out


# --------------------------------------------------------------------------- composition


def test_bucket_stores_share_an_upstream_limit_between_routes(table: SharedTable) -> None:
    upstream = LimitSpec(1, 3600.0, 2, key="route", owner="upstream:app", name="upstream0")
    for shared_table in (None, table):
        stores = BucketStores(shared_table)
        a = RouteLimiter("a", [upstream], stores=stores)
        b = RouteLimiter("b", [LimitSpec(1, 3600.0, 5, key="route"), upstream], stores=stores)
        assert a.limits[0].local is b.limits[1].local
        assert isinstance(a.limits[0].local, LocalStore if shared_table is None else SharedBuckets)
        assert a.check_local(1.0, "1.1.1.1", False, [], b"").allowed
        assert b.check_local(1.0, "1.1.1.1", False, [], b"").allowed
        refused = a.check_local(1.0, "1.1.1.1", False, [], b"")
        assert not refused.allowed and refused.limit == "upstream0"
        assert a.limits[0].redis_prefix == b"gateway:upstream:app:upstream0:"
        # A reload keeps the buckets of unchanged limits.
        again = RouteLimiter("a", [upstream], stores=BucketStores(shared_table, [a, b]))
        assert not again.check_local(1.0, "1.1.1.1", False, [], b"").allowed
        table.view("upstream:app\x00upstream0\x003600.0\x007200.0").refund(b"", 3600.0 * 2)


CONFIG = """
rate_limit: {rate: 10/s, key: route}
upstreams:
  app:
    instances: [127.0.0.1:1, 127.0.0.1:2]
    rate_limit: [{rate: 5/s, key: route}, {rate: 100/min, name: per-client}]
    outlier: {consecutive_gateway_failures: 2, base_ejection_time: 30s, max_ejection_percent: 50}
  other: {instances: [127.0.0.1:3]}
routes:
  - {name: a, upstream: app, match: {path: {prefix: /a}}, rate_limit: {rate: 1/s}}
  - {name: b, upstream: app, match: {path: {prefix: /b}}}
  - {name: c, upstream: other}
"""


def test_snapshot_composes_route_upstream_and_global_limits() -> None:
    snapshot = build_snapshot(load_config_text(CONFIG, "t.yaml"))
    names = {route: [lim.name for lim in lim_.limits] for route, lim_ in snapshot.limiters.items()}
    assert names == {
        "a": ["limit0", "upstream0", "per-client", "global0"],
        "b": ["upstream0", "per-client", "global0"],
        "c": ["global0"],
    }
    a, b, c = (snapshot.limiters[name] for name in "abc")
    assert a.limits[1].local is b.limits[0].local
    assert a.limits[3].local is c.limits[0].local
    assert a.limits[0].owner == "a" and a.limits[3].owner == "global"
    again = build_snapshot(load_config_text(CONFIG, "t.yaml"), snapshot)
    assert again.limiters["c"].limits[0].local is c.limits[0].local


def test_limit_names_must_not_repeat_across_levels() -> None:
    from gateway.config import ConfigInvalid

    text = CONFIG.replace("name: per-client", "name: limit0")
    with pytest.raises(ConfigInvalid) as caught:
        load_config_text(text, "t.yaml")
    assert "route a: rate limit names repeat" in str(caught.value.errors[0])
    assert "limit0" in str(caught.value.errors[0])


def test_an_ejection_is_reported_and_applied_elsewhere() -> None:
    config = load_config_text(CONFIG, "t.yaml")
    seen: list[tuple[str, str, float]] = []
    set_ejection_listener(lambda *args: seen.append(args))
    try:
        origin = build_snapshot(config).upstreams["app"]
        bad = origin.instances[1]
        origin.record_outcome(bad, False, True)
        origin.record_outcome(bad, False, True)
    finally:
        set_ejection_listener(None)
    assert bad.ejected and [s[:2] for s in seen] == [("app", "127.0.0.1:2")]
    until = seen[0][2]
    now = time.monotonic()
    elsewhere = build_snapshot(config).upstreams["app"]
    assert elsewhere.apply_ejection("127.0.0.1:2", until, now)
    target = elsewhere.instances[1]
    assert target.ejected and not target.available
    assert not elsewhere.apply_ejection("127.0.0.1:2", until, now)  # its own broadcast: no-op
    assert origin.apply_ejection("127.0.0.1:2", until, now) is False
    # max_ejection_percent (50% of 2 = 1): a second instance is not ejected.
    assert not elsewhere.apply_ejection("127.0.0.1:1", until, now)
    assert elsewhere.instances[0].available
    info = elsewhere.outlier.info("127.0.0.1:2") if elsewhere.outlier else None
    assert info is not None and info.times_ejected == 1
    # Back in service when the time is up.
    elsewhere.tick(until + 0.001)
    assert not target.ejected and target.available
    assert not elsewhere.apply_ejection("127.0.0.1:2", now - 1.0, now)  # already over
