"""The config schema: every key, its type, default and documentation, in one place.

Both the validator (``gateway.config.validate``) and the JSON Schema generator
(``gateway.config.jsonschema_gen``) read these declarations, so they cannot drift apart.
Adding a key = one ``Field(...)`` line here plus the matching field in ``model.py``.
Defaults are written the way a user writes them in YAML ("30s", "32KiB").
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from gateway.config.durations import DURATION_HINT, DURATION_PATTERN
from gateway.config.model import (
    AccessLogConfig,
    Address,
    AdminConfig,
    CertificateConfig,
    CircuitBreakerConfig,
    ClientAuthConfig,
    DiscoveryConfig,
    HealthConfig,
    HedgeConfig,
    Http2Config,
    IdempotencyConfig,
    InstanceConfig,
    LimitsConfig,
    ListenerConfig,
    ListenerTLSConfig,
    MatchConfig,
    MetricsConfig,
    OutlierConfig,
    PathMatch,
    PathsConfig,
    RateLimitConfig,
    RedisConfig,
    ReloadConfig,
    RetryConfig,
    RewriteConfig,
    RouteConfig,
    Timeouts,
    UpstreamConfig,
    UpstreamHttp2Config,
    UpstreamTLSConfig,
)
from gateway.config.validate import (
    ADDRESS_HINT,
    ADDRESS_PATTERN,
    HOSTNAME_PATTERN,
    INVALID,
    REQUIRED,
    Bool,
    Context,
    Enum,
    Field,
    Int,
    JsonGen,
    ListOf,
    MapOf,
    Mapped,
    Number,
    Size,
    Struct,
    Text,
    Type,
    Union,
    check_replacement,
    describe,
    parse_address,
    parse_cidr,
    parse_positive_duration,
    parse_regex,
)
from gateway.config.yamlpos import Path

BALANCERS = (
    "round_robin",
    "weighted_round_robin",
    "least_request",
    "peak_ewma",
    "random",
    "ring_hash",
    "maglev",
)
HASH_BALANCERS = ("ring_hash", "maglev")

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


_ESCAPE = re.compile(r"%(.?.?)")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normal_path(text: str, *, partial_last: bool) -> str:
    """A path compared with (or written into) normalised request paths must be normal itself,
    or it never matches: no '.'/'..' segment (RFC 3986 §5.2.4), escapes in normal form
    (§6.2.2). ``partial_last``: a string prefix may end inside a segment ('/.' matches
    '/.well-known')."""
    text = _url_path(text)
    segments = text.split("/")
    if partial_last:
        segments = segments[:-1]
    if "." in segments or ".." in segments:
        raise ValueError(
            f"path {text!r} has a '.' or '..' segment; request paths are normalised before"
            " routing (RFC 3986 §5.2.4), so it would never apply"
        )
    for escape in _ESCAPE.findall(text):
        if re.fullmatch("[0-9A-F]{2}", escape) is None:
            raise ValueError(
                f"path {text!r}: %{escape} is not a percent-escape with upper-case hex, the form"
                " normalised request paths have (RFC 3986 §6.2.2.1)"
            )
        if chr(int(escape, 16)) in _UNRESERVED:
            raise ValueError(
                f"path {text!r}: %{escape} is an unreserved character, which normalised request"
                f" paths have decoded (RFC 3986 §6.2.2.2): write {chr(int(escape, 16))!r}"
            )
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
# Paths of routes and rewrites, compared with or written into normalised request paths.
ROUTE_PATH = Text(
    "a normalised URL path starting with '/'",
    pattern=r"/[^\s?#]*",
    parse=lambda text: _normal_path(text, partial_last=False),
)
ROUTE_PREFIX = Text(
    "a normalised URL path starting with '/'",
    pattern=r"/[^\s?#]*",
    parse=lambda text: _normal_path(text, partial_last=True),
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


TLS_VERSIONS = ("1.2", "1.3")
FILE_PATH = Text("a file path (relative paths are relative to the config file)")

UPSTREAM_TLS = Struct(
    "upstream_tls",
    "TLS to the instances: present = every connection to them is TLS (docs/tls.md).",
    [
        Field(
            "sni",
            Text("a server name", pattern=HOSTNAME_PATTERN, lower=True),
            "Server name sent in the handshake and checked against the certificate."
            " Default: the instance's host when it is a name; for an IP instance no SNI is"
            " sent and the certificate must carry that IP.",
        ),
        Field(
            "ca",
            FILE_PATH,
            "CA bundle (PEM) the instances' certificates must chain to."
            " Default: the system trust store.",
        ),
        Field(
            "verify",
            Bool(),
            "Verify the instances' certificate chain and name. false is logged at start.",
            True,
        ),
        Field("cert", FILE_PATH, "Client certificate (PEM chain) for mTLS to the instances."),
        Field(
            "key",
            FILE_PATH,
            "Private key of cert. Secret: redacted when shown.",
            secret=True,
        ),
        Field("min_version", Enum(TLS_VERSIONS), "Lowest TLS version offered.", "1.2"),
    ],
    build=UpstreamTLSConfig,
    together=[("cert", "key")],
)


RETRY_CONDITIONS = (
    "connect_failure",
    "reset",
    "timeout",
    "5xx",
    "gateway_error",
    "grpc-unavailable",
)
HASH_KEY = Text(
    "header:NAME, cookie:NAME, query:NAME, client_ip or path",
    pattern=r"(header|cookie|query):[!#$%&'*+.^_`|~0-9A-Za-z-]+|client_ip|path",
)
STATUS_CODE = Int(100, 599)


def _budget_ttl_at_least_a_second(values: dict[str, Any]) -> list[tuple[str, str]]:
    ttl = values.get("budget_ttl")
    if isinstance(ttl, float) and ttl < 1.0:
        return [("budget_ttl", "must be at least 1s (the budget counts in one-second slots)")]
    return []


RETRY = Struct(
    "retry",
    "Retries of failed tries, on another instance when there is one. Only idempotent methods"
    " are retried (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) unless the request carries an"
    " Idempotency-Key or allow_non_idempotent is set; a connect failure is retried for any"
    " method. Never after a response byte went to the client.",
    [
        Field("attempts", Int(1, 10), "Tries in all, the first included (1 = no retries).", 2),
        Field(
            "on",
            ListOf(Union(Enum(RETRY_CONDITIONS), STATUS_CODE), min_items=1, unique=True),
            "Failures that are retried: connect_failure, reset, timeout, 5xx (any 5xx plus the"
            " three), gateway_error (502/503/504 plus the three), grpc-unavailable (a gRPC"
            " response with grpc-status 14 before any response message reached the client;"
            " HTTP/2 upstreams only), or status codes.",
            ["connect_failure", "reset", "gateway_error"],
        ),
        Field("per_try_timeout", DURATION, "Time for one try's response head (default: read)."),
        Field(
            "budget_percent",
            Int(0, 100),
            "Retry budget: each request to the upstream earns this share of a retry, and each"
            " retry or hedge spends one; earnings expire after budget_ttl. Over time, retries"
            " stay within budget_percent% of requests plus min_retries_per_second, so a"
            " correlated burst is retried and a retry storm is not.",
            20,
        ),
        Field(
            "min_retries_per_second",
            Number(0, 100_000),
            "Retries always allowed per second, whatever the traffic (the budget's reserve).",
            10,
        ),
        Field(
            "budget_ttl",
            DURATION,
            "How long a request's share of the retry budget stays spendable (at least 1s).",
            "10s",
        ),
        Field(
            "max_body_bytes",
            Size(),
            "Request bodies up to this size are kept for a retry.",
            "64KiB",
        ),
        Field(
            "allow_non_idempotent",
            Bool(),
            "Also retry POST/PATCH without an Idempotency-Key header.",
            False,
        ),
    ],
    build=RetryConfig,
    checks=[_budget_ttl_at_least_a_second],
)


def _outlier(enabled: bool, **values: Any) -> OutlierConfig | None:
    return OutlierConfig(**values) if enabled else None


OUTLIER = Struct(
    "outlier",
    "Passive health: instances failing in a row are ejected for a time that grows with each"
    " ejection (Envoy's outlier detection). On by default.",
    [
        Field("enabled", Bool(), "false turns outlier detection off.", True),
        Field(
            "consecutive_failures",
            Int(0),
            "Eject after this many 5xx answers or transport failures in a row (0: never; the"
            " default, as an application's own 500s say little about the instance).",
            0,
        ),
        Field(
            "consecutive_gateway_failures",
            Int(0),
            "Eject after this many 502/503/504 or transport failures in a row (0: never).",
            5,
        ),
        Field("base_ejection_time", DURATION, "Ejection time, times the ejection count.", "30s"),
        Field("max_ejection_time", DURATION, "Longest ejection.", "300s"),
        Field(
            "max_ejection_percent",
            Int(0, 100),
            "Never eject more than this share of the instances (one may always be ejected).",
            50,
        ),
    ],
    build=_outlier,
    checks=[
        lambda values: (
            [("base_ejection_time", "must not exceed max_ejection_time")]
            if values["base_ejection_time"] > values["max_ejection_time"]
            else []
        )
    ],
)


def _health(**values: Any) -> HealthConfig:
    values["service"] = values["service"] or ""
    return HealthConfig(**values)


def _grpc_health_options(values: dict[str, Any]) -> list[tuple[str, str]]:
    if values["service"] is not None and values["type"] != "grpc":
        return [("service", "only meaningful with type: grpc")]
    return []


HEALTH = Struct(
    "health",
    "Active health checks: a probe of each instance every interval (with jitter): an HTTP GET"
    " (type http), or a grpc.health.v1.Health/Check call over HTTP/2 (type grpc).",
    [
        Field(
            "type",
            Enum(("http", "grpc")),
            "http: GET path, passing on expected_statuses. grpc: grpc.health.v1.Health/Check"
            " for service over HTTP/2 (h2c, or h2 by ALPN when the upstream has tls), passing"
            " on SERVING; path and expected_statuses do not apply.",
            "http",
        ),
        Field(
            "service",
            Text("a gRPC service name", min_length=0),
            "type grpc: the service asked about, e.g. 'pkg.Service' (default: the empty name,"
            " the server as a whole).",
        ),
        Field("path", URL_PATH, "Path probed on each instance (type http).", "/healthz"),
        Field("interval", DURATION, "Time between probes of one instance.", "5s"),
        Field("timeout", DURATION, "A probe slower than this fails.", "1s"),
        Field("healthy_threshold", Int(1), "Passes in a row to become healthy.", 2),
        Field("unhealthy_threshold", Int(1), "Failures in a row to become unhealthy.", 3),
        Field(
            "expected_statuses",
            ListOf(STATUS_CODE, min_items=1, unique=True),
            "Statuses that count as a pass (type http).",
            [200],
        ),
    ],
    build=_health,
    checks=[_grpc_health_options],
)


def _hedge_after(text: str) -> HedgeConfig:
    match = re.fullmatch(r"p(\d{1,2}(?:\.\d+)?)|(\d{1,2}(?:\.\d+)?)th_percentile", text)
    if match:
        return HedgeConfig(percentile=float(match.group(1) or match.group(2)) / 100.0)
    return HedgeConfig(delay=parse_positive_duration(text))


HEDGE = Struct(
    "hedge",
    "Hedged requests: when the first try of an idempotent request without a body has no"
    " response head after `after`, a second try goes to another instance; the first response"
    " head wins and the other try is cancelled.",
    [
        Field(
            "after",
            Text(
                "a duration (50ms) or a percentile of the upstream's recent latency (p95 or"
                " 95th_percentile)",
                pattern=DURATION_PATTERN + r"|p\d{1,2}(\.\d+)?|\d{1,2}(\.\d+)?th_percentile",
                parse=_hedge_after,
            ),
            "When to send the hedge.",
            REQUIRED,
        ),
    ],
    build=lambda after: after,
)

CIRCUIT_BREAKER = Struct(
    "circuit_breaker",
    "Limits per upstream; beyond them requests get 503 at once (no queueing).",
    [
        Field("max_connections", Int(0), "Open connections to all instances (0: no limit).", 1024),
        Field("max_pending", Int(0), "Requests waiting for a new connection (0: no limit).", 1024),
        Field("max_requests", Int(0), "Requests in flight (0: no limit).", 1024),
    ],
    build=CircuitBreakerConfig,
)


def _rate(text: str) -> tuple[int, float]:
    from gateway.ratelimit.limiter import parse_rate

    return parse_rate(text)


LIMIT_KEY = Text(
    "client_ip, route, header:NAME or query:NAME",
    pattern=r"client_ip|route|(header|query):[!#$%&'*+.^_`|~0-9A-Za-z-]+",
)

RATE_LIMIT = Struct(
    "rate_limit",
    "A rate limit (GCRA): `rate` sustained, `burst` admitted at once from idle, per key value.",
    [
        Field(
            "rate",
            Text("a rate such as 100/s, 6000/min, 10/10s or 1000/h", parse=_rate),
            "Sustained rate.",
            REQUIRED,
        ),
        Field("burst", Int(1), "Requests admitted at once from idle (default: the rate's count)."),
        Field(
            "key",
            Union(LIMIT_KEY, ListOf(LIMIT_KEY, min_items=1, unique=True)),
            "What gets its own bucket: client_ip (honouring trusted_proxies), header:NAME,"
            " query:NAME, route (one bucket), or a list combining them.",
            "client_ip",
        ),
        Field(
            "store", Enum(("local", "redis")), "local (this gateway) or redis (shared).", "local"
        ),
        Field("dry_run", Bool(), "Count what would be refused, refuse nothing.", False),
        Field(
            "missing",
            Enum(("shared", "reject")),
            "A request without the key's value: share one bucket, or reject it (400).",
            "shared",
        ),
        Field(
            "on_store_error",
            Enum(("allow", "local", "deny")),
            "When Redis fails or is slower than redis.timeout: admit, use a local bucket with the"
            " same limit, or refuse (503).",
            "local",
        ),
        Field("name", NAME, "Policy name in the RateLimit headers and the Redis key."),
        Field(
            "max_keys", Int(1), "Bound on local buckets (least recently used go first).", 100_000
        ),
        Field(
            "lease",
            Bool(),
            "store: redis only. Take tokens from Redis in leases sized to ~redis.lease_horizon of"
            " this worker's rate (all gateways' leases together at most 5% of the burst when"
            " redis.fallback_share is 1/N) and decide locally until they run out; false: one"
            " script call per request (docs/ratelimit.md).",
            True,
        ),
    ],
    build=lambda rate, **values: RateLimitConfig(count=rate[0], period=rate[1], **values),
)

# One limit or a list of them that must all admit: on a route, an upstream, or at the top level.
RATE_LIMITS = Union(
    Mapped(RATE_LIMIT, lambda limit: (limit,)),
    ListOf(RATE_LIMIT, min_items=1),
)


# --- filters (gateway.filters) ------------------------------------------------------------------
# A `filters:` list (top level, per upstream, per route) holds one-key mappings: the filter's
# kind and its options. Built-in kinds are declared here like every other key; a `python`
# filter's own options are checked by its class (Filter.validate_config) at load time.

BUILTIN_FILTERS: dict[str, str] = {
    "headers": "gateway.filters.headers:HeadersFilter",
    "cors": "gateway.filters.cors:CorsFilter",
    "api_key": "gateway.filters.api_key:ApiKeyFilter",
    "jwt": "gateway.filters.jwt:JwtFilter",
    "ip_filter": "gateway.filters.ip_filter:IpFilter",
    "compress": "gateway.filters.compress:CompressFilter",
    "forward_auth": "gateway.filters.forward_auth:ForwardAuthFilter",
    "traffic_split": "gateway.filters.traffic_split:TrafficSplitFilter",
    "mirror": "gateway.filters.mirror:MirrorFilter",
    "tracing": "gateway.filters.tracing:TracingFilter",
    "grpc_web": "gateway.filters.grpc_web:GrpcWebFilter",
}
# Options naming files: relative paths are relative to the config file.
_FILTER_FILE_OPTIONS: dict[str, tuple[str, ...]] = {
    "api_key": ("keys_file",),
    "jwt": ("jwks_file",),
    "python": ("path",),
}


class AnyMapping(Type):
    """A mapping whose keys the schema does not know (a python filter's own config)."""

    expected = "a mapping"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not isinstance(value, dict):
            ctx.error(path, f"expected a mapping, got {describe(value)}")
            return INVALID
        return value

    def json(self, gen: JsonGen) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": True}  # the class checks them


def _header_template(text: str) -> str:
    from gateway.filters.headers import compile_template

    compile_template(text)  # ValueError names the unknown variable
    return text


def _non_negative_duration(text: str) -> float:
    from gateway.config.durations import parse_duration

    return parse_duration(text)


NON_NEGATIVE_DURATION = Text(
    f"a duration: {DURATION_HINT}", pattern=DURATION_PATTERN, parse=_non_negative_duration
)
HEADER_TEMPLATE = Text(
    "a header value (no CR, LF or NUL); {client_ip}, {request_id}, {route}, {host}, {method},"
    " {path}, {consumer}, {jwt.CLAIM}, {var.NAME} are replaced, {{ and }} are braces",
    pattern=r"[^\r\n\x00]*",
    min_length=0,
    parse=_header_template,
)
HEADER_OPS = Struct(
    "filter_header_ops",
    "Header changes, applied in this order: remove, set, add.",
    [
        Field(
            "set",
            MapOf(HEADER_NAME, HEADER_TEMPLATE, pairs=True),
            "Fields set (replacing any present) to these values.",
            {},
        ),
        Field(
            "add",
            MapOf(HEADER_NAME, HEADER_TEMPLATE, pairs=True),
            "Fields added (after any present).",
            {},
        ),
        Field("remove", ListOf(HEADER_NAME, unique=True), "Fields removed.", []),
    ],
    build=dict,
)
HEADERS_FILTER = Struct(
    "filter_headers",
    "headers: request and response header changes, with variables in the values.",
    [
        Field("request", HEADER_OPS, "Changes to the request sent upstream.", {}),
        Field("response", HEADER_OPS, "Changes to the response sent to the client.", {}),
    ],
    build=dict,
)

ORIGIN_PATTERN = Text(
    "an origin such as https://app.example, a pattern such as https://*.example.com, '*' or 'null'",
    pattern=r"\*|null|[a-z][a-z0-9+.-]*://(\*\.)?[A-Za-z0-9_.-]+(:[0-9]{1,5})?",
)


def _cors_checks(values: dict[str, Any]) -> list[tuple[str, str]]:
    if values["allow_credentials"] and "*" in values["allow_origins"]:
        return [
            (
                "allow_origins",
                "'*' with allow_credentials: true would let every site read credentialed"
                " responses (and the Fetch standard refuses ACAO '*' with credentials): list"
                " the origins",
            )
        ]
    return []


CORS_FILTER = Struct(
    "filter_cors",
    "cors: CORS preflights answered at the gateway (Fetch standard), CORS headers on responses.",
    [
        Field(
            "allow_origins",
            ListOf(ORIGIN_PATTERN, min_items=1, unique=True),
            "Origins allowed: exact (https://app.example), with a wildcard label"
            " (https://*.example.com: any subdomain), or '*' (any origin, no credentials).",
            REQUIRED,
        ),
        Field(
            "allow_methods",
            ListOf(METHOD, min_items=1, unique=True),
            "Methods allowed in cross-origin requests.",
            ["GET", "HEAD", "POST"],
        ),
        Field(
            "allow_headers",
            ListOf(HEADER_NAME, unique=True),
            "Request headers allowed beyond the CORS-safelisted ones ('*': any).",
            [],
        ),
        Field(
            "expose_headers",
            ListOf(HEADER_NAME, unique=True),
            "Response headers scripts may read beyond the safelisted ones.",
            [],
        ),
        Field("allow_credentials", Bool(), "Allow cookies and HTTP authentication.", False),
        Field("max_age", NON_NEGATIVE_DURATION, "How long browsers may cache a preflight.", "10m"),
    ],
    build=dict,
    checks=[_cors_checks],
)

KEY_HASH = Text(
    "sha256:<64 hex digits> (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)",
    pattern=r"sha256:[0-9A-Fa-f]{64}",
    lower=True,
)


def _api_key_source(values: dict[str, Any]) -> list[tuple[str, str]]:
    if not values["keys"] and values["keys_file"] is None:
        return [("keys", "give keys or keys_file")]
    return []


API_KEY_FILTER = Struct(
    "filter_api_key",
    "api_key: requests must carry a known API key (401 otherwise; 403 when its consumer is not"
    " allowed here). Keys are stored as SHA-256 hashes.",
    [
        Field("header", HEADER_NAME, "Header carrying the key.", "x-api-key"),
        Field("query", QUERY_NAME, "Query parameter carrying the key (when the header is absent)."),
        Field(
            "keys",
            MapOf(NAME, KEY_HASH),
            "Consumer name -> sha256:<hex> of its key.",
            {},
        ),
        Field(
            "keys_file",
            FILE_PATH,
            "YAML/JSON file of more consumer -> sha256:<hex> entries (read at load and reload).",
        ),
        Field(
            "allow",
            ListOf(NAME, min_items=1, unique=True),
            "Consumers allowed on this route (others: 403). Default: every known consumer.",
        ),
        Field(
            "forward_header",
            HEADER_NAME,
            "Header carrying the consumer's name upstream (a client's own copy is replaced).",
            "x-consumer",
        ),
        Field("strip", Bool(), "Remove the key from the request before it goes upstream.", True),
        Field(
            "realm",
            Text("a realm", pattern=r'[^"\\\r\n\x00]+'),
            "WWW-Authenticate realm.",
            "gateway",
        ),
    ],
    build=dict,
    checks=[_api_key_source],
)

JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
JWT_URL = Text("an http:// or https:// URL", pattern=r"https?://[^\s/?#]+(/[^\s#]*)?")
HTTP_BASE_URL = Text(
    "an http:// or https:// URL without query", pattern=r"https?://[^\s/?#]+(/[^\s?#]*)?"
)


def _jwt_checks(values: dict[str, Any]) -> list[tuple[str, str]]:
    sources = [k for k in ("secret", "jwks_file", "jwks_url", "jwks") if values[k] is not None]
    if not sources:
        return [("jwks_file", "give one of secret, jwks_file, jwks_url (or jwks)")]
    if len(sources) > 1:
        return [(sources[1], f"give one key source, not {' and '.join(sources)}")]
    hmac = [a for a in values["algorithms"] if a.startswith("HS")]
    if values["secret"] is not None and len(hmac) != len(values["algorithms"]):
        return [("algorithms", "a secret verifies HS256/HS384/HS512 only: list only those")]
    if values["secret"] is None and hmac:
        return [("algorithms", f"{', '.join(hmac)} need a secret (JWKS keys are not HMAC keys)")]
    return []


JWT_FILTER = Struct(
    "filter_jwt",
    "jwt: requests must carry a valid JWT bearer token (RFC 7519, errors per RFC 6750).",
    [
        Field(
            "issuer",
            Union(Text("an issuer"), ListOf(Text("an issuer"), min_items=1)),
            "Accepted `iss` value(s); absent: any issuer.",
        ),
        Field(
            "audiences",
            ListOf(Text("an audience"), min_items=1, unique=True),
            "The token's `aud` must name one of these; absent: `aud` is not checked.",
        ),
        Field(
            "algorithms",
            ListOf(Enum(JWT_ALGORITHMS), min_items=1, unique=True),
            "Signature algorithms accepted (never 'none').",
            ["RS256", "ES256", "EdDSA"],
        ),
        Field(
            "secret",
            Text("a secret"),
            "HMAC key for HS256/HS384/HS512. Secret: may be ${env:NAME} or ${file:PATH}.",
            secret=True,
        ),
        Field("jwks_file", FILE_PATH, "JWKS (RFC 7517) file of the verification keys."),
        Field(
            "jwks_url",
            JWT_URL,
            "JWKS URL, fetched off the request path, cached for jwks_cache_ttl and refetched on"
            " an unknown key id (at most once per jwks_min_refresh).",
        ),
        Field("jwks", Text("a JWKS URL or file path"), "jwks_url if it is a URL, else jwks_file."),
        Field("leeway", NON_NEGATIVE_DURATION, "Clock skew allowed for exp, nbf and iat.", "30s"),
        Field(
            "required_claims",
            ListOf(Text("a claim name"), unique=True),
            "Claims the token must carry (exp is always checked when present).",
            [],
        ),
        Field(
            "scopes",
            ListOf(Text("a scope", pattern=r"[\x21\x23-\x5B\x5D-\x7E]+"), unique=True),
            "Scopes the token must all grant (`scope` string or `scp` list); else 403"
            " insufficient_scope.",
            [],
        ),
        Field(
            "claims_to_headers",
            MapOf(Text("a claim name"), HEADER_NAME, pairs=True),
            "Claim -> request header sent upstream (client copies are replaced).",
            {},
        ),
        Field("header", HEADER_NAME, "Header carrying `Bearer TOKEN`.", "authorization"),
        Field("forward_token", Bool(), "Keep the token in the request sent upstream.", True),
        Field(
            "realm",
            Text("a realm", pattern=r'[^"\\\r\n\x00]+'),
            "WWW-Authenticate realm.",
            "gateway",
        ),
        Field(
            "jwks_cache_ttl",
            DURATION,
            "How long fetched JWKS keys are used before a refetch.",
            "10m",
        ),
        Field("jwks_min_refresh", DURATION, "Shortest time between two JWKS fetches.", "30s"),
        Field("jwks_timeout", DURATION, "Time allowed for one JWKS fetch.", "5s"),
    ],
    build=dict,
    checks=[_jwt_checks],
)


def _ip_filter_checks(values: dict[str, Any]) -> list[tuple[str, str]]:
    return [] if values["allow"] or values["deny"] else [("allow", "give allow, deny or both")]


IP_FILTER = Struct(
    "filter_ip_filter",
    "ip_filter: allow or deny clients by address. The address is the client's as the gateway"
    " resolves it (behind trusted_proxies: from X-Forwarded-For).",
    [
        Field("allow", ListOf(CIDR), "Only these networks are admitted (empty: every one).", []),
        Field("deny", ListOf(CIDR), "These networks are refused (checked first).", []),
        Field("status", Int(400, 599), "Status of a refused request.", 403),
    ],
    build=dict,
    checks=[_ip_filter_checks],
)

COMPRESS_FILTER = Struct(
    "filter_compress",
    "compress: response bodies compressed with zstd, br or gzip as the client's"
    " Accept-Encoding prefers, streamed chunk by chunk.",
    [
        Field(
            "algorithms",
            ListOf(Enum(("zstd", "br", "gzip")), min_items=1, unique=True),
            "Encodings offered, in the gateway's preference order (ties in q-value).",
            ["zstd", "br", "gzip"],
        ),
        Field("min_bytes", Size(), "Bodies known to be smaller are sent as they are.", "1KiB"),
        Field(
            "content_types",
            ListOf(Text("a media type such as text/* or application/json"), min_items=1),
            "Media types compressed (* as a wildcard).",
            [
                "text/*",
                "application/json",
                "application/*+json",
                "application/javascript",
                "application/xml",
                "application/*+xml",
                "image/svg+xml",
            ],
        ),
        Field("gzip_level", Int(1, 9), "gzip level.", 6),
        Field("brotli_quality", Int(0, 11), "Brotli quality.", 4),
        Field("zstd_level", Int(1, 19), "zstd level.", 3),
    ],
    build=dict,
)

FORWARD_AUTH_FILTER = Struct(
    "filter_forward_auth",
    "forward_auth: a subrequest to an auth service decides (2xx: go on; else its answer goes"
    " back to the client).",
    [
        Field("url", JWT_URL, "The auth service's URL.", REQUIRED),
        Field("method", METHOD, "Method of the subrequest.", "GET"),
        Field(
            "request_headers",
            ListOf(HEADER_NAME, unique=True),
            "Request headers sent to the auth service (X-Forwarded-Method/-Proto/-Host/-Uri/-For"
            " always are).",
            ["authorization", "cookie"],
        ),
        Field(
            "response_headers",
            ListOf(HEADER_NAME, unique=True),
            "Headers of a 2xx answer copied onto the request (replacing the client's).",
            [],
        ),
        Field("timeout", DURATION, "Time allowed for the auth service's answer.", "1s"),
        Field(
            "on_error",
            Enum(("deny", "allow")),
            "When the auth service fails or times out: 503 (deny) or let the request go on.",
            "deny",
        ),
        Field(
            "cache_ttl",
            DURATION,
            "Remember a 2xx answer for this long, by the values of request_headers (absent: no"
            " cache).",
        ),
    ],
    build=dict,
)

STICKY_KEY = Text(
    "header:NAME or cookie:NAME", pattern=r"(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+"
)


def _some_weight(values: dict[str, Any]) -> list[tuple[str, str]]:
    if not any(weight for _, weight in values["upstreams"]):
        return [("upstreams", "at least one weight must be above 0")]
    return []


TRAFFIC_SPLIT_FILTER = Struct(
    "filter_traffic_split",
    "traffic_split: each request goes to one of these upstreams, by weight.",
    [
        Field(
            "upstreams",
            MapOf(NAME, Int(0, 10_000), pairs=True),
            "Upstream name -> relative weight (e.g. {stable: 95, canary: 5}).",
            REQUIRED,
        ),
        Field(
            "sticky",
            STICKY_KEY,
            "Hash this header or cookie instead of drawing at random: the same value, the same"
            " upstream (while the weights stay).",
        ),
    ],
    build=dict,
    checks=[_some_weight],
)

MIRROR_FILTER = Struct(
    "filter_mirror",
    "mirror: a copy of sampled requests goes to another service after the exchange, fire and"
    " forget (its answer is dropped; it never slows or fails the request).",
    [
        Field(
            "url",
            HTTP_BASE_URL,
            "Base URL of the mirror (the request's path is appended).",
            REQUIRED,
        ),
        Field("sample", Number(0, 1), "Share of requests mirrored.", 1.0),
        Field(
            "max_body_bytes",
            Size(0, 16 * 1024 * 1024),
            "Bodies up to this size are mirrored; requests with larger ones are not.",
            "64KiB",
        ),
        Field("timeout", DURATION, "Time allowed for one mirrored request.", "2s"),
        Field(
            "max_in_flight", Int(1), "Mirrored requests outstanding at once; beyond, dropped.", 64
        ),
    ],
    build=dict,
)

TRACING_EXPORT = Struct(
    "filter_tracing_export",
    "Where and how spans are sent: OTLP/HTTP with the JSON encoding, in batches, off the"
    " request path (a full queue drops spans, counted; a failed export never fails a request).",
    [
        Field(
            "endpoint",
            HTTP_BASE_URL,
            "The OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces.",
            REQUIRED,
        ),
        Field("interval", DURATION, "Spans are sent at least this often.", "1s"),
        Field(
            "batch", Int(1, 100_000), "Spans per export request; a full batch goes at once.", 512
        ),
        Field(
            "queue", Int(1, 1_000_000), "Spans waiting at most (per worker); beyond, dropped.", 4096
        ),
        Field("timeout", DURATION, "Time allowed for one export request.", "5s"),
        Field(
            "headers",
            MapOf(HEADER_NAME, HEADER_VALUE),
            "Headers sent with each export (e.g. an authorization token).",
            {},
            secret=True,
        ),
        Field("service_name", Text("a service name"), "The resource's service.name.", "gateway"),
    ],
    build=dict,
)

TRACING_FILTER = Struct(
    "filter_tracing",
    "tracing: W3C traceparent/tracestate propagated or started, the trace id in the access log.",
    [
        Field("sample_rate", Number(0, 1), "Share of new traces sampled.", 1.0),
        Field(
            "respect_parent",
            Bool(),
            "Keep the caller's sampled flag on a valid traceparent (false: sample_rate decides).",
            True,
        ),
        Field("response_header", HEADER_NAME, "Also send the trace id back in this header."),
        Field("export", TRACING_EXPORT, "Export a span per sampled request over OTLP/HTTP."),
    ],
    build=dict,
)

GRPC_WEB_FILTER = Struct(
    "filter_grpc_web",
    "grpc_web: gRPC-Web (application/grpc-web[-text]) requests bridged to the route's gRPC"
    " upstream (protocol h2c or h2), trailers sent in the body (docs/grpc.md). No options.",
    [],
    build=dict,
)

PYTHON_FILTER = Struct(
    "filter_python",
    "python: a Filter subclass of your own, imported at load (docs/filters.md).",
    [
        Field(
            "class",
            Text("package.module:ClassName", pattern=r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"),
            "Where the class is.",
            REQUIRED,
        ),
        Field("config", AnyMapping(), "Options passed to the class (checked by it).", {}),
        Field(
            "path",
            FILE_PATH,
            "Directory put on sys.path first, to import the module from (e.g. a plugins folder).",
        ),
    ],
    build=dict,
)

FILTER_KINDS: dict[str, Struct] = {
    "headers": HEADERS_FILTER,
    "cors": CORS_FILTER,
    "api_key": API_KEY_FILTER,
    "jwt": JWT_FILTER,
    "ip_filter": IP_FILTER,
    "compress": COMPRESS_FILTER,
    "forward_auth": FORWARD_AUTH_FILTER,
    "traffic_split": TRAFFIC_SPLIT_FILTER,
    "mirror": MIRROR_FILTER,
    "tracing": TRACING_FILTER,
    "grpc_web": GRPC_WEB_FILTER,
    "python": PYTHON_FILTER,
}


class FilterItem(Type):
    """One `filters:` entry: ``{KIND: {options}}``. Checks the options against the kind's
    Struct, imports the class and lets it check them (``validate_config``)."""

    ref = "filter"

    def __init__(self, kinds: dict[str, Struct]) -> None:
        self.kinds = kinds
        self.expected = "a mapping with one key, the filter: " + ", ".join(kinds)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        from gateway.config.model import FilterConfig
        from gateway.filters.registry import FilterLoadError, load_filter_class

        if not isinstance(value, dict) or len(value) != 1:
            shown = f"keys {', '.join(map(str, value))}" if isinstance(value, dict) else None
            ctx.error(path, f"expected {self.expected}, got {shown or describe(value)}")
            return INVALID
        kind, options = next(iter(value.items()))
        where = (*path, kind)
        struct = self.kinds.get(kind) if isinstance(kind, str) else None
        if struct is None:
            hint = _did_you_mean_filter(str(kind), self.kinds)
            ctx.error(where, f"unknown filter {kind!r}{hint}", key=True)
            return INVALID
        converted = struct.check(ctx, where, {} if options is None else options)
        if converted is INVALID:
            return INVALID
        base = ctx.resolver.base_dir
        for key in _FILTER_FILE_OPTIONS.get(kind, ()):
            if converted.get(key) is not None and base is not None:
                converted[key] = str(base / converted[key])
        if kind == "jwt" and converted["jwks"] is not None:
            alias = converted.pop("jwks")
            is_url = alias.startswith(("http://", "https://"))
            converted["jwks_url" if is_url else "jwks_file"] = (
                alias if is_url or base is None else str(base / alias)
            )
        else:
            converted.pop("jwks", None)
        if kind == "python":
            target = converted["class"]
            try:
                cls = load_filter_class(target, converted["path"])
            except FilterLoadError as exc:
                ctx.error((*where, "class"), str(exc))
                return INVALID
            options_path: Path = (*where, "config")
            checked: dict[str, Any] = converted["config"]
            label = target
        else:
            cls = load_filter_class(BUILTIN_FILTERS[kind])
            options_path, checked, label = where, converted, kind
        try:
            problems = list(cls.validate_config(checked))
        except Exception as exc:  # a user's validate_config must not crash the load
            problems = [f"validate_config raised {type(exc).__name__}: {exc}"]
        for problem in problems:
            key, sep, rest = str(problem).partition(": ")
            if sep and key in checked:
                ctx.error((*options_path, key), rest)
            else:
                ctx.error(options_path, str(problem))
        if problems:
            return INVALID
        try:  # built once here too, so that a constructor's complaint is a load error
            cls.from_config(checked).close()
        except Exception as exc:
            ctx.error(options_path, f"cannot build the filter: {type(exc).__name__}: {exc}")
            return INVALID
        line = ctx.positions.line_of(where, key=True)
        return FilterConfig(
            kind, cls, checked, label, f"{ctx.source}:{line}" if line else ctx.source
        )

    def redact(self, value: Any) -> Any:
        # The kind's Struct knows which options are secret (jwt.secret).
        if isinstance(value, dict) and len(value) == 1:
            kind, options = next(iter(value.items()))
            struct = self.kinds.get(kind) if isinstance(kind, str) else None
            if struct is not None:
                return {kind: struct.redact(options)}
        return super().redact(value)

    def json(self, gen: JsonGen) -> dict[str, Any]:
        return {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {kind: {**gen.render(struct), "description": struct.doc}},
                    "required": [kind],
                    "additionalProperties": False,
                }
                for kind, struct in self.kinds.items()
            ],
            "description": "A filter: a mapping with one key, the filter's name.",
        }


