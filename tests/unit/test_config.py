"""Config loading: defaults, conversions, and every error class with its file:line and path."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from pathlib import Path

import pytest

from gateway.config import (
    Address,
    ConfigError,
    ConfigInvalid,
    InstanceConfig,
    LimitsConfig,
    MatchConfig,
    PathMatch,
    RewriteConfig,
    RouteConfig,
    Timeouts,
    UpstreamConfig,
    format_errors,
    load_config,
    load_config_text,
    parse_address,
)

BASE = """\
upstreams:
  a: {instances: [127.0.0.1:9001]}
  b: {instances: [127.0.0.1:9002]}
"""


def errors_of(text: str, source: str = "gateway.yaml") -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(textwrap.dedent(text), source)
    assert info.value.errors, "ConfigInvalid without errors"
    return [str(e) for e in info.value.errors]


def test_error_str_matches_issue_example() -> None:
    text = BASE + textwrap.dedent(
        """\
        routes:
          - name: r
            match: {path: {prefix: /}}
            upstream: a
          - name: s
            upstream: nope
        """
    )
    assert errors_of(text) == [
        "gateway.yaml:9: routes[1].upstream: unknown upstream 'nope' (known: a, b)"
    ]


def test_config_error_str_without_line_or_path() -> None:
    assert str(ConfigError("f.yaml", None, "", "cannot read")) == "f.yaml: cannot read"
    assert str(ConfigError("f.yaml", 3, "", "bad")) == "f.yaml:3: bad"
    assert str(ConfigError("f.yaml", None, "a.b", "bad")) == "f.yaml: a.b: bad"


# (id, yaml, expected "file:line: path: message" lines; every error must be listed)
ERROR_CASES: list[tuple[str, str, list[str]]] = [
    (
        "unknown-top-level-key",
        "listen: 0.0.0.0:8080\nlisen: 1\n",
        ["gateway.yaml:2: lisen: unknown key 'lisen' (did you mean 'listen'?)"],
    ),
    (
        "unknown-nested-keys",
        "upstreams:\n  b:\n    instances: [h:1]\n    cache: {size: 1}\n"
        "routes:\n  - {name: r, upstream: b, compress: true}\n",
        [
            "gateway.yaml:4: upstreams.b.cache: unknown key 'cache' (allowed: instances, "
            "balancer, hash_key, slow_start, panic_threshold, retry, outlier, health, hedge, "
            "circuit_breaker, timeouts, max_idle_connections, discovery, service, tags, "
            "datacenter, passing_only, rate_limit, tls, protocol, http2, filters)",
            "gateway.yaml:6: routes[0].compress: unknown key 'compress' (allowed: name, match, "
            "upstream, rewrite, timeout, max_body_bytes, retry, server_timing, rate_limit, "
            "rate_limit_headers, rate_limit_legacy_headers, max_in_flight,"
            " idempotency, filters)",
        ],
    ),
    (
        "ejection-base-over-max",
        "upstreams:\n  a:\n    instances: [h:1]\n    outlier: {base_ejection_time: 10m}\n",
        [
            "gateway.yaml:4: upstreams.a.outlier.base_ejection_time: "
            "must not exceed max_ejection_time"
        ],
    ),
    (
        "hash-balancer-needs-hash-key",
        "upstreams:\n  a:\n    instances: [h:1]\n    balancer: maglev\n",
        ["gateway.yaml:3: upstreams.a.hash_key: required with balancer maglev"],
    ),
    (
        "bad-retry",
        "upstreams:\n  a:\n    instances: [h:1]\n    retry: {attempts: 0, on: [reset, 99]}\n",
        [
            "gateway.yaml:4: upstreams.a.retry.attempts: must be at least 1, got 0",
            "gateway.yaml:4: upstreams.a.retry.on[1]: must be at least 100, got 99",
        ],
    ),
    (
        "wrong-type-mapping",
        "limits: 5\n",
        ["gateway.yaml:1: limits: expected a mapping, got integer 5"],
    ),
    (
        "wrong-type-list",
        "routes: {a: 1}\n",
        ["gateway.yaml:1: routes: expected a list of a mapping, got a mapping"],
    ),
    (
        "string-needs-quotes",
        BASE + "routes:\n  - {name: r, upstream: a, match: {headers: {x-a: 1}}}\n",
        [
            "gateway.yaml:5: routes[0].match.headers.x-a: expected a header value "
            "(no CR, LF or NUL), got integer 1 (quote it to make it a string)"
        ],
    ),
    (
        "bare-number-duration",
        "limits:\n  header_timeout: '5'\n",
        [
            "gateway.yaml:2: limits.header_timeout: duration '5' has no unit: expected a "
            "number followed by us, ms, s, m or h (e.g. '250ms', '5s', '2m', '1.5s')"
        ],
    ),
    (
        "integer-duration",
        "limits:\n  header_timeout: 5\n",
        [
            "gateway.yaml:2: limits.header_timeout: expected a duration: a number followed by "
            "us, ms, s, m or h (e.g. '250ms', '5s', '2m', '1.5s'), got integer 5"
        ],
    ),
    (
        "bad-duration-unit",
        "limits: {keepalive_timeout: 5d}\n",
        [
            "gateway.yaml:1: limits.keepalive_timeout: invalid duration '5d': expected a "
            "number followed by us, ms, s, m or h (e.g. '250ms', '5s', '2m', '1.5s')"
        ],
    ),
    (
        "zero-duration",
        "upstreams:\n  a:\n    instances: [127.0.0.1:1]\n    timeouts: {connect: 0s}\n",
        [
            "gateway.yaml:4: upstreams.a.timeouts.connect: duration must be greater than "
            "zero, got '0s'"
        ],
    ),
    (
        "bad-size",
        "limits: {max_body_bytes: 10XB}\n",
        [
            "gateway.yaml:1: limits.max_body_bytes: invalid size '10XB': expected a byte count "
            "or a number followed by B, KB, MB, GB, TB, KiB, MiB, GiB or TiB "
            "(e.g. 512, '64KiB', '10MB')"
        ],
    ),
    (
        "duplicate-route-name",
        BASE + "routes:\n  - {name: r, upstream: a}\n  - {name: r, upstream: b}\n",
        ["gateway.yaml:6: routes[1].name: duplicate route name 'r' (first defined at line 5)"],
    ),
    (
        "unknown-upstream-none-defined",
        "routes:\n  - name: r\n    upstream: x\n",
        ["gateway.yaml:3: routes[0].upstream: unknown upstream 'x' (no upstreams are defined)"],
    ),
    (
        "missing-required-keys",
        BASE + "routes:\n  - match: {path: {prefix: /}}\n",
        [
            "gateway.yaml:5: routes[0].name: required key is missing",
            "gateway.yaml:5: routes[0].upstream: required key is missing",
        ],
    ),
    (
        "bad-listen-port",
        "listen: 0.0.0.0:70000\n",
        [
            "gateway.yaml:1: listen: invalid address '0.0.0.0:70000': port must be a number "
            "from 0 to 65535"
        ],
    ),
    (
        "listen-without-port",
        "admin: 127.0.0.1\n",
        [
            "gateway.yaml:1: admin: invalid address '127.0.0.1': expected host:port "
            "(e.g. 127.0.0.1:8080, localhost:9001, [::1]:8080)"
        ],
    ),
    (
        "ipv6-without-brackets",
        "listen: '::1:8080'\n",
        [
            "gateway.yaml:1: listen: invalid address '::1:8080': IPv6 addresses go in "
            "brackets, e.g. [::1]:8080"
        ],
    ),
    (
        "bad-ipv6",
        "listen: '[::zz]:8080'\n",
        ["gateway.yaml:1: listen: invalid address '[::zz]:8080': '::zz' is not an IPv6 address"],
    ),
    (
        "bad-ipv4",
        "listen: 300.1.1.1:80\n",
        [
            "gateway.yaml:1: listen: invalid address '300.1.1.1:80': invalid IPv4 address "
            "'300.1.1.1'"
        ],
    ),
    (
        "instance-port-zero",
        "upstreams:\n  a: {instances: ['127.0.0.1:0']}\n",
        [
            "gateway.yaml:2: upstreams.a.instances[0]: invalid address '127.0.0.1:0': an "
            "instance needs a real port, not 0"
        ],
    ),
    (
        "listen-equals-admin",
        "listen: 127.0.0.1:9000\nadmin: 127.0.0.1:9000\n",
        ["gateway.yaml:2: admin: admin address '127.0.0.1:9000' is the same as listen"],
    ),
    (
        "bad-regex",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match: {path: {regex: '(a'}}\n",
        [
            "gateway.yaml:7: routes[0].match.path.regex: invalid regular expression '(a': "
            "missing ), unterminated subpattern at position 0"
        ],
    ),
    (
        "path-without-slash",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match:\n      path: {prefix: users}\n",
        ["gateway.yaml:8: routes[0].match.path.prefix: path 'users' must start with '/'"],
    ),
    (
        "path-kind-none",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match:\n      path: {}\n",
        ["gateway.yaml:8: routes[0].match.path: exactly one of exact, prefix, regex is required"],
    ),
    (
        "path-kind-two",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match:\n"
        "      path: {exact: /a, prefix: /b}\n",
        [
            "gateway.yaml:8: routes[0].match.path: exactly one of exact, prefix, regex is "
            "required (found: exact, prefix)"
        ],
    ),
    (
        "zero-instances",
        "upstreams:\n  a:\n    instances: []\n",
        ["gateway.yaml:3: upstreams.a.instances: must have at least 1 item"],
    ),
    (
        "instances-missing",
        "upstreams:\n  a:\n    balancer: round_robin\n",
        ["gateway.yaml:3: upstreams.a.instances: required key is missing"],
    ),
    (
        "bad-balancer",
        "upstreams:\n  a:\n    instances: [127.0.0.1:1]\n    balancer: round_robbin\n",
        [
            "gateway.yaml:4: upstreams.a.balancer: 'round_robbin' is not one of round_robin, "
            "weighted_round_robin, least_request, peak_ewma, random, ring_hash, maglev "
            "(did you mean 'round_robin'?)"
        ],
    ),
    (
        "weight-below-one",
        "upstreams:\n  a:\n    instances:\n      - {address: 127.0.0.1:1, weight: 0}\n",
        ["gateway.yaml:4: upstreams.a.instances[0].weight: must be at least 1, got 0"],
    ),
    (
        "instance-wrong-type",
        "upstreams:\n  a:\n    instances: [8080]\n",
        [
            "gateway.yaml:3: upstreams.a.instances[0]: expected an address (host:port (e.g. "
            "127.0.0.1:8080, localhost:9001, [::1]:8080)) or a mapping {address, weight}, "
            "got integer 8080"
        ],
    ),
    (
        "duplicate-instance",
        "upstreams:\n  a:\n    instances:\n      - 127.0.0.1:1\n      - {address: 127.0.0.1:1}\n",
        ["gateway.yaml:5: upstreams.a.instances[1]: duplicate instance '127.0.0.1:1'"],
    ),
    (
        "bad-upstream-name",
        "upstreams:\n  'a b': {instances: [127.0.0.1:1]}\n",
        [
            "gateway.yaml:2: upstreams[\"a b\"]: 'a b' is not a name of letters, digits, "
            "'_', '.' and '-'"
        ],
    ),
    (
        "regex-without-replacement",
        BASE + "routes:\n  - name: r\n    upstream: a\n    rewrite: {regex: '^/x'}\n",
        [
            "gateway.yaml:7: routes[0].rewrite.regex: regex and replacement must be given "
            "together (missing: replacement)"
        ],
    ),
    (
        "bad-replacement-group",
        BASE + "routes:\n  - name: r\n    upstream: a\n"
        "    rewrite: {regex: '^/(x)', replacement: '/\\2'}\n",
        [
            "gateway.yaml:7: routes[0].rewrite.replacement: invalid replacement '/\\\\2': "
            "invalid group reference 2 at position 2"
        ],
    ),
    (
        "bad-wildcard-host",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match: {host: 'a.*.com'}\n",
        [
            "gateway.yaml:7: routes[0].match.host: 'a.*.com' is not a host name such as "
            "api.example.com, or a wildcard such as *.example.com"
        ],
    ),
    (
        "bad-method",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match: {methods: [GET, 'PO ST']}\n",
        [
            "gateway.yaml:7: routes[0].match.methods[1]: 'PO ST' is not an HTTP method "
            "(a token, RFC 9110 §9.1)"
        ],
    ),
    (
        "duplicate-method-after-uppercasing",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match: {methods: [GET, get]}\n",
        ["gateway.yaml:7: routes[0].match.methods[1]: duplicate item 'GET'"],
    ),
    (
        "bad-header-name",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match:\n      headers:\n"
        "        'x y': '1'\n",
        [
            "gateway.yaml:9: routes[0].match.headers[\"x y\"]: 'x y' is not a header name "
            "(a token, RFC 9110 §5.1)"
        ],
    ),
    (
        "duplicate-header-case-insensitive",
        BASE + "routes:\n  - name: r\n    upstream: a\n    match:\n      headers:\n"
        "        X-A: '1'\n        x-a: '2'\n",
        [
            "gateway.yaml:10: routes[0].match.headers.x-a: duplicate key 'x-a' (keys are "
            "case-insensitive)"
        ],
    ),
    (
        "workers-zero",
        "workers: 0\n",
        ["gateway.yaml:1: workers: must be at least 1, got 0"],
    ),
    (
        "workers-wrong-word",
        "workers: many\n",
        ["gateway.yaml:1: workers: 'many' is not one of auto"],
    ),
    (
        "workers-bool",
        "workers: true\n",
        ["gateway.yaml:1: workers: expected a positive integer or 'auto', got boolean true"],
    ),
    (
        "bad-cidr",
        "trusted_proxies:\n  - 10.0.0.0/8\n  - 10.0.0.0/33\n",
        [
            "gateway.yaml:3: trusted_proxies[1]: invalid CIDR '10.0.0.0/33' (expected e.g. "
            "10.0.0.0/8 or ::1/128)"
        ],
    ),
    (
        "duplicate-yaml-key",
        "listen: 0.0.0.0:8080\nadmin: 127.0.0.1:9901\nlisten: 0.0.0.0:8081\n",
        ["gateway.yaml:3: listen: duplicate key 'listen' (first defined at line 1)"],
    ),
    (
        "yaml-syntax-error",
        "listen: 0.0.0.0:8080\nroutes: [\n  {name: a\n",
        [
            "gateway.yaml:4: invalid YAML: did not find expected ',' or '}' "
            "(while parsing a flow mapping)"
        ],
    ),
    (
        "two-documents",
        "listen: 0.0.0.0:8080\n---\nadmin: 127.0.0.1:1\n",
        ["gateway.yaml:2: a config file holds one YAML document, found a second one ('---')"],
    ),
    (
        "document-not-a-mapping",
        "- a\n- b\n",
        ["gateway.yaml:1: expected a mapping, got a list"],
    ),
    (
        "unknown-yaml-tag",
        "listen: !env LISTEN\n",
        [
            "gateway.yaml:1: listen: cannot read value: could not determine a constructor "
            "for the tag '!env'"
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_error_cases(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_all_errors_are_collected_in_file_order() -> None:
    text = """\
    listen: nope
    workers: 0
    upstreams:
      a:
        instances: []
        balancer: fastest
    routes:
      - name: r
        upstream: zzz
        timeout: 5
    """
    got = errors_of(text)
    lines = [int(e.split(":")[1]) for e in got]
    assert lines == [1, 2, 5, 6, 9, 10]
    assert lines == sorted(lines)


def test_unknown_upstream_lists_known_sorted() -> None:
    text = """\
    upstreams:
      zeta: {instances: [127.0.0.1:1]}
      alpha: {instances: [127.0.0.1:2]}
    routes: [{name: r, upstream: mid}]
    """
    assert errors_of(text, "x/gw.yaml") == [
        "x/gw.yaml:4: routes[0].upstream: unknown upstream 'mid' (known: alpha, zeta)"
    ]


def test_format_errors_one_per_line() -> None:
    errors = [
        ConfigError("f", 3, "b", "second"),
        ConfigError("f", None, "", "unplaced"),
        ConfigError("f", 1, "a", "first"),
    ]
    assert format_errors(errors) == "f:1: a: first\nf:3: b: second\nf: unplaced"
    assert str(ConfigInvalid(errors)) == format_errors(errors)


# --- successful loads ---------------------------------------------------------------------


def test_empty_document_gives_defaults() -> None:
    cfg = load_config_text("", "empty.yaml")
    assert cfg.listen == Address("0.0.0.0", 8080)
    assert cfg.admin == Address("127.0.0.1", 9901)
    assert cfg.workers == 1
    assert cfg.trusted_proxies == ()
    assert cfg.limits == LimitsConfig()
    assert cfg.upstreams == {}
    assert cfg.routes == ()
    assert cfg.raw == {}
    assert cfg.source == "empty.yaml"
    assert cfg.sha256 == hashlib.sha256(b"").hexdigest()


def test_schema_defaults_equal_model_defaults() -> None:
    cfg = load_config_text(
        "upstreams: {u: {instances: [h:1, {address: 'h:2'}]}}\n"
        "routes: [{name: r, upstream: u, rewrite: {}}]\n"
    )
    up = cfg.upstreams["u"]
    assert up == UpstreamConfig(name="u", instances=up.instances)
    assert up.timeouts == Timeouts()
    assert up.instances == (InstanceConfig("h", 1), InstanceConfig("h", 2))
    route = cfg.routes[0]
    assert route == RouteConfig(name="r", match=MatchConfig(), upstream="u", rewrite=route.rewrite)
    assert route.rewrite == RewriteConfig()


def test_defaults_are_not_shared_between_loads() -> None:
    a = load_config_text("")
    b = load_config_text("")
    assert a.upstreams is not b.upstreams


def test_full_conversion() -> None:
    text = """\
    listen: "[::]:8080"
    admin: localhost:9901
    workers: auto
    trusted_proxies: [10.1.2.3/8, "::1"]
    limits: {max_header_bytes: 16KiB, max_body_bytes: 10MB, header_timeout: 250ms,
             max_uri_bytes: 4096, keepalive_timeout: 2m, max_connections: 5}
    upstreams:
      web:
        instances: ["[::1]:9001", {address: 127.0.0.1:9002, weight: 3}]
        balancer: weighted_round_robin
        timeouts: {connect: 1.5s, read: 1h}
        max_idle_connections: 0
    routes:
      - name: web
        match:
          host: "*.Example.COM"
          path: {regex: '^/a/[0-9]+$'}
          methods: [get, Post]
          headers: {X-Canary: "1", Accept: ""}
          query: {v: "2"}
        upstream: web
        rewrite: {strip_prefix: /a, prefix: /b, regex: '^/(.*)$', replacement: '/x/\\1',
                  host: "internal:8080"}
        timeout: 15s
        max_body_bytes: 1KiB
    """
    cfg = load_config_text(textwrap.dedent(text))
    assert cfg.listen == Address("::", 8080)
    assert str(cfg.listen) == "[::]:8080"
    assert cfg.admin == Address("localhost", 9901)
    assert cfg.workers == "auto"
    assert cfg.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert cfg.limits == LimitsConfig(16384, 4096, 10_000_000, 0.25, 120.0, 5)
    web = cfg.upstreams["web"]
    assert web.name == "web"
    assert web.instances == (InstanceConfig("::1", 9001), InstanceConfig("127.0.0.1", 9002, 3))
    assert web.instances[0].address == "[::1]:9001"
    assert web.balancer == "weighted_round_robin"
    assert web.timeouts == Timeouts(connect=1.5, read=3600.0, idle=60.0)
    assert web.max_idle_connections == 0
    (route,) = cfg.routes
    assert route.match == MatchConfig(
        host="*.example.com",
        path=PathMatch("regex", "^/a/[0-9]+$"),
        methods=("GET", "POST"),
        headers=(("x-canary", "1"), ("accept", "")),
        query=(("v", "2"),),
    )
    assert route.rewrite == RewriteConfig("/a", "/b", "^/(.*)$", "/x/\\1", "internal:8080")
    assert route.timeout == 15.0
    assert route.max_body_bytes == 1024
    # raw is the YAML as written (for /admin/config), not the converted values
    assert cfg.raw["routes"][0]["match"]["methods"] == ["get", "Post"]


def test_yaml_11_keys_and_merge_keys() -> None:
    text = """\
    upstreams:
      a: &defaults
        instances: [127.0.0.1:1]
        balancer: weighted_round_robin
        timeouts: {connect: 2s}
      b:
        <<: *defaults
        instances: [127.0.0.1:2]
        timeouts: {read: 3s}
    routes: [{name: r, upstream: a, match: {query: {on: "1", 200: ok}}}]
    """
    cfg = load_config_text(textwrap.dedent(text))
    b = cfg.upstreams["b"]
    assert b.balancer == "weighted_round_robin"
    assert b.instances == (InstanceConfig("127.0.0.1", 2),)
    assert b.timeouts == Timeouts(read=3.0)  # an explicit key replaces the merged value whole
    # YAML 1.1 reads plain `on` as true and `200` as an int; as keys they stay the text written.
    assert cfg.routes[0].match.query == (("on", "1"), ("200", "ok"))


def test_recursive_alias_is_one_error() -> None:
    assert errors_of("trusted_proxies: &a [*a]\n") == [
        "gateway.yaml:1: trusted_proxies[0]: recursive alias: a node cannot contain itself"
    ]


def test_merge_key_positions_point_at_the_anchor() -> None:
    text = """\
    upstreams:
      a: &base
        instances: [127.0.0.1:1]
        balancer: nope
      b:
        <<: *base
        instances: [127.0.0.1:2]
    """
    assert errors_of(text) == [
        "gateway.yaml:4: upstreams.a.balancer: 'nope' is not one of round_robin, "
        "weighted_round_robin, least_request, peak_ewma, random, ring_hash, maglev",
        "gateway.yaml:4: upstreams.b.balancer: 'nope' is not one of round_robin, "
        "weighted_round_robin, least_request, peak_ewma, random, ring_hash, maglev",
    ]


def test_aliases_reuse_values() -> None:
    text = """\
    upstreams:
      a: {instances: &inst [127.0.0.1:1, 127.0.0.1:2]}
      b: {instances: *inst}
    """
    cfg = load_config_text(textwrap.dedent(text))
    assert cfg.upstreams["a"].instances == cfg.upstreams["b"].instances


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("[::1]:8080", Address("::1", 8080)),
        ("[::]:0", Address("::", 0)),
        ("[fe80::1%eth0]:80", Address("fe80::1%eth0", 80)),
        ("[2001:db8::1]:65535", Address("2001:db8::1", 65535)),
        ("localhost:9001", Address("localhost", 9001)),
        ("my-svc.default.svc:80", Address("my-svc.default.svc", 80)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[::1:80",
        "h:",
        ":80",
        "h:-1",
        "h:65536",
        "h:\uff18\uff10",  # full-width digits: isdigit() is true, int() accepts them
        "a b:80",
        "[1.2.3.4]:80",
        "1.2.3.256:80",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_load_config_file_hash_and_source(tmp_path: Path) -> None:
    data = b"listen: 127.0.0.1:0\nroutes: []\n"
    path = tmp_path / "gw.yaml"
    path.write_bytes(data)
    cfg = load_config(path)
    assert cfg.sha256 == hashlib.sha256(data).hexdigest()
    assert cfg.source == str(path)
    assert cfg.raw == {"listen": "127.0.0.1:0", "routes": []}
    assert dataclasses.is_dataclass(cfg)


def test_load_config_errors_use_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("workers: 0\nroutes: []\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(str(path))
    assert [str(e) for e in info.value.errors] == [f"{path}:1: workers: must be at least 1, got 0"]


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    (error,) = info.value.errors
    assert error.file == str(path) and error.line is None
    assert "cannot read config" in error.message


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: 0.0.0.0:8080\nadmin: \xe9\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    assert info.value.errors[0].line == 2
