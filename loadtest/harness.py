"""``python -m loadtest``: the gateway against direct, nginx, haproxy and caddy, on loopback.

For every scenario x proxy: start the proxy pinned to one core (wrk and the backend share the
other), warm up, run wrk, and charge the proxy's whole process tree with the CPU time it used.
See loadtest/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.metadata
import math
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from loadtest import report
from loadtest.h2load import h2load_command, parse_h2load_output
from loadtest.idle import hold_idle_connections, raise_nofile_limit
from loadtest.procstat import cpu_us_per_request, tree_cpu_ticks, tree_rss_kib
from loadtest.servers import (
    ALL_TARGETS,
    LARGE_BODY_BYTES,
    REFERENCE_PROXIES,
    ManagedProcess,
    caddyfile,
    free_port,
    gateway_argv,
    gateway_config,
    gateway_yaml,
    haproxy_conf,
    nginx_backend_conf,
    nginx_proxy_conf,
    pinned,
    wait_until,
)
from loadtest.wrk import POST_BODY_BYTES, POST_LUA, WrkParseError, parse_wrk_output, wrk_command

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GATEWAY_CMD = "{python} -m gateway run -c {config}"
HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    path: str
    description: str
    post: bool = False
    new_connection: bool = False
    extra_routes: int = 0
    tls: bool = False  # the proxy terminates TLS (gateway and nginx only)
    tickets: bool = True  # TLS session tickets on the proxy
    http2: bool = False  # h2 by ALPN (needs tls), load from h2load with 100 streams/connection
    # Client connections, overriding --connections (h2: 2 x 100 streams = 200 requests in
    # flight, each needing an HTTP/1.1 upstream connection of its own).
    connections: int | None = None

    def method_path(self) -> str:
        return f"{'POST' if self.post else 'GET'} {self.path}"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("small", "/small", "GET of a 13-byte body on keep-alive connections"),
        Scenario("large", "/large", "GET of a 64 KiB body on keep-alive connections"),
        Scenario("post", "/post", "POST of a 16 KiB body on keep-alive connections", post=True),
        Scenario(
            "routes10k",
            "/small",
            "small GET with 10,000 routes loaded (gateway and nginx; haproxy/caddy keep 1)",
            extra_routes=9_999,
        ),
        Scenario(
            "newconn", "/small", "small GET, a new connection per request", new_connection=True
        ),
        Scenario("tls", "/small", "small GET over TLS on keep-alive connections", tls=True),
        Scenario(
            "tls-newconn",
            "/small",
            "small GET over TLS, a new connection and a full handshake per request (tickets off)",
            new_connection=True,
            tls=True,
            tickets=False,
        ),
        Scenario(
            "tls-resume",
            "/small",
            "small GET over TLS, a new connection per request, session tickets on (the client"
            " resumes if it keeps the session: wrk does across reconnects)",
            new_connection=True,
            tls=True,
        ),
        Scenario(
            "h2",
            "/small",
            "small GET over TLS h2 (ALPN), 100 concurrent streams per connection (h2load)",
            tls=True,
            http2=True,
            connections=2,
        ),
    )
}
TLS_PROXIES = ("gateway", "nginx")


class HarnessError(Exception):
    """A setup problem that stops the whole run (printed without a traceback)."""


def parse_duration_s(text: str) -> int:
    """``10s``, ``2m``, ``1500ms`` or a bare number of seconds -> whole seconds (rounded up)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m)?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (use e.g. 10s, 2m)")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    return max(0, math.ceil(value - 1e-9))


