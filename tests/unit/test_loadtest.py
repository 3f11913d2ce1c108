"""Pure parts of the loadtest harness: wrk output, /proc accounting, tables, generated configs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.metrics import GatewayMetrics
from loadtest import report
from loadtest.backend import BackendProtocol
from loadtest.harness import SCENARIOS, parse_duration_s, parse_list
from loadtest.idle import parse_response_head
from loadtest.procstat import (
    cpu_us_per_request,
    descendants,
    parse_stat_line,
    parse_vmrss_kib,
    tree_cpu_ticks,
    tree_rss_kib,
)
from loadtest.servers import (
    LARGE_BODY_BYTES,
    SMALL_BODY,
    extra_route_paths,
    gateway_argv,
    gateway_config,
    gateway_yaml,
    nginx_proxy_conf,
)
from loadtest.wrk import WrkParseError, parse_time_ms, parse_wrk_output, wrk_command

WRK_CLEAN = """Running 5s test @ http://127.0.0.1:8080/small
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.34us  100.12us   5.00ms   90.00%
    Req/Sec    98.00k     5.00k  110.00k    80.00%
  Latency Distribution
     50%  480.00us
     75%  520.00us
     90%  600.00us
     99%    1.20ms
  487654 requests in 5.00s, 60.00MB read
Requests/sec:  97530.80
Transfer/sec:     12.00MB
"""

WRK_ERRORS = """Running 2s test @ http://127.0.0.1:8080/post
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50s   200.00ms   2.00s    70.00%
    Req/Sec     1.00k   100.00     1.20k    60.00%
  Latency Distribution
     50%    1.50s
     75%    1.70s
     90%    1.90s
     99%    1.00m
  2100 requests in 2.10s, 300.00KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 12
