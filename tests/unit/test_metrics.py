"""GatewayMetrics: counting, bucket boundaries, exposition format, export/merge."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    DEFAULT_BUCKETS,
    NO_ROUTE,
    GatewayMetrics,
    make_registry,
    normalize_method,
)


def families(m: GatewayMetrics) -> dict[str, object]:
    text = generate_latest(make_registry(m)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(m: GatewayMetrics, sample_name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """All samples called ``sample_name`` keyed by their sorted label pairs."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for fam in families(m).values():
        for s in fam.samples:  # type: ignore[attr-defined]
            if s.name == sample_name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_default_buckets_span_100us_to_60s() -> None:
    assert DEFAULT_BUCKETS[0] == 0.0001
    assert DEFAULT_BUCKETS[-1] == 60
    assert list(DEFAULT_BUCKETS) == sorted(set(DEFAULT_BUCKETS))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("GET", "GET"),
        ("PATCH", "PATCH"),
        ("CONNECT", "CONNECT"),
        ("PROPFIND", "OTHER"),
        ("get", "OTHER"),  # methods are case-sensitive (RFC 9110 §9.1)
        ("", "OTHER"),
    ],
)
def test_normalize_method(method: str, expected: str) -> None:
    assert normalize_method(method) == expected


def test_requests_are_counted_per_label_set() -> None:
    m = GatewayMetrics()
    for _ in range(3):
        m.observe_request("users", "users-svc", "GET", 200, 0.01, 0.008, 0.001)
    m.observe_request("users", "users-svc", "POST", 502, 0.01, None, 0.001)
    m.observe_request(NO_ROUTE, NO_ROUTE, "GET", 404, 0.0001, None, 0.0001)
    m.observe_request("users", "users-svc", "BREW", 200, 0.01, 0.008, 0.001)

    got = samples(m, "gateway_requests_total")
    assert got == {
        (("code", "200"), ("method", "GET"), ("route", "users"), ("upstream", "users-svc")): 3,
        (("code", "502"), ("method", "POST"), ("route", "users"), ("upstream", "users-svc")): 1,
        (("code", "404"), ("method", "GET"), ("route", "<none>"), ("upstream", "<none>")): 1,
        (("code", "200"), ("method", "OTHER"), ("route", "users"), ("upstream", "users-svc")): 1,
    }


def test_bucket_boundaries_use_le_semantics() -> None:
    m = GatewayMetrics(buckets=(0.1, 0.5, 1.0))
    # Exactly on a bound counts in that bucket; just above goes to the next one.
    for v in (0.1, 0.1000001, 0.5, 1.0, 1.5, 0.0):
        m.observe_request("r", "u", "GET", 200, v, v, v)

    buckets = samples(m, "gateway_request_duration_seconds_bucket")
    by_le = {dict(k)["le"]: v for k, v in buckets.items()}
    assert by_le == {"0.1": 2, "0.5": 4, "1.0": 5, "+Inf": 6}

    assert samples(m, "gateway_request_duration_seconds_count") == {
        (("route", "r"), ("upstream", "u")): 6
    }
    total = samples(m, "gateway_request_duration_seconds_sum")[(("route", "r"), ("upstream", "u"))]
    assert total == pytest.approx(0.1 + 0.1000001 + 0.5 + 1.0 + 1.5)

    # Same values through the other two histograms.
    up = {
        dict(k)["le"]: v for k, v in samples(m, "gateway_upstream_duration_seconds_bucket").items()
    }
    ov = {dict(k)["le"]: v for k, v in samples(m, "gateway_overhead_seconds_bucket").items()}
    assert up == by_le
    assert ov == by_le


def test_upstream_histogram_only_when_upstream_was_reached() -> None:
    m = GatewayMetrics()
    m.observe_request("r", "u", "GET", 502, 0.002, None, 0.002)
    assert samples(m, "gateway_upstream_duration_seconds_count") == {}
    assert samples(m, "gateway_overhead_seconds_count") == {(("route", "r"),): 1}
    m.observe_request("r", "u", "GET", 200, 0.002, 0.0015, 0.0005)
    assert samples(m, "gateway_upstream_duration_seconds_count") == {(("upstream", "u"),): 1}
    assert samples(m, "gateway_overhead_seconds_count") == {(("route", "r"),): 2}


def test_gauges() -> None:
    m = GatewayMetrics()
    m.connections_open += 1
    m.connections_open += 1
    m.connections_open -= 1
    m.upstream_connections("u", active=3, idle=5)
    m.upstream_connections("u", active=1, idle=2)  # last report wins
    assert samples(m, "gateway_client_connections") == {(): 1}
    assert samples(m, "gateway_upstream_connections") == {
        (("state", "active"), ("upstream", "u")): 1,
        (("state", "idle"), ("upstream", "u")): 2,
    }


