"""The filter chain (gateway.filters.chain) against the api.py objects: order, local replies,
async hooks, failures turned into 500s and counted, and how chains are compiled into
snapshots (global -> route -> upstream, kept across discovery updates, rebuilt on reload)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gateway.config import load_config_text
from gateway.filters.api import SUSPENDED, LocalReply, RequestInfo, ResponseInfo
from gateway.filters.base import (
    Filter,
    Pending,
    add_header,
    get_header,
    get_headers,
    overridden_hooks,
    remove_header,
    set_header,
)
from gateway.filters.chain import Chain, count_filter_errors, filter_error_count
from gateway.metrics import GatewayMetrics
from gateway.snapshot import build_snapshot
from tests.filters_support import request, response


class Recorder(Filter):
    """Appends its tag to request.vars["seen"] in every phase."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.name = tag

    def on_request_headers(self, request: RequestInfo) -> None:
        request.vars.setdefault("seen", []).append(f"req:{self.tag}")

    def on_response_headers(self, response: ResponseInfo) -> None:
        response.request.vars.setdefault("seen", []).append(f"resp:{self.tag}")

    def on_response_body(self, response: ResponseInfo, chunk: bytes, end: bool) -> bytes:
        return chunk + self.tag.encode()

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        request.vars.setdefault("seen", []).append(f"log:{self.tag}")


class Answer(Filter):
    name = "answer"

    def on_request_headers(self, request: RequestInfo) -> LocalReply:
        return LocalReply(418, [(b"x-by", b"answer")], b"short and stout")


class Boom(Filter):
    name = "boom"

    def on_request_headers(self, request: RequestInfo) -> None:
        raise RuntimeError("broken filter")

    def on_response_headers(self, response: ResponseInfo) -> None:
        raise RuntimeError("broken response filter")

    def on_response_body(self, response: ResponseInfo, chunk: bytes, end: bool) -> bytes:
        raise RuntimeError("broken body filter")


class SlowAuth(Filter):
    """An explicit async hook (forward-auth style)."""

    name = "slow_auth"

    def __init__(self, allow: bool, fail: bool = False) -> None:
        super().__init__()
        self.allow = allow
        self.fail = fail

    async def on_request_headers(self, request: RequestInfo) -> LocalReply | None:  # type: ignore[override]
        await asyncio.sleep(0)
        if self.fail:
            raise ConnectionError("auth service down")
        request.vars.setdefault("seen", []).append("req:slow_auth")
        return None if self.allow else LocalReply(401)


class SometimesPending(Filter):
    """A sync hook that waits only when told to (the JWKS-refresh pattern)."""

    name = "sometimes"

    def on_request_headers(self, request: RequestInfo) -> Pending | None:
        if request.headers:
            return None

        async def later() -> None:
            await asyncio.sleep(0)
            request.vars["waited"] = True

        return Pending(later())


class Empty(Filter):
    name = "empty"


def test_request_hooks_run_in_order_and_response_hooks_in_reverse() -> None:
    chain = Chain("r", [Recorder("a"), Recorder("b"), Recorder("c")])
    req = request()
    assert chain.on_request_headers(req, lambda _: None) is None
    resp = response(req)
    chain.on_response_headers(resp)
    assert chain.on_response_body(resp, b"x", True) == b"xcba"
    chain.on_log(req, 200, 0.01)
    assert req.vars["seen"] == [
        "req:a",
        "req:b",
        "req:c",
        "resp:c",
        "resp:b",
        "resp:a",
        "log:a",
        "log:b",
        "log:c",
    ]


def test_a_local_reply_stops_the_chain() -> None:
    chain = Chain("r", [Recorder("a"), Answer(), Recorder("b")])
    req = request()
    reply = chain.on_request_headers(req, lambda _: None)
    assert isinstance(reply, LocalReply) and reply.status == 418
    assert req.vars["seen"] == ["req:a"]


@pytest.mark.parametrize(
    ("filters", "flags"),
    [
        # (request_body, response_headers, response_body, log)
        ([Empty()], (False, False, False, False)),
        ([Answer()], (False, False, False, False)),
        ([Recorder("a")], (False, True, True, True)),
        ([Boom()], (False, True, True, False)),
    ],
    ids=["empty", "request-only", "all-phases", "response-phases"],
)
def test_wants_flags_follow_the_overridden_hooks(
    filters: list[Filter], flags: tuple[bool, bool, bool, bool]
) -> None:
    chain = Chain("r", filters)
    assert (
        chain.wants_request_body,
        chain.wants_response_headers,
        chain.wants_response_body,
        chain.wants_log,
    ) == flags


