"""Sans-IO: keep-alive, pipelining and backpressure of one client connection.

Bytes in, bytes out, through ``tests/unit/dataplane_harness.py`` (fake transports, fake clock).
"""

from __future__ import annotations

import pytest

from tests.unit.dataplane_harness import (
    HANG,
    NOTHING_IN_FLIGHT,
    Harness,
    config,
    request,
    response,
)

INSTANCE = "10.0.0.1:80"


# -- keep-alive ------------------------------------------------------------------------------
# RFC 9112 §9.3: HTTP/1.1 connections persist unless "close" is sent; an HTTP/1.0 connection
# persists only with "Connection: keep-alive", which the response then carries.
@pytest.mark.parametrize(
    ("version", "headers", "keeps_open", "connection_header"),
    [
        ("1.1", (), True, None),
        ("1.1", (("Connection", "close"),), False, b"close"),
        ("1.1", (("Connection", "Close"),), False, b"close"),
        ("1.0", (), False, b"close"),
        ("1.0", (("Connection", "keep-alive"),), True, b"keep-alive"),
    ],
    ids=["1.1-default", "1.1-close", "1.1-Close", "1.0-default", "1.0-keep-alive"],
)
def test_keep_alive_follows_the_request(
    version: str,
    headers: tuple[tuple[str, str], ...],
    keeps_open: bool,
    connection_header: bytes | None,
) -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(request("GET", "/a", version=version, headers=headers))
        u = h.upstream()
        u.respond(response(200, b"first"))
        [answer] = c.responses()
        assert answer.status == 200
        assert answer.body == b"first"
        assert answer.header(b"connection") == connection_header
        assert c.closed is not keeps_open
        # The upstream side is independent of the client's choice: its connection is pooled.
        assert u.pooled
        if keeps_open:
            c.send(request("GET", "/b", version=version, headers=headers))
            assert h.upstream() is u, "the pooled connection is reused"
            assert u.received().count(b"GET /b HTTP/1.1\r\n") == 1
            u.respond(response(200, b"second"))
            assert [r.body for r in c.responses()] == [b"first", b"second"]
            assert not c.closed
        h.run()
        assert h.in_flight()["active_requests"] == 0
        assert h.in_flight()["breaker_requests"] == 0


@pytest.mark.parametrize(
    ("upstream_headers", "pooled"),
    [
        ((), True),
        ((("Connection", "close"),), False),
    ],
    ids=["upstream-keep-alive", "upstream-close"],
)
def test_upstream_connection_close_is_not_pooled_and_client_stays(
    upstream_headers: tuple[tuple[str, str], ...], pooled: bool
) -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(response(200, b"x", headers=upstream_headers))
        [answer] = c.responses()
        assert answer.status == 200
        assert answer.header(b"connection") is None  # hop-by-hop: not relayed
        assert not c.closed
        assert u.pooled is pooled
        assert u.closed is not pooled
        assert h.idle_count(INSTANCE) == (1 if pooled else 0)


def test_close_delimited_response_is_rechunked_and_upstream_not_pooled() -> None:
    # RFC 9112 §6.3 item 8: no length, no chunking: the body ends when the upstream closes.
    # Toward an HTTP/1.1 client the gateway re-frames it as chunked and keeps the client.
    with Harness(config()) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(response(200, b"", length=False) + b"part one, ")
        u.respond(b"part two")
        assert b"part one, " in c.received()  # streamed as it came
        assert not c.received().endswith(b"0\r\n\r\n")  # the end is not known yet
        u.close()
        [answer] = c.responses()
        assert answer.header(b"transfer-encoding") == b"chunked"
        assert answer.body == b"part one, part two"
        assert not c.closed
        assert not u.pooled
        assert h.open_count(INSTANCE) == 0