def test_exposition_is_well_formed() -> None:
    """HELP/TYPE on every family, base units, _total counters, +Inf buckets, monotonic counts."""
    m = GatewayMetrics()
    m.observe_request("a", "ua", "GET", 200, 0.003, 0.002, 0.0004)
    m.observe_request("b", "ub", "PUT", 201, 12.0, 11.0, 0.0002)
    text = generate_latest(make_registry(m)).decode()

    for name, typ in (
        ("gateway_requests_total", "counter"),
        ("gateway_request_duration_seconds", "histogram"),
        ("gateway_upstream_duration_seconds", "histogram"),
        ("gateway_overhead_seconds", "histogram"),
        ("gateway_client_connections", "gauge"),
    ):
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} {typ}\n" in text

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    # Default process/platform collectors are registered alongside.
    assert "process_cpu_seconds" in fams or "python_info" in fams
    assert "python_gc_objects_collected" in fams

    for name in (
        "gateway_request_duration_seconds",
        "gateway_upstream_duration_seconds",
        "gateway_overhead_seconds",
    ):
        fam = fams[name]
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[labels] = s.value
        assert series, name
        for labels, buckets in series.items():
            les = [le for le, _ in buckets]
            values = [v for _, v in buckets]
            assert les == sorted(les) and les[-1] == float("inf")
            assert values == sorted(values)  # cumulative
            assert values[-1] == counts[labels]


def test_openmetrics_exposition_parses() -> None:
    m = GatewayMetrics()
    m.observe_request("a", "ua", "GET", 200, 0.003, 0.002, 0.0004)
    text = generate_openmetrics(make_registry(m)).decode()
    assert text.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(text)}
    assert {"gateway_requests", "gateway_request_duration_seconds"} <= names


def test_rejects_bad_buckets() -> None:
    with pytest.raises(ValueError):
        GatewayMetrics(buckets=())
    with pytest.raises(ValueError):
        GatewayMetrics(buckets=(0.5, 0.1))
    with pytest.raises(ValueError):
        GatewayMetrics(buckets=(0.1, float("inf")))


def test_export_state_is_json_and_merge_sums() -> None:
    w1 = GatewayMetrics()
    w2 = GatewayMetrics()
    w1.observe_request("r", "u", "GET", 200, 0.001, 0.0008, 0.0002)
    w1.observe_request("r", "u", "GET", 200, 0.3, 0.29, 0.0002)
    w2.observe_request("r", "u", "GET", 200, 0.001, 0.0008, 0.0002)
    w2.observe_request("r2", "u2", "POST", 503, 0.0001, None, 0.0001)
    w1.connections_open = 4
    w2.connections_open = 6
    w1.upstream_connections("u", 1, 2)
    w2.upstream_connections("u", 3, 4)

    # States survive a JSON round trip (they travel between processes).
    states = [json.loads(json.dumps(w.export_state())) for w in (w1, w2)]
    total = GatewayMetrics()
    for st in states:
        total.merge_state(st)

    reqs = samples(total, "gateway_requests_total")
    assert reqs[(("code", "200"), ("method", "GET"), ("route", "r"), ("upstream", "u"))] == 3
    assert reqs[(("code", "503"), ("method", "POST"), ("route", "r2"), ("upstream", "u2"))] == 1
    counts = samples(total, "gateway_request_duration_seconds_count")
    assert counts == {
        (("route", "r"), ("upstream", "u")): 3,
        (("route", "r2"), ("upstream", "u2")): 1,
    }
    sums = samples(total, "gateway_request_duration_seconds_sum")
    assert sums[(("route", "r"), ("upstream", "u"))] == pytest.approx(0.302)
    le_1ms = {
        dict(k)["route"]: v
        for k, v in samples(total, "gateway_request_duration_seconds_bucket").items()
        if dict(k)["le"] == "0.001"
    }
    assert le_1ms == {"r": 2, "r2": 1}
    assert samples(total, "gateway_upstream_duration_seconds_count") == {(("upstream", "u"),): 3}
    assert samples(total, "gateway_client_connections") == {(): 10}
    assert samples(total, "gateway_upstream_connections") == {
        (("state", "active"), ("upstream", "u")): 4,
        (("state", "idle"), ("upstream", "u")): 6,
    }

    # Merging into a recorder that already has data adds to it.
    w1.merge_state(states[1])
    assert w1.export_state()["requests"] == total.export_state()["requests"]


def test_merge_rejects_mismatched_buckets_and_versions() -> None:
    a = GatewayMetrics(buckets=(0.1, 1.0))
    b = GatewayMetrics()
    b.observe_request("r", "u", "GET", 200, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="buckets"):
        a.merge_state(b.export_state())
    state = b.export_state()
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        GatewayMetrics().merge_state(state)


def test_registry_accepts_no_duplicate_collector() -> None:
    m = GatewayMetrics()
    registry = make_registry(m)
    with pytest.raises(ValueError):
        registry.register(m.collector())


