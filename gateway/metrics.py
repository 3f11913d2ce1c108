"""Request metrics with a hot path made of plain dict and list operations.

prometheus_client's ``Counter(...).labels(...).observe(...)`` costs several microseconds per call
(label validation, a lock, per-child objects). The data plane's whole budget is ~25 µs per
request, so requests are recorded here into dicts keyed by label tuples, with histogram counts in
lists, and converted into metric families only when Prometheus scrapes (``collector()``).

State is also exportable as plain JSON-able totals (``export_state``) and mergeable
(``merge_state``), so that a supervisor can sum the totals of several worker processes.

Everything here runs on the event-loop thread; no locks. The collector copies containers before
iterating so that a scrape from another thread cannot trip over a dict that grows meanwhile.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from typing import Any

from mypy_extensions import mypyc_attr
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString as _float_to_go_string

__all__ = [
    "DEFAULT_BUCKETS",
    "NO_ROUTE",
    "GatewayMetrics",
    "make_registry",
    "normalize_method",
]

# 100 µs up to 60 s: the gateway's own overhead lives below a millisecond, upstream calls can
# take tens of seconds. Roughly 1-2.5-5 steps per decade.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

# Request/response body sizes: 100 B up to 100 MB, one step per decade.
DEFAULT_SIZE_BUCKETS: tuple[float, ...] = (100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 1e8)

# The histograms and their default buckets; each can be overridden by name (config `metrics`).
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "request_duration": DEFAULT_BUCKETS,
    "upstream_duration": DEFAULT_BUCKETS,
    "overhead": DEFAULT_BUCKETS,
    "request_body": DEFAULT_SIZE_BUCKETS,
    "response_body": DEFAULT_SIZE_BUCKETS,
}

# prometheus_client's formatter of `le` values (1.0 -> "1.0", inf -> "+Inf") has no annotations.
float_to_go_string: Callable[[float], str] = _float_to_go_string

# Label value used by callers for requests that matched no route (and so have no upstream).
NO_ROUTE = "<none>"

# RFC 9110 §9 methods plus PATCH (RFC 5789). Anything else is folded into one label value so a
# client cannot blow up the series count with invented methods.
_KNOWN_METHODS: frozenset[str] = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)

_STATE_VERSION = 2

# Counters kept by parts of a process that never see a GatewayMetrics (the tracing filter's
# OTLP exporters, the Redis store's token leases). They are read from sources registered with
# ``count_from`` when metrics are scraped or exported, never on a request, and add up across
# workers like the other counters. key -> (family name, help).
PROCESS_COUNTERS: dict[str, tuple[str, str]] = {
    "trace_spans_exported": (
        "gateway_trace_spans_exported",
        "Spans the tracing filter's OTLP exporters delivered (the receiver answered 2xx).",
    ),
    "trace_spans_dropped": (
        "gateway_trace_spans_dropped",
        "Spans the tracing filter did not deliver: its export queue was full, or their batch"
        " failed (see gateway_trace_export_failures_total).",
    ),
    "trace_export_failures": (
        "gateway_trace_export_failures",
        "OTLP export requests (batches of spans) that failed: a non-2xx answer after the one"
        " retry of a 429/502/503/504, a timeout or a connection error.",
    ),
    "jwks_fetches": (
        "gateway_jwks_fetches",
        "JWK Set fetches of the jwt filter's jwks_url, made by the control plane for every"
        " worker (gateway/filters/jwks.py).",
    ),
    "jwks_fetch_failures": (
        "gateway_jwks_fetch_failures",
        "JWK Set fetches that failed (not 200, not JSON, no usable key, timeout, connection"
        " error): the previous keys stay in use.",
    ),
    "ratelimit_lease_calls": (
        "gateway_ratelimit_lease_calls",
        "Lease entries sent to Redis in script calls (refills and returns of leased tokens).",
    ),
    "ratelimit_lease_tokens_granted": (
        "gateway_ratelimit_lease_tokens_granted",
        "Rate-limit tokens Redis granted to this gateway's leases.",
    ),
    "ratelimit_lease_tokens_returned": (
        "gateway_ratelimit_lease_tokens_returned",
        "Leased rate-limit tokens given back to Redis (expired or no longer used).",
    ),
}

CounterSource = Callable[[], Mapping[str, int]]


def normalize_method(method: str) -> str:
    """Return ``method`` if it is a well-known HTTP method, else ``"OTHER"`` (bounded labels)."""
    return method if method in _KNOWN_METHODS else "OTHER"


def _check_bounds(buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    if not bounds:
        raise ValueError("at least one bucket bound is required")
    if any(not math.isfinite(b) for b in bounds):
        raise ValueError("bucket bounds must be finite (+Inf is implicit)")
    if any(a >= b for a, b in pairwise(bounds)):
        raise ValueError("bucket bounds must be strictly increasing")
    return bounds


def _new_hist(nbounds: int) -> list[float]:
    # Slots 0..nbounds-1: per-bucket (non-cumulative) counts, slot nbounds: values above the
    # last bound (+Inf), slot nbounds+1: sum of observed values.
    return [0] * (nbounds + 1) + [0.0]


# Interpreted subclasses: loadtest.bench_dataplane.NoRecording (no per-request recording).
@mypyc_attr(allow_interpreted_subclasses=True)
class GatewayMetrics:
    """Cheap per-request recording; conversion to Prometheus families happens at scrape time."""

    def __init__(
        self,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        *,
        bucket_overrides: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        """``buckets`` applies to the three duration histograms; ``bucket_overrides`` replaces
        the buckets of single histograms by name (see ``HISTOGRAMS``)."""
        overrides = dict(bucket_overrides or {})
        unknown = set(overrides) - set(HISTOGRAMS)
        if unknown:
            raise ValueError(f"unknown histogram(s) {sorted(unknown)}; known: {sorted(HISTOGRAMS)}")
        durations = _check_bounds(buckets)
        self.bounds: dict[str, tuple[float, ...]] = {
            name: _check_bounds(overrides[name])
            if name in overrides
            else (default if default is not DEFAULT_BUCKETS else durations)
            for name, default in HISTOGRAMS.items()
        }
        self.buckets: tuple[float, ...] = self.bounds["request_duration"]
        self._n = len(self.buckets)
        self._upstream_bounds = self.bounds["upstream_duration"]
        self._overhead_bounds = self.bounds["overhead"]
        self._request_body_bounds = self.bounds["request_body"]
        self._response_body_bounds = self.bounds["response_body"]
        # A size at or below the first bound lands in bucket 0 (what bisect_left would say).
        self._request_body_first = self._request_body_bounds[0]
        self._response_body_first = self._response_body_bounds[0]
        # (route, upstream) -> the histogram lists observe_request updates (see _route_series).
        self._series: dict[
            tuple[str, str], tuple[list[float], list[float], list[float], list[float]]
        ] = {}
        # route -> histogram list, body sizes
        self.request_body: dict[str, list[float]] = {}
        self.response_body: dict[str, list[float]] = {}
        # (route, upstream, method, code) -> count
        self.requests: dict[tuple[str, str, str, int], int] = {}
        # (route, upstream) -> histogram list (see _new_hist)
        self.request_duration: dict[tuple[str, str], list[float]] = {}
        # upstream -> histogram list
        self.upstream_duration: dict[str, list[float]] = {}
        # route -> histogram list
        self.overhead: dict[str, list[float]] = {}
        # Open client connections; the data plane does += 1 / -= 1 directly.
        self.connections_open: int = 0
        # upstream -> (active, idle) pooled connections, last reported value.
        self.upstream_conns: dict[str, tuple[int, int]] = {}
        # (upstream, reason) -> retries started (reason "budget_exhausted": retry refused).
        self.retries: dict[tuple[str, str], int] = {}
        # (upstream, limit) -> requests refused by the circuit breaker.
        self.overflows: dict[tuple[str, str], int] = {}
        # (route, result) -> rate-limit decisions.
        self.ratelimits: dict[tuple[str, str], int] = {}
        # (route, result) -> Idempotency-Key outcomes (stored, replayed, conflict, ...).
        self.idempotency_results: dict[tuple[str, str], int] = {}
        # upstream -> {state: count} of its instances (healthy, unhealthy, ejected), last report.
        self.instance_states: dict[str, dict[str, int]] = {}
        # Slow or excess clients: reason -> connections refused (max_connections, draining);
        # kind -> clients cut off by a timeout (header, body, send); malloc_trim calls.
        self.connections_refused: dict[str, int] = {}
        # (listener, reason) -> TLS handshakes that failed (gateway.tls.accept).
        self.tls_handshake_errors: dict[tuple[str, str], int] = {}
        self.client_timeouts: dict[str, int] = {}
        self.malloc_trims = 0
        # (upstream, reason) -> upstream connections closed for breaking HTTP/1.1 framing
        # (reasons: gateway.proxy.upstream.PROTOCOL_ERROR_REASONS, a fixed set).
        self.upstream_protocol_errors: dict[tuple[str, str], int] = {}
        self.filter_errors: dict[tuple[str, str], int] = {}  # (route, filter) -> exceptions
        # (route, upstream, grpc_code) -> gRPC calls proxied natively (gateway/proxy/h2/
        # forward.py); grpc_code is gateway.proxy.grpc.grpc_code_label's: 18 values at most.
        self.grpc_requests: dict[tuple[str, str, str], int] = {}
        # Requests (streams) from HTTP/2 clients, each also in ``requests``: the HTTP/2 code
        # counts them, and the HTTP/1.1 share is derived at scrape time (total minus these), so
        # the HTTP/1.1 path pays nothing for gateway_downstream_requests_total{protocol}.
        self.h2_requests = 0
        # PROCESS_COUNTERS: merged from other processes' states, plus the live sources.
        self.process_counters: dict[str, int] = {}
        self._counter_sources: list[CounterSource] = []
        # (side, direction, frame, code) -> RST_STREAM / GOAWAY frames on HTTP/2 connections
        # (gateway/proxy/h2/errors.py: fixed label sets, 120 series at most).
        self.http2_errors: dict[tuple[str, str, str, str], int] = {}

    # -- hot path ---------------------------------------------------------------------------

    def observe_request(
        self,
        route: str,
        upstream: str,
        method: str,
        code: int,
        total_s: float,
        upstream_s: float | None,
        overhead_s: float,
        request_bytes: int = 0,
        response_bytes: int = 0,
    ) -> None:
        """Record one finished request. Durations in seconds; ``upstream_s`` None = not sent;
        body sizes in bytes as they crossed the gateway."""
        if method not in _KNOWN_METHODS:
            method = "OTHER"
        key = (route, upstream, method, code)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

        # One lookup for the route's histograms instead of four (they stay in their dicts).
        series = self._series.get((route, upstream))
        if series is None:
            series = self._route_series(route, upstream)
        duration, overhead, request_body, response_body = series

        # bisect_left gives the first bound >= value: Prometheus "le" (less or equal) semantics.
        duration[bisect_left(self.buckets, total_s)] += 1
        duration[-1] += total_s

        if upstream_s is not None:
            h = self.upstream_duration.get(upstream)
            if h is None:
                h = self.upstream_duration[upstream] = _new_hist(len(self._upstream_bounds))
            h[bisect_left(self._upstream_bounds, upstream_s)] += 1
            h[-1] += upstream_s

        overhead[bisect_left(self._overhead_bounds, overhead_s)] += 1
        overhead[-1] += overhead_s

        # Sizes: most bodies are empty or fit the first bucket; one compare instead of a bisect.
        if request_bytes <= self._request_body_first:
            request_body[0] += 1
        else:
            request_body[bisect_left(self._request_body_bounds, request_bytes)] += 1
        request_body[-1] += request_bytes
        if response_bytes <= self._response_body_first:
            response_body[0] += 1
        else:
            response_body[bisect_left(self._response_body_bounds, response_bytes)] += 1
        response_body[-1] += response_bytes

    def _route_series(
        self, route: str, upstream: str
    ) -> tuple[list[float], list[float], list[float], list[float]]:
        """The (route, upstream) histograms of observe_request, created on first use."""
        rkey = (route, upstream)
        duration = self.request_duration.get(rkey)
        if duration is None:
            duration = self.request_duration[rkey] = _new_hist(self._n)
        overhead = self.overhead.get(route)
        if overhead is None:
            overhead = self.overhead[route] = _new_hist(len(self._overhead_bounds))
        request_body = self.request_body.get(route)
        if request_body is None:
            request_body = self.request_body[route] = _new_hist(len(self._request_body_bounds))
        response_body = self.response_body.get(route)
        if response_body is None:
            response_body = self.response_body[route] = _new_hist(len(self._response_body_bounds))
        series = (duration, overhead, request_body, response_body)
        if len(self._series) < 65_536:  # bounded: route x upstream pairs come from config
            self._series[rkey] = series
        return series

    def declare(self, routes: Iterable[tuple[str, str]]) -> None:
        """Create zero-valued series for configured (route, upstream) pairs, so Prometheus sees
        each series start at 0 and ``rate()`` over the first scrapes is not skewed."""
        for route, upstream in routes:
            if (route, upstream) not in self.request_duration:
                self.request_duration[(route, upstream)] = _new_hist(self._n)
            if upstream not in self.upstream_duration:
                self.upstream_duration[upstream] = _new_hist(len(self._upstream_bounds))
            if route not in self.overhead:
                self.overhead[route] = _new_hist(len(self._overhead_bounds))
            if route not in self.request_body:
                self.request_body[route] = _new_hist(len(self._request_body_bounds))
            if route not in self.response_body:
                self.response_body[route] = _new_hist(len(self._response_body_bounds))

    def retry(self, upstream: str, reason: str) -> None:
        key = (upstream, reason)
        self.retries[key] = self.retries.get(key, 0) + 1

    def ratelimit(self, route: str, result: str) -> None:
        key = (route, result)
        self.ratelimits[key] = self.ratelimits.get(key, 0) + 1

    def idempotency(self, route: str, result: str) -> None:
        key = (route, result)
        self.idempotency_results[key] = self.idempotency_results.get(key, 0) + 1

    def breaker_overflow(self, upstream: str, kind: str) -> None:
        key = (upstream, kind)
        self.overflows[key] = self.overflows.get(key, 0) + 1

    def connection_refused(self, reason: str) -> None:
        self.connections_refused[reason] = self.connections_refused.get(reason, 0) + 1

    def tls_handshake_error(self, listener: str, reason: str) -> None:
        key = (listener, reason)
        self.tls_handshake_errors[key] = self.tls_handshake_errors.get(key, 0) + 1

    def client_timeout(self, kind: str) -> None:
        self.client_timeouts[kind] = self.client_timeouts.get(kind, 0) + 1

    def upstream_protocol_error(self, upstream: str, reason: str) -> None:
        """An upstream connection was closed because the upstream broke HTTP/1.1 framing."""
        key = (upstream, reason)
        errors = self.upstream_protocol_errors
        errors[key] = errors.get(key, 0) + 1

    def upstream_instances(self, upstream: str, states: dict[str, int]) -> None:
        """Report how many instances of ``upstream`` are in each state (a gauge; last wins)."""
        self.instance_states[upstream] = states

    def upstream_connections(self, upstream: str, active: int, idle: int) -> None:
        """Report the current pooled connection counts of one upstream (a gauge; last wins)."""
        self.upstream_conns[upstream] = (active, idle)

    def count_from(self, source: CounterSource) -> None:
        """Read ``source()`` (PROCESS_COUNTERS keys -> totals since the process started) at
        each scrape and export."""
        self._counter_sources.append(source)

    def _process_totals(self) -> dict[str, int]:
        totals = dict(self.process_counters)
        for source in self._counter_sources:
            for key, count in source().items():
                totals[key] = totals.get(key, 0) + count
        return totals

    def _process_families(self) -> list[Metric]:
        totals = self._process_totals()
        return [
            CounterMetricFamily(name, doc, value=totals.get(key, 0))
            for key, (name, doc) in PROCESS_COUNTERS.items()
        ]

    # -- scrape time -------------------------------------------------------------------------

    def collector(self) -> _GatewayCollector:
        """A prometheus_client collector that renders the current totals when scraped."""
        return _GatewayCollector(self)

    def _hist_family(
        self,
        name: str,
        doc: str,
        labelnames: list[str],
        items: Iterable[tuple[tuple[str, ...], list[float]]],
        bounds: tuple[float, ...] | None = None,
    ) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=labelnames)
        bounds = self.buckets if bounds is None else bounds
        les = [float_to_go_string(b) for b in bounds]
        les.append("+Inf")
        n = len(bounds)
        for labels, hist in items:
            cumulative: list[tuple[str, float]] = []
            acc = 0.0  # a float from the start: mypyc keeps float locals unboxed
            for i in range(n + 1):
                acc += hist[i]
                cumulative.append((les[i], acc))
            fam.add_metric(list(labels), cumulative, hist[n + 1])
        return fam

    def families(self) -> list[Metric]:
        """Build the metric families for the current state."""
        requests = CounterMetricFamily(
            "gateway_requests_total",
            "Requests handled, by route, upstream, method and response status code.",
            labels=["route", "upstream", "method", "code"],
        )
        for (route, upstream, method, code), count in list(self.requests.items()):
            requests.add_metric([route, upstream, method, str(code)], count)

        duration = self._hist_family(
            "gateway_request_duration_seconds",
            "Time from the first byte of the request to the last byte of the response, as the "
            "client sees it.",
            ["route", "upstream"],
            [(k, list(h)) for k, h in list(self.request_duration.items())],
        )
        upstream_duration = self._hist_family(
            "gateway_upstream_duration_seconds",
            "Time from sending the request upstream to the last byte of its response.",
            ["upstream"],
            [((k,), list(h)) for k, h in list(self.upstream_duration.items())],
            self._upstream_bounds,
        )
        overhead = self._hist_family(
            "gateway_overhead_seconds",
            "Time the gateway itself spent on a request (total minus time waiting on the "
            "upstream).",
            ["route"],
            [((k,), list(h)) for k, h in list(self.overhead.items())],
            self._overhead_bounds,
        )
        request_body = self._hist_family(
            "gateway_request_body_bytes",
            "Size of request bodies sent on to the upstream, per route.",
            ["route"],
            [((k,), list(h)) for k, h in list(self.request_body.items())],
            self._request_body_bounds,
        )
        response_body = self._hist_family(
            "gateway_response_body_bytes",
            "Size of response bodies sent to clients, per route.",
            ["route"],
            [((k,), list(h)) for k, h in list(self.response_body.items())],
            self._response_body_bounds,
        )
        clients = GaugeMetricFamily(
            "gateway_client_connections",
            "Client connections currently open.",
            value=self.connections_open,
        )
        pooled = GaugeMetricFamily(
            "gateway_upstream_connections",
            "Upstream connections currently open, by upstream and state (active or idle).",
            labels=["upstream", "state"],
        )
        for upstream, (active, idle) in list(self.upstream_conns.items()):
            pooled.add_metric([upstream, "active"], active)
            pooled.add_metric([upstream, "idle"], idle)
        retries = CounterMetricFamily(
            "gateway_retries_total",
            "Retries started, by upstream and the failure that caused them (connect_failure, "
            "reset, timeout or a status code); budget_exhausted counts retries the budget refused.",
            labels=["upstream", "reason"],
        )
        for (upstream, reason), count in list(self.retries.items()):
            retries.add_metric([upstream, reason], count)
        overflows = CounterMetricFamily(
            "gateway_circuit_breaker_overflow_total",
            "Requests answered 503 at once because a circuit-breaker limit was reached.",
            labels=["upstream", "limit"],
        )
        for (upstream, kind), count in list(self.overflows.items()):
            overflows.add_metric([upstream, kind], count)
        ratelimits = CounterMetricFamily(
            "gateway_ratelimit_decisions_total",
            "Rate-limit decisions by route and result: allowed, limited, dry_run (admitted, would"
            " have been limited), store_error (decided by the fallback), max_in_flight,"
            " missing_key.",
            labels=["route", "result"],
        )
        for (route, result), count in list(self.ratelimits.items()):
            ratelimits.add_metric([route, result], count)
        idempotency = CounterMetricFamily(
            "gateway_idempotency_total",
            "Keyed requests of routes with an idempotency store, by result: stored (response"
            " kept for replay), replayed, conflict (409, in flight), mismatch (422), bypassed"
            " (relayed, not stored: too large or a 4xx with store_4xx off), released (5xx or"
            " failure: key freed), rejected (400 invalid or missing key, 413), store_error.",
            labels=["route", "result"],
        )
        for (route, result), count in list(self.idempotency_results.items()):
            idempotency.add_metric([route, result], count)
        protocol_errors = CounterMetricFamily(
            "gateway_upstream_protocol_errors_total",
            "Upstream connections closed because the upstream broke HTTP/1.1 framing, by reason:"
            " data_after_response, invalid_response, response_head_too_large, chunk_framing,"
            " unexpected_switching_protocols.",
            labels=["upstream", "reason"],
        )
        for (upstream, reason), count in list(self.upstream_protocol_errors.items()):
            protocol_errors.add_metric([upstream, reason], count)
        instances = GaugeMetricFamily(
            "gateway_upstream_instances",
            "Instances of an upstream by state: healthy, unhealthy (active checks) or ejected "
            "(outlier detection).",
            labels=["upstream", "state"],
        )
        for upstream, states in list(self.instance_states.items()):
            for state, count in states.items():
                instances.add_metric([upstream, state], count)
        refused = CounterMetricFamily(
            "gateway_connections_refused_total",
            "Client connections answered 503 and closed at once, by reason: max_connections"
            " (limits.max_connections, gateway-wide) or draining.",
            labels=["reason"],
        )
        for reason, count in list(self.connections_refused.items()):
            refused.add_metric([reason], count)
        timeouts = CounterMetricFamily(
            "gateway_client_timeouts_total",
            "Clients cut off for slowness, by kind: header (head not in within"
            " limits.header_timeout, 408), body (limits.client_body_timeout, 408), send"
            " (read nothing for limits.send_timeout, closed).",
            labels=["kind"],
        )
        for kind, count in list(self.client_timeouts.items()):
            timeouts.add_metric([kind], count)
        handshake_errors = CounterMetricFamily(
            "gateway_tls_handshake_errors_total",
            "TLS handshakes that failed, by listener and reason: timeout, protocol_version,"
            " no_shared_cipher, client_certificate, peer_alert, http_on_https, closed, other.",
            labels=["listener", "reason"],
        )
        for (listener, reason), count in list(self.tls_handshake_errors.items()):
            handshake_errors.add_metric([listener, reason], count)
        trims = CounterMetricFamily(
            "gateway_malloc_trims_total",
            "Times freed heap memory was handed back to the OS after many connections closed.",
            value=self.malloc_trims,
        )
        return [
            requests,
            duration,
            upstream_duration,
            overhead,
            request_body,
            response_body,
            clients,
            pooled,
            retries,
            overflows,
            ratelimits,
            idempotency,
            protocol_errors,
            instances,
            refused,
            timeouts,
            handshake_errors,
            trims,
            self._filter_errors_family(),
            self._grpc_requests_family(),
            self._downstream_requests_family(),
            *self._process_families(),
            self._http2_errors_family(),
        ]

    # -- multi-process aggregation ---------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """All totals as plain JSON-able data (lists, str, int, float)."""
        return {
            "version": _STATE_VERSION,
            "buckets": {name: list(bounds) for name, bounds in self.bounds.items()},
            "requests": [[r, u, m, c, n] for (r, u, m, c), n in list(self.requests.items())],
            "request_duration": [
                [r, u, list(h)] for (r, u), h in list(self.request_duration.items())
            ],
            "upstream_duration": [[u, list(h)] for u, h in list(self.upstream_duration.items())],
            "overhead": [[r, list(h)] for r, h in list(self.overhead.items())],
            "request_body": [[r, list(h)] for r, h in list(self.request_body.items())],
            "response_body": [[r, list(h)] for r, h in list(self.response_body.items())],
            "connections_open": self.connections_open,
            "upstream_connections": [[u, a, i] for u, (a, i) in list(self.upstream_conns.items())],
            "retries": [[u, r, n] for (u, r), n in list(self.retries.items())],
            "overflows": [[u, k, n] for (u, k), n in list(self.overflows.items())],
            "ratelimits": [[r, x, n] for (r, x), n in list(self.ratelimits.items())],
            "idempotency": [[r, x, n] for (r, x), n in list(self.idempotency_results.items())],
            "upstream_protocol_errors": [
                [u, r, n] for (u, r), n in list(self.upstream_protocol_errors.items())
            ],
            "instance_states": {u: dict(c) for u, c in list(self.instance_states.items())},
            "connections_refused": dict(self.connections_refused),
            "client_timeouts": dict(self.client_timeouts),
            "tls_handshake_errors": [
                [listener, reason, n]
                for (listener, reason), n in list(self.tls_handshake_errors.items())
            ],
            "malloc_trims": self.malloc_trims,
            "filter_errors": [[r, f, n] for (r, f), n in list(self.filter_errors.items())],
            "grpc_requests": [[r, u, c, n] for (r, u, c), n in list(self.grpc_requests.items())],
            "h2_requests": self.h2_requests,
            "process_counters": self._process_totals(),
            "http2_errors": [[*key, n] for key, n in list(self.http2_errors.items())],
        }

    def merge_state(self, state: dict[str, Any]) -> None:
        """Add another process's ``export_state()`` totals into this instance.

        Counters and histograms add up; gauges add up too (open connections of all workers).
        To present gateway-wide numbers, merge every worker's latest state into a fresh
        instance at scrape time rather than merging repeatedly into the same one.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported metrics state version {state.get('version')!r}")
        theirs = state["buckets"]
        if set(theirs) != set(self.bounds) or any(
            tuple(float(b) for b in theirs[name]) != bounds for name, bounds in self.bounds.items()
        ):
            raise ValueError("cannot merge metrics recorded with different histogram buckets")

        for route, upstream, method, code, count in state["requests"]:
            key = (route, upstream, method, int(code))
            self.requests[key] = self.requests.get(key, 0) + count

        def add(target: dict[Any, list[float]], key: Any, hist: list[float]) -> None:
            mine = target.get(key)
            if mine is None:
                mine = target[key] = _new_hist(len(hist) - 2)
            if len(hist) != len(mine):
                raise ValueError("histogram state has the wrong number of slots")
            for i, v in enumerate(hist):
                mine[i] += v

        for route, upstream, hist in state["request_duration"]:
            add(self.request_duration, (route, upstream), hist)
        for upstream, hist in state["upstream_duration"]:
            add(self.upstream_duration, upstream, hist)
        for route, hist in state["overhead"]:
            add(self.overhead, route, hist)
        for route, hist in state.get("request_body", ()):
            add(self.request_body, route, hist)
        for route, hist in state.get("response_body", ()):
            add(self.response_body, route, hist)

        self.connections_open += state["connections_open"]
        for upstream, active, idle in state["upstream_connections"]:
            a, i = self.upstream_conns.get(upstream, (0, 0))
            self.upstream_conns[upstream] = (a + active, i + idle)
        for upstream, reason, count in state.get("retries", ()):
            self.retries[(upstream, reason)] = self.retries.get((upstream, reason), 0) + count
        for route, result, count in state.get("ratelimits", ()):
            self.ratelimits[(route, result)] = self.ratelimits.get((route, result), 0) + count
        results = self.idempotency_results
        for route, result, count in state.get("idempotency", ()):
            results[(route, result)] = results.get((route, result), 0) + count
        for upstream, kind, count in state.get("overflows", ()):
            self.overflows[(upstream, kind)] = self.overflows.get((upstream, kind), 0) + count
        for reason, count in state.get("connections_refused", {}).items():
            self.connections_refused[reason] = self.connections_refused.get(reason, 0) + count
        for kind, count in state.get("client_timeouts", {}).items():
            self.client_timeouts[kind] = self.client_timeouts.get(kind, 0) + count
        for listener, reason, count in state.get("tls_handshake_errors", ()):
            handshake = (listener, reason)
            self.tls_handshake_errors[handshake] = (
                self.tls_handshake_errors.get(handshake, 0) + count
            )
        self.malloc_trims += state.get("malloc_trims", 0)
        errors = self.upstream_protocol_errors
        for upstream, reason, count in state.get("upstream_protocol_errors", ()):
            errors[(upstream, reason)] = errors.get((upstream, reason), 0) + count
        # Instance states are the supervisor's view (one per gateway), not summed per worker.
        for upstream, states in state.get("instance_states", {}).items():
            self.instance_states[upstream] = dict(states)
        self._merge_filter_errors(state)
        for route, upstream, code, count in state.get("grpc_requests", ()):
            grpc_key = (route, upstream, code)
            self.grpc_requests[grpc_key] = self.grpc_requests.get(grpc_key, 0) + count
        self.h2_requests += state.get("h2_requests", 0)
        counters = self.process_counters
        # (own names: mypyc types a variable once per function, and ``key`` is a tuple above)
        for counter_name, counter_count in state.get("process_counters", {}).items():
            counters[counter_name] = counters.get(counter_name, 0) + counter_count
        for side, direction, frame, code, count in state.get("http2_errors", ()):
            h2_key = (side, direction, frame, code)
            self.http2_errors[h2_key] = self.http2_errors.get(h2_key, 0) + count

    # -- gRPC (gateway/proxy/h2/forward.py; not on the HTTP/1.1 path) -----------------------

    def grpc_request(self, route: str, upstream: str, grpc_code: str) -> None:
        key = (route, upstream, grpc_code)
        self.grpc_requests[key] = self.grpc_requests.get(key, 0) + 1

    def _grpc_requests_family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "gateway_grpc_requests_total",
            "gRPC calls proxied to HTTP/2 upstreams by route, upstream and grpc_code (the"
            " status name; UNKNOWN without a status, INVALID for a malformed one). Each is"
            " in gateway_requests_total as well.",
            labels=["route", "upstream", "grpc_code"],
        )
        for (route, upstream, code), count in list(self.grpc_requests.items()):
            family.add_metric([route, upstream, code], count)
        return family

    def http2_error(self, side: str, direction: str, frame: str, code: str) -> None:
        """A RST_STREAM or GOAWAY frame sent or received (gateway/proxy/h2/errors.py)."""
        key = (side, direction, frame, code)
        self.http2_errors[key] = self.http2_errors.get(key, 0) + 1

    def _http2_errors_family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "gateway_http2_errors_total",
            "RST_STREAM and GOAWAY frames on HTTP/2 connections, by side (downstream: client"
            " connections, upstream: connections to h2c/h2 upstreams), direction (sent,"
            " received), frame and RFC 9113 error code (UNKNOWN for another value). A GOAWAY"
            " with NO_ERROR (a graceful close) is not counted.",
            labels=["side", "direction", "frame", "code"],
        )
        for key, count in list(self.http2_errors.items()):
            family.add_metric(list(key), count)
        return family

    def _downstream_requests_family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "gateway_downstream_requests_total",
            "Requests by the protocol the client spoke: http1 (HTTP/1.0 and 1.1) or h2 (one per"
            " HTTP/2 stream). The two add up to gateway_requests_total.",
            labels=["protocol"],
        )
        h2 = self.h2_requests
        total = sum(list(self.requests.values()))
        family.add_metric(["http1"], total - h2)
        family.add_metric(["h2"], h2)
        return family

    # -- filters (gateway.filters) --------------------------------------------------------

    def filter_error(self, route: str, name: str) -> None:
        """A filter raised (counted by gateway.filters.chain through count_filter_errors)."""
        key = (route, name)
        self.filter_errors[key] = self.filter_errors.get(key, 0) + 1

    def _filter_errors_family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "gateway_filter_errors_total",
            "Exceptions raised by filters, by route and filter (request phase: answered 500;"
            " response phase: the response went on unchanged).",
            labels=["route", "filter"],
        )
        for (route, name), count in list(self.filter_errors.items()):
            family.add_metric([route, name], count)
        return family

    def _merge_filter_errors(self, state: dict[str, Any]) -> None:
        for route, name, count in state.get("filter_errors", ()):
            self.filter_errors[(route, name)] = self.filter_errors.get((route, name), 0) + count


