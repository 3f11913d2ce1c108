"""``python -m loadtest --instructions``: user-space instructions per request, under callgrind.

Wall-clock and CPU-time figures move with whatever else the machine is doing; an instruction
count does not. For each scenario x proxy this runs the proxy (one process) under
``valgrind --tool=callgrind``, warms it up with K requests, zeroes callgrind's counters
(``callgrind_control -z``, sent straight through vgdb), sends exactly N requests over 8
keep-alive connections from a small raw-socket client in this process (not under valgrind),
dumps the counters (``callgrind_control -d``) and divides the dump's ``summary:`` (Ir) by N.
Kernel work is not counted: callgrind sees user space only. Timer work (the gateway's 100 ms
sweep) grows with wall-clock time, not with requests: it is measured separately (S seconds
without requests) and subtracted. The backend (nginx answering from memory) and Redis run
natively. See the README's benchmark section for the method and its limits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from loadtest import report
from loadtest.harness import parse_list
from loadtest.procstat import PROC
from loadtest.servers import (
    LARGE_BODY_BYTES,
    ManagedProcess,
    caddyfile,
    extra_route_paths,
    free_port,
    gateway_config,
    gateway_yaml,
    haproxy_conf,
    nginx_backend_conf,
    nginx_proxy_conf,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PROXIES = ("gateway", "nginx", "haproxy", "caddy")
POST_BODY = b"x" * 1024  # a small form-sized body: the cost of a body, not of copying one
# A limit that is never hit: 1,000,000/s with a burst of 1,000,000 (N is a few thousand).
NEVER_HIT_RATE = 1_000_000
NEVER_HIT_BURST = 1_000_000
# Go's asynchronous preemption signals (SIGURG) trip an assertion in callgrind's signal
# handling (threads.c, vgCallgrind_post_signal) and kill the run; without them the scheduler
# preempts at function calls only. One P: one OS thread runs Go code, like one nginx worker.
CADDY_UNDER_CALLGRIND = {"GODEBUG": "asyncpreemptoff=1", "GOMAXPROCS": "1"}


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    method: str = "GET"
    path: str = "/small"
    body: bytes = b""
    extra_routes: int = 0
    rate_limit: str | None = None  # None, "local" or "redis"
    lease: bool = True  # redis: token leasing (the config default) or one script call per request
    filters: tuple[dict[str, Any], ...] = ()  # the gateway's route filters (gateway only)
    # The proxies whose configuration can express the scenario; the others are skipped with a note.
    proxies: tuple[str, ...] = PROXIES

    def request(self) -> bytes:
        """The exact bytes sent for every request (keep-alive: no ``Connection: close``)."""
        head = f"{self.method} {self.path} HTTP/1.1\r\nHost: {HOST}\r\n"
        if self.body or self.method == "POST":
            head += f"Content-Length: {len(self.body)}\r\nContent-Type: text/plain\r\n"
        return head.encode("ascii") + b"\r\n" + self.body


def last_prefix_route_path(extra_routes: int) -> str:
    """A path below the last prefix route of ``extra_route_paths`` (one of the last routes)."""
    paths = [path for kind, path in extra_route_paths(extra_routes) if kind == "prefix"]
    return paths[-1] + "small"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("small", "keep-alive GET of a 13-byte body"),
        Scenario(
            "post",
            f"keep-alive POST of a {len(POST_BODY)}-byte body",
            method="POST",
            path="/post",
            body=POST_BODY,
        ),
        Scenario(
            "routes10k",
            "10,000 routes; the request matches one of the last (a prefix route)",
            path=last_prefix_route_path(9_999),
            extra_routes=9_999,
            proxies=("gateway", "nginx"),
        ),
        Scenario(
            "ratelimit-local",
            f"a local per-client limit that is never hit ({NEVER_HIT_RATE:,}/s)",
            rate_limit="local",
            proxies=("gateway", "nginx"),
        ),
        Scenario(
            "ratelimit-redis",
            f"a Redis-backed per-client limit that is never hit ({NEVER_HIT_RATE:,}/s)",
            rate_limit="redis",
            proxies=("gateway",),  # nginx, haproxy and caddy have no Redis-backed limit built in
        ),
        Scenario(
            "ratelimit-redis-per-request",
            "the ratelimit-redis limit with lease: false (one script call per request)",
            rate_limit="redis",
            lease=False,
            proxies=("gateway",),
        ),
        Scenario(
            "filter-empty",
            "the small GET on a route with one filter whose only hook returns None",
            filters=({"python": {"class": "loadtest.bench_filters:EmptyFilter"}},),
            proxies=("gateway",),  # the cost of the gateway's filter seam
        ),
        Scenario(
            "filter-headers",
            "the small GET on a route with a headers filter (one request and one response set)",
            filters=(
                {
                    "headers": {
                        "request": {"set": {"x-client": "{client_ip}"}},
                        "response": {"set": {"x-gateway": "bench"}},
                    }
                },
            ),
            proxies=("gateway",),
        ),
    )
}


# Preferred loopback ports. The same numbers every run keep the generated configs byte for byte
# the same, and with them the hashes of every address string and port the proxy keeps in dicts
# (random ports moved the gateway's count by up to 0.2% between runs).
PREFERRED_PORTS = {"backend": 18471, "redis": 18472, "proxy": 18473, "admin": 18474}


def stable_port(role: str) -> int:
    """The preferred port of ``role`` when it is free, else any free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind it
        try:
            sock.bind((HOST, PREFERRED_PORTS[role]))
        except OSError:
            return free_port()
        return PREFERRED_PORTS[role]


