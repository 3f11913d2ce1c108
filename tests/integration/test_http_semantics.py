"""HTTP/1.1 proxying semantics through a real gateway process (RFC 9110 / RFC 9112).

Raw sockets everywhere: these tests check framing, so they must see the exact bytes. A
``ResponseReader`` keeps bytes past the end of one response for the next (pipelining, 1xx).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration.backends import AppBackend, RawBackend
from tests.integration.conftest import GatewayProcess


@dataclass
class Response:
    status: int
    reason: str
    head: bytes  # raw status line + header lines, without the final CRLF CRLF
    header_list: list[tuple[str, str]]  # (lowercase name, value) in wire order
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for name, value in self.header_list:
            merged[name] = f"{merged[name]}, {value}" if name in merged else value
        return merged

    def json(self) -> Any:
        return json.loads(self.body)


class ResponseReader:
    """Consecutive responses on one client socket; bytes beyond a response stay buffered."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def take(self, size: int) -> bytes:
        """Exactly ``size`` raw bytes (e.g. after a 101, when the bytes are no longer HTTP)."""
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError(f"closed after {len(self.buffer)} of {size} bytes")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed mid-line: {self.buffer!r}")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read(self, *, no_body: bool = False) -> Response:
        """One response; ``no_body`` for the answer to a HEAD request (RFC 9110 §9.3.2)."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a full response head: {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status_text, *rest = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        status = int(status_text)
        header_list = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            header_list.append((name.strip().lower(), value.strip()))
        response = Response(status, rest[0] if rest else "", head, header_list, b"")
        headers = response.headers
        # RFC 9112 §6.3: the order in which a response's body length is determined.
        if no_body or status < 200 or status in (204, 304):
            return response
        if "transfer-encoding" in headers:
            assert headers["transfer-encoding"] == "chunked", headers
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailer section ends with an empty line
                        pass
                    break
                body += self.take(size)
                assert self.take(2) == b"\r\n"
            response.body = body
        elif "content-length" in headers:
            response.body = self.take(int(headers["content-length"]))
        else:
            while self._fill():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the gateway closed the connection (nothing more buffered or sent)."""
        if self.buffer:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def upstream_headers(response: Response) -> dict[str, str]:
    """Headers the AppBackend's /echo saw, lowercase names."""
    return {name.lower(): value for name, value in response.json()["headers"]}


def get(path: str, host: str = "example.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[ResponseReader]:
    sock = gateway.connect()
    yield ResponseReader(sock)
    sock.close()


# -- raw upstreams and a gateway of our own --------------------------------------------------------


def _after_head(reply: bytes) -> Callable[[bytes], bytes | None]:
    """A RawBackend responder sending ``reply`` once a whole request head arrived."""

    def responder(buffer: bytes) -> bytes | None:
        return reply if b"\r\n\r\n" in buffer else None

    return responder


RAW_REPLIES: dict[str, tuple[bytes, bool]] = {
    # HTTP/1.0-style response with no length: the body ends when the connection closes.
    "close-delimited": (
        b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nbody until close, no length",
        True,
    ),
    # RFC 8297 103 Early Hints, then the final response.
    "early-hints": (
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
        False,
    ),
    # Chunked with a chunk extension and a trailer section (RFC 9112 §7.1.1, §7.1.2).
    "trailers": (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n",
        False,
    ),
    # Both framings at once: a response-splitting attempt (RFC 9112 §6.3 item 3).
    "cl-and-te": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        False,
    ),
    # Two different lengths: invalid framing (RFC 9112 §6.3 item 5) -> 502.
    "two-lengths": (
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello",
        False,
    ),
    # The upstream closes after a response that says so; the client's connection is not its.
    "upstream-close": (
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        True,
    ),
    # 101 to a request that asked for no upgrade: the upstream is broken (RFC 9110 §15.2.2).
    "bogus-101": (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        False,
    ),
    # Hop-by-hop response fields that must not reach the client (RFC 9110 §7.6.1).
    "hop": (
        b"HTTP/1.1 200 OK\r\n"
        b"connection: x-hop-private, keep-alive\r\n"
        b"x-hop-private: secret\r\n"
        b"keep-alive: timeout=5, max=100\r\n"
        b"proxy-connection: keep-alive\r\n"
        b"upgrade: h2c\r\n"
        b"trailer: x-checksum\r\n"
        b"x-end-to-end: kept\r\n"
        b"content-length: 2\r\n\r\nok",
        False,
    ),
}


