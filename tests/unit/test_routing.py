"""Route table: host groups, path priority, matchers, fall-through, describe()."""

from __future__ import annotations

import json

import pytest

from gateway.config.model import MatchConfig, PathMatch, RewriteConfig, RouteConfig
from gateway.routing import Route, RouteTable, normalize_host


def route(
    name: str,
    path: str | None = None,
    kind: str = "prefix",
    *,
    host: str | None = None,
    methods: tuple[str, ...] | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    query: tuple[tuple[str, str], ...] = (),
    rewrite: RewriteConfig | None = None,
    upstream: str = "up",
) -> RouteConfig:
    return RouteConfig(
        name=name,
        match=MatchConfig(
            host=host,
            path=PathMatch(kind, path) if path is not None else None,  # type: ignore[arg-type]
            methods=methods,
            headers=headers,
            query=query,
        ),
        upstream=upstream,
        rewrite=rewrite,
    )


def match_name(
    table: RouteTable,
    path: str,
    *,
    method: str = "GET",
    host: str = "",
    query: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> str | None:
    found = table.match(method, host, path, query, headers or [])
    return found.name if found is not None else None


# --- host normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("EXAMPLE.com.:443", "example.com"),
        ("example.com.", "example.com"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("[FE80::1]", "fe80::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("", ""),
        ("[broken", "[broken"),
    ],
)
def test_normalize_host(raw: str, key: str) -> None:
    assert normalize_host(raw) == key


# --- path priority inside one host group -------------------------------------------------------

PRIORITY_ROUTES = [
    route("catch-all"),
    route("api", "/api"),
    route("api-v1", "/api/v1"),
    route("api-v1-slash", "/api/v1/"),
    route("health-exact", "/api/v1/health", "exact"),
    route("items-re", r"/items/\d+", "regex"),
    route("items-any-re", r"/items/.*", "regex"),
    route("items", "/items/special", "exact"),
]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "catch-all"),
        ("/other", "catch-all"),
        ("/api", "api"),
        ("/api-x", "api"),  # plain string prefix, like Envoy/Traefik
        ("/apix/y", "api"),
        ("/api/v1", "api-v1"),
        ("/api/v1x", "api-v1"),
        ("/api/v1/", "api-v1-slash"),  # longer prefix wins
        ("/api/v1/users", "api-v1-slash"),
        ("/api/v1/health", "health-exact"),  # exact over a prefix, even if listed later
        ("/api/v1/health/x", "api-v1-slash"),
        # Regexes come after the prefix index: "/" (catch-all) wins over them in this group.
        ("/items/12", "catch-all"),
        ("/items/special", "items"),
    ],
)
def test_path_priority(path: str, expected: str) -> None:
    assert match_name(RouteTable(PRIORITY_ROUTES), path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/items/12", "items-re"),  # first regex in list order
        ("/items/abc", "items-any-re"),
        ("/items/12/x", "items-any-re"),  # fullmatch: \d+ does not match "12/x"
        ("/items", None),
        ("/x/items/12", None),  # anchored at the start too
        ("/items/special", "items"),  # exact before regex
    ],
)
def test_regex_routes_in_list_order_and_fullmatch(path: str, expected: str | None) -> None:
    table = RouteTable([r for r in PRIORITY_ROUTES if r.match.path is not None][4:])
    assert match_name(table, path) == expected


def test_regex_after_prefix_but_list_order_among_regexes() -> None:
    table = RouteTable(
        [
            route("re-late", r"/a/.*", "regex"),
            route("pre", "/a/b"),
            route("re-early", r"/a/b.*", "regex"),
        ]
    )
    assert match_name(table, "/a/bc") == "pre"
    assert match_name(table, "/a/x") == "re-late"
    assert match_name(table, "/a/b") == "pre"


def test_same_prefix_list_order_and_method_fall_through() -> None:
    table = RouteTable(
        [
            route("root-any"),
            route("users-get", "/users", methods=("GET",)),
            route("users-post", "/users", methods=("POST", "PUT")),
            route("users-second-get", "/users", methods=("GET",)),
            route("users-exact-delete", "/users", "exact", methods=("DELETE",)),
        ]
    )
    assert match_name(table, "/users/1") == "users-get"
    assert match_name(table, "/users/1", method="PUT") == "users-post"
    # Nothing on "/users" takes PATCH: the next shorter prefix ("/") does.
    assert match_name(table, "/users/1", method="PATCH") == "root-any"
    assert match_name(table, "/users", method="DELETE") == "users-exact-delete"
    # The exact path route does not take GET: the prefix routes are tried next.
    assert match_name(table, "/users", method="GET") == "users-get"


