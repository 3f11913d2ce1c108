"""In-process GCRA state: one float (the TAT) per key, in a bounded LRU.

Memory is bounded under a flood of distinct keys (1 million random client IPs): beyond
``max_keys`` the least recently used key is dropped. Dropping a key whose TAT lies in the past
loses nothing (an idle bucket is a full bucket); dropping an active one makes that key start from
a full bucket again, which only happens when more than ``max_keys`` keys were seen since it was
last used. ``expire(now)`` drops idle keys from the cold end so that memory also shrinks when the
flood stops.

Store contract (``BucketStore``): ``take``, ``refund``, ``debit``, ``peek`` and ``expire``.
``take``, ``refund`` and ``debit`` are each the whole read-modify-write of one key (``debit``
records a request admitted elsewhere, by Redis, in the fallback bucket of a Redis limit), so a
replacement that shares buckets across
worker processes only has to make these two operations atomic: that is
``gateway.ratelimit.shared.SharedBuckets`` (a fixed-size table in shared memory, one float TAT
per 64-bit key hash, under a POSIX semaphore), which ``workers: N`` uses for every local limit.

``take`` returns ``x`` (see ``gcra``) and commits only when ``x <= span_cmp``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

__all__ = ["DEFAULT_MAX_KEYS", "BucketStore", "LocalStore"]

DEFAULT_MAX_KEYS = 100_000  # per limit; ~130 bytes per key with a str key of an IPv4 address
EXPIRE_BUDGET = 10_000  # keys looked at per expire() call


class BucketStore(Protocol):
    def take(self, key: str | bytes, now: float, interval: float, span_cmp: float) -> float: ...

    def refund(self, key: str | bytes, interval: float) -> None: ...

    def debit(self, key: str | bytes, now: float, interval: float, cap: float) -> None: ...

    def peek(self, key: str | bytes) -> float | None: ...

    # A real default, not `...`: mypyc compiles this stub too, and `...` is not an int.
    def expire(self, now: float, budget: int = EXPIRE_BUDGET) -> int: ...


class LocalStore:
    """Single-process bucket table. Not thread-safe: used from the event-loop thread only."""

    __slots__ = ("_tats", "evicted", "max_keys")

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._tats: OrderedDict[str | bytes, float] = OrderedDict()
        self.evicted = 0  # active keys dropped because of the cap

    def __len__(self) -> int:
        return len(self._tats)

    def take(self, key: str | bytes, now: float, interval: float, span_cmp: float) -> float:
        """One request of ``key`` at ``now``: ``x = max(tat, now) + interval - now``.

        The new TAT is stored only if ``x <= span_cmp`` (allowed). A denied key is still marked
        recently used: a client being limited is the last one whose state should be dropped.
        """
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            x = interval  # unknown key: a full bucket
            if x <= span_cmp:
                tats[key] = now + x
                if len(tats) > self.max_keys:
                    _, old = tats.popitem(last=False)
                    if old > now:
                        self.evicted += 1
            return x
        if tat < now:
            tat = now
        x = tat + interval - now
        if x <= span_cmp:
            tats[key] = tat + interval
        tats.move_to_end(key)
        return x

    def refund(self, key: str | bytes, interval: float) -> None:
        """Give back one request taken by ``take`` (another limit of the decision denied)."""
        tats = self._tats
        tat = tats.get(key)
        if tat is not None:
            tats[key] = tat - interval

    def debit(self, key: str | bytes, now: float, interval: float, cap: float) -> None:
        """Record one request admitted by someone else (Redis): the TAT advances whether or not
        the bucket had room, up to ``now + cap`` (a bounded debt, see ``limiter``)."""
        tats = self._tats
        tat = tats.get(key)
        if tat is None or tat < now:
            tat = now
        tat += interval
        limit = now + cap
        tats[key] = tat if tat < limit else limit
        tats.move_to_end(key)
        if len(tats) > self.max_keys:
            _, old = tats.popitem(last=False)
            if old > now:
                self.evicted += 1

    def peek(self, key: str | bytes) -> float | None:
        return self._tats.get(key)

    def expire(self, now: float, budget: int = EXPIRE_BUDGET) -> int:
        """Drop idle keys (TAT in the past) from the cold end; at most ``budget`` per call so a
        periodic sweep never stalls the loop. Returns how many were dropped."""
        tats = self._tats
        dropped = 0
        while tats and dropped < budget:
            key, tat = next(iter(tats.items()))
            if tat > now:
                break
            del tats[key]
            dropped += 1
        return dropped