@pytest.fixture(scope="module")
def raw_upstreams() -> Iterator[dict[str, RawBackend]]:
    backends = {
        name: RawBackend(_after_head(reply), close_after=close_after)
        for name, (reply, close_after) in RAW_REPLIES.items()
    }
    yield backends
    for backend in backends.values():
        backend.close()


@pytest.fixture(scope="module")
def semantics_gateway(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    raw_upstreams: dict[str, RawBackend],
) -> Iterator[GatewayProcess]:
    upstreams: dict[str, Any] = {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}}
    routes: list[dict[str, Any]] = []
    for name, backend in raw_upstreams.items():
        upstreams[name] = {"instances": [f"127.0.0.1:{backend.port}"]}
        routes.append({"name": name, "match": {"path": {"prefix": f"/{name}"}}, "upstream": name})
    routes += [
        {
            "name": "host-rewrite",
            "match": {"path": {"prefix": "/echo/host-rewrite"}},
            "upstream": "app",
            "rewrite": {"host": "upstream.internal"},
        },
        {
            "name": "strip",
            "match": {"path": {"prefix": "/strip"}},
            "upstream": "app",
            "rewrite": {"strip_prefix": "/strip"},
        },
        {
            "name": "strip-and-prefix",
            "match": {"path": {"prefix": "/pfx"}},
            "upstream": "app",
            "rewrite": {"strip_prefix": "/pfx", "prefix": "/echo/mounted"},
        },
        {
            "name": "regex",
            "match": {"path": {"prefix": "/old"}},
            "upstream": "app",
            "rewrite": {
                "strip_prefix": "/old",
                "regex": r"^/items/([0-9]+)/details$",
                "replacement": r"/echo/items/\1",
            },
        },
    ]
    process = start_gateway({"upstreams": upstreams, "routes": routes})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def trusted_gateway(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> GatewayProcess:
    return start_gateway(
        {
            "trusted_proxies": ["127.0.0.0/8"],
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "app", "match": {"path": {"prefix": "/"}}, "upstream": "app"}],
        }
    )


# -- connection management -------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(client: ResponseReader) -> None:
    for index in range(5):
        client.sock.sendall(get(f"/echo/keepalive?n={index}"))
        response = client.read()
        assert response.status == 200
        assert response.json()["path"] == f"/echo/keepalive?n={index}"
        assert "close" not in response.headers.get("connection", "")


def test_pipelined_requests_are_answered_in_order(client: ResponseReader) -> None:
    body = os.urandom(3000)
    client.sock.sendall(
        get("/echo/pipe?n=1")
        + b"POST /echo/pipe?n=2 HTTP/1.1\r\nHost: example.test\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
        + get("/echo/pipe?n=3")
    )
    first, second, third = client.read(), client.read(), client.read()
    assert [first.status, second.status, third.status] == [200, 200, 200]
    assert first.json()["path"] == "/echo/pipe?n=1"
    assert first.json()["method"] == "GET"
    assert second.json()["path"] == "/echo/pipe?n=2"
    assert second.json()["method"] == "POST"
    assert second.json()["body_size"] == len(body)
    assert second.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert third.json()["path"] == "/echo/pipe?n=3"
    assert third.json()["body_size"] == 0
    # The connection is still usable after the pipeline drained.
    client.sock.sendall(get("/echo/pipe?n=4"))
    assert client.read().json()["path"] == "/echo/pipe?n=4"


def test_http10_client_gets_readable_response_and_close(client: ResponseReader) -> None:
    client.sock.sendall(b"GET /echo/http10 HTTP/1.0\r\nHost: example.test\r\n\r\n")
    response = client.read()
    assert response.status == 200
    assert "transfer-encoding" not in response.headers
    assert response.json()["path"] == "/echo/http10"
    assert client.closed(), "HTTP/1.0 without keep-alive: the gateway must close (RFC 9112 §9.3)"


