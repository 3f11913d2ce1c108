"""RouteTable.match agrees with a naive linear scan over random route sets and requests.

The reference applies the documented priority as one sort key over every route that matches:
(host rank, path rank, config index), where the host rank is exact < wildcard (longest suffix
first) < any, and the path rank is exact < prefix (longest first) < regex.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.model import MatchConfig, PathMatch, RouteConfig
from gateway.routing import RouteTable

CONFIG_HOSTS = [None, "*", "a.test", "b.a.test", "*.test", "*.a.test", "*.b.a.test", "::1"]
REQUEST_HOSTS = [
    "",
    "a.test",
    "A.Test:8080",
    "b.a.test.",
    "c.b.a.test",
    "d.c.b.a.test:1",
    "test",
    "x.test",
    "other.org",
    "[::1]:80",
    ".a.test",
    ".test",
]
REGEXES = [r"/a.*", r"/[ab]+", r"/b/.*", r"/(a|b)/?", r"/.*a", r"/"]
PATH_ALPHABET = "/ab"

# Half the request paths come from a small set that many generated routes share, so that
# several routes compete for one request (the interesting case for priority rules).
paths = st.one_of(
    st.sampled_from(["/", "/a", "/a/", "/a/b", "/ab", "/b/a", "/aa"]),
    st.text(PATH_ALPHABET, max_size=6),
)


@st.composite
def path_matches(draw: st.DrawFn) -> PathMatch | None:
    kind = draw(st.sampled_from([None, None, "exact", "prefix", "prefix", "regex"]))
    if kind is None:
        return None
    if kind == "regex":
        return PathMatch("regex", draw(st.sampled_from(REGEXES)))
    value = "/" + draw(st.text(PATH_ALPHABET, max_size=3))
    return PathMatch(kind, value)


@st.composite
def route_configs(draw: st.DrawFn, index: int) -> RouteConfig:
    methods = draw(
        st.sampled_from([None, None, None, ("GET",), ("POST",), ("GET", "POST"), ("HEAD",), ()])
    )
    return RouteConfig(
        name=f"r{index}",
        match=MatchConfig(
            host=draw(st.sampled_from(CONFIG_HOSTS)),
            path=draw(path_matches()),
            methods=methods,
            headers=draw(
                st.sampled_from([(), (), (), (("x-k", "1"),), (("x-k", "2"), ("x-j", "1"))])
            ),
            query=draw(st.sampled_from([(), (), (), (("q", "1"),), (("q", ""), ("r", "a b"))])),
        ),
        upstream="up",
    )


@st.composite
def route_sets(draw: st.DrawFn) -> list[RouteConfig]:
    count = draw(st.integers(min_value=0, max_value=14))
    return [draw(route_configs(i)) for i in range(count)]


requests = st.tuples(
    st.sampled_from(["GET", "POST", "HEAD", "DELETE"]),
    st.sampled_from(REQUEST_HOSTS),
    paths,
    st.sampled_from(["", "q=1", "q=2&q=1", "q&r=a+b", "r=a%20b&q=", "x=1"]),
    st.lists(
        st.sampled_from([(b"x-k", b"1"), (b"x-k", b"2"), (b"x-j", b"1"), (b"x-j", b"0")]),
        max_size=3,
    ),
)


def reference_match(
    configs: list[RouteConfig],
    method: str,
    host: str,
    path: str,
    query: str,
    headers: list[tuple[bytes, bytes]],
) -> str | None:
    hostname = urlsplit("//" + host).hostname or ""
    if hostname.endswith("."):
        hostname = hostname[:-1]
    params = parse_qsl(query, keep_blank_values=True)
    candidates: list[tuple[tuple[int, int], tuple[int, int], int, str]] = []
    for index, config in enumerate(configs):
        m = config.match
        if m.host is None or m.host == "*":
            host_rank = (2, 0)
        elif m.host.startswith("*."):
            suffix = m.host[1:]  # ".test"
            if not (hostname.endswith(suffix) and len(hostname) > len(suffix)):
                continue
            host_rank = (1, -len(suffix))
        elif m.host == hostname:
            host_rank = (0, 0)
        else:
            continue
        p = m.path or PathMatch("prefix", "/")
        if p.kind == "exact":
            if path != p.value:
                continue
            path_rank = (0, 0)
        elif p.kind == "prefix":
            if not path.startswith(p.value):
                continue
            path_rank = (1, -len(p.value))
        else:
            if re.fullmatch(p.value, path) is None:
                continue
            path_rank = (2, 0)
        if m.methods is not None and method not in m.methods:
            continue
        if not all(
            any(n.decode() == name and v.decode("latin-1") == value for n, v in headers)
            for name, value in m.headers
        ):
            continue
        if not all(pair in params for pair in m.query):
            continue
        candidates.append((host_rank, path_rank, index, config.name))
    return min(candidates)[3] if candidates else None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs=route_sets(), reqs=st.lists(requests, min_size=1, max_size=8))
def test_match_agrees_with_linear_scan(
    configs: list[RouteConfig],
    reqs: list[tuple[str, str, str, str, list[tuple[bytes, bytes]]]],
) -> None:
    table = RouteTable(configs)
    for method, host, path, query, headers in reqs:
        found = table.match(method, host, path, query, headers)
        expected = reference_match(configs, method, host, path, query, headers)
        assert (found.name if found is not None else None) == expected, (
            method,
            host,
            path,
            query,
            headers,
        )


@settings(max_examples=50, deadline=None)
@given(configs=route_sets())
def test_describe_lists_every_route_once(configs: list[RouteConfig]) -> None:
    described = RouteTable(configs).describe()
    assert sorted(d["index"] for d in described) == list(range(len(configs)))
