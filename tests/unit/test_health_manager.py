"""HealthManager: active checks flip instance health in the live snapshot (real servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from gateway.config import load_config_text
from gateway.health.manager import HealthManager
from gateway.snapshot import Snapshot, build_snapshot


async def _start(status: list[int]) -> tuple[web.AppRunner, int]:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=status[0])

    app = web.Application()
    app.router.add_get("/healthz", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_transitions_follow_the_probes_and_survive_a_rebuild() -> None:
    good_status, bad_status = [200], [503]
    good, good_port = await _start(good_status)
    bad, bad_port = await _start(bad_status)
    text = f"""
upstreams:
  u:
    instances: [127.0.0.1:{good_port}, 127.0.0.1:{bad_port}]
    health: {{path: /healthz, interval: 50ms, timeout: 1s, healthy_threshold: 1,
              unhealthy_threshold: 2}}
routes: [{{name: r, upstream: u}}]
"""
    config = load_config_text(text)
    holder: list[Snapshot] = [build_snapshot(config)]
    manager = HealthManager(lambda: holder[0])
    try:
        await manager.update(holder[0])
        upstream = holder[0].upstreams["u"]
        good_instance, bad_instance = upstream.instances
        await _wait_for(lambda: not bad_instance.available)
        assert good_instance.available
        assert {upstream.pick() for _ in range(4)} == {good_instance}
        # A rebuilt snapshot keeps the known health; recovery then shows in the new one.
        holder[0] = build_snapshot(config, holder[0])
        await manager.update(holder[0])
        rebuilt_bad = holder[0].upstreams["u"].instances[1]
        assert not rebuilt_bad.available
        bad_status[0] = 200
        await _wait_for(lambda: rebuilt_bad.available)
        assert manager.transitions()["u"] >= 2
        assert manager.transition_counts[("u", "unhealthy")] >= 1
        assert manager.transition_counts[("u", "healthy")] >= 1
        families = list(manager.collector().collect())
        samples = {s.labels["to"]: s.value for s in families[0].samples}
        assert families[0].name == "gateway_health_transitions"
        assert samples["unhealthy"] >= 1 and samples["healthy"] >= 1
    finally:
        await manager.stop()
        await good.cleanup()
        await bad.cleanup()
