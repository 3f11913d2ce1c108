"""The admin port of a real gateway: reads need the token, secrets never leave (answers, logs,
`gateway check`), references come from the environment and files, exposure is warned about."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.integration.backends import AppBackend
from tests.integration.conftest import ROOT, GatewayProcess

TOKEN = "admin-token-for-integration-0123"
REDIS_PASSWORD = "redis-password-for-integration-0123"
PROTECTED = ["/admin/config", "/admin/routes", "/admin/upstreams", "/admin/workers"]


def request(
    gateway: GatewayProcess, path: str, method: str = "GET", token: str | None = None
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(gateway.admin_url + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def routes_to(app: AppBackend) -> dict[str, Any]:
    return {
        "upstreams": {"app": {"instances": [f"127.0.0.1:{app.port}"]}},
        "routes": [{"name": "app", "match": {"path": {"prefix": "/"}}, "upstream": "app"}],
    }


def gateway_check(
    path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_admin_reads_need_the_token_and_secrets_never_leave(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    config = {
        **routes_to(app_backend),
        # No limit uses it: the gateway never connects, but the URL is in the config.
        "redis": {"url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"},
    }
    gateway = start_gateway(config, admin={"token": TOKEN})
    secrets = (TOKEN.encode(), REDIS_PASSWORD.encode())

    for path in PROTECTED:
        status, body = request(gateway, path)
        assert status == 401, (path, body)
        assert not any(s in body for s in secrets)
        status, body = request(gateway, path, token=TOKEN)
        assert status == 200, (path, body)
        assert not any(s in body for s in secrets), (path, body)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert request(gateway, path)[0] == 200, path
    assert request(gateway, "/admin/reload", "POST")[0] == 401

    view = json.loads(request(gateway, "/admin/config", token=TOKEN)[1])
    assert view["config"]["admin"]["token"] == "<redacted>"
    assert view["config"]["redis"]["url"] == "redis://:<redacted>@127.0.0.1:6379/0"

    # A bad edit quoting the password is reported without it (answer, last_error, log).
    document = yaml.safe_load(gateway.config_path.read_text())
    document["redis"]["url"] = f"http://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
    gateway.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    status, body = request(gateway, "/admin/reload", "POST", token=TOKEN)
    assert status == 400 and b"redis.url" in body
    assert not any(s in body for s in secrets), body
    status, body = request(gateway, "/admin/config", token=TOKEN)
    assert b"redis.url" in body and not any(s in body for s in secrets)

    # A good edit that changes only the secret changes the hash.
    document["redis"]["url"] = f"redis://:{REDIS_PASSWORD}-2@127.0.0.1:6379/0"
    gateway.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    status, body = request(gateway, "/admin/reload", "POST", token=TOKEN)
    assert status == 200, body
    assert json.loads(body)["sha256"] != view["sha256"]

    log = gateway.log()
    assert "redis.url" in log  # the rejected reload was logged ...
    assert TOKEN not in log and REDIS_PASSWORD not in log  # ... without the secrets

    done = gateway_check(gateway.config_path)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert REDIS_PASSWORD not in done.stdout + done.stderr


def test_read_without_token_opens_reads_only(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(
        routes_to(app_backend), admin={"token": TOKEN, "read_without_token": True}
    )
    for path in PROTECTED:
        status, body = request(gateway, path)
        assert status == 200, path
        assert TOKEN.encode() not in body
    assert request(gateway, "/admin/reload", "POST")[0] == 401
    assert request(gateway, "/admin/reload", "POST", token=TOKEN)[0] == 200


def test_admin_beyond_loopback_without_token_is_warned_about(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    exposed = start_gateway(routes_to(app_backend), admin_host="0.0.0.0")
    assert "listens beyond loopback without admin.token" in exposed.log()
    done = gateway_check(exposed.config_path)
    assert done.returncode == 0 and "without admin.token" in done.stderr
    guarded = start_gateway(routes_to(app_backend), admin_host="0.0.0.0", admin={"token": TOKEN})
    assert "without admin.token" not in guarded.log()
    local = start_gateway(routes_to(app_backend))
    assert "without admin.token" not in local.log()


def test_secrets_from_the_environment_and_files_reach_every_worker(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, tmp_path: Path
) -> None:
    password_file = tmp_path / "redis-password"
    password_file.write_text(REDIS_PASSWORD + "\n")
    config = {
        **routes_to(app_backend),
        "workers": 2,
        "redis": {"url": f"redis://:${{file:{password_file}}}@127.0.0.1:6379/0"},
    }
    gateway = start_gateway(
        config,
        admin={"token": "${env:GW_IT_ADMIN_TOKEN}"},
        env={"GW_IT_ADMIN_TOKEN": TOKEN},
    )
    assert request(gateway, "/admin/config")[0] == 401
    status, body = request(gateway, "/admin/config", token=TOKEN)
    assert status == 200
    view = json.loads(body)["config"]
    assert view["admin"]["token"] == "${env:GW_IT_ADMIN_TOKEN}"  # the reference, not the value
    assert view["redis"]["url"] == f"redis://:${{file:{password_file}}}@127.0.0.1:6379/0"
    workers = json.loads(request(gateway, "/admin/workers", token=TOKEN)[1])["workers"]
    assert len(workers) == 2 and all(w["ready"] for w in workers)
    for _ in range(4):  # both workers built their config from the references
        with urllib.request.urlopen(gateway.base_url + "/x", timeout=10) as response:
            assert response.status == 200

    # A reload re-reads the references: a missing file is a config error with file:line:key.
    password_file.unlink()
    status, body = request(gateway, "/admin/reload", "POST", token=TOKEN)
    assert status == 400
    [error] = json.loads(body)["errors"]
    assert error.startswith(f"{gateway.config_path}:")
    assert ": redis.url: ${file:" in error and "cannot read" in error

    done = gateway_check(gateway.config_path, env={"GW_IT_ADMIN_TOKEN": TOKEN})
    assert done.returncode == 1
    assert "redis.url" in done.stderr
    password_file.write_text(REDIS_PASSWORD)
    done = gateway_check(gateway.config_path, env={"GW_IT_ADMIN_TOKEN": ""})
    assert done.returncode == 1
    assert "admin.token: must not be empty" in done.stderr
    without = {k: v for k, v in os.environ.items() if k != "GW_IT_ADMIN_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(gateway.config_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=without,
    )
    assert done.returncode == 1
    assert "admin.token: ${env:GW_IT_ADMIN_TOKEN}: environment variable" in done.stderr
    assert TOKEN not in done.stderr and REDIS_PASSWORD not in done.stderr
