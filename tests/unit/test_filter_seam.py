"""The filter seam (gateway/filters/api.py, gateway/proxy/filtering.py), sans-IO: small test
chains on a route, driven through the data plane with the fake transports of the harness."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.filters.api import (
    SUSPENDED,
    FilterChain,
    LocalReply,
    RequestInfo,
    ResponseInfo,
    Resume,
)
from gateway.filters.base import Filter, set_header
from gateway.filters.chain import Chain
from gateway.filters.mirror import MirrorFilter
from tests.unit.dataplane_harness import NOTHING_IN_FLIGHT, Harness, config, request, response

TWO_UPSTREAMS = (
    "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"
    "upstreams:\n"
    "  app: {instances: [10.0.0.1:80]}\n"
    "  canary: {instances: [10.0.0.2:80]}\n"
    "routes:\n"
    "  - {name: main, match: {path: {prefix: /}}, upstream: app}\n"
)


class TestChain:
    """A chain whose hooks do what the test sets; it records every call."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        *,
        outcome: Any = None,
        on_request: Any = None,
        on_response: Any = None,
        on_body: Any = None,
        on_request_chunk: Any = None,
        route: str = "main",
    ) -> None:
        self.route = route
        self.wants_request_headers = True
        self.wants_request_body = on_request_chunk is not None
        self.on_request_chunk = on_request_chunk
        self.request_chunks: list[tuple[bytes, bool]] = []
        self.wants_response_headers = on_response is not None
        self.wants_response_body = on_body is not None
        self.wants_log = True
        self.request_phase_only = False
        self.outcome = outcome
        self.on_request = on_request
        self.on_response = on_response
        self.on_body = on_body
        self.calls: list[str] = []
        self.resume: Resume | None = None
        self.requests: list[RequestInfo] = []
        self.logged: list[int] = []
        self.chunks: list[tuple[bytes, bool]] = []

    def on_request_headers(self, request: RequestInfo, resume: Resume | None = None) -> Any:
        self.calls.append("request_headers")
        self.requests.append(request)
        self.resume = resume if resume is not None else request.resume  # type: ignore[attr-defined]
        if self.on_request is not None:
            self.on_request(request)
        return self.outcome

    def on_request_body(self, request: RequestInfo, chunk: bytes, end: bool) -> bytes:
        self.request_chunks.append((chunk, end))
        result: bytes = self.on_request_chunk(chunk, end)
        return result

    def on_response_headers(self, response: ResponseInfo) -> None:
        self.calls.append("response_headers")
        self.on_response(response)

    def on_response_body(self, response: ResponseInfo, chunk: bytes, end: bool) -> bytes:
        self.chunks.append((chunk, end))
        result: bytes = self.on_body(chunk, end)
        return result

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        self.logged.append(status)


def install(h: Harness, chain: TestChain, route: str = "main") -> None:
    chains: dict[str, FilterChain] = {route: chain}
    h.snapshot = dataclasses.replace(h.snapshot, filters=chains)
    h.server.set_snapshot(h.snapshot)


def test_a_route_without_a_chain_never_builds_request_info() -> None:
    with Harness(config()) as h:
        chain = TestChain()
        install(h, chain, route="another-route")
        c = h.client()
        c.send(request())
        h.upstream().respond(response(200, b"plain"))
        [answer] = c.responses()
        assert (answer.status, answer.body) == (200, b"plain")
        assert chain.calls == [] and chain.logged == []


def test_request_info_describes_the_request() -> None:
    with Harness(config()) as h:
        chain = TestChain()
        install(h, chain)
        c = h.client()
        c.send(request("GET", "/a/./b?x=1", headers=(("X-Request-Id", "abc-123"),)))
        h.upstream().respond(response())
        [info] = chain.requests
        assert (info.method, info.path, info.query, info.host) == ("GET", "/a/b", "x=1", "gw.test")
        assert (info.route, info.request_id, info.protocol, info.tls) == (
            "main",
            "abc-123",
            "http/1.1",
            False,
        )
        assert info.client_ip == c.transport.peer[0]
        assert chain.logged == [200]


