"""Upstream side of the gateway: balancing, error answers, failures mid-response, the pool.

Scripted upstreams (``RawBackend`` and the ``ScriptedUpstream`` below) give byte-exact control
over what the gateway receives and let the tests observe what it does with its upstream
connections (how many it opens, when it closes them).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.integration.backends import AppBackend, LoopThread, RawBackend
from tests.integration.conftest import GatewayProcess, read_response


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; the last evaluation decides."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def get(path: str, host: str = "example.test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def exchange(gateway: GatewayProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock = gateway.connect()
    try:
        sock.sendall(request)
        return read_response(sock)
    finally:
        sock.close()


def error_document(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The gateway's JSON error body, checked against the response's request id."""
    assert headers["content-type"].startswith("application/json")
    document = json.loads(body)
    assert document["request_id"] == headers["x-request-id"]
    return document


async def cancel_handlers() -> None:
    """Cancel every other task of the running loop (connection handlers) and wait for them."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- a scripted upstream that records connection events --------------------------------------------

Handler = Callable[
    ["ScriptedUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


class ScriptedUpstream:
    """TCP server running ``handler`` per connection; counts opens and peer closes (EOF/reset)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.opened = 0
        self.peer_closed = 0
        self.answered = 0
        self.requests = 0  # request heads received by handlers that count them
        self.dropped = 0  # requests a handler closed the connection on without answering
        self.thread = LoopThread()
        self.port: int = self.thread.call(self._start())

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.peer_closed += 1
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()
        self.thread.call(cancel_handlers())
        self.thread.stop()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head + Content-Length body); IncompleteReadError when the peer closed."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return await reader.readexactly(length) if length else b""


