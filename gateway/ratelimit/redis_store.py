"""GCRA state in Redis, shared by every gateway process that points at the same server.

Data-plane contract: ``submit(keys, args, on_done)`` is synchronous and cheap; it queues the
decision and returns. Decisions submitted during one event-loop iteration go to Redis as ONE
script call (``EVALSHA``) on the next iteration, written at once on one pipelined connection:
while a call is out, the next one is already written behind it, so Redis latency never
serializes requests. At most ``max_in_flight`` calls are out at once; batches flushed beyond
that wait and are merged into one call (up to ``max_batch`` decisions).

The connection is our own ``asyncio.Protocol`` speaking RESP2: the reply is parsed in
``data_received`` and the decisions' callbacks run right there. No Task, future or connection
pool per call (redis-py spent ~130 µs of CPU per call on those, which on a busy gateway made
the loop itself the reason decisions were late).

**Timeouts.** A call's timer starts when it is written (or, for a batch that had to wait for
the pipeline or the connection, when it was flushed), so no decision waits longer than
``timeout`` for Redis. When the timer fires and bytes are already waiting in the socket (the
loop was busy, Redis was not), the decision is given the time to read them (checked again
every millisecond, at most one more ``timeout``) instead of being counted as a store error.
A call that really timed out is decided by the fallback (``on_done(None)``); its late answer
is read and dropped (``late``). The store is marked unavailable when Redis went silent (no
reply at all since the call was written), after ``MAX_CONSECUTIVE_TIMEOUTS`` timeouts in a
row, or on any connection or Redis error: ``submit`` then returns False at once, so requests
do not wait at all, and a probe (a new connection, ``PING``) runs after a backoff with jitter,
doubling up to ``backoff_max``. The first successful probe makes the store available again,
after replaying into Redis the requests the fallback admitted meanwhile (``owe``).
Errors are logged at most once per ``log_interval`` (with the count of suppressed ones) and
counted in the store's counters; ``latency()`` gives percentiles of recent round trips.

Token leases (``gateway.ratelimit.lease``) travel in the same calls: an entry whose ARGV starts
with ``-1`` takes (and gives back) tokens of one key and answers ``{granted, x_us}``; the
limiter sends them through ``submit`` like decisions. ``lease_table`` keeps each limit's leases
here, one table per process for every route and snapshot that uses the limit.

The Lua script evaluates each decision's keys all-or-nothing: a request passes only if every
limit of the decision passes, and then every key is advanced; otherwise none is. Time is Redis
server time (``TIME``) in integer microseconds, so gateways with skewed clocks agree. Keys expire
(PX) when their bucket is full again: idle keys cost no memory.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import hashlib
import logging
import random
import ssl
import termios
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.ratelimit.lease import (
    DEFAULT_HORIZON,
    DEFAULT_TTL,
    LEASE_BURST_SHARE,
    LeasePolicy,
    LeaseTable,
)

__all__ = ["DEFAULT_TIMEOUT", "GCRA_LUA", "RedisStore", "RedisURL", "parse_redis_url"]

log = logging.getLogger("gateway.ratelimit")

# The measured default (docs/ratelimit.md): round-trip p99 with the gateway saturated on a busy
# 2-core machine and a CPU hog per core is 30-60 ms (11-19 ms without the hogs).
DEFAULT_TIMEOUT = 0.05
MAX_CONSECUTIVE_TIMEOUTS = 3
GRACE_STEP = 0.001  # re-check interval when the answer is already in the socket

# ARGV is a sequence of decisions: m, then (interval_us, span_us, dry_run) per key; KEYS holds the
# decisions' keys in the same order. Returns x_us = new_tat - now for every key (see gcra.py):
# a key passes when x_us <= span_us. Dry-run keys never block the others and are advanced only
# when they pass. Redis >= 5 replicates scripts by effects, which allows TIME before writes.
# A lease (gateway/ratelimit/lease.py) is m = -1, then interval_us, span_us, want, back for its
# one key: ``back`` tokens are given back first (the TAT moves back, never below now), then up
# to ``want`` tokens are taken, as many as the bucket has room for; its result is the pair
# {granted, x_us}: x after the granted tokens, or (none granted) x of one more request.
GCRA_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local k = 1
local a = 1
local n = #ARGV
while a <= n do
  local m = tonumber(ARGV[a])
  a = a + 1
  if m < 0 then
    local interval = tonumber(ARGV[a])
    local span = tonumber(ARGV[a + 1])
    local want = tonumber(ARGV[a + 2])
    local back = tonumber(ARGV[a + 3])
    local tat = tonumber(redis.call('GET', KEYS[k]))
    if tat == nil or tat < now then tat = now end
    if back > 0 then
      tat = tat - back * interval
      if tat < now then tat = now end
    end
    local got = math.floor((span - (tat - now)) / interval)
    if got > want then got = want end
    if got < 0 then got = 0 end
    local new = tat + got * interval
    if got > 0 or back > 0 then
      redis.call('SET', KEYS[k], string.format('%d', new),
                 'PX', math.floor((new - now) / 1000) + 1)
    end
    if got > 0 then
      out[#out + 1] = {got, new - now}
    else
      out[#out + 1] = {0, tat + interval - now}
    end
    k = k + 1
    a = a + 4
  else
    local ok = true
    local news = {}
    for j = 0, m - 1 do
      local interval = tonumber(ARGV[a + 3 * j])
      local span = tonumber(ARGV[a + 3 * j + 1])
      local tat = tonumber(redis.call('GET', KEYS[k + j]))
      if tat == nil or tat < now then tat = now end
      local x = tat + interval - now
      out[#out + 1] = x
      if x <= span then
        news[j + 1] = tat + interval
      else
        news[j + 1] = false
        if ARGV[a + 3 * j + 2] == '0' then ok = false end
      end
    end
    if ok then
      for j = 0, m - 1 do
        local new = news[j + 1]
        if new then
          redis.call('SET', KEYS[k + j], string.format('%d', new),
                     'PX', math.floor((new - now) / 1000) + 1)
        end
      end
    end
    k = k + m
    a = a + 3 * m
  end
end
return out
"""


