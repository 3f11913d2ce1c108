"""Upstream runtime state outlives snapshots: discovery updates and reloads keep it.

A discovery update or a reload builds a new snapshot. The balancer (slow start included), the
circuit breaker's counts, the retry budget and the latency window must carry over when the
upstream's settings that shape them are unchanged, and start afresh when they changed.
"""

from __future__ import annotations

import time

from gateway.config import load_config_text
from gateway.config.model import GatewayConfig, InstanceConfig
from gateway.snapshot import build_snapshot

CONFIG = """
upstreams:
  web:
    instances: [127.0.0.1:9101, 127.0.0.1:9102]
    balancer: {balancer}
    slow_start: 30s
    circuit_breaker: {{max_requests: 10}}
routes:
  - {{name: web, match: {{path: {{prefix: /}}}}, upstream: web}}
"""


def config(balancer: str = "least_request") -> GatewayConfig:
    return load_config_text(CONFIG.format(balancer=balancer), "t.yaml")


def test_discovery_update_keeps_breaker_budget_and_balancer() -> None:
    first = build_snapshot(config())
    upstream = first.upstreams["web"]
    upstream.breaker.requests = 7  # seven requests in flight
    for _ in range(100):
        upstream.budget.record_request()
    discovered = {
        "web": [InstanceConfig("127.0.0.1", 9101), InstanceConfig("127.0.0.1", 9103)],
    }
    second = build_snapshot(config(), first, discovered)
    kept = second.upstreams["web"]
    assert kept.breaker is upstream.breaker and kept.breaker.requests == 7
    assert kept.budget is upstream.budget and kept.budget.requests_now == 100
    assert kept.balancer is upstream.balancer


def test_newly_discovered_instance_ramps_under_slow_start() -> None:
    first = build_snapshot(config())
    discovered = {
        "web": [
            InstanceConfig("127.0.0.1", 9101),
            InstanceConfig("127.0.0.1", 9102),
            InstanceConfig("127.0.0.1", 9103),
        ],
    }
    second = build_snapshot(config(), first, discovered)
    upstream = second.upstreams["web"]
    by_address = {instance.address: instance for instance in upstream.instances}
    balancer = upstream.balancer
    assert balancer.in_slow_start(by_address["127.0.0.1:9103"])  # new: ramps
    assert not balancer.in_slow_start(by_address["127.0.0.1:9101"])  # known: full weight
    assert balancer.effective_weight(by_address["127.0.0.1:9103"]) < 1.0
    balancer.tick(time.monotonic() + 31)
    assert balancer.effective_weight(by_address["127.0.0.1:9103"]) == 1.0


def test_changed_settings_start_afresh() -> None:
    first = build_snapshot(config())
    first.upstreams["web"].breaker.requests = 3
    second = build_snapshot(config("round_robin"), first)
    fresh = second.upstreams["web"]
    assert fresh.balancer is not first.upstreams["web"].balancer
    assert fresh.balancer.name == "round_robin"
    assert fresh.breaker.requests == 0
