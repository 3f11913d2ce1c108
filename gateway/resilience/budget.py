"""Retry budget: retries in flight may not exceed a share of the active requests.

When an upstream fails wholesale, per-request retry limits still multiply its load by the number
of attempts. A budget (Envoy's ``retry_budget``, Finagle's ``RetryBudget``) caps retries in
flight at ``max(min_retry_concurrency, budget_percent% of active requests)``, so a dying upstream
sees at most that much extra traffic while a healthy one with rare failures retries freely.
"""

from __future__ import annotations


class RetryBudget:
    __slots__ = (
        "_ratio",
        "allowed",
        "budget_percent",
        "in_flight",
        "min_retry_concurrency",
        "overflow",
    )

    def __init__(self, budget_percent: float = 20.0, min_retry_concurrency: int = 3) -> None:
        if budget_percent < 0 or min_retry_concurrency < 0:
            raise ValueError("budget_percent and min_retry_concurrency must not be negative")
        self.budget_percent = budget_percent
        self.min_retry_concurrency = min_retry_concurrency
        self._ratio = budget_percent / 100.0
        self.in_flight = 0
        self.allowed = 0  # retries granted, ever (metrics)
        self.overflow = 0  # retries refused by the budget, ever (metrics)

    def limit(self, active_requests: int) -> int:
        """Retries allowed in flight with ``active_requests`` requests active on the upstream."""
        share = int(active_requests * self._ratio)
        return share if share > self.min_retry_concurrency else self.min_retry_concurrency

    def try_acquire(self, active_requests: int) -> bool:
        """Take a retry slot; the caller must :meth:`release` it when that retry attempt ends."""
        share = int(active_requests * self._ratio)
        limit = share if share > self.min_retry_concurrency else self.min_retry_concurrency
        if self.in_flight < limit:
            self.in_flight += 1
            self.allowed += 1
            return True
        self.overflow += 1
        return False

    def release(self) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1
