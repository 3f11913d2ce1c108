"""Config warnings: settings that are valid but almost certainly not what the author meant.

``gateway check`` prints these after a successful validation, each as
``file:line: key.path: warning: message``; ``gateway check --strict`` fails on them. They never
stop ``gateway run``: a warning is a question to the author, not a broken file.

Everything here is pure (config in, warnings out) except the ``watch`` check, which asks the
file system what the running gateway will be able to do (``access`` is injectable for tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.config.model import (
    GatewayConfig,
    MatchConfig,
    RateLimitConfig,
    RouteConfig,
    UpstreamConfig,
)
from gateway.config.yamlpos import Path, Positions, format_path, load_yaml

__all__ = [
    "ConfigWarning",
    "lint_config",
    "lint_text",
    "regex_literal_prefix",
    "shadowing_route",
]

# Balancers that ignore instance weights / slow start (gateway/balancing: `weighted = False`
# and RoundRobin's docstring). ring_hash and maglev use weights for their tables.
_IGNORES_WEIGHTS = ("round_robin",)
_IGNORES_SLOW_START = ("round_robin", "ring_hash", "maglev")
_EVERYONE = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """One suspicious setting: same shape as ``ConfigError`` plus the word ``warning``."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: warning: {self.message}"


class _Collector:
    def __init__(self, source: str, positions: Positions) -> None:
        self.source = source
        self.positions = positions
        self.warnings: list[ConfigWarning] = []

    def warn(self, path: Path, message: str) -> None:
        line = self.positions.line_of(path)
        self.warnings.append(ConfigWarning(self.source, line, format_path(path), message))


def lint_text(
    text: str,
    config: GatewayConfig,
    *,
    access: Callable[[str, int], bool] = os.access,
) -> list[ConfigWarning]:
    """Warnings for ``config``, which was validated from ``text`` (read again for line numbers)."""
    _data, positions, _errors = load_yaml(text, config.source)
    return lint_config(config, positions, access=access)


def lint_config(
    config: GatewayConfig,
    positions: Positions | None = None,
    *,
    access: Callable[[str, int], bool] = os.access,
) -> list[ConfigWarning]:
    """Every warning for a validated config, in file order."""
    out = _Collector(config.source, positions or Positions())
    _shadowed_routes(out, config.routes)
    for i, route in enumerate(config.routes):
        _strip_prefix(out, i, route)
        _route_timeouts(out, i, route, config.upstreams.get(route.upstream))
        _grpc_web_upstream(out, i, route, config.upstreams.get(route.upstream))
    used = {route.upstream for route in config.routes}
    # traffic_split filters send requests to the upstreams they name, wherever they are.
    for spec in (
        *config.filters,
        *(f for route in config.routes for f in route.filters),
        *(f for upstream in config.upstreams.values() for f in upstream.filters),
    ):
        if spec.kind == "traffic_split":
            used.update(name for name, _ in spec.options["upstreams"])
    for name, upstream in config.upstreams.items():
        _upstream(out, name, upstream, used)
    _leases_without_redis(out, config)
    _exposure(out, config)
    _watch(out, config, access)
    return sorted(out.warnings, key=lambda w: (w.line is None, w.line or 0))


# --- routes -----------------------------------------------------------------------------------


def _host_key(match: MatchConfig) -> str | None:
    """The host group a route lands in (what RouteTable groups by): None = any host."""
    host = match.host
    if host is None or host in ("", "*"):
        return None
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


_REGEX_META = set(".^$*+?{}[]\\|()")


def regex_literal_prefix(pattern: str) -> str:
    """The plain text every full match of ``pattern`` starts with ("" when unsure).

    Conservative: an alternation anywhere gives "", and a literal followed by a quantifier
    loses its last character (``/ab?`` only promises ``/a``).
    """
    if "|" in pattern:
        return ""
    text = pattern[1:] if pattern.startswith("^") else pattern
    end = 0
    while end < len(text) and text[end] not in _REGEX_META:
        end += 1
    literal = text[:end]
    if end < len(text) and text[end] in "*?{":
        literal = literal[:-1]
    return literal


def _covers(earlier: RouteConfig, later: RouteConfig) -> bool:
    """Whether every request ``later`` matches is tried on ``earlier`` first and matches it.

    Same host group; the route table tries, in that group, exact paths (file order per path),
    then prefixes longest first (file order per prefix), then regexes (file order). So an
    earlier route covers a later one when it sits in the same bucket (same exact path, same
    prefix, or a regex that is identical), or when it is a prefix tried before every regex
    whose matches all start with that prefix; and its methods, headers and query ask no more.
    """
    a, b = earlier.match, later.match
    if _host_key(a) != _host_key(b):
        return False
    if a.methods is not None and (b.methods is None or not set(b.methods) <= set(a.methods)):
        return False
    if not set(a.headers) <= set(b.headers) or not set(a.query) <= set(b.query):
        return False
    if a.sni is not None and a.sni != b.sni:  # an SNI condition narrows the earlier route
        return False
    a_kind, a_value = (a.path.kind, a.path.value) if a.path else ("prefix", "/")
    b_kind, b_value = (b.path.kind, b.path.value) if b.path else ("prefix", "/")
    if a_kind == b_kind and a_value == b_value:
        return True
    # Every path starts with "/", so prefix "/" is tried before, and takes, every regex path.
    return (
        a_kind == "prefix"
        and b_kind == "regex"
        and (a_value == "/" or regex_literal_prefix(b_value).startswith(a_value))
    )


