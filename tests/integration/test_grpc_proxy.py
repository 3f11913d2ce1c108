"""gRPC through the gateway end to end: a grpcio client → the gateway's h2c listener → a
grpcio server (h2c upstream, ``protocol: h2c``), on random free ports. Generic handlers with
bytes in and out, so no .proto code is generated."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from tests.integration.conftest import GatewayProcess, free_ports

SERVICE = "test.Proxied"
HTTP2 = {"enabled": True}


class Server:
    """A grpcio server with the calls below; ``unavailable_left`` makes that many calls of
    Flaky answer UNAVAILABLE first; ``cancelled`` is set when a Hang call was cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.unavailable_left = 0
        self.lock = threading.Lock()
        self.hang_started = threading.Event()
        self.cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self._handlers(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(request: bytes, context: Any) -> bytes:
            with self.lock:
                self.calls += 1
            context.set_trailing_metadata((("x-served-by", self.name),))
            return b"echo:" + request

        def stream_out(request: bytes, context: Any) -> Iterator[bytes]:
            count, size = struct.unpack(">II", request)
            for index in range(count):
                yield bytes([index % 251]) * size

        def digest_in(requests: Iterator[bytes], context: Any) -> bytes:
            digest = hashlib.sha256()
            total = 0
            for message in requests:
                total += len(message)
                digest.update(message)
            return struct.pack(">Q", total) + digest.digest()

        def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            for message in requests:
                yield b"re: " + message

        def fail(request: bytes, context: Any) -> bytes:
            context.set_trailing_metadata((("x-detail", "kept"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not today: 100% sure")

        def hang(request: bytes, context: Any) -> bytes:
            context.add_callback(self.cancelled.set)
            self.hang_started.set()
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return b""

        def flaky(request: bytes, context: Any) -> bytes:
            with self.lock:
                self.calls += 1
                fail_now = self.unavailable_left > 0
                if fail_now:
                    self.unavailable_left -= 1
            if fail_now:
                context.abort(grpc.StatusCode.UNAVAILABLE, "try another")
            return self.name.encode()

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "StreamOut": grpc.unary_stream_rpc_method_handler(stream_out),
                "DigestIn": grpc.stream_unary_rpc_method_handler(digest_in),
                "Chat": grpc.stream_stream_rpc_method_handler(chat),
                "Fail": grpc.unary_unary_rpc_method_handler(fail),
                "Hang": grpc.unary_unary_rpc_method_handler(hang),
                "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
            },
        )


class Setup:
    def __init__(self, gateway: GatewayProcess, port: int, one: Server, two: Server) -> None:
        self.gateway = gateway
        self.port = port
        self.one = one
        self.two = two
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.enable_retries", 0),
            ],
        )

    def unary(self, method: str) -> Any:
        return self.channel.unary_unary(f"/{SERVICE}/{method}")


@pytest.fixture(scope="module")
def setup(start_gateway: Any) -> Iterator[Setup]:
    one, two = Server("one"), Server("two")
    (h2c_port, dead_port) = free_ports(2)
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{h2c_port}", "http2": HTTP2}],
            "access_log": {"path": "-"},
            "upstreams": {
                "grpc": {"instances": [f"127.0.0.1:{one.port}"], "protocol": "h2c"},
                "pair": {
                    "instances": [f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"],
                    "protocol": "h2c",
                    "balancer": "round_robin",
                    "retry": {"attempts": 2, "on": ["grpc-unavailable", "connect_failure"]},
                },
                "down": {
                    "instances": [f"127.0.0.1:{dead_port}"],
                    "protocol": "h2c",
                    "timeouts": {"connect": "1s"},
                },
            },
            "routes": [
                {
                    "name": "limited",
                    "match": {"path": {"exact": f"/{SERVICE}/Unary"}, "headers": {"x-limit": "1"}},
                    "upstream": "grpc",
                    "rate_limit": {"rate": "1/min", "burst": 1},
                },
                {
                    "name": "retried",
                    "match": {"path": {"exact": f"/{SERVICE}/Flaky"}},
                    "upstream": "pair",
                },
                {"name": "down", "match": {"path": {"prefix": "/test.Down/"}}, "upstream": "down"},
                {
                    "name": "grpc",
                    "match": {"path": {"prefix": f"/{SERVICE}/"}},
                    "upstream": "grpc",
                    "timeout": "5s",
                },
            ],
        }
    )
    ready = Setup(gateway, h2c_port, one, two)
    # The listener is up once a call gets through.
    deadline = time.monotonic() + 20
    while True:
        try:
            ready.unary("Unary")(b"ping", timeout=2)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield ready
    ready.channel.close()
    one.server.stop(None)
    two.server.stop(None)


def test_unary_with_trailers_passed_through(setup: Setup) -> None:
    response, call = setup.unary("Unary").with_call(b"hello", timeout=5)
    assert response == b"echo:hello"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-served-by", "one") in tuple(call.trailing_metadata())


