"""Session fixtures for discovery system tests: a real dnsmasq, a real Consul agent (-dev), named
HTTP backends, a gateway process with discovery config, and a load generator.

dnsmasq comes from Debian (``apt-get install dnsmasq-base``); Consul is fetched from Debian
bullseye by ``scripts/fetch_consul.py`` and cached under ~/.cache/gateway-tests/consul.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.integration.backends import LoopThread
from tests.integration.conftest import ROOT, GatewayProcess, free_port, free_ports, stop_process
from tests.metrics_text import metric_value

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def wait_for(
    condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or condition} (last value: {last!r})")


def http_json(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, raw.decode(errors="replace")


# --- backends -----------------------------------------------------------------------------------


class NamedBackends:
    """aiohttp sites in one thread; each answers ``GET /name`` with its name."""

    def __init__(self) -> None:
        self.thread = LoopThread()
        self.runners: dict[str, web.AppRunner] = {}
        self.ports: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    def add(self, name: str, hosts: tuple[str, ...] = ("127.0.0.1",)) -> int:
        port: int = self.thread.call(self._start(name, hosts))
        self.ports[name] = port
        return port

    async def _start(self, name: str, hosts: tuple[str, ...]) -> int:
        async def handle(request: web.Request) -> web.Response:
            self.hits[name] = self.hits.get(name, 0) + 1
            sockname = request.transport.get_extra_info("sockname") if request.transport else None
            return web.Response(text=f"{name}@{sockname[0] if sockname else '?'}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = 0
        for host in hosts:
            site = web.TCPSite(runner, host, port)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.runners[name] = runner
        return port

    def close(self) -> None:
        for runner in self.runners.values():
            self.thread.call(runner.cleanup())
        self.thread.stop()


@pytest.fixture(scope="session")
def backends() -> Iterator[NamedBackends]:
    pool = NamedBackends()
    for name in ("b1", "b2", "b3", "spare"):
        pool.add(name)
    yield pool
    pool.close()


# --- load ---------------------------------------------------------------------------------------


class Load:
    """Sequential keep-alive GETs through the gateway in a thread, recording every answer."""

    def __init__(self, port: int, path: str = "/name") -> None:
        self.port = port
        self.path = path
        self.results: list[tuple[float, str]] = []  # (monotonic time, backend name)
        self.failures: list[str] = []
        self.local_addresses: set[str] = set()  # backend-side socket addresses seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read().decode(errors="replace")
            except (OSError, http.client.HTTPException) as error:
                self.failures.append(f"{type(error).__name__}: {error}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            if response.status != 200:
                self.failures.append(f"HTTP {response.status}: {body[:200]}")
                continue
            name, _, local = body.partition("@")
            self.local_addresses.add(local)
            self.results.append((time.monotonic(), name))
            time.sleep(0.002)  # a steady trickle, not a benchmark
        conn.close()

    def names_since(self, since: float) -> set[str]:
        return {name for t, name in list(self.results) if t >= since}

    def count(self) -> int:
        return len(self.results)

    def last_seen(self, name: str) -> float | None:
        times = [t for t, n in list(self.results) if n == name]
        return max(times) if times else None

    def wait_more(self, n: int = 60) -> None:
        target = self.count() + n
        wait_for(lambda: self.count() >= target, what=f"{n} more requests")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


@pytest.fixture
def load_factory() -> Iterator[Callable[[int], Load]]:
    started: list[Load] = []

    def start(port: int) -> Load:
        load = Load(port)
        started.append(load)
        return load

    yield start
    for load in started:
        load.stop()


# --- gateway ------------------------------------------------------------------------------------


class DiscoveryGateway(GatewayProcess):
    """A gateway process whose admin setting can be a mapping (token, registry)."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, admin_extra: dict[str, Any] | None = None
    ) -> None:
        self.port, self.admin_port = free_ports(2)
        admin: Any = f"127.0.0.1:{self.admin_port}"
        if admin_extra:
            admin = {"address": admin, **admin_extra}
        full = {
            "listen": f"127.0.0.1:{self.port}",
            "admin": admin,
            "state_dir": str(workdir / "state"),  # never the user's: runs share no state
            **config,
        }
        # /admin/* needs the token when one is set.
        token = (admin_extra or {}).get("token")
        self.admin_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(full, sort_keys=False))
        self.log_path = workdir / "gateway.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path)],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._wait_ready()

    def discovery(self) -> dict[str, Any]:
        status, body = http_json(
            "GET", self.admin_url + "/admin/discovery", None, self.admin_headers
        )
        assert status == 200, body
        return body

    def upstream_addresses(self, upstream: str) -> set[str]:
        return {i["address"] for i in self.discovery()["upstreams"][upstream]["instances"]}


