"""Process wiring: config -> control plane (discovery, health, admin, reload) -> data plane.

``workers: 1`` runs everything in this one process, exactly as before: the data plane is a
``ProxyServer`` in the same event loop (``LocalPlane``). ``workers: N`` (or ``auto``) makes this
process the supervisor: the data plane is N worker processes fed over pipes (``WorkerPlane``,
see ``gateway/workers.py``). The control plane (``ControlPlane``) is the same in both cases.

Signals: SIGHUP reloads; SIGTERM (or a first SIGINT) drains: stop accepting, let requests in
flight finish up to ``drain_timeout``, exit 0; SIGQUIT or a second SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway import ipc
from gateway.accesslog import AccessLog
from gateway.admin.app import AdminState, create_admin_app
from gateway.config import (
    ConfigError,
    ConfigInvalid,
    config_warnings,
    format_errors,
    load_config,
    load_config_text,
)
from gateway.config.model import GatewayConfig, InstanceConfig
from gateway.config.secrets import SCRUBBER
from gateway.discovery import DiscoveryManager, add_discovery_routes
from gateway.filters.chain import count_filter_errors
from gateway.filters.jwks import STORE as JWKS_STORE
from gateway.filters.jwks import JwksFetcher, JwksSettings, jwks_counters
from gateway.filters.otlp import span_counters, stop_exporters
from gateway.health.manager import HealthManager
from gateway.metrics import GatewayMetrics, make_registry
from gateway.proxy.server import ProxyServer
from gateway.ratelimit.shared import table_slots
from gateway.snapshot import (
    Snapshot,
    build_snapshot,
    close_redis_stores,
    describe_upstreams,
    redis_lease_counters,
)
from gateway.tls.certs import load_with_tls
from gateway.tls.metrics import CertificateExpiry
from gateway.workers import (
    WorkerPool,
    WorkerStartError,
    apply_ejections,
    encode_tls_files,
    worker_count,
)

log = logging.getLogger("gateway")

# Keys that only take effect when the process starts (sockets, process count, histogram shapes).
# ``listeners`` is compared by address and TLS-or-not only: TLS settings are reloaded.
RESTART_KEYS = ("listen", "admin", "workers", "metrics")


def _listener_sockets(config: GatewayConfig) -> list[tuple[str, tuple[str, int, bool]]]:
    return [(listener.name, listener.socket_key) for listener in config.all_listeners]


# watch: the file is checked this often, and read once it was the same on two checks in a row.
WATCH_INTERVAL = 1.0

Discovered = dict[str, tuple[InstanceConfig, ...]]


def read_config(path: str, *, reload: bool = False) -> tuple[GatewayConfig, str]:
    """Load and validate ``path``; also return its text, so workers parse the very same bytes.
    ``reload``: an expired listener certificate is refused (gateway.tls.certs)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        load_config(path)  # raises ConfigInvalid with the file-level error
        raise
    config = load_config_text(text, path, require_routes=True)
    # Certificates, keys and CAs are read and checked here, once (ConfigInvalid if unusable).
    config, _ = load_with_tls(config, text, refuse_expired=reload)
    return dataclasses.replace(config, sha256=hashlib.sha256(data).hexdigest()), text


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _file_sha256(path: str) -> str:
    return hashlib.sha256(_read_bytes(path)).hexdigest()


