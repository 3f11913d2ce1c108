"""Reload safety on a real gateway: empty or truncated files, reloads that would drop most
routes, and `watch: true` reading a file that is still being written."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.backends import AppBackend
from tests.integration.conftest import ROOT, GatewayProcess
from tests.integration.test_reload import admin_json, metric, status_of, wait_for


def routes_config(app: AppBackend, names: list[str], **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "upstreams": {"app": {"instances": [f"127.0.0.1:{app.port}"]}},
        "routes": [
            {"name": name, "match": {"path": {"prefix": f"/{name}"}}, "upstream": "app"}
            for name in names
        ],
    }


def write_config(gateway: GatewayProcess, document: dict[str, Any]) -> None:
    document = {"listen": f"127.0.0.1:{gateway.port}", "admin": gateway.admin_url[7:], **document}
    gateway.config_path.write_text(yaml.safe_dump(document, sort_keys=False))


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GATEWAY_ADMIN_TOKEN": ""},
    )


@pytest.mark.parametrize(
    "content", [b"", b"\n\n", b"# routes will come later\n# (nothing yet)\n"], ids=repr
)
def test_check_and_run_refuse_an_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_bytes(content)
    done = gateway_cli("check", "-c", str(path))
    assert done.returncode == 1
    assert f"{path}:1: routes: the config file is empty" in done.stderr
    done = gateway_cli("run", "-c", str(path))
    assert done.returncode == 1
    assert "refusing to start" in done.stderr


def test_explicit_empty_routes_are_fine(
    tmp_path: Path, start_gateway: Callable[..., GatewayProcess]
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("# a gateway that only serves the admin API\nroutes: []\n")
    done = gateway_cli("check", "-c", str(path))
    assert done.returncode == 0, done.stderr
    assert "0 routes" in done.stdout
    gateway = start_gateway({"routes": []})  # starts, is ready, routes nothing
    assert status_of(gateway, "/anything") == 404
    assert admin_json(gateway, "/readyz")[0] == 200


@pytest.mark.parametrize("truncated", [b"", b"# emptied by an editor\n", b"listen: 1\n"])
def test_sighup_after_truncation_keeps_the_running_routes(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, truncated: bytes
) -> None:
    gateway = start_gateway(routes_config(app_backend, ["a", "b"]))
    gateway.config_path.write_bytes(truncated)
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: metric(gateway, "gateway_config_reloads_total", result="error") == 1,
        "the truncated file was not rejected",
    )
    assert status_of(gateway, "/a") == 200 and status_of(gateway, "/b") == 200
    assert admin_json(gateway, "/readyz")[0] == 200
    last_error = admin_json(gateway, "/admin/config")[1]["reload"]["last_error"]
    assert any(f"{gateway.config_path}:" in e and "routes" in e for e in last_error["errors"])
    assert metric(gateway, "gateway_config_reloads_total", result="success") == 0


def test_watch_ignores_a_truncated_file(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(routes_config(app_backend, ["a", "b"], watch=True))
    gateway.config_path.write_bytes(b"")
    wait_for(
        lambda: metric(gateway, "gateway_config_reloads_total", result="error") == 1,
        "the truncated file was not rejected",
    )
    assert status_of(gateway, "/a") == 200
    assert admin_json(gateway, "/readyz")[0] == 200


def test_a_reload_dropping_too_many_routes_is_refused_unless_forced(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(routes_config(app_backend, ["a", "b", "c", "d"]))
    admin = f"127.0.0.1:{gateway.admin_port}"

    # A normal edit: one of four routes goes (25%), one comes.
    write_config(gateway, routes_config(app_backend, ["a", "b", "c", "e"]))
    code, result = admin_json(gateway, "/admin/reload", "POST")
    assert code == 200, result
    assert status_of(gateway, "/e") == 200 and status_of(gateway, "/d") == 404

    # Half the routes vanish: refused, reported, counted; nothing changes.
    write_config(gateway, routes_config(app_backend, ["a", "b"]))
    code, result = admin_json(gateway, "/admin/reload", "POST")
    assert code == 409 and result["result"] == "refused", result
    [error] = result["errors"]
    assert error.startswith(f"{gateway.config_path}:")
    assert ": routes: refusing a reload that removes 2 of the 4 running routes" in error
    assert metric(gateway, "gateway_config_reloads_total", result="refused") == 1
    assert metric(gateway, "gateway_config_reloads_total", result="error") == 0
    last_error = admin_json(gateway, "/admin/config")[1]["reload"]["last_error"]
    assert last_error["result"] == "refused" and last_error["errors"] == [error]
    assert status_of(gateway, "/c") == 200 and status_of(gateway, "/e") == 200
    assert "refused, running config unchanged" in gateway.log()

    done = gateway_cli("reload", "-a", admin)
    assert done.returncode == 1
    assert "refusing a reload" in done.stderr and "--force" in done.stderr
    done = gateway_cli("reload", "-a", admin, "--force")
    assert done.returncode == 0, done.stderr
    assert status_of(gateway, "/c") == 404 and status_of(gateway, "/a") == 200

    # `routes: []` on a running gateway with routes is a 100% drop: forced only.
    write_config(gateway, {"routes": []})
    code, result = admin_json(gateway, "/admin/reload", "POST")
    assert code == 409, result
    assert status_of(gateway, "/a") == 200
    code, result = admin_json(gateway, "/admin/reload?force=1", "POST")
    assert code == 200, result
    assert status_of(gateway, "/a") == 404
    assert admin_json(gateway, "/readyz")[0] == 200


def test_the_drop_ratio_is_configurable(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    strict = {"reload": {"refuse_drop_ratio": 0.2}}
    gateway = start_gateway(routes_config(app_backend, ["a", "b", "c", "d"], **strict))
    write_config(gateway, routes_config(app_backend, ["a", "b", "c"], **strict))  # 25% >= 20%
    code, result = admin_json(gateway, "/admin/reload", "POST")
    assert code == 409, result
    assert "reload.refuse_drop_ratio is 20%" in result["errors"][0]


def test_watch_never_applies_a_half_written_file(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    names = ["r0", "r1", "r2", "r3"]
    gateway = start_gateway(routes_config(app_backend, names, watch=True))
    document = {
        "listen": f"127.0.0.1:{gateway.port}",
        "admin": gateway.admin_url[7:],
        **routes_config(app_backend, [*names, "r4"], watch=True),
    }
    text = yaml.safe_dump(document, sort_keys=False)
    # Cut before route r3: the first half is a valid config with 3 of the 4 routes (a drop of
    # 25%, which the drop check lets through), so only waiting for the file to settle stops it.
    cut = text.index("- name: r3")
    half, rest = text[:cut], text[cut:]
    half_sha = hashlib.sha256(half.encode()).hexdigest()[:12]
    with gateway.config_path.open("w") as f:
        f.write(half)
        f.flush()
        # The watcher has seen the half (it says it waits, or, without the settle window,
        # it applied it); the editor now finishes writing.
        wait_for(lambda: f"sha256 {half_sha}" in gateway.log(), "the half was never seen")
        f.write(rest)
    wait_for(lambda: status_of(gateway, "/r4") == 200, "the complete file was not applied")
    applied = [line for line in gateway.log().splitlines() if "config reloaded" in line]
    assert not any(half_sha in line for line in applied), applied
    assert metric(gateway, "gateway_config_reloads_total", result="success") == 1
    assert all(status_of(gateway, f"/{name}") == 200 for name in names)
