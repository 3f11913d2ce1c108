"""The embedded service registry (``type: registry``) and the registration HTTP API.

Services announce themselves on the admin port::

    POST   /register                {"service_name", "ip", "port", "tags"?, "weight"?, "ttl"?,
                                     "registry"?}
    GET    /discover                every service with its instances
    GET    /discover/{service}      one service
    DELETE /register/{id}
    PUT    /register/{id}/heartbeat renews the TTL

The API talks to a ``RegistrationStore``: the embedded ``Registry`` of the only ``type:
registry`` backend, or of the backend ``admin.registry`` names (a Consul backend writes through
to its agent); a body's ``registry`` or a ``?registry=NAME`` query picks another one. Each
registry keeps its state in a snapshot plus an append-only journal (``journal.py``), and a
change is acknowledged only once its journal line is fsync'd; the fsync is shared by all the
changes that arrive meanwhile, and the journal is folded into the snapshot when it outgrows it,
so a registration costs the same with 10 or 10,000 registered. Files that cannot be read are
moved aside and reported, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import ipaddress
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from gateway.config.durations import parse_duration
from gateway.discovery.base import Backend, DiscoveredInstance, ServiceQuery, Sink
from gateway.discovery.journal import JournalState, record_line, snapshot_document

if TYPE_CHECKING:
    from gateway.config.model import GatewayConfig

__all__ = [
    "BadRequest",
    "EmbeddedStore",
    "Registration",
    "RegistrationRequest",
    "RegistrationStore",
    "Registry",
    "RegistryBackend",
    "RegistryWriteError",
    "add_discovery_routes",
    "parse_registration",
]

log = logging.getLogger("gateway.discovery.registry")

SERVICE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,255}")


class BadRequest(ValueError):
    """A registration request that cannot be accepted; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    service_name: str
    ip: str
    port: int
    tags: tuple[str, ...] = ()
    weight: int = 1
    ttl: float | None = None
    meta: dict[str, str] = field(default_factory=dict)
    id: str | None = None
    registry: str | None = None  # the registry backend to use (default: the configured one)