def test_http10_client_never_gets_chunked_encoding(client: ResponseReader) -> None:
    # The upstream streams a chunked body; an HTTP/1.0 client cannot decode chunked
    # (RFC 9112 §7), so the gateway must send it close-delimited (or with a length).
    client.sock.sendall(b"GET /stream/100000 HTTP/1.0\r\nHost: example.test\r\n\r\n")
    response = client.read()
    assert response.status == 200
    assert "transfer-encoding" not in response.headers
    assert len(response.body) == 100000
    assert client.closed()


def test_http10_keep_alive_keeps_the_connection(client: ResponseReader) -> None:
    for index in range(2):
        client.sock.sendall(
            b"GET /echo/http10ka?n=%d HTTP/1.0\r\nHost: example.test\r\n"
            b"Connection: keep-alive\r\n\r\n" % index
        )
        response = client.read()
        assert response.status == 200
        assert "transfer-encoding" not in response.headers
        assert "content-length" in response.headers
        assert response.headers.get("connection", "").lower() == "keep-alive"
        assert response.json()["path"] == f"/echo/http10ka?n={index}"
    assert not client.closed(timeout=0.2)


def test_pipelined_responses_keep_order_behind_a_slow_one(client: ResponseReader) -> None:
    client.sock.sendall(get("/slow?delay=0.2") + get("/echo/behind-slow?n=2"))
    first, second = client.read(), client.read()
    assert first.body == b"slow\n"
    assert second.json()["path"] == "/echo/behind-slow?n=2"


def test_client_connection_close_is_honoured(client: ResponseReader) -> None:
    client.sock.sendall(get("/echo/conn-close", extra="Connection: close\r\n"))
    response = client.read()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert "connection" not in upstream_headers(response)  # our own hop decides upstream
    assert client.closed()


def test_http10_request_with_body(client: ResponseReader) -> None:
    client.sock.sendall(
        b"POST /echo/http10-body HTTP/1.0\r\nHost: example.test\r\n"
        b"Content-Length: 11\r\n\r\nhello world"
    )
    response = client.read()
    assert response.json()["body_size"] == 11
    assert response.json()["version"] == "1.1"  # the gateway speaks HTTP/1.1 upstream
    assert client.closed()


def test_upstream_closing_its_connection_does_not_close_the_client(
    semantics_gateway: GatewayProcess, raw_upstreams: dict[str, RawBackend]
) -> None:
    backend = raw_upstreams["upstream-close"]
    reader = ResponseReader(semantics_gateway.connect())
    try:
        for index in range(3):
            reader.sock.sendall(get(f"/upstream-close?n={index}"))
            response = reader.read()
            assert (response.status, response.body) == (200, b"ok")
            assert "close" not in response.headers.get("connection", "")
    finally:
        reader.sock.close()
    assert backend.connections >= 3  # never reused after it said close (RFC 9112 §9.6)


# -- request bodies --------------------------------------------------------------------------------