class InstructionsError(Exception):
    """A setup problem that stops the whole run (printed without a traceback)."""


# --------------------------------------------------------------------------- callgrind output


@dataclass(frozen=True, slots=True)
class CallgrindTotals:
    events: tuple[str, ...]
    summary: tuple[int, ...]  # the ``summary:`` line: what ran since the counters were zeroed
    totals: tuple[int, ...] | None  # the ``totals:`` line (the sum of the dump's cost lines)

    def event(self, name: str = "Ir") -> int:
        if name not in self.events:
            raise CallgrindParseError(f"event {name} not collected (events: {self.events})")
        return self.summary[self.events.index(name)]


class CallgrindParseError(ValueError):
    pass


def parse_callgrind_totals(text: str) -> CallgrindTotals:
    """The ``events:``, ``summary:`` and ``totals:`` lines of one callgrind dump.

    ``summary:`` is used (callgrind_annotate's PROGRAM TOTALS): the counter difference since
    ``callgrind_control -z``. ``totals:``, the sum of the cost lines, was seen to exceed it by
    up to 3% after a zero (with instrumentation on from the start: cost from before the zero
    that stays attached to some call sites), so it only stands in when a dump has no summary.
    """
    events: tuple[str, ...] | None = None
    totals: tuple[int, ...] | None = None
    summary: tuple[int, ...] | None = None
    for line in text.splitlines():
        if line.startswith("events:"):
            events = tuple(line.split(":", 1)[1].split())
        elif line.startswith("totals:"):
            totals = _costs(line)
        elif line.startswith("summary:"):
            summary = _costs(line)
    if events is None:
        raise CallgrindParseError("no 'events:' line: not a callgrind dump")
    if summary is None:
        summary = totals
    if summary is None:
        raise CallgrindParseError("no 'summary:' or 'totals:' line: the dump is incomplete")
    if len(summary) > len(events):
        raise CallgrindParseError(f"{len(summary)} costs for {len(events)} events")
    # Trailing zero costs may be left out (callgrind format); pad them back.
    summary = summary + (0,) * (len(events) - len(summary))
    return CallgrindTotals(events, summary, totals)


def _costs(line: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in line.split(":", 1)[1].split())
    except ValueError:
        raise CallgrindParseError(f"bad cost line {line!r}") from None


def per_request(instructions: int, requests: int) -> float:
    if requests <= 0:
        raise ValueError(f"requests must be positive, not {requests}")
    return instructions / requests


def per_request_excluding_timers(
    instructions: int, requests: int, seconds: float, idle_per_s: float | None
) -> float:
    """(instructions - idle rate x window) / requests: what the requests themselves cost.

    The idle rate is what the proxy runs per second with its connections open and no traffic
    (timers); under valgrind a window lasts longer when the machine is busy, so without this
    the count drifts with the load (0.3% for the gateway between an idle and a busy machine).
    """
    timers = (idle_per_s or 0.0) * max(0.0, seconds)
    return per_request(round(instructions - timers), requests)


