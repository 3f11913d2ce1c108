"""Per-try and read timeouts on native HTTP/2 streams (gateway/proxy/h2/forward.py): a grpcio
client → the gateway's h2c listener → grpcio servers, one of which stalls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.integration.conftest import GatewayProcess, free_ports

SERVICE = "test.Timed"


class Server:
    """``stall``: Unary waits (until cancelled, at most 10 s) before answering; Trickle sends
    one message, then stalls the same way. ``cancelled`` counts calls the gateway reset."""

    def __init__(self, name: str, *, stall: bool) -> None:
        self.name = name
        self.stall = stall
        self.calls = 0
        self.cancelled = 0
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((self._handlers(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _wait_while_active(self, context: Any) -> None:
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not context.is_active():
            with self.lock:
                self.cancelled += 1

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(request: bytes, context: Any) -> bytes:
            with self.lock:
                self.calls += 1
            if self.stall:
                self._wait_while_active(context)
            return self.name.encode()

        def trickle(request: bytes, context: Any) -> Iterator[bytes]:
            with self.lock:
                self.calls += 1
            yield b"first"
            self._wait_while_active(context)
            yield b"late"

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Trickle": grpc.unary_stream_rpc_method_handler(trickle),
            },
        )


@dataclass
class Setup:
    gateway: GatewayProcess
    channel: grpc.Channel
    slow: Server
    fast: Server

    def call(self, route: str, method: str = "Unary") -> Any:
        return self.channel.unary_unary(f"/{route}/{SERVICE}/{method}")


@pytest.fixture(scope="module")
def setup(start_gateway: Any) -> Iterator[Setup]:
    slow, fast = Server("slow", stall=True), Server("fast", stall=False)
    (port,) = free_ports(1)
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
            "upstreams": {
                "pair": {
                    "instances": [f"127.0.0.1:{slow.port}", f"127.0.0.1:{fast.port}"],
                    "protocol": "h2c",
                    "balancer": "round_robin",
                    "timeouts": {"read": "10s"},
                    "retry": {"attempts": 2, "on": ["timeout"], "per_try_timeout": "300ms"},
                },
                "slow": {
                    "instances": [f"127.0.0.1:{slow.port}"],
                    "protocol": "h2c",
                    "timeouts": {"read": "300ms"},
                    "retry": {"attempts": 2, "on": ["timeout"]},
                },
                "unretried": {
                    "instances": [f"127.0.0.1:{slow.port}"],
                    "protocol": "h2c",
                    "timeouts": {"read": "300ms"},
                    "retry": {"attempts": 1},
                },
            },
            "routes": [
                {
                    "name": name,
                    "match": {"path": {"prefix": f"/{name}/"}},
                    "upstream": name,
                    "rewrite": {"strip_prefix": f"/{name}"},
                    "timeout": "20s",
                }
                for name in ("pair", "slow", "unretried")
            ],
        }
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)])
    ready = Setup(gateway, channel, slow, fast)
    deadline = time.monotonic() + 20
    while True:  # the listener is up once a call gets through (fast, or slow's per-try retry)
        try:
            ready.call("pair")(b"ping", timeout=5)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield ready
    channel.close()
    slow.server.stop(None)
    fast.server.stop(None)


def _cancelled_soon(server: Server, at_least: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        with server.lock:
            if server.cancelled >= at_least:
                return
        assert time.monotonic() < deadline, "the timed-out upstream stream was not reset"
        time.sleep(0.01)


def test_per_try_timeout_retries_on_the_other_instance(setup: Setup) -> None:
    with setup.slow.lock:
        slow_calls, cancelled = setup.slow.calls, setup.slow.cancelled
    started = time.monotonic()
    # Round robin: within two calls one goes to the stalling instance first; its try times
    # out after 300 ms (retry.per_try_timeout) and is retried on the other one.
    answers = [setup.call("pair")(b"x", timeout=8) for _ in range(2)]
    assert answers == [b"fast", b"fast"]
    assert time.monotonic() - started < 5  # far below the 10 s read timeout
    with setup.slow.lock:
        assert setup.slow.calls > slow_calls, "the stalling instance was never tried"
    _cancelled_soon(setup.slow, cancelled + 1)


def test_read_timeout_is_deadline_exceeded(setup: Setup) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        setup.call("unretried")(b"x", timeout=8)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "upstream read timeout" in (caught.value.details() or "")
    assert time.monotonic() - started < 5  # the read timeout, not the client's 8 s


def test_read_timeout_is_retried_when_the_policy_says_so(setup: Setup) -> None:
    with setup.slow.lock:
        calls = setup.slow.calls
    with pytest.raises(grpc.RpcError) as caught:
        setup.call("slow")(b"x", timeout=8)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with setup.slow.lock:
        assert setup.slow.calls == calls + 2  # the first try and its retry (attempts: 2)


def test_no_retry_after_a_response_message(setup: Setup) -> None:
    with setup.slow.lock:
        calls = setup.slow.calls
    started = time.monotonic()
    stream = setup.channel.unary_stream(f"/slow/{SERVICE}/Trickle")(b"x", timeout=8)
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for message in stream:
            received.append(message)
    assert received == [b"first"]
    # The read timeout between messages ends the call with trailers: no second try.
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "upstream read timeout" in (caught.value.details() or "")
    assert time.monotonic() - started < 5  # the gateway's read timeout, not the client's 8 s
    with setup.slow.lock:
        assert setup.slow.calls == calls + 1
