"""A minimal HTTP/1.1 backend for when nginx is not installed (``python -m loadtest.backend``).

Serves the same paths as the nginx backend: ``/small`` (13 bytes), ``/large`` (64 KiB) and
``POST /post`` (body read and discarded). Keep-alive and pipelining; ``Connection: close`` honoured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import httptools

from loadtest.servers import LARGE_BODY_BYTES, POST_REPLY, SMALL_BODY


def _response(status: bytes, body: bytes, content_type: bytes = b"text/plain") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


RESPONSES: dict[bytes, bytes] = {
    b"/small": _response(b"200 OK", SMALL_BODY),
    b"/large": _response(b"200 OK", b"x" * LARGE_BODY_BYTES, b"application/octet-stream"),
    b"/post": _response(b"200 OK", POST_REPLY),
}
NOT_FOUND = _response(b"404 Not Found", b"not found\n")
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class BackendProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        path = self.url.split(b"?", 1)[0]
        self.url = b""
        self.transport.write(RESPONSES.get(path, NOT_FOUND))
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BackendProtocol, host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