def relative_spread(values: Sequence[float]) -> float | None:
    """(max - min) / mean of repeated measurements; None for fewer than two."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / mean if mean else None


def callgrind_argv(valgrind: str, out_file: Path, argv: Sequence[str]) -> list[str]:
    """Run ``argv`` under callgrind with instrumentation off until ``callgrind_control -i on``
    (sent as the vgdb monitor command ``instrumentation on``).

    Uninstrumented, valgrind runs a program several times faster, which matters for the
    gateway's start (Python imports, 10,000 routes to validate); the harness switches
    instrumentation on before the warm-up and zeroes the counters after it.

    No ``--trace-children``: every proxy is configured so that one process serves (the gateway
    with ``workers: 1`` runs the data plane in its own event loop, nginx with
    ``master_process off``), and that process is the one valgrind starts.
    """
    return [
        valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={out_file}",
        "--instr-atstart=no",
        "--vgdb=yes",  # vgdb (and callgrind_control) talk to the process through vgdb
        *argv,
    ]


# --------------------------------------------------------------------------- configs


def gateway_document(
    scenario: Scenario, port: int, admin_port: int, backend_port: int, redis_port: int | None
) -> dict[str, Any]:
    """The gateway's config for ``scenario``: ``workers: 1``, so one process serves."""
    document = gateway_config(port, admin_port, backend_port, scenario.extra_routes, workers=1)
    if scenario.rate_limit is not None:
        limit: dict[str, Any] = {
            "rate": f"{NEVER_HIT_RATE}/s",
            "burst": NEVER_HIT_BURST,
            "key": "client_ip",
        }
        if scenario.rate_limit == "redis":
            if redis_port is None:
                raise InstructionsError(f"{scenario.name} needs a Redis port")
            document["redis"] = {"url": f"redis://{HOST}:{redis_port}/0"}
            limit.update(store="redis", on_store_error="local", lease=scenario.lease)
        for route in document["routes"]:
            route["rate_limit"] = dict(limit)
    if scenario.filters:
        for route in document["routes"]:
            route["filters"] = [dict(entry) for entry in scenario.filters]
    return document


def proxy_files(
    name: str, scenario: Scenario, directory: Path, port: int, backend_port: int
) -> tuple[str, str]:
    """(file name, text) of the reference proxy's config for ``scenario``, one process serving."""
    if name not in scenario.proxies:
        raise InstructionsError(f"{name} cannot express the {scenario.name} scenario")
    if name == "nginx":
        rate = (NEVER_HIT_RATE, NEVER_HIT_BURST) if scenario.rate_limit == "local" else None
        text = nginx_proxy_conf(
            directory,
            port,
            backend_port,
            scenario.extra_routes,
            single_process=True,
            rate_limit=rate,
        )
        return "nginx.conf", text
    if name == "haproxy":  # nbthread 1: one thread of one process
        return "haproxy.cfg", haproxy_conf(port, backend_port, maxconn=256)
    if name == "caddy":  # a Go program: all its threads are one process, callgrind sums them
        return "Caddyfile", caddyfile(port, backend_port)
    raise InstructionsError(f"unknown proxy {name}")


def proxy_argv(name: str, exe: str, directory: Path, config: Path) -> list[str]:
    if name == "nginx":
        return [exe, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
    if name == "haproxy":
        return [exe, "-db", "-f", str(config)]
    if name == "caddy":
        return [exe, "run", "--config", str(config), "--adapter", "caddyfile"]
    raise InstructionsError(f"unknown proxy {name}")


# --------------------------------------------------------------------------- the client


class ResponseError(Exception):
    pass


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)


def parse_response(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(status, bytes used) of the first complete response in ``buf``, or None if incomplete.

    Enough HTTP/1.1 for the benchmark: a Content-Length or a chunked body (no trailers).
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[: end + 2])
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ResponseError(f"bad status line {head[:60]!r}") from None
    start = end + 4
    m = _CONTENT_LENGTH.search(head)
    if m is not None:
        total = start + int(m.group(1))
        return (status, total) if len(buf) >= total else None
    if _CHUNKED.search(head):
        pos = start
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
            pos = line_end + 2 + size + 2
            if len(buf) < pos:
                return None
            if size == 0:
                return status, pos
    if status in (204, 304) or 100 <= status < 200:
        return status, start
    raise ResponseError(f"response without Content-Length or chunked body: {head[:200]!r}")


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)