def _did_you_mean_filter(word: str, choices: dict[str, Struct]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(choices)})"


FILTERS = ListOf(FilterItem(FILTER_KINDS))
FILTERS_DOC = (
    "Filters (docs/filters.md), each a one-key mapping such as {jwt: {...}}. Order on a"
    " request: global, then the route's, then the upstream's, each in list order; response"
    " hooks run in the reverse order."
)


# RFC 9113 §6.9.1: a flow-control window is at most 2^31-1 (§6.9.2: it starts at 65,535).
_MAX_WINDOW = 2**31 - 1

UPSTREAM_HTTP2 = Struct(
    "upstream_http2",
    "The pool of multiplexed HTTP/2 connections each instance gets (protocol h2c or h2;"
    " docs/http2-upstream.md). A reload that changes any of these opens new pools.",
    [
        Field(
            "max_connections",
            Int(1, 1000),
            "Connections per instance. Streams fill a connection up to the server's"
            " SETTINGS_MAX_CONCURRENT_STREAMS (or max_concurrent_streams) before another opens.",
            4,
        ),
        Field(
            "max_concurrent_streams",
            Int(1, _MAX_WINDOW),
            "Streams the gateway opens on one connection at most (lower than the server's"
            " SETTINGS_MAX_CONCURRENT_STREAMS to spread load over connections). Default: the"
            " server's limit.",
        ),
        Field(
            "max_pending",
            Int(1, 1_000_000),
            "Streams of one instance that may wait for a connection (all connections full or"
            " still opening); one more fails at once as a connect failure.",
            1024,
        ),
        Field(
            "initial_window",
            Size(65535, _MAX_WINDOW),
            "SETTINGS_INITIAL_WINDOW_SIZE sent to the server: response body bytes it may send"
            " per stream before the gateway acknowledges them (as the client takes them).",
            "1MiB",
        ),
        Field(
            "connection_window",
            Size(65535, _MAX_WINDOW),
            "Receive window of one whole connection (all its streams' unacknowledged response"
            " bytes); large, so one slow reader does not stall the other streams.",
            "16MiB",
        ),
        Field(
            "max_header_list_size",
            Size(1024, 16 * 1024 * 1024),
            "SETTINGS_MAX_HEADER_LIST_SIZE sent to the server: the largest response head or"
            " trailers (RFC 9113 §6.5.2: name + value + 32 per field).",
            "64KiB",
        ),
        Field(
            "ping_interval",
            DURATION,
            "Keepalive: a connection that heard nothing for this long sends a PING (off unless"
            " given). gRPC servers refuse frequent PINGs by default (grpc-core: 5 minutes).",
        ),
        Field(
            "ping_timeout",
            DURATION,
            "With ping_interval: a connection that receives no frame at all within this time"
            " after its PING is closed, and its streams fail at once (any frame extends it).",
            "20s",
        ),
    ],
    build=UpstreamHttp2Config,
)