def test_content_length_request_body_reaches_upstream(client: ResponseReader) -> None:
    body = os.urandom(200_000)
    client.sock.sendall(
        b"PUT /echo/cl HTTP/1.1\r\nHost: example.test\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    client.sock.sendall(body)
    response = client.read()
    assert response.status == 200
    echoed = response.json()
    assert echoed["method"] == "PUT"
    assert echoed["body_size"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_reaches_upstream(
    client: ResponseReader, app_backend: AppBackend
) -> None:
    pieces = [os.urandom(size) for size in (1, 1000, 70_000, 17)]
    client.sock.sendall(
        b"POST /echo/chunked HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for piece in pieces:
        client.sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
    client.sock.sendall(b"0\r\n\r\n")
    response = client.read()
    assert response.status == 200
    body = b"".join(pieces)
    assert response.json()["body_size"] == len(body)
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    seen = next(r for r in reversed(app_backend.requests) if r["path"] == "/echo/chunked")
    assert seen["headers"].get("transfer-encoding") == "chunked"
    assert "content-length" not in seen["headers"]


def test_chunked_request_with_extensions_and_trailers(client: ResponseReader) -> None:
    client.sock.sendall(
        b"POST /echo/chunk-ext HTTP/1.1\r\nHost: example.test\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
        + get("/echo/after-trailers")
    )
    response = client.read()
    assert response.json()["body_size"] == 11
    assert response.json()["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert client.read().json()["path"] == "/echo/after-trailers"


# -- response framing ------------------------------------------------------------------------------


def test_content_length_response(client: ResponseReader) -> None:
    client.sock.sendall(get("/bytes/123456"))
    response = client.read()
    assert response.status == 200
    assert response.headers["content-length"] == "123456"
    assert len(response.body) == 123456


def test_chunked_response_is_streamed(client: ResponseReader) -> None:
    client.sock.sendall(get("/stream/300000"))
    response = client.read()
    assert response.status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert len(response.body) == 300000
    assert response.body[:16] == b"0123456789abcdef"
    client.sock.sendall(get("/echo/after-stream"))
    assert client.read().json()["path"] == "/echo/after-stream"


def test_close_delimited_response_is_rechunked_for_http11_client(
    semantics_gateway: GatewayProcess,
) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        # Pipelined: the second response can only be found if the first was re-framed.
        reader.sock.sendall(get("/close-delimited") + get("/close-delimited?again=1"))
        for _ in range(2):
            response = reader.read()
            assert response.status == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            assert response.body == b"body until close, no length"
        # Re-framed, the client connection did not need to close.
        assert not reader.closed(timeout=0.2)
    finally:
        reader.sock.close()


def test_chunked_response_with_trailers_is_well_framed(
    semantics_gateway: GatewayProcess,
) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get("/trailers") + get("/trailers?again=1"))
        assert reader.read().body == b"hello world"
        assert reader.read().body == b"hello world"
    finally:
        reader.sock.close()


def test_response_with_content_length_and_chunked_is_not_smuggled(
    semantics_gateway: GatewayProcess,
) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get("/cl-and-te"))
        response = reader.read()
        if response.status == 200:
            # Forwarded: then only as chunked, Content-Length removed (RFC 9112 §6.3 item 3).
            assert "content-length" not in response.headers
            assert response.body == b"hello"
        else:
            assert response.status == 502
    finally:
        reader.sock.close()


def test_unsolicited_101_is_502(semantics_gateway: GatewayProcess) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get("/bogus-101"))
        assert reader.read().status == 502
    finally:
        reader.sock.close()


def test_response_with_conflicting_lengths_is_502(semantics_gateway: GatewayProcess) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get("/two-lengths"))
        assert reader.read().status == 502
    finally:
        reader.sock.close()


def test_close_delimited_response_to_http10_client(semantics_gateway: GatewayProcess) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(b"GET /close-delimited HTTP/1.0\r\n\r\n")
        response = reader.read()
        assert "transfer-encoding" not in response.headers
        assert response.body == b"body until close, no length"
        assert reader.closed()
    finally:
        reader.sock.close()


# -- bodiless responses, 100-continue, 1xx ---------------------------------------------------------


def test_head_has_headers_but_no_body_and_connection_stays_usable(
    client: ResponseReader,
) -> None:
    client.sock.sendall(
        b"HEAD /bytes/4321 HTTP/1.1\r\nHost: example.test\r\n\r\n" + get("/echo/after-head")
    )
    head = client.read(no_body=True)
    assert head.status == 200
    assert head.headers["content-length"] == "4321"  # what a GET would carry (RFC 9110 §9.3.2)
    nxt = client.read()
    assert nxt.status == 200, "bytes after the HEAD response must be the next response"
    assert nxt.json()["path"] == "/echo/after-head"


@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body(client: ResponseReader, code: int) -> None:
    client.sock.sendall(get(f"/status/{code}") + get(f"/echo/after-{code}"))
    response = client.read()
    assert response.status == code
    assert "transfer-encoding" not in response.headers
    if code == 204:
        assert "content-length" not in response.headers  # RFC 9110 §8.6
    nxt = client.read()
    assert nxt.json()["path"] == f"/echo/after-{code}"


