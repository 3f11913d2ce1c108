"""End-to-end accuracy of a Redis-backed limit: admitted requests/s under wrk, Redis up or down.

Run with ``python -m loadtest.bench_ratelimit_redis [--workers 1,2] [--hogs 2] [--seconds 5]``.

Starts a real ``redis-server``, an nginx backend (as ``python -m loadtest`` does) and one
gateway (``workers: N``) with one route limited to ``--rate``/s, burst ``--burst``,
``key: route``, ``store: redis``,
``on_store_error: local``, then runs ``wrk -c50`` against it for ``--seconds``:

- ``up``: Redis answering. The admitted rate must stay at the limit.
- ``down``: Redis stopped before the run. The local fallback alone decides.

``--hogs K`` starts K CPU-burning processes for the length of each run (a loaded machine).
Prints, per row, the admitted requests/s after the initial burst (``(admitted - burst) / s``),
the offered requests/s, and the gateway's ``store_error`` decisions and Redis store counters,
plus the Redis round-trip percentiles each worker's store logs when it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loadtest.servers import LARGE_BODY_BYTES, free_port, gateway_yaml, nginx_backend_conf
from loadtest.wrk import parse_wrk_output, wrk_command

ROOT = Path(__file__).resolve().parents[1]


def _wait_http(url: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _ping_redis(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _nginx_backend(workdir: Path, port: int) -> list[str]:
    """nginx serving ``/small`` (the loadtest backend), in its own prefix under ``workdir``."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = workdir / f"nginx-{port}"
    www = prefix / "www"
    www.mkdir(parents=True, mode=0o755)
    (www / "large").write_bytes(b"x" * LARGE_BODY_BYTES)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_backend_conf(prefix, port, www))
    return [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]


@contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each: the loaded machine of the scenario."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _metric_sum(text: str, family: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(family + "{") and f'{label}="' in line:
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[value] = out.get(value, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_one(
    workdir: Path,
    *,
    workers: int,
    redis_up: bool,
    hogs: int,
    seconds: int,
    rate: int,
    burst: int,
    timeout: str | None,
    connections: int,
) -> dict[str, Any]:
    redis_port, backend_port, port, admin_port = (free_port() for _ in range(4))
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    redis_cfg: dict[str, Any] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    if timeout is not None:
        redis_cfg["timeout"] = timeout
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin_port}",
        "workers": workers,
        "redis": redis_cfg,
        "upstreams": {"bench": {"instances": [f"127.0.0.1:{backend_port}"]}},
        "routes": [
            {
                "name": "bench",
                "match": {"path": {"prefix": "/"}},
                "upstream": "bench",
                "rate_limit": {
                    "rate": f"{rate}/s",
                    "burst": burst,
                    "key": "route",
                    "store": "redis",
                    "on_store_error": "local",
                },
            }
        ],
    }
    config_path = workdir / f"gw-{workers}-{redis_up}-{hogs}.yaml"
    config_path.write_text(gateway_yaml(config))
    redis_argv = [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    with (
        _process(redis_argv, workdir / "redis.log") as redis_proc,
        _process(_nginx_backend(workdir, backend_port), workdir / "backend.log"),
        _process(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path)],
            workdir / "gateway.log",
        ),
    ):
        deadline = time.monotonic() + 10
        while not _ping_redis(redis_port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        _wait_http(f"http://127.0.0.1:{admin_port}/readyz")
        _wait_http(f"http://127.0.0.1:{port}/small")  # connections + script loaded
        if not redis_up:
            redis_proc.send_signal(signal.SIGKILL)
            redis_proc.wait()
        time.sleep(burst / rate + 0.2)  # the bucket is full again before the measured run
        before = _metric_sum(
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode(),
            "gateway_ratelimit_decisions_total",
            "result",
        )
        with cpu_hogs(hogs):
            wrk = subprocess.run(
                wrk_command(
                    f"http://127.0.0.1:{port}/small", duration_s=seconds, connections=connections
                ),
                capture_output=True,
                text=True,
                check=True,
            )
        text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
        after = _metric_sum(text, "gateway_ratelimit_decisions_total", "result")
    # Each worker's store logs its round-trip percentiles when it closes.
    latency = [
        line.split("round trip ", 1)[1]
        for line in (workdir / "gateway.log").read_text(errors="replace").splitlines()
        if "redis rate-limit store" in line and "round trip" in line
    ]
    result = parse_wrk_output(wrk.stdout)
    admitted = result.requests - result.non_2xx_3xx
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "workers": workers,
        "redis": "up" if redis_up else "down",
        "hogs": hogs,
        "admitted_per_s": (admitted - burst) / seconds,
        "offered_per_s": result.requests / seconds,
        "decisions": delta,
        "latency": latency,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma list of worker counts")
    parser.add_argument("--redis", default="up,down", help="comma list of up,down")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="CPU hogs")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--timeout", default=None, help="redis.timeout (default: the schema's)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-rl-redis-"))
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            for state in args.redis.split(","):
                row = run_one(
                    workdir,
                    workers=workers,
                    redis_up=state == "up",
                    hogs=args.hogs,
                    seconds=args.seconds,
                    rate=args.rate,
                    burst=args.burst,
                    timeout=args.timeout,
                    connections=args.connections,
                )
                if args.json:
                    print(json.dumps(row))
                    continue
                decisions = ", ".join(f"{k}={v:.0f}" for k, v in sorted(row["decisions"].items()))
                print(
                    f"workers={workers} redis={row['redis']:4s} hogs={args.hogs}: admitted "
                    f"{row['admitted_per_s']:7.0f}/s (limit {args.rate}/s), offered "
                    f"{row['offered_per_s']:7.0f}/s; {decisions}"
                )
                for line in row["latency"]:
                    print(f"    round trip {line}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
