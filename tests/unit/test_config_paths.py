"""The `paths:` block and the normal-form check on route and rewrite paths."""

from __future__ import annotations

import textwrap

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.config.model import PathsConfig

UPSTREAM = "upstreams: {u: {instances: [127.0.0.1:9001]}}\n"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(textwrap.dedent(text), "gw.yaml")
    return [str(error) for error in info.value.errors]


def test_paths_defaults_are_the_safe_ones() -> None:
    config = load_config_text(UPSTREAM)
    assert config.paths == PathsConfig()
    assert config.paths == PathsConfig(
        escaped_slashes="reject", backslashes="reject", merge_slashes=False
    )


def test_paths_values() -> None:
    config = load_config_text(
        "paths: {escaped_slashes: decode, backslashes: to_slash, merge_slashes: true}\n"
    )
    assert config.paths == PathsConfig("decode", "to_slash", True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "paths:\n  escaped_slashes: to_slash\n",
            "gw.yaml:2: paths.escaped_slashes: 'to_slash' is not one of reject, keep, decode",
        ),
        (
            "paths:\n  backslashes: decode\n",
            "gw.yaml:2: paths.backslashes: 'decode' is not one of reject, keep, to_slash",
        ),
        ("paths:\n  merge_slashes: 1\n", "gw.yaml:2: paths.merge_slashes:"),
        ("paths:\n  merge: true\n", "gw.yaml:2: paths.merge: unknown key 'merge'"),
    ],
)
def test_paths_errors_name_file_line_key(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def route(match_path: str = "{prefix: /}", rewrite: str = "{}") -> str:
    return UPSTREAM + (
        f"routes:\n  - name: r\n    upstream: u\n    match: {{path: {match_path}}}\n"
        f"    rewrite: {rewrite}\n"
    )


@pytest.mark.parametrize(
    ("match_path", "rewrite", "key", "message"),
    [
        # RFC 3986 §5.2.4: request paths never have these segments, so these never match
        ("{prefix: /a/../b}", "{}", "match.path.prefix", "'..' segment"),
        ("{exact: /a/.}", "{}", "match.path.exact", "'..' segment"),
        ("{prefix: /}", "{strip_prefix: /./a}", "rewrite.strip_prefix", "'..' segment"),
        ("{prefix: /}", "{prefix: /internal/..}", "rewrite.prefix", "'..' segment"),
        # RFC 3986 §6.2.2: escapes in normal form only
        ("{exact: /%7Euser}", "{}", "match.path.exact", "unreserved"),
        ("{prefix: /a%2f}", "{}", "match.path.prefix", "upper-case hex"),
        ("{prefix: /a%2}", "{}", "match.path.prefix", "upper-case hex"),
    ],
)
def test_route_paths_must_be_normal(match_path: str, rewrite: str, key: str, message: str) -> None:
    errors = errors_of(route(match_path, rewrite))
    assert len(errors) == 1, errors
    assert errors[0].startswith("gw.yaml:") and f"routes[0].{key}:" in errors[0], errors
    assert message in errors[0], errors


@pytest.mark.parametrize(
    ("match_path", "rewrite"),
    [
        ("{prefix: /.}", "{}"),  # a string prefix may end inside a segment: /.well-known
        ("{prefix: /a/..}", "{strip_prefix: /a/..}"),  # matches /a/..x
        ("{exact: /a%2Fb}", "{prefix: /x%20y}"),
        ("{exact: /a..b/.c}", "{}"),
    ],
)
def test_normal_route_paths_are_accepted(match_path: str, rewrite: str) -> None:
    assert len(load_config_text(route(match_path, rewrite)).routes) == 1
