"""Registration throughput of the embedded registry, through the real HTTP API.

Run with ``python -m loadtest.bench_registry [--count 10000] [--concurrency 32]``. It starts a
gateway process (``python -m gateway run``) with a fresh ``state_dir`` in a temp directory, then
posts ``--count`` registrations to ``POST /register`` on the admin port from an aiohttp client
with ``--concurrency`` requests in flight, and prints registrations/s per block of 1,000 (so a
cost that grows with the registry's size shows as a falling rate), the total time, and the
journal/compaction figures from ``/admin/discovery``. Every request is acknowledged only after
its journal line is fsync'd, so this measures durable registrations.

``--watched`` puts every registration into one service that an upstream follows (each change
then also rebuilds that upstream's instance list); by default they are spread over 100 services
of which one is watched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]


def registration_body(index: int, services: int) -> dict[str, Any]:
    return {
        "service_name": f"svc{index % services}",
        "ip": f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}",
        "port": 8000 + index % 1000,
        "tags": ["bench"],
        "ttl": "10m",
    }


async def register_concurrently(
    admin_url: str,
    bodies: list[dict[str, Any]],
    concurrency: int,
    headers: dict[str, str] | None = None,
    on_ack: Any = None,
) -> list[float]:
    """POST every body to /register with ``concurrency`` in flight; returns the monotonic time
    at which each one was acknowledged (201), in body order. ``on_ack(index, answer)`` is called
    per acknowledgement. Any other status raises."""
    done = [0.0] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(bodies)):
        queue.put_nowait(index)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                async with session.post(admin_url + "/register", json=bodies[index]) as resp:
                    answer = await resp.json()
                    if resp.status != 201:
                        raise RuntimeError(f"registration {index}: {resp.status} {answer}")
                done[index] = time.monotonic()
                if on_ack is not None:
                    on_ack(index, answer)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc): less disturbed by other load on
    a shared machine than wall-clock rates."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("gateway not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="registrations to post")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--block", type=int, default=1000, help="report rate per this many")
    parser.add_argument("--watched", action="store_true", help="all into one watched service")
    args = parser.parse_args()

    from tests.integration.conftest import free_ports  # random free ports, all bound at once

    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        work = Path(tmp)
        port, admin_port = free_ports(2)
        config = {
            "listen": f"127.0.0.1:{port}",
            "admin": f"127.0.0.1:{admin_port}",
            "state_dir": str(work / "state"),
            "upstreams": {"web": {"discovery": "registry", "service": "svc0"}},
            "routes": [{"name": "all", "upstream": "web"}],
        }
        (work / "gateway.yaml").write_text(yaml.safe_dump(config))
        log = (work / "gateway.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(work / "gateway.yaml")],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        admin = f"http://127.0.0.1:{admin_port}"
        try:
            _wait_ready(admin, process)
            services = 1 if args.watched else 100
            bodies = [registration_body(i, services) for i in range(args.count)]
            cpu_before = cpu_seconds(process.pid)
            start = time.monotonic()
            acks = asyncio.run(register_concurrently(admin, bodies, args.concurrency))
            total = time.monotonic() - start
            cpu = cpu_seconds(process.pid) - cpu_before
            ordered = sorted(acks)
            print(f"{args.count} registrations, concurrency {args.concurrency}")
            previous = start
            for first in range(0, args.count, args.block):
                last = min(first + args.block, args.count) - 1
                rate = (last - first + 1) / (ordered[last] - previous)
                print(f"  {first:>6}-{last + 1:<6} {rate:8.0f} registrations/s")
                previous = ordered[last]
            print(f"total {total:.2f} s, {args.count / total:.0f} registrations/s")
            print(f"gateway CPU {cpu:.2f} s, {cpu / args.count * 1e6:.0f} µs per registration")
            print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            with urllib.request.urlopen(admin + "/admin/discovery", timeout=5) as response:
                report = json.load(response)["registries"]["registry"]
            print(
                "registry: {registrations} registrations, journal {journal_bytes} B,"
                " snapshot {snapshot_bytes} B, {compactions} compactions".format(**report)
            )
        finally:
            process.terminate()
            process.wait(10)
            log.close()


if __name__ == "__main__":
    main()
