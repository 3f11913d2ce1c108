"""Balancers: shares, exclusion, availability, panic mode, slow start, P2C and peak EWMA; the
exact sequences of round robin and smooth weighted round robin."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.balancing import (
    BALANCERS,
    EdfWeightedRoundRobin,
    LeastRequest,
    PeakEwma,
    RoundRobin,
    SlowStart,
    SmoothWeightedRoundRobin,
    WeightedRandom,
    make_balancer,
)
from gateway.balancing.weighted_random import build_alias
from gateway.health.panic import in_panic


@dataclass(eq=False)
class Inst:
    address: str
    weight: int = 1
    available: bool = True
    active_requests: int = 0


def fleet(count: int, weights: list[int] | None = None) -> list[Inst]:
    return [Inst(f"10.0.0.{i}:80", weights[i] if weights else 1) for i in range(count)]


def counts(balancer: object, picks: int, key: bytes | None = None) -> Counter[str]:
    result: Counter[str] = Counter()
    for _ in range(picks):
        chosen = balancer.pick(key)  # type: ignore[attr-defined]
        result[chosen.address if chosen else None] += 1
    return result


ALL_NAMES = sorted(BALANCERS)


# -- common contract ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
def test_empty_and_all_unavailable_give_none(name: str) -> None:
    assert make_balancer(name, []).pick() is None
    instances = fleet(3)
    for instance in instances:
        instance.available = False
    balancer = make_balancer(name, instances, rng=random.Random(1))
    assert balancer.pick() is None
    assert balancer.pick(b"key") is None


@pytest.mark.parametrize("name", ALL_NAMES)
def test_unavailable_instances_are_skipped_even_before_refresh(name: str) -> None:
    instances = fleet(5)
    balancer = make_balancer(name, instances, rng=random.Random(2))
    instances[1].available = False
    instances[3].available = False
    # Not refreshed yet: the check on every pick still keeps them out.
    for number in range(300):
        chosen = balancer.pick(b"k%d" % number)
        assert chosen is not None and chosen.available
    balancer.refresh(1.0)
    seen = {balancer.pick(b"k%d" % number).address for number in range(300)}  # type: ignore[union-attr]
    assert seen == {instances[i].address for i in (0, 2, 4)}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_exclude_avoids_the_instance_when_another_exists(name: str) -> None:
    instances = fleet(4)
    balancer = make_balancer(name, instances, rng=random.Random(3))
    for number in range(200):
        key = b"user-%d" % number
        first = balancer.pick(key)
        retry = balancer.pick(key, exclude=(first,))
        assert retry is not None and retry is not first
    # Only one available: the excluded one is still better than nothing.
    for instance in instances[1:]:
        instance.available = False
    balancer.refresh()
    assert balancer.pick(b"x", exclude=(instances[0],)) is instances[0]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_rebuild_replaces_the_set(name: str) -> None:
    instances = fleet(3)
    balancer = make_balancer(name, instances, rng=random.Random(4))
    replacement = fleet(5)[3:]
    balancer.rebuild(replacement, now=10.0)
    seen = {balancer.pick(b"k%d" % n).address for n in range(200)}  # type: ignore[union-attr]
    assert seen <= {instance.address for instance in replacement}
    assert balancer.instances == tuple(replacement)


def test_make_balancer_knows_every_name_and_rejects_others() -> None:
    for name in ALL_NAMES:
        assert make_balancer(name, fleet(2)).name in (name, "smooth_weighted_round_robin")
    assert isinstance(make_balancer("weighted_round_robin", []), EdfWeightedRoundRobin)
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("nope", [])


# -- round robin --------------------------------------------------------------------------------
def test_round_robin_order_and_compat_signature() -> None:
    instances = fleet(3)
    balancer = RoundRobin(instances)
    assert [balancer.pick() for _ in range(6)] == instances * 2


# -- EDF weighted round robin -------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights", [(1, 1), (2, 1), (5, 1, 1), (3, 7, 10), (1, 100), (10, 20, 30, 40)]
)
def test_edf_exact_shares_over_a_cycle(weights: tuple[int, ...]) -> None:
    instances = fleet(len(weights), list(weights))
    balancer = EdfWeightedRoundRobin(instances)
    cycle = sum(weights)
    got = counts(balancer, cycle * 4)
    assert got == {instance.address: w * 4 for instance, w in zip(instances, weights, strict=True)}


def test_edf_interleaves() -> None:
    a, b, c = fleet(3, [5, 1, 1])
    balancer = EdfWeightedRoundRobin([a, b, c])
    sequence = [balancer.pick() for _ in range(7)]
    # The two light instances sit inside the cycle, not bunched at its end.
    assert sequence.index(b) < 5 and sequence.index(c) < 6
    assert sequence[-1] is a


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=12))
def test_edf_within_one_percent_over_10000_picks(weights: list[int]) -> None:
    instances = fleet(len(weights), weights)
    balancer = EdfWeightedRoundRobin(instances)
    got = counts(balancer, 10_000)
    total = sum(weights)
    for instance, weight in zip(instances, weights, strict=True):
        expected = 10_000 * weight / total
        assert abs(got[instance.address] - expected) <= 0.01 * 10_000 / len(weights) + 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8))
def test_edf_every_prefix_stays_close_to_the_ideal_share(weights: list[int]) -> None:
    # Smoothness: after every prefix of picks, each instance is within 2 picks of its ideal share.
    instances = fleet(len(weights), weights)
    balancer = EdfWeightedRoundRobin(instances)
    total = sum(weights)
    got = [0] * len(instances)
    index_of = {id(instance): i for i, instance in enumerate(instances)}
    for step in range(1, 3 * total + 1):
        got[index_of[id(balancer.pick())]] += 1
        for i, weight in enumerate(weights):
            assert abs(got[i] - step * weight / total) < 2.0


def test_smooth_weighted_round_robin_still_available() -> None:
    a, b, c = fleet(3, [5, 1, 1])
    balancer = SmoothWeightedRoundRobin([a, b, c])
    assert [balancer.pick() for _ in range(7)] == [a, a, b, a, c, a, a]


# -- weighted random ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=100.0), min_size=1, max_size=30))
def test_alias_table_reproduces_the_weights_exactly(weights: list[float]) -> None:
    prob, alias = build_alias(weights)
    count = len(weights)
    mass = [0.0] * count
    for slot in range(count):
        mass[slot] += prob[slot] / count
        mass[alias[slot]] += (1.0 - prob[slot]) / count
    total = sum(weights)
    for i, weight in enumerate(weights):
        assert mass[i] == pytest.approx(weight / total, abs=1e-9)


def test_weighted_random_distribution() -> None:
    instances = fleet(3, [1, 2, 7])
    balancer = WeightedRandom(instances, rng=random.Random(5))
    got = counts(balancer, 50_000)
    for instance, share in zip(instances, (0.1, 0.2, 0.7), strict=True):
        assert got[instance.address] / 50_000 == pytest.approx(share, abs=0.015)


# -- least request ------------------------------------------------------------------------------
def test_least_request_prefers_the_less_loaded() -> None:
    instances = fleet(4)
    instances[0].active_requests = 50
    balancer = LeastRequest(instances, rng=random.Random(6))
    got = counts(balancer, 4000)
    # P2C: the busy one only wins when drawn... never, since the other draw is always idler.
    assert got[instances[0].address] == 0
    assert all(got[instance.address] > 1000 for instance in instances[1:])


def test_least_request_balances_in_flight_load() -> None:
    # Simulate requests that stay in flight: P2C keeps the in-flight counts close.
    instances = fleet(10)
    balancer = LeastRequest(instances, rng=random.Random(7))
    for _ in range(1000):
        balancer.pick().active_requests += 1  # type: ignore[union-attr]
    loads = [instance.active_requests for instance in instances]
    assert max(loads) - min(loads) <= 3


def test_least_request_is_weight_aware() -> None:
    heavy, light = Inst("h:1", weight=3), Inst("l:1", weight=1)
    balancer = LeastRequest([heavy, light], rng=random.Random(8))
    for _ in range(400):
        balancer.pick().active_requests += 1  # type: ignore[union-attr]
    assert heavy.active_requests / light.active_requests == pytest.approx(3.0, rel=0.05)


# -- peak EWMA ----------------------------------------------------------------------------------
def run_peak_ewma(
    balancer: PeakEwma[Inst], latency_of: dict[str, float], start: float, rounds: int
) -> tuple[Counter[str], float]:
    """Closed loop: each round picks one instance and observes its latency; time advances by a
    fixed 10 ms per request (a steady request rate)."""
    now = start
    got: Counter[str] = Counter()
    for _ in range(rounds):
        chosen = balancer.pick()
        assert chosen is not None
        got[chosen.address] += 1
        now += 0.01
        balancer.observe(chosen, latency_of[chosen.address], now)
    return got, now


def test_peak_ewma_sends_less_to_a_slow_instance_and_recovers() -> None:
    instances = fleet(3)
    balancer = PeakEwma(instances, decay=2.0, rng=random.Random(9))
    fast = {instance.address: 0.010 for instance in instances}
    slow = dict(fast)
    slow[instances[0].address] = 0.500
    got, now = run_peak_ewma(balancer, fast, 0.0, 600)
    assert min(got.values()) > 120  # roughly even when all are equal
    got, now = run_peak_ewma(balancer, slow, now, 1500)
    assert got[instances[0].address] < 0.05 * 1500
    # The slow spell ends: decay lets it be probed again, fast samples bring it back.
    got, now = run_peak_ewma(balancer, fast, now, 3000)
    late, _ = run_peak_ewma(balancer, fast, now, 1500)
    assert late[instances[0].address] > 0.2 * 1500


def test_peak_ewma_stale_cost_decays_and_new_instances_are_probed() -> None:
    a, b = fleet(2)
    balancer = PeakEwma([a, b], decay=1.0, rng=random.Random(10))
    balancer.observe(a, 2.0, 1.0)
    balancer.observe(b, 0.01, 1.0)
    assert balancer.cost(a) > balancer.cost(b)
    balancer.tick(30.0)  # 29 s without samples: a's estimate decayed toward zero
    assert balancer.latency(a) < 1e-6
    balancer.observe(b, 0.01, 30.0)  # b keeps answering; a got nothing since its slow reply
    assert balancer.pick() is a  # the stale instance is probed again
    # A never-sampled instance: free while idle, penalised while its first request is out.
    fresh = Inst("10.9.9.9:80")
    balancer.rebuild([a, b, fresh], now=31.0)
    assert balancer.cost(fresh) == 0.0
    fresh.active_requests = 1
    assert balancer.cost(fresh) > balancer.cost(b)


def test_peak_ewma_peak_rule_and_smoothing() -> None:
    (a,) = fleet(1)
    balancer = PeakEwma([a], decay=10.0)
    balancer.observe(a, 0.1, 0.0)
    balancer.observe(a, 0.9, 0.0)
    assert balancer.latency(a) == pytest.approx(0.9)  # a peak replaces at once
    balancer.observe(a, 0.1, 0.0)
    assert 0.1 < balancer.latency(a) < 0.9  # an improvement moves it part of the way


# -- panic --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("available", "total", "threshold", "panic"),
    [
        (5, 10, 0.5, False),
        (4, 10, 0.5, True),
        (1, 3, 0.5, True),
        (0, 3, 0.5, False),  # none left: 503, not panic
        (1, 3, 0.0, False),  # disabled
        (3, 3, 1.0, False),
    ],
)
def test_in_panic(available: int, total: int, threshold: float, panic: bool) -> None:
    assert in_panic(available, total, threshold) is panic


@pytest.mark.parametrize("name", ["round_robin", "weighted_round_robin", "least_request", "random"])
def test_panic_spreads_over_all_instances(name: str) -> None:
    instances = fleet(4)
    for instance in instances[1:]:
        instance.available = False
    balancer = make_balancer(name, instances, panic_threshold=0.5, rng=random.Random(11))
    assert balancer.panic
    assert {balancer.pick().address for _ in range(400)} == {  # type: ignore[union-attr]
        instance.address for instance in instances
    }
    for instance in instances:
        instance.available = True
    balancer.refresh()
    assert not balancer.panic


# -- slow start ---------------------------------------------------------------------------------
def test_slow_start_factor() -> None:
    ramp = SlowStart(window=10.0)
    assert ramp.factor(0.0) == pytest.approx(0.1)
    assert ramp.factor(5.0) == pytest.approx(0.5)
    assert ramp.factor(10.0) == 1.0
    assert SlowStart(window=10.0, aggression=2.0).factor(2.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        SlowStart(window=0)


@pytest.mark.parametrize("name", ["weighted_round_robin", "random", "least_request"])
def test_slow_start_ramps_a_recovered_instance(name: str) -> None:
    instances = fleet(2)
    balancer = make_balancer(
        name, instances, slow_start=SlowStart(window=10.0), rng=random.Random(12), now=0.0
    )
    assert not balancer.in_slow_start(instances[0])  # the initial set does not ramp
    instances[1].available = False
    balancer.refresh(100.0)
    instances[1].available = True
    balancer.refresh(200.0)
    assert balancer.in_slow_start(instances[1])
    assert balancer.effective_weight(instances[1]) == pytest.approx(0.1)
    balancer.tick(205.0)
    assert balancer.effective_weight(instances[1]) == pytest.approx(0.5)

    def share() -> float:
        got = Counter()
        for _ in range(3000):
            chosen = balancer.pick()
            got[chosen.address] += 1  # type: ignore[union-attr]
            if name == "least_request":
                chosen.active_requests += 1  # type: ignore[union-attr]
        for instance in instances:
            instance.active_requests = 0
        return got[instances[1].address] / 3000

    assert share() == pytest.approx(0.5 / 1.5, abs=0.04)
    balancer.tick(210.0)
    assert not balancer.in_slow_start(instances[1])
    assert share() == pytest.approx(0.5, abs=0.04)


def test_slow_start_for_new_instances_on_rebuild_and_not_for_unweighted() -> None:
    instances = fleet(2)
    balancer = make_balancer("weighted_round_robin", instances, slow_start=SlowStart(10.0))
    newcomer = Inst("10.0.0.9:80")
    balancer.rebuild([*instances, newcomer], now=50.0)
    assert balancer.in_slow_start(newcomer)
    assert not balancer.in_slow_start(instances[0])
    rr = make_balancer("round_robin", instances, slow_start=SlowStart(10.0))
    rr.rebuild([*instances, newcomer], now=50.0)
    assert not rr.in_slow_start(newcomer)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=10))
def test_edf_heap_and_precomputed_cycle_agree(weights: list[int]) -> None:
    instances = fleet(len(weights), weights)
    cycle = EdfWeightedRoundRobin(instances)
    heap = EdfWeightedRoundRobin(instances, max_schedule=0)  # forces the O(log n) heap
    picks = 2 * sum(weights) + 3
    assert [cycle.pick() for _ in range(picks)] == [heap.pick() for _ in range(picks)]


# -- panic ignores health checks, not real failures (gateway.health.panic) ----------------------
@dataclass(eq=False)
class Ejectable(Inst):
    ejected: bool = False


@pytest.mark.parametrize("name", ALL_NAMES)
def test_panic_never_returns_to_ejected_instances(name: str) -> None:
    # One of three works; one was ejected by outlier detection (real traffic failed on it), one
    # fails its active health check only. 1/3 < 50%: panic, which may use the health-check
    # failure but never the ejected one.
    working, ejected, unhealthy = (Ejectable(f"10.0.1.{i}:80") for i in range(3))
    ejected.available, ejected.ejected = False, True
    unhealthy.available = False
    balancer = make_balancer(
        name, [working, ejected, unhealthy], panic_threshold=0.5, rng=random.Random(5)
    )
    assert balancer.panic
    picked = {balancer.pick(b"key%d" % i).address for i in range(300)}  # type: ignore[union-attr]
    assert picked == {working.address, unhealthy.address}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_panic_with_every_other_instance_ejected_uses_the_working_one(name: str) -> None:
    working, dead, frozen = (Ejectable(f"10.0.2.{i}:80") for i in range(3))
    for instance in (dead, frozen):
        instance.available, instance.ejected = False, True
    balancer = make_balancer(name, [working, dead, frozen], panic_threshold=0.5)
    assert balancer.panic
    assert all(balancer.pick(b"k%d" % i) is working for i in range(200))


# -- exclusion of every instance already tried --------------------------------------------------
@pytest.mark.parametrize("name", ALL_NAMES)
def test_pick_avoids_every_excluded_instance(name: str) -> None:
    instances = fleet(4)
    balancer = make_balancer(name, instances, rng=random.Random(3))
    tried = (instances[0], instances[2])
    for i in range(300):
        chosen = balancer.pick(b"req%d" % i, tried)
        assert chosen is not None and chosen not in tried


@pytest.mark.parametrize("name", ALL_NAMES)
def test_pick_falls_back_to_a_tried_instance_only_when_none_is_left(name: str) -> None:
    instances = fleet(3)
    instances[2].available = False
    balancer = make_balancer(name, instances, rng=random.Random(4))
    tried = (instances[0], instances[1])
    chosen = balancer.pick(b"x", tried)
    assert chosen in tried  # the only available ones; never the unavailable instance


# -- round robin and smooth weighted round robin: exact sequences ----------------------------
@dataclass
class FakeInstance:
    name: str
    weight: int = 1
    available: bool = True


def test_round_robin_cycles_in_order() -> None:
    a, b, c = FakeInstance("a"), FakeInstance("b"), FakeInstance("c")
    balancer = RoundRobin([a, b, c])
    assert [balancer.pick().name for _ in range(7)] == list("abcabca")  # type: ignore[union-attr]


def test_round_robin_skips_unavailable_and_returns_none_when_all_are() -> None:
    a, b = FakeInstance("a"), FakeInstance("b", available=False)
    balancer = RoundRobin([a, b])
    assert {balancer.pick().name for _ in range(4)} == {"a"}  # type: ignore[union-attr]
    a.available = False
    assert balancer.pick() is None
    assert RoundRobin([]).pick() is None


def test_smooth_weighted_interleaves() -> None:
    # nginx's smooth WRR: weights 5,1,1 give a a b a c a a, not a a a a a b c.
    a, b, c = FakeInstance("a", 5), FakeInstance("b", 1), FakeInstance("c", 1)
    balancer = SmoothWeightedRoundRobin([a, b, c])
    assert "".join(balancer.pick().name for _ in range(7)) == "aabacaa"  # type: ignore[union-attr]


@pytest.mark.parametrize("weights", [(1, 1), (2, 1), (3, 7, 10), (1, 100)])
def test_smooth_weighted_exact_shares_over_a_cycle(weights: tuple[int, ...]) -> None:
    instances = [FakeInstance(str(i), w) for i, w in enumerate(weights)]
    balancer = SmoothWeightedRoundRobin(instances)
    cycle = sum(weights)
    shares = Counter(balancer.pick().name for _ in range(cycle * 3))  # type: ignore[union-attr]
    assert shares == {str(i): w * 3 for i, w in enumerate(weights)}


def test_smooth_weighted_ignores_unavailable() -> None:
    a, b = FakeInstance("a", 3), FakeInstance("b", 1, available=False)
    balancer = SmoothWeightedRoundRobin([a, b])
    assert {balancer.pick().name for _ in range(5)} == {"a"}  # type: ignore[union-attr]
    a.available = False
    assert balancer.pick() is None


def test_make_balancer_names() -> None:
    assert isinstance(make_balancer("round_robin", []), RoundRobin)
    assert isinstance(make_balancer("weighted_round_robin", []), EdfWeightedRoundRobin)
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("nope", [])
