"""etcd discovery against a real etcd (Debian's etcd-server): range + watch through the v3 JSON
gateway, removal followed within a second, outage and return, compaction -> relist."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import DiscoveredInstance, ServiceQuery
from gateway.discovery.etcd import EtcdBackend
from tests.system.conftest import (
    DiscoveryGateway,
    EtcdServer,
    Load,
    NamedBackends,
    expect_outage_keeps_last_set,
    route_all,
    wait_for,
)


def etcd_config(etcd: EtcdServer, service: str) -> dict[str, Any]:
    return {
        "discovery": {
            "kv": {
                "type": "etcd",
                "address": etcd.address,
                "timeout": "500ms",
                "retry_min": "100ms",
                "retry_max": "500ms",
            }
        },
        "upstreams": {"web": {"discovery": "kv", "service": service}},
        "routes": route_all("web"),
    }


def instance(port: int, **extra: Any) -> dict[str, Any]:
    return {"address": "127.0.0.1", "port": port, **extra}


def test_etcd_follow_removal_and_outage(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    etcd: EtcdServer,
    load_factory: Callable[[int], Load],
) -> None:
    service = "web-etcd"
    for name in ("b1", "b2", "b3"):
        etcd.put(f"/services/{service}/{name}", instance(backends.ports[name]))
    gw = start_discovery_gateway(etcd_config(etcd, service))
    wait_for(lambda: len(gw.upstream_addresses("web")) == 3, what="three instances")
    load = load_factory(gw.port)
    wait_for(lambda: load.names_since(0) >= {"b1", "b2", "b3"}, what="all three instances")

    # b2's key is deleted: within a second no request goes to it.
    etcd.delete(f"/services/{service}/b2")
    removed_at = time.monotonic()
    b2 = f"127.0.0.1:{backends.ports['b2']}"
    wait_for(lambda: b2 not in gw.upstream_addresses("web"), what="b2 dropped")
    load.wait_more(100)
    last_b2 = load.last_seen("b2")
    assert last_b2 is not None and last_b2 - removed_at <= 1.0
    assert load.names_since(load.results[-50][0]) == {"b1", "b3"}

    # etcd goes away: the last set stays, marked stale, errors counted, traffic unharmed.
    etcd.stop()
    try:
        expect_outage_keeps_last_set(gw, load, "kv", {"b1", "b3"})
    finally:
        etcd.start()

    # Back: fresh answer (not stale), and updates flow again.
    wait_for(lambda: not gw.discovery()["upstreams"]["web"]["stale"], what="etcd back")
    etcd.put(f"/services/{service}/b2", instance(backends.ports["b2"]))
    wait_for(lambda: b2 in gw.upstream_addresses("web"), what="b2 back")
    resumed = time.monotonic()
    wait_for(lambda: "b2" in load.names_since(resumed), what="traffic to b2 again")
    assert load.failures == []


class Recorder:
    """A Sink that keeps every answer."""

    def __init__(self) -> None:
        self.updates: list[tuple[DiscoveredInstance, ...]] = []
        self.latest: dict[ServiceQuery, tuple[DiscoveredInstance, ...]] = {}
        self.failures: list[BaseException] = []

    def update(
        self, backend: str, query: ServiceQuery, instances: tuple[DiscoveredInstance, ...]
    ) -> None:
        self.updates.append(instances)
        self.latest[query] = instances

    def failure(self, backend: str, query: ServiceQuery | None, error: BaseException) -> None:
        self.failures.append(error)

    def ports(self, query: ServiceQuery | None = None) -> set[int]:
        """Ports of the latest answer (for ``query``, else of any query)."""
        if query is not None:
            return {i.port for i in self.latest.get(query, ())}
        return {i.port for i in self.updates[-1]} if self.updates else set()


async def until(condition: Callable[[], Any], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class OldRevisionBackend(EtcdBackend):
    """Starts its first watch from revision 1, as a gateway that was partitioned while etcd
    compacted its history would."""

    first = True

    async def watch_from(
        self, query: ServiceQuery, values: dict[bytes, bytes], start_revision: int
    ) -> None:
        if self.first:
            self.first = False
            start_revision = 1
        await super().watch_from(query, values, start_revision)


async def test_etcd_layout_tags_and_compaction_relist(etcd: EtcdServer) -> None:
    prefix = "/layout-test/"
    etcd.put(f"{prefix}api/a", instance(1001, tags=["blue"], weight=3, meta={"zone": "z1"}))
    etcd.put(f"{prefix}api/b", instance(1002, tags=["green"]))
    etcd.put(f"{prefix}api/garbage", "not json")  # skipped, not fatal
    etcd.put(f"{prefix}api/c/deeper", instance(1003))  # not an instance of this layout
    revision = etcd.put(f"{prefix}api/d", instance(1004, tags=["blue"]))
    etcd.compact(revision)
    config = DiscoveryConfig(
        name="kv", type="etcd", address=etcd.address, prefix=prefix, retry_min=0.05, retry_max=0.2
    )
    sink = Recorder()
    backend = OldRevisionBackend(config, sink)
    backend.watch(ServiceQuery("api", ("blue",)))
    await backend.start()
    try:
        # The first watch is refused (compacted): the loop lists again and watches from there.
        await until(lambda: backend.relists >= 2, "relist after compaction")
        assert sink.ports() == {1001, 1004}
        first = next(i for i in sink.updates[-1] if i.port == 1001)
        assert (first.weight, first.tags, dict(first.meta), first.id) == (
            3,
            ("blue",),
            {"zone": "z1"},
            "a",
        )
        etcd.delete(f"{prefix}api/d")
        await until(lambda: sink.ports() == {1001}, "watched delete after the relist")
        assert sink.failures == []
    finally:
        await backend.stop()


async def test_etcd_address_value_format(etcd: EtcdServer) -> None:
    etcd.put("/plain/svc/x", "127.0.0.1:1005")
    etcd.put("/plain/svc/y", "[::1]:1006")
    config = DiscoveryConfig(
        name="kv", type="etcd", address=etcd.address, prefix="/plain/", value_format="address"
    )
    sink = Recorder()
    backend = EtcdBackend(config, sink)
    backend.watch(ServiceQuery("svc"))
    await backend.start()
    try:
        await until(lambda: sink.ports() == {1005, 1006}, "plain host:port values")
        assert {i.host for i in sink.updates[-1]} == {"127.0.0.1", "::1"}
    finally:
        await backend.stop()


async def test_etcd_idle_watch_is_renewed_quietly(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.discovery.etcd as etcd_module

    monkeypatch.setattr(etcd_module, "IDLE_RELIST", 0.2)
    etcd.put("/idle/svc/x", instance(1007))
    config = DiscoveryConfig(name="kv", type="etcd", address=etcd.address, prefix="/idle/")
    sink = Recorder()
    backend = EtcdBackend(config, sink)
    backend.watch(ServiceQuery("svc"))
    await backend.start()
    try:
        await until(lambda: backend.relists >= 3, "idle watches ended and listed again")
        assert sink.failures == [] and sink.ports() == {1007}
    finally:
        await backend.stop()
