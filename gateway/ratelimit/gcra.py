"""GCRA (generic cell rate algorithm): a token bucket kept as one number per key.

A limit of ``count`` per ``period`` with a ``burst`` has an emission interval ``T = period /
count`` and admits ``burst`` requests at once from an idle bucket, then one every ``T``. Over a
time ``t`` of saturated load that is ``burst + t / T`` admitted requests.

The state of a key is its theoretical arrival time (TAT): the time at which the bucket would be
full again. A request at ``now`` moves it to ``new = max(tat, now) + T`` and is allowed when
``x = new - now <= burst * T`` (the "span"). Everything callers need derives from ``x``:

- remaining (requests that would pass right now, after this one): ``floor((span - x) / T)``
- reset (seconds until the bucket is full again): ``x``
- retry_after (when denied, seconds until one request passes): ``x - span``

Pure arithmetic, no clock of its own: ``now`` is passed in (seconds, any monotonic origin).
Float error is absorbed by a tiny slack so that ``burst`` exact back-to-back requests at the
same instant all pass (0.1 * 5 summed is 0.5000000000000001).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SLACK", "Gcra", "GcraResult", "retry_after_seconds"]

SLACK = 1e-9  # seconds; far below any real interval, above float noise for monotonic clocks


def retry_after_seconds(wait: float) -> int:
    """Retry-After as delay-seconds (RFC 9110 §10.2.3): an integer, never below 1."""
    seconds = math.ceil(wait - SLACK)
    return seconds if seconds >= 1 else 1


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    remaining: int  # requests that would still pass now
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until a request passes (0.0 when allowed)
    tat: float  # the key's new state (unchanged when denied)


class Gcra:
    """One limit's parameters and its decision function."""

    __slots__ = ("burst", "count", "interval", "period", "span", "span_cmp")

    def __init__(self, count: int, period: float, burst: int) -> None:
        if count <= 0 or period <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.count = count
        self.period = period
        self.burst = burst
        self.interval = period / count
        self.span = burst * self.interval
        self.span_cmp = self.span + SLACK  # the comparison bound used everywhere

    def advance(self, tat: float | None, now: float) -> float:
        """``x`` for a request at ``now`` against state ``tat`` (None: unknown key)."""
        if tat is None or tat < now:
            tat = now
        return tat + self.interval - now

    def allows(self, x: float) -> bool:
        return x <= self.span_cmp

    def remaining(self, x: float) -> int:
        """Requests that still pass at once after an allowed request with this ``x``."""
        left = int((self.span_cmp - x) / self.interval)
        return left if left > 0 else 0

    def decide(self, tat: float | None, now: float) -> GcraResult:
        x = self.advance(tat, now)
        if x <= self.span_cmp:
            return GcraResult(True, self.remaining(x), x, 0.0, now + x)
        old = now + x - self.interval  # the stored TAT, clamped to now
        return GcraResult(False, 0, old - now, x - self.span, tat if tat is not None else now)
