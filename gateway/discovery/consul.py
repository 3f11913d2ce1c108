"""Consul discovery (``type: consul``): blocking queries on ``/v1/health/service/NAME``.

One long-poll loop per distinct query (service + tags + datacenter + passing filter), shared by
every upstream that uses it. Index handling follows Consul's blocking-query documentation:

- the first request (and the one after any reset) has no ``index`` and returns at once;
- ``X-Consul-Index`` missing or not a number: the endpoint does not block, so poll at a bounded
  rate instead of spinning;
- index lower than the previous one (agent restarted, snapshot restore): reset to 0;
- index <= 0 must never be sent (it would not block): reset to 0;
- index unchanged after a return that was not a timeout: rate-limit the loop.

Failures (unreachable, HTTP errors, garbage) are reported to the sink and retried with jittered
backoff; the next request starts from index 0 so that a restarted agent is picked up at once.

``ConsulStore`` is the registration API's store when ``admin.registry`` names a Consul backend:
``/register`` becomes an agent service registration (with a TTL check when ``ttl`` is given).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import (
    Backend,
    Backoff,
    DiscoveredInstance,
    DiscoveryError,
    ServiceQuery,
    Sink,
    WatchTasks,
)
from gateway.discovery.http import client_ssl_context
from gateway.discovery.registry import RegistrationRequest, StoreUnavailable, default_id

__all__ = ["ConsulBackend", "ConsulStore", "next_index", "parse_health"]

log = logging.getLogger("gateway.discovery.consul")

# Shortest time between two requests of one watch when the index gives no reason to block.
MIN_INTERVAL = 0.1
# Poll interval when the server sends no X-Consul-Index (no blocking possible).
POLL_INTERVAL = 0.5


def next_index(previous: int, header: str | None) -> tuple[int, bool]:
    """(index for the next request, whether to rate-limit the next request)."""
    if header is None:
        return 0, True
    try:
        index = int(header)
    except ValueError:
        return 0, True
    if index <= 0 or index < previous:
        return 0, False
    return index, index == previous


def _checks_pass(checks: Any) -> bool:
    if not isinstance(checks, list):
        return True
    return all(isinstance(c, dict) and c.get("Status") == "passing" for c in checks)


def parse_health(data: Any, query: ServiceQuery) -> tuple[DiscoveredInstance, ...]:
    """Instances from a ``/v1/health/service`` answer; ``ValueError`` on garbage."""
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of service entries")
    wanted = set(query.tags)
    out: list[DiscoveredInstance] = []
    for entry in data:
        if not isinstance(entry, dict):
            raise ValueError("a service entry is not an object")
        service, node = entry.get("Service"), entry.get("Node") or {}
        if not isinstance(service, dict) or not isinstance(node, dict):
            raise ValueError("a service entry lacks Service/Node objects")
        # Service.Address is optional in Consul; the node's address is the documented fallback.
        host = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if not isinstance(host, str) or not host:
            raise ValueError(f"service {service.get('ID')!r} has no address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"service {service.get('ID')!r} has an invalid port {port!r}")
        tags = tuple(t for t in service.get("Tags") or () if isinstance(t, str))
        if not wanted.issubset(tags):  # also done by the server; old agents ignore repeats
            continue
        healthy = _checks_pass(entry.get("Checks"))
        if query.passing_only and not healthy:
            continue
        weights = service.get("Weights")
        weight = weights.get("Passing", 1) if isinstance(weights, dict) else 1
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            weight = 1
        meta = service.get("Meta") if isinstance(service.get("Meta"), dict) else {}
        out.append(
            DiscoveredInstance(
                host.strip("[]"),
                port,
                min(weight, 10_000),
                tags,
                {str(k): str(v) for k, v in (meta or {}).items()},
                healthy,
                str(service.get("ID", "")),
            )
        )
    return tuple(out)


class _Client:
    """An aiohttp session bound to one Consul agent."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        assert config.address is not None
        self.base = config.address.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"X-Consul-Token": self.config.token} if self.config.token else {}
            connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.config), limit=0)
            self._session = aiohttp.ClientSession(headers=headers, connector=connector)
        return self._session

    def timeout(self, total: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, sock_connect=self.config.timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ConsulBackend(Backend):
    type = "consul"

    def __init__(self, config: DiscoveryConfig, sink: Sink) -> None:
        super().__init__(config.name, sink)
        self.config = config
        self.client = _Client(config)
        self._tasks = WatchTasks()

    async def start(self) -> None:
        self._tasks.start("consul", self.queries, self._watch)

    async def stop(self) -> None:
        await self._tasks.cancel()
        await self.client.close()

    def registration_store(self) -> ConsulStore:
        return ConsulStore(self.client)

    async def fetch(
        self, query: ServiceQuery, index: int
    ) -> tuple[tuple[DiscoveredInstance, ...], str | None]:
        """One (possibly blocking) request: instances and the raw X-Consul-Index header."""
        params: list[tuple[str, str]] = []
        wait = self.config.wait
        if index > 0:
            params += [("index", str(index)), ("wait", f"{int(wait * 1000)}ms")]
        if query.passing_only:
            params.append(("passing", "1"))
        params += [("tag", tag) for tag in query.tags]
        if query.datacenter:
            params.append(("dc", query.datacenter))
        # Consul adds up to wait/16 of jitter to a blocking query: allow for it and some slack.
        total = (wait + wait / 16 + 5.0) if index > 0 else 10.0
        url = f"{self.client.base}/v1/health/service/{query.service}"
        try:
            async with self.client.session().get(
                url, params=params, timeout=self.client.timeout(total)
            ) as response:
                body = await response.read()
                if response.status != 200:
                    text = body[:200].decode(errors="replace").strip()
                    raise DiscoveryError(f"HTTP {response.status} from {url}: {text}")
                header = response.headers.get("X-Consul-Index")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            import orjson

            data = orjson.loads(body)
            return parse_health(data, query), header
        except ValueError as exc:
            raise DiscoveryError(f"bad answer from {url}: {exc}") from None

    async def _watch(self, query: ServiceQuery) -> None:
        backoff = Backoff(self.config.retry_min, self.config.retry_max)
        quick = Backoff(MIN_INTERVAL, max(self.config.retry_max, MIN_INTERVAL))
        index = 0
        while True:
            started = time.monotonic()
            try:
                instances, header = await self.fetch(query, index)
            except DiscoveryError as exc:
                self.sink.failure(self.name, query, exc)
                index = 0
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.sink.update(self.name, query, instances)
            index, limit = next_index(index, header)
            elapsed = time.monotonic() - started
            if header is None or not header.strip().lstrip("-").isdigit():
                await asyncio.sleep(max(0.0, POLL_INTERVAL - elapsed))
            elif limit and elapsed < self.config.wait:
                # Returned early without a new index: back off so that we never busy-loop.
                await asyncio.sleep(quick.next_delay())
            else:
                quick.reset()
                if elapsed < MIN_INTERVAL:
                    await asyncio.sleep(MIN_INTERVAL - elapsed)


class ConsulStore:
    """Registration API on top of the Consul agent (service register/deregister, TTL checks)."""

    def __init__(self, client: _Client) -> None:
        self.client = client

    async def _request(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        url = f"{self.client.base}{path}"
        try:
            async with self.client.session().request(
                method, url, json=body, params=params, timeout=self.client.timeout(10.0)
            ) as response:
                data = await response.read()
                if response.status >= 500:
                    raise StoreUnavailable(f"HTTP {response.status} from Consul: {data[:200]!r}")
                if response.content_type == "application/json" and data:
                    import orjson

                    return response.status, orjson.loads(data)
                return response.status, data.decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Consul at {self.client.base}: {exc}") from None

    async def register(self, request: RegistrationRequest) -> dict[str, Any]:
        instance_id = request.id or default_id(request.service_name, request.ip, request.port)
        body: dict[str, Any] = {
            "ID": instance_id,
            "Name": request.service_name,
            "Address": request.ip,
            "Port": request.port,
            "Tags": list(request.tags),
            "Meta": request.meta,
            "Weights": {"Passing": request.weight, "Warning": 1},
        }
        if request.ttl is not None:
            # A TTL check goes critical when not renewed; the health query's passing filter then
            # drops the instance. Consul removes it after DeregisterCriticalServiceAfter (>= 1m).
            body["Check"] = {
                "CheckID": f"service:{instance_id}",
                "TTL": f"{int(request.ttl * 1000)}ms",
                "Status": "passing",
                "DeregisterCriticalServiceAfter": "1m",
            }
        status, data = await self._request("PUT", "/v1/agent/service/register", body)
        if status != 200:
            raise StoreUnavailable(f"Consul refused the registration (HTTP {status}): {data}")
        return {
            "id": instance_id,
            "service_name": request.service_name,
            "ip": request.ip,
            "port": request.port,
            "tags": list(request.tags),
            "weight": request.weight,
            "ttl": request.ttl,
            "meta": request.meta,
        }

    async def _known(self, instance_id: str) -> bool:
        status, _ = await self._request("GET", f"/v1/agent/service/{instance_id}")
        return status == 200

    async def deregister(self, instance_id: str) -> bool:
        if not await self._known(instance_id):
            return False
        status, data = await self._request("PUT", f"/v1/agent/service/deregister/{instance_id}")
        if status != 200:
            raise StoreUnavailable(f"Consul refused the deregistration (HTTP {status}): {data}")
        return True

    async def heartbeat(self, instance_id: str) -> bool:
        status, _ = await self._request("PUT", f"/v1/agent/check/pass/service:{instance_id}")
        if status == 200:
            return True
        return await self._known(instance_id)  # registered without a TTL: nothing to renew

    async def discover(self, service: str | None = None) -> dict[str, list[dict[str, Any]]]:
        if service is None:
            status, catalog = await self._request("GET", "/v1/catalog/services")
            if status != 200 or not isinstance(catalog, dict):
                raise StoreUnavailable(f"Consul catalog answered HTTP {status}")
            names = sorted(n for n in catalog if n != "consul")
        else:
            names = [service]
        out: dict[str, list[dict[str, Any]]] = {}
        for name in names:
            status, data = await self._request("GET", f"/v1/health/service/{name}")
            if status != 200:
                raise StoreUnavailable(f"Consul health answered HTTP {status}")
            try:
                instances = parse_health(data, ServiceQuery(name, passing_only=False))
            except ValueError as exc:
                raise StoreUnavailable(f"bad answer from Consul: {exc}") from None
            out[name] = [
                {**i.describe(), "service_name": name, "ip": i.host, "port": i.port}
                for i in instances
            ]
        return out
