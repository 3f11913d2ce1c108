"""A lean OTLP/HTTP span exporter for the ``tracing`` filter (JSON encoding).

Spans are recorded from ``on_log`` as one small tuple each into a bounded deque: recording
never blocks and never does IO; when the queue is full the span is dropped and counted. A
background task, started lazily on the worker's running loop by the first recorded span,
POSTs an ``ExportTraceServiceRequest`` (OTLP/HTTP, JSON encoding: hex ids, nanosecond times
as strings) every ``interval`` or as soon as ``batch`` spans are waiting. A 429/502/503/504
answer is retried once after ``Retry-After`` (capped) as the OTLP spec asks; any other
failure drops the batch, counted and logged at most once per ``_LOG_INTERVAL``. Nothing
the exporter does can fail or delay a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii as _quote
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

__all__ = [
    "AttemptSpan",
    "ServerSpan",
    "SpanExporter",
    "SpanRecord",
    "encode_spans",
    "live_exporters",
    "span_counters",
    "span_dict",
    "stop_exporters",
]

log = logging.getLogger("gateway.filters.otlp")

# (trace_id, span_id, parent_span_id or "", start ns, end ns, method, path, route, host,
#  client address, status): a tuple is the cheapest thing on_log can build.
ServerSpan = tuple[str, str, str, int, int, str, str, str, str, str, int]
# An upstream try (a CLIENT span, child of the gateway's): (trace_id, span_id, parent_span_id,
# start ns, end ns, method, instance address "host:port", resend count, status (0: none),
# error type ("": none)). Told apart from a ServerSpan by its length (10).
AttemptSpan = tuple[str, str, str, int, int, str, str, int, int, str]
SpanRecord = ServerSpan | AttemptSpan

SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
SPAN_KIND_CLIENT = 3
STATUS_CODE_ERROR = 2  # opentelemetry.proto.trace.v1.Status.StatusCode
_RETRYABLE = frozenset({429, 502, 503, 504})  # OTLP/HTTP "Retryable Response Codes"
_MAX_RETRY_DELAY = 5.0  # seconds: a longer Retry-After is not honoured (the batch is dropped)
_LOG_INTERVAL = 10.0  # seconds between two logged export failures of one exporter
SCOPE_NAME = "gateway.filters.tracing"

_EXPORTERS: set[SpanExporter] = set()
# Every exporter of this process since it started (a reload replaces exporters, and counters
# must not go back): gateway.metrics.PROCESS_COUNTERS keys.
_TOTALS: dict[str, int] = {
    "trace_spans_exported": 0,
    "trace_spans_dropped": 0,
    "trace_export_failures": 0,
}


def span_counters() -> dict[str, int]:
    """The exporters' counts in this process (a ``GatewayMetrics.count_from`` source)."""
    return dict(_TOTALS)


def live_exporters() -> list[SpanExporter]:
    """Exporters not yet stopped in this process (shutdown flushes them)."""
    return list(_EXPORTERS)


def _attribute(key: str, value: str | int) -> dict[str, Any]:
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}  # int64 is a JSON string
    return {"key": key, "value": {"stringValue": value}}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def _attempt_attributes(record: AttemptSpan) -> list[dict[str, Any]]:
    _, _, _, _, _, method, address, resends, status, error = record
    host, port = _host_port(address)
    attributes = [
        _attribute("http.request.method", method),
        _attribute("server.address", host),
        _attribute("server.port", port),
    ]
    if resends:
        attributes.append(_attribute("http.request.resend_count", resends))
    if status:
        attributes.append(_attribute("http.response.status_code", status))
    if error:
        attributes.append(_attribute("error.type", error))
    return attributes


def _attempt_failed(record: AttemptSpan) -> bool:
    # Semantic conventions: a client span is an error on 4xx and 5xx, and when it got no answer.
    return bool(record[9]) or record[8] >= 400 or record[8] == 0


