"""GCRA state in Redis, shared by every gateway process that points at the same server.

Data-plane contract: ``submit(keys, args, on_done)`` is synchronous and cheap; it queues the
decision and returns. Decisions submitted during one event-loop iteration go to Redis as ONE
script call (one round trip) on the next iteration, so Redis latency never serializes requests:
while a batch is in flight the next one is already being collected and sent on another pooled
connection. At most ``max_connections`` script calls are out at once; batches flushed beyond that
wait for a free connection and are merged into one call. Each call runs in one Task (not one
per request) and each batch has one timer: when ``timeout`` passes without an answer,
``on_done(None)`` is called for every decision of the batch and the caller decides with its
fallback. No decision waits longer than ``timeout``.

Failures (timeout, connection refused, Redis loading or restarting) mark the store unavailable:
``submit`` then returns False at once, so requests do not wait at all, and a probe (PING after
dropping pooled connections) runs after a backoff with jitter, doubling up to ``backoff_max``.
The first successful probe makes the store available again. Errors are logged at most once per
``log_interval`` (with the count of suppressed ones) and counted in the store's counters.

The Lua script evaluates each decision's keys all-or-nothing: a request passes only if every
limit of the decision passes, and then every key is advanced; otherwise none is. Time is Redis
server time (``TIME``) in integer microseconds, so gateways with skewed clocks agree. Keys expire
(PX) when their bucket is full again: idle keys cost no memory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["GCRA_LUA", "RedisStore"]

log = logging.getLogger("gateway.ratelimit")

# ARGV is a sequence of decisions: m, then (interval_us, span_us, dry_run) per key; KEYS holds the
# decisions' keys in the same order. Returns x_us = new_tat - now for every key (see gcra.py):
# a key passes when x_us <= span_us. Dry-run keys never block the others and are advanced only
# when they pass. Redis >= 5 replicates scripts by effects, which allows TIME before writes.
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
return out
"""

OnDone = Callable[[list[int] | None], None]


class _Batch:
    __slots__ = ("done", "entries", "timer")

    def __init__(self, entries: list[tuple[list[bytes], list[int], OnDone]]) -> None:
        self.entries = entries
        self.done = False
        self.timer: asyncio.TimerHandle | None = None


class RedisStore:
    """One per process (and per ``redis:`` config). Use from the event-loop thread only."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        timeout: float = 0.02,
        prefix: str = "gateway",
        max_batch: int = 1000,
        max_connections: int = 16,
        backoff_min: float = 0.05,
        backoff_max: float = 5.0,
        log_interval: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.prefix = prefix
        self.max_batch = max_batch
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.log_interval = log_interval
        self._rng = rng or random.Random()
        # Retries inside redis-py would hide failures behind our own timeout: off. The socket
        # timeouts only bound how long a dead batch's Task lingers; requests never wait on them.
        socket_timeout = max(1.0, 10 * timeout)
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            max_connections=max_connections + 2,  # + the probe's
            health_check_interval=0,
        )
        self._script = self.client.register_script(GCRA_LUA)
        self._pending: list[tuple[list[bytes], list[int], OnDone]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queue: deque[_Batch] = deque()  # flushed batches waiting for a free connection
        self._in_flight = 0
        self.max_in_flight = max_connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe_handle: asyncio.TimerHandle | None = None
        self._failures = 0
        self._last_log = -1e18
        self._suppressed = 0
        self.closed = False
        self.available = True
        # Counters (read by the metrics exporter).
        self.batches = 0  # script calls sent (round trips)
        self.decisions = 0  # decisions sent to Redis
        self.answered = 0  # decisions answered by Redis in time
        self.errors = 0  # batches that failed (connection errors, Redis errors)
        self.timeouts = 0  # batches whose answer came after ``timeout``
        self.unavailable = 0  # decisions refused at once because the store was down
        self.probes = 0
        self.recoveries = 0

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
            self._resolve(_Batch(pending), None)
            return
        # The timer starts now, so that time spent waiting for a free connection counts too.
        batch = _Batch(pending)
        batch.timer = loop.call_later(self.timeout, self._expire, batch)
        self._queue.append(batch)
        self._pump()

    def _pump(self) -> None:
        """Send queued batches while fewer than ``max_in_flight`` script calls are out; the
        batches that waited are merged into one call (up to ``max_batch`` decisions)."""
        queue = self._queue
        loop = self._loop
        while (
            queue and self._in_flight < self.max_in_flight and loop is not None and not self.closed
        ):
            group: list[_Batch] = []
            size = 0
            while queue and (not group or size + len(queue[0].entries) <= self.max_batch):
                batch = queue.popleft()
                if not batch.done:
                    group.append(batch)
                    size += len(batch.entries)
            if not group:
                continue
            self._in_flight += 1
            task = loop.create_task(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[_Batch]) -> None:
        keys: list[bytes] = []
        args: list[int] = []
        for batch in group:
            for entry_keys, entry_args, _ in batch.entries:
                keys += entry_keys
                args += entry_args
        self.batches += 1
        self.decisions += sum(len(batch.entries) for batch in group)
        try:
            result = await self._script(keys=keys, args=args)
        except asyncio.CancelledError:
            for batch in group:
                self._resolve(batch, None)
            raise
        except Exception as exc:
            self.errors += 1
            for batch in group:
                self._resolve(batch, None)
            self._mark_down(f"redis rate-limit store error: {exc!r}")
            return
        finally:
            self._in_flight -= 1
            self._pump()
        at = 0
        for batch in group:
            count = sum(len(entry_keys) for entry_keys, _, _ in batch.entries)
            if not batch.done:  # else too late: the fallback already decided
                self.answered += len(batch.entries)
                self._resolve(batch, result[at : at + count])
            at += count

    def _expire(self, batch: _Batch) -> None:
        batch.timer = None
        if batch.done:
            return
        self.timeouts += 1
        self._resolve(batch, None)
        self._mark_down(f"redis rate-limit store did not answer within {self.timeout:g}s")

    def _resolve(self, batch: _Batch, result: list[int] | None) -> None:
        if batch.done:
            return
        batch.done = True
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
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

    # -- availability ----------------------------------------------------------------------
    def _mark_down(self, reason: str) -> None:
        self._log(reason)
        queue, self._queue = self._queue, deque()
        for batch in queue:  # waiting for a connection to a Redis that failed: fall back now
            self._resolve(batch, None)
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
        task = self._loop.create_task(self._probe())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self) -> None:
        self.probes += 1
        try:
            # Pooled connections may point at a Redis that restarted: drop them all first.
            await self.client.connection_pool.disconnect()
            async with asyncio.timeout(max(0.25, 5 * self.timeout)):
                await self.client.ping()
        except Exception as exc:
            self._failures += 1
            self._log(f"redis rate-limit store still unavailable: {exc!r}")
            self._schedule_probe()
            return
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
    def stats(self) -> dict[str, int]:
        return {
            "batches": self.batches,
            "decisions": self.decisions,
            "answered": self.answered,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "unavailable": self.unavailable,
            "probes": self.probes,
            "recoveries": self.recoveries,
            "available": int(self.available),
        }

    async def close(self) -> None:
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
        if self._probe_handle is not None:
            self._probe_handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