def test_expect_100_continue(client: ResponseReader) -> None:
    body = b"x" * 5000
    client.sock.sendall(
        b"POST /echo/expect HTTP/1.1\r\nHost: example.test\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
    )
    # The body is held back until the upstream's interim answer came through the gateway.
    interim = client.read()
    assert interim.status == 100
    client.sock.sendall(body)
    final = client.read()
    assert final.status == 200
    assert final.json()["body_size"] == len(body)
    assert final.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_1xx_interim_response_is_relayed_before_final(
    semantics_gateway: GatewayProcess,
) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get("/early-hints"))
        interim = reader.read()
        assert interim.status == 103
        assert interim.headers["link"] == "</style.css>; rel=preload"
        final = reader.read()
        assert final.status == 200
        assert final.body == b"final"
        reader.sock.sendall(get("/early-hints?again=1"))
        assert reader.read().status == 103
        assert reader.read().body == b"final"
    finally:
        reader.sock.close()


def test_head_of_a_chunked_resource(client: ResponseReader) -> None:
    client.sock.sendall(
        b"HEAD /stream/5000 HTTP/1.1\r\nHost: example.test\r\n\r\n" + get("/echo/after-head2")
    )
    head = client.read(no_body=True)
    assert head.status == 200
    assert client.read().json()["path"] == "/echo/after-head2"


def test_no_1xx_to_http10_client(semantics_gateway: GatewayProcess) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(b"GET /early-hints HTTP/1.0\r\n\r\n")
        response = reader.read()
        assert response.status == 200  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
        assert response.body == b"final"
    finally:
        reader.sock.close()


# -- hop-by-hop headers ----------------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_not_forwarded(client: ResponseReader) -> None:
    client.sock.sendall(
        get(
            "/echo/hop",
            extra=(
                "Connection: keep-alive, X-Hop-Private\r\n"
                "X-Hop-Private: secret\r\n"
                "Keep-Alive: timeout=5\r\n"
                "TE: trailers\r\n"
                "Trailer: X-Checksum\r\n"
                "Proxy-Connection: keep-alive\r\n"
                "Upgrade: h2c\r\n"
                "X-End-To-End: kept\r\n"
            ),
        )
    )
    response = client.read()
    assert response.status == 200
    seen = upstream_headers(response)
    for name in ("x-hop-private", "keep-alive", "te", "trailer", "proxy-connection", "upgrade"):
        assert name not in seen, f"{name} was forwarded upstream"
    assert "x-hop-private" not in seen.get("connection", "").lower()
    assert seen["x-end-to-end"] == "kept"


def test_hop_by_hop_response_headers_are_not_forwarded(
    semantics_gateway: GatewayProcess,
) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get("/hop"))
        response = reader.read()
        assert response.status == 200
        names = {name for name, _ in response.header_list}
        for name in ("x-hop-private", "keep-alive", "proxy-connection", "upgrade", "trailer"):
            assert name not in names, f"{name} reached the client"
        assert "x-hop-private" not in response.headers.get("connection", "")
        assert response.headers["x-end-to-end"] == "kept"
        assert response.body == b"ok"
    finally:
        reader.sock.close()


# -- forwarding headers and request ids ------------------------------------------------------------

SPOOFED = (
    "X-Forwarded-For: 203.0.113.7\r\n"
    "X-Forwarded-Proto: https\r\n"
    "X-Forwarded-Host: spoofed.example\r\n"
    "Forwarded: for=203.0.113.7;proto=https;host=spoofed.example\r\n"
)


def test_forwarding_headers_are_set_from_the_connection(client: ResponseReader) -> None:
    client.sock.sendall(get("/echo/fwd", host="front.example:8080"))
    seen = upstream_headers(client.read())
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "front.example:8080"
    assert seen["forwarded"] == 'for=127.0.0.1;proto=http;host="front.example:8080"'


def test_spoofed_forwarding_headers_are_replaced_from_untrusted_peer(
    client: ResponseReader,
) -> None:
    client.sock.sendall(get("/echo/spoof", extra=SPOOFED))
    seen = upstream_headers(client.read())
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "example.test"
    assert seen["forwarded"] == "for=127.0.0.1;proto=http;host=example.test"
    assert "203.0.113.7" not in json.dumps(seen)