def _ttl(value: Any) -> float:
    if isinstance(value, bool):
        raise BadRequest("ttl", "expected seconds (a number) or a duration such as '10s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise BadRequest("ttl", str(exc)) from None
    else:
        raise BadRequest("ttl", "expected seconds (a number) or a duration such as '10s'")
    if not 0 < seconds <= 86400 * 7:
        raise BadRequest("ttl", "must be greater than 0 and at most 7 days")
    return seconds


def parse_registration(body: Any) -> RegistrationRequest:
    """Check a decoded ``POST /register`` body; raises ``BadRequest`` naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("body", "expected a JSON object")
    allowed = {"service_name", "ip", "port", "tags", "weight", "ttl", "meta", "id", "registry"}
    for key in body:
        if key not in allowed:
            raise BadRequest(key, f"unknown field (allowed: {', '.join(sorted(allowed))})")
    name = body.get("service_name")
    if name is None:
        raise BadRequest("service_name", "required")
    if not isinstance(name, str) or not SERVICE_PATTERN.fullmatch(name):
        raise BadRequest("service_name", "expected a name of letters, digits, '_', '.', '-'")
    ip = body.get("ip")
    if ip is None:
        raise BadRequest("ip", "required")
    try:
        ip = str(ipaddress.ip_address(ip)) if isinstance(ip, str) else None
    except ValueError:
        ip = None
    if ip is None:
        raise BadRequest("ip", "expected an IPv4 or IPv6 address")
    port = body.get("port")
    if port is None:
        raise BadRequest("port", "required")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BadRequest("port", "expected an integer from 1 to 65535")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise BadRequest("tags", "expected a list of non-empty strings")
    weight = body.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 10_000:
        raise BadRequest("weight", "expected an integer from 1 to 10000")
    ttl = body.get("ttl")
    meta = body.get("meta", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise BadRequest("meta", "expected an object of string values")
    instance_id = body.get("id")
    if instance_id is not None and (
        not isinstance(instance_id, str) or not ID_PATTERN.fullmatch(instance_id)
    ):
        raise BadRequest("id", "expected letters, digits, '_', '.', ':', '-'")
    registry = body.get("registry")
    if registry is not None and (
        not isinstance(registry, str) or not SERVICE_PATTERN.fullmatch(registry)
    ):
        raise BadRequest("registry", "expected the name of a discovery backend")
    return RegistrationRequest(
        service_name=name,
        ip=ip,
        port=port,
        tags=tuple(dict.fromkeys(tags)),
        weight=weight,
        ttl=None if ttl is None else _ttl(ttl),
        meta=dict(meta),
        id=instance_id,
        registry=registry,
    )


def default_id(service: str, ip: str, port: int) -> str:
    # Deterministic: a service that re-registers after a crash replaces its old entry.
    return f"{service}-{ip.replace(':', '_')}-{port}"


@dataclass(slots=True)
class Registration:
    id: str
    service: str
    ip: str
    port: int
    tags: tuple[str, ...]
    weight: int
    ttl: float | None
    expires: float | None  # wall-clock seconds, so that a restart keeps the deadline
    meta: dict[str, str]
    registered: float
    _instance: DiscoveredInstance | None = field(default=None, compare=False, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service_name": self.service,
            "ip": self.ip,
            "port": self.port,
            "tags": list(self.tags),
            "weight": self.weight,
            "ttl": self.ttl,
            "expires": self.expires,
            "meta": self.meta,
        }

    def instance(self) -> DiscoveredInstance:
        # Made once: every publish of a big service lists all of its instances again.
        if self._instance is None:
            self._instance = DiscoveredInstance(
                self.ip, self.port, self.weight, self.tags, dict(self.meta), True, self.id
            )
        return self._instance

    def to_json(self) -> dict[str, Any]:
        return {**self.describe(), "registered": self.registered}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Registration:
        request = parse_registration(
            {k: data[k] for k in ("service_name", "ip", "port", "tags", "weight", "meta", "id")}
        )
        expires = data.get("expires")
        if expires is not None and not isinstance(expires, int | float):
            raise BadRequest("expires", "expected a number")
        return cls(
            id=request.id or default_id(request.service_name, request.ip, request.port),
            service=request.service_name,
            ip=request.ip,
            port=request.port,
            tags=request.tags,
            weight=request.weight,
            ttl=_ttl(data["ttl"]) if data.get("ttl") is not None else None,
            expires=expires,
            meta=request.meta,
            registered=float(data.get("registered", 0.0)),
        )


class RegistryWriteError(Exception):
    """A change could not be made durable (disk full, permissions): the API answers 500."""


# Compaction: when the journal outgrows both of these, the snapshot is rewritten. Growing the
# threshold with the live state keeps the rewrite cost per change constant (amortised).
JOURNAL_MIN_BYTES = 256 * 1024
JOURNAL_RATIO = 2


class Registry:
    """In-memory registrations with TTLs, persisted as a snapshot plus an append-only journal
    (``gateway.discovery.journal``): each change is one journal line, and the fsync is shared
    by every change made while the previous fsync ran (group commit). ``durable()`` waits until
    every change made so far is on disk; the HTTP API answers only after it.

    Time is injected (``clock``) so that expiry is testable without waiting.
    """

    def __init__(
        self,
        state_file: Path | None,
        default_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
        *,
        compact_min_bytes: int = JOURNAL_MIN_BYTES,
        compact_ratio: float = JOURNAL_RATIO,
    ) -> None:
        self.state_file = state_file
        self.default_ttl = default_ttl
        self.clock = clock
        self.compact_min_bytes = compact_min_bytes
        self.compact_ratio = compact_ratio
        self.entries: dict[str, Registration] = {}
        self._by_service: dict[str, dict[str, Registration]] = {}
        # (expires, id) min-heap; entries made stale by heartbeats or removal are skipped.
        self._deadlines: list[tuple[float, str]] = []
        self.load_error: str | None = None  # reported in /admin/discovery
        self.write_error: str | None = None  # the last failed journal write, if any
        self.listeners: list[Callable[[set[str]], None]] = []
        self._journal: JournalState | None = None
        self._loaded = False
        self._seq = 0  # sequence number of the last change
        self._durable_seq = 0  # every change up to this one is on disk
        self._pending: list[bytes] = []  # journal lines not written yet
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # ascending seq
        self._writer: asyncio.Task[None] | None = None
        self._rewrite_journal = False  # a failed append may have left a partial line
        self._unavailable: str | None = None  # why the state files cannot be used

    # -- persistence -------------------------------------------------------------------------

    def load(self) -> None:
        """Open (lock) the state files and restore the registrations they hold. Files that do
        not exist yet are created at the first change, so an unused registry writes nothing."""
        self._loaded = True
        if self.state_file is None:
            return
        journal = JournalState(self.state_file)
        if self.state_file.exists() or journal.journal.exists():
            self._open(journal)

    def _open(self, journal: JournalState) -> None:
        try:
            recovered = journal.open()
        except OSError as exc:
            self._unavailable = (
                f"registry state {self.state_file} cannot be opened ({exc}); changes are refused"
            )
            self.load_error = self._unavailable
            log.error("%s", self._unavailable)
            return
        self._journal = journal
        problems: list[str] = []
        for item in recovered.instances.values():
            try:
                registration = Registration.from_json(item)
            except (BadRequest, KeyError, TypeError, ValueError) as exc:
                problems.append(f"{item.get('id')!r}: {exc}")
                continue
            self._put(registration)
        self._seq = self._durable_seq = recovered.seq
        if recovered.error is not None or problems:
            self.load_error = recovered.error or ""
            if problems:
                self.load_error += f" {len(problems)} entries dropped: " + "; ".join(problems[:5])
            self.load_error = self.load_error.strip()
            log.error("registry %s: %s", self.state_file, self.load_error)
        if recovered.torn_tail:
            log.warning(
                "registry %s: the journal's last line was incomplete (a crash during a write)"
                " and was ignored",
                self.state_file,
            )
        if journal.journal_bytes:
            # Fold the journal into the snapshot now: this also drops a torn tail, so that the
            # next append starts on a clean line.
            self._compact_sync()
        log.info(
            "registry: %d registrations restored from %s (%d journal records)",
            len(self.entries),
            self.state_file,
            recovered.journal_records,
        )

    def _document(self) -> bytes:
        return snapshot_document(self._seq, [r.to_json() for r in self.entries.values()])

    def _compact_sync(self) -> None:
        assert self._journal is not None
        data = self._document()
        self._journal.write_snapshot(data)
        self._journal.truncate()
        self._journal.compacted(len(data))
        self._pending.clear()
        self._rewrite_journal = False
        self._mark_durable(self._seq)

    def _needs_compaction(self) -> bool:
        journal = self._journal
        assert journal is not None
        limit = max(self.compact_min_bytes, self.compact_ratio * journal.snapshot_bytes)
        return self._rewrite_journal or journal.journal_bytes > limit

    def _check_writable(self) -> None:
        """Refuse a change up front when it could not be made durable."""
        if self.state_file is None:
            return
        if not self._loaded:
            raise RuntimeError("Registry.load() must run before the first change")
        if self._journal is None and self._unavailable is None:
            self._open(JournalState(self.state_file))  # first change: create the files
        if self._unavailable is not None:
            raise RegistryWriteError(self._unavailable)

    def _record(self, record: dict[str, Any]) -> None:
        self._seq += 1
        if self._journal is None:  # in memory only (or unavailable, for expiries)
            self._durable_seq = self._seq
            return
        self._pending.append(record_line({"seq": self._seq, **record}))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside an event loop (tools, tests): write through
            self._flush_sync()
            return
        if self._writer is None:
            self._writer = loop.create_task(self._write_loop(), name="registry-journal")

    def _flush_sync(self) -> None:
        assert self._journal is not None
        if self._needs_compaction():
            self._compact_sync()
            return
        self._journal.append(b"".join(self._pending))
        self._pending.clear()
        self._journal.sync()
        self._mark_durable(self._seq)

    async def _write_loop(self) -> None:
        """Group commit: write everything pending, fsync once (in a thread, so the loop keeps
        accepting changes, which form the next batch), then acknowledge the batch."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending and self._journal is not None:
                journal = self._journal
                upto = self._seq
                try:
                    if self._needs_compaction():
                        await self._compact(loop, journal)
                        continue
                    batch = b"".join(self._pending)
                    self._pending.clear()
                    journal.append(batch)
                    await loop.run_in_executor(None, journal.sync)
                except OSError as exc:
                    self._write_failed(upto, exc)
                    continue
                self.write_error = None
                self._mark_durable(upto)
                if self._needs_compaction():  # rewrite now, not on the next change's time
                    try:
                        await self._compact(loop, journal)
                    except OSError as exc:
                        self._write_failed(upto, exc)
        finally:
            self._writer = None

    async def _compact(self, loop: asyncio.AbstractEventLoop, journal: JournalState) -> None:
        upto = self._seq
        data = self._document()  # every change up to `upto`, including the pending ones
        self._pending.clear()
        await loop.run_in_executor(None, journal.write_snapshot, data)
        await loop.run_in_executor(None, journal.truncate)
        journal.compacted(len(data))
        self._rewrite_journal = False
        self.write_error = None
        log.info(
            "registry %s: compacted (%d registrations, %d bytes)",
            self.state_file,
            len(self.entries),
            len(data),
        )
        self._mark_durable(upto)

    def _mark_durable(self, upto: int) -> None:
        self._durable_seq = max(self._durable_seq, upto)
        while self._waiters and self._waiters[0][0] <= upto:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)

    def _write_failed(self, upto: int, exc: OSError) -> None:
        self.write_error = f"{type(exc).__name__}: {exc}"
        self._pending.clear()  # those changes are refused, not retried behind the callers
        self._rewrite_journal = True
        log.error("registry %s: writing state failed: %s", self.state_file, self.write_error)
        while self._waiters and self._waiters[0][0] <= upto:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_exception(RegistryWriteError(self.write_error))

    async def durable(self) -> None:
        """Return once every change made so far is on disk (at once when not persisted)."""
        target = self._seq
        if self._durable_seq >= target:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        await future

    async def flush(self) -> None:
        """Wait for pending writes and a compaction in progress (so that ``close`` never pulls
        the file from under them); failures are logged and reported, not raised."""
        with contextlib.suppress(RegistryWriteError):
            await self.durable()
        while self._writer is not None:
            await asyncio.shield(self._writer)

    def close(self) -> None:
        """Release the state files (and their lock); call ``flush`` first. Changes made after
        that flush (a call racing a reload) are refused, never acknowledged."""
        self._pending.clear()
        while self._waiters:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_exception(RegistryWriteError("registry closed (reload); retry"))
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.state_file is not None:
            self._unavailable = f"registry state {self.state_file} was closed"

    def persistence(self) -> dict[str, Any]:
        """What ``/admin/discovery`` shows about the state files."""
        journal = self._journal
        return {
            "journal_bytes": journal.journal_bytes if journal else None,
            "snapshot_bytes": journal.snapshot_bytes if journal else None,
            "compactions": journal.compactions if journal else 0,
            "write_error": self.write_error,
        }

    # -- the in-memory index -----------------------------------------------------------------

    def _put(self, registration: Registration) -> Registration | None:
        old = self.entries.get(registration.id)
        if old is not None and old.service != registration.service:
            self._unindex(old)
        self.entries[registration.id] = registration
        self._by_service.setdefault(registration.service, {})[registration.id] = registration
        if registration.expires is not None:
            heapq.heappush(self._deadlines, (registration.expires, registration.id))
        return old

    def _unindex(self, registration: Registration) -> None:
        members = self._by_service.get(registration.service)
        if members is not None:
            members.pop(registration.id, None)
            if not members:
                del self._by_service[registration.service]

    def _remove(self, instance_id: str) -> Registration | None:
        registration = self.entries.pop(instance_id, None)
        if registration is not None:
            self._unindex(registration)
        return registration

    # -- operations --------------------------------------------------------------------------

    def _changed(self, services: set[str]) -> None:
        for listener in list(self.listeners):
            listener(services)

    def register(self, request: RegistrationRequest) -> Registration:
        self._check_writable()
        now = self.clock()
        ttl = request.ttl if request.ttl is not None else self.default_ttl
        instance_id = request.id or default_id(request.service_name, request.ip, request.port)
        registration = Registration(
            id=instance_id,
            service=request.service_name,
            ip=request.ip,
            port=request.port,
            tags=request.tags,
            weight=request.weight,
            ttl=ttl,
            expires=None if ttl is None else now + ttl,
            meta=request.meta,
            registered=now,
        )
        old = self._put(registration)
        self._record({"op": "put", "r": registration.to_json()})
        self._changed({registration.service} | ({old.service} if old else set()))
        return registration

    def deregister(self, instance_id: str) -> bool:
        if instance_id not in self.entries:
            return False
        self._check_writable()
        registration = self._remove(instance_id)
        assert registration is not None
        self._record({"op": "del", "id": instance_id})
        self._changed({registration.service})
        return True

    def heartbeat(self, instance_id: str) -> Registration | None:
        registration = self.entries.get(instance_id)
        if registration is None:
            return None
        if registration.ttl is not None:
            self._check_writable()
            registration.expires = self.clock() + registration.ttl
            heapq.heappush(self._deadlines, (registration.expires, instance_id))
            self._record({"op": "hb", "id": instance_id, "expires": registration.expires})
        return registration

    def _pop_stale_deadlines(self) -> None:
        if len(self._deadlines) > 2 * len(self.entries) + 64:  # heartbeats leave stale items
            self._deadlines = [
                (r.expires, r.id) for r in self.entries.values() if r.expires is not None
            ]
            heapq.heapify(self._deadlines)
        heap = self._deadlines
        while heap:
            deadline, instance_id = heap[0]
            registration = self.entries.get(instance_id)
            if registration is not None and registration.expires == deadline:
                return
            heapq.heappop(heap)

    def expire(self) -> list[Registration]:
        now = self.clock()
        gone: list[Registration] = []
        while True:
            self._pop_stale_deadlines()
            if not self._deadlines or self._deadlines[0][0] > now:
                break
            _, instance_id = heapq.heappop(self._deadlines)
            registration = self._remove(instance_id)
            if registration is None:
                continue
            gone.append(registration)
            self._record({"op": "del", "id": instance_id})
            log.info("registry: %s (%s) expired", registration.id, registration.service)
        if gone:
            self._changed({r.service for r in gone})
        return gone

    def next_expiry(self) -> float | None:
        self._pop_stale_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    def services(self) -> dict[str, list[Registration]]:
        return {name: list(members.values()) for name, members in self._by_service.items()}

    def instances(self, query: ServiceQuery) -> tuple[DiscoveredInstance, ...]:
        members = self._by_service.get(query.service, {}).values()
        if not query.tags:
            return tuple(r.instance() for r in members)
        wanted = set(query.tags)
        return tuple(r.instance() for r in members if wanted.issubset(r.tags))


