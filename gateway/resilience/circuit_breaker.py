"""Circuit breaker: hard caps on an upstream's connections, pending requests and requests.

Envoy's circuit breaking is a set of counters, not a timed open/half-open state machine: past a
cap the gateway answers 503 at once instead of queueing work the upstream cannot absorb. Each
``try_*`` is O(1) and either takes a slot (paired with ``release_*``) or counts an overflow.
A cap of 0 means unlimited.
"""

from __future__ import annotations


class CircuitBreaker:
    __slots__ = (
        "connections",
        "connections_overflow",
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
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.connections_overflow = 0
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

    def try_connection(self) -> bool:
        """A new upstream connection is about to be opened (held until it closes)."""
        if self.max_connections and self.connections >= self.max_connections:
            self.connections_overflow += 1
            return False
        self.connections += 1
        return True

    def release_connection(self) -> None:
        if self.connections > 0:
            self.connections -= 1

    @property
    def overflow(self) -> dict[str, int]:
        """Overflow counts per kind, for ``gateway_circuit_breaker_overflow_total{kind}``."""
        return {
            "connections": self.connections_overflow,
            "pending": self.pending_overflow,
            "requests": self.requests_overflow,
        }

    @property
    def open(self) -> bool:
        """True while any cap is reached (the next ``try_*`` of that kind would fail)."""
        return bool(
            (self.max_requests and self.requests >= self.max_requests)
            or (self.max_pending and self.pending >= self.max_pending)
            or (self.max_connections and self.connections >= self.max_connections)
        )
