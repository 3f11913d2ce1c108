"""Fixtures: real gateway processes on random loopback ports, and real backends.

Backends are shared per session; a gateway process is started per config (``start_gateway``) and
the common one (``gateway``) is shared by every test that does not need special settings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.backends import AppBackend, RawBackend

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all bound at once, so the kernel cannot hand out one twice."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stop_process(process: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds; reap it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class GatewayProcess:
    """``admin`` (settings such as token) turns the admin address into a mapping, listening
    on ``admin_host``; ``env`` is added to the process environment."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        *,
        admin: dict[str, Any] | None = None,
        admin_host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port, self.admin_port = free_ports(2)
        admin_address = f"{admin_host}:{self.admin_port}"
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "admin": {"address": admin_address, **admin} if admin else admin_address,
            # State (registry journals) under the test's own directory: runs never share it.
            "state_dir": str(workdir / "state"),
            **config,
        }
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "gateway.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._wait_ready()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as response:
            return response.read().decode()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


@pytest.fixture(scope="session")
def app_backend() -> Iterator[AppBackend]:
    backend = AppBackend("app-1")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def app_backend_2() -> Iterator[AppBackend]:
    backend = AppBackend("app-2")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def raw_backend() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def start_gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any], **options: Any) -> GatewayProcess:
        process = GatewayProcess(config, tmp_path_factory.mktemp("gateway"), **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def filtered_echo_route(
    name: str, prefix: str, filters: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """A route to upstream ``app`` under ``prefix`` with ``filters``, rewritten onto the echo
    backend's ``/echo`` (the filter end-to-end tests)."""
    return {
        "name": name,
        "match": {"path": {"prefix": prefix}},
        "upstream": "app",
        "filters": filters,
        "rewrite": {"strip_prefix": prefix, "prefix": "/echo"},
        **extra,
    }


def echoed_headers(body: bytes) -> dict[str, str]:
    """The request headers the echo backend saw, by lowercase name."""
    return {name.lower(): value for name, value in json.loads(body)["headers"]}


def default_config(app: AppBackend, app2: AppBackend, raw: RawBackend) -> dict[str, Any]:
    return {
        "limits": {"max_header_bytes": "16KiB", "max_uri_bytes": "4KiB", "max_body_bytes": "2GiB"},
        "upstreams": {
            "app": {"instances": [f"127.0.0.1:{app.port}"], "timeouts": {"read": "5s"}},
            "pair": {"instances": [f"127.0.0.1:{app.port}", f"127.0.0.1:{app2.port}"]},
            "raw": {"instances": [f"127.0.0.1:{raw.port}"]},
            "dead": {"instances": [f"127.0.0.1:{free_port()}"], "timeouts": {"connect": "1s"}},
        },
        "routes": [
            {"name": "raw", "match": {"path": {"prefix": "/raw"}}, "upstream": "raw"},
            {
                "name": "pair",
                "match": {"path": {"prefix": "/pair"}},
                "upstream": "pair",
                "rewrite": {"strip_prefix": "/pair"},
            },
            {"name": "dead", "match": {"path": {"prefix": "/dead"}}, "upstream": "dead"},
            {
                "name": "small-body",
                "match": {"path": {"prefix": "/small-body"}},
                "upstream": "app",
                "max_body_bytes": "1KiB",
                "rewrite": {"strip_prefix": "/small-body", "prefix": "/echo"},
            },
            {
                "name": "slow-route",
                "match": {"path": {"prefix": "/slow-route"}},
                "upstream": "app",
                "timeout": "500ms",
                "rewrite": {"strip_prefix": "/slow-route"},
            },
            {"name": "app", "match": {"path": {"prefix": "/"}}, "upstream": "app"},
        ],
    }


@pytest.fixture(scope="session")
def gateway(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
    raw_backend: RawBackend,
) -> GatewayProcess:
    return start_gateway(default_config(app_backend, app_backend_2, raw_backend))


# Bytes a read_response call read past its response, by socket.
_LEFTOVER: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(
    sock: socket.socket, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length, chunked or close-delimited) from a socket.

    Bytes read past the response (a pipelined answer that came in the same segment) are kept
    for the next call on the same socket."""
    buffer = _LEFTOVER.pop(sock, b"")
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed before a full response head: {buffer!r}")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status in (204, 304) or 100 <= status < 200:
        if rest:
            _LEFTOVER[sock] = rest  # the next response (also returned, as before)
        return status, headers, rest
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed mid-body")
            rest += data
        if len(rest) > length:
            _LEFTOVER[sock] = rest[length:]
        return status, headers, rest[:length]
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed mid-chunk")
                rest += data
            if size == 0:
                if len(rest) > 2:
                    _LEFTOVER[sock] = rest[2:]
                return status, headers, body
            body += rest[:size]
            rest = rest[size + 2 :]
    while True:
        data = sock.recv(65536)
        if not data:
            return status, headers, rest
        rest += data


def read_until_close(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes; (bytes, closed). ``closed`` is False if the
    peer still held the connection open after ``timeout`` seconds of silence."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        except TimeoutError:
            return data, False
        if not chunk:
            return data, True
        data += chunk


def is_closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the peer closed (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
