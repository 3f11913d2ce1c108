"""The tracing filter's OTLP/HTTP span export: the JSON encoding of ExportTraceServiceRequest,
the bounded queue and its drop counter, batching by size and by interval, the one retry on a
throttled/unavailable receiver, and config errors at file:line. A real aiohttp receiver on a
random port records what is POSTed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.config import ConfigInvalid, load_config_text
from gateway.filters.chain import Chain
from gateway.filters.otlp import SpanExporter, SpanRecord, encode_spans, span_dict
from gateway.filters.tracing import TracingFilter
from tests.filters_support import filter_from_yaml, request

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def _record(status: int = 200, parent: str = PARENT, span: str = "b7ad6b7169203331") -> SpanRecord:
    return (TRACE, span, parent, 1_000, 2_500, "GET", "/a", "r", "api.example", "192.0.2.1", status)


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in span["attributes"]:
        ((kind, value),) = item["value"].items()
        out[item["key"]] = int(value) if kind == "intValue" else value
    return out


def test_encoding_follows_the_otlp_json_mapping() -> None:
    decoded = json.loads(encode_spans([_record(), _record(503, parent="")], "edge"))
    (resource_spans,) = decoded["resourceSpans"]
    assert _attributes(resource_spans["resource"]) == {"service.name": "edge"}
    (scope_spans,) = resource_spans["scopeSpans"]
    assert scope_spans["scope"]["name"] == "gateway.filters.tracing"
    ok, failed = scope_spans["spans"]
    # OTLP JSON: ids are hex strings (not base64), 64-bit integers are strings.
    assert ok["traceId"] == TRACE and ok["spanId"] == "b7ad6b7169203331"
    assert ok["parentSpanId"] == PARENT
    assert ok["startTimeUnixNano"] == "1000" and ok["endTimeUnixNano"] == "2500"
    assert ok["kind"] == 2  # SPAN_KIND_SERVER
    assert ok["name"] == "GET r"
    assert _attributes(ok) == {
        "http.request.method": "GET",
        "url.path": "/a",
        "http.route": "r",
        "server.address": "api.example",
        "client.address": "192.0.2.1",
        "http.response.status_code": 200,
    }
    assert ok["status"] == {}  # unset: a 2xx/4xx server span is no error
    assert "parentSpanId" not in failed  # a root span
    assert failed["status"] == {"code": 2}  # STATUS_CODE_ERROR on 5xx


def test_on_log_records_the_gateway_span_of_a_sampled_request() -> None:
    item = filter_from_yaml(
        "tracing: {export: {endpoint: 'http://127.0.0.1:9/v1/traces', service_name: edge}}"
    )
    assert isinstance(item, TracingFilter) and item.exporter is not None
    chain = Chain("r", [item])
    assert chain.wants_log
    req = request(headers=[(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())])
    chain.on_request_headers(req, lambda _: None)
    before = time.time_ns()
    chain.on_log(req, 502, 0.25)
    (span,) = item.exporter.queue  # no running loop here: the span waits in the queue
    trace_id, span_id, parent, start, end = span[:5]
    sent = dict(req.headers)[b"traceparent"].decode()
    assert (trace_id, parent) == (TRACE, PARENT)
    assert span_id == req.vars["span_id"]
    # The upstream's parent is the first try's span (a child of the gateway span; the data
    # plane gives on_log the tries, none here), as Envoy sends it.
    assert sent == f"00-{TRACE}-{req.vars['attempt_span_id']}-01"
    assert req.vars["attempt_span_id"] != span_id
    assert req.retry_head is not None
    assert before <= end <= time.time_ns() and end - start == 250_000_000
    assert span[-1] == 502

    unsampled = request(headers=[(b"traceparent", f"00-{TRACE}-{PARENT}-00".encode())])
    chain.on_request_headers(unsampled, lambda _: None)
    chain.on_log(unsampled, 200, 0.1)
    assert len(item.exporter.queue) == 1  # not sampled: no span


def test_without_export_the_filter_has_no_log_hook() -> None:
    assert not Chain("r", [filter_from_yaml("tracing: {}")]).wants_log


def test_a_full_queue_drops_and_counts() -> None:
    exporter = SpanExporter("http://127.0.0.1:9/v1/traces", queue=3)
    for _ in range(5):
        exporter.record(_record())
    assert len(exporter.queue) == 3 and exporter.dropped == 2


@pytest.mark.parametrize(
    ("options", "line", "path", "message"),
    [
        ("{export: {interval: 1s}}", 2, "filters[0].tracing.export.endpoint", "required"),
        (
            "{export: {endpoint: 'ftp://x/v1/traces'}}",
            2,
            "filters[0].tracing.export.endpoint",
            "http://",
        ),
        (
            "{export: {endpoint: 'http://x/v1/traces', batch: 0}}",
            2,
            "filters[0].tracing.export.batch",
            "",
        ),
        (
            "{export: {endpoint: 'http://x/v1/traces', interval: 5}}",
            2,
            "filters[0].tracing.export.interval",
            "expected a duration",
        ),
        (
            "{export: {endpoint: 'http://x/v1/traces', headers: {'bad name': x}}}",
            2,
            "filters[0].tracing.export.headers",
            "",
        ),
    ],
)
def test_export_config_errors(options: str, line: int, path: str, message: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(f"filters:\n  - tracing: {options}\n", "gw.yaml")
    errors = [e for e in info.value.errors if e.path.startswith(path)]
    assert errors, info.value.errors
    assert errors[0].line == line and message in errors[0].message


# --- against a real receiver ----------------------------------------------------------------


class Receiver:
    """An OTLP/HTTP receiver that records every POSTed body; ``answers`` are the statuses
    of the next requests (then 200)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.headers: list[dict[str, str]] = []
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1/traces"

    async def _traces(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        self.statuses.append(status)
        if status == 200:
            self.bodies.append(json.loads(await request.read()))
        return web.Response(status=status, headers=headers, body=b"{}")

    def spans(self) -> list[dict[str, Any]]:
        return [
            span
            for body in self.bodies
            for resource in body["resourceSpans"]
            for scope in resource["scopeSpans"]
            for span in scope["spans"]
        ]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_full_batch_goes_at_once(receiver: Receiver) -> None:
    exporter = SpanExporter(receiver.url, interval=60.0, batch=4, headers={"x-token": "t"})
    try:
        for i in range(9):
            exporter.record(_record(span=f"{i + 1:016x}"))
        # Two full batches go without waiting for the 60 s interval; the ninth span waits.
        await _until(lambda: len(receiver.bodies) == 2)
        assert [len(b["resourceSpans"][0]["scopeSpans"][0]["spans"]) for b in receiver.bodies] == [
            4,
            4,
        ]
        assert receiver.headers[0]["x-token"] == "t"
        assert receiver.headers[0]["Content-Type"] == "application/json"
        assert len(exporter.queue) == 1
    finally:
        await exporter.stop()
    # Stopping sends what was left.
    assert [s["spanId"] for s in receiver.spans()] == [f"{i + 1:016x}" for i in range(9)]
    assert exporter.exported == 9 and exporter.dropped == 0


async def test_spans_go_every_interval(receiver: Receiver) -> None:
    exporter = SpanExporter(receiver.url, interval=0.05, batch=512)
    try:
        exporter.record(_record(span="0000000000000001"))
        await _until(lambda: len(receiver.spans()) == 1)
        exporter.record(_record(span="0000000000000002"))
        await _until(lambda: len(receiver.spans()) == 2)
        assert len(receiver.bodies) == 2  # one POST per interval, each with what was waiting
    finally:
        await exporter.stop()


@pytest.mark.parametrize("status", [429, 503])
async def test_a_throttled_export_is_retried_once(receiver: Receiver, status: int) -> None:
    receiver.answers = [(status, {"Retry-After": "0"})]
    exporter = SpanExporter(receiver.url, interval=0.02)
    try:
        exporter.record(_record())
        await _until(lambda: len(receiver.spans()) == 1)
        assert receiver.statuses == [status, 200]
        assert exporter.failures == 0 and exporter.exported == 1
    finally:
        await exporter.stop()


async def test_a_second_failure_or_a_bad_request_drops_the_batch(receiver: Receiver) -> None:
    receiver.answers = [(503, {"Retry-After": "0"}), (503, {}), (400, {})]
    exporter = SpanExporter(receiver.url, interval=0.02, retry_delay=0.0)
    try:
        exporter.record(_record())
        await _until(lambda: exporter.failures == 1)
        assert receiver.statuses == [503, 503]  # retried once, then given up
        exporter.record(_record())
        await _until(lambda: exporter.failures == 2)
        assert receiver.statuses == [503, 503, 400]  # 400 is not retryable
        assert exporter.dropped == 2 and exporter.exported == 0
    finally:
        await exporter.stop()


async def test_an_unreachable_receiver_only_counts(receiver: Receiver) -> None:
    url = receiver.url
    assert receiver.runner is not None
    await receiver.runner.cleanup()  # nobody listens on that port now
    exporter = SpanExporter(url, interval=0.02, timeout=1.0)
    try:
        exporter.record(_record())
        await _until(lambda: exporter.failures == 1)
        assert exporter.dropped == 1
        exporter.record(_record())  # still accepting, still only counting
        await _until(lambda: exporter.failures == 2)
        assert exporter.dropped == 2 and exporter.exported == 0
    finally:
        await exporter.stop()
    receiver.runner = web.AppRunner(web.Application())
    await receiver.runner.setup()


async def test_close_on_reload_sends_the_rest_and_stops(receiver: Receiver) -> None:
    item = filter_from_yaml(f"tracing: {{export: {{endpoint: '{receiver.url}', interval: 60s}}}}")
    assert isinstance(item, TracingFilter) and item.exporter is not None
    chain = Chain("r", [item])
    req = request()
    chain.on_request_headers(req, lambda _: None)
    chain.on_log(req, 200, 0.001)
    task = item.exporter._task
    assert task is not None  # started lazily by the first span, on this loop
    item.close()  # what a reload does to the old config's filters
    await asyncio.wait_for(task, 5)
    (span,) = receiver.spans()
    assert span["traceId"] == req.vars["trace_id"] and span["spanId"] == req.vars["span_id"]
    assert "parentSpanId" not in span  # a new trace: the gateway span is the root
    chain.on_log(req, 200, 0.001)
    assert item.exporter.dropped == 1  # closed: nothing is queued any more


@pytest.mark.parametrize(
    "path",
    ['/q"uote', "/back\\slash", "/caf\u00e9", "/ctl\x01", "/"],
)
def test_the_text_encoding_equals_the_dict_one(path: str) -> None:
    # encode_spans writes JSON text directly; user strings must still be quoted exactly.
    records = [
        (TRACE, "b7ad6b7169203331", PARENT, 1, 2, "GET", path, "r", "h", "::1", 200),
        (TRACE, "b7ad6b7169203332", "", 1, 2, "POST", path, "r", "h", "::1", 0),
    ]
    decoded = json.loads(encode_spans(records, 'svc "x"'))
    scope = decoded["resourceSpans"][0]["scopeSpans"][0]
    assert scope["spans"] == [span_dict(r) for r in records]
    assert decoded["resourceSpans"][0]["resource"]["attributes"][0]["value"] == {
        "stringValue": 'svc "x"'
    }


def test_export_headers_are_redacted_when_the_config_is_shown() -> None:
    from gateway.config import redact_config

    config = load_config_text(
        "filters:\n  - tracing: {export: {endpoint: 'http://c:4318/v1/traces',"
        " headers: {authorization: 'Bearer tok-12345'}}}\n",
        "gw.yaml",
    )
    assert config.filters[0].options["export"]["headers"] == {"authorization": "Bearer tok-12345"}
    assert "tok-12345" not in repr(redact_config(config))
