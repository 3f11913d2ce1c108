"""tests/metrics_text.py: the helpers read the text format as Prometheus does."""

from __future__ import annotations

from tests.metrics_text import by_label, metric_sum, metric_value, samples

TEXT = """\
# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total{route="a",upstream="u",method="GET",code="200"} 3.0
gateway_requests_total{route="a",upstream="u",method="POST",code="200"} 2.0
gateway_requests_total{route="a",upstream="u",method="GET",code="502"} 1.0
gateway_requests_total{route="b",upstream="u",method="GET",code="200"} 7.0
# HELP gateway_requests_quirk_total A name that starts like the other one.
# TYPE gateway_requests_quirk_total counter
gateway_requests_quirk_total{route="a"} 100.0
# HELP gateway_overhead_seconds Overhead.
# TYPE gateway_overhead_seconds histogram
gateway_overhead_seconds_bucket{route="a",le="0.001"} 4.0
gateway_overhead_seconds_bucket{route="a",le="+Inf"} 6.0
gateway_overhead_seconds_count{route="a"} 6.0
gateway_overhead_seconds_sum{route="a"} 0.25
# HELP gateway_connections_open Open.
# TYPE gateway_connections_open gauge
gateway_connections_open 5.0
# HELP odd_labels Escapes.
# TYPE odd_labels gauge
odd_labels{path="a\\"b,c=d"} 1.5
# HELP gateway_tls_certificate_expiry_timestamp_seconds Expiry.
# TYPE gateway_tls_certificate_expiry_timestamp_seconds gauge
gateway_tls_certificate_expiry_timestamp_seconds{listener="https",name="*.x.test"} 1.9e+09
"""


def test_metric_sum_matches_names_exactly_and_labels_as_a_subset() -> None:
    assert metric_sum(TEXT, "gateway_requests_total") == 13
    assert metric_sum(TEXT, "gateway_requests_total", route="a") == 6
    assert metric_sum(TEXT, "gateway_requests_total", route="a", method="GET") == 4
    assert metric_sum(TEXT, "gateway_requests_total", route="c") == 0
    assert metric_sum(TEXT, "gateway_overhead_seconds_count", route="a") == 6
    assert metric_sum(TEXT, "gateway_overhead_seconds_bucket", le="+Inf") == 6
    assert metric_sum(TEXT, "gateway_connections_open") == 5
    assert metric_sum(TEXT, "odd_labels", path='a"b,c=d') == 1.5


def test_metric_value_tells_missing_from_zero() -> None:
    assert metric_value(TEXT, "gateway_requests_total", route="c") is None
    assert metric_value(TEXT, "gateway_requests_total", route="b") == 7
    assert metric_value(TEXT, "gateway_absent") is None


def test_by_label() -> None:
    assert by_label(TEXT, "gateway_requests_total", "method", route="a") == {"GET": 4, "POST": 2}
    assert by_label(TEXT, "gateway_requests_total", "route") == {"a": 6, "b": 7}
    assert by_label(TEXT, "gateway_connections_open", "route") == {}


def test_a_label_called_name() -> None:
    expiry = "gateway_tls_certificate_expiry_timestamp_seconds"
    assert metric_sum(TEXT, expiry, name="*.x.test", listener="https") == 1.9e9
    assert by_label(TEXT, expiry, "name", text="x") == {}


def test_samples() -> None:
    found = samples(TEXT, "gateway_requests_total", code="502")
    assert [(s.labels["route"], s.value) for s in found] == [("a", 1.0)]
