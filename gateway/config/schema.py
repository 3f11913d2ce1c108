"""The config schema: every key, its type, default and documentation, in one place.

Both the validator (``gateway.config.validate``) and the JSON Schema generator
(``gateway.config.jsonschema_gen``) read these declarations, so they cannot drift apart.
Adding a key = one ``Field(...)`` line here plus the matching field in ``model.py``.
Defaults are written the way a user writes them in YAML ("30s", "32KiB").
"""

from __future__ import annotations

from typing import Any

from gateway.config.durations import DURATION_HINT, DURATION_PATTERN
from gateway.config.model import (
    Address,
    InstanceConfig,
    LimitsConfig,
    MatchConfig,
    PathMatch,
    RewriteConfig,
    RouteConfig,
    Timeouts,
    UpstreamConfig,
)
from gateway.config.validate import (
    ADDRESS_HINT,
    ADDRESS_PATTERN,
    HOSTNAME_PATTERN,
    REQUIRED,
    Enum,
    Field,
    Int,
    ListOf,
    MapOf,
    Mapped,
    Size,
    Struct,
    Text,
    Union,
    check_replacement,
    parse_address,
    parse_cidr,
    parse_positive_duration,
    parse_regex,
)

BALANCERS = ("round_robin", "weighted_round_robin")

# RFC 9110 §5.6.2: token = 1*tchar; methods (§9.1) and field names (§5.1) are tokens.
TOKEN_PATTERN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# Route and upstream names end up in metric labels and log lines: keep them plain.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


def _url_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"path {text!r} must start with '/'")
    if any(c.isspace() or ord(c) < 0x20 or c in "?#" for c in text):
        raise ValueError(f"path {text!r} must not contain whitespace, control characters, ? or #")
    return text


def _instance_address(text: str) -> Address:
    address = parse_address(text)
    if address.port == 0:
        raise ValueError(f"invalid address {text!r}: an instance needs a real port, not 0")
    return address


# --- leaf types -------------------------------------------------------------------------------

DURATION = Text(
    f"a duration: {DURATION_HINT}",
    pattern=DURATION_PATTERN,
    parse=parse_positive_duration,
    ref="duration",
    json_extra={"description": f"Duration: {DURATION_HINT}."},
)
LISTEN_ADDRESS = Text(
    f"an address: {ADDRESS_HINT}",
    pattern=ADDRESS_PATTERN,
    parse=parse_address,
    ref="address",
    json_extra={"description": f"Address as {ADDRESS_HINT}; port 0 picks a free port."},
)
INSTANCE_ADDRESS = Text(
    f"an address: {ADDRESS_HINT}",
    pattern=ADDRESS_PATTERN,
    parse=_instance_address,
    ref="instance_address",
    json_extra={"description": f"Instance address as {ADDRESS_HINT}."},
)
URL_PATH = Text(
    "a URL path starting with '/'",
    pattern=r"/[^\s?#]*",
    parse=_url_path,
)
REGEX = Text(
    "a regular expression (Python syntax)",
    parse=parse_regex,
    json_extra={"format": "regex"},
)
NAME = Text(
    "a name of letters, digits, '_', '.' and '-'",
    pattern=NAME_PATTERN,
)
HOST_MATCH = Text(
    "a host name such as api.example.com, or a wildcard such as *.example.com",
    pattern=rf"(?:\*\.)?{HOSTNAME_PATTERN}",
    lower=True,
)
REWRITE_HOST = Text(
    "a host name, optionally with :port",
    pattern=rf"(?:{HOSTNAME_PATTERN}|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?",
)
METHOD = Text("an HTTP method (a token, RFC 9110 §9.1)", pattern=TOKEN_PATTERN, upper=True)
HEADER_NAME = Text("a header name (a token, RFC 9110 §5.1)", pattern=TOKEN_PATTERN, lower=True)
# RFC 9110 §5.5: CR, LF and NUL are never allowed in a field value.
HEADER_VALUE = Text("a header value (no CR, LF or NUL)", pattern=r"[^\r\n\x00]*", min_length=0)
QUERY_NAME = Text("a query parameter name")
QUERY_VALUE = Text("a query parameter value", min_length=0)
CIDR = Text(
    "a CIDR such as 10.0.0.0/8 or ::1/128",
    pattern=r"[0-9A-Fa-f:.]+(?:/[0-9]{1,3})?",
    parse=parse_cidr,
)

