"""The Grafana dashboard (config/grafana/gateway-dashboard.json): structure, and every PromQL
expression names a metric the gateway exports today or one that is explicitly planned.

The exported names come from the real exposition (``GatewayMetrics`` rendered by
``prometheus_client.generate_latest``), not from a hand-written list, so renaming a metric in
gateway/metrics.py without updating the dashboard fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics, make_registry
from gateway.tls.metrics import CertificateExpiry


class _Expiry(CertificateExpiry):
    """The certificate-expiry collector the admin server registers, with one certificate."""

    def __init__(self) -> None:
        self.rows = [("https", "api.example.com", 2.0e9)]


DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "gateway-dashboard.json"

# Metrics the dashboard already shows although the gateway does not export them yet; their
# panels stay empty until the issue that produces them lands. Once a metric here is exported,
# ``test_planned_metrics_are_not_exported_yet`` fails: delete it from this list then.
# Metrics a panel may show before the gateway exports them (none left: all have landed).
PLANNED_METRICS: dict[str, str] = {}

# Grafana's built-in variables; everything else a query references must be defined.
_GRAFANA_BUILTINS = frozenset(
    {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__all"}
)

# PromQL words that look like identifiers but are not metric names.
_PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
# by (...), without (...), on (...), ignoring (...), group_left (...), group_right (...):
# the parentheses hold label names.
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
# Grafana's label_values(metric_selector, label): the last argument is a label, not a metric.
_LABEL_VALUES = re.compile(r"\blabel_values\((.*),\s*\w+\s*\)\s*$", re.DOTALL)
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
# An identifier not followed by "(" (that would be a function or aggregation) and not part of a
# number such as 1e3 or a duration such as 5m.
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:]|\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression, histogram suffixes removed.

    Grafana variables are removed first, then string literals, label matchers, range and
    subquery selectors and label lists of ``by``/``on``/... so that what remains are functions,
    operators, numbers and metric names.
    """
    text = _LABEL_VALUES.sub(r"label_values(\1)", expr)
    text = _VARIABLE.sub(" ", text)
    text = _STRING.sub('""', text)
    # Matchers cannot nest, but `{` may appear once the strings are gone only as a selector.
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group(1)
        if word.lower() in _PROMQL_KEYWORDS:
            continue
        for suffix in _HISTOGRAM_SUFFIXES:
            if word.endswith(suffix):
                word = word[: -len(suffix)]
                break
        names.add(word)
    return names


def exported_metric_names() -> set[str]:
    """Sample names (histogram suffixes removed) in the gateway's real exposition."""
    metrics = GatewayMetrics()
    metrics.observe_request("r", "u", "GET", 200, 0.01, 0.008, 0.0002)
    metrics.upstream_connections("u", 1, 2)
    metrics.connections_open = 1
    metrics.retry("u", "reset")
    metrics.upstream_instances("u", {"healthy": 1, "unhealthy": 0, "ejected": 0})
    metrics.ratelimit("r", "allowed")
    metrics.tls_handshake_error("https", "timeout")
    registry = make_registry(metrics)
    registry.register(_Expiry())
    text = generate_latest(registry).decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type == "histogram":
                for suffix in _HISTOGRAM_SUFFIXES:
                    if name.endswith(suffix):
                        name = name[: -len(suffix)]
                        break
            names.add(name)
    return names


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_metric_names()


