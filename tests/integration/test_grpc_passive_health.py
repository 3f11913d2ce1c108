"""Passive health on the native HTTP/2 path (gateway/proxy/h2/forward.py): grpcio client →
gateway (h2c) → grpcio servers. Failures of a try (grpc-status UNAVAILABLE, connect failures,
no answer within the deadline) feed outlier detection as on the HTTP/1.1 path, so the failing
instance is ejected after consecutive failures and the balancer stops picking it; completed
calls feed the instance latency."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from tests.integration.conftest import GatewayProcess, free_ports
from tests.integration.h2_peers import RawH2Server


class Server:
    """``broken``: /ph.Status/Call answers UNAVAILABLE and /ph.Slow/Call never answers."""

    def __init__(self, name: str, broken: bool) -> None:
        self.name = name
        self.broken = broken
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers(
            tuple(
                self._service(service)
                for service in ("ph.Status", "ph.Slow", "ph.Connect", "ph.Ready", "ph.Reset")
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _service(self, service: str) -> grpc.GenericRpcHandler:
        def call(request: bytes, context: Any) -> bytes:
            with self.lock:
                self.calls[service] = self.calls.get(service, 0) + 1
            if self.broken and service == "ph.Status":
                context.abort(grpc.StatusCode.UNAVAILABLE, "broken")
            if self.broken and service == "ph.Slow":
                deadline = time.monotonic() + 10
                while context.is_active() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return self.name.encode()

        return grpc.method_handlers_generic_handler(
            service, {"Call": grpc.unary_unary_rpc_method_handler(call)}
        )


class Resetter:
    """A raw h2 server (its own loop thread) that resets every stream before any response:
    RST_STREAM INTERNAL_ERROR."""

    def __init__(self) -> None:
        self.servers: list[RawH2Server] = []
        self.resets = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def on_request(server: RawH2Server, stream_id: int, headers: object) -> None:
            self.resets += 1
            server.conn.reset_stream(stream_id, 2)  # INTERNAL_ERROR
            server.flush()

        async def serve() -> None:
            listener = await self.loop.create_server(
                lambda: RawH2Server(on_request, self.servers), "127.0.0.1", 0
            )
            self.port = listener.sockets[0].getsockname()[1]
            started.set()

        def run() -> None:
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Setup:
    def __init__(
        self, gateway: GatewayProcess, port: int, good: Server, bad: Server, resetter: Resetter
    ) -> None:
        self.gateway = gateway
        self.good = good
        self.bad = bad
        self.resetter = resetter
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)]
        )

    def call(self, service: str, timeout: float = 5) -> tuple[grpc.StatusCode, bytes]:
        try:
            reply = self.channel.unary_unary(f"/{service}/Call")(b"x", timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), b""
        return grpc.StatusCode.OK, reply

    def instances(self, upstream: str) -> dict[str, dict[str, Any]]:
        url = self.gateway.admin_url + "/admin/upstreams"
        with urllib.request.urlopen(url, timeout=5) as response:
            upstreams = json.loads(response.read())["upstreams"]
        (found,) = [u for u in upstreams if u["name"] == upstream]
        return {instance["address"]: instance for instance in found["instances"]}


@pytest.fixture(scope="module")
def setup(start_gateway: Any) -> Iterator[Setup]:
    good, bad = Server("good", broken=False), Server("bad", broken=True)
    resetter = Resetter()
    h2c_port, dead_port = free_ports(2)
    pair = [f"127.0.0.1:{good.port}", f"127.0.0.1:{bad.port}"]
    # Three failures in a row eject; at most half of the instances.
    outlier = {"consecutive_gateway_failures": 3, "base_ejection_time": "60s"}
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{h2c_port}", "http2": {"enabled": True}}],
            "upstreams": {
                name: {
                    "instances": instances,
                    "protocol": "h2c",
                    "balancer": "round_robin",
                    "outlier": outlier,
                    "timeouts": {"connect": "1s"},
                }
                for name, instances in (
                    ("status", pair),
                    ("slow", pair),
                    ("connect", [f"127.0.0.1:{good.port}", f"127.0.0.1:{dead_port}"]),
                    ("ready", [f"127.0.0.1:{good.port}"]),
                    ("reset", [f"127.0.0.1:{good.port}", f"127.0.0.1:{resetter.port}"]),
                )
            },
            "routes": [
                {
                    "name": name,
                    "match": {"path": {"prefix": f"/ph.{name.title()}/"}},
                    "upstream": name,
                    # Shorter than the client's 0.5 s deadline on ph.Slow, so the gateway's
                    # timer always fires first and counts the failure (a client that gives up
                    # first cancels the call, which is not the instance's failure).
                    **({"timeout": "300ms"} if name == "slow" else {}),
                }
                for name in ("status", "slow", "connect", "ready", "reset")
            ],
        }
    )
    ready = Setup(gateway, h2c_port, good, bad, resetter)
    deadline = time.monotonic() + 20
    while ready.call("ph.Ready")[0] != grpc.StatusCode.OK:  # (the listener is up)
        if time.monotonic() > deadline:
            raise AssertionError("the gateway never answered")
    yield ready
    ready.channel.close()
    good.server.stop(None)
    bad.server.stop(None)
    resetter.stop()


def _until_ejected(setup: Setup, service: str, upstream: str, address: str) -> list[Any]:
    """Calls until ``address`` is ejected (at most 20); their status codes."""
    codes = []
    for _ in range(20):
        before = setup.instances(upstream)[address]["ejection"]["consecutive_failures"]
        code = setup.call(service, timeout=0.5 if service == "ph.Slow" else 5)[0]
        codes.append(code)
        if code != grpc.StatusCode.OK:
            # The client's own deadline may end the call a moment before the gateway's timer
            # fires and records the timeout: poll until it is recorded.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                info = setup.instances(upstream)[address]
                if info["state"] == "ejected" or info["ejection"]["consecutive_failures"] > before:
                    break
                time.sleep(0.01)
        if setup.instances(upstream)[address]["state"] == "ejected":
            return codes
    raise AssertionError(f"{address} never ejected: {setup.instances(upstream)[address]}")


def test_unavailable_answers_eject_the_instance(setup: Setup) -> None:
    bad = f"127.0.0.1:{setup.bad.port}"
    codes = _until_ejected(setup, "ph.Status", "status", bad)
    # Round robin: every other call went to the broken instance, the third failure ejected it.
    assert codes.count(grpc.StatusCode.UNAVAILABLE) == 3, codes
    assert setup.bad.calls["ph.Status"] == 3
    info = setup.instances("status")[bad]
    assert info["available"] is False and info["ejection"]["times_ejected"] == 1
    # Now every call goes to the healthy instance.
    assert [setup.call("ph.Status") for _ in range(4)] == [(grpc.StatusCode.OK, b"good")] * 4
    assert setup.bad.calls["ph.Status"] == 3
    good = setup.instances("status")[f"127.0.0.1:{setup.good.port}"]
    assert good["state"] == "healthy" and good["recent_latency_seconds"] > 0


def test_connect_failures_eject_the_instance(setup: Setup) -> None:
    instances = setup.instances("connect")
    (dead,) = [a for a in instances if a != f"127.0.0.1:{setup.good.port}"]
    codes = _until_ejected(setup, "ph.Connect", "connect", dead)
    # The default retry policy (connect_failure) sent each failed try to the live instance:
    # every call succeeded, and the dead instance was ejected after its third failure.
    assert codes == [grpc.StatusCode.OK] * len(codes) and 3 <= len(codes) <= 6, codes
    assert setup.instances("connect")[dead]["ejection"]["times_ejected"] == 1
    assert [setup.call("ph.Connect")[0] for _ in range(4)] == [grpc.StatusCode.OK] * 4


def test_calls_unanswered_within_their_deadline_eject_the_instance(setup: Setup) -> None:
    bad = f"127.0.0.1:{setup.bad.port}"
    codes = _until_ejected(setup, "ph.Slow", "slow", bad)
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 3, codes
    assert [setup.call("ph.Slow") for _ in range(3)] == [(grpc.StatusCode.OK, b"good")] * 3


def test_streams_reset_before_the_head_eject_the_instance(setup: Setup) -> None:
    resetter = f"127.0.0.1:{setup.resetter.port}"
    codes = _until_ejected(setup, "ph.Reset", "reset", resetter)
    # The default policy retries a reset (a gRPC call before any response) elsewhere: every
    # call succeeded, and the resetting instance was ejected after its third reset.
    assert codes == [grpc.StatusCode.OK] * len(codes) and 3 <= len(codes) <= 6, codes
    assert setup.resetter.resets == 3
    assert [setup.call("ph.Reset")[0] for _ in range(3)] == [grpc.StatusCode.OK] * 3
    assert setup.resetter.resets == 3
