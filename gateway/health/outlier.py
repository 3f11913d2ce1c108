"""Passive outlier detection: eject an instance after consecutive failures, for a growing time.

Envoy's consecutive-5xx and consecutive-gateway-failure detectors, pure (time is passed in):

- ``record(key, success, gateway_failure, now)`` per finished attempt. A failure (5xx response,
  connect failure, reset, timeout) counts toward ``consecutive_failures``; a *gateway* failure
  (502/503/504, connect failure, reset, timeout: the instance is unreachable or overloaded)
  also counts toward ``consecutive_gateway_failures``. A success resets both; a non-gateway
  failure (e.g. 500) breaks the gateway-failure run.
- Ejection time = ``base_ejection_time * times_ejected``, capped at ``max_ejection_time``.
  ``times_ejected`` drops by one for every ``base_ejection_time`` an instance stays in service
  without being ejected (Envoy decrements it per healthy sweep interval), so an instance that
  failed once long ago starts from the base again.
- ``max_ejection_percent``: an ejection that would put more than that share of the instances
  out is refused, except that one instance can always be ejected. This is Envoy's documented
  behaviour ("Defaults to 10% but will eject at least one host regardless of the value").
  Ejected instances return in :meth:`sweep` (call it from a timer), or lazily: ``is_ejected``
  answers from ``ejected_until`` even before the sweep.

Keys are any hashables (the data plane uses the instance address). Per-record cost is a dict
lookup and a few integer operations.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class EjectionInfo:
    """Per-instance state, exposed for /admin/upstreams."""

    consecutive_failures: int = 0
    consecutive_gateway_failures: int = 0
    times_ejected: int = 0  # the multiplier of the next ejection time (decays while healthy)
    total_ejections: int = 0  # ever, for metrics
    ejected_until: float = 0.0  # 0.0 when in service
    last_change: float = 0.0  # last ejection, return or multiplier decay

    @property
    def ejected(self) -> bool:
        return self.ejected_until > 0.0


class OutlierDetector:
    __slots__ = (
        "_ejected",
        "_states",
        "_total",
        "base_ejection_time",
        "consecutive_failures",
        "consecutive_gateway_failures",
        "ejections_refused",
        "max_ejection_percent",
        "max_ejection_time",
    )

    def __init__(
        self,
        consecutive_failures: int = 5,
        consecutive_gateway_failures: int = 5,
        base_ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        max_ejection_percent: float = 10.0,
    ) -> None:
        if base_ejection_time <= 0 or max_ejection_time < base_ejection_time:
            raise ValueError("need 0 < base_ejection_time <= max_ejection_time")
        # 0 disables a detector (as Envoy's enforcing_* = 0).
        self.consecutive_failures = consecutive_failures
        self.consecutive_gateway_failures = consecutive_gateway_failures
        self.base_ejection_time = base_ejection_time
        self.max_ejection_time = max_ejection_time
        self.max_ejection_percent = max_ejection_percent
        self.ejections_refused = 0  # ejections the percent cap prevented
        self._states: dict[Hashable, EjectionInfo] = {}
        self._ejected: set[Hashable] = set()
        self._total: int | None = None

    # -- instance set --------------------------------------------------------------------------
    def set_instances(self, keys: Iterable[Hashable]) -> None:
        """Declare the instance set (the max-percent rule needs its size). State of keys no
        longer present is dropped; state of the others is kept across reloads."""
        wanted = set(keys)
        for key in list(self._states):
            if key not in wanted:
                del self._states[key]
                self._ejected.discard(key)
        for key in wanted:
            if key not in self._states:
                self._states[key] = EjectionInfo()
        self._total = len(wanted)

    @property
    def total(self) -> int:
        return self._total if self._total is not None else len(self._states)

    # -- data plane ----------------------------------------------------------------------------
    def record(
        self, key: Hashable, success: bool, gateway_failure: bool = False, now: float = 0.0
    ) -> bool:
        """Account one attempt's outcome. Returns True when this call ejected ``key``."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = EjectionInfo(last_change=now)
        if success:
            if state.consecutive_failures or state.consecutive_gateway_failures:
                state.consecutive_failures = 0
                state.consecutive_gateway_failures = 0
            return False
        if state.ejected_until:
            return False  # late replies of an ejected instance do not extend its ejection
        failures = state.consecutive_failures + 1
        state.consecutive_failures = failures
        gateway = state.consecutive_gateway_failures + 1 if gateway_failure else 0
        state.consecutive_gateway_failures = gateway
        limit = self.consecutive_failures
        gateway_limit = self.consecutive_gateway_failures
        if (limit and failures >= limit) or (
            gateway_limit and gateway and gateway >= gateway_limit
        ):
            return self._eject(key, state, now)
        return False

    def is_ejected(self, key: Hashable, now: float) -> bool:
        state = self._states.get(key)
        return state is not None and state.ejected_until > now

    # -- control (timer) -----------------------------------------------------------------------
    def sweep(self, now: float) -> list[Hashable]:
        """Return instances whose ejection time is over to service; decay the ejection multiplier
        of instances that stayed healthy. Returns the keys returned to service (the caller
        marks them available and refreshes the balancer, which puts them in slow start)."""
        returned: list[Hashable] = []
        for key in list(self._ejected):
            state = self._states[key]
            if state.ejected_until <= now:
                state.ejected_until = 0.0
                state.consecutive_failures = 0
                state.consecutive_gateway_failures = 0
                state.last_change = now
                self._ejected.discard(key)
                returned.append(key)
        base = self.base_ejection_time
        for state in self._states.values():
            if state.times_ejected and not state.ejected_until:
                steps = int((now - state.last_change) // base)
                if steps > 0:
                    state.times_ejected = max(0, state.times_ejected - steps)
                    state.last_change += steps * base
        return returned

    def info(self, key: Hashable) -> EjectionInfo | None:
        return self._states.get(key)

    def ejected_count(self) -> int:
        return len(self._ejected)

    def snapshot(self) -> dict[Hashable, dict[str, float | int | bool]]:
        """Per-instance ejection info for /admin/upstreams."""
        return {
            key: {
                "ejected": state.ejected,
                "ejected_until": state.ejected_until,
                "times_ejected": state.times_ejected,
                "total_ejections": state.total_ejections,
                "consecutive_failures": state.consecutive_failures,
                "consecutive_gateway_failures": state.consecutive_gateway_failures,
            }
            for key, state in self._states.items()
        }

    # -- internals ---------------------------------------------------------------------------
    def max_ejected(self) -> int:
        """How many instances may be out at once: floor(percent of the set), at least one."""
        return max(1, math.floor(self.total * self.max_ejection_percent / 100.0 + 1e-9))

    def eject_until(self, key: Hashable, until: float, now: float) -> bool:
        """Record an ejection decided elsewhere (another worker) until ``until``, as ``record``
        would have: the multiplier grows, so this process's next ejection lasts as long.
        False when ``key`` is unknown, already ejected at least that long, or over the cap."""
        state = self._states.get(key)
        if state is None or state.ejected_until >= until:
            return False
        if not state.ejected_until:
            if len(self._ejected) >= self.max_ejected():
                self.ejections_refused += 1
                return False
            state.times_ejected += 1
            state.total_ejections += 1
        state.ejected_until = until
        state.last_change = now
        state.consecutive_failures = state.consecutive_gateway_failures = 0
        self._ejected.add(key)
        return True

    def _eject(self, key: Hashable, state: EjectionInfo, now: float) -> bool:
        if len(self._ejected) >= self.max_ejected():
            self.ejections_refused += 1
            # Keep counting: it is ejected as soon as room frees up and it fails again.
            return False
        times = state.times_ejected + 1
        state.times_ejected = times
        state.total_ejections += 1
        state.ejected_until = now + min(self.base_ejection_time * times, self.max_ejection_time)
        state.last_change = now
        self._ejected.add(key)
        return True
