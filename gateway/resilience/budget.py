"""Retry budget: a token bucket filled by requests, so retries stay a share of the traffic.

Model (Finagle's ``RetryBudget``): every request an upstream receives deposits
``budget_percent / 100`` of a token; every retry (or hedge) withdraws one. Deposits expire after
``ttl`` seconds, and a reserve of ``min_retries_per_second * ttl`` tokens lets a quiet upstream
retry at all. So when a retry is granted, the retries of the last ``ttl`` seconds (it included)
satisfy

    retries ≤ budget_percent% * requests + min_retries_per_second * ttl

over the requests of the same seconds, and over long periods retries stay within
``budget_percent``% of the requests plus ``min_retries_per_second`` per second.

- A correlated burst passes: when one instance of three dies with 64 requests in flight, those 64
  retries are paid from what the last ``ttl`` seconds of traffic deposited (at 1,000 requests/s
  and 20%, 2,000 tokens), where a cap on *concurrent* retries (Envoy's ``retry_budget``, this
  module's previous model) refused most of them.
- A storm does not: when every instance answers 503, retries add at most ``budget_percent``%
  to the upstream's load, plus the minimum rate.

Counting is O(1): ``record_request`` increments an int; the window advances in one-second slots,
from ``tick`` (once a second) and lazily in ``try_acquire``. No clock of its own: time is passed in.
"""

from __future__ import annotations

from collections import deque


class RetryBudget:
    __slots__ = (
        "_ratio",
        "_reserve",
        "_second",
        "_slots",
        "_window_requests",
        "_window_retries",
        "allowed",
        "budget_percent",
        "min_retries_per_second",
        "overflow",
        "requests_now",
        "retries_now",
        "ttl",
    )

    def __init__(
        self,
        budget_percent: float = 20.0,
        min_retries_per_second: float = 10.0,
        ttl: float = 10.0,
        now: float = 0.0,
    ) -> None:
        if budget_percent < 0 or min_retries_per_second < 0:
            raise ValueError("budget_percent and min_retries_per_second must not be negative")
        if ttl < 1.0:
            raise ValueError("ttl must be at least one second")
        self.budget_percent = budget_percent
        self.min_retries_per_second = min_retries_per_second
        self.ttl = ttl
        self._ratio = budget_percent / 100.0
        self._reserve = min_retries_per_second * ttl
        # Closed one-second slots of the window, oldest first: (requests, retries).
        self._slots: deque[tuple[int, int]] = deque(maxlen=int(ttl) - 1)
        self._window_requests = 0  # sums over ``_slots``
        self._window_retries = 0
        self._second = int(now)  # the second ``requests_now`` and ``retries_now`` belong to
        self.requests_now = 0
        self.retries_now = 0
        self.allowed = 0  # retries granted, ever (metrics)
        self.overflow = 0  # retries refused by the budget, ever (metrics)

    def record_request(self) -> None:
        """One request reached the upstream's balancer: deposit its share."""
        self.requests_now += 1

    def balance(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._advance(now)
        earned = (self._window_requests + self.requests_now) * self._ratio
        return earned + self._reserve - self._window_retries - self.retries_now

    def try_acquire(self, now: float) -> bool:
        """Withdraw one token for a retry or a hedge; False (counted) when the budget is spent."""
        if self.balance(now) >= 1.0:
            self.retries_now += 1
            self.allowed += 1
            return True
        self.overflow += 1
        return False

    def tick(self, now: float) -> None:
        """Close the current slot when its second is over (call about once a second)."""
        self._advance(now)

    def _advance(self, now: float) -> None:
        second = int(now)
        if second <= self._second:
            return
        slots = self._slots
        capacity = slots.maxlen or 0
        closed = [(self.requests_now, self.retries_now)]
        # Seconds with no traffic at all between the last slot and now.
        closed += [(0, 0)] * min(second - self._second - 1, capacity)
        for requests, retries in closed:
            if capacity and len(slots) == capacity:
                old_requests, old_retries = slots[0]
                self._window_requests -= old_requests
                self._window_retries -= old_retries
            if capacity:
                slots.append((requests, retries))
                self._window_requests += requests
                self._window_retries += retries
        self._second = second
        self.requests_now = 0
        self.retries_now = 0
