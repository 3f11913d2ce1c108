"""The immutable view of config + runtime objects that the data plane reads per request.

A reload builds a new ``Snapshot`` and swaps one reference; a request keeps the snapshot it
started with. Connection pools are carried over for instances that exist in both snapshots, so a
reload does not drop warm upstream connections.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass, field

from gateway.balancing import Balancer, SlowStart, compile_hash_key, make_balancer
from gateway.config.model import (
    GatewayConfig,
    InstanceConfig,
    RateLimitConfig,
    RedisConfig,
    RetryConfig,
    UpstreamConfig,
    UpstreamHttp2Config,
)
from gateway.filters.api import FilterChain
from gateway.filters.chain import Chain
from gateway.filters.registry import compile_filters
from gateway.health.outlier import OutlierDetector
from gateway.idempotency import RouteIdempotency, idempotency_stores
from gateway.pools import ConnectionPool, PoolFactory, pool_factory
from gateway.proxy.headers import TrustedProxies
from gateway.ratelimit import LimitSpec, RedisStore, RouteLimiter
from gateway.ratelimit import shared as shared_buckets
from gateway.ratelimit.limiter import BucketStores
from gateway.resilience.budget import RetryBudget
from gateway.resilience.circuit_breaker import CircuitBreaker
from gateway.resilience.retry import RetryPolicy
from gateway.routing import RouteTable
from gateway.tls.upstream import H2_ALPN, UpstreamTLS, upstream_tls

log = logging.getLogger("gateway.upstreams")

LATENCY_SAMPLES = 512  # recent upstream latencies kept for a percentile-based hedge delay
MIN_LATENCY_SAMPLES = 20


class Instance:
    """One upstream instance as the balancer and the proxy see it.

    ``available`` is what balancers read: healthy (active checks) and not ejected (outlier
    detection). Both flags live here so either can flip without knowing about the other.
    """

    __slots__ = (
        "active_requests",
        "address",
        "available",
        "config",
        "ejected",
        "failing",
        "healthy",
        "latency",
        "pool",
        "weight",
    )

    def __init__(self, config: InstanceConfig, pool: ConnectionPool) -> None:
        self.config = config
        self.address = config.address
        self.weight = config.weight
        self.healthy = True
        self.ejected = False
        self.failing = False  # the last try failed: the next success must reset the streak
        self.latency = 0.0  # moving average of upstream response time (s), for /admin/upstreams
        self.available = True
        self.pool: ConnectionPool = pool  # the data plane's InstancePool (gateway/pools.py)
        self.active_requests = 0

    def update_availability(self) -> bool:
        """Recompute ``available``; True when it changed."""
        available = self.healthy and not self.ejected
        if available is self.available:
            return False
        self.available = available
        return True


# Called as ``listener(upstream, address, until)`` when this process's outlier detection ejects
# an instance; a worker sets it to tell the supervisor, which broadcasts the ejection.
EjectionListener = Callable[[str, str, float], None]
_ejection_listener: EjectionListener | None = None


def set_ejection_listener(listener: EjectionListener | None) -> None:
    global _ejection_listener
    _ejection_listener = listener


def _same_runtime_settings(old: UpstreamConfig, new: UpstreamConfig) -> bool:
    """Whether an upstream's runtime state (balancer, breaker, budget, latency window) can carry
    over from ``old`` to ``new``: the settings that shape it are unchanged."""
    return (
        old.balancer == new.balancer
        and old.panic_threshold == new.panic_threshold
        and old.slow_start == new.slow_start
        and old.circuit_breaker == new.circuit_breaker
        and old.retry.budget_percent == new.retry.budget_percent
        and old.retry.min_retries_per_second == new.retry.min_retries_per_second
        and old.retry.budget_ttl == new.retry.budget_ttl
        and old.hedge == new.hedge
    )


def retry_policy(config: RetryConfig) -> RetryPolicy | None:
    if config.attempts <= 1:
        return None
    return RetryPolicy(
        attempts=config.attempts,
        on=config.on,
        per_try_timeout=config.per_try_timeout,
        max_body_bytes=config.max_body_bytes,
        allow_non_idempotent=config.allow_non_idempotent,
    )


class Upstream:
    __slots__ = (
        "balancer",
        "breaker",
        "budget",
        "config",
        "hash_key",
        "hedge_delay",
        "instances",
        "latency_samples",
        "name",
        "observes_latency",
        "outlier",
        "read_timeout",
        "retry",
        "rng",
    )

    def __init__(
        self, config: UpstreamConfig, instances: list[Instance], previous: Upstream | None = None
    ) -> None:
        now = time.monotonic()
        self.config = config
        self.name = config.name
        self.instances = instances
        self.read_timeout = config.timeouts.read
        # Runtime state that a discovery update or a reload keeping the same settings must not
        # reset: the balancer (slow start, P2C/EWMA state, carried over by address), the
        # breaker's counts, the retry budget and the latency window.
        same = previous is not None and _same_runtime_settings(previous.config, config)
        self.rng: random.Random
        self.balancer: Balancer[Instance]
        self.budget: RetryBudget
        self.breaker: CircuitBreaker
        if same:
            assert previous is not None
            self.rng = previous.rng
            self.balancer = previous.balancer
            self.balancer.rebuild(instances, now)  # new addresses ramp under slow_start
        else:
            self.rng = random.Random()
            self.balancer = make_balancer(
                config.balancer,
                instances,
                panic_threshold=config.panic_threshold,
                slow_start=SlowStart(config.slow_start) if config.slow_start else None,
                rng=self.rng,
                now=now,
            )
        self.hash_key = compile_hash_key(config.hash_key) if config.hash_key else None
        self.observes_latency = hasattr(self.balancer, "observe")  # peak_ewma
        # Hedging: a fixed delay, or one derived each second from recent latencies.
        hedge = config.hedge
        self.hedge_delay = hedge.delay if hedge is not None and hedge.delay else 0.0
        self.latency_samples: deque[float] | None = (
            deque(maxlen=LATENCY_SAMPLES) if hedge is not None and hedge.percentile else None
        )
        self.retry = retry_policy(config.retry)
        retry = config.retry
        breaker = config.circuit_breaker
        if same:
            assert previous is not None
            self.hedge_delay = previous.hedge_delay
            self.latency_samples = previous.latency_samples
            self.budget = previous.budget
            self.breaker = previous.breaker
        else:
            self.budget = RetryBudget(
                retry.budget_percent, retry.min_retries_per_second, retry.budget_ttl, now
            )
            self.breaker = CircuitBreaker(
                breaker.max_connections, breaker.max_pending, breaker.max_requests
            )
        outlier = config.outlier
        if outlier is None:
            self.outlier: OutlierDetector | None = None
        elif (
            previous is not None
            and previous.outlier is not None
            and previous.config.outlier == outlier
        ):
            self.outlier = previous.outlier  # ejection history survives a reload
        else:
            self.outlier = OutlierDetector(
                consecutive_failures=outlier.consecutive_failures,
                consecutive_gateway_failures=outlier.consecutive_gateway_failures,
                base_ejection_time=outlier.base_ejection_time,
                max_ejection_time=outlier.max_ejection_time,
                max_ejection_percent=outlier.max_ejection_percent,
            )
        if self.outlier is not None:
            self.outlier.set_instances(instance.address for instance in instances)
            for instance in instances:
                if self.outlier.is_ejected(instance.address, now):
                    instance.ejected = True
                    instance.update_availability()
            self.balancer.refresh(now)

    def pick(self, key: bytes | None = None, exclude: Container[object] = ()) -> Instance | None:
        return self.balancer.pick(key, exclude)

    def record_outcome(self, instance: Instance, success: bool, gateway_failure: bool) -> None:
        """Passive health: feed one try's outcome to outlier detection."""
        instance.failing = not success
        outlier = self.outlier
        if outlier is None:
            return
        now = time.monotonic()
        if outlier.record(instance.address, success, gateway_failure, now) and not instance.ejected:
            instance.ejected = True
            if instance.update_availability():
                self.balancer.refresh(now)
            # Its idle pooled connections are not handed out again: a frozen instance keeps
            # accepted connections open forever, and a dead one's are all stale.
            instance.pool.close_idle()
            log.warning(
                "upstream %s: instance %s ejected after consecutive failures",
                self.name,
                instance.address,
            )
            listener = _ejection_listener
            info = outlier.info(instance.address)
            if listener is not None and info is not None:
                listener(self.name, instance.address, info.ejected_until)

    def apply_ejection(self, address: str, until: float, now: float) -> bool:
        """Eject ``address`` until ``until`` (monotonic seconds) because another process's outlier
        detection did. Idempotent: an ejection that ends no later than the current one is a
        no-op (that is how the worker that ejected sees its own broadcast). The max-ejection
        percent of this process's view applies. Returns True when the instance was ejected or
        its ejection extended; it returns to service in ``tick`` (slow start applies)."""
        outlier = self.outlier
        if outlier is None or until <= now:
            return False
        instance = next((i for i in self.instances if i.address == address), None)
        if instance is None or not outlier.eject_until(address, until, now):
            return False
        if not instance.ejected:
            instance.ejected = True
            if instance.update_availability():
                self.balancer.refresh(now)
            # Its idle pooled connections are not handed out again: a frozen instance keeps
            # accepted connections open forever, and a dead one's are all stale.
            instance.pool.close_idle()
            log.warning(
                "upstream %s: instance %s ejected by another worker for %.1fs",
                self.name,
                address,
                until - now,
            )
        return True

    def tick(self, now: float) -> None:
        """Once a second: return ejected instances whose time is up; advance slow start."""
        outlier = self.outlier
        changed = False
        if outlier is not None and outlier.ejected_count():
            returned = set(outlier.sweep(now))
            for instance in self.instances:
                if instance.address in returned and instance.ejected:
                    instance.ejected = False
                    changed |= instance.update_availability()
                    log.info(
                        "upstream %s: instance %s returned to service", self.name, instance.address
                    )
        if changed:
            self.balancer.refresh(now)
        self.balancer.tick(now)
        self.budget.tick(now)
        samples = self.latency_samples
        hedge = self.config.hedge
        if samples is not None and hedge is not None and hedge.percentile:
            if len(samples) >= MIN_LATENCY_SAMPLES:
                ordered = sorted(samples)
                index = min(len(ordered) - 1, int(hedge.percentile * len(ordered)))
                self.hedge_delay = ordered[index]
            else:
                self.hedge_delay = 0.0  # too little history to know what "slow" is yet

    def set_health(self, instance: Instance, healthy: bool) -> None:
        if instance.healthy is healthy:
            return
        instance.healthy = healthy
        if instance.update_availability():
            self.balancer.refresh(time.monotonic())

    def state_counts(self) -> dict[str, int]:
        counts = {"healthy": 0, "unhealthy": 0, "ejected": 0}
        for instance in self.instances:
            if instance.ejected:
                counts["ejected"] += 1
            elif instance.healthy:
                counts["healthy"] += 1
            else:
                counts["unhealthy"] += 1
        return counts


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: GatewayConfig
    routes: RouteTable
    upstreams: dict[str, Upstream]
    trusted_proxies: TrustedProxies
    route_retry: dict[str, RetryPolicy | None]  # routes whose retry overrides the upstream's
    limiters: dict[str, RouteLimiter]  # routes with rate limits or max_in_flight
    # Routes with an idempotency section (Idempotency-Key replay store).
    idempotency: dict[str, RouteIdempotency] = field(default_factory=dict)
    # Routes with filters (gateway.filters): their compiled chains, keyed by route name.
    filters: dict[str, FilterChain] = field(default_factory=dict)
    # Upstreams with protocol h2c or h2: their instances have H2InstancePools, and HTTP/2
    # streams routed to them are exchanged natively (gateway/proxy/h2/forward.py).
    h2_upstreams: frozenset[str] = frozenset()

    def pools(self) -> list[ConnectionPool]:
        return [
            instance.pool for upstream in self.upstreams.values() for instance in upstream.instances
        ]