def test_overridden_hooks_detects_async() -> None:
    assert overridden_hooks(SlowAuth) == {"on_request_headers": True}
    assert overridden_hooks(Answer) == {"on_request_headers": False}
    assert overridden_hooks(Empty) == {}


def test_an_async_response_hook_is_refused() -> None:
    class Bad(Filter):
        async def on_response_headers(self, response: ResponseInfo) -> None:  # type: ignore[override]
            return None

    with pytest.raises(TypeError, match="only on_request_headers may be async"):
        Chain("r", [Bad()])


def test_a_raising_request_hook_is_a_500_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    metrics = GatewayMetrics()
    count_filter_errors(metrics.filter_error)
    try:
        before = filter_error_count("r-boom", "boom")
        chain = Chain("r-boom", [Boom(), Recorder("after")])
        req = request()
        with caplog.at_level(logging.ERROR, "gateway.filters"):
            reply = chain.on_request_headers(req, lambda _: None)
        assert isinstance(reply, LocalReply) and reply.status == 500
        assert "seen" not in req.vars  # the filters after it did not run
        assert filter_error_count("r-boom", "boom") == before + 1
        assert metrics.filter_errors[("r-boom", "boom")] == 1
        assert "broken filter" in caplog.text and "route r-boom" in caplog.text
    finally:
        count_filter_errors(None)


def test_response_phase_errors_pass_the_response_unchanged() -> None:
    chain = Chain("r-resp", [Recorder("a"), Boom()])
    req = request()
    before = filter_error_count("r-resp", "boom")
    resp = response(req, 200, [(b"content-type", b"text/plain")])
    chain.on_response_headers(resp)
    assert resp.status == 200 and resp.headers == [(b"content-type", b"text/plain")]
    assert chain.on_response_body(resp, b"body", True) == b"bodya"
    assert filter_error_count("r-resp", "boom") == before + 2
    assert req.vars["seen"] == ["resp:a"]


def test_a_hook_returning_garbage_is_a_500() -> None:
    class Garbage(Filter):
        name = "garbage"

        def on_request_headers(self, request: RequestInfo) -> Any:
            return "yes"

    reply = Chain("r", [Garbage()]).on_request_headers(request(), lambda _: None)
    assert isinstance(reply, LocalReply) and reply.status == 500


async def _run_suspended(chain: Chain, req: RequestInfo) -> list[LocalReply | None]:
    resumed: list[LocalReply | None] = []
    done = asyncio.Event()

    def resume(reply: LocalReply | None) -> None:
        resumed.append(reply)
        done.set()

    assert chain.on_request_headers(req, resume) is SUSPENDED
    await asyncio.wait_for(done.wait(), 5)
    return resumed


@pytest.mark.parametrize(
    ("filters", "expected_status", "seen"),
    [
        ([Recorder("a"), SlowAuth(True), Recorder("b")], None, ["req:a", "req:slow_auth", "req:b"]),
        ([SlowAuth(False), Recorder("b")], 401, ["req:slow_auth"]),
        ([SlowAuth(True, fail=True), Recorder("b")], 500, None),
        ([SlowAuth(True), SlowAuth(True), Recorder("b")], None, ["req:slow_auth"] * 2 + ["req:b"]),
        ([SlowAuth(True), Answer(), Recorder("b")], 418, ["req:slow_auth"]),
        ([SlowAuth(True), Boom()], 500, ["req:slow_auth"]),
    ],
    ids=["passes", "refuses", "raises", "two-async", "sync-reply-after", "sync-raise-after"],
)
async def test_async_hooks_suspend_and_resume_once(
    filters: list[Filter], expected_status: int | None, seen: list[str] | None
) -> None:
    req = request()
    resumed = await _run_suspended(Chain("r", filters), req)
    assert len(resumed) == 1
    status = resumed[0].status if resumed[0] is not None else None
    assert status == expected_status
    assert req.vars.get("seen") == seen


async def test_pending_from_a_sync_hook_waits_only_when_returned() -> None:
    chain = Chain("r", [SometimesPending(), Recorder("b")])
    quick = request(headers=[(b"x", b"1")])
    assert chain.on_request_headers(quick, lambda _: None) is None
    slow = request()
    assert await _run_suspended(chain, slow) == [None]
    assert slow.vars["waited"] is True and slow.vars["seen"] == ["req:b"]


