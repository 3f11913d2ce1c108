"""The control-plane side of discovery: backends in, per-upstream instance lists out.

``DiscoveryManager`` builds one backend per ``discovery:`` entry (plus the embedded registry),
asks it to watch one ``ServiceQuery`` per distinct (service, filters) used by upstreams, and is
the ``Sink`` the backends report to. It applies the rules that make discovery safe:

- a failure never changes an upstream's instances; the last good set stays and is marked stale;
- an empty answer from a healthy backend is ignored (and logged) unless ``allow_empty``;
- any accepted change calls ``on_change`` once per event-loop tick, where the caller rebuilds
  the data-plane snapshot from ``instances()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.config.model import DiscoveryConfig, GatewayConfig, InstanceConfig, UpstreamConfig
from gateway.config.validate import EMBEDDED_REGISTRY
from gateway.discovery.base import Backend, DiscoveredInstance, ServiceQuery
from gateway.discovery.journal import default_state_dir
from gateway.discovery.registry import (
    BadRequest,
    EmbeddedStore,
    RegistrationStore,
    Registry,
    RegistryBackend,
)

__all__ = ["DiscoveryManager", "query_of", "registry_state_file", "state_dir_of"]

log = logging.getLogger("gateway.discovery")


def state_dir_of(config: GatewayConfig) -> Path | None:
    """``state_dir`` resolved (relative: to the config file's directory); the per-user
    default when not set; None for a config given as text with no state_dir (in memory)."""
    from_file = config.source != "<string>"
    if config.state_dir is not None:
        directory = Path(config.state_dir).expanduser()
        if not directory.is_absolute() and from_file:
            directory = Path(config.source).resolve().parent / directory
        return directory
    return default_state_dir() if from_file else None


def registry_state_file(config: GatewayConfig, backend: DiscoveryConfig) -> Path | None:
    """Where a registry backend keeps its state: ``state_file`` (relative: to the state
    directory), else ``STATE_DIR/registry-NAME.json``, one file per backend."""
    directory = state_dir_of(config)
    if backend.state_file is not None:
        path = Path(backend.state_file).expanduser()
        if path.is_absolute() or directory is None:
            return path
        return directory / path
    return None if directory is None else directory / f"registry-{backend.name}.json"


def query_of(upstream: UpstreamConfig, backend: DiscoveryConfig) -> ServiceQuery:
    """The query an upstream needs; upstreams with equal queries share one watch."""
    assert upstream.service is not None
    if backend.type == "dns":
        return ServiceQuery(upstream.service)
    return ServiceQuery(
        upstream.service,
        tuple(sorted(upstream.tags)),
        upstream.datacenter or (backend.datacenter if backend.type == "consul" else None),
        upstream.passing_only if backend.type == "consul" else True,
    )


@dataclass
class _QueryState:
    instances: tuple[DiscoveredInstance, ...] | None = None  # None: no answer yet
    stale: bool = False
    last_error: str | None = None
    last_update: float | None = None  # wall clock of the last accepted answer
    empty_ignored: bool = False


@dataclass
class _BackendStats:
    type: str
    errors: int = 0
    updates: int = 0
    last_success: float | None = None
    last_error: str | None = None
    queries: set[ServiceQuery] = field(default_factory=set)


def _embedded_config() -> DiscoveryConfig:
    return DiscoveryConfig(name=EMBEDDED_REGISTRY, type="registry")


# How long after start an upstream's discovered service may stay without any instance before
# the gateway warns that it probably does not exist.
MISSING_SERVICE_GRACE = 30.0


class DiscoveryManager:
    def __init__(
        self,
        config: GatewayConfig,
        on_change: Callable[[], None] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        missing_grace: float = MISSING_SERVICE_GRACE,
    ) -> None:
        self.on_change = on_change
        self.missing_grace = missing_grace
        self._missing_check: asyncio.TimerHandle | None = None
        self.clock = clock
        self.config = config
        self.backends: dict[str, Backend] = {}
        self.registries: dict[str, Registry] = {}
        self._states: dict[tuple[str, ServiceQuery], _QueryState] = {}
        self._stats: dict[str, _BackendStats] = {}
        self._change_pending = False
        self._last_apply_end = 0.0  # loop time when the last change was applied
        self._last_apply_seconds = 0.0  # and how long applying it took
        self._first_answers: asyncio.Event | None = None
        self._setup(config)

    # -- construction ------------------------------------------------------------------------

    def _backend_configs(self, config: GatewayConfig) -> dict[str, DiscoveryConfig]:
        configs = dict(config.discovery)
        # The embedded registry stands in only while no `type: registry` backend is declared.
        if not any(c.type == "registry" for c in configs.values()):
            configs.setdefault(EMBEDDED_REGISTRY, _embedded_config())
        return configs

    def _setup(self, config: GatewayConfig) -> None:
        self.config = config
        configs = self._backend_configs(config)
        base = Path(config.source).resolve().parent if config.source != "<string>" else None
        for name, backend_config in configs.items():
            self.backends[name] = self._make_backend(backend_config, base)
            stats = self._stats.get(name)
            if stats is None or stats.type != backend_config.type:
                self._stats[name] = _BackendStats(backend_config.type)
            self._stats[name].queries = set()
        for upstream in config.upstreams.values():
            if upstream.discovery is None:
                continue
            backend_config = configs[upstream.discovery]
            query = query_of(upstream, backend_config)
            self.backends[upstream.discovery].watch(query)
            self._stats[upstream.discovery].queries.add(query)
        # Forget the states of watches that no longer exist.
        wanted = {(n, q) for n, b in self.backends.items() for q in b.queries}
        self._states = {k: v for k, v in self._states.items() if k in wanted}

    def _make_backend(self, config: DiscoveryConfig, base: Path | None) -> Backend:
        if config.type == "registry":
            registry = self.registries.get(config.name)
            if registry is None:
                state_file = registry_state_file(self.config, config)
                registry = Registry(state_file, config.default_ttl, self.clock)
                registry.load()
                self.registries[config.name] = registry
            return RegistryBackend(config.name, self, registry)
        if config.type == "dns":
            from gateway.discovery.dns import DnsBackend

            return DnsBackend(config, self)
        if config.type == "consul":
            from gateway.discovery.consul import ConsulBackend

            return ConsulBackend(config, self)
        if config.type == "kubernetes":
            from gateway.discovery.kubernetes import KubernetesBackend

            return KubernetesBackend(config, self, base)
        if config.type == "etcd":
            from gateway.discovery.etcd import EtcdBackend

            return EtcdBackend(config, self)
        if config.type == "zookeeper":
            from gateway.discovery.zookeeper import ZooKeeperBackend

            return ZooKeeperBackend(config, self)
        if config.type == "eureka":
            from gateway.discovery.eureka import EurekaBackend

            return EurekaBackend(config, self)
        raise ValueError(f"unsupported discovery type {config.type!r}")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, initial_wait: float = 2.0) -> None:
        """Start every backend, then wait up to ``initial_wait`` for each watch's first answer
        (so the first snapshot already has instances; slow backends fill in later)."""
        self._first_answers = asyncio.Event()
        for name, backend in self.backends.items():
            try:
                await backend.start()
            except Exception as exc:  # a broken backend must not stop the gateway
                log.exception("discovery backend %s failed to start", name)
                self.failure(name, None, exc)
        self._check_first_answers()
        if self._missing_check is not None:
            self._missing_check.cancel()
        self._missing_check = asyncio.get_running_loop().call_later(
            self.missing_grace, self.warn_missing_services
        )
        if initial_wait > 0:
            try:
                await asyncio.wait_for(self._first_answers.wait(), initial_wait)
            except TimeoutError:
                waiting = [f"{n}: {q}" for (n, q), s in self._all_states() if s.instances is None]
                log.warning("discovery: no answer yet for %s", ", ".join(waiting))

    def warn_missing_services(self) -> list[str]:
        """Log (and return) one warning per discovery-backed upstream whose service has had no
        instance since start: almost always a misspelt service name or the wrong backend, which
        otherwise only shows as every request getting 503."""
        self._missing_check = None
        warnings = []
        for name, upstream in self.config.upstreams.items():
            found = self._upstream_state(upstream)
            if found is None or found[1].instances:
                continue
            backend, state = found
            why = f" (last error: {state.last_error})" if state.last_error else ""
            message = (
                f"discovery {backend}: upstream {name!r}: service {upstream.service!r} has no"
                f" instance {self.missing_grace:g}s after start{why}; every request to it gets"
                " 503. Check the service name and the backend."
            )
            log.warning("%s", message)
            warnings.append(message)
        return warnings

    async def stop(self) -> None:
        if self._missing_check is not None:
            self._missing_check.cancel()
            self._missing_check = None
        for backend in self.backends.values():
            try:
                await backend.stop()
            except Exception:
                log.exception("discovery backend %s failed to stop", backend.name)

    async def reconfigure(self, config: GatewayConfig) -> None:
        """Apply a reloaded config: restart backends, keeping the last good sets."""
        await self.stop()
        self.backends = {}
        # Registries whose settings changed are reopened from their (persisted) state.
        old = self._backend_configs(self.config)
        new = self._backend_configs(config)
        for name in list(self.registries):
            moved = name in new and registry_state_file(self.config, old[name]) != (
                registry_state_file(config, new[name])
            )
            if old.get(name) != new.get(name) or moved:
                self.registries.pop(name).close()  # stop() flushed it; releases the lock
        self._setup(config)
        await self.start(initial_wait=0)
        self._schedule_change()

    def _all_states(self) -> Iterator[tuple[tuple[str, ServiceQuery], _QueryState]]:
        for name, backend in self.backends.items():
            for query in backend.queries:
                yield (name, query), self._states.setdefault((name, query), _QueryState())

    def _check_first_answers(self) -> None:
        if self._first_answers is None or self._first_answers.is_set():
            return
        if all(s.instances is not None or s.stale for _, s in self._all_states()):
            self._first_answers.set()

    # -- the Sink ----------------------------------------------------------------------------

    def update(
        self, backend: str, query: ServiceQuery, instances: tuple[DiscoveredInstance, ...]
    ) -> None:
        stats = self._stats[backend]
        stats.last_success = self.clock()
        stats.last_error = None
        state = self._states.setdefault((backend, query), _QueryState())
        allow_empty = self._backend_configs(self.config)[backend].allow_empty
        state.stale = False
        state.last_error = None
        if not instances and not allow_empty and state.instances:
            if not state.empty_ignored:
                log.warning(
                    "discovery %s: empty answer for %s ignored, keeping %d instances"
                    " (allow_empty: false)",
                    backend,
                    query,
                    len(state.instances),
                )
            state.empty_ignored = True
            return
        state.empty_ignored = False
        ordered = tuple(sorted(set(instances), key=lambda i: (i.host, i.port, i.id)))
        if ordered != state.instances:
            old = {i.address for i in state.instances or ()}
            new = {i.address for i in ordered}
            state.instances = ordered
            state.last_update = self.clock()
            stats.updates += 1
            log.info(
                "discovery %s: %s now %d instances (+%s -%s)",
                backend,
                query,
                len(ordered),
                ",".join(sorted(new - old)) or "0",
                ",".join(sorted(old - new)) or "0",
            )
            self._schedule_change()
        self._check_first_answers()

    def failure(self, backend: str, query: ServiceQuery | None, error: BaseException) -> None:
        stats = self._stats[backend]
        stats.errors += 1
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        stats.last_error = message
        queries = [query] if query is not None else list(self.backends[backend].queries)
        for item in queries:
            state = self._states.setdefault((backend, item), _QueryState())
            if not state.stale:
                log.warning(
                    "discovery %s: %s failed (%s); keeping the last %s instances",
                    backend,
                    item,
                    message,
                    "known" if state.instances is None else len(state.instances),
                )
            state.stale = True
            state.last_error = message
        self._check_first_answers()

    def _schedule_change(self) -> None:
        if self._change_pending or self.on_change is None:
            return
        self._change_pending = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._fire_change()
            return
        # Applying a change rebuilds the snapshot, O(instances). Under a stream of changes
        # (a burst of registrations into a big service) wait for the next rebuild until
        # twice as long as the last rebuild took, so that rebuilding takes at most a third of the
        # loop's time.
        wait = self._last_apply_end + 2 * self._last_apply_seconds - loop.time()
        if wait > 0.001:
            loop.call_later(wait, self._fire_change)
        else:
            loop.call_soon(self._fire_change)

    def _fire_change(self) -> None:
        self._change_pending = False
        if self.on_change is not None:
            started = time.perf_counter()
            try:
                self.on_change()
            except Exception:
                log.exception("discovery: applying an instance change failed")
            self._last_apply_seconds = time.perf_counter() - started
            with contextlib.suppress(RuntimeError):
                self._last_apply_end = asyncio.get_running_loop().time()

    # -- views -------------------------------------------------------------------------------

    def _upstream_state(
        self, upstream: UpstreamConfig, config: GatewayConfig | None = None
    ) -> tuple[str, _QueryState] | None:
        if upstream.discovery is None:
            return None
        backend_config = self._backend_configs(config or self.config).get(upstream.discovery)
        if backend_config is None:
            return None
        key = (upstream.discovery, query_of(upstream, backend_config))
        state = self._states.get(key)
        if state is None:  # not watched (yet): an empty view, not remembered
            state = (
                _QueryState() if config is not None else self._states.setdefault(key, _QueryState())
            )
        return upstream.discovery, state

    def instances(
        self, config: GatewayConfig | None = None
    ) -> dict[str, tuple[InstanceConfig, ...]]:
        """Instance lists of every discovery-backed upstream (empty until first answered).

        ``config``: compute for another config's upstreams (a reload in progress), using the
        sets watched now; upstreams whose query is not watched yet get an empty list.
        """
        out: dict[str, tuple[InstanceConfig, ...]] = {}
        for name, upstream in (config or self.config).upstreams.items():
            found = self._upstream_state(upstream, config)
            if found is None:
                continue
            seen: dict[tuple[str, int], InstanceConfig] = {}
            for instance in found[1].instances or ():
                key = (instance.host, instance.port)
                if key not in seen:
                    seen[key] = InstanceConfig(instance.host, instance.port, instance.weight)
            out[name] = tuple(seen.values())
        return out

    def default_registry(self) -> str | None:
        """The backend behind the registration API unless a call names one: ``admin.registry``,
        else the only ``type: registry`` backend (the config check rejects several without
        ``admin.registry``)."""
        if self.config.admin_registry is not None:
            return self.config.admin_registry
        names = [n for n, b in self.backends.items() if isinstance(b, RegistryBackend)]
        if len(names) == 1:
            return names[0]
        return EMBEDDED_REGISTRY if EMBEDDED_REGISTRY in self.backends else None

    def registration_store(self, name: str | None = None) -> RegistrationStore:
        """The store of backend ``name`` (default: ``default_registry()``); ``BadRequest``
        (field ``registry``) if it does not exist or cannot take registrations."""
        chosen = name or self.default_registry()
        backend = self.backends.get(chosen) if chosen is not None else None
        if backend is None:
            known = sorted(
                n
                for n, b in self.backends.items()
                if isinstance(b, RegistryBackend) or hasattr(b, "registration_store")
            )
            raise BadRequest(
                "registry",
                f"no discovery backend {chosen!r} (registries: {', '.join(known) or 'none'})",
            )
        if isinstance(backend, RegistryBackend):
            return EmbeddedStore(backend.registry)
        store = getattr(backend, "registration_store", None)
        if store is None:
            raise BadRequest(
                "registry",
                f"discovery backend {chosen!r} ({backend.type}) cannot take registrations",
            )
        result: RegistrationStore = store()
        return result

    def stale_upstreams(self) -> list[str]:
        return [
            name
            for name, upstream in self.config.upstreams.items()
            if (found := self._upstream_state(upstream)) is not None and found[1].stale
        ]

    def status(self) -> dict[str, Any]:
        """What ``/admin/discovery`` shows: per upstream and per backend."""
        upstreams: dict[str, Any] = {}
        for name, upstream in self.config.upstreams.items():
            found = self._upstream_state(upstream)
            if found is None:
                continue
            backend, state = found
            upstreams[name] = {
                "backend": backend,
                "service": upstream.service,
                "stale": state.stale,
                "answered": state.instances is not None,
                "last_error": state.last_error,
                "last_update": state.last_update,
                "empty_answer_ignored": state.empty_ignored,
                "instances": [i.describe() for i in state.instances or ()],
            }
        backends = {
            name: {
                "type": stats.type,
                "errors": stats.errors,
                "updates": stats.updates,
                "last_success": stats.last_success,
                "last_error": stats.last_error,
                "watches": sorted(str(q) for q in stats.queries),
            }
            for name, stats in self._stats.items()
            if name in self.backends
        }
        registries = {
            name: {
                "state_file": str(r.state_file) if r.state_file else None,
                "load_error": r.load_error,
                "registrations": len(r.entries),
                "default": name == self.default_registry(),
                **r.persistence(),
            }
            for name, r in self.registries.items()
        }
        return {"upstreams": upstreams, "backends": backends, "registries": registries}

    # -- metrics -----------------------------------------------------------------------------

    def collector(self) -> _DiscoveryCollector:
        return _DiscoveryCollector(self)


class _DiscoveryCollector:
    _NAMES = (
        ("gateway_discovery_errors", "counter"),
        ("gateway_discovery_updates", "counter"),
        ("gateway_discovery_last_success_timestamp_seconds", "gauge"),
        ("gateway_discovery_stale", "gauge"),
        ("gateway_discovery_instances", "gauge"),
    )

    def __init__(self, manager: DiscoveryManager) -> None:
        self._manager = manager

    def describe(self) -> Iterator[Metric]:
        for name, typ in self._NAMES:
            yield Metric(name, "", typ)

    def collect(self) -> Iterator[Metric]:
        manager = self._manager
        errors = CounterMetricFamily(
            "gateway_discovery_errors",
            "Failed discovery backend requests (unreachable, errors, garbage).",
            labels=["backend"],
        )
        updates = CounterMetricFamily(
            "gateway_discovery_updates",
            "Instance-set changes accepted from a discovery backend.",
            labels=["backend"],
        )
        success = GaugeMetricFamily(
            "gateway_discovery_last_success_timestamp_seconds",
            "Unix time of the last successful answer from a discovery backend.",
            labels=["backend"],
        )
        for name, stats in list(manager._stats.items()):
            if name not in manager.backends:
                continue
            errors.add_metric([name], stats.errors)
            updates.add_metric([name], stats.updates)
            if stats.last_success is not None:
                success.add_metric([name], stats.last_success)
        stale = GaugeMetricFamily(
            "gateway_discovery_stale",
            "1 while an upstream's instances come from a failed discovery backend's last answer.",
            labels=["upstream"],
        )
        count = GaugeMetricFamily(
            "gateway_discovery_instances",
            "Instances discovered for an upstream.",
            labels=["upstream"],
        )
        for name, upstream in list(manager.config.upstreams.items()):
            found = manager._upstream_state(upstream)
            if found is None:
                continue
            stale.add_metric([name], 1 if found[1].stale else 0)
            count.add_metric([name], len(found[1].instances or ()))
        yield from (errors, updates, success, stale, count)