Requests/sec:   1000.00
Transfer/sec:    142.86KB
"""


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("512.34us", 0.51234),
        ("1.20ms", 1.2),
        ("2.00s", 2000.0),
        ("1.00m", 60_000.0),
        ("3us", 0.003),
    ],
)
def test_parse_time_units(text: str, ms: float) -> None:
    assert parse_time_ms(text) == pytest.approx(ms)


def test_parse_time_rejects_garbage() -> None:
    with pytest.raises(WrkParseError):
        parse_time_ms("12 parsecs")


def test_parse_wrk_clean_run() -> None:
    r = parse_wrk_output(WRK_CLEAN)
    assert r.requests == 487654
    assert r.duration_s == pytest.approx(5.0)
    assert r.requests_per_s == pytest.approx(97530.80)
    assert r.p50_ms == pytest.approx(0.48)
    assert r.p99_ms == pytest.approx(1.2)
    assert r.latency_ms == pytest.approx({"50": 0.48, "75": 0.52, "90": 0.6, "99": 1.2})
    assert r.errors == 0
    assert r.error_summary() == ""


def test_parse_wrk_errors_are_counted() -> None:
    r = parse_wrk_output(WRK_ERRORS)
    assert (r.connect_errors, r.read_errors, r.write_errors, r.timeouts) == (1, 2, 3, 4)
    assert r.non_2xx_3xx == 12
    assert r.errors == 22
    assert r.p50_ms == pytest.approx(1500.0)
    assert r.p99_ms == pytest.approx(60_000.0)
    assert r.error_summary() == "non-2xx 12, connect 1, read 2, write 3, timeout 4"
    assert r.to_dict()["errors"] == 22


def test_parse_wrk_failure_output_raises() -> None:
    with pytest.raises(WrkParseError):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_command_pins_and_adds_script() -> None:
    argv = wrk_command(
        "http://127.0.0.1:1/post", duration_s=3, connections=50, script="/x/post.lua", cpu="1"
    )
    assert argv[:3] == ["taskset", "-c", "1"]
    assert argv[3:] == ["wrk", "-t1", "-c50", "-d3s", "--latency", "-s", "/x/post.lua", argv[-1]]
    newconn = wrk_command("http://h/", duration_s=1, connections=2, headers=("Connection: close",))
    assert newconn[0] == "wrk"
    assert newconn[newconn.index("-H") + 1] == "Connection: close"


def _stat(pid: int, comm: str, ppid: int, utime: int, stime: int, start: int = 100) -> str:
    # Fields 3..22 of proc(5); only ppid (4), utime (14), stime (15), starttime (22) matter.
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 6 + [str(start)]
    return f"{pid} ({comm}) " + " ".join(fields) + " 0 0 0\n"


def test_parse_stat_line_with_awkward_comm() -> None:
    st = parse_stat_line(_stat(42, "nginx: worker) (x", 7, 150, 25, start=999))
    assert (st.pid, st.comm, st.ppid, st.cpu_ticks, st.start_ticks) == (
        42,
        "nginx: worker) (x",
        7,
        175,
        999,
    )


def test_parse_stat_line_real_kernel_format() -> None:
    line = Path("/proc/self/stat").read_text()
    st = parse_stat_line(line)
    assert st.ppid > 0
    assert st.cpu_ticks >= 0


def test_descendants_walks_the_whole_tree() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
    assert descendants(10, parents) == {10, 11, 12, 13}
    assert descendants(21, parents) == {21}


def _fake_proc(tmp_path: Path, procs: list[tuple[int, int, int, int, int]]) -> Path:
    """A /proc look-alike: (pid, ppid, utime, stime, rss_kib) per process."""
    for pid, ppid, utime, stime, rss in procs:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(_stat(pid, f"p{pid}", ppid, utime, stime))
        (d / "status").write_text(f"Name:\tp{pid}\nVmPeak:\t 999 kB\nVmRSS:\t {rss} kB\n")
    (tmp_path / "self").mkdir()  # non-numeric entries are ignored
    return tmp_path


def test_tree_cpu_and_rss_sum_over_descendants_only(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path,
        [
            (1, 0, 5, 5, 1),
            (100, 1, 10, 2, 1000),  # proxy master
            (101, 100, 300, 40, 2000),  # worker
            (102, 101, 1, 1, 10),  # a worker's helper
            (200, 1, 999, 999, 5000),  # unrelated (wrk, backend)
        ],
    )
    assert tree_cpu_ticks([100], str(proc)) == 12 + 340 + 2
    assert tree_cpu_ticks([100, 200], str(proc)) == 12 + 340 + 2 + 1998
    assert tree_cpu_ticks([555], str(proc)) == 0  # gone
    assert tree_rss_kib([100], str(proc)) == 3010


def test_vmrss_and_cpu_per_request() -> None:
    assert parse_vmrss_kib("Name:\tx\nVmRSS:\t   12345 kB\nRssAnon:\t 1 kB\n") == 12345
    assert parse_vmrss_kib("Name:\tkthreadd\nState:\tS\n") is None
    import os

    hz = os.sysconf("SC_CLK_TCK")
    # hz ticks = 1 s of CPU over 50,000 requests = 20 µs each.
    assert cpu_us_per_request(1000, 1000 + hz, 50_000) == pytest.approx(20.0)
    assert cpu_us_per_request(0, 10, 0) is None


def _rows() -> list[report.Row]:
    return [
        {"scenario": "small", "proxy": "direct", "requests_per_s": 90000.0, "p50_ms": 0.2,
         "p99_ms": 0.9, "cpu_us_per_req": None, "errors": 0},
        {"scenario": "small", "proxy": "nginx", "requests_per_s": 40000.0, "p50_ms": 0.5,
         "p99_ms": 2.0, "cpu_us_per_req": 12.0, "errors": 0},
        {"scenario": "small", "proxy": "gateway", "requests_per_s": 20000.0, "p50_ms": 1.0,
         "p99_ms": 4.0, "cpu_us_per_req": 27.0, "errors": 3, "error_summary": "non-2xx 3"},
        {"scenario": "post", "proxy": "gateway", "requests_per_s": 1.0, "p50_ms": 1.0,
         "p99_ms": 1.0, "cpu_us_per_req": 30.0, "errors": 0},
        {"scenario": "post", "proxy": "haproxy", "failure": "haproxy exited"},
    ]  # fmt: skip


def test_ratios_are_per_scenario_against_nginx() -> None:
    rows = _rows()
    report.add_ratios(rows)
    ratios = [r["cpu_ratio_vs_nginx"] for r in rows]
    assert ratios[0] is None  # direct: no proxy CPU
    assert ratios[1] == pytest.approx(1.0)
    assert ratios[2] == pytest.approx(27.0 / 12.0)
    assert ratios[3] is None  # no nginx row in "post"
    assert ratios[4] is None


def test_render_table_shape_and_cells() -> None:
    rows = _rows()
    report.add_ratios(rows)
    lines = report.render_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({len(line) for line in lines}) == 1  # columns are aligned
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(report.TABLE_COLUMNS)
    gateway = [c.strip() for c in lines[4].strip("|").split("|")]
    assert gateway == ["small", "gateway", "20,000", "1.000", "4.000", "27.0", "2.25x",
                       "**3** (non-2xx 3)"]  # fmt: skip
    direct = [c.strip() for c in lines[2].strip("|").split("|")]
    assert direct[5:7] == ["-", "-"]
    assert "FAILED: haproxy exited" in lines[-1]


def test_render_idle_table() -> None:
    text = report.render_idle_table(
        [
            {
                "proxy": "gateway",
                "connections": 5000,
                "rss_before_kib": 30000,
                "rss_after_kib": 45000,
                "kib_per_connection": 3.0,
            },
            {"proxy": "caddy", "failure": "caddy exited"},
        ]
    )
    assert "| gateway | 5000 | 30000 | 45000 | 3.00 |" in text
    assert "FAILED: caddy exited" in text


def test_response_head_parsing() -> None:
    h = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n")
    assert (h.status, h.content_length, h.keep_alive) == (200, 13, True)
    h = parse_response_head(b"HTTP/1.1 503 x\r\nConnection: Keep-Alive, close\r\n\r\n")
    assert (h.status, h.content_length, h.keep_alive) == (503, None, False)
    # HTTP/1.0 is persistent only with an explicit keep-alive (RFC 9112 §9.3).
    assert not parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n").keep_alive
    assert parse_response_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").keep_alive
    with pytest.raises(ValueError):
        parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_extra_routes_never_match_benchmark_paths() -> None:
    paths = extra_route_paths(9_999)
    assert len(paths) == len(set(paths)) == 9_999
    assert {kind for kind, _ in paths} == {"exact", "prefix"}
    for scenario in SCENARIOS.values():
        for kind, path in paths:
            hit = scenario.path == path if kind == "exact" else scenario.path.startswith(path)
            assert not hit


def test_gateway_config_follows_the_contract() -> None:
    import yaml

    doc = yaml.safe_load(gateway_yaml(gateway_config(8080, 9901, 7000, extra_routes=4)))
    assert doc["listen"] == "127.0.0.1:8080"
    assert doc["admin"] == "127.0.0.1:9901"
    assert doc["workers"] == 1
    assert doc["upstreams"] == {"bench": {"instances": ["127.0.0.1:7000"]}}
    assert len(doc["routes"]) == 5
    assert doc["routes"][-1] == {
        "name": "bench",
        "match": {"path": {"prefix": "/"}},
        "upstream": "bench",
    }
    assert doc["routes"][0]["match"] == {"path": {"exact": "/r/0"}}
    assert len({r["name"] for r in doc["routes"]}) == 5


def test_gateway_argv_substitution(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    assert gateway_argv("{python} -m gateway run -c {config}", "/py", cfg) == [
        "/py", "-m", "gateway", "run", "-c", str(cfg)
    ]  # fmt: skip
    assert gateway_argv("/opt/gw run", "/py", cfg) == ["/opt/gw", "run", "-c", str(cfg)]


def test_nginx_proxy_conf_has_routes_and_keepalive(tmp_path: Path) -> None:
    conf = nginx_proxy_conf(tmp_path, 8080, 7000, extra_routes=3)
    assert "keepalive 64;" in conf
    assert 'proxy_set_header Connection "";' in conf
    assert "location = /r/0 " in conf
    assert "location /r/1/ " in conf
    assert conf.count("proxy_pass http://bench;") == 4


def test_cli_value_parsing() -> None:
    assert parse_duration_s("10s") == 10
    assert parse_duration_s("2m") == 120
    assert parse_duration_s("1500ms") == 2
    assert parse_duration_s("3") == 3
    assert parse_list("nginx,gateway,nginx", ["gateway", "nginx"], "proxy") == ["nginx", "gateway"]
    assert parse_list("none", ["a"], "x") == []
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_list("nginx,apache", ["nginx"], "proxy")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration_s("ten seconds")


async def test_bundled_backend_serves_the_benchmark_paths() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BackendProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"x" * 16384
        # Three pipelined requests on one keep-alive connection, answered in order.
        writer.write(
            b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /post HTTP/1.1\r\nHost: t\r\nContent-Length: 16384\r\n\r\n" + body
            + b"GET /large HTTP/1.1\r\nHost: t\r\n\r\n"
        )  # fmt: skip
        sizes = []
        for _ in range(3):
            head = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
            assert head.status == 200 and head.keep_alive
            assert head.content_length is not None
            data = await reader.readexactly(head.content_length)
            sizes.append(len(data))
            if len(data) == len(SMALL_BODY):
                assert data == SMALL_BODY
        assert sizes == [len(SMALL_BODY), 3, LARGE_BODY_BYTES]
        writer.write(b"GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        head = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
        assert head.status == 404
        assert head.content_length is not None
        await reader.readexactly(head.content_length)
        assert await reader.read() == b""  # closed after Connection: close
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_tls_scenarios_configure_gateway_and_nginx_alike(tmp_path: Path) -> None:
    from gateway.config import load_config_text
    from loadtest.harness import SCENARIOS
    from loadtest.servers import gateway_config, gateway_yaml, nginx_proxy_conf

    assert SCENARIOS["tls-newconn"].new_connection and not SCENARIOS["tls-newconn"].tickets
    assert SCENARIOS["tls-resume"].tickets and SCENARIOS["tls"].tls
    tls = ("/c/cert.pem", "/c/key.pem", False)
    config = load_config_text(gateway_yaml(gateway_config(8443, 9901, 9000, tls=tls)))
    listener = config.all_listeners[0]
    assert listener.tls is not None and listener.tls.session_tickets is False
    assert listener.tls.certificates[0].cert == "/c/cert.pem"
    conf = nginx_proxy_conf(tmp_path, 8443, 9000, tls=tls)
    assert "listen 127.0.0.1:8443 backlog=4096 ssl;" in conf
    assert "ssl_certificate /c/cert.pem;" in conf and "ssl_session_tickets off;" in conf


def test_bench_dataplane_runs_without_metrics_recording() -> None:
    # --compare-metrics must work when GatewayMetrics is compiled (a native class, whose
    # methods cannot be replaced on an instance) and the data plane too (which takes only
    # GatewayMetrics): the no-op comes from a subclass.
    from loadtest import bench_dataplane

    recorder = bench_dataplane.NoRecording()
    assert isinstance(recorder, GatewayMetrics)
    recorder.observe_request("r", "u", "GET", 200, 0.1, 0.1, 0.0)
    recorder.connections_open += 1
    assert recorder.requests == {} and recorder.connections_open == 1

    async def both() -> tuple[float, float]:
        return bench_dataplane.run(50, metrics=True), bench_dataplane.run(50, metrics=False)

    with_metrics, without = asyncio.run(both())
    assert with_metrics > 0 and without > 0