def _percent(value: int) -> float:
    return value / 100.0


def _instances_or_discovery(values: dict[str, Any]) -> list[tuple[str, str]]:
    has_static, backend = values["instances"] is not None, values["discovery"]
    if not has_static and backend is None:
        return [("instances", "required key is missing")]
    if has_static and backend is not None:
        return [("discovery", "give either instances or discovery, not both")]
    if backend is not None and values["service"] is None:
        return [("service", "required with discovery: the service name to follow")]
    if backend is None:
        given = [k for k in ("service", "tags", "datacenter") if values[k]]
        return [(k, "only meaningful with discovery") for k in given]
    return []


def _hash_key_needed(values: dict[str, Any]) -> list[tuple[str, str]]:
    if values["balancer"] in HASH_BALANCERS and values["hash_key"] is None:
        return [("hash_key", f"required with balancer {values['balancer']}")]
    if values["balancer"] not in HASH_BALANCERS and values["hash_key"] is not None:
        return [("hash_key", "only meaningful with balancer ring_hash or maglev")]
    return []


def _h2_needs_tls(values: dict[str, Any]) -> list[tuple[str, str]]:
    if values["protocol"] == "h2" and values["tls"] is None:
        return [("protocol", "h2 is HTTP/2 over TLS: set tls (or use h2c for plaintext)")]
    return []


