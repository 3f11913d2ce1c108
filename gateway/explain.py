"""``gateway explain``: which route a request takes, and why.

Given a method, a Host and a path (with an optional query and headers), it walks the route table
the way ``RouteTable.match`` does and reports every route it looks at: the host group, the path
check (exact, prefix or regex), the method, header and query checks, and the first route that
passes them all. Then the path the upstream receives after the route's rewrite, the upstream's
balancer and instances, and the routes that would also have matched after the winner (shadowed
for this request, and never reachable at all when ``gateway check`` warns about them).

The winner is always taken from the real ``RouteTable.match``; the walk only explains it. When
the two disagree (a bug here), the output says so.

The config comes from a file (``-c``) or from a running gateway (``-a``): then the running config
is read from ``GET /admin/config`` and the live instances (state, discovered addresses) from
``GET /admin/upstreams``, both read-only; no admin endpoint is added for this.
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson

from gateway.config import ConfigInvalid, format_errors, load_config, load_config_text
from gateway.config.lint import shadowing_route
from gateway.config.model import GatewayConfig, RouteConfig, UpstreamConfig
from gateway.routing.table import Route, RouteTable, normalize_host

__all__ = ["Check", "Considered", "Explanation", "add_parser", "explain"]


@dataclass(frozen=True, slots=True)
class Check:
    """One condition of a route and whether the request meets it."""

    what: str  # host, path, methods, headers, query
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Considered:
    """A route the lookup tried, with its checks, in the order the lookup tries them."""

    route: Route
    group: str  # "exact host 'a.example.com'", "wildcard '*.example.com'", "any host"
    checks: tuple[Check, ...]

    @property
    def matched(self) -> bool:
        return all(check.ok for check in self.checks)


@dataclass
class Explanation:
    method: str
    host: str
    path: str
    query: str
    considered: list[Considered] = field(default_factory=list)
    winner: Route | None = None
    # Routes after the winner that pass every check too: they would have taken the request.
    shadowed: list[Considered] = field(default_factory=list)
    # Routes that never match any request because of an earlier one: (route, its shadower).
    unreachable: list[tuple[Route, Route]] = field(default_factory=list)
    table_winner: Route | None = None  # what RouteTable.match says (the truth)
    rewritten_path: str | None = None
    upstream: UpstreamConfig | None = None
    live_instances: list[dict[str, Any]] | None = None  # from /admin/upstreams (-a)


def _route_host(route: Route) -> str | None:
    host = route.config.match.host
    if host is None or host in ("", "*"):
        return None
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


def _host_groups(routes: tuple[Route, ...], key: str) -> list[tuple[str, list[Route]]]:
    """The host groups the table searches for ``key``, most specific first (table order)."""
    exact = [r for r in routes if _route_host(r) == key]
    wild: dict[str, list[Route]] = {}
    anyhost: list[Route] = []
    for route in routes:
        host = _route_host(route)
        if host is None:
            anyhost.append(route)
        elif host.startswith("*."):
            suffix = host[2:]
            # "*.example.com" matches "a.example.com" and deeper, never "example.com".
            if len(key) >= len(suffix) + 2 and key.endswith("." + suffix):
                wild.setdefault(suffix, []).append(route)
    groups: list[tuple[str, list[Route]]] = []
    if exact:
        groups.append((f"exact host {key!r}", exact))
    for suffix in sorted(wild, key=len, reverse=True):
        groups.append((f"wildcard host '*.{suffix}'", wild[suffix]))
    if anyhost:
        groups.append(("any host", anyhost))
    return groups


def _path_order(routes: list[Route], path: str) -> list[tuple[Route, Check]]:
    """The routes of a group whose path applies, in the order the table tries them, plus the
    path check; routes whose path does not apply come last with a failed check."""
    exact: list[tuple[Route, Check]] = []
    prefix: list[tuple[int, int, Route, Check]] = []
    regex: list[tuple[Route, Check]] = []
    rejected: list[tuple[Route, Check]] = []
    for route in routes:
        match = route.config.match.path
        kind, value = (match.kind, match.value) if match is not None else ("prefix", "/")
        if kind == "exact":
            if path == value:
                exact.append((route, Check("path", True, f"exact {value!r} equals the path")))
            else:
                rejected.append((route, Check("path", False, f"exact {value!r} is not {path!r}")))
        elif kind == "prefix":
            label = "prefix '/' (no path given)" if match is None else f"prefix {value!r}"
            if path.startswith(value):
                check = Check("path", True, f"{label} starts the path")
                prefix.append((-len(value), route.index, route, check))
            else:
                rejected.append((route, Check("path", False, f"{label} does not start {path!r}")))
        elif re.fullmatch(value, path) is not None:
            regex.append((route, Check("path", True, f"regex {value!r} matches the path")))
        else:
            detail = f"regex {value!r} does not match the whole path"
            rejected.append((route, Check("path", False, detail)))
    prefix.sort(key=lambda item: (item[0], item[1]))
    ordered = exact + [(r, c) for _, _, r, c in prefix] + regex
    return ordered + rejected


def _matcher_checks(
    route: RouteConfig, method: str, headers: Sequence[tuple[str, str]], query: str
) -> list[Check]:
    match = route.match
    checks: list[Check] = []
    if match.methods is not None:
        ok = method in match.methods
        verb = "is" if ok else "is not"
        checks.append(Check("methods", ok, f"{method} {verb} in [{', '.join(match.methods)}]"))
    for name, value in match.headers:
        values = [v for n, v in headers if n == name]
        ok = value in values
        if ok:
            detail = f"{name}: {value!r} present"
        elif values:
            detail = f"{name} is {', '.join(repr(v) for v in values)}, not {value!r}"
        else:
            detail = f"{name}: {value!r} required, header absent"
        checks.append(Check("headers", ok, detail))
    if match.query:
        pairs = set(parse_qsl(query, keep_blank_values=True))
        for name, value in match.query:
            ok = (name, value) in pairs
            detail = f"{name}={value} {'present' if ok else 'required, absent'} in the query"
            checks.append(Check("query", ok, detail))
    return checks


def explain(
    config: GatewayConfig,
    method: str,
    host: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
) -> Explanation:
    """Explain how ``config`` routes one request (``target`` is the path with its query)."""
    path, _, query = target.partition("?")
    method = method.upper()
    lowered = [(name.strip().lower(), value.strip()) for name, value in headers]
    table = RouteTable(config.routes)
    result = Explanation(method, host, path, query)
    for group, routes in _host_groups(table.routes, normalize_host(host)):
        for route, path_check in _path_order(routes, path):
            checks = [Check("host", True, group), path_check]
            if path_check.ok:
                checks += _matcher_checks(route.config, method, lowered, query)
            considered = Considered(route, group, tuple(checks))
            if considered.matched and result.winner is None:
                result.winner = route
            elif considered.matched:
                result.shadowed.append(considered)
            result.considered.append(considered)
    raw_headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in lowered]
    result.table_winner = table.match(method, host, path, query, raw_headers)
    winner = result.table_winner
    if winner is not None:
        result.rewritten_path = winner.rewrite_path(path)
        result.upstream = config.upstreams.get(winner.upstream)
    for j, route in enumerate(table.routes):
        i = shadowing_route(config.routes, j)
        if i is not None:
            result.unreachable.append((route, table.routes[i]))
    return result


# --- text output ------------------------------------------------------------------------------


def _route_label(route: Route) -> str:
    return f"{route.name!r} (routes[{route.index}])"


def render(result: Explanation, *, verbose: bool = False) -> str:
    lines: list[str] = []
    target = result.path + (f"?{result.query}" if result.query else "")
    lines.append(f"request: {result.method} {target}  Host: {result.host or '(none)'}")
    lines.append("")
    lines.append("routes looked at, in match order:")
    if not result.considered:
        lines.append("  (none: no route's host group covers this Host)")
    for considered in result.considered:
        path_ok = considered.checks[1].ok
        if not path_ok and not verbose:
            continue
        if considered.route is result.table_winner:
            mark = "MATCH"
        elif considered.matched:
            mark = "would match (shadowed)"
        else:
            mark = "no"
        lines.append(f"  {_route_label(considered.route)}: {mark}")
        for check in considered.checks:
            lines.append(f"      {'ok ' if check.ok else 'NO '} {check.what}: {check.detail}")
    skipped = sum(1 for c in result.considered if not c.checks[1].ok)
    if skipped and not verbose:
        lines.append(f"  ({skipped} more route(s) of these host groups: path does not apply; -v)")
    lines.append("")
    winner = result.table_winner
    if result.winner is not winner:
        lines.append(
            f"note: the route table chose {winner.name if winner else 'no route'}, the"
            f" explanation {result.winner.name if result.winner else 'none'} (a bug in explain)"
        )
    if winner is None:
        lines.append("result: no route matches: the gateway answers 404")
        return "\n".join(lines)
    lines.append(f"result: route {_route_label(winner)}")
    config = winner.config
    if result.rewritten_path != result.path or winner.host_rewrite:
        rewritten = (result.rewritten_path or "") + (f"?{result.query}" if result.query else "")
        lines.append(f"  upstream request: {result.method} {rewritten}")
        rewrite = config.rewrite
        steps = []
        if rewrite is not None:
            for key in ("strip_prefix", "prefix", "regex", "replacement", "host"):
                value = getattr(rewrite, key)
                if value is not None:
                    steps.append(f"{key} {value!r}")
        lines.append(f"  rewrite: {', '.join(steps)}")
    else:
        lines.append(f"  upstream request: {result.method} {target} (path unchanged)")
    if winner.host_rewrite:
        lines.append(f"  Host sent upstream: {winner.host_rewrite}")
    if config.timeout is not None:
        lines.append(f"  route timeout: {config.timeout:g}s")
    if config.rate_limit:
        limits = ", ".join(
            f"{limit.count}/{limit.period:g}s key {limit.key} ({limit.store})"
            for limit in config.rate_limit
        )
        lines.append(f"  rate limits: {limits}")
    lines.extend(_render_upstream(winner.upstream, result.upstream, result.live_instances))
    if result.shadowed:
        lines.append("")
        lines.append("also matching, but an earlier route wins:")
        for considered in result.shadowed:
            lines.append(f"  {_route_label(considered.route)} ({considered.group})")
    if result.unreachable:
        lines.append("")
        lines.append("routes that can never match (an earlier route takes all their requests):")
        for route, first in result.unreachable:
            lines.append(f"  {_route_label(route)}: shadowed by {_route_label(first)}")
    return "\n".join(lines)


def _render_upstream(
    name: str, upstream: UpstreamConfig | None, live: list[dict[str, Any]] | None
) -> list[str]:
    if upstream is None:
        return [f"  upstream: {name!r} (not defined)"]
    lines = [f"  upstream: {name!r}, balancer {upstream.balancer}"]
    if upstream.hash_key:
        lines[-1] += f" on {upstream.hash_key}"
    lines.append(
        f"    panic threshold {upstream.panic_threshold * 100:g}%, retry attempts"
        f" {upstream.retry.attempts} on {', '.join(str(c) for c in upstream.retry.on)}"
    )
    if upstream.discovery is not None:
        lines.append(
            f"    instances: discovered from {upstream.discovery!r}, service {upstream.service!r}"
        )
    if live is not None:
        if not live:
            lines.append("    live instances: none (503 until some appear)")
        for instance in live:
            lines.append(
                f"    - {instance.get('address')} weight {instance.get('weight')}"
                f" {instance.get('state')}"
            )
    elif upstream.discovery is None:
        for configured in upstream.instances:
            lines.append(f"    - {configured.address} weight {configured.weight}")
    return lines


# --- command line -----------------------------------------------------------------------------


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def add_parser(commands: Any, default_config: str) -> None:
    """Register ``gateway explain`` on the CLI's subparsers."""
    parser = commands.add_parser(
        "explain",
        help="show which route a request takes and why (from a config file or a running gateway)",
        description="Show which route METHOD HOST PATH takes, why, the rewritten path, the"
        " upstream and its instances, and routes shadowed by earlier ones.",
    )
    parser.add_argument("method", help="request method, e.g. GET")
    parser.add_argument("host", help="Host header, e.g. api.example.com ('' for none)")
    parser.add_argument("path", help="request path, optionally with ?query")
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        type=_parse_header,
        default=[],
        help="request header 'Name: value' (repeatable)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", help=f"route YAML file (default {default_config})")
    source.add_argument(
        "-a",
        "--admin",
        help="admin address of a running gateway, e.g."
        " 127.0.0.1:9901: explain its running config and live instances",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also list the routes whose path does not apply",
    )
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")
    parser.set_defaults(handler=lambda args: cmd_explain(args, default_config))