PoolKey = tuple[str, str, int, float, float, int, object, str, object]
_DEFAULT_HTTP2 = UpstreamHttp2Config()


def _pool_key(
    upstream: UpstreamConfig, instance: InstanceConfig, tls_key: object = None
) -> PoolKey:
    """Pools carry over while these are the same; ``tls_key`` is (TLS settings, digest of
    the TLS files' bytes): a new CA or client certificate means new connections."""
    timeouts = upstream.timeouts
    return (
        upstream.name,
        instance.host,
        instance.port,
        timeouts.connect,
        timeouts.idle,
        upstream.max_idle_connections,
        tls_key,
        upstream.protocol,  # an HTTP/1.1 pool never becomes an HTTP/2 one, nor back
        upstream.http2 or _DEFAULT_HTTP2,  # HTTP/2 pool settings: changed ones mean new pools
    )


def _upstream_tls(upstream: UpstreamConfig, config: GatewayConfig) -> UpstreamTLS:
    """``protocol: h2`` connections offer ALPN h2 (their own context and pool key)."""
    if upstream.protocol == "h2":
        return upstream_tls(upstream, config, alpn=H2_ALPN)
    return upstream_tls(upstream, config)


def _h2_pool_factory(settings: UpstreamHttp2Config | None) -> PoolFactory:
    """The factory of an h2c/h2 upstream's pools, with its ``http2`` settings applied."""
    # Imported on demand: a gateway without HTTP/2 upstreams never imports h2.
    from gateway.proxy.h2.client import h2_pool_factory

    return h2_pool_factory(settings or UpstreamHttp2Config())