def test_forwarding_headers_are_extended_from_trusted_proxy(
    trusted_gateway: GatewayProcess,
) -> None:
    reader = ResponseReader(trusted_gateway.connect())
    try:
        reader.sock.sendall(get("/echo/trusted", extra=SPOOFED))
        seen = upstream_headers(reader.read())
    finally:
        reader.sock.close()
    assert seen["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "spoofed.example"
    # RFC 7239 §4: our element is appended after the trusted earlier ones.
    assert seen["forwarded"] == (
        "for=203.0.113.7;proto=https;host=spoofed.example, "
        "for=127.0.0.1;proto=http;host=example.test"
    )


def test_request_id_is_generated_and_returned(
    client: ResponseReader, app_backend: AppBackend
) -> None:
    ids = []
    for index in range(2):
        client.sock.sendall(get(f"/echo/rid?n={index}"))
        response = client.read()
        request_id = response.headers["x-request-id"]
        assert request_id
        assert upstream_headers(response)["x-request-id"] == request_id
        ids.append(request_id)
    assert ids[0] != ids[1]


def test_request_id_is_propagated(client: ResponseReader) -> None:
    client.sock.sendall(get("/echo/rid-given", extra="X-Request-ID: client-id-42\r\n"))
    response = client.read()
    assert response.headers["x-request-id"] == "client-id-42"
    assert upstream_headers(response)["x-request-id"] == "client-id-42"
    assert list(upstream_headers(response)).count("x-request-id") == 1


@pytest.mark.parametrize("given", ["has space", "x" * 300, "tab\there"])
def test_invalid_request_id_is_replaced(client: ResponseReader, given: str) -> None:
    client.sock.sendall(get("/echo/rid-invalid", extra=f"X-Request-ID: {given}\r\n"))
    response = client.read()
    request_id = response.headers["x-request-id"]
    assert request_id != given
    assert upstream_headers(response)["x-request-id"] == request_id


# -- Host and rewrites -----------------------------------------------------------------------------


def test_host_is_preserved_by_default(client: ResponseReader) -> None:
    client.sock.sendall(get("/echo/host", host="Public.Example:8443"))
    assert upstream_headers(client.read())["host"] == "Public.Example:8443"


def test_absolute_form_target_sets_host_and_path(client: ResponseReader) -> None:
    # RFC 9112 §3.2.2: the authority of an absolute-form target replaces the Host header.
    client.sock.sendall(get("http://absolute.example:81/echo/abs?x=1", host="ignored.example"))
    response = client.read()
    assert response.json()["path"] == "/echo/abs?x=1"
    assert upstream_headers(response)["host"] == "absolute.example:81"


def test_rewrite_host(semantics_gateway: GatewayProcess) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get("/echo/host-rewrite?q=1", host="public.example"))
        response = reader.read()
    finally:
        reader.sock.close()
    echoed = response.json()
    seen = upstream_headers(response)
    assert echoed["path"] == "/echo/host-rewrite?q=1"
    assert seen["host"] == "upstream.internal"
    # X-Forwarded-Host / Forwarded host= carry the host the client asked for (RFC 7239 §5.3).
    assert seen["x-forwarded-host"] == "public.example"
    assert seen["forwarded"] == "for=127.0.0.1;proto=http;host=public.example"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/strip/echo/a/b?x=1&y=2", "/echo/a/b?x=1&y=2"),
        ("/strip?x=1", "/?x=1"),
        ("/pfx/users/7?sort=asc", "/echo/mounted/users/7?sort=asc"),
        ("/old/items/42/details?full=yes", "/echo/items/42?full=yes"),
    ],
)
def test_path_rewrites_reach_upstream(
    semantics_gateway: GatewayProcess, target: str, expected: str
) -> None:
    reader = ResponseReader(semantics_gateway.connect())
    try:
        reader.sock.sendall(get(target))
        response = reader.read()
    finally:
        reader.sock.close()
    assert response.status == 200
    assert response.json()["path"] == expected
