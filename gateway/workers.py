"""Supervisor and worker processes for ``workers: N`` (N > 1 or ``auto``).

Workers are separate interpreters started as ``python -m gateway.workers`` (not ``fork``: the
supervisor has aiohttp sessions, discovery clients and threads that must not be duplicated, and
an explicit argv shows up in ``ps``). Each worker binds the listen port with ``SO_REUSEPORT`` (the
kernel spreads new connections over the listening sockets) and runs only the data plane on
uvloop. The supervisor keeps the control plane: config, discovery, health checks, admin server.

Supervisor and worker talk over a socketpair inherited by the worker (``--ipc-fd``), one frame
per message: a 4-byte big-endian length, then an orjson object with an ``op``. The messages are
typed, built and parsed in ``gateway/ipc.py``; a malformed or unknown one is logged and ignored.

supervisor -> worker
  ``config``      {seq, source, text, sha256, references, discovered, unhealthy, ejected,
                  shared}: parse ``text`` (the exact bytes the supervisor validated; its
                  ``${env:...}``/``${file:...}`` references take the supervisor's values from
                  ``references``, nothing is read again), build a snapshot from the
                  previous one (pools carry over), swap it in; answered by ``ack`` (or ``ready``
                  for the first one). ``shared`` (used from the first message) says where the
                  shared rate-limit table is: {fd, semaphore, slots}; ``connections``
                  where the gateway-wide connection count is: {fd, workers}.
  ``discovered``  {discovered, unhealthy, ejected}: same config, new instance lists.
  ``health``      {upstream, address, healthy}: an active-check transition.
  ``eject``       {upstream, address, until}: an outlier ejection (``until`` in
                  ``time.monotonic()`` seconds, one clock for every process on the machine).
  ``metrics``     {seq}: answered by ``metrics`` {seq, state: GatewayMetrics.export_state()}.

  ``jwks``        {url, jwks, fetched_at}: a JWK Set the supervisor fetched (gateway.filters.
                  jwks), to every worker after each fetch, or to one as the answer to its ask.

worker -> supervisor
  ``ready`` {seq, pid, sha256}, ``ack`` {seq, sha256}, ``reject`` {seq, error}, ``metrics``,
  ``eject`` {upstream, address, until}: this worker's outlier detection ejected an instance;
  the supervisor records it and broadcasts it to every worker (the sender included: applying
  an ejection it already has is a no-op).
  ``jwks_refresh`` {url, unknown_kid, min_refresh, cache_ttl, timeout}: a ``jwt`` filter needs
  the keys of ``url`` (built, stale, or a token named an unknown kid); the supervisor fetches
  (one fetch for every worker, at most one per min_refresh) or answers with what it has.

``discovered`` maps upstream -> [[host, port, weight], ...]; ``unhealthy`` lists
[upstream, address] pairs that active checks hold down; ``ejected`` lists [upstream, address,
until] ejections still running. All are full state, so a restarted worker starts from the
supervisor's current view with one ``config`` message.

Shared state: with ``workers: N`` the supervisor creates the shared rate-limit table
(``gateway.ratelimit.shared``: a memfd and a POSIX semaphore) before the first worker starts;
each worker inherits the memfd (``pass_fds``) and runs with the same random ``PYTHONHASHSEED``,
so all of them hash bucket keys alike. It also creates the table of open client connections per
worker (``gateway.proxy.connlimit``) that makes ``limits.max_connections`` gateway-wide.

Shutdown: the supervisor forwards SIGTERM and waits; a worker whose supervisor vanished (EOF on
the pipe) drains and exits on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway import ipc
from gateway.filters.jwks import STORE as JWKS_STORE
from gateway.filters.jwks import JwksSettings
from gateway.filters.otlp import span_counters, stop_exporters
from gateway.ipc import (
    BadMessage,
    ConfigMessage,
    ConfigPayload,
    EjectMessage,
    InstanceState,
    JwksRefreshMessage,
    Reply,
    ToWorker,
    read_frame,
    send,
)
from gateway.proxy.connlimit import SharedConnectionCount
from gateway.ratelimit.shared import DEFAULT_SLOTS, SharedTable
from gateway.snapshot import close_redis_stores, redis_lease_counters

if TYPE_CHECKING:
    from gateway.config.model import GatewayConfig
    from gateway.snapshot import Snapshot

__all__ = [
    "WorkerPool",
    "WorkerStartError",
    "main",
    "run_worker",
    "worker_count",
]

log = logging.getLogger("gateway.workers")

START_TIMEOUT = 60.0  # a worker parses and compiles the whole config before it is ready
REPLY_TIMEOUT = 30.0  # config swaps: parsing a large file takes a while
BACKOFF_MIN = 0.1
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the restart backoff


def worker_count(workers: int | str) -> int:
    """``workers`` from the config as a number of processes (``auto``: one per core)."""
    if workers == "auto":
        return max(1, os.cpu_count() or 1)
    return int(workers)


# --------------------------------------------------------------------------- supervisor side


class WorkerStartError(Exception):
    """A worker could not start (e.g. the port is taken): the gateway cannot run."""


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    started: float
    ready: asyncio.Future[Reply]
    pending: dict[int, asyncio.Future[Reply]] = field(default_factory=dict)
    last_state: dict[str, Any] | None = None  # its latest metrics export
    sha256: str = ""
    reader_task: asyncio.Task[None] | None = None
    gone: bool = False  # its end of the pipe is closed: no answer will come

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def is_ready(self) -> bool:
        """Running, with its first snapshot live and its listener open."""
        ready = self.ready
        return (
            self.process.returncode is None
            and ready.done()
            and not ready.cancelled()
            and ready.exception() is None
            and not self.writer.is_closing()
        )

    def requests(self) -> int:
        if self.last_state is None:
            return 0
        return int(sum(row[4] for row in self.last_state["requests"]))


class WorkerPool:
    """The supervisor's side: spawn, feed, watch and restart ``count`` workers."""

    def __init__(
        self,
        count: int,
        host: str,
        port: int,
        *,
        log_level: int = logging.INFO,
        shared_slots: int = DEFAULT_SLOTS,
        extra_addresses: Sequence[tuple[str, int]] = (),
    ):
        self.count = count
        self.host = host
        self.port = port
        # Listeners after the first (``listen`` as a list): each reserved and passed the same way.
        self.addresses: list[tuple[str, int]] = [(host, port), *extra_addresses]
        self._placeholders: list[socket.socket] = []
        self.log_level = log_level
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self.stopping = False
        # What a (re)started worker needs: the last config message plus later discovery and
        # health updates folded in. Set before start().
        self.current: ConfigPayload | None = None
        # Metrics of workers that died: counters must not go backwards on /metrics.
        self.retired: list[dict[str, Any]] = []
        self._seq = 0
        self._placeholder: socket.socket | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        # Gateway-wide state: local rate-limit buckets in shared memory, and one hash seed so
        # that every worker (restarted ones too) hashes bucket keys the same way.
        self.shared_slots = shared_slots
        self.shared: SharedTable | None = None
        self.connections: SharedConnectionCount | None = None
        self.hash_seed = 1 + secrets.randbelow(2**32 - 1)
        # Called with each ``eject`` message a worker sends (set by the owner of the pool).
        self.on_eject: Callable[[EjectMessage], None] | None = None
        # Called with each ``jwks_refresh`` a worker sends and a function answering that
        # worker (url, JWK Set, fetched_at), set by the owner of the pool.
        self.on_jwks_refresh: (
            Callable[[JwksRefreshMessage, Callable[[str, Any, float], None]], None] | None
        ) = None

    # -- lifecycle -----------------------------------------------------------------------------

    def _reserve_port(self) -> None:
        """Bind (without listening) every listen address with SO_REUSEPORT.

        It resolves port 0 to one concrete port for every worker, fails early and clearly when
        the port is taken, and holds the port while a worker restarts. A socket that does not
        listen is not in the kernel's reuseport group, so it is never handed a connection.
        """
        resolved: list[tuple[str, int]] = []
        for host, port in self.addresses:
            infos = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(address)
            except OSError as error:
                sock.close()
                raise OSError(error.errno, f"{host}:{port}: {error.strerror}") from None
            resolved.append((host, sock.getsockname()[1]))
            self._placeholders.append(sock)
        self.addresses = resolved
        self.port = resolved[0][1]
        self._placeholder = self._placeholders[0]

    async def start(self) -> None:
        """Start every worker and wait until each has its first snapshot live and listens."""
        try:
            self._reserve_port()
        except OSError as error:
            raise WorkerStartError(f"cannot listen on {self.host}:{self.port}: {error}") from None
        try:
            self.shared = SharedTable.create(self.shared_slots)
        except OSError as error:
            raise WorkerStartError(f"cannot create the shared rate-limit table: {error}") from None
        try:
            self.connections = SharedConnectionCount.create(self.count)
        except (OSError, ValueError) as error:
            raise WorkerStartError(f"cannot create the shared connection count: {error}") from None
        for index in range(self.count):
            self.workers[index] = await self._spawn(index)
        for worker in list(self.workers.values()):
            exited = asyncio.ensure_future(worker.process.wait())
            waiting: set[asyncio.Future[Any]] = {worker.ready, exited}
            try:
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=START_TIMEOUT,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                exited.cancel()
            if worker.ready not in done or worker.ready.exception() is not None:
                self.kill_now()
                code = worker.process.returncode
                raise WorkerStartError(
                    f"worker {worker.index} did not start"
                    + (f" (exit code {code})" if code is not None else " in time")
                )
        for worker in self.workers.values():
            self._watch(worker)

    async def _spawn(self, index: int) -> _Worker:
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.workers",
                "--ipc-fd",
                str(child.fileno()),
                "--index",
                str(index),
                "--host",
                self.host,
                "--port",
                str(self.port),
                *[arg for host, port in self.addresses for arg in ("--listen", f"{host}|{port}")],
                "--log-level",
                logging.getLevelName(self.log_level),
                pass_fds=(child.fileno(),)
                + ((self.shared.fd,) if self.shared else ())
                + ((self.connections.fd,) if self.connections else ()),
                stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONHASHSEED": str(self.hash_seed)},
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        loop = asyncio.get_running_loop()
        worker = _Worker(index, process, writer, time.monotonic(), loop.create_future())
        worker.reader_task = loop.create_task(self._read(worker, reader))
        seq = self._next_seq()
        worker.pending[seq] = worker.ready
        assert self.current is not None, "set WorkerPool.current before start()"
        shared = self.shared.spec() if self.shared is not None else None
        connections = self.connections.spec() if self.connections is not None else None
        send(
            writer,
            ipc.config_message(self.current, seq, shared=shared, connections=connections),
        )
        log.info("worker %d started (pid %d)", index, process.pid)
        return worker

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while True:
            frame = await read_frame(reader)
            if frame is None:
                break
            try:
                message = ipc.parse_to_supervisor(frame)
            except BadMessage as error:
                log.warning("ignored a control message from worker %d: %s", worker.index, error)
                continue
            if message["op"] == "eject":
                if self.on_eject is not None:
                    self.on_eject(message)
                continue
            if message["op"] == "jwks_refresh":
                if self.on_jwks_refresh is not None:
                    self.on_jwks_refresh(message, partial(_answer_jwks, worker))
                continue
            if message["op"] == "ready" or message["op"] == "ack":
                worker.sha256 = message["sha256"]
            future = worker.pending.pop(message["seq"], None)
            if future is not None and not future.done():
                future.set_result(message)
        worker.gone = True
        for future in worker.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"worker {worker.index} is gone"))
        worker.pending.clear()

    def _watch(self, worker: _Worker) -> None:
        task = asyncio.get_running_loop().create_task(self._supervise(worker))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _supervise(self, worker: _Worker) -> None:
        """Wait for the worker to exit; unless shutting down, start a new one with backoff."""
        backoff = BACKOFF_MIN
        while True:
            code = await worker.process.wait()
            if worker.reader_task is not None:
                await worker.reader_task
            worker.writer.close()
            if self.connections is not None:
                self.connections.reset(worker.index)  # its connections died with it
            if self.stopping:
                return
            if worker.last_state is not None:
                self.retired = _combine([*self.retired, _counters_only(worker.last_state)])
            self.restarts += 1
            lived = time.monotonic() - worker.started
            if lived >= STABLE_AFTER:
                backoff = BACKOFF_MIN
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.error(
                "worker %d (pid %d) died (%s) after %.1fs; restarting in %.1fs",
                worker.index,
                worker.pid,
                how,
                lived,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self.stopping:
                # mypy keeps the narrowing from before the await; stop() may have run since.
                return  # type: ignore[unreachable]
            try:
                worker = await self._spawn(worker.index)
            except OSError as error:
                log.error("worker %d could not be started: %s", worker.index, error)
                continue
            self.workers[worker.index] = worker

    async def stop(self, grace_period: float) -> None:
        """Forward SIGTERM (each worker drains for up to its ``drain_timeout``) and wait."""
        self.stopping = True
        for worker in self.workers.values():
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        waits = [w.process.wait() for w in self.workers.values()]
        try:
            async with asyncio.timeout(grace_period + 5.0):
                await asyncio.gather(*waits)
        except TimeoutError:
            log.error("workers still running %.0fs after SIGTERM: killing them", grace_period + 5)
            self.kill_now()
            await asyncio.gather(*(w.process.wait() for w in self.workers.values()))
        for task in list(self._watchers):
            task.cancel()
        for worker in self.workers.values():
            worker.writer.close()
        for placeholder in self._placeholders:
            placeholder.close()
        if self.shared is not None:
            self.shared.close()
        if self.connections is not None:
            self.connections.release()

    def kill_now(self) -> None:
        self.stopping = True
        for worker in self.workers.values():
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    # -- feeding workers -----------------------------------------------------------------------

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.is_ready]

    def broadcast(self, message: ToWorker) -> None:
        """Send to every started worker (ones still starting got ``current`` already)."""
        for worker in self.workers.values():
            if worker.process.returncode is None and not worker.writer.is_closing():
                send(worker.writer, message)

    async def _ask(self, worker: _Worker, message: Callable[[int], ToWorker], wait: float) -> Reply:
        """Send ``message(seq)`` and wait for the reply with that ``seq``."""
        if worker.gone:
            raise ConnectionError(f"worker {worker.index} is gone")
        seq = self._next_seq()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        worker.pending[seq] = future
        send(worker.writer, message(seq))
        try:
            async with asyncio.timeout(wait):
                return await future
        finally:
            worker.pending.pop(seq, None)

    async def apply_config(self, payload: ConfigPayload) -> list[str]:
        """Swap a new config into every worker; returns the problems (empty = all swapped)."""
        self.current = payload
        live = [w for w in self.workers.values() if w.process.returncode is None]
        message = partial(ipc.config_message, payload)
        results = await asyncio.gather(
            *(self._ask(w, message, REPLY_TIMEOUT) for w in live),
            return_exceptions=True,
        )
        problems = []
        for worker, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                problems.append(f"worker {worker.index}: {result!r}")
            elif result["op"] == "reject":
                problems.append(f"worker {worker.index}: {result['error']}")
        return problems

    def _current(self) -> ConfigPayload:
        assert self.current is not None, "set WorkerPool.current before start()"
        return self.current.copy()

    def update_instances(self, state: InstanceState) -> None:
        current = self._current()
        current["discovered"] = state["discovered"]
        current["unhealthy"] = state["unhealthy"]
        current["ejected"] = state["ejected"]
        self.current = current
        self.broadcast(ipc.discovered_message(state))

    def eject(self, upstream: str, address: str, until: float, ejected: ipc.Ejected) -> None:
        """Tell every worker about an outlier ejection; ``ejected`` (all running ejections)
        goes to workers started later."""
        current = self._current()
        current["ejected"] = ejected
        self.current = current
        self.broadcast(ipc.eject_message(upstream, address, until))

    def health(self, upstream: str, address: str, healthy: bool, unhealthy: ipc.Unhealthy) -> None:
        current = self._current()
        current["unhealthy"] = unhealthy
        self.current = current
        self.broadcast(ipc.health_message(upstream, address, healthy))

    async def gather_metrics(self, wait: float = 1.0) -> list[dict[str, Any]]:
        """Every live worker's ``export_state()``; a worker that does not answer in ``wait`` s
        is represented by its previous answer, so counters never go backwards."""
        live = self._live()
        results = await asyncio.gather(
            *(self._ask(w, ipc.metrics_request, wait) for w in live), return_exceptions=True
        )
        states = list(self.retired)
        for worker, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("worker %d did not answer the metrics request", worker.index)
            elif result["op"] != "metrics":
                log.warning("worker %d answered a metrics request with %r", worker.index, result)
            else:
                worker.last_state = result["state"]
            if worker.last_state is not None:
                states.append(worker.last_state)
        return states

    def ready_count(self) -> int:
        return len(self._live())

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "index": w.index,
                "pid": w.pid,
                "ready": w.is_ready,
                "uptime_seconds": round(now - w.started, 3),
                "config_sha256": w.sha256,
                "requests": w.requests(),  # as of the last /metrics scrape
            }
            for w in sorted(self.workers.values(), key=lambda w: w.index)
        ]


