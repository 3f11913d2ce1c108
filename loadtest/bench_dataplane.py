"""Python-only cost of one proxied request: the data plane's callbacks with sockets faked out.

Feeds a keep-alive GET into a ``ClientConnection`` and the upstream's response into the pooled
``UpstreamConnection``, N times, and prints the µs of CPU per request spent in our code and
httptools (no syscalls, no event loop). It complements the wrk harness, whose numbers include
the kernel; this one isolates what an optimisation of the Python path buys.

    python -m loadtest.bench_dataplane [--requests 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from gateway.config import load_config_text
from gateway.metrics import GatewayMetrics
from gateway.proxy.listener import ClientConnection
from gateway.proxy.server import ProxyServer
from gateway.proxy.upstream import UpstreamConnection
from gateway.snapshot import build_snapshot

CONFIG = """
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams:
  bench:
    instances: [127.0.0.1:9]
    balancer: {balancer}
{resilience}
routes:
  - {{name: bench, match: {{path: {{prefix: /}}}}, upstream: bench{route_extra}}}
"""
# A local limit that is never hit: the cost of the decision itself.
RATE_LIMIT = ", rate_limit: {rate: 100000000/s, key: client_ip}"
# An Idempotency-Key store on the route; the benchmark's requests carry no key.
IDEMPOTENCY = ", idempotency: {store: local, methods: [GET, POST]}"
# One filter on the route (gateway/filters): by default an empty one (its hook returns None).
EMPTY_FILTER = "python: {class: 'loadtest.bench_filters:EmptyFilter'}"
# Everything the failover issue adds, switched off: the baseline it is measured against.
RESILIENCE_OFF = """    retry: {attempts: 1}
    outlier: {enabled: false}
    circuit_breaker: {max_connections: 0, max_pending: 0, max_requests: 0}"""

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 26 Nov 2026 08:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"hello world!\n"
)


class NoRecording(GatewayMetrics):
    """A GatewayMetrics whose per-request recording is a no-op (a subclass: the compiled data
    plane accepts only GatewayMetrics instances)."""

    def observe_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class FakeTransport:
    """Enough of asyncio.Transport for the data plane; records the last write."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += 1

    def writelines(self, data: Any) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def run(
    requests: int,
    balancer: str = "round_robin",
    resilience: bool = True,
    metrics: bool = True,
    rate_limit: bool = False,
    idempotency: bool = False,
    filter_entry: str | None = None,
) -> float:
    config = load_config_text(
        CONFIG.format(
            balancer=balancer,
            resilience="" if resilience else RESILIENCE_OFF,
            route_extra=(RATE_LIMIT if rate_limit else "")
            + (IDEMPOTENCY if idempotency else "")
            + (f", filters: [{{{filter_entry}}}]" if filter_entry else ""),
        )
    )
    snapshot = build_snapshot(config)
    recorder = GatewayMetrics() if metrics else NoRecording()
    server = ProxyServer(snapshot, recorder)
    client = ClientConnection(server)
    client_transport = FakeTransport(("127.0.0.1", 40000))
    client.connection_made(client_transport)  # type: ignore[arg-type]
    pool = snapshot.upstreams["bench"].instances[0].pool
    upstream = UpstreamConnection(pool)
    upstream.transport = FakeTransport(("127.0.0.1", 9))  # type: ignore[assignment]
    pool.open_count += 1
    pool.release(upstream)
    for _ in range(1000):  # warm-up
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    start = time.process_time()
    for _ in range(requests):
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    elapsed = time.process_time() - start
    if client_transport.written < requests or client_transport.closing:
        raise RuntimeError("the fake exchange did not complete: the benchmark is broken")
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--balancer", default="round_robin")
    parser.add_argument(
        "--compare-resilience",
        action="store_true",
        help="also run with retries, outlier detection and circuit breaker off, and compare",
    )
    parser.add_argument(
        "--compare-metrics",
        action="store_true",
        help="also run with per-request metrics recording replaced by a no-op, and compare",
    )
    parser.add_argument(
        "--compare-ratelimit",
        action="store_true",
        help="also run with a local rate limit that is never hit, and compare",
    )
    parser.add_argument(
        "--compare-idempotency",
        action="store_true",
        help="also run with an idempotency store on the route (requests without a key)",
    )
    parser.add_argument(
        "--compare-filters",
        action="store_true",
        help="also run with one filter on the route (--filter, default an empty filter)",
    )
    parser.add_argument(
        "--filter",
        default=EMPTY_FILTER,
        help="the filter entry for --compare-filters, in YAML flow style, e.g."
        ' "ip_filter: {allow: [127.0.0.0/8]}"',
    )
    parser.add_argument("--rounds", type=int, default=5, help="runs per variant; the best counts")
    args = parser.parse_args()

    async def measure(
        resilience: bool, metrics: bool = True, rate_limit: bool = False, idem: bool = False
    ) -> float:
        return run(args.requests, args.balancer, resilience, metrics, rate_limit, idem)

    # Variants alternate and the fastest round of each counts: on a shared machine the
    # minimum is the figure least disturbed by other processes.
    on: list[float] = []
    off: list[float] = []
    no_metrics: list[float] = []
    limited: list[float] = []
    keyless: list[float] = []
    filtered: list[float] = []
    for _ in range(args.rounds):
        on.append(asyncio.run(measure(True)))
        if args.compare_resilience:
            off.append(asyncio.run(measure(False)))
        if args.compare_metrics:
            no_metrics.append(asyncio.run(measure(True, metrics=False)))
        if args.compare_ratelimit:
            limited.append(asyncio.run(measure(True, rate_limit=True)))
        if args.compare_idempotency:
            keyless.append(asyncio.run(measure(True, idem=True)))
        if args.compare_filters:

            async def with_filter() -> float:
                return run(args.requests, args.balancer, True, filter_entry=args.filter)

            filtered.append(asyncio.run(with_filter()))
    print(
        f"data plane Python cost ({args.balancer}, resilience on): {min(on):.2f} µs/request"
        f" (best of {args.rounds} x {args.requests} requests)"
    )
    if limited:
        print(
            f"data plane Python cost with a local rate limit (not hit): {min(limited):.2f}"
            f" µs/request; rate limit cost {min(limited) - min(on):+.2f} µs"
        )
    if keyless:
        print(
            f"data plane Python cost with an idempotency store (no key): {min(keyless):.2f}"
            f" µs/request; idempotency cost {min(keyless) - min(on):+.2f} µs"
        )
    if filtered:
        print(
            f"data plane Python cost with the filter {args.filter!r}: {min(filtered):.2f}"
            f" µs/request; filter cost {min(filtered) - min(on):+.2f} µs"
        )
    if no_metrics:
        print(
            f"data plane Python cost without metrics recording: {min(no_metrics):.2f} µs/request;"
            f" metrics cost {min(on) - min(no_metrics):+.2f} µs"
        )
    if off:
        print(
            f"data plane Python cost ({args.balancer}, resilience off): {min(off):.2f} µs/request;"
            f" difference {min(on) - min(off):+.2f} µs"
        )


if __name__ == "__main__":
    main()
