"""Typed, immutable view of a validated config file.

The validator (``gateway.config.validate``) is the only producer of these objects; the data
plane and the control plane only read them. Durations are float seconds, sizes are int bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

BalancerName = Literal["round_robin", "weighted_round_robin"]
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
class UpstreamConfig:
    name: str
    instances: tuple[InstanceConfig, ...]
    balancer: BalancerName = "round_robin"
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_idle_connections: int = 64  # per instance


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


@dataclass(frozen=True, slots=True)
class RewriteConfig:
    strip_prefix: str | None = None
    prefix: str | None = None  # prepended after strip_prefix
    regex: str | None = None  # applied to the path (after strip/prefix), with `replacement`
    replacement: str | None = None
    host: str | None = None  # replaces the Host header sent upstream


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: MatchConfig
    upstream: str
    rewrite: RewriteConfig | None = None
    timeout: float | None = None  # whole request, response head to last byte; None = no bound
    max_body_bytes: int | None = None  # None = limits.max_body_bytes


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = 32 * 1024  # request line + headers -> 431
    max_uri_bytes: int = 8 * 1024  # -> 414
    max_body_bytes: int = 1024 * 1024 * 1024  # default per-route request body cap -> 413
    header_timeout: float = 10.0  # whole request head must arrive within -> 408
    keepalive_timeout: float = 75.0  # idle client keep-alive connection is closed after
    max_connections: int = 10_000  # concurrent client connections; beyond, new ones are closed


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
