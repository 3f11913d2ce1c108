"""Open client connections counted against ``limits.max_connections``, for the whole gateway.

``workers: 1`` counts in the process (``LocalConnectionCount``). With ``workers: N`` the count
must hold across workers (the kernel spreads new connections over them with ``SO_REUSEPORT``),
so it lives in a small table in shared memory (``SharedConnectionCount``):

- **Memory.** A ``memfd`` (no name in ``/dev/shm``, nothing left behind when the supervisor is
  killed) created by the supervisor before the first worker starts and inherited by every worker
  (``pass_fds``; its number travels in the ``config`` message). One page: one signed 64-bit slot
  per worker index.
- **No lock.** A worker writes only its own slot, a plain 8-byte store. To admit a connection it
  stores its count plus one, then sums every slot; if the sum is over the limit it stores the
  old count back and refuses. Two workers racing for the last free slot may then both refuse,
  but never both admit (outside the few nanoseconds a store can sit in a CPU's store buffer).
- **Crash-safe.** A dead worker's slot is zeroed by the supervisor when it reaps the worker, and
  by the restarted worker when it attaches. No semaphore can be left taken.

Cost: one ``try_open``/``close`` pair per connection (not per request), well under a microsecond.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_WORKERS", "LocalConnectionCount", "SharedConnectionCount"]

MAX_WORKERS = 512  # slots in the one page of the shared table


class LocalConnectionCount:
    """The count of one process (``workers: 1``)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0

    def try_open(self, limit: int) -> bool:
        """Count a new connection if the gateway has fewer than ``limit``; False to refuse it."""
        if self.open >= limit:
            return False
        self.open += 1
        return True

    def close(self) -> None:
        self.open -= 1

    def total(self) -> int:
        return self.open


class SharedConnectionCount:
    """One worker's view of the gateway-wide table (the supervisor holds one too, index -1)."""

    __slots__ = ("_map", "_slots", "_view", "fd", "index", "open", "owner", "workers")

    def __init__(self, fd: int, workers: int, index: int, *, owner: bool) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be within 1..{MAX_WORKERS}")
        if index >= workers:
            raise ValueError("worker index out of range")
        self.fd = fd
        self.workers = workers
        self.index = index
        self.owner = owner
        self._map = mmap.mmap(fd, mmap.PAGESIZE)
        self._slots = memoryview(self._map).cast("q")
        self._view = self._slots[:workers]  # what try_open sums
        self.open = 0
        if index >= 0:
            self._slots[index] = 0  # a restarted worker: its predecessor's connections are gone

    @classmethod
    def create(cls, workers: int) -> SharedConnectionCount:
        """The supervisor's table, zeroed (``fd`` is inherited by the workers it starts)."""
        fd = os.memfd_create("gateway-connections", 0)  # not CLOEXEC: children inherit it
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            return cls(fd, workers, -1, owner=True)
        except BaseException:
            os.close(fd)
            raise

    def spec(self) -> dict[str, Any]:
        """What a worker needs to attach (JSON-able; goes into the ``config`` message)."""
        return {"fd": self.fd, "workers": self.workers}

    @classmethod
    def attach(cls, spec: Mapping[str, Any], index: int) -> SharedConnectionCount:
        return cls(int(spec["fd"]), int(spec["workers"]), index, owner=False)

    def try_open(self, limit: int) -> bool:
        """Count a new connection of this worker unless the gateway already has ``limit``."""
        mine = self.open + 1
        slots = self._slots
        slots[self.index] = mine  # store first, then sum: racing workers cannot both admit
        if sum(self._view) > limit:
            slots[self.index] = self.open
            return False
        self.open = mine
        return True

    def close(self) -> None:
        self.open -= 1
        self._slots[self.index] = self.open

    def total(self) -> int:
        return sum(self._view)

    def reset(self, index: int) -> None:
        """Zero the slot of a worker that exited (supervisor side)."""
        self._slots[index] = 0

    def release(self) -> None:
        """The supervisor's end: close the memfd (workers keep their own mappings)."""
        if self.owner:
            self.owner = False
            os.close(self.fd)
