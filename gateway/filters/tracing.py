"""``tracing``: W3C Trace Context (https://www.w3.org/TR/trace-context/) at the gateway.

A request with a valid ``traceparent`` continues its trace: the gateway is a new span (a fresh
parent-id for the upstream) with the same trace-id, and the caller's sampled flag is kept
(``respect_parent``). Otherwise a new trace starts, sampled with probability ``sample_rate``.
``tracestate`` goes on unchanged when the ``traceparent`` was valid, and is dropped when it was
not (§3.3.1: a vendor that cannot parse traceparent must not use tracestate). The trace id goes
into ``request.vars["trace_id"]``, which the access log writes.

With ``export``, every sampled request becomes one SERVER span (the gateway's) whose parent is
the caller's span, and each upstream try one CLIENT span under it (``RequestInfo.attempts``).
As in Envoy, the parent-id sent upstream is the try's span id: the first try's id goes into
``traceparent`` at the request phase, and ``RequestInfo.retry_head`` puts a fresh one in the
head of every later try (retries and hedges), so each upstream's spans nest under the try that
reached it. Spans are recorded in ``on_log`` and sent over OTLP/HTTP in batches by
``gateway.filters.otlp.SpanExporter`` (off the request path).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from typing import Any

from gateway.filters.base import Filter, RequestInfo, ResponseInfo
from gateway.filters.otlp import SpanExporter

__all__ = ["TracingFilter", "parse_traceparent"]

# §3.2.2: version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# Where the parent-id of the traceparent this filter wrote starts, from the field's "\r\n":
# "\r\n" + "traceparent: " + "00-" + 32 hex + "-" (headers.build_request_head writes
# "name: value").
_FIELD = b"\r\ntraceparent: 00-"
_PARENT_AT = len(_FIELD) + 33
_MAX_TRACESTATE = 512  # §3.3.1.1: at least 512 characters must be propagated; beyond may go


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, int] | None:
    """(trace-id, parent-id, flags) of a valid traceparent, else None (W3C §3.2.2-§3.2.4)."""
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    if version == b"ff":  # §3.2.2.3: version ff is invalid
        return None
    if version == b"00" and len(value) != 55:  # version 00 has exactly these four fields
        return None
    if len(value) > 55 and value[55:56] != b"-":  # a later version may append "-" fields
        return None
    if trace_id == b"0" * 32 or parent_id == b"0" * 16:  # §3.2.2.4/5: all zeros is invalid
        return None
    return trace_id, parent_id, int(flags, 16)


class TracingFilter(Filter):
    name = "tracing"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.sample_rate = float(options.get("sample_rate", 1.0))
        self.respect_parent = bool(options.get("respect_parent", True))
        header = options.get("response_header")
        self.response_header: bytes | None = header.encode("ascii") if header else None
        self._random = random.Random()
        if self.response_header is None:
            self.on_response_headers = Filter.on_response_headers.__get__(self)  # type: ignore[method-assign]
        export = options.get("export")
        self.exporter: SpanExporter | None = None
        if export:
            self.exporter = SpanExporter(
                export["endpoint"],
                service_name=export.get("service_name", "gateway"),
                interval=float(export.get("interval", 1.0)),
                batch=int(export.get("batch", 512)),
                queue=int(export.get("queue", 4096)),
                timeout=float(export.get("timeout", 5.0)),
                headers=dict(export.get("headers") or {}),
            )
        else:
            self.on_log = Filter.on_log.__get__(self)  # type: ignore[method-assign]
        self._retry_head = self.retry_head  # bound once: requests store it, no new object

    def on_request_headers(self, request: RequestInfo) -> None:
        headers = request.headers
        parent: bytes | None = None
        parents = 0
        state = False
        for name, value in headers:
            if name == b"traceparent":
                parent = value
                parents += 1
            elif name == b"tracestate":
                state = True
        parsed = parse_traceparent(parent.strip()) if parents == 1 and parent else None
        bits = self._random.getrandbits
        span_id = b"%016x" % (bits(64) or 1)
        vars_ = request.vars
        if parsed is not None:
            trace_id, parent_id, flags = parsed
            sampled = bool(flags & 1) if self.respect_parent else self._sample()
            vars_["parent_span_id"] = parent_id.decode("ascii")
        else:
            trace_id = b"%032x" % (bits(128) or 1)
            sampled = self._sample()
        if parents or state:
            # Without a valid traceparent, tracestate goes too (§3.3.1); an oversized one
            # always does (§3.3.1.1 lets a vendor drop what is beyond 512 characters).
            keep_state = parsed is not None
            headers[:] = [
                item
                for item in headers
                if item[0] != b"traceparent"
                and (item[0] != b"tracestate" or (keep_state and len(item[1]) <= _MAX_TRACESTATE))
            ]
        sent_id = span_id
        if sampled and self.exporter is not None:
            # The first upstream try's span: its id is the parent-id the upstream sees.
            sent_id = b"%016x" % (bits(64) or 1)
            vars_["attempt_span_id"] = sent_id.decode("ascii")
            request.retry_head = self._retry_head
        headers.append(
            (b"traceparent", b"00-" + trace_id + b"-" + sent_id + (b"-01" if sampled else b"-00"))
        )
        vars_["trace_id"] = trace_id.decode("ascii")
        vars_["span_id"] = span_id.decode("ascii")
        vars_["sampled"] = sampled

    def _sample(self) -> bool:
        rate = self.sample_rate
        return rate >= 1.0 or (rate > 0.0 and self._random.random() < rate)

    def on_response_headers(self, response: ResponseInfo) -> None:
        trace_id = response.request.vars.get("trace_id")
        if trace_id is not None and self.response_header is not None:
            response.headers.append((self.response_header, trace_id.encode("ascii")))

    def retry_head(self, head: bytes) -> tuple[bytes, str]:
        """A later try of a sampled request: the same head with a new parent-id (the try's
        span id, its label). A head without this filter's traceparent goes unchanged."""
        at = head.find(_FIELD)
        if at < 0:
            return head, ""
        start = at + _PARENT_AT
        span_id = b"%016x" % (self._random.getrandbits(64) or 1)
        return head[:start] + span_id + head[start + 16 :], span_id.decode("ascii")

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        vars_ = request.vars
        if not vars_.get("sampled") or self.exporter is None:
            return
        end = time.time_ns()
        trace_id = vars_["trace_id"]
        span_id = vars_["span_id"]
        record = self.exporter.record
        record(
            (
                trace_id,
                span_id,
                vars_.get("parent_span_id", ""),
                end - int(duration_s * 1e9),
                end,
                request.method,
                request.path,
                request.route,
                request.host,
                request.client_ip,
                status,
            )
        )
        attempts = request.attempts
        if not attempts:
            return
        # Attempt times are perf_counter seconds: placed on the wall clock from now.
        now = time.perf_counter()
        first_id = vars_.get("attempt_span_id", "")
        method = request.method
        for resends, (address, start, stop, label, outcome) in enumerate(attempts):
            code = status
            error = ""
            if outcome:  # the try failed: a status code it answered, or why it ended
                code = int(outcome) if outcome.isdigit() else 0
                if not code:
                    error = outcome
            record(
                (
                    trace_id,
                    label or first_id,
                    span_id,
                    end - int((now - start) * 1e9),
                    end - int((now - stop) * 1e9),
                    method,
                    address,
                    resends,
                    code,
                    error,
                )
            )

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
