"""The api_key filter: hashed keys inline or in a file, header or query parameter, 401 with
WWW-Authenticate, 403 outside `allow`, the consumer forwarded and put into request.vars."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.filters.api_key import hash_key
from tests.filters_support import filter_from_yaml, header, reply_of, request

ALICE, BOB = "alice-secret-key", "bob-secret-key"
POLICY = (
    f"api_key: {{query: api_key, keys: {{alice: '{hash_key(ALICE)}', bob: '{hash_key(BOB)}'}},"
    " allow: [alice]}"
)


@pytest.mark.parametrize(
    ("headers", "query", "status", "consumer"),
    [
        ([(b"x-api-key", ALICE.encode())], "", None, "alice"),
        ([], f"api_key={ALICE}", None, "alice"),
        ([], "", 401, None),
        ([(b"x-api-key", b"")], "", 401, None),
        ([(b"x-api-key", b"wrong")], "", 401, None),
        ([(b"x-api-key", BOB.encode())], "", 403, None),  # known, but not allowed here
        ([(b"x-api-key", ALICE.encode() + b"x")], "", 401, None),
    ],
)
def test_keys(
    headers: list[tuple[bytes, bytes]], query: str, status: int | None, consumer: str | None
) -> None:
    item = filter_from_yaml(POLICY)
    req = request(headers=[*headers, (b"x-consumer", b"spoofed")], query=query)
    result = item.on_request_headers(req)
    if status is None:
        assert result is None
        assert req.vars["consumer"] == consumer
        assert header(req.headers, b"x-consumer") == consumer.encode()  # the client's copy went
        assert header(req.headers, b"x-api-key") is None  # stripped before going upstream
    else:
        reply = reply_of(result)
        assert reply.status == status
        if status == 401:
            assert header(reply.headers, b"www-authenticate") == b'ApiKey realm="gateway"'
        assert "consumer" not in req.vars


def test_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"carol: {hash_key('carol-key')}\n")
    config = tmp_path / "gw.yaml"
    config.write_text("filters:\n  - api_key: {keys_file: keys.yaml, strip: false}\n")
    from gateway.config import load_config
    from gateway.filters.registry import build_filters

    (item,) = build_filters(load_config(config, require_routes=False).filters)
    req = request(headers=[(b"x-api-key", b"carol-key")])
    assert item.on_request_headers(req) is None
    assert req.vars["consumer"] == "carol"
    assert header(req.headers, b"x-api-key") == b"carol-key"  # strip: false


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("carol: md5:abc\n", "consumer 'carol': expected sha256:<64 hex digits>"),
        ("- a\n", "expected a mapping"),
        (None, "cannot read"),
    ],
)
def test_bad_keys_file_is_a_config_error_at_its_line(
    tmp_path: Path, content: str | None, message: str
) -> None:
    if content is not None:
        (tmp_path / "keys.yaml").write_text(content)
    config = tmp_path / "gw.yaml"
    config.write_text("filters:\n  - api_key:\n      keys_file: keys.yaml\n")
    from gateway.config import load_config

    with pytest.raises(ConfigInvalid) as info:
        load_config(config, require_routes=False)
    (error,) = info.value.errors
    assert (error.line, error.path) == (3, "filters[0].api_key.keys_file")
    assert message in error.message


def test_keys_or_keys_file_required() -> None:
    with pytest.raises(ConfigInvalid, match="give keys or keys_file"):
        load_config_text("filters:\n  - api_key: {}\n")


def test_inline_keys_must_be_hashes() -> None:
    with pytest.raises(ConfigInvalid, match="sha256"):
        load_config_text("filters:\n  - api_key: {keys: {alice: plaintext}}\n")