def _fetch_json(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return orjson.loads(response.read())


def _from_admin(admin: str) -> tuple[GatewayConfig, dict[str, list[dict[str, Any]]]]:
    base = (admin if "://" in admin else f"http://{admin}").rstrip("/")
    body = _fetch_json(base, "/admin/config")
    # JSON is YAML: the running config's document goes through the same validation.
    config = load_config_text(orjson.dumps(body["config"]).decode(), f"{base}/admin/config")
    upstreams = _fetch_json(base, "/admin/upstreams").get("upstreams") or []
    live = {u["name"]: list(u.get("instances") or []) for u in upstreams if "name" in u}
    return config, live


def to_json(result: Explanation) -> dict[str, Any]:
    def route(r: Route | None) -> dict[str, Any] | None:
        return None if r is None else {"name": r.name, "index": r.index, "upstream": r.upstream}

    return {
        "request": {
            "method": result.method,
            "host": result.host,
            "path": result.path,
            "query": result.query,
        },
        "route": route(result.table_winner),
        "rewritten_path": result.rewritten_path,
        "upstream": None
        if result.upstream is None
        else {
            "name": result.upstream.name,
            "balancer": result.upstream.balancer,
            "hash_key": result.upstream.hash_key,
            "discovery": result.upstream.discovery,
            "service": result.upstream.service,
            "instances": result.live_instances
            if result.live_instances is not None
            else [{"address": i.address, "weight": i.weight} for i in result.upstream.instances],
        },
        "considered": [
            {
                "route": route(c.route),
                "group": c.group,
                "matched": c.matched,
                "checks": [{"what": k.what, "ok": k.ok, "detail": k.detail} for k in c.checks],
            }
            for c in result.considered
        ],
        "shadowed": [route(c.route) for c in result.shadowed],
        "unreachable": [{"route": route(r), "by": route(f)} for r, f in result.unreachable],
    }


def cmd_explain(args: argparse.Namespace, default_config: str) -> int:
    live: dict[str, list[dict[str, Any]]] | None = None
    try:
        if args.admin:
            config, live = _from_admin(args.admin)
        else:
            config = load_config(args.config or default_config)
    except ConfigInvalid as invalid:
        print(format_errors(invalid.errors), file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError, ValueError, KeyError) as error:
        print(f"{args.admin}: cannot read the running config: {error}", file=sys.stderr)
        return 1
    result = explain(config, args.method, args.host, args.path, args.header)
    if live is not None and result.upstream is not None:
        result.live_instances = live.get(result.upstream.name, [])
    if args.json:
        print(orjson.dumps(to_json(result), option=orjson.OPT_INDENT_2).decode())
    else:
        print(render(result, verbose=args.verbose))
    return 0 if result.table_winner is not None else 2