def span_dict(record: SpanRecord) -> dict[str, Any]:
    if len(record) == 10:
        attempt: AttemptSpan = record  # type: ignore[assignment]
        return {
            "traceId": attempt[0],
            "spanId": attempt[1],
            "parentSpanId": attempt[2],
            "name": attempt[5],
            "kind": SPAN_KIND_CLIENT,
            "startTimeUnixNano": str(attempt[3]),
            "endTimeUnixNano": str(attempt[4]),
            "attributes": _attempt_attributes(attempt),
            "status": {"code": STATUS_CODE_ERROR} if _attempt_failed(attempt) else {},
        }
    server: ServerSpan = record  # type: ignore[assignment]
    trace_id, span_id, parent, start, end, method, path, route, host, client, status = server
    attributes = [
        _attribute("http.request.method", method),
        _attribute("url.path", path),
        _attribute("http.route", route),
        _attribute("server.address", host),
        _attribute("client.address", client),
    ]
    if status:  # 0: the exchange ended before a response
        attributes.append(_attribute("http.response.status_code", status))
    span: dict[str, Any] = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": f"{method} {route}",
        "kind": SPAN_KIND_SERVER,
        "startTimeUnixNano": str(start),
        "endTimeUnixNano": str(end),
        "attributes": attributes,
        # Semantic conventions: a server span is an error on 5xx only (4xx is the client's).
        "status": {"code": STATUS_CODE_ERROR} if status >= 500 or status == 0 else {},
    }
    if parent:
        span["parentSpanId"] = parent
    return span


def encode_spans(records: Iterable[SpanRecord], service_name: str) -> bytes:
    """An OTLP ``ExportTraceServiceRequest`` in the JSON encoding (one resource, one scope).

    Written as text with the C string quoting of ``json`` (about 3x cheaper than building
    dicts for ``json.dumps``); ``span_dict`` is the same span as a dict, for readers and
    tests."""
    quote = _quote
    parts = []
    for record in records:
        if len(record) == 10:
            parts.append(_encode_attempt(record))  # type: ignore[arg-type]
            continue
        trace_id, span_id, parent, start, end, method, path, route, host, client, status = record  # type: ignore[misc]
        method_q = quote(method)
        route_q = quote(route)
        parts.append(
            f'{{"traceId":"{trace_id}","spanId":"{span_id}",'
            + (f'"parentSpanId":"{parent}",' if parent else "")
            + f'"name":{quote(f"{method} {route}")},"kind":{SPAN_KIND_SERVER},'
            f'"startTimeUnixNano":"{start}","endTimeUnixNano":"{end}","attributes":['
            f'{{"key":"http.request.method","value":{{"stringValue":{method_q}}}}},'
            f'{{"key":"url.path","value":{{"stringValue":{quote(path)}}}}},'
            f'{{"key":"http.route","value":{{"stringValue":{route_q}}}}},'
            f'{{"key":"server.address","value":{{"stringValue":{quote(host)}}}}},'
            f'{{"key":"client.address","value":{{"stringValue":{quote(client)}}}}}'
            + (
                f',{{"key":"http.response.status_code","value":{{"intValue":"{status}"}}}}'
                if status
                else ""
            )
            + "],"
            + (
                f'"status":{{"code":{STATUS_CODE_ERROR}}}}}'
                if status >= 500 or status == 0
                else '"status":{}}'
            )
        )
    return (
        '{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":'
        f'{{"stringValue":{quote(service_name)}}}}}]}},"scopeSpans":[{{"scope":{{"name":'
        f'"{SCOPE_NAME}"}},"spans":[' + ",".join(parts) + "]}]}]}"
    ).encode()


def _int_attribute(key: str, value: int) -> str:
    return f'{{"key":"{key}","value":{{"intValue":"{value}"}}}}'


def _encode_attempt(record: AttemptSpan) -> str:
    """``span_dict`` of an AttemptSpan, as JSON text (see ``encode_spans``)."""
    trace_id, span_id, parent, start, end, method, address, resends, status, error = record
    host, port = _host_port(address)
    quote = _quote
    return (
        f'{{"traceId":"{trace_id}","spanId":"{span_id}","parentSpanId":"{parent}",'
        f'"name":{quote(method)},"kind":{SPAN_KIND_CLIENT},'
        f'"startTimeUnixNano":"{start}","endTimeUnixNano":"{end}","attributes":['
        f'{{"key":"http.request.method","value":{{"stringValue":{quote(method)}}}}},'
        f'{{"key":"server.address","value":{{"stringValue":{quote(host)}}}}},'
        + _int_attribute("server.port", port)
        + ("," + _int_attribute("http.request.resend_count", resends) if resends else "")
        + ("," + _int_attribute("http.response.status_code", status) if status else "")
        + (f',{{"key":"error.type","value":{{"stringValue":{quote(error)}}}}}' if error else "")
        + "],"
        + (
            f'"status":{{"code":{STATUS_CODE_ERROR}}}}}'
            if _attempt_failed(record)
            else '"status":{}}'
        )
    )


def _retry_delay(value: str | None, default: float) -> float | None:
    """Seconds to wait from a Retry-After (delta-seconds only), None when too long."""
    if value is None:
        return default
    try:
        delay = float(value.strip())
    except ValueError:
        return default
    return max(0.0, delay) if delay <= _MAX_RETRY_DELAY else None


