"""A fake Eureka server written from the Eureka REST operations documentation
(github.com/Netflix/eureka/wiki/Eureka-REST-operations), JSON only.

| operation | request | answer |
| --- | --- | --- |
| register | ``POST /eureka/apps/APP`` with ``{"instance": {...}}`` | 204 |
| de-register | ``DELETE /eureka/apps/APP/ID`` | 200, 404 unknown |
| heartbeat | ``PUT /eureka/apps/APP/ID`` | 200, 404 unknown (the client re-registers) |
| all | ``GET /eureka/apps`` | ``{"applications": {...}}`` |
| one app | ``GET /eureka/apps/APP`` | ``{"application": {...}}``, 404 unknown |
| delta | ``GET /eureka/apps/delta`` | recent changes (``actionType``); 403 if disabled |
| out of service | ``PUT /eureka/apps/APP/ID/status?value=OUT_OF_SERVICE`` | 200, 404 |
| back in service | ``DELETE /eureka/apps/APP/ID/status?value=UP`` | 200, 404 |

Leases: an instance not renewed within its ``leaseInfo.durationInSecs`` (default 90) is evicted by
a task that runs every ``eviction_interval`` seconds. Without ``Accept: application/json`` the
answers are XML, as Eureka's default is (so a client that forgets the header notices).
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

from aiohttp import web

from tests.integration.backends import LoopThread


def eureka_instance(
    app: str,
    instance_id: str,
    ip: str,
    port: int | None,
    secure_port: int | None = None,
    status: str = "UP",
    lease_seconds: int = 90,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An instance document as a Eureka client (DiscoveryClient) registers it."""
    return {
        "instance": {
            "instanceId": instance_id,
            "hostName": f"{instance_id}.local",
            "app": app.upper(),
            "ipAddr": ip,
            "status": status,
            "overriddenStatus": "UNKNOWN",
            "port": {"$": port or 0, "@enabled": "true" if port else "false"},
            "securePort": {
                "$": secure_port or 443,
                "@enabled": "true" if secure_port else "false",
            },
            "countryId": 1,
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn",
            },
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": lease_seconds},
            "metadata": metadata or {"@class": "java.util.Collections$EmptyMap"},
            "vipAddress": app.lower(),
        }
    }


