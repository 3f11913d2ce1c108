"""The embedded registry end to end: registration API on the admin port of a real gateway,
real backends, continuous load."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.system.conftest import (
    DiscoveryGateway,
    Load,
    NamedBackends,
    http_json,
    route_all,
    wait_for,
)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def registry_config(state_file: Path) -> dict[str, Any]:
    return {
        "discovery": {"registry": {"type": "registry", "state_file": str(state_file)}},
        "upstreams": {"web": {"discovery": "registry", "service": "web"}},
        "routes": route_all("web"),
    }


def register(gw: DiscoveryGateway, port: int, **extra: Any) -> str:
    body = {"service_name": "web", "ip": "127.0.0.1", "port": port, **extra}
    status, answer = http_json("POST", gw.admin_url + "/register", body, AUTH)
    assert status == 201, answer
    return str(answer["id"])


def test_register_route_deregister_and_restart(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    load_factory: Callable[[int], Load],
    tmp_path: Path,
) -> None:
    state_file = tmp_path / "registry.json"
    gw = start_discovery_gateway(registry_config(state_file), {"token": TOKEN})
    ids = {name: register(gw, backends.ports[name]) for name in ("b1", "b2", "b3")}

    load = load_factory(gw.port)
    wait_for(lambda: load.names_since(0) >= {"b1", "b2", "b3"}, what="all three instances")

    status, listing = http_json("GET", gw.admin_url + "/discover")
    assert status == 200
    ports = {i["port"] for i in listing["services"]["web"]}
    assert ports == {backends.ports[n] for n in ("b1", "b2", "b3")}
    status, one = http_json("GET", gw.admin_url + "/discover/web")
    assert status == 200 and len(one["instances"]) == 3

    # Deregister b2: the gateway stops sending to it at once (the backend itself stays up).
    status, _ = http_json("DELETE", f"{gw.admin_url}/register/{ids['b2']}", headers=AUTH)
    deregistered_at = time.monotonic()
    assert status == 200
    load.wait_more(100)
    last_b2 = load.last_seen("b2")
    assert last_b2 is not None and last_b2 - deregistered_at <= 1.0
    recent = load.names_since(load.results[-50][0])
    assert recent == {"b1", "b3"}
    assert load.failures == []

    # Registrations survive a restart: the state file holds b1 and b3.
    load.stop()
    saved = json.loads(state_file.read_text())
    assert {i["port"] for i in saved["instances"]} == {backends.ports["b1"], backends.ports["b3"]}
    gw.stop()
    gw2 = start_discovery_gateway(registry_config(state_file), {"token": TOKEN})
    assert gw2.upstream_addresses("web") == {
        f"127.0.0.1:{backends.ports['b1']}",
        f"127.0.0.1:{backends.ports['b3']}",
    }
    load2 = load_factory(gw2.port)
    wait_for(lambda: load2.names_since(0) >= {"b1", "b3"}, what="restored instances")
    assert "b2" not in load2.names_since(0)
    assert load2.failures == []


def test_ttl_expiry_and_heartbeat(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    tmp_path: Path,
) -> None:
    gw = start_discovery_gateway(registry_config(tmp_path / "state.json"), {"token": TOKEN})
    kept = register(gw, backends.ports["b1"], ttl="300ms")
    lapsing = register(gw, backends.ports["b2"], ttl="300ms")
    assert gw.upstream_addresses("web") == {
        f"127.0.0.1:{backends.ports['b1']}",
        f"127.0.0.1:{backends.ports['b2']}",
    }

    def heartbeat_until_gone() -> bool:
        status, _ = http_json("PUT", f"{gw.admin_url}/register/{kept}/heartbeat", headers=AUTH)
        assert status == 200
        return gw.upstream_addresses("web") == {f"127.0.0.1:{backends.ports['b1']}"}

    wait_for(heartbeat_until_gone, interval=0.05, what="the un-renewed instance to expire")
    status, _ = http_json("PUT", f"{gw.admin_url}/register/{lapsing}/heartbeat", headers=AUTH)
    assert status == 404


def test_api_errors_and_token(
    start_discovery_gateway: Callable[..., DiscoveryGateway], tmp_path: Path
) -> None:
    gw = start_discovery_gateway(registry_config(tmp_path / "state.json"), {"token": TOKEN})
    url = gw.admin_url + "/register"
    good = {"service_name": "web", "ip": "127.0.0.1", "port": 8080}

    status, body = http_json("POST", url, good)
    assert status == 401, body
    status, body = http_json("POST", url, good, {"Authorization": "Bearer wrong"})
    assert status == 401, body
    status, body = http_json("DELETE", url + "/x", headers={})
    assert status == 401, body
    status, body = http_json("GET", gw.admin_url + "/discover")  # reads need no token
    assert status == 200, body

    cases: list[tuple[Any, str]] = [
        (b"{not json", "body"),
        ({"ip": "127.0.0.1", "port": 1}, "service_name"),
        ({**good, "ip": "not-an-ip"}, "ip"),
        ({**good, "port": 0}, "port"),
        ({**good, "port": "80"}, "port"),
        ({**good, "port": 70000}, "port"),
        ({**good, "weight": 0}, "weight"),
        ({**good, "tags": "a"}, "tags"),
        ({**good, "ttl": "soon"}, "ttl"),
        ({**good, "colour": "red"}, "colour"),
    ]
    for body_in, field in cases:
        status, body = http_json("POST", url, body_in, AUTH)
        assert status == 400, (body_in, body)
        assert body["field"] == field, (body_in, body)
    status, body = http_json("DELETE", url + "/nope", headers=AUTH)
    assert status == 404


def test_corrupt_state_file_is_moved_aside_and_reported(
    start_discovery_gateway: Callable[..., DiscoveryGateway], tmp_path: Path
) -> None:
    state_file = tmp_path / "state.json"
    state_file.write_text('{"version": 1, "instances": [{"oops": ')
    gw = start_discovery_gateway(registry_config(state_file))
    report = gw.discovery()["registries"]["registry"]
    assert report["load_error"] and "moved to" in report["load_error"]
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_text().startswith('{"version": 1')
    assert "unreadable" in gw.log()
