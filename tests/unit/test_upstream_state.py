"""The upstream connection's explicit state (gateway/proxy/upstream.py, CONNECTING … CLOSED),
driven through real response bytes with a fake transport and the fake client side of
test_upstream_framing."""

from __future__ import annotations

import pytest

from gateway.proxy.upstream import (
    CLOSED,
    CONNECTING,
    IDLE,
    READING_BODY,
    STATE_NAMES,
    WAITING_HEAD,
    InstancePool,
    UpstreamConnection,
)
from tests.unit.test_upstream_framing import FakeTransport, connect, feed

HEAD_ONLY = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"

# (name, reads, head_only, state after the reads, reusable, body_until_close)
CASES = [
    ("nothing yet", [], False, "WAITING_HEAD", True, False),
    ("head split", [b"HTTP/1.1 200 OK\r\ncontent-"], False, "WAITING_HEAD", True, False),
    ("head, body pending", [HEAD_ONLY, b"he"], False, "READING_BODY", True, False),
    # RFC 9110 §15.2: a 1xx is not the response; the final head is still awaited.
    ("interim only", [b"HTTP/1.1 100 Continue\r\n\r\n"], False, "WAITING_HEAD", True, False),
    ("complete, pooled", [HEAD_ONLY + b"hello"], False, "IDLE", True, False),
    # RFC 9110 §9.3.2: a response to HEAD ends at its head, whatever Content-Length says.
    ("HEAD answered", [HEAD_ONLY], True, "IDLE", True, False),
    # RFC 9112 §6.3 item 8: no Content-Length, not chunked: the body ends at close.
    ("close-delimited", [b"HTTP/1.1 200 OK\r\n\r\nsome"], False, "READING_BODY", False, True),
    ("204 has no body", [b"HTTP/1.1 204 No Content\r\n\r\n"], False, "IDLE", True, False),
    (
        "connection: close",
        [b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"],
        False,
        "CLOSED",
        False,
        False,
    ),
    ("garbage", [b"NOT HTTP\r\n\r\n"], False, "CLOSED", False, False),
    (
        "bytes after the response",
        [HEAD_ONLY + b"helloHTTP/1.1 200 OK\r\n\r\n"],
        False,
        "CLOSED",
        False,
        False,
    ),
]


@pytest.mark.parametrize(
    ("reads", "head_only", "state", "reusable", "until_close"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_state_after_reads(
    reads: list[bytes], head_only: bool, state: str, reusable: bool, until_close: bool
) -> None:
    conn, _, _ = connect(head_only)
    feed(conn, reads)
    assert STATE_NAMES[conn.state] == state
    assert (conn.reusable, conn.body_until_close) == (reusable, until_close)


def test_lifecycle_from_connecting_to_closed() -> None:
    pool = InstancePool("127.0.0.1", 9, max_idle=8, idle_timeout=60.0, connect_timeout=1.0)
    conn = UpstreamConnection(pool)
    assert conn.state == CONNECTING
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    assert conn.state == IDLE and pool.open_count == 1
    conn2, owner, _ = connect()
    assert conn2.state == WAITING_HEAD
    feed(conn2, [HEAD_ONLY])
    assert conn2.state == READING_BODY and owner.heads == [200]
    conn2.discard()
    assert conn2.state == CLOSED and conn2.owner is None
    conn.connection_lost(None)
    assert conn.state == CLOSED and pool.open_count == 0
