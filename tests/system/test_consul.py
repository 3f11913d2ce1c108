"""Consul discovery against a real ``consul agent -dev``: blocking queries, health filter, tags,
registration written through the gateway's API, agent outage and return."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.system.conftest import (
    ConsulAgent,
    DiscoveryGateway,
    Load,
    NamedBackends,
    expect_outage_keeps_last_set,
    http_json,
    route_all,
    wait_for,
)

TOKEN = "consul-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def consul_config(consul: ConsulAgent, service: str, **upstream: Any) -> dict[str, Any]:
    return {
        "discovery": {
            "dc1": {
                "type": "consul",
                "address": consul.address,
                "wait": "5s",
                "timeout": "500ms",
                "retry_min": "100ms",
                "retry_max": "500ms",
            }
        },
        "upstreams": {"web": {"discovery": "dc1", "service": service, **upstream}},
        "routes": route_all("web"),
    }


def register(gw: DiscoveryGateway, service: str, port: int, **extra: Any) -> str:
    body = {"service_name": service, "ip": "127.0.0.1", "port": port, **extra}
    status, answer = http_json("POST", gw.admin_url + "/register", body, AUTH)
    assert status == 201, answer
    return str(answer["id"])


def test_consul_follow_health_and_outage(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    consul: ConsulAgent,
    load_factory: Callable[[int], Load],
) -> None:
    service = "web-health"
    gw = start_discovery_gateway(
        consul_config(consul, service), {"token": TOKEN, "registry": "dc1"}
    )
    # Registered through the gateway's API, written through to the Consul agent.
    ids = {n: register(gw, service, backends.ports[n], ttl="1h") for n in ("b1", "b2", "b3")}
    status, services = consul.api("GET", "/v1/agent/services")
    assert status == 200 and set(ids.values()) <= set(services)

    wait_for(lambda: len(gw.upstream_addresses("web")) == 3, what="three instances")
    load = load_factory(gw.port)
    wait_for(lambda: load.names_since(0) >= {"b1", "b2", "b3"}, what="all three instances")
    status, listing = http_json("GET", f"{gw.admin_url}/discover/{service}")
    assert status == 200 and len(listing["instances"]) == 3

    # b2's health check fails: within a second no request goes to it.
    status, _ = consul.api("PUT", f"/v1/agent/check/fail/service:{ids['b2']}")
    failed_at = time.monotonic()
    assert status == 200
    b2 = f"127.0.0.1:{backends.ports['b2']}"
    wait_for(lambda: b2 not in gw.upstream_addresses("web"), what="b2 dropped")
    load.wait_more(100)
    last_b2 = load.last_seen("b2")
    assert last_b2 is not None and last_b2 - failed_at <= 1.0
    assert load.names_since(load.results[-50][0]) == {"b1", "b3"}

    # Deregistering through the gateway's API removes it from Consul.
    status, _ = http_json("DELETE", f"{gw.admin_url}/register/{ids['b2']}", headers=AUTH)
    assert status == 200
    status, services = consul.api("GET", "/v1/agent/services")
    assert ids["b2"] not in services

    # The agent goes away: last set kept, stale reported, errors counted, traffic unharmed.
    consul.stop()
    expect_outage_keeps_last_set(gw, load, "dc1", {"b1", "b3"})

    # A fresh -dev agent knows nothing: its empty answer is not honoured (allow_empty: false).
    consul.start()
    wait_for(lambda: not gw.discovery()["upstreams"]["web"]["stale"], what="agent back")
    assert gw.discovery()["upstreams"]["web"]["empty_answer_ignored"] is True
    assert len(gw.upstream_addresses("web")) == 2
    # Updates resume: re-registering all three brings b2 back.
    for name in ("b1", "b2", "b3"):
        register(gw, service, backends.ports[name])
    wait_for(lambda: b2 in gw.upstream_addresses("web"), what="b2 back")
    resumed = time.monotonic()
    wait_for(lambda: "b2" in load.names_since(resumed), what="traffic to b2 again")
    assert load.failures == []


def test_consul_tags_and_shared_watch(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    consul: ConsulAgent,
) -> None:
    service = "web-tags"
    config = consul_config(consul, service, tags=["blue"])
    # A second upstream with the same query shares the watch; a third filters differently.
    config["upstreams"]["web2"] = {"discovery": "dc1", "service": service, "tags": ["blue"]}
    config["upstreams"]["all"] = {"discovery": "dc1", "service": service, "passing_only": False}
    gw = start_discovery_gateway(config, {"token": TOKEN, "registry": "dc1"})
    register(gw, service, backends.ports["b1"], tags=["blue"], weight=3)
    register(gw, service, backends.ports["b2"], tags=["green"])
    b1, b2 = (f"127.0.0.1:{backends.ports[n]}" for n in ("b1", "b2"))
    wait_for(
        lambda: (
            [gw.upstream_addresses(u) for u in ("all", "web", "web2")] == [{b1, b2}, {b1}, {b1}]
        ),
        what="filtered and unfiltered upstreams",
    )
    status = gw.discovery()
    assert len(status["backends"]["dc1"]["watches"]) == 2  # web and web2 share one
    (instance,) = status["upstreams"]["web"]["instances"]
    assert instance["weight"] == 3 and instance["tags"] == ["blue"]


def test_consul_acl_token_and_bad_address(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    consul: ConsulAgent,
) -> None:
    config = consul_config(consul, "nothing")
    config["discovery"]["dc1"]["token"] = "any-token"  # -dev agents allow anonymous + tokens
    config["discovery"]["down"] = {
        "type": "consul",
        "address": "http://127.0.0.1:1",
        "retry_min": "100ms",
        "retry_max": "200ms",
    }
    config["upstreams"]["dead"] = {"discovery": "down", "service": "x"}
    gw = start_discovery_gateway(config)
    backends_status = wait_for(
        lambda: (s := gw.discovery()["backends"])["down"]["errors"] >= 2 and s,
        what="errors against the unreachable agent",
    )
    assert backends_status["dc1"]["last_success"] is not None
    assert backends_status["down"]["last_success"] is None
