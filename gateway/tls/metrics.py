"""``gateway_tls_certificate_expiry_timestamp_seconds{listener,name}``: from the certificates
the running config serves (the supervisor's copy; workers serve the very same bytes)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from gateway.config.model import GatewayConfig
from gateway.tls.certs import describe_pem, resolve


def certificate_expiries(config: GatewayConfig) -> list[tuple[str, str, float]]:
    """(listener, certificate name, notAfter as Unix time) of every listener certificate."""
    out = []
    for listener in config.all_listeners:
        if listener.tls is None:
            continue
        for pair in listener.tls.certificates:
            data = config.tls_files.get(resolve(pair.cert, config.source))
            if data is None:
                continue
            try:
                info = describe_pem(data, pair.cert)
            except ValueError:
                continue
            out.append((listener.name, info.name, info.not_after))
    return out


class CertificateExpiry:
    """Collector for the admin registry; ``update`` on every successful reload."""

    def __init__(self, config: GatewayConfig) -> None:
        self.rows = certificate_expiries(config)

    def update(self, config: GatewayConfig) -> None:
        self.rows = certificate_expiries(config)

    def describe(self) -> Iterator[Metric]:
        yield from self.collect()

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gateway_tls_certificate_expiry_timestamp_seconds",
            "Unix time a listener certificate expires (notAfter), by listener and name (its"
            " first DNS name).",
            labels=["listener", "name"],
        )
        for listener, name, not_after in self.rows:
            family.add_metric([listener, name], not_after)
        yield family