# (name, method, reply, expected status, expected body, connection kept)
LOCAL_REPLIES = [
    (
        "401 with a body",
        "GET",
        LocalReply(401, [(b"www-authenticate", b"Bearer")], b"no"),
        401,
        b"no",
        True,
    ),
    (
        "204 preflight",
        "OPTIONS",
        LocalReply(204, [(b"access-control-allow-origin", b"*")]),
        204,
        b"",
        True,
    ),
    ("403 to HEAD has no body", "HEAD", LocalReply(403, [], b"forbidden"), 403, b"", True),
]


@pytest.mark.parametrize(
    ("method", "reply", "status", "body", "kept"),
    [case[1:] for case in LOCAL_REPLIES],
    ids=[case[0] for case in LOCAL_REPLIES],
)
def test_a_local_reply_answers_without_the_upstream(
    method: str, reply: LocalReply, status: int, body: bytes, kept: bool
) -> None:
    with Harness(config()) as h:
        chain = TestChain(outcome=reply)
        install(h, chain)
        c = h.client()
        c.send(request(method, "/x"))
        [answer] = c.responses(head_requests=1 if method == "HEAD" else 0)
        assert (answer.status, answer.body) == (status, body)
        for name, value in reply.headers:
            assert answer.header(name) == value
        assert answer.header(b"x-request-id")
        assert h.connects == []
        assert c.closed is not kept
        assert chain.logged == [status]
        h.run()
        assert h.in_flight() == dict(NOTHING_IN_FLIGHT, client_connections=1)


def test_a_suspended_request_goes_on_when_resumed() -> None:
    with Harness(config()) as h:
        chain = TestChain(outcome=SUSPENDED)
        install(h, chain)
        c = h.client()
        c.send(request("POST", "/pay", body=b"amount=1"))
        assert h.connects == [] and c.responses() == []
        assert chain.resume is not None
        chain.resume(None)
        h.run()
        u = h.upstream()
        assert u.received().endswith(b"\r\n\r\namount=1")
        u.respond(response(200, b"paid"))
        [answer] = c.responses()
        assert (answer.status, answer.body) == (200, b"paid")
        chain.resume(None)  # a second resume changes nothing
        h.run()
        assert len(h.connects) == 1 and len(c.responses()) == 1


def test_a_suspended_request_can_be_answered_on_resume() -> None:
    with Harness(config()) as h:
        chain = TestChain(outcome=SUSPENDED)
        install(h, chain)
        c = h.client()
        c.send(request())
        assert chain.resume is not None
        chain.resume(LocalReply(429, [(b"retry-after", b"1")], b"slow down"))
        [answer] = c.responses()
        assert (answer.status, answer.body, answer.header(b"retry-after")) == (
            429,
            b"slow down",
            b"1",
        )
        assert h.connects == []


def test_a_resume_after_the_client_went_away_is_dropped() -> None:
    with Harness(config()) as h:
        chain = TestChain(outcome=SUSPENDED)
        install(h, chain)
        c = h.client()
        c.send(request())
        c.disconnect()
        assert chain.resume is not None
        chain.resume(None)
        h.run()
        assert h.connects == []
        assert h.in_flight() == NOTHING_IN_FLIGHT


def test_request_header_changes_reach_the_upstream() -> None:
    def edit(info: RequestInfo) -> None:
        info.headers[:] = [(n, v) for n, v in info.headers if n != b"x-secret"]
        info.headers.append((b"x-consumer", b"alice"))
        info.vars["consumer"] = "alice"

    for framing in ((), (("Transfer-Encoding", "chunked"),)):
        with Harness(config()) as h:
            install(h, TestChain(on_request=edit))
            c = h.client()
            body = b"3\r\nabc\r\n0\r\n\r\n" if framing else b""
            c.send(request("POST", "/", headers=(("X-Secret", "s"), *framing), body=body))
            u = h.upstream()
            fields = u.request_headers()
            assert fields[b"x-consumer"] == b"alice" and b"x-secret" not in fields
            if framing:
                assert u.received().endswith(b"3\r\nabc\r\n0\r\n\r\n")


