"""The compiled route table: which route serves a request.

Lookup never scans every route. Routes are grouped by host, then indexed by path:

* **Host groups**, searched most specific first, falling through to the next group when nothing
  in a group matches the request:

  1. the routes whose ``host`` equals the request host (one dict lookup);
  2. the wildcard routes (``*.example.com``), longest suffix first. ``*.example.com`` matches
     ``a.example.com`` and ``a.b.example.com`` (any depth >= 1) but not ``example.com``. The
     lookup checks one suffix per distinct wildcard suffix length, so its cost depends on the
     number of distinct lengths, not on the number of wildcard routes, nor on the number of
     labels in the Host;
  3. the routes without a host (any host). A host of ``"*"`` in the config means the same.

  The request host is the raw Host header value: the port is removed (RFC 9110 §7.2: the port
  does not take part in routing here), letters are lower-cased (host names are case-insensitive,
  RFC 3986 §3.2.2), and one trailing dot is removed (``example.com.`` is the same name).
  An IPv6 literal loses its brackets: ``[::1]:8080`` is ``::1``, and a config host ``[::1]`` or
  ``::1`` matches it. The list of groups to search is memoised per raw Host value (bounded), so
  a request usually pays one dict lookup for all of this.

* **Path index** inside a group, in this order:

  1. exact paths (one dict lookup);
  2. prefixes, longest first. Prefixes are **plain string prefixes**, as in Envoy's ``prefix``
     and Traefik's ``PathPrefix``: ``/users`` matches ``/users``, ``/users/1`` and also
     ``/users-admin``; end a prefix with ``/`` to match whole segments only. A route without a
     path is prefix ``/``. The index is a dict from prefix to routes plus the distinct prefix
     lengths: for each length that fits, longest first, ``path[:length]`` is looked up, so the
     cost depends on the number of distinct prefix lengths, not on the number of routes;
  3. regex routes, in config order. A regex must match the **whole** path (``re.fullmatch``,
     like Envoy's ``safe_regex``): ``/items/\\d+`` does not match ``/items/1/x``.

  Routes sharing one exact path or one prefix are tried in config order; the first whose
  methods, headers and query match wins. When none does, the search continues with the next
  shorter prefix, then the regex routes, then the next host group.

* **Methods** are compared exactly (methods are case-sensitive, RFC 9110 §9.1) against the
  route's list; no list means any method. ``HEAD`` does **not** match a ``GET``-only route:
  list ``HEAD`` explicitly where it is wanted.
* **Headers**: every configured ``(name, value)`` must be present; a value matches when one of
  the request's fields with that name has exactly that value (bytes compared, i.e. the value
  decoded as latin-1 equals the configured string).
* **Query**: every configured ``(name, value)`` must be present; the raw query is parsed with
  ``urllib.parse.parse_qsl(keep_blank_values=True)`` (percent-decoding, ``+`` as space), and a
  parameter that appears several times matches when any of its values is equal. The query is
  parsed only when a candidate route has query matchers.

The path given to :meth:`RouteTable.match` is the request path without the query string, as
normalised by ``gateway.proxy.normalize`` (dot segments resolved, unreserved escapes decoded):
the route table sees what the upstream will see.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from gateway.config.model import RouteConfig
from gateway.routing.rewrite import PathRewriter, compile_path_rewrite

__all__ = ["Route", "RouteTable", "normalize_host"]

Headers = Sequence[tuple[bytes, bytes]]


def normalize_host(host: str) -> str:
    """The routing key of a raw Host header value (see the module docstring)."""
    if host.startswith("["):
        end = host.find("]")
        # "[::1]:8080" -> "::1"; a malformed literal without "]" is kept as is (it matches only
        # host-less routes, unless a config host equals it).
        return host[1:end].lower() if end > 0 else host.lower()
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    if host.endswith("."):
        host = host[:-1]
    return host.lower()


def sni_matches(pattern: str, server_name: str) -> bool:
    """``pattern`` (exact, or "*.suffix" covering exactly one more label) against a TLS server
    name; an empty name (plaintext, or no SNI) matches nothing."""
    if not server_name:
        return False
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        return (
            server_name.endswith(suffix)
            and "." not in server_name[: -len(suffix)]
            and (len(server_name) > len(suffix))
        )
    return server_name == pattern


def _normalize_config_host(host: str | None) -> str | None:
    """The config host in the same form as :func:`normalize_host` output; None for any host."""
    if host is None or host in ("", "*"):
        return None
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host[:-1] if host.endswith(".") else host


class Route:
    """One compiled route.

    ``rewrite_path`` returns its argument unchanged (same object) when the route rewrites no
    path; ``rewrites_path`` tells the caller so, to skip the call entirely.
    """

    __slots__ = (
        "_headers",
        "_methods",
        "_query",
        "_regex",
        "_rewriter",
        "_simple",
        "_sni",
        "config",
        "host_rewrite",
        "index",
        "max_body_bytes",
        "name",
        "rewrites_path",
        "timeout",
        "upstream",
    )

    name: str
    upstream: str
    config: RouteConfig
    timeout: float | None
    max_body_bytes: int | None
    host_rewrite: str | None
    rewrites_path: bool
    index: int

    def __init__(self, config: RouteConfig, index: int) -> None:
        self.name = config.name
        self.upstream = config.upstream
        self.config = config
        self.timeout = config.timeout
        self.max_body_bytes = config.max_body_bytes
        self.index = index  # position in the config list: the tie-breaker of equal matches
        rewrite = config.rewrite
        self.host_rewrite = rewrite.host if rewrite is not None and rewrite.host else None
        try:
            self._rewriter: PathRewriter | None = compile_path_rewrite(rewrite)
        except ValueError as exc:
            raise ValueError(f"route {config.name!r}: {exc}") from None
        self.rewrites_path = self._rewriter is not None
        match = config.match
        self._methods: frozenset[str] | None = (
            frozenset(match.methods) if match.methods is not None else None
        )
        # Header values compare as bytes: encoding the configured value once is the same as
        # decoding every request value as latin-1. A value latin-1 cannot encode never matches.
        headers: list[tuple[bytes, bytes | None]] = []
        for name, value in match.headers:
            try:
                raw: bytes | None = value.encode("latin-1")
            except UnicodeEncodeError:
                raw = None
            headers.append((name.lower().encode("latin-1"), raw))
        self._headers: tuple[tuple[bytes, bytes | None], ...] = tuple(headers)
        self._query: tuple[tuple[str, str], ...] = tuple(match.query)
        self._sni = match.sni  # lower-case exact name or "*.suffix"
        self._simple = not self._headers and not self._query and self._sni is None
        self._regex: Callable[[str], Any] | None = None
        path = match.path
        if path is not None and path.kind == "regex":
            try:
                self._regex = re.compile(path.value).fullmatch
            except re.error as exc:
                raise ValueError(
                    f"route {config.name!r}: invalid path regex {path.value!r}: {exc}"
                ) from None

    def rewrite_path(self, path: str) -> str:
        """The path to send upstream (the query string is not part of it)."""
        rewriter = self._rewriter
        return path if rewriter is None else rewriter(path)

    def _extra_ok(self, headers: Headers, query: str, sni: str = "") -> bool:
        """Whether the header, query and SNI matchers accept the request (methods checked
        before)."""
        wanted = self._sni
        if wanted is not None and not sni_matches(wanted, sni):
            return False
        for name, value in self._headers:
            if value is None:
                return False
            for hname, hvalue in headers:
                if hname == name and hvalue == value:
                    break
            else:
                return False
        if self._query:
            pairs = _parse_query(query)
            for pair in self._query:
                if pair not in pairs:
                    return False
        return True

    def describe(self) -> dict[str, Any]:
        match = self.config.match
        path = match.path
        return {
            "name": self.name,
            "upstream": self.upstream,
            "host": match.host,
            "path": (
                {"kind": path.kind, "value": path.value}
                if path is not None
                else {"kind": "prefix", "value": "/"}
            ),
            "methods": list(match.methods) if match.methods is not None else None,
            "headers": {name: value for name, value in match.headers},
            "query": {name: value for name, value in match.query},
            "rewrite": self._rewriter.describe() if self._rewriter is not None else None,
            "host_rewrite": self.host_rewrite,
            "timeout": self.timeout,
            "max_body_bytes": self.max_body_bytes,
        }

    def __repr__(self) -> str:
        return f"Route({self.name!r} -> {self.upstream!r})"


# One parse per distinct query string in a row: several query-matching candidates of one request
# share it. A single (query, pairs) tuple is replaced atomically, so it is safe to share.
_last_query: tuple[str, frozenset[tuple[str, str]]] = ("", frozenset())


def _parse_query(query: str) -> frozenset[tuple[str, str]]:
    global _last_query
    cached = _last_query
    if cached[0] == query:
        return cached[1]
    pairs = frozenset(parse_qsl(query, keep_blank_values=True))
    _last_query = (query, pairs)
    return pairs


class _Group:
    """The routes of one host key, indexed by path."""

    __slots__ = ("exact", "prefix_lengths", "prefixes", "regex")

    def __init__(self, routes: list[Route]) -> None:
        exact: dict[str, list[Route]] = {}
        prefixes: dict[str, list[Route]] = {}
        regex: list[Route] = []
        for route in routes:  # config order, kept inside every bucket
            path = route.config.match.path
            if path is None:
                prefixes.setdefault("/", []).append(route)
            elif path.kind == "exact":
                exact.setdefault(path.value, []).append(route)
            elif path.kind == "prefix":
                prefixes.setdefault(path.value, []).append(route)
            else:
                regex.append(route)
        self.exact: dict[str, tuple[Route, ...]] = {k: tuple(v) for k, v in exact.items()}
        self.prefixes: dict[str, tuple[Route, ...]] = {k: tuple(v) for k, v in prefixes.items()}
        # Ascending; match() bisects by the path length and walks down (longest first).
        self.prefix_lengths: tuple[int, ...] = tuple(sorted({len(p) for p in prefixes}))
        self.regex: tuple[Route, ...] = tuple(regex)

    def match(
        self, method: str, path: str, query: str, headers: Headers, sni: str = ""
    ) -> Route | None:
        candidates = self.exact.get(path)
        if candidates is not None:
            for route in candidates:
                methods = route._methods
                if (methods is None or method in methods) and (
                    route._simple or route._extra_ok(headers, query, sni)
                ):
                    return route
        lengths = self.prefix_lengths
        if lengths:
            prefixes = self.prefixes
            i = bisect_right(lengths, len(path))
            while i:
                i -= 1
                candidates = prefixes.get(path[: lengths[i]])
                if candidates is not None:
                    for route in candidates:
                        methods = route._methods
                        if (methods is None or method in methods) and (
                            route._simple or route._extra_ok(headers, query, sni)
                        ):
                            return route
        for route in self.regex:
            methods = route._methods
            if (
                (methods is None or method in methods)
                and route._regex(path) is not None  # type: ignore[misc]
                and (route._simple or route._extra_ok(headers, query, sni))
            ):
                return route
        return None

    def ordered(self) -> list[Route]:
        """The group's routes in the order match() tries them (for describe())."""
        out: list[Route] = []
        for key in sorted(self.exact):
            out.extend(self.exact[key])
        # Prefixes of one length never both match a path; sort them by text for a stable output.
        for key in sorted(self.prefixes, key=lambda p: (-len(p), p)):
            out.extend(self.prefixes[key])
        out.extend(self.regex)
        return out


