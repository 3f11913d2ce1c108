"""The embedded registry end to end: registration API on the admin port of a real gateway,
real backends, continuous load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.discovery.journal import read_state
from loadtest.bench_registry import register_concurrently, registration_body
from tests.integration.conftest import ROOT
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
    saved = read_state(state_file)  # snapshot + journal, as a restart replays them
    assert {i["port"] for i in saved.instances.values()} == {
        backends.ports["b1"],
        backends.ports["b3"],
    }
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


# --- named registries, several registries, state locations ------------------------------------


def get_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def test_a_registry_not_named_registry_gets_the_registrations(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    tmp_path: Path,
) -> None:
    config = {
        "discovery": {"reg": {"type": "registry"}},
        "upstreams": {"web": {"discovery": "reg", "service": "web"}},
        "routes": route_all("web"),
    }
    gw = start_discovery_gateway(config, {"token": TOKEN}, workdir=tmp_path / "one")
    assert get_text(gw.base_url + "/name")[0] == 503  # nothing registered yet
    register(gw, backends.ports["b1"])
    wait_for(lambda: get_text(gw.base_url + "/name") == (200, "b1@127.0.0.1"), what="routing")
    status, listing = http_json("GET", gw.admin_url + "/discover")
    assert status == 200 and [i["port"] for i in listing["services"]["web"]] == [
        backends.ports["b1"]
    ]
    report = gw.discovery()["registries"]
    assert set(report) == {"reg"} and report["reg"]["default"] is True
    # Its own state file, named after the backend, in the state_dir (not beside the config).
    state_dir = tmp_path / "one" / "state"
    assert report["reg"]["state_file"] == str(state_dir / "registry-reg.json")
    assert sorted(p.name for p in state_dir.iterdir()) == ["registry-reg.json.journal"]
    assert not list((tmp_path / "one").glob("*registry*"))

    # Another gateway with the same config but its own directory starts with nothing: no
    # registration leaks from an earlier, unrelated run.
    other = start_discovery_gateway(config, {"token": TOKEN}, workdir=tmp_path / "two")
    status, listing = http_json("GET", other.admin_url + "/discover")
    assert status == 200 and listing == {"services": {}}
    assert other.discovery()["upstreams"]["web"]["instances"] == []


def test_several_registries_and_a_body_that_names_one(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    tmp_path: Path,
) -> None:
    config = {
        "discovery": {"blue": {"type": "registry"}, "green": {"type": "registry"}},
        "upstreams": {
            "b": {"discovery": "blue", "service": "web"},
            "g": {"discovery": "green", "service": "web"},
        },
        "routes": [
            {"name": "g", "match": {"path": {"prefix": "/green"}}, "upstream": "g"},
            {"name": "b", "match": {"path": {"prefix": "/"}}, "upstream": "b"},
        ],
    }
    # Without admin.registry, `gateway check` refuses the file and names the line.
    (tmp_path / "check").mkdir()
    path = tmp_path / "check" / "gateway.yaml"
    path.write_text(
        "discovery:\n"
        "  blue: {type: registry}\n"
        "  green: {type: registry}\n"
        + yaml.safe_dump({k: v for k, v in config.items() if k != "discovery"})
    )
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 1
    assert f"{path}:3: discovery.green: several backends of type registry" in check.stderr

    gw = start_discovery_gateway(config, {"token": TOKEN, "registry": "blue"})
    register(gw, backends.ports["b1"])  # the default: blue
    green_id = register(gw, backends.ports["b2"], registry="green")
    assert gw.upstream_addresses("b") == {f"127.0.0.1:{backends.ports['b1']}"}
    assert gw.upstream_addresses("g") == {f"127.0.0.1:{backends.ports['b2']}"}
    assert get_text(gw.base_url + "/green") == (200, "b2@127.0.0.1")

    body = {"service_name": "web", "ip": "127.0.0.1", "port": 1, "registry": "nope"}
    status, answer = http_json("POST", gw.admin_url + "/register", body, AUTH)
    assert status == 400 and answer["field"] == "registry" and "blue, green" in answer["message"]
    status, answer = http_json("GET", gw.admin_url + "/discover?registry=nope")
    assert status == 400 and answer["field"] == "registry"

    # Reads and removals take ?registry=NAME; without it they go to the default (blue).
    status, listing = http_json("GET", gw.admin_url + "/discover/web?registry=green")
    assert status == 200 and [i["id"] for i in listing["instances"]] == [green_id]
    status, _ = http_json("DELETE", f"{gw.admin_url}/register/{green_id}", headers=AUTH)
    assert status == 404
    status, _ = http_json(
        "DELETE", f"{gw.admin_url}/register/{green_id}?registry=green", headers=AUTH
    )
    assert status == 200
    status, listing = http_json("GET", gw.admin_url + "/discover/web?registry=green")
    assert status == 200 and listing["instances"] == []
    assert gw.discovery()["registries"]["green"]["registrations"] == 0
    assert gw.discovery()["registries"]["blue"]["registrations"] == 1
    state = {p.name for p in (Path(gw.config_path).parent / "state").iterdir()}
    assert state == {"registry-blue.json.journal", "registry-green.json.journal"}


# --- durability and growth ----------------------------------------------------------------------


def _bodies(count: int) -> list[dict[str, Any]]:
    return [registration_body(i, services=10) for i in range(count)]


def test_kill_9_during_registrations_loses_nothing_acknowledged(
    start_discovery_gateway: Callable[..., DiscoveryGateway], tmp_path: Path
) -> None:
    config = {"upstreams": {"web": {"discovery": "registry", "service": "svc0"}}, "routes": []}
    workdir = tmp_path / "gw"
    gw = start_discovery_gateway(config, {"token": TOKEN}, workdir=workdir)
    acknowledged: list[str] = []
    bodies = _bodies(3000)

    def on_ack(index: int, answer: dict[str, Any]) -> None:
        acknowledged.append(answer["id"])
        if len(acknowledged) == 400:  # mid-stream, with 32 requests in flight
            os.kill(gw.process.pid, signal.SIGKILL)

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(register_concurrently(gw.admin_url, bodies, 32, AUTH, on_ack))
    gw.process.wait(10)
    assert gw.process.returncode == -signal.SIGKILL
    assert 400 <= len(acknowledged) < len(bodies)
    journal = workdir / "state" / "registry-registry.json.journal"
    assert journal.stat().st_size > 0  # the acknowledged changes were in the journal

    restarted = start_discovery_gateway(config, {"token": TOKEN}, workdir=workdir)
    status, listing = http_json("GET", restarted.admin_url + "/discover")
    assert status == 200
    restored = {i["id"] for items in listing["services"].values() for i in items}
    assert set(acknowledged) <= restored
    assert len(restored) <= len(bodies)
    assert restarted.discovery()["registries"]["registry"]["load_error"] is None


def test_2000_registrations_compact_and_survive_a_restart(
    start_discovery_gateway: Callable[..., DiscoveryGateway], tmp_path: Path
) -> None:
    config = {"upstreams": {"web": {"discovery": "registry", "service": "svc0"}}, "routes": []}
    workdir = tmp_path / "gw"
    gw = start_discovery_gateway(config, {"token": TOKEN}, workdir=workdir)
    bodies = _bodies(2000)
    asyncio.run(register_concurrently(gw.admin_url, bodies, 32, AUTH))
    report = gw.discovery()["registries"]["registry"]
    assert report["registrations"] == 2000
    assert report["compactions"] >= 1 and report["write_error"] is None
    # The journal holds only what came after the last compaction, not all 2,000 changes.
    assert report["journal_bytes"] < report["snapshot_bytes"] * 2 + 256 * 1024
    assert len(gw.discovery()["upstreams"]["web"]["instances"]) == 200  # svc0: every 10th
    gw.stop()

    again = start_discovery_gateway(config, {"token": TOKEN}, workdir=workdir)
    status, listing = http_json("GET", again.admin_url + "/discover")
    assert status == 200
    assert sum(len(items) for items in listing["services"].values()) == 2000
    assert len(again.upstream_addresses("web")) == 200