class ReloadStats:
    """``gateway_config_*`` metrics and the last reload's outcome (for /admin/config)."""

    def __init__(self, config: GatewayConfig) -> None:
        # refused: valid, but it would drop too many routes/upstreams (not forced).
        self.results = {"success": 0, "error": 0, "refused": 0}
        self.sha256 = config.sha256
        self.last_success = time.time()  # the running config was loaded at start
        self.last_error: dict[str, Any] | None = None
        self.restart_required: list[str] = []

    def success(self, sha256: str, restart_required: list[str]) -> None:
        self.results["success"] += 1
        self.sha256 = sha256
        self.last_success = time.time()
        self.last_error = None
        self.restart_required = restart_required

    def error(self, errors: list[str], trigger: str, result: str = "error") -> None:
        self.results[result] += 1
        self.last_error = {
            "time": time.time(),
            "trigger": trigger,
            "result": result,
            "errors": errors,
        }

    def status(self) -> dict[str, Any]:
        return {
            "running_sha256": self.sha256,
            "last_success_timestamp": self.last_success,
            "reloads": dict(self.results),
            "last_error": self.last_error,
            "restart_required": self.restart_required,
        }

    def describe(self) -> Iterator[Metric]:
        yield from self.collect()

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "gateway_config_reloads",
            "Config reloads by result (success: swapped in everywhere; error: invalid file, "
            "refused: it would drop too many routes or upstreams; the running config is "
            "unchanged after error and refused).",
            labels=["result"],
        )
        for result, count in self.results.items():
            reloads.add_metric([result], count)
        yield reloads
        info = GaugeMetricFamily(
            "gateway_config_hash",
            "SHA-256 of the running config file (the label; the value is always 1).",
            labels=["sha256"],
        )
        info.add_metric([self.sha256], 1)
        yield info
        yield GaugeMetricFamily(
            "gateway_config_last_reload_success_timestamp_seconds",
            "Unix time the running config was loaded (start or last successful reload).",
            value=self.last_success,
        )


# --------------------------------------------------------------------------- data planes


class DataPlane(Protocol):
    """All the control plane knows of the data plane: ``LocalPlane`` (in this process) or
    ``WorkerPlane`` (worker processes fed over pipes)."""

    @property
    def metrics(self) -> GatewayMetrics:
        """The request metrics (in a supervisor: the last merge of the workers')."""
        ...

    @property
    def registry(self) -> CollectorRegistry:
        """What /metrics renders."""
        ...

    def current(self) -> Snapshot:
        """The snapshot health checks probe and /admin/* describe."""
        ...

    def health_manager(self) -> HealthManager: ...

    def summary(self) -> str:
        """For the start-up log line: ``1 process`` or ``N workers``."""
        ...

    async def start(self, config: GatewayConfig, text: str, discovered: Discovered) -> None:
        """Build the first snapshot and start listening (``text``: the file ``config`` was
        parsed from)."""

    async def apply(self, config: GatewayConfig, text: str, discovered: Discovered) -> list[str]:
        """Swap a reloaded config in; the problems (empty: applied everywhere)."""
        ...

    def apply_discovered(self, discovered: Discovered) -> None:
        """Same config, new instance lists."""

    async def refresh_metrics(self) -> None:
        """Called before each scrape."""

    def describe_workers(self) -> list[dict[str, Any]] | None:
        """/admin/workers (None: a single process)."""
        ...

    def ready(self) -> bool: ...

    def ready_detail(self) -> dict[str, Any]: ...

    async def drain(self, grace_period: float) -> None:
        """Stop accepting; let requests in flight finish for up to ``grace_period`` s."""

    def kill_now(self) -> None: ...


class LocalPlane:
    """``workers: 1``: the data plane lives in this process and event loop."""

    def __init__(self, config: GatewayConfig) -> None:
        self.metrics = GatewayMetrics(bucket_overrides=dict(config.metrics.buckets))
        self.metrics.declare((route.name, route.upstream) for route in config.routes)
        count_filter_errors(self.metrics.filter_error)
        self.metrics.count_from(span_counters)
        self.metrics.count_from(redis_lease_counters)
        self.metrics.count_from(jwks_counters)
        self.registry = make_registry(self.metrics)
        self.server: ProxyServer | None = None

    def current(self) -> Snapshot:
        assert self.server is not None
        return self.server.snapshot

    def health_manager(self) -> HealthManager:
        return HealthManager(self.current)

    async def start(self, config: GatewayConfig, text: str, discovered: Discovered) -> None:
        server = ProxyServer(build_snapshot(config, None, discovered), self.metrics)
        if config.access_log is not None:
            server.access_log = AccessLog(config.access_log.path, config.access_log.sample)
        self.server = server
        await server.start(listeners=list(config.all_listeners))

    async def apply(self, config: GatewayConfig, text: str, discovered: Discovered) -> list[str]:
        assert self.server is not None
        self.server.apply_tls(config)  # new handshakes get the new certificates
        self.server.set_snapshot(build_snapshot(config, self.server.snapshot, discovered))
        self.metrics.declare((route.name, route.upstream) for route in config.routes)
        return []

    def apply_discovered(self, discovered: Discovered) -> None:
        server = self.server
        assert server is not None
        server.set_snapshot(build_snapshot(server.snapshot.config, server.snapshot, discovered))

    def summary(self) -> str:
        return "1 process"

    async def refresh_metrics(self) -> None:
        pass  # recorded in this process: always current

    def describe_workers(self) -> list[dict[str, Any]] | None:
        return None

    def ready(self) -> bool:
        return self.server is not None

    def ready_detail(self) -> dict[str, Any]:
        return {}

    async def drain(self, grace_period: float) -> None:
        if self.server is None:
            return
        await self.server.drain(grace_period)
        if self.server.access_log is not None:
            self.server.access_log.close()

    def kill_now(self) -> None:
        pass


