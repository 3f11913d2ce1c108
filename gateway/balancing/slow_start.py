"""Slow start: a new or recovered instance's effective weight ramps up over a window.

A cold instance (empty caches, JIT not warm, connection pools empty) that suddenly receives its
full share answers slowly or fails. Envoy's ``slow_start_config`` ramps its weight instead:
``weight * max(min_weight_percent, (elapsed / window) ** (1 / aggression))``; aggression 1.0
is linear, which is what ``slow_start: {window}`` configures.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SlowStart:
    window: float
    aggression: float = 1.0
    # Floor so a just-recovered instance gets a trickle of traffic at once (Envoy's default 10%).
    min_weight_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError("slow start window must be positive")
        if self.aggression <= 0:
            raise ValueError("slow start aggression must be positive")
        if not 0.0 < self.min_weight_fraction <= 1.0:
            raise ValueError("min_weight_fraction must be in (0, 1]")

    def factor(self, elapsed: float) -> float:
        """Weight multiplier after ``elapsed`` seconds in slow start; 1.0 once it is over."""
        if elapsed >= self.window:
            return 1.0
        if elapsed <= 0:
            return self.min_weight_fraction
        ramp = elapsed / self.window
        if self.aggression != 1.0:
            ramp = ramp ** (1.0 / self.aggression)
        return max(self.min_weight_fraction, ramp)


def slow_start_weight(weight: float, elapsed: float, slow_start: SlowStart | None) -> float:
    """Effective weight of an instance that entered slow start ``elapsed`` seconds ago."""
    if slow_start is None:
        return weight
    return weight * slow_start.factor(elapsed)
