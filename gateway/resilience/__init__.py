"""Resilience cores: retry decisions, backoff, retry budget, circuit breaker. Pure and O(1)."""

from __future__ import annotations

from gateway.resilience.backoff import Backoff, full_jitter_backoff, parse_retry_after
from gateway.resilience.budget import RetryBudget
from gateway.resilience.circuit_breaker import CircuitBreaker
from gateway.resilience.retry import (
    CONNECT_FAILURE,
    RESET,
    STATUS,
    TIMEOUT,
    RetryPolicy,
    is_gateway_failure,
)

__all__ = [
    "CONNECT_FAILURE",
    "RESET",
    "STATUS",
    "TIMEOUT",
    "Backoff",
    "CircuitBreaker",
    "RetryBudget",
    "RetryPolicy",
    "full_jitter_backoff",
    "is_gateway_failure",
    "parse_retry_after",
]
