"""Process wiring: config -> snapshot -> data plane listener + admin server, signals, reload.

Single process for now; the supervisor/worker split of the process-model issue builds on
``serve``'s pieces (``build_snapshot``, ``ProxyServer.set_snapshot``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from gateway.admin.app import AdminState, create_admin_app
from gateway.config import ConfigInvalid, format_errors, load_config
from gateway.config.model import GatewayConfig
from gateway.discovery import DiscoveryManager, add_discovery_routes
from gateway.health.manager import HealthManager
from gateway.metrics import GatewayMetrics, make_registry
from gateway.proxy.listener import ProxyServer
from gateway.snapshot import build_snapshot

log = logging.getLogger("gateway")

DRAIN_TIMEOUT = 10.0


async def serve(config: GatewayConfig, config_path: str, *, with_demo: bool = False) -> int:
    loop = asyncio.get_running_loop()
    metrics = GatewayMetrics()
    registry = make_registry(metrics)
    # Discovery first, so that the first snapshot already holds discovered instances.
    discovery = DiscoveryManager(config)
    registry.register(discovery.collector())
    await discovery.start()
    snapshot = build_snapshot(config, None, discovery.instances())
    server = ProxyServer(snapshot, metrics)
    state = AdminState(
        config=config,
        metrics=metrics,
        registry=registry,
        routes_describe=lambda: server.snapshot.routes.describe(),
    )

    demo_runners: list[web.AppRunner] = []
    if with_demo:
        from gateway.demo import start_demo

        demo = config.upstreams.get("demo")
        if demo is None:
            log.error("--with-demo needs an upstream named 'demo' in %s", config_path)
            return 1
        demo_runners = await start_demo([instance.port for instance in demo.instances])
        log.info("demo service on %s", ", ".join(instance.address for instance in demo.instances))

    health = HealthManager(lambda: server.snapshot)
    background: set[asyncio.Task[None]] = set()

    def in_background(coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    def apply_discovery() -> None:
        # A discovery change: same config, new instance lists; pools of kept instances survive.
        server.set_snapshot(build_snapshot(state.config, server.snapshot, discovery.instances()))
        in_background(health.update(server.snapshot))

    discovery.on_change = apply_discovery
    state.ready_detail = lambda: {"stale_upstreams": discovery.stale_upstreams()}
    admin_app = create_admin_app(state)
    add_discovery_routes(admin_app, discovery)
    admin_runner = web.AppRunner(admin_app, access_log=None)
    await admin_runner.setup()
    try:
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
        await server.start(config.listen.host, config.listen.port)
    except OSError as error:
        log.error("cannot listen: %s", error)
        await admin_runner.cleanup()
        await discovery.stop()
        return 1
    await health.update(server.snapshot)
    state.ready = True
    log.info(
        "gateway listening on %s (admin %s), %d routes, config %s sha256 %s",
        config.listen,
        config.admin,
        len(config.routes),
        config_path,
        config.sha256[:12],
    )

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def reload() -> None:
        try:
            new_config = load_config(config_path)
        except ConfigInvalid as invalid:
            log.error(
                "reload rejected, running config unchanged:\n%s", format_errors(invalid.errors)
            )
            return
        except OSError as error:
            log.error("reload rejected, cannot read %s: %s", config_path, error)
            return
        if new_config.listen != server.snapshot.config.listen:
            log.warning("listen address changed in %s: takes effect after a restart", config_path)
        discovered = discovery.instances(new_config)
        server.set_snapshot(build_snapshot(new_config, server.snapshot, discovered))
        state.config = new_config
        in_background(discovery.reconfigure(new_config))
        in_background(health.update(server.snapshot))
        log.info("config reloaded, sha256 %s", new_config.sha256[:12])

    loop.add_signal_handler(signal.SIGHUP, reload)

    await stop.wait()
    log.info("shutting down")
    state.draining = True
    await server.drain(DRAIN_TIMEOUT)
    await health.stop()
    await discovery.stop()
    await admin_runner.cleanup()
    for runner in demo_runners:
        await runner.cleanup()
    return 0
