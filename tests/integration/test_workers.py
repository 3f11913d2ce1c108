"""Supervisor + worker processes: metrics summed over workers, a killed worker is replaced,
SIGTERM drains, SIGQUIT exits at once."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess, is_closed, read_response
from tests.integration.test_reload import KeepAliveLoad, admin_json, metric, wait_for


def app_config(app: AppBackend, **extra: Any) -> dict[str, Any]:
    return {
        "upstreams": {"app": {"instances": [f"127.0.0.1:{app.port}"]}},
        "routes": [
            {
                "name": "live",
                "match": {"path": {"prefix": "/live"}},
                "upstream": "app",
                "rewrite": {"strip_prefix": "/live", "prefix": "/echo/v0"},
            },
            {"name": "app", "match": {"path": {"prefix": "/"}}, "upstream": "app"},
        ],
        **extra,
    }


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def test_metrics_sum_requests_over_two_workers(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(app_config(app_backend, workers=2))
    workers = admin_json(gateway, "/admin/workers")[1]["workers"]
    assert [w["ready"] for w in workers] == [True, True]
    assert {w["pid"] for w in workers} == children_of(gateway.process.pid)
    sent = 150
    for _ in range(sent):  # one connection each: SO_REUSEPORT spreads them by 4-tuple
        with urllib.request.urlopen(gateway.base_url + "/name", timeout=10) as response:
            assert response.status == 200
    assert metric(gateway, "gateway_requests_total", route="app") == sent
    per_worker = [w["requests"] for w in admin_json(gateway, "/admin/workers")[1]["workers"]]
    assert sum(per_worker) == sent
    assert all(count > 0 for count in per_worker), per_worker  # both workers took traffic
    assert metric(gateway, "gateway_request_duration_seconds_count", route="app") == sent
    assert metric(gateway, "gateway_workers") == 2


def test_killed_worker_is_replaced_and_the_others_keep_serving(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(app_config(app_backend, workers=2))
    victim = admin_json(gateway, "/admin/workers")[1]["workers"][0]
    load = KeepAliveLoad(gateway, connections=6).start()
    try:
        load.wait_more(30)
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced() -> bool:
            workers = admin_json(gateway, "/admin/workers")[1]["workers"]
            return workers[0]["pid"] != victim["pid"] and all(w["ready"] for w in workers)

        wait_for(replaced, "the killed worker was not replaced")
        failed_while_replacing = len(load.failures)
        load.wait_more(60)
    finally:
        load.finish()
    # Only connections to the killed worker may fail, while it dies: a request in flight there,
    # or a reconnect that the kernel's SO_REUSEPORT hash put in the dying socket's accept queue.
    # Once the new worker is ready, nothing fails.
    assert load.failures[failed_while_replacing:] == []
    assert len(load.failures) <= 2 * load.connections, load.failures
    kinds = ("Reset", "Refused", "BrokenPipe", "closed")
    assert all(any(kind in f for kind in kinds) for f in load.failures), load.failures
    assert all(a.status == 200 for per in load.answers for a in per)
    assert metric(gateway, "gateway_worker_restarts_total") == 1
    assert "worker 0" in gateway.log() and "died (signal 9)" in gateway.log()
    assert metric(gateway, "gateway_workers") == 2
    assert admin_json(gateway, "/readyz")[0] == 200


def _slow_request(gateway: GatewayProcess, delay: float, results: list[Any]) -> None:
    try:
        sock = gateway.connect()
        sock.settimeout(60)
        sock.sendall(f"GET /slow?delay={delay} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        results.append(read_response(sock))
        sock.close()
    except OSError as error:
        results.append(error)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_in_flight_requests_and_exits_zero(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    workers: int,
) -> None:
    gateway = start_gateway(app_config(app_backend, workers=workers, drain_timeout="20s"))
    idle = gateway.connect()
    idle.sendall(b"GET /name HTTP/1.1\r\nHost: t\r\n\r\n")
    assert read_response(idle)[0] == 200
    seen = len(app_backend.requests)
    results: list[Any] = []
    threads = [
        threading.Thread(target=_slow_request, args=(gateway, 1.5, results)) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    # The requests have reached the backend: the gateway has received them.
    wait_for(
        lambda: sum(r["path"].startswith("/slow") for r in app_backend.requests[seen:]) == 4,
        "slow requests did not arrive",
    )
    gateway.process.send_signal(signal.SIGTERM)
    assert is_closed(idle)  # idle keep-alive connections are closed at once

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", gateway.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, "the listener still accepts after SIGTERM")
    for thread in threads:
        thread.join(30)
    assert [r[0] if isinstance(r, tuple) else r for r in results] == [200] * 4
    assert all(r[1].get("connection") == "close" for r in results)
    assert gateway.process.wait(30) == 0
    assert children_of(gateway.process.pid) == set()


def test_drain_timeout_bounds_shutdown_and_sigquit_exits_now(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(app_config(app_backend, workers=2, drain_timeout="500ms"))
    results: list[Any] = []
    seen = len(app_backend.requests)
    thread = threading.Thread(target=_slow_request, args=(gateway, 6, results))
    thread.start()
    wait_for(
        lambda: any(r["path"].startswith("/slow") for r in app_backend.requests[seen:]),
        "slow request did not arrive",
    )
    gateway.process.send_signal(signal.SIGTERM)
    # The drain gives up after drain_timeout, before the 6 s request could finish.
    assert gateway.process.wait(30) == 0
    thread.join(30)
    assert len(results) == 1 and not isinstance(results[0], tuple)

    quitter = start_gateway(app_config(app_backend, workers=2))
    pids = {w["pid"] for w in admin_json(quitter, "/admin/workers")[1]["workers"]}
    quitter.process.send_signal(signal.SIGQUIT)
    assert quitter.process.wait(30) == 128 + signal.SIGQUIT

    def workers_gone() -> bool:
        alive = set()
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.add(pid)
        return not alive

    wait_for(workers_gone, "workers outlived SIGQUIT")
