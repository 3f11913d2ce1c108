"""Micro-benchmark of rate-limit decisions: the local fast path and the batched Redis path.

Run with ``python -m loadtest.bench_ratelimit [--keys N] [--redis-seconds S]``.

Local: nanoseconds per ``RouteLimiter.check_local`` call with the ``client_ip`` key (what the
listener adds per request for a route with a local limit that is not hit), next to an empty call
with the same arguments. Each number is the best of several chunks.

Redis: a real ``redis-server`` (Debian package ``redis-server``) on a free loopback port; ``C``
decisions are submitted per event-loop iteration (C concurrent requests) for a few seconds.
Reports process CPU per decision (client side: packing, the script call, callbacks) and the
latency from ``check`` to the callback (p50/p99), plus round trips (script calls) per decision,
with one script call per decision (``lease: false``) and with token leasing (each of the C keys
gets one request per wave, so its lease follows the wave rate).
``--hogs K`` runs K CPU-burning processes meanwhile (``--hogs 2`` on 2 cores: a loaded machine).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from gateway.proxy.headers import TrustedProxies
from gateway.ratelimit import Decision, LimitSpec, RedisStore, RouteLimiter

HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"bench"),
    (b"accept", b"*/*"),
]
CHUNK = 20_000


def _best_ns(run: object, ips: list[str], repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(ips)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - start) / len(ips) * 1e9)
    return best


def bench_local(keys: int) -> None:
    ips = [socket.inet_ntoa(os.urandom(4)) for _ in range(keys)]
    chunk = ips[:CHUNK]
    trusted = TrustedProxies(["10.0.0.0/8"])
    now = 1000.0

    def empty(now: float, ip: str, t: bool, h: list[tuple[bytes, bytes]], q: bytes) -> None:
        return None

    def make_run(fn: object, trusted_peer: bool = False) -> object:
        def run(batch: list[str]) -> None:
            f = fn
            for ip in batch:
                f(now, ip, trusted_peer, HEADERS, b"")  # type: ignore[operator]

        return run

    plain = RouteLimiter("r", [LimitSpec(10_000_000, 1.0, 1_000_000)], trusted=trusted)
    with_headers = RouteLimiter(
        "r", [LimitSpec(10_000_000, 1.0, 1_000_000)], trusted=trusted, headers=True
    )
    two = RouteLimiter(
        "r",
        [LimitSpec(10_000_000, 1.0, 1_000_000), LimitSpec(10_000_000, 60.0, key="route")],
        trusted=trusted,
    )
    xff_headers = [*HEADERS, (b"x-forwarded-for", b"198.51.100.7, 10.0.0.9")]

    def run_xff(batch: list[str]) -> None:
        f = plain.check_local
        for _ in batch:
            f(now, "10.0.0.1", True, xff_headers, b"")

    # Warm the bucket tables so that the measured keys are known ones (steady state) ...
    for limiter in (plain, with_headers, two):
        make_run(limiter.check_local)(ips)  # type: ignore[operator]
    gc.collect()
    base = _best_ns(make_run(empty), chunk)
    rows = [
        ("empty call (same arguments)", base),
        ("1 local limit, client_ip, known key", _best_ns(make_run(plain.check_local), chunk)),
        ("1 local limit + RateLimit headers", _best_ns(make_run(with_headers.check_local), chunk)),
        ("2 local limits (client_ip + route)", _best_ns(make_run(two.check_local), chunk)),
        ("1 local limit, trusted peer + XFF", _best_ns(run_xff, chunk)),
    ]
    # ... and new keys (each decision inserts one; the table evicts beyond its cap).
    fresh = RouteLimiter("r", [LimitSpec(10_000_000, 1.0, 1_000_000, max_keys=100_000)])
    new_ips = [socket.inet_ntoa(os.urandom(4)) for _ in range(CHUNK * 7)]
    parts = [new_ips[i * CHUNK : (i + 1) * CHUNK] for i in range(7)]
    best = float("inf")
    for part in parts:
        start = time.perf_counter()
        make_run(fresh.check_local)(part)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - start) / len(part) * 1e9)
    rows.append(("1 local limit, client_ip, new key each time", best))
    print("local decisions (ns per call; 'added' = minus the empty call)")
    for name, ns in rows:
        added = "" if name.startswith("empty") else f"  added {ns - base:7.0f}"
        print(f"  {name:46s} {ns:7.0f}{added}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _redis_run(url: str, concurrency: int, seconds: float, lease: bool) -> None:
    store = RedisStore(url, timeout=0.5, prefix="bench")
    spec = LimitSpec(10_000_000, 1.0, 1_000_000, store="redis", lease=lease)
    limiter = RouteLimiter("r", [spec], redis=store)
    waits: list[float] = []
    outstanding = 0
    loop = asyncio.get_running_loop()
    idle: asyncio.Future[None] = loop.create_future()

    def issue(ip: str) -> None:
        nonlocal outstanding
        started = time.perf_counter()

        def done(decision: Decision) -> None:
            nonlocal outstanding
            outstanding -= 1
            waits.append(time.perf_counter() - started)
            if not outstanding and not idle.done():
                idle.set_result(None)

        outstanding += 1
        decision = limiter.check(started, ip, False, HEADERS, b"", done)
        if decision is not None:
            done(decision)

    ips = [f"198.51.{i // 256}.{i % 256}" for i in range(concurrency)]

    async def wave() -> None:
        nonlocal idle
        idle = loop.create_future()
        for ip in ips:
            issue(ip)
        if outstanding:
            await idle

    await wave()  # warm up: connections and script load
    waits.clear()
    batches0 = store.batches
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    count = 0
    # Closed loop: C requests in flight; a new wave starts when the previous one is decided.
    while time.perf_counter() < end:
        await wave()
        count += concurrency
    cpu = time.process_time() - cpu0
    batches = store.batches - batches0
    waits.sort()
    mode = "lease" if lease else "per-request"
    p50 = statistics.median(waits) * 1e6
    p99 = waits[int(len(waits) * 0.99) - 1] * 1e6
    print(
        f"  {mode:11s} C={concurrency:4d}: {count / seconds:8.0f} decisions/s, "
        f"CPU {cpu / count * 1e6:6.1f} µs/decision, latency p50 {p50:7.0f} µs p99 {p99:7.0f} µs, "
        f"{count / max(batches, 1):6.1f} decisions per round trip, errors {store.errors}, "
        f"timeouts {store.timeouts}"
    )
    await store.close()


def bench_redis(seconds: float, hogs: int = 0) -> None:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        print("redis: skipped (install the Debian package redis-server)")
        return
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        print("redis decisions (one script call per event-loop iteration)")
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        # ``hogs`` processes spinning on the cores: decision latency on a loaded machine.
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)
        ]
        try:
            for lease in (False, True):
                for concurrency in (1, 16, 128):
                    url = f"redis://127.0.0.1:{port}/0"
                    runner(_redis_run(url, concurrency, seconds, lease))
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000, help="distinct client IPs")
    parser.add_argument("--redis-seconds", type=float, default=3.0, help="0 skips Redis")
    parser.add_argument("--hogs", type=int, default=0, help="CPU-burning processes during Redis")
    parser.add_argument("--skip-local", action="store_true", help="only the Redis part")
    args = parser.parse_args(argv)
    if not args.skip_local:
        bench_local(args.keys)
    if args.redis_seconds > 0:
        bench_redis(args.redis_seconds, args.hogs)


if __name__ == "__main__":
    main()
