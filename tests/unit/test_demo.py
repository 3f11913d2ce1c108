"""The bundled demo backend: greeting text, JSON, health, standalone CLI."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gateway.demo import start_demo, stop_demo


@pytest.fixture
async def demo() -> AsyncIterator[list[str]]:
    runners = await start_demo([0, 0])
    try:
        yield [f"{r.addresses[0][0]}:{r.addresses[0][1]}" for r in runners]
    finally:
        await stop_demo(runners)


async def test_each_instance_says_who_it_is(demo: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        for i, addr in enumerate(demo, start=1):
            async with session.get(f"http://{addr}/hello?x=1") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                assert await resp.text() == (
                    f"hello from demo-{i} at {addr}, you asked for GET /hello?x=1\n"
                )


async def test_any_method_and_body(demo: list[str]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{demo[1]}/a/b", data=b"x" * 1000) as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == f"hello from demo-2 at {demo[1]}, you asked for POST /a/b\n"


async def test_json_when_asked(demo: list[str]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"http://{demo[0]}/items/7",
            data=b"abc",
            headers={"Accept": "application/json", "X-Request-ID": "rid-1"},
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["instance"] == "demo-1"
    assert body["address"] == demo[0]
    assert body["method"] == "PUT"
    assert body["path"] == "/items/7"
    assert body["body_bytes"] == 3
    assert body["headers"]["X-Request-ID"] == "rid-1"


async def test_healthz(demo: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        for addr in demo:
            async with session.get(f"http://{addr}/healthz") as resp:
                assert resp.status == 200
                assert await resp.text() == "ok\n"


async def test_start_failure_releases_already_started_instances() -> None:
    runners = await start_demo([0])
    taken = runners[0].addresses[0][1]
    try:
        with pytest.raises(OSError):
            await start_demo([0, taken])
    finally:
        await stop_demo(runners)


async def test_standalone_cli_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.demo",
        "--ports",
        "0,0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        addrs = []
        for _ in range(2):
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            m = re.fullmatch(r"demo instance listening on (127\.0\.0\.1:\d+)\n", line)
            assert m, line
            addrs.append(m.group(1))
        async with aiohttp.ClientSession() as session:
            for i, addr in enumerate(addrs, start=1):
                async with session.get(f"http://{addr}/x") as resp:
                    assert (await resp.text()).startswith(f"hello from demo-{i} at {addr}")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_rejects_bad_ports() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.demo",
        "--ports",
        "90x1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"ports" in err


def test_app_type() -> None:
    from gateway.demo import create_demo_app

    assert isinstance(create_demo_app("demo-9"), web.Application)