def build_snapshot(
    config: GatewayConfig,
    previous: Snapshot | None = None,
    discovered: Mapping[str, Sequence[InstanceConfig]] | None = None,
    new_pool: PoolFactory | None = None,
) -> Snapshot:
    """Compile ``config`` into a snapshot.

    ``discovered`` maps upstream names to instance lists from a discovery backend; they replace
    the upstream's static ``instances``. Pools of (upstream, host, port) that exist in
    ``previous`` are carried over with their idle connections; new ones come from ``new_pool``
    (by default the factory the data plane registered, ``gateway.pools``).
    """
    if new_pool is None:
        new_pool = pool_factory()
    old_pools: dict[PoolKey, ConnectionPool] = {}
    if previous is not None:
        for old_upstream in previous.upstreams.values():
            old_tls = _upstream_tls(old_upstream.config, previous.config)
            for old_instance in old_upstream.instances:
                old_pools[_pool_key(old_upstream.config, old_instance.config, old_tls.key)] = (
                    old_instance.pool
                )
    upstreams: dict[str, Upstream] = {}
    h2_upstreams: set[str] = set()
    for name, upstream_config in config.upstreams.items():
        instances: list[Instance] = []
        instance_configs = upstream_config.instances
        if discovered is not None and name in discovered:
            instance_configs = tuple(discovered[name])
        tls = _upstream_tls(upstream_config, config)
        make_pool = new_pool
        if upstream_config.protocol != "http1":
            h2_upstreams.add(name)
            make_pool = _h2_pool_factory(upstream_config.http2)
        for instance_config in instance_configs:
            key = _pool_key(upstream_config, instance_config, tls.key)
            pool = old_pools.pop(key, None)
            if pool is None:
                pool = make_pool(
                    instance_config.host,
                    instance_config.port,
                    max_idle=upstream_config.max_idle_connections,
                    idle_timeout=upstream_config.timeouts.idle,
                    connect_timeout=upstream_config.timeouts.connect,
                    ssl_context=tls.context,
                    server_hostname=tls.server_hostname(instance_config.host),
                )
            instances.append(Instance(instance_config, pool))
        previous_upstream = previous.upstreams.get(name) if previous is not None else None
        if previous_upstream is not None:
            # Health state of instances that remain carries over.
            old_health = {i.address: i.healthy for i in previous_upstream.instances}
            for instance in instances:
                instance.healthy = old_health.get(instance.address, True)
                instance.update_availability()
        upstreams[name] = Upstream(upstream_config, instances, previous_upstream)
    # Pools of instances that disappeared: idle connections close now; busy ones finish first.
    for pool in old_pools.values():
        pool.close_all()
    return Snapshot(
        config=config,
        routes=RouteTable(config.routes),
        upstreams=upstreams,
        trusted_proxies=TrustedProxies(config.trusted_proxies),
        limiters=_limiters(config, previous),
        idempotency=idempotency_stores.for_config(config),
        route_retry={
            route.name: retry_policy(route.retry)
            for route in config.routes
            if route.retry is not None
        },
        filters=_filters(config, previous),
        h2_upstreams=frozenset(h2_upstreams),
    )


