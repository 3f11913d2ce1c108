"""Sans-IO: a finished exchange is freed by reference counting alone.

An exchange and its tries point at each other while it runs (``Exchange.attempt`` and the
attempt's exchange); if that cycle outlived the exchange, every request would leave garbage for
the cyclic collector, whose gen0 passes then cost the hot path (docs/instructions.md). So the
cycle tests run with the collector off and assert that the exchange is gone once it ended,
however it ended. They count the live ``Exchange`` objects the collector tracks (a compiled,
native exchange supports no weak references, but it is tracked until it is freed). The last
test keeps a plain GET's or POST's exchange within CPython's inline fields.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest

from gateway import compiled
from gateway.proxy.exchange import Exchange
from tests.unit.dataplane_harness import (
    HANG,
    Client,
    Harness,
    config,
    request,
    response,
)

INSTANCES = ("10.0.0.1:80", "10.0.0.2:80")
PAST_HEDGE_DELAY = 0.06
RETRY_WAIT = 0.3  # longer than the retry backoff's cap (0.25 s)


def live_exchanges() -> int:
    """The ``Exchange`` objects that exist (the collector tracks every one, compiled or not)."""
    return sum(1 for tracked in gc.get_objects() if type(tracked) is Exchange)


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def answered(h: Harness, c: Client) -> None:
    h.upstream().respond(response(200, b"ok"))
    assert [r.status for r in c.responses()] == [200]


def hedge_wins(h: Harness, c: Client) -> None:
    first = h.upstream()
    h.advance(PAST_HEDGE_DELAY)
    hedge = h.upstream()
    assert hedge is not first
    hedge.respond(response(200, b"hedge"))
    assert [r.body for r in c.responses()] == [b"hedge"]


def first_wins_the_race(h: Harness, c: Client) -> None:
    first = h.upstream()
    h.advance(PAST_HEDGE_DELAY)
    first.respond(response(200, b"first"))
    assert [r.body for r in c.responses()] == [b"first"]


def retried(h: Harness, c: Client) -> None:
    h.upstream().reset()
    h.advance(RETRY_WAIT)
    h.upstream().respond(response(200, b"second"))
    assert [r.body for r in c.responses()] == [b"second"]


def upstream_refused(h: Harness, c: Client) -> None:
    [connect] = h.pending_connects()
    connect.refuse()
    assert [r.status for r in c.responses()] == [502]


def client_gone(h: Harness, c: Client) -> None:
    c.reset()
    assert h.statuses() == {499: 1}


def upstream_lost_mid_body(h: Harness, c: Client) -> None:
    end = h.upstream()
    end.respond(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
    end.reset()
    assert c.aborted


ENDINGS: dict[str, tuple[str, str, Callable[[Harness, Client], None]]] = {
    # name: (upstream settings, connect policy, how the exchange ends)
    "answered": ("", "", answered),
    "hedge_wins": ("hedge: {after: 50ms}", "", hedge_wins),
    "first_wins_the_race": ("hedge: {after: 50ms}", "", first_wins_the_race),
    "retried": ("", "", retried),
    "upstream_refused": ("retry: {attempts: 1}", HANG, upstream_refused),
    "client_gone": ("", "", client_gone),
    "upstream_lost_mid_body": ("", "", upstream_lost_mid_body),
}


@pytest.mark.usefixtures("no_cyclic_gc")
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_finished_exchange_leaves_no_reference_cycle(ending: str) -> None:
    upstream, connect, end = ENDINGS[ending]
    with Harness(config(instances=INSTANCES, upstream=upstream)) as h:
        if connect:
            h.default_connect = connect
        c = h.client()
        before = live_exchanges()
        c.send(request("GET", "/"))
        assert live_exchanges() == before + 1
        end(h, c)
        h.advance(1.0)  # timers of the ended exchange (hedge delay, backoff) fall due or go
        assert live_exchanges() == before, "the finished exchange lives on in a cycle"


@pytest.mark.usefixtures("no_cyclic_gc")
def test_keep_alive_requests_on_a_pooled_connection_leave_no_cycle() -> None:
    """The hot path: each request of a keep-alive client on the same pooled connection."""
    with Harness(config(instances=INSTANCES[:1])) as h:
        [end] = h.pooled(INSTANCES[0])
        c = h.client()
        before = live_exchanges()
        for n in range(1, 4):
            c.send(request("GET", f"/{n}"))
            assert live_exchanges() == before + 1
            assert h.upstream() is end
            end.respond(response(200, b"ok"))
            assert len(c.responses()) == n
            assert live_exchanges() == before


@pytest.mark.parametrize(
    ("method", "body"), [("GET", b""), ("POST", b"x" * 1024)], ids=["get", "post"]
)
def test_a_plain_exchange_sets_few_enough_fields_for_inline_values(
    method: str, body: bytes
) -> None:
    """CPython 3.11 keeps at most 29 fields of a class's objects inline (the first objects fix
    which); past that every exchange gets a dict, which slows each of its field accesses."""
    if compiled.module_modes()["gateway.proxy.exchange"] == "compiled":
        # (make test's pure-mode pass runs it)
        pytest.skip("a compiled Exchange is a C struct: it has no fields dict to keep small")
    with Harness(config(instances=INSTANCES[:1])) as h:
        [end] = h.pooled(INSTANCES[0])
        c = h.client()
        c.send(request(method, "/", body=body))
        exchange = c.exchange()
        end.respond(response(200, b"ok"))
        assert [r.status for r in c.responses()] == [200]
        assert len(vars(exchange)) <= 29, sorted(vars(exchange))
