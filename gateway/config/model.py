"""Typed, immutable view of a validated config file.

The validator (``gateway.config.validate``) is the only producer of these objects; the data
plane and the control plane only read them. Durations are float seconds, sizes are int bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

BalancerName = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_request",
    "peak_ewma",
    "random",
    "ring_hash",
    "maglev",
]
PathKind = Literal["exact", "prefix", "regex"]


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 1.0
    read: float = 30.0  # time between bytes from the upstream (and to its response head)
    idle: float = 60.0  # how long a pooled keep-alive upstream connection may sit unused


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """``retry:`` of an upstream (or a route's override). ``attempts`` counts the first try."""

    attempts: int = 2
    on: tuple[str | int, ...] = ("connect_failure", "reset", "gateway_error")
    per_try_timeout: float | None = None
    budget_percent: float = 20.0  # share of a retry each request earns (gateway/resilience/budget)
    min_retries_per_second: float = 10.0  # the budget's reserve
    budget_ttl: float = 10.0  # seconds a request's share stays spendable
    max_body_bytes: int = 64 * 1024  # request bodies kept for a replay up to this size
    allow_non_idempotent: bool = False  # POST/PATCH retried without an Idempotency-Key


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    # Any 5xx in a row; off by default: an application's own 500s should not eject it.
    consecutive_failures: int = 0
    consecutive_gateway_failures: int = 5  # 502/503/504 or transport failures in a row
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_statuses: tuple[int, ...] = (200,)
    jitter: float = 0.1  # fraction of the interval
    type: Literal["http", "grpc"] = "http"  # grpc: grpc.health.v1.Health/Check over HTTP/2
    service: str = ""  # grpc: the service asked about ("": the server as a whole)


@dataclass(frozen=True, slots=True)
class HedgeConfig:
    """Send a second try to another instance when the first has not answered in time."""

    delay: float | None = None  # fixed wait before hedging, or
    percentile: float | None = None  # wait the upstream's recent latency at this quantile


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """One entry of a ``filters:`` list (gateway.filters): the filter's kind, the class that
    implements it (imported at config load) and its validated options (for ``python``: the
    ``config`` mapping handed to the class)."""

    kind: str  # "jwt", "cors", ..., "python"
    cls: type = field(compare=False)  # a gateway.filters.base.Filter subclass
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    label: str = ""  # name in gateway_filter_errors_total and log lines
    where: str = ""  # file:line of the entry, for log lines


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    instances: tuple[InstanceConfig, ...]
    balancer: BalancerName = "round_robin"
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_idle_connections: int = 64  # per instance
    # Service discovery (instead of static ``instances``): backend name and service to follow.
    discovery: str | None = None
    service: str | None = None
    tags: tuple[str, ...] = ()  # Consul: instances must carry every tag
    datacenter: str | None = None  # Consul: overrides the backend's datacenter
    passing_only: bool = True  # Consul: only instances whose checks all pass
    # Balancing and failover.
    hash_key: str | None = (
        None  # ring_hash/maglev: header:NAME, cookie:NAME, client_ip, path, query:NAME
    )
    slow_start: float | None = None  # window (s) over which a new/recovered instance ramps up
    panic_threshold: float = 0.5  # below this share of available instances, use all of them
    retry: RetryConfig = field(default_factory=RetryConfig)
    outlier: OutlierConfig | None = field(default_factory=OutlierConfig)
    health: HealthConfig | None = None  # active checks, off unless configured
    hedge: HedgeConfig | None = None  # hedged requests, off unless configured
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    # Limits every route to this upstream must also pass; their buckets are shared by the routes.
    rate_limit: tuple[RateLimitConfig, ...] = ()
    tls: UpstreamTLSConfig | None = None  # TLS to the instances, off unless given
    # Protocol to the instances: http1, h2c (HTTP/2 with prior knowledge), h2 (TLS + ALPN).
    protocol: Literal["http1", "h2c", "h2"] = "http1"
    # The multiplexed pools of h2c/h2 upstreams (None: UpstreamHttp2Config's defaults).
    http2: UpstreamHttp2Config | None = None
    # Filters of every route to this upstream, run after the route's own (gateway.filters).
    filters: tuple[FilterConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamHttp2Config:
    """``upstreams.NAME.http2``: each instance's pool of HTTP/2 connections (protocol h2c/h2;
    docs/http2-upstream.md). Part of the pool key: a reload that changes it makes new pools."""

    max_connections: int = 4  # connections per instance
    max_concurrent_streams: int | None = None  # streams we open per connection; None: server's
    max_pending: int = 1024  # streams waiting for a connection per instance
    initial_window: int = 1024 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE (response bytes/stream)
    connection_window: int = 16 * 1024 * 1024  # receive window of a whole connection
    max_header_list_size: int = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE (response heads)
    ping_interval: float | None = None  # seconds of silence before a PING; None: no PINGs
    ping_timeout: float = 20.0  # seconds without any frame after a PING: the connection is dead


@dataclass(frozen=True, slots=True)
class UpstreamTLSConfig:
    """``upstreams.NAME.tls``: speak TLS to the instances (see docs/tls.md)."""

    sni: str | None = None  # server name sent and verified; None: the instance's host name
    ca: str | None = None  # CA bundle path; None: the system trust store
    verify: bool = True  # verify the chain and the name (false only when written)
    cert: str | None = None  # client certificate for mTLS to the instances
    key: str | None = None
    min_version: str = "1.2"


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: PathKind
    value: str


@dataclass(frozen=True, slots=True)
class MatchConfig:
    host: str | None = None  # lowercase; exact "api.example.com" or wildcard "*.example.com"
    path: PathMatch | None = None  # None matches every path (same as prefix "/")
    methods: tuple[str, ...] | None = None  # upper-case; None matches every method
    headers: tuple[tuple[str, str], ...] = ()  # (lowercase name, exact value)
    query: tuple[tuple[str, str], ...] = ()  # (parameter name, exact value)
    sni: str | None = None  # lowercase TLS server name; exact or "*.example.com" wildcard


@dataclass(frozen=True, slots=True)
class RewriteConfig:
    strip_prefix: str | None = None
    prefix: str | None = None  # prepended after strip_prefix
    regex: str | None = None  # applied to the path (after strip/prefix), with `replacement`
    replacement: str | None = None
    host: str | None = None  # replaces the Host header sent upstream


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """One ``rate_limit`` entry of a route (GCRA: ``count`` per ``period`` s, ``burst`` extra)."""

    count: int
    period: float
    burst: int | None = None  # admitted at once from idle; None = count
    key: str | tuple[str, ...] = "client_ip"
    store: Literal["local", "redis"] = "local"
    dry_run: bool = False
    missing: Literal["shared", "reject"] = "shared"
    on_store_error: Literal["allow", "local", "deny"] = "local"
    name: str | None = None
    max_keys: int = 100_000
    lease: bool = True  # store: redis: decide from leased tokens (docs/ratelimit.md)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    timeout: float = 0.05  # no decision waits longer for Redis; then on_store_error applies
    prefix: str = "gateway"
    max_connections: int = 16  # script calls in flight on the pipelined connection
    fallback_share: float = 1.0  # of rate and burst, for the on_store_error: local bucket
    lease_horizon: float = 0.1  # seconds of a worker's recent rate of a key per lease
    lease_ttl: float = 1.0  # seconds a leased token stays usable


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """``idempotency`` of a route: the Idempotency-Key replay store (docs/idempotency.md)."""

    store: Literal["local", "redis"] = "local"
    methods: tuple[str, ...] = ("POST", "PATCH")
    required: bool = False  # 400 when the key is missing
    ttl: float = 86400.0  # seconds a completed response is replayed
    max_response_bytes: int = 1024 * 1024  # larger responses are relayed, not stored
    max_request_bytes: int = 64 * 1024  # keyed request bodies are buffered up to this (413)
    fingerprint: tuple[str, ...] = ("method", "path", "body")
    lock_timeout: float = 30.0  # a claim whose request never finished frees the key after this
    principal: str = "client_ip"  # client_ip | header:NAME
    on_store_error: Literal["allow", "deny"] = "allow"
    in_flight: Literal["conflict", "wait"] = "conflict"
    store_4xx: bool = True


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: MatchConfig
    upstream: str
    rewrite: RewriteConfig | None = None
    timeout: float | None = None  # whole request, response head to last byte; None = no bound
    max_body_bytes: int | None = None  # None = limits.max_body_bytes
    retry: RetryConfig | None = None  # overrides the upstream's retry policy for this route
    server_timing: bool = False  # add a Server-Timing header (gateway and upstream time)
    rate_limit: tuple[RateLimitConfig, ...] = ()  # all must admit
    rate_limit_headers: bool = False  # RateLimit/RateLimit-Policy on admitted responses too
    rate_limit_legacy_headers: bool = False  # X-RateLimit-Limit/Remaining/Reset as well
    max_in_flight: int = 0  # concurrent requests of this route (0: no cap) -> 503
    idempotency: IdempotencyConfig | None = None  # Idempotency-Key replay store
    filters: tuple[FilterConfig, ...] = ()  # after the global ones, before the upstream's


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = 32 * 1024  # request line + headers -> 431
    max_uri_bytes: int = 8 * 1024  # -> 414
    max_body_bytes: int = 1024 * 1024 * 1024  # default per-route request body cap -> 413
    header_timeout: float = 10.0  # whole request head must arrive within -> 408
    keepalive_timeout: float = 75.0  # idle client keep-alive connection is closed after
    max_connections: int = 10_000  # concurrent client connections, gateway-wide; beyond -> 503
    # Slow clients (see docs/slow-clients.md). Between two reads of a request body -> 408.
    client_body_timeout: float = 60.0
    send_timeout: float = 60.0  # client read nothing while the gateway had data for it: close
    client_write_buffer: int = 16 * 1024  # high-water mark of a client's write buffer
    headers_with_underscores: Literal["allow", "drop", "reject"] = "drop"  # '_' in a field name
    max_chunk_line_bytes: int = 4 * 1024  # chunk-size line incl. extensions -> 400
    max_chunk_extensions_bytes: int = 64 * 1024  # all chunk extensions of one request -> 400
    allowed_methods: tuple[str, ...] | None = None  # None: any token; else 405/501


EscapedSlashAction = Literal["reject", "keep", "decode"]
BackslashAction = Literal["reject", "keep", "to_slash"]


@dataclass(frozen=True, slots=True)
class PathsConfig:
    """How request paths are normalised before routing (``gateway/proxy/normalize.py``)."""

    escaped_slashes: EscapedSlashAction = "reject"  # %2F and %5C in a path
    backslashes: BackslashAction = "reject"  # a raw "\\" in a path
    merge_slashes: bool = False  # "/a//b" -> "/a/b"


DiscoveryType = Literal["registry", "dns", "consul", "kubernetes", "etcd", "zookeeper", "eureka"]


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """One named discovery backend (``discovery:`` section). Keys of other types stay None."""

    name: str
    type: DiscoveryType
    allow_empty: bool = False  # honour an empty answer from a healthy backend
    retry_min: float = 0.2  # backoff after a backend failure, doubled per failure, with jitter
    retry_max: float = 10.0
    # registry
    state_file: str | None = None  # where registrations persist; relative to state_dir
    default_ttl: float | None = None  # TTL of registrations that give none; None = no expiry
    # dns
    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port"; empty = the system's resolvers
    min_ttl: float = 1.0  # refresh no more often than this, whatever the record TTL says
    max_ttl: float = 60.0  # and at least this often
    timeout: float = 2.0  # dns: per query; consul: connect timeout
    # consul
    address: str | None = None  # base URL, e.g. http://127.0.0.1:8500
    token: str | None = None  # ACL token (X-Consul-Token)
    datacenter: str | None = None
    wait: float = 30.0  # blocking query wait
    ca_file: str | None = None  # TLS: CA bundle for https addresses
    cert_file: str | None = None  # TLS client certificate (with key_file)
    key_file: str | None = None
    tls_verify: bool = True
    # kubernetes (address/token/ca_file/cert_file/key_file/tls_verify/wait as above)
    namespace: str | None = None  # default: the pod's namespace (in cluster), else "default"
    kubeconfig: str | None = None  # use this kubeconfig's current context instead of in-cluster
    token_file: str | None = None  # bearer token file, re-read when it changes
    port: str | None = None  # default port name or number of the endpoints
    include_terminating: bool = False  # also terminating endpoints that still serve
    # etcd / zookeeper
    prefix: str | None = None  # key / znode prefix under which services live
    value_format: str = "json"  # etcd: "json" ({"address", "port", ...}) or "address" (h:p)
    hosts: str | None = None  # zookeeper connect string "h1:2181,h2:2181"
    session_timeout: float = 10.0  # zookeeper session timeout
    # eureka
    refresh_interval: float = 30.0  # eureka: how often the registry is fetched
    delta: bool = True  # eureka: use /apps/delta between full fetches


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``admin:`` given as a mapping: where it listens plus the registration API's settings."""

    address: Address
    token: str | None = None  # required (Bearer / X-Admin-Token) on /admin/* and mutations
    read_without_token: bool = False  # GET /admin/* answers without the token
    registry: str | None = None  # discovery backend that /register and /discover use


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    # A reload removing this share of the routes (or of the upstreams), or more, is refused
    # unless forced: a truncated or half-written file must not empty the route table.
    refuse_drop_ratio: float = 0.5


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "-"  # "-" is stdout
    sample: float = 1.0  # fraction of requests logged


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # Histogram name (request_duration, upstream_duration, overhead, request_body,
    # response_body) -> bucket bounds replacing the defaults.
    buckets: tuple[tuple[str, tuple[float, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: str  # PEM certificate (chain) path, relative to the config file
    key: str  # PEM private key path (secret)


@dataclass(frozen=True, slots=True)
class ClientAuthConfig:
    ca: str  # CA bundle client certificates must chain to
    mode: Literal["optional", "require"] = "optional"


@dataclass(frozen=True, slots=True)
class ListenerTLSConfig:
    certificates: tuple[CertificateConfig, ...]
    default_certificate: str | None = None  # cert path; None: the first certificate
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)
    handshake_timeout: float = 10.0
    client_auth: ClientAuthConfig | None = None
    forward_client_cert: bool = False
    session_tickets: bool = True  # stateless resumption (RFC 8446 §4.6.1, RFC 5077)


@dataclass(frozen=True, slots=True)
class Http2Config:
    """``listen[].http2``: serve HTTP/2 (h2 by ALPN on TLS, h2c with prior knowledge on
    plaintext); see docs/http2.md. The caps bound what one connection may make us do."""

    enabled: bool = False
    max_concurrent_streams: int = 100  # SETTINGS_MAX_CONCURRENT_STREAMS; more: REFUSED_STREAM
    initial_window: int = 1024 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE per stream (bytes)
    connection_window: int = 4 * 1024 * 1024  # connection-level receive window (bytes)
    max_frame_size: int = 16384  # SETTINGS_MAX_FRAME_SIZE we accept
    max_header_list_size: int = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE (decoded bytes)
    max_header_block: int = 128 * 1024  # encoded HEADERS+CONTINUATION bytes (CVE-2024-27316)
    max_resets_per_second: int = 100  # RST_STREAM cap (CVE-2023-44487): then GOAWAY
    max_pings_per_second: int = 20
    max_settings_per_second: int = 20


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: Address
    name: str  # for metrics and the access log; default: the address as written
    tls: ListenerTLSConfig | None = None
    redirect_to: str | None = None  # plaintext only: "https://{host}:8443" style redirect
    http2: Http2Config = field(default_factory=Http2Config)

    @property
    def socket_key(self) -> tuple[str, int, bool]:
        """What only a restart can change: the bound address and whether it speaks TLS."""
        return (self.address.host, self.address.port, self.tls is not None)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: Address
    admin: Address
    workers: int | Literal["auto"]
    trusted_proxies: tuple[str, ...]  # CIDRs whose X-Forwarded-*/Forwarded headers are kept
    limits: LimitsConfig
    upstreams: dict[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    source: str  # file name the config came from ("<string>" for text)
    sha256: str  # hex digest of the file bytes
    raw: dict[str, Any]  # the parsed YAML document, for /admin/config
    discovery: dict[str, DiscoveryConfig] = field(default_factory=dict)
    admin_token: str | None = None  # admin.token: guards /admin/* and mutating API calls
    admin_read_without_token: bool = False  # admin.read_without_token: GET /admin/* is open
    admin_registry: str | None = None  # admin.registry: backend of the registration API
    access_log: AccessLogConfig | None = None  # off unless configured
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    redis: RedisConfig | None = None  # the shared store of `store: redis` rate limits
    watch: bool = False  # reload when the config file changes (polled every second)
    drain_timeout: float = 10.0  # SIGTERM: how long in-flight requests may take to finish
    rate_limit: tuple[RateLimitConfig, ...] = ()  # every request must pass these as well
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    # Resolved ${env:...}/${file:...} references (reference -> value): sent to the workers so
    # that they build the very same config without reading the environment or files again.
    references: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # Values of secret keys and URL passwords: scrubbed from logs and admin answers.
    secrets: tuple[str, ...] = field(default=(), repr=False, compare=False)
    # Line of each top-level key in the file (for errors about a whole section).
    key_lines: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    state_dir: str | None = None  # where state files go; None: the per-user default directory
    paths: PathsConfig = field(default_factory=PathsConfig)  # request path normalisation
    # Every listener (``listen`` is the first one's address, kept for older callers).
    listeners: tuple[ListenerConfig, ...] = ()
    # TLS files (certificates, keys, CAs) by resolved path, read and checked once by the
    # process that validated the config (gateway.tls.certs) and handed to the workers.
    tls_files: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    tls_warnings: tuple[str, ...] = field(default=(), repr=False, compare=False)
    filters: tuple[FilterConfig, ...] = ()  # run first on every route (gateway.filters)

    @property
    def all_listeners(self) -> tuple[ListenerConfig, ...]:
        return self.listeners or (ListenerConfig(self.listen, str(self.listen)),)
