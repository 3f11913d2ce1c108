"""No path escapes its route: request targets through a real gateway to a raw origin.

The origin answers every request with the exact request line it received (and its Host), so
each row states what the client gets and the exact target the origin saw, or that the origin saw
nothing at all. Rules and RFC sections: docs/request-validation.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.backends import RawBackend
from tests.integration.conftest import GatewayProcess, read_response

BARRIER = b"GET /public/__barrier__ HTTP/1.1\r\nHost: barrier.test\r\n\r\n"


def request_line_responder(buffer: bytes) -> bytes | None:
    """200 whose body is "<request line>\\n<host>" of the request the origin received."""
    head, sep, _ = buffer.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    host = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip()
    body = lines[0] + b"\n" + host
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)


@pytest.fixture(scope="module")
def origin() -> Iterator[RawBackend]:
    backend = RawBackend(request_line_responder)
    yield backend
    backend.close()


def routes() -> list[dict[str, Any]]:
    return [
        {"name": "public", "match": {"path": {"prefix": "/public/"}}, "upstream": "origin"},
        {
            "name": "v2",
            "match": {"path": {"prefix": "/v2/"}},
            "upstream": "origin",
            "rewrite": {"prefix": "/internal"},
        },
        {
            "name": "api",
            "match": {"path": {"prefix": "/api"}},
            "upstream": "origin",
            "rewrite": {"strip_prefix": "/api"},
        },
        {
            "name": "old",
            "match": {"path": {"regex": r"/old/\d+/.*"}},
            "upstream": "origin",
            "rewrite": {"regex": r"^/old/(\d+)/(.*)$", "replacement": r"/new/\2/\1"},
        },
        {
            "name": "asterisk",
            "match": {"path": {"regex": r"\*"}, "methods": ["OPTIONS"]},
            "upstream": "origin",
        },
    ]


GATEWAY_PATHS: dict[str, dict[str, Any]] = {
    "default": {},  # escaped_slashes: reject, backslashes: reject, merge_slashes: false
    "decode": {"escaped_slashes": "decode", "backslashes": "to_slash", "merge_slashes": True},
    "keep": {"escaped_slashes": "keep", "backslashes": "keep"},
}


@pytest.fixture(scope="module")
def gateways(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], origin: RawBackend
) -> Iterator[dict[str, GatewayProcess]]:
    started = {
        name: start_gateway(
            {
                "upstreams": {"origin": {"instances": [f"127.0.0.1:{origin.port}"]}},
                "routes": routes(),
                **({"paths": paths} if paths else {}),
            }
        )
        for name, paths in GATEWAY_PATHS.items()
    }
    yield started
    for process in started.values():
        process.stop()


# (gateway, request line, status the client gets, request line the origin sees or None: nothing)
CASES: list[tuple[str, bytes, int, bytes | None]] = [
    ("default", b"GET /public/x", 200, b"GET /public/x"),
    # RFC 3986 §5.2.4: dot segments are resolved before routing; /admin has no route
    ("default", b"GET /public/../admin", 404, None),
    ("default", b"GET /public/x/../../admin", 404, None),
    ("default", b"GET /public/x/../y", 200, b"GET /public/y"),
    ("default", b"GET /public/./x/.", 200, b"GET /public/x/"),
    ("default", b"GET /public/../public/x", 200, b"GET /public/x"),
    # climbing above "/" is refused
    ("default", b"GET /../public/x", 400, None),
    ("default", b"GET /public/../../x", 400, None),
    # RFC 3986 §2.3, §6.2.2.2: encoded unreserved characters (dots too) are decoded first
    ("default", b"GET /public/%2e%2e/admin", 404, None),
    ("default", b"GET /public/%2E%2E/admin", 404, None),
    ("default", b"GET /public/.%2e/admin", 404, None),
    ("default", b"GET /public/%2e%2e/%2e%2e/admin", 400, None),
    ("default", b"GET /public/%7Euser/%41", 200, b"GET /public/~user/A"),
    # RFC 3986 §6.2.2.1: other escapes stay, upper-case hex
    ("default", b"GET /public/caf%c3%a9", 200, b"GET /public/caf%C3%A9"),
    # RFC 3986 §2.1: invalid percent-encoding; encoded NUL
    ("default", b"GET /public/a%zz", 400, None),
    ("default", b"GET /public/a%", 400, None),
    ("default", b"GET /public/%00", 400, None),
    # double encoding (CWE-174)
    ("default", b"GET /public/%252e%252e/admin", 400, None),
    ("default", b"GET /public/%252f", 400, None),
    # encoded slash / backslash and raw backslash: rejected by default
    ("default", b"GET /public/..%2fadmin", 400, None),
    ("default", b"GET /public/..%2Fadmin", 400, None),
    ("default", b"GET /public/%5c../admin", 400, None),
    ("default", b"GET /public/..\\admin", 400, None),
    ("default", b"GET /public\\..\\admin", 400, None),
    # a dot segment with parameters climbs in servlet containers
    ("default", b"GET /public/..;/admin", 400, None),
    # RFC 9112 §3.2: no fragment in a request target
    ("default", b"GET /public/a#frag", 400, None),
    ("default", b"GET /public/a?x=1#frag", 400, None),
    # leading slashes collapse (RFC 3986 §4.2); inner ones stay (merge_slashes: false)
    ("default", b"GET //public/x", 200, b"GET /public/x"),
    ("default", b"GET /public//x", 200, b"GET /public//x"),
    # the query is never touched
    (
        "default",
        b"GET /public/x?next=../../admin&p=%2F%2e%2e&q=a//b",
        200,
        b"GET /public/x?next=../../admin&p=%2F%2e%2e&q=a//b",
    ),
    ("default", b"GET /public/a/../x?y=%2f", 200, b"GET /public/x?y=%2f"),
    # rewrite prefix runs on the normalised path
    ("default", b"GET /v2/users?a=1", 200, b"GET /internal/v2/users?a=1"),
    ("default", b"GET /v2/a/../b", 200, b"GET /internal/v2/b"),
    ("default", b"GET /v2/../../admin", 400, None),
    ("default", b"GET /v2/../admin", 404, None),
    # strip_prefix: never "//host" at the start, never empty, never a dot segment
    ("default", b"GET /api/x", 200, b"GET /x"),
    ("default", b"GET /api//evil.example/x", 200, b"GET /evil.example/x"),
    ("default", b"GET /api", 200, b"GET /"),
    ("default", b"GET /api?x=1", 200, b"GET /?x=1"),
    ("default", b"GET /api../admin", 400, None),
    ("default", b"GET /api/../admin", 404, None),
    # regex rewrite on the normalised path
    ("default", b"GET /old/7/a/../b", 200, b"GET /new/b/7"),
    ("default", b"GET /old/7/%2e%2e/x", 404, None),  # is /old/x: the regex route does not match
    # RFC 9112 §3.2.4: asterisk-form, OPTIONS only
    ("default", b"OPTIONS *", 200, b"OPTIONS *"),
    ("default", b"GET *", 400, None),
    # RFC 9112 §3.2.2: absolute-form, path normalised the same way, authority is the Host
    ("default", b"GET http://abs.example/public/a/../b?q=..", 200, b"GET /public/b?q=.."),
    ("default", b"GET HTTP://abs.example:8080/public//x", 200, b"GET /public//x"),
    ("default", b"GET http://abs.example/public/../admin", 404, None),
    ("default", b"GET http://abs.example/public/%2e%2e/%2e%2e/x", 400, None),
    ("default", b"GET http://abs.example/public/..%2fx", 400, None),
    ("default", b"GET http://user@abs.example/public/x", 400, None),  # RFC 9110 §4.2.4
    ("default", b"GET http://abs.example", 404, None),  # path "/" has no route
    # paths: {escaped_slashes: decode, backslashes: to_slash, merge_slashes: true}
    ("decode", b"GET /public/..%2fadmin", 404, None),
    ("decode", b"GET /public/a%2fb", 200, b"GET /public/a/b"),
    ("decode", b"GET /public\\..\\admin", 404, None),
    ("decode", b"GET /public\\x", 200, b"GET /public/x"),
    ("decode", b"GET /public/%5cx", 200, b"GET /public/x"),
    ("decode", b"GET /public//a///b", 200, b"GET /public/a/b"),
    ("decode", b"GET /api//evil.example//x", 200, b"GET /evil.example/x"),
    ("decode", b"GET /public/%252f", 400, None),
    # paths: {escaped_slashes: keep, backslashes: keep}
    ("keep", b"GET /public/..%2fadmin", 200, b"GET /public/..%2Fadmin"),
    ("keep", b"GET /public/a%2fb%5cc", 200, b"GET /public/a%2Fb%5Cc"),
    ("keep", b"GET /public/..\\admin", 200, b"GET /public/..\\admin"),
    ("keep", b"GET /public/../admin", 404, None),
]


def _send(gateway: GatewayProcess, request: bytes) -> tuple[int, bytes]:
    sock = gateway.connect()
    try:
        sock.sendall(request)
        status, _, body = read_response(sock)
    finally:
        sock.close()
    return status, body


@pytest.mark.parametrize(
    ("gateway_name", "request_line", "status", "origin_line"),
    CASES,
    ids=[f"{name}:{line.decode('latin-1')}" for name, line, _, _ in CASES],
)
def test_request_target(
    gateways: dict[str, GatewayProcess],
    origin: RawBackend,
    gateway_name: str,
    request_line: bytes,
    status: int,
    origin_line: bytes | None,
) -> None:
    gateway = gateways[gateway_name]
    origin.reset()
    got_status, body = _send(gateway, request_line + b" HTTP/1.1\r\nHost: t.test\r\n\r\n")
    assert got_status == status, body
    if origin_line is not None:
        seen_line, _, seen_host = body.partition(b"\n")
        assert seen_line == origin_line + b" HTTP/1.1"
        # RFC 9112 §3.2.2: an absolute-form target's authority is the Host sent upstream.
        target = request_line.split(b" ", 1)[1]
        authority = target.split(b"/")[2] if b"://" in target else b"t.test"
        assert seen_host == authority
        return
    document = json.loads(body)
    assert document["error"] == ("invalid_target" if status == 400 else "no_route"), document
    # Nothing reached the origin: a request sent after the answer arrives there first.
    barrier_status, barrier_body = _send(gateway, BARRIER)
    assert barrier_status == 200 and barrier_body.startswith(b"GET /public/__barrier__ ")
    assert origin.all_bytes.startswith(b"GET /public/__barrier__ HTTP/1.1\r\n"), origin.all_bytes
