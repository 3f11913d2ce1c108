"""gateway_downstream_requests_total{protocol}: h2 counted by the HTTP/2 code, http1 derived
at scrape time from gateway_requests_total, exact, and merged across workers."""

from __future__ import annotations

import json

from gateway.metrics import GatewayMetrics


def by_protocol(metrics: GatewayMetrics) -> dict[str, float]:
    for family in metrics.families():
        if family.name == "gateway_downstream_requests":
            return {
                s.labels["protocol"]: s.value
                for s in family.samples
                if s.name == "gateway_downstream_requests_total"
            }
    raise AssertionError("no gateway_downstream_requests family")


def observe(metrics: GatewayMetrics, n: int, *, h2: bool, code: int = 200) -> None:
    for _ in range(n):
        if h2:
            metrics.h2_requests += 1  # what forward.py and the bridge's StreamClient do
        metrics.observe_request("r", "u", "GET", code, 0.001, 0.0005, 0.0005)


def test_no_requests_is_zero_for_both() -> None:
    assert by_protocol(GatewayMetrics()) == {"http1": 0, "h2": 0}


def test_http1_is_the_total_minus_h2_across_series() -> None:
    metrics = GatewayMetrics()
    observe(metrics, 5, h2=False)
    observe(metrics, 2, h2=False, code=503)
    observe(metrics, 3, h2=True)
    observe(metrics, 1, h2=True, code=404)
    assert by_protocol(metrics) == {"http1": 7, "h2": 4}


def test_merged_across_workers() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    observe(one, 2, h2=False)
    observe(one, 1, h2=True)
    observe(two, 4, h2=True)
    merged = GatewayMetrics()
    for worker in (one, two):
        merged.merge_state(json.loads(json.dumps(worker.export_state())))
    assert by_protocol(merged) == {"http1": 2, "h2": 5}


def test_a_state_from_before_the_family_merges_as_all_http1() -> None:
    old = GatewayMetrics()
    observe(old, 3, h2=False)
    state = old.export_state()
    del state["h2_requests"]
    merged = GatewayMetrics()
    merged.merge_state(state)
    assert by_protocol(merged) == {"http1": 3, "h2": 0}