def _filters(config: GatewayConfig, previous: Snapshot | None) -> dict[str, FilterChain]:
    # Same config object (a discovery update): the same chains, caches and all.
    if previous is None:
        return dict(compile_filters(config))
    old = previous.filters
    if previous.config is config:
        return old
    return dict(
        compile_filters(config, {k: v for k, v in old.items() if isinstance(v, Chain)}, None)
    )


def describe_upstreams(snapshot: Snapshot, stale: Collection[str] = ()) -> list[dict[str, object]]:
    """The upstreams and their instances as /admin/upstreams shows them (JSON-able).

    ``stale`` names upstreams whose discovery backend is failing (last good set in use)."""
    now = time.monotonic()
    out: list[dict[str, object]] = []
    for upstream in snapshot.upstreams.values():
        outlier = upstream.outlier
        instances = []
        for instance in upstream.instances:
            info = outlier.info(instance.address) if outlier is not None else None
            ejected_for = max(0.0, info.ejected_until - now) if info and info.ejected_until else 0.0
            pool = instance.pool
            instances.append(
                {
                    "address": instance.address,
                    "weight": instance.weight,
                    "state": "ejected"
                    if instance.ejected
                    else ("healthy" if instance.healthy else "unhealthy"),
                    "available": instance.available,
                    "active_requests": instance.active_requests,
                    "recent_latency_seconds": round(instance.latency, 6)
                    if instance.latency
                    else None,
                    "connections": {"open": pool.open_count, "idle": len(pool.idle)},
                    "ejection": {
                        "times_ejected": info.times_ejected if info else 0,
                        "ejected_for_seconds": round(ejected_for, 3),
                        "consecutive_failures": info.consecutive_failures if info else 0,
                    },
                }
            )
        out.append(
            {
                "name": upstream.name,
                "balancer": upstream.config.balancer,
                "discovery": upstream.config.discovery,
                "stale": upstream.name in stale,
                "panic": upstream.balancer.panic,
                "retry": None
                if upstream.retry is None
                else {"attempts": upstream.retry.attempts, "on": list(upstream.retry.on)},
                "circuit_breaker": {
                    "requests": upstream.breaker.requests,
                    "max_requests": upstream.breaker.max_requests,
                },
                "instances": instances,
            }
        )
    return out


