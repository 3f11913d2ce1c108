"""A small HTTP/1.1 backend that runs as its own OS process, for failover tests.

Being a separate process is the point: tests ``SIGKILL`` it (the kernel closes its sockets),
``SIGSTOP`` it (its sockets stay open but nothing answers) and ``SIGCONT`` it. It is plain
asyncio (no framework) so it can reset a connection at an exact moment and starts fast.

Run: ``python -m tests.integration.failover_backend --name NAME``; it binds a free loopback port
and prints ``READY <port>`` on stdout once it accepts connections.

Endpoints (any method; every one is recorded in the request log):

- ``/name``: 200 with the instance name.
- ``/slow?delay=S``: waits S seconds, then 200 with the name.
- ``/status/CODE?retry_after=V&delay=S``: answers CODE (with ``Retry-After: V`` if given).
- ``/reset-after-body``: reads the whole request body, records it, then resets the connection
  (``SO_LINGER`` 0 + abort: an RST, no response byte).
- ``/head-then-die``: sends a response head announcing 1000 bytes and 10 of them, then resets.
- ``/work``: behaves as set by ``POST /_control/behaviour`` (default: 200 with the name), so
  instances of one upstream can differ on the same path.

Control endpoints (not recorded): ``GET /_control/count`` (JSON ``{"total", "by_path",
"in_flight", "completed"}``), ``GET /_control/log`` (JSON list of recorded requests),
``POST /_control/clear``, ``POST /_control/behaviour`` (JSON: ``delay``, ``status``,
``retry_after``, ``reset_after_body``). ``/count`` and ``/log`` are aliases of the first two.

``BackendProcess`` starts one such process and talks to its control endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[2]

_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Unavailable"}
_MAX_HEAD = 64 * 1024


class Request:
    __slots__ = ("body", "headers", "method", "path", "query", "target")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.target = target
        split = urlsplit(target)
        self.path = split.path
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        self.headers = headers
        self.body = body


class Backend:
    """The server: request log, counters and the per-instance behaviour of ``/work``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[dict[str, Any]] = []
        self.by_path: dict[str, int] = {}
        self.in_flight = 0
        self.completed = 0
        self.behaviour: dict[str, Any] = {}

    # -- connection loop ------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                keep_open = await self._serve(request, writer)
                if not keep_open:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            if not writer.transport.is_closing():
                writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the peer closed between requests
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        return Request(method, target, headers, body)

    # -- dispatch ------------------------------------------------------------------------------
    async def _serve(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end (reset or close)."""
        path = request.path
        if path.startswith("/_control/") or path in ("/count", "/log"):
            return self._control(request, writer)
        self._record(request)
        self.in_flight += 1
        try:
            if path == "/name":
                return self._reply(writer, 200, self.name)
            if path == "/slow":
                await asyncio.sleep(float(request.query.get("delay", "1")))
                return self._reply(writer, 200, self.name)
            if path.startswith("/status/"):
                await asyncio.sleep(float(request.query.get("delay", "0")))
                code = int(path.rsplit("/", 1)[1])
                return self._reply(
                    writer, code, f"{self.name} {code}", request.query.get("retry_after")
                )
            if path == "/reset-after-body":
                _reset(writer)
                return False
            if path == "/head-then-die":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                await writer.drain()
                await asyncio.sleep(0.2)  # the head reaches the gateway well before the reset
                _reset(writer)
                return False
            if path == "/work":
                behaviour = self.behaviour
                delay = float(behaviour.get("delay", 0))
                if delay:
                    await asyncio.sleep(delay)
                if behaviour.get("reset_after_body"):
                    _reset(writer)
                    return False
                status = int(behaviour.get("status", 200))
                return self._reply(writer, status, self.name, behaviour.get("retry_after"))
            return self._reply(writer, 404, "no such endpoint")
        finally:
            self.in_flight -= 1
            self.completed += 1

    def _record(self, request: Request) -> None:
        self.by_path[request.path] = self.by_path.get(request.path, 0) + 1
        self.log.append(
            {
                "method": request.method,
                "target": request.target,
                "path": request.path,
                "query": request.query,
                "headers": request.headers,
                "body": request.body.decode("latin-1"),
                "time": time.monotonic(),
            }
        )

    def _control(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        path = request.path
        if path in ("/_control/count", "/count"):
            payload: Any = {
                "total": sum(self.by_path.values()),
                "by_path": self.by_path,
                "in_flight": self.in_flight,
                "completed": self.completed,
            }
        elif path in ("/_control/log", "/log"):
            payload = self.log
        elif path == "/_control/clear":
            self.log.clear()
            self.by_path.clear()
            self.completed = 0
            payload = {"cleared": True}
        elif path == "/_control/behaviour":
            self.behaviour = json.loads(request.body or b"{}")
            payload = self.behaviour
        else:
            return self._reply(writer, 404, "no such control endpoint")
        return self._reply(writer, 200, json.dumps(payload), content_type="application/json")

    @staticmethod
    def _reply(
        writer: asyncio.StreamWriter,
        status: int,
        text: str,
        retry_after: str | None = None,
        content_type: str = "text/plain",
    ) -> bool:
        body = text.encode()
        extra = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        return True


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER on, timeout 0) instead of a FIN: an abrupt failure."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _main(name: str, port: int) -> None:
    backend = Backend(name)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


# -- the test side ---------------------------------------------------------------------------


class BackendProcess:
    """One backend process: start, signal, and query its control endpoints."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.port = port
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.failover_backend",
                "--name",
                self.name,
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def restart(self) -> None:
        """Start the backend again on the same port (after :meth:`kill`), as a supervisor would."""
        if self.process.poll() is None:
            self.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = self._start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"backend {self.name} not ready after {timeout}s")
        line = stdout.readline().decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"backend {self.name} failed to start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- control ----------------------------------------------------------------------------
    def _call(self, path: str, payload: Any = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            f"http://{self.address}{path}", data=data, method="POST" if data else "GET"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def count(self) -> dict[str, Any]:
        return self._call("/_control/count")  # type: ignore[no-any-return]

    def total(self) -> int:
        return int(self.count()["total"])

    def log(self) -> list[dict[str, Any]]:
        return self._call("/_control/log")  # type: ignore[no-any-return]

    def clear(self) -> None:
        self._call("/_control/clear", {})

    def set_behaviour(self, **behaviour: Any) -> None:
        self._call("/_control/behaviour", behaviour)

    # -- signals ---------------------------------------------------------------------------
    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(5)

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_backends(names: Iterable[str]) -> list[BackendProcess]:
    """Start several backends in parallel and wait until all of them accept connections."""
    backends = [BackendProcess(name) for name in names]
    try:
        for backend in backends:
            backend.wait_ready()
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return backends


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    # SIGTERM keeps its default action (exit at once): there is nothing to clean up.
    asyncio.run(_main(args.name, args.port))
