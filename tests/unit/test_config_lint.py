"""Config warnings (gateway/config/lint.py) and the errors that must stay errors.

Each case is a small, realistic config with one mistake; the warning must name the line and key
path of that mistake. The shipped configs must not warn at all (no false alarms).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigInvalid, load_config, load_config_text
from gateway.config.lint import ConfigWarning, lint_text, regex_literal_prefix

ROOT = Path(__file__).resolve().parents[2]

HEAD = """\
listen: 127.0.0.1:8080
admin: 127.0.0.1:9901
upstreams:
  users:
    instances: [127.0.0.1:7001, 127.0.0.1:7002]
  other:
    instances: [127.0.0.1:7003]
"""


def warnings_of(text: str) -> list[ConfigWarning]:
    text = textwrap.dedent(text)
    return lint_text(text, load_config_text(text, "gw.yaml"))


# (case id, config after HEAD's upstreams, expected line, key path, words in the message)
ROUTE_CASES = [
    (
        "canary listed after the general route",
        """\
routes:
  - {name: users, match: {path: {prefix: /users/}}, upstream: users}
  - {name: other, match: {path: {prefix: /other}}, upstream: other}
  - name: canary
    match: {path: {prefix: /users/}, headers: {x-canary: "1"}}
    upstream: other
""",
        11,
        "routes[2].name",
        ["'canary' can never match", "'users' (line 9)"],
    ),
    (
        "same exact path, methods a subset",
        """\
routes:
  - {name: a, match: {path: {exact: /health}, methods: [GET, HEAD]}, upstream: users}
  - {name: b, match: {path: {exact: /health}, methods: [GET]}, upstream: other}
""",
        10,
        "routes[1].name",
        ["'b' can never match"],
    ),
    (
        "catch-all before a regex route",
        """\
routes:
  - {name: all, upstream: users}
  - {name: items, match: {path: {regex: '/items/\\d+'}}, upstream: other}
""",
        10,
        "routes[1].name",
        ["'items' can never match", "'all'"],
    ),
    (
        "prefix before a regex that starts with it",
        """\
routes:
  - {name: api, match: {path: {prefix: /api/}}, upstream: users}
  - {name: v2, match: {path: {regex: '/api/v2/.*'}}, upstream: other}
""",
        10,
        "routes[1].name",
        ["'v2' can never match"],
    ),
    (
        "same wildcard host and prefix",
        """\
routes:
  - {name: a, match: {host: '*.example.com', path: {prefix: /}}, upstream: users}
  - {name: b, match: {host: '*.Example.com'}, upstream: other}
""",
        10,
        "routes[1].name",
        ["'b' can never match"],
    ),
    (
        "strip_prefix unrelated to the route's prefix",
        """\
routes:
  - name: users
    match: {path: {prefix: /api/users/}}
    upstream: users
    rewrite: {strip_prefix: /v1}
""",
        12,
        "routes[0].rewrite.strip_prefix",
        ["'/v1' is not a prefix of the route's path prefix '/api/users/'", "never applies"],
    ),
    (
        "strip_prefix longer than the route's prefix",
        """\
routes:
  - name: users
    match: {path: {prefix: /users}}
    upstream: users
    rewrite: {strip_prefix: /users/}
""",
        12,
        "routes[0].rewrite.strip_prefix",
        ["longer than the route's path prefix", "unstripped"],
    ),
    (
        "strip_prefix on an exact path it does not start",
        """\
routes:
  - name: h
    match: {path: {exact: /healthz}}
    upstream: users
    rewrite: {strip_prefix: /api}
""",
        12,
        "routes[0].rewrite.strip_prefix",
        ["exact path '/healthz'"],
    ),
    (
        "route timeout not longer than per_try_timeout",
        """\
routes:
  - name: users
    upstream: users
    timeout: 2s
    retry: {attempts: 3, per_try_timeout: 2s}
""",
        11,
        "routes[0].timeout",
        ["never retried"],
    ),
]


@pytest.mark.parametrize(
    ("routes", "line", "path", "words"),
    [case[1:] for case in ROUTE_CASES],
    ids=[case[0] for case in ROUTE_CASES],
)
def test_route_warnings(routes: str, line: int, path: str, words: list[str]) -> None:
    text = HEAD + routes
    found = [w for w in warnings_of(text) if w.path == path]
    assert len(found) == 1, warnings_of(text)
    warning = found[0]
    assert (warning.file, warning.line) == ("gw.yaml", line)
    for word in words:
        assert word in warning.message
    assert str(warning).startswith(f"gw.yaml:{line}: {path}: warning: ")


NOT_SHADOWED = [
    # The canary first (the README's worked example): both reachable.
    """\