def _answer_jwks(worker: _Worker, url: str, jwks: Any, fetched_at: float) -> None:
    if worker.process.returncode is None and not worker.writer.is_closing():
        send(worker.writer, ipc.jwks_message(url, jwks, fetched_at))


def _combine(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold several exported states into one, so dead workers do not pile up."""
    if len(states) < 2:
        return states
    from gateway.metrics import GatewayMetrics

    total = GatewayMetrics(bucket_overrides=states[0]["buckets"])
    for state in states:
        total.merge_state(state)
    return [total.export_state()]


def _counters_only(state: dict[str, Any]) -> dict[str, Any]:
    """A dead worker's last export without its gauges (its connections are gone)."""
    return {**state, "connections_open": 0, "upstream_connections": [], "instance_states": {}}


# --------------------------------------------------------------------------- worker side


def _build(config: GatewayConfig, previous: Snapshot | None, state: InstanceState) -> Snapshot:
    from gateway.config.model import InstanceConfig
    from gateway.snapshot import build_snapshot

    discovered = {
        name: tuple(InstanceConfig(h, p, w) for h, p, w in rows)
        for name, rows in state["discovered"].items()
    }
    snapshot = build_snapshot(config, previous, discovered)
    down = set(state["unhealthy"])
    for upstream in snapshot.upstreams.values():
        for instance in upstream.instances:
            upstream.set_health(instance, (upstream.name, instance.address) not in down)
    apply_ejections(snapshot, state["ejected"])
    return snapshot


def apply_ejections(snapshot: Snapshot, ejected: Iterable[tuple[str, str, float]]) -> None:
    """Outlier ejections decided by any worker: (upstream, address, until) rows."""
    now = time.monotonic()
    for name, address, until in ejected:
        upstream = snapshot.upstreams.get(name)
        if upstream is not None:
            upstream.apply_ejection(address, until, now)


def _parse(message: ConfigMessage) -> GatewayConfig:
    import dataclasses

    from gateway.config import load_config_text
    from gateway.config.secrets import SCRUBBER

    config = load_config_text(message["text"], message["source"], references=message["references"])
    SCRUBBER.set_secrets(config.secrets)
    # The TLS files as the supervisor read and checked them (PEM is ASCII: latin-1 is exact).
    tls_files = {path: text.encode("latin-1") for path, text in message["tls"].items()}
    # The supervisor hashed the file's bytes; keep its digest so both report the same one.
    return dataclasses.replace(
        config, sha256=message["sha256"] or config.sha256, tls_files=tls_files
    )


def encode_tls_files(files: Mapping[str, bytes]) -> dict[str, str]:
    """``GatewayConfig.tls_files`` for the ``config`` message (``tls``)."""
    return {path: data.decode("latin-1") for path, data in files.items()}


def _bound_listeners(config: Any, addresses: Sequence[tuple[str, int]]) -> Any:
    """The config's listeners with the ports the supervisor reserved (port 0 resolved)."""
    import dataclasses

    from gateway.config.model import Address

    return [
        dataclasses.replace(listener, address=Address(host, port))
        for listener, (host, port) in zip(config.all_listeners, addresses, strict=False)
    ]


async def run_worker(
    ipc_fd: int, index: int, host: str, port: int, addresses: Sequence[tuple[str, int]] = ()
) -> int:
    """A worker process: the data plane only, fed over the control pipe."""
    from gateway.accesslog import AccessLog
    from gateway.config import ConfigInvalid, format_errors
    from gateway.filters.chain import count_filter_errors
    from gateway.metrics import GatewayMetrics
    from gateway.proxy.server import ProxyServer
    from gateway.ratelimit import shared as shared_buckets
    from gateway.snapshot import set_ejection_listener

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=ipc_fd))

    def ask_jwks(url: str, settings: JwksSettings, unknown_kid: bool) -> None:
        send(
            writer,
            ipc.jwks_refresh_message(
                url, unknown_kid, settings.min_refresh, settings.cache_ttl, settings.timeout
            ),
        )

    # jwks_url keys come from the supervisor (gateway.filters.jwks), from the first config
    # on: validating it builds the filters.
    JWKS_STORE.install(ask_jwks)
    frame = await read_frame(reader)
    try:
        first = ipc.parse_to_worker(frame) if frame is not None else None
    except BadMessage as error:
        log.error("bad first control message: %s", error)
        return 2
    if first is None or first["op"] != "config":
        log.error("no config from the supervisor")
        return 2
    try:
        config = _parse(first)
    except ConfigInvalid as invalid:  # the supervisor validated it: should not happen
        log.error("config rejected:\n%s", format_errors(invalid.errors))
        return 2
    if first["shared"]:
        try:
            shared_buckets.install(shared_buckets.SharedTable.attach(first["shared"]))
        except (OSError, ValueError) as error:
            log.error("cannot attach the shared rate-limit table: %s", error)
            return 2

    def ejected(upstream: str, address: str, until: float) -> None:
        send(writer, ipc.eject_message(upstream, address, until))

    set_ejection_listener(ejected)
    metrics = GatewayMetrics(bucket_overrides=dict(config.metrics.buckets))
    metrics.declare((route.name, route.upstream) for route in config.routes)
    count_filter_errors(metrics.filter_error)
    metrics.count_from(span_counters)
    metrics.count_from(redis_lease_counters)
    server = ProxyServer(_build(config, None, first), metrics)
    if first["connections"]:
        try:
            server.connection_count = SharedConnectionCount.attach(first["connections"], index)
        except (OSError, ValueError) as error:
            log.error("cannot attach the shared connection count: %s", error)
            return 2
    if config.access_log is not None:
        server.access_log = AccessLog(config.access_log.path, config.access_log.sample)
    try:
        if addresses:
            await server.start(reuse_port=True, listeners=_bound_listeners(config, addresses))
        else:
            await server.start(host, port, reuse_port=True)
    except (OSError, ValueError) as error:
        log.error("cannot listen on %s:%d: %s", host, port, error)
        return 1
    send(writer, ipc.ready_message(first["seq"], os.getpid(), config.sha256))

    stop = asyncio.Event()

    def graceful(signum: int) -> None:
        if signum == signal.SIGINT and stop.is_set():
            os._exit(130)  # second Ctrl-C: exit now
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, graceful, signum)
    loop.add_signal_handler(signal.SIGQUIT, os._exit, 128 + signal.SIGQUIT)
    # Reload is the supervisor's job; a SIGHUP to the process group must not kill workers.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)

    def handle(message: ToWorker) -> None:
        if message["op"] == "metrics":
            send(writer, ipc.metrics_reply(message["seq"], metrics.export_state()))
        elif message["op"] == "health":
            upstream = server.snapshot.upstreams.get(message["upstream"])
            if upstream is not None:
                for instance in upstream.instances:
                    if instance.address == message["address"]:
                        upstream.set_health(instance, message["healthy"])
        elif message["op"] == "eject":
            apply_ejections(
                server.snapshot, [(message["upstream"], message["address"], message["until"])]
            )
        elif message["op"] == "jwks":
            JWKS_STORE.update(message["url"], message["jwks"], message["fetched_at"])
        elif message["op"] == "discovered":
            server.set_snapshot(_build(server.snapshot.config, server.snapshot, message))
        elif message["op"] == "config":
            try:
                new_config = _parse(message)
            except ConfigInvalid as invalid:
                send(writer, ipc.reject_message(message["seq"], format_errors(invalid.errors)))
                return
            try:
                server.apply_tls(new_config)  # new handshakes get the new certificates
            except (OSError, ValueError, KeyError) as error:
                send(writer, ipc.reject_message(message["seq"], str(error)))
                return
            server.set_snapshot(_build(new_config, server.snapshot, message))
            metrics.declare((route.name, route.upstream) for route in new_config.routes)
            send(writer, ipc.ack_message(message["seq"], new_config.sha256))

    async def control() -> None:
        while (frame := await read_frame(reader)) is not None:
            try:
                message = ipc.parse_to_worker(frame)
            except BadMessage as error:
                log.warning("ignored a control message: %s", error)
                continue
            handle(message)
        log.warning("supervisor is gone: draining")

    control_task = loop.create_task(control())
    stop_task = loop.create_task(stop.wait())
    await asyncio.wait({control_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    drain_timeout = server.snapshot.config.drain_timeout
    await server.drain(drain_timeout)
    await stop_exporters()  # the tracing filter's last spans
    await close_redis_stores()
    if server.access_log is not None:
        server.access_log.close()
    control_task.cancel()
    stop_task.cancel()
    writer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.workers", description=__doc__)
    parser.add_argument("--ipc-fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--listen", action="append", default=[], help="host|port, per listener")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s worker-{args.index}[{os.getpid()}] %(name)s: "
        "%(message)s",
    )
    from gateway.config.secrets import install_log_redaction

    install_log_redaction()  # e.g. a Redis URL in a store's log line loses its password
    import uvloop

    addresses = [(item.rsplit("|", 1)[0], int(item.rsplit("|", 1)[1])) for item in args.listen]
    return int(uvloop.run(run_worker(args.ipc_fd, args.index, args.host, args.port, addresses)))


if __name__ == "__main__":
    sys.exit(main())
