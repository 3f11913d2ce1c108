"""Instances of ``protocol: h2c | h2`` upstreams get HTTP/2 pools, carried across snapshots
like the HTTP/1.1 ones; a protocol change means new connections."""

from __future__ import annotations

from gateway.config import load_config_text
from gateway.proxy.h2.client import H2InstancePool
from gateway.snapshot import build_snapshot

CONFIG = """
listen: 127.0.0.1:0
upstreams:
  grpc:
    instances: [127.0.0.1:50051, 127.0.0.1:50052]
    protocol: {protocol}
  web:
    instances: [127.0.0.1:8080]
routes:
  - name: all
    upstream: web
  - name: rpc
    match: {{path: {{prefix: /pkg.Users/}}}}
    upstream: grpc
"""


def test_h2c_instances_get_h2_pools_and_http1_ones_do_not() -> None:
    snapshot = build_snapshot(load_config_text(CONFIG.format(protocol="h2c"), "t.yaml"))
    assert snapshot.h2_upstreams == frozenset({"grpc"})
    pools = [instance.pool for instance in snapshot.upstreams["grpc"].instances]
    assert all(isinstance(pool, H2InstancePool) for pool in pools)
    assert [(p.host, p.port) for p in pools] == [("127.0.0.1", 50051), ("127.0.0.1", 50052)]
    assert all(p.ssl_context is None for p in pools)
    assert not isinstance(snapshot.upstreams["web"].instances[0].pool, H2InstancePool)


def test_http1_only_config_has_no_h2_upstreams() -> None:
    snapshot = build_snapshot(load_config_text(CONFIG.format(protocol="http1"), "t.yaml"))
    assert snapshot.h2_upstreams == frozenset()
    assert not any(
        isinstance(instance.pool, H2InstancePool)
        for upstream in snapshot.upstreams.values()
        for instance in upstream.instances
    )


def test_h2_pools_carry_over_and_a_protocol_change_replaces_them() -> None:
    first = build_snapshot(load_config_text(CONFIG.format(protocol="h2c"), "t.yaml"))
    again = build_snapshot(load_config_text(CONFIG.format(protocol="h2c"), "t.yaml"), first)
    old = [i.pool for i in first.upstreams["grpc"].instances]
    carried = [i.pool for i in again.upstreams["grpc"].instances]
    assert all(a is b for a, b in zip(carried, old, strict=True))
    plain = build_snapshot(load_config_text(CONFIG.format(protocol="http1"), "t.yaml"), again)
    new = [i.pool for i in plain.upstreams["grpc"].instances]
    assert not any(isinstance(pool, H2InstancePool) for pool in new)
    assert all(pool.closed for pool in old)  # (close_all: the old pools take no new stream)
