"""Peak EWMA (Finagle/Linkerd): pick the lower of two ``latency * (active + 1) / weight``.

Each instance keeps an exponentially weighted moving average of its response latency that is
*peak-sensitive*: a sample above the average replaces it at once (react to a slowdown now), a
sample below pulls it down with weight ``1 - exp(-Δt / decay)`` (trust improvements gradually).

Starvation guard: a slow spell would otherwise park an instance forever, since an instance that
gets no traffic produces no samples to lower its average. As in Finagle, the average *also decays
toward zero with time* while no samples arrive: its cost is read as
``ewma * exp(-(now - last_sample) / idle_decay)``, with a short ``idle_decay`` (1 s) so that an
instance 300x slower for a moment is probed again within about 6 s, and the decayed value is
what the next sample is averaged with (one fast probe after a long gap readmits it). A stale
instance therefore looks cheaper and cheaper until it is probed again; the probe's latency then
sets its average (peak rule) if still slow, or lets it back in if fast. A never-sampled instance
costs 0 while idle, so it is probed at once, but with a request in flight and no sample yet it
costs ``penalty`` (so a fresh instance takes one probe at a time, not a stampede).

``now`` is the latest time given to :meth:`observe` / :meth:`tick` / :meth:`refresh` (picks carry
no clock). State is kept per index and looked up from an instance by ``id()``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Container, Hashable, Sequence

from gateway.balancing.base import Balancer, T
from gateway.balancing.slow_start import SlowStart


class PeakEwma(Balancer[T]):
    name = "peak_ewma"
    __slots__ = ("_by_id", "_candidates", "_decay", "_ewma", "_idle_decay", "_last", "_penalty")

    def __init__(
        self,
        instances: Sequence[T] = (),
        *,
        decay: float = 5.0,
        idle_decay: float = 1.0,
        penalty: float = 1e3,
        panic_threshold: float = 0.0,
        slow_start: SlowStart | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        if decay <= 0 or idle_decay <= 0:
            raise ValueError("decay and idle_decay must be positive")
        self._decay = decay
        self._idle_decay = idle_decay
        self._penalty = penalty
        self._ewma: list[float] = []
        self._last: list[float] = []
        super().__init__(
            instances, panic_threshold=panic_threshold, slow_start=slow_start, rng=rng, now=now
        )

    def _carry_state(self, old_index: dict[Hashable, int], new_keys: list[Hashable]) -> None:
        ewma: list[float] = []
        last: list[float] = []
        for key in new_keys:
            previous = old_index.get(key)
            if previous is None:
                ewma.append(0.0)
                last.append(self._now)
            else:
                ewma.append(self._ewma[previous])
                last.append(self._last[previous])
        self._ewma = ewma
        self._last = last

    def _build(self) -> None:
        instances = self._instances
        self._by_id = {id(instance): index for index, instance in enumerate(instances)}
        self._candidates = [(index, 1.0 / self._weights[index]) for index in self._eligible]

    def observe(self, instance: T, latency: float, now: float) -> None:
        """Record one response latency (seconds) of ``instance`` finished at ``now``."""
        index = self._by_id.get(id(instance))
        if index is None:
            return
        if now > self._now:
            self._now = now
        elapsed = now - self._last[index]
        self._last[index] = now
        current = self._ewma[index]
        if elapsed > 0:
            current *= math.exp(-elapsed / self._idle_decay)  # what the cost has been showing
        if latency > current:
            self._ewma[index] = latency  # peak: slowdowns count at once
        else:
            keep = math.exp(-elapsed / self._decay) if elapsed > 0 else 1.0
            # A just-ended spell should not need ages of samples: with no time passed the
            # sample still moves the average a little (a tenth), so a burst of fast replies
            # also brings it down.
            keep = min(keep, 0.9)
            self._ewma[index] = current * keep + latency * (1.0 - keep)

    def cost(self, instance: T) -> float:
        """The instance's current load score (lower is better); for tests and /admin."""
        index = self._by_id[id(instance)]
        return self._cost(index, instance.active_requests, self._weights[index])

    def latency(self, instance: T) -> float:
        """The instance's time-decayed latency estimate in seconds."""
        index = self._by_id[id(instance)]
        return self._ewma[index] * math.exp(-(self._now - self._last[index]) / self._idle_decay)

    def _cost(self, index: int, active: int, weight: float) -> float:
        ewma = self._ewma[index]
        if ewma == 0.0:
            return self._penalty + active if active else 0.0
        elapsed = self._now - self._last[index]
        if elapsed > 0:
            ewma *= math.exp(-elapsed / self._idle_decay)
        return ewma * (active + 1) / weight

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        candidates = self._candidates
        count = len(candidates)
        instances = self._instances
        if count >= 2:
            random = self._rng.random
            panic = self._panic
            pairs = count * (count - 1)
            for _ in range(4):
                draw = int(random() * pairs)  # an ordered pair of distinct positions
                first = draw % count
                second = draw // count
                if second >= first:
                    second += 1
                a_index, a_inv = candidates[first]
                b_index, b_inv = candidates[second]
                a = instances[a_index]
                b = instances[b_index]
                a_ok = (a.available or panic) and a not in exclude
                b_ok = (b.available or panic) and b not in exclude
                if a_ok and b_ok:
                    a_cost = self._cost(a_index, a.active_requests, 1.0) * a_inv
                    b_cost = self._cost(b_index, b.active_requests, 1.0) * b_inv
                    return b if b_cost < a_cost else a
                if a_ok:
                    return a
                if b_ok:
                    return b
        elif count == 1:
            instance = instances[candidates[0][0]]
            if (instance.available or self._panic) and instance not in exclude:
                return instance
        return self._fallback(exclude)