def _http2_needs_h2_protocol(values: dict[str, Any]) -> list[tuple[str, str]]:
    # An error, not a warning: settings that silently do nothing are a misconfiguration.
    if values["http2"] is not None and values["protocol"] == "http1":
        return [("http2", "only meaningful with protocol h2c or h2 (this upstream is http1)")]
    return []


def _upstream(**values: Any) -> UpstreamConfig:
    # The name is the mapping key; MapOf(key_field="name") fills it in.
    values["instances"] = values["instances"] or ()
    values["rate_limit"] = values["rate_limit"] or ()
    return UpstreamConfig(name="", **values)


class _UpstreamStruct(Struct):
    """The JSON Schema half of ``_instances_or_discovery`` (the validator words it better)."""

    def json(self, gen: JsonGen) -> dict[str, Any]:
        out = super().json(gen)
        out["oneOf"] = [{"required": ["instances"]}, {"required": ["discovery"]}]
        out["dependentRequired"] = {"discovery": ["service"]}
        return out


UPSTREAM = _UpstreamStruct(
    "upstream",
    "A named group of instances that routes send traffic to.",
    [
        Field(
            "instances",
            ListOf(INSTANCE, min_items=1),
            "Static instances: 'host:port' strings or {address, weight} mappings"
            " (required unless discovery is set).",
        ),
        Field(
            "balancer",
            Enum(BALANCERS),
            "How an instance is picked per request: round_robin, weighted_round_robin (EDF),"
            " least_request (power of two choices), peak_ewma (latency), random (weighted),"
            " ring_hash or maglev (consistent hashing on hash_key).",
            BALANCERS[0],
        ),
        Field(
            "hash_key",
            HASH_KEY,
            "What ring_hash/maglev hash: header:NAME, cookie:NAME, query:NAME, client_ip or path.",
        ),
        Field(
            "slow_start",
            DURATION,
            "Window over which a new or recovered instance's share ramps up linearly.",
        ),
        Field(
            "panic_threshold",
            Mapped(Int(0, 100), _percent),
            "Percent: when fewer instances than this are available, balance over all of them.",
            50,
        ),
        Field("retry", RETRY, "Retry policy (overridable per route).", {}),
        Field("outlier", OUTLIER, "Passive outlier detection.", {}),
        Field("health", HEALTH, "Active health checks (off unless given)."),
        Field("hedge", HEDGE, "Hedged requests (off unless given)."),
        Field("circuit_breaker", CIRCUIT_BREAKER, "Connection and request limits.", {}),
        Field("timeouts", TIMEOUTS, "Connect, read and idle timeouts.", {}),
        Field(
            "max_idle_connections",
            Int(0),
            "Keep-alive connections kept open per instance when idle.",
            64,
        ),
        Field("discovery", NAME, "Discovery backend (a key of `discovery`) instead of instances."),
        Field(
            "service",
            Text("a service name"),
            "Service to follow: registry/Consul service name; DNS 'host:port' (A/AAAA) or an"
            " SRV name such as '_http._tcp.api.example'.",
        ),
        Field(
            "tags",
            ListOf(Text("a tag"), unique=True),
            "Consul/registry: only instances carrying every one of these tags.",
            [],
        ),
        Field("datacenter", Text("a datacenter name"), "Consul: datacenter to query."),
        Field(
            "passing_only",
            Bool(),
            "Consul: only instances whose health checks all pass (false: every instance).",
            True,
        ),
        Field(
            "rate_limit",
            RATE_LIMITS,
            "Rate limits every route to this upstream must also pass; their buckets are shared"
            " by those routes (key: route means one bucket for the whole upstream).",
        ),
        Field("tls", UPSTREAM_TLS, "TLS to the instances (off unless given)."),
        Field(
            "protocol",
            Enum(("http1", "h2c", "h2")),
            "Protocol to the instances: http1, h2c (HTTP/2 with prior knowledge) or h2 (TLS"
            " with ALPN; needs tls). h2c/h2 instances get multiplexed HTTP/2 pools, which"
            " HTTP/2 clients' streams use (docs/grpc.md).",
            "http1",
        ),
        Field(
            "http2",
            UPSTREAM_HTTP2,
            "HTTP/2 pool settings (protocol h2c or h2 only; defaults when absent).",
        ),
        Field("filters", FILTERS, FILTERS_DOC + " These run on every route to this upstream.", []),
    ],
    build=_upstream,
    checks=[_instances_or_discovery, _hash_key_needed, _h2_needs_tls, _http2_needs_h2_protocol],
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
        Field("exact", ROUTE_PATH, "The path equals this value."),
        Field("prefix", ROUTE_PREFIX, "The path starts with this value."),
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
        Field(
            "sni",
            HOST_MATCH,
            "TLS server name the client sent (exact or '*.example.com'); a request on a"
            " plaintext connection, or without SNI, never matches.",
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
        Field("strip_prefix", ROUTE_PREFIX, "Remove this prefix from the path."),
        Field("prefix", ROUTE_PATH, "Prepend this to the path (after strip_prefix)."),
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


def _idempotency(methods: list[str], fingerprint: list[str], **values: Any) -> IdempotencyConfig:
    return IdempotencyConfig(methods=tuple(methods), fingerprint=tuple(fingerprint), **values)


IDEMPOTENCY = Struct(
    "idempotency",
    "Idempotency-Key replay store (draft-ietf-httpapi-idempotency-key-header): a keyed request"
    " is executed once per key, route and principal; duplicates get the stored response"
    " (docs/idempotency.md).",
    [
        Field(
            "store",
            Enum(("local", "redis")),
            "redis (shared by all gateways, needs the top-level redis section) or local (an"
            " SQLite file in state_dir, shared by this gateway's workers).",
            "local",
        ),
        Field(
            "methods",
            ListOf(METHOD, min_items=1, unique=True),
            "Methods whose keyed requests are guarded.",
            ["POST", "PATCH"],
        ),
        Field("required", Bool(), "Answer 400 to a request of these methods without a key.", False),
        Field("ttl", DURATION, "How long a completed response is replayed.", "24h"),
        Field(
            "max_response_bytes",
            Size(0),
            "Larger response bodies are relayed but not stored (counted as bypassed).",
            "1MiB",
        ),
        Field(
            "max_request_bytes",
            Size(0, 1024 * 1024),
            "Keyed request bodies are buffered whole before the claim (the fingerprint covers"
            " the body) up to this size; beyond: 413.",
            "64KiB",
        ),
        Field(
            "fingerprint",
            ListOf(Enum(("method", "path", "body")), min_items=1, unique=True),
            "Request parts hashed into the fingerprint; the same key with another one: 422.",
            ["method", "path", "body"],
        ),
        Field(
            "lock_timeout",
            DURATION,
            "A claim whose request never finished (gateway crash) frees the key after this.",
            "30s",
        ),
        Field(
            "principal",
            Text("client_ip or header:NAME", pattern=r"client_ip|header:" + TOKEN_PATTERN),
            "Whose keys these are: client_ip (honouring trusted_proxies) or header:NAME;"
            " keys never match across principals.",
            "client_ip",
        ),
        Field(
            "on_store_error",
            Enum(("allow", "deny")),
            "When the store fails or is slower than redis.timeout: forward without the guarantee"
            " (allow) or answer 503 (deny).",
            "allow",
        ),
        Field(
            "in_flight",
            Enum(("conflict", "wait")),
            "A duplicate while the first is in flight: 409 (conflict), or wait (bounded by"
            " lock_timeout and the route timeout) and replay.",
            "conflict",
        ),
        Field(
            "store_4xx",
            Bool(),
            "Store and replay 4xx responses too (5xx and failures always free the key).",
            True,
        ),
    ],
    build=_idempotency,
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
        Field("retry", RETRY, "Overrides the upstream's retry policy for this route."),
        Field(
            "server_timing",
            Bool(),
            "Add a Server-Timing response header with the gateway's and the upstream's time.",
            False,
        ),
        Field(
            "rate_limit",
            RATE_LIMITS,
            "A rate limit, or a list of them that must all admit (429 beyond).",
        ),
        Field(
            "rate_limit_headers",
            Bool(),
            "Send RateLimit / RateLimit-Policy headers on admitted responses too.",
            False,
        ),
        Field(
            "rate_limit_legacy_headers",
            Bool(),
            "Also send X-RateLimit-Limit/-Remaining/-Reset (for older clients).",
            False,
        ),
        Field(
            "max_in_flight",
            Int(0),
            "Concurrent requests of this route (0: no cap); beyond, 503 with Retry-After.",
            0,
        ),
        Field("idempotency", IDEMPOTENCY, "Idempotency-Key replay store for this route."),
        Field("filters", FILTERS, FILTERS_DOC, []),
    ],
    build=lambda rate_limit, **values: RouteConfig(rate_limit=rate_limit or (), **values),
)

# --- discovery --------------------------------------------------------------------------------

DISCOVERY_TYPES = ("registry", "dns", "consul", "kubernetes", "etcd", "zookeeper", "eureka")
_TLS_KEYS = ("ca_file", "cert_file", "key_file", "tls_verify")
_TYPE_KEYS = {
    "registry": ("state_file", "default_ttl"),
    "dns": ("nameservers", "min_ttl", "max_ttl", "timeout"),
    "consul": ("address", "token", "datacenter", "wait", "timeout", *_TLS_KEYS),
    "kubernetes": (
        "address",
        "token",
        "token_file",
        "kubeconfig",
        "namespace",
        "port",
        "include_terminating",
        "wait",
        "timeout",
        *_TLS_KEYS,
    ),
    "etcd": ("address", "prefix", "value_format", "timeout", *_TLS_KEYS),
    "zookeeper": ("hosts", "prefix", "session_timeout", "timeout"),
    "eureka": ("address", "refresh_interval", "delta", "timeout", *_TLS_KEYS),
}
_TYPE_DEFAULTS = {
    "min_ttl": 1.0,
    "max_ttl": 60.0,
    "timeout": 2.0,
    "wait": 30.0,
    "tls_verify": True,
    "include_terminating": False,
    "value_format": "json",
    "session_timeout": 10.0,
    "refresh_interval": 30.0,
    "delta": True,
}
# Defaults that differ by type: (type, key) -> value.
_PER_TYPE_DEFAULTS = {
    ("kubernetes", "wait"): 300.0,  # watch timeoutSeconds: resumed from resourceVersion
    ("etcd", "prefix"): "/services/",
    ("zookeeper", "prefix"): "/services",
}
_REQUIRED_KEYS = {
    "consul": ("address", "http://127.0.0.1:8500"),
    "etcd": ("address", "http://127.0.0.1:2379"),
    "eureka": ("address", "http://127.0.0.1:8761/eureka"),
    "zookeeper": ("hosts", "127.0.0.1:2181"),
}


def _discovery_keys(values: dict[str, Any]) -> list[tuple[str, str]]:
    kind = values["type"]
    problems = []
    for other, keys in _TYPE_KEYS.items():
        for key in keys:
            if other != kind and key not in _TYPE_KEYS[kind] and values[key] is not None:
                problems.append((key, f"not a key of type {kind} (it belongs to type {other})"))
    if kind in _REQUIRED_KEYS:
        key, example = _REQUIRED_KEYS[kind]
        if values[key] is None:
            problems.append((key, f"required for type {kind}, e.g. {example}"))
    if kind == "kubernetes" and values["kubeconfig"] is not None:
        given = [k for k in ("address", "token", "token_file") if values[k] is not None]
        problems += [(k, "give either kubeconfig or address/token settings") for k in given]
    low, high = values["min_ttl"], values["max_ttl"]
    if low is not None and high is not None and low > high:
        problems.append(("min_ttl", "must not be greater than max_ttl"))
    if values["retry_min"] > values["retry_max"]:
        problems.append(("retry_min", "must not be greater than retry_max"))
    if (values["cert_file"] is None) != (values["key_file"] is None):
        problems.append(("cert_file", "cert_file and key_file must be given together"))
    return problems


def _discovery(**values: Any) -> DiscoveryConfig:
    for (kind, key), default in _PER_TYPE_DEFAULTS.items():
        if values["type"] == kind and values[key] is None:
            values[key] = default
    for key, default in _TYPE_DEFAULTS.items():
        if values[key] is None:
            values[key] = default
    values["nameservers"] = values["nameservers"] or ()
    return DiscoveryConfig(name="", **values)


NAMESERVER = Text(
    "an IP address, optionally with :port (IPv6 as [::1]:53)",
    pattern=r"[0-9.]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?|[0-9A-Fa-f:]+",
)
HTTP_URL = Text("an http:// or https:// URL", pattern=r"https?://[^\s/?#]+/?")
HTTP_URL_PATH = Text("an http:// or https:// URL", pattern=r"https?://[^\s/?#]+(/[^\s?#]*)?")

DISCOVERY = Struct(
    "discovery_backend",
    "A discovery backend. Keys other than type, allow_empty and retry_* belong to one type.",
    [
        Field("type", Enum(DISCOVERY_TYPES), "Backend kind.", REQUIRED),
        Field(
            "allow_empty",
            Bool(),
            "Honour an empty instance list from a healthy backend (default: keep the last"
            " non-empty list and log it).",
            False,
        ),
        Field("retry_min", DURATION, "First retry delay after a backend failure.", "200ms"),
        Field("retry_max", DURATION, "Longest retry delay (doubling with jitter).", "10s"),
        Field(
            "state_file",
            Text("a file path"),
            "registry: snapshot file that keeps registrations across restarts (its journal is"
            " FILE.journal); relative to state_dir; default: STATE_DIR/registry-NAME.json.",
        ),
        Field("default_ttl", DURATION, "registry: TTL of registrations that give none."),
        Field(
            "nameservers",
            ListOf(NAMESERVER),
            "dns: servers to ask ('127.0.0.1', '127.0.0.1:5353'); default: the system's.",
        ),
        Field("min_ttl", DURATION, "dns: shortest refresh interval (default 1s)."),
        Field("max_ttl", DURATION, "dns: longest refresh interval (default 60s)."),
        Field(
            "timeout",
            DURATION,
            "dns: query timeout; consul, kubernetes, etcd, eureka: connect timeout; zookeeper:"
            " how long to wait for a connection before reporting stale (default 2s).",
        ),
        Field(
            "address",
            HTTP_URL_PATH,
            "consul: agent HTTP API base URL; kubernetes: API server URL (default: in-cluster);"
            " etcd: client URL; eureka: server URL including /eureka. A password in it"
            " (http://user:PASSWORD@host) is redacted and may be a ${env:NAME} / ${file:PATH}"
            " reference.",
            references=True,
        ),
        Field(
            "token",
            Text("a token"),
            "consul: ACL token sent as X-Consul-Token; kubernetes: bearer token. Secret:"
            " redacted when shown; may be ${env:NAME} or ${file:PATH}.",
            secret=True,
        ),
        Field("datacenter", Text("a datacenter name"), "consul: default datacenter."),
        Field(
            "wait",
            DURATION,
            "consul: blocking query wait time (default 30s); kubernetes: watch timeoutSeconds"
            " (default 5m).",
        ),
        Field("ca_file", Text("a file path"), "consul, kubernetes, etcd, eureka: CA bundle."),
        Field("cert_file", Text("a file path"), "TLS client certificate (https backends)."),
        Field(
            "key_file",
            Text("a file path"),
            "TLS client key (with cert_file). Secret: redacted when shown.",
            secret=True,
        ),
        Field("tls_verify", Bool(), "https: verify the server certificate (default true)."),
        Field(
            "namespace",
            Text("a Kubernetes namespace"),
            "kubernetes: namespace of the Services (default: the pod's own, else 'default').",
        ),
        Field(
            "kubeconfig",
            Text("a file path"),
            "kubernetes: kubeconfig file (its current context) instead of in-cluster settings.",
        ),
        Field(
            "token_file",
            Text("a file path"),
            "kubernetes: bearer token file, re-read when it rotates (default: the pod's"
            " service-account token). Secret: redacted when shown.",
            secret=True,
        ),
        Field(
            "port",
            Text("a port name or number", pattern=r"[0-9]{1,5}|[a-z0-9]([-a-z0-9]*[a-z0-9])?"),
            "kubernetes: endpoint port by name or number when `service` does not say"
            " (default: the only port).",
        ),
        Field(
            "include_terminating",
            Bool(),
            "kubernetes: also route to terminating endpoints that are still serving"
            " (default false).",
        ),
        Field(
            "prefix",
            Text("a key prefix starting with /", pattern=r"/.*"),
            "etcd: key prefix (default /services/); zookeeper: Curator base path"
            " (default /services).",
        ),
        Field(
            "value_format",
            Enum(("json", "address")),
            "etcd: values are JSON {address, port, weight, tags, meta} (json, default) or"
            " plain 'host:port' (address).",
        ),
        Field("hosts", Text("host:port[,host:port…]"), "zookeeper: connect string."),
        Field("session_timeout", DURATION, "zookeeper: session timeout (default 10s)."),
        Field(
            "refresh_interval",
            DURATION,
            "eureka: how often instances are fetched (default 30s).",
        ),
        Field("delta", Bool(), "eureka: use /apps/delta between full fetches (default true)."),
    ],
    build=_discovery,
    checks=[_discovery_keys],
)

ADMIN = Union(
    LISTEN_ADDRESS,
    Struct(
        "admin",
        "Admin server address plus the registration API's settings.",
        [
            Field("address", LISTEN_ADDRESS, "Address of the admin/metrics server.", REQUIRED),
            Field(
                "token",
                Text("a token"),
                "Required (Authorization: Bearer TOKEN) on every /admin/* call, on POST"
                " /admin/reload and on mutating registration calls; /healthz, /readyz,"
                " /metrics and /discover stay open. Secret: redacted when shown; may be"
                " ${env:NAME} or ${file:PATH}.",
                secret=True,
            ),
            Field(
                "read_without_token",
                Bool(),
                "Let GET /admin/* answer without the token (read-only access; secrets stay"
                " redacted). Mutating calls still need it.",
                False,
            ),
            Field(
                "registry",
                NAME,
                "Discovery backend (type registry or consul) behind /register and /discover"
                " unless a call names one; default: the only type registry backend (required"
                " when there are several).",
            ),
        ],
        build=AdminConfig,
    ),
    expected=(
        f"an address ({ADDRESS_HINT}) or a mapping {{address, token, read_without_token, registry}}"
    ),
)


def _root(**values: Any) -> dict[str, Any]:
    admin = values["admin"]
    if isinstance(admin, AdminConfig):
        values["admin"] = admin.address
        values["admin_token"] = admin.token
        values["admin_read_without_token"] = admin.read_without_token
        values["admin_registry"] = admin.registry
    values["rate_limit"] = values["rate_limit"] or ()
    listeners = values["listen"]
    values["listeners"] = listeners
    values["listen"] = listeners[0].address
    return values


# --- observability --------------------------------------------------------------------------

ACCESS_LOG = Struct(
    "access_log",
    "One JSON line per request, written off the event loop.",
    [
        Field("path", Text("a file path, or '-' for stdout"), "Where lines go ('-': stdout).", "-"),
        Field("sample", Number(0, 1), "Fraction of requests logged (1 = all).", 1.0),
    ],
    build=AccessLogConfig,
)

HISTOGRAM_NAMES = (
    "request_duration",
    "upstream_duration",
    "overhead",
    "request_body",
    "response_body",
)


def _increasing(values: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for name, bounds in values["buckets"]:
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            problems.append(("buckets", f"{name}: bucket bounds must be strictly increasing"))
    return problems


METRICS = Struct(
    "metrics",
    "Prometheus metrics settings.",
    [
        Field(
            "buckets",
            MapOf(
                Text("a histogram name", pattern="|".join(HISTOGRAM_NAMES)),
                ListOf(Number(0), min_items=1),
                pairs=True,
            ),
            "Bucket bounds per histogram (request_duration, upstream_duration, overhead in"
            " seconds; request_body, response_body in bytes), replacing the defaults.",
            {},
        ),
    ],
    build=MetricsConfig,
    checks=[_increasing],
)

REDIS = Struct(
    "redis",
    "The Redis server shared by `store: redis` rate limits.",
    [
        Field(
            "url",
            Text("a redis:// or rediss:// URL", pattern=r"rediss?://\S+"),
            "Redis URL. Its password (redis://:PASSWORD@host or redis://user:PASSWORD@host) is"
            " redacted when shown and may be a ${env:NAME} / ${file:PATH} reference.",
            "redis://127.0.0.1:6379/0",
            references=True,
        ),
        Field(
            "timeout",
            DURATION,
            "Longest wait for Redis to answer a decision, from when its batch is written (then "
            "on_store_error). Measured with the gateway saturated on a busy 2-core machine: "
            "round trip p50 0.2-1 ms, p99 11-19 ms; with a CPU hog per core added p50 <1 ms, "
            "p99 30-60 ms, max 50-150 ms (docs/ratelimit.md). 50ms is about that loaded p99: "
            "0-1 timeouts per ~1,000 calls there. An answer already in the socket when the "
            "timer fires (a busy loop, not a slow Redis) is still read.",
            "50ms",
        ),
        Field("prefix", Text("a key prefix"), "Prefix of every key the gateway writes.", "gateway"),
        Field(
            "max_connections",
            Int(1),
            "Script calls in flight at once on the one pipelined connection to Redis (more "
            "batches wait and are merged). The name predates pipelining.",
            16,
        ),
        Field(
            "fallback_share",
            Number(0.001, 1),
            "Share of each store: redis limit's rate and burst that this gateway's fallback "
            "bucket (on_store_error: local) admits: 1 for one gateway, 1/N for N gateways so "
            "that all of them falling back at once admit at most the limit. Every request "
            "Redis admits is also debited from the fallback bucket (see docs/ratelimit.md).",
            1.0,
        ),
        Field(
            "lease_horizon",
            DURATION,
            "Leased limits (rate_limit.lease): a worker's lease of a key holds about this long of"
            " its recent rate of that key (at most its share of the burst), refilled when half is"
            " used.",
            "100ms",
        ),
        Field(
            "lease_ttl",
            DURATION,
            "Leased tokens not used within this are given back to Redis; keys seen less often"
            " than twice per lease_ttl are decided one request at a time.",
            "1s",
        ),
    ],
    build=RedisConfig,
)


def _redis_for_redis_limits(values: dict[str, Any]) -> list[tuple[str, str]]:
    if values.get("redis") is not None:
        return []
    users = [
        f"route {route.name}"
        for route in values.get("routes") or ()
        if any(limit.store == "redis" for limit in route.rate_limit)
    ]
    users += [
        f"upstream {name}"
        for name, upstream in (values.get("upstreams") or {}).items()
        if any(limit.store == "redis" for limit in upstream.rate_limit)
    ]
    if any(limit.store == "redis" for limit in values.get("rate_limit") or ()):
        users.append("the global rate_limit")
    if users:
        return [("redis", "required: " + ", ".join(users) + " use store: redis")]
    return []


def _redis_for_idempotency(values: dict[str, Any]) -> list[tuple[str, str]]:
    if values.get("redis") is not None:
        return []
    users = [
        route.name
        for route in values.get("routes") or ()
        if route.idempotency is not None and route.idempotency.store == "redis"
    ]
    if users:
        names = ", ".join(users)
        return [("redis", f"required: idempotency of route {names} uses store: redis")]
    return []


def limit_names(
    route: RouteConfig, upstream: UpstreamConfig | None, global_limits: tuple[Any, ...]
) -> list[str]:
    """Policy names of every limit a request of ``route`` must pass, in evaluation order:
    the route's own (default ``limitN``), its upstream's (``upstreamN``), global (``globalN``)."""
    names = [limit.name or f"limit{i}" for i, limit in enumerate(route.rate_limit)]
    if upstream is not None:
        names += [limit.name or f"upstream{i}" for i, limit in enumerate(upstream.rate_limit)]
    names += [limit.name or f"global{i}" for i, limit in enumerate(global_limits)]
    return names


def _rate_limit_names_unique(values: dict[str, Any]) -> list[tuple[str, str]]:
    # The names label the RateLimit headers of one response: they must differ per route.
    upstreams = values.get("upstreams") or {}
    global_limits = values.get("rate_limit") or ()
    problems = []
    for route in values.get("routes") or ():
        names = limit_names(route, upstreams.get(route.upstream), global_limits)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            problems.append(
                (
                    "rate_limit",
                    f"route {route.name}: rate limit names repeat across the route, its upstream"
                    f" and the global limits: {', '.join(repeated)}",
                )
            )
    return problems


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
        Field(
            "max_connections",
            Int(1),
            "Concurrent client connections, for the whole gateway (all workers); beyond: 503"
            " with Retry-After, then close.",
            10_000,
        ),
        # Slow clients: their slowness is never blamed on an upstream (docs/slow-clients.md).
        Field(
            "client_body_timeout",
            DURATION,
            "Longest wait between two reads of a request body; beyond: 408, then close. The"
            " upstream read timeout only starts once the whole request was sent.",
            "60s",
        ),
        Field(
            "send_timeout",
            DURATION,
            "A client that reads nothing for this long while the gateway has response bytes"
            " for it is closed.",
            "60s",
        ),
        Field(
            "client_write_buffer",
            Size(1024),
            "High-water mark of each client connection's write buffer: above it the upstream"
            " is no longer read until the buffer is down to a quarter of it.",
            "16KiB",
        ),
        Field(
            "headers_with_underscores",
            Enum(["allow", "drop", "reject"]),
            "Request header names containing '_' (CGI/WSGI backends read '_' as '-'): forward,"
            " drop the field, or answer 400. Underscore spellings of framing, hop-by-hop, Host"
            " and X-Forwarded-*/Forwarded/X-Request-ID fields are never forwarded.",
            "drop",
        ),
        Field(
            "max_chunk_line_bytes",
            Size(16),
            "Longest chunk-size line of a chunked request body (size, extensions, CRLF);"
            " beyond: 400.",
            "4KiB",
        ),
        Field(
            "max_chunk_extensions_bytes",
            Size(0),
            "Chunk-extension bytes allowed in one chunked request body, all chunks together;"
            " beyond: 400.",
            "64KiB",
        ),
        Field(
            "allowed_methods",
            ListOf(METHOD),
            "Request methods the gateway accepts (unset: any token, RFC 9110 §9.1). Others get"
            " 405 (standard methods, with Allow) or 501 (extension methods).",
        ),
    ],
    build=LimitsConfig,
)