def test_header_helpers() -> None:
    headers = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert get_header(headers, "A") == b"1"
    assert get_headers(headers, b"a") == [b"1", b"3"]
    set_header(headers, "a", "x")
    assert headers == [(b"a", b"x"), (b"b", b"2")]
    add_header(headers, b"b", b"y")
    assert get_headers(headers, "b") == [b"2", b"y"]
    assert remove_header(headers, "b") == 2
    assert headers == [(b"a", b"x")]
    set_header(headers, "new", "v")
    assert headers[-1] == (b"new", b"v")
    # RFC 9110 §5.5: no CR/LF/NUL in a value (header injection).
    for bad in (b"v\r\nx-evil: 1", b"v\nx", b"v\x00"):
        with pytest.raises(ValueError):
            set_header(headers, "a", bad)


# --- compilation into snapshots ---------------------------------------------------------------

CONFIG = """
upstreams:
  u1:
    instances: [127.0.0.1:9001]
    filters:
      - headers: {request: {set: {x-order: "{var.order}-upstream"}}}
  u2: {instances: [127.0.0.1:9002]}
filters:
  - python: {class: "tests.unit.test_filters_chain:Tagger", config: {tag: global}}
routes:
  - name: with-route-filters
    upstream: u1
    filters:
      - python: {class: "tests.unit.test_filters_chain:Tagger", config: {tag: route}}
  - name: global-only
    upstream: u2
"""


class Tagger(Filter):
    """Appends its configured tag to request.vars["order"]."""

    @classmethod
    def validate_config(cls, options: Any) -> list[str]:
        return [] if isinstance(options.get("tag"), str) else ["tag: a string is required"]

    def on_request_headers(self, request: RequestInfo) -> None:
        tag = self.options["tag"]
        previous = request.vars.get("order")
        request.vars["order"] = tag if previous is None else f"{previous}-{tag}"


class _NoPool:
    """Stands in for a connection pool: these tests never connect."""

    def close_all(self) -> None:
        pass


def _no_pool(*args: Any, **kwargs: Any) -> Any:
    return _NoPool()


def _snapshot(text: str, previous: Any = None) -> Any:
    return build_snapshot(load_config_text(text), previous, new_pool=_no_pool)


def test_chains_run_global_then_route_then_upstream_filters() -> None:
    snapshot = _snapshot(CONFIG)
    assert set(snapshot.filters) == {"with-route-filters", "global-only"}
    req = request()
    assert snapshot.filters["with-route-filters"].on_request_headers(req, lambda _: None) is None
    assert req.vars["order"] == "global-route"
    assert get_header(req.headers, "x-order") == b"global-route-upstream"
    # One global instance for every route.
    global_a = snapshot.filters["with-route-filters"].filters[0]
    assert snapshot.filters["global-only"].filters == (global_a,)
    assert global_a.name == "tests.unit.test_filters_chain:Tagger"


def test_routes_without_filters_have_no_chain() -> None:
    snapshot = _snapshot(
        "upstreams: {u: {instances: [127.0.0.1:9001]}}\nroutes: [{name: r, upstream: u}]\n"
    )
    assert snapshot.filters == {}


def test_chains_survive_snapshots_of_the_same_config_and_are_rebuilt_on_reload() -> None:
    config = load_config_text(CONFIG)
    first = build_snapshot(config, None, new_pool=_no_pool)
    discovery_update = build_snapshot(config, first, {"u2": ()}, new_pool=_no_pool)
    assert discovery_update.filters["global-only"] is first.filters["global-only"]
    reload = build_snapshot(load_config_text(CONFIG), discovery_update, new_pool=_no_pool)
    assert reload.filters["global-only"] is not first.filters["global-only"]


def test_filter_error_metric_is_exported_merged_and_rendered() -> None:
    worker_a, worker_b, total = GatewayMetrics(), GatewayMetrics(), GatewayMetrics()
    worker_a.filter_error("r", "jwt")
    worker_b.filter_error("r", "jwt")
    worker_b.filter_error("r", "cors")
    total.merge_state(worker_a.export_state())
    total.merge_state(worker_b.export_state())
    assert total.filter_errors == {("r", "jwt"): 2, ("r", "cors"): 1}
    (family,) = [f for f in total.families() if f.name == "gateway_filter_errors"]
    samples = {(s.labels["route"], s.labels["filter"]): s.value for s in family.samples}
    assert samples == {("r", "jwt"): 2, ("r", "cors"): 1}


def test_suspending_outside_an_event_loop_is_a_500_not_an_exception() -> None:
    reply = Chain("r", [SlowAuth(True)]).on_request_headers(request(), lambda _: None)
    assert isinstance(reply, LocalReply) and reply.status == 500