# One RedisStore per redis config (url, timeout, prefix, connections, share) per process, shared
# by snapshots: a reload that keeps the redis section keeps the connection.
_REDIS_STORES: dict[RedisConfig, RedisStore] = {}


def redis_store(config: RedisConfig, workers: int = 1) -> RedisStore:
    """``workers``: processes of this gateway, each holding its own leases."""
    store = _REDIS_STORES.get(config)
    if store is None:
        store = _REDIS_STORES[config] = RedisStore(
            config.url,
            timeout=config.timeout,
            prefix=config.prefix,
            max_connections=config.max_connections,
            fallback_share=config.fallback_share,
            lease_horizon=config.lease_horizon,
            lease_ttl=config.lease_ttl,
            lease_holders=workers,
        )
    return store


def redis_lease_counters() -> dict[str, int]:
    """The token-lease counts of this process's Redis stores (a ``GatewayMetrics.count_from``
    source; stores live until shutdown, so the sums never go back)."""
    stores = list(_REDIS_STORES.values())
    return {
        "ratelimit_lease_calls": sum(store.lease_calls for store in stores),
        "ratelimit_lease_tokens_granted": sum(store.leased for store in stores),
        "ratelimit_lease_tokens_returned": sum(store.lease_returned for store in stores),
    }


