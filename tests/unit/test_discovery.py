"""Pure parts of discovery: backoff, index rules, answer parsing, registry, manager rules."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from gateway.config import load_config_text
from gateway.config.model import InstanceConfig
from gateway.discovery.base import Backoff, DiscoveredInstance, ServiceQuery
from gateway.discovery.consul import next_index, parse_health
from gateway.discovery.dns import parse_target, pick_srv_group
from gateway.discovery.manager import DiscoveryManager
from gateway.discovery.registry import (
    BadRequest,
    RegistrationRequest,
    Registry,
    RegistryWriteError,
    parse_registration,
)

# --- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_within_bounds() -> None:
    backoff = Backoff(0.2, 5.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    caps = [min(5.0, 0.2 * 2**i) for i in range(12)]
    assert all(0.2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) > 6  # jittered, not lockstep
    backoff.reset()
    assert backoff.next_delay() == 0.2  # first delay after a reset: [0.2, 0.2]


# --- consul index rules (Consul docs, "Blocking Queries": implementation details) -------------


@pytest.mark.parametrize(
    ("previous", "header", "expected"),
    [
        (0, "10", (10, False)),  # first answer
        (10, "12", (12, False)),  # progress
        (10, "10", (10, True)),  # not increasing: rate-limit
        (10, "5", (0, False)),  # went backwards: reset
        (10, "0", (0, False)),  # never send index <= 0
        (10, "-3", (0, False)),
        (10, None, (0, True)),  # missing header: poll, rate-limited
        (10, "abc", (0, True)),
    ],
)
def test_next_index(previous: int, header: str | None, expected: tuple[int, bool]) -> None:
    assert next_index(previous, header) == expected


def _entry(port: int, *, address: str = "127.0.0.1", status: str = "passing", **service: Any):
    return {
        "Node": {"Node": "n1", "Address": "10.9.9.9"},
        "Service": {"ID": f"s{port}", "Address": address, "Port": port, **service},
        "Checks": [{"Status": "passing"}, {"Status": status}],
    }


def test_parse_health_filters_and_fallbacks() -> None:
    data = [
        _entry(1, Tags=["a", "b"], Weights={"Passing": 4, "Warning": 1}, Meta={"v": "2"}),
        _entry(2, Tags=["a"]),
        _entry(3, address="", Tags=["a", "b"]),  # no service address: the node's
        _entry(4, Tags=["a", "b"], status="critical"),
    ]
    got = parse_health(data, ServiceQuery("s", tags=("a", "b")))
    assert [(i.host, i.port, i.weight) for i in got] == [("127.0.0.1", 1, 4), ("10.9.9.9", 3, 1)]
    assert got[0].meta == {"v": "2"} and got[0].id == "s1"
    everything = parse_health(data, ServiceQuery("s", passing_only=False))
    assert [i.port for i in everything] == [1, 2, 3, 4]
    assert everything[3].healthy is False


@pytest.mark.parametrize(
    "garbage",
    [
        {"not": "a list"},
        [1],
        [{"Service": "x"}],
        [_entry(0)],
        [_entry(1, address=None) | {"Node": {}}],
    ],
)
def test_parse_health_rejects_garbage(garbage: Any) -> None:
    with pytest.raises(ValueError):
        parse_health(garbage, ServiceQuery("s"))


# --- dns --------------------------------------------------------------------------------------


def test_parse_target() -> None:
    assert parse_target("api.example:8080") == ("api.example", 8080)
    assert parse_target("[::1]:80") == ("::1", 80)
    assert parse_target("_http._tcp.api.example") is None
    for bad in ("api.example", "api:0", "api:x", ":80"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_srv_groups_lowest_priority_first_and_dot_target_skipped() -> None:
    groups = pick_srv_group(
        [
            (20, 1, 9002, "b.example."),
            (10, 5, 9001, "a.example."),
            (10, 0, 9003, "."),
            (5, 1, 1, "."),
        ]
    )
    assert groups == [[(5, 9001, "a.example")], [(1, 9002, "b.example")]]


# --- registry ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _request(port: int, **extra: Any) -> RegistrationRequest:
    return parse_registration({"service_name": "web", "ip": "127.0.0.1", "port": port, **extra})


def test_parse_registration_names_the_bad_field() -> None:
    good = {"service_name": "web", "ip": "::1", "port": 80}
    assert parse_registration(good).ip == "::1"
    assert parse_registration({**good, "ttl": 1.5}).ttl == 1.5
    assert parse_registration({**good, "ttl": "2s"}).ttl == 2.0
    cases = {
        "body": [1, 2],
        "service_name": {"ip": "::1", "port": 80},
        "ip": {**good, "ip": "localhost"},
        "port": {**good, "port": True},
        "weight": {**good, "weight": 10_001},
        "ttl": {**good, "ttl": -1},
        "tags": {**good, "tags": [""]},
        "meta": {**good, "meta": {"a": 1}},
        "id": {**good, "id": "../x"},
        "extra": {**good, "extra": 1},
    }
    for field, body in cases.items():
        with pytest.raises(BadRequest) as info:
            parse_registration(body)
        assert info.value.field == field


def test_registry_ttl_heartbeat_and_persistence(tmp_path: Path) -> None:
    clock = Clock()
    state = tmp_path / "state.json"
    registry = Registry(state, default_ttl=None, clock=clock)
    registry.load()
    changes: list[set[str]] = []
    registry.listeners.append(changes.append)
    a = registry.register(_request(1, ttl=10))
    b = registry.register(_request(2, tags=["x"]))
    assert a.id == "web-127.0.0.1-1"
    assert registry.register(_request(1, ttl=10)).id == a.id  # re-registration replaces
    clock.now += 8
    assert registry.heartbeat(a.id) is not None
    clock.now += 8
    assert registry.expire() == []  # renewed at +8, expires at +18
    assert registry.instances(ServiceQuery("web", tags=("x",))) == (b.instance(),)
    # Persisted in the journal (no temp file left behind) and restored by a new registry,
    # once the first one has released the state files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json.journal"]
    registry.close()
    restored = Registry(state, clock=clock)
    restored.load()
    assert set(restored.entries) == {a.id, b.id}
    clock.now += 3
    assert [r.id for r in restored.expire()] == [a.id]
    assert changes[-1] == {"web"}
    assert restored.deregister(b.id) and not restored.deregister(b.id)
    with pytest.raises(RegistryWriteError):  # closed: its changes could not be kept
        registry.register(_request(3))


def test_registry_corrupt_file_moved_aside(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 1, "instances": [{"service_name": "x"}]}))
    registry = Registry(state)
    registry.load()
    assert registry.entries == {}
    assert registry.load_error is not None and "moved to" in registry.load_error
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert "service_name" in aside.read_text()
    assert not state.exists()


# --- manager ----------------------------------------------------------------------------------

CONFIG = """
admin: {address: "127.0.0.1:0", registry: fake}  # two registries: one must take /register
discovery:
  fake: {type: registry, allow_empty: false}
  lenient: {type: registry, allow_empty: true}