RELOAD = Struct(
    "reload",
    "Safety checks applied to every reload (SIGHUP, POST /admin/reload, gateway reload, watch).",
    [
        Field(
            "refuse_drop_ratio",
            Number(0, 1),
            "A reload that would remove this share of the running routes, or of the running"
            " upstreams, or more (0.5: half of them) is refused unless forced (gateway reload"
            " --force, POST /admin/reload?force=1). The running config's value applies.",
            0.5,
        ),
    ],
    build=ReloadConfig,
)


PATHS = Struct(
    "paths",
    "How request paths are normalised before routing; the upstream gets the normalised path."
    " Always on: '.' and '..' segments are resolved (RFC 3986 §5.2.4) and a path climbing above"
    " '/' is refused (400), unreserved characters are percent-decoded and other escapes get"
    " upper-case hex (§6.2.2), leading slashes collapse to one. See docs/request-validation.md.",
    [
        Field(
            "escaped_slashes",
            Enum(["reject", "keep", "decode"]),
            "A %2F or %5C in the path: reject (400), keep (forwarded as %2F / %5C, not a"
            " separator), or decode (to '/' and '\\' before '..' is resolved; the '\\' then"
            " follows `backslashes`).",
            "reject",
        ),
        Field(
            "backslashes",
            Enum(["reject", "keep", "to_slash"]),
            "A raw '\\' in the path: reject (400), keep (forwarded as is), or to_slash (read"
            " as '/', as browsers do, before '..' is resolved).",
            "reject",
        ),
        Field(
            "merge_slashes",
            Bool(),
            "Merge runs of '/' inside the path ('/a//b' -> '/a/b'), like nginx's merge_slashes.",
            False,
        ),
    ],
    build=PathsConfig,
)

