"""A real redis-server on a random loopback port, as a subprocess of the test.

Debian package: ``redis-server`` (``.ci/run`` installs it). Persistence is off (``--save ''``,
``--appendonly no``) so a restart starts from an empty keyspace and nothing is written to disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="gw-redis-")

    def start(self) -> None:
        if not os.path.exists(REDIS_SERVER):
            pytest.fail(
                "redis-server is not installed: install the Debian package 'redis-server' "
                "(apt-get install -y redis-server; .ci/run does this)"
            )
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while not _ping(self.port):
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode} on start")
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not answer PING within 10 s")
            time.sleep(0.01)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case a test left it paused
            proc.kill()
        proc.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server: connections stay open but nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def info(self, section: str) -> dict[str, str]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                data += chunk
                if not chunk:
                    break
                header, _, rest = data.partition(b"\r\n")
                if header.startswith(b"$") and len(rest) >= int(header[1:]) + 2:
                    break
        out: dict[str, str] = {}
        for line in data.decode().splitlines()[1:]:
            if ":" in line and not line.startswith("#"):
                name, _, value = line.partition(":")
                out[name] = value
        return out

    def command_calls(self, command: str) -> int:
        """Calls of ``command`` since start (INFO commandstats), failed calls included."""
        stats = self.info("commandstats").get(f"cmdstat_{command}", "")
        for field in stats.split(","):
            name, _, value = field.partition("=")
            if name == "calls":
                return int(value)
        return 0


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server._dir, ignore_errors=True)
