"""A real Prometheus server scrapes a real gateway; its answers must match the traffic sent.

Prometheus comes from Debian (``apt-get install prometheus``; .ci/run installs it). It runs as
our own subprocess (temp config and TSDB, a free loopback port, 1 s scrape interval), never as
the system service. The gateway has three routes on one backend: ``fast`` (echo), ``slow``
(the backend sleeps 0.2 s) and ``failing`` (the backend answers 500).

Counters are compared exactly (raw instant values, no ``rate``); quantiles and ratios come from
``rate`` over 1 m as an operator would ask, and are checked against what the traffic implies.

``rate`` needs two samples of a series: a series that appears for the first time with its final
value has no increase. So one warm-up request per route is sent and scraped first, then the
measured traffic. The slow route's warm-up does not sleep: ``rate`` extrapolates each bucket
series by an amount that depends on its first value, so buckets at and above the measured
requests' bucket must all start from the same count (1) for the quantile not to be skewed into
a higher bucket; a warm-up in a lower bucket than the measured traffic guarantees that.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import DEFAULT_BUCKETS
from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess, free_port, free_ports, stop_process
from tests.integration.tls_support import CertFiles
from tests.unit.test_dashboard import DASHBOARD, PLANNED_METRICS, iter_panels, metric_names

PACKAGE_HINT = (
    "install the Debian package `prometheus` (apt-get install -y prometheus; .ci/run does)"
)

SLOW_DELAY = 0.2  # seconds the backend sleeps on the slow route
SENT = {"fast": 200, "slow": 40, "failing": 50}  # measured traffic, warm-up not included
PATHS = {
    "fast": "/api/fast/echo",
    "slow": f"/api/slow?delay={SLOW_DELAY}",
    "failing": "/api/fail",
}
WARMUP_PATHS = {**PATHS, "slow": "/api/slow?delay=0"}
P99_BY_ROUTE = (
    "histogram_quantile(0.99, sum by (route, le) "
    "(rate(gateway_request_duration_seconds_bucket[1m])))"
)
# The `or ... * 0` arm gives routes without any 5xx a ratio of 0 instead of no result.
ERROR_RATIO_BY_ROUTE = (
    '(sum by (route) (rate(gateway_requests_total{code=~"5.."}[1m]))'
    " or sum by (route) (rate(gateway_requests_total[1m])) * 0)"
    " / sum by (route) (rate(gateway_requests_total[1m]))"
)


def _binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"`{name}` not found: {PACKAGE_HINT}", pytrace=False)
    return path


def wait_until(
    condition: Callable[[], Any], what: str, timeout: float = 20.0, detail: Callable[[], str] = str
) -> Any:
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r}) {detail()}")


def bucket_upper(value: float) -> float:
    """Upper bound of the default histogram bucket holding ``value`` (le semantics)."""
    i = bisect_left(DEFAULT_BUCKETS, value)
    return DEFAULT_BUCKETS[i] if i < len(DEFAULT_BUCKETS) else math.inf


# -- Prometheus ---------------------------------------------------------------------------------


class PrometheusServer:
    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [target]}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, "Prometheus to be ready", detail=self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the vector's samples as ``{"metric": {...}, "value": [t, "v"]}``."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def by_label(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> str:
        active = self.api("targets")["activeTargets"]
        return "targets: " + json.dumps(
            [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in active]
        )

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


# -- fixtures -------------------------------------------------------------------------------------


@dataclass
class Traffic:
    sent: Counter[str] = field(default_factory=Counter)  # route -> requests, warm-up included
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (route, code) -> count
    # Client-seen seconds per route for the measured traffic: an upper bound of what the
    # gateway measured for the same request.
    durations: dict[str, list[float]] = field(default_factory=dict)
    warmup: dict[str, float] = field(default_factory=dict)  # client-seen, per route

    def bucket_bound(self, route: str) -> float:
        """No request of ``route`` fell above this bucket bound in the gateway's histogram."""
        return bucket_upper(max([*self.durations[route], self.warmup[route]]))

    @property
    def total(self) -> int:
        return sum(self.sent.values())


@pytest.fixture(scope="module")
def binaries() -> dict[str, str]:
    return {"prometheus": _binary("prometheus"), "promtool": _binary("promtool")}


