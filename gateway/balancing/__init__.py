"""Load balancers: pick one instance of an upstream per request.

Each balancer is a plain object with ``pick() -> Instance | None``; it holds no IO and no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar


class Weighted(Protocol):
    weight: int
    available: bool


T = TypeVar("T", bound=Weighted)


class RoundRobin(Generic[T]):
    """Cycles through the instances in order, skipping unavailable ones."""

    __slots__ = ("_instances", "_next")

    def __init__(self, instances: Sequence[T]) -> None:
        self._instances = tuple(instances)
        self._next = 0

    def pick(self) -> T | None:
        instances = self._instances
        count = len(instances)
        for _ in range(count):
            index = self._next
            self._next = index + 1 if index + 1 < count else 0
            instance = instances[index]
            if instance.available:
                return instance
        return None


class SmoothWeightedRoundRobin(Generic[T]):
    """nginx's smooth weighted round robin: weight 2:1 gives a, b, a, a, b, a... interleaved.

    Every pick adds each instance's weight to its running score and takes the highest score,
    which then pays back the total weight. O(instances) per pick; fine for the instance counts of
    static config (an EDF scheduler replaces it when large discovered sets arrive).
    """

    __slots__ = ("_instances", "_scores", "_weights")

    def __init__(self, instances: Sequence[T]) -> None:
        self._instances = tuple(instances)
        self._weights = [max(1, instance.weight) for instance in self._instances]
        self._scores = [0] * len(self._instances)

    def pick(self) -> T | None:
        best = -1
        best_score = 0
        total = 0
        scores = self._scores
        for index, instance in enumerate(self._instances):
            if not instance.available:
                continue
            weight = self._weights[index]
            total += weight
            score = scores[index] + weight
            scores[index] = score
            if best < 0 or score > best_score:
                best = index
                best_score = score
        if best < 0:
            return None
        scores[best] -= total
        return self._instances[best]


def make_balancer(name: str, instances: Sequence[T]) -> RoundRobin[T] | SmoothWeightedRoundRobin[T]:
    if name == "round_robin":
        return RoundRobin(instances)
    if name == "weighted_round_robin":
        return SmoothWeightedRoundRobin(instances)
    raise ValueError(f"unknown balancer {name!r}")
