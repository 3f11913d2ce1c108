"""Sans-IO: the client goes away at each phase of an exchange.

Whatever the phase, every counter the exchange took (active requests, the breaker's requests
and pending connects) goes back to zero, and the upstream connection is pooled only when it is
between exchanges: one that carried part of this exchange is closed, never reused.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.dataplane_harness import (
    HANG,
    NOTHING_IN_FLIGHT,
    Client,
    Harness,
    PendingConnect,
    UpstreamEnd,
    config,
    request,
    response,
)

INSTANCES = ("10.0.0.1:80", "10.0.0.2:80")

NONE = "none"  # no upstream connection was ever used
POOLED = "pooled"  # the connection is idle in its pool, reusable
CLOSED = "closed"  # the connection was closed or aborted

Phase = Callable[[Harness, Client], None]


def _head_incomplete(h: Harness, c: Client) -> None:
    c.send(b"GET /slow HTTP/1.1\r\nHost: gw.test\r\n")


def _queued_behind_another(h: Harness, c: Client) -> None:
    c.send(request("GET", "/first") + request("GET", "/second"))
    assert c.reading_paused


def _waiting_for_head(h: Harness, c: Client) -> None:
    c.send(request())
    assert h.upstream().request_head()


def _uploading_body(h: Harness, c: Client) -> None:
    c.send(request("PUT", "/u", headers=(("Content-Length", "100"),)) + b"part")
    assert h.upstream().received().endswith(b"part")


def _mid_response_body(h: Harness, c: Client) -> None:
    c.send(request())
    h.upstream().respond(response(200, b"", headers=(("Content-Length", "100"),)) + b"some")
    assert c.received().endswith(b"some")


def _after_100_continue(h: Harness, c: Client) -> None:
    c.send(request("PUT", "/u", headers=(("Content-Length", "4"), ("Expect", "100-continue"))))
    h.upstream().respond(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert c.received().startswith(b"HTTP/1.1 100 Continue\r\n")


def _waiting_for_retry(h: Harness, c: Client) -> None:
    c.send(request())
    h.upstream().respond(response(503, b"busy"))  # retried after a backoff
    assert c.responses() == []


def _hedged(h: Harness, c: Client) -> None:
    c.send(request())
    h.advance(0.06)
    assert len(h.upstream_ends) == 2


def _hedge_connecting(h: Harness, c: Client) -> None:
    h.default_connect = HANG
    c.send(request())
    h.pending_connects()[0].accept()
    h.advance(0.06)
    assert len(h.pending_connects()) == 1  # the hedge's connection is being opened


def _between_requests(h: Harness, c: Client) -> None:
    c.send(request())
    h.upstream().respond(response())
    assert [r.status for r in c.responses()] == [200]


PHASES: list[tuple[str, Phase, str, str, int | None]] = [
    # (id, phase, upstream YAML, fate of the upstream connections, status recorded)
    ("before-dispatch", _head_incomplete, "", NONE, None),
    ("queued-behind-another", _queued_behind_another, "", CLOSED, 499),
    ("waiting-for-response-head", _waiting_for_head, "", CLOSED, 499),
    ("uploading-request-body", _uploading_body, "", CLOSED, 499),
    ("after-100-continue", _after_100_continue, "", CLOSED, 499),
    ("mid-response-body", _mid_response_body, "", CLOSED, 499),
    ("waiting-for-a-retry", _waiting_for_retry, "", CLOSED, 499),
    ("hedged", _hedged, "hedge: {after: 50ms}", CLOSED, 499),
    ("hedge-connecting", _hedge_connecting, "hedge: {after: 50ms}", CLOSED, 499),
    ("between-requests", _between_requests, "", POOLED, 200),
]


@pytest.mark.parametrize("how", ["fin", "reset"])
@pytest.mark.parametrize(
    ("phase", "upstream", "fate", "status"),
    [case[1:] for case in PHASES],
    ids=[case[0] for case in PHASES],
)
def test_client_disconnect(
    phase: Phase, upstream: str, fate: str, status: int | None, how: str
) -> None:
    with Harness(config(instances=INSTANCES, upstream=upstream)) as h:
        c = h.client()
        phase(h, c)
        used = list(h.upstream_ends)
        if how == "fin":
            c.disconnect()
        else:
            c.reset()
        h.advance(1.0)  # any retry or hedge timer would fire now
        assert h.upstream_ends == used, "no new upstream work for a client that is gone"
        if fate == NONE:
            assert used == []
        elif fate == POOLED:
            assert used and all(u.pooled for u in used)
        else:
            assert used and all(u.closed and not u.pooled for u in used)
        for pending in h.pending_connects():
            pending.refuse()  # a connect still under way settles later
        h.run()
        assert h.in_flight() == NOTHING_IN_FLIGHT
        recorded = h.statuses()
        if status == 499:
            assert recorded.get(499) == 1, "an abandoned exchange is counted as 499"
        elif status is not None:
            assert recorded == {status: 1}
        else:
            assert recorded == {}


@pytest.mark.parametrize("outcome", ["accept", "refuse", "time-out"])
def test_connect_settling_after_the_client_left(outcome: str) -> None:
    # The connection the client no longer needs is clean (never carried a byte): pooled.
    with Harness(config(upstream="timeouts: {connect: 1s}")) as h:
        h.default_connect = HANG
        c = h.client()
        c.send(request())
        [pending] = h.pending_connects()
        c.disconnect()
        assert h.statuses() == {499: 1}
        assert h.in_flight()["breaker_pending"] == 1  # until the connect settles
        assert h.in_flight()["breaker_requests"] == 0
        settle(h, pending, outcome)
        h.run()
        assert h.in_flight() == NOTHING_IN_FLIGHT
        if outcome == "accept":
            u = h.upstream()
            assert u.received() == b""
            assert u.pooled
            assert h.idle_count("10.0.0.1:80") == 1
        else:
            assert h.upstream_ends == []


@pytest.mark.parametrize("outcome", ["accept", "refuse", "time-out", "never"])
def test_client_leaving_while_connecting_gives_back_its_instance_slot(outcome: str) -> None:
    with Harness(config(upstream="timeouts: {connect: 1s}")) as h:
        h.default_connect = HANG
        c = h.client()
        c.send(request())
        [pending] = h.pending_connects()
        assert h.in_flight()["active_requests"] == 1
        c.disconnect()
        assert h.in_flight()["active_requests"] == 0
        if outcome == "accept":
            pending.accept()
        elif outcome == "refuse":
            pending.refuse()
        elif outcome == "time-out":
            h.advance(1.1)
        h.run()
        assert h.in_flight()["active_requests"] == 0  # never given back twice (not -1)
        if outcome != "never":
            assert h.in_flight() == NOTHING_IN_FLIGHT


def settle(h: Harness, pending: PendingConnect, outcome: str) -> UpstreamEnd | None:
    if outcome == "accept":
        return pending.accept()
    if outcome == "refuse":
        pending.refuse()
    else:
        h.advance(1.1)
    return None
