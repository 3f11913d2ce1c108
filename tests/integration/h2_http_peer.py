"""A small real HTTP/2 (h2c) server for the HTTP/1.1 → HTTP/2 upstream tests, in a thread of
its own with its own event loop, on a random free port. What it does is chosen by the path:

- ``/echo``: after the request ended, the body back, with ``x-body-len`` and ``x-body-sha256``
  (``?cl=1``: with a content-length);
- ``/big?n=N``: N pattern bytes, sent as the client's window allows (``?cl=1``: with a
  content-length); ``sent`` counts what went out per stream;
- ``/trailers``: a body, then trailers ``x-checksum`` and ``grpc-status``;
- ``/reset``: RST_STREAM(INTERNAL_ERROR) at once; ``/reset-mid``: the head and some body, then
  RST_STREAM;
- ``/refuse-once``: the first request REFUSED_STREAM, the next ones answered like ``/echo``;
- ``/silent``: never answered;
- ``/hold``: the request body is not acknowledged (the window closes) until ``release`` is set,
  then answered like ``/echo``.

Every request's header list is kept in ``seen`` (path → lists), for header assertions.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import defaultdict
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int) -> bytes:
    whole, rest = divmod(n, len(PATTERN))
    return PATTERN * whole + PATTERN[:rest]


class _Conn(asyncio.Protocol):
    def __init__(self, server: H2HttpServer) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.paths: dict[int, str] = {}
        self.bodies: dict[int, bytearray] = defaultdict(bytearray)
        self.unacked: dict[int, int] = defaultdict(int)
        self.outbox: dict[int, tuple[bytes, list[tuple[bytes, bytes]] | None]] = {}
        self.refused: set[int] = set()
        self.offsets: dict[int, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event.stream_id, list(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                sid = event.stream_id
                self.bodies[sid].extend(event.data or b"")
                if self.paths.get(sid, "").startswith("/hold") and not self.server.release.is_set():
                    self.unacked[sid] += event.flow_controlled_length
                    self.server.received[sid] = len(self.bodies[sid])
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                for sid in list(self.outbox):
                    self._push(sid)
            elif isinstance(event, h2.events.StreamReset):
                self.outbox.pop(event.stream_id, None)
                self.server.resets.append(event.stream_id)
        self.flush()

    def _request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        fields = dict(headers)
        path = fields[b":path"].decode()
        self.paths[sid] = path
        route = urlsplit(path).path
        self.server.seen[route].append(headers)
        if route == "/reset":
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif route == "/reset-mid":
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.h2.send_data(sid, b"x" * 1000)
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif route == "/refuse-once" and not self.server.refused:
            self.server.refused = True
            self.refused.add(sid)
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
        elif route == "/big":
            query = parse_qs(urlsplit(path).query)
            body = pattern_bytes(int(query["n"][0]))
            head = [(b":status", b"200"), (b"content-type", b"application/octet-stream")]
            if "cl" in query:
                head.append((b"content-length", b"%d" % len(body)))
            self.h2.send_headers(sid, head)
            self.outbox[sid] = (body, None)
            self._push(sid)
        # (Otherwise answered at StreamEnded, which h2 reports after RequestReceived too.)

    def _ended(self, sid: int) -> None:
        path = self.paths.get(sid, "")
        route = urlsplit(path).path
        if sid in self.refused or route not in ("/echo", "/trailers", "/refuse-once", "/hold"):
            return
        body = bytes(self.bodies.pop(sid, b""))
        head = [
            (b":status", b"200"),
            (b"content-type", b"application/octet-stream"),
            (b"x-body-len", b"%d" % len(body)),
            (b"x-body-sha256", hashlib.sha256(body).hexdigest().encode()),
        ]
        if "cl=1" in path:
            head.append((b"content-length", b"%d" % len(body)))
        trailers = None
        if route == "/trailers":
            body = b"trailer test body"
            trailers = [(b"x-checksum", b"abc123"), (b"grpc-status", b"0")]
        self.h2.send_headers(sid, head, end_stream=not body and trailers is None)
        if body or trailers is not None:
            self.outbox[sid] = (body, trailers)
            self._push(sid)

    def _push(self, sid: int) -> None:
        body, trailers = self.outbox[sid]
        offset = self.offsets.get(sid, 0)
        view = memoryview(body)
        try:
            while offset < len(body):
                window = self.h2.local_flow_control_window(sid)
                size = min(window, self.h2.max_outbound_frame_size, len(body) - offset)
                if size <= 0:
                    break
                self.h2.send_data(sid, view[offset : offset + size].tobytes())
                self.server.sent[sid] = self.server.sent.get(sid, 0) + size
                offset += size
            self.offsets[sid] = offset
            if offset < len(body):
                return
            del self.outbox[sid]
            if trailers is not None:
                self.h2.send_headers(sid, trailers, end_stream=True)
            else:
                self.h2.end_stream(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.outbox.pop(sid, None)

    def release_held(self) -> None:
        for sid, size in list(self.unacked.items()):
            if size:
                self.h2.acknowledge_received_data(size, sid)
            self.unacked[sid] = 0
        self.flush()


class H2HttpServer:
    def __init__(self) -> None:
        self.seen: dict[str, list[list[tuple[bytes, bytes]]]] = defaultdict(list)
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.resets: list[int] = []
        self.refused = False
        self.release = threading.Event()
        self.connections: list[_Conn] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.port = 0

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            def factory() -> _Conn:
                conn = _Conn(self)
                self.connections.append(conn)
                return conn

            server = self.loop.run_until_complete(self.loop.create_server(factory, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()
            server.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)

    def release_holds(self) -> None:
        self.release.set()
        for conn in list(self.connections):
            self.loop.call_soon_threadsafe(conn.release_held)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
