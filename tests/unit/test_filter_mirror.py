"""mirror: sampled copies sent after the exchange to a real server, bodies up to a bound, a
dead mirror never affecting the request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from gateway.filters.chain import Chain
from tests.filters_support import filter_from_yaml, request


class MirrorTarget:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, req: web.Request) -> web.Response:
        body = await req.read()
        self.seen.append(
            (req.method, req.path_qs, {k.lower(): v for k, v in req.headers.items()}, body)
        )
        return web.Response(status=500)  # the mirror's answer never matters


@pytest.fixture
async def target() -> AsyncIterator[MirrorTarget]:
    server = MirrorTarget()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


async def _wait_for(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def _exchange(chain: Chain, method: str, body_chunks: list[bytes], **kw: object) -> None:
    req = request(method, **kw)  # type: ignore[arg-type]
    assert chain.on_request_headers(req, lambda _: None) is None
    for i, chunk in enumerate(body_chunks):
        assert chain.on_request_body(req, chunk, i == len(body_chunks) - 1) == chunk
    chain.on_log(req, 200, 0.001)


async def test_copies_with_body_after_the_exchange(target: MirrorTarget) -> None:
    item = filter_from_yaml(f"mirror: {{url: '{target.url}', max_body_bytes: 1KiB}}")
    chain = Chain("r", [item])
    assert chain.wants_request_body and chain.wants_log
    _exchange(
        chain,
        "POST",
        [b"hello ", b"world"],
        path="/orders",
        query="x=1",
        headers=[
            (b"content-type", b"text/plain"),
            (b"content-length", b"11"),
            (b"connection", b"keep-alive"),
            (b"x-a", b"1"),
        ],
    )
    await _wait_for(lambda: target.seen)
    method, path, headers, body = target.seen[0]
    assert (method, path, body) == ("POST", "/orders?x=1", b"hello world")
    assert headers["x-a"] == "1" and headers.get("connection") != "keep-alive"


async def test_bodies_over_the_bound_are_not_mirrored(target: MirrorTarget) -> None:
    item = filter_from_yaml(f"mirror: {{url: '{target.url}', max_body_bytes: 10}}")
    chain = Chain("r", [item])
    _exchange(chain, "POST", [b"0123456789", b"x"], headers=[(b"content-length", b"11")])
    _exchange(chain, "GET", [])
    await _wait_for(lambda: target.seen)
    assert [m for m, *_ in target.seen] == ["GET"] and item.dropped == 1  # type: ignore[attr-defined]


async def test_sampling(target: MirrorTarget) -> None:
    item = filter_from_yaml(f"mirror: {{url: '{target.url}', sample: 0}}")
    chain = Chain("r", [item])
    for _ in range(20):
        _exchange(chain, "GET", [])
    await asyncio.sleep(0)
    assert not item._tasks and not target.seen  # type: ignore[attr-defined]


async def test_a_dead_mirror_is_only_counted() -> None:
    item = filter_from_yaml("mirror: {url: 'http://127.0.0.1:9', timeout: 500ms}")
    chain = Chain("r", [item])
    _exchange(chain, "GET", [])
    await _wait_for(lambda: item.dropped == 1)  # type: ignore[attr-defined]


async def test_a_body_that_never_arrived_is_not_mirrored(target: MirrorTarget) -> None:
    item = filter_from_yaml(f"mirror: {{url: '{target.url}'}}")
    chain = Chain("r", [item])
    # The data plane ended the exchange before the body's last chunk (client gone, or body
    # hooks not called): mirroring it bodiless would send another request.
    _exchange(chain, "POST", [], headers=[(b"transfer-encoding", b"chunked")])
    _exchange(chain, "GET", [])
    await _wait_for(lambda: target.seen)
    assert [m for m, *_ in target.seen] == ["GET"] and item.dropped == 1  # type: ignore[attr-defined]
