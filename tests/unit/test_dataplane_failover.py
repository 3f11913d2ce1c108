"""Sans-IO: retries (each condition), the stale-connection replay, and hedging.

Two instances behind round robin; which one is tried first is the balancer's business, so the
tests only ask that a retry or a hedge goes to the other one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.dataplane_harness import (
    HANG,
    NOTHING_IN_FLIGHT,
    Harness,
    UpstreamEnd,
    config,
    request,
    response,
)

INSTANCES = ("10.0.0.1:80", "10.0.0.2:80")
RETRY_WAIT = 0.3  # longer than the retry backoff's cap (0.25 s)


def two_instances(upstream: str = "", route: str = "") -> str:
    return config(instances=INSTANCES, upstream=upstream, route=route)


def settle(h: Harness) -> None:
    h.run()
    assert h.in_flight() == NOTHING_IN_FLIGHT


# Each way a first try can fail before a response byte reached the client. ``fail`` acts on
# the harness once the first try's connection was opened (or is being opened, for connect
# failures, where the harness refuses it).
def _reset(h: Harness, first: UpstreamEnd) -> None:
    first.reset()


def _close(h: Harness, first: UpstreamEnd) -> None:
    first.close()


def _status(status: int, *headers: tuple[str, str]) -> Callable[[Harness, UpstreamEnd], None]:
    def fail(h: Harness, first: UpstreamEnd) -> None:
        first.respond(response(status, b"try again", headers=headers))

    fail.complete_response = True  # type: ignore[attr-defined]
    return fail


def _silence(h: Harness, first: UpstreamEnd) -> None:
    h.advance(1.05)  # per_try_timeout (1s) passes on the fake clock


RETRY_CASES = [
    # (id, method, headers, upstream YAML, failure, retried, reason counted, status otherwise)
    ("reset-GET", "GET", (), "", _reset, True, "reset", 502),
    ("close-GET", "GET", (), "", _close, True, "reset", 502),
    ("reset-POST", "POST", (), "", _reset, False, None, 502),
    ("reset-POST-idempotency-key", "POST", (("Idempotency-Key", "k1"),), "", _reset, True,
     "reset", 502),
    ("reset-POST-allowed", "POST", (), "retry: {allow_non_idempotent: true}", _reset, True,
     "reset", 502),
    ("503-default-policy", "GET", (), "", _status(503), True, "503", 503),
    ("502-POST", "POST", (), "", _status(502), False, None, 502),
    ("500-not-in-retry-on", "GET", (), "", _status(500), False, None, 500),
    ("500-in-retry-on", "GET", (), "retry: {on: [500]}", _status(500), True, "500", 500),
    ("429-in-retry-on", "GET", (), "retry: {on: [429]}", _status(429), True, "429", 429),
    # RFC 9110 §10.2.3: a Retry-After longer than the gateway waits: the 503 goes through.
    ("503-long-retry-after", "GET", (), "", _status(503, ("Retry-After", "30")), False, None,
     503),
    ("503-short-retry-after", "GET", (), "", _status(503, ("Retry-After", "0")), True, "503",
     503),
    ("timeout-GET", "GET", (), "retry: {per_try_timeout: 1s}", _silence, True, "timeout", 504),
    ("timeout-not-in-retry-on", "GET", (), "retry: {per_try_timeout: 1s, on: [reset]}",
     _silence, False, None, 504),
    ("attempts-1", "GET", (), "retry: {attempts: 1}", _reset, False, None, 502),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "headers", "upstream", "fail", "retried", "reason", "status"),
    [case[1:] for case in RETRY_CASES],
    ids=[case[0] for case in RETRY_CASES],
)
def test_retry_condition(
    method: str,
    headers: tuple[tuple[str, str], ...],
    upstream: str,
    fail: Callable[[Harness, UpstreamEnd], None],
    retried: bool,
    reason: str | None,
    status: int,
) -> None:
    with Harness(two_instances(upstream)) as h:
        c = h.client()
        c.send(request(method, "/r", headers=headers))
        first = h.upstream()
        assert first.request_head().startswith(method.encode() + b" /r HTTP/1.1\r\n")
        fail(h, first)
        h.advance(RETRY_WAIT)
        if retried:
            # Its response is not wanted: closing beats reading the rest of it.
            assert first.closed
            second = h.upstream()
            assert second is not first
            assert second.address != first.address, "a retry avoids the instance that failed"
            assert second.request_head() == first.request_head()
            assert c.responses() == [], "nothing reached the client before the retry answered"
            second.respond(response(200, b"second try"))
            [answer] = c.responses()
            assert (answer.status, answer.body) == (200, b"second try")
            assert h.retries() == {reason: 1}
            assert second.pooled
        else:
            assert h.upstream() is first, "no second try"
            [answer] = c.responses()
            assert answer.status == status
            # A complete response relayed leaves a reusable connection; a failed one is closed.
            assert first.pooled is getattr(fail, "complete_response", False)
            assert first.closed is not first.pooled
            assert h.retries() == {}
        c.disconnect()
        settle(h)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connect_failure_is_retried_for_any_method(method: str) -> None:
    # Nothing reached the instance: even a POST may go elsewhere.
    with Harness(two_instances()) as h:
        h.default_connect = HANG
        c = h.client()
        c.send(request(method, "/c", body=b"payload" if method == "POST" else b""))
        [refused] = h.pending_connects()
        refused.refuse()
        [retry] = h.pending_connects()
        assert retry.address != refused.address
        u = retry.accept()
        assert u.received().startswith(method.encode() + b" /c HTTP/1.1\r\n")
        if method == "POST":
            assert u.received().endswith(b"\r\n\r\npayload")
        u.respond(response(200, b"ok"))
        assert [r.status for r in c.responses()] == [200]
        assert h.retries() == {"connect_failure": 1}
        c.disconnect()
        settle(h)


def test_connect_failure_on_every_instance_is_502() -> None:
    with Harness(two_instances()) as h:
        h.default_connect = HANG
        c = h.client()
        c.send(request())
        h.pending_connects()[0].refuse()
        h.pending_connects()[0].refuse()
        [answer] = c.responses()
        assert answer.status == 502
        assert b"upstream_connect_failure" in answer.body
        assert answer.header(b"connection") == b"close"
        assert c.closed
        settle(h)


def test_body_is_replayed_on_retry() -> None:
    body = b"0123456789" * 50
    with Harness(two_instances()) as h:
        c = h.client()
        c.send(request("PUT", "/doc", body=body))
        first = h.upstream()
        assert first.received().endswith(body)
        first.reset()
        h.advance(RETRY_WAIT)
        second = h.upstream()
        assert second is not first
        assert second.received() == first.received()
        second.respond(response(204, b""))
        assert [r.status for r in c.responses()] == [204]


def test_no_retry_once_the_response_started() -> None:
    with Harness(two_instances()) as h:
        c = h.client()
        c.send(request())
        first = h.upstream()
        first.respond(response(200, b"", headers=(("Content-Length", "10"),)) + b"half")
        first.reset()
        h.advance(RETRY_WAIT)
        assert h.upstream() is first
        # The head and half of the body went out: the only signal left is cutting the client.
        assert c.received().endswith(b"half")
        assert c.aborted
        assert h.retries() == {}
        settle(h)


# -- stale pooled connections ----------------------------------------------------------------
# RFC 9112 §9.3.1: a pooled connection closed by the upstream before it answered probably went
# stale while idle: one replay on another connection to the same instance, for idempotent
# requests only (RFC 9112 §9.3.1.1).
@pytest.mark.parametrize("how", ["close", "reset"])
def test_stale_pooled_connection_is_replayed_once_on_a_fresh_one(how: str) -> None:
    with Harness(config(upstream="retry: {attempts: 1}")) as h:
        [stale] = h.pooled("10.0.0.1:80")
        c = h.client()
        c.send(request("GET", "/s"))
        assert stale.request_head().startswith(b"GET /s ")
        getattr(stale, how)()
        fresh = h.upstream()
        assert fresh is not stale
        assert fresh.address == stale.address
        assert fresh.received() == stale.received()
        fresh.respond(response(200, b"fresh"))
        assert [r.body for r in c.responses()] == [b"fresh"]
        assert h.retries() == {"stale_connection": 1}
        c.disconnect()
        settle(h)


def test_stale_replay_happens_only_once() -> None:
    with Harness(config(upstream="retry: {attempts: 1}")) as h:
        older, newer = h.pooled("10.0.0.1:80", 2)
        c = h.client()
        c.send(request("GET", "/s"))
        newer.close()  # the most recently pooled one was handed out first
        assert older.request_head().startswith(b"GET /s ")
        older.close()
        [answer] = c.responses()
        assert answer.status == 502
        assert h.retries() == {"stale_connection": 1}
        assert h.upstream_ends == [older, newer], "no third connection"
        settle(h)


@pytest.mark.parametrize(
    ("method", "replayed"),
    [("GET", True), ("PUT", True), ("DELETE", True), ("POST", False), ("PATCH", False)],
)
def test_stale_replay_only_for_idempotent_methods(method: str, replayed: bool) -> None:
    with Harness(config(upstream="retry: {attempts: 1}")) as h:
        [stale] = h.pooled("10.0.0.1:80")
        c = h.client()
        c.send(request(method, "/m", body=b"data"))
        assert stale.received().endswith(b"\r\n\r\ndata")
        stale.close()
        if replayed:
            fresh = h.upstream()
            assert fresh is not stale
            assert fresh.received() == stale.received()
            fresh.respond(response(200, b"ok"))
            assert [r.status for r in c.responses()] == [200]
        else:
            assert h.upstream() is stale
            assert [r.status for r in c.responses()] == [502]
        settle_after_close(h, c.closed)


def settle_after_close(h: Harness, client_closed: bool) -> None:
    h.run()
    expected = dict(NOTHING_IN_FLIGHT, client_connections=0 if client_closed else 1)
    assert h.in_flight() == expected


# -- hedging ---------------------------------------------------------------------------------
HEDGED = "hedge: {after: 50ms}"


def test_hedge_fires_after_the_delay_and_the_hedge_wins() -> None:
    with Harness(two_instances(HEDGED)) as h:
        c = h.client()
        c.send(request("GET", "/h"))
        primary = h.upstream()
        h.advance(0.04)
        assert h.upstream() is primary, "no hedge before the delay"
        h.advance(0.02)
        hedge = h.upstream()
        assert hedge is not primary
        assert hedge.address != primary.address
        assert hedge.request_head() == primary.request_head()
        assert h.retries() == {"hedge": 1}
        hedge.respond(response(200, b"from the hedge"))
        [answer] = c.responses()
        assert answer.body == b"from the hedge"
        assert primary.aborted, "the losing try is cancelled"
        assert hedge.pooled
        c.disconnect()
        settle(h)


def test_hedge_loses_when_the_first_try_answers_first() -> None:
    with Harness(two_instances(HEDGED)) as h:
        c = h.client()
        c.send(request("GET", "/h"))
        primary = h.upstream()
        h.advance(0.06)
        hedge = h.upstream()
        assert hedge is not primary
        primary.respond(response(200, b"from the first try"))
        [answer] = c.responses()
        assert answer.body == b"from the first try"
        assert hedge.aborted, "the losing hedge is cancelled"
        assert primary.pooled
        c.disconnect()
        settle(h)


def test_first_try_failing_leaves_the_hedge_to_answer() -> None:
    with Harness(two_instances(HEDGED)) as h:
        c = h.client()
        c.send(request("GET", "/h"))
        primary = h.upstream()
        h.advance(0.06)
        hedge = h.upstream()
        primary.reset()
        assert c.responses() == []
        hedge.respond(response(200, b"hedge"))
        assert [r.body for r in c.responses()] == [b"hedge"]
        c.disconnect()
        settle(h)


@pytest.mark.parametrize(
    ("raw", "answered_before_delay"),
    [
        (request("GET", "/fast"), True),
        (request("POST", "/p"), False),  # not idempotent: never hedged
        (request("PUT", "/b", body=b"body"), False),  # a body: never hedged
    ],
    ids=["answered-in-time", "POST", "with-body"],
)
def test_no_hedge(raw: bytes, answered_before_delay: bool) -> None:
    with Harness(two_instances(HEDGED)) as h:
        c = h.client()
        c.send(raw)
        primary = h.upstream()
        if answered_before_delay:
            h.advance(0.03)
            primary.respond(response(200, b"fast"))
        h.advance(0.2)
        assert h.upstream_ends == [primary]
        assert h.retries() == {}
        if not answered_before_delay:
            primary.respond(response(200, b"slow"))
        assert [r.status for r in c.responses()] == [200]
        c.disconnect()
        settle(h)


# -- circuit breaker -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("breaker", "hang_connects", "refusal"),
    [
        ("max_requests: 1", False, b"max_requests"),
        ("max_pending: 1", True, b"max_pending"),
        ("max_connections: 1", True, b"max_connections"),
    ],
)
def test_breaker_refuses_beyond_its_cap_and_gives_slots_back(
    breaker: str, hang_connects: bool, refusal: bytes
) -> None:
    with Harness(config(upstream=f"circuit_breaker: {{{breaker}}}")) as h:
        if hang_connects:
            h.default_connect = HANG
        first = h.client()
        first.send(request("GET", "/1"))
        second = h.client()
        second.send(request("GET", "/2"))
        [refused] = second.responses()
        assert refused.status == 503
        assert refusal in refused.body
        if hang_connects:
            h.pending_connects()[0].accept()
        h.upstream().respond(response(200, b"first"))
        assert [r.body for r in first.responses()] == [b"first"]
        third = h.client()
        third.send(request("GET", "/3"))  # the slot is free again; the pooled connection serves
        h.upstream().respond(response(200, b"third"))
        assert [r.body for r in third.responses()] == [b"third"]
        for c in (first, second, third):
            if not c.closed:
                c.disconnect()
        settle(h)