# Debits requests the fallback admitted while the store was down (KEYS; ARGV: per key the
# microseconds to add and the cap above now), so Redis knows about them once it is back.
REPLAY_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local add = tonumber(ARGV[2 * i - 1])
  local cap = now + tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then tat = now end
  tat = math.min(tat + add, cap)
  redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
return #KEYS
"""
MAX_OWED_KEYS = 10_000

GCRA_SHA = hashlib.sha1(GCRA_LUA.encode()).hexdigest().encode()

OnDone = Callable[[list[int] | None], None]
Entry = tuple[list[bytes], list[int], OnDone]


# -- RESP2 ---------------------------------------------------------------------------------
class ReplyError:
    """An error reply (``-ERR ...``): a value, not an exception, so parsing stays simple."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"ReplyError({self.message!r})"


class ProtocolError(Exception):
    pass


def parse_reply(buf: bytes, pos: int) -> tuple[Any, int] | None:
    """One RESP2 reply at ``buf[pos:]``: ``(value, next_pos)``, or None when incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    if kind == 58:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 42:  # '*' array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[Any] = []
        at = end + 2
        for _ in range(count):
            parsed = parse_reply(buf, at)
            if parsed is None:
                return None
            items.append(parsed[0])
            at = parsed[1]
        return items, at
    if kind == 36:  # '$' bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            return None
        return buf[end + 2 : stop], stop + 2
    if kind == 43:  # '+' simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # '-' error
        return ReplyError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise ProtocolError(f"unexpected RESP type byte {kind!r}")


def encode_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _evalsha(keys: list[bytes], args: list[int]) -> bytes:
    out = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + len(args), GCRA_SHA)]
    count = b"%d" % len(keys)
    out.append(b"$%d\r\n%s\r\n" % (len(count), count))
    for key in keys:
        out.append(b"$%d\r\n%s\r\n" % (len(key), key))
    for arg in args:
        text = b"%d" % arg
        out.append(b"$%d\r\n%s\r\n" % (len(text), text))
    return b"".join(out)


class RedisURL:
    """What the store needs from ``redis://[[user]:password@]host[:port][/db]`` (or rediss://)."""

    __slots__ = ("db", "host", "password", "port", "tls", "username")

    def __init__(
        self, host: str, port: int, db: int, username: str | None, password: str | None, tls: bool
    ) -> None:
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.password = password
        self.tls = tls


