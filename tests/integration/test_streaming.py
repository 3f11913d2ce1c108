"""Large bodies stream through a real gateway process with bounded memory, in both directions.

The gateway's resident set size is sampled (``GatewayProcess.rss_kib``) in a background thread
throughout each transfer; its growth over the pre-transfer baseline must stay under 64 MiB while
one side is deliberately slow, which only holds if backpressure reaches the fast side. Every
body is checked byte for byte (downloads) or by size + SHA-256 (uploads).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.backends import AppBackend, LoopThread, _payload
from tests.integration.conftest import GatewayProcess, read_response

MiB = 1024 * 1024
GiB = 1024 * MiB
RSS_GROWTH_LIMIT_KIB = 64 * 1024  # issue 2: a slow reader keeps RSS growth under 64 MiB
PATTERN = _payload(64 * 1024)  # the AppBackend's repeating 64 KiB body pattern
# Expected bytes for any offset: PATTERN repeated, long enough for a 64 KiB phase + 1 MiB.
EXPECTED = PATTERN * 18
CHECK_PIECE = 1 * MiB


class RssSampler:
    """Polls a process's RSS in a thread; ``growth_kib`` = peak minus the starting value."""

    def __init__(self, gateway: GatewayProcess, interval: float = 0.01) -> None:
        self.gateway = gateway
        self.interval = interval
        self.baseline = gateway.rss_kib()
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.gateway.rss_kib())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.gateway.rss_kib())

    @property
    def growth_kib(self) -> int:
        return self.peak - self.baseline


# -- backends defined here ------------------------------------------------------------------


class PatternServer:
    """Answers ``GET /cl/N`` with N pattern bytes framed by Content-Length, written in 256 KiB
    pieces with ``drain`` (so it is only as fast as the gateway reads). Keep-alive.
    ``GET .../one-write/N`` sends head and body in one write instead."""

    def __init__(self) -> None:
        self.thread = LoopThread()
        self.port: int = self.thread.call(self._start())

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        piece = PATTERN * 4
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                size = int(target.rsplit(b"/", 1)[1])
                response_head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size
                if b"/one-write/" in target:
                    # Head and whole body in a single write: one segment for the gateway.
                    writer.write(response_head + _payload(size))
                    await writer.drain()
                    continue
                else:
                    writer.write(response_head)
                sent = 0
                while sent < size:
                    chunk = piece[: min(len(piece), size - sent)]
                    writer.write(chunk)
                    sent += len(chunk)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.thread.call(shutdown())
        self.thread.stop()


class SlowSink:
    """A blocking upstream that reads request bodies (Content-Length) slowly at first.

    The first ``slow_bytes`` of each body are read ``piece`` bytes at a time with a pause
    between reads, then the rest as fast as possible; the reply is JSON with size and SHA-256.
    ``received`` counts body bytes read so far (for in-flight accounting by the test)."""

    def __init__(self, slow_bytes: int, piece: int = 16 * 1024, pause: float = 0.001) -> None:
        self.slow_bytes = slow_bytes
        self.piece = piece
        self.pause = pause
        self.received = 0
        self.listener = socket.socket()
        # Accepted sockets inherit a small receive buffer, so the kernel does not soak up the
        # upload on the gateway's behalf.
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                digest = hashlib.sha256()
                got = len(buffer[:length])
                digest.update(buffer[:length])
                buffer = buffer[length:]
                self.received += got
                while got < length:
                    slow = got < self.slow_bytes
                    if slow:
                        time.sleep(self.pause)
                    data = conn.recv(min(self.piece if slow else MiB, length - got))
                    if not data:
                        return
                    digest.update(data)
                    got += len(data)
                    self.received += len(data)
                body = json.dumps({"body_size": got, "body_sha256": digest.hexdigest()}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%b" % (len(body), body)
                )

    def close(self) -> None:
        self._closed = True
        self.listener.close()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pattern_server() -> Iterator[PatternServer]:
    server = PatternServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def slow_sink() -> Iterator[SlowSink]:
    sink = SlowSink(slow_bytes=16 * MiB)
    yield sink
    sink.close()


