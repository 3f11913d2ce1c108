"""Python-only cost of one upstream HTTP/2 (gRPC unary) exchange through gateway/proxy/h2/client.

A ``H2ClientConnection`` of an ``H2InstancePool`` is wired to an in-memory server-side ``h2``
connection (no sockets, no event loop turns): each round opens ``--concurrency`` streams, each
sending a gRPC request message, and the fake server answers every one with HEADERS, one DATA
message and trailers. Only the time spent in the client (our code + h2's client side) is
counted; the fake server's share is printed apart.

    python -m loadtest.bench_h2_client [--requests 20000] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import h2.config
import h2.connection
import h2.events

from gateway.proxy.h2.client import H2ClientConnection, H2InstancePool, H2Stream, request_headers

MESSAGE = b"\x00\x00\x00\x00\x0b" + b"hello world"
RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0")]


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _Listener:
    __slots__ = ("done", "stream")

    def __init__(self) -> None:
        self.stream: H2Stream | None = None
        self.done = False

    def on_response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def on_data(self, chunk: bytes) -> None:
        assert self.stream is not None
        self.stream.acknowledge(len(chunk))

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def on_end(self) -> None:
        self.done = True

    def on_reset(self, error_code: int, never_processed: bool) -> None:
        raise AssertionError("unexpected reset")

    def on_connect_error(self, error: BaseException) -> None:
        raise AssertionError(error)

    def on_send_paused(self) -> None:
        pass

    def on_send_resumed(self) -> None:
        pass


async def run(requests: int, concurrency: int) -> tuple[float, float]:
    pool = H2InstancePool("127.0.0.1", 9, max_idle=1, idle_timeout=60, connect_timeout=1)
    client = H2ClientConnection(pool)
    transport = _Transport()
    client.connection_made(transport)
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()
    server.receive_data(bytes(transport.out))
    transport.out.clear()
    client.data_received(server.data_to_send())
    server.receive_data(bytes(transport.out))
    transport.out.clear()
    client.data_received(server.data_to_send())
    assert client.ready
    headers = request_headers(b"POST", b"http", b"bench", b"/bench.Echo/Unary")
    headers += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    client_time = server_time = 0.0
    done = 0
    clock = time.process_time
    while done < requests:
        batch = min(concurrency, requests - done)
        started = clock()
        listeners = []
        for _ in range(batch):
            listener = _Listener()
            listener.stream = pool.open_stream(headers, False, listener)
            listener.stream.send_data(MESSAGE, end=True)
            listeners.append(listener)
        sent = bytes(transport.out)
        transport.out.clear()
        middle = clock()
        for event in server.receive_data(sent):
            if isinstance(event, h2.events.DataReceived):
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                server.send_headers(sid, RESPONSE_HEADERS)
                server.send_data(sid, MESSAGE)
                server.send_headers(sid, TRAILERS, end_stream=True)
        answer = server.data_to_send()
        resumed = clock()
        client.data_received(answer)
        finished = clock()
        assert all(listener.done for listener in listeners)
        client_time += (middle - started) + (finished - resumed)
        server_time += resumed - middle
        # The client's WINDOW_UPDATEs go back to the server.
        server.receive_data(bytes(transport.out))
        transport.out.clear()
        done += batch
    return client_time, server_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=100, help="streams per round")
    args = parser.parse_args()
    if args.requests < 1 or not 1 <= args.concurrency <= 100:
        parser.error("--requests must be positive and --concurrency within 1..100")
    client_time, server_time = asyncio.run(run(args.requests, args.concurrency))
    print(
        f"{args.requests} gRPC unary exchanges, {args.concurrency} streams per round:"
        f" client {client_time / args.requests * 1e6:.1f} µs/request"
        f" (in-memory h2 server {server_time / args.requests * 1e6:.1f} µs/request, not ours)"
    )


if __name__ == "__main__":
    main()
