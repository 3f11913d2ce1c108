"""Idempotency stores: where claims and completed responses live.

Contract (all calls from the event-loop thread; callbacks run later on the loop, never from
inside the call, and no coroutine or Task is created per request):

    claim(key, token, fingerprint, lock_ms, now, on_done)
        atomically: a free (or expired) key is claimed for ``lock_ms`` by ``token`` and
        ``on_done((CLAIMED, b"", b""))``; a held key gives ``(IN_FLIGHT, fingerprint, b"")``,
        a completed one ``(COMPLETED, fingerprint, record)``. ``on_done(None)``: store error.
    complete(key, token, fingerprint, record, ttl_ms, now, on_done)
        the claim of ``token`` becomes a completed record for ``ttl_ms``; ``on_done(ok)``,
        None on a store error.
    release(key, token)
        the claim of ``token`` is dropped (the request failed: the client may retry).

``now`` is wall-clock seconds (the local store's file outlives processes and reboots);
the Redis store uses Redis's own expiry instead.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from gateway.idempotency.core import CLAIMED, COMPLETED, IN_FLIGHT
from gateway.ratelimit.redis_store import (
    ReplyError,
    _Connection,
    encode_command,
    parse_redis_url,
)

log = logging.getLogger("gateway.idempotency")

ClaimResult = tuple[int, bytes, bytes]
OnClaim = Callable[[ClaimResult | None], None]
OnComplete = Callable[[bool | None], None]


class IdempotencyStore(Protocol):
    def claim(
        self,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        lock_ms: int,
        now: float,
        on_done: OnClaim,
    ) -> None: ...

    def complete(
        self,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        record: bytes,
        ttl_ms: int,
        now: float,
        on_done: OnComplete,
    ) -> None: ...

    def release(self, key: bytes, token: bytes) -> None: ...

    async def close(self) -> None: ...


# -- local: SQLite in WAL mode, shared by the workers of one gateway ---------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key BLOB PRIMARY KEY,
    completed INTEGER NOT NULL,
    token BLOB NOT NULL,
    fingerprint BLOB NOT NULL,
    record BLOB,
    expires REAL NOT NULL
) WITHOUT ROWID
"""
PURGE_EVERY = 1000  # claims between two deletions of expired rows


class SQLiteStore:
    """One database file in ``state_dir`` for every worker process of a gateway.

    Each process runs one thread that owns its SQLite connection and executes calls in order;
    results come back with ``call_soon_threadsafe``. A claim is one ``BEGIN IMMEDIATE``
    transaction (SQLite's file lock makes it atomic across processes); WAL lets readers run
    alongside the one writer. ``path`` None: an in-memory database (this process only).
    """

    def __init__(self, path: Path | None, busy_timeout: float = 1.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Any] | None] = (
            queue.SimpleQueue()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._claims = 0
        self.errors = 0

    # loop side
    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], on_done: Any) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(
                target=self._run, name="idempotency-sqlite", daemon=True
            )
            self._thread.start()
        self._calls.put((fn, args, on_done))

    def claim(
        self,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        lock_ms: int,
        now: float,
        on_done: OnClaim,
    ) -> None:
        self._submit(self._claim, (key, token, fingerprint, lock_ms, now), on_done)

    def complete(
        self,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        record: bytes,
        ttl_ms: int,
        now: float,
        on_done: OnComplete,
    ) -> None:
        self._submit(self._complete, (key, token, fingerprint, record, ttl_ms, now), on_done)

    def release(self, key: bytes, token: bytes) -> None:
        self._submit(self._release, (key, token), None)

    async def close(self) -> None:
        if self._thread is not None:
            self._calls.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
            self._thread = None

    # thread side
    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            target = ":memory:"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            target = str(self.path)
        db = sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        db.execute(_SCHEMA)
        return db

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            item = self._calls.get()
            if item is None:
                if self._db is not None:
                    self._db.close()
                return
            fn, args, on_done = item
            try:
                if self._db is None:
                    self._db = self._open()
                result = fn(self._db, *args)
            except Exception as exc:  # sqlite3.Error, OSError: a store error for this call
                self.errors += 1
                log.warning("idempotency store %s: %r", self.path or ":memory:", exc)
                result = None
            if on_done is not None:
                try:
                    loop.call_soon_threadsafe(on_done, result)
                except RuntimeError:  # the loop is closed: shutting down
                    return

    def _claim(
        self,
        db: sqlite3.Connection,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        lock_ms: int,
        now: float,
    ) -> ClaimResult:
        self._claims += 1
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._claims % PURGE_EVERY == 0:
                db.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))
            row = db.execute(
                "SELECT completed, fingerprint, record, expires FROM idempotency WHERE key = ?",
                (key,),
            ).fetchone()
            if row is not None and row[3] > now:
                db.execute("COMMIT")
                completed, stored, record, _ = row
                return (COMPLETED, stored, record) if completed else (IN_FLIGHT, stored, b"")
            db.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, 0, ?, ?, NULL, ?)",
                (key, token, fingerprint, now + lock_ms / 1000.0),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return (CLAIMED, b"", b"")

    def _complete(
        self,
        db: sqlite3.Connection,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        record: bytes,
        ttl_ms: int,
        now: float,
    ) -> bool:
        cursor = db.execute(
            "UPDATE idempotency SET completed = 1, fingerprint = ?, record = ?, expires = ?"
            " WHERE key = ? AND token = ? AND completed = 0",
            (fingerprint, record, now + ttl_ms / 1000.0, key, token),
        )
        return cursor.rowcount == 1

    def _release(self, db: sqlite3.Connection, key: bytes, token: bytes) -> bool:
        cursor = db.execute(
            "DELETE FROM idempotency WHERE key = ? AND token = ? AND completed = 0", (key, token)
        )
        return cursor.rowcount == 1