def shadowing_route(routes: Iterable[RouteConfig], index: int) -> int | None:
    """The index of the first route that makes ``routes[index]`` unreachable, or None."""
    listed = list(routes)
    later = listed[index]
    for i in range(index):
        if _covers(listed[i], later):
            return i
    return None


def _what(route: RouteConfig) -> str:
    path = route.match.path
    where = f"path {path.kind} {path.value!r}" if path else "every path"
    host = route.match.host
    return f"host {host!r}, {where}" if host else f"any host, {where}"


def _shadowed_routes(out: _Collector, routes: tuple[RouteConfig, ...]) -> None:
    for j, route in enumerate(routes):
        i = shadowing_route(routes, j)
        if i is None:
            continue
        first = routes[i]
        line = out.positions.line_of(("routes", i))
        at = f" (line {line})" if line else ""
        out.warn(
            ("routes", j, "name"),
            f"route {route.name!r} can never match: route {first.name!r}{at} comes first with"
            f" {_what(first)} and no method, header or query condition that {route.name!r}"
            f" lacks, so it takes every request {route.name!r} would. Move {route.name!r}"
            " before it, or give it a narrower match",
        )


def _strip_prefix(out: _Collector, i: int, route: RouteConfig) -> None:
    rewrite, path = route.rewrite, route.match.path
    strip = rewrite.strip_prefix if rewrite is not None else None
    if not strip or path is None:
        return
    key = ("routes", i, "rewrite", "strip_prefix")
    if path.kind == "prefix" and not path.value.startswith(strip):
        if strip.startswith(path.value):
            example = path.value
            out.warn(
                key,
                f"{strip!r} is longer than the route's path prefix {path.value!r}: a request"
                f" for {example!r} matches the route but is sent upstream unstripped",
            )
        else:
            out.warn(
                key,
                f"{strip!r} is not a prefix of the route's path prefix {path.value!r}: it never"
                " applies, every path is sent upstream unchanged",
            )
    elif path.kind == "exact" and not path.value.startswith(strip):
        out.warn(
            key,
            f"{strip!r} is not a prefix of the route's exact path {path.value!r}: it never applies",
        )
    elif path.kind == "regex":
        literal = regex_literal_prefix(path.value)
        if literal and not literal.startswith(strip) and not strip.startswith(literal):
            out.warn(
                key,
                f"{strip!r} cannot be a prefix of paths matching {path.value!r} (they start with"
                f" {literal!r}): it never applies",
            )


def _route_timeouts(
    out: _Collector, i: int, route: RouteConfig, upstream: UpstreamConfig | None
) -> None:
    idempotency = route.idempotency
    # A claim that expires before its request can end frees the key mid-request: a duplicate
    # then runs again, and the first response is not stored.
    if (
        idempotency is not None
        and route.timeout is not None
        and idempotency.lock_timeout <= route.timeout
    ):
        out.warn(
            ("routes", i, "idempotency", "lock_timeout"),
            f"{idempotency.lock_timeout:g}s is not longer than the route timeout"
            f" ({route.timeout:g}s): a claim can expire while its request is still running,"
            " and a duplicate is then forwarded again",
        )
    if route.timeout is None or upstream is None:
        return
    retry = route.retry or upstream.retry
    per_try = retry.per_try_timeout
    if retry.attempts > 1 and per_try is not None and per_try >= route.timeout:
        path: Path = ("routes", i, "timeout")
        out.warn(
            path,
            f"{route.timeout:g}s is not longer than retry.per_try_timeout ({per_try:g}s): a"
            " try that times out ends the whole request, so it is never retried",
        )


def _grpc_web_upstream(
    out: _Collector, i: int, route: RouteConfig, upstream: UpstreamConfig | None
) -> None:
    # grpc_web turns a request into gRPC, which needs HTTP/2 to the upstream (trailers); over
    # HTTP/1.1 no gRPC server takes it. A warning, not an error: the route may serve other
    # requests, and a traffic_split filter may send the calls elsewhere.
    if upstream is None or upstream.protocol != "http1":
        return
    for j, spec in enumerate(route.filters):
        if spec.kind == "grpc_web":
            out.warn(
                ("routes", i, "filters", j),
                f"grpc_web on a route to upstream '{route.upstream}', which speaks HTTP/1.1:"
                " gRPC-Web calls need a gRPC upstream (upstreams.NAME.protocol: h2c or h2)",
            )


# --- upstreams --------------------------------------------------------------------------------