class _NotifyingHealth(HealthManager):
    """Active checks in the supervisor: each transition is applied to the supervisor's own
    snapshot (the parent does that) and then pushed to every worker."""

    def __init__(self, plane: WorkerPlane) -> None:
        super().__init__(plane.current)
        self._plane = plane

    def _transition_handler(self, upstream_name: str) -> Any:
        apply = super()._transition_handler(upstream_name)

        def on_transition(target: Any, healthy: bool) -> None:
            apply(target, healthy)
            self._plane.health_changed(upstream_name, str(target), healthy)

        return on_transition


class _MergedCollector:
    """Renders the supervisor's latest sum of worker metrics (refreshed before each scrape)."""

    def __init__(self, plane: WorkerPlane) -> None:
        self._plane = plane

    def describe(self) -> Iterator[Metric]:
        yield from self._plane.metrics.collector().describe()

    def collect(self) -> Iterator[Metric]:
        yield from self._plane.metrics.families()
        yield CounterMetricFamily(
            "gateway_worker_restarts",
            "Worker processes that died and were started again.",
            value=self._plane.pool.restarts,
        )
        yield GaugeMetricFamily(
            "gateway_workers",
            "Worker processes running with a live snapshot.",
            value=self._plane.pool.ready_count(),
        )


class WorkerPlane:
    """``workers: N``: the data plane is N worker processes; this process supervises them."""

    def __init__(self, config: GatewayConfig, count: int) -> None:
        self.buckets = dict(config.metrics.buckets)
        self.metrics = GatewayMetrics(bucket_overrides=self.buckets)  # replaced at each scrape
        listeners = config.all_listeners
        self.pool = WorkerPool(
            count,
            listeners[0].address.host,
            listeners[0].address.port,
            log_level=logging.getLogger().level,
            shared_slots=table_slots(_local_keys(config)),
            extra_addresses=[(li.address.host, li.address.port) for li in listeners[1:]],
        )
        self.pool.on_eject = self._worker_ejected
        # jwks_url keys: fetched here once for every worker (gateway.filters.jwks). The
        # supervisor's own snapshot (health checks, /admin) reads them from the same fetcher.
        self.jwks = JwksFetcher(self._jwks_fetched)
        JWKS_STORE.install(self._ask_jwks)
        self.pool.on_jwks_refresh = self._worker_asks_jwks
        # Outlier ejections reported by workers and still running: (upstream, address) -> until.
        self.ejections: dict[tuple[str, str], float] = {}
        self._return_timer: asyncio.TimerHandle | None = None
        # The supervisor's own snapshot: what health checks probe and /admin/* describe. Its
        # pools never open a connection (no requests go through the supervisor).
        self.snapshot: Snapshot | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_MergedCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def current(self) -> Snapshot:
        assert self.snapshot is not None
        return self.snapshot

    def health_manager(self) -> HealthManager:
        return _NotifyingHealth(self)

    def _unhealthy(self) -> ipc.Unhealthy:
        return [
            (upstream.name, instance.address)
            for upstream in self.current().upstreams.values()
            for instance in upstream.instances
            if not instance.healthy
        ]

    def _ejected(self) -> ipc.Ejected:
        now = time.monotonic()
        for key in [key for key, until in self.ejections.items() if until <= now]:
            del self.ejections[key]
        return [(upstream, address, until) for (upstream, address), until in self.ejections.items()]

    def _instance_state(self, discovered: Discovered) -> ipc.InstanceState:
        return {
            "discovered": ipc.discovered_rows(discovered),
            "unhealthy": self._unhealthy(),
            "ejected": self._ejected(),
        }

    def _message(
        self, config: GatewayConfig, text: str, discovered: Discovered
    ) -> ipc.ConfigPayload:
        return {
            "source": config.source,
            "text": text,
            "sha256": config.sha256,
            "references": config.references,
            "tls": encode_tls_files(config.tls_files),
            **self._instance_state(discovered),
        }

    def _rebuild(self, config: GatewayConfig, discovered: Discovered) -> None:
        self.snapshot = build_snapshot(config, self.snapshot, discovered)
        apply_ejections(self.snapshot, self._ejected())

    def _jwks_fetched(self, url: str, jwks: dict[str, Any] | None, fetched_at: float) -> None:
        JWKS_STORE.update(url, jwks, fetched_at)
        self.pool.broadcast(ipc.jwks_message(url, jwks, fetched_at))

    def _ask_jwks(self, url: str, settings: JwksSettings, unknown_kid: bool) -> None:
        self.jwks.request(url, settings, unknown_kid=unknown_kid, reply=JWKS_STORE.update)

    def _worker_asks_jwks(
        self, message: ipc.JwksRefreshMessage, answer: Callable[[str, Any, float], None]
    ) -> None:
        settings = JwksSettings(message["min_refresh"], message["cache_ttl"], message["timeout"])
        self.jwks.request(
            message["url"], settings, unknown_kid=message["unknown_kid"], reply=answer
        )

    def _worker_ejected(self, message: ipc.EjectMessage) -> None:
        """A worker's outlier detection ejected an instance: show it in /admin/upstreams and
        make every worker eject it too, unless that would put more than max_ejection_percent
        of the upstream out across the gateway (then only the reporting worker has it out)."""
        upstream_name, address, until = message["upstream"], message["address"], message["until"]
        now = time.monotonic()
        upstream = self.current().upstreams.get(upstream_name)
        if upstream is None or not upstream.apply_ejection(address, until, now):
            return
        self.ejections[(upstream_name, address)] = until
        self.pool.eject(upstream_name, address, until, self._ejected())
        self._schedule_return()

    def _schedule_return(self) -> None:
        """The supervisor serves no requests, so nothing else ticks its snapshot: return
        ejected instances to service in /admin/upstreams when their time is up."""
        if self._return_timer is not None:
            self._return_timer.cancel()
            self._return_timer = None
        pending = [until for until in self.ejections.values()]
        if not pending:
            return
        delay = max(0.0, min(pending) - time.monotonic()) + 0.01

        def tick() -> None:
            self._return_timer = None
            now = time.monotonic()
            for upstream in self.current().upstreams.values():
                upstream.tick(now)
            self._ejected()  # forget the finished ones
            self._schedule_return()

        self._return_timer = asyncio.get_running_loop().call_later(delay, tick)

    async def start(self, config: GatewayConfig, text: str, discovered: Discovered) -> None:
        self.snapshot = build_snapshot(config, None, discovered)
        self.pool.current = self._message(config, text, discovered)
        await self.pool.start()

    async def apply(self, config: GatewayConfig, text: str, discovered: Discovered) -> list[str]:
        self._rebuild(config, discovered)
        return await self.pool.apply_config(self._message(config, text, discovered))

    def apply_discovered(self, discovered: Discovered) -> None:
        self._rebuild(self.current().config, discovered)
        self.pool.update_instances(self._instance_state(discovered))

    def health_changed(self, upstream: str, address: str, healthy: bool) -> None:
        self.pool.health(upstream, address, healthy, self._unhealthy())

    async def refresh_metrics(self) -> None:
        merged = GatewayMetrics(bucket_overrides=self.buckets)
        merged.declare((route.name, route.upstream) for route in self.current().config.routes)
        for state in await self.pool.gather_metrics():
            try:
                merged.merge_state(state)
            except ValueError as error:
                log.warning("worker metrics not merged: %s", error)
        merged.count_from(jwks_counters)  # fetched here, for every worker
        self.metrics = merged

    def describe_workers(self) -> list[dict[str, Any]] | None:
        return self.pool.describe()

    def summary(self) -> str:
        return f"{self.pool.count} workers"

    def ready(self) -> bool:
        return self.pool.ready_count() > 0

    def ready_detail(self) -> dict[str, Any]:
        return {"workers": {"ready": self.pool.ready_count(), "total": self.pool.count}}

    async def drain(self, grace_period: float) -> None:
        if self._return_timer is not None:
            self._return_timer.cancel()
        await self.pool.stop(grace_period)

    def kill_now(self) -> None:
        self.pool.kill_now()


