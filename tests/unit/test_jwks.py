"""gateway/filters/jwks.py against a real HTTP JWKS server: the control plane's fetcher (one
fetch for many askers, jwks_min_refresh across them, a bad document never replacing good
keys) and the per-process store (waiting for an answer, one ask per min_refresh)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from gateway.filters.jwks import JwksFetcher, JwksSettings, JwksStore


def _jwk(kid: str) -> dict[str, Any]:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {**ECAlgorithm.to_jwk(public, as_dict=True), "kid": kid, "use": "sig"}


class Issuer:
    def __init__(self) -> None:
        self.document: Any = {"keys": [_jwk("k1")]}
        self.fetches = 0
        self.gate: asyncio.Event | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        return web.json_response(self.document)


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    server = Issuer()
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/jwks.json"
    yield server
    await runner.cleanup()


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


class Worker:
    """A store wired to a fetcher as a worker's is over the pipe (asks and answers)."""

    def __init__(self, fetcher: JwksFetcher) -> None:
        self.store = JwksStore()
        self.answers = 0

        def answer(url: str, data: Any, fetched_at: float) -> None:
            self.answers += 1
            self.store.update(url, data, fetched_at)

        def ask(url: str, settings: JwksSettings, unknown_kid: bool) -> None:
            fetcher.request(url, settings, unknown_kid=unknown_kid, reply=answer)

        self.store.install(ask)


def _gateway() -> tuple[JwksFetcher, list[Worker]]:
    workers: list[Worker] = []

    def push(url: str, data: Any, fetched_at: float) -> None:
        for worker in workers:
            worker.store.update(url, data, fetched_at)

    fetcher = JwksFetcher(push)
    workers += [Worker(fetcher) for _ in range(4)]
    return fetcher, workers


SETTINGS = JwksSettings(min_refresh=0.3, cache_ttl=600.0, timeout=2.0)


async def test_many_workers_asking_at_once_make_one_fetch(issuer: Issuer) -> None:
    issuer.gate = asyncio.Event()
    fetcher, workers = _gateway()
    for worker in workers:
        worker.store.watch(issuer.url, SETTINGS)
        assert worker.store.asking(issuer.url)
    await _until(lambda: issuer.fetches == 1)
    issuer.gate.set()
    await asyncio.gather(*(w.store.wait(issuer.url) for w in workers))
    assert all(set(w.store.keys(issuer.url) or {}) == {"k1"} for w in workers)
    assert issuer.fetches == 1 and fetcher.fetches(issuer.url) == 1


async def test_unknown_kids_fetch_at_most_once_per_min_refresh(issuer: Issuer) -> None:
    _fetcher, workers = _gateway()
    first, second, *_ = workers
    first.store.watch(issuer.url, SETTINGS)
    await first.store.wait(issuer.url)
    assert issuer.fetches == 1
    issuer.document = {"keys": [_jwk("k1"), _jwk("k2")]}
    # Another worker's ask within min_refresh of the fetch: answered with what is there.
    assert second.store.refresh(issuer.url, SETTINGS, unknown_kid=True)
    await second.store.wait(issuer.url)
    assert second.answers == 1 and set(second.store.keys(issuer.url) or {}) == {"k1"}
    # And the same worker again at once: refused by its own limit, no ask at all.
    assert not second.store.refresh(issuer.url, SETTINGS, unknown_kid=True)
    assert second.answers == 1 and issuer.fetches == 1
    # After min_refresh: one fetch, pushed to every worker.
    await asyncio.sleep(SETTINGS.min_refresh)  # the rate limit under test is a time span
    assert second.store.refresh(issuer.url, SETTINGS, unknown_kid=True)
    await second.store.wait(issuer.url)
    assert issuer.fetches == 2
    assert all(set(w.store.keys(issuer.url) or {}) == {"k1", "k2"} for w in workers)


@pytest.mark.parametrize(
    "document", [{"keys": []}, {"not": "a jwks"}, {"keys": [{"kty": "EC", "crv": "nope"}]}]
)
async def test_a_bad_document_keeps_the_keys_and_still_answers(
    issuer: Issuer, document: Any
) -> None:
    _fetcher, (worker, *_) = _gateway()
    worker.store.watch(issuer.url, SETTINGS)
    await worker.store.wait(issuer.url)
    good = worker.store.fetched_at(issuer.url)
    issuer.document = document
    await asyncio.sleep(SETTINGS.min_refresh)  # past the rate limit (a time span)
    assert worker.store.refresh(issuer.url, SETTINGS, unknown_kid=True)
    await worker.store.wait(issuer.url)  # answered, not left hanging
    assert not worker.store.asking(issuer.url)
    assert issuer.fetches == 2
    assert set(worker.store.keys(issuer.url) or {}) == {"k1"}
    assert worker.store.fetched_at(issuer.url) == good


async def test_an_unreachable_url_answers_with_no_keys() -> None:
    fetcher, (worker, *_) = _gateway()
    url = "http://127.0.0.1:9/jwks.json"
    worker.store.watch(url, JwksSettings(min_refresh=30.0, timeout=1.0))
    await worker.store.wait(url)
    assert not worker.store.asking(url) and worker.store.keys(url) is None
    assert fetcher.fetches(url) == 1


async def test_stale_keys_are_refetched_but_fresh_ones_are_not(issuer: Issuer) -> None:
    short = JwksSettings(min_refresh=0.0, cache_ttl=0.2, timeout=2.0)
    _fetcher, (worker, *_) = _gateway()
    worker.store.watch(issuer.url, short)
    await worker.store.wait(issuer.url)
    assert worker.store.refresh(issuer.url, short, unknown_kid=False)
    await worker.store.wait(issuer.url)
    assert issuer.fetches == 1  # fresh: answered from the cache
    await asyncio.sleep(short.cache_ttl)  # the keys age (a time span)
    assert worker.store.refresh(issuer.url, short, unknown_kid=False)
    await worker.store.wait(issuer.url)
    assert issuer.fetches == 2
