"""Active health checks against real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web

from gateway.health.active import ActiveHealthChecker


@dataclass
class Backend:
    status: int = 200
    hits: int = 0
    hang: bool = False


async def start_backend(backend: Backend, port: int = 0) -> tuple[web.AppRunner, int]:
    async def health(request: web.Request) -> web.Response:
        backend.hits += 1
        if backend.hang:
            await asyncio.sleep(3600)
        return web.Response(status=backend.status, text="ok")

    app = web.Application()
    app.router.add_get("/healthz", health)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, runner.addresses[0][1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll (up to ~10 s: the ceiling only turns a hang into a clear failure)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not reached in time")


@pytest.fixture
async def runners() -> AsyncIterator[list[web.AppRunner]]:
    started: list[web.AppRunner] = []
    yield started
    for runner in started:
        await runner.cleanup()


async def test_transitions_follow_thresholds_and_flips(runners: list[web.AppRunner]) -> None:
    good, bad = Backend(200), Backend(503)
    good_runner, good_port = await start_backend(good)
    bad_runner, bad_port = await start_backend(bad)
    runners += [good_runner, bad_runner]
    down_port = free_port()
    targets = [f"127.0.0.1:{good_port}", f"127.0.0.1:{bad_port}", f"127.0.0.1:{down_port}"]
    events: list[tuple[str, bool]] = []
    checker = ActiveHealthChecker(
        targets,
        path="/healthz",
        interval=0.02,
        timeout=1.0,
        healthy_threshold=2,
        unhealthy_threshold=3,
        expected_statuses=[200],
        jitter=0.005,
        on_transition=lambda target, healthy: events.append((target, healthy)),
    )
    await checker.start()
    try:
        await wait_for(lambda: not checker.is_healthy(targets[1]))
        await wait_for(lambda: not checker.is_healthy(targets[2]))
        assert checker.is_healthy(targets[0])
        assert checker.state(targets[0]).probes >= 1
        assert checker.state(targets[1]).last_status == 503
        assert checker.state(targets[2]).last_error is not None
        assert set(events) == {(targets[1], False), (targets[2], False)}
        assert checker.counts() == {"healthy": 1, "unhealthy": 2}
        # A failing probe run is counted, the transition happens only at the threshold.
        bad_hits = bad.hits
        assert bad_hits >= 3

        # Flip: the good one fails, the bad one recovers, the down one comes up.
        good.status = 500
        bad.status = 200
        up_runner, _ = await start_backend(Backend(200), port=down_port)
        runners.append(up_runner)
        await wait_for(lambda: not checker.is_healthy(targets[0]))
        await wait_for(lambda: checker.is_healthy(targets[1]))
        await wait_for(lambda: checker.is_healthy(targets[2]))
        assert events[2:] and set(events[2:]) == {
            (targets[0], False),
            (targets[1], True),
            (targets[2], True),
        }
        assert checker.transitions == 5
        assert checker.state(targets[1]).transitions == 2
    finally:
        await checker.stop()


async def test_timeout_counts_as_failure_and_update_targets(runners: list[web.AppRunner]) -> None:
    slow = Backend(200, hang=True)
    slow_runner, slow_port = await start_backend(slow)
    fine = Backend(200)
    fine_runner, fine_port = await start_backend(fine)
    runners += [slow_runner, fine_runner]
    slow_target = f"127.0.0.1:{slow_port}"
    fine_target = f"127.0.0.1:{fine_port}"
    checker = ActiveHealthChecker(
        [slow_target],
        interval=0.02,
        timeout=0.05,
        healthy_threshold=1,
        unhealthy_threshold=2,
    )
    await checker.start()
    try:
        await wait_for(lambda: not checker.is_healthy(slow_target))
        assert checker.state(slow_target).last_error == "timeout"
        checker.update_targets([fine_target])
        assert checker.targets == [fine_target]
        await wait_for(lambda: fine.hits >= 2)
        assert checker.is_healthy(fine_target)
        with pytest.raises(KeyError):
            checker.state(slow_target)
    finally:
        await checker.stop()
    hits = fine.hits
    await asyncio.sleep(0.1)  # stopped: no more probes (a negative check, bounded wait)
    assert fine.hits == hits


async def test_initially_unhealthy_needs_successes_and_callback_errors_are_contained(
    runners: list[web.AppRunner],
) -> None:
    backend = Backend(204)
    runner, port = await start_backend(backend)
    runners.append(runner)
    target = f"127.0.0.1:{port}"

    def broken(target: object, healthy: bool) -> None:
        raise RuntimeError("boom")

    checker = ActiveHealthChecker(
        [target],
        interval=0.02,
        timeout=1.0,
        healthy_threshold=3,
        unhealthy_threshold=1,
        expected_statuses=[200, 204],
        on_transition=broken,
        initially_healthy=False,
    )
    assert not checker.is_healthy(target)
    await checker.start()
    try:
        await wait_for(lambda: checker.is_healthy(target))
        assert backend.hits >= 3
        backend.status = 500
        await wait_for(lambda: not checker.is_healthy(target))  # still probing after the error
    finally:
        await checker.stop()


def test_validation() -> None:
    with pytest.raises(ValueError):
        ActiveHealthChecker([], interval=0)
    with pytest.raises(ValueError):
        ActiveHealthChecker([], healthy_threshold=0)
    with pytest.raises(ValueError):
        ActiveHealthChecker([], path="healthz")
