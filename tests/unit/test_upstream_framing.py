"""UpstreamConnection's response validation, fed raw bytes with exact read boundaries.

The integration tests (tests/integration/test_upstream_validation.py) cannot choose how the
kernel splits an upstream's writes into reads; these feed ``data_received`` directly, one call
per read, with a recording stand-in for the client side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.metrics import GatewayMetrics
from gateway.proxy.upstream import (
    CHUNK_FRAMING_ALLOWANCE,
    MAX_CHUNK_FRAMING_BYTES,
    MAX_RESPONSE_FRAMING_BYTES,
    MAX_RESPONSE_HEAD_BYTES,
    InstancePool,
    UpstreamConnection,
)

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass
class FakeExchange:
    upstream_name: str = "u"


@dataclass
class FakeServer:
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)


class FakeOwner:
    """The try a connection is lent to and the client side it reports to, in one (what the
    connection calls ``owner`` and ``owner.client``); records what it is told."""

    def __init__(self) -> None:
        self.server = FakeServer()
        self.active = FakeExchange()
        self.conn: UpstreamConnection | None = None
        self.heads: list[int] = []
        self.body = b""
        self.completed = 0
        self.failed: list[str] = []
        self.lost = 0
        self.status = 0

    @property
    def client(self) -> FakeOwner:
        return self

    def on_response_head(self, attempt: FakeOwner, status: int, head: Any, ka: bool) -> None:
        self.heads.append(status)
        self.status = status
        if status >= 200:
            assert attempt.conn is not None
            attempt.conn.reusable = ka

    def on_response_body(self, attempt: FakeOwner, body: bytes) -> None:
        self.body += body

    def on_response_message_complete(self, attempt: FakeOwner) -> None:
        if self.status < 200:
            return  # a 1xx ended; the listener waits for the final response
        self.completed += 1
        conn = attempt.conn
        assert conn is not None
        conn.pool.release(conn)  # what the listener does with a finished exchange

    def on_response_complete(self, attempt: FakeOwner) -> None:
        self.completed += 1

    def on_upstream_failed(self, attempt: FakeOwner, conn: UpstreamConnection, reason: str) -> None:
        self.failed.append(reason)

    def on_upstream_lost(
        self, attempt: FakeOwner, conn: UpstreamConnection, exc: Exception | None
    ) -> None:
        self.lost += 1

    def flush_to_client(self) -> None:
        pass

    def bind_pool(self, pool: InstancePool) -> None:
        pool.bind_metrics(self.server.metrics, self.active.upstream_name)


def connect(head_only: bool = False) -> tuple[UpstreamConnection, FakeOwner, InstancePool]:
    pool = InstancePool("127.0.0.1", 9, max_idle=8, idle_timeout=60.0, connect_timeout=1.0)
    conn = UpstreamConnection(pool)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    owner = FakeOwner()
    owner.conn = conn
    conn.begin_exchange(owner, head_only)  # type: ignore[arg-type]
    return conn, owner, pool


def errors(pool: InstancePool) -> dict[str, int]:
    assert pool.metrics is not None
    return {reason: n for (_, reason), n in pool.metrics.upstream_protocol_errors.items()}


def feed(conn: UpstreamConnection, reads: list[bytes]) -> None:
    for data in reads:
        if conn.transport is None or conn.transport.is_closing():
            break
        conn.data_received(data)


def chunk(data: bytes, extension: bytes = b"") -> bytes:
    return b"%x%b\r\n%b\r\n" % (len(data), extension, data)


# -- RFC 9112 §6.3 / §9.3: nothing may follow a complete response ----------------------------------

# (name, reads, head_only, expected heads, body, reusable afterwards, protocol errors)
AFTER_RESPONSE_CASES = [
    ("content-length, exact", [OK], False, [200], b"hello", True, {}),
    (
        "content-length split over reads",
        [OK[:20], OK[20:40], OK[40:]],
        False,
        [200],
        b"hello",
        True,
        {},
    ),
    (
        "second response in the same read",
        [OK + b"HTTP/1.1 302 Found\r\ncontent-length: 0\r\n\r\n"],
        False,
        [200],
        b"hello",
        False,
        {"data_after_response": 1},
    ),
    (
        "partial head in the same read",
        [OK + b"HTTP/1.1 200 OK\r\ncont"],
        False,
        [200],
        b"hello",
        False,
        {"data_after_response": 1},
    ),
    (
        "partial body in the same read",
        [OK + b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc"],
        False,
        [200],
        b"hello",
        False,
        {"data_after_response": 1},
    ),
    (
        "garbage in the same read",
        [OK + b"X"],
        False,
        [200],
        b"hello",
        False,
        {"data_after_response": 1},
    ),
    # RFC 9110 §15.2: 1xx before the final response are fine, after it they are leftovers.
    (
        "1xx then final",
        [b"HTTP/1.1 100 Continue\r\n\r\n" + OK],
        False,
        [100, 200],
        b"hello",
        True,
        {},
    ),
    (
        "103 then final, split",
        [b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n", OK],
        False,
        [103, 200],
        b"hello",
        True,
        {},
    ),
    (
        "1xx after final",
        [OK + b"HTTP/1.1 100 Continue\r\n\r\n"],
        False,
        [200],
        b"hello",
        False,
        {"data_after_response": 1},
    ),
    # llhttp skips CR/LF between messages (RFC 9112 §2.2 allows it before a request line):
    # they carry nothing, so the connection stays usable.
    ("bare CRLF after response", [OK + b"\r\n"], False, [200], b"hello", True, {}),
    (
        "connection: close then data",
        [b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nokX"],
        False,
        [200],
        b"ok",
        False,
        {"data_after_response": 1},
    ),
    (
        "204 then data",
        [b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"],
        False,
        [204],
        b"",
        False,
        {"data_after_response": 1},
    ),
    (
        "chunked then second response",
        [CHUNKED_HEAD + chunk(b"hello") + b"0\r\n\r\n" + OK],
        False,
        [200],
        b"hello",
        False,
        {"data_after_response": 1},
    ),
    # RFC 9110 §9.3.2: a response to HEAD ends at its head, whatever Content-Length says.
    (
        "HEAD, head only",
        [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"],
        True,
        [200],
        b"",
        True,
        {},
    ),
    ("HEAD, body bytes after the head", [OK], True, [200], b"", False, {"data_after_response": 1}),
]


@pytest.mark.parametrize(
    ("reads", "head_only", "heads", "body", "reusable", "counted"),
    [case[1:] for case in AFTER_RESPONSE_CASES],
    ids=[case[0] for case in AFTER_RESPONSE_CASES],
)
def test_bytes_after_a_complete_response(
    reads: list[bytes],
    head_only: bool,
    heads: list[int],
    body: bytes,
    reusable: bool,
    counted: dict[str, int],
) -> None:
    conn, owner, pool = connect(head_only)
    feed(conn, reads)
    assert owner.heads == heads  # no head of a message nobody asked for reached the client side
    assert owner.body == body
    assert owner.completed == 1 and owner.failed == []
    assert (conn in pool.idle) is reusable
    assert conn.transport is not None and conn.transport.is_closing() is not reusable
    assert errors(pool) == counted


def test_bytes_while_idle_close_the_connection() -> None:
    conn, _, pool = connect()
    feed(conn, [OK])
    assert conn in pool.idle
    conn.data_received(b"HTTP/1.1 302 Found\r\n")
    assert conn.transport is not None and conn.transport.is_closing()
    assert errors(pool) == {"data_after_response": 1}


def test_reused_connection_parses_the_next_response() -> None:
    conn, owner, pool = connect()
    feed(conn, [OK])
    assert pool.acquire() is conn
    conn.begin_exchange(owner, False)  # type: ignore[arg-type]
    feed(conn, [b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"])
    assert owner.heads == [200, 200] and owner.body == b"helloabc" and owner.completed == 2


# -- RFC 9112 §7.1: chunked framing, malformed or beyond the limits -------------------------------

LIMIT = MAX_CHUNK_FRAMING_BYTES
_SMALL_EXT = b";e=" + b"x" * 1500  # within the per-chunk bound, adds up over many chunks

# (name, reads, accepted)
CHUNKED_CASES = [
    ("plain", [CHUNKED_HEAD + chunk(b"hello") + chunk(b"world") + b"0\r\n\r\n"], True),
    (
        "small extension and trailer",
        [CHUNKED_HEAD + chunk(b"hello", b";a=b") + b"0\r\nx-t: 1\r\n\r\n"],
        True,
    ),
    (
        "one chunk per read",
        [CHUNKED_HEAD, *(chunk(b"x" * 100) for _ in range(2000)), b"0\r\n\r\n"],
        True,
    ),
    (
        "extension at the per-chunk bound",
        [CHUNKED_HEAD + chunk(b"hello", b";" + b"e" * (LIMIT - 1)) + b"0\r\n\r\n"],
        True,
    ),
    (
        "extension over the per-chunk bound, one read",
        [
            CHUNKED_HEAD
            + chunk(b"hello", b";" + b"e" * (LIMIT + 2 * CHUNK_FRAMING_ALLOWANCE))
            + b"0\r\n\r\n"
        ],
        False,
    ),
    # Body moves in both reads around the extension: still charged to one chunk.
    (
        "extension split over two reads with body on both sides",
        [
            CHUNKED_HEAD + chunk(b"hello") + b"3;" + b"e" * (LIMIT // 2 + 100),
            b"e" * (LIMIT // 2 + 100) + b"\r\nabc\r\n0\r\n\r\n",
        ],
        False,
    ),
    (
        "extension dripping in without body",
        [CHUNKED_HEAD + b"5;"] + [b"e" * 500] * 20 + [b"\r\nhello\r\n0\r\n\r\n"],
        False,
    ),
    (
        "trailer over the bound",
        [CHUNKED_HEAD + chunk(b"hello") + b"0\r\nx-t: " + b"t" * (LIMIT + 100) + b"\r\n\r\n"],
        False,
    ),
    (
        "extensions under the per-response bound",
        [CHUNKED_HEAD, *(chunk(b"x", _SMALL_EXT) for _ in range(30)), b"0\r\n\r\n"],
        True,
    ),
    (
        "extensions over the per-response bound",
        [
            CHUNKED_HEAD,
            *(chunk(b"x", _SMALL_EXT) for _ in range(MAX_RESPONSE_FRAMING_BYTES // 1500 + 2)),
            b"0\r\n\r\n",
        ],
        False,
    ),
    ("invalid chunk size", [CHUNKED_HEAD + chunk(b"hello") + b"zz\r\n"], False),
    ("no CRLF after chunk data", [CHUNKED_HEAD + b"5\r\nhelloXY"], False),
    (
        "chunk size line split, then invalid",
        [CHUNKED_HEAD + b"5", b"\r\nhello\r\n", b"-1\r\n"],
        False,
    ),
]


@pytest.mark.parametrize(
    ("reads", "accepted"),
    [case[1:] for case in CHUNKED_CASES],
    ids=[case[0] for case in CHUNKED_CASES],
)
def test_chunked_framing(reads: list[bytes], accepted: bool) -> None:
    conn, owner, pool = connect()
    feed(conn, reads)
    assert owner.heads == [200]
    if accepted:
        assert owner.completed == 1 and owner.failed == []
        assert conn in pool.idle
        assert errors(pool) == {}
    else:
        assert owner.completed == 0 and len(owner.failed) == 1
        assert conn not in pool.idle
        assert conn.transport is not None and conn.transport.is_closing()
        assert errors(pool) == {"chunk_framing": 1}


# -- heads ---------------------------------------------------------------------------------------

HEAD_CASES = [
    ("not HTTP", [b"garbage\r\n\r\n"], "invalid_response"),
    ("bad status", [b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n"], "invalid_response"),
    (
        "head too large",
        [b"HTTP/1.1 200 OK\r\n", b"x-a: " + b"a" * MAX_RESPONSE_HEAD_BYTES],
        "response_head_too_large",
    ),
]


@pytest.mark.parametrize(
    ("reads", "reason"), [c[1:] for c in HEAD_CASES], ids=[c[0] for c in HEAD_CASES]
)
def test_invalid_response_heads(reads: list[bytes], reason: str) -> None:
    conn, owner, pool = connect()
    feed(conn, reads)
    assert owner.heads == [] and len(owner.failed) == 1 and owner.completed == 0
    assert conn.transport is not None and conn.transport.is_closing()
    assert errors(pool) == {reason: 1}


def test_close_delimited_body_reset_is_not_a_complete_response() -> None:
    # RFC 9112 §6.3 item 8: a body without framing ends when the connection closes; a reset is
    # a truncation, not an end.
    for exc, completed, lost in ((None, 1, 0), (ConnectionResetError(), 0, 1)):
        conn, owner, _ = connect()
        feed(conn, [b"HTTP/1.1 200 OK\r\n\r\nsome body"])
        conn.body_until_close = True  # what the listener sets for a response without framing
        conn.connection_lost(exc)
        assert (owner.completed, owner.lost) == (completed, lost)
