"""gateway_grpc_requests_total: counted per (route, upstream, grpc_code), merged across
workers like the other counters."""

from __future__ import annotations

import json

from gateway.metrics import GatewayMetrics


def samples(metrics: GatewayMetrics) -> dict[tuple[str, str, str], float]:
    for family in metrics.families():
        if family.name == "gateway_grpc_requests":
            return {
                (s.labels["route"], s.labels["upstream"], s.labels["grpc_code"]): s.value
                for s in family.samples
                if s.name == "gateway_grpc_requests_total"
            }
    raise AssertionError("no gateway_grpc_requests family")


def test_counts_and_merges_across_workers() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    one.grpc_request("users", "users", "OK")
    one.grpc_request("users", "users", "OK")
    two.grpc_request("users", "users", "OK")
    two.grpc_request("", "", "UNIMPLEMENTED")
    assert samples(one) == {("users", "users", "OK"): 2}
    merged = GatewayMetrics()
    for worker in (one, two):
        merged.merge_state(json.loads(json.dumps(worker.export_state())))
    assert samples(merged) == {("users", "users", "OK"): 3, ("", "", "UNIMPLEMENTED"): 1}
