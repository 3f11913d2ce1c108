"""Sans-IO: the tracing filter's upstream-attempt spans. Each try of an exchange (the first, a
retry, a hedge) gets a CLIENT span under the gateway's SERVER span, and the traceparent each
upstream receives names that try's span (``RequestInfo.retry_head``, ``RequestInfo.attempts``)."""

from __future__ import annotations

import json
from typing import Any

from gateway.filters.otlp import encode_spans, span_dict
from gateway.filters.tracing import TracingFilter
from gateway.proxy.headers import build_request_head
from tests.filters_support import filter_from_yaml
from tests.unit.dataplane_harness import Harness, config, request, response

INSTANCES = ("10.0.0.1:80", "10.0.0.2:80")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACED = "filters: [{tracing: {export: {endpoint: 'http://127.0.0.1:9/v1/traces'}}}]"
RETRY_WAIT = 0.3  # longer than the retry backoff's cap (0.25 s)


def _traced(h: Harness) -> list[Any]:
    """The spans the route's tracing filter records (its exporter's queue is replaced)."""
    (item,) = h.server.snapshot.filters["main"].filters  # type: ignore[attr-defined]
    assert isinstance(item, TracingFilter) and item.exporter is not None
    spans: list[Any] = []
    item.exporter.record = spans.append  # type: ignore[method-assign]
    return spans


def _parent_id(headers: dict[bytes, bytes]) -> str:
    return headers[b"traceparent"].decode().split("-")[2]


def _continued(path: str) -> bytes:
    return request("GET", path, headers=(("traceparent", f"00-{TRACE}-{PARENT}-01"),))


def test_retry_head_puts_a_fresh_parent_id_in_the_head_and_nothing_else() -> None:
    item = filter_from_yaml(TRACED.removeprefix("filters: [").removesuffix("]"))
    assert isinstance(item, TracingFilter)
    value = f"00-{TRACE}-{PARENT}-01".encode()
    head = build_request_head(
        b"GET",
        b"/a",
        [(b"x-before", b"1"), (b"traceparent", value), (b"x-after", b"2")],
        host=b"example.com",
        conn_tokens=frozenset(),
        client_ip="192.0.2.1",
        peer_trusted=False,
        request_id=b"req-1",
        framing=b"",
        upgrade=None,
    )
    new_head, label = item.retry_head(head)
    assert len(label) == 16 and label != PARENT
    assert new_head == head.replace(value, f"00-{TRACE}-{label}-01".encode())
    untraced = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    assert item.retry_head(untraced) == (untraced, "")


def test_a_retry_gets_its_own_attempt_span_and_parent_id() -> None:
    with Harness(config(instances=INSTANCES, route=TRACED)) as h:
        spans = _traced(h)
        c = h.client()
        c.send(_continued("/r"))
        first = h.upstream()
        first.reset()
        h.advance(RETRY_WAIT)
        second = h.upstream()
        second.respond(response(200, b"ok"))
        assert [r.status for r in c.responses()] == [200]
        sent = [_parent_id(first.request_headers()), _parent_id(second.request_headers())]
        assert sent[0] != sent[1] and PARENT not in sent
        # The two heads differ only in that id.
        assert second.request_head() == first.request_head().replace(
            sent[0].encode(), sent[1].encode()
        )
        server, *attempts = (span_dict(span) for span in spans)
        assert server["kind"] == 2 and server["parentSpanId"] == PARENT
        assert [a["spanId"] for a in attempts] == sent
        assert {a["parentSpanId"] for a in attempts} == {server["spanId"]}
        failed, answered = (
            {item["key"]: item["value"] for item in a["attributes"]} for a in attempts
        )
        assert failed["error.type"] == {"stringValue": "reset"}
        assert "http.response.status_code" not in failed
        assert answered["http.response.status_code"] == {"intValue": "200"}
        assert answered["http.request.resend_count"] == {"intValue": "1"}
        addresses = [
            f"{a['server.address']['stringValue']}:{a['server.port']['intValue']}"
            for a in (failed, answered)
        ]
        assert addresses == [first.address, second.address]
        assert [a["status"] for a in attempts] == [{"code": 2}, {}]
        starts = [int(a["startTimeUnixNano"]) for a in attempts]
        ends = [int(a["endTimeUnixNano"]) for a in attempts]
        assert int(server["startTimeUnixNano"]) <= starts[0] <= ends[0] <= starts[1]
        assert starts[1] <= ends[1] <= int(server["endTimeUnixNano"])
        # The text encoder writes the same spans as span_dict.
        decoded = json.loads(encode_spans(spans, "gw"))
        assert decoded["resourceSpans"][0]["scopeSpans"][0]["spans"] == [
            span_dict(span) for span in spans
        ]


def test_a_hedge_gets_its_own_attempt_span_and_the_loser_is_cancelled() -> None:
    with Harness(config(instances=INSTANCES, upstream="hedge: {after: 50ms}", route=TRACED)) as h:
        spans = _traced(h)
        c = h.client()
        c.send(_continued("/h"))
        first = h.upstream()
        h.advance(0.06)
        hedge = h.upstream()
        hedge.respond(response(200, b"hedged"))
        assert [r.body for r in c.responses()] == [b"hedged"]
        sent = [_parent_id(first.request_headers()), _parent_id(hedge.request_headers())]
        assert sent[0] != sent[1]
        _, *attempts = (span_dict(span) for span in spans)
        outcomes = {
            a["spanId"]: {item["key"]: item["value"] for item in a["attributes"]} for a in attempts
        }
        assert set(outcomes) == set(sent)
        assert outcomes[sent[0]]["error.type"] == {"stringValue": "cancelled"}
        assert outcomes[sent[1]]["http.response.status_code"] == {"intValue": "200"}


def test_an_unsampled_request_has_no_retry_hook_and_no_spans() -> None:
    with Harness(config(instances=INSTANCES, route=TRACED)) as h:
        spans = _traced(h)
        c = h.client()
        c.send(request("GET", "/u", headers=(("traceparent", f"00-{TRACE}-{PARENT}-00"),)))
        first = h.upstream()
        first.reset()
        h.advance(RETRY_WAIT)
        second = h.upstream()
        second.respond(response(200, b"ok"))
        assert [r.status for r in c.responses()] == [200]
        assert second.request_head() == first.request_head()  # propagated as it was
        assert spans == []
