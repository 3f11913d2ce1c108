"""A real gateway with the tracing filter exporting spans over OTLP/HTTP to a local receiver
that records every POSTed body: requests with and without a traceparent (curl), the span's
ids against the traceparent the upstream received and the access log, status codes, and a
receiver that is down (requests still succeed)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.integration.backends import AppBackend, LoopThread, ThreadedApp
from tests.integration.conftest import GatewayProcess, free_port
from tests.metrics_text import metric_value

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class OtlpReceiver(ThreadedApp):
    """OTLP/HTTP traces endpoint on its own loop thread; keeps every decoded body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        super().__init__()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.bodies.append(json.loads(await request.read()))
        return web.json_response({})

    def spans(self) -> list[dict[str, Any]]:
        return [
            span
            for body in list(self.bodies)
            for resource in body["resourceSpans"]
            for scope in resource["scopeSpans"]
            for span in scope["spans"]
        ]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


def _config(app: AppBackend, endpoint: str, access_log: Path) -> dict[str, Any]:
    return {
        "access_log": {"path": str(access_log)},
        "upstreams": {"app": {"instances": [f"127.0.0.1:{app.port}"]}},
        "routes": [
            {
                "name": "traced",
                "match": {"path": {"prefix": "/"}},
                "upstream": "app",
                "filters": [
                    {
                        "tracing": {
                            "response_header": "x-trace-id",
                            "export": {
                                "endpoint": endpoint,
                                "interval": "50ms",
                                "timeout": "1s",
                                "service_name": "edge",
                            },
                        }
                    }
                ],
            }
        ],
    }