def test_request_head_is_rewritten_for_the_upstream() -> None:
    with Harness(config()) as h:
        c = h.client(peer=("192.0.2.77", 41000))
        c.send(
            request(
                "GET",
                "/path?q=1",
                headers=(
                    ("Connection", "keep-alive, X-Hop"),
                    ("X-Hop", "secret"),
                    ("Keep-Alive", "timeout=5"),
                    ("Accept", "text/plain"),
                ),
            )
        )
        u = h.upstream()
        head = u.request_head()
        assert head.startswith(b"GET /path?q=1 HTTP/1.1\r\n")
        fields = u.request_headers()
        assert fields[b"host"] == b"gw.test"
        assert fields[b"x-forwarded-for"] == b"192.0.2.77"
        assert fields[b"x-forwarded-proto"] == b"http"
        assert fields[b"accept"] == b"text/plain"
        assert b"x-request-id" in fields
        # RFC 9110 §7.6.1: hop-by-hop fields, and those Connection names, are not forwarded.
        assert b"connection" not in fields
        assert b"keep-alive" not in fields
        assert b"x-hop" not in fields
        u.respond(response(200, b"ok"))
        [answer] = c.responses()
        assert answer.header(b"x-request-id") == fields[b"x-request-id"]


# -- pipelining ------------------------------------------------------------------------------
@pytest.mark.parametrize("in_one_read", [True, False], ids=["one-read", "separate-reads"])
def test_pipelined_requests_are_answered_in_order(in_one_read: bool) -> None:
    # RFC 9112 §9.3.2: responses go back in the order the requests came.
    paths = [b"/one", b"/two", b"/three"]
    with Harness(config()) as h:
        c = h.client()
        requests = [request("GET", p.decode()) for p in paths]
        if in_one_read:
            c.send(b"".join(requests))
        else:
            for raw in requests:
                c.send(raw)
        u = h.upstream()
        # One exchange at a time: only the first request is upstream; the client is not read
        # while requests wait their turn.
        assert u.received().count(b" HTTP/1.1\r\n") == 1
        assert u.request_head().startswith(b"GET /one ")
        assert c.reading_paused
        for number, path in enumerate(paths, start=1):
            assert u.received().count(b"GET " + path + b" HTTP/1.1\r\n") == 1
            u.respond(response(200, b"body of " + path))
            assert len(c.responses()) == number
        assert [r.body for r in c.responses()] == [b"body of " + p for p in paths]
        # Every request went over the one pooled connection, in order.
        assert [e for e in h.upstream_ends] == [u]
        sent = u.received()
        assert sent.index(b"/one ") < sent.index(b"/two ") < sent.index(b"/three ")
        assert not c.reading_paused
        assert not c.closed


def test_bytes_sent_while_reading_is_paused_are_read_afterwards() -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(request("GET", "/one") + request("GET", "/two"))
        assert c.reading_paused
        c.send(request("GET", "/three"))  # waits in the socket buffer
        u = h.upstream()
        for path in (b"/one", b"/two", b"/three"):
            assert u.received().endswith(b"\r\n\r\n")
            assert u.received().count(b"GET " + path + b" ") == 1
            u.respond(response(200, path))
        assert [r.body for r in c.responses()] == [b"/one", b"/two", b"/three"]


def test_pipelined_request_after_connection_close_is_not_served() -> None:
    # RFC 9112 §9.6: after a request with "close" the server closes; later requests are not
    # processed. (The second request comes in a later read.)
    with Harness(config()) as h:
        c = h.client()
        c.send(request("GET", "/one", headers=(("Connection", "close"),)))
        c.send(request("GET", "/two"))
        u = h.upstream()
        u.respond(response(200, b"one"))
        [answer] = c.responses()
        assert answer.body == b"one"
        assert answer.header(b"connection") == b"close"
        assert c.closed
        assert b"/two" not in u.received()
        h.run()
        assert h.in_flight() == NOTHING_IN_FLIGHT


def test_request_with_close_pipelined_in_one_read_is_still_served() -> None:
    # RFC 9112 §9.6, the bytes after the "close" request in the same read (llhttp stops there
    # with "Data after `Connection: close`"): the request is answered, the rest ignored.
    with Harness(config()) as h:
        c = h.client()
        c.send(request("GET", "/one", headers=(("Connection", "close"),)) + request("GET", "/two"))
        u = h.upstream()
        assert b"/two" not in u.received()
        u.respond(response(200, b"one"))
        [answer] = c.responses()
        assert (answer.status, answer.body) == (200, b"one")
        assert answer.header(b"connection") == b"close"
        assert c.closed
        h.run()
        assert len(h.connects) == 1
        assert h.in_flight() == NOTHING_IN_FLIGHT