# --- listeners ---------------------------------------------------------------------------------

CERTIFICATE = Struct(
    "certificate",
    "A certificate and its key; SNI picks it by the names in its subjectAltName.",
    [
        Field("cert", FILE_PATH, "PEM certificate, followed by its intermediates.", REQUIRED),
        Field(
            "key", FILE_PATH, "PEM private key. Secret: redacted when shown.", REQUIRED, secret=True
        ),
    ],
    build=CertificateConfig,
)

CLIENT_AUTH = Struct(
    "client_auth",
    "Client certificates (mTLS): verified against ca.",
    [
        Field("ca", FILE_PATH, "CA bundle (PEM) client certificates must chain to.", REQUIRED),
        Field(
            "mode",
            Enum(("optional", "require")),
            "optional: a client may present a certificate (verified if it does); require:"
            " the handshake fails without a valid one.",
            "optional",
        ),
    ],
    build=ClientAuthConfig,
)

ALPN_PROTOCOL = Enum(("h2", "http/1.1"))


def _listener_tls(**values: Any) -> ListenerTLSConfig:
    values["certificates"] = tuple(values["certificates"])
    values["alpn"] = tuple(values["alpn"])
    return ListenerTLSConfig(**values)


def _default_certificate_listed(values: dict[str, Any]) -> list[tuple[str, str]]:
    default = values["default_certificate"]
    if default is not None and default not in [c.cert for c in values["certificates"]]:
        return [("default_certificate", f"{default!r} is not the cert of any certificates entry")]
    return []


