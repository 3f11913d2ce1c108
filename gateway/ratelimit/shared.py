"""GCRA buckets shared by the worker processes of one gateway (``workers: N``, ``store: local``).

A keep-alive client sticks to one worker, so a local limit split N ways would admit N times too
much. Instead every worker reads and writes one table in shared memory:

- **Memory.** A ``memfd`` created by the supervisor before it starts workers and inherited by
  each of them (``pass_fds``; its number travels in the ``config`` message). It is the same
  POSIX shared memory that ``multiprocessing.shared_memory`` maps, minus the name: nothing is
  left in ``/dev/shm`` if the supervisor is killed, and no ``resource_tracker`` process is
  started (on Python 3.11 the tracker of a process that merely *attached* a segment unlinks it
  when that process exits).
- **Layout.** A 64-byte header, then ``slots`` signed 64-bit key hashes, then ``slots`` float64
  theoretical arrival times (TAT, ``time.monotonic()`` seconds: ``CLOCK_MONOTONIC`` is
  system-wide on Linux, so every process reads the same clock). Slots form groups of
  ``WINDOW`` (8): a key lives in the group its hash selects (the bounded probe window). A slot
  whose TAT is in the past is a full bucket, so it is free for reuse: idle keys expire in place
  and memory never grows. A new key in a full group takes the slot with the oldest TAT (the
  bucket closest to idle; if its TAT is still ahead, that key restarts from a full bucket, the
  permissive side, and ``evicted`` counts it).
- **Key.** A 64-bit hash of ``(owner, limit, parameters, key value)``. Workers are started with
  one random ``PYTHONHASHSEED`` (see ``gateway/workers.py``), so the built-in SipHash of a
  ``str``/``bytes`` (cached on the object: the client address string is hashed once per
  connection) agrees across them and stays unpredictable to clients; ``attach`` checks that
  with a probe stored in the header by the first process. Tables made with ``hashing="blake2b"``
  use a keyed BLAKE2b instead (about 0.5 µs more per decision) for processes that cannot share
  a seed.
- **Atomicity.** One POSIX semaphore (``_multiprocessing.SemLock``, what
  ``multiprocessing.Lock`` is built on) held for the read-modify-write of one key: uncontended it
  is a userspace atomic, about 60 ns for the pair (an ``fcntl.flock`` pair costs ~1.3 µs, two
  system calls). A worker SIGKILLed inside the few hundred nanoseconds it holds the lock would
  leave it taken: a waiter that does not get it within ``LOCK_TIMEOUT`` goes on and its release
  frees the lock again (at worst one racy update; ``lock_timeouts`` counts it).

``SharedBuckets`` (one per limit, from ``SharedTable.view``) has the ``LocalStore`` interface:
``take(key, now, interval, span_cmp) -> x``, ``refund``, ``debit``, ``peek`` and ``expire``.

``python -m gateway.ratelimit.shared`` prints nanoseconds per ``take`` next to ``LocalStore``.
"""

from __future__ import annotations

import _multiprocessing  # the C half of multiprocessing.synchronize (POSIX named semaphores)
import contextlib
import hashlib
import mmap
import os
import secrets
import struct
from collections.abc import Mapping
from typing import Any, Literal

__all__ = [
    "DEFAULT_SLOTS",
    "LOCK_TIMEOUT",
    "WINDOW",
    "SharedBuckets",
    "SharedTable",
    "install",
    "installed",
    "table_slots",
]

WINDOW = 8  # slots probed per key (one group)
DEFAULT_SLOTS = 1 << 18  # 4 MiB of shared memory
MIN_SLOTS = 1 << 16
MAX_SLOTS = 1 << 22  # 64 MiB
LOCK_TIMEOUT = 0.1  # far above any critical section; only a dead holder makes a waiter wait this

