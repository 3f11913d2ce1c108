"""DNS discovery against a real dnsmasq whose records the test rewrites mid-run."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.metrics_text import metric_value
from tests.system.conftest import (
    DiscoveryGateway,
    Dnsmasq,
    Load,
    NamedBackends,
    http_json,
    route_all,
    wait_for,
)

TTL = 1  # seconds, served by dnsmasq (local-ttl)


def dns_config(dnsmasq: Dnsmasq, service: str) -> dict[str, Any]:
    return {
        "discovery": {
            "dns1": {
                "type": "dns",
                "nameservers": [f"127.0.0.1:{dnsmasq.port}"],
                "min_ttl": "100ms",
                "max_ttl": "5s",
                "timeout": "300ms",
                "retry_min": "100ms",
                "retry_max": "500ms",
            }
        },
        "upstreams": {"web": {"discovery": "dns1", "service": service}},
        "routes": route_all("web"),
    }


def srv_records(backends: NamedBackends, names: list[str]) -> list[tuple[str, str, int, int, int]]:
    records = [("_http._tcp.web.test", "app.test", backends.ports[n], 10, 5) for n in names]
    # A lower-priority (higher number) record: used only if the priority-10 group is empty.
    records.append(("_http._tcp.web.test", "app.test", backends.ports["spare"], 20, 5))
    return records


def metric(gw: DiscoveryGateway, name: str, backend: str) -> float | None:
    return metric_value(gw.metrics_text(), name, backend=backend)


def test_srv_follow_changes_survive_outage(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    dnsmasq: Dnsmasq,
    load_factory: Callable[[int], Load],
) -> None:
    hosts = {"app.test": ["127.0.0.1"]}
    dnsmasq.set_records(hosts, srv_records(backends, ["b1", "b2", "b3"]), ttl=TTL)
    gw = start_discovery_gateway(dns_config(dnsmasq, "_http._tcp.web.test"))
    load = load_factory(gw.port)
    wait_for(lambda: load.names_since(0) >= {"b1", "b2", "b3"}, what="all three SRV targets")

    # b2's record goes away: after the TTL no request reaches it.
    dnsmasq.set_records(hosts, srv_records(backends, ["b1", "b3"]), ttl=TTL)
    changed_at = time.monotonic()
    b2 = f"127.0.0.1:{backends.ports['b2']}"
    wait_for(lambda: b2 not in gw.upstream_addresses("web"), what="b2 dropped")
    load.wait_more(100)
    last_b2 = load.last_seen("b2")
    assert last_b2 is not None
    # One TTL for the cached answer to lapse plus one refresh period (also the TTL).
    assert last_b2 - changed_at <= 2 * TTL + 0.5
    assert load.names_since(load.results[-50][0]) == {"b1", "b3"}
    assert "spare" not in load.names_since(0)  # priority 20 never used while 10 has targets

    # The DNS server dies: the last set stays, marked stale, errors are counted.
    errors_before = metric(gw, "gateway_discovery_errors_total", "dns1") or 0
    dnsmasq.stop()
    wait_for(lambda: gw.discovery()["upstreams"]["web"]["stale"], what="stale mark")
    status, ready = http_json("GET", gw.admin_url + "/readyz")
    assert status == 200 and ready["stale_upstreams"] == ["web"]
    status, upstreams = http_json("GET", gw.admin_url + "/admin/upstreams")
    assert status == 200
    assert {u["name"]: u["stale"] for u in upstreams["upstreams"]}["web"] is True
    assert (metric(gw, "gateway_discovery_errors_total", "dns1") or 0) > errors_before
    success = metric(gw, "gateway_discovery_last_success_timestamp_seconds", "dns1")
    assert success is not None and success <= time.time()
    outage_start = load.count()
    load.wait_more(100)
    assert {n for _, n in load.results[outage_start:]} == {"b1", "b3"}

    # Back with b2 re-added: updates resume.
    dnsmasq.set_records(hosts, srv_records(backends, ["b1", "b2", "b3"]), ttl=TTL)
    dnsmasq.start()
    wait_for(lambda: b2 in gw.upstream_addresses("web"), what="b2 back after the outage")
    assert gw.discovery()["upstreams"]["web"]["stale"] is False
    resumed = time.monotonic()
    wait_for(lambda: "b2" in load.names_since(resumed), what="traffic to b2 again")
    assert load.failures == []


def test_empty_priority_group_falls_back_and_empty_answer_is_not_honoured(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    dnsmasq: Dnsmasq,
) -> None:
    # The priority-10 targets have no address: the priority-20 group is used.
    records = [
        ("_http._tcp.web.test", "gone.test", backends.ports["b1"], 10, 1),
        ("_http._tcp.web.test", "app.test", backends.ports["spare"], 20, 1),
    ]
    dnsmasq.set_records({"app.test": ["127.0.0.1"]}, records, ttl=TTL)
    gw = start_discovery_gateway(dns_config(dnsmasq, "_http._tcp.web.test"))
    spare = f"127.0.0.1:{backends.ports['spare']}"
    wait_for(lambda: gw.upstream_addresses("web") == {spare}, what="fallback to priority 20")

    # Every record removed: allow_empty is false, so the last non-empty set stays.
    dnsmasq.set_records({}, [], ttl=TTL)
    wait_for(
        lambda: gw.discovery()["upstreams"]["web"]["empty_answer_ignored"],
        what="empty answer noticed",
    )
    assert gw.upstream_addresses("web") == {spare}
    assert "empty answer" in gw.log()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 on this machine")
def test_a_and_aaaa_records(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    dnsmasq: Dnsmasq,
    load_factory: Callable[[int], Load],
) -> None:
    if "dual" not in backends.ports:
        backends.add("dual", ("127.0.0.1", "::1"))
    port = backends.ports["dual"]
    dnsmasq.set_records({"dual.test": ["127.0.0.1", "::1"]}, [], ttl=TTL)
    gw = start_discovery_gateway(dns_config(dnsmasq, f"dual.test:{port}"))
    wait_for(
        lambda: gw.upstream_addresses("web") == {f"127.0.0.1:{port}", f"[::1]:{port}"},
        what="A and AAAA instances",
    )
    load = load_factory(gw.port)
    wait_for(lambda: load.local_addresses >= {"127.0.0.1", "::1"}, what="both address families")
    assert load.failures == []
