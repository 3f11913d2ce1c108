"""Sans-IO: the tries of one exchange (``UpstreamAttempt``): which try wins a hedge race, what
the losing try gives back, a retry after a failed try, and the client leaving while two tries
are in flight.

Two instances behind round robin; which one is tried first is the balancer's business, so the
tests name instances by the upstream end that saw the request.
"""

from __future__ import annotations

import pytest

from tests.unit.dataplane_harness import (
    HANG,
    NOTHING_IN_FLIGHT,
    Client,
    Harness,
    Try,
    UpstreamEnd,
    config,
    request,
    response,
)

INSTANCES = ("10.0.0.1:80", "10.0.0.2:80")
HEDGED = "hedge: {after: 50ms}"
PAST_HEDGE_DELAY = 0.06
RETRY_WAIT = 0.3  # longer than the retry backoff's cap (0.25 s)
HEAD_AND_HALF = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"


def two_instances(upstream: str = "") -> str:
    return config(instances=INSTANCES, upstream=upstream)


def racing(h: Harness) -> tuple[Client, UpstreamEnd, UpstreamEnd]:
    """A GET whose first try is slow enough to be hedged: (client, first try, hedge)."""
    c = h.client()
    c.send(request("GET", "/h"))
    first = h.upstream()
    h.advance(PAST_HEDGE_DELAY)
    return c, first, h.upstream()


def settle(h: Harness, client_connections: int = 0) -> None:
    h.run()
    assert h.in_flight() == dict(NOTHING_IN_FLIGHT, client_connections=client_connections)


def test_one_try_for_a_plain_request() -> None:
    with Harness(two_instances()) as h:
        c = h.client()
        c.send(request("GET", "/"))
        first = h.upstream()
        assert c.tries() == [Try(first.address, True, True, False)]
        first.respond(response(200, b"ok"))
        assert c.tries() == []
        assert h.active_requests(first.address) == 0
        c.disconnect()
        settle(h)


@pytest.mark.parametrize("winner", ["hedge", "first"])
def test_the_first_response_head_wins_and_the_loser_is_aborted(winner: str) -> None:
    with Harness(two_instances(HEDGED)) as h:
        c, first, hedge = racing(h)
        # While they race only the first try's read timer runs (the hedge is the remedy for a
        # slow first try, not a try of its own yet); both hold an instance slot.
        assert c.tries() == [
            Try(first.address, True, True, False),
            Try(hedge.address, True, False, True),
        ]
        assert h.active_requests(first.address) == h.active_requests(hedge.address) == 1
        won, lost = (hedge, first) if winner == "hedge" else (first, hedge)
        won.respond(HEAD_AND_HALF)
        # Decided at the head, while the body still streams: the loser is gone at once.
        assert c.tries() == [Try(won.address, True, True, False)]
        assert lost.aborted and not lost.pooled
        assert h.active_requests(lost.address) == 0
        assert h.active_requests(won.address) == 1
        won.respond(b"world")
        [answer] = c.responses()
        assert answer.body == b"helloworld"
        assert won.pooled
        assert c.tries() == []
        c.disconnect()
        settle(h)


def _reset_hedge(h: Harness, hedge_connect_refused: bool) -> None:
    if hedge_connect_refused:
        [connect] = h.pending_connects()
        connect.refuse()
    else:
        h.upstream().reset()


@pytest.mark.parametrize("hedge_connect_refused", [False, True], ids=["reset", "refused"])
def test_a_failed_hedge_leaves_the_first_try_alone(hedge_connect_refused: bool) -> None:
    with Harness(two_instances(HEDGED)) as h:
        c = h.client()
        c.send(request("GET", "/h"))
        first = h.upstream()
        if hedge_connect_refused:
            h.default_connect = HANG  # the hedge's connect is the test's to settle
        h.advance(PAST_HEDGE_DELAY)
        assert len(c.tries()) == 2
        _reset_hedge(h, hedge_connect_refused)
        assert c.tries() == [Try(first.address, True, True, False)]
        assert sum(h.active_requests(a) for a in INSTANCES) == 1
        assert c.responses() == []
        first.respond(response(200, b"first"))
        assert [r.body for r in c.responses()] == [b"first"]
        assert first.pooled
        c.disconnect()
        settle(h)


def test_a_read_timeout_of_the_first_try_hands_the_exchange_to_the_hedge() -> None:
    with Harness(two_instances(f"{HEDGED}, timeouts: {{read: 1s}}")) as h:
        c = h.client()
        c.send(request("GET", "/h"))
        first = h.upstream()
        h.advance(PAST_HEDGE_DELAY)
        hedge = h.upstream()
        h.advance(1.0)  # the first try's read deadline passes; the hedge's clock starts now
        assert first.aborted
        assert c.tries() == [Try(hedge.address, True, True, False)]
        assert c.responses() == []
        hedge.respond(response(200, b"hedge"))
        assert [r.body for r in c.responses()] == [b"hedge"]
        c.disconnect()
        settle(h)


def test_retry_after_a_failed_try_is_a_new_try_elsewhere() -> None:
    with Harness(two_instances()) as h:
        c = h.client()
        c.send(request("GET", "/r"))
        first = h.upstream()
        first.reset()
        # Waiting for the backoff: the failed try holds nothing (no connection, no slot).
        assert c.tries() == [Try("", False, False, False)]
        assert h.active_requests(first.address) == 0
        h.advance(RETRY_WAIT)
        second = h.upstream()
        assert second.address != first.address
        assert c.tries() == [Try(second.address, True, True, False)]
        assert second.request_head() == first.request_head()
        second.respond(response(200, b"second"))
        assert [r.body for r in c.responses()] == [b"second"]
        assert h.retries() == {"reset": 1}
        c.disconnect()
        settle(h)


@pytest.mark.parametrize("how", ["disconnect", "reset"])
def test_client_gone_with_two_tries_in_flight(how: str) -> None:
    with Harness(two_instances(HEDGED)) as h:
        c, first, hedge = racing(h)
        assert len(c.tries()) == 2
        if how == "disconnect":
            c.disconnect()
        else:
            c.reset()
        assert first.aborted and hedge.aborted
        assert not first.pooled and not hedge.pooled
        assert h.active_requests(first.address) == h.active_requests(hedge.address) == 0
        assert h.statuses() == {499: 1}
        h.advance(PAST_HEDGE_DELAY)  # nothing fires for the gone exchange
        assert len(h.upstream_ends) == 2
        settle(h)