def test_head_does_not_match_get_only_route() -> None:
    table = RouteTable([route("get", "/", methods=("GET",))])
    assert match_name(table, "/x", method="GET") == "get"
    assert match_name(table, "/x", method="HEAD") is None
    assert match_name(table, "/x", method="get") is None  # methods are case-sensitive


def test_route_without_path_is_prefix_slash_in_list_order() -> None:
    table = RouteTable([route("no-path"), route("slash", "/")])
    assert match_name(table, "/anything") == "no-path"
    table = RouteTable([route("slash", "/"), route("no-path")])
    assert match_name(table, "/anything") == "slash"
    assert match_name(table, "*", method="OPTIONS") is None  # asterisk-form is not a path


def test_empty_table_and_no_match() -> None:
    assert RouteTable([]).match("GET", "h", "/", "", []) is None
    table = RouteTable([route("a", "/a")])
    assert match_name(table, "/b") is None
    assert match_name(table, "") is None


def test_exact_path_is_not_a_prefix() -> None:
    table = RouteTable([route("e", "/a", "exact")])
    assert match_name(table, "/a") == "e"
    assert match_name(table, "/a/") is None
    assert match_name(table, "/ab") is None


def test_prefix_longer_than_path_is_skipped() -> None:
    table = RouteTable([route("long", "/abcdef"), route("short", "/ab")])
    assert match_name(table, "/abc") == "short"
    assert match_name(table, "/abcdefg") == "long"


# --- host groups -------------------------------------------------------------------------------

HOST_ROUTES = [
    route("any-root"),
    route("any-exact", "/special", "exact"),
    route("wild", "/", host="*.example.com"),
    route("wild-deep", "/", host="*.eu.example.com"),
    route("api", "/v1", host="api.example.com"),
    route("api-post", "/", host="api.example.com", methods=("POST",)),
    route("apex", "/", host="example.com"),
    route("v6", "/", host="[::1]"),
    route("dotted", "/", host="dotted.example.org."),
    route("upper", "/", host="UPPER.example.org"),
]


@pytest.mark.parametrize(
    ("host", "path", "method", "expected"),
    [
        ("api.example.com", "/v1/x", "GET", "api"),
        ("API.Example.Com:8443", "/v1/x", "GET", "api"),
        ("api.example.com.", "/v1/x", "GET", "api"),
        ("api.example.com.:80", "/v1/x", "GET", "api"),
        ("api.example.com", "/v2", "POST", "api-post"),
        # Nothing in the exact group takes GET /v2: fall through to the wildcard group.
        ("api.example.com", "/v2", "GET", "wild"),
        # The host group is searched first: its "/" beats the host-less exact path.
        ("x.example.com", "/special", "GET", "wild"),
        ("a.b.c.example.com", "/", "GET", "wild"),  # any depth
        ("x.eu.example.com", "/", "GET", "wild-deep"),  # longest suffix first
        ("a.b.eu.example.com", "/", "GET", "wild-deep"),
        ("eu.example.com", "/", "GET", "wild"),  # *.eu.example.com needs a label before
        ("example.com", "/", "GET", "apex"),  # *.example.com does not match the apex
        ("example.com", "/special", "GET", "apex"),
        (".example.com", "/", "GET", "any-root"),  # empty label: not a subdomain
        ("notexample.com", "/", "GET", "any-root"),  # a suffix must start at a dot
        ("xexample.com", "/special", "GET", "any-exact"),
        ("other.org", "/special", "GET", "any-exact"),
        ("", "/", "GET", "any-root"),
        ("[::1]:8080", "/", "GET", "v6"),
        ("[::1]", "/", "GET", "v6"),
        ("dotted.example.org", "/", "GET", "dotted"),
        ("upper.example.org", "/", "GET", "upper"),
    ],
)
def test_host_groups(host: str, path: str, method: str, expected: str) -> None:
    assert match_name(RouteTable(HOST_ROUTES), path, host=host, method=method) == expected


def test_host_fall_through_to_nothing() -> None:
    table = RouteTable([route("api", "/v1", host="api.example.com")])
    assert match_name(table, "/v1", host="api.example.com") == "api"
    assert match_name(table, "/v2", host="api.example.com") is None
    assert match_name(table, "/v1", host="other.example.com") is None
    assert match_name(table, "/v1") is None


def test_wildcard_falls_through_to_shorter_wildcard() -> None:
    table = RouteTable(
        [
            route("short", "/", host="*.com"),
            route("long", "/only", host="*.example.com"),
        ]
    )
    assert match_name(table, "/only/x", host="a.example.com") == "long"
    assert match_name(table, "/else", host="a.example.com") == "short"
    assert match_name(table, "/else", host="com") is None