# Distinct raw Host values remembered per table (each entry is a short tuple).
_HOST_CACHE_SIZE = 4096
_HOST_CACHE_KEY_MAX = 300


class RouteTable:
    """The compiled, immutable route table. Build it once per config; share it freely."""

    __slots__ = (
        "_any",
        "_exact_hosts",
        "_has_hosts",
        "_host_chains",
        "_wild_lengths",
        "_wildcards",
        "routes",
    )

    routes: tuple[Route, ...]

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(Route(config, i) for i, config in enumerate(routes))
        exact: dict[str, list[Route]] = {}
        wild: dict[str, list[Route]] = {}
        any_host: list[Route] = []
        for route in self.routes:
            host = _normalize_config_host(route.config.match.host)
            if host is None:
                any_host.append(route)
            elif host.startswith("*."):
                wild.setdefault(host[2:], []).append(route)  # key: the suffix after "*."
            else:
                exact.setdefault(host, []).append(route)
        self._exact_hosts: dict[str, _Group] = {h: _Group(r) for h, r in exact.items()}
        self._wildcards: dict[str, _Group] = {s: _Group(r) for s, r in wild.items()}
        # Descending: the longest (most specific) wildcard suffix is tried first.
        self._wild_lengths: tuple[int, ...] = tuple(sorted({len(s) for s in wild}, reverse=True))
        self._any: _Group | None = _Group(any_host) if any_host else None
        self._has_hosts = bool(exact or wild)
        # Raw Host value -> groups to search. Real traffic carries few distinct Host values, so
        # one dict lookup replaces normalisation and the wildcard walk on nearly every request.
        # Only this cache changes after construction; dict operations are atomic under the GIL.
        self._host_chains: dict[str, tuple[_Group, ...]] = {}

    def match(
        self, method: str, host: str, path: str, query: str, headers: Headers, sni: str = ""
    ) -> Route | None:
        """The route for a request, or None (404).

        ``host`` is the raw Host header value ("" when absent), ``path`` the raw path without
        the query, ``query`` the raw query without "?", ``headers`` the request fields with
        lower-cased names, ``sni`` the TLS server name the client sent ("" on plaintext or
        without SNI; only ``match.sni`` looks at it).
        """
        if not self._has_hosts:
            group = self._any
            return group.match(method, path, query, headers, sni) if group is not None else None
        chain = self._host_chains.get(host)
        if chain is None:
            chain = self._host_chain(host)
        for group in chain:
            route = group.match(method, path, query, headers, sni)
            if route is not None:
                return route
        return None

    def _host_chain(self, host: str) -> tuple[_Group, ...]:
        """The groups to search for a raw Host value, most specific first; memoised."""
        key = normalize_host(host)
        chain: list[_Group] = []
        group = self._exact_hosts.get(key)
        if group is not None:
            chain.append(group)
        size = len(key)
        for length in self._wild_lengths:
            # At least one character and a dot before the suffix: "*.example.com" matches
            # "a.example.com", never "example.com" or ".example.com". One slice per distinct
            # suffix length, so a Host of thousands of labels costs no more than a short one.
            if size >= length + 2 and key[size - length - 1] == ".":
                group = self._wildcards.get(key[size - length :])
                if group is not None:
                    chain.append(group)
        if self._any is not None:
            chain.append(self._any)
        result = tuple(chain)
        # Bounded in count and in key size (a DNS name is at most 253 bytes, RFC 1035 §2.3.4,
        # plus a port): random or huge Host values cost a recomputation, never memory.
        if len(host) <= _HOST_CACHE_KEY_MAX:
            cache = self._host_chains
            if len(cache) >= _HOST_CACHE_SIZE:
                cache.clear()
            cache[host] = result
        return result

    def describe(self) -> list[dict[str, Any]]:
        """The compiled table in match order, JSON-able (for ``/admin/routes``).

        Exact hosts (alphabetically: they never compete), then wildcards, longest suffix first,
        then host-less routes; in each, exact paths, prefixes longest first, regexes. Each entry
        carries ``host_kind`` (exact, wildcard, any) and ``index`` (its position in the config).
        """
        out: list[dict[str, Any]] = []
        sections: list[tuple[str, _Group]] = [
            ("exact", self._exact_hosts[h]) for h in sorted(self._exact_hosts)
        ]
        sections += [
            ("wildcard", self._wildcards[s])
            for s in sorted(self._wildcards, key=lambda s: (-len(s), s))
        ]
        if self._any is not None:
            sections.append(("any", self._any))
        for kind, group in sections:
            for route in group.ordered():
                entry = route.describe()
                entry["host_kind"] = kind
                entry["index"] = route.index
                out.append(entry)
        return out

    def __len__(self) -> int:
        return len(self.routes)
