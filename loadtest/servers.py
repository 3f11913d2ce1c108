"""Config generation (pure) and process lifecycle for the backend and the proxies under test."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from loadtest.procstat import read_stat, tree_identities

SMALL_BODY = b"Hello, world\n"  # 13 bytes, like the usual "hello world" benchmark body
LARGE_BODY_BYTES = 64 * 1024
POST_REPLY = b"ok\n"

REFERENCE_PROXIES = ("nginx", "haproxy", "caddy")
ALL_TARGETS = ("direct", "gateway", *REFERENCE_PROXIES)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out for ``host`` (closed again; a tiny race is acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def extra_route_paths(count: int) -> list[tuple[str, str]]:
    """``count`` (kind, path) pairs that never match the benchmark paths (/small, /large, /post).

    Half are exact and half prefix routes, so both indexes of a route table are filled.
    """
    return [("exact", f"/r/{i}") if i % 2 == 0 else ("prefix", f"/r/{i}/") for i in range(count)]


# --------------------------------------------------------------------------- config generators


def _nginx_common(prefix: Path, nofile: int, single_process: bool = False) -> str:
    # Temp paths inside our own prefix: nginx must never touch /var/lib/nginx of the machine.
    # single_process: no master, the one process serves (what callgrind must run to count it).
    return f"""daemon off;