routes:
  - {name: canary, match: {path: {prefix: /users/}, headers: {x-canary: "1"}}, upstream: other}
  - {name: users, match: {path: {prefix: /users/}}, upstream: users}
""",
    # An earlier route with a method list the later one exceeds.
    """\
routes:
  - {name: read, match: {path: {prefix: /users/}, methods: [GET]}, upstream: users}
  - {name: all, match: {path: {prefix: /users/}}, upstream: other}
""",
    # Exact paths are tried before prefixes whatever the file order.
    """\
routes:
  - {name: all, upstream: users}
  - {name: health, match: {path: {exact: /healthz}}, upstream: other}
""",
    # A longer prefix later is still tried first.
    """\
routes:
  - {name: api, match: {path: {prefix: /api/}}, upstream: users}
  - {name: v2, match: {path: {prefix: /api/v2/}}, upstream: other}
""",
    # Different hosts, or a host-specific route after a catch-all.
    """\
routes:
  - {name: all, upstream: users}
  - {name: a, match: {host: a.example.com}, upstream: other}
""",
    # A regex whose matches need not start with the earlier prefix.
    """\
routes:
  - {name: api, match: {path: {prefix: /api/}}, upstream: users}
  - {name: x, match: {path: {regex: '/(api|web)/x'}}, upstream: other}
