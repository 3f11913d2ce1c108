"""A tiny bundled backend so that the default config works with no external service.

Each instance answers every path with who it is, so that requests through the gateway show the
balancer alternating between instances::

    hello from demo-1 at 127.0.0.1:9001, you asked for GET /hello

With ``Accept: application/json`` the same facts come back as JSON, plus the request headers the
instance received (handy to see X-Forwarded-For, X-Request-ID and friends). ``/healthz`` answers
``ok`` for health checks.

Standalone: ``python -m gateway.demo --ports 9001,9002``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

import orjson
from aiohttp import web

__all__ = ["create_demo_app", "start_demo", "stop_demo"]

NAME_KEY: web.AppKey[str] = web.AppKey("demo_name", str)


def _local_address(request: web.Request) -> str:
    # Read the bound address from the socket, so an instance started on port 0 reports the real
    # port it got.
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return "unknown"
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _headers(request: web.Request) -> dict[str, str]:
    # Repeated fields are joined with ", " (RFC 9110 §5.3); keys become plain str for orjson.
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        key = str(name)
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


async def _hello(request: web.Request) -> web.Response:
    # Drain the body so keep-alive connections stay usable; report its size.
    body = await request.read()
    name = request.app[NAME_KEY]
    address = _local_address(request)
    if "application/json" in request.headers.get("Accept", ""):
        payload = {
            "instance": name,
            "address": address,
            "method": request.method,
            "path": request.raw_path,
            "headers": _headers(request),
            "body_bytes": len(body),
        }
        return web.Response(body=orjson.dumps(payload), content_type="application/json")
    text = f"hello from {name} at {address}, you asked for {request.method} {request.raw_path}\n"
    return web.Response(text=text)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def create_demo_app(name: str) -> web.Application:
    app = web.Application()
    app[NAME_KEY] = name
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _hello)
    return app


async def start_demo(ports: Sequence[int], host: str = "127.0.0.1") -> list[web.AppRunner]:
    """Start one demo instance per port (named demo-1, demo-2, ...). Port 0 picks a free one.

    The bound addresses are in ``runner.addresses``. Stop them with ``stop_demo``.
    """
    runners: list[web.AppRunner] = []
    try:
        for i, port in enumerate(ports, start=1):
            runner = web.AppRunner(create_demo_app(f"demo-{i}"), access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port).start()
    except BaseException:
        await stop_demo(runners)
        raise
    return runners


async def stop_demo(runners: Sequence[web.AppRunner]) -> None:
    for runner in runners:
        await runner.cleanup()


def _parse_ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ports: {text!r}") from exc
    if not ports or any(not 0 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"ports must be in 0..65535: {text!r}")
    return ports


async def _serve(ports: Sequence[int], host: str) -> None:
    runners = await start_demo(ports, host)
    for runner in runners:
        for addr in runner.addresses:
            print(f"demo instance listening on {addr[0]}:{addr[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await stop_demo(runners)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo", description="Run the bundled demo backend instances."
    )
    parser.add_argument(
        "--ports", type=_parse_ports, default=[9001, 9002], help="comma-separated, e.g. 9001,9002"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.ports, args.host))


if __name__ == "__main__":
    main()