# --- upstreams --------------------------------------------------------------------------------

INSTANCE = Union(
    Mapped(INSTANCE_ADDRESS, lambda a: InstanceConfig(a.host, a.port)),
    Struct(
        "instance",
        "An instance with a weight.",
        [
            Field("address", INSTANCE_ADDRESS, "host:port of the instance.", REQUIRED),
            Field(
                "weight",
                Int(1, 10_000),
                "Relative share of traffic with weighted_round_robin (1-10000).",
                1,
            ),
        ],
        build=lambda address, weight: InstanceConfig(address.host, address.port, weight),
    ),
    expected=f"an address ({ADDRESS_HINT}) or a mapping {{address, weight}}",
)

TIMEOUTS = Struct(
    "timeouts",
    "Timeouts for talking to this upstream's instances.",
    [
        Field("connect", DURATION, "Time allowed to open a TCP connection to an instance.", "1s"),
        Field(
            "read",
            DURATION,
            "Longest wait for the next bytes from an instance (including the response head).",
            "30s",
        ),
        Field("idle", DURATION, "How long a pooled keep-alive connection may sit unused.", "60s"),
    ],
    build=Timeouts,
)

UPSTREAM = Struct(
    "upstream",
    "A named group of instances that routes send traffic to.",
    [
        Field(
            "instances",
            ListOf(INSTANCE, min_items=1),
            "Static instances: 'host:port' strings or {address, weight} mappings.",
            REQUIRED,
        ),
        Field("balancer", Enum(BALANCERS), "How an instance is picked per request.", BALANCERS[0]),
        Field("timeouts", TIMEOUTS, "Connect, read and idle timeouts.", {}),
        Field(
            "max_idle_connections",
            Int(0),
            "Keep-alive connections kept open per instance when idle.",
            64,
        ),
    ],
    # The name is the mapping key; MapOf(key_field="name") fills it in.
    build=lambda **values: UpstreamConfig(name="", **values),
)

# --- routes -----------------------------------------------------------------------------------


def _path_match(exact: str | None, prefix: str | None, regex: str | None) -> PathMatch:
    if exact is not None:
        return PathMatch("exact", exact)
    if prefix is not None:
        return PathMatch("prefix", prefix)
    assert regex is not None  # exactly_one guarantees one of the three
    return PathMatch("regex", regex)


PATH_MATCH = Struct(
    "path_match",
    "How the request path (without the query string) is matched: exactly one of exact, prefix"
    " or regex.",
    [
        Field("exact", URL_PATH, "The path equals this value."),
        Field("prefix", URL_PATH, "The path starts with this value."),
        Field("regex", REGEX, "The path matches this regular expression (Python syntax)."),
    ],
    build=_path_match,
    exactly_one=[("exact", "prefix", "regex")],
)

MATCH = Struct(
    "match",
    "Conditions a request must meet to take this route; all given conditions must hold.",
    [
        Field("host", HOST_MATCH, "Host header: exact name or '*.example.com' wildcard."),
        Field("path", PATH_MATCH, "Path condition; absent matches every path."),
        Field(
            "methods",
            ListOf(METHOD, min_items=1, unique=True),
            "Allowed methods (upper-cased); absent allows every method.",
        ),
        Field(
            "headers",
            MapOf(HEADER_NAME, HEADER_VALUE, pairs=True),
            "Headers that must be present with exactly these values (names are case-insensitive).",
            {},
        ),
        Field(
            "query",
            MapOf(QUERY_NAME, QUERY_VALUE, pairs=True),
            "Query parameters that must be present with exactly these values.",
            {},
        ),
    ],
    build=MatchConfig,
)


