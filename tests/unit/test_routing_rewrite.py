"""Path rewrites: strip_prefix, then prefix, then regex + replacement."""

from __future__ import annotations

import pytest

from gateway.config.model import RewriteConfig
from gateway.routing import compile_path_rewrite


@pytest.mark.parametrize(
    ("rewrite", "path", "expected"),
    [
        # strip_prefix
        (RewriteConfig(strip_prefix="/users"), "/users/7", "/7"),
        (RewriteConfig(strip_prefix="/users"), "/users", "/"),  # empty result becomes "/"
        (RewriteConfig(strip_prefix="/users/"), "/users/", "/"),
        (RewriteConfig(strip_prefix="/users/"), "/users/7", "/7"),  # leading "/" restored
        (RewriteConfig(strip_prefix="/users"), "/users-x", "/-x"),  # plain string prefix
        (RewriteConfig(strip_prefix="/users"), "/other", "/other"),  # not a prefix: unchanged
        (RewriteConfig(strip_prefix="/users"), "/users//a", "//a"),  # no collapsing of slashes
        (RewriteConfig(strip_prefix="/"), "/a", "/a"),
        # prefix
        (RewriteConfig(prefix="/v2"), "/users", "/v2/users"),
        (RewriteConfig(prefix="/v2/"), "/users", "/v2/users"),  # no "//"
        (RewriteConfig(prefix="/v2"), "/", "/v2/"),
        (RewriteConfig(prefix="/v2/"), "/", "/v2/"),
        (RewriteConfig(prefix="v2"), "/a", "/v2/a"),  # made origin-form
        (RewriteConfig(prefix="/"), "/a", "/a"),
        # strip then prefix
        (RewriteConfig(strip_prefix="/api", prefix="/internal"), "/api/x", "/internal/x"),
        (RewriteConfig(strip_prefix="/api", prefix="/internal/"), "/api", "/internal/"),
        (RewriteConfig(strip_prefix="/api/", prefix="/v1/"), "/api/x/y", "/v1/x/y"),
        # regex (Python replacement syntax)
        (
            RewriteConfig(regex=r"^/item/(\d+)$", replacement=r"/items/\1/v"),
            "/item/4",
            "/items/4/v",
        ),
        (RewriteConfig(regex=r"/(?P<n>\w+)/old", replacement=r"/\g<n>/new"), "/a/old", "/a/new"),
        (RewriteConfig(regex="a", replacement="b"), "/aaa", "/bbb"),  # every match
        (RewriteConfig(regex="^/drop.*", replacement=""), "/drop/me", "/"),  # empty -> "/"
        (RewriteConfig(regex="^/", replacement=""), "/x", "/x"),  # leading "/" restored
        (RewriteConfig(regex="^/nomatch", replacement="/y"), "/x", "/x"),
        (RewriteConfig(regex="x"), "/x", "/"),  # no replacement means ""
        # all three, in order
        (
            RewriteConfig(strip_prefix="/a", prefix="/b", regex="^/b/c", replacement="/d"),
            "/a/c/e",
            "/d/e",
        ),
    ],
)
def test_rewrite(rewrite: RewriteConfig, path: str, expected: str) -> None:
    rewriter = compile_path_rewrite(rewrite)
    assert rewriter is not None
    assert rewriter(path) == expected


@pytest.mark.parametrize(
    "rewrite",
    [None, RewriteConfig(), RewriteConfig(host="h"), RewriteConfig(strip_prefix="", prefix="")],
)
def test_no_path_rewrite_compiles_to_none(rewrite: RewriteConfig | None) -> None:
    assert compile_path_rewrite(rewrite) is None


@pytest.mark.parametrize(
    "rewrite",
    [
        RewriteConfig(regex="("),
        RewriteConfig(regex="(a)", replacement=r"\2"),
        RewriteConfig(regex="(a)", replacement=r"\g<name>"),
    ],
)
def test_invalid_rewrite_raises_at_compile_time(rewrite: RewriteConfig) -> None:
    with pytest.raises(ValueError, match="invalid rewrite"):
        compile_path_rewrite(rewrite)


def test_describe() -> None:
    rewriter = compile_path_rewrite(RewriteConfig(strip_prefix="/a", regex="x", replacement="y"))
    assert rewriter is not None
    assert rewriter.describe() == {
        "strip_prefix": "/a",
        "prefix": None,
        "regex": "x",
        "replacement": "y",
    }