def drop_problems(old: GatewayConfig, new: GatewayConfig) -> list[ConfigError]:
    """Why ``new`` removes too many of ``old``'s routes or upstreams (the running config's
    ``reload.refuse_drop_ratio`` applies: a truncated file cannot lift its own check)."""
    ratio = old.reload.refuse_drop_ratio
    problems = []
    for key, before, after in (
        ("routes", len(old.routes), len(new.routes)),
        ("upstreams", len(old.upstreams), len(new.upstreams)),
    ):
        dropped = before - after
        if before == 0 or dropped <= 0 or dropped / before < ratio:
            continue
        problems.append(
            ConfigError(
                new.source,
                new.key_lines.get(key),
                key,
                f"refusing a reload that removes {dropped} of the {before} running {key}"
                f" ({dropped / before:.0%}; reload.refuse_drop_ratio is {ratio:.0%}): if that"
                " is intended, apply it with `gateway reload --force` or"
                " POST /admin/reload?force=1",
            )
        )
    return problems


def _local_keys(config: GatewayConfig) -> int:
    """Keys the shared rate-limit table should hold: the sum of ``max_keys`` of every limit
    (Redis ones too: their fallback buckets live there). Fixed at start; limits added by a
    reload share the same table (a full probe window evicts the bucket closest to idle)."""
    limits = [*config.rate_limit]
    for upstream in config.upstreams.values():
        limits += upstream.rate_limit
    for route in config.routes:
        limits += route.rate_limit
    return sum(limit.max_keys for limit in limits)


