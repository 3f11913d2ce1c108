"""The embedded service registry (``type: registry``) and the registration HTTP API.

Services announce themselves on the admin port::

    POST   /register                {"service_name", "ip", "port", "tags"?, "weight"?, "ttl"?}
    GET    /discover                every service with its instances
    GET    /discover/{service}      one service
    DELETE /register/{id}
    PUT    /register/{id}/heartbeat renews the TTL

The API talks to a ``RegistrationStore``: the embedded ``Registry`` by default, or Consul's agent
API when ``admin.registry`` names a Consul backend. The embedded registry keeps its state in a
JSON file written atomically (temp file, fsync, rename), so registrations survive a restart; a
file that cannot be read is moved aside and reported, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from gateway.config.durations import parse_duration
from gateway.discovery.base import Backend, DiscoveredInstance, ServiceQuery, Sink

if TYPE_CHECKING:
    from gateway.discovery.manager import DiscoveryManager

__all__ = [
    "BadRequest",
    "EmbeddedStore",
    "Registration",
    "RegistrationRequest",
    "RegistrationStore",
    "Registry",
    "RegistryBackend",
    "add_discovery_routes",
    "parse_registration",
]

log = logging.getLogger("gateway.discovery.registry")

STATE_VERSION = 1
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
    allowed = {"service_name", "ip", "port", "tags", "weight", "ttl", "meta", "id"}
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
    return RegistrationRequest(
        service_name=name,
        ip=ip,
        port=port,
        tags=tuple(dict.fromkeys(tags)),
        weight=weight,
        ttl=None if ttl is None else _ttl(ttl),
        meta=dict(meta),
        id=instance_id,
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
        return DiscoveredInstance(
            self.ip, self.port, self.weight, self.tags, dict(self.meta), True, self.id
        )

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


class Registry:
    """In-memory registrations with TTLs, persisted to ``state_file`` after every change.

    Time is injected (``clock``) so that expiry is testable without waiting.
    """

    def __init__(
        self,
        state_file: Path | None,
        default_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_file = state_file
        self.default_ttl = default_ttl
        self.clock = clock
        self.entries: dict[str, Registration] = {}
        self.load_error: str | None = None  # reported in /admin/discovery
        self.listeners: list[Callable[[set[str]], None]] = []

    # -- persistence -------------------------------------------------------------------------

    def load(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            data = json.loads(self.state_file.read_bytes())
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"expected a version {STATE_VERSION} registry state object")
            items = data.get("instances")
            if not isinstance(items, list):
                raise ValueError("'instances' is not a list")
            entries = {}
            for item in items:
                if not isinstance(item, dict):
                    raise ValueError("an instance entry is not an object")
                registration = Registration.from_json(item)
                entries[registration.id] = registration
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self.state_file.with_name(f"{self.state_file.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.state_file, aside)
            self.load_error = (
                f"registry state {self.state_file} unreadable ({exc}); moved to {aside}"
            )
            log.error("%s: starting with no registrations", self.load_error)
            return
        self.entries = entries
        log.info("registry: %d registrations restored from %s", len(entries), self.state_file)

    def save(self) -> None:
        if self.state_file is None:
            return
        document = {
            "version": STATE_VERSION,
            "instances": [r.to_json() for r in self.entries.values()],
        }
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        directory = self.state_file.parent
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{self.state_file.name}.{os.getpid()}.tmp"
        # Write, fsync, rename, fsync the directory: a crash leaves the old or the new file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_file)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- operations --------------------------------------------------------------------------

    def _changed(self, services: set[str]) -> None:
        self.save()
        for listener in list(self.listeners):
            listener(services)

    def register(self, request: RegistrationRequest) -> Registration:
        now = self.clock()
        ttl = request.ttl if request.ttl is not None else self.default_ttl
        instance_id = request.id or default_id(request.service_name, request.ip, request.port)
        old = self.entries.get(instance_id)
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
        self.entries[instance_id] = registration
        self._changed({registration.service} | ({old.service} if old else set()))
        return registration

    def deregister(self, instance_id: str) -> bool:
        registration = self.entries.pop(instance_id, None)
        if registration is None:
            return False
        self._changed({registration.service})
        return True

    def heartbeat(self, instance_id: str) -> Registration | None:
        registration = self.entries.get(instance_id)
        if registration is None:
            return None
        if registration.ttl is not None:
            registration.expires = self.clock() + registration.ttl
            self.save()
        return registration

    def expire(self) -> list[Registration]:
        now = self.clock()
        gone = [r for r in self.entries.values() if r.expires is not None and r.expires <= now]
        for registration in gone:
            del self.entries[registration.id]
            log.info("registry: %s (%s) expired", registration.id, registration.service)
        if gone:
            self._changed({r.service for r in gone})
        return gone

    def next_expiry(self) -> float | None:
        deadlines = [r.expires for r in self.entries.values() if r.expires is not None]
        return min(deadlines) if deadlines else None

    def services(self) -> dict[str, list[Registration]]:
        out: dict[str, list[Registration]] = {}
        for registration in self.entries.values():
            out.setdefault(registration.service, []).append(registration)
        return out

    def instances(self, query: ServiceQuery) -> tuple[DiscoveredInstance, ...]:
        wanted = set(query.tags)
        return tuple(
            r.instance()
            for r in self.entries.values()
            if r.service == query.service and wanted.issubset(r.tags)
        )


class RegistryBackend(Backend):
    """Publishes registry contents to the sink on every change; runs TTL expiry."""

    type = "registry"

    def __init__(self, name: str, sink: Sink, registry: Registry) -> None:
        super().__init__(name, sink)
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _on_change(self, services: set[str]) -> None:
        for query in self.queries:
            if query.service in services:
                self.sink.update(self.name, query, self.registry.instances(query))
        self._wake.set()  # a new TTL may expire sooner than the one being waited for

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


# --- the registration API ---------------------------------------------------------------------


class RegistrationStore(Protocol):
    """What the HTTP API needs from a registry (embedded or Consul)."""

    async def register(self, request: RegistrationRequest) -> dict[str, Any]: ...

    async def deregister(self, instance_id: str) -> bool: ...

    async def heartbeat(self, instance_id: str) -> bool: ...

    async def discover(self, service: str | None = None) -> dict[str, list[dict[str, Any]]]: ...


class EmbeddedStore:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def register(self, request: RegistrationRequest) -> dict[str, Any]:
        return self.registry.register(request).describe()

    async def deregister(self, instance_id: str) -> bool:
        return self.registry.deregister(instance_id)

    async def heartbeat(self, instance_id: str) -> bool:
        return self.registry.heartbeat(instance_id) is not None

    async def discover(self, service: str | None = None) -> dict[str, list[dict[str, Any]]]:
        self.registry.expire()  # never show an instance whose TTL has lapsed
        services = self.registry.services()
        if service is not None:
            return {service: [r.describe() for r in services.get(service, [])]}
        return {name: [r.describe() for r in items] for name, items in sorted(services.items())}


class StoreUnavailable(Exception):
    """The store's backend (Consul) failed; the API answers 502."""


