"""Round robin (unweighted) and nginx's smooth weighted round robin."""

from __future__ import annotations

from collections.abc import Container

from gateway.balancing.base import Balancer, T
from gateway.health.panic import panic_usable


class RoundRobin(Balancer[T]):
    """Cycles through the eligible instances in order. O(1) per pick; weights are ignored
    (so slow start does not apply: use ``weighted_round_robin`` for that)."""

    name = "round_robin"
    weighted = False
    __slots__ = ("_next", "_order")

    def _build(self) -> None:
        instances = self._instances
        self._order = [instances[index] for index in self._eligible]
        if not hasattr(self, "_next"):
            self._next = 0

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        order = self._order
        count = len(order)
        if count:
            index = self._next
            if index >= count:
                index = 0
            self._next = index + 1
            instance = order[index]
            if (instance.available or self._panic) and instance not in exclude:
                return instance
            # Rare: stale set or excluded; continue the rotation for a few steps.
            for _ in range(min(count - 1, 8)):
                index = self._next
                if index >= count:
                    index = 0
                self._next = index + 1
                instance = order[index]
                if (instance.available or self._panic) and instance not in exclude:
                    return instance
        return self._fallback(exclude)


class SmoothWeightedRoundRobin(Balancer[T]):
    """nginx's smooth weighted round robin: weight 5:1:1 gives a a b a c a a.

    Every pick adds each instance's weight to its running score and takes the highest score,
    which then pays back the total weight. O(instances) per pick, so ``weighted_round_robin``
    uses :class:`~gateway.balancing.edf.EdfWeightedRoundRobin` instead; this class stays for
    small static sets and for comparison. It reads ``.available`` on every pick.
    """

    name = "smooth_weighted_round_robin"
    __slots__ = ("_scores",)

    def _build(self) -> None:
        self._scores = [0.0] * len(self._instances)

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        best = -1
        best_score = 0.0
        total = 0.0
        scores = self._scores
        weights = self._weights
        panic = self._panic
        for index, instance in enumerate(self._instances):
            if not (instance.available or (panic and panic_usable(instance))) or (
                instance in exclude
            ):
                continue
            weight = weights[index]
            total += weight
            score = scores[index] + weight
            scores[index] = score
            if best < 0 or score > best_score:
                best = index
                best_score = score
        if best < 0:
            return self._fallback(exclude)
        scores[best] -= total
        return self._instances[best]