async def answer_once_then_drop(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer the first request keep-alive; close without answering the next one.

    That is an upstream whose keep-alive timeout fired just as the gateway reused the
    connection: the request was never processed (RFC 9112 §9.3.1 allows a retry).
    """
    body = await read_request(reader)
    reply = b"got %d bytes" % len(body)
    upstream.answered += 1  # counted before the client can see the answer
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(reply), reply))
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # the next request arrives on the reused connection
    upstream.dropped += 1


async def never_answer(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Read requests without ever answering; returns (counted as a peer close) at EOF."""
    received = b""
    while data := await reader.read(65536):
        received += data
        if b"\r\n\r\n" in received:
            received = received.partition(b"\r\n\r\n")[2]
            upstream.requests += 1
    upstream.peer_closed += 1


async def answer_forever(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A well-behaved keep-alive upstream; the peer's close ends it (counted by ``_handle``)."""
    while True:
        await read_request(reader)
        upstream.answered += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()


async def stall_mid_body(
    upstream: ScriptedUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Send a head announcing 100 bytes and 10 of them, then go silent until EOF."""
    await read_request(reader)
    upstream.answered += 1
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
    await writer.drain()
    while await reader.read(65536):
        pass
    upstream.peer_closed += 1


# -- fixtures --------------------------------------------------------------------------------------


def _after_head(reply: bytes) -> Callable[[bytes], bytes | None]:
    def responder(buffer: bytes) -> bytes | None:
        return reply if b"\r\n\r\n" in buffer else None

    return responder


@pytest.fixture(scope="module")
def raw_upstreams() -> Iterator[dict[str, RawBackend]]:
    backends = {
        "garbage": RawBackend(_after_head(b"garbage\r\n\r\n")),
        "truncated": RawBackend(
            _after_head(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"),
            close_after=True,
        ),
        "pooled": RawBackend(),
        # Closes right after each response although the response claims keep-alive.
        "closing": RawBackend(
            _after_head(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), close_after=True
        ),
    }
    yield backends
    for backend in backends.values():
        backend.close()


@pytest.fixture(scope="module")
def scripted_upstreams() -> Iterator[dict[str, ScriptedUpstream]]:
    upstreams = {
        "stale": ScriptedUpstream(answer_once_then_drop),
        "hang": ScriptedUpstream(never_answer),
        "idle-expiry": ScriptedUpstream(answer_forever),
        "stall-read": ScriptedUpstream(stall_mid_body),
        "stall": ScriptedUpstream(stall_mid_body),
    }
    yield upstreams
    for upstream in upstreams.values():
        upstream.close()


@pytest.fixture(scope="module")
def upstream_gateway(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
    raw_upstreams: dict[str, RawBackend],
    scripted_upstreams: dict[str, ScriptedUpstream],
) -> Iterator[GatewayProcess]:
    upstreams: dict[str, Any] = {
        "slow-reader": {
            "instances": [f"127.0.0.1:{app_backend.port}"],
            "timeouts": {"read": "300ms"},
        },
        "weighted": {
            "balancer": "weighted_round_robin",
            "instances": [
                {"address": f"127.0.0.1:{app_backend.port}", "weight": 2},
                {"address": f"127.0.0.1:{app_backend_2.port}", "weight": 1},
            ],
        },
    }
    routes: list[dict[str, Any]] = [
        {
            "name": name,
            "match": {"path": {"prefix": f"/{name}"}},
            "upstream": name,
            "rewrite": {"strip_prefix": f"/{name}"},
        }
        for name in upstreams
    ]
    servers: dict[str, RawBackend | ScriptedUpstream] = {**raw_upstreams, **scripted_upstreams}
    timeouts = {"idle-expiry": {"idle": "300ms"}, "stall-read": {"read": "300ms"}}
    for name, server in servers.items():
        upstreams[name] = {"instances": [f"127.0.0.1:{server.port}"]}
        if name in timeouts:
            upstreams[name]["timeouts"] = timeouts[name]
        routes.append({"name": name, "match": {"path": {"prefix": f"/{name}"}}, "upstream": name})
    # No catch-all route: anything else is a 404.
    process = start_gateway({"upstreams": upstreams, "routes": routes})
    yield process
    process.stop()


# -- balancing -------------------------------------------------------------------------------------


def test_round_robin_alternates_between_instances(gateway: GatewayProcess) -> None:
    sock = gateway.connect()
    names = []
    for _ in range(6):
        sock.sendall(get("/pair/name"))
        status, _, body = read_response(sock)
        assert status == 200
        names.append(body.decode())
    sock.close()
    assert set(names) == {"app-1", "app-2"}
    assert all(a != b for a, b in itertools.pairwise(names)), names


def test_weighted_round_robin_honours_weights(upstream_gateway: GatewayProcess) -> None:
    sock = upstream_gateway.connect()
    counts: Counter[str] = Counter()
    for _ in range(30):
        sock.sendall(get("/weighted/name"))
        status, _, body = read_response(sock)
        assert status == 200
        counts[body.decode()] += 1
    sock.close()
    assert counts == {"app-1": 20, "app-2": 10}


# -- errors the gateway answers --------------------------------------------------------------------


def test_no_route_is_404_json(upstream_gateway: GatewayProcess) -> None:
    status, headers, body = exchange(upstream_gateway, get("/nowhere?x=1"))
    assert status == 404
    assert error_document(headers, body)["error"] == "no_route"


def test_no_route_keeps_given_request_id(upstream_gateway: GatewayProcess) -> None:
    request = b"GET /nowhere HTTP/1.1\r\nHost: example.test\r\nX-Request-ID: abc-123\r\n\r\n"
    status, headers, body = exchange(upstream_gateway, request)
    assert status == 404
    assert headers["x-request-id"] == "abc-123"
    assert error_document(headers, body)["request_id"] == "abc-123"


def test_gateway_error_then_pipelined_request_is_proxied(upstream_gateway: GatewayProcess) -> None:
    sock = upstream_gateway.connect()
    sock.sendall(get("/nowhere") + get("/pooled?after-404=1"))
    reader = sock.makefile("rb")
    # read_response would drop bytes past the first response; parse both from one stream.
    first = reader.readline()
    assert first.startswith(b"HTTP/1.1 404")
    length = 0
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    assert json.loads(reader.read(length))["error"] == "no_route"
    assert reader.readline().startswith(b"HTTP/1.1 200")
    reader.close()
    sock.close()


def test_connection_refused_is_502_json(gateway: GatewayProcess) -> None:
    status, headers, body = exchange(gateway, get("/dead/x"))
    assert status == 502
    document = error_document(headers, body)
    assert document["status"] == 502
    assert document["error"].startswith("upstream")


def test_upstream_read_timeout_is_504(upstream_gateway: GatewayProcess) -> None:
    status, headers, body = exchange(upstream_gateway, get("/slow-reader/slow?delay=2"))
    assert status == 504
    assert error_document(headers, body)["error"] == "upstream_timeout"


def test_upstream_within_read_timeout_is_fine(upstream_gateway: GatewayProcess) -> None:
    status, _, body = exchange(upstream_gateway, get("/slow-reader/slow?delay=0.01"))
    assert status == 200
    assert body == b"slow\n"


def test_route_timeout_is_504(gateway: GatewayProcess) -> None:
    status, headers, body = exchange(gateway, get("/slow-route/slow?delay=2"))
    assert status == 504
    assert error_document(headers, body)["error"] == "upstream_timeout"


def test_garbage_from_upstream_is_502(upstream_gateway: GatewayProcess) -> None:
    status, headers, body = exchange(upstream_gateway, get("/garbage"))
    assert status == 502
    assert error_document(headers, body)["status"] == 502


# -- failure after the response head ---------------------------------------------------------------


def test_upstream_dying_mid_body_closes_client_connection(
    upstream_gateway: GatewayProcess,
) -> None:
    sock = upstream_gateway.connect()
    sock.settimeout(5)
    # A second request is queued behind the first: it must not be answered after the failure.
    sock.sendall(get("/truncated") + get("/truncated?second=1"))
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 100" in head.lower()
    assert body == b"0123456789", "body truncated; the close is the client's only signal"
    assert received.count(b"HTTP/1.1") == 1, "no second response after a broken one"


# -- the upstream connection pool ------------------------------------------------------------------


def test_sequential_requests_reuse_one_upstream_connection(
    upstream_gateway: GatewayProcess, raw_upstreams: dict[str, RawBackend]
) -> None:
    pooled = raw_upstreams["pooled"]
    pooled.reset()
    sock = upstream_gateway.connect()
    for index in range(5):
        sock.sendall(get(f"/pooled?n={index}"))
        assert read_response(sock)[2] == b"ok"
    sock.close()
    for index in range(5):  # a fresh client connection each time
        assert exchange(upstream_gateway, get(f"/pooled?c={index}"))[2] == b"ok"
    # At most one: a connection pooled by an earlier test may serve all ten.
    assert pooled.connections <= 1
    assert pooled.all_bytes.count(b"GET /pooled") == 10


def test_upstream_closing_after_each_response_is_handled(
    upstream_gateway: GatewayProcess, raw_upstreams: dict[str, RawBackend]
) -> None:
    closing = raw_upstreams["closing"]
    closing.reset()
    sock = upstream_gateway.connect()
    for index in range(5):
        sock.sendall(get(f"/closing?n={index}"))
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"ok")
    sock.close()
    assert closing.connections == 5


@pytest.mark.parametrize(
    ("method", "extra"), [("GET", ""), ("POST", "Idempotency-Key: k-{index}\r\n")]
)
def test_stale_pooled_connection_is_retried_on_a_fresh_one(
    upstream_gateway: GatewayProcess,
    scripted_upstreams: dict[str, ScriptedUpstream],
    method: str,
    extra: str,
) -> None:
    stale = scripted_upstreams["stale"]
    answered_before, dropped_before = stale.answered, stale.dropped
    sock = upstream_gateway.connect()
    for index in range(3):
        sock.sendall(
            f"{method} /stale?n={index} HTTP/1.1\r\nHost: example.test\r\n"
            f"{extra.format(index=index)}Content-Length: 5\r\n\r\nhello".encode()
        )
        status, _, body = read_response(sock)
        assert status == 200
        assert body == b"got 5 bytes"
    sock.close()
    assert stale.answered - answered_before == 3
    # Requests 2 and 3 went out on the pooled connection, were dropped, and were replayed.
    assert wait_until(lambda: stale.dropped - dropped_before >= 2)


def test_stale_pooled_connection_never_replays_a_plain_post(
    upstream_gateway: GatewayProcess, scripted_upstreams: dict[str, ScriptedUpstream]
) -> None:
    # RFC 9112 §9.3.1.1: the upstream may have applied it before the connection broke.
    stale = scripted_upstreams["stale"]
    sock = upstream_gateway.connect()
    sock.sendall(b"GET /stale?warm=1 HTTP/1.1\r\nHost: example.test\r\n\r\n")
    assert read_response(sock)[0] == 200  # leaves a pooled connection the upstream will drop
    answered_before, dropped_before = stale.answered, stale.dropped
    sock.sendall(
        b"POST /stale?plain=1 HTTP/1.1\r\nHost: example.test\r\nContent-Length: 5\r\n\r\nhello"
    )
    status, _, body = read_response(sock)
    sock.close()
    assert status == 502
    assert json.loads(body)["error"] == "upstream_failure"
    assert wait_until(lambda: stale.dropped - dropped_before == 1)
    assert stale.answered == answered_before


def test_client_disconnect_mid_request_closes_upstream_connection(
    upstream_gateway: GatewayProcess, scripted_upstreams: dict[str, ScriptedUpstream]
) -> None:
    hang = scripted_upstreams["hang"]
    requests_before, closed_before = hang.requests, hang.peer_closed
    sock = upstream_gateway.connect()
    sock.sendall(get("/hang/slow?delay=2"))
    assert wait_until(lambda: hang.requests > requests_before), "request never reached upstream"
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    assert wait_until(lambda: hang.peer_closed > closed_before), (
        "the gateway kept the upstream connection of an abandoned request open"
    )
    # And the gateway still serves the next client normally.
    probe = upstream_gateway.connect()
    probe.sendall(get("/pooled?after-disconnect=1"))
    assert read_response(probe)[0] == 200
    probe.close()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


def test_read_timeout_after_response_head_closes_client_connection(
    upstream_gateway: GatewayProcess, scripted_upstreams: dict[str, ScriptedUpstream]
) -> None:
    stall = scripted_upstreams["stall-read"]
    closed_before = stall.peer_closed
    sock = upstream_gateway.connect()
    sock.sendall(get("/stall-read"))
    received = read_until_closed(sock)
    sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"0123456789", "a 504 cannot follow a response head that was already sent"
    assert wait_until(lambda: stall.peer_closed > closed_before)


def test_client_disconnect_mid_response_closes_upstream_connection(
    upstream_gateway: GatewayProcess, scripted_upstreams: dict[str, ScriptedUpstream]
) -> None:
    stall = scripted_upstreams["stall"]
    closed_before = stall.peer_closed
    sock = upstream_gateway.connect()
    sock.sendall(get("/stall"))
    status, headers, _ = read_response(sock, head_only=True)
    assert status == 200
    assert headers["content-length"] == "100"
    sock.close()
    assert wait_until(lambda: stall.peer_closed > closed_before), (
        "an upstream connection in the middle of a response must not survive its client"
    )


def test_idle_pooled_connection_is_closed_after_idle_timeout(
    upstream_gateway: GatewayProcess, scripted_upstreams: dict[str, ScriptedUpstream]
) -> None:
    idle = scripted_upstreams["idle-expiry"]
    closed_before = idle.peer_closed
    assert exchange(upstream_gateway, get("/idle-expiry"))[2] == b"ok"
    assert wait_until(lambda: idle.peer_closed > closed_before), "idle timeout never closed it"
    # The next request opens a fresh connection and succeeds.
    assert exchange(upstream_gateway, get("/idle-expiry?again=1"))[2] == b"ok"


def test_early_upstream_response_during_upload_closes_both_sides(
    upstream_gateway: GatewayProcess, raw_upstreams: dict[str, RawBackend]
) -> None:
    # The upstream answers as soon as it has the head; the body is still on its way, so neither
    # connection is at a message boundary and neither may be reused.
    sock = upstream_gateway.connect()
    sock.sendall(
        b"POST /pooled/upload HTTP/1.1\r\nHost: example.test\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"x" * 1000
    )
    status, _, body = read_response(sock)
    assert (status, body) == (200, b"ok")
    assert read_until_closed(sock) == b""
    sock.close()
    assert exchange(upstream_gateway, get("/pooled?after-upload=1"))[2] == b"ok"
