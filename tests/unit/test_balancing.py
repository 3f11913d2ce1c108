"""Round robin and smooth weighted round robin."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from gateway.balancing import (
    EdfWeightedRoundRobin,
    RoundRobin,
    SmoothWeightedRoundRobin,
    make_balancer,
)


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
    counts = Counter(balancer.pick().name for _ in range(cycle * 3))  # type: ignore[union-attr]
    assert counts == {str(i): w * 3 for i, w in enumerate(weights)}


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
