"""Eureka discovery against a fake Eureka server that follows the REST documentation
(tests/system/fakes/eureka.py): UP-only instances, status changes and de-registration followed
within a refresh interval, deltas, lease eviction, server outage and return."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import ServiceQuery
from gateway.discovery.eureka import EurekaBackend
from tests.system.conftest import (
    DiscoveryGateway,
    Load,
    NamedBackends,
    expect_outage_keeps_last_set,
    route_all,
    wait_for,
)
from tests.system.fakes.eureka import FakeEureka, eureka_instance
from tests.system.test_etcd import Recorder, until

REFRESH = 0.3  # seconds: the refresh interval the gateway runs with here


@pytest.fixture(scope="session")
def eureka() -> Iterator[FakeEureka]:
    server = FakeEureka()
    yield server
    server.close()


def register(server: FakeEureka, app: str, instance_id: str, port: int, **extra: object) -> None:
    body = eureka_instance(app, instance_id, "127.0.0.1", port, **extra)  # type: ignore[arg-type]
    assert server.run("POST", f"/eureka/apps/{app}", body) == 204


def test_eureka_follow_status_and_outage(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    eureka: FakeEureka,
    load_factory: Callable[[int], Load],
) -> None:
    app = "WEB-EUREKA"
    for name in ("b1", "b2", "b3"):
        register(eureka, app, name, backends.ports[name])
    register(eureka, app, "starting", backends.ports["spare"], status="STARTING")
    config = {
        "discovery": {
            "eu": {
                "type": "eureka",
                "address": eureka.address,
                "refresh_interval": f"{int(REFRESH * 1000)}ms",
                "timeout": "500ms",
                "retry_min": "100ms",
                "retry_max": "500ms",
            }
        },
        "upstreams": {"web": {"discovery": "eu", "service": app.lower()}},
        "routes": route_all("web"),
    }
    gw = start_discovery_gateway(config)
    wait_for(lambda: len(gw.upstream_addresses("web")) == 3, what="three UP instances")
    load = load_factory(gw.port)
    wait_for(lambda: load.names_since(0) >= {"b1", "b2", "b3"}, what="all three instances")

    # b2 is taken out of service: no traffic to it after one refresh interval (plus a fetch).
    assert eureka.run("PUT", f"/eureka/apps/{app}/b2/status?value=OUT_OF_SERVICE") == 200
    changed_at = time.monotonic()
    b2 = f"127.0.0.1:{backends.ports['b2']}"
    wait_for(lambda: b2 not in gw.upstream_addresses("web"), what="b2 dropped")
    load.wait_more(100)
    last_b2 = load.last_seen("b2")
    assert last_b2 is not None and last_b2 - changed_at <= 1.0
    assert load.names_since(load.results[-50][0]) == {"b1", "b3"}
    # Between full fetches the backend asked for deltas.
    assert any(r == "GET /eureka/apps/delta" for r in eureka.requests)

    # Eureka goes away: last set kept, stale, errors counted, traffic unharmed.
    eureka.stop()
    try:
        expect_outage_keeps_last_set(gw, load, "eu", {"b1", "b3"})
    finally:
        eureka.start()

    wait_for(lambda: not gw.discovery()["upstreams"]["web"]["stale"], what="Eureka back")
    assert eureka.run("DELETE", f"/eureka/apps/{app}/b2/status?value=UP") == 200
    wait_for(lambda: b2 in gw.upstream_addresses("web"), what="b2 back")
    resumed = time.monotonic()
    wait_for(lambda: "b2" in load.names_since(resumed), what="traffic to b2 again")
    assert "spare" not in load.names_since(0)  # STARTING never got traffic
    assert load.failures == []


async def test_eureka_eviction_cancel_and_no_delta(eureka: FakeEureka) -> None:
    app = "EVICT"
    # A lease of one second that nobody renews: the server evicts the instance.
    register(eureka, app, "short", 3001, lease_seconds=1)
    register(eureka, app, "long", 3002, metadata={"weight": "4", "zone": "a"})
    register(eureka, app, "tls", 0, secure_port=3443)  # only the secure port is enabled
    eureka.delta_enabled = False  # 403 on /apps/delta: full fetches only
    sink = Recorder()
    config = DiscoveryConfig(
        name="eu", type="eureka", address=eureka.address, refresh_interval=0.1, retry_min=0.05
    )
    backend = EurekaBackend(config, sink)
    query = ServiceQuery(app.lower())
    backend.watch(query)
    backend.watch(ServiceQuery("unknown-app"))  # 404: no instances, not an error
    await backend.start()
    try:
        await until(lambda: sink.ports(query) >= {3002, 3443}, "first answer")
        await until(lambda: 3001 not in sink.ports(query), "lease eviction", limit=15)
        long = next(i for u in sink.updates for i in u if i.port == 3002)
        assert long.weight == 4 and long.meta["zone"] == "a"
        tls = next(i for u in sink.updates for i in u if i.port == 3443)
        assert tls.meta["scheme"] == "https"
        assert eureka.run("DELETE", f"/eureka/apps/{app}/long") == 200
        await until(lambda: sink.ports(query) == {3443}, "de-registration")
        assert backend.delta_supported is False and backend.delta_rounds == 0
        assert sink.failures == []
        assert eureka.run("PUT", f"/eureka/apps/{app}/long") == 404  # heartbeat: unknown
    finally:
        await backend.stop()
        eureka.delta_enabled = True
        eureka.run("DELETE", f"/eureka/apps/{app}/tls")
