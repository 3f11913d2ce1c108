"""The common machinery of every balancer: eligible set, panic mode, slow start, fallback.

Contract shared by all balancers (see ``gateway.balancing`` for the list):

- Instances are any objects with ``.weight: int``, ``.available: bool`` and
  ``.active_requests: int``. Hash balancers also read ``.address`` (a stable name) when present.
- Balancers keep their per-instance state in lists indexed by the instance's position in the
  sequence given to the constructor / :meth:`Balancer.rebuild`; they never attach attributes
  to instances. ``peak_ewma`` maps an instance back to its index with a dict keyed by ``id()``.
- ``pick(key=None, exclude=())`` is O(1) or O(log n) while the structures are current.
  ``exclude`` holds the instances a request already tried: they are avoided while any other
  eligible instance exists (Envoy's ``previous_hosts`` retry predicate).
  It never returns an unavailable instance (outside panic mode), even if ``.available`` changed
  since the last :meth:`refresh`: the picked instance is checked and, rarely, a bounded retry
  and a linear fallback take over. Call :meth:`refresh` after flipping ``.available`` so picks
  stay cheap and slow start sees the recovery.
- No clock and no IO: time is passed to :meth:`refresh`, :meth:`rebuild` and :meth:`tick`;
  randomness comes from an injectable ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Container, Hashable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from gateway.balancing.slow_start import SlowStart
from gateway.health.panic import in_panic, panic_usable


class Balanced(Protocol):
    weight: int
    available: bool
    active_requests: int


T = TypeVar("T", bound=Balanced)


def instance_key(instance: Any, index: int) -> Hashable:
    """Stable identity across rebuilds: the address when the instance has one."""
    address = getattr(instance, "address", None)
    return address if address is not None else ("#", index, id(instance))


class Balancer(Generic[T]):
    """Base class. Subclasses implement :meth:`_build` and :meth:`pick`.

    After :meth:`_refresh_sets`, ``self._eligible`` lists the indices the balancer spreads load
    over (the available ones, or all of them in panic mode) and ``self._weights[i]`` is instance
    ``i``'s effective weight (its weight scaled by its slow-start factor).
    """

    name: ClassVar[str] = ""
    #: Whether effective weights (slow start) influence this balancer's choices.
    weighted: ClassVar[bool] = True

    __slots__ = (
        "_eligible",
        "_instances",
        "_keys",
        "_now",
        "_panic",
        "_panic_threshold",
        "_ramp_since",
        "_rng",
        "_seen_available",
        "_slow_start",
        "_weights",
    )

    def __init__(
        self,
        instances: Sequence[T] = (),
        *,
        panic_threshold: float = 0.0,
        slow_start: SlowStart | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        self._panic_threshold = panic_threshold
        self._slow_start = slow_start if self.weighted else None
        self._rng = rng if rng is not None else random.Random()
        self._now = now
        self._instances: tuple[T, ...] = ()
        self._keys: list[Hashable] = []
        self._ramp_since: dict[int, float] = {}
        self._seen_available: list[bool] = []
        self._eligible: list[int] = []
        self._weights: list[float] = []
        self._panic = False
        # The initial set does not ramp (as Envoy: hosts present at cluster creation skip slow
        # start); only instances added or recovered later do.
        self._install(instances, now, ramp_new=False)

    # -- public -----------------------------------------------------------------------------
    @property
    def instances(self) -> tuple[T, ...]:
        return self._instances

    @property
    def panic(self) -> bool:
        """True when fewer than ``panic_threshold`` of the instances were available at the last
        refresh, so load is spread over all of them."""
        return self._panic

    def rebuild(self, instances: Sequence[T], now: float | None = None) -> None:
        """Replace the instance set. Per-instance state carries over by address (or identity);
        instances not seen before start slow start at ``now``."""
        self._install(instances, self._now if now is None else now, ramp_new=True)

    def refresh(self, now: float | None = None) -> None:
        """Re-read ``.available`` (and ``.weight``); call after the control plane or outlier
        detection flipped an instance. An instance seen going from unavailable to available
        starts slow start at ``now``. O(n)."""
        if now is not None:
            self._now = now
        now = self._now
        slow = self._slow_start
        seen = self._seen_available
        for index, instance in enumerate(self._instances):
            available = bool(instance.available)
            if available and not seen[index] and slow is not None:
                self._ramp_since[index] = now
            seen[index] = available
        self._refresh_sets()
        self._build()

    def tick(self, now: float) -> None:
        """Advance time: re-weighs instances in slow start (rebuilding when weights moved).
        Cheap when no instance is ramping; meant to run from a periodic timer (e.g. 1/s)."""
        self._now = now
        if self._ramp_since:
            self._refresh_sets()
            self._build()

    def in_slow_start(self, instance: T) -> bool:
        for index, candidate in enumerate(self._instances):
            if candidate is instance:
                return index in self._ramp_since
        return False

    def effective_weight(self, instance: T) -> float:
        for index, candidate in enumerate(self._instances):
            if candidate is instance:
                return self._weights[index]
        raise KeyError(instance)

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        raise NotImplementedError

    # -- for subclasses -----------------------------------------------------------------------
    def _build(self) -> None:
        """Rebuild the pick structures from ``_eligible`` and ``_weights``."""

    def _carry_state(self, old_index: dict[Hashable, int], new_keys: list[Hashable]) -> None:
        """Hook: move per-instance state from old to new positions (peak_ewma uses it)."""

    def _random_of(self, order: Sequence[T], exclude: Container[object]) -> T | None:
        """An instance of ``order`` at random (hash balancers without a key), else fallback."""
        instance = order[int(self._rng.random() * len(order))]
        if (instance.available or (self._panic and panic_usable(instance))) and (
            instance not in exclude
        ):
            return instance
        return self._fallback(exclude)

    def _fallback(self, exclude: Container[object]) -> T | None:
        """Linear scan for when the structures are stale (an instance flipped since the last
        refresh) or every candidate was excluded. Prefers an available non-excluded instance,
        then an excluded one if only those are left."""
        instances = self._instances
        count = len(instances)
        if not count:
            return None
        panic = self._panic
        start = int(self._rng.random() * count)  # spread the fallback load
        spare: T | None = None
        for step in range(count):
            instance = instances[(start + step) % count]
            if instance.available or (panic and panic_usable(instance)):
                if instance in exclude:
                    spare = instance
                    continue
                return instance
        return spare

    # -- internals ----------------------------------------------------------------------------
    def _install(self, instances: Sequence[T], now: float, *, ramp_new: bool) -> None:
        self._now = now
        new = tuple(instances)
        new_keys = [instance_key(instance, index) for index, instance in enumerate(new)]
        old_index = {key: index for index, key in enumerate(self._keys)}
        old_ramp = self._ramp_since
        old_seen = self._seen_available
        ramp: dict[int, float] = {}
        seen: list[bool] = []
        for index, (instance, key) in enumerate(zip(new, new_keys, strict=True)):
            available = bool(instance.available)
            previous = old_index.get(key)
            if previous is None:
                if ramp_new and available and self._slow_start is not None:
                    ramp[index] = now
            else:
                if previous in old_ramp:
                    ramp[index] = old_ramp[previous]
                elif available and not old_seen[previous] and self._slow_start is not None:
                    ramp[index] = now  # recovered while being rebuilt
            seen.append(available)
        self._carry_state(old_index, new_keys)
        self._instances = new
        self._keys = new_keys
        self._ramp_since = ramp
        self._seen_available = seen
        self._refresh_sets()
        self._build()

    def _refresh_sets(self) -> None:
        instances = self._instances
        available = [index for index, instance in enumerate(instances) if instance.available]
        self._panic = in_panic(len(available), len(instances), self._panic_threshold)
        if self._panic:
            # Panic overrides active health checks only: an instance that real traffic just
            # ejected (connect failures, timeouts, 5xx) stays out (see gateway.health.panic).
            self._eligible = [
                index for index, instance in enumerate(instances) if panic_usable(instance)
            ]
        else:
            self._eligible = available
        weights = [float(max(1, instance.weight)) for instance in instances]
        slow = self._slow_start
        if slow is not None and self._ramp_since:
            now = self._now
            done: list[int] = []
            for index, since in self._ramp_since.items():
                factor = slow.factor(now - since)
                if factor >= 1.0:
                    done.append(index)
                else:
                    weights[index] *= factor
            for index in done:
                del self._ramp_since[index]
        self._weights = weights