def parse_redis_url(url: str) -> RedisURL:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"invalid Redis URL {url!r}: expected redis:// or rediss://")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"invalid Redis URL {url!r}: bad port or database number") from None
    return RedisURL(
        parts.hostname or "127.0.0.1",
        port,
        db,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password is not None else None,
        parts.scheme == "rediss",
    )


# -- one pipelined connection ---------------------------------------------------------------
class _Connection(asyncio.Protocol):
    """Replies come back in the order commands were written: ``handlers`` is that order."""

    def __init__(self, on_lost: Callable[[_Connection, str], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.handlers: deque[Callable[[Any], None]] = deque()
        self.buffer = b""
        self.replies = 0  # replies received: tells a silent Redis from a slow answer
        self.fd = -1  # for FIONREAD (plain TCP only; TLS bytes are not replies yet)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self.fd = sock.fileno()  # (asyncio and uvloop set TCP_NODELAY themselves)

    def send(self, payload: bytes, handler: Callable[[Any], None]) -> None:
        assert self.transport is not None
        self.handlers.append(handler)
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        pos = 0
        size = len(buf)
        handlers = self.handlers
        try:
            while pos < size:
                parsed = parse_reply(buf, pos)
                if parsed is None:
                    break
                value, pos = parsed
                self.replies += 1
                if not handlers:
                    raise ProtocolError("a reply nobody asked for")
                handlers.popleft()(value)
                if self.closed:
                    return
        except (ProtocolError, ValueError, IndexError) as exc:
            self.abort(f"redis protocol error: {exc!r}")
            return
        self.buffer = buf[pos:] if pos < size else b""

    def unread(self) -> bool:
        """Reply bytes that this process has not read or not finished parsing yet."""
        if self.buffer:
            return True
        if self.fd < 0:
            return False
        count = array.array("i", [0])
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, count, True)
        except OSError:
            return False
        return count[0] > 0

    def abort(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self.on_lost(self, reason)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.on_lost(self, f"redis connection lost: {exc!r}" if exc else "redis closed")


class _Batch:
    __slots__ = ("deadline", "done", "entries")

    def __init__(self, entries: list[Entry], deadline: float) -> None:
        self.entries = entries
        self.deadline = deadline  # loop time by which Redis must have answered
        self.done = False


class _Call:
    """One script call on the wire: the batches merged into it."""

    __slots__ = ("batches", "conn", "done", "replies_at_send", "sent_at", "timer", "written")

    def __init__(self, batches: list[_Batch], conn: _Connection, sent_at: float) -> None:
        self.batches = batches
        self.conn = conn
        self.sent_at = sent_at  # loop time (uvloop's is cached, ms resolution)
        self.written = time.monotonic()  # for the round-trip samples
        self.replies_at_send = conn.replies
        self.done = False
        self.timer: asyncio.TimerHandle | None = None


class RedisStore:
    """One per process (and per ``redis:`` config). Use from the event-loop thread only."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        prefix: str = "gateway",
        max_batch: int = 1000,
        max_connections: int = 16,
        fallback_share: float = 1.0,
        backoff_min: float = 0.05,
        backoff_max: float = 5.0,
        log_interval: float = 10.0,
        rng: random.Random | None = None,
        lease_horizon: float = DEFAULT_HORIZON,
        lease_ttl: float = DEFAULT_TTL,
        lease_holders: int = 1,
        lease_share: float | None = None,
    ) -> None:
        if not 0.0 < fallback_share <= 1.0:
            raise ValueError("fallback_share must be in (0, 1]")
        if lease_holders < 1:
            raise ValueError("lease_holders must be at least 1")
        self.url = url
        self.address = parse_redis_url(url)
        self.timeout = timeout
        self.prefix = prefix
        self.max_batch = max_batch
        # Script calls out at once on the pipelined connection (the config key predates
        # pipelining and is still called max_connections).
        self.max_in_flight = max_connections
        self.fallback_share = fallback_share
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.log_interval = log_interval
        # Leases (gateway/ratelimit/lease.py): every lease holder (this process is one of
        # ``lease_holders`` workers of a gateway that is one of 1/fallback_share gateways)
        # holds at most ``lease_share`` of a limit's burst.
        self.lease_horizon = lease_horizon
        self.lease_ttl = lease_ttl
        self.lease_share = (
            lease_share
            if lease_share is not None
            else LEASE_BURST_SHARE * fallback_share / lease_holders
        )
        self._leases: dict[tuple[bytes, int, int], LeaseTable] = {}
        self._rng = rng or random.Random()
        self._pending: list[Entry] = []
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queue: deque[_Batch] = deque()  # flushed batches not yet written
        self._calls: deque[_Call] = deque()  # written, in reply order
        self._conn: _Connection | None = None
        self._connecting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe_handle: asyncio.TimerHandle | None = None
        self._failures = 0
        self._consecutive_timeouts = 0
        self._last_log = -1e18
        self._suppressed = 0
        self._rtts: deque[float] = deque(maxlen=8192)  # seconds, write to reply, recent calls
        # Requests the fallback admitted while the store was down: key -> [interval_us,
        # span_us, count], replayed into Redis on recovery (``owe``).
        self._owed: dict[bytes, list[int]] = {}
        self.closed = False
        self.available = True
        # Counters (read by the metrics exporter).
        self.batches = 0  # script calls sent (round trips)
        self.decisions = 0  # decisions sent to Redis
        self.answered = 0  # decisions answered by Redis in time
        self.errors = 0  # calls that failed (connection errors, Redis errors)
        self.timeouts = 0  # calls whose answer came after ``timeout``
        self.late = 0  # decisions whose answer came after their fallback decided
        self.graced = 0  # calls whose timer fired with the answer already in the socket
        self.unavailable = 0  # decisions refused at once because the store was down
        self.probes = 0
        self.recoveries = 0
        self.replayed = 0  # owed requests debited in Redis after a recovery
        self.owed_dropped = 0  # owed requests forgotten (more than MAX_OWED_KEYS keys)
        self.lease_calls = 0  # lease script entries sent (refills and returns)
        self.leased = 0  # tokens granted to this process's leases
        self.lease_returned = 0  # tokens given back (expired or unused)

    def lease_table(self, prefix: bytes, interval_us: int, span_us: int, burst: int) -> LeaseTable:
        """The leases of one limit (its Redis key prefix and parameters) in this process: one
        table for every route and snapshot that uses the limit, so a reload keeps them."""
        ident = (prefix, interval_us, span_us)
        table = self._leases.get(ident)
        if table is None:
            policy = LeasePolicy(burst, self.lease_share, self.lease_horizon, self.lease_ttl)
            table = self._leases[ident] = LeaseTable(policy, prefix)
        return table

    # -- data plane ------------------------------------------------------------------------
    def submit(self, keys: list[bytes], args: list[int], on_done: OnDone) -> bool:
        """Queue one decision. False (and nothing queued) when the store is down: decide with
        the fallback now. ``on_done`` is called later, never from inside ``submit``."""
        if not self.available or self.closed:
            self.unavailable += 1
            return False
        self._pending.append((keys, args, on_done))
        if self._flush_handle is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_soon(self._flush)
        return True

    def owe(self, key: bytes, interval_us: int, span_us: int) -> None:
        """A request of ``key`` the fallback admitted without asking Redis (the store was
        down): Redis is debited for it when it is back, so the two buckets stay in step."""
        owed = self._owed.get(key)
        if owed is not None:
            owed[2] += 1
        elif len(self._owed) < MAX_OWED_KEYS:
            self._owed[key] = [interval_us, span_us, 1]
        else:
            self.owed_dropped += 1

    def _replay(self, conn: _Connection) -> None:
        owed, self._owed = self._owed, {}
        if not owed:
            return
        keys = list(owed)
        args: list[bytes] = []
        for interval_us, span_us, count in owed.values():
            # At most one burst of debt beyond empty, as the fallback bucket's own debits.
            args += (b"%d" % (interval_us * count), b"%d" % (2 * span_us))
        self.replayed += sum(count for _, _, count in owed.values())
        script = REPLAY_LUA.encode()
        conn.send(encode_command(b"EVAL", script, b"%d" % len(keys), *keys, *args), _ignore)

    def _flush(self) -> None:
        self._flush_handle = None
        pending = self._pending
        if not pending:
            return
        self._pending = []
        loop = self._loop
        assert loop is not None
        if not self.available or self.closed:
            # Went down after these were queued: they fall back now, without a round trip.
            self.unavailable += len(pending)
            self._resolve(_Batch(pending, 0.0), None)
            return
        self._queue.append(_Batch(pending, loop.time() + self.timeout))
        self._pump()

    def _pump(self) -> None:
        """Write queued batches while fewer than ``max_in_flight`` calls are out; batches that
        waited are merged into one call (up to ``max_batch`` decisions)."""
        queue = self._queue
        loop = self._loop
        if not queue or loop is None or self.closed:
            return
        conn = self._conn
        if conn is None:
            if not self._connecting:
                self._spawn(self._connect_first())
            return
        calls = self._calls
        while queue and len(calls) < self.max_in_flight:
            group: list[_Batch] = []
            keys: list[bytes] = []
            args: list[int] = []
            size = 0
            while queue and (not group or size + len(queue[0].entries) <= self.max_batch):
                batch = queue.popleft()
                if batch.done:
                    continue
                group.append(batch)
                size += len(batch.entries)
                for entry_keys, entry_args, _ in batch.entries:
                    keys += entry_keys
                    args += entry_args
            if not group:
                continue
            now = loop.time()
            call = _Call(group, conn, now)
            self.batches += 1
            self.decisions += size
            conn.send(_evalsha(keys, args), partial(self._answered, call))
            calls.append(call)
            call.timer = loop.call_at(min(batch.deadline for batch in group), self._expire, call)

    def _answered(self, call: _Call, value: Any) -> None:
        calls = self._calls
        if calls and calls[0] is call:
            calls.popleft()
        self._rtts.append(time.monotonic() - call.written)
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if isinstance(value, ReplyError) or not isinstance(value, list):
            self._finish(call, None)
            self.errors += 1
            if isinstance(value, ReplyError) and value.message.startswith("NOSCRIPT"):
                # Redis lost its script cache (SCRIPT FLUSH, failover): load it again.
                self._log(f"redis rate-limit store: {value.message}")
                call.conn.send(encode_command(b"SCRIPT", b"LOAD", GCRA_LUA.encode()), _ignore)
            else:
                self._mark_down(f"redis rate-limit store error: {value!r}")
            self._pump()
            return
        if call.done:  # too late: the fallback already decided
            self.late += sum(len(batch.entries) for batch in call.batches)
        else:
            self._consecutive_timeouts = 0
            self._finish(call, value)
        self._pump()

    def _finish(self, call: _Call, result: list[int] | None) -> None:
        if call.done:
            return
        call.done = True
        at = 0
        for batch in call.batches:
            count = sum(len(entry_keys) for entry_keys, _, _ in batch.entries)
            if result is None:
                self._resolve(batch, None)
            else:
                self.answered += len(batch.entries)
                self._resolve(batch, result[at : at + count])
            at += count

    def _expire(self, call: _Call) -> None:
        call.timer = None
        if call.done:
            return
        loop = self._loop
        assert loop is not None
        conn = call.conn
        now = loop.time()
        if not conn.closed and conn.unread() and now < call.sent_at + 2 * self.timeout:
            # The answer (or one ahead of it) is already here: the loop was busy, not Redis.
            self.graced += 1
            call.timer = loop.call_later(GRACE_STEP, self._expire, call)
            return
        self.timeouts += 1
        self._consecutive_timeouts += 1
        self._finish(call, None)  # its handler stays queued: the late answer is read, dropped
        silent = conn.replies == call.replies_at_send
        if silent or self._consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS:
            self._mark_down(f"redis rate-limit store did not answer within {self.timeout:g}s")

    def _resolve(self, batch: _Batch, result: list[int] | None) -> None:
        if batch.done:
            return
        batch.done = True
        at = 0
        for entry_keys, _, on_done in batch.entries:
            part: list[int] | None = None
            if result is not None:
                count = len(entry_keys)
                part = result[at : at + count]
                at += count
            try:
                on_done(part)
            except Exception:
                log.exception("rate-limit decision callback failed")

    # -- connections -----------------------------------------------------------------------
    async def _open(self) -> _Connection:
        """A new connection with AUTH, SELECT and SCRIPT LOAD written (pipelined, not awaited:
        a failure shows as an error reply to them or to the commands behind them)."""
        loop = self._loop
        assert loop is not None
        address = self.address
        conn = _Connection(self._lost)
        context = ssl.create_default_context() if address.tls else None
        async with asyncio.timeout(max(0.25, 5 * self.timeout)):
            await loop.create_connection(
                lambda: conn,
                address.host,
                address.port,
                ssl=context,
                server_hostname=address.host if context is not None else None,
            )
        if address.password is not None:
            auth = [address.password.encode()]
            if address.username:
                auth.insert(0, address.username.encode())
            conn.send(encode_command(b"AUTH", *auth), self._setup_reply(conn, "AUTH"))
        if address.db:
            select = encode_command(b"SELECT", b"%d" % address.db)
            conn.send(select, self._setup_reply(conn, "SELECT"))
        conn.send(
            encode_command(b"SCRIPT", b"LOAD", GCRA_LUA.encode()),
            self._setup_reply(conn, "SCRIPT LOAD"),
        )
        return conn

    def _setup_reply(self, conn: _Connection, what: str) -> Callable[[Any], None]:
        def check(value: Any) -> None:
            if isinstance(value, ReplyError):
                conn.abort(f"redis {what} failed: {value.message}")

        return check

    async def _connect_first(self) -> None:
        self._connecting = True
        try:
            conn = await self._open()
        except Exception as exc:
            self.errors += 1
            self._mark_down(f"redis rate-limit store unreachable: {exc!r}")
            return
        finally:
            self._connecting = False
        if self.closed:
            conn.abort("closed")
            return
        self._conn = conn
        self._pump()

    def _lost(self, conn: _Connection, reason: str) -> None:
        if conn is not self._conn:
            return  # a probe's connection, or one already dropped
        if not self.closed:
            self.errors += 1
        self._mark_down(reason)

    def _drop_connection(self, reason: str) -> None:
        """Forget the connection; its calls still out fall back now (late answers unread)."""
        conn, self._conn = self._conn, None
        calls, self._calls = self._calls, deque()
        for call in calls:
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
            self._finish(call, None)
        if conn is not None:
            conn.abort(reason)  # no-op if it is already closed; _lost ignores it now

    # -- availability ----------------------------------------------------------------------
    def _mark_down(self, reason: str) -> None:
        self._log(reason)
        queue, self._queue = self._queue, deque()
        for batch in queue:  # waiting for a connection to a Redis that failed: fall back now
            self._resolve(batch, None)
        self._drop_connection(reason)
        if not self.available or self.closed:
            return
        self.available = False
        self._failures = 0
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        loop = self._loop
        if loop is None or self.closed:
            return
        delay = min(self.backoff_max, self.backoff_min * (2**self._failures))
        delay *= 0.5 + self._rng.random() / 2  # jitter: gateways do not probe in lockstep
        self._probe_handle = loop.call_later(delay, self._start_probe)

    def _start_probe(self) -> None:
        self._probe_handle = None
        if self.closed or self._loop is None:
            return
        self._spawn(self._probe())

    def _spawn(self, coro: Any) -> None:
        loop = self._loop
        assert loop is not None
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self) -> None:
        self.probes += 1
        conn: _Connection | None = None
        try:
            conn = await self._open()
            loop = self._loop
            assert loop is not None
            pong: asyncio.Future[Any] = loop.create_future()

            def answered(value: Any) -> None:
                if not pong.done():
                    pong.set_result(value)

            conn.send(encode_command(b"PING"), answered)
            async with asyncio.timeout(max(0.25, 5 * self.timeout)):
                value = await pong
            if isinstance(value, ReplyError) or conn.closed:
                raise ConnectionError(f"PING answered {value!r}")
        except Exception as exc:
            if conn is not None:
                conn.abort("probe failed")
            self._failures += 1
            self._log(f"redis rate-limit store still unavailable: {exc!r}")
            self._schedule_probe()
            return
        if self.closed:
            conn.abort("closed")
            return
        self._conn = conn
        self._replay(conn)  # before any decision on the new connection: Redis runs them in order
        self._consecutive_timeouts = 0
        self.available = True
        self.recoveries += 1
        log.warning("redis rate-limit store at %s is answering again", self.url)

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            suffix = ""
            if self._suppressed:
                suffix = f" ({self._suppressed} similar messages suppressed)"
            log.warning("%s; deciding with the fallback%s", message, suffix)
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    # -- lifecycle -------------------------------------------------------------------------
    def latency(self) -> dict[str, float]:
        """Round-trip seconds (write to reply) of recent calls: p50, p90, p99, max."""
        samples = sorted(self._rtts)
        if not samples:
            return {}
        last = len(samples) - 1
        return {
            "p50": samples[last // 2],
            "p90": samples[last * 9 // 10],
            "p99": samples[last * 99 // 100],
            "max": samples[last],
        }

    def stats(self) -> dict[str, int]:
        return {
            "batches": self.batches,
            "decisions": self.decisions,
            "answered": self.answered,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "late": self.late,
            "graced": self.graced,
            "unavailable": self.unavailable,
            "probes": self.probes,
            "recoveries": self.recoveries,
            "replayed": self.replayed,
            "owed_dropped": self.owed_dropped,
            "lease_calls": self.lease_calls,
            "leased": self.leased,
            "lease_returned": self.lease_returned,
            "available": int(self.available),
        }

    async def close(self) -> None:
        if self.batches:
            lat = self.latency()
            log.info(
                "redis rate-limit store %s: %d calls, %d decisions, round trip p50 %.2f ms "
                "p90 %.2f ms p99 %.2f ms max %.2f ms (last %d calls), %d timeouts, %d graced, "
                "%d late, %d errors",
                self.url,
                self.batches,
                self.decisions,
                lat.get("p50", 0.0) * 1e3,
                lat.get("p90", 0.0) * 1e3,
                lat.get("p99", 0.0) * 1e3,
                lat.get("max", 0.0) * 1e3,
                len(self._rtts),
                self.timeouts,
                self.graced,
                self.late,
                self.errors,
            )
        self.closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, []
        for _, _, on_done in pending:
            try:
                on_done(None)
            except Exception:
                log.exception("rate-limit decision callback failed")
        queue, self._queue = self._queue, deque()
        for batch in queue:
            self._resolve(batch, None)
        calls, self._calls = self._calls, deque()
        for call in calls:
            if call.timer is not None:
                call.timer.cancel()
            self._finish(call, None)
        if self._probe_handle is not None:
            self._probe_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort("closed")


def _ignore(value: Any) -> None:
    return None