""",
]


@pytest.mark.parametrize("routes", NOT_SHADOWED)
def test_reachable_routes_do_not_warn(routes: str) -> None:
    assert warnings_of(HEAD + routes) == []


def test_max_ejection_percent_that_forces_panic_mode() -> None:
    text = """\
    upstreams:
      users:
        instances: [127.0.0.1:7001, 127.0.0.1:7002, 127.0.0.1:7003, 127.0.0.1:7004]
        panic_threshold: 40
        outlier: {max_ejection_percent: 70}
      ok:
        instances: [127.0.0.1:7005]
        panic_threshold: 40
        outlier: {max_ejection_percent: 60}
    routes:
      - {name: a, upstream: users}
      - {name: b, match: {path: {prefix: /b}}, upstream: ok}
    """
    found = warnings_of(text)
    assert [(w.line, w.path) for w in found] == [
        (5, "upstreams.users.outlier.max_ejection_percent")
    ]
    assert "panic threshold (40%)" in found[0].message
    assert "Use at most 60" in found[0].message


def test_panic_threshold_zero_or_outlier_off_never_warns() -> None:
    text = """\
    upstreams:
      a:
        instances: [127.0.0.1:7001]
        panic_threshold: 0
        outlier: {max_ejection_percent: 100}
      b:
        instances: [127.0.0.1:7002]
        outlier: {enabled: false, max_ejection_percent: 100}
    routes:
      - {name: a, upstream: a}
      - {name: b, match: {path: {prefix: /b}}, upstream: b}
    """
    assert warnings_of(text) == []


@pytest.mark.parametrize(
    ("upstream", "line", "path", "words"),
    [
        (
            "instances: [127.0.0.1:7001, {address: 127.0.0.1:7002, weight: 3}]",
            4,
            "upstreams.u.instances[1].weight",
            ["round_robin ignores weights"],
        ),
        (
            "instances: [127.0.0.1:7001]\n    slow_start: 30s",
            5,
            "upstreams.u.slow_start",
            ["round_robin", "no effect"],
        ),
        (
            "instances: [127.0.0.1:7001]\n    hedge: {after: 50ms}",
            5,
            "upstreams.u.hedge",
            ["only one: it never hedges"],
        ),
        (
            "instances: [127.0.0.1:7001]\n    health: {interval: 1s, timeout: 2s}",
            5,
            "upstreams.u.health.timeout",
            ["not shorter than health.interval"],
        ),
    ],
)
def test_upstream_warnings(upstream: str, line: int, path: str, words: list[str]) -> None:
    text = f"listen: 127.0.0.1:8080\nupstreams:\n  u:\n    {upstream}\nroutes:\n"
    text += "  - {name: r, upstream: u}\n"
    found = [w for w in warnings_of(text) if w.path == path]
    assert len(found) == 1, warnings_of(text)
    assert found[0].line == line
    for word in words:
        assert word in found[0].message


LEASE_HEAD = "listen: 127.0.0.1:8080\nupstreams:\n  u:\n    instances: [127.0.0.1:7001]\n"


@pytest.mark.parametrize(
    ("snippet", "line", "path"),
    [
        (  # a route's single limit, written as a mapping
            "routes:\n  - name: r\n    upstream: u\n    rate_limit: {rate: 10/s, lease: true}\n",
            8,
            "routes[0].rate_limit.lease",
        ),
        (  # the second entry of a list, on a local store
            "routes:\n  - name: r\n    upstream: u\n    rate_limit:\n"
            "      - {rate: 10/s}\n      - {rate: 100/m, store: local, lease: false}\n",
            10,
            "routes[0].rate_limit[1].lease",
        ),
        (  # the process-wide limit
            "rate_limit: {rate: 10/s, lease: true}\nroutes:\n  - {name: r, upstream: u}\n",
            5,
            "rate_limit.lease",
        ),
    ],
)
def test_lease_on_a_local_limit_warns(snippet: str, line: int, path: str) -> None:
    found = [w for w in warnings_of(LEASE_HEAD + snippet) if w.path == path]
    assert len(found) == 1, warnings_of(LEASE_HEAD + snippet)
    assert found[0].line == line
    assert "store: redis only" in found[0].message


def test_lease_on_a_redis_limit_or_left_out_does_not_warn() -> None:
    text = LEASE_HEAD + (
        "redis: {url: redis://127.0.0.1:6379/0}\nroutes:\n  - name: r\n    upstream: u\n"
        "    rate_limit:\n      - {rate: 10/s, store: redis, lease: true}\n"
        "      - {rate: 10/s}\n"
    )
    assert [w for w in warnings_of(text) if "lease" in w.path] == []


def test_unused_upstream_and_exposed_admin_and_trust_everyone() -> None:
    text = """\
    admin: 0.0.0.0:9901
    trusted_proxies: [10.0.0.0/8, 0.0.0.0/0]
    upstreams:
      used: {instances: [127.0.0.1:7001]}
      spare: {instances: [127.0.0.1:7002]}
    routes:
      - {name: r, upstream: used}
    """
    found = {(w.line, w.path) for w in warnings_of(text)}
    assert found == {(1, "admin"), (2, "trusted_proxies[1]"), (5, "upstreams.spare")}


def test_exposed_admin_with_a_token_does_not_warn() -> None:
    text = """\
    admin: {address: 0.0.0.0:9901, token: s3cret}
    upstreams: {u: {instances: [127.0.0.1:7001]}}
    routes: [{name: r, upstream: u}]
    """
    assert warnings_of(text) == []


def test_watch_on_a_file_in_an_unreadable_directory(tmp_path: Path) -> None:
    config_file = tmp_path / "gw.yaml"
    config_file.write_text(
        "watch: true\nupstreams: {u: {instances: [127.0.0.1:7001]}}\n"
        "routes: [{name: r, upstream: u}]\n"
    )
    config = load_config(config_file)
    text = config_file.read_text()
    assert lint_text(text, config) == []  # readable: nothing to say

    def no_directory_listing(path: str, mode: int) -> bool:
        return path != str(tmp_path)

    found = lint_text(text, config, access=no_directory_listing)
    assert [(w.line, w.path) for w in found] == [(1, "watch")]
    assert str(tmp_path) in found[0].message and "never be reloaded" in found[0].message


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_watch_warning_from_gateway_check_as_another_user() -> None:
    # A real permission problem: a directory the unprivileged user may enter (x) but not list
    # (no r), with a readable config file inside. The check loads it, and warns about watch.
    directory = Path(tempfile.mkdtemp(prefix="gw-lint-"))
    try:
        config_file = directory / "gateway.yaml"
        config_file.write_text(
            "watch: true\nupstreams: {u: {instances: [127.0.0.1:7001]}}\n"
            "routes: [{name: r, upstream: u}]\n"
        )
        config_file.chmod(0o644)
        directory.chmod(0o311)
        result = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-m",
                "gateway",
                "check",
                "-c",
                str(config_file),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        directory.chmod(0o700)
        shutil.rmtree(directory)
    assert result.returncode == 0, result.stderr
    assert f"{config_file}:1: watch: warning: the directory" in result.stderr
    assert "uid 65534" in result.stderr


def test_regex_literal_prefix() -> None:
    assert regex_literal_prefix(r"/items/\d+") == "/items/"
    assert regex_literal_prefix(r"^/api/v2/.*") == "/api/v2/"
    assert regex_literal_prefix(r"/ab?c") == "/a"
    assert regex_literal_prefix(r"/(a|b)") == ""
    assert regex_literal_prefix(r"/x{2}") == "/"


SHIPPED = sorted([ROOT / "config" / "gateway.yaml", *(ROOT / "config" / "examples").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_do_not_warn(path: Path) -> None:
    assert lint_text(path.read_text(), load_config(path)) == []


# --- mistakes that are (and must stay) errors, with file:line:key -----------------------------


def error_lines(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as caught:
        load_config_text(textwrap.dedent(text), "gw.yaml")
    return [str(e) for e in caught.value.errors]


def test_hash_key_on_a_balancer_that_ignores_it_is_an_error() -> None:
    errors = error_lines("""\
    upstreams:
      u:
        instances: [127.0.0.1:7001]
        balancer: least_request
        hash_key: header:x-user
    routes: [{name: r, upstream: u}]
    """)
    assert errors == [
        "gw.yaml:5: upstreams.u.hash_key: only meaningful with balancer ring_hash or maglev"
    ]


def test_redis_store_without_a_redis_block_is_an_error() -> None:
    errors = error_lines("""\
    upstreams: {u: {instances: [127.0.0.1:7001]}}
    routes:
      - name: r
        upstream: u
        rate_limit: {rate: 10/s, store: redis}
    """)
    assert len(errors) == 1 and errors[0].startswith("gw.yaml:")
    assert ": redis: required: " in errors[0] and "store: redis" in errors[0]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "limits: {max_connections: 99999999999999999999999999}",
            "gw.yaml:3: limits.max_connections: must be at most 2147483647, got"
            " 99999999999999999999999999",
        ),
        (
            "limits: {max_body_bytes: 99999999999999999999999999}",
            "gw.yaml:3: limits.max_body_bytes: must be at most 1125899906842624 bytes, got"
            " 99999999999999999999999999",
        ),
        (
            "limits: {max_header_bytes: 2000000TiB}",
            "gw.yaml:3: limits.max_header_bytes: must be at most 1125899906842624 bytes",
        ),
        ("workers: 10000000000", "gw.yaml:3: workers: must be at most 2147483647"),
        # An infinite bucket bound used to pass validation and fail later, at startup.
        (
            "metrics: {buckets: {overhead: [0.1, .inf]}}",
            "gw.yaml:3: metrics.buckets.overhead[1]: must be at most 9007199254740992, got inf",
        ),
    ],
)
def test_numbers_have_an_upper_bound(snippet: str, expected: str) -> None:
    text = "upstreams: {u: {instances: [127.0.0.1:7001]}}\nroutes: [{name: r, upstream: u}]\n"
    errors = error_lines(text + snippet + "\n")
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_cli_check_prints_warnings_and_strict_fails_on_them(tmp_path: Path) -> None:
    config_file = tmp_path / "gw.yaml"
    config_file.write_text(HEAD + ROUTE_CASES[0][1])
    command = [sys.executable, "-m", "gateway", "check", "-c", str(config_file)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "configuration is valid" in result.stdout
    assert f"{config_file}:11: routes[2].name: warning: route 'canary' can never match" in (
        result.stderr
    )
    strict = subprocess.run(
        [*command, "--strict"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert strict.returncode == 1
    assert "1 warning(s), failing (--strict)" in strict.stderr


def test_idempotency_lock_timeout_not_longer_than_the_route_timeout() -> None:
    text = """
