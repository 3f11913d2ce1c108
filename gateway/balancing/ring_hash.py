"""Consistent hashing on a ring (ketama): a key goes to the first point clockwise of its hash.

Every instance owns ``weight * replicas`` points on a 32-bit ring, at positions hashed from its
address and the point number. The positions depend only on the instance itself, never on the
rest of the set, so when one of N instances goes away only the keys it owned move (≈ 1/N), and
they spread over the survivors. Lookup is a ``bisect`` over the sorted positions: O(log points).

Only eligible instances (available, or all in panic mode) are on the live ring, so a refresh
after an instance flipped re-filters the full ring (O(points), no rehashing: positions are
cached per address). Slow start does not apply: changing an instance's share here would remap
keys. A request without a key gets a random eligible instance.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Container, Hashable, Sequence
from hashlib import blake2b

from gateway.balancing.base import Balancer, T, instance_key
from gateway.balancing.hash_key import hash_key_bytes

_MAX_WALK = 64


def point_hash(name: str, number: int) -> int:
    """Ring position of point ``number`` of the instance called ``name``."""
    digest = blake2b(f"{name}-{number}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


def _name(instance: object, index: int) -> str:
    key = instance_key(instance, index)
    return key if isinstance(key, str) else repr(key)


class RingHash(Balancer[T]):
    name = "ring_hash"
    weighted = False  # weights set the point count; slow start would remap keys
    __slots__ = (
        "_all_hashes",
        "_all_owners",
        "_built_for",
        "_hashes",
        "_max_points",
        "_order",
        "_owners",
        "_points",
        "_replicas",
    )

    def __init__(
        self,
        instances: Sequence[T] = (),
        *,
        replicas: int = 100,
        max_points: int = 1 << 20,
        panic_threshold: float = 0.0,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        if replicas < 1 or max_points < 1:
            raise ValueError("replicas and max_points must be positive")
        self._replicas = replicas
        self._max_points = max_points
        self._points: dict[tuple[str, int], list[int]] = {}
        self._built_for: tuple[T, ...] | None = None
        super().__init__(instances, panic_threshold=panic_threshold, rng=rng, now=now)

    def _carry_state(self, old_index: dict[Hashable, int], new_keys: list[Hashable]) -> None:
        self._built_for = None  # the set changed: rebuild the full ring

    def _build_full(self) -> None:
        instances = self._instances
        total_weight = sum(max(1, instance.weight) for instance in instances) or 1
        # Points per unit of weight: constant (hence minimal key movement) unless the ring
        # would exceed max_points, in which case it shrinks for every instance alike.
        per_unit = max(1, min(self._replicas, self._max_points // total_weight))
        cache = self._points
        fresh: dict[tuple[str, int], list[int]] = {}
        ring: list[tuple[int, int]] = []
        for index, instance in enumerate(instances):
            name = _name(instance, index)
            count = max(1, instance.weight) * per_unit
            points = cache.get((name, count))
            if points is None:
                points = [point_hash(name, number) for number in range(count)]
            fresh[(name, count)] = points
            ring.extend((position, index) for position in points)
        ring.sort()
        self._points = fresh
        self._all_hashes = [position for position, _ in ring]
        self._all_owners = [owner for _, owner in ring]
        self._built_for = instances

    def _build(self) -> None:
        if self._built_for is not self._instances:
            self._build_full()
        instances = self._instances
        self._order = [instances[index] for index in self._eligible]
        if len(self._eligible) == len(instances):
            self._hashes = self._all_hashes
            self._owners = [instances[owner] for owner in self._all_owners]
            return
        eligible = [False] * len(instances)
        for index in self._eligible:
            eligible[index] = True
        pairs = [
            (position, owner)
            for position, owner in zip(self._all_hashes, self._all_owners, strict=True)
            if eligible[owner]
        ]
        self._hashes = [position for position, _ in pairs]
        self._owners = [instances[owner] for _, owner in pairs]

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        hashes = self._hashes
        if not hashes:
            return self._fallback(exclude)
        if key is None:
            return self._random_of(self._order, exclude)
        owners = self._owners
        count = len(hashes)
        slot = bisect_left(hashes, hash_key_bytes(key))
        if slot == count:
            slot = 0
        instance = owners[slot]
        if (instance.available or self._panic) and instance not in exclude:
            return instance
        # Walk clockwise to the next owner that qualifies: the same place the key would go if
        # the instance were off the ring, so retries and stale flips stay consistent.
        for _ in range(min(count - 1, _MAX_WALK)):
            slot += 1
            if slot == count:
                slot = 0
            instance = owners[slot]
            if (instance.available or self._panic) and instance not in exclude:
                return instance
        return self._fallback(exclude)
