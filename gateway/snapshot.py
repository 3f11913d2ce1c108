"""The immutable view of config + runtime objects that the data plane reads per request.

A reload builds a new ``Snapshot`` and swaps one reference; a request keeps the snapshot it
started with. Connection pools are carried over for instances that exist in both snapshots, so a
reload does not drop warm upstream connections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.balancing import make_balancer
from gateway.config.model import GatewayConfig, InstanceConfig, UpstreamConfig
from gateway.proxy.headers import TrustedProxies
from gateway.proxy.upstream import InstancePool
from gateway.routing import RouteTable


class Instance:
    """One upstream instance as the balancer and the proxy see it."""

    __slots__ = ("active_requests", "address", "available", "config", "pool", "weight")

    def __init__(self, config: InstanceConfig, pool: InstancePool) -> None:
        self.config = config
        self.address = config.address
        self.weight = config.weight
        self.available = True  # health checks and outlier detection (later) flip this
        self.pool = pool
        self.active_requests = 0


class Upstream:
    __slots__ = ("balancer", "config", "instances", "name", "read_timeout")

    def __init__(self, config: UpstreamConfig, instances: list[Instance]) -> None:
        self.config = config
        self.name = config.name
        self.instances = instances
        self.read_timeout = config.timeouts.read
        self.balancer = make_balancer(config.balancer, instances)

    def pick(self) -> Instance | None:
        return self.balancer.pick()


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: GatewayConfig
    routes: RouteTable
    upstreams: dict[str, Upstream]
    trusted_proxies: TrustedProxies

    def pools(self) -> list[InstancePool]:
        return [
            instance.pool for upstream in self.upstreams.values() for instance in upstream.instances
        ]


def _pool_key(
    upstream: UpstreamConfig, instance: InstanceConfig
) -> tuple[str, str, int, float, float, int]:
    timeouts = upstream.timeouts
    return (
        upstream.name,
        instance.host,
        instance.port,
        timeouts.connect,
        timeouts.idle,
        upstream.max_idle_connections,
    )


def build_snapshot(
    config: GatewayConfig,
    previous: Snapshot | None = None,
    discovered: Mapping[str, Sequence[InstanceConfig]] | None = None,
) -> Snapshot:
    """Compile ``config`` into a snapshot.

    ``discovered`` maps upstream names to instance lists from a discovery backend; they replace
    the upstream's static ``instances``. Pools of (upstream, host, port) that exist in
    ``previous`` are carried over with their idle connections.
    """
    old_pools: dict[tuple[str, str, int, float, float, int], InstancePool] = {}
    if previous is not None:
        for old_upstream in previous.upstreams.values():
            for old_instance in old_upstream.instances:
                old_pools[_pool_key(old_upstream.config, old_instance.config)] = old_instance.pool
    upstreams: dict[str, Upstream] = {}
    for name, upstream_config in config.upstreams.items():
        instances: list[Instance] = []
        instance_configs = upstream_config.instances
        if discovered is not None and name in discovered:
            instance_configs = tuple(discovered[name])
        for instance_config in instance_configs:
            key = _pool_key(upstream_config, instance_config)
            pool = old_pools.pop(key, None)
            if pool is None:
                pool = InstancePool(
                    instance_config.host,
                    instance_config.port,
                    max_idle=upstream_config.max_idle_connections,
                    idle_timeout=upstream_config.timeouts.idle,
                    connect_timeout=upstream_config.timeouts.connect,
                )
            instances.append(Instance(instance_config, pool))
        upstreams[name] = Upstream(upstream_config, instances)
    # Pools of instances that disappeared: idle connections close now; busy ones finish first.
    for pool in old_pools.values():
        pool.close_all()
    return Snapshot(
        config=config,
        routes=RouteTable(config.routes),
        upstreams=upstreams,
        trusted_proxies=TrustedProxies(config.trusted_proxies),
    )