_MAGIC = b"GWRLTAB1"
# magic, slots, hashing (1 python, 2 blake2b), probe (first attacher's hash of _PROBE), key
_HEADER = struct.Struct("<8sQQq16s")
_HEADER_SIZE = 64
_PROBE = "gateway shared rate-limit table probe"
_SEMAPHORE = 1  # _multiprocessing kind: a counting semaphore (used with maxvalue 1)
_SEM_PREFIX = "gateway-rl-"

Hashing = Literal["python", "blake2b"]


def table_slots(max_keys_total: int) -> int:
    """Slots for a table meant to hold ``max_keys_total`` keys: twice that (8-slot groups start
    overflowing well before the table is full), a power of two, within [2**16, 2**22]."""
    slots = MIN_SLOTS
    while slots < 2 * max_keys_total and slots < MAX_SLOTS:
        slots <<= 1
    return slots


class SharedTable:
    """One shared bucket table: create it in the supervisor, ``attach`` it in each worker."""

    def __init__(
        self, fd: int, semaphore: str, *, owner: bool, lock: Any, mapping: mmap.mmap
    ) -> None:
        self.fd = fd
        self.semaphore = semaphore
        self.owner = owner
        self._lock = lock
        self._map = mapping
        magic, slots, hashing, _probe, key = _HEADER.unpack_from(mapping, 0)
        if magic != _MAGIC:
            raise ValueError("not a gateway rate-limit table")
        self.slots = int(slots)
        self.hashing: Hashing = "python" if hashing == 1 else "blake2b"
        self.hash_key: bytes = key
        view = memoryview(mapping)
        self._view = view
        keys_end = _HEADER_SIZE + 8 * self.slots
        self.keys = view[_HEADER_SIZE:keys_end].cast("q")
        self.tats = view[keys_end : keys_end + 8 * self.slots].cast("d")
        self.groups_mask = self.slots // WINDOW - 1
        self.lock_timeouts = 0

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, slots: int = DEFAULT_SLOTS, *, hashing: Hashing = "python") -> SharedTable:
        """A new zeroed table and its semaphore (the caller passes ``fd`` to its children)."""
        if slots < WINDOW or slots & (slots - 1):
            raise ValueError("slots must be a power of two >= WINDOW")
        _sweep_stale_semaphores()
        fd = os.memfd_create("gateway-ratelimit", 0)  # not CLOEXEC: children inherit it
        try:
            size = _HEADER_SIZE + 16 * slots
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
            _HEADER.pack_into(
                mapping,
                0,
                _MAGIC,
                slots,
                1 if hashing == "python" else 2,
                0,
                secrets.token_bytes(16),
            )
            name = f"/{_SEM_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
            lock = _multiprocessing.SemLock(_SEMAPHORE, 1, 1, name, False)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name, owner=True, lock=lock, mapping=mapping)

    def spec(self) -> dict[str, Any]:
        """What a worker needs to attach (JSON-able; goes into the ``config`` message)."""
        return {"fd": self.fd, "semaphore": self.semaphore, "slots": self.slots}

    @classmethod
    def attach(cls, spec: Mapping[str, Any]) -> SharedTable:
        """Map an inherited table. Raises ValueError if this process hashes differently from
        the ones already attached (it was not started with the workers' PYTHONHASHSEED)."""
        fd = int(spec["fd"])
        size = _HEADER_SIZE + 16 * int(spec["slots"])
        mapping = mmap.mmap(fd, size)
        name = str(spec["semaphore"])
        lock = _multiprocessing.SemLock._rebuild(0, _SEMAPHORE, 1, name)  # sem_open by name
        table = cls(fd, name, owner=False, lock=lock, mapping=mapping)
        if table.hashing == "python":
            mine = hash(_PROBE) or 1
            with table.locked():
                probe = _HEADER.unpack_from(mapping, 0)[3]
                if probe == 0:
                    struct.pack_into("<q", mapping, 24, mine)
                elif probe != mine:
                    raise ValueError(
                        "this process's str hash differs from the other workers' "
                        "(started without their PYTHONHASHSEED?): cannot share rate-limit buckets"
                    )
        return table

    def close(self) -> None:
        """Unmap; the creator also removes the semaphore's name (open handles keep working)."""
        if self.owner:
            with contextlib.suppress(OSError):
                _multiprocessing.sem_unlink(self.semaphore)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.owner = False

    @contextlib.contextmanager
    def locked(self) -> Any:
        lock = self._lock
        if not lock.acquire(False) and not lock.acquire(True, LOCK_TIMEOUT):
            self.lock_timeouts += 1
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                lock.release()

    # -- use ---------------------------------------------------------------------------------
    def view(self, prefix: str) -> SharedBuckets:
        """The buckets of one limit: ``prefix`` names the owner, the limit and its parameters,
        so two limits (or a limit whose rate changed in a reload) never share a bucket."""
        return SharedBuckets(self, prefix)

    def used(self, now: float) -> int:
        """Slots holding a bucket that is not full (diagnostics and tests; O(slots))."""
        keys, tats = self.keys, self.tats
        return sum(1 for i in range(self.slots) if keys[i] and tats[i] > now)


