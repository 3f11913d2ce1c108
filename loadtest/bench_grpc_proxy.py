"""CPU per gRPC unary call through the gateway's native HTTP/2 path, against h2load.

A grpcio echo server (its own process, h2c) is the upstream; h2load sends gRPC-framed POSTs
(``content-type: application/grpc``, ``te: trailers``) first straight to it, then through a
gateway (one process, h2c listener, ``protocol: h2c`` upstream), then through nginx
(``grpc_pass`` with upstream keep-alive, one worker, h2c listener) when nginx is installed. The
figure is each process's CPU time over the calls it handled (/proc), so the upstream's own
slowness does not count.

    flock /tmp/bench.lock python -m loadtest.bench_grpc_proxy [--requests 20000] [--clients 4]
        [--streams 10] [--no-nginx]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from loadtest.procstat import cpu_us_per_request, tree_cpu_ticks
from loadtest.servers import ManagedProcess, _nginx_common, _nginx_http_common, wait_until

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


def nginx_grpc_conf(prefix: Path, port: int, upstream_port: int) -> str:
    """nginx as a gRPC proxy: h2c listener (``listen ... http2``: nginx 1.22 has no
    ``http2 on;``), ``grpc_pass`` to the grpcio server with upstream keep-alive."""
    return (
        _nginx_common(prefix, 4096)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""    upstream grpc_bench {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        http2_max_concurrent_streams 128;
        location / {{ grpc_pass grpc://grpc_bench; }}
    }}
}}
"""
    )


def start_nginx(workdir: Path, upstream_port: int) -> tuple[ManagedProcess, int] | None:
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if nginx is None:
        return None
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_grpc_conf(prefix, port, upstream_port))
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    process = ManagedProcess("nginx", argv, prefix / "out.log").start()
    wait_until(lambda: port_open(port), 10, "nginx to listen", process)
    return process, port


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx grpc_pass out")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_grpc"))
    workdir.chmod(0o755)  # nginx workers run as nobody when started by root
    body = workdir / "request.bin"
    message = b"x" * 64
    body.write_bytes(b"\x00" + struct.pack(">I", len(message)) + message)
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    gateway: subprocess.Popen[bytes] | None = None
    nginx: ManagedProcess | None = None
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
        started = None if args.no_nginx else start_nginx(workdir, upstream_port)
        if started is not None:
            nginx, nginx_port = started
            ref, ok_ref = measure(nginx.pid, f"http://127.0.0.1:{nginx_port}{path}", body, args)
            print(f"nginx:   nginx    {ref:7.1f} µs CPU/call ({ok_ref} calls, grpc_pass)")
            if ref:
                print(f"gateway / nginx: {via / ref:.1f}x")
    finally:
        if nginx is not None:
            nginx.stop()
        for process in (gateway, server):
            if process is not None:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