def test_star_host_means_any_host() -> None:
    table = RouteTable([route("star", "/", host="*")])
    assert match_name(table, "/", host="whatever") == "star"


# --- header and query matchers -----------------------------------------------------------------


def test_header_matchers() -> None:
    table = RouteTable(
        [
            route("canary", "/", headers=(("x-canary", "1"), ("x-team", "blue"))),
            route("latin1", "/", headers=(("x-name", "café"),)),
            route("impossible", "/", headers=(("x-name", "日本"),)),
            route("default", "/"),
        ]
    )
    both = [(b"x-canary", b"1"), (b"x-team", b"blue")]
    assert match_name(table, "/", headers=both) == "canary"
    assert match_name(table, "/", headers=[(b"x-canary", b"1")]) == "default"
    assert match_name(table, "/", headers=[(b"x-canary", b"2"), (b"x-team", b"blue")]) == (
        "default"
    )
    # A repeated field matches when one of its values does.
    repeated = [(b"x-team", b"red"), (b"x-canary", b"1"), (b"x-team", b"blue")]
    assert match_name(table, "/", headers=repeated) == "canary"
    # Exact compare: no trimming, no case folding of values.
    assert match_name(table, "/", headers=[(b"x-canary", b"1 "), (b"x-team", b"blue")]) == (
        "default"
    )
    assert match_name(table, "/", headers=[(b"x-canary", b"1"), (b"x-team", b"Blue")]) == (
        "default"
    )
    assert match_name(table, "/", headers=[(b"x-name", "café".encode("latin-1"))]) == "latin1"
    assert match_name(table, "/", headers=[(b"x-name", "日本".encode())]) == "default"


def test_header_matcher_name_from_config_is_case_insensitive() -> None:
    table = RouteTable([route("h", "/", headers=(("X-Canary", "1"),))])
    assert match_name(table, "/", headers=[(b"x-canary", b"1")]) == "h"


def test_query_matchers() -> None:
    table = RouteTable(
        [
            route("beta", "/", query=(("beta", "1"),)),
            route("two", "/", query=(("a", "x y"), ("b", ""))),
            route("default", "/"),
        ]
    )
    assert match_name(table, "/", query="beta=1") == "beta"
    assert match_name(table, "/", query="x=2&beta=1") == "beta"
    assert match_name(table, "/", query="beta=2&beta=1") == "beta"  # any of the values
    assert match_name(table, "/", query="beta=10") == "default"
    assert match_name(table, "/", query="") == "default"
    assert match_name(table, "/", query="a=x+y&b=") == "two"  # decoded, blank values kept
    assert match_name(table, "/", query="a=x%20y&b") == "two"
    assert match_name(table, "/", query="a=x+y") == "default"
    assert match_name(table, "/", query="BETA=1") == "default"


def test_query_and_header_fall_through_to_shorter_prefix_and_host_less() -> None:
    table = RouteTable(
        [
            route("any", "/"),
            route("h-q", "/api", host="h.test", query=(("v", "2"),)),
            route("h-hdr", "/api/x", host="h.test", headers=(("x-k", "v"),)),
        ]
    )
    assert match_name(table, "/api/x", host="h.test", headers=[(b"x-k", b"v")]) == "h-hdr"
    assert match_name(table, "/api/x", host="h.test", query="v=2") == "h-q"
    assert match_name(table, "/api/x", host="h.test") == "any"


def test_query_cache_does_not_leak_between_requests() -> None:
    table = RouteTable([route("q", "/", query=(("a", "1"),))])
    assert match_name(table, "/", query="a=1") == "q"
    assert match_name(table, "/", query="a=2") is None
    assert match_name(table, "/", query="a=1") == "q"


# --- Route attributes and rewrites -------------------------------------------------------------


def test_route_attributes() -> None:
    config = RouteConfig(
        name="r",
        match=MatchConfig(path=PathMatch("prefix", "/users")),
        upstream="users",
        rewrite=RewriteConfig(strip_prefix="/users", host="internal.svc"),
        timeout=15.0,
        max_body_bytes=1024,
    )
    table = RouteTable([config])
    found = table.match("GET", "", "/users/7", "", [])
    assert isinstance(found, Route)
    assert found is table.routes[0]
    assert (found.name, found.upstream, found.config) == ("r", "users", config)
    assert (found.timeout, found.max_body_bytes, found.host_rewrite) == (15.0, 1024, "internal.svc")
    assert found.rewrites_path
    assert found.rewrite_path("/users/7") == "/7"


def test_route_without_rewrite_returns_same_path_object() -> None:
    found = RouteTable([route("r", "/")]).match("GET", "", "/a/b", "", [])
    assert found is not None
    path = "/a/" + "b"
    assert found.rewrite_path(path) is path
    assert not found.rewrites_path
    assert found.host_rewrite is None