@pytest.mark.parametrize(("target", "address"), [("canary", "10.0.0.2:80"), (None, "10.0.0.1:80")])
def test_request_info_upstream_overrides_the_routes(target: str | None, address: str) -> None:
    def split(info: RequestInfo) -> None:
        info.upstream = target

    with Harness(TWO_UPSTREAMS) as h:
        install(h, TestChain(on_request=split))
        c = h.client()
        c.send(request())
        u = h.upstream()
        assert u.address == address
        u.respond(response())
        assert c.responses()[0].status == 200


def test_an_unknown_upstream_from_a_filter_is_a_500() -> None:
    def split(info: RequestInfo) -> None:
        info.upstream = "nowhere"

    with Harness(config()) as h:
        install(h, TestChain(on_request=split))
        c = h.client()
        c.send(request())
        [answer] = c.responses()
        assert answer.status == 500 and h.connects == []


def test_response_headers_can_change_status_and_fields() -> None:
    def edit(info: ResponseInfo) -> None:
        info.status = 203
        info.headers = [(n, v) for n, v in info.headers if n != b"server"]
        info.headers.append((b"x-filtered", b"yes"))

    with Harness(config()) as h:
        chain = TestChain(on_response=edit)
        install(h, chain)
        c = h.client()
        c.send(request())
        h.upstream().respond(response(200, b"body", headers=(("Server", "app"),)))
        [answer] = c.responses()
        assert (answer.status, answer.body) == (203, b"body")
        assert answer.header(b"x-filtered") == b"yes" and answer.header(b"server") is None
        assert answer.header(b"content-length") == b"4"
        assert chain.logged == [203]


# RFC 9112 §6.1/§6.3: without Content-Length an HTTP/1.1 body is chunked, an HTTP/1.0 one ends
# with the connection.
@pytest.mark.parametrize(
    ("version", "transfer_encoding", "connection"),
    [("1.1", b"chunked", None), ("1.0", None, b"close")],
)
def test_a_removed_content_length_reframes_the_body(
    version: str, transfer_encoding: bytes | None, connection: bytes | None
) -> None:
    def drop_length(info: ResponseInfo) -> None:
        info.headers = [(n, v) for n, v in info.headers if n != b"content-length"]

    with Harness(config()) as h:
        install(h, TestChain(on_response=drop_length, on_body=lambda chunk, end: chunk.upper()))
        c = h.client()
        c.send(request(version=version))
        u = h.upstream()
        u.respond(response(200, b"hello"))
        [answer] = c.responses()
        assert answer.body == b"HELLO"
        assert answer.header(b"content-length") is None
        assert answer.header(b"transfer-encoding") == transfer_encoding
        if connection is not None:
            assert c.closed
        else:
            assert not c.closed and u.pooled