@pytest.fixture(scope="module")
def stream_gw(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    pattern_server: PatternServer,
    slow_sink: SlowSink,
) -> Iterator[GatewayProcess]:
    process = start_gateway(
        {
            "limits": {"max_body_bytes": "2GiB"},
            "upstreams": {
                # Read timeouts short enough that a stuck pooled connection shows up as a quick
                # 504, long enough for any pause of these tests' slow readers.
                "app": {
                    "instances": [f"127.0.0.1:{app_backend.port}"],
                    "timeouts": {"read": "10s"},
                    "max_idle_connections": 1,
                },
                "pattern": {
                    "instances": [f"127.0.0.1:{pattern_server.port}"],
                    "timeouts": {"read": "5s"},
                    "max_idle_connections": 1,
                },
                "slow-sink": {"instances": [f"127.0.0.1:{slow_sink.port}"]},
            },
            "routes": [
                {"name": "cl", "match": {"path": {"prefix": "/cl/"}}, "upstream": "pattern"},
                {
                    "name": "slow-sink",
                    "match": {"path": {"prefix": "/slow-sink"}},
                    "upstream": "slow-sink",
                },
                {"name": "app", "match": {"path": {"prefix": "/"}}, "upstream": "app"},
            ],
        }
    )
    # Warm up every path once so that first-use allocations are part of the baseline.
    for request in (
        b"GET /stream/4096 HTTP/1.1\r\nHost: t.test\r\n\r\n",
        b"GET /cl/4096 HTTP/1.1\r\nHost: t.test\r\n\r\n",
        b"POST /sink HTTP/1.1\r\nHost: t.test\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /slow-sink HTTP/1.1\r\nHost: t.test\r\nContent-Length: 5\r\n\r\nhello",
    ):
        sock = process.connect()
        sock.sendall(request)
        assert read_response(sock)[0] == 200
        sock.close()
    yield process
    process.stop()


# -- downloads ------------------------------------------------------------------------------


