"""Runs the active health checks of every upstream that configures ``health:`` (control plane).

One ``ActiveHealthChecker`` per upstream, keyed by instance address. A transition flips the
instance's ``healthy`` flag in the *current* snapshot (looked up by address at that moment, so a
reload or a discovery update in between is harmless) and refreshes that upstream's balancer.
``update(snapshot)`` follows config and discovery changes: checkers of upstreams whose health
settings changed are replaced, the others only get the new target list; new snapshots inherit
the last known health of instances that remain (``build_snapshot`` carries it over).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, Metric

from gateway.config.model import HealthConfig
from gateway.health.active import ActiveHealthChecker
from gateway.snapshot import Snapshot, Upstream
from gateway.tls.upstream import H2_ALPN, HTTP1_ALPN, upstream_tls

log = logging.getLogger("gateway.health")


class HealthManager:
    def __init__(self, current: Callable[[], Snapshot]) -> None:
        self._current = current
        # upstream -> ((health settings, TLS key), checker): either change makes a new checker.
        self._checkers: dict[str, tuple[tuple[HealthConfig, object], ActiveHealthChecker]] = {}
        # (upstream, to_state) -> transitions since start; kept across checker replacements.
        self.transition_counts: dict[tuple[str, str], int] = {}

    async def update(self, snapshot: Snapshot) -> None:
        wanted = {
            name: upstream
            for name, upstream in snapshot.upstreams.items()
            if upstream.config.health is not None
        }
        for name in list(self._checkers):
            settings, checker = self._checkers[name]
            if name not in wanted or self._settings(snapshot, wanted[name]) != settings:
                del self._checkers[name]
                await checker.stop()
        for name, upstream in wanted.items():
            addresses = [instance.address for instance in upstream.instances]
            existing = self._checkers.get(name)
            if existing is not None:
                existing[1].update_targets(addresses)
                continue
            health = upstream.config.health
            assert health is not None
            tls = upstream_tls(upstream.config, snapshot.config, alpn=_probe_alpn(health))
            checker = ActiveHealthChecker(
                addresses,
                path=health.path,
                interval=health.interval,
                timeout=health.timeout,
                healthy_threshold=health.healthy_threshold,
                unhealthy_threshold=health.unhealthy_threshold,
                expected_statuses=health.expected_statuses,
                jitter=health.jitter,
                on_transition=self._transition_handler(name),
                ssl_context=tls.context,
                server_hostname=tls.sni,
                check_type=health.type,
                grpc_service=health.service,
            )
            self._checkers[name] = ((health, tls.key), checker)
            await checker.start()

    @staticmethod
    def _settings(snapshot: Snapshot, upstream: Upstream) -> tuple[HealthConfig, object]:
        health = upstream.config.health
        assert health is not None
        tls = upstream_tls(upstream.config, snapshot.config, alpn=_probe_alpn(health))
        return (health, tls.key)

    def _transition_handler(self, upstream_name: str) -> Callable[[Hashable, bool], None]:
        def on_transition(target: Hashable, healthy: bool) -> None:
            key = (upstream_name, "healthy" if healthy else "unhealthy")
            self.transition_counts[key] = self.transition_counts.get(key, 0) + 1
            upstream = self._current().upstreams.get(upstream_name)
            if upstream is None:
                return
            for instance in upstream.instances:
                if instance.address == target:
                    upstream.set_health(instance, healthy)

        return on_transition

    def collector(self) -> HealthCollector:
        """``gateway_health_transitions_total{upstream,to}`` for the admin registry."""
        return HealthCollector(self)

    def transitions(self) -> dict[str, int]:
        return {name: checker.transitions for name, (_, checker) in self._checkers.items()}

    async def stop(self) -> None:
        for _, checker in self._checkers.values():
            await checker.stop()
        self._checkers.clear()


def _probe_alpn(health: HealthConfig) -> tuple[str, ...]:
    # gRPC speaks HTTP/2 only: its probes over TLS offer h2.
    return H2_ALPN if health.type == "grpc" else HTTP1_ALPN


class HealthCollector:
    def __init__(self, manager: HealthManager) -> None:
        self._manager = manager

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "gateway_health_transitions", _TRANSITIONS_HELP, labels=["upstream", "to"]
        )

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gateway_health_transitions", _TRANSITIONS_HELP, labels=["upstream", "to"]
        )
        for (upstream, state), count in sorted(self._manager.transition_counts.items()):
            family.add_metric([upstream, state], count)
        yield family


_TRANSITIONS_HELP = "Active health-check transitions of instances, by upstream and new state."