async def close_redis_stores() -> None:
    while _REDIS_STORES:
        _, store = _REDIS_STORES.popitem()
        await store.close()
    await idempotency_stores.close()


def _worker_count(workers: int | str) -> int:
    """Processes of this gateway (``auto``: one per core, as ``gateway.workers`` starts)."""
    if workers == "auto":
        return max(1, os.cpu_count() or 1)
    return int(workers)


def _limit_spec(limit: RateLimitConfig, owner: str | None, name: str | None) -> LimitSpec:
    return LimitSpec(
        count=limit.count,
        period=limit.period,
        burst=limit.burst,
        key=limit.key,
        store=limit.store,
        dry_run=limit.dry_run,
        missing=limit.missing,
        on_store_error=limit.on_store_error,
        name=limit.name or name,
        max_keys=limit.max_keys,
        owner=owner,
        lease=limit.lease,
    )


def _limiters(config: GatewayConfig, previous: Snapshot | None) -> dict[str, RouteLimiter]:
    """One RouteLimiter per route that has limits of its own, of its upstream or global ones.

    A request passes its route's limits, then its upstream's, then the global ones (default
    names ``limitN``, ``upstreamN``, ``globalN``). Upstream-level and global limits are owned by
    ``upstream:NAME`` / ``global``, so their buckets (and Redis keys) are the same whatever the
    route. In a worker of ``workers: N`` every local bucket lives in the shared-memory table.
    """
    limiters: dict[str, RouteLimiter] = {}
    trusted = TrustedProxies(config.trusted_proxies)
    stores = BucketStores(
        shared_buckets.installed(), previous.limiters.values() if previous is not None else ()
    )
    global_specs = [
        _limit_spec(limit, "global", f"global{i}") for i, limit in enumerate(config.rate_limit)
    ]
    upstream_specs = {
        name: [
            _limit_spec(limit, f"upstream:{name}", f"upstream{i}")
            for i, limit in enumerate(upstream.rate_limit)
        ]
        for name, upstream in config.upstreams.items()
        if upstream.rate_limit
    }
    for route in config.routes:
        specs = [_limit_spec(limit, None, None) for limit in route.rate_limit]
        specs += upstream_specs.get(route.upstream, ())
        specs += global_specs
        if not specs and not route.max_in_flight:
            continue
        uses_redis = any(spec.store == "redis" for spec in specs)
        limiters[route.name] = RouteLimiter(
            route.name,
            specs,
            trusted=trusted,
            headers=route.rate_limit_headers,
            legacy_headers=route.rate_limit_legacy_headers,
            max_in_flight=route.max_in_flight,
            redis=(
                redis_store(config.redis, _worker_count(config.workers))
                if uses_redis and config.redis is not None
                else None
            ),
            previous=previous.limiters.get(route.name) if previous is not None else None,
            stores=stores,
        )
    return limiters