class SlowReader:
    """A client socket with a small receive buffer whose reads can be slowed down."""

    def __init__(self, port: int, rcvbuf: int = 16 * 1024) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(30)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        self.pos = 0
        self.recv_size = 4096
        self.pause = 0.001
        self.received = 0  # body bytes handed out so far

    def _fill(self) -> None:
        if self.pause:
            time.sleep(self.pause)
        data = self.sock.recv(self.recv_size)
        if not data:
            raise ConnectionError("connection closed mid-response")
        self.buf = self.buf[self.pos :] + data if self.pos < len(self.buf) else data
        self.pos = 0

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = self.buf[self.pos : end]
                self.pos = end + 2
                return line
            self._fill()

    def _take(self, limit: int) -> bytes:
        if self.pos >= len(self.buf):
            self._fill()
        data = self.buf[self.pos : self.pos + limit]
        self.pos += len(data)
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        status = int(self._line().split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def body(self, headers: dict[str, str]) -> Iterator[bytes]:
        if "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining:
                data = self._take(remaining)
                remaining -= len(data)
                yield data
            return
        assert headers.get("transfer-encoding") == "chunked", headers
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():  # trailer section, then the empty line
                    pass
                return
            while size:
                data = self._take(size)
                size -= len(data)
                yield data
            assert self._line() == b""


def check_pattern(offset: int, data: bytes) -> None:
    """``data`` is exactly the backend pattern at stream ``offset``."""
    for start in range(0, len(data), CHECK_PIECE):
        piece = data[start : start + CHECK_PIECE]
        phase = (offset + start) % len(PATTERN)
        if piece != EXPECTED[phase : phase + len(piece)]:
            raise AssertionError(f"body differs from the pattern near offset {offset + start}")


@pytest.mark.parametrize(
    "path",
    [b"/stream/%d" % GiB, b"/cl/%d" % GiB],
    ids=["chunked-1GiB-aiohttp", "content-length-1GiB"],
)
def test_slow_reader_download_has_bounded_memory(
    stream_gw: GatewayProcess, path: bytes, record_property: Callable[[str, object], None]
) -> None:
    size = int(path.rsplit(b"/", 1)[1])
    slow_part = 8 * MiB  # read slowly: the upstream is far faster than this client
    client = SlowReader(stream_gw.port)
    started = time.monotonic()
    with RssSampler(stream_gw) as rss:
        client.sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t.test\r\n\r\n")
        status, headers = client.head()
        if status != 200:
            client.pause = 0.0
            error = b"".join(client.body(headers))
            raise AssertionError(f"status {status}: {error!r}")
        received = 0
        slow_growth = 0
        for data in client.body(headers):
            check_pattern(received, data)
            received += len(data)
            if client.pause and received >= slow_part:
                # Slow phase over: everything the gateway could have buffered meanwhile would
                # show now. Then read fast so the test ends in reasonable time.
                slow_growth = rss.growth_kib
                client.pause = 0.0
                client.recv_size = MiB
    client.sock.close()
    elapsed = time.monotonic() - started
    record_property("rss_growth_kib", rss.growth_kib)
    record_property("rss_growth_kib_slow_phase", slow_growth)
    print(
        f"\n{path.decode()}: {received} bytes in {elapsed:.1f}s, gateway RSS baseline "
        f"{rss.baseline} KiB, growth {rss.growth_kib} KiB (slow phase {slow_growth} KiB), "
        f"{rss.samples} samples"
    )
    assert received == size
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB
    # The upstream connection went back to the pool while this client was slow: the next user
    # must get an answer (a connection left with reading paused would only give a 504).
    follow_up = b"/echo/after" if path.startswith(b"/stream/") else b"/cl/100"
    sock = stream_gw.connect()
    sock.sendall(b"GET " + follow_up + b" HTTP/1.1\r\nHost: t.test\r\n\r\n")
    status, _, body = read_response(sock)
    sock.close()
    assert status == 200, body


@pytest.mark.parametrize("size", [100, 60 * 1024, 200 * 1024])
def test_response_head_and_body_in_one_segment(stream_gw: GatewayProcess, size: int) -> None:
    # A small head followed at once by a body larger than any response-head limit: only the
    # head counts against that limit (RFC 9112 §6.3 frames the rest as body).
    sock = stream_gw.connect()
    sock.sendall(b"GET /cl/one-write/%d HTTP/1.1\r\nHost: t.test\r\n\r\n" % size)
    status, _, body = read_response(sock)
    sock.close()
    assert status == 200, body[:300]
    assert body == _payload(size)


# -- uploads --------------------------------------------------------------------------------


def upload_pieces(size: int, piece: int = 256 * 1024) -> Iterator[bytes]:
    """A deterministic body generated on the fly; every piece is distinct (it starts with its
    index) so dropped, repeated or reordered pieces change the hash."""
    base = (PATTERN * (piece // len(PATTERN) + 1))[:piece]
    sent = 0
    index = 0
    while sent < size:
        data = (index.to_bytes(8, "big") + base[8:])[: size - sent]
        yield data
        sent += len(data)
        index += 1


_DIGESTS: dict[int, str] = {}


def upload_sha256(size: int) -> str:
    if size not in _DIGESTS:
        digest = hashlib.sha256()
        for data in upload_pieces(size):
            digest.update(data)
        _DIGESTS[size] = digest.hexdigest()
    return _DIGESTS[size]


def send_upload(sock: socket.socket, path: bytes, size: int, *, chunked: bool) -> None:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: t.test\r\n" + framing + b"\r\n\r\n")
    for data in upload_pieces(size):
        if chunked:
            sock.sendall(b"%x\r\n" % len(data))
            sock.sendall(data)
            sock.sendall(b"\r\n")
        else:
            sock.sendall(data)
    if chunked:
        sock.sendall(b"0\r\n\r\n")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_upload_has_bounded_memory(
    stream_gw: GatewayProcess, chunked: bool, record_property: Callable[[str, object], None]
) -> None:
    size = 256 * MiB
    expected = upload_sha256(size)
    sock = stream_gw.connect()
    sock.settimeout(60)
    started = time.monotonic()
    with RssSampler(stream_gw) as rss:
        send_upload(sock, b"/sink", size, chunked=chunked)
        status, _, body = read_response(sock)
    sock.close()
    elapsed = time.monotonic() - started
    record_property("rss_growth_kib", rss.growth_kib)
    print(
        f"\nupload 256 MiB ({'chunked' if chunked else 'content-length'}) in {elapsed:.1f}s, "
        f"gateway RSS baseline {rss.baseline} KiB, growth {rss.growth_kib} KiB"
    )
    assert status == 200
    assert json.loads(body) == {"body_size": size, "body_sha256": expected}
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB


def test_slow_upstream_reader_backpressures_the_client(
    stream_gw: GatewayProcess, slow_sink: SlowSink, record_property: Callable[[str, object], None]
) -> None:
    # The client pushes 128 MiB as fast as it can; the upstream reads the first 16 MiB slowly.
    # Without backpressure the gateway would swallow the upload into memory meanwhile.
    size = 128 * MiB
    expected = upload_sha256(size)
    sock = stream_gw.connect()
    sock.settimeout(60)
    sent = 0
    errors: list[BaseException] = []

    def push() -> None:
        nonlocal sent
        try:
            sock.sendall(
                b"POST /slow-sink HTTP/1.1\r\nHost: t.test\r\nContent-Length: %d\r\n\r\n" % size
            )
            for data in upload_pieces(size):
                sock.sendall(data)
                sent += len(data)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    slow_sink.received = 0
    max_in_flight = 0
    started = time.monotonic()
    with RssSampler(stream_gw) as rss:
        sender = threading.Thread(target=push, daemon=True)
        sender.start()
        while sender.is_alive():
            max_in_flight = max(max_in_flight, sent - slow_sink.received)
            sender.join(0.01)
        status, _, body = read_response(sock)
    sock.close()
    elapsed = time.monotonic() - started
    assert not errors, errors
    record_property("rss_growth_kib", rss.growth_kib)
    record_property("max_in_flight_bytes", max_in_flight)
    print(
        f"\nslow upstream, 128 MiB upload in {elapsed:.1f}s, gateway RSS baseline "
        f"{rss.baseline} KiB, growth {rss.growth_kib} KiB, max client-sent minus "
        f"upstream-read {max_in_flight // 1024} KiB"
    )
    assert status == 200
    assert json.loads(body) == {"body_size": size, "body_sha256": expected}
    # Kernel socket buffers on three hops account for a few MiB; the gateway for the rest.
    assert max_in_flight < 64 * MiB
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB
