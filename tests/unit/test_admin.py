"""Admin server endpoints, exercised through a real aiohttp test server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.admin import AdminState, create_admin_app
from gateway.config.model import (
    Address,
    GatewayConfig,
    InstanceConfig,
    LimitsConfig,
    MatchConfig,
    PathMatch,
    RewriteConfig,
    RouteConfig,
    UpstreamConfig,
)
from gateway.metrics import GatewayMetrics, make_registry

RAW: dict[str, Any] = {
    "listen": "127.0.0.1:8080",
    "admin": "127.0.0.1:9901",
    "upstreams": {"demo": {"instances": ["127.0.0.1:9001", "127.0.0.1:9002"]}},
    "routes": [
        {
            "name": "demo",
            "match": {"path": {"prefix": "/demo"}},
            "upstream": "demo",
            "rewrite": {"strip_prefix": "/demo"},
        }
    ],
}


def make_config() -> GatewayConfig:
    return GatewayConfig(
        listen=Address("127.0.0.1", 8080),
        admin=Address("127.0.0.1", 9901),
        workers=1,
        trusted_proxies=(),
        limits=LimitsConfig(),
        upstreams={
            "demo": UpstreamConfig(
                name="demo",
                instances=(InstanceConfig("127.0.0.1", 9001), InstanceConfig("127.0.0.1", 9002)),
            )
        },
        routes=(
            RouteConfig(
                name="demo",
                match=MatchConfig(path=PathMatch("prefix", "/demo")),
                upstream="demo",
                rewrite=RewriteConfig(strip_prefix="/demo"),
            ),
        ),
        source="gateway.yaml",
        sha256="ab" * 32,
        raw=RAW,
    )


@pytest.fixture
def state() -> AdminState:
    metrics = GatewayMetrics()
    return AdminState(config=make_config(), metrics=metrics, registry=make_registry(metrics))


@pytest.fixture
async def client(aiohttp_client: Any, state: AdminState) -> Any:
    return await aiohttp_client(create_admin_app(state))


async def test_healthz(client: Any) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert orjson.loads(await resp.read()) == {"status": "ok"}


async def test_readyz_follows_state(client: Any, state: AdminState) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert orjson.loads(await resp.read()) == {"status": "starting"}

    state.ready = True
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert orjson.loads(await resp.read()) == {"status": "ready"}

    state.draining = True
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert orjson.loads(await resp.read()) == {"status": "draining"}


async def test_metrics_text_exposition(client: Any, state: AdminState) -> None:
    state.metrics.observe_request("demo", "demo", "GET", 200, 0.002, 0.0015, 0.0003)
    state.metrics.observe_request("demo", "demo", "GET", 200, 0.004, 0.0035, 0.0003)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    (total,) = [s for s in fams["gateway_requests"].samples if s.name == "gateway_requests_total"]
    assert total.value == 2
    assert total.labels == {"route": "demo", "upstream": "demo", "method": "GET", "code": "200"}
    assert "gateway_request_duration_seconds" in fams
    assert "gateway_upstream_duration_seconds" in fams
    assert "gateway_overhead_seconds" in fams
    assert "gateway_client_connections" in fams


async def test_metrics_openmetrics_when_asked(client: Any, state: AdminState) -> None:
    state.metrics.observe_request("demo", "demo", "GET", 200, 0.002, 0.0015, 0.0003)
    resp = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    text = await resp.text()
    assert text.endswith("# EOF\n")
    assert "gateway_requests" in {f.name for f in parse_openmetrics(text)}


async def test_admin_config(client: Any) -> None:
    resp = await client.get("/admin/config")
    assert resp.status == 200
    body = orjson.loads(await resp.read())
    assert body == {"sha256": "ab" * 32, "source": "gateway.yaml", "config": RAW}


async def test_admin_routes_from_config_without_describe(client: Any) -> None:
    resp = await client.get("/admin/routes")
    assert resp.status == 200
    (route,) = orjson.loads(await resp.read())["routes"]
    assert route["name"] == "demo"
    assert route["upstream"] == "demo"
    assert route["match"]["path"] == {"kind": "prefix", "value": "/demo"}
    assert route["rewrite"]["strip_prefix"] == "/demo"


async def test_admin_routes_uses_describe(client: Any, state: AdminState) -> None:
    state.routes_describe = lambda: [{"name": "demo", "priority": 0}]
    resp = await client.get("/admin/routes")
    assert orjson.loads(await resp.read()) == {"routes": [{"name": "demo", "priority": 0}]}


async def test_unknown_path_is_json_404(client: Any) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert orjson.loads(await resp.read()) == {"error": "not found", "status": 404, "path": "/nope"}


async def test_wrong_method_is_json_405(client: Any) -> None:
    resp = await client.post("/healthz")
    assert resp.status == 405
    assert resp.content_type == "application/json"
    assert "GET" in resp.headers["Allow"]
    assert orjson.loads(await resp.read())["status"] == 405


# --- access with admin.token --------------------------------------------------------------------

TOKEN = "admin-token-0123456789"
REDIS_PASSWORD = "redis-password-0123"
SECRET_RAW: dict[str, Any] = {
    **RAW,
    "admin": {"address": "127.0.0.1:9901", "token": TOKEN},
    "redis": {"url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"},
}
PROTECTED_READS = ["/admin/config", "/admin/routes", "/admin/upstreams", "/admin/workers"]
OPEN_READS = ["/", "/healthz", "/metrics"]


def with_token(
    state: AdminState, *, read_without_token: bool = False
) -> tuple[AdminState, list[tuple[str, bool]]]:
    """``state`` guarded by TOKEN; the list records the (trigger, force) of each reload."""
    import dataclasses

    state.config = dataclasses.replace(
        state.config,
        admin_token=TOKEN,
        admin_read_without_token=read_without_token,
        raw=SECRET_RAW,
    )
    state.ready = True
    reloads: list[tuple[str, bool]] = []

    async def reload(trigger: str, force: bool) -> dict[str, Any]:
        reloads.append((trigger, force))
        return {"result": "success", "sha256": "cd" * 32}

    state.reload = reload
    return state, reloads


async def test_reads_need_the_token_when_one_is_set(aiohttp_client: Any, state: AdminState) -> None:
    client = await aiohttp_client(create_admin_app(with_token(state)[0]))
    for path in PROTECTED_READS:
        resp = await client.get(path)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.read()
        assert TOKEN.encode() not in body and REDIS_PASSWORD.encode() not in body
        resp = await client.get(path, headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401, path
        resp = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 200, path
        resp = await client.get(path, headers={"X-Admin-Token": TOKEN})  # the older header
        assert resp.status == 200, path
    # Unknown paths are closed too: nothing under the admin port is open by accident.
    assert (await client.get("/admin/something-new")).status == 401
    for path in [*OPEN_READS, "/readyz"]:
        assert (await client.get(path)).status == 200, path


async def test_admin_config_is_redacted_even_with_the_token(
    aiohttp_client: Any, state: AdminState
) -> None:
    client = await aiohttp_client(create_admin_app(with_token(state)[0]))
    resp = await client.get("/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
    body = await resp.read()
    assert TOKEN.encode() not in body and REDIS_PASSWORD.encode() not in body
    config = orjson.loads(body)["config"]
    assert config["admin"]["token"] == "<redacted>"
    assert config["redis"]["url"] == "redis://:<redacted>@127.0.0.1:6379/0"
    assert config["routes"] == RAW["routes"]


async def test_read_without_token_opens_reads_not_reload(
    aiohttp_client: Any, state: AdminState
) -> None:
    state, reloads = with_token(state, read_without_token=True)
    client = await aiohttp_client(create_admin_app(state))
    for path in PROTECTED_READS:
        assert (await client.get(path)).status == 200, path
    assert (await client.post("/admin/reload")).status == 401
    assert reloads == []
    resp = await client.post("/admin/reload?force=1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    assert reloads == [("admin API", True)]


async def test_refused_reload_is_409(aiohttp_client: Any, state: AdminState) -> None:
    async def refuse(trigger: str, force: bool) -> dict[str, Any]:
        return {"result": "refused", "errors": ["gw.yaml:3: routes: refusing ..."]}

    state.reload = refuse
    client = await aiohttp_client(create_admin_app(state))
    resp = await client.post("/admin/reload")
    assert resp.status == 409
    assert (await resp.json())["result"] == "refused"
