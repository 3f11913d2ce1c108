"""Upstream response validation: no upstream byte may reach the wrong client.

A scripted origin answers the first request on a connection with a complete response followed
by extra bytes (in the same ``send``, or in a later one while the connection is idle in the
gateway's pool). The gateway must deliver the complete response, close that connection instead
of pooling it, and count it in ``gateway_upstream_protocol_errors_total``. A "victim" request
on a fresh client connection to the same upstream must then get the origin's real answer on a
new upstream connection. Malformed or over-long chunk framing after the response head went out
must abort the client connection without a last-chunk.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.backends import LoopThread
from tests.integration.conftest import GatewayProcess, read_response, read_until_close
from tests.integration.test_http_semantics import ResponseReader

FIRST_BODY = b"first answer"
FIRST_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(FIRST_BODY), FIRST_BODY)
VICTIM_BODY = b"victim upload 0123456789"
VICTIM_ANSWER = b"the origin's real answer to the victim"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"

# Bytes the origin writes right after FIRST_RESPONSE, by variant (RFC 9112 §6.3: a
# Content-Length response ends after that many bytes; §9.3: what follows is not a response to
# any request the gateway sent).
EXTRA_BYTES = {
    "second_response": (
        b"HTTP/1.1 302 Found\r\nlocation: http://attacker.invalid/\r\ncontent-length: 0\r\n\r\n"
    ),
    "partial_head": b"HTTP/1.1 200 OK\r\ncontent-le",
    "partial_body": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part of it",
    "interim_after_final": b"HTTP/1.1 100 Continue\r\n\r\n",
}

# Chunked bodies that break RFC 9112 §7.1 (or the gateway's framing limits) after a valid first
# chunk; written in the same send as the head.
MALFORMED_CHUNKED = {
    "bad_chunk_size": b"5\r\nhello\r\nzz\r\nxx\r\n0\r\n\r\n",
    "no_crlf_after_data": b"5\r\nhelloXY3\r\nabc\r\n0\r\n\r\n",
    "huge_chunk_extension": b"5\r\nhello\r\n3;ext=" + b"e" * 8000 + b"\r\nabc\r\n0\r\n\r\n",
    "huge_trailer": b"5\r\nhello\r\n0\r\nx-trailer: " + b"t" * 8000 + b"\r\n\r\n",
}


def chunk_request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: origin.test\r\n"
    if body:
        head += f"content-length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@dataclass
class OriginConnection:
    received: bytearray = field(default_factory=bytearray)
    paths: list[str] = field(default_factory=list)
    closed_by_peer: bool = False


class ScriptedOrigin:
    """Answers ``/victim`` properly, ``/extra/<variant>`` with FIRST_RESPONSE + extra bytes,
    ``/later/<variant>`` with FIRST_RESPONSE and the extra bytes once ``release()`` is called,
    ``/chunked/<variant>`` with a malformed chunked body, ``/chunked-later`` with a first
    chunk then (after ``release()``) a bad chunk size. Records every connection's bytes."""

    def __init__(self) -> None:
        self.connections: list[OriginConnection] = []
        self.lock = threading.Lock()
        self._release: asyncio.Event | None = None
        self.thread = LoopThread()
        self.port: int = self.thread.call(self._start())

    async def _start(self) -> int:
        self._release = asyncio.Event()
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def release(self) -> None:
        assert self._release is not None
        self.thread.loop.call_soon_threadsafe(self._release.set)

    def reset(self) -> None:
        with self.lock:
            self.connections.clear()
        assert self._release is not None
        self.thread.loop.call_soon_threadsafe(self._release.clear)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = OriginConnection()
        with self.lock:
            self.connections.append(record)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                path = head.split(b" ", 2)[1].decode()
                with self.lock:
                    record.received += head + body
                    record.paths.append(path)
                if not await self._answer(path, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            record.closed_by_peer = True
        finally:
            writer.close()

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Write the answer to ``path``; False when the origin closes the connection after it."""
        assert self._release is not None
        kind, _, variant = path.strip("/").partition("/")
        if kind == "victim":
            # Connection: close keeps the gateway's pool empty for the next test.
            writer.write(
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%b"
                % (len(VICTIM_ANSWER), VICTIM_ANSWER)
            )
            await writer.drain()
            return False
        elif kind == "extra":
            writer.write(FIRST_RESPONSE + EXTRA_BYTES[variant])  # one send
        elif kind == "later":
            writer.write(FIRST_RESPONSE)
            await writer.drain()
            await self._release.wait()
            writer.write(EXTRA_BYTES[variant])
        elif kind == "chunked":
            writer.write(CHUNKED_HEAD + MALFORMED_CHUNKED[variant])
        elif kind == "chunked-later":
            writer.write(CHUNKED_HEAD + b"5\r\nhello\r\n")
            await writer.drain()
            await self._release.wait()
            writer.write(b"zz\r\n")
        elif kind == "chunked-ok":
            # Small extensions and trailers are within the limits (RFC 9112 §7.1.1, §7.1.2).
            writer.write(CHUNKED_HEAD + b"5;name=value\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n")
        await writer.drain()
        return True

    def snapshot(self) -> list[OriginConnection]:
        with self.lock:
            return [
                OriginConnection(bytearray(c.received), list(c.paths), c.closed_by_peer)
                for c in self.connections
            ]

    def close(self) -> None:
        self.server.close()
        self.release()  # handlers waiting to write their extra bytes finish

        async def cancel() -> None:
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.thread.call(cancel())
        self.thread.stop()


def parse_chunks(body: bytes) -> tuple[list[bytes], bool]:
    """The chunks of a (possibly truncated) chunked body, and whether its last-chunk came."""
    chunks: list[bytes] = []
    while body:
        size_line, found, rest = body.partition(b"\r\n")
        if not found:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return chunks, True
        if len(rest) < size + 2:
            break
        assert rest[size : size + 2] == b"\r\n"
        chunks.append(rest[:size])
        body = rest[size + 2 :]
    return chunks, False


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def protocol_errors(gateway: GatewayProcess, reason: str) -> float:
    for family in text_string_to_metric_families(gateway.metrics_text()):
        if family.name != "gateway_upstream_protocol_errors":
            continue
        return sum(
            sample.value
            for sample in family.samples
            if sample.name.endswith("_total")
            and sample.labels == {"upstream": "origin", "reason": reason}
        )
    return 0.0


@pytest.fixture(scope="module")
def origin() -> Iterator[ScriptedOrigin]:
    server = ScriptedOrigin()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], origin: ScriptedOrigin
) -> GatewayProcess:
    return start_gateway(
        {
            "workers": 1,  # one pool: the victim would get the poisoned connection
            "upstreams": {
                "origin": {
                    "instances": [f"127.0.0.1:{origin.port}"],
                    "retry": {"attempts": 1},
                    "timeouts": {"read": "5s"},
                }
            },
            "routes": [
                {"name": "origin", "match": {"path": {"prefix": "/"}}, "upstream": "origin"}
            ],
        }
    )


def send_victim(gateway: GatewayProcess) -> tuple[int, bytes]:
    with gateway.connect() as victim:
        victim.sendall(chunk_request("POST", "/victim", VICTIM_BODY))
        status, _, body = read_response(victim)
    return status, body


def assert_victim_gets_the_real_answer(gateway: GatewayProcess, origin: ScriptedOrigin) -> None:
    status, body = send_victim(gateway)
    assert (status, body) == (200, VICTIM_ANSWER)
    connections = origin.snapshot()
    assert len(connections) == 2, [c.paths for c in connections]
    poisoned, fresh = connections
    assert len(poisoned.paths) == 1  # nothing else was ever sent on the poisoned connection
    assert fresh.paths == ["/victim"]
    head, _, body_received = bytes(fresh.received).partition(b"\r\n\r\n")
    assert head.startswith(b"POST /victim HTTP/1.1\r\n")
    assert body_received == VICTIM_BODY  # exactly one request, with exactly its body


@pytest.mark.parametrize("variant", sorted(EXTRA_BYTES))
def test_extra_bytes_in_the_same_send_never_reach_another_client(
    gateway: GatewayProcess, origin: ScriptedOrigin, variant: str
) -> None:
    # RFC 9112 §6.3 / §9.3: bytes after a complete response close the connection.
    origin.reset()
    before = protocol_errors(gateway, "data_after_response")
    with gateway.connect() as first:
        first.sendall(chunk_request("GET", f"/extra/{variant}"))
        status, _, body = read_response(first)
        assert (status, body) == (200, FIRST_BODY)
    assert wait_until(lambda: origin.snapshot()[0].closed_by_peer)  # not pooled
    assert protocol_errors(gateway, "data_after_response") == before + 1
    assert_victim_gets_the_real_answer(gateway, origin)


@pytest.mark.parametrize("variant", sorted(EXTRA_BYTES))
def test_extra_bytes_in_a_later_send_close_the_idle_connection(
    gateway: GatewayProcess, origin: ScriptedOrigin, variant: str
) -> None:
    origin.reset()
    before = protocol_errors(gateway, "data_after_response")
    with gateway.connect() as first:
        first.sendall(chunk_request("GET", f"/later/{variant}"))
        status, _, body = read_response(first)
        assert (status, body) == (200, FIRST_BODY)
    origin.release()  # the connection now idles in the pool; the upstream writes more
    assert wait_until(lambda: origin.snapshot()[0].closed_by_peer)
    assert wait_until(lambda: protocol_errors(gateway, "data_after_response") == before + 1)
    assert_victim_gets_the_real_answer(gateway, origin)


def test_pipelined_request_does_not_get_the_leftover(
    gateway: GatewayProcess, origin: ScriptedOrigin
) -> None:
    # The next pipelined request is dispatched from inside the first one's completion; it must
    # not be given the connection the leftover bytes arrived on.
    origin.reset()
    with gateway.connect() as client:
        client.sendall(
            chunk_request("GET", "/extra/second_response")
            + chunk_request("POST", "/victim", VICTIM_BODY)
        )
        responses = ResponseReader(client)  # keeps bytes past the first response
        first, second = responses.read(), responses.read()
        assert (first.status, first.body) == (200, FIRST_BODY)
        assert (second.status, second.body) == (200, VICTIM_ANSWER)
    connections = origin.snapshot()
    assert [c.paths for c in connections] == [["/extra/second_response"], ["/victim"]]


@pytest.mark.parametrize("variant", sorted(MALFORMED_CHUNKED))
def test_malformed_chunked_body_aborts_without_last_chunk(
    gateway: GatewayProcess, origin: ScriptedOrigin, variant: str
) -> None:
    # RFC 9112 §7.1: a chunked body that does not parse (or whose extensions/trailers exceed
    # the gateway's bounds) cannot be completed; the client must see a truncated body.
    origin.reset()
    before = protocol_errors(gateway, "chunk_framing")
    with gateway.connect() as client:
        client.sendall(chunk_request("GET", f"/chunked/{variant}"))
        data, closed = read_until_close(client)
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks, terminated = parse_chunks(body)
    assert chunks[0] == b"hello"
    assert not terminated  # no last-chunk: the client can tell the body is truncated
    assert protocol_errors(gateway, "chunk_framing") == before + 1
    assert wait_until(lambda: origin.snapshot()[0].closed_by_peer)


def test_malformed_chunk_in_a_later_read_aborts_without_last_chunk(
    gateway: GatewayProcess, origin: ScriptedOrigin
) -> None:
    origin.reset()
    before = protocol_errors(gateway, "chunk_framing")
    with gateway.connect() as client:
        client.sendall(chunk_request("GET", "/chunked-later/"))
        data = b""
        client.settimeout(5)
        while b"hello\r\n" not in data:  # head and first chunk are out before the bad one
            chunk = client.recv(65536)
            assert chunk, data
            data += chunk
        origin.release()
        rest, closed = read_until_close(client)
    assert closed
    body = (data + rest).partition(b"\r\n\r\n")[2]
    assert body == b"5\r\nhello\r\n"  # and no terminating 0\r\n\r\n
    assert protocol_errors(gateway, "chunk_framing") == before + 1


def test_small_extensions_and_trailers_are_accepted(
    gateway: GatewayProcess, origin: ScriptedOrigin
) -> None:
    origin.reset()
    with gateway.connect() as client:
        client.sendall(chunk_request("GET", "/chunked-ok/") + chunk_request("GET", "/victim"))
        responses = ResponseReader(client)
        first, second = responses.read(), responses.read()
        assert (first.status, first.body) == (200, b"hello")
        assert first.headers["transfer-encoding"] == "chunked"
        assert b"x-trailer" not in first.head  # trailers are dropped, not moved into the head
        assert (second.status, second.body) == (200, VICTIM_ANSWER)
    # The well-framed response left its connection reusable: both went over one connection.
    assert [c.paths for c in origin.snapshot()] == [["/chunked-ok/", "/victim"]]


def test_protocol_errors_are_summed_across_workers(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], origin: ScriptedOrigin
) -> None:
    # With workers, the supervisor's /metrics merges each worker's export_state().
    multi = start_gateway(
        {
            "workers": 2,
            "upstreams": {"origin": {"instances": [f"127.0.0.1:{origin.port}"]}},
            "routes": [
                {"name": "origin", "match": {"path": {"prefix": "/"}}, "upstream": "origin"}
            ],
        }
    )
    origin.reset()
    for _ in range(3):
        with multi.connect() as client:
            client.sendall(chunk_request("GET", "/extra/second_response"))
            assert read_response(client)[::2] == (200, FIRST_BODY)
    assert wait_until(lambda: protocol_errors(multi, "data_after_response") == 3)
