"""gateway_upstream_protocol_errors_total: recording, rendering, and summing across workers."""

from __future__ import annotations

import json

from prometheus_client import generate_latest

from gateway.metrics import GatewayMetrics, make_registry
from gateway.proxy.upstream import PROTOCOL_ERROR_REASONS


def test_protocol_errors_are_rendered_per_upstream_and_reason() -> None:
    m = GatewayMetrics()
    m.upstream_protocol_error("u", "data_after_response")
    m.upstream_protocol_error("u", "data_after_response")
    m.upstream_protocol_error("v", "chunk_framing")
    text = generate_latest(make_registry(m)).decode()
    assert "# TYPE gateway_upstream_protocol_errors_total counter" in text
    assert (
        'gateway_upstream_protocol_errors_total{reason="data_after_response",upstream="u"} 2.0'
        in text
    )
    assert 'gateway_upstream_protocol_errors_total{reason="chunk_framing",upstream="v"} 1.0' in text


def test_protocol_errors_survive_export_and_add_up_in_merge() -> None:
    workers = [GatewayMetrics(), GatewayMetrics()]
    workers[0].upstream_protocol_error("u", "invalid_response")
    workers[1].upstream_protocol_error("u", "invalid_response")
    workers[1].upstream_protocol_error("u", "response_head_too_large")
    merged = GatewayMetrics()
    for worker in workers:
        merged.merge_state(json.loads(json.dumps(worker.export_state())))
    assert merged.upstream_protocol_errors == {
        ("u", "invalid_response"): 2,
        ("u", "response_head_too_large"): 1,
    }


def test_state_without_protocol_errors_still_merges() -> None:
    # A worker running the previous code exports no such key: nothing is added.
    state = GatewayMetrics().export_state()
    del state["upstream_protocol_errors"]
    merged = GatewayMetrics()
    merged.merge_state(state)
    assert merged.upstream_protocol_errors == {}


def test_every_reason_is_documented_in_the_help_text() -> None:
    family = next(
        f for f in GatewayMetrics().families() if f.name == "gateway_upstream_protocol_errors"
    )
    assert all(reason in family.documentation for reason in PROTOCOL_ERROR_REASONS)