# Between two instance-set updates of one registry backend: PUBLISH_COST_FACTOR times what the
# last one took (a publish lists every instance of the changed services). Small services are
# published at once; a burst of registrations into one big service leaves most of the loop to
# the requests, and each publish carries a bigger batch.
PUBLISH_COST_FACTOR = 4


class RegistryBackend(Backend):
    """Publishes registry contents to the sink (once per loop tick for all the changes of that
    tick, so a burst of registrations costs one update per service); runs TTL expiry."""

    type = "registry"

    def __init__(self, name: str, sink: Sink, registry: Registry) -> None:
        super().__init__(name, sink)
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()
        self._publish_scheduled = False
        self._sleeping_until: float | None = None  # the expiry loop's next deadline
        self._last_publish = 0.0  # loop time of the last publish
        self._publish_seconds = 0.0  # how long the last publish took

    def _on_change(self, services: set[str]) -> None:
        self._dirty |= services
        if not self._publish_scheduled:
            self._publish_scheduled = True
            loop = asyncio.get_running_loop()
            # A publish costs O(instances of the service), and makes the gateway rebuild its
            # snapshot: a burst of registrations into one big service must not pay that per
            # registration.
            gap = PUBLISH_COST_FACTOR * self._publish_seconds
            wait = self._last_publish + gap - loop.time()
            if wait > 0.001:
                loop.call_later(wait, self._publish)
            else:
                loop.call_soon(self._publish)
        deadline = self.registry.next_expiry()
        if deadline is not None and (
            self._sleeping_until is None or deadline < self._sleeping_until
        ):
            self._wake.set()  # a new TTL expires sooner than the one being waited for

    def _publish(self) -> None:
        self._publish_scheduled = False
        if self._task is None:  # stopped meanwhile: the next start publishes everything
            return
        started = time.perf_counter()
        services, self._dirty = self._dirty, set()
        for query in self.queries:
            if query.service in services:
                self.sink.update(self.name, query, self.registry.instances(query))
        self._publish_seconds = time.perf_counter() - started
        self._last_publish = asyncio.get_running_loop().time()

    async def start(self) -> None:
        self.registry.listeners.append(self._on_change)
        self.registry.expire()
        for query in self.queries:
            self.sink.update(self.name, query, self.registry.instances(query))
        self._task = asyncio.create_task(self._expiry_loop(), name=f"registry-{self.name}-ttl")

    async def _expiry_loop(self) -> None:
        while True:
            self.registry.expire()
            deadline = self.registry.next_expiry()
            delay = 3600.0 if deadline is None else max(0.01, deadline - self.registry.clock())
            self._sleeping_until = self.registry.clock() + min(delay, 60.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(delay, 60.0))

    async def stop(self) -> None:
        if self._on_change in self.registry.listeners:
            self.registry.listeners.remove(self._on_change)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.registry.flush()