LISTENER_TLS = Struct(
    "listener_tls",
    "Terminate TLS on this listener (docs/tls.md).",
    [
        Field(
            "certificates",
            ListOf(CERTIFICATE, min_items=1),
            "Certificates; SNI picks the one whose subjectAltName covers the name (exact"
            " names before wildcards, then list order).",
            REQUIRED,
        ),
        Field(
            "default_certificate",
            FILE_PATH,
            "cert of the entry used without SNI or when no name matches (default: the first).",
        ),
        Field("min_version", Enum(TLS_VERSIONS), "Lowest TLS version accepted.", "1.2"),
        Field(
            "alpn",
            ListOf(ALPN_PROTOCOL, min_items=1, unique=True),
            "ALPN protocols offered, in preference order. With http2.enabled, h2 is offered"
            " first even if not listed here.",
            ["http/1.1"],
        ),
        Field(
            "handshake_timeout",
            DURATION,
            "A handshake not done within this time is aborted.",
            "10s",
        ),
        Field("client_auth", CLIENT_AUTH, "Client certificates (off unless given)."),
        Field(
            "forward_client_cert",
            Bool(),
            "Send the verified client certificate upstream in x-forwarded-client-cert"
            " (Hash, Subject, URI, DNS). Incoming copies are always dropped unless the peer"
            " is a trusted proxy.",
            False,
        ),
        Field(
            "session_tickets",
            Bool(),
            "Session tickets (resumption without a full handshake; the keys live in each"
            " process and survive certificate reloads). false: every connection does a full"
            " handshake.",
            True,
        ),
    ],
    build=_listener_tls,
    checks=[_default_certificate_listed],
)

