"""The tests' one reader of the Prometheus text format: prometheus_client's own parser.

Every helper takes the text of a scrape (``GatewayProcess.metrics_text()``) and matches sample
names exactly as exposed (``gateway_requests_total``, ``..._bucket``, ``..._count``), with
labels that *include* the given ones (positional-only parameters: a label may be called
``name`` or ``text``).
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def samples(text: str, name: str, /, **labels: str) -> list[Sample]:
    """The samples called ``name`` whose labels include ``labels``."""
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric_sum(text: str, name: str, /, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum((sample.value for sample in samples(text, name, **labels)), 0.0)


def metric_value(text: str, name: str, /, **labels: str) -> float | None:
    """Like ``metric_sum``, but None when no sample matches (the series is not exported)."""
    found = samples(text, name, **labels)
    return sum(sample.value for sample in found) if found else None


def by_label(text: str, name: str, label: str, /, **labels: str) -> dict[str, float]:
    """Sums of the samples of ``name`` (labels including ``labels``) per value of ``label``."""
    out: dict[str, float] = {}
    for sample in samples(text, name, **labels):
        key = sample.labels.get(label)
        if key is not None:
            out[key] = out.get(key, 0.0) + sample.value
    return out