class _GatewayCollector:
    """Adapter for ``CollectorRegistry.register``: renders ``GatewayMetrics`` on each scrape."""

    _NAMES = (
        ("gateway_requests", "counter"),
        ("gateway_request_duration_seconds", "histogram"),
        ("gateway_upstream_duration_seconds", "histogram"),
        ("gateway_overhead_seconds", "histogram"),
        ("gateway_request_body_bytes", "histogram"),
        ("gateway_response_body_bytes", "histogram"),
        ("gateway_client_connections", "gauge"),
        ("gateway_upstream_connections", "gauge"),
        ("gateway_retries", "counter"),
        ("gateway_circuit_breaker_overflow", "counter"),
        ("gateway_ratelimit_decisions", "counter"),
        ("gateway_idempotency", "counter"),
        ("gateway_upstream_protocol_errors", "counter"),
        ("gateway_upstream_instances", "gauge"),
        ("gateway_connections_refused", "counter"),
        ("gateway_client_timeouts", "counter"),
        ("gateway_tls_handshake_errors", "counter"),
        ("gateway_malloc_trims", "counter"),
        ("gateway_filter_errors", "counter"),
        ("gateway_grpc_requests", "counter"),
        ("gateway_downstream_requests", "counter"),
        *((name, "counter") for name, _ in PROCESS_COUNTERS.values()),
        ("gateway_http2_errors", "counter"),
    )

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        # Lets the registry detect name clashes without running a full collect().
        for name, typ in self._NAMES:
            yield Metric(name, "", typ)

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics.families()


