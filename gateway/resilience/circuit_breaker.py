"""Circuit breaker: hard caps on an upstream's connections, pending requests and requests.

Envoy's circuit breaking is a set of counters, not a timed open/half-open state machine: past a
cap the gateway answers 503 at once instead of queueing work the upstream cannot absorb. Each
``try_*`` is O(1) and either takes a slot (paired with ``release_*``) or counts an overflow.
A cap of 0 means unlimited. ``max_connections`` is checked by the data plane against its pools'
open and connecting counts when it opens a connection (the pools hold the truth about
connections; a second counter here could drift from it).
"""

from __future__ import annotations


class CircuitBreaker:
    __slots__ = (
        "max_connections",
        "max_pending",
        "max_requests",
        "pending",
        "pending_overflow",
        "requests",
        "requests_overflow",
    )

    def __init__(
        self, max_connections: int = 1024, max_pending: int = 1024, max_requests: int = 1024
    ) -> None:
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_requests = max_requests
        self.pending = 0
        self.requests = 0
        self.pending_overflow = 0
        self.requests_overflow = 0

    def try_request(self) -> bool:
        """A request to the upstream starts (active until its response completes)."""
        if self.max_requests and self.requests >= self.max_requests:
            self.requests_overflow += 1
            return False
        self.requests += 1
        return True

    def release_request(self) -> None:
        if self.requests > 0:
            self.requests -= 1

    def try_pending(self) -> bool:
        """A request waits for a connection (none idle in the pool, new one not yet up)."""
        if self.max_pending and self.pending >= self.max_pending:
            self.pending_overflow += 1
            return False
        self.pending += 1
        return True

    def release_pending(self) -> None:
        if self.pending > 0:
            self.pending -= 1
