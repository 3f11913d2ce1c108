"""CPU per gRPC unary call through the gateway's native HTTP/2 path, against h2load.

A grpcio echo server (its own process, h2c) is the upstream; h2load sends gRPC-framed POSTs
(``content-type: application/grpc``, ``te: trailers``) first straight to it, then through a
gateway (one process, h2c listener, ``protocol: h2c`` upstream). The figure is each process's
CPU time over the calls it handled (/proc), so the upstream's own slowness does not count.

    python -m loadtest.bench_grpc_proxy [--requests 20000] [--clients 4] [--streams 10]
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from loadtest.procstat import cpu_us_per_request, tree_cpu_ticks

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import sys
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def h2load(url: str, body: Path, requests: int, clients: int, streams: int) -> int:
    """Run h2load; the number of 2xx responses."""
    out = subprocess.run(
        ["h2load", f"-n{requests}", f"-c{clients}", f"-m{streams}", "-d", str(body),
         "-H", "content-type: application/grpc", "-H", "te: trailers", url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    match = re.search(r"status codes: (\d+) 2xx", out.stdout)
    if match is None:
        raise RuntimeError(out.stdout + out.stderr)
    return int(match.group(1))


def measure(pid: int, url: str, body: Path, args: argparse.Namespace) -> tuple[float, int]:
    h2load(url, body, min(2000, args.requests), args.clients, args.streams)  # warm-up
    before = tree_cpu_ticks([pid])
    ok = h2load(url, body, args.requests, args.clients, args.streams)
    after = tree_cpu_ticks([pid])
    return cpu_us_per_request(before, after, ok) or 0.0, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=10)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_grpc"))
    body = workdir / "request.bin"
    message = b"x" * 64
    body.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        upstream_port = int(server.stdout.readline())
        listen, admin = free_port(), free_port()
        config = {
            "listen": [{"address": f"127.0.0.1:{listen}", "http2": {"enabled": True}}],
            "admin": f"127.0.0.1:{admin}",
            "state_dir": str(workdir / "state"),
            "upstreams": {"echo": {"instances": [f"127.0.0.1:{upstream_port}"], "protocol": "h2c"}},
            "routes": [{"name": "echo", "upstream": "echo"}],
        }
        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        path = "/bench.Echo/Unary"
        direct, ok_direct = measure(
            server.pid, f"http://127.0.0.1:{upstream_port}{path}", body, args
        )
        print(f"direct:  upstream {direct:7.1f} µs CPU/call ({ok_direct} calls)")
        via, ok_via = measure(gateway.pid, f"http://127.0.0.1:{listen}{path}", body, args)
        print(f"gateway: gateway  {via:7.1f} µs CPU/call ({ok_via} calls)")
    finally:
        for process in (gateway, server):
            if process is not None:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