MANAGER_KEY: web.AppKey[DiscoveryManager] = web.AppKey("discovery_manager")


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


def _store(request: web.Request) -> RegistrationStore:
    return request.app[MANAGER_KEY].registration_store()


async def _call(coro: Any) -> Any:
    try:
        return await coro
    except StoreUnavailable as exc:
        raise web.HTTPBadGateway(
            text=json.dumps({"error": "registry backend unavailable", "message": str(exc)}),
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
    except BadRequest as exc:
        return _bad(exc.field, exc.message)
    result = await _call(_store(request).register(registration))
    return _json(result, 201)


async def _deregister(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    instance_id = request.match_info["id"]
    if not await _call(_store(request).deregister(instance_id)):
        return _json({"error": "not found", "id": instance_id}, 404)
    return _json({"id": instance_id, "deregistered": True})


async def _heartbeat(request: web.Request) -> web.Response:
    denied = _authorized(request)
    if denied is not None:
        return denied
    instance_id = request.match_info["id"]
    if not await _call(_store(request).heartbeat(instance_id)):
        return _json({"error": "not found", "id": instance_id}, 404)
    return _json({"id": instance_id, "renewed": True})


async def _discover(request: web.Request) -> web.Response:
    services = await _call(_store(request).discover())
    return _json({"services": services})


async def _discover_one(request: web.Request) -> web.Response:
    service = request.match_info["service"]
    if not SERVICE_PATTERN.fullmatch(service):
        return _bad("service", "expected a name of letters, digits, '_', '.', '-'")
    services = await _call(_store(request).discover(service))
    return _json({"service": service, "instances": services.get(service, [])})


async def _admin_discovery(request: web.Request) -> web.Response:
    return _json(request.app[MANAGER_KEY].status())


def add_discovery_routes(app: web.Application, manager: DiscoveryManager) -> None:
    """Mount the registration API and ``/admin/discovery`` on the admin app."""
    app[MANAGER_KEY] = manager
    app.router.add_post("/register", _register)
    app.router.add_delete("/register/{id}", _deregister)
    app.router.add_put("/register/{id}/heartbeat", _heartbeat)
    app.router.add_get("/discover", _discover)
    app.router.add_get("/discover/{service}", _discover_one)
    app.router.add_get("/admin/discovery", _admin_discovery)
