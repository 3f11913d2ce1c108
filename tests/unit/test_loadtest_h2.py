"""The loadtest harness's h2 scenario: h2load command and report, proxy configs (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.h2load import h2load_command, parse_h2load_output
from loadtest.harness import SCENARIOS
from loadtest.servers import gateway_config, nginx_proxy_conf
from loadtest.wrk import WrkParseError

REPORT = """\
starting benchmark...
Application protocol: h2
finished in 10.00s, 12345.60 req/s, 1.23MB/s
requests: 12345 total, 12355 started, 12345 done, 12339 succeeded, 6 failed, 2 errored, 1 timeout
status codes: 12339 2xx, 0 3xx, 0 4xx, 3 5xx
traffic: 12.34MB (12939264) total, 1.23MB (1289748) headers (space savings 95.00%)
                     min         max         mean         sd        +/- sd
time for request:      512us     45.12ms      8.07ms      3.21ms    70.00%
"""


def test_parse_h2load_report() -> None:
    result = parse_h2load_output(REPORT)
    assert (result.requests, result.duration_s, result.requests_per_s) == (12345, 10.0, 12345.6)
    assert result.non_2xx_3xx == 3
    assert result.timeouts == 1
    assert result.read_errors == 2 + (6 - 2 - 3)  # errored, plus failed that were not 5xx
    assert result.latency_ms["mean"] == pytest.approx(8.07)
    assert result.errors == 3 + 3 + 1


def test_parse_h2load_rejects_a_failed_run() -> None:
    with pytest.raises(WrkParseError):
        parse_h2load_output("connect error: Connection refused\n")


def test_h2load_command_multiplexes_100_streams() -> None:
    argv = h2load_command("https://127.0.0.1:1/small", duration_s=5, connections=2, cpu="1")
    assert argv[:3] == ["taskset", "-c", "1"]
    assert "--max-concurrent-streams=100" in argv and "--clients=2" in argv
    assert "--duration=5" in argv and argv[-1] == "https://127.0.0.1:1/small"


def test_h2_scenario_configures_both_proxies_for_h2(tmp_path: Path) -> None:
    scenario = SCENARIOS["h2"]
    assert scenario.http2 and scenario.tls and scenario.connections == 2
    tls = ("cert.pem", "key.pem", True)
    document = gateway_config(1, 2, 3, tls=tls, http2=True)
    assert document["listen"][0]["http2"]["enabled"] is True
    assert document["upstreams"]["bench"]["max_idle_connections"] == 256
    conf = nginx_proxy_conf(tmp_path, 1, 3, tls=tls, http2=True)
    assert " ssl http2" in conf and "keepalive 256;" in conf
    plain = nginx_proxy_conf(tmp_path, 1, 3, tls=tls)
    assert " http2" not in plain and "keepalive 64;" in plain
    assert "max_idle_connections" not in gateway_config(1, 2, 3, tls=tls)["upstreams"]["bench"]
