"""SIGHUP re-reads the config file: a good file is swapped in, a bad one changes nothing."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess


def _status(gateway: GatewayProcess, path: str) -> int:
    try:
        with urllib.request.urlopen(gateway.base_url + path, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sighup_swaps_a_good_file_and_keeps_running_on_a_bad_one(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> None:
    upstreams = {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}}
    gateway = start_gateway(
        {
            "upstreams": upstreams,
            "routes": [{"name": "old", "match": {"path": {"prefix": "/old"}}, "upstream": "app"}],
        }
    )
    assert _status(gateway, "/old") == 200
    assert _status(gateway, "/new") == 404
    document = yaml.safe_load(gateway.config_path.read_text())
    document["routes"] = [{"name": "new", "match": {"path": {"prefix": "/new"}}, "upstream": "app"}]
    gateway.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    gateway.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: _status(gateway, "/new") == 200, "the new route never appeared")
    assert _status(gateway, "/old") == 404

    gateway.config_path.write_text(gateway.config_path.read_text() + "bogus_key: 1\n")
    gateway.process.send_signal(signal.SIGHUP)
    _wait_for(lambda: "bogus_key" in gateway.log(), "the bad file was not reported")
    assert "gateway.yaml:" in gateway.log()
    assert _status(gateway, "/new") == 200
    assert gateway.process.poll() is None
