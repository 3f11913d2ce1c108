"""A backend that counts the POSTs it executed, for the idempotency tests (exactly-once)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.integration.backends import LoopThread
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import metric_sum


class CountingBackend:
    """``POST /pay``: counts an execution, answers 201 with a body unique to the execution.
    ``?delay_ms=N`` holds the answer; ``?size=N`` answers N body bytes; ``?status=N``;
    ``/die`` resets the connection without answering the first ``die_times`` times."""

    def __init__(self) -> None:
        self.executed = 0
        self.lock = threading.Lock()
        self.die_times = 0
        self._ids = itertools.count(1)
        self.thread = LoopThread()
        self.port: int = self.thread.call(self._start())

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/pay", self._pay)
        app.router.add_route("*", "/die", self._die)
        app.router.add_route("*", "/{tail:.*}", self._pay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        return int(server.sockets[0].getsockname()[1])

    async def _pay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self.lock:
            self.executed += 1
            execution = next(self._ids)
        delay = int(request.query.get("delay_ms", "0"))
        if delay:
            await asyncio.sleep(delay / 1000)
        size = request.query.get("size")
        status = int(request.query.get("status", "201"))
        headers = {"x-execution": str(execution), "x-custom": "kept"}
        if size is not None:
            return web.Response(status=status, body=b"x" * int(size), headers=headers)
        return web.json_response(
            {"execution": execution, "received": len(body)}, status=status, headers=headers
        )

    async def _die(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        with self.lock:
            self.executed += 1
            dies = self.die_times > 0
            if dies:
                self.die_times -= 1
        if dies:
            assert request.transport is not None
            request.transport.abort()  # the instance "crashes" mid-request
            raise asyncio.CancelledError
        return web.json_response({"survived": True}, status=201)

    def close(self) -> None:
        self.thread.call(self._runner.cleanup())
        self.thread.stop()


def raw_post(
    port: int,
    path: str = "/pay",
    body: bytes = b'{"amount":1}',
    key: bytes | None = b'"k"',
    extra: bytes = b"",
    timeout: float = 10.0,
) -> bytes:
    """One POST on a fresh connection (so that with workers: N it may land on any worker);
    returns the whole raw response (head and Content-Length body)."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        key_line = b"idempotency-key: " + key + b"\r\n" if key is not None else b""
        sock.sendall(
            b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%b%b\r\n%b" % (path.encode(), len(body), key_line, extra, body)
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a response head: {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            rest += chunk
        return head + b"\r\n\r\n" + rest
    finally:
        sock.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def header_of(response: bytes, name: bytes) -> bytes | None:
    head = response.partition(b"\r\n\r\n")[0]
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name:
            return value.strip()
    return None


def without_per_request_lines(response: bytes) -> bytes:
    """The response minus what legitimately differs between an original and its replay: the
    request id (each request has its own) and the replay marker."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"x-request-id:", b"idempotent-replayed:"))
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def fresh_key() -> bytes:
    """A new Idempotency-Key value: a quoted Structured Field string (draft section 2.1)."""
    return b'"' + str(uuid.uuid4()).encode() + b'"'


def idempotency_count(gateway: GatewayProcess, result: str) -> float:
    """gateway_idempotency_total of the ``payments`` route for ``result`` (0 if absent)."""
    return metric_sum(
        gateway.metrics_text(), "gateway_idempotency_total", route="payments", result=result
    )


def poll(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