class FakeEureka:
    def __init__(self) -> None:
        self.thread = LoopThread()
        self.apps: dict[str, dict[str, dict[str, Any]]] = {}  # APP -> id -> instance
        self.leases: dict[tuple[str, str], float] = {}  # (APP, id) -> expiry (monotonic)
        self.changes: list[tuple[float, str, dict[str, Any]]] = []  # (time, actionType, inst)
        self.delta_enabled = True
        self.delta_retention = 180.0
        self.eviction_interval = 0.2
        self.version = 1
        self.requests: list[str] = []  # "METHOD path" of every request
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._evictor: asyncio.Task[None] | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}/eureka"

    def start(self) -> None:
        self.port = self.thread.call(self._start())

    async def _start(self) -> int:
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_get("/eureka/apps", self._all)
        r.add_get("/eureka/apps/delta", self._delta)
        r.add_get("/eureka/apps/{app}", self._one)
        r.add_post("/eureka/apps/{app}", self._register)
        r.add_put("/eureka/apps/{app}/{id}", self._heartbeat)
        r.add_delete("/eureka/apps/{app}/{id}", self._cancel)
        r.add_put("/eureka/apps/{app}/{id}/status", self._status_override)
        r.add_delete("/eureka/apps/{app}/{id}/status", self._status_remove)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._evictor = asyncio.create_task(self._evict_loop())
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def stop(self) -> None:
        self.thread.call(self._stop())

    async def _stop(self) -> None:
        if self._evictor is not None:
            self._evictor.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def close(self) -> None:
        if self._runner is not None:
            self.stop()
        self.thread.stop()

    def run(self, method: str, path: str, body: Any = None) -> int:
        """Call the fake's own REST API from the test thread; the HTTP status."""

        async def go() -> int:
            import aiohttp

            async with (
                aiohttp.ClientSession(headers={"Accept": "application/json"}) as session,
                session.request(
                    method, f"http://127.0.0.1:{self.port}{path}", json=body
                ) as response,
            ):
                await response.read()
                return response.status

        return int(self.thread.call(go()))

    # -- registry ------------------------------------------------------------------------------

    def _changed(self, action: str, instance: dict[str, Any]) -> None:
        self.version += 1
        snapshot = copy.deepcopy(instance)
        snapshot["actionType"] = action
        now = time.monotonic()
        self.changes.append((now, action, snapshot))
        self.changes = [c for c in self.changes if now - c[0] <= self.delta_retention]

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(self.eviction_interval)
            now = time.monotonic()
            for (app, instance_id), expiry in list(self.leases.items()):
                if expiry < now:
                    instance = self.apps.get(app, {}).pop(instance_id, None)
                    del self.leases[(app, instance_id)]
                    if instance is not None:
                        self._changed("DELETED", instance)

    def _renew(self, app: str, instance: dict[str, Any]) -> None:
        lease = instance.get("leaseInfo") or {}
        duration = float(lease.get("durationInSecs", 90))
        self.leases[(app, instance["instanceId"])] = time.monotonic() + duration

    # -- HTTP ----------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(f"{request.method} {request.path}")
        response: web.StreamResponse = await handler(request)
        return response

    @staticmethod
    def _answer(request: web.Request, document: dict[str, Any]) -> web.Response:
        if "json" not in request.headers.get("Accept", ""):
            return web.Response(text="<applications/>", content_type="application/xml")
        return web.json_response(document)

    def _application(self, name: str) -> dict[str, Any]:
        return {"name": name, "instance": list(self.apps.get(name, {}).values())}

    def _hashcode(self) -> str:
        counts: dict[str, int] = {}
        for instances in self.apps.values():
            for instance in instances.values():
                counts[instance["status"]] = counts.get(instance["status"], 0) + 1
        return "".join(f"{status}_{n}_" for status, n in sorted(counts.items()))

    async def _all(self, request: web.Request) -> web.Response:
        apps = [self._application(n) for n in sorted(self.apps) if self.apps[n]]
        return self._answer(
            request,
            {
                "applications": {
                    "versions__delta": str(self.version),
                    "apps__hashcode": self._hashcode(),
                    "application": apps,
                }
            },
        )

    async def _delta(self, request: web.Request) -> web.Response:
        if not self.delta_enabled:
            return web.Response(status=403)
        by_app: dict[str, list[dict[str, Any]]] = {}
        now = time.monotonic()
        for at, _, instance in self.changes:
            if now - at <= self.delta_retention:
                by_app.setdefault(instance["app"], []).append(instance)
        return self._answer(
            request,
            {
                "applications": {
                    "versions__delta": str(self.version),
                    "apps__hashcode": self._hashcode(),
                    "application": [{"name": n, "instance": i} for n, i in by_app.items()],
                }
            },
        )

    async def _one(self, request: web.Request) -> web.Response:
        name = request.match_info["app"].upper()
        if not self.apps.get(name):
            return web.Response(status=404)
        return self._answer(request, {"application": self._application(name)})

    async def _register(self, request: web.Request) -> web.Response:
        name = request.match_info["app"].upper()
        try:
            instance = (await request.json())["instance"]
            instance_id = instance["instanceId"]
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400)
        instance["app"] = name
        action = "MODIFIED" if instance_id in self.apps.get(name, {}) else "ADDED"
        self.apps.setdefault(name, {})[instance_id] = instance
        self._renew(name, instance)
        self._changed(action, instance)
        return web.Response(status=204)

    def _find(self, request: web.Request) -> tuple[str, dict[str, Any] | None]:
        name = request.match_info["app"].upper()
        return name, self.apps.get(name, {}).get(request.match_info["id"])

    async def _heartbeat(self, request: web.Request) -> web.Response:
        name, instance = self._find(request)
        if instance is None:
            return web.Response(status=404)
        self._renew(name, instance)
        return web.Response(status=200)

    async def _cancel(self, request: web.Request) -> web.Response:
        name, instance = self._find(request)
        if instance is None:
            return web.Response(status=404)
        del self.apps[name][instance["instanceId"]]
        self.leases.pop((name, instance["instanceId"]), None)
        self._changed("DELETED", instance)
        return web.Response(status=200)

    async def _status_override(self, request: web.Request) -> web.Response:
        _, instance = self._find(request)
        if instance is None:
            return web.Response(status=404)
        value = request.query.get("value", "")
        instance["status"] = instance["overriddenStatus"] = value
        self._changed("MODIFIED", instance)
        return web.Response(status=200)

    async def _status_remove(self, request: web.Request) -> web.Response:
        _, instance = self._find(request)
        if instance is None:
            return web.Response(status=404)
        instance["overriddenStatus"] = "UNKNOWN"
        instance["status"] = request.query.get("value", "UP")
        self._changed("MODIFIED", instance)
        return web.Response(status=200)
