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
from gateway.proxy.listener import ClientConnection, ProxyServer
from gateway.proxy.upstream import UpstreamConnection
from gateway.snapshot import build_snapshot

CONFIG = """
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams:
  bench: {instances: [127.0.0.1:9]}
routes:
  - {name: bench, match: {path: {prefix: /}}, upstream: bench}
"""

REQUEST = (
    b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 26 Nov 2026 08:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"hello world!\n"
)


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

    def resume_reading(self) -> None:
        pass


def run(requests: int) -> float:
    config = load_config_text(CONFIG)
    snapshot = build_snapshot(config)
    server = ProxyServer(snapshot, GatewayMetrics())
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
    args = parser.parse_args()

    async def measure() -> float:
        return run(args.requests)

    per_request = asyncio.run(measure())
    print(f"data plane Python cost: {per_request:.2f} µs/request over {args.requests} requests")


if __name__ == "__main__":
    main()