class SpanExporter:
    """The queue and background sender of one tracing filter instance."""

    def __init__(
        self,
        endpoint: str,
        *,
        service_name: str = "gateway",
        interval: float = 1.0,
        batch: int = 512,
        queue: int = 4096,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        retry_delay: float = 1.0,
    ) -> None:
        self.endpoint = endpoint
        self.service_name = service_name
        self.interval = interval
        self.batch = batch
        self.queue_size = queue
        self.timeout = timeout
        self.headers = {"content-type": "application/json", **dict(headers or {})}
        self.retry_delay = retry_delay
        self.queue: deque[SpanRecord] = deque()
        self.dropped = 0  # spans not queued (full) or lost with a failed batch
        self.exported = 0
        self.failures = 0  # batches that could not be delivered
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._last_logged = -_LOG_INTERVAL

    # --- the hot side: on_log ----------------------------------------------------------

    def record(self, span: SpanRecord) -> None:
        queue = self.queue
        # After close(), spans of requests still in flight on the old config are taken until
        # the final flush is over.
        if len(queue) >= self.queue_size or (
            self._closed and (self._task is None or self._task.done())
        ):
            self.dropped += 1
            _TOTALS["trace_spans_dropped"] += 1
            return
        queue.append(span)
        if self._task is None:
            self._start()
        elif len(queue) == self.batch and self._wake is not None:
            self._wake.set()

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a sans-IO test): the spans wait in the queue
            return
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="otlp-exporter")
        _EXPORTERS.add(self)

    # --- the background side -------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval
        try:
            while not self._closed:
                if len(self.queue) < self.batch:
                    wait = due - loop.time()
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), wait)
                wake.clear()
                if loop.time() >= due:
                    await self.flush()
                    due = loop.time() + self.interval
                else:  # woken by a full batch: send full batches only, the rest waits
                    while len(self.queue) >= self.batch:
                        await self._export(self._take(self.batch))
            await self.flush()  # closed: what is left goes now
        finally:
            await self._close_session()
            _EXPORTERS.discard(self)

    def _take(self, count: int) -> list[SpanRecord]:
        popleft = self.queue.popleft
        return [popleft() for _ in range(count)]

    async def flush(self) -> None:
        """Send everything queued now, ``batch`` spans per request."""
        while self.queue:
            await self._export(self._take(min(self.batch, len(self.queue))))

    async def _export(self, spans: list[SpanRecord]) -> None:
        import aiohttp

        body = encode_spans(spans, self.service_name)
        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession()
            for attempt in (1, 2):
                async with self._session.post(
                    self.endpoint,
                    data=body,
                    headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                ) as answer:
                    await answer.read()
                    status, retry_after = answer.status, answer.headers.get("retry-after")
                if 200 <= status < 300:
                    self.exported += len(spans)
                    _TOTALS["trace_spans_exported"] += len(spans)
                    return
                delay = _retry_delay(retry_after, self.retry_delay)
                if attempt == 2 or status not in _RETRYABLE or delay is None:
                    self._failed(len(spans), f"HTTP {status}")
                    return
                await asyncio.sleep(delay)  # OTLP: retry a throttled or unavailable receiver
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            self._failed(len(spans), f"{type(error).__name__}: {error}")

    def _failed(self, count: int, why: str) -> None:
        self.failures += 1
        self.dropped += count
        _TOTALS["trace_export_failures"] += 1
        _TOTALS["trace_spans_dropped"] += count
        now = time.monotonic()
        if now - self._last_logged >= _LOG_INTERVAL:
            self._last_logged = now
            log.warning(
                "tracing: %d spans not exported to %s: %s (%d batches failed so far)",
                count,
                self.endpoint,
                why,
                self.failures,
            )

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- stopping -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop after sending what is queued (the config was replaced)."""
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is None or self._task.done():
            _EXPORTERS.discard(self)

    async def stop(self, grace: float | None = None) -> None:
        """Close and wait (up to ``grace`` s, default the export timeout) for the last batch."""
        self.close()
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), grace or self.timeout + 1.0)
            except TimeoutError:
                task.cancel()
        _EXPORTERS.discard(self)


async def stop_exporters(grace: float = 2.0) -> None:
    """Process shutdown: send what every exporter still holds (bounded by ``grace`` s)."""
    exporters = live_exporters()
    if exporters:
        await asyncio.gather(*(exporter.stop(grace) for exporter in exporters))