def expect_outage_keeps_last_set(
    gw: DiscoveryGateway, load: Load, backend: str, survivors: set[str]
) -> None:
    """With the discovery backend down: the last set stays, marked stale, its errors are
    counted, and traffic keeps flowing to the same instances."""
    wait_for(lambda: gw.discovery()["upstreams"]["web"]["stale"], what="stale mark")
    errors = metric_value(gw.metrics_text(), "gateway_discovery_errors_total", backend=backend)
    assert errors is not None and errors > 0
    outage_start = load.count()
    load.wait_more(100)
    assert {n for _, n in load.results[outage_start:]} == survivors


def route_all(upstream: str) -> list[dict[str, Any]]:
    return [{"name": "all", "match": {"path": {"prefix": "/"}}, "upstream": upstream}]


@pytest.fixture
def start_discovery_gateway(
    tmp_path: Path,
) -> Iterator[Callable[..., DiscoveryGateway]]:
    started: list[DiscoveryGateway] = []

    def start(
        config: dict[str, Any],
        admin_extra: dict[str, Any] | None = None,
        workdir: Path | None = None,
    ) -> DiscoveryGateway:
        directory = workdir or tmp_path / f"gw{len(started)}"
        directory.mkdir(exist_ok=True)
        process = DiscoveryGateway(config, directory, admin_extra)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


# --- dnsmasq ------------------------------------------------------------------------------------