CLOSE = (("Connection", "close"),)
# RFC 9112 §9.6: nothing after a request that ends the connection is processed, whatever it
# is: valid, malformed, or a body-framing trick meant to smuggle a request past the first
# one. (first request's raw bytes + what follows in the same read, upstream must see exactly
# the first request's body)
AFTER_CLOSE = [
    ("a second GET", request("GET", "/one", headers=CLOSE), request("GET", "/admin"), b""),
    ("garbage", request("GET", "/one", headers=CLOSE), b"\x00\x01 not HTTP at all\r\n\r\n", b""),
    (
        "a request line without Host",
        request("GET", "/one", headers=CLOSE),
        b"GET /admin HTTP/1.1\r\n\r\n",
        b"",
    ),
    (
        "an HTTP/1.0 request without keep-alive",
        request("GET", "/one", version="1.0"),
        request("GET", "/admin"),
        b"",
    ),
    (
        "bytes past a Content-Length body",
        request("POST", "/one", headers=CLOSE, body=b"hello"),
        b"GET /admin HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        b"hello",
    ),
    (
        "bytes past a chunked body",
        request("POST", "/one", headers=(*CLOSE, ("Transfer-Encoding", "chunked")))
        + b"5\r\nhello\r\n0\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "a second close request",
        request("GET", "/one", headers=CLOSE),
        request("GET", "/admin", headers=CLOSE),
        b"",
    ),
]


@pytest.mark.parametrize(
    ("first", "after", "body"),
    [case[1:] for case in AFTER_CLOSE],
    ids=[case[0] for case in AFTER_CLOSE],
)
@pytest.mark.parametrize("later_read", [False, True], ids=["same read", "later read"])
def test_bytes_after_a_close_request_never_reach_an_upstream(
    first: bytes, after: bytes, body: bytes, later_read: bool
) -> None:
    with Harness(config()) as h:
        c = h.client()
        if later_read:
            c.send(first)
            c.send(after)
        else:
            c.send(first + after)
        c.send(request("GET", "/admin-later"))  # and nothing read after it either
        u = h.upstream()
        head, _, sent_body = u.received().partition(b"\r\n\r\n")
        assert head.startswith(first.split(b" ", 1)[0] + b" /one ")
        assert sent_body == body
        u.respond(response(200, b"one"))
        [answer] = c.responses()
        assert (answer.status, answer.body) == (200, b"one")
        assert c.closed
        h.run()
        assert b"/admin" not in u.received()
        assert len(h.connects) == 1 and h.in_flight() == NOTHING_IN_FLIGHT


def test_bad_pipelined_request_is_answered_after_the_good_one() -> None:
    with Harness(config()) as h:
        c = h.client()
        # The second request lacks Host (RFC 9112 §3.2: 400) and arrives in a later read.
        c.send(request("GET", "/good"))
        c.send(request("GET", "/bad", host=None))
        u = h.upstream()
        assert b"/bad" not in u.received()
        u.respond(response(200, b"good"))
        first, second = c.responses()
        assert (first.status, first.body) == (200, b"good")
        assert second.status == 400
        assert second.header(b"connection") == b"close"
        assert c.closed


# -- backpressure ----------------------------------------------------------------------------
def test_client_pause_writing_pauses_the_upstream_read_and_resume_resumes() -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(response(200, b"", headers=(("Content-Length", "10"),)) + b"12345")
        assert not u.reading_paused
        c.pause_writing()
        assert u.reading_paused
        u.respond(b"67890")  # stays in the socket buffer while the gateway does not read
        assert c.responses() == []
        c.resume_writing()
        assert not u.reading_paused
        [answer] = c.responses()
        assert answer.body == b"1234567890"
        assert u.pooled
        assert not u.reading_paused  # a pooled connection must see the upstream's EOF


def test_client_paused_before_the_upstream_connects_starts_it_paused() -> None:
    with Harness(config()) as h:
        h.connect_policy[INSTANCE] = HANG
        c = h.client()
        c.send(request())
        c.pause_writing()
        u = h.pending_connects()[0].accept()
        assert u.reading_paused
        c.resume_writing()
        assert not u.reading_paused


