"""Least request: the power of two choices over in-flight requests, weight-aware.

Two distinct eligible instances are drawn at random and the one with the lower
``(active_requests + 1) / effective_weight`` wins (ties: the first drawn). Sampling two instead
of scanning all keeps a pick O(1), and Mitzenmacher's result says two choices already cut the
maximum load exponentially compared with one random choice. Dividing by the weight is how Envoy
makes least-request weight-aware; the ``+ 1`` makes an idle heavy instance beat an idle light
one. Slow start lowers the effective weight, so a ramping instance looks busier than it is.
"""

from __future__ import annotations

from collections.abc import Container

from gateway.balancing.base import Balancer, T


class LeastRequest(Balancer[T]):
    name = "least_request"
    __slots__ = ("_candidates",)

    def _build(self) -> None:
        instances = self._instances
        weights = self._weights
        self._candidates = [(instances[index], 1.0 / weights[index]) for index in self._eligible]

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        candidates = self._candidates
        count = len(candidates)
        if count >= 2:
            random = self._rng.random
            panic = self._panic
            pairs = count * (count - 1)
            for _ in range(4):  # a stale or excluded draw is rare; redraw a few times
                # One draw picks an ordered pair of distinct positions (exact for any count
                # far below 2**53).
                draw = int(random() * pairs)
                first = draw % count
                second = draw // count
                if second >= first:
                    second += 1
                a, a_inv = candidates[first]
                b, b_inv = candidates[second]
                a_ok = (a.available or panic) and a not in exclude
                b_ok = (b.available or panic) and b not in exclude
                if a_ok and b_ok:
                    if (b.active_requests + 1) * b_inv < (a.active_requests + 1) * a_inv:
                        return b
                    return a
                if a_ok:
                    return a
                if b_ok:
                    return b
        elif count == 1:
            instance = candidates[0][0]
            if (instance.available or self._panic) and instance not in exclude:
                return instance
        return self._fallback(exclude)