def parse_list(text: str, known: Sequence[str], what: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return list(dict.fromkeys(items))


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Benchmark the gateway against direct, nginx, haproxy and caddy on loopback.",
    )
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        type=lambda t: parse_list(t, list(SCENARIOS), "scenario"),
        help=f"comma list of {', '.join(SCENARIOS)} or 'none' (default: all)",
    )
    ap.add_argument(
        "--only",
        default=",".join(ALL_TARGETS),
        type=lambda t: parse_list(t, ALL_TARGETS, "proxy"),
        help=f"comma list of {', '.join(ALL_TARGETS)} (default: all)",
    )
    ap.add_argument("--duration", default=10, type=parse_duration_s, help="per run (default 10s)")
    ap.add_argument("--warmup", default=2, type=parse_duration_s, help="before each run (2s)")
    ap.add_argument("--connections", default=50, type=int, help="wrk connections (default 50)")
    ap.add_argument("--threads", default=1, type=int, help="wrk threads (default 1)")
    ap.add_argument(
        "--gateway-cmd",
        default=DEFAULT_GATEWAY_CMD,
        help="how to start the gateway; {python} and {config} are substituted "
        f"(default: {DEFAULT_GATEWAY_CMD!r})",
    )
    ap.add_argument(
        "--workers",
        default=1,
        type=lambda t: t if t == "auto" else int(t),
        help="the gateway's `workers:` (1 = single process, the default; N or auto = a "
        "supervisor and N SO_REUSEPORT workers). With N > 1 the proxy still gets only "
        "--proxy-cpu; give it more cores with e.g. --proxy-cpu 0,1 or --no-pin",
    )
    ap.add_argument("--out", default=str(REPO_ROOT / "loadtest" / "results"), type=Path)
    ap.add_argument(
        "--idle-conns",
        default=0,
        type=int,
        metavar="N",
        help="also hold N idle keep-alive connections to each proxy and report RSS per "
        "connection (the issue measures 5000; default off)",
    )
    ap.add_argument("--proxy-cpu", default="0", help="core for the proxy under test (0)")
    ap.add_argument("--load-cpu", default="1", help="core for wrk and the backend (1)")
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument(
        "--backend",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="nginx if installed (auto), or the bundled asyncio backend",
    )
    ap.add_argument("--ready-timeout", default=30.0, type=float, help="seconds to wait for start")
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="instead: count instructions per request under callgrind (its own options: "
        "python -m loadtest --instructions --help)",
    )
    return ap


def find_tool(name: str) -> str | None:
    # Debian puts nginx and haproxy in /usr/sbin, which is not on every user's PATH.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_info(tools: dict[str, str | None]) -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    version_args = {
        "nginx": ["-v"],
        "haproxy": ["-v"],
        "caddy": ["version"],
        "wrk": ["-v"],
    }
    for name, args in version_args.items():
        exe = tools.get(name)
        versions[name] = _first_line([exe, *args]) if exe else None
    try:
        versions["gateway"] = importlib.metadata.version("pygateway")
    except importlib.metadata.PackageNotFoundError:
        versions["gateway"] = None
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "system": platform.platform(),
        "cpu_model": cpu_model,
        "python": sys.version.split()[0],
        "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
        "versions": versions,
    }


