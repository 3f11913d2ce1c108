"""Panic threshold: when too few instances pass their health checks, distrust the checks.

Envoy's rule: if the fraction of available hosts drops below ``panic_threshold`` (default 50%),
the survivors would take the whole load and likely fall over too, so the balancer ignores health
and spreads over every host, the ones real traffic just failed on included.

This gateway's rule differs on purpose. Panic is there to protect against a **broken health
check** (a wrong path, an auth change, a probe that times out while the service works), not
against real failures. So in panic mode the balancer spreads over every instance **except those
ejected by outlier detection**, i.e. instances that real requests just failed on (connect
failures, timeouts, resets, 5xx streaks): sending traffic back to a dead or frozen instance only
turns a degraded upstream into failed requests. Instances that failed only an active health
check are used again. Consequences:

- With one of three instances working and two ejected, all traffic goes to the working one (in
  Envoy, two thirds of it would go to the dead ones).
- With no instance available at all there is no panic (as before this rule): the caller
  answers a fast 503 naming the upstream (the documented "no healthy instance" error) rather
  than sending traffic to instances known down.
- ``max_ejection_percent`` bounds how many instances outlier detection may eject; when it allows
  more than ``100% - panic_threshold``, panic mode can only re-admit health-check failures, which
  is harmless under this rule (``gateway check`` still warns, because it is rarely meant).

Balancers apply it themselves (``panic_threshold=`` on every balancer); these functions are the
single definition they and the control plane (metrics, /admin) share.
"""

from __future__ import annotations


def in_panic(available: int, total: int, threshold: float) -> bool:
    """``threshold`` is a fraction in [0, 1] (config ``50%`` → 0.5); 0 disables panic mode."""
    if threshold <= 0.0 or total <= 0 or available <= 0:
        return False
    return available < threshold * total


def panic_usable(instance: object) -> bool:
    """Whether panic mode may send traffic to ``instance``: not if outlier detection ejected it."""
    return not getattr(instance, "ejected", False)