upstreams:
  a: {discovery: fake, service: web}
  b: {discovery: fake, service: web}
  c: {discovery: lenient, service: web}
  s: {instances: [127.0.0.1:1]}
"""


def _manager() -> tuple[DiscoveryManager, list[int]]:
    calls: list[int] = []
    manager = DiscoveryManager(load_config_text(CONFIG), lambda: calls.append(1))
    return manager, calls


def _inst(port: int) -> DiscoveredInstance:
    return DiscoveredInstance("127.0.0.1", port)


async def test_manager_rules() -> None:
    manager, calls = _manager()
    web = ServiceQuery("web")
    assert manager.backends["fake"].queries == {web}  # a and b share one watch
    assert manager.instances() == {"a": (), "b": (), "c": ()}  # static s is not touched

    manager.update("fake", web, (_inst(2), _inst(1), _inst(1)))
    manager.update("lenient", web, (_inst(3),))
    await asyncio.sleep(0)  # changes are applied once per loop tick
    assert calls == [1]
    assert manager.instances()["a"] == (
        InstanceConfig("127.0.0.1", 1),
        InstanceConfig("127.0.0.1", 2),
    )
    assert manager.instances()["b"] == manager.instances()["a"]

    # A failure keeps the set and marks it stale; the same answer again changes nothing.
    manager.failure("fake", web, ConnectionError("refused"))
    status = manager.status()
    assert status["upstreams"]["a"]["stale"] is True
    assert "refused" in status["upstreams"]["a"]["last_error"]
    assert status["backends"]["fake"]["errors"] == 1
    assert len(manager.instances()["a"]) == 2
    manager.update("fake", web, (_inst(1), _inst(2)))
    await asyncio.sleep(0)
    assert calls == [1] and manager.status()["upstreams"]["a"]["stale"] is False

    # Empty answers: ignored without allow_empty, honoured with it.
    manager.update("fake", web, ())
    manager.update("lenient", web, ())
    await asyncio.sleep(0)
    assert len(manager.instances()["a"]) == 2
    assert manager.status()["upstreams"]["a"]["empty_answer_ignored"] is True
    assert manager.instances()["c"] == ()
    assert calls == [1, 1]

    # A backend-wide failure marks all its watches stale.
    manager.failure("lenient", None, TimeoutError())
    assert manager.stale_upstreams() == ["c"]


def test_manager_metrics() -> None:
    manager, _ = _manager()
    manager.update("fake", ServiceQuery("web"), (_inst(1),))
    manager.failure("fake", ServiceQuery("web"), OSError("x"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(manager.collector())
    text = generate_latest(registry).decode()
    assert 'gateway_discovery_errors_total{backend="fake"} 1.0' in text
    assert 'gateway_discovery_last_success_timestamp_seconds{backend="fake"}' in text
    assert 'gateway_discovery_stale{upstream="a"} 1.0' in text
    assert 'gateway_discovery_instances{upstream="a"} 1.0' in text
    assert 'gateway_discovery_updates_total{backend="fake"} 1.0' in text


async def test_manager_start_waits_for_first_answers_and_reconfigures() -> None:
    manager, _ = _manager()
    manager.registries["fake"].register(_request(7))
    await manager.start(initial_wait=1.0)
    try:
        assert manager.instances()["a"] == (InstanceConfig("127.0.0.1", 7),)
        new = load_config_text(CONFIG.replace("c: {discovery: lenient, service: web}", ""))
        await manager.reconfigure(new)
        assert set(manager.instances()) == {"a", "b"}
        assert manager.instances()["a"] == (InstanceConfig("127.0.0.1", 7),)
    finally:
        await manager.stop()


async def test_a_service_that_never_appears_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The newcomer's silent surprise: a misspelt service name only showed as 503 on every
    # request. After the grace period, the gateway says which upstream and service.
    config = load_config_text(
        f"""
state_dir: {tmp_path}
discovery:
  reg: {{type: registry}}
upstreams:
  found: {{discovery: reg, service: web}}
  ghost: {{discovery: reg, service: wbe}}
routes: []
"""
    )
    manager = DiscoveryManager(config, missing_grace=0.05)
    await manager.start(initial_wait=0)
    try:
        manager.update("reg", ServiceQuery("web"), (_inst(8080),))
        with caplog.at_level(logging.WARNING, logger="gateway.discovery"):
            deadline = asyncio.get_running_loop().time() + 5.0
            while "has no instance" not in caplog.text:
                assert asyncio.get_running_loop().time() < deadline, caplog.text
                await asyncio.sleep(0.02)
    finally:
        await manager.stop()
    assert "upstream 'ghost': service 'wbe' has no instance" in caplog.text
    assert "'found'" not in caplog.text
    again = manager.warn_missing_services()
    assert len(again) == 1 and "'ghost'" in again[0]
