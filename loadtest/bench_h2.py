"""Python-only cost of one HTTP/2 stream through the gateway, with sockets faked out, split into
its parts: the HTTP/1.1 data plane alone, h2 alone (framing, HPACK, stream states: a bare
``H2Connection`` answering the same requests), and the whole path through
``gateway.proxy.h2`` (h2 + StreamBridge + the HTTP/1.1 data plane). What is left after the
first two is the bridge's own cost: the HTTP/1.1 head it builds and re-parses, the response it
parses again, the per-stream ``ClientConnection``.

    python -m loadtest.bench_h2 [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import h2.config
import h2.connection
import hpack
from hyperframe.frame import HeadersFrame, SettingsFrame, WindowUpdateFrame

from gateway.config import load_config_text
from gateway.metrics import GatewayMetrics
from gateway.proxy.h2 import PREFACE
from gateway.proxy.h2.server import H2ServerConnection
from gateway.proxy.server import ProxyServer
from gateway.proxy.upstream import UpstreamConnection
from gateway.snapshot import build_snapshot
from gateway.tls.accept import ListenerState
from loadtest.bench_dataplane import RESPONSE, FakeTransport
from loadtest.bench_dataplane import run as run_http1

CONFIG = """
listen: [{address: 127.0.0.1:0, http2: {enabled: true}}]
admin: 127.0.0.1:0
upstreams:
  bench: {instances: [127.0.0.1:9]}
routes:
  - {name: bench, match: {path: {prefix: /}}, upstream: bench}
"""
HEADERS = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":path", b"/small"),
    (b":authority", b"127.0.0.1:8080"),
    (b"user-agent", b"h2load"),
    (b"accept", b"*/*"),
]
# What the gateway answers (as the HTTP/1.1 path would, after its header rewriting).
RESPONSE_FIELDS = [
    (b":status", b"200"),
    (b"server", b"nginx"),
    (b"date", b"Thu, 26 Nov 2026 08:00:00 GMT"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"13"),
    (b"x-request-id", b"0123456789abcdef-1"),
]


def _client_start() -> bytes:
    """Preface, SETTINGS, and all the connection window a client can give."""
    window = WindowUpdateFrame(0)
    window.window_increment = 2**31 - 1 - 65535
    return PREFACE + SettingsFrame(0).serialize() + window.serialize()


class H2FakeTransport(FakeTransport):
    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


def _frames(count: int) -> list[bytes]:
    """Request HEADERS frames on streams 1, 3, 5...: encoded in order by one client encoder,
    as a real client's would be (indexed after the first)."""
    encoder = hpack.Encoder()
    frames = []
    for n in range(count):
        frame = HeadersFrame(1 + 2 * n)
        frame.data = encoder.encode(HEADERS)
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        frames.append(frame.serialize())
    return frames


async def run_gateway(requests: int) -> float:
    config = load_config_text(CONFIG)
    server = ProxyServer(build_snapshot(config), GatewayMetrics())
    listener_config = config.listeners[0]
    state = ListenerState(listener_config.name, None, None, listener_config.http2)
    transport = H2FakeTransport(("127.0.0.1", 40000))
    protocol = H2ServerConnection(server, state, listener_config.http2)
    pool = server.snapshot.upstreams["bench"].instances[0].pool
    upstream = UpstreamConnection(pool)
    upstream.transport = FakeTransport(("127.0.0.1", 9))  # type: ignore[assignment]
    pool.open_count += 1
    pool.release(upstream)
    protocol.adopt(transport, _client_start())  # type: ignore[arg-type]
    frames = _frames(requests + 1000)
    elapsed = 0.0
    for index, frame in enumerate(frames):
        if index == 1000:
            elapsed = 0.0  # warm-up done
        start = time.process_time()
        protocol.data_received(frame)
        upstream.data_received(RESPONSE)
        elapsed += time.process_time() - start
        if index % 100 == 99:
            start = time.process_time()
            await asyncio.sleep(0)  # the callbacks each stream scheduled (release, flush)
            elapsed += time.process_time() - start
    if len(server.connections) > 2 or protocol.streams:
        raise RuntimeError("streams did not complete: the benchmark is broken")
    return elapsed / requests * 1e6


def run_h2_only(requests: int) -> float:
    """h2's share: the same request frames into a bare server connection, the same response
    out (HEADERS + DATA with END_STREAM)."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    conn.initiate_connection()
    conn.receive_data(_client_start())
    conn.data_to_send()
    frames = _frames(requests + 1000)
    elapsed = 0.0
    for index, frame in enumerate(frames):
        if index == 1000:
            elapsed = 0.0
        start = time.process_time()
        for event in conn.receive_data(frame):
            stream_id = getattr(event, "stream_id", None)
            if type(event).__name__ == "RequestReceived" and stream_id is not None:
                conn.send_headers(stream_id, RESPONSE_FIELDS)
                conn.send_data(stream_id, b"hello world!\n", end_stream=True)
        conn.data_to_send()
        elapsed += time.process_time() - start
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant; the best counts")
    args = parser.parse_args()
    http1: list[float] = []
    h2_only: list[float] = []
    whole: list[float] = []
    for _ in range(args.rounds):  # alternated; the fastest round of each counts
        http1.append(asyncio.run(_http1(args.requests)))
        h2_only.append(run_h2_only(args.requests))
        whole.append(asyncio.run(run_gateway(args.requests)))
    a, b, c = min(http1), min(h2_only), min(whole)
    print(f"HTTP/1.1 data plane alone:         {a:7.2f} µs/request")
    print(f"h2 alone (framing, HPACK, states): {b:7.2f} µs/request")
    print(f"HTTP/2 stream through the gateway: {c:7.2f} µs/request")
    print(f"  of which the bridge:             {c - a - b:7.2f} µs/request")
    print(f"(best of {args.rounds} x {args.requests} requests, CPU time, no syscalls)")


async def _http1(requests: int) -> float:
    return run_http1(requests)


if __name__ == "__main__":
    main()
