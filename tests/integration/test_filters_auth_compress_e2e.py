"""forward_auth and compress end to end: a real gateway process, curl as the client, a real
auth service (aiohttp on its own loop thread) and the echo backend.

test_filters_e2e.py covers the other built-in filters the same way; the chain-level tests of
these two are tests/unit/test_filter_forward_auth.py and test_filter_compress.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.integration.backends import AppBackend, ThreadedApp
from tests.integration.conftest import GatewayProcess, echoed_headers, filtered_echo_route


class AuthService(ThreadedApp):
    """Answers 204 with an X-User for ``Bearer good``, 401 with a challenge otherwise; keeps
    the headers of every subrequest."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        super().__init__()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/check", self._check)

    async def _check(self, request: web.Request) -> web.Response:
        self.seen.append({name.lower(): value for name, value in request.headers.items()})
        if request.headers.get("Authorization") == "Bearer good":
            return web.Response(status=204, headers={"X-User": "u-42", "X-Internal": "no"})
        return web.Response(
            status=401, text="who are you?\n", headers={"WWW-Authenticate": 'Bearer realm="auth"'}
        )


@pytest.fixture(scope="module")
def auth_service() -> Iterator[AuthService]:
    service = AuthService()
    yield service
    service.close()


@pytest.fixture(scope="module")
def gateway(
    start_gateway: Callable[..., GatewayProcess],
    app_backend: AppBackend,
    auth_service: AuthService,
) -> GatewayProcess:
    return start_gateway(
        {
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [
                filtered_echo_route(
                    "guarded",
                    "/guarded",
                    [
                        {
                            "forward_auth": {
                                "url": f"http://127.0.0.1:{auth_service.port}/check",
                                "request_headers": ["authorization"],
                                "response_headers": ["x-user"],
                                "timeout": "2s",
                            }
                        }
                    ],
                ),
                filtered_echo_route(
                    "squeezed",
                    "/squeezed",
                    [{"compress": {"min_bytes": 0, "algorithms": ["zstd", "br", "gzip"]}}],
                ),
            ],
        }
    )


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", *args], capture_output=True, check=True, timeout=30)


def test_forward_auth_lets_an_admitted_request_through_with_the_chosen_header(
    gateway: GatewayProcess, auth_service: AuthService, app_backend: AppBackend
) -> None:
    admitted = _curl(
        "-H", "Authorization: Bearer good", "-H", "X-User: spoofed",
        gateway.base_url + "/guarded/a?q=admitted",
    )  # fmt: skip
    echoed = echoed_headers(admitted.stdout)
    assert echoed["x-user"] == "u-42"  # the auth service's value replaces the client's
    assert "x-internal" not in echoed  # not in response_headers: not copied
    # The backend is shared by the session's gateways: look for this request's own path.
    assert [r["path"] for r in app_backend.requests].count("/echo/a?q=admitted") == 1
    subrequest = auth_service.seen[-1]
    assert subrequest["authorization"] == "Bearer good"
    assert subrequest["x-forwarded-method"] == "GET"
    assert subrequest["x-forwarded-uri"] == "/guarded/a?q=admitted"
    assert "x-user" not in subrequest  # only the chosen request headers go to the auth service


def test_forward_auth_passes_a_refusal_back_and_never_forwards(
    gateway: GatewayProcess, auth_service: AuthService, app_backend: AppBackend, tmp_path: Path
) -> None:
    body_file = tmp_path / "body"
    refused = _curl(
        "-o", str(body_file), "-w", "%{http_code} %header{www-authenticate}",
        "-H", "Authorization: Bearer bad", gateway.base_url + "/guarded/a?q=refused",
    )  # fmt: skip
    assert refused.stdout.decode() == '401 Bearer realm="auth"'
    assert body_file.read_bytes() == b"who are you?\n"
    assert auth_service.seen[-1]["authorization"] == "Bearer bad"
    assert all("q=refused" not in r["path"] for r in app_backend.requests)  # never forwarded


@pytest.mark.parametrize("encoding", ["zstd", "br", "gzip"])
def test_compress_with_each_algorithm_decoded_by_curl(
    gateway: GatewayProcess, encoding: str, tmp_path: Path
) -> None:
    body_file = tmp_path / "body"
    result = _curl(
        "--compressed", "-H", f"Accept-Encoding: {encoding}", "-o", str(body_file),
        "-w", "%header{content-encoding}|%header{vary}|%{size_download}",
        gateway.base_url + "/squeezed/item",
    )  # fmt: skip
    content_encoding, vary, size = result.stdout.decode().split("|")
    assert content_encoding == encoding
    assert "accept-encoding" in vary.lower()
    body = body_file.read_bytes()  # curl decoded it
    assert json.loads(body)["path"] == "/echo/item"
    assert 0 < int(size) < len(body)  # fewer bytes crossed the wire than the body has