def test_client_streaming(setup: Setup) -> None:
    messages = [bytes([i]) * 100_000 for i in range(30)]  # 3 MB upstream
    digest = hashlib.sha256(b"".join(messages)).digest()
    stub = setup.channel.stream_unary(f"/{SERVICE}/DigestIn")
    response = stub(iter(messages), timeout=20)
    assert response == struct.pack(">Q", 3_000_000) + digest


def test_server_streaming_several_megabytes(setup: Setup) -> None:
    stub = setup.channel.unary_stream(f"/{SERVICE}/StreamOut")
    count, size = 80, 64 * 1024  # 5 MiB: several windows of the client and the upstream
    received = list(stub(struct.pack(">II", count, size), timeout=30))
    assert len(received) == count
    assert all(message == bytes([i % 251]) * size for i, message in enumerate(received))


def test_bidirectional(setup: Setup) -> None:
    stub = setup.channel.stream_stream(f"/{SERVICE}/Chat")
    words = [f"w{i}".encode() for i in range(50)]
    replies = list(stub(iter(words), timeout=10))
    assert replies == [b"re: " + word for word in words]


def test_error_status_and_details_preserved(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        setup.unary("Fail")(b"x", timeout=5)
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "not today: 100% sure"
    assert ("x-detail", "kept") in tuple(error.trailing_metadata())


def test_client_deadline_is_deadline_exceeded_and_reaches_the_server(setup: Setup) -> None:
    setup.one.cancelled.clear()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        setup.unary("Hang")(b"x", timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 4
    # The gateway's own deadline (grpc-timeout) reset the upstream stream: the server sees
    # its call end long before its own 10 s loop would.
    assert setup.one.cancelled.wait(5)


def test_client_cancellation_reaches_the_server(setup: Setup) -> None:
    setup.one.cancelled.clear()
    setup.one.hang_started.clear()
    future = setup.unary("Hang").future(b"x", timeout=30)
    assert setup.one.hang_started.wait(5)
    future.cancel()
    assert setup.one.cancelled.wait(5)


def test_no_route_is_unimplemented(setup: Setup) -> None:
    stub = setup.channel.unary_unary("/other.Service/Nope")
    with pytest.raises(grpc.RpcError) as caught:
        stub(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_rate_limited_is_resource_exhausted(setup: Setup) -> None:
    stub = setup.unary("Unary")
    metadata = (("x-limit", "1"),)
    assert stub(b"first", timeout=5, metadata=metadata) == b"echo:first"
    with pytest.raises(grpc.RpcError) as caught:
        stub(b"second", timeout=5, metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_all_instances_down_is_unavailable(setup: Setup) -> None:
    stub = setup.channel.unary_unary("/test.Down/Call")
    with pytest.raises(grpc.RpcError) as caught:
        stub(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unavailable_retried_on_the_other_instance(setup: Setup) -> None:
    stub = setup.unary("Flaky")
    with setup.one.lock:
        setup.one.unavailable_left = 1  # instance one answers UNAVAILABLE once
    # Round robin sends one of these to instance one first; its UNAVAILABLE is retried on
    # instance two (retry.on: grpc-unavailable), so every call succeeds.
    served = [stub(b"x", timeout=5) for _ in range(3)]
    with setup.one.lock:
        assert setup.one.unavailable_left == 0, "instance one was never tried"
    assert set(served) <= {b"one", b"two"} and b"two" in served


def test_access_log_has_route_status_and_grpc_status(setup: Setup) -> None:
    stub = setup.unary("Fail")
    with pytest.raises(grpc.RpcError):
        stub(b"x", timeout=5)
    deadline = time.monotonic() + 10
    while True:
        entries = [
            json.loads(line)
            for line in setup.gateway.log_path.read_text().splitlines()
            if line.startswith("{") and '"grpc_status"' in line
        ]
        found = [e for e in entries if e.get("path") == f"/{SERVICE}/Fail"]
        if found:
            break
        assert time.monotonic() < deadline, "no access log entry for the call"
        time.sleep(0.05)
    entry = found[-1]
    assert entry["route"] == "grpc" and entry["upstream"] == "grpc"
    assert entry["status"] == 200 and entry["grpc_status"] == "9"


def test_http1_client_to_an_h2_upstream_is_translated(setup: Setup) -> None:
    # An HTTP/1.1 request becomes an HTTP/2 stream (gateway/proxy/h2/from_h1.py); with
    # "TE: trailers" the gRPC trailers come back as a chunked trailer section.
    message = b"over http/1.1"
    body = b"\x00" + struct.pack(">I", len(message)) + message
    with socket.create_connection(("127.0.0.1", setup.port), timeout=10) as sock:
        sock.sendall(
            b"POST /%s/Unary HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc\r\n"
            b"te: trailers\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (SERVICE.encode(), len(body), body)
        )
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head
    reply = b"echo:" + message
    assert b"\x00" + struct.pack(">I", len(reply)) + reply in rest
    assert rest.endswith(b"\r\n0\r\ngrpc-status: 0\r\ngrpc-message: \r\nx-served-by: one\r\n\r\n")
    assert setup.unary("Unary")(b"after", timeout=5) == b"echo:after"


def test_grpc_code_metric(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError):
        setup.unary("Fail")(b"x", timeout=5)
    setup.unary("Unary")(b"x", timeout=5)
    with pytest.raises(grpc.RpcError):
        setup.channel.unary_unary("/other.Service/Nope")(b"x", timeout=5)
    with urllib.request.urlopen(setup.gateway.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_grpc_requests_total{"):
            labels, _, value = line.rpartition(" ")
            counts[labels] = float(value)

    def count(route: str, code: str) -> float:
        upstream = "grpc" if route else ""
        labels = f'grpc_code="{code}",route="{route}",upstream="{upstream}"'
        return counts.get(f"gateway_grpc_requests_total{{{labels}}}", 0.0)

    assert count("grpc", "FAILED_PRECONDITION") >= 1, counts
    assert count("grpc", "OK") >= 1, counts
    assert count("", "UNIMPLEMENTED") >= 1, counts


# -- a raw h2 upstream (frames chosen by the test) next to the grpcio one --------------------


class RawUpstream:
    """``RawH2Server``s on a loop of their own thread: refuses (REFUSED_STREAM) every stream
    under /test.Proxied/, resets /test.Reset/ after its response head, answers /plain/."""

    def __init__(self) -> None:
        import asyncio

        from tests.integration.h2_peers import RawH2Server

        self.servers: list[RawH2Server] = []
        self.loop = asyncio.new_event_loop()
        self.refused = 0
        started = threading.Event()

        def on_request(server: RawH2Server, stream_id: int, headers: object) -> None:
            path = dict(headers)[b":path"]  # type: ignore[call-overload]
            if path.startswith(b"/test.Proxied/"):
                self.refused += 1
                server.refuse(stream_id)
            elif path.startswith(b"/test.Reset/"):
                server.conn.send_headers(
                    stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                )
                server.conn.reset_stream(stream_id, 2)  # INTERNAL_ERROR
                server.flush()
            else:
                server.respond(stream_id, b"plain:" + path)

        async def serve() -> None:
            listener = await self.loop.create_server(
                lambda: RawH2Server(on_request, self.servers), "127.0.0.1", 0
            )
            self.port = listener.sockets[0].getsockname()[1]
            started.set()

        self.thread = threading.Thread(
            target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()),
            daemon=True,
        )
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def raw_setup(start_gateway: Any) -> Iterator[tuple[Setup, RawUpstream]]:
    raw, one = RawUpstream(), Server("one")
    (h2c_port,) = free_ports(1)
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{h2c_port}", "http2": HTTP2}],
            "upstreams": {
                "mixed": {
                    "instances": [f"127.0.0.1:{raw.port}", f"127.0.0.1:{one.port}"],
                    "protocol": "h2c",
                    "balancer": "round_robin",
                    # No "reset", and a POST: only never-processed streams may be retried.
                    "retry": {"attempts": 2, "on": ["connect_failure"]},
                },
                "raw": {"instances": [f"127.0.0.1:{raw.port}"], "protocol": "h2c"},
            },
            "routes": [
                {
                    "name": "mixed",
                    "match": {"path": {"prefix": f"/{SERVICE}/"}},
                    "upstream": "mixed",
                },
                {"name": "raw", "upstream": "raw"},
            ],
        }
    )
    ready = Setup(gateway, h2c_port, one, one)
    yield ready, raw
    ready.channel.close()
    one.server.stop(None)
    raw.stop()


def test_refused_stream_is_retried_on_another_instance_for_any_method(
    raw_setup: tuple[Setup, RawUpstream],
) -> None:
    setup, raw = raw_setup
    answers = [setup.unary("Unary")(b"%d" % i, timeout=10) for i in range(4)]
    assert answers == [b"echo:%d" % i for i in range(4)]
    assert raw.refused >= 1, "round robin never sent a stream to the refusing instance"


def test_upstream_reset_after_the_head_resets_the_client_stream(
    raw_setup: tuple[Setup, RawUpstream],
) -> None:
    setup, _raw = raw_setup
    with pytest.raises(grpc.RpcError) as caught:
        setup.channel.unary_unary("/test.Reset/Call")(b"x", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INTERNAL


def test_plain_http2_to_an_h2c_upstream(
    raw_setup: tuple[Setup, RawUpstream],
) -> None:
    import subprocess

    setup, _raw = raw_setup
    url = f"http://127.0.0.1:{setup.port}/plain/hello"
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version} %{http_code}", url],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    body, _, status = out.stdout.rpartition(b"\n")
    assert status == b"2 200"
    assert body == b"plain:/plain/hello"


def test_plain_http2_gateway_error_is_json(setup: Setup) -> None:
    import subprocess

    url = f"http://127.0.0.1:{setup.port}/test.Down/x"
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_code}", url],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    body, _, status = out.stdout.rpartition(b"\n")
    assert status == b"502"
    error = json.loads(body)
    assert error["error"] == "upstream_connect_failure" and error["status"] == 502