def _upstream(out: _Collector, name: str, upstream: UpstreamConfig, used: set[str]) -> None:
    base: Path = ("upstreams", name)
    if upstream.protocol == "http1":
        for j, spec in enumerate(upstream.filters):
            if spec.kind == "grpc_web":
                out.warn(
                    (*base, "filters", j),
                    "grpc_web on an upstream that speaks HTTP/1.1: gRPC-Web calls need a gRPC"
                    " upstream (protocol: h2c or h2)",
                )
    if name not in used:
        out.warn(base, f"upstream {name!r} is not used by any route")
    outlier = upstream.outlier
    panic = upstream.panic_threshold * 100.0
    if outlier is not None and panic > 0 and outlier.max_ejection_percent > 100.0 - panic:
        out.warn(
            (*base, "outlier", "max_ejection_percent"),
            f"{outlier.max_ejection_percent:g}% can eject more than 100 - panic_threshold"
            f" ({100.0 - panic:g}%) of the instances: ejections alone then put the upstream"
            f" below its panic threshold ({panic:g}%), where instances failing only their health"
            f" check are used again (ejected ones never are). Use at most {100.0 - panic:g}, or"
            " lower panic_threshold",
        )
    if upstream.balancer in _IGNORES_WEIGHTS and any(i.weight != 1 for i in upstream.instances):
        index = next(k for k, i in enumerate(upstream.instances) if i.weight != 1)
        out.warn(
            (*base, "instances", index, "weight"),
            f"balancer {upstream.balancer} ignores weights: use weighted_round_robin, random,"
            " least_request or peak_ewma for weighted balancing",
        )
    if upstream.slow_start is not None and upstream.balancer in _IGNORES_SLOW_START:
        out.warn(
            (*base, "slow_start"),
            f"balancer {upstream.balancer} does not ramp instances up: slow_start has no effect",
        )
    if upstream.hedge is not None and upstream.discovery is None and len(upstream.instances) == 1:
        out.warn(
            (*base, "hedge"),
            "a hedge goes to another instance, and this upstream has only one: it never hedges",
        )
    health = upstream.health
    if health is not None and health.timeout >= health.interval:
        out.warn(
            (*base, "health", "timeout"),
            f"{health.timeout:g}s is not shorter than health.interval ({health.interval:g}s):"
            " a slow probe is still running when the next one is due",
        )


# --- rate limits ------------------------------------------------------------------------------


def _leases_without_redis(out: _Collector, config: GatewayConfig) -> None:
    # ``lease`` defaults to true and means nothing for a local bucket; written out on one, the
    # author probably expected a shared (Redis) limit.
    owners: list[tuple[Path, tuple[RateLimitConfig, ...]]] = [(("rate_limit",), config.rate_limit)]
    owners += [(("routes", i, "rate_limit"), r.rate_limit) for i, r in enumerate(config.routes)]
    owners += [(("upstreams", n, "rate_limit"), u.rate_limit) for n, u in config.upstreams.items()]
    for base, limits in owners:
        for j, limit in enumerate(limits):
            if limit.store != "local":
                continue
            # A list entry, or the one limit written as a mapping.
            paths = [(*base, j, "lease"), (*base, "lease")] if j == 0 else [(*base, j, "lease")]
            for path in paths:
                if path in out.positions.key_lines:
                    out.warn(
                        path,
                        "lease applies to store: redis only; this limit is counted in each"
                        " worker's own bucket (set store: redis to share it across gateways)",
                    )
                    break


# --- process-wide settings ------------------------------------------------------------------


def _exposure(out: _Collector, config: GatewayConfig) -> None:
    exposed = not config.admin.host or config.admin.host in ("0.0.0.0", "::")
    if exposed and not config.admin_token:
        out.warn(
            ("admin",),
            f"the admin server listens on every interface ({config.admin}) without"
            " admin.token: anyone who reaches it can POST /admin/reload and register"
            " instances. Set admin.token, or listen on 127.0.0.1",
        )
    for i, cidr in enumerate(config.trusted_proxies):
        if cidr in _EVERYONE:
            out.warn(
                ("trusted_proxies", i),
                f"{cidr} trusts every client's X-Forwarded-For: any client can choose its"
                " client_ip (rate-limit keys, logs). List only your proxies' networks",
            )


def _watch(out: _Collector, config: GatewayConfig, access: Callable[[str, int], bool]) -> None:
    if not config.watch:
        return
    source = config.source
    if not os.path.isfile(source):
        out.warn(("watch",), f"{source!r} is not a file on disk: there is nothing to watch")
        return
    directory = os.path.dirname(os.path.abspath(source))
    if not access(directory, os.R_OK | os.X_OK):
        out.warn(
            ("watch",),
            f"the directory {directory!r} is not readable by this user (uid {os.getuid()}):"
            " the gateway cannot follow the file, so changes would never be reloaded",
        )
    elif not access(source, os.R_OK):
        out.warn(
            ("watch",),
            f"{source!r} is not readable by this user (uid {os.getuid()}): changes would"
            " never be reloaded",
        )
