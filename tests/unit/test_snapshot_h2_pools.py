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


HTTP2_CONFIG = """
listen: 127.0.0.1:0
upstreams:
  grpc:
    instances: [127.0.0.1:50051]
    protocol: h2c
    {http2}
routes:
  - name: rpc
    upstream: grpc
"""


def _pool(text: str, previous: object = None) -> tuple[object, H2InstancePool]:
    snapshot = build_snapshot(load_config_text(text, "t.yaml"), previous)  # type: ignore[arg-type]
    pool = snapshot.upstreams["grpc"].instances[0].pool
    assert isinstance(pool, H2InstancePool)
    return snapshot, pool


def test_http2_settings_reach_the_pool() -> None:
    http2 = (
        "http2: {max_connections: 2, max_concurrent_streams: 7, max_pending: 9,"
        " initial_window: 2MiB, connection_window: 32MiB, max_header_list_size: 16KiB,"
        " ping_interval: 30s, ping_timeout: 5s}"
    )
    _, pool = _pool(HTTP2_CONFIG.format(http2=http2))
    assert (pool.max_connections, pool.max_concurrent_streams, pool.max_pending) == (2, 7, 9)
    assert (pool.stream_window, pool.connection_window) == (2 << 20, 32 << 20)
    assert pool.max_header_list_size == 16 << 10
    assert (pool.ping_interval, pool.ping_timeout) == (30.0, 5.0)


def test_without_http2_the_pool_has_the_documented_defaults() -> None:
    _, pool = _pool(HTTP2_CONFIG.format(http2=""))
    assert (pool.max_connections, pool.max_concurrent_streams, pool.max_pending) == (4, None, 1024)
    assert (pool.stream_window, pool.connection_window) == (1 << 20, 16 << 20)
    assert pool.max_header_list_size == 64 << 10
    assert (pool.ping_interval, pool.ping_timeout) == (None, 20.0)


def test_a_reload_that_changes_http2_settings_makes_new_pools() -> None:
    first, old = _pool(HTTP2_CONFIG.format(http2="http2: {max_connections: 2}"))
    same, kept = _pool(HTTP2_CONFIG.format(http2="http2: {max_connections: 2}"), first)
    assert kept is old
    _, new = _pool(HTTP2_CONFIG.format(http2="http2: {max_connections: 3}"), same)
    assert new is not old and new.max_connections == 3
    assert old.closed  # (close_all: busy connections finish their streams, then close)


def test_explicit_default_http2_section_keeps_the_pool() -> None:
    first, old = _pool(HTTP2_CONFIG.format(http2=""))
    _, again = _pool(HTTP2_CONFIG.format(http2="http2: {}"), first)
    assert again is old
