"""traffic_split: weighted upstream choice, stickiness by header or cookie, config checks."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.config import ConfigInvalid, load_config_text
from tests.filters_support import filter_from_yaml, request

UPSTREAMS = (
    "upstreams:\n  stable: {instances: [127.0.0.1:9001]}\n  canary: {instances: [127.0.0.1:9002]}\n"
)


def _split(options: str) -> object:
    config = load_config_text(UPSTREAMS + f"filters:\n  - traffic_split: {options}\n")
    from gateway.filters.registry import build_filters

    (item,) = build_filters(config.filters)
    return item


def test_weights() -> None:
    item = _split("{upstreams: {stable: 90, canary: 10}}")
    counts: Counter[str | None] = Counter()
    for _ in range(10_000):
        req = request()
        item.on_request_headers(req)  # type: ignore[attr-defined]
        counts[req.upstream] += 1
    assert set(counts) == {"stable", "canary"}
    assert 850 < counts["canary"] < 1150  # 1000 expected; ±5 standard deviations is ±150


@pytest.mark.parametrize(
    ("sticky", "header_for"),
    [
        ("header:x-user", lambda value: (b"x-user", value)),
        ("cookie:session", lambda value: (b"cookie", b"theme=dark; session=" + value)),
    ],
)
def test_sticky(sticky: str, header_for: object) -> None:
    item = _split(f"{{upstreams: {{stable: 50, canary: 50}}, sticky: '{sticky}'}}")
    chosen: dict[bytes, set[str | None]] = {}
    for client in range(200):
        value = b"client-%d" % client
        for _ in range(5):
            req = request(headers=[header_for(value)])  # type: ignore[operator]
            item.on_request_headers(req)  # type: ignore[attr-defined]
            chosen.setdefault(value, set()).add(req.upstream)
    assert all(len(upstreams) == 1 for upstreams in chosen.values())  # each client: one upstream
    spread = Counter(next(iter(u)) for u in chosen.values())
    assert spread["stable"] > 60 and spread["canary"] > 60  # and clients are spread


def test_zero_weight_never_chosen() -> None:
    item = _split("{upstreams: {stable: 1, canary: 0}}")
    for _ in range(100):
        req = request()
        item.on_request_headers(req)  # type: ignore[attr-defined]
        assert req.upstream == "stable"


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        (
            "{upstreams: {stable: 1, nope: 1}}",
            "filters[0].traffic_split.upstreams.nope",
            "unknown upstream 'nope'",
        ),
        ("{upstreams: {stable: 0}}", "filters[0].traffic_split.upstreams", "at least one weight"),
        ("{upstreams: {stable: 1}, sticky: ip}", "filters[0].traffic_split.sticky", "header:NAME"),
    ],
)
def test_config_errors(options: str, path: str, message: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(UPSTREAMS + f"filters:\n  - traffic_split: {options}\n", "gw.yaml")
    errors = [e for e in info.value.errors if e.path == path]
    assert errors and message in errors[0].message and errors[0].line == 5, info.value.errors


def test_filter_from_yaml_helper_without_upstreams_refuses() -> None:
    with pytest.raises(ConfigInvalid, match="unknown upstream"):
        filter_from_yaml("traffic_split: {upstreams: {a: 1}}")