class KeepAliveClient:
    """``connections`` keep-alive connections; ``run`` sends exactly ``count`` requests.

    At most ``inflight`` requests are outstanding at once (no pipelining on a connection); the
    next request goes to the connection idle longest, so with ``inflight=1`` the requests rotate
    over all connections one at a time: every request then meets the same event-loop state.
    """

    def __init__(self, host: str, port: int, connections: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.conns: list[_Conn] = []
        self.selector = selectors.DefaultSelector()
        try:
            for _ in range(connections):
                sock = socket.create_connection((host, port), timeout=timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                conn = _Conn(sock)
                self.conns.append(conn)
                self.selector.register(sock, selectors.EVENT_READ, conn)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.sock.close()
        self.conns.clear()
        self.selector.close()

    def run(self, request: bytes, count: int, inflight: int) -> Counter[int]:
        """Send ``count`` requests, wait for every response; return the status counts."""
        if not 1 <= inflight <= len(self.conns):
            raise ValueError(f"inflight must be 1..{len(self.conns)}, not {inflight}")
        statuses: Counter[int] = Counter()
        idle: deque[_Conn] = deque(self.conns)
        sent = done = 0
        deadline = time.monotonic() + self.timeout_s
        while done < count:
            while sent < count and sent - done < inflight:
                conn = idle.popleft()
                conn.sock.setblocking(True)  # small requests: one send, never a partial one
                conn.sock.sendall(request)
                conn.sock.setblocking(False)
                sent += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{done}/{count} responses after {self.timeout_s:.0f}s")
            for key, _ in self.selector.select(min(left, 1.0)):
                conn = key.data
                data = conn.sock.recv(65536)
                if not data:
                    raise ResponseError(f"connection closed after {done}/{count} responses")
                conn.buf += data
                while (parsed := parse_response(conn.buf)) is not None:
                    status, used = parsed
                    del conn.buf[:used]
                    statuses[status] += 1
                    done += 1
                    idle.append(conn)
        return statuses


# --------------------------------------------------------------------------- process helpers


def thread_states(pid: int, proc: str = PROC) -> list[str]:
    """The state letter (proc(5) field 3) of every thread of ``pid``; empty if it is gone."""
    states = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"{proc}/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError),
                open(f"{proc}/{pid}/task/{tid}/stat", encoding="utf-8") as f,
            ):
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    return states


def wait_quiet(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until every thread sleeps (the proxy is back in epoll_wait) twice in a row.

    Zeroing or dumping while the proxy still finishes the last request would move part of that
    request across the boundary.
    """
    quiet_polls = 0
    deadline = time.monotonic() + timeout_s
    while quiet_polls < 2:
        states = thread_states(pid)
        if not states:
            raise InstructionsError(f"process {pid} is gone")
        quiet_polls = quiet_polls + 1 if all(s in "SD" for s in states) else 0
        if time.monotonic() > deadline:
            raise InstructionsError(f"process {pid} did not go idle within {timeout_s:.0f}s")
        time.sleep(0.005)


def monitor(vgdb: str, pid: int, command: str, timeout_s: float = 60.0) -> float:
    """Send a callgrind monitor command (``zero``, ``dump``, ``instrumentation on``) through
    vgdb; return the monotonic time half-way through the call, when it most likely took effect.

    ``callgrind_control -z PID`` does the same through a Perl wrapper that first lists the
    processes, and vgdb waits 100 ms by default before it interrupts a process blocked in
    ``epoll_wait``; calling vgdb with ``--max-invoke-ms=5`` makes the instant of the command
    (so the window the timer work is subtracted for) 3-5 times sharper.
    """
    started = time.monotonic()
    out = subprocess.run(
        [vgdb, f"--pid={pid}", "--max-invoke-ms=5", *command.split()],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    answer = (out.stdout + out.stderr).strip()
    if out.returncode != 0 or "not recognised" in answer or "error" in answer.lower():
        raise InstructionsError(
            f"vgdb --pid={pid} {command} failed ({out.returncode}): {answer[-500:]}"
        )
    return (started + time.monotonic()) / 2


def newest_dump(out_file: Path) -> Path:
    """The highest-numbered ``OUT.N`` file a ``dump`` (callgrind_control -d) wrote."""
    parts = []
    for path in out_file.parent.glob(out_file.name + ".*"):
        suffix = path.name[len(out_file.name) + 1 :]
        if suffix.isdigit():
            parts.append((int(suffix), path))
    if not parts:
        raise InstructionsError(f"no callgrind dump next to {out_file}")
    return max(parts)[1]


def http_ok(port: int, request: bytes, timeout_s: float = 2.0) -> bool:
    try:
        client = KeepAliveClient(HOST, port, 1, timeout_s)
    except OSError:
        return False
    try:
        return client.run(request, 1, 1).get(200) == 1
    except (OSError, TimeoutError, ResponseError):
        return False
    finally:
        client.close()


# --------------------------------------------------------------------------- the run


@dataclass(slots=True)
class Measurement:
    scenario: str
    proxy: str
    repetition: int
    requests: int
    instructions: int
    seconds: float
    idle_instructions_per_s: float | None = None

    @property
    def raw_per_request(self) -> float:
        return per_request(self.instructions, self.requests)

    @property
    def per_request(self) -> float:
        """Instructions per request without the timer work of the window (when measured)."""
        return per_request_excluding_timers(
            self.instructions, self.requests, self.seconds, self.idle_instructions_per_s
        )


class InstructionsRun:
    def __init__(self, args: argparse.Namespace, workdir: Path, tools: Mapping[str, str | None]):
        self.args = args
        self.workdir = workdir
        self.tools = tools
        self.processes: list[ManagedProcess] = []
        self.backend_port = 0
        self.redis_port: int | None = None
        self.notes: list[str] = []
        self.dumps: list[Path] = []
        self._seq = 0

    def _dir(self, name: str) -> Path:
        self._seq += 1
        d = self.workdir / f"{self._seq:03d}-{name}"
        d.mkdir(mode=0o755)
        return d

    def _spawn(
        self, name: str, argv: list[str], directory: Path, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(
            name, argv, directory / "output.log", cwd=directory, env=dict(env or os.environ)
        )
        self.processes.append(proc)
        return proc.start()

    def _stop(self, proc: ManagedProcess) -> None:
        proc.stop(grace_s=30.0)  # valgrind writes its final dump on exit
        with contextlib.suppress(ValueError):
            self.processes.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up the others
                print(f"warning: stopping {proc.name}: {exc!r}", file=sys.stderr)
        self.processes.clear()

    def start_backend(self) -> None:
        nginx = self.tools.get("nginx")
        if not nginx:
            raise InstructionsError("nginx is required as the backend (apt-get install nginx)")
        port = stable_port("backend")
        d = self._dir("backend")
        www = d / "www"
        www.mkdir(mode=0o755)
        (www / "large").write_bytes(b"x" * LARGE_BODY_BYTES)
        (www / "large").chmod(0o644)
        conf = d / "nginx.conf"
        conf.write_text(nginx_backend_conf(d, port, www, any_path_ok=True))
        argv = [nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
        proc = self._spawn("backend", argv, d)
        request = SCENARIOS["small"].request()
        wait_until(lambda: http_ok(port, request), 20, f"the nginx backend on {port}", proc)
        self.backend_port = port

    def start_redis(self) -> None:
        redis = self.tools.get("redis-server")
        if not redis:
            raise InstructionsError("redis-server is missing (apt-get install redis-server)")
        port = stable_port("redis")
        d = self._dir("redis")
        argv = [redis, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        proc = self._spawn("redis", [*argv, "--dir", str(d)], d)

        def pong() -> bool:
            try:
                with socket.create_connection((HOST, port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(pong, 20, f"redis-server on {port}", proc)
        self.redis_port = port

    def start_proxy(self, name: str, scenario: Scenario) -> tuple[ManagedProcess, int, Path]:
        """The proxy under callgrind: (process, listen port, callgrind out file)."""
        valgrind = self.tools["valgrind"]
        assert valgrind is not None
        d = self._dir(f"{name}-{scenario.name}")
        out_file = d / "callgrind.out"
        port = stable_port("proxy")
        env = dict(os.environ)
        if name == "gateway":
            admin = stable_port("admin")
            cfg = d / "gateway.yaml"
            document = gateway_document(scenario, port, admin, self.backend_port, self.redis_port)
            cfg.write_text(gateway_yaml(document))
            python = self.args.python
            argv = [python, "-m", "gateway", "run", "-c", str(cfg)]
            pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
            # A fixed hash seed: str hashes (dict probing, set order) are the same every run.
            env.update(PYTHONPATH=pythonpath, PYTHONHASHSEED="0")
            proc = self._spawn(name, callgrind_argv(valgrind, out_file, argv), d, env)
        else:
            exe = self.tools[name]
            assert exe is not None
            file_name, text = proxy_files(name, scenario, d, port, self.backend_port)
            cfg = d / file_name
            cfg.write_text(text)
            # Caddy wants writable data/config homes; keep them in our temp dir.
            env.update(HOME=str(d), XDG_DATA_HOME=str(d), XDG_CONFIG_HOME=str(d))
            if name == "caddy":
                env.update(CADDY_UNDER_CALLGRIND)
            argv = proxy_argv(name, exe, d, cfg)
            proc = self._spawn(name, callgrind_argv(valgrind, out_file, argv), d, env)
        request = scenario.request()
        wait_until(
            lambda: http_ok(port, request, timeout_s=10.0),
            self.args.ready_timeout,
            f"{name} under callgrind on port {port}",
            proc,
        )
        return proc, port, out_file

    def measure(self, scenario: Scenario, name: str, repetition: int) -> Measurement:
        control = self.tools["vgdb"]
        assert control is not None
        args = self.args
        proc, port, out_file = self.start_proxy(name, scenario)
        try:
            pid = proc.pid
            client = KeepAliveClient(HOST, port, args.connections, args.timeout)
            try:
                request = scenario.request()
                monitor(control, pid, "instrumentation on")
                warm = client.run(request, args.warmup_requests, args.inflight)
                _check_statuses(warm, args.warmup_requests, f"{scenario.name}/{name} warm-up")
                wait_quiet(pid)
                zeroed = monitor(control, pid, "zero")
                statuses = client.run(request, args.requests, args.inflight)
                _check_statuses(statuses, args.requests, f"{scenario.name}/{name}")
                wait_quiet(pid)
                seconds = monitor(control, pid, "dump") - zeroed
                dump = newest_dump(out_file)
                idle_per_s = self._idle_rate(pid, out_file) if args.idle_seconds else None
            finally:
                client.close()
            totals = parse_callgrind_totals(dump.read_text(errors="replace"))
            self.dumps.append(dump)
            if not proc.alive():
                raise InstructionsError(f"{name} died during the run:\n{proc.log_tail()}")
            return Measurement(
                scenario.name,
                name,
                repetition,
                args.requests,
                totals.event("Ir"),
                seconds,
                idle_per_s,
            )
        finally:
            self._stop(proc)

    def _idle_rate(self, pid: int, out_file: Path) -> float:
        """Instructions per second the proxy runs with its connections open and no requests:
        its timers (the gateway's 100 ms sweep, nginx's none). It is the part of a
        measurement that grows with wall-clock time instead of with requests."""
        control = self.tools["vgdb"]
        assert control is not None
        zeroed = monitor(control, pid, "zero")
        time.sleep(self.args.idle_seconds)  # the measurement window itself, not a wait for state
        wait_quiet(pid)
        seconds = monitor(control, pid, "dump") - zeroed
        idle = parse_callgrind_totals(newest_dump(out_file).read_text(errors="replace"))
        return idle.event("Ir") / seconds


def _check_statuses(statuses: Counter[int], count: int, what: str) -> None:
    if statuses.get(200, 0) != count:
        other = {k: v for k, v in statuses.items() if k != 200}
        raise InstructionsError(f"{what}: {statuses.get(200, 0)}/{count} answered 200; {other}")


# --------------------------------------------------------------------------- reporting


def summarize(measurements: Sequence[Measurement]) -> list[report.Row]:
    """One row per scenario x proxy: mean instructions/request, spread, ratio to nginx."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.scenario, m.proxy), []).append(m)
    rows: list[report.Row] = []
    for (scenario, proxy), ms in groups.items():
        values = [m.per_request for m in ms]
        raw = [m.raw_per_request for m in ms]
        rows.append(
            {
                "scenario": scenario,
                "proxy": proxy,
                "requests": ms[0].requests,
                "repetitions": len(ms),
                "instructions_per_request": statistics.fmean(values),
                "runs_instructions_per_request": values,
                "raw_instructions_per_request": statistics.fmean(raw),
                "runs_raw_instructions_per_request": raw,
                "raw_spread": relative_spread(raw),
                "runs_instructions": [m.instructions for m in ms],
                "runs_seconds": [round(m.seconds, 3) for m in ms],
                "runs_idle_instructions_per_s": [m.idle_instructions_per_s for m in ms],
                "spread": relative_spread(values),
            }
        )
    nginx = {r["scenario"]: r["instructions_per_request"] for r in rows if r["proxy"] == "nginx"}
    for row in rows:
        ref = nginx.get(row["scenario"])
        row["ratio_vs_nginx"] = row["instructions_per_request"] / ref if ref else None
    return rows


def render_table(rows: Sequence[report.Row]) -> str:
    head = ["scenario", "proxy", "instructions/req", "vs nginx", "spread", "raw/req", "runs"]
    cells = [head]
    for r in rows:
        ratio = r.get("ratio_vs_nginx")
        spread = r.get("spread")
        runs = ", ".join(f"{v:,.0f}" for v in r["runs_instructions_per_request"])
        cells.append(
            [
                r["scenario"],
                r["proxy"],
                f"{r['instructions_per_request']:,.0f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if spread is None else f"{100 * spread:.3f}%",
                f"{r['raw_instructions_per_request']:,.0f}",
                runs,
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    numeric = {2, 3, 4, 5}

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "| " + " | ".join(padded) + " |"

    sep = [("-" * (w - 1) + ":") if i in numeric else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(cells[0]), line(sep), *(line(c) for c in cells[1:])])


# --------------------------------------------------------------------------- CLI


def find_tool(name: str) -> str | None:
    # Debian puts nginx and haproxy in /usr/sbin, which is not on every user's PATH.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    """The harness's comma list, but at least one name ("none" measures nothing here)."""
    items = parse_list(text, known, what)
    if not items:
        raise argparse.ArgumentTypeError(f"no {what} in {text!r} (known: {', '.join(known)})")
    return items


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest --instructions",
        description="Instructions per request of the gateway and the reference proxies, counted "
        "by callgrind (repeatable to ~0.1%, unlike CPU time).",
    )
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        type=lambda t: _names(t, list(SCENARIOS), "scenario"),
        help=f"comma list of {', '.join(SCENARIOS)} (default: all)",
    )
    ap.add_argument(
        "--only",
        default=",".join(PROXIES),
        type=lambda t: _names(t, PROXIES, "proxy"),
        help=f"comma list of {', '.join(PROXIES)} (default: all that are installed)",
    )
    ap.add_argument("--requests", "-n", default=2000, type=_positive, help="measured (2000)")
    ap.add_argument("--warmup-requests", default=200, type=_positive, help="before zeroing (200)")
    ap.add_argument("--connections", default=8, type=_positive, help="keep-alive connections (8)")
    ap.add_argument(
        "--inflight",
        default=1,
        type=_positive,
        help="requests outstanding at once, 1..connections (default 1: one at a time, rotating "
        "over the connections, the most repeatable; more lets event loops batch, which varies)",
    )
    ap.add_argument("--repeat", default=1, type=_positive, help="fresh runs per measurement (1)")
    ap.add_argument(
        "--idle-seconds",
        default=3.0,
        type=float,
        help="after each measurement, also count S seconds without requests: the proxy's "
        "timer work per second, subtracted from the result (default 3; 0 = off)",
    )
    ap.add_argument("--timeout", default=600.0, type=float, help="seconds per request batch")
    ap.add_argument("--ready-timeout", default=180.0, type=float, help="seconds to start")
    ap.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    ap.add_argument("--out", default=str(REPO_ROOT / "loadtest" / "results"), type=Path)
    ap.add_argument(
        "--keep-dumps",
        action="store_true",
        help="copy the callgrind dumps next to the results (for callgrind_annotate)",
    )
    return ap


def plan_runs(
    scenarios: Sequence[str], proxies: Sequence[str], installed: set[str]
) -> tuple[list[tuple[Scenario, str]], list[str]]:
    """The (scenario, proxy) runs to make, and a note for each one left out and why."""
    notes = [f"{name}: not installed, skipped" for name in proxies if name not in installed]
    plan: list[tuple[Scenario, str]] = []
    for sc_name in scenarios:
        scenario = SCENARIOS[sc_name]
        if scenario.rate_limit == "redis" and "redis-server" not in installed:
            notes.append(f"{sc_name}: skipped, redis-server is not installed (apt-get install "
                         "redis-server)")  # fmt: skip
            continue
        for name in proxies:
            if name not in installed:
                continue
            if name not in scenario.proxies:
                notes.append(f"{sc_name}: {name} has no equivalent configuration, skipped")
                continue
            plan.append((scenario, name))
    return plan, notes


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.inflight > args.connections:
        print("error: --inflight cannot exceed --connections", file=sys.stderr)
        return 2
    names = ("valgrind", "vgdb", "nginx", "haproxy", "caddy", "redis-server")
    tools = {name: find_tool(name) for name in names}
    for needed in ("valgrind", "vgdb"):
        if not tools[needed]:
            print(f"error: {needed} is missing (apt-get install valgrind)", file=sys.stderr)
            return 2
    installed = {name for name, path in tools.items() if path} | {"gateway"}
    plan, notes = plan_runs(args.scenarios, args.only, installed)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and we must clean up.
    previous = {sig: signal.signal(sig, _interrupt) for sig in _SIGNALS}
    try:
        return _run(args, argv, tools, notes, plan)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    tools: Mapping[str, str | None],
    notes: list[str],
    plan: list[tuple[Scenario, str]],
) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-instr-"))
    workdir.chmod(0o755)
    run = InstructionsRun(args, workdir, tools)
    started = datetime.now(UTC)
    measurements: list[Measurement] = []
    failures: list[str] = []
    stamp = started.strftime("%Y%m%d-%H%M%S")
    out: Path = args.out
    try:
        run.start_backend()
        if any(s.rate_limit == "redis" for s, _ in plan):
            run.start_redis()
        for scenario, name in plan:
            for repetition in range(1, args.repeat + 1):
                print(f"[{scenario.name}] {name} run {repetition} ...", file=sys.stderr, flush=True)
                try:
                    m = run.measure(scenario, name, repetition)
                except (InstructionsError, OSError, TimeoutError, ResponseError) as exc:
                    text = str(exc).strip() or repr(exc)
                    failures.append(f"{scenario.name}/{name}: {text.splitlines()[0]}")
                    print(f"  FAILED: {text}", file=sys.stderr)
                    break
                measurements.append(m)
                idle = m.idle_instructions_per_s
                print(
                    f"[{scenario.name}] {name}: {m.per_request:,.0f} instructions/request "
                    f"({m.instructions:,} in {m.seconds:.1f}s for {m.requests} requests"
                    + (f"; timers {idle:,.0f}/s subtracted" if idle is not None else "")
                    + ")",
                    file=sys.stderr,
                )
                if args.keep_dumps:
                    out.mkdir(parents=True, exist_ok=True)
                    kept = out / f"callgrind-{stamp}-{scenario.name}-{name}-{repetition}.out"
                    shutil.copyfile(run.dumps[-1], kept)
                    print(f"  dump: {kept}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    except InstructionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        run.close()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = summarize(measurements)
    text = render_table(rows) if rows else "(no measurements)"
    spreads = [r["spread"] for r in rows if r["spread"] is not None]
    if spreads:
        notes.append(f"largest spread between repetitions: {100 * max(spreads):.3f}%")
    notes += [f"FAILED {f}" for f in failures]
    print(text)
    for note in notes:
        print(f"- {note}")
    document = {
        "generated": started.isoformat(),
        "command": [
            sys.executable,
            "-m",
            "loadtest",
            "--instructions",
            *(sys.argv[1:] if argv is None else argv),
        ],
        "method": "callgrind Ir (user-space instructions, the dump's summary:) between a zero "
        "after the warm-up and a dump after the measured requests, minus the idle (timer) rate "
        "times the window, divided by the requests",
        "settings": {
            "scenarios": {s: SCENARIOS[s].description for s in args.scenarios},
            "requests": args.requests,
            "warmup_requests": args.warmup_requests,
            "connections": args.connections,
            "inflight": args.inflight,
            "repeat": args.repeat,
            "post_body_bytes": len(POST_BODY),
            "routes10k_path": SCENARIOS["routes10k"].path,
        },
        "tools": tools,
        "results": rows,
        "notes": notes,
    }
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"instructions-{stamp}"
    report.write_json(base.with_suffix(".json"), document)
    base.with_suffix(".md").write_text(text + "\n\n" + "".join(f"- {n}\n" for n in notes))
    print(f"wrote {base.with_suffix('.json')}, {base.with_suffix('.md')}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