master_process {"off" if single_process else "on"};
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {max(1024, nofile // 2)}; }}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""    access_log off;
    log_not_found off;
    server_tokens off;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
"""


def nginx_backend_conf(
    prefix: Path, port: int, www: Path, nofile: int = 4096, any_path_ok: bool = False
) -> str:
    """nginx as the fast backend: /small, /large (a static file in ``www``), POST /post.

    ``any_path_ok``: every other path answers like /small instead of 404 (the instruction-count
    benchmark requests paths such as /r/9997/small that only a route table tells apart).
    """
    small = SMALL_BODY.decode().replace("\n", "\\n")
    fallback = f'default_type text/plain; return 200 "{small}";' if any_path_ok else "return 404;"
    post = POST_REPLY.decode().replace("\n", "\\n")
    return (
        _nginx_common(prefix, nofile)
        + "http {\n"
        + _nginx_http_common(prefix)
        + f"""    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /small {{ default_type text/plain; return 200 "{small}"; }}
        location = /large {{ }}
        # `return` makes nginx read and discard the request body (ngx_http_discard_request_body),
        # so the keep-alive connection stays usable.
        location = /post {{
            client_max_body_size 1m;
            client_body_buffer_size 32k;
            default_type text/plain;
            return 200 "{post}";
        }}
        location / {{ {fallback} }}
    }}
}}
"""
    )


TLSFiles = tuple[str, str, bool]  # certificate, key, session tickets on


def nginx_proxy_conf(
    prefix: Path,
    port: int,
    backend_port: int,
    extra_routes: int = 0,
    nofile: int = 4096,
    *,
    single_process: bool = False,
    rate_limit: tuple[int, int] | None = None,
    tls: TLSFiles | None = None,
    http2: bool = False,
) -> str:
    """nginx ``proxy_pass`` with upstream keep-alive, one worker, no access log.

    ``rate_limit`` = (requests per second, burst): one ``limit_req`` zone keyed by client
    address on every location, the counterpart of the gateway's ``key: client_ip`` limit.
    With ``tls`` it terminates TLS like the gateway (TLS 1.2+, the same certificate, tickets
    as given, no server-side session cache). ``http2``: h2 by ALPN as well, with 128
    concurrent streams per connection; written as the ``listen ... http2`` parameter, which
    nginx 1.22 (Debian 12) understands ("http2 on;" needs 1.25.1).
    """
    listen = f"127.0.0.1:{port} backlog=4096"
    tls_lines = ""
    if tls is not None:
        cert, key, tickets = tls
        listen += " ssl http2" if http2 else " ssl"
        tls_lines = (
            f"        ssl_certificate {cert};\n"
            f"        ssl_certificate_key {key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
            "        ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;\n"
            f"        ssl_session_tickets {'on' if tickets else 'off'};\n"
            "        ssl_session_cache off;\n"
        )
        if http2:
            tls_lines += "        http2_max_concurrent_streams 128;\n"
    proxy = "proxy_pass http://bench;"
    zone = limit = ""
    if rate_limit is not None:
        rate, burst = rate_limit
        zone = f"    limit_req_zone $binary_remote_addr zone=bench:1m rate={rate}r/s;\n"
        limit = f"        limit_req zone=bench burst={burst} nodelay;\n"
    extra = []
    for kind, path in extra_route_paths(extra_routes):
        op = "= " if kind == "exact" else ""
        extra.append(f"        location {op}{path} {{ {proxy} }}\n")
    return (
        _nginx_common(prefix, nofile, single_process)
        + "http {\n"
        + _nginx_http_common(prefix)
        + zone
        + f"""    upstream bench {{
        server 127.0.0.1:{backend_port};
        keepalive {256 if http2 else 64};
        keepalive_requests 100000000;
    }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffer_size 16k;
    proxy_buffers 8 16k;
    client_body_buffer_size 32k;
    server {{
        listen {listen};
{tls_lines}"""
        + limit
        + f"""        location / {{ {proxy} }}
"""
        + "".join(extra)
        + "    }\n}\n"
    )


def haproxy_conf(port: int, backend_port: int, maxconn: int = 10000) -> str:
    """haproxy in HTTP mode, one thread, connection reuse to the backend, no logging."""
    return f"""global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    http-reuse always
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    timeout http-keep-alive 75s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{backend_port} maxconn {maxconn}
"""


def caddyfile(port: int, backend_port: int) -> str:
    """Caddy ``reverse_proxy`` with admin API off, no HTTPS, only error logs."""
    return f"""{{
	admin off
	auto_https off
	log {{
		level ERROR
	}}
}}

http://127.0.0.1:{port} {{
	reverse_proxy 127.0.0.1:{backend_port} {{
		transport http {{
			keepalive 2m
			keepalive_idle_conns 256
			# the default of 32 idle per host makes it reopen upstream connections at -c50
			keepalive_idle_conns_per_host 256
		}}
	}}
}}
"""


def gateway_config(
    port: int,
    admin_port: int,
    backend_port: int,
    extra_routes: int = 0,
    workers: int | str = 1,
    tls: TLSFiles | None = None,
    http2: bool = False,
) -> dict[str, Any]:
    """The gateway's YAML document (DESIGN.md contract): one upstream, ``bench`` route last;
    with ``tls`` the listener terminates TLS (and with ``http2`` offers h2 by ALPN, 128
    concurrent streams, as nginx is set up)."""
    routes: list[dict[str, Any]] = [
        {"name": f"r{i}", "match": {"path": {kind: path}}, "upstream": "bench"}
        for i, (kind, path) in enumerate(extra_route_paths(extra_routes))
    ]
    routes.append({"name": "bench", "match": {"path": {"prefix": "/"}}, "upstream": "bench"})
    listen: Any = f"127.0.0.1:{port}"
    if tls is not None:
        cert, key, tickets = tls
        listen = [
            {
                "address": listen,
                "name": "https",
                "tls": {
                    "certificates": [{"cert": cert, "key": key}],
                    "session_tickets": tickets,
                },
            }
        ]
        if http2:
            listen[0]["http2"] = {"enabled": True, "max_concurrent_streams": 128}
    idle = 256 if http2 else 64  # as nginx's upstream keepalive: 200 requests are in flight
    return {
        "listen": listen,
        "admin": f"127.0.0.1:{admin_port}",
        "workers": workers,
        "upstreams": {
            "bench": {
                "instances": [f"127.0.0.1:{backend_port}"],
                **({"max_idle_connections": idle} if idle != 64 else {}),
            }
        },
        "routes": routes,
    }


def gateway_yaml(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None, width=100)


def gateway_argv(template: str, python: str, config_path: Path) -> list[str]:
    """Expand ``--gateway-cmd``: ``{python}`` and ``{config}`` are substituted.

    Without a ``{config}`` placeholder, ``-c CONFIG`` is appended.
    """
    argv = [
        part.replace("{python}", python).replace("{config}", str(config_path))
        for part in shlex.split(template)
    ]
    if "{config}" not in template:
        argv += ["-c", str(config_path)]
    return argv


def pinned(argv: Sequence[str], cpu: str | None) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu is not None else list(argv)


# --------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """A child in its own session (so Ctrl-C reaches only the harness, which then cleans up)."""

    name: str
    argv: list[str]
    log_path: Path
    cwd: Path | None = None
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _members: dict[int, int] | None = None  # pid -> start time of the tree, last seen

    def remember_tree(self) -> None:
        """Note the current process tree, so stop() can reap workers even if the root died."""
        if self.alive():
            self._members = {**(self._members or {}), **tree_identities(self.pid)}

    def start(self) -> ManagedProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left of the tree after ``grace_s``."""
        if self.popen is None:
            return
        self.remember_tree()
        members = self._members or {}
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace_s)
        # Children that left the process group (setsid) but were part of the tree; the start
        # time check makes sure a recycled pid is never hit.
        for pid, started in members.items():
            st = read_stat(pid)
            if pid != self.popen.pid and st is not None and st.start_ticks == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(predicate: Any, timeout_s: float, what: str, proc: ManagedProcess | None) -> None:
    """Poll ``predicate`` until it is true; fail early if ``proc`` dies."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        if predicate():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            tail = proc.log_tail() if proc is not None else ""
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tail}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