# -- redis: shared by every gateway ------------------------------------------------------------
# Values: b"L" + fingerprint(32) + token while claimed, b"C" + fingerprint(32) + record once
# completed. One script per operation, so that each is atomic in Redis.
CLAIM_LUA = b"""
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'L' .. ARGV[2] .. ARGV[1], 'PX', ARGV[3])
  return {0}
end
if string.sub(v, 1, 1) == 'C' then return {2, v} end
return {1, v}
"""
COMPLETE_LUA = b"""
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'L' and string.sub(v, 34) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
RELEASE_LUA = b"""
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'L' and string.sub(v, 34) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
FINGERPRINT_BYTES = 32


class _Pending:
    __slots__ = ("done", "on_reply", "timer")

    def __init__(self, on_reply: Callable[[Any], None]) -> None:
        self.on_reply = on_reply
        self.done = False
        self.timer: asyncio.TimerHandle | None = None


class RedisIdempotencyStore:
    """Commands on one pipelined RESP connection (``gateway.ratelimit.redis_store``'s
    ``_Connection``: replies are parsed and handled in ``data_received``).

    Every command has a timer of ``timeout``; a command not answered by then is a store error
    (the late reply is read and dropped). A connection error, or a timeout with Redis silent,
    marks the store down: calls then fail at once (no waiting) until a reconnect succeeds
    (after a backoff with jitter, doubling up to ``backoff_max``).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.05,
        backoff_min: float = 0.05,
        backoff_max: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.address = parse_redis_url(url)
        self.timeout = timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: _Connection | None = None
        self._connecting = False
        self._waiting: list[tuple[bytes, _Pending]] = []  # written once connected
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures = 0
        self._retry_at = 0.0
        self.available = True
        self.closed = False
        self.errors = 0
        self.timeouts = 0

    # -- operations ----------------------------------------------------------------------------
    def claim(
        self,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        lock_ms: int,
        now: float,
        on_done: OnClaim,
    ) -> None:
        def on_reply(value: Any) -> None:
            if not isinstance(value, list) or not value:
                on_done(None)
                return
            outcome = int(value[0])
            if outcome == CLAIMED:
                on_done((CLAIMED, b"", b""))
                return
            stored = value[1]
            fp = stored[1 : 1 + FINGERPRINT_BYTES]
            if outcome == COMPLETED:
                on_done((COMPLETED, fp, stored[1 + FINGERPRINT_BYTES :]))
            else:
                on_done((IN_FLIGHT, fp, b""))

        payload = encode_command(
            b"EVAL", CLAIM_LUA, b"1", key, token, fingerprint, b"%d" % max(1, lock_ms)
        )
        self._send(payload, on_reply, on_done)

    def complete(
        self,
        key: bytes,
        token: bytes,
        fingerprint: bytes,
        record: bytes,
        ttl_ms: int,
        now: float,
        on_done: OnComplete,
    ) -> None:
        value = b"C" + fingerprint + record
        payload = encode_command(b"EVAL", COMPLETE_LUA, b"1", key, token, value, b"%d" % ttl_ms)
        self._send(payload, lambda reply: on_done(reply == 1), on_done)

    def release(self, key: bytes, token: bytes) -> None:
        payload = encode_command(b"EVAL", RELEASE_LUA, b"1", key, token)
        self._send(payload, _ignore, None)

    # -- plumbing ------------------------------------------------------------------------------
    def _send(
        self,
        payload: bytes,
        on_reply: Callable[[Any], None],
        on_error: Callable[[None], None] | None,
    ) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()

        def fail(_: Any = None) -> None:
            if on_error is not None:
                on_error(None)

        if self.closed:
            loop.call_soon(fail)
            return
        if not self.available:
            if loop.time() < self._retry_at or self._connecting:
                loop.call_soon(fail)  # down: decide at once, no waiting
                return
            self._spawn_connect()  # time for a reconnect; this call fails meanwhile
            loop.call_soon(fail)
            return

        def handle(value: Any) -> None:
            if pending.done:
                return  # too late: already failed by its timer
            pending.done = True
            if pending.timer is not None:
                pending.timer.cancel()
            if isinstance(value, ReplyError):
                self.errors += 1
                log.debug("idempotency redis store: %s", value.message)
                fail()
                return
            self._failures = 0
            on_reply(value)

        pending = _Pending(handle)
        pending.timer = loop.call_later(self.timeout, self._expire, pending, fail)
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.send(payload, handle)
        else:
            self._waiting.append((payload, pending))
            if not self._connecting:
                self._spawn_connect()

    def _expire(self, pending: _Pending, fail: Callable[[], None]) -> None:
        pending.timer = None
        if pending.done:
            return
        pending.done = True
        self.timeouts += 1
        fail()
        self._mark_down(f"redis did not answer within {self.timeout:g}s")

    def _spawn_connect(self) -> None:
        loop = self._loop
        assert loop is not None
        self._connecting = True
        task = loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = self._loop
        assert loop is not None
        address = self.address
        conn = _Connection(self._lost)
        try:
            async with asyncio.timeout(max(0.25, 5 * self.timeout)):
                await loop.create_connection(lambda: conn, address.host, address.port)
        except Exception as exc:
            self._connecting = False
            self.errors += 1
            self._mark_down(f"redis unreachable: {exc!r}")
            return
        self._connecting = False
        if self.closed:
            conn.abort("closed")
            return
        if address.password is not None:
            auth = [address.password.encode()]
            if address.username:
                auth.insert(0, address.username.encode())
            conn.send(encode_command(b"AUTH", *auth), _ignore)
        if address.db:
            conn.send(encode_command(b"SELECT", b"%d" % address.db), _ignore)
        self._conn = conn
        if not self.available:
            log.warning("idempotency redis store at %s is answering again", self.url)
        self.available = True
        waiting, self._waiting = self._waiting, []
        for payload, pending in waiting:
            if not pending.done:
                conn.send(payload, pending.on_reply)

    def _lost(self, conn: _Connection, reason: str) -> None:
        if conn is self._conn:
            self.errors += 1
            self._mark_down(reason)

    def _mark_down(self, reason: str) -> None:
        loop = self._loop
        conn, self._conn = self._conn, None
        waiting, self._waiting = self._waiting, []
        for _, pending in waiting:  # never written: they fail now
            if not pending.done and pending.timer is not None:
                pending.timer.cancel()
                pending.timer = None
                self._expire_now(pending)
        if conn is not None:
            handlers, conn.handlers = conn.handlers, type(conn.handlers)()
            conn.abort(reason)
            for handler in handlers:  # written, unanswered: they fail now, not at their timer
                handler(ReplyError(reason))
        if self.available:
            log.warning("idempotency redis store: %s; on_store_error decides", reason)
        self.available = False
        self._failures += 1
        delay = min(self.backoff_max, self.backoff_min * 2 ** (self._failures - 1))
        delay *= 0.5 + self._rng.random() / 2
        self._retry_at = (loop.time() if loop is not None else 0.0) + delay

    def _expire_now(self, pending: _Pending) -> None:
        # The store went down before this command was written: its handler reports the error.
        pending.on_reply(ReplyError("not sent: redis is down"))

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort("closed")


def _ignore(value: Any) -> None:
    return None


def wall_clock() -> float:
    return time.time()
