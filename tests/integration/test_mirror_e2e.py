"""``mirror`` end to end: a real gateway, a real primary upstream and a real mirror server.
POST bodies below ``max_body_bytes`` (Content-Length and chunked) reach the mirror intact;
a body over the bound is not mirrored at all (docs/filters.md: a cut body would be another
request); a mirror that hangs or is down changes nothing for the client."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from aiohttp import web

from tests.integration.backends import AppBackend, ThreadedApp
from tests.integration.conftest import GatewayProcess, free_port

MAX_BODY = 4096


class MirrorServer(ThreadedApp):
    """Records every copy; with ``hold`` set, answers nothing until ``release``."""

    def __init__(self) -> None:
        self.copies: list[dict[str, Any]] = []
        self.arrived = 0  # copies whose handler started (held ones included)
        self.hold = False
        self._lock = threading.Lock()
        super().__init__()

    def add_routes(self, app: web.Application) -> None:
        import asyncio

        self._gate = asyncio.Event()
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.arrived += 1
        if self.hold:
            await self._gate.wait()
        with self._lock:
            self.copies.append(
                {
                    "method": request.method,
                    "path": request.path_qs,
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                    "body": body,
                }
            )
        return web.Response(status=503)  # the mirror's answer never matters

    def release(self) -> None:
        self.hold = False
        self.thread.loop.call_soon_threadsafe(self._gate.set)

    def copy_of(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            return next((c for c in self.copies if c["path"] == path), None)

    def close(self) -> None:
        self.release()
        self.thread.call(self.runner.cleanup())
        self.thread.stop()


@pytest.fixture
def mirror() -> Iterator[MirrorServer]:
    server = MirrorServer()
    yield server
    server.close()


def _config(app: AppBackend, mirror_url: str, **options: Any) -> dict[str, Any]:
    return {
        "upstreams": {"app": {"instances": [f"127.0.0.1:{app.port}"]}},
        "routes": [
            {
                "name": "mirrored",
                "match": {"path": {"prefix": "/"}},
                "upstream": "app",
                "filters": [
                    {
                        "mirror": {
                            "url": mirror_url,
                            "max_body_bytes": MAX_BODY,
                            "timeout": "10s",
                            **options,
                        }
                    }
                ],
            }
        ],
    }


def _post(
    gateway: GatewayProcess, path: str, body: bytes | Iterable[bytes], *, chunked: bool = False
) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={"content-type": "application/octet-stream", "x-copy": "yes"},
            encode_chunked=chunked,
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _poll(find: Callable[[], Any], what: str, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while not (found := find()):
        assert time.monotonic() < deadline, f"no {what} in {within}s"
        time.sleep(0.02)
    return found


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bodies_below_the_bound_reach_the_mirror_and_larger_ones_are_not_mirrored(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, mirror: MirrorServer
) -> None:
    gateway = start_gateway(_config(app_backend, f"http://127.0.0.1:{mirror.port}"))
    body = bytes(range(256)) * 12  # 3072 bytes, every byte value
    status, echoed = _post(gateway, "/echo/small?q=1", body)
    assert status == 200 and echoed["body_sha256"] == _sha(body)
    copy = _poll(lambda: mirror.copy_of("/echo/small?q=1"), "copy of the small POST")
    assert copy["method"] == "POST" and copy["body"] == body
    assert copy["headers"]["x-copy"] == "yes"
    assert copy["headers"]["content-length"] == str(len(body))

    # Chunked from the client, exactly at the bound: the copy carries the same bytes.
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * (MAX_BODY - 2000)]
    status, echoed = _post(gateway, "/echo/chunked", iter(chunks), chunked=True)
    assert status == 200 and echoed["body_size"] == MAX_BODY
    copy = _poll(lambda: mirror.copy_of("/echo/chunked"), "copy of the chunked POST")
    assert copy["body"] == b"".join(chunks)

    # One byte over the bound, with Content-Length and chunked: the primary gets it all,
    # the mirror nothing. A small POST after them is the marker that copies were sent.
    large = b"x" * (MAX_BODY + 1)
    status, echoed = _post(gateway, "/echo/large", large)
    assert status == 200 and echoed["body_sha256"] == _sha(large)
    status, echoed = _post(
        gateway, "/echo/large-chunked", iter([large[:10], large[10:]]), chunked=True
    )
    assert status == 200 and echoed["body_size"] == len(large)
    _post(gateway, "/echo/marker", b"m")
    _poll(lambda: mirror.copy_of("/echo/marker"), "copy of the marker")
    assert mirror.copy_of("/echo/large") is None
    assert mirror.copy_of("/echo/large-chunked") is None


def test_a_hanging_mirror_does_not_delay_the_primary_response(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, mirror: MirrorServer
) -> None:
    gateway = start_gateway(
        _config(app_backend, f"http://127.0.0.1:{mirror.port}", max_in_flight=2)
    )
    mirror.hold = True
    body = b"payload" * 100
    for i in range(5):  # two copies hang, the three after them are dropped (max_in_flight)
        started = time.monotonic()
        status, echoed = _post(gateway, f"/echo/held/{i}", body)
        assert status == 200 and echoed["body_sha256"] == _sha(body)
        assert time.monotonic() - started < 5.0  # far below the mirror's 10 s timeout
    _poll(lambda: mirror.arrived >= 2, "two held copies at the mirror")
    assert mirror.copies == []  # the responses above came while the mirror answered nothing
    mirror.release()
    _poll(lambda: len(mirror.copies) == 2, "the two held copies answered")
    assert mirror.arrived == 2
    # Once the held copies are done, copies go again.
    _post(gateway, "/echo/after", body)
    assert _poll(lambda: mirror.copy_of("/echo/after"), "copy after the release")["body"] == body


def test_a_mirror_that_is_down_changes_nothing_for_the_client(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(_config(app_backend, f"http://127.0.0.1:{free_port()}"))
    body = b"z" * 2000
    for i in range(10):
        status, echoed = _post(gateway, f"/echo/down/{i}", body)
        assert status == 200 and echoed["body_sha256"] == _sha(body)
        assert echoed["path"] == f"/echo/down/{i}"