def _replacement_ok(values: dict[str, Any]) -> list[tuple[str, str]]:
    regex, replacement = values["regex"], values["replacement"]
    if regex is None or replacement is None:
        return []
    problem = check_replacement(regex, replacement)
    return [("replacement", problem)] if problem else []


REWRITE = Struct(
    "rewrite",
    "Changes applied to the request before it is sent upstream, in this order:"
    " strip_prefix, prefix, regex/replacement, host.",
    [
        Field("strip_prefix", URL_PATH, "Remove this prefix from the path."),
        Field("prefix", URL_PATH, "Prepend this to the path (after strip_prefix)."),
        Field("regex", REGEX, "Regular expression applied to the path; needs replacement."),
        Field(
            "replacement",
            Text("a replacement string (\\1 or \\g<name> for groups)", min_length=0),
            "Replacement for regex matches; \\1 or \\g<name> refer to groups.",
        ),
        Field("host", REWRITE_HOST, "Host header sent upstream (default: the client's)."),
    ],
    build=RewriteConfig,
    together=[("regex", "replacement")],
    checks=[_replacement_ok],
)

ROUTE = Struct(
    "route",
    "A route: requests matching `match` go to `upstream`.",
    [
        Field("name", NAME, "Unique route name (used in metrics and logs).", REQUIRED),
        Field("match", MATCH, "Which requests take this route; absent matches all.", {}),
        Field("upstream", Text("an upstream name"), "Name of an upstream.", REQUIRED),
        Field("rewrite", REWRITE, "How the request is changed before it goes upstream."),
        Field("timeout", DURATION, "Bound on the whole request, retries included."),
        Field("max_body_bytes", Size(), "Request body cap for this route (413 beyond)."),
    ],
    build=RouteConfig,
)

# --- top level --------------------------------------------------------------------------------

LIMITS = Struct(
    "limits",
    "Protections against oversized or slow clients.",
    [
        Field("max_header_bytes", Size(1), "Request line + headers; beyond: 431.", "32KiB"),
        Field("max_uri_bytes", Size(1), "Request target length; beyond: 414.", "8KiB"),
        Field("max_body_bytes", Size(), "Default request body cap per route; beyond: 413.", "1GiB"),
        Field("header_timeout", DURATION, "Whole request head must arrive within; 408.", "10s"),
        Field("keepalive_timeout", DURATION, "Idle client keep-alive connections close.", "75s"),
        Field("max_connections", Int(1), "Concurrent client connections.", 10_000),
    ],
    build=LimitsConfig,
)

ROOT = Struct(
    None,
    "Gateway configuration (routes, upstreams, listeners, limits).",
    [
        Field("listen", LISTEN_ADDRESS, "Address for client traffic.", "0.0.0.0:8080"),
        Field("admin", LISTEN_ADDRESS, "Address of the admin/metrics server.", "127.0.0.1:9901"),
        Field(
            "workers",
            Union(Int(1), Enum(["auto"]), expected="a positive integer or 'auto'"),
            "Worker processes sharing the listen port; 'auto' = one per CPU core.",
            1,
        ),
        Field(
            "trusted_proxies",
            ListOf(CIDR),
            "CIDRs whose X-Forwarded-* / Forwarded headers are trusted.",
            [],
        ),
        Field("limits", LIMITS, "Client-side limits.", {}),
        Field(
            "upstreams",
            MapOf(NAME, UPSTREAM, key_field="name"),
            "Upstreams by name.",
            {},
        ),
        Field("routes", ListOf(ROUTE), "Routes, in priority order for ties.", []),
    ],
    build=dict,
)