# --- the registration API ---------------------------------------------------------------------


class RegistrationStore(Protocol):
    """What the HTTP API needs from a registry (embedded or Consul)."""

    async def register(self, request: RegistrationRequest) -> dict[str, Any]: ...

    async def deregister(self, instance_id: str) -> bool: ...

    async def heartbeat(self, instance_id: str) -> bool: ...

    async def discover(self, service: str | None = None) -> dict[str, list[dict[str, Any]]]: ...


class EmbeddedStore:
    """Answers only once the change is durable (journal line fsync'd)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def register(self, request: RegistrationRequest) -> dict[str, Any]:
        registration = self.registry.register(request)
        await self.registry.durable()
        return registration.describe()

    async def deregister(self, instance_id: str) -> bool:
        if not self.registry.deregister(instance_id):
            return False
        await self.registry.durable()
        return True

    async def heartbeat(self, instance_id: str) -> bool:
        if self.registry.heartbeat(instance_id) is None:
            return False
        await self.registry.durable()
        return True

    async def discover(self, service: str | None = None) -> dict[str, list[dict[str, Any]]]:
        self.registry.expire()  # never show an instance whose TTL has lapsed
        services = self.registry.services()
        if service is not None:
            return {service: [r.describe() for r in services.get(service, [])]}
        return {name: [r.describe() for r in items] for name, items in sorted(services.items())}


class StoreUnavailable(Exception):
    """The store's backend (Consul) failed; the API answers 502."""


