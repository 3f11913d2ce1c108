"""Weighted random choice in O(1) with Vose's alias method.

The alias table turns a weighted draw into one uniform index plus one biased coin: bucket ``i``
keeps itself with probability ``prob[i]`` and otherwise yields ``alias[i]``. Built in O(n) on
each refresh; slow start changes the effective weights, hence the table, on ``tick``.
"""

from __future__ import annotations

from collections.abc import Container

from gateway.balancing.base import Balancer, T


def build_alias(weights: list[float]) -> tuple[list[float], list[int]]:
    """Vose's alias tables for ``weights`` (positions 0..n-1)."""
    count = len(weights)
    if count == 0:
        return [], []
    total = sum(weights)
    scaled = [weight * count / total for weight in weights]
    prob = [1.0] * count
    alias = list(range(count))
    small = [index for index, value in enumerate(scaled) if value < 1.0]
    large = [index for index, value in enumerate(scaled) if value >= 1.0]
    while small and large:
        low = small.pop()
        high = large.pop()
        prob[low] = scaled[low]
        alias[low] = high
        scaled[high] = scaled[high] + scaled[low] - 1.0
        (small if scaled[high] < 1.0 else large).append(high)
    # Leftovers are 1.0 up to rounding: they keep themselves.
    return prob, alias


class WeightedRandom(Balancer[T]):
    name = "random"
    __slots__ = ("_alias", "_order", "_prob")

    def _build(self) -> None:
        eligible = self._eligible
        self._order = [self._instances[index] for index in eligible]
        self._prob, self._alias = build_alias([self._weights[index] for index in eligible])

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        order = self._order
        count = len(order)
        if count:
            random = self._rng.random
            prob = self._prob
            alias = self._alias
            for _ in range(4 if count > 1 else 1):
                draw = random() * count
                slot = int(draw)
                # The fractional part of the same draw is the coin: one RNG call per pick.
                instance = order[slot if draw - slot < prob[slot] else alias[slot]]
                if (instance.available or self._panic) and instance not in exclude:
                    return instance
        return self._fallback(exclude)
