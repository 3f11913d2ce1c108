"""A raw HTTP/2 client for tests: frames built with hyperframe/hpack and written as bytes, so a
test can send exactly what a hostile or broken client would (no client-side validation)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9113 §7 error codes used by the tests.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB


@dataclass
class Response:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    reset: int | None = None  # RST_STREAM error code, if the stream was reset
    ended: bool = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class RawH2:
    """One HTTP/2 connection. ``auto_window``: acknowledge received DATA at once (stream and
    connection), as a well-behaved fast reader does."""

    def __init__(
        self,
        port: int,
        *,
        context: ssl.SSLContext | None = None,
        server_name: str = "localhost",
        settings: dict[int, int] | None = None,
        auto_window: bool = True,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            self.sock: socket.socket = context.wrap_socket(raw, server_hostname=server_name)
        else:
            self.sock = raw
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.auto_window = auto_window
        self.responses: dict[int, Response] = {}
        self.goaway: GoAwayFrame | None = None
        self.server_settings: dict[int, int] = {}
        self.window_updates: dict[int, int] = {}  # stream id -> bytes granted by the server
        self.eof = False
        first = SettingsFrame(0)
        first.settings = settings or {}
        self.sock.sendall(PREFACE + first.serialize())

    # -- sending -------------------------------------------------------------------------------
    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(frame.serialize() for frame in frames))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def headers_frame(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> HeadersFrame:
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(headers)
        if end_stream:
            frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    def request(
        self,
        stream_id: int,
        path: str = "/echo",
        *,
        method: str = "GET",
        extra: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        authority: str = "127.0.0.1",
    ) -> None:
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", authority.encode()),
            *(extra or []),
        ]
        self.send(self.headers_frame(stream_id, headers, end_stream=body is None))
        if body is not None:
            self.send_body(stream_id, body)

    def send_body(self, stream_id: int, body: bytes, *, end_stream: bool = True) -> None:
        for offset in range(0, max(len(body), 1), 16384):
            frame = DataFrame(stream_id)
            frame.data = body[offset : offset + 16384]
            if end_stream and offset + 16384 >= len(body):
                frame.flags.add("END_STREAM")
            self.send(frame)

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        frame = RstStreamFrame(stream_id)
        frame.error_code = code
        self.send(frame)

    def ping(self, payload: bytes = b"12345678") -> PingFrame:
        frame = PingFrame(0)
        frame.opaque_data = payload
        return frame

    def continuation(self, stream_id: int, data: bytes, *, end: bool = False) -> ContinuationFrame:
        frame = ContinuationFrame(stream_id)
        frame.data = data
        if end:
            frame.flags.add("END_HEADERS")
        return frame

    # -- receiving -----------------------------------------------------------------------------
    def _read_frame(self, deadline: float) -> Frame | None:
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                    self.buffer = self.buffer[9 + length :]
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self.eof = True
                return None
            self.buffer += chunk

    def _handle(self, frame: Frame) -> None:
        sid = frame.stream_id
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.server_settings.update(frame.settings)
                ack = SettingsFrame(0)
                ack.flags.add("ACK")
                with contextlib.suppress(OSError):  # (the server may have closed already)
                    self.send(ack)
        elif isinstance(frame, HeadersFrame | ContinuationFrame):
            response = self.responses.setdefault(sid, Response())
            headers = self.decoder.decode(frame.data, raw=True)
            status = dict(headers).get(b":status")
            if status is not None and int(status) >= 200:  # (not 1xx, not trailers)
                response.status = int(status)
                response.headers = [(k, v) for k, v in headers if not k.startswith(b":")]
            if "END_STREAM" in frame.flags:
                response.ended = True
        elif isinstance(frame, DataFrame):
            response = self.responses.setdefault(sid, Response())
            response.body += frame.data
            if "END_STREAM" in frame.flags:
                response.ended = True
            if self.auto_window and frame.flow_controlled_length:
                self.grant(sid, frame.flow_controlled_length)
                self.grant(0, frame.flow_controlled_length)
        elif isinstance(frame, RstStreamFrame):
            self.responses.setdefault(sid, Response()).reset = frame.error_code
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame
        elif isinstance(frame, WindowUpdateFrame):
            self.window_updates[sid] = self.window_updates.get(sid, 0) + frame.window_increment

    def grant(self, stream_id: int, size: int) -> None:
        frame = WindowUpdateFrame(stream_id)
        frame.window_increment = size
        with contextlib.suppress(OSError):
            self.send(frame)

    def pump(self, until: object, timeout: float = 10.0) -> bool:
        """Read frames until ``until()`` is true (True) or the connection ends (False)."""
        deadline = time.monotonic() + timeout
        while not until():  # type: ignore[operator]
            frame = self._read_frame(deadline)
            if frame is None:
                return bool(until())  # type: ignore[operator]
            self._handle(frame)
        return True

    def response(self, stream_id: int, timeout: float = 10.0) -> Response:
        def done() -> bool:
            response = self.responses.get(stream_id)
            return response is not None and (response.ended or response.reset is not None)

        if not self.pump(done, timeout):
            raise ConnectionError(f"connection ended before stream {stream_id} did")
        return self.responses[stream_id]

    def wait_closed(self, timeout: float = 10.0) -> GoAwayFrame | None:
        """Read until the server closes the connection; the GOAWAY it sent, if any."""
        self.pump(lambda: self.eof, timeout)
        return self.goaway

    def close(self) -> None:
        self.sock.close()
