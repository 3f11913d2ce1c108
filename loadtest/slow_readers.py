"""Memory held by slow readers, and whether it comes back (RSS of a real gateway process).

Starts a backend that answers every request with a ``--size`` body, a gateway in front of it,
then ``--clients`` connections that each send one GET and never read (a small SO_RCVBUF, so the
kernel cannot absorb the response for them). Reports the gateway's RSS at baseline (after a
warm-up), at the peak of the attack, right after the attackers closed, and ``--after`` seconds
later. Everything is on loopback, bounded in count and time.

    python -m loadtest.slow_readers --clients 1000 --size 1MiB
    python -m loadtest.slow_readers --repo /path/to/other/checkout --old-config   # compare
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class _Backend(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            assert self.transport is not None
            self.transport.write(self.response)


def start_backend(size: int) -> int:
    """A keep-alive backend in a thread: every request gets ``size`` bytes."""
    response = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size
    ready: list[int] = []
    started = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(
            loop.create_server(lambda: _Backend(response), "127.0.0.1", 0)
        )
        ready.append(server.sockets[0].getsockname()[1])
        started.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    started.wait(10)
    return ready[0]


def rss_kib(pid: int) -> int:
    """RSS of the gateway and all its children (workers), KiB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(child) for child in children]
    for one in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def _parse_size(text: str) -> int:
    units = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--size", default="1MiB")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the attack lasts")
    parser.add_argument("--after", type=float, default=30.0, help="seconds after the close")
    parser.add_argument("--repo", default=str(ROOT), help="checkout whose gateway to run")
    parser.add_argument(
        "--old-config", action="store_true", help="no limits keys (for a checkout without them)"
    )
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if not 1 <= args.clients <= 5000:
        parser.error("--clients must be within 1..5000")
    size = _parse_size(args.size)
    backend_port = start_backend(size)
    port, admin_port = _free_ports(2)
    limits: dict[str, object] = {"max_connections": 20_000}
    if not args.old_config:
        limits["send_timeout"] = f"{max(args.hold * 4, 60):.0f}s"  # the attack is not cut short
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin_port}",
        "workers": args.workers,
        "limits": limits,
        "upstreams": {"big": {"instances": [f"127.0.0.1:{backend_port}"]}},
        "routes": [{"name": "big", "match": {"path": {"prefix": "/"}}, "upstream": "big"}],
    }
    workdir = Path(tempfile.mkdtemp(prefix="slow-readers-"))
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
    log = (workdir / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(workdir / "gateway.yaml")],
        cwd=args.repo,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sockets: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise SystemExit("gateway did not start") from None
                time.sleep(0.05)
        # Warm-up: a few whole responses, so the baseline includes a used pool and buffers.
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/warm", timeout=10) as answer:
                answer.read()
        time.sleep(1.0)
        baseline = rss_kib(gateway.pid)
        request = b"GET /big HTTP/1.1\r\nHost: bench\r\n\r\n"
        for _ in range(args.clients):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            sockets.append(sock)
        peak = baseline
        end = time.monotonic() + args.hold
        while time.monotonic() < end:
            peak = max(peak, rss_kib(gateway.pid))
            time.sleep(0.1)
        for sock in sockets:
            sock.close()
        sockets.clear()
        time.sleep(1.0)
        closed = rss_kib(gateway.pid)
        samples = []
        start = time.monotonic()
        while time.monotonic() - start < args.after:
            time.sleep(min(5.0, args.after))
            samples.append((time.monotonic() - start, rss_kib(gateway.pid)))
        final = samples[-1][1] if samples else closed
        mib = 1024.0
        print(f"clients={args.clients} size={size} repo={args.repo} workers={args.workers}")
        print(f"RSS baseline     {baseline / mib:7.1f} MiB")
        print(f"RSS peak         {peak / mib:7.1f} MiB  (+{(peak - baseline) / mib:.1f})")
        print(f"RSS after close  {closed / mib:7.1f} MiB")
        for at, value in samples:
            print(f"RSS +{at:4.0f}s       {value / mib:7.1f} MiB")
        print(f"final/baseline   {final / baseline:7.2f}")
    finally:
        for sock in sockets:
            sock.close()
        gateway.terminate()
        try:
            gateway.wait(10)
        except subprocess.TimeoutExpired:
            gateway.kill()
        log.close()
        if os.environ.get("KEEP_LOG"):
            print(f"log: {workdir / 'gateway.log'}")


if __name__ == "__main__":
    main()