upstreams:
  pay: {instances: [127.0.0.1:9000]}
routes:
  - name: pay
    match: {path: {prefix: /pay}}
    upstream: pay
    timeout: 30s
    idempotency: {lock_timeout: 20s}
"""
    warnings = warnings_of(text)
    (warning,) = [w for w in warnings if w.path == "routes[0].idempotency.lock_timeout"]
    assert warning.line == 9
    assert "20s is not longer than the route timeout (30s)" in warning.message
    longer = text.replace("lock_timeout: 20s", "lock_timeout: 60s")
    assert not [w for w in warnings_of(longer) if "lock_timeout" in w.path]


def test_grpc_web_to_an_http1_upstream_warns() -> None:
    text = HEAD + (
        "  grpc:\n"
        "    instances: [127.0.0.1:7004]\n"
        "    filters: [{grpc_web: {}}]\n"
        "routes:\n"
        "  - name: web\n"
        "    upstream: users\n"
        "    filters:\n"
        "      - cors: {allow_origins: ['https://app.example']}\n"
        "      - grpc_web: {}\n"
        "  - {name: g, match: {path: {prefix: /g/}}, upstream: grpc}\n"
    )
    found = {(w.path, w.line): w.message for w in warnings_of(text) if "grpc_web" in w.message}
    assert set(found) == {("routes[0].filters[1]", 16), ("upstreams.grpc.filters[0]", 10)}
    assert "upstream 'users', which speaks HTTP/1.1" in found[("routes[0].filters[1]", 16)]
    assert "protocol: h2c or h2" in found[("upstreams.grpc.filters[0]", 10)]


def test_grpc_web_to_an_http2_upstream_does_not_warn() -> None:
    text = HEAD + (
        "  grpc:\n"
        "    instances: [127.0.0.1:7004]\n"
        "    protocol: h2c\n"
        "    filters: [{grpc_web: {}}]\n"
        "routes:\n"
        "  - {name: web, upstream: grpc, filters: [{grpc_web: {}}]}\n"
    )
    assert [w for w in warnings_of(text) if "grpc_web" in w.message] == []
