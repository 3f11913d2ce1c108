"""Panic threshold: when too few instances are healthy, spread load over all of them.

Envoy's rule: if the fraction of healthy hosts drops below ``panic_threshold`` (default 50%),
the few survivors would take the whole load and likely fall over too, so the balancer ignores
health and spreads over every host. Here one deliberate difference: with *no* available
instance at all there is no panic; the caller answers 503 naming the upstream (the gateway's
documented "no healthy instance" error), rather than sending traffic to instances known down.

Balancers apply it themselves (``panic_threshold=`` on every balancer); this function is the
single definition they and the control plane (metrics, /admin) share.
"""

from __future__ import annotations


def in_panic(available: int, total: int, threshold: float) -> bool:
    """``threshold`` is a fraction in [0, 1] (config ``50%`` → 0.5); 0 disables panic mode."""
    if threshold <= 0.0 or total <= 0 or available <= 0:
        return False
    return available < threshold * total