@pytest.fixture(scope="module")
def prom_backend() -> Iterator[AppBackend]:
    backend = AppBackend("prom")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prom_gateway(
    prom_backend: AppBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    instance = f"127.0.0.1:{prom_backend.port}"
    # One upstream per route, so that per-upstream series can be checked too.
    config = {
        "upstreams": {
            name: {
                "instances": [instance],
                "timeouts": {"read": "5s"},
                **({"retry": {"on": ["5xx"]}} if name == "broken-pool" else {}),
            }
            for name in ("fast-pool", "slow-pool", "broken-pool")
        },
        # Failing answers are retried once (same instance: it is the only one), so the retry
        # panel has data; the client still sees the 500 of the last try.
        "routes": [
            {
                "name": "fast",
                "match": {"path": {"prefix": "/api/fast"}},
                "upstream": "fast-pool",
                # Never hit; it makes the rate-limit panel's metric appear.
                "rate_limit": {"rate": "100000/s"},
            },
            {
                "name": "slow",
                "match": {"path": {"prefix": "/api/slow"}},
                "upstream": "slow-pool",
                "rewrite": {"strip_prefix": "/api"},  # -> backend /slow?delay=...
            },
            {
                "name": "failing",
                "match": {"path": {"prefix": "/api/fail"}},
                "upstream": "broken-pool",
                "rewrite": {"regex": "^/api/fail.*$", "replacement": "/status/500"},
            },
        ],
    }
    # A TLS listener besides the plaintext one, so that the certificate-expiry panel has data.
    plain_port, tls_port = free_ports(2)
    certs = CertFiles(tmp_path_factory.mktemp("prom-certs"))
    cert, key = certs.issue("api", "api.test")
    config["listen"] = [
        f"127.0.0.1:{plain_port}",
        {
            "address": f"127.0.0.1:{tls_port}",
            "name": "https",
            "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]},
        },
    ]
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("prom-gateway"))
    gateway.port = plain_port  # the traffic goes to the plaintext listener
    # One failed handshake (plain HTTP on the TLS port), for the handshake-error panel.
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        while sock.recv(4096):
            pass
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def prometheus(
    binaries: dict[str, str],
    prom_gateway: GatewayProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(
        binaries["prometheus"],
        f"127.0.0.1:{prom_gateway.admin_port}",
        tmp_path_factory.mktemp("prometheus"),
    )
    yield server
    server.stop()


def _request(gateway: GatewayProcess, path: str) -> tuple[int, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - start
    except (OSError, http.client.HTTPException) as exc:
        raise AssertionError(
            f"GET {path} through the gateway failed: {exc!r}\ngateway log:\n{gateway.log()[-3000:]}"
        ) from exc
    finally:
        conn.close()


def _sum_requests(prometheus: PrometheusServer) -> float | None:
    return prometheus.scalar("sum(gateway_requests_total)")


@pytest.fixture(scope="module")
def traffic(prom_gateway: GatewayProcess, prometheus: PrometheusServer) -> Traffic:
    traffic = Traffic(durations={route: [] for route in SENT})

    def send(route: str) -> tuple[str, int, float]:
        status, seconds = _request(prom_gateway, PATHS[route])
        return route, status, seconds

    # Warm-up: one request per route, scraped before the measured traffic (see module doc).
    for route in SENT:
        status, seconds = _request(prom_gateway, WARMUP_PATHS[route])
        traffic.sent[route] += 1
        traffic.codes[route, str(status)] += 1
        traffic.warmup[route] = seconds
    wait_until(
        lambda: _sum_requests(prometheus) == traffic.total,
        "Prometheus to scrape the warm-up requests",
        detail=prometheus.targets,
    )

    # Interleave the routes so that slow requests overlap fast ones, as in production.
    order = [route for i in range(max(SENT.values())) for route in SENT if i < SENT[route]]
    with ThreadPoolExecutor(max_workers=16) as pool:
        for route, status, seconds in pool.map(send, order):
            traffic.sent[route] += 1
            traffic.codes[route, str(status)] += 1
            traffic.durations[route].append(seconds)

    wait_until(
        lambda: _sum_requests(prometheus) == traffic.total,
        f"Prometheus to scrape all {traffic.total} requests",
        detail=prometheus.targets,
    )
    return traffic


# -- tests ----------------------------------------------------------------------------------------


def test_prometheus_is_installed() -> None:
    # The fixtures fail the same way; this names the missing package as a plain test failure.
    _binary("prometheus")
    _binary("promtool")


def test_backend_answers_as_configured(traffic: Traffic) -> None:
    # Guards the setup: otherwise the Prometheus checks below would test the wrong thing.
    assert traffic.codes[("fast", "200")] == traffic.sent["fast"] == SENT["fast"] + 1
    assert traffic.codes[("slow", "200")] == traffic.sent["slow"] == SENT["slow"] + 1
    # The backend answers 500; once outlier detection ejects the instance after a run of
    # failures, the gateway answers 503 itself. Either way every answer is a 5xx.
    failing = {code: n for (route, code), n in traffic.codes.items() if route == "failing"}
    assert sum(failing.values()) == SENT["failing"] + 1
    assert failing.get("500", 0) >= 1 and set(failing) <= {"500", "503"}, failing
    assert min(traffic.durations["slow"]) >= SLOW_DELAY


def test_raw_counters_equal_the_requests_sent(
    traffic: Traffic, prometheus: PrometheusServer
) -> None:
    assert prometheus.by_label("sum by (route) (gateway_requests_total)", "route") == {
        route: float(n) for route, n in traffic.sent.items()
    }
    by_code = {
        (r["metric"]["route"], r["metric"]["code"]): float(r["value"][1])
        for r in prometheus.query("sum by (route, code) (gateway_requests_total)")
    }
    assert by_code == {key: float(n) for key, n in traffic.codes.items()}
    methods = prometheus.by_label("sum by (method) (gateway_requests_total)", "method")
    assert methods == {"GET": float(traffic.total)}
    # Every request was timed: the histograms count as many observations as requests.
    for metric in ("gateway_request_duration_seconds_count", "gateway_overhead_seconds_count"):
        counts = prometheus.by_label(f"sum by (route) ({metric})", "route")
        assert counts == {route: float(n) for route, n in traffic.sent.items()}, metric
    upstream = prometheus.by_label(
        "sum by (upstream) (gateway_upstream_duration_seconds_count)", "upstream"
    )
    assert upstream["fast-pool"] == traffic.sent["fast"]
    assert upstream["slow-pool"] == traffic.sent["slow"]
    # Only requests that reached the upstream (the 500s; not the gateway's own 503s after an
    # ejection) have an upstream time.
    reached = traffic.codes[("failing", "500")]
    assert reached <= upstream["broken-pool"] <= traffic.sent["failing"], (upstream, reached)


def test_scraped_buckets_equal_the_gateway_exposition(
    traffic: Traffic, prometheus: PrometheusServer, prom_gateway: GatewayProcess
) -> None:
    exposed: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(prom_gateway.metrics_text()):
        for s in family.samples:
            if s.name == "gateway_request_duration_seconds_bucket":
                exposed[s.labels["route"], s.labels["le"]] = s.value
    scraped = {
        (r["metric"]["route"], r["metric"]["le"]): float(r["value"][1])
        for r in prometheus.query("gateway_request_duration_seconds_bucket")
    }
    assert len(scraped) == len(SENT) * (len(DEFAULT_BUCKETS) + 1)
    assert scraped == exposed


def test_p99_per_route_matches_the_traffic(traffic: Traffic, prometheus: PrometheusServer) -> None:
    p99 = prometheus.by_label(P99_BY_ROUTE, "route")
    assert set(p99) == set(SENT), p99

    # The backend sleeps SLOW_DELAY before answering, so every measured slow request took at
    # least that long inside the gateway; the client saw each request no faster than the
    # gateway did, so the bucket of the slowest client-seen time bounds the quantile from
    # above. Normally that is the bucket holding 0.2 s: (0.1, 0.25].
    slow_upper = traffic.bucket_bound("slow")
    assert SLOW_DELAY <= p99["slow"] <= slow_upper, (p99, slow_upper)
    assert slow_upper >= bucket_upper(SLOW_DELAY)

    fast_upper = traffic.bucket_bound("fast")
    assert p99["fast"] <= fast_upper, (p99, fast_upper)
    assert p99["fast"] < SLOW_DELAY <= p99["slow"], p99


def test_error_ratio_per_route(traffic: Traffic, prometheus: PrometheusServer) -> None:
    ratio = prometheus.by_label(ERROR_RATIO_BY_ROUTE, "route")
    assert ratio == {"fast": 0.0, "slow": 0.0, "failing": 1.0}


def test_dashboard_queries_run_and_show_exported_metrics(
    traffic: Traffic, prometheus: PrometheusServer
) -> None:
    """Every panel query of the Grafana dashboard is valid PromQL for this Prometheus, and the
    ones over metrics the gateway exports return data once traffic has flowed."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"$job": ".*", "$route": ".*", "$upstream": ".*", "$__rate_interval": "1m"}
    checked = 0
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unresolved variable in {expr}"
            result = prometheus.query(expr)  # fails on a PromQL error
            planned = metric_names(target["expr"]) & set(PLANNED_METRICS)
            # A filter on a status code that the traffic never produced (e.g. 429) is empty.
            unsent = set(re.findall(r'code="(\d+)"', expr)) - {c for _, c in traffic.codes}
            if not planned and not unsent:
                assert result, f"{panel['title']} {target['refId']}: no data for {expr}"
            checked += 1
    assert checked >= 10


def test_promtool_check_metrics_passes_without_warnings(
    traffic: Traffic, binaries: dict[str, str], prom_gateway: GatewayProcess
) -> None:
    # promtool lints the classic text format (version 0.0.4), which the gateway serves when the
    # scraper does not ask for OpenMetrics.
    text = prom_gateway.metrics_text()
    assert "gateway_request_duration_seconds_bucket" in text
    result = subprocess.run(
        [binaries["promtool"], "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0 and not output.strip(), f"promtool check metrics:\n{output}"
