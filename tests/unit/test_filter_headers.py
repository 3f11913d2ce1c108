"""The headers filter: set/add/remove on requests and responses, with variables."""

from __future__ import annotations

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.filters.chain import Chain
from gateway.filters.headers import compile_template
from tests.filters_support import filter_from_yaml, request, response


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("plain", b"plain"),
        ("{client_ip}", b"198.51.100.7"),
        ("id={request_id};route={route}", b"id=abc;route=orders"),
        ("{host} {method} {path}", b"api.example POST /v1/orders"),
        ("{consumer}", b"alice"),
        ("{jwt.sub}/{jwt.roles}", b"user-1/admin ops"),
        ("{jwt.missing}", b""),
        ("{var.trace_id}", b"t-1"),
        ("{{literal}}", b"{literal}"),
        ("{jwt.evil}", b"a  x-injected: 1"),  # CR/LF from a claim never split the field
    ],
)
def test_template_variables(template: str, expected: bytes) -> None:
    req = request("POST", "/v1/orders", client_ip="198.51.100.7", route="orders", request_id="abc")
    req.vars.update(
        consumer="alice",
        trace_id="t-1",
        jwt_claims={"sub": "user-1", "roles": ["admin", "ops"], "evil": "a\r\nx-injected: 1"},
    )
    assert compile_template(template).render(req) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [("{nope}", "unknown variable {nope}"), ("a{b", "unmatched"), ("}", "unmatched")],
)
def test_bad_templates_are_config_errors(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_template(template)


def test_request_and_response_changes() -> None:
    item = filter_from_yaml(
        "headers: {request: {set: {x-env: prod, x-client: '{client_ip}'}, add: {x-tag: b},"
        " remove: [x-debug]}, response: {set: {x-served-by: gateway}, remove: [server]}}"
    )
    chain = Chain("r", [item])
    req = request(
        headers=[(b"x-debug", b"1"), (b"x-env", b"dev"), (b"x-tag", b"a"), (b"x-debug", b"2")]
    )
    assert chain.on_request_headers(req, lambda _: None) is None
    assert sorted(req.headers) == sorted(
        [(b"x-env", b"prod"), (b"x-client", b"192.0.2.10"), (b"x-tag", b"a"), (b"x-tag", b"b")]
    )
    resp = response(req, 200, [(b"server", b"backend/1.0"), (b"content-type", b"text/plain")])
    chain.on_response_headers(resp)
    assert sorted(resp.headers) == [(b"content-type", b"text/plain"), (b"x-served-by", b"gateway")]


def test_a_filter_with_only_request_changes_skips_the_response_phase() -> None:
    chain = Chain("r", [filter_from_yaml("headers: {request: {set: {x-a: b}}}")])
    assert not chain.wants_response_headers


def test_config_error_names_file_line_and_key() -> None:
    text = "filters:\n  - headers:\n      request:\n        set: {x-a: '{bogus}'}\n"
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "gw.yaml")
    (error,) = info.value.errors
    assert (error.file, error.line, error.path) == (
        "gw.yaml",
        4,
        "filters[0].headers.request.set.x-a",
    )
    assert "unknown variable {bogus}" in error.message