class SharedBuckets:
    """One limit's buckets in a ``SharedTable``; the ``LocalStore`` interface."""

    __slots__ = (
        "_acquire",
        "_blake_key",
        "_keys",
        "_mask",
        "_prefix",
        "_prefix_bytes",
        "_python_hash",
        "_release",
        "_tats",
        "evicted",
        "table",
    )

    def __init__(self, table: SharedTable, prefix: str) -> None:
        self.table = table
        self._prefix = prefix
        self._prefix_bytes = prefix.encode() + b"\x00"
        self._python_hash = table.hashing == "python"
        self._blake_key = table.hash_key
        self._keys = table.keys
        self._tats = table.tats
        self._mask = table.groups_mask
        lock = table._lock
        self._acquire = lock.acquire
        self._release = lock.release
        self.evicted = 0  # buckets still in use that a new key pushed out (group full)

    def _hash(self, key: str | bytes) -> int:
        if self._python_hash:
            return hash((self._prefix, key)) or 1  # 0 marks an empty slot
        data = key.encode("latin-1") if isinstance(key, str) else key
        digest = hashlib.blake2b(self._prefix_bytes + data, digest_size=8, key=self._blake_key)
        return int.from_bytes(digest.digest(), "little", signed=True) or 1

    def _lock(self) -> None:
        acquire = self._acquire
        if not acquire(False) and not acquire(True, LOCK_TIMEOUT):
            self.table.lock_timeouts += 1  # the holder died holding it: go on, then free it

    def _unlock(self) -> None:
        with contextlib.suppress(ValueError):  # only after a lock timeout
            self._release()

    def take(self, key: str | bytes, now: float, interval: float, span_cmp: float) -> float:
        """One request of ``key`` at ``now``: ``x = max(tat, now) + interval - now``; the new TAT
        is stored only when ``x <= span_cmp`` (allowed). Same contract as ``LocalStore.take``."""
        h = (hash((self._prefix, key)) or 1) if self._python_hash else self._hash(key)
        base = (h & self._mask) * WINDOW
        end = base + WINDOW
        keys = self._keys
        tats = self._tats
        acquire = self._acquire
        if not acquire(False) and not acquire(True, LOCK_TIMEOUT):
            self.table.lock_timeouts += 1  # the holder died holding it: go on, then free it
        try:
            group = keys[base:end].tolist()
            if h in group:
                i = base + group.index(h)
                tat = tats[i]
                if tat < now:
                    tat = now
                x = tat + interval - now
                if x <= span_cmp:
                    tats[i] = tat + interval
                return x
            # A new key (or one evicted): a full bucket, in the group's oldest slot.
            if interval <= span_cmp:
                olds = tats[base:end].tolist()
                j = olds.index(min(olds))
                if olds[j] > now and keys[base + j]:
                    self.evicted += 1
                keys[base + j] = h
                tats[base + j] = now + interval
            return interval
        finally:
            # contextlib.suppress would cost a context manager per request here.
            try:  # noqa: SIM105
                self._release()
            except ValueError:  # released by a waiter that timed out on us: nothing to do
                pass

    def refund(self, key: str | bytes, interval: float) -> None:
        """Give back one request taken by ``take`` (another limit of the decision denied)."""
        h = self._hash(key)
        base = (h & self._mask) * WINDOW
        self._lock()
        try:
            group = self._keys[base : base + WINDOW].tolist()
            if h in group:
                self._tats[base + group.index(h)] -= interval
        finally:
            self._unlock()

    def debit(self, key: str | bytes, now: float, interval: float, cap: float) -> None:
        """Record one request admitted elsewhere (Redis): advance the TAT by ``interval``
        whether or not the bucket had room, up to ``now + cap``. See ``LocalStore.debit``."""
        h = self._hash(key)
        base = (h & self._mask) * WINDOW
        end = base + WINDOW
        keys = self._keys
        tats = self._tats
        self._lock()
        try:
            group = keys[base:end].tolist()
            if h in group:
                i = base + group.index(h)
                tat = tats[i]
            else:
                olds = tats[base:end].tolist()
                j = olds.index(min(olds))
                if olds[j] > now and keys[base + j]:
                    self.evicted += 1
                i = base + j
                keys[i] = h
                tat = now
            if tat < now:
                tat = now
            tat += interval
            tats[i] = min(tat, now + cap)
        finally:
            self._unlock()

    def peek(self, key: str | bytes) -> float | None:
        """The key's TAT, or None when it has no slot."""
        h = self._hash(key)
        base = (h & self._mask) * WINDOW
        self._lock()
        try:
            group = self._keys[base : base + WINDOW].tolist()
            return self._tats[base + group.index(h)] if h in group else None
        finally:
            self._unlock()

    def expire(self, now: float, budget: int = 10_000) -> int:
        """Nothing to do: a slot whose TAT is in the past is reused in place."""
        return 0


