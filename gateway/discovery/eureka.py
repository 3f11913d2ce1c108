"""Eureka discovery (``type: eureka``): periodic fetches of ``GET {address}/apps/NAME``.

``address`` is the Eureka service URL including its context path (``http://host:8761/eureka``).
Requests carry ``Accept: application/json`` (Eureka answers XML otherwise). Of an application's
instances only those with ``status: UP`` count; each gives its ``ipAddr`` and its enabled port
(``port`` when ``@enabled``, else ``securePort`` when enabled, then with meta ``scheme: https``).
An integer ``metadata.weight`` becomes the weight; the rest of ``metadata`` is kept as meta.
A ``404`` for the application means it has no instances (an empty answer).

Refresh: every ``refresh_interval`` (default 30 s, as Eureka clients do). With ``delta: true``
the first round and every tenth fetch each application in full; the rounds in between ask
``GET {address}/apps/delta`` (the registry's recent changes, all applications) and re-fetch only
the watched applications that appear in it. A server with deltas disabled answers 403 (or 404):
then every round is a full fetch. Failures keep the last set (stale), are counted and retried
with jittered backoff; the round after a failure is a full fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import (
    Backend,
    Backoff,
    DiscoveredInstance,
    DiscoveryError,
    ServiceQuery,
    Sink,
)
from gateway.discovery.http import client_ssl_context

__all__ = ["FULL_EVERY", "EurekaBackend", "parse_application", "parse_delta"]

log = logging.getLogger("gateway.discovery.eureka")

FULL_EVERY = 10  # with deltas: one full fetch per this many rounds, as a consistency check
HEADERS = {"Accept": "application/json"}


def _as_list(value: Any) -> list[Any]:
    # Eureka's JSON (XStream-made) gives a single element as an object instead of a list.
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _enabled_port(value: Any) -> int | None:
    if not isinstance(value, dict):
        return None
    enabled = value.get("@enabled", "true")
    if str(enabled).lower() != "true":
        return None
    try:
        port = int(value.get("$"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def parse_instance(data: Any) -> DiscoveredInstance | None:
    """One Eureka instance -> an instance, None when it is not UP or has no usable port."""
    if not isinstance(data, dict):
        raise ValueError("an instance is not an object")
    if data.get("status") != "UP":
        return None
    host = data.get("ipAddr")
    if not isinstance(host, str) or not host:
        raise ValueError(f"instance {data.get('instanceId')!r} has no ipAddr")
    meta: dict[str, str] = {}
    port = _enabled_port(data.get("port"))
    if port is None:
        port = _enabled_port(data.get("securePort"))
        if port is None:
            return None
        meta["scheme"] = "https"
    weight = 1
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        for key, value in metadata.items():
            if isinstance(value, str | int | float) and not key.startswith("@"):
                meta[str(key)] = str(value)
        if str(metadata.get("weight", "")).isdigit():
            weight = min(max(1, int(metadata["weight"])), 10_000)
    for key in ("app", "hostName"):
        if isinstance(data.get(key), str):
            meta[key] = data[key]
    instance_id = data.get("instanceId") or data.get("hostName") or f"{host}:{port}"
    return DiscoveredInstance(host, port, weight, (), meta, True, str(instance_id))


def parse_application(data: Any) -> tuple[DiscoveredInstance, ...]:
    """The UP instances of a ``GET /apps/NAME`` answer; ``ValueError`` on garbage."""
    if not isinstance(data, dict) or not isinstance(data.get("application"), dict):
        raise ValueError("expected {'application': {...}}")
    out = []
    for item in _as_list(data["application"].get("instance")):
        instance = parse_instance(item)
        if instance is not None:
            out.append(instance)
    return tuple(out)


def parse_delta(data: Any) -> set[str]:
    """Upper-cased names of the applications a ``GET /apps/delta`` answer mentions."""
    if not isinstance(data, dict) or not isinstance(data.get("applications"), dict):
        raise ValueError("expected {'applications': {...}}")
    names = set()
    for app in _as_list(data["applications"].get("application")):
        if not isinstance(app, dict) or not isinstance(app.get("name"), str):
            raise ValueError("an application has no name")
        names.add(app["name"].upper())
    return names


class EurekaBackend(Backend):
    type = "eureka"

    def __init__(self, config: DiscoveryConfig, sink: Sink) -> None:
        super().__init__(config.name, sink)
        self.config = config
        assert config.address is not None
        self.base = config.address.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.delta_supported = config.delta
        self.full_rounds = 0  # visible to tests
        self.delta_rounds = 0

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.config), limit=0)
            self._session = aiohttp.ClientSession(headers=HEADERS, connector=connector)
        return self._session

    async def start(self) -> None:
        if self.queries:
            self._task = asyncio.create_task(self._run(), name=f"eureka-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, path: str) -> tuple[int, Any]:
        url = f"{self.base}{path}"
        timeout = aiohttp.ClientTimeout(
            total=self.config.timeout + 10.0, sock_connect=self.config.timeout
        )
        try:
            async with self.session().get(url, timeout=timeout) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None
        if status != 200:
            return status, raw[:200].decode(errors="replace").strip()
        try:
            return status, orjson.loads(raw)
        except ValueError as exc:
            raise DiscoveryError(f"bad answer from {url} (not JSON): {exc}") from None

    async def fetch(self, query: ServiceQuery) -> tuple[DiscoveredInstance, ...]:
        status, data = await self._get(f"/apps/{quote(query.service, safe='')}")
        if status == 404:
            return ()  # Eureka does not know the application: no instances
        if status != 200:
            raise DiscoveryError(f"HTTP {status} for application {query.service}: {data}")
        try:
            return parse_application(data)
        except ValueError as exc:
            raise DiscoveryError(f"bad application {query.service} from Eureka: {exc}") from None

    async def changed_apps(self) -> set[str] | None:
        """Applications changed recently, or None when the server has no deltas."""
        status, data = await self._get("/apps/delta")
        if status in (403, 404):
            log.info("eureka %s: no delta support (HTTP %d); full fetches only", self.name, status)
            return None
        if status != 200:
            raise DiscoveryError(f"HTTP {status} for /apps/delta: {data}")
        try:
            return parse_delta(data)
        except ValueError as exc:
            raise DiscoveryError(f"bad delta from Eureka: {exc}") from None

    async def _round(self, full: bool) -> None:
        queries = sorted(self.queries, key=str)
        if not full:
            try:
                changed = await self.changed_apps()
            except DiscoveryError as exc:
                self.sink.failure(self.name, None, exc)  # every watched application is stale
                raise
            if changed is None:
                self.delta_supported = False
                full = True
            else:
                self.delta_rounds += 1
                queries = [q for q in queries if q.service.upper() in changed]
        if full:
            self.full_rounds += 1
        failed: DiscoveryError | None = None
        for query in queries:
            try:
                instances = await self.fetch(query)
            except DiscoveryError as exc:
                self.sink.failure(self.name, query, exc)
                failed = exc
                continue
            self.sink.update(self.name, query, instances)
        if failed is not None:
            raise failed

    async def _run(self) -> None:
        backoff = Backoff(self.config.retry_min, self.config.retry_max)
        rounds = 0
        full = True
        while True:
            try:
                await self._round(full or not self.delta_supported)
            except DiscoveryError:  # already reported by _round
                full = True
                await asyncio.sleep(min(backoff.next_delay(), self.config.refresh_interval))
                continue
            backoff.reset()
            rounds += 1
            full = rounds % FULL_EVERY == 0
            await asyncio.sleep(self.config.refresh_interval)
