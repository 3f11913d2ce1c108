"""Hot reload on a live gateway: under load, with a bad file, WebSocket tunnels, CLI and watch.

The route table of version ``v`` rewrites ``/live/...`` to ``/echo/v{v}/...`` on upstream
``one`` (even v, backend app-1) or ``two`` (odd v, backend app-2), so each echoed answer names
the version that served it. Requests are timed against the moments each file was written and
each reload was acknowledged, which bounds the version that may answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml

from tests.integration.backends import AppBackend
from tests.integration.conftest import ROOT, GatewayProcess, read_response
from tests.metrics_text import metric_sum


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def admin_json(gateway: GatewayProcess, path: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(gateway.admin_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metric(gateway: GatewayProcess, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return metric_sum(gateway.metrics_text(), name, **labels)


def status_of(gateway: GatewayProcess, path: str) -> int:
    try:
        with urllib.request.urlopen(gateway.base_url + path, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def version_config(
    version: int, app: AppBackend, app2: AppBackend, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    upstreams: dict[str, Any] = {
        "one": {"instances": [f"127.0.0.1:{app.port}"]},
        "two": {"instances": [f"127.0.0.1:{app2.port}"]},
    }
    routes: list[dict[str, Any]] = []
    if version % 2 == 0:  # routes and upstreams come and go between versions
        upstreams[f"extra{version}"] = {"instances": [f"127.0.0.1:{app.port}"]}
        routes.append(
            {
                "name": f"extra{version}",
                "match": {"path": {"prefix": f"/extra{version}"}},
                "upstream": f"extra{version}",
            }
        )
    routes.append(
        {
            "name": "live",
            "match": {"path": {"prefix": "/live"}},
            "upstream": "one" if version % 2 == 0 else "two",
            "rewrite": {"strip_prefix": "/live", "prefix": f"/echo/v{version}"},
        }
    )
    routes.append({"name": "ws", "match": {"path": {"prefix": "/ws"}}, "upstream": "one"})
    return {"upstreams": upstreams, "routes": routes, **(extra or {})}


def write_config(gateway: GatewayProcess, document: dict[str, Any]) -> None:
    document = {"listen": f"127.0.0.1:{gateway.port}", "admin": gateway.admin_url[7:], **document}
    gateway.config_path.write_text(yaml.safe_dump(document, sort_keys=False))


@dataclass
class Answer:
    sent: float
    received: float
    status: int
    version: int
    backend: str


@dataclass
class KeepAliveLoad:
    """``connections`` threads, each sending GETs back to back on one keep-alive connection
    (a new one after a failure). Failures are recorded, never retried."""

    gateway: GatewayProcess
    path: str = "/live/x"
    connections: int = 4
    answers: list[list[Answer]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> KeepAliveLoad:
        for index in range(self.connections):
            self.answers.append([])
            thread = threading.Thread(target=self._run, args=(index,), daemon=True)
            self.threads.append(thread)
            thread.start()
        return self

    def count(self) -> int:
        return sum(len(a) for a in self.answers)

    def wait_more(self, n: int) -> None:
        target = self.count() + n
        wait_for(lambda: self.count() >= target, f"load stalled: {self.failures[-3:]}")

    def _run(self, index: int) -> None:
        request = f"GET {self.path} HTTP/1.1\r\nHost: load\r\n\r\n".encode()
        sock: socket.socket | None = None
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = self.gateway.connect()
                sent = time.monotonic()
                sock.sendall(request)
                status, headers, body = read_response(sock)
                received = time.monotonic()
                version, backend = -1, ""
                if status == 200:
                    echo = json.loads(body)
                    version = int(echo["path"].split("/")[2][1:])
                    backend = echo["backend"]
                self.answers[index].append(Answer(sent, received, status, version, backend))
                if headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
            except (OSError, ValueError) as error:
                self.failures.append(f"connection {index}: {error!r}")
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_under_load_answers_from_the_live_table_and_rejects_a_bad_file(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
    workers: int,
) -> None:
    extra = {"workers": workers}
    gateway = start_gateway(version_config(0, app_backend, app_backend_2, extra))
    first_sha = admin_json(gateway, "/admin/config")[1]["sha256"]
    load = KeepAliveLoad(gateway).start()
    written: dict[int, float] = {}  # version -> when its file was written
    acked: dict[int, float] = {}  # version -> when the reload call returned (live everywhere)
    bad_at = 10
    version = 0
    try:
        load.wait_more(20)
        for step in range(1, 21):
            if step == bad_at:
                # The next version's table, plus a route to an upstream that does not exist.
                document = version_config(version + 1, app_backend, app_backend_2, extra)
                document["routes"].append({"name": "broken", "upstream": "missing"})
                write_config(gateway, document)
                code, result = admin_json(gateway, "/admin/reload", "POST")
                assert code == 400 and result["result"] == "error", result
                assert any("gateway.yaml:" in e and "missing" in e for e in result["errors"])
                load.wait_more(8)  # traffic keeps flowing on the previous version
                continue
            version += 1
            written[version] = time.monotonic()
            write_config(gateway, version_config(version, app_backend, app_backend_2, extra))
            code, result = admin_json(gateway, "/admin/reload", "POST")
            acked[version] = time.monotonic()
            assert code == 200 and result["result"] == "success", result
            load.wait_more(8)
        load.wait_more(8)
    finally:
        load.finish()

    assert load.failures == []
    answers = [a for per_connection in load.answers for a in per_connection]
    assert all(a.status == 200 for a in answers)
    for per_connection in load.answers:  # one connection = one worker: versions only go up
        versions = [a.version for a in per_connection]
        assert versions == sorted(versions)
    for a in answers:
        assert a.backend == ("app-1" if a.version % 2 == 0 else "app-2"), a
        # Every reload acknowledged before the request was sent is visible to it ...
        assert all(a.version >= v for v, t in acked.items() if t < a.sent), a
        # ... and no version whose file was written after its answer came back.
        assert all(a.version < v for v, t in written.items() if t > a.received), a
    assert len({a.version for a in answers}) >= 15  # the load really spanned the reloads

    # The rejected file was reported everywhere, and the good ones after it were applied.
    assert metric(gateway, "gateway_config_reloads_total", result="error") == 1
    assert metric(gateway, "gateway_config_reloads_total", result="success") == 19
    running = admin_json(gateway, "/admin/config")[1]
    assert running["sha256"] != first_sha
    assert metric(gateway, "gateway_config_hash", sha256=running["sha256"]) == 1
    assert metric(gateway, "gateway_config_last_reload_success_timestamp_seconds") > 0
    assert "gateway.yaml:" in gateway.log() and "missing" in gateway.log()
    assert version == 19
    assert max(a.version for a in answers) == 19
    assert status_of(gateway, "/extra18") == 404  # added by version 18, gone in 19


def test_bad_file_is_reported_in_admin_config_and_changes_nothing(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
) -> None:
    gateway = start_gateway(version_config(0, app_backend, app_backend_2, {"workers": 2}))
    before = admin_json(gateway, "/admin/config")[1]
    gateway.config_path.write_text(gateway.config_path.read_text() + "routes: oops\n")
    code, result = admin_json(gateway, "/admin/reload", "POST")
    assert code == 400
    after = admin_json(gateway, "/admin/config")[1]
    assert after["sha256"] == before["sha256"]
    assert after["config"] == before["config"]
    error = after["reload"]["last_error"]
    assert error["trigger"] == "admin API"
    assert error["errors"] == result["errors"]
    assert any(e.startswith(f"{gateway.config_path}:") for e in error["errors"])
    assert metric(gateway, "gateway_config_reloads_total", result="error") == 1
    assert status_of(gateway, "/live/y") == 200


async def test_websocket_tunnel_survives_reloads(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
) -> None:
    gateway = await asyncio.to_thread(
        start_gateway, version_config(0, app_backend, app_backend_2, {"workers": 2})
    )
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(gateway.base_url + "/ws") as ws,
    ):
        await ws.send_str("before")
        assert await ws.receive_str(timeout=5) == "echo:before"
        # The new table no longer has the tunnel's route at all. It keeps 1 of 3 routes: a
        # reload that drops that many is refused unless forced.
        document = version_config(1, app_backend, app_backend_2, {"workers": 2})
        document["routes"] = [r for r in document["routes"] if r["name"] != "ws"]
        await asyncio.to_thread(write_config, gateway, document)
        code, result = await asyncio.to_thread(admin_json, gateway, "/admin/reload?force=1", "POST")
        assert code == 200, result
        for index in range(3):
            await ws.send_str(f"after {index}")
            assert await ws.receive_str(timeout=5) == f"echo:after {index}"
        assert await asyncio.to_thread(status_of, gateway, "/ws") == 404  # new ones: no route


def test_gateway_reload_cli(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
) -> None:
    gateway = start_gateway(version_config(0, app_backend, app_backend_2, {"workers": 2}))
    admin = f"127.0.0.1:{gateway.admin_port}"

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "reload", "-a", admin],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GATEWAY_ADMIN_TOKEN": ""},
        )

    write_config(gateway, version_config(1, app_backend, app_backend_2, {"workers": 2}))
    done = cli()
    assert done.returncode == 0, done.stderr
    assert "config reloaded" in done.stdout
    assert json.loads(urllib.request.urlopen(gateway.base_url + "/live/z").read())["path"] == (
        "/echo/v1/z"
    )

    gateway.config_path.write_text(gateway.config_path.read_text() + "workers: 0\n")
    done = cli()
    assert done.returncode == 1
    assert f"{gateway.config_path}:" in done.stderr and "unchanged" in done.stderr

    # listen/workers changes need a restart: the rest applies, the old values stay.
    document = version_config(2, app_backend, app_backend_2, {"workers": 3})
    write_config(gateway, document)
    done = cli()
    assert done.returncode == 0, done.stderr
    assert "workers changed and takes effect after a restart" in done.stdout
    assert "after a restart" in gateway.log()
    assert len(admin_json(gateway, "/admin/workers")[1]["workers"]) == 2
    assert status_of(gateway, "/extra2") == 200


def test_watch_picks_up_an_edit(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
) -> None:
    extra = {"workers": 2, "watch": True}
    gateway = start_gateway(version_config(1, app_backend, app_backend_2, extra))
    assert status_of(gateway, "/extra2") == 404
    write_config(gateway, version_config(2, app_backend, app_backend_2, extra))
    wait_for(lambda: status_of(gateway, "/extra2") == 200, "the edit was not picked up")
    # A worker may serve the new route before the supervisor has logged the whole reload.
    wait_for(lambda: "config reloaded (file change)" in gateway.log(), "no reload log line")
    # A bad edit is reported once and changes nothing.
    gateway.config_path.write_text(gateway.config_path.read_text() + "nonsense: [\n")
    wait_for(
        lambda: metric(gateway, "gateway_config_reloads_total", result="error") == 1,
        "the bad edit was not reported",
    )
    assert status_of(gateway, "/extra2") == 200
