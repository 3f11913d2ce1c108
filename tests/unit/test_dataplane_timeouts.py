"""Sans-IO: every timeout of the data plane, on the fake clock.

Client side (``limits``): header_timeout, client_body_timeout, send_timeout, keepalive_timeout.
Upstream side (``upstreams.NAME.timeouts``): connect, read, idle; and the route's ``timeout``.
Deadlines are checked by a sweep every 0.1 s, so each test steps just short of a deadline
(nothing happens) and then past it by more than a tick.
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
TICK_MARGIN = 0.25  # past a deadline by more than the sweep's period
NO_RETRY = "retry: {attempts: 1}"


def settled(h: Harness) -> None:
    h.run()
    assert h.in_flight() == NOTHING_IN_FLIGHT


# -- client side -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"", None),  # nothing at all: closed quietly
        (b"GE", None),  # not even a target yet: aborted quietly
        (b"GET /slow HTTP/1.1\r\n", 408),
        (b"GET /slow HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ", 408),
    ],
    ids=["nothing", "method-only", "request-line", "mid-header"],
)
def test_header_timeout(sent: bytes, status: int | None) -> None:
    # The first head must arrive within header_timeout, however slowly it trickles (slowloris).
    with Harness(config(limits="header_timeout: 2s, keepalive_timeout: 60s")) as h:
        c = h.client()
        if sent:
            c.send(sent)
        h.advance(2.0 - TICK_MARGIN)
        assert not c.closed
        h.advance(2 * TICK_MARGIN)
        assert c.closed
        if status is None:
            assert c.received() == b""
        else:
            [answer] = c.responses()
            assert answer.status == status
            assert answer.header(b"connection") == b"close"
            assert h.client_timeouts() == {"header": 1}
        assert h.upstream_ends == []
        settled(h)


def test_header_timeout_counts_from_the_start_of_each_later_head() -> None:
    with Harness(config(limits="header_timeout: 2s, keepalive_timeout: 60s")) as h:
        c = h.client()
        c.send(request())
        h.upstream().respond(response())
        h.advance(30)  # idle between requests: the keep-alive timeout applies, not this one
        c.send(b"GET /next HTTP/1.1\r\n")
        h.advance(2.0 - TICK_MARGIN)
        assert not c.closed
        h.advance(2 * TICK_MARGIN)
        assert [r.status for r in c.responses()] == [200, 408]
        assert c.closed


def test_body_timeout_answers_408_and_aborts_the_upstream_exchange() -> None:
    with Harness(config(limits="client_body_timeout: 3s")) as h:
        c = h.client()
        c.send(request("PUT", "/u", headers=(("Content-Length", "100"),)) + b"x" * 10)
        u = h.upstream()
        assert u.received().endswith(b"x" * 10)
        h.advance(2.0)
        c.send(b"y" * 10)  # every body read re-arms the timer
        h.advance(3.0 - TICK_MARGIN)
        assert c.responses() == []
        h.advance(2 * TICK_MARGIN)
        [answer] = c.responses()
        assert answer.status == 408
        assert b"client_body_timeout" in answer.body
        assert c.closed
        assert u.aborted, "the upstream saw half a body: that exchange cannot go on"
        assert h.client_timeouts() == {"body": 1}
        assert h.retries() == {}
        settled(h)


def test_body_timeout_waits_while_the_upstream_does_not_take_the_body() -> None:
    # Reading paused by backpressure: the client is not the slow one, so no 408; the upstream
    # read timeout runs instead.
    cfg = config(limits="client_body_timeout: 3s", upstream=f"timeouts: {{read: 10s}}, {NO_RETRY}")
    with Harness(cfg) as h:
        c = h.client()
        c.send(request("PUT", "/u", headers=(("Content-Length", "100"),)) + b"x" * 10)
        u = h.upstream()
        u.pause_writing()
        h.advance(10.0 - TICK_MARGIN)
        assert c.responses() == []
        h.advance(2 * TICK_MARGIN)
        [answer] = c.responses()
        assert answer.status == 504
        assert h.client_timeouts() == {}


def test_send_timeout_drops_a_client_that_does_not_read() -> None:
    with Harness(config(limits="send_timeout: 5s")) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(response(200, b"", headers=(("Content-Length", "1000"),)) + b"z" * 100)
        c.pause_writing()
        assert u.reading_paused
        h.advance(5.0 - TICK_MARGIN)
        assert not c.closed
        h.advance(2 * TICK_MARGIN)
        assert c.aborted
        assert u.aborted, "the upstream connection is mid-response: not reusable"
        assert h.client_timeouts() == {"send": 1}
        settled(h)


def test_send_timeout_does_not_fire_once_the_client_reads_again() -> None:
    with Harness(config(limits="send_timeout: 5s")) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(response(200, b"", headers=(("Content-Length", "10"),)) + b"z" * 5)
        c.pause_writing()
        h.advance(4.0)
        c.resume_writing()
        h.advance(4.0)
        assert not c.closed
        u.respond(b"z" * 5)
        assert [r.body for r in c.responses()] == [b"z" * 10]


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_keepalive_timeout_closes_an_idle_client(version: str) -> None:
    headers = (("Connection", "keep-alive"),) if version == "1.0" else ()
    with Harness(config(limits="keepalive_timeout: 7s")) as h:
        c = h.client()
        c.send(request(version=version, headers=headers))
        h.upstream().respond(response())
        assert [r.status for r in c.responses()] == [200]
        h.advance(7.0 - TICK_MARGIN)
        assert not c.closed
        h.advance(2 * TICK_MARGIN)
        assert c.closed
        assert not c.aborted, "an idle close is a clean close"
        settled(h)


def test_keepalive_timeout_is_not_applied_during_an_exchange() -> None:
    cfg = config(limits="keepalive_timeout: 2s", upstream="timeouts: {read: 30s}")
    with Harness(cfg) as h:
        c = h.client()
        c.send(request())
        h.advance(10.0)  # the upstream thinks; the client waits
        assert not c.closed
        h.upstream().respond(response())
        assert [r.status for r in c.responses()] == [200]


# -- upstream side ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("retry", "tries"),
    [(NO_RETRY, 1), ("retry: {attempts: 2}", 2)],
    ids=["no-retry", "retried-then-504"],
)
def test_upstream_connect_timeout(retry: str, tries: int) -> None:
    with Harness(config(upstream=f"timeouts: {{connect: 500ms}}, {retry}")) as h:
        h.default_connect = HANG
        c = h.client()
        c.send(request())
        for _ in range(tries):
            assert len(h.pending_connects()) == 1
            h.advance(0.5 + 0.01)
        [answer] = c.responses()
        assert answer.status == 504
        assert b"upstream connect timeout" in answer.body
        assert len(h.connects) == tries
        assert h.pending_connects() == []
        assert c.closed
        settled(h)


def test_upstream_read_timeout_before_the_response_head() -> None:
    with Harness(config(upstream=f"timeouts: {{read: 2s}}, {NO_RETRY}")) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        h.advance(2.0 - TICK_MARGIN)
        assert c.responses() == []
        h.advance(2 * TICK_MARGIN)
        [answer] = c.responses()
        assert answer.status == 504
        assert b"upstream read timeout" in answer.body
        assert answer.header(b"connection") == b"close"
        assert u.aborted
        assert c.closed
        settled(h)


def test_upstream_read_timeout_mid_body_cuts_the_client() -> None:
    with Harness(config(upstream=f"timeouts: {{read: 2s}}, {NO_RETRY}")) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(response(200, b"", headers=(("Content-Length", "10"),)) + b"half!")
        h.advance(1.5)
        u.respond(b"mo")  # body bytes re-arm the read timer
        h.advance(2.0 - TICK_MARGIN)
        assert not c.closed
        h.advance(2 * TICK_MARGIN)
        assert c.received().endswith(b"half!mo")
        assert c.aborted, "a started response cannot be replaced: the client is cut"
        assert u.aborted
        settled(h)


def test_upstream_read_timer_starts_only_once_the_request_is_sent() -> None:
    # A slow client's upload is not the upstream's slowness (docs/slow-clients.md).
    cfg = config(limits="client_body_timeout: 60s", upstream=f"timeouts: {{read: 2s}}, {NO_RETRY}")
    with Harness(cfg) as h:
        c = h.client()
        c.send(request("PUT", "/u", headers=(("Content-Length", "4"),)) + b"ab")
        u = h.upstream()
        h.advance(5.0)
        assert c.responses() == []
        c.send(b"cd")
        h.advance(2.0 - TICK_MARGIN)
        assert c.responses() == []
        h.advance(2 * TICK_MARGIN)
        assert [r.status for r in c.responses()] == [504]
        assert u.received().endswith(b"abcd")


def test_upstream_idle_timeout_closes_pooled_connections() -> None:
    with Harness(config(upstream="timeouts: {idle: 5s}")) as h:
        [pooled] = h.pooled(INSTANCE)
        h.advance(5.0 - TICK_MARGIN)
        assert pooled.pooled
        h.advance(2 * TICK_MARGIN)
        assert pooled.closed
        assert not pooled.pooled
        assert h.open_count(INSTANCE) == 0


def test_upstream_idle_timeout_counts_from_the_last_use() -> None:
    with Harness(config(upstream="timeouts: {idle: 5s}")) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        h.advance(4.0)
        u.respond(response())
        h.advance(4.0)
        assert u.pooled
        h.advance(1.0 + TICK_MARGIN)
        assert u.closed


# -- route timeout ---------------------------------------------------------------------------
def test_route_timeout_bounds_the_whole_exchange_and_is_not_retried() -> None:
    cfg = config(
        instances=("10.0.0.1:80", "10.0.0.2:80"),
        upstream="timeouts: {read: 30s}, retry: {attempts: 3}",
        route="timeout: 1s",
    )
    with Harness(cfg) as h:
        c = h.client()
        c.send(request())
        u = h.upstream()
        h.advance(1.0 - TICK_MARGIN)
        assert c.responses() == []
        h.advance(2 * TICK_MARGIN)
        [answer] = c.responses()
        assert answer.status == 504
        assert b"route timeout exceeded" in answer.body
        assert u.aborted
        assert h.upstream_ends == [u]
        assert h.retries() == {}
        c.disconnect()
        settled(h)


def test_route_timeout_while_the_body_is_still_coming_blames_the_client() -> None:
    cfg = config(limits="client_body_timeout: 60s", route="timeout: 1s")
    with Harness(cfg) as h:
        c = h.client()
        c.send(request("PUT", "/u", headers=(("Content-Length", "10"),)) + b"abc")
        h.advance(1.0 + TICK_MARGIN)
        [answer] = c.responses()
        assert answer.status == 408
        assert c.closed
        assert h.client_timeouts() == {"body": 1}
        settled(h)


def test_route_timeout_also_ends_a_retry_in_progress() -> None:
    cfg = config(
        instances=("10.0.0.1:80", "10.0.0.2:80"),
        upstream="retry: {attempts: 3, per_try_timeout: 600ms}",
        route="timeout: 1s",
    )
    with Harness(cfg) as h:
        c = h.client()
        c.send(request())
        first = h.upstream()
        h.advance(0.6 + TICK_MARGIN)
        second = h.upstream()
        assert second is not first, "the per-try timeout started a retry"
        assert first.aborted
        assert c.responses() == []
        h.advance(0.4)
        [answer] = c.responses()
        assert answer.status == 504
        assert b"route timeout exceeded" in answer.body
        assert second.aborted
        assert h.upstream_ends == [first, second]
        settled(h)


def test_no_retry_that_would_outlast_the_route_timeout() -> None:
    # The 503 asks for a 1 s pause (Retry-After, within the gateway's cap); the route has less
    # left than that, so the 503 goes to the client at once.
    cfg = config(instances=("10.0.0.1:80", "10.0.0.2:80"), route="timeout: 800ms")
    with Harness(cfg) as h:
        c = h.client()
        c.send(request())
        first = h.upstream()
        first.respond(response(503, b"busy", headers=(("Retry-After", "1"),)))
        [answer] = c.responses()
        assert (answer.status, answer.body) == (503, b"busy")
        assert h.upstream_ends == [first]
        assert h.retries() == {}
        c.disconnect()
        settled(h)