class Dnsmasq:
    """dnsmasq on a random loopback port serving a hosts file and SRV records we write."""

    def __init__(self, workdir: Path) -> None:
        if not os.path.exists(DNSMASQ):
            pytest.fail(
                "dnsmasq is not installed (apt-get install -y dnsmasq-base); .ci/run installs it"
            )
        self.workdir = workdir
        self.port = self._free_udp_port()
        self.hosts = workdir / "hosts"
        self.conf = workdir / "dnsmasq.conf"
        self.log = workdir / "dnsmasq.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.set_records({}, [])

    @staticmethod
    def _free_udp_port() -> int:
        # dnsmasq serves UDP and TCP on the port: find one free for both.
        while True:
            port = free_port()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port

    def set_records(
        self,
        hosts: dict[str, list[str]],
        srv: list[tuple[str, str, int, int, int]],
        ttl: int = 1,
    ) -> None:
        """hosts: name -> addresses; srv: (name, target, port, priority, weight)."""
        self.hosts.write_text(
            "".join(
                f"{address} {name}\n" for name, addresses in hosts.items() for address in addresses
            )
        )
        lines = [f"local-ttl={ttl}", "local=/test/"]  # *.test is ours: NXDOMAIN, not REFUSED
        lines += [f"srv-host={n},{t},{p},{prio},{w}" for n, t, p, prio, w in srv]
        self.conf.write_text("\n".join(lines) + "\n")
        if self.process is not None:
            self.restart()  # srv-host lines are only read at start (SIGHUP rereads hosts only)

    def reload_hosts(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                DNSMASQ,
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                f"--addn-hosts={self.hosts}",
                f"--conf-file={self.conf}",
                "--pid-file=",
                "--user=root",
                "--log-facility=-",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._answers, timeout=10, what="dnsmasq to answer")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {self.log.read_text()[-2000:]}")
        # A minimal DNS query (id 1, RD, one question: "probe.test" A) over UDP.
        query = (
            b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05probe\x04test\x00\x00\x01\x00\x01"
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendto(query, ("127.0.0.1", self.port))
                return len(sock.recv(512)) >= 12
            except OSError:
                return False

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"))
    server.start()
    yield server
    server.stop()


# --- Consul -------------------------------------------------------------------------------------


def consul_binary() -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_consul.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(
            "Consul tests need a consul binary, fetched from Debian bullseye by"
            f" scripts/fetch_consul.py, and that failed:\n{result.stderr}",
            pytrace=False,
        )
    return result.stdout.strip()


class ConsulAgent:
    """``consul agent -dev`` on random loopback ports; restartable on the same ports."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        names = ("http", "serf-lan", "serf-wan", "server", "grpc")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.log = workdir / "consul.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def start(self) -> None:
        p = self.ports
        self.process = subprocess.Popen(
            [
                self.binary,
                "agent",
                "-dev",
                "-bind=127.0.0.1",
                "-client=127.0.0.1",
                "-advertise=127.0.0.1",
                f"-http-port={p['http']}",
                "-dns-port=-1",
                f"-serf-lan-port={p['serf-lan']}",
                f"-serf-wan-port={p['serf-wan']}",
                f"-server-port={p['server']}",
                f"-grpc-port={p['grpc']}",
                "-log-level=warn",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._leader, timeout=30, interval=0.1, what="Consul to elect itself leader")

    def _leader(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"consul exited: {self.log.read_text()[-3000:]}")
        try:
            status, leader = http_json("GET", self.address + "/v1/status/leader")
        except OSError:
            return False
        return status == 200 and bool(leader)

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http_json(method, self.address + path, body)

    def stop(self) -> None:
        stop_process(self.process, grace=15)
        self.process = None


@pytest.fixture(scope="session")
def consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(consul_binary(), tmp_path_factory.mktemp("consul"))
    agent.start()
    yield agent
    agent.stop()


# --- etcd ---------------------------------------------------------------------------------------

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdServer:
    """A single-member etcd (Debian's etcd-server) on random loopback ports with a temp data
    dir; restartable on the same ports and data (the keys survive a restart)."""

    def __init__(self, workdir: Path) -> None:
        if not os.path.exists(ETCD):
            pytest.fail(
                "etcd is not installed (apt-get install -y etcd-server); .ci/run installs it",
                pytrace=False,
            )
        self.workdir = workdir
        self.client_port, self.peer_port = free_ports(2)
        self.log = workdir / "etcd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.process = subprocess.Popen(
            [
                ETCD,
                "--name=test",
                f"--data-dir={self.workdir / 'data'}",
                f"--listen-client-urls={self.address}",
                f"--advertise-client-urls={self.address}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--log-level=warn",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._healthy, timeout=30, interval=0.05, what="etcd to answer")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"etcd exited: {self.log.read_text()[-3000:]}")
        try:
            status, _ = http_json("POST", self.address + "/v3/kv/range", {"key": "AA=="})
        except OSError:
            return False
        return status == 200

    def call(self, path: str, body: dict[str, Any]) -> Any:
        status, answer = http_json("POST", self.address + path, body)
        assert status == 200, answer
        return answer

    def put(self, key: str, value: str | dict[str, Any]) -> int:
        import base64

        raw = value if isinstance(value, str) else json.dumps(value)
        answer = self.call(
            "/v3/kv/put",
            {
                "key": base64.b64encode(key.encode()).decode(),
                "value": base64.b64encode(raw.encode()).decode(),
            },
        )
        return int(answer["header"]["revision"])

    def delete(self, key: str) -> int:
        import base64

        answer = self.call("/v3/kv/deleterange", {"key": base64.b64encode(key.encode()).decode()})
        return int(answer["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def stop(self) -> None:
        stop_process(self.process, grace=15)
        self.process = None


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


# --- ZooKeeper ----------------------------------------------------------------------------------

JAVA = shutil.which("java") or "/usr/bin/java"
# Jars of Debian's zookeeper package (and its dependencies) that a standalone server needs.
ZOOKEEPER_JARS = (
    "zookeeper",
    "zookeeper-jute",
    "slf4j-api",
    "slf4j-simple",
    "netty-handler",
    "netty-common",
    "netty-transport",
    "netty-buffer",
    "netty-codec",
    "netty-resolver",
    "netty-transport-native-epoll",
    "netty-transport-native-unix-common",
    "metrics-core",
    "commons-cli",
    "snappy-java",
    "commons-io",
)


def zookeeper_classpath() -> str:
    jars = [Path("/usr/share/java") / f"{name}.jar" for name in ZOOKEEPER_JARS]
    missing = [str(j) for j in jars if not j.exists()]
    if not os.path.exists(JAVA) or missing:
        pytest.fail(
            "ZooKeeper is not installed (apt-get install -y zookeeper, which brings java);"
            f" .ci/run installs it. Missing: {', '.join(missing) or JAVA}",
            pytrace=False,
        )
    return ":".join(str(j) for j in jars)


class ZooKeeperServer:
    """A standalone ZooKeeper (Debian's zookeeper jars, QuorumPeerMain in the foreground) on a
    random loopback port with a temp dataDir; restartable on the same port and data."""

    def __init__(self, workdir: Path) -> None:
        self.classpath = zookeeper_classpath()
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / "zookeeper.log"
        self.config = workdir / "zoo.cfg"
        self.config.write_text(
            "\n".join(
                [
                    "tickTime=500",  # sessions may be as short as 2 ticks: quick expiry tests
                    f"dataDir={workdir / 'data'}",
                    f"clientPort={self.port}",
                    "clientPortAddress=127.0.0.1",
                    "admin.enableServer=false",
                    "minSessionTimeout=1000",
                    "maxSessionTimeout=30000",
                    "4lw.commands.whitelist=ruok",
                ]
            )
            + "\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                JAVA,
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",  # start quickly; a test server needs no C2
                "-cp",
                self.classpath,
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                str(self.config),
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ok, timeout=30, interval=0.05, what="ZooKeeper to answer ruok")

    def _ok(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"ZooKeeper exited: {self.log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"ruok")
                return sock.recv(16) == b"imok"
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process, grace=15)
        self.process = None


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    yield server
    server.stop()
