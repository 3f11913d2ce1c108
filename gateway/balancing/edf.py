"""Weighted round robin as an earliest-deadline-first scheduler (Envoy's EDF).

Each eligible instance ``i`` has deadlines ``(n_i + 1/2) / w_i`` where ``n_i`` counts its picks
since the last rebuild; the next pick is the earliest deadline. Over each full cycle (the sum of
the weights) the shares are exact, at any point in between every instance stays within two picks
of its ideal share, and the half offset interleaves the sequence (weights 5:1:1 give
a a a b c a a rather than a a a a a b c). Ties go to the heavier instance, then the earlier one.

Two ways to run that schedule, both giving the same sequence:

- integer weights whose cycle fits ``max_schedule`` picks (the usual case): the whole cycle is
  computed at rebuild time and a pick is one list index, O(1);
- otherwise (slow start makes weights fractional, or huge weights): a heap of deadlines, O(log n).

Deadlines are recomputed from the integer count with one division each time instead of being
accumulated, so equal rational deadlines compare equal and shares over a full cycle are exact.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence
from heapq import heapify, heapreplace

from gateway.balancing.base import Balancer, T
from gateway.balancing.slow_start import SlowStart


def edf_cycle(weights: Sequence[int]) -> list[int]:
    """One full EDF cycle over integer ``weights``: positions, ``sum(weights)`` long."""
    heap = [(0.5 / weight, -weight, index) for index, weight in enumerate(weights)]
    heapify(heap)
    counts = [0] * len(weights)
    order: list[int] = []
    for _ in range(sum(weights)):
        _, negative_weight, index = heap[0]
        order.append(index)
        count = counts[index] + 1
        counts[index] = count
        heapreplace(heap, ((count + 0.5) / -negative_weight, negative_weight, index))
    return order


class EdfWeightedRoundRobin(Balancer[T]):
    name = "weighted_round_robin"
    __slots__ = ("_counts", "_cursor", "_heap", "_max_schedule", "_schedule")

    def __init__(
        self,
        instances: Sequence[T] = (),
        *,
        max_schedule: int = 1 << 16,
        panic_threshold: float = 0.0,
        slow_start: SlowStart | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        self._max_schedule = max_schedule
        self._cursor = 0
        super().__init__(
            instances, panic_threshold=panic_threshold, slow_start=slow_start, rng=rng, now=now
        )

    def _build(self) -> None:
        weights = self._weights
        eligible = self._eligible
        self._counts = [0] * len(self._instances)
        chosen = [weights[index] for index in eligible]
        if all(weight.is_integer() for weight in chosen) and sum(chosen) <= self._max_schedule:
            instances = self._instances
            cycle = edf_cycle([int(weight) for weight in chosen])
            self._schedule = [instances[eligible[position]] for position in cycle]
            self._heap = []
            if self._cursor >= len(self._schedule):
                self._cursor = 0
            return
        self._schedule = []
        # The schedule restarts on every rebuild: deadlines are relative to the rebuild.
        heap = [(0.5 / weights[index], -weights[index], index) for index in eligible]
        heapify(heap)
        self._heap = heap

    def _next(self) -> T:
        schedule = self._schedule
        if schedule:
            cursor = self._cursor
            if cursor >= len(schedule):
                cursor = 0
            self._cursor = cursor + 1
            return schedule[cursor]
        heap = self._heap
        _, negative_weight, index = heap[0]
        count = self._counts[index] + 1
        self._counts[index] = count
        heapreplace(heap, ((count + 0.5) / -negative_weight, negative_weight, index))
        return self._instances[index]

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        schedule = self._schedule
        if schedule:
            # The common case inlined: one index into the precomputed cycle.
            cursor = self._cursor
            if cursor >= len(schedule):
                cursor = 0
            self._cursor = cursor + 1
            instance = schedule[cursor]
            if (instance.available or self._panic) and instance not in exclude:
                return instance
            size = len(schedule)
        elif self._heap:
            instance = self._next()
            if (instance.available or self._panic) and instance not in exclude:
                return instance
            size = len(self._heap)
        else:
            return self._fallback(exclude)
        # An excluded or stale instance loses this turn (retries are rare; shares barely move).
        for _ in range(min(size - 1, 8)):
            instance = self._next()
            if (instance.available or self._panic) and instance not in exclude:
                return instance
        return self._fallback(exclude)
