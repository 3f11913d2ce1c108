"""Real backends on loopback for integration tests, each in its own thread and event loop.

- ``AppBackend``: an aiohttp application (echo, status, slow, stream, sink, websocket...).
- ``ThreadedApp``: the base of a test's own small aiohttp service (auth, JWKS, OTLP, mirror).
- ``RawBackend``: a plain asyncio server whose reply is a function of the bytes it received,
  recording every byte, for framing tests and "the upstream saw nothing" assertions.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web


class LoopThread:
    """An asyncio loop running in a daemon thread; ``call`` runs a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class ThreadedApp:
    """An aiohttp application on 127.0.0.1 (a free port), served from its own loop thread.
    A subclass sets its own fields, then calls ``super().__init__()``, and adds its handlers
    in ``add_routes`` (run on that loop)."""

    client_max_size = 1024**2

    def __init__(self) -> None:
        self.thread = LoopThread()
        self.port: int = self.thread.call(self._start())

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _start(self) -> int:
        app = web.Application(client_max_size=self.client_max_size)
        self.add_routes(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    def close(self) -> None:
        self.thread.call(self.runner.cleanup())
        self.thread.stop()


def _payload(size: int) -> bytes:
    pattern = b"0123456789abcdef" * 4096  # 64 KiB
    whole, rest = divmod(size, len(pattern))
    return pattern * whole + pattern[:rest]


class AppBackend:
    """aiohttp backend. Every request is recorded in ``self.requests`` (method, path, headers)."""

    def __init__(self, name: str = "app") -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.thread = LoopThread()
        self.port = self.thread.call(self._start())

    async def _start(self) -> int:
        app = web.Application(client_max_size=2 * 1024**3)
        app.router.add_route("*", "/echo{tail:.*}", self._echo)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/bytes/{size}", self._bytes)
        app.router.add_get("/stream/{size}", self._stream)
        app.router.add_route("*", "/sink", self._sink)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/name", self._name)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _record(self, request: web.Request, body_size: int = 0) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "raw_headers": [(k.decode(), v.decode()) for k, v in request.raw_headers],
                "body_size": body_size,
            }
        )

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._record(request, len(body))
        return web.json_response(
            {
                "backend": self.name,
                "method": request.method,
                "path": request.path_qs,
                "version": f"{request.version.major}.{request.version.minor}",
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_size": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    async def _status(self, request: web.Request) -> web.Response:
        await request.read()
        self._record(request)
        code = int(request.match_info["code"])
        return web.Response(
            status=code, text=f"status {code}\n" if code not in (204, 304) else None
        )

    async def _slow(self, request: web.Request) -> web.Response:
        self._record(request)
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text="slow\n")

    async def _bytes(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(body=_payload(int(request.match_info["size"])))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Chunked response of ``size`` bytes written in 64 KiB pieces (honours backpressure)."""
        self._record(request)
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        piece = _payload(64 * 1024)
        sent = 0
        while sent < size:
            chunk = piece[: min(len(piece), size - sent)]
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
        return response

    async def _sink(self, request: web.Request) -> web.Response:
        """Read the body as a stream, returning its size and hash (never holds it whole)."""
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        self._record(request, size)
        return web.json_response({"body_size": size, "body_sha256": digest.hexdigest()})

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def _name(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(text=self.name)

    def close(self) -> None:
        self.thread.call(self.runner.cleanup())
        self.thread.stop()


Responder = Callable[[bytes], bytes | None]


class RawBackend:
    """A TCP server that records every byte and answers with ``responder(received_so_far)``.

    ``responder`` returns the bytes to send (then the buffer is cleared) or None to wait for
    more. The default answers one fixed 200 per request head received.
    """

    def __init__(self, responder: Responder | None = None, *, close_after: bool = False) -> None:
        self.received: list[bytes] = []
        self.connections = 0
        self.responder = responder or _fixed_ok
        self.close_after = close_after
        self.thread = LoopThread()
        self.port = self.thread.call(self._start())

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buffer = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received.append(data)
                buffer += data
                reply = self.responder(buffer)
                if reply is not None:
                    buffer = b""
                    writer.write(reply)
                    await writer.drain()
                    if self.close_after:
                        break
        except ConnectionError:
            pass
        finally:
            writer.close()

    @property
    def all_bytes(self) -> bytes:
        return b"".join(self.received)

    def reset(self) -> None:
        self.received.clear()
        self.connections = 0

    def close(self) -> None:
        """Stop serving; handlers still waiting on (gateway-pooled) connections are cancelled on
        their own loop first, so none is destroyed with the loop at interpreter exit."""
        self.server.close()
        self.thread.call(_cancel_other_tasks())
        self.thread.stop()


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _fixed_ok(buffer: bytes) -> bytes | None:
    if b"\r\n\r\n" not in buffer:
        return None
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def complete_message_responder(buffer: bytes) -> bytes | None:
    """Answer 200 only once a whole request (head + Content-Length or chunked body) arrived,
    so that a rejected body cannot be pre-empted by an early upstream answer."""
    head, sep, body = buffer.partition(b"\r\n\r\n")
    if not sep:
        return None
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        if not body.endswith(b"0\r\n\r\n"):
            return None
    else:
        for line in lowered.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length" and len(body) < int(value):
                return None
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
