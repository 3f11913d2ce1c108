"""`gateway explain`: the route it names is the route table's, and it says why."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.config import load_config, load_config_text
from gateway.explain import explain, render, to_json
from gateway.routing.table import RouteTable

ROOT = Path(__file__).resolve().parents[2]

CONFIG = textwrap.dedent("""\
    upstreams:
      users:
        instances: [127.0.0.1:7001, {address: 127.0.0.1:7002, weight: 2}]
        balancer: weighted_round_robin
      canary:
        instances: [127.0.0.1:7003]
      items:
        instances: [127.0.0.1:7004]
        balancer: ring_hash
        hash_key: header:x-user
      web:
        discovery: registry
        service: web
    routes:
      - name: canary
        match: {host: api.example.com, path: {prefix: /api/users/}, headers: {x-canary: "1"}}
        upstream: canary
      - name: users
        match: {host: api.example.com, path: {prefix: /api/users/}, methods: [GET, POST]}
        upstream: users
        rewrite: {strip_prefix: /api}
      - name: users-get
        match: {host: api.example.com, path: {prefix: /api/users/}, methods: [GET]}
        upstream: users
      - name: health
        match: {path: {exact: /healthz}}
        upstream: users
      - name: item
        match: {host: '*.example.com', path: {regex: '/items/(\\d+)'}, query: {v: "2"}}
        upstream: items
        rewrite: {regex: '/items/(\\d+)', replacement: '/v2/items/\\1'}
      - name: web
        upstream: web
    """)


@pytest.fixture(scope="module")
def config():  # type: ignore[no-untyped-def]
    return load_config_text(CONFIG, "gw.yaml")


def test_winner_agrees_with_the_route_table(config) -> None:  # type: ignore[no-untyped-def]
    table = RouteTable(config.routes)
    methods = ["GET", "POST", "DELETE"]
    hosts = ["api.example.com", "API.example.com:8080", "a.example.com", "example.com", ""]
    paths = ["/api/users/1", "/api/users", "/healthz", "/items/7?v=2", "/items/7", "/x"]
    headers = [[], [("X-Canary", "1")], [("x-canary", "0")]]
    for method, host, target, extra in itertools.product(methods, hosts, paths, headers):
        result = explain(config, method, host, target, extra)
        path, _, query = target.partition("?")
        raw = [(n.lower().encode(), v.encode()) for n, v in extra]
        expected = table.match(method, host, path, query, raw)
        got = result.table_winner
        assert (got.index if got else None) == (expected.index if expected else None)
        assert result.winner is result.table_winner, (method, host, target, extra)


def test_explains_the_match_rewrite_and_upstream(config) -> None:  # type: ignore[no-untyped-def]
    result = explain(config, "GET", "api.example.com", "/api/users/42?x=1")
    assert result.table_winner is not None and result.table_winner.name == "users"
    assert result.rewritten_path == "/users/42"
    assert [c.route.name for c in result.shadowed] == ["users-get", "web"]
    canary = next(c for c in result.considered if c.route.name == "canary")
    assert not canary.matched
    assert [(k.what, k.ok) for k in canary.checks] == [
        ("host", True),
        ("path", True),
        ("headers", False),
    ]
    text = render(result)
    assert "'users' (routes[1]): MATCH" in text
    assert "NO  headers: x-canary: '1' required, header absent" in text
    assert "upstream request: GET /users/42?x=1" in text
    assert "upstream: 'users', balancer weighted_round_robin" in text
    assert "- 127.0.0.1:7002 weight 2" in text
    assert "'users-get' (routes[2]): shadowed by 'users' (routes[1])" in text
    assert "'web' (routes[5]) (any host)" in text


def test_wildcard_host_regex_query_and_regex_rewrite(config) -> None:  # type: ignore[no-untyped-def]
    result = explain(config, "GET", "shop.example.com", "/items/7?v=2")
    assert result.table_winner is not None and result.table_winner.name == "item"
    assert result.rewritten_path == "/v2/items/7"
    item = next(c for c in result.considered if c.route.name == "item")
    assert item.group == "wildcard host '*.example.com'"
    data = to_json(result)
    assert data["upstream"]["balancer"] == "ring_hash"
    assert data["upstream"]["hash_key"] == "header:x-user"
    miss = explain(config, "GET", "shop.example.com", "/items/7?v=1")
    assert miss.table_winner is not None and miss.table_winner.name == "web"
    item = next(c for c in miss.considered if c.route.name == "item")
    assert ("query", False) in [(k.what, k.ok) for k in item.checks]


def test_discovered_upstream_and_no_route() -> None:
    text = "upstreams: {web: {discovery: registry, service: web}}\n"
    text += "routes: [{name: web, match: {path: {prefix: /web/}}, upstream: web}]\n"
    config = load_config_text(text)
    hit = render(explain(config, "GET", "h", "/web/a"))
    assert "instances: discovered from 'registry', service 'web'" in hit
    miss = explain(config, "GET", "h", "/other")
    assert miss.table_winner is None
    assert "result: no route matches: the gateway answers 404" in render(miss)


def test_cli_explain_from_a_file(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(CONFIG)
    command = [sys.executable, "-m", "gateway", "explain", "-c", str(config_file)]
    hit = subprocess.run(
        [*command, "GET", "api.example.com", "/api/users/1", "-H", "X-Canary: 1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert hit.returncode == 0, hit.stderr
    assert "result: route 'canary' (routes[0])" in hit.stdout
    assert "- 127.0.0.1:7003 weight 1" in hit.stdout
    config_file.write_text(CONFIG.replace("  - name: web\n    upstream: web\n", ""))
    miss = subprocess.run(
        [*command, "GET", "other.org", "/nothing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert miss.returncode == 2
    assert "no route matches" in miss.stdout


def test_cli_explain_default_config() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "explain",
            "-c",
            "config/gateway.yaml",
            "--json",
            "GET",
            "localhost",
            "/demo/hello",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '"rewritten_path": "/hello"' in result.stdout
    demo = load_config(ROOT / "config" / "gateway.yaml").upstreams["demo"]
    for instance in demo.instances:
        assert instance.address in result.stdout