def test_upstream_pause_writing_pauses_client_reading_and_resume_resumes() -> None:
    body = b"x" * 100
    with Harness(config()) as h:
        c = h.client()
        c.send(request("PUT", "/upload", headers=(("Content-Length", "100"),)) + body[:10])
        u = h.upstream()
        assert u.received().endswith(body[:10])
        u.pause_writing()
        assert c.reading_paused
        c.send(body[10:])  # waits: the gateway does not read the client now
        assert not u.received().endswith(body)
        u.resume_writing()
        assert not c.reading_paused
        assert u.received().endswith(body)
        u.respond(response(201, b"stored"))
        [answer] = c.responses()
        assert answer.status == 201


def test_body_waiting_for_a_connection_pauses_reading_past_its_limit() -> None:
    # The body read before the upstream is connected is buffered up to a bound, then the client
    # is no longer read until the connection takes it.
    size = 600 * 1024
    body = b"b" * size
    with Harness(config()) as h:
        h.connect_policy[INSTANCE] = HANG
        c = h.client()
        c.send(request("PUT", "/big", headers=(("Content-Length", str(size)),)))
        for start in range(0, size, 64 * 1024):
            c.send(body[start : start + 64 * 1024])
        assert c.reading_paused
        u = h.pending_connects()[0].accept()
        assert not c.reading_paused
        received = u.received()
        assert received[received.index(b"\r\n\r\n") + 4 :] == body
        u.respond(response(204, b""))
        assert c.responses()[0].status == 204


# -- framing across the two sides ------------------------------------------------------------
def test_head_response_body_is_not_read_and_the_next_request_follows() -> None:
    # RFC 9110 §9.3.2: a response to HEAD ends at its head, whatever Content-Length says.
    with Harness(config()) as h:
        c = h.client()
        c.send(request("HEAD", "/h") + request("GET", "/g"))
        u = h.upstream()
        u.respond(response(200, b"", headers=(("Content-Length", "1234"),)))
        assert u.received().count(b"GET /g HTTP/1.1\r\n") == 1
        u.respond(response(200, b"get body"))
        head, get = c.responses(head_requests=1)
        assert (head.status, head.header(b"content-length"), head.body) == (200, b"1234", b"")
        assert get.body == b"get body"
        assert u.pooled
        assert not c.closed


@pytest.mark.parametrize(
    ("version", "relayed"),
    [("1.1", True), ("1.0", False)],  # RFC 9110 §15.2: no 1xx to an HTTP/1.0 client
)
def test_interim_100_continue_is_relayed_to_http11_clients_only(
    version: str, relayed: bool
) -> None:
    with Harness(config()) as h:
        c = h.client()
        headers = (("Content-Length", "4"), ("Expect", "100-continue"))
        c.send(request("PUT", "/u", version=version, headers=headers))
        u = h.upstream()
        u.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert c.received().startswith(b"HTTP/1.1 100 Continue\r\n\r\n") is relayed
        c.send(b"data")
        assert u.received().endswith(b"\r\n\r\ndata")
        u.respond(response(201, b"made"))
        statuses = [r.status for r in c.responses()]
        assert statuses == ([100, 201] if relayed else [201])


def test_chunked_request_body_is_forwarded_chunked() -> None:
    with Harness(config()) as h:
        c = h.client()
        c.send(
            request("POST", "/c", headers=(("Transfer-Encoding", "chunked"),)) + b"5\r\nhello\r\n"
        )
        u = h.upstream()
        assert u.request_headers()[b"transfer-encoding"] == b"chunked"
        c.send(b"6\r\n world\r\n0\r\n\r\n")
        body = u.received()[len(u.request_head()) :]
        assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        u.respond(response(200, b"ok"))
        assert [r.status for r in c.responses()] == [200]
        assert u.pooled


@pytest.mark.parametrize(
    ("upstream_framing", "client_framing"),
    [
        ((("Content-Length", "11"),), b"content-length"),
        ((("Transfer-Encoding", "chunked"),), b"transfer-encoding"),
    ],
    ids=["content-length", "chunked"],
)
def test_response_framing_is_kept_toward_the_client(
    upstream_framing: tuple[tuple[str, str], ...], client_framing: bytes
) -> None:
    body = b"hello world"
    wire = b"b\r\nhello world\r\n0\r\n\r\n" if client_framing == b"transfer-encoding" else body
    with Harness(config()) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(response(200, wire, headers=upstream_framing))
        [answer] = c.responses()
        assert answer.body == body
        assert answer.header(client_framing) is not None
        assert u.pooled