def make_registry(metrics: GatewayMetrics) -> CollectorRegistry:
    """A registry holding the gateway's metrics plus process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.collector())
    # Fresh instances bound to this registry (the module-level ones belong to the global REGISTRY).
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _bench(n: int = 200_000) -> None:
    """Print the cost of ``observe_request`` in ns (CPU time, steady state with warm keys)."""
    import time

    m = GatewayMetrics()
    routes = [(f"route-{i}", f"upstream-{i % 3}") for i in range(8)]
    durations = [0.00007, 0.0003, 0.0012, 0.004, 0.02, 0.3]
    for route, upstream in routes:  # warm the keys so we time the steady state
        m.observe_request(route, upstream, "GET", 200, 0.001, 0.0008, 0.0002)
    obs = m.observe_request
    for label, upstream_s in (("with upstream", 0.0008), ("no upstream", None)):
        t0 = time.process_time_ns()
        for i in range(n):
            route, upstream = routes[i & 7]
            d = durations[i % 6]
            obs(route, upstream, "GET", 200, d, upstream_s, 0.00011)
        dt = time.process_time_ns() - t0
        # The loop itself (indexing, modulo) is included, so this is an upper bound.
        print(f"observe_request ({label}): {dt / n:.0f} ns per call (n={n})")


if __name__ == "__main__":
    _bench()
