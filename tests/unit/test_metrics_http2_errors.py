"""gateway_http2_errors_total (gateway/proxy/h2/errors.py): RST_STREAM and GOAWAY frames through
a counting h2 connection, by side, direction, frame and RFC 9113 §7 code; merged across
workers like the other counters."""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.exceptions
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, RstStreamFrame

from gateway.metrics import GatewayMetrics
from gateway.proxy.h2.errors import (
    CODE_LABELS,
    DOWNSTREAM,
    CountingH2Connection,
    ErrorCounter,
    code_label,
)

Key = tuple[str, str, str, str]


def samples(metrics: GatewayMetrics) -> dict[Key, float]:
    for family in metrics.families():
        if family.name == "gateway_http2_errors":
            return {
                (s.labels["side"], s.labels["direction"], s.labels["frame"], s.labels["code"]): (
                    s.value
                )
                for s in family.samples
                if s.name == "gateway_http2_errors_total"
            }
    raise AssertionError("no gateway_http2_errors family")


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (0x0, "NO_ERROR"),
        (0x1, "PROTOCOL_ERROR"),
        (0x7, "REFUSED_STREAM"),
        (0x8, "CANCEL"),
        (0xB, "ENHANCE_YOUR_CALM"),
        (0xD, "HTTP_1_1_REQUIRED"),
        (0xE, "UNKNOWN"),  # RFC 9113 §7: unknown codes must not trigger special behaviour
        (0xFFFFFFFF, "UNKNOWN"),
    ],
)
def test_code_labels_are_bounded(code: int, label: str) -> None:
    assert code_label(code) == label
    assert label in CODE_LABELS
    assert len(CODE_LABELS) == 15


def _pair(metrics: GatewayMetrics) -> tuple[h2.connection.H2Connection, CountingH2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = CountingH2Connection(h2.config.H2Configuration(client_side=False))
    server.error_counter = ErrorCounter(DOWNSTREAM, metrics)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def test_frames_sent_and_received_are_counted() -> None:
    metrics = GatewayMetrics()
    client, server = _pair(metrics)
    client.send_headers(
        1, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    )
    client.send_headers(
        3, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")]
    )
    server.receive_data(client.data_to_send())
    server.reset_stream(1, ErrorCodes.REFUSED_STREAM)
    reset = RstStreamFrame(3)
    reset.error_code = ErrorCodes.CANCEL
    server.receive_data(reset.serialize())
    goaway = GoAwayFrame(0)
    goaway.error_code = 0x42  # not a code RFC 9113 defines
    server.receive_data(goaway.serialize())
    assert samples(metrics) == {
        ("downstream", "sent", "RST_STREAM", "REFUSED_STREAM"): 1,
        ("downstream", "received", "RST_STREAM", "CANCEL"): 1,
        ("downstream", "received", "GOAWAY", "UNKNOWN"): 1,
    }


def test_graceful_goaway_is_not_counted_and_a_connection_error_is() -> None:
    metrics = GatewayMetrics()
    _, server = _pair(metrics)
    server.close_connection()  # NO_ERROR
    assert samples(metrics) == {}
    metrics = GatewayMetrics()
    _, server = _pair(metrics)
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"x" * 8)  # PING on stream 1
    assert samples(metrics) == {("downstream", "sent", "GOAWAY", "PROTOCOL_ERROR"): 1}


def test_merged_across_workers() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    one.http2_error("downstream", "sent", "RST_STREAM", "CANCEL")
    two.http2_error("downstream", "sent", "RST_STREAM", "CANCEL")
    two.http2_error("upstream", "received", "GOAWAY", "ENHANCE_YOUR_CALM")
    merged = GatewayMetrics()
    for worker in (one, two):
        merged.merge_state(json.loads(json.dumps(worker.export_state())))
    assert samples(merged) == {
        ("downstream", "sent", "RST_STREAM", "CANCEL"): 2,
        ("upstream", "received", "GOAWAY", "ENHANCE_YOUR_CALM"): 1,
    }