# --------------------------------------------------------------------------- control plane


class ControlPlane:
    def __init__(
        self, config: GatewayConfig, text: str, config_path: str, plane: DataPlane
    ) -> None:
        self.config = config
        self.text = text
        self.config_path = config_path
        self.plane = plane
        self.stats = ReloadStats(config)
        self.discovery = DiscoveryManager(config)
        self.health = plane.health_manager()
        self.state = AdminState(
            config=config,
            metrics=plane.metrics,
            registry=plane.registry,
            routes_describe=lambda: plane.current().routes.describe(),
            upstreams_describe=lambda: describe_upstreams(
                plane.current(), self.discovery.stale_upstreams()
            ),
            reload=self.reload,
            reload_status=self.stats.status,
            refresh_metrics=plane.refresh_metrics,
            workers_describe=plane.describe_workers,
        )
        self.expiry = CertificateExpiry(config)
        self._reload_lock = asyncio.Lock()
        self._failed_sha256: str | None = None  # a bad file seen by the watcher: not retried
        self._background: set[asyncio.Task[Any]] = set()

    def in_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(
        self, trigger: str = "SIGHUP", force: bool = False, *, expected_sha256: str | None = None
    ) -> dict[str, Any]:
        """Re-read the config file; swap it in everywhere if it is valid (and, unless
        ``force``, does not drop too many routes or upstreams), else change nothing.
        ``expected_sha256`` (the watcher): skip quietly if the file changed again meanwhile."""
        async with self._reload_lock:
            path = self.config_path
            try:
                new_config, text = read_config(path, reload=True)
            except ConfigInvalid as invalid:
                return self._rejected(invalid.errors, trigger)
            except OSError as error:
                return self._rejected([ConfigError(path, None, "", str(error))], trigger)
            if expected_sha256 is not None and new_config.sha256 != expected_sha256:
                return {"result": "changed", "sha256": new_config.sha256}
            old = self.config
            if not force:
                drops = drop_problems(old, new_config)
                if drops:
                    return self._rejected(drops, trigger, result="refused")
            restart = [key for key in RESTART_KEYS if getattr(new_config, key) != getattr(old, key)]
            if _listener_sockets(new_config) != _listener_sockets(old) and "listen" not in restart:
                restart.append("listen")
            if "listen" in restart:
                restart.append("listeners")
            elif new_config.listeners != old.listeners:
                # Same sockets, new TLS settings or certificates: applied to new handshakes.
                pass
            if restart:
                log.warning(
                    "%s: %s changed: takes effect after a restart; running with the old value",
                    path,
                    ", ".join(restart),
                )
                new_config = dataclasses.replace(
                    new_config,
                    **{key: getattr(old, key) for key in restart},
                    # The running listeners' certificates stay loadable.
                    tls_files={**old.tls_files, **new_config.tls_files},
                )
            discovered = self.discovery.instances(new_config)
            try:
                problems = await self.plane.apply(new_config, text, discovered)
            except (OSError, ValueError, KeyError) as error:  # e.g. a certificate that won't load
                return self._rejected([ConfigError(path, None, "listen", str(error))], trigger)
            self.expiry.update(new_config)
            for warning in new_config.tls_warnings:
                log.warning("%s", warning)
            self.config = self.state.config = new_config
            self.text = text
            SCRUBBER.set_secrets(new_config.secrets)
            self._failed_sha256 = None
            self.in_background(self.discovery.reconfigure(new_config))
            await self.health.update(self.plane.current())
            if problems:  # a worker died or did not answer; it restarts with the new config
                log.error("config swap incomplete: %s", "; ".join(problems))
            self.stats.success(new_config.sha256, restart)
            log.info(
                "config reloaded (%s%s), %d routes, sha256 %s",
                trigger,
                ", forced" if force else "",
                len(new_config.routes),
                new_config.sha256[:12],
            )
            return {
                "result": "success",
                "sha256": new_config.sha256,
                "routes": len(new_config.routes),
                "restart_required": restart,
                "problems": problems,
            }

    def _rejected(
        self, errors: list[ConfigError], trigger: str, result: str = "error"
    ) -> dict[str, Any]:
        log.error(
            "reload (%s) %s, running config unchanged:\n%s",
            trigger,
            "refused" if result == "refused" else "rejected",
            format_errors(errors),
        )
        messages = [str(error) for error in errors]
        self.stats.error(messages, trigger, result)
        return {"result": result, "errors": messages}

    async def watch(self) -> None:
        """``watch: true``: check the file every second; reload once a new content has been
        the same (stat and SHA-256) on two checks in a row, so that a file still being written
        (a half-written YAML may well be valid) is never applied."""
        path = self.config_path
        last_signature: tuple[int, int, int] | None = None
        pending: tuple[tuple[int, int, int], str] | None = None  # seen once, not yet settled
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if not self.config.watch:
                last_signature = pending = None
                continue
            try:
                st = os.stat(path)
                signature = (st.st_mtime_ns, st.st_size, st.st_ino)
                if signature == last_signature and pending is None:
                    continue
                last_signature = signature
                digest = _file_sha256(path)
            except OSError:
                pending = None
                continue  # mid-rename or deleted: look again next second
            if digest in (self.stats.sha256, self._failed_sha256):
                pending = None
                continue
            observed = (signature, digest)
            if observed != pending:
                log.info("config file changed (sha256 %s): waiting for it to settle", digest[:12])
                pending = observed
                continue
            pending = None
            result = await self.reload("file change", expected_sha256=digest)
            if result["result"] in ("error", "refused"):
                self._failed_sha256 = digest

    async def watch_tls_files(self) -> None:
        """``watch: true`` also follows the certificate, key and CA files: a rotation tool
        replaces them, and once their bytes differ from what the running config serves and
        were the same (stat) on two checks in a row, they are reloaded. A rejected set is not
        retried until it changes again."""
        unchanged: object = None  # stat signature whose contents equal the running files
        pending: object = None
        failed: object = None
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            running = self.config.tls_files
            if not self.config.watch or not running:
                unchanged = pending = None
                continue
            try:
                stats = [(path, os.stat(path)) for path in sorted(running)]
                signature = tuple((p, s.st_mtime_ns, s.st_size, s.st_ino) for p, s in stats)
                if signature in (unchanged, failed):
                    continue
                if all(_read_bytes(path) == data for path, data in running.items()):
                    unchanged, pending = signature, None
                    continue
            except OSError:
                pending = None
                continue  # mid-rename: look again next second
            if signature != pending:
                log.info("TLS files changed: waiting for them to settle")
                pending = signature
                continue
            pending = None
            result = await self.reload("certificate change")
            if result["result"] in ("error", "refused"):
                failed = signature

    async def run(self, *, with_demo: bool = False) -> int:
        loop = asyncio.get_running_loop()
        config = self.config
        SCRUBBER.set_secrets(config.secrets)  # log lines from here on leave without them
        discovery = self.discovery
        registry = self.plane.registry
        registry.register(discovery.collector())
        registry.register(self.stats)
        registry.register(self.expiry)
        registry.register(self.health.collector())
        # Discovery first, so that the first snapshot already holds discovered instances.
        await discovery.start()

        demo_runners: list[web.AppRunner] = []
        if with_demo:
            from gateway.demo import start_demo

            demo = config.upstreams.get("demo")
            if demo is None:
                log.error("--with-demo needs an upstream named 'demo' in %s", self.config_path)
                await discovery.stop()
                return 1
            demo_runners = await start_demo([instance.port for instance in demo.instances])
            log.info("demo service on %s", ", ".join(i.address for i in demo.instances))

        def apply_discovery() -> None:
            # Same config, new instance lists; pools of kept instances survive.
            self.plane.apply_discovered(discovery.instances())
            self.in_background(self.health.update(self.plane.current()))

        discovery.on_change = apply_discovery

        def ready_detail() -> dict[str, Any]:
            return {"stale_upstreams": discovery.stale_upstreams(), **self.plane.ready_detail()}

        self.state.ready_detail = ready_detail
        self.state.ready_check = self.plane.ready
        admin_app = create_admin_app(self.state)
        add_discovery_routes(admin_app, discovery)
        admin_runner = web.AppRunner(admin_app, access_log=None)
        await admin_runner.setup()
        try:
            await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
            await self.plane.start(config, self.text, discovery.instances())
        except (OSError, WorkerStartError) as error:
            log.error("cannot listen: %s", error)
            await admin_runner.cleanup()
            await discovery.stop()
            return 1
        await self.health.update(self.plane.current())
        self.state.ready = True
        for warning in config_warnings(config):
            log.warning("%s", warning)
        for warning in config.tls_warnings:
            log.warning("%s", warning)
        log.info(
            "gateway listening on %s (admin %s, %s), %d routes, config %s sha256 %s",
            ", ".join(f"{li.address}{' (tls)' if li.tls else ''}" for li in config.all_listeners),
            config.admin,
            self.plane.summary(),
            len(config.routes),
            self.config_path,
            config.sha256[:12],
        )

        stop = asyncio.Event()

        def exit_now(code: int) -> None:
            log.warning("exiting now (in-flight requests are dropped)")
            self.plane.kill_now()
            os._exit(code)

        def on_sigint() -> None:
            if stop.is_set():
                exit_now(130)
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGQUIT, exit_now, 128 + signal.SIGQUIT)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.in_background(self.reload("SIGHUP")))
        self.in_background(self.watch())
        self.in_background(self.watch_tls_files())

        await stop.wait()
        drain_timeout = self.config.drain_timeout
        log.info("shutting down: draining for up to %.1fs", drain_timeout)
        self.state.draining = True
        await self.plane.drain(drain_timeout)
        await stop_exporters()  # the tracing filter's last spans (workers: 1)
        await JWKS_STORE.stop()  # a JWKS fetch in flight (workers: 1)
        jwks = getattr(self.plane, "jwks", None)
        if isinstance(jwks, JwksFetcher):
            await jwks.stop()
        for task in list(self._background):
            task.cancel()
        await self.health.stop()
        await discovery.stop()
        await close_redis_stores()
        await admin_runner.cleanup()
        for runner in demo_runners:
            await runner.cleanup()
        log.info("stopped")
        return 0


async def serve(config: GatewayConfig, config_path: str, *, with_demo: bool = False) -> int:
    # Workers get the file's text: make sure it is the text `config` was parsed from.
    try:
        data = _read_bytes(config_path)
        if hashlib.sha256(data).hexdigest() == config.sha256:
            text = data.decode("utf-8-sig")
        else:  # changed since the CLI read it: validate the new one
            config, text = read_config(config_path)
    except (ConfigInvalid, OSError, UnicodeDecodeError) as error:
        log.error("cannot read %s again at start: %s", config_path, error)
        return 1
    count = worker_count(config.workers)
    plane: DataPlane = LocalPlane(config) if count == 1 else WorkerPlane(config, count)
    return await ControlPlane(config, text, config_path, plane).run(with_demo=with_demo)