def test_body_size_histograms_and_overrides() -> None:
    m = GatewayMetrics(bucket_overrides={"request_body": (10, 100)})
    m.observe_request("r", "u", "POST", 200, 0.01, 0.005, 0.005, 50, 5000)
    text = generate_latest(make_registry(m)).decode()
    assert 'gateway_request_body_bytes_bucket{le="10.0",route="r"} 0.0' in text
    assert 'gateway_request_body_bytes_bucket{le="100.0",route="r"} 1.0' in text
    assert 'gateway_response_body_bytes_sum{route="r"} 5000.0' in text
    with pytest.raises(ValueError, match="unknown histogram"):
        GatewayMetrics(bucket_overrides={"nope": (1,)})


def test_declare_creates_zero_series() -> None:
    m = GatewayMetrics()
    m.declare([("r", "u")])
    text = generate_latest(make_registry(m)).decode()
    assert 'gateway_request_duration_seconds_count{route="r",upstream="u"} 0.0' in text
    assert 'gateway_upstream_duration_seconds_count{upstream="u"} 0.0' in text


def test_retry_overflow_and_instance_metrics() -> None:
    m = GatewayMetrics()
    m.retry("u", "reset")
    m.retry("u", "reset")
    m.breaker_overflow("u", "requests")
    m.upstream_instances("u", {"healthy": 2, "unhealthy": 0, "ejected": 1})
    text = generate_latest(make_registry(m)).decode()
    assert 'gateway_retries_total{reason="reset",upstream="u"} 2.0' in text
    assert 'gateway_circuit_breaker_overflow_total{limit="requests",upstream="u"} 1.0' in text
    assert 'gateway_upstream_instances{state="ejected",upstream="u"} 1.0' in text


# Body sizes at, just below and just above each bound of the size buckets (10, 100): the
# one-compare path for bucket 0 must agree with bisect_left's "le" bucket, and every size counts
# in the sum. (request_bytes, response_bytes, request bucket, response bucket)
@pytest.mark.parametrize(
    ("request_bytes", "response_bytes", "request_bucket", "response_bucket"),
    [
        (0, 0, 0, 0),
        (9, 10, 0, 0),
        (10, 11, 0, 1),
        (11, 100, 1, 1),
        (100, 101, 1, 2),
        (101, 10**9, 2, 2),
    ],
)
def test_body_size_buckets_at_the_bounds(
    request_bytes: int, response_bytes: int, request_bucket: int, response_bucket: int
) -> None:
    m = GatewayMetrics(bucket_overrides={"request_body": (10, 100), "response_body": (10, 100)})
    m.observe_request("r", "u", "POST", 200, 0.01, 0.005, 0.005, request_bytes, response_bytes)
    m.observe_request("r", "u", "POST", 200, 0.01, 0.005, 0.005, request_bytes, response_bytes)
    request_hist = [0, 0, 0, float(2 * request_bytes)]
    request_hist[request_bucket] = 2
    response_hist = [0, 0, 0, float(2 * response_bytes)]
    response_hist[response_bucket] = 2
    assert m.request_body["r"] == request_hist
    assert m.response_body["r"] == response_hist


def test_observations_land_in_the_exported_lists_after_declare_and_merge() -> None:
    # observe_request caches each (route, upstream)'s lists: they must stay the ones the
    # exposition and export_state read, whether declare, merge_state or a request made them.
    m = GatewayMetrics()
    m.declare([("r", "u")])
    other = GatewayMetrics()
    other.observe_request("s", "u", "GET", 200, 0.0002, 0.0001, 0.0001, 0, 5)
    m.merge_state(other.export_state())
    for route in ("r", "s", "t"):
        m.observe_request(route, "u", "GET", 200, 0.0002, 0.0001, 0.0001, 0, 5)
    m.observe_request("s", "u", "GET", 200, 0.0002, 0.0001, 0.0001, 0, 5)
    counts = samples(m, "gateway_request_duration_seconds_count")
    assert counts == {
        (("route", "r"), ("upstream", "u")): 1.0,
        (("route", "s"), ("upstream", "u")): 3.0,
        (("route", "t"), ("upstream", "u")): 1.0,
    }
    assert samples(m, "gateway_response_body_bytes_sum") == {
        (("route", "r"),): 5.0,
        (("route", "s"),): 15.0,
        (("route", "t"),): 5.0,
    }


def test_process_counters_are_read_from_sources_exported_and_summed() -> None:
    counts = {"trace_spans_exported": 3, "ratelimit_lease_calls": 1}
    worker = GatewayMetrics()
    worker.count_from(lambda: counts)
    worker.count_from(lambda: {"trace_spans_exported": 2})
    counts["trace_spans_exported"] = 5  # read at export time, not at registration
    state = json.loads(json.dumps(worker.export_state()))
    assert state["process_counters"] == {"trace_spans_exported": 7, "ratelimit_lease_calls": 1}
    total = GatewayMetrics()
    total.merge_state(state)
    total.merge_state(state)
    text = generate_latest(make_registry(total)).decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert values["gateway_trace_spans_exported_total"] == 14
    assert values["gateway_ratelimit_lease_calls_total"] == 2
    assert values["gateway_trace_export_failures_total"] == 0  # every one, at zero when unused