# The table of this process (a worker), used by the snapshot builder for ``store: local``.
_INSTALLED: SharedTable | None = None


def install(table: SharedTable | None) -> None:
    global _INSTALLED
    _INSTALLED = table


def installed() -> SharedTable | None:
    return _INSTALLED


def _sweep_stale_semaphores() -> None:
    """Remove semaphore names left by a supervisor that was killed (SIGKILL skips ``close``)."""
    try:
        entries = os.listdir("/dev/shm")
    except OSError:
        return
    for entry in entries:
        if not entry.startswith("sem." + _SEM_PREFIX):
            continue
        pid_text = entry[len("sem." + _SEM_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                _multiprocessing.sem_unlink("/" + entry[len("sem.") :])
        except PermissionError:
            pass


def _bench() -> None:  # pragma: no cover - a measurement, run by hand
    import socket
    import time

    from gateway.ratelimit.local import LocalStore

    ips = [socket.inet_ntoa(os.urandom(4)) for _ in range(20_000)]
    interval, span_cmp = 0.001, 1.0

    def best(store: Any) -> float:
        take = store.take
        result = float("inf")
        for _ in range(7):
            now = time.monotonic()
            start = time.perf_counter()
            for ip in ips:
                take(ip, now, interval, span_cmp)
            result = min(result, (time.perf_counter() - start) / len(ips) * 1e9)
        return result

    local = best(LocalStore())
    table = SharedTable.create(table_slots(100_000))
    try:
        shared = best(table.view("route\x00limit0"))
        slow = SharedTable.create(table_slots(100_000), hashing="blake2b")
        try:
            blake = best(slow.view("route\x00limit0"))
        finally:
            slow.close()
    finally:
        table.close()
    print(f"LocalStore.take:            {local:6.0f} ns")
    print(f"SharedBuckets.take:         {shared:6.0f} ns  (+{shared - local:.0f} ns)")
    print(f"SharedBuckets.take blake2b: {blake:6.0f} ns  (+{blake - local:.0f} ns)")


if __name__ == "__main__":  # pragma: no cover
    _bench()