class RegistrationDirectory(Protocol):
    """What the registration API needs of the discovery manager (``DiscoveryManager``
    implements it; typed here so that this module does not depend on the manager, which
    depends on it)."""

    @property
    def config(self) -> GatewayConfig: ...

    def registration_store(self, name: str | None = None) -> RegistrationStore: ...

    def status(self) -> dict[str, Any]: ...


MANAGER_KEY: web.AppKey[RegistrationDirectory] = web.AppKey("discovery_manager")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _bad(field_name: str, message: str) -> web.Response:
    return _json({"error": "bad request", "field": field_name, "message": message}, 400)


def _authorized(request: web.Request) -> web.Response | None:
    token = request.app[MANAGER_KEY].config.admin_token
    if not token:
        return None
    given = request.headers.get("X-Admin-Token", "")
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given and hmac.compare_digest(given.encode(), token.encode()):
        return None
    return _json(
        {"error": "unauthorized", "message": "a valid admin token is required"},
        401,
        {"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
    )


def _store(request: web.Request, name: str | None = None) -> RegistrationStore:
    """The store a call goes to: ``name`` (from the body) or ``?registry=NAME``, else the
    default one; raises ``BadRequest`` for a backend that does not exist or cannot register."""
    return request.app[MANAGER_KEY].registration_store(name or request.query.get("registry"))


async def _call(coro: Any) -> Any:
    try:
        return await coro
    except StoreUnavailable as exc:
        raise web.HTTPBadGateway(
            text=json.dumps({"error": "registry backend unavailable", "message": str(exc)}),
            content_type="application/json",
        ) from None
    except RegistryWriteError as exc:
        raise web.HTTPInternalServerError(
            text=json.dumps({"error": "registry state could not be written", "message": str(exc)}),
            content_type="application/json",
        ) from None


async def _register(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return _bad("body", f"invalid JSON: {exc}")
    try:
        registration = parse_registration(body)
        store = _store(request, registration.registry)
    except BadRequest as exc:
        return _bad(exc.field, exc.message)
    result = await _call(store.register(registration))
    return _json(result, 201)


async def _deregister(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    instance_id = request.match_info["id"]
    try:
        store = _store(request)
    except BadRequest as exc:
        return _bad(exc.field, exc.message)
    if not await _call(store.deregister(instance_id)):
        return _json({"error": "not found", "id": instance_id}, 404)
    return _json({"id": instance_id, "deregistered": True})


async def _heartbeat(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    instance_id = request.match_info["id"]
    try:
        store = _store(request)
    except BadRequest as exc:
        return _bad(exc.field, exc.message)
    if not await _call(store.heartbeat(instance_id)):
        return _json({"error": "not found", "id": instance_id}, 404)
    return _json({"id": instance_id, "renewed": True})


async def _discover(request: web.Request) -> web.Response:
    try:
        store = _store(request)
    except BadRequest as exc:
        return _bad(exc.field, exc.message)
    services = await _call(store.discover())
    return _json({"services": services})


async def _discover_one(request: web.Request) -> web.Response:
    service = request.match_info["service"]
    if not SERVICE_PATTERN.fullmatch(service):
        return _bad("service", "expected a name of letters, digits, '_', '.', '-'")
    try:
        store = _store(request)
    except BadRequest as exc:
        return _bad(exc.field, exc.message)
    services = await _call(store.discover(service))
    return _json({"service": service, "instances": services.get(service, [])})


async def _admin_discovery(request: web.Request) -> web.Response:
    return _json(request.app[MANAGER_KEY].status())


def add_discovery_routes(app: web.Application, manager: RegistrationDirectory) -> None:
    """Mount the registration API and ``/admin/discovery`` on the admin app."""
    app[MANAGER_KEY] = manager
    app.router.add_post("/register", _register)
    app.router.add_delete("/register/{id}", _deregister)
    app.router.add_put("/register/{id}/heartbeat", _heartbeat)
    app.router.add_get("/discover", _discover)
    app.router.add_get("/discover/{service}", _discover_one)
    app.router.add_get("/admin/discovery", _admin_discovery)
