"""The tracing filter against W3C Trace Context (Level 1): traceparent parsing (§3.2), trace
continuation with a new span, restart on invalid input, tracestate handling (§3.3), sampling."""

from __future__ import annotations

import pytest

from gateway.filters.chain import Chain
from gateway.filters.tracing import parse_traceparent
from tests.filters_support import filter_from_yaml, request, response

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"
VALID = b"00-" + TRACE + b"-" + PARENT + b"-01"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (VALID, (TRACE, PARENT, 1)),
        (b"00-" + TRACE + b"-" + PARENT + b"-00", (TRACE, PARENT, 0)),
        (b"00-" + TRACE + b"-" + PARENT + b"-09", (TRACE, PARENT, 9)),  # other flag bits kept
        (b"ff-" + TRACE + b"-" + PARENT + b"-01", None),  # §3.2.2.3: version ff is invalid
        (b"00-" + b"0" * 32 + b"-" + PARENT + b"-01", None),  # §3.2.2.4: all-zero trace-id
        (b"00-" + TRACE + b"-" + b"0" * 16 + b"-01", None),  # §3.2.2.5: all-zero parent-id
        (b"00-" + TRACE.upper() + b"-" + PARENT + b"-01", None),  # lowercase hex only
        (VALID + b"-extra", None),  # version 00 has exactly four fields
        (b"01-" + TRACE + b"-" + PARENT + b"-01-future", (TRACE, PARENT, 1)),  # §3.2.4 later
        (b"01-" + TRACE + b"-" + PARENT + b"-01x", None),
        (b"00-" + TRACE[:-1] + b"-" + PARENT + b"-01", None),
        (b"", None),
    ],
)
def test_parse_traceparent(value: bytes, parsed: tuple[bytes, bytes, int] | None) -> None:
    assert parse_traceparent(value) == parsed


def _traced(headers: list[tuple[bytes, bytes]], options: str = "{}") -> tuple[dict, list]:  # type: ignore[type-arg]
    req = request(headers=headers)
    assert filter_from_yaml(f"tracing: {options}").on_request_headers(req) is None
    return req.vars, req.headers


def test_a_valid_trace_continues_with_a_new_span() -> None:
    vars_, headers = _traced([(b"traceparent", VALID), (b"tracestate", b"congo=t61rcWkgMzE")])
    (sent,) = [v for n, v in headers if n == b"traceparent"]
    parsed = parse_traceparent(sent)
    assert parsed is not None
    trace_id, span_id, flags = parsed
    assert trace_id == TRACE and span_id != PARENT and flags == 1
    assert vars_["trace_id"] == TRACE.decode() and vars_["parent_span_id"] == PARENT.decode()
    assert vars_["span_id"] == span_id.decode()
    assert (b"tracestate", b"congo=t61rcWkgMzE") in headers  # §3.3: passed on unchanged


@pytest.mark.parametrize(
    "incoming",
    [
        [(b"traceparent", b"garbage"), (b"tracestate", b"congo=x")],
        [(b"traceparent", VALID), (b"traceparent", VALID)],  # two fields: not one value
        [(b"tracestate", b"congo=x")],
    ],
)
def test_an_invalid_or_missing_traceparent_starts_a_new_trace(
    incoming: list[tuple[bytes, bytes]],
) -> None:
    vars_, headers = _traced(incoming)
    (sent,) = [v for n, v in headers if n == b"traceparent"]
    parsed = parse_traceparent(sent)
    assert parsed is not None and parsed[0] != TRACE
    assert vars_["trace_id"] == parsed[0].decode()
    assert not any(n == b"tracestate" for n, _ in headers)  # §3.3.1: not used without parent


@pytest.mark.parametrize(
    ("options", "incoming_flags", "sampled"),
    [
        ("{sample_rate: 0}", b"01", True),  # the caller decided
        ("{sample_rate: 1}", b"00", False),
        ("{sample_rate: 0, respect_parent: false}", b"01", False),
        ("{sample_rate: 1, respect_parent: false}", b"00", True),
    ],
)
def test_sampling_follows_the_parent_unless_told_not_to(
    options: str, incoming_flags: bytes, sampled: bool
) -> None:
    value = b"00-" + TRACE + b"-" + PARENT + b"-" + incoming_flags
    vars_, headers = _traced([(b"traceparent", value)], options)
    (sent,) = [v for n, v in headers if n == b"traceparent"]
    assert sent.endswith(b"-01" if sampled else b"-00") and vars_["sampled"] is sampled


def test_new_traces_are_sampled_at_the_configured_rate() -> None:
    item = filter_from_yaml("tracing: {sample_rate: 0.25}")
    sampled = 0
    for _ in range(4000):
        req = request()
        item.on_request_headers(req)
        sampled += req.vars["sampled"]
    assert 800 < sampled < 1200  # 1000 expected; 5 standard deviations is about ±137


def test_trace_id_in_a_response_header() -> None:
    chain = Chain("r", [filter_from_yaml("tracing: {response_header: x-trace-id}")])
    req = request(headers=[(b"traceparent", VALID)])
    chain.on_request_headers(req, lambda _: None)
    resp = response(req)
    chain.on_response_headers(resp)
    assert (b"x-trace-id", TRACE) in resp.headers
    assert not Chain("r", [filter_from_yaml("tracing: {}")]).wants_response_headers


def test_an_oversized_tracestate_is_dropped() -> None:
    # §3.3.1.1: vendors must propagate at least 512 characters; beyond may be dropped.
    _, headers = _traced([(b"traceparent", VALID), (b"tracestate", b"a=" + b"x" * 600)])
    assert not any(n == b"tracestate" for n, _ in headers)
    _, headers = _traced([(b"traceparent", VALID), (b"tracestate", b"a=" + b"x" * 500)])
    assert any(n == b"tracestate" for n, _ in headers)
