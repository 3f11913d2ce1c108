"""The cors filter against the Fetch standard's CORS protocol: preflights answered at the
gateway, CORS headers on actual responses, Vary: Origin wherever the answer depends on it."""

from __future__ import annotations

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.filters.api import Headers
from gateway.filters.chain import Chain
from tests.filters_support import filter_from_yaml, header, reply_of, request, response

POLICY = (
    "cors: {allow_origins: [https://app.example, 'https://*.example.com'],"
    " allow_methods: [GET, POST, PUT], allow_headers: [x-token, content-type],"
    " expose_headers: [x-request-id], allow_credentials: true, max_age: 10m}"
)


def preflight(origin: bytes, method: bytes = b"PUT", headers: bytes | None = None) -> Headers:
    out = [(b"origin", origin), (b"access-control-request-method", method)]
    if headers is not None:
        out.append((b"access-control-request-headers", headers))
    return out


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (b"https://app.example", True),
        (b"https://a.example.com", True),  # pattern: one label
        (b"https://a.b.example.com", True),  # pattern: several labels
        (b"https://example.com", False),  # the pattern needs a subdomain
        (b"http://app.example", False),  # scheme is part of the origin
        (b"https://app.example:8443", False),  # so is the port
        (b"https://evil-example.com", False),
        (b"https://app.example.evil", False),
        (b"null", False),  # sandboxed documents: only when listed
    ],
)
def test_preflight_origin_matching(origin: bytes, allowed: bool) -> None:
    item = filter_from_yaml(POLICY)
    reply = reply_of(item.on_request_headers(request("OPTIONS", headers=preflight(origin))))
    if allowed:
        assert reply.status == 204
        # Credentialed: the origin is echoed, never '*' (Fetch: CORS check).
        assert header(reply.headers, b"access-control-allow-origin") == origin
        assert header(reply.headers, b"access-control-allow-credentials") == b"true"
        assert header(reply.headers, b"access-control-allow-methods") == b"GET, POST, PUT"
        assert header(reply.headers, b"access-control-max-age") == b"600"
    else:
        assert reply.status == 403
        assert header(reply.headers, b"access-control-allow-origin") is None
    vary = header(reply.headers, b"vary")
    assert vary is not None and b"Origin" in vary and b"Access-Control-Request-Method" in vary


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (b"x-token", b"x-token"),
        (b"X-Token, Content-Type", b"x-token, content-type"),
        (b"accept-language", b"accept-language"),  # CORS-safelisted request-header
        (b"x-other", b"content-type, x-token"),  # not allowed: the configured list only
    ],
)
def test_preflight_request_headers(requested: bytes, expected: bytes) -> None:
    item = filter_from_yaml(POLICY)
    reply = reply_of(
        item.on_request_headers(
            request("OPTIONS", headers=preflight(b"https://app.example", b"PUT", requested))
        )
    )
    assert header(reply.headers, b"access-control-allow-headers") == expected


def test_plain_options_and_non_cors_requests_go_upstream() -> None:
    item = filter_from_yaml(POLICY)
    assert item.on_request_headers(request("OPTIONS")) is None  # no Origin
    assert (
        item.on_request_headers(request("OPTIONS", headers=[(b"origin", b"https://app.example")]))
        is None
    )
    assert (
        item.on_request_headers(request("GET", headers=[(b"origin", b"https://app.example")]))
        is None
    )


@pytest.mark.parametrize(
    ("origin", "upstream_headers", "expect_allow", "expect_vary"),
    [
        (b"https://app.example", [], True, b"Origin"),
        (b"https://nope.example", [], False, b"Origin"),
        (None, [], False, b"Origin"),  # a cache must not serve this to a CORS request
        (b"https://app.example", [(b"vary", b"Accept-Encoding")], True, None),
        (b"https://app.example", [(b"vary", b"origin")], True, None),  # already there
    ],
)
def test_actual_response_headers(
    origin: bytes | None, upstream_headers: Headers, expect_allow: bool, expect_vary: bytes | None
) -> None:
    chain = Chain("r", [filter_from_yaml(POLICY)])
    req = request("GET", headers=[(b"origin", origin)] if origin else [])
    resp = response(req, 200, [*upstream_headers, (b"access-control-allow-origin", b"*")])
    chain.on_response_headers(resp)
    allow = [v for n, v in resp.headers if n == b"access-control-allow-origin"]
    if expect_allow:
        assert allow == [origin]  # the upstream's own '*' was replaced
        assert header(resp.headers, b"access-control-expose-headers") == b"x-request-id"
        assert header(resp.headers, b"access-control-allow-credentials") == b"true"
    else:
        assert allow == [b"*"]  # not ours to answer: left as the upstream sent it
    varies = [v for n, v in resp.headers if n == b"vary"]
    if expect_vary is not None:
        assert expect_vary in varies
    assert any(b"origin" in v.lower() for v in varies)


def test_any_origin_without_credentials_is_star_and_needs_no_vary() -> None:
    item = filter_from_yaml(
        "cors: {allow_origins: ['*'], allow_headers: ['*'], allow_methods: ['*']}"
    )
    reply = reply_of(
        item.on_request_headers(
            request("OPTIONS", headers=preflight(b"https://any.example", b"DELETE", b"x-a"))
        )
    )
    assert header(reply.headers, b"access-control-allow-origin") == b"*"
    assert header(reply.headers, b"access-control-allow-methods") == b"*"
    assert header(reply.headers, b"access-control-allow-headers") == b"*"
    req = request(headers=[(b"origin", b"https://any.example")])
    resp = response(req)
    Chain("r", [item]).on_response_headers(resp)
    assert header(resp.headers, b"access-control-allow-origin") == b"*"
    assert header(resp.headers, b"vary") is None


def test_star_with_credentials_is_a_config_error() -> None:
    text = "filters:\n  - cors:\n      allow_origins: ['*']\n      allow_credentials: true\n"
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "gw.yaml")
    (error,) = info.value.errors
    assert (error.line, error.path) == (3, "filters[0].cors.allow_origins")


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/path", "ftp//x"])
def test_bad_origins_are_config_errors(origin: str) -> None:
    with pytest.raises(ConfigInvalid, match="allow_origins"):
        load_config_text(f"filters:\n  - cors: {{allow_origins: ['{origin}']}}\n")
