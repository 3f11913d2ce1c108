"""The end of a native HTTP/2 stream (gateway/proxy/h2/forward.py): what a completed try
tells passive health and the balancer, and what the stream counts and logs (the HTTP/1.1
path's ``_observe`` and ``relay`` do the same for its requests)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.accesslog import iso_time
from gateway.proxy import grpc
from gateway.resilience.retry import GATEWAY_STATUSES

if TYPE_CHECKING:
    from gateway.proxy.h2.bridge import StreamOwner
    from gateway.proxy.h2.forward import NativeStream

_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)

# grpc-status codes that passive health counts as 5xx, as the HTTP status outlier detection
# sees (Envoy's mapping, gRPC's http-grpc-status-mapping.md the other way round): UNKNOWN,
# INTERNAL, DATA_LOSS, UNIMPLEMENTED 500/501; UNAVAILABLE 503 and DEADLINE_EXCEEDED 504 are
# gateway failures too. Any other code is an answer, not a failure of the instance.
_GRPC_FAILURE_STATUS = {b"2": 500, b"13": 500, b"15": 500, b"12": 501, b"14": 503, b"4": 504}


def peer_ip(owner: StreamOwner) -> str:
    transport = owner.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer[0] if peer else "0.0.0.0"


def record_response(stream: NativeStream) -> None:
    """The try's response is complete: its latency for the balancer and /admin, and its
    status (grpc-status for gRPC, mapped to HTTP) for outlier detection."""
    instance = stream.instance
    upstream = stream.upstream
    if instance is None or upstream is None:
        return
    sample = time.perf_counter() - stream.t_try
    previous = instance.latency
    instance.latency = sample if not previous else previous * 0.8 + sample * 0.2
    if upstream.latency_samples is not None:
        upstream.latency_samples.append(sample)
    if upstream.observes_latency:
        upstream.balancer.observe(instance, sample, time.monotonic())  # type: ignore[attr-defined]
    status = stream.status
    if stream.grpc_status is not None and stream.is_grpc:
        status = _GRPC_FAILURE_STATUS.get(stream.grpc_status, 200)
    if status >= 500 or instance.failing:
        # Successes matter to outlier detection only when they end a failure streak.
        upstream.record_outcome(instance, status < 500, status in GATEWAY_STATUSES)


def report(stream: NativeStream, status: int) -> None:
    """Count and log the finished stream: ``gateway_requests_total`` and the histograms, the
    ``h2`` share of ``gateway_downstream_requests_total``, ``gateway_grpc_requests_total``
    for gRPC, and one access-log line."""
    owner = stream.owner
    server = owner.server
    upstream = stream.upstream
    now = time.perf_counter()
    total = now - stream.t_start
    upstream_time: float | None = None
    if stream.t_upstream:
        upstream_time = (stream.t_upstream_done or now) - stream.t_upstream
    method_name = stream.method.decode("latin-1")
    route_name = stream.route.name if stream.route is not None else ""
    upstream_name = upstream.name if upstream is not None else ""
    server.metrics.h2_requests += 1  # (gateway_downstream_requests_total{protocol="h2"})
    server.metrics.observe_request(
        route_name,
        upstream_name,
        method_name if method_name in _KNOWN_METHODS else "OTHER",
        status,
        total,
        upstream_time,
        total - (upstream_time or 0.0),
        stream.bytes_in,
        stream.bytes_out,
    )
    if stream.is_grpc:
        server.metrics.grpc_request(
            route_name, upstream_name, grpc.grpc_code_label(stream.grpc_status)
        )
    access_log = server.access_log
    if access_log is None:
        return
    instance = stream.tried[-1] if stream.tried else None
    grpc_status = stream.grpc_status
    access_log.record(
        {
            "time": iso_time(time.time()),
            "request_id": stream.request_id.decode("ascii", "replace"),
            "client": peer_ip(owner),
            "listener": owner.listener.name,
            "method": method_name,
            "path": stream.path.decode("latin-1"),
            "route": route_name,
            "upstream": upstream_name,
            "instance": instance.address if instance is not None else None,
            "status": status,
            "grpc_status": grpc_status.decode("latin-1") if grpc_status is not None else None,
            "protocol": "h2",
            "bytes_in": stream.bytes_in,
            "bytes_out": stream.bytes_out,
            "duration": round(total, 6),
            "upstream_duration": None if upstream_time is None else round(upstream_time, 6),
            "retries": max(stream.attempt - 1, 0),
            "error": stream.error_code or None,
        }
    )