def all_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable."""
    out: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if "expr" in target:
                out.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]
            query = query["query"] if isinstance(query, dict) else query
            out.append((f"variable {var['name']!r}", query))
    return out


# -- the extractor itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'histogram_quantile(0.99, sum by (route, le) (rate(x_seconds_bucket{a="b"}[5m])))',
            {"x_seconds"},
        ),
        ("sum(rate(a_total[$__rate_interval])) by (route) / sum(b_count)", {"a_total", "b"}),
        ('a_total{code=~"5..", route="by (x) or y"} offset 1h', {"a_total"}),
        ("a_total / on (route) group_left (upstream) b_info", {"a_total", "b_info"}),
        ("max_over_time(g[5m:30s]) > bool 1e3 unless g2 and ignoring (le) g3", {"g", "g2", "g3"}),
        ('label_values(gateway_requests_total{job=~"$job"}, route)', {"gateway_requests_total"}),
        ("sum(x) * 0 or vector(0)", {"x"}),
        ("NaN + Inf * 2 > bool 0x1f", set()),
    ],
)
def test_metric_names_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# -- the dashboard ----------------------------------------------------------------------------


def test_dashboard_is_valid_grafana_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["panels"], "no panels"


def test_every_panel_has_title_unique_id_and_grid_position(dashboard: dict[str, Any]) -> None:
    seen: dict[int, str] = {}
    for panel in iter_panels(dashboard["panels"]):
        title = panel.get("title")
        assert isinstance(title, str) and title.strip(), f"panel without title: {panel}"
        pid = panel.get("id")
        assert isinstance(pid, int), f"{title!r}: id {pid!r} is not an int"
        assert pid not in seen, f"{title!r} and {seen[pid]!r} share id {pid}"
        seen[pid] = title
        grid = panel.get("gridPos")
        assert isinstance(grid, dict), f"{title!r}: no gridPos"
        for key in ("x", "y", "w", "h"):
            assert isinstance(grid.get(key), int), f"{title!r}: gridPos.{key} missing"
        assert grid["w"] > 0 and grid["h"] > 0, f"{title!r}: empty gridPos {grid}"
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{title!r}: wider than 24 {grid}"


def test_panels_query_prometheus_through_the_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in iter_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"{panel['title']!r} has no queries"
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel["targets"]]:
            assert ds == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]


def test_route_variable_lists_routes_from_gateway_requests(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    route = variables["route"]
    query = route["query"]["query"] if isinstance(route["query"], dict) else route["query"]
    assert re.fullmatch(r"label_values\(gateway_requests_total(\{[^}]*\})?, route\)", query)
    assert route["includeAll"] and route["multi"]


def test_queries_reference_only_defined_variables(dashboard: dict[str, Any]) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | _GRAFANA_BUILTINS
    for where, expr in all_exprs(dashboard):
        used = {a or b for a, b in _VARIABLE.findall(expr)}
        assert used <= defined, f"{where}: undefined variables {used - defined} in {expr}"


def test_dashboard_covers_the_operator_questions(dashboard: dict[str, Any]) -> None:
    """The issue's list: request and error rate per route, p50/p95/p99 per route, overhead p99,
    instances by state, retries and rate-limited requests (plus connections)."""
    exprs = " ".join(expr for _, expr in all_exprs(dashboard))
    for q in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({q}, sum by \(route, le\) "
            r"\(rate\(gateway_request_duration_seconds_bucket",
            exprs,
        ), f"no p{q} per route"
    assert re.search(r"histogram_quantile\(0\.99, [^;]*gateway_overhead_seconds_bucket", exprs)
    assert re.search(
        r"histogram_quantile\(0\.99, [^;]*gateway_upstream_duration_seconds_bucket", exprs
    )
    assert 'code=~"5.."' in exprs
    for metric in (
        "gateway_requests_total",
        "gateway_client_connections",
        "gateway_upstream_connections",
        *PLANNED_METRICS,
    ):
        assert metric in exprs, f"no panel shows {metric}"


def test_every_query_names_an_exported_or_planned_metric(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    exprs = all_exprs(dashboard)
    assert exprs
    unknown: list[str] = []
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr}"
        for name in sorted(names - exported - set(PLANNED_METRICS)):
            unknown.append(f"{where}: {name}")
    assert not unknown, (
        "dashboard queries name metrics the gateway does not export and that are not in "
        f"PLANNED_METRICS: {unknown}; exported: {sorted(exported)}"
    )


def test_planned_metrics_are_not_exported_yet(exported: set[str]) -> None:
    landed = sorted(set(PLANNED_METRICS) & exported)
    assert not landed, (
        f"{landed} are exported now: remove them from PLANNED_METRICS in {__file__} "
        "(the dashboard check then covers them as exported metrics)"
    )


def test_exported_metrics_include_the_core_set(exported: set[str]) -> None:
    # Guards the extraction itself: an empty or garbled exposition would make every check pass.
    assert {
        "gateway_requests_total",
        "gateway_request_duration_seconds",
        "gateway_upstream_duration_seconds",
        "gateway_overhead_seconds",
        "gateway_client_connections",
        "gateway_upstream_connections",
        "process_cpu_seconds_total",
    } <= exported
