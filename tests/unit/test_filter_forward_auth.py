"""forward_auth against a real auth service (aiohttp on a free port): what the subrequest
carries, 2xx with copied headers, denials passed back, timeouts and failure modes, caching."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gateway.filters.api import SUSPENDED, LocalReply
from gateway.filters.chain import Chain
from tests.filters_support import filter_from_yaml, header, request


class AuthService:
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.delay = 0.0
        self.url = ""

    async def handle(self, req: web.Request) -> web.Response:
        self.seen.append({k.lower(): v for k, v in req.headers.items()})
        if self.delay:
            await asyncio.sleep(self.delay)
        token = req.headers.get("Authorization")
        if token == "Bearer good":
            return web.Response(status=204, headers={"X-User": "u-42", "X-Other": "not copied"})
        if token == "Bearer login":
            return web.Response(status=302, headers={"Location": "https://login.example/"})
        return web.Response(
            status=401, text="who are you?\n", headers={"WWW-Authenticate": 'Bearer realm="x"'}
        )


@pytest.fixture
async def auth_service() -> AsyncIterator[AuthService]:
    service = AuthService()
    app = web.Application()
    app.router.add_route("*", "/check", service.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    service.url = f"http://127.0.0.1:{runner.addresses[0][1]}/check"
    yield service
    await runner.cleanup()


async def _run(chain: Chain, headers: list[tuple[bytes, bytes]], **kw: Any) -> tuple[Any, Any]:
    req = request(headers=headers, **kw)
    done: asyncio.Future[LocalReply | None] = asyncio.get_running_loop().create_future()
    result = chain.on_request_headers(req, done.set_result)
    if result is SUSPENDED:
        result = await asyncio.wait_for(done, 10)
    return req, result


def _chain(url: str, extra: str = "") -> Chain:
    return Chain(
        "r",
        [filter_from_yaml(f"forward_auth: {{url: '{url}', response_headers: [x-user]{extra}}}")],
    )


async def test_a_2xx_lets_the_request_through_with_chosen_headers(
    auth_service: AuthService,
) -> None:
    chain = _chain(auth_service.url)
    req, result = await _run(
        chain,
        [(b"authorization", b"Bearer good"), (b"x-user", b"spoofed"), (b"x-private", b"no")],
        path="/orders/7",
        query="page=2",
    )
    assert result is None
    assert header(req.headers, b"x-user") == b"u-42"  # the client's copy was replaced
    assert header(req.headers, b"x-other") is None
    (sent,) = auth_service.seen
    assert sent["authorization"] == "Bearer good" and "x-private" not in sent
    assert sent["x-forwarded-method"] == "GET" and sent["x-forwarded-uri"] == "/orders/7?page=2"
    assert sent["x-forwarded-host"] == "api.example" and sent["x-forwarded-for"] == "192.0.2.10"
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("token", "status", "passed_header"),
    [
        (b"Bearer bad", 401, (b"www-authenticate", b'Bearer realm="x"')),
        (b"Bearer login", 302, (b"location", b"https://login.example/")),
    ],
)
async def test_other_answers_go_back_to_the_client(
    auth_service: AuthService, token: bytes, status: int, passed_header: tuple[bytes, bytes]
) -> None:
    _, reply = await _run(_chain(auth_service.url), [(b"authorization", token)])
    assert isinstance(reply, LocalReply) and reply.status == status
    assert passed_header in reply.headers
    if status == 401:
        assert reply.body == b"who are you?\n"


@pytest.mark.parametrize(("on_error", "expected"), [("deny", 503), ("allow", None)])
async def test_timeout_and_failure_modes(
    auth_service: AuthService, on_error: str, expected: int | None
) -> None:
    auth_service.delay = 2.0
    chain = _chain(auth_service.url, f", timeout: 100ms, on_error: {on_error}")
    _, reply = await _run(chain, [(b"authorization", b"Bearer good")])
    assert (reply.status if reply is not None else None) == expected


async def test_unreachable_service_is_503() -> None:
    _, reply = await _run(_chain("http://127.0.0.1:9/check"), [])
    assert isinstance(reply, LocalReply) and reply.status == 503


async def test_cache_by_forwarded_header_values(auth_service: AuthService) -> None:
    chain = _chain(auth_service.url, ", cache_ttl: 1m")
    for _ in range(3):
        req, result = await _run(chain, [(b"authorization", b"Bearer good")])
        assert result is None and header(req.headers, b"x-user") == b"u-42"
    assert len(auth_service.seen) == 1
    # Cached: synchronous, no task.
    assert (
        chain.on_request_headers(request(headers=[(b"authorization", b"Bearer good")]), print)
        is None
    )
    _, denied = await _run(chain, [(b"authorization", b"Bearer bad")])
    assert isinstance(denied, LocalReply) and len(auth_service.seen) == 2