def http_check(
    port: int, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 2.0
) -> tuple[int, int] | None:
    """(status, body length) of one request, or None if the server cannot be reached."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, len(resp.read())
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def https_check(port: int, path: str, timeout: float = 2.0) -> tuple[int, int] | None:
    """``http_check`` over TLS (the benchmark's own certificate: not verified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(HOST, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, len(resp.read())
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Harness:
    def __init__(self, args: argparse.Namespace, workdir: Path, tools: dict[str, str | None]):
        self.args = args
        self.workdir = workdir
        self.tools = tools
        self.processes: list[ManagedProcess] = []
        self.wrk: subprocess.Popen[str] | None = None
        self.notes: list[str] = []
        self._tls: tuple[str, str] | None = None
        pin = not args.no_pin and tools.get("taskset") and (os.cpu_count() or 1) >= 2
        self.proxy_cpu: str | None = args.proxy_cpu if pin else None
        self.load_cpu: str | None = args.load_cpu if pin else None
        if not pin:
            self.notes.append("processes are not pinned to cores (--no-pin, no taskset or 1 CPU)")
        self.nofile = raise_nofile_limit(max(4096, 2 * args.idle_conns + 1024))
        self.backend_port = 0
        self.backend_kind = ""
        self.post_lua = workdir / "post.lua"
        self.post_lua.write_text(POST_LUA)
        self._seq = 0

    # ----------------------------------------------------------------- processes

    def _dir(self, name: str) -> Path:
        self._seq += 1
        d = self.workdir / f"{self._seq:03d}-{name}"
        d.mkdir(mode=0o755)
        return d

    def spawn(
        self,
        name: str,
        argv: list[str],
        cpu: str | None,
        directory: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        proc = ManagedProcess(name, pinned(argv, cpu), directory / "output.log", cwd=cwd, env=env)
        self.processes.append(proc)
        return proc.start()

    def stop(self, proc: ManagedProcess | None) -> None:
        if proc is None:
            return
        proc.stop()
        with contextlib.suppress(ValueError):
            self.processes.remove(proc)

    def close(self) -> None:
        if self.wrk is not None and self.wrk.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.wrk.pid, signal.SIGKILL)
            self.wrk.wait()
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up the others
                print(f"warning: stopping {proc.name}: {exc!r}", file=sys.stderr)
        self.processes.clear()

    def _wait_http(self, proc: ManagedProcess, port: int, what: str) -> None:
        def ok() -> bool:
            res = http_check(port, "/small", timeout=1.0)
            return res is not None and res[0] == 200

        wait_until(ok, self.args.ready_timeout, what, proc)
        proc.remember_tree()

    # ----------------------------------------------------------------- backend

    def start_backend(self) -> None:
        port = free_port()
        use_nginx = self.args.backend == "nginx" or (
            self.args.backend == "auto" and self.tools.get("nginx")
        )
        d = self._dir("backend")
        if use_nginx:
            nginx = self.tools.get("nginx")
            if not nginx:
                raise HarnessError("--backend nginx: nginx is missing (apt-get install nginx)")
            www = d / "www"
            www.mkdir(mode=0o755)
            (www / "large").write_bytes(b"x" * LARGE_BODY_BYTES)
            (www / "large").chmod(0o644)
            conf = d / "nginx.conf"
            conf.write_text(nginx_backend_conf(d, port, www, self.nofile))
            argv = [nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
            self.backend_kind = "nginx"
        else:
            argv = [sys.executable, "-m", "loadtest.backend", "--port", str(port)]
            self.backend_kind = "python (loadtest/backend.py)"
            self.notes.append("nginx is not installed: the bundled asyncio backend was used")
        proc = self.spawn("backend", argv, self.load_cpu, d, cwd=REPO_ROOT, env=self._env())
        self._wait_http(proc, port, f"the {self.backend_kind} backend on port {port}")
        res = http_check(port, "/large")
        if res != (200, LARGE_BODY_BYTES):
            raise HarnessError(f"backend /large answered {res}, expected (200, {LARGE_BODY_BYTES})")
        self.backend_port = port

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update(extra or {})
        return env

    # ----------------------------------------------------------------- proxies

    def start_target(self, name: str, scenario: Scenario) -> tuple[ManagedProcess | None, int, int]:
        """Start one proxy for ``scenario``: (process, listen port, routes it has loaded)."""
        if name == "direct":
            return None, self.backend_port, 0
        port = free_port()
        d = self._dir(f"{name}-{scenario.name}")
        extra = scenario.extra_routes
        tls = (*self.tls_files(), scenario.tickets) if scenario.tls else None
        if name == "gateway":
            admin = free_port()
            cfg = d / "gateway.yaml"
            document = gateway_config(
                port,
                admin,
                self.backend_port,
                extra,
                self.args.workers,
                tls=tls,
                http2=scenario.http2,
            )
            cfg.write_text(gateway_yaml(document))
            argv = gateway_argv(self.args.gateway_cmd, sys.executable, cfg)
            proc = self.spawn(name, argv, self.proxy_cpu, d, cwd=REPO_ROOT, env=self._env())

            def ready() -> bool:
                res = http_check(admin, "/readyz", timeout=1.0)
                return res is not None and res[0] == 200

            wait_until(ready, self.args.ready_timeout, f"gateway /readyz on port {admin}", proc)
            if not scenario.tls:
                self._wait_http(proc, port, f"the gateway on port {port}")
            return proc, port, extra + 1
        exe = self.tools[name]
        assert exe is not None
        if name == "nginx":
            conf = d / "nginx.conf"
            conf.write_text(
                nginx_proxy_conf(
                    d, port, self.backend_port, extra, self.nofile, tls=tls, http2=scenario.http2
                )
            )
            argv = [exe, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
            routes = extra + 1
        elif name == "haproxy":
            conf = d / "haproxy.cfg"
            conf.write_text(haproxy_conf(port, self.backend_port, max(256, self.nofile // 2 - 64)))
            argv = [exe, "-db", "-f", str(conf)]
            routes = 1
        elif name == "caddy":
            conf = d / "Caddyfile"
            conf.write_text(caddyfile(port, self.backend_port))
            argv = [exe, "run", "--config", str(conf), "--adapter", "caddyfile"]
            routes = 1
        else:  # pragma: no cover - guarded by argument parsing
            raise HarnessError(f"unknown proxy {name}")
        # Caddy wants writable data/config homes; keep them in our temp dir.
        env = self._env({"HOME": str(d), "XDG_DATA_HOME": str(d), "XDG_CONFIG_HOME": str(d)})
        if name == "caddy":
            env["GOMAXPROCS"] = "1"  # one thread runs Go code, like one nginx worker (taskset too)
        proc = self.spawn(name, argv, self.proxy_cpu, d, cwd=d, env=env)
        if scenario.tls:
            wait_until(
                lambda: https_check(port, "/small") is not None,
                self.args.ready_timeout,
                f"{name} (TLS) on port {port}",
                proc,
            )
        else:
            self._wait_http(proc, port, f"{name} on port {port}")
        return proc, port, routes

    def tls_files(self) -> tuple[str, str]:
        """A certificate for 127.0.0.1 made once per run (trustme, the test extra): the
        gateway and nginx serve the same one."""
        if self._tls is None:
            try:
                import trustme
            except ImportError:
                raise HarnessError("TLS scenarios need trustme (pip install trustme)") from None
            d = self._dir("tls")
            cert = trustme.CA().issue_cert("127.0.0.1", "localhost")
            cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
            cert.private_key_pem.write_to_path(str(d / "key.pem"))
            (d / "key.pem").chmod(0o644)  # nginx workers run as nobody when started by root
            self._tls = (str(d / "cert.pem"), str(d / "key.pem"))
        return self._tls

    # ----------------------------------------------------------------- wrk

    def run_wrk(self, port: int, scenario: Scenario, duration_s: int) -> str:
        url = f"{'https' if scenario.tls else 'http'}://{HOST}:{port}{scenario.path}"
        if scenario.http2:
            argv = h2load_command(
                url,
                duration_s=duration_s,
                connections=scenario.connections or self.args.connections,
                threads=self.args.threads,
                cpu=self.load_cpu,
            )
        else:
            argv = wrk_command(
                url,
                duration_s=duration_s,
                connections=self.args.connections,
                threads=self.args.threads,
                script=str(self.post_lua) if scenario.post else None,
                # wrk reconnects after each response when the server closes (RFC 9112 §9.6).
                headers=("Connection: close",) if scenario.new_connection else (),
                cpu=self.load_cpu,
            )
        self.wrk = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = self.wrk.communicate(timeout=duration_s + 60)
        except subprocess.TimeoutExpired:
            os.killpg(self.wrk.pid, signal.SIGKILL)
            out, _ = self.wrk.communicate()
            raise RuntimeError("wrk did not finish in time:\n" + out[-2000:]) from None
        finally:
            if self.wrk.poll() is not None:
                self.wrk = None
        return out

    def sanity_check(self, port: int, scenario: Scenario) -> None:
        if scenario.post:
            res = http_check(port, scenario.path, "POST", b"x" * POST_BODY_BYTES)
        elif scenario.tls:
            res = https_check(port, scenario.path)
        else:
            res = http_check(port, scenario.path)
        want_len = LARGE_BODY_BYTES if scenario.path == "/large" else None
        if res is None or res[0] != 200 or (want_len is not None and res[1] != want_len):
            raise RuntimeError(f"{scenario.method_path()} answered {res}, expected 200")

    def run_one(self, scenario: Scenario, name: str) -> report.Row:
        row: report.Row = {"scenario": scenario.name, "proxy": name}
        proc: ManagedProcess | None = None
        try:
            proc, port, routes = self.start_target(name, scenario)
            row["route_count"] = routes or None
            self.sanity_check(port, scenario)
            if self.args.warmup:
                self.run_wrk(port, scenario, self.args.warmup)
            roots = [proc.pid] if proc is not None else []
            before = tree_cpu_ticks(roots) if proc is not None else 0
            out = self.run_wrk(port, scenario, self.args.duration)
            after = tree_cpu_ticks(roots) if proc is not None else 0
            if proc is not None and not proc.alive():
                raise RuntimeError(f"{name} died during the run:\n{proc.log_tail()}")
            result = parse_h2load_output(out) if scenario.http2 else parse_wrk_output(out)
            row.update(
                requests=result.requests,
                duration_s=result.duration_s,
                requests_per_s=result.requests_per_s,
                p50_ms=result.p50_ms,
                p99_ms=result.p99_ms,
                latency_ms=result.latency_ms,
                errors=result.errors,
                error_summary=result.error_summary(),
                wrk=result.to_dict(),
                flagged=result.errors > 0,
            )
            if proc is not None:
                row["cpu_seconds"] = (after - before) / os.sysconf("SC_CLK_TCK")
                row["cpu_us_per_req"] = cpu_us_per_request(before, after, result.requests)
            else:
                row["cpu_us_per_req"] = None
        except (RuntimeError, WrkParseError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            row.update(failure=first, failure_detail=str(exc), flagged=True)
            print(f"  {scenario.name}/{name} FAILED: {exc}", file=sys.stderr)
        finally:
            self.stop(proc)
        return row

    # ----------------------------------------------------------------- idle connections

    def run_idle(self, name: str, count: int) -> report.Row:
        row: report.Row = {"proxy": name, "connections": count}
        proc: ManagedProcess | None = None
        try:
            proc, port, _ = self.start_target(name, SCENARIOS["small"])
            assert proc is not None
            pid = proc.pid
            for _ in range(50):  # warm the proxy's request path (pools, caches) on one conn
                http_check(port, "/small")
            time.sleep(0.5)
            proc.remember_tree()
            before = tree_rss_kib([pid])
            held, after, errors = asyncio.run(
                hold_idle_connections(HOST, port, count, lambda: tree_rss_kib([pid]))
            )
            row.update(
                connections=held,
                requested=count,
                rss_before_kib=before,
                rss_after_kib=after,
                kib_per_connection=(after - before) / held if held else None,
                errors=errors,
            )
            if held < count:
                row["failure"] = f"only {held}/{count} connections stayed open: {errors[:1]}"
        except (RuntimeError, OSError) as exc:
            row["failure"] = str(exc).strip().splitlines()[0]
            print(f"  idle/{name} FAILED: {exc}", file=sys.stderr)
        finally:
            self.stop(proc)
        return row


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--instructions" in argv:  # a different benchmark with its own options
        from loadtest import instructions

        argv.remove("--instructions")
        return instructions.main(argv)
    args = build_arg_parser().parse_args(argv)
    tools = {
        name: find_tool(name) for name in ("wrk", "taskset", "nginx", "haproxy", "caddy", "h2load")
    }
    if any(SCENARIOS[name].http2 for name in args.scenarios) and not tools["h2load"]:
        print(
            "error: the h2 scenario needs h2load (apt-get install nghttp2-client)",
            file=sys.stderr,
        )
        return 2
    if not tools["wrk"] and args.scenarios:
        print(
            "error: wrk is required for the benchmark (install it with: apt-get install wrk)",
            file=sys.stderr,
        )
        return 2
    targets: list[str] = []
    skipped: list[str] = []
    for name in args.only:
        if name in REFERENCE_PROXIES and not tools[name]:
            skipped.append(name)
            print(f"note: {name} is not installed, skipping it (apt-get install {name})")
        else:
            targets.append(name)

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and we must clean up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="loadtest-"))
    workdir.chmod(0o755)  # nginx workers run as nobody when started by root and read files here
    harness = Harness(args, workdir, tools)
    harness.notes += [f"{name} is not installed: skipped" for name in skipped]
    rows: list[report.Row] = []
    idle_rows: list[report.Row] = []
    started = datetime.now(UTC)
    try:
        harness.start_backend()
        print(
            f"backend: {harness.backend_kind} on {HOST}:{harness.backend_port}; proxies on "
            f"CPU {harness.proxy_cpu}, wrk+backend on CPU {harness.load_cpu}; "
            f"{args.duration}s runs after {args.warmup}s warm-up, {args.connections} connections",
            file=sys.stderr,
        )
        for sc_name in args.scenarios:
            scenario = SCENARIOS[sc_name]
            left_out = [name for name in targets if scenario.tls and name not in TLS_PROXIES]
            if left_out:  # a skip by design, not a failure: the exit status stays 0
                harness.notes.append(
                    f"{sc_name}: TLS scenarios compare the gateway with nginx only "
                    f"(not run: {', '.join(left_out)})"
                )
            for name in targets:
                if name in left_out:
                    continue
                print(f"[{sc_name}] {name} ...", file=sys.stderr, flush=True)
                row = harness.run_one(scenario, name)
                rows.append(row)
                if "requests_per_s" in row:
                    cpu = row.get("cpu_us_per_req")
                    cpu_text = f", {cpu:.1f} µs CPU/req" if cpu is not None else ""
                    print(
                        f"[{sc_name}] {name}: {row['requests_per_s']:,.0f} req/s{cpu_text}"
                        + (f", ERRORS: {row['error_summary']}" if row.get("errors") else ""),
                        file=sys.stderr,
                    )
        if args.idle_conns > 0:
            for name in targets:
                if name == "direct":
                    continue
                print(f"[idle] {name}: {args.idle_conns} connections ...", file=sys.stderr)
                idle_rows.append(harness.run_idle(name, args.idle_conns))
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        harness.close()
        shutil.rmtree(workdir, ignore_errors=True)
        return 130
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        harness.close()
        shutil.rmtree(workdir, ignore_errors=True)

    return write_outputs(args, rows, idle_rows, harness, tools, started)


def write_outputs(
    args: argparse.Namespace,
    rows: list[report.Row],
    idle_rows: list[report.Row],
    harness: Harness,
    tools: dict[str, str | None],
    started: datetime,
) -> int:
    report.add_ratios(rows)
    notes = list(harness.notes)
    if "routes10k" in args.scenarios:
        notes.append(
            "routes10k: the gateway and nginx load 10,000 routes; haproxy and caddy keep one."
        )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    base = out / f"loadtest-{stamp}"
    chart_note = report.draw_chart(base.with_suffix(".png"), rows) if rows else None
    if chart_note:
        notes.append(chart_note)
    text_parts = []
    if rows:
        text_parts.append(report.render_table(rows))
    if idle_rows:
        text_parts.append(report.render_idle_table(idle_rows))
    text = "\n\n".join(text_parts)
    print(text)
    for note in notes:
        print(f"- {note}")
    document = {
        "generated": started.isoformat(),
        "command": [sys.executable, "-m", "loadtest", *sys.argv[1:]],
        "settings": {
            "scenarios": {s: SCENARIOS[s].description for s in args.scenarios},
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "proxy_cpu": harness.proxy_cpu,
            "load_cpu": harness.load_cpu,
            "backend": harness.backend_kind,
            "gateway_cmd": args.gateway_cmd,
        },
        "machine": machine_info(tools),
        "results": rows,
        "idle_connections": idle_rows,
        "notes": notes,
    }
    report.write_json(base.with_suffix(".json"), document)
    base.with_suffix(".md").write_text(
        text + "\n\n" + "".join(f"- {n}\n" for n in notes) if notes else text + "\n"
    )
    written = [base.with_suffix(".json"), base.with_suffix(".md")]
    if not chart_note and rows:
        written.append(base.with_suffix(".png"))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 1 if any(r.get("failure") for r in rows + idle_rows) else 0
