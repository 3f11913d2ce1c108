"""Real HTTP/2 peers for the upstream client tests: grpcio servers (threads, h2c or TLS on a
random free port), a raw ``h2`` server whose frames a test chooses, and a recording listener."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hyperframe.frame import GoAwayFrame

from gateway.proxy.h2.client import H2Stream

SERVICE = "test.Echo"


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_messages(body: bytes) -> list[bytes]:
    out = []
    while body:
        assert body[0] == 0, "compressed messages are not expected"
        (length,) = struct.unpack(">I", body[1:5])
        out.append(body[5 : 5 + length])
        body = body[5 + length :]
    return out


def grpc_request_headers(authority: str, method: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", authority.encode()),
        (b":path", f"/{SERVICE}/{method}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


@dataclass
class EchoState:
    """What the echo servicer saw; ``gate`` holds Wait calls until set."""

    barrier: threading.Barrier | None = None
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)  # a Wait call started
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _echo_handlers(state: EchoState) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: Any) -> bytes:
        with state.lock:
            state.calls += 1
        return request

    def barrier(request: bytes, context: Any) -> bytes:
        assert state.barrier is not None
        state.barrier.wait(timeout=10)
        return request

    def wait(request: bytes, context: Any) -> bytes:
        state.entered.set()
        state.gate.wait(timeout=10)
        return request

    def stream_out(request: bytes, context: Any) -> Iterator[bytes]:
        count, size = struct.unpack(">II", request)
        for index in range(count):
            yield bytes([index % 251]) * size

    def digest_in(requests: Iterator[bytes], context: Any) -> bytes:
        total = 0
        digest = hashlib.sha256()
        for message in requests:
            total += len(message)
            digest.update(message)
        return struct.pack(">Q", total) + digest.digest()

    def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for message in requests:  # one reply per message, as soon as it arrives
            yield b"re: " + message

    def fail(request: bytes, context: Any) -> bytes:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not today: 100% sure")

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Barrier": grpc.unary_unary_rpc_method_handler(barrier),
            "Wait": grpc.unary_unary_rpc_method_handler(wait),
            "StreamOut": grpc.unary_stream_rpc_method_handler(stream_out),
            "DigestIn": grpc.stream_unary_rpc_method_handler(digest_in),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )


class GrpcServer:
    """A grpcio server in its own threads with the echo service and the health service."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int | None = None,
        credentials: grpc.ServerCredentials | None = None,
        workers: int = 16,
    ) -> None:
        options: list[tuple[str, Any]] = []
        if max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", max_concurrent_streams))
        self.state = EchoState()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
        self.server.add_generic_rpc_handlers((_echo_handlers(self.state),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = "127.0.0.1:0"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        self.server.start()

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_health(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set(service, status)

    def stop(self, grace: float | None = None) -> threading.Event:
        return self.server.stop(grace)


class Recorder:
    """A StreamListener that keeps every event, acknowledging data as it arrives unless
    ``auto_ack`` is off; ``done`` resolves on the stream's last event."""

    def __init__(self, *, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.stream: H2Stream | None = None
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.reset: tuple[int, bool] | None = None
        self.connect_error: BaseException | None = None
        self.paused = 0
        self.resumed = 0
        self.ended = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers

    def on_data(self, chunk: bytes) -> None:
        self.body += chunk
        if self.auto_ack:
            assert self.stream is not None
            self.stream.acknowledge(len(chunk))

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = headers

    def on_end(self) -> None:
        self.ended = True
        self._finish()

    def on_reset(self, error_code: int, never_processed: bool) -> None:
        self.reset = (error_code, never_processed)
        self._finish()

    def on_connect_error(self, error: BaseException) -> None:
        self.connect_error = error
        self._finish()

    def on_send_paused(self) -> None:
        self.paused += 1

    def on_send_resumed(self) -> None:
        self.resumed += 1

    def header(self, name: bytes) -> bytes | None:
        for key, value in [*self.headers, *(self.trailers or [])]:
            if key == name:
                return value
        return None


async def poll(condition: Callable[[], bool], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


class RawH2Server(asyncio.Protocol):
    """A server-side ``h2`` connection whose behaviour ``on_request(server, stream_id,
    headers)`` decides; every connection is kept in ``RawH2Server.connections``."""

    def __init__(
        self,
        on_request: Callable[[RawH2Server, int, list[tuple[bytes, bytes]]], None],
        registry: list[RawH2Server],
        max_concurrent_streams: int = 100,
    ) -> None:
        self.on_request = on_request
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.local_settings.max_concurrent_streams = max_concurrent_streams
        self.transport: asyncio.Transport | None = None
        self.requests: list[int] = []
        self.bodies: dict[int, bytearray] = {}
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.ended: list[int] = []
        self.pings = 0
        registry.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.requests.append(event.stream_id)
                self.on_request(self, event.stream_id, list(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data or b"")
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers[event.stream_id] = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.append(event.stream_id)
            elif isinstance(event, h2.events.PingReceived):
                self.pings += 1
        self.flush()

    def respond(self, stream_id: int, body: bytes, status: bytes = b"200") -> None:
        self.conn.send_headers(stream_id, [(b":status", status)], end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.flush()

    def refuse(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self.flush()

    def goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """GOAWAY written past h2, whose own state would then refuse to answer the streams
        at or below ``last_stream_id`` (RFC 9113 §6.8 lets a server finish them)."""
        self.flush()
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code)
        assert self.transport is not None
        self.transport.write(frame.serialize())

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)
