"""Maglev consistent hashing (Eisenbud et al., NSDI 2016): O(1) lookup in a prime-sized table.

Each instance derives a permutation of the table's slots from two hashes of its address
(``offset``, ``skip``); the table is filled by letting instances take turns claiming their next
preferred free slot, so every instance ends with an almost equal share (weights: an instance
takes a turn in proportion to its weight). A lookup is ``table[hash(key) % size]``. When one of
N instances goes, the others keep nearly all their slots: about 1/N of keys move.

The table size is a prime ≥ 100·N (the paper's bound for ≤ 1 % imbalance): ``table_size``
(default 65537, Envoy's default) or the next prime above 100·N when the set is larger. Only
eligible instances are in the table, so a refresh after a flip rebuilds it: O(M log M) in
Python, tens of milliseconds for M = 65537; flips are rare next to picks. Slow start does not
apply (it would remap keys).
"""

from __future__ import annotations

import random
from collections.abc import Container, Hashable, Sequence
from hashlib import blake2b

from gateway.balancing.base import Balancer, T
from gateway.balancing.hash_key import hash_key_bytes
from gateway.balancing.ring_hash import _name

_MAX_WALK = 64


def is_prime(number: int) -> bool:
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    divisor = 3
    while divisor * divisor <= number:
        if number % divisor == 0:
            return False
        divisor += 2
    return True


def next_prime(number: int) -> int:
    while not is_prime(number):
        number += 1
    return number


def table_size_for(count: int, minimum: int = 65537) -> int:
    """The table size for ``count`` instances: ``minimum`` if prime and ≥ 100·count, else the
    smallest prime ≥ max(minimum, 100·count)."""
    return next_prime(max(minimum, 100 * count))


def build_table(names: Sequence[str], weights: Sequence[float], size: int) -> list[int]:
    """Maglev table: slot → position in ``names``. ``size`` must be prime."""
    count = len(names)
    if count == 0:
        return []
    offsets: list[int] = []
    skips: list[int] = []
    for name in names:
        digest = blake2b(name.encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "big") % size)
        skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
    top = max(weights)
    shares = [weight / top for weight in weights]
    credit = [0.0] * count
    tried = [0] * count  # how many of its preferences each instance has consumed
    table = [-1] * size
    filled = 0
    while True:
        for index in range(count):
            # Weighted turns: an instance claims a slot once its accumulated share reaches 1.
            credit[index] += shares[index]
            if credit[index] < 1.0:
                continue
            credit[index] -= 1.0
            offset = offsets[index]
            skip = skips[index]
            attempt = tried[index]
            slot = (offset + attempt * skip) % size
            while table[slot] >= 0:
                attempt += 1
                slot += skip
                if slot >= size:
                    slot -= size
            tried[index] = attempt + 1
            table[slot] = index
            filled += 1
            if filled == size:
                return table


class Maglev(Balancer[T]):
    name = "maglev"
    weighted = False
    __slots__ = ("_order", "_size", "_table", "_table_size")

    def __init__(
        self,
        instances: Sequence[T] = (),
        *,
        table_size: int = 65537,
        panic_threshold: float = 0.0,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        if table_size < 2:
            raise ValueError("table_size must be at least 2")
        self._table_size = table_size
        super().__init__(instances, panic_threshold=panic_threshold, rng=rng, now=now)

    def _carry_state(self, old_index: dict[Hashable, int], new_keys: list[Hashable]) -> None:
        return

    @property
    def size(self) -> int:
        return self._size

    def _build(self) -> None:
        instances = self._instances
        eligible = self._eligible
        order = [instances[index] for index in eligible]
        self._order = order
        size = table_size_for(len(eligible), self._table_size)
        self._size = size
        names = [_name(instances[index], index) for index in eligible]
        weights = [float(max(1, instances[index].weight)) for index in eligible]
        self._table = [order[slot] for slot in build_table(names, weights, size)]

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> T | None:
        table = self._table
        if not table:
            return self._fallback(exclude)
        if key is None:
            return self._random_of(self._order, exclude)
        size = self._size
        slot = hash_key_bytes(key) % size
        instance = table[slot]
        if (instance.available or self._panic) and instance not in exclude:
            return instance
        # Neighbouring slots belong to effectively random instances: a consistent second choice.
        for _ in range(_MAX_WALK):
            slot += 1
            if slot == size:
                slot = 0
            instance = table[slot]
            if (instance.available or self._panic) and instance not in exclude:
                return instance
        return self._fallback(exclude)
