"""ZooKeeper discovery against a real ZooKeeper (Debian's zookeeper package): Curator's layout,
ephemeral nodes vanishing with their registering session, outage and return, session expiry ->
a new session and a relist."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kazoo.client import KazooClient

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import ServiceQuery
from gateway.discovery.zookeeper import ZooKeeperBackend
from tests.system.conftest import (
    DiscoveryGateway,
    Load,
    NamedBackends,
    ZooKeeperServer,
    expect_outage_keeps_last_set,
    route_all,
    wait_for,
)
from tests.system.test_etcd import Recorder, until


def curator_instance(service: str, port: int, **extra: Any) -> bytes:
    """What Curator's JsonInstanceSerializer writes for a ServiceInstance."""
    instance_id = str(uuid.uuid4())
    return json.dumps(
        {
            "name": service,
            "id": instance_id,
            "address": "127.0.0.1",
            "port": port,
            "sslPort": None,
            "payload": None,
            "registrationTimeUTC": int(time.time() * 1000),
            "serviceType": "DYNAMIC",
            "uriSpec": {"parts": [{"value": "scheme", "variable": True}]},
            **extra,
        }
    ).encode()


class Registrar:
    """One ZooKeeper session per registered instance, as a Curator-using service has."""

    def __init__(self, zookeeper: ZooKeeperServer) -> None:
        self.zookeeper = zookeeper
        self.clients: dict[str, KazooClient] = {}

    def register(self, service: str, name: str, port: int, base: str = "/services") -> None:
        client = KazooClient(hosts=self.zookeeper.hosts, timeout=10)
        client.start(timeout=10)
        data = curator_instance(service, port)
        node_id = json.loads(data)["id"]
        client.create(f"{base}/{service}/{node_id}", data, ephemeral=True, makepath=True)
        self.clients[name] = client

    def unregister(self, name: str) -> None:
        client = self.clients.pop(name)
        client.stop()  # closing the session deletes its ephemeral nodes
        client.close()

    def close(self) -> None:
        for name in list(self.clients):
            self.unregister(name)


@pytest.fixture
def registrar(zookeeper: ZooKeeperServer) -> Iterator[Registrar]:
    registrar = Registrar(zookeeper)
    yield registrar
    registrar.close()


def test_zookeeper_follow_ephemeral_nodes_and_outage(
    start_discovery_gateway: Callable[..., DiscoveryGateway],
    backends: NamedBackends,
    zookeeper: ZooKeeperServer,
    registrar: Registrar,
    load_factory: Callable[[int], Load],
) -> None:
    service = "web-zk"
    for name in ("b1", "b2", "b3"):
        registrar.register(service, name, backends.ports[name])
    config = {
        "discovery": {
            "zk": {
                "type": "zookeeper",
                "hosts": zookeeper.hosts,
                "session_timeout": "10s",
                "timeout": "1s",
                "retry_min": "100ms",
                "retry_max": "500ms",
            }
        },
        "upstreams": {"web": {"discovery": "zk", "service": service}},
        "routes": route_all("web"),
    }
    gw = start_discovery_gateway(config)
    wait_for(lambda: len(gw.upstream_addresses("web")) == 3, what="three instances")
    load = load_factory(gw.port)
    wait_for(lambda: load.names_since(0) >= {"b1", "b2", "b3"}, what="all three instances")

    # b2's registering session closes: its ephemeral node vanishes, and so does its traffic.
    registrar.unregister("b2")
    removed_at = time.monotonic()
    b2 = f"127.0.0.1:{backends.ports['b2']}"
    wait_for(lambda: b2 not in gw.upstream_addresses("web"), what="b2 dropped")
    load.wait_more(100)
    last_b2 = load.last_seen("b2")
    assert last_b2 is not None and last_b2 - removed_at <= 1.0
    assert load.names_since(load.results[-50][0]) == {"b1", "b3"}

    # ZooKeeper goes away: last set kept and stale, errors counted, traffic unharmed.
    zookeeper.stop()
    try:
        expect_outage_keeps_last_set(gw, load, "zk", {"b1", "b3"})
    finally:
        zookeeper.start()

    wait_for(lambda: not gw.discovery()["upstreams"]["web"]["stale"], what="ZooKeeper back")
    registrar.register(service, "b2", backends.ports["b2"])
    wait_for(lambda: b2 in gw.upstream_addresses("web"), what="b2 back", timeout=20)
    resumed = time.monotonic()
    wait_for(lambda: "b2" in load.names_since(resumed), what="traffic to b2 again")
    assert load.failures == []


async def test_zookeeper_session_expiry_relists(
    zookeeper: ZooKeeperServer, registrar: Registrar
) -> None:
    base = "/curator-expiry"
    await asyncio.to_thread(registrar.register, "api", "a", 2001, base)
    config = DiscoveryConfig(
        name="zk",
        type="zookeeper",
        hosts=zookeeper.hosts,
        prefix=base,
        session_timeout=2.0,
        retry_min=0.05,
        retry_max=0.2,
    )
    sink = Recorder()
    backend = ZooKeeperBackend(config, sink)
    backend.watch(ServiceQuery("api"))
    backend.watch(ServiceQuery("missing"))  # no node yet: an empty answer, then followed
    await backend.start()
    try:
        await until(lambda: sink.ports() == {2001} or len(sink.updates) >= 2, "first answers")
        await until(lambda: {2001} in [{i.port for i in u} for u in sink.updates], "api answer")
        assert backend.client is not None
        session_id, password = backend.client.client_id

        # Expire the session the way ZooKeeper's own tests do: a second client attaches to the
        # same session and closes it. The backend must notice, get a new session and relist.
        def expire() -> None:
            other = KazooClient(hosts=zookeeper.hosts, client_id=(session_id, password))
            other.start(timeout=10)
            other.stop()
            other.close()

        await asyncio.to_thread(expire)
        await until(lambda: len(backend.sessions) >= 2, "a new session", limit=20)
        assert backend.sessions[-1] != session_id
        # The watches were re-installed on the new session: a new instance is seen.
        updates = len(sink.updates)
        await asyncio.to_thread(registrar.register, "api", "b", 2002, base)
        await until(
            lambda: any({i.port for i in u} == {2001, 2002} for u in sink.updates[updates:]),
            "instance added after the expiry",
        )
        await asyncio.to_thread(registrar.register, "missing", "c", 2003, base)
        await until(
            lambda: any({i.port for i in u} == {2003} for u in sink.updates), "created service"
        )
        assert any("expired" in str(e) for e in sink.failures)
    finally:
        await backend.stop()