def test_response_body_hook_sees_every_chunk_and_the_end() -> None:
    def drop_length(info: ResponseInfo) -> None:
        info.headers = [(n, v) for n, v in info.headers if n != b"content-length"]

    with Harness(config()) as h:
        chain = TestChain(
            on_response=drop_length,
            on_body=lambda chunk, end: b"<end>" if end else chunk[:2],
        )
        install(h, chain)
        c = h.client()
        c.send(request())
        u = h.upstream()
        u.respond(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        u.respond(b"4\r\nefgh\r\n0\r\n\r\n")
        [answer] = c.responses()
        assert answer.body == b"abef<end>"
        assert chain.chunks == [(b"abcd", False), (b"efgh", False), (b"", True)]
        assert u.pooled


def test_an_empty_chunk_from_the_body_hook_does_not_end_the_body() -> None:
    def drop_length(info: ResponseInfo) -> None:
        info.headers = [(n, v) for n, v in info.headers if n != b"content-length"]

    with Harness(config()) as h:
        install(
            h,
            TestChain(
                on_response=drop_length,
                on_body=lambda chunk, end: b"all" if end else b"",
            ),
        )
        c = h.client()
        c.send(request())
        h.upstream().respond(response(200, b"swallowed"))
        [answer] = c.responses()
        assert answer.body == b"all"


def test_a_chain_without_response_hooks_relays_the_response_head_as_a_plain_route() -> None:
    # wants_response_headers false: the head is never parsed into a list (nor rebuilt), so the
    # upstream's field spelling reaches the client exactly as on a route without filters.
    odd = response(200, b"x", headers=(("X-Odd-Case", "  spaced  "),))
    relayed: list[bytes] = []
    for chain in (None, TestChain()):
        with Harness(config()) as h:
            if chain is not None:
                install(h, chain)
            c = h.client()
            c.send(request())
            h.upstream().respond(odd)
            assert [answer.status for answer in c.responses()] == [200]
            head = c.received().split(b"\r\n\r\n", 1)[0]
            relayed.append(b"\r\n".join(line for line in head.split(b"\r\n") if b"X-Odd" in line))
            if chain is not None:
                assert chain.calls == ["request_headers"] and chain.logged == [200]
    assert relayed[0] == relayed[1] == b"X-Odd-Case:   spaced  "


@pytest.mark.parametrize(
    ("sent", "kept"), [("client-id-1", True), ("bad id with spaces", False), (None, False)]
)
def test_filters_see_the_request_id_the_upstream_gets(sent: str | None, kept: bool) -> None:
    with Harness(config()) as h:
        chain = TestChain()
        install(h, chain)
        c = h.client()
        c.send(request(headers=(("X-Request-Id", sent),) if sent is not None else ()))
        u = h.upstream()
        [info] = chain.requests
        assert u.request_headers()[b"x-request-id"] == info.request_id.encode("ascii")
        assert (info.request_id == sent) is kept
        u.respond(response())
        [answer] = c.responses()
        assert answer.header(b"x-request-id") == info.request_id.encode("ascii")


def test_a_replaced_header_list_reaches_the_upstream() -> None:
    def replace(info: RequestInfo) -> None:
        info.headers = [(b"x-only", b"this")]

    with Harness(config()) as h:
        install(h, TestChain(on_request=replace))
        c = h.client()
        c.send(request(headers=(("X-Dropped", "1"),)))
        fields = h.upstream().request_headers()
        assert fields[b"x-only"] == b"this" and b"x-dropped" not in fields


def upper(chunk: bytes, end: bool) -> bytes:
    return chunk.upper() + (b"!" if end else b"")


def chunks_seen(chain: TestChain) -> tuple[bytes, list[bool]]:
    return b"".join(c for c, _ in chain.request_chunks), [e for _, e in chain.request_chunks]


# How the body arrives: (name, sends, suspended first). Each send is one read.
BODY_ARRIVALS = [
    ("with the head", [request("POST", "/", body=b"abcdef")], False),
    (
        "after the head",
        [request("POST", "/", headers=(("Content-Length", "6"),)), b"abc", b"def"],
        False,
    ),
    (
        "while the filters are suspended",
        [request("POST", "/", headers=(("Content-Length", "6"),)) + b"abc", b"def"],
        True,
    ),
]


@pytest.mark.parametrize(
    ("sends", "suspended"),
    [case[1:] for case in BODY_ARRIVALS],
    ids=[case[0] for case in BODY_ARRIVALS],
)
def test_a_content_length_body_passes_through_on_request_body(
    sends: list[bytes], suspended: bool
) -> None:
    with Harness(config()) as h:
        chain = TestChain(outcome=SUSPENDED if suspended else None, on_request_chunk=upper)
        install(h, chain)
        c = h.client()
        c.send(sends[0])
        if suspended:
            c.send(sends[1])
            assert chain.request_chunks == []  # nothing before the request phase passed
            assert chain.resume is not None
            chain.resume(None)
            h.run()
        u = h.upstream()
        for more in sends[1 if not suspended else 2 :]:
            c.send(more)
        # Content-Length framing: the length stays, so the "!" at the end is not sent.
        assert u.received().endswith(b"\r\n\r\nABCDEF")
        assert u.request_headers()[b"content-length"] == b"6"
        data, ends = chunks_seen(chain)
        assert data == b"abcdef" and ends[-1] is True and ends.count(True) == 1
        u.respond(response())
        assert [a.status for a in c.responses()] == [200]


@pytest.mark.parametrize("reads", [1, 3], ids=["one read", "three reads"])
def test_a_chunked_body_is_filtered_before_it_is_framed(reads: int) -> None:
    with Harness(config()) as h:
        chain = TestChain(on_request_chunk=upper)
        install(h, chain)
        c = h.client()
        head = request("POST", "/", headers=(("Transfer-Encoding", "chunked"),))
        body = [b"3\r\nabc\r\n", b"2\r\nde\r\n", b"0\r\n\r\n"]
        if reads == 1:
            c.send(head + b"".join(body))
        else:
            c.send(head)
            for part in body:
                c.send(part)
        u = h.upstream()
        # Re-framed from what the filters returned, their end-of-body bytes before the last chunk.
        assert u.received().endswith(b"\r\n\r\n3\r\nABC\r\n2\r\nDE\r\n1\r\n!\r\n0\r\n\r\n")
        assert chunks_seen(chain) == (b"abcde", [False, False, True])


def test_a_chunk_the_filter_drops_is_not_sent_and_a_resized_length_body_goes_as_received() -> None:
    def drop_or_grow(chunk: bytes, end: bool) -> bytes:
        return b"" if chunk == b"drop" else chunk * 2

    with Harness(config()) as h:
        install(h, TestChain(on_request_chunk=drop_or_grow))
        c = h.client()
        c.send(request("POST", "/", headers=(("Transfer-Encoding", "chunked"),)))
        u = h.upstream()
        c.send(b"4\r\ndrop\r\n2\r\nok\r\n0\r\n\r\n")
        assert u.received().endswith(b"\r\n\r\n4\r\nokok\r\n0\r\n\r\n")
    with Harness(config()) as h:
        install(h, TestChain(on_request_chunk=drop_or_grow))
        c = h.client()
        c.send(request("POST", "/", body=b"same"))
        assert h.upstream().received().endswith(b"\r\n\r\nsame")  # the head said 4 bytes


def test_a_bodiless_request_gets_one_end_call() -> None:
    # docs/filters.md: end=True comes once for every request on a chain that wants the body.
    with Harness(config()) as h:
        chain = TestChain(on_request_chunk=upper)
        install(h, chain)
        c = h.client()
        c.send(request("GET", "/"))
        u = h.upstream()
        assert chain.request_chunks == [(b"", True)]
        assert u.received().endswith(b"\r\n\r\n")
        u.respond(response())
        assert [a.status for a in c.responses()] == [200]


def test_a_chain_without_a_body_hook_is_not_called_for_the_body() -> None:
    with Harness(config()) as h:
        chain = TestChain()
        install(h, chain)
        c = h.client()
        c.send(request("POST", "/", body=b"abc"))
        assert h.upstream().received().endswith(b"\r\n\r\nabc")
        assert chain.request_chunks == []


class RecordingMirror(MirrorFilter):
    """The real mirror filter; what it would send is recorded instead (no coroutine runs)."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__({"url": "http://mirror.test", "max_body_bytes": max_body_bytes})
        self.copies: list[tuple[str, str, bytes]] = []

    def _send(self, copy: Any) -> Any:  # type: ignore[override]
        self.copies.append((copy.method, copy.target, b"".join(copy.body)))
        return copy


class NoTask:
    def add_done_callback(self, callback: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("body", "split", "mirrored"),
    [
        (b"amount=1", False, True),  # with the head, within the bound
        (b"x" * 64, True, True),  # in a later read, exactly the bound
        (b"x" * 65, True, False),  # over the bound: not mirrored at all
    ],
)
def test_mirror_copies_a_post_body_up_to_its_bound(
    body: bytes, split: bool, mirrored: bool
) -> None:
    with Harness(config()) as h:
        mirror = RecordingMirror(max_body_bytes=64)
        install(h, Chain("main", [mirror]))  # type: ignore[arg-type]
        h.loop.create_task = lambda coro: NoTask()  # type: ignore[method-assign]
        c = h.client()
        if split:
            c.send(request("POST", "/pay?x=1", headers=(("Content-Length", str(len(body))),)))
            u = h.upstream()
            c.send(body)
        else:
            c.send(request("POST", "/pay?x=1", body=body))
            u = h.upstream()
        assert u.received().endswith(b"\r\n\r\n" + body)  # the upstream gets it all either way
        u.respond(response())
        assert [a.status for a in c.responses()] == [200]
        assert mirror.copies == ([("POST", "/pay?x=1", body)] if mirrored else [])
        assert mirror.dropped == (0 if mirrored else 1)


# --- what a route with real Chains skips (issue 18: the seam's cost) ------------------------


class LogOnly(Filter):
    name = "log-only"

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[object] = []
        self.logged: list[int] = []

    def on_request_headers(self, request: RequestInfo) -> None:  # switched off per instance
        self.requests.append(request)

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        self.logged.append(status)


class Reader(Filter):
    """Reads every field; changes nothing."""

    name = "reader"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, ...]] = []

    def on_request_headers(self, request: RequestInfo) -> None:
        self.seen.append(
            (request.method, request.path, request.host, request.client_ip, list(request.headers))
        )


class Stamp(Filter):
    """Sets one request field and appends one response field."""

    name = "stamp"

    def on_request_headers(self, request: RequestInfo) -> None:
        set_header(request.headers, "x-stamp", request.client_ip)

    def on_response_headers(self, response: ResponseInfo) -> None:
        response.headers.append((b"x-stamped", b"yes"))


def install_chain(h: Harness, *filters: Filter) -> Chain:
    chain = Chain("main", filters)
    install(h, chain)  # type: ignore[arg-type]
    return chain


def test_a_filter_with_only_on_log_is_never_called_for_the_request_headers() -> None:
    only_log = LogOnly()
    only_log.on_request_headers = Filter.on_request_headers.__get__(only_log)  # type: ignore[method-assign]
    with Harness(config()) as h:
        chain = install_chain(h, only_log)
        assert not chain.wants_request_headers and chain.wants_log
        c = h.client()
        c.send(request())
        h.upstream().respond(response(200, b"ok"))
        assert [a.status for a in c.responses()] == [200]
        assert only_log.requests == [] and only_log.logged == [200]


def test_a_chain_that_changes_nothing_forwards_the_request_head_unchanged() -> None:
    sent = request("GET", "/a", headers=(("X-Odd-Case", "  spaced  "), ("Accept", "*/*")))
    heads: list[bytes] = []
    for filters in ((), (Reader(),)):
        with Harness(config()) as h:
            if filters:
                chain = install_chain(h, *filters)
                assert chain.request_phase_only
            c = h.client()
            c.send(sent)
            u = h.upstream()
            heads.append(u.request_head().split(b"\r\nx-request-id:")[0])
            u.respond(response(200, b"ok"))
            assert [a.status for a in c.responses()] == [200]
            # A request-phase-only chain leaves nothing on the connection for later phases.
            assert c.protocol.filters is None
    assert heads[0] == heads[1]


def test_a_header_a_filter_sets_is_forwarded_and_an_appended_response_field_relayed() -> None:
    with Harness(config()) as h:
        install_chain(h, Stamp())
        c = h.client()
        c.send(request())
        u = h.upstream()
        assert u.request_headers()[b"x-stamp"] == c.transport.peer[0].encode()
        u.respond(response(200, b"hello", headers=(("X-Odd-Case", "  spaced  "),)))
        [answer] = c.responses()
        assert (answer.status, answer.body, answer.header(b"x-stamped")) == (200, b"hello", b"yes")
        # The received fields are relayed as received (the plain route's bytes), the new one added.
        assert b"X-Odd-Case:   spaced  \r\n" in c.received()
