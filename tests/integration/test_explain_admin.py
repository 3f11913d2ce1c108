"""`gateway explain -a ADMIN`: explain against a running gateway's config and live instances."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]


def test_explain_from_the_admin_port(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(
        {
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [
                {
                    "name": "app",
                    "match": {"path": {"prefix": "/app/"}},
                    "upstream": "app",
                    "rewrite": {"strip_prefix": "/app"},
                }
            ],
        }
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "explain",
            "-a",
            f"127.0.0.1:{gateway.admin_port}",
            "GET",
            "anything",
            "/app/x?y=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "result: route 'app' (routes[0])" in result.stdout
    assert "upstream request: GET /x?y=1" in result.stdout
    # The live state from /admin/upstreams, not just the configured address.
    assert f"- 127.0.0.1:{app_backend.port} weight 1 healthy" in result.stdout


def test_explain_reports_an_unreachable_admin_port() -> None:
    from tests.integration.conftest import free_port

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "explain",
            "-a",
            f"127.0.0.1:{free_port()}",
            "GET",
            "h",
            "/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot read the running config" in result.stderr