def test_host_only_rewrite_does_not_touch_path() -> None:
    found = RouteTable([route("r", "/", rewrite=RewriteConfig(host="h"))]).routes[0]
    assert not found.rewrites_path
    assert found.host_rewrite == "h"


@pytest.mark.parametrize(
    "bad",
    [
        route("bad-re", "/(", "regex"),
        route("bad-rw", "/", rewrite=RewriteConfig(regex="(")),
        route("bad-group", "/", rewrite=RewriteConfig(regex="/(a)", replacement=r"\2")),
    ],
)
def test_invalid_regex_raises_value_error_naming_route(bad: RouteConfig) -> None:
    with pytest.raises(ValueError, match=bad.name):
        RouteTable([bad])


# --- describe() --------------------------------------------------------------------------------


def test_describe_is_match_order_and_json_able() -> None:
    table = RouteTable(
        [
            route("any-root"),
            route("any-re", r"/r/\d+", "regex"),
            route("any-exact", "/e", "exact", methods=("GET",)),
            route("any-long", "/a/b"),
            route("wild", "/", host="*.example.com"),
            route("wild-deep", "/", host="*.a.example.com"),
            route("b-host", "/", host="b.test", headers=(("x", "1"),), query=(("q", "2"),)),
            route("a-host", "/", host="a.test", rewrite=RewriteConfig(prefix="/v2", host="up")),
        ]
    )
    described = table.describe()
    assert [d["name"] for d in described] == [
        "a-host",
        "b-host",
        "wild-deep",
        "wild",
        "any-exact",
        "any-long",
        "any-root",
        "any-re",
    ]
    assert [d["host_kind"] for d in described] == [
        "exact",
        "exact",
        "wildcard",
        "wildcard",
        "any",
        "any",
        "any",
        "any",
    ]
    json.dumps(described)  # JSON-able
    by_name = {d["name"]: d for d in described}
    assert by_name["any-root"]["path"] == {"kind": "prefix", "value": "/"}
    assert by_name["any-exact"]["methods"] == ["GET"]
    assert by_name["any-exact"]["index"] == 2
    assert by_name["b-host"]["headers"] == {"x": "1"}
    assert by_name["b-host"]["query"] == {"q": "2"}
    assert by_name["a-host"]["rewrite"] == {
        "strip_prefix": None,
        "prefix": "/v2",
        "regex": None,
        "replacement": None,
    }
    assert by_name["a-host"]["host_rewrite"] == "up"
    assert by_name["a-host"]["upstream"] == "up"
    assert len(table) == 8


def test_routes_tuple_in_config_order() -> None:
    table = RouteTable([route("b", "/b"), route("a", "/a")])
    assert [r.name for r in table.routes] == ["b", "a"]
    assert [r.index for r in table.routes] == [0, 1]


def test_many_routes_lookup_is_indexed() -> None:
    """10,000 prefix routes: the right one is found (cost is measured by the benchmark)."""
    configs = [route(f"r{i}", f"/svc{i}/") for i in range(10_000)]
    configs += [route(f"e{i}", f"/exact/{i}", "exact") for i in range(10_000)]
    table = RouteTable(configs)
    assert match_name(table, "/svc9999/x") == "r9999"
    assert match_name(table, "/svc0/") == "r0"
    assert match_name(table, "/exact/1234") == "e1234"
    assert match_name(table, "/svc10000/") is None


def test_host_chain_cache_is_bounded_and_transparent(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.routing.table as table_module

    monkeypatch.setattr(table_module, "_HOST_CACHE_SIZE", 2)
    table = RouteTable(HOST_ROUTES)
    hosts = ["api.example.com", "x.example.com", "other.org", "API.example.com:1", "[::1]"]
    expected = ["api", "wild", "any-root", "api", "v6"]
    for _ in range(2):  # the second round runs against a cache filled by the first
        assert [match_name(table, "/v1", host=h) for h in hosts] == expected
        assert len(table._host_chains) <= 2


def test_huge_host_with_many_labels_still_matches() -> None:
    table = RouteTable([route("wild", "/", host="*.example.com"), route("any", "/")])
    assert match_name(table, "/", host="a." * 10_000 + "example.com") == "wild"
    assert match_name(table, "/", host="a." * 10_000 + "example.org") == "any"


def test_long_host_values_are_not_cached() -> None:
    table = RouteTable([route("wild", "/", host="*.example.com")])
    long_host = "a" * 1000 + ".example.com"
    assert match_name(table, "/", host=long_host) == "wild"
    assert long_host not in table._host_chains
    assert match_name(table, "/", host="b.example.com") == "wild"
    assert "b.example.com" in table._host_chains