# RFC 9113 §6.5.2: SETTINGS_MAX_FRAME_SIZE lies between 2^14 and 2^24-1.
HTTP2 = Struct(
    "http2",
    "HTTP/2 on this listener: h2 by ALPN on TLS, h2c with prior knowledge on plaintext"
    " (docs/http2.md). Every stream goes through routing, limits and the access log like an"
    " HTTP/1.1 request; the caps below bound what one connection may make the gateway do.",
    [
        Field("enabled", Bool(), "Accept HTTP/2 connections on this listener.", False),
        Field(
            "max_concurrent_streams",
            Int(1, 10_000),
            "SETTINGS_MAX_CONCURRENT_STREAMS: streams a client may have open at once; one more"
            " is refused with RST_STREAM REFUSED_STREAM.",
            100,
        ),
        Field(
            "initial_window",
            Size(65535, _MAX_WINDOW),
            "SETTINGS_INITIAL_WINDOW_SIZE: request body bytes a client may send per stream"
            " before the gateway acknowledges them (it does so as the upstream takes them).",
            "1MiB",
        ),
        Field(
            "connection_window",
            Size(65535, _MAX_WINDOW),
            "Receive window of the whole connection (all streams' unacknowledged body bytes).",
            "4MiB",
        ),
        Field(
            "max_frame_size",
            Size(16384, 2**24 - 1),
            "SETTINGS_MAX_FRAME_SIZE: largest frame payload a client may send.",
            16384,
        ),
        Field(
            "max_header_list_size",
            Size(1024, 16 * 1024 * 1024),
            "SETTINGS_MAX_HEADER_LIST_SIZE: decoded header list bytes (RFC 9113 §6.5.2 way:"
            " name + value + 32 per field); larger requests get 431, and a header block that"
            " decodes to far more (an HPACK bomb) ends the connection with COMPRESSION_ERROR.",
            "64KiB",
        ),
        Field(
            "max_header_block",
            Size(1024, 16 * 1024 * 1024),
            "Encoded bytes of one header block (HEADERS plus its CONTINUATION frames) before"
            " END_HEADERS; beyond it the connection ends (CVE-2024-27316, CONTINUATION flood).",
            "128KiB",
        ),
        Field(
            "max_resets_per_second",
            Int(1),
            "Streams a client may reset (RST_STREAM) per second on one connection; beyond it"
            " GOAWAY ENHANCE_YOUR_CALM and close (CVE-2023-44487, rapid reset).",
            100,
        ),
        Field(
            "max_pings_per_second",
            Int(1),
            "PING frames per second per connection; beyond it GOAWAY ENHANCE_YOUR_CALM.",
            20,
        ),
        Field(
            "max_settings_per_second",
            Int(1),
            "SETTINGS frames per second per connection; beyond it GOAWAY ENHANCE_YOUR_CALM.",
            20,
        ),
    ],
    build=Http2Config,
)

REDIRECT_TARGET = Text(
    "an https:// URL prefix such as https://{host}:8443",
    pattern=r"https://[^\s/?#]+",
)


def _alpn_h2_needs_http2(values: dict[str, Any]) -> list[tuple[str, str]]:
    tls, http2 = values["tls"], values["http2"]
    if tls is not None and "h2" in tls.alpn and not http2.enabled:
        return [("tls", "alpn lists h2 but http2.enabled is false")]
    return []


LISTENER = Struct(
    "listener",
    "A listening address, plaintext or TLS.",
    [
        Field("address", LISTEN_ADDRESS, "host:port to listen on.", REQUIRED),
        Field("name", NAME, "Name in metrics and the access log (default: the address)."),
        Field("tls", LISTENER_TLS, "TLS settings; absent = plaintext."),
        Field(
            "redirect_to",
            REDIRECT_TARGET,
            "Plaintext listeners only: answer every request with 308 to this URL prefix plus"
            " the request target; {host} is the request's host name without its port.",
        ),
        Field("http2", HTTP2, "HTTP/2 (off unless enabled).", {}),
    ],
    build=lambda address, name, tls, redirect_to, http2: ListenerConfig(
        address, name or str(address), tls, redirect_to, http2
    ),
    checks=[
        lambda values: (
            [("redirect_to", "only meaningful on a plaintext listener")]
            if values["tls"] is not None and values["redirect_to"] is not None
            else []
        ),
        _alpn_h2_needs_http2,
    ],
)

LISTENER_ITEM = Union(
    Mapped(LISTEN_ADDRESS, lambda a: ListenerConfig(a, str(a))),
    LISTENER,
    expected=f"an address ({ADDRESS_HINT}) or a mapping {{address, name, tls, redirect_to}}",
)

LISTEN = Union(
    Mapped(LISTEN_ADDRESS, lambda a: (ListenerConfig(a, str(a)),)),
    Mapped(ListOf(LISTENER_ITEM, min_items=1), tuple),
    expected=f"an address ({ADDRESS_HINT}) or a list of listeners",
)


ROOT = Struct(
    None,
    "Gateway configuration (routes, upstreams, listeners, limits).",
    [
        Field(
            "listen",
            LISTEN,
            "Address for client traffic, or a list of listeners (plaintext addresses or"
            " {address, name, tls, redirect_to}); changes need a restart, except TLS settings.",
            "0.0.0.0:8080",
        ),
        Field(
            "admin",
            ADMIN,
            "Admin/metrics server: an address, or {address, token, registry}.",
            "127.0.0.1:9901",
        ),
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
        Field("paths", PATHS, "Request path normalisation (before routing).", {}),
        Field(
            "upstreams",
            MapOf(NAME, UPSTREAM, key_field="name"),
            "Upstreams by name.",
            {},
        ),
        Field(
            "routes",
            ListOf(ROUTE),
            "Routes, in priority order for ties. A gateway refuses to run, or to reload, a file"
            " without this key (an empty or truncated file): write `routes: []` for a gateway"
            " that serves no routes.",
            [],
        ),
        Field(
            "discovery",
            MapOf(NAME, DISCOVERY, key_field="name"),
            "Discovery backends by name; upstreams refer to them with `discovery: NAME`.",
            {},
        ),
        Field("access_log", ACCESS_LOG, "Access log (off unless given)."),
        Field("metrics", METRICS, "Metrics settings.", {}),
        Field(
            "watch",
            Bool(),
            "Reload when the config file changes (its size, mtime and hash are checked every"
            " second; a change is read once it has been the same on two checks in a row).",
            False,
        ),
        Field("reload", RELOAD, "Safety checks on reloads.", {}),
        Field(
            "drain_timeout",
            DURATION,
            "On SIGTERM: how long requests in flight may take to finish before the exit.",
            "10s",
        ),
        Field("redis", REDIS, "Redis for shared rate limits (store: redis)."),
        Field(
            "state_dir",
            Text("a directory path"),
            "Directory of state files (registry snapshots and journals); relative to the config"
            " file. Default: /var/lib/pygateway as root, else $XDG_STATE_HOME/pygateway or"
            " ~/.local/state/pygateway; never the config file's directory.",
        ),
        Field(
            "rate_limit",
            RATE_LIMITS,
            "Rate limits every request must pass, whatever its route (key: route means one"
            " bucket for the whole gateway).",
        ),
        Field("filters", FILTERS, FILTERS_DOC + " These run on every route.", []),
    ],
    build=_root,
    checks=[_redis_for_redis_limits, _rate_limit_names_unique, _redis_for_idempotency],
)