def _curl(gateway: GatewayProcess, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    args = ["curl", "-s", "-D", "-", "--max-time", "10", gateway.base_url + path]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run(args, capture_output=True, check=True, timeout=20).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in span["attributes"]:
        ((kind, value),) = item["value"].items()
        out[item["key"]] = int(value) if kind == "intValue" else value
    return out


def _poll(find: Callable[[], Any], what: str, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while (found := find()) is None:
        assert time.monotonic() < deadline, f"no {what} in {within}s"
        time.sleep(0.02)
    return found


def test_spans_arrive_with_the_ids_the_upstream_and_the_log_saw(
    start_gateway: Callable[..., GatewayProcess],
    app_backend: AppBackend,
    receiver: OtlpReceiver,
    tmp_path: Path,
) -> None:
    access_log = tmp_path / "access.log"
    gateway = start_gateway(
        _config(app_backend, f"http://127.0.0.1:{receiver.port}/v1/traces", access_log)
    )

    def span_of(span_id: str) -> dict[str, Any] | None:
        return next((s for s in receiver.spans() if s["spanId"] == span_id), None)

    # 1. Continuing the caller's trace: the gateway span's parent is the caller's span, and
    # the traceparent the upstream got names the gateway span's attempt child as its parent.
    status, headers, body = _curl(gateway, "/echo/a", f"traceparent: 00-{TRACE}-{PARENT}-01")
    assert status == 200 and headers["x-trace-id"] == TRACE
    sent = {k.lower(): v for k, v in json.loads(body)["headers"]}["traceparent"]
    version, trace_id, attempt_span, flags = sent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01") and attempt_span != PARENT
    attempt = _poll(lambda: span_of(attempt_span), "attempt span of the continued trace")
    assert attempt["kind"] == 3 and attempt["traceId"] == TRACE and attempt["status"] == {}
    assert _attributes(attempt)["server.port"] == app_backend.port
    span = _poll(lambda: span_of(attempt["parentSpanId"]), "span of the continued trace")
    assert span["traceId"] == TRACE and span["parentSpanId"] == PARENT
    assert span["kind"] == 2 and span["status"] == {}
    assert int(span["startTimeUnixNano"]) <= int(span["endTimeUnixNano"])
    attributes = _attributes(span)
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/echo/a"
    assert attributes["http.route"] == "traced"
    assert attributes["http.response.status_code"] == 200
    assert attributes["client.address"] == "127.0.0.1"
    (resource,) = {json.dumps(r["resource"]) for b in receiver.bodies for r in b["resourceSpans"]}
    assert json.loads(resource)["attributes"][0]["value"]["stringValue"] == "edge"

    # 2. A new trace: a root span whose trace id is the access log's.
    status, headers, body = _curl(gateway, "/echo/b")
    new_trace = headers["x-trace-id"]
    assert status == 200 and new_trace != TRACE
    sent = {k.lower(): v for k, v in json.loads(body)["headers"]}["traceparent"]
    attempt = _poll(lambda: span_of(sent.split("-")[2]), "attempt span of the new trace")
    span = _poll(lambda: span_of(attempt["parentSpanId"]), "span of the new trace")
    assert span["traceId"] == new_trace and "parentSpanId" not in span

    def logged() -> dict[str, Any] | None:
        lines = access_log.read_text().splitlines() if access_log.exists() else []
        entries = [json.loads(line) for line in lines]
        return next((e for e in entries if e.get("trace_id") == new_trace), None)

    _poll(logged, "access log line with the new trace id")

    # 3. A 5xx answer is an error span; an unsampled caller makes no span at all.
    status, headers, _ = _curl(gateway, "/status/503")
    assert status == 503
    error_trace = headers["x-trace-id"]
    span = _poll(
        lambda: next(
            (s for s in receiver.spans() if s["traceId"] == error_trace and s["kind"] == 2), None
        ),
        "span of the 503",
    )
    assert span["status"] == {"code": 2}
    assert _attributes(span)["http.response.status_code"] == 503
    unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
    _curl(gateway, "/echo/c", f"traceparent: 00-{unsampled}-{PARENT}-00")
    _curl(gateway, "/echo/d", f"traceparent: 00-{TRACE}-{PARENT}-01")  # a marker after it
    _poll(
        lambda: next(
            (s for s in receiver.spans() if _attributes(s).get("url.path") == "/echo/d"),
            None,
        ),
        "marker span",
    )
    assert not any(s["traceId"] == unsampled for s in receiver.spans())


def test_a_receiver_that_is_down_does_not_fail_requests(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, tmp_path: Path
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/v1/traces"
    gateway = start_gateway(_config(app_backend, nobody, tmp_path / "access.log"))
    for i in range(20):
        status, headers, _ = _curl(gateway, f"/echo/{i}")
        assert status == 200 and len(headers["x-trace-id"]) == 32
    # The failure is logged, rate limited (10 s) rather than per batch.
    _poll(lambda: True if "spans not exported" in gateway.log() else None, "export warning")
    assert gateway.log().count("spans not exported") <= 2  # not one line per 50 ms batch
    # ... and counted: every span of a failed batch (two per request) is dropped.
    _poll(
        lambda: (
            True
            if metric_value(gateway.metrics_text(), "gateway_trace_spans_dropped_total") == 40
            else None
        ),
        "40 dropped spans (gateway + attempt) on /metrics",
    )
    text = gateway.metrics_text()
    assert (metric_value(text, "gateway_trace_export_failures_total") or 0) >= 1
    assert metric_value(text, "gateway_trace_spans_exported_total") == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_exported_spans_are_counted_on_metrics(
    start_gateway: Callable[..., GatewayProcess],
    app_backend: AppBackend,
    receiver: OtlpReceiver,
    tmp_path: Path,
    workers: int,
) -> None:
    config = _config(
        app_backend, f"http://127.0.0.1:{receiver.port}/v1/traces", tmp_path / "access.log"
    )
    config["workers"] = workers
    gateway = start_gateway(config)
    text = gateway.metrics_text()
    for name in (
        "gateway_trace_spans_exported_total",
        "gateway_trace_spans_dropped_total",
        "gateway_trace_export_failures_total",
    ):
        assert metric_value(text, name) == 0, name  # exported from the start, at zero
    traces = {_curl(gateway, f"/echo/{i}")[1]["x-trace-id"] for i in range(12)}
    # Every worker's exporter counts; the supervisor's /metrics adds them up.
    _poll(
        lambda: (
            True
            if metric_value(gateway.metrics_text(), "gateway_trace_spans_exported_total") == 24
            else None
        ),
        "24 exported spans (gateway + attempt) on /metrics",
    )
    assert traces <= {s["traceId"] for s in receiver.spans()}
    text = gateway.metrics_text()
    assert metric_value(text, "gateway_trace_spans_dropped_total") == 0
    assert metric_value(text, "gateway_trace_export_failures_total") == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_and_shutdown_send_what_is_queued(
    start_gateway: Callable[..., GatewayProcess],
    app_backend: AppBackend,
    receiver: OtlpReceiver,
    tmp_path: Path,
    workers: int,
) -> None:
    # interval 60s and batch 512: only the reload's close() and the shutdown can send these.
    config = _config(
        app_backend, f"http://127.0.0.1:{receiver.port}/v1/traces", tmp_path / "access.log"
    )
    config["workers"] = workers
    export = config["routes"][0]["filters"][0]["tracing"]["export"]
    export["interval"] = "60s"
    gateway = start_gateway(config)

    def traces() -> set[str]:
        return {s["traceId"] for s in receiver.spans()}

    before_reload = _curl(gateway, "/echo/before-reload")[1]["x-trace-id"]
    export["service_name"] = "edge-2"  # a changed config: new filters, the old ones closed
    gateway.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    gateway.process.send_signal(signal.SIGHUP)
    _poll(lambda: True if before_reload in traces() else None, "span flushed by the reload")

    # The new filter's span (same worker or another) waits for the 60 s interval...
    deadline = time.monotonic() + 10
    while True:
        status, headers, _ = _curl(gateway, "/echo/after-reload")
        assert status == 200
        spans = [s for s in receiver.spans() if s["traceId"] == headers["x-trace-id"]]
        if not spans:
            break
        assert time.monotonic() < deadline, "every request's span sent at once"
    last = headers["x-trace-id"]
    gateway.stop()  # ... and SIGTERM sends it
    assert gateway.process.returncode == 0
    assert last in traces()


class FirstTryFails:
    """Two instances sharing one rule: the first try of each trace answers 503, the next 200;
    every traceparent received is kept, per trace id, with the port it reached."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, str]]] = {}
        self.thread = LoopThread()
        self.ports = [self.thread.call(self._start()) for _ in range(2)]

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners = [*getattr(self, "runners", []), runner]
        return int(runner.addresses[0][1])

    async def _handle(self, request: web.Request) -> web.Response:
        traceparent = request.headers["traceparent"]
        tries = self.seen.setdefault(traceparent.split("-")[1], [])
        assert request.transport is not None
        tries.append((int(request.transport.get_extra_info("sockname")[1]), traceparent))
        return web.Response(status=503 if len(tries) == 1 else 200, text="ok")

    def close(self) -> None:
        for runner in self.runners:
            self.thread.call(runner.cleanup())
        self.thread.stop()


def test_a_retried_request_has_one_attempt_span_per_try_under_the_gateway_span(
    start_gateway: Callable[..., GatewayProcess], receiver: OtlpReceiver, tmp_path: Path
) -> None:
    flaky = FirstTryFails()
    try:
        config: dict[str, Any] = {
            "upstreams": {
                "flaky": {
                    "instances": [f"127.0.0.1:{port}" for port in flaky.ports],
                    "retry": {"attempts": 2, "on": [503]},
                    "outlier": {"enabled": False},
                }
            },
            "routes": [
                {
                    "name": "retried",
                    "match": {"path": {"prefix": "/"}},
                    "upstream": "flaky",
                    "filters": [
                        {
                            "tracing": {
                                "response_header": "x-trace-id",
                                "export": {
                                    "endpoint": f"http://127.0.0.1:{receiver.port}/v1/traces",
                                    "interval": "50ms",
                                },
                            }
                        }
                    ],
                }
            ],
        }
        gateway = start_gateway(config)
        status, _, _ = _curl(gateway, "/try", f"traceparent: 00-{TRACE}-{PARENT}-01")
        assert status == 200
        (first, first_header), (second, second_header) = flaky.seen[TRACE]
        assert first != second  # the retry went to the other instance
        sent_ids = [first_header.split("-")[2], second_header.split("-")[2]]
        assert sent_ids[0] != sent_ids[1] and PARENT not in sent_ids

        def spans() -> list[dict[str, Any]] | None:
            found = [s for s in receiver.spans() if s["traceId"] == TRACE and s["kind"] == 3]
            found = [s for s in found if s["spanId"] in sent_ids]
            return found if len(found) == 2 else None

        attempt_spans = sorted(
            _poll(spans, "two attempt spans"), key=lambda s: s["startTimeUnixNano"]
        )
        (server,) = [
            s
            for s in receiver.spans()
            if s["traceId"] == TRACE and s["kind"] == 2 and _attributes(s)["url.path"] == "/try"
        ]
        assert server["parentSpanId"] == PARENT
        # Each upstream saw its own try's span id as its parent, as Envoy sends it.
        assert [s["spanId"] for s in attempt_spans] == sent_ids
        assert {s["parentSpanId"] for s in attempt_spans} == {server["spanId"]}
        failed, retried = (_attributes(s) for s in attempt_spans)
        assert failed["http.response.status_code"] == 503
        assert failed["server.port"] == first and retried["server.port"] == second
        assert attempt_spans[0]["status"] == {"code": 2} and attempt_spans[1]["status"] == {}
        assert retried["http.response.status_code"] == 200
        assert retried["http.request.resend_count"] == 1
        assert "http.request.resend_count" not in failed
        # Tries lie inside the gateway span, one after the other.
        times = [(int(s["startTimeUnixNano"]), int(s["endTimeUnixNano"])) for s in attempt_spans]
        assert int(server["startTimeUnixNano"]) <= times[0][0] <= times[0][1] <= times[1][0]
        assert times[1][1] <= int(server["endTimeUnixNano"])
    finally:
        flaky.close()
