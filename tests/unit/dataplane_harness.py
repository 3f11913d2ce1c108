"""Sans-IO harness for the data plane: the client side, the upstream side, a fake clock.

The tests in ``tests/unit/test_dataplane_*.py`` speak only this module's vocabulary (bytes in,
bytes out, observable effects); every coupling to the data plane's internals is here, so that a
restructure of ``gateway/proxy`` changes this file and not the tests.

- **Clock.** One ``FakeClock`` replaces ``time.monotonic`` for the harness's lifetime (the data
  plane, the snapshot and the pools read it there), and drives a ``FakeLoop`` whose
  ``call_later``/``call_soon`` timers fire only when the harness advances time. The fake loop is
  installed as the thread's running loop, so ``asyncio.get_running_loop()`` returns it; no real
  loop runs. The server's timeout sweep is scheduled on it every ``TICK`` as ``start`` would.
- **Transports.** ``FakeTransport`` records writes, pause/resume of reading, close and abort;
  bytes sent to a paused transport wait until reading resumes (as the kernel buffer would), and
  closing delivers ``connection_lost`` on the next loop turn.
- **Connector.** ``InstancePool.connect`` is replaced: each connect becomes a ``PendingConnect``
  that, per instance address, is accepted on the next loop turn (default), refused, or left
  hanging until the pool's connect timeout passes on the fake clock (``TimeoutError``, as
  ``asyncio.timeout`` would raise).

After every action (client bytes, upstream bytes, a close) the harness runs whatever the loop
has ready, as the event loop would right after a callback returns.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from gateway import pools as pools_module
from gateway.config import load_config_text
from gateway.metrics import GatewayMetrics
from gateway.proxy import server as server_module
from gateway.proxy.listener import ClientConnection
from gateway.proxy.server import ProxyServer
from gateway.proxy.upstream import InstancePool, UpstreamConnection
from gateway.snapshot import Instance, Snapshot, Upstream, build_snapshot

START_TIME = 10_000.0  # fake monotonic seconds at the start of every harness
CLIENT_PEER = ("192.0.2.10", 40000)

ACCEPT = "accept"  # the connect succeeds on the next loop turn
REFUSE = "refuse"  # the connect fails with ConnectionRefusedError on the next loop turn
HANG = "hang"  # the connect never settles by itself: connect timeout, or the test decides

OnConnected = Callable[[UpstreamConnection | None, BaseException | None], Any]


# -- clock and loop ------------------------------------------------------------------------------
class FakeClock:
    def __init__(self, start: float = START_TIME) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now


class FakeTimer:
    """What ``call_later`` returns: enough of ``asyncio.TimerHandle``."""

    __slots__ = ("_args", "_callback", "_cancelled", "_when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._when = when
        self._callback = callback
        self._args = args
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._args = ()  # as asyncio's handles do: a cancelled timer keeps nothing alive

    def cancelled(self) -> bool:
        return self._cancelled

    def when(self) -> float:
        return self._when

    def run(self) -> None:
        if not self._cancelled:
            self._cancelled = True  # a handle runs once
            self._callback(*self._args)


class FakeLoop:
    """Timers on the fake clock; they run only from ``run_until``."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._sequence = itertools.count()

    def time(self) -> float:
        return self.clock.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._sequence), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        return self.call_at(self.clock.now + max(delay, 0.0), callback, *args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        return self.call_at(self.clock.now, callback, *args)

    def create_task(self, coro: Any) -> Any:
        coro.close()
        raise AssertionError("the sans-IO harness runs no coroutines: fake what needs one")

    def run_until(self, target: float) -> None:
        """Run every timer due up to ``target`` in order, moving the clock to each; the clock
        ends at ``target``. Timers scheduled meanwhile run too when they fall due."""
        timers = self._timers
        for _ in range(1_000_000):
            if not timers or timers[0][0] > target:
                break
            when, _, timer = heapq.heappop(timers)
            if when > self.clock.now:
                self.clock.now = when
            timer.run()
        else:
            raise AssertionError("the fake loop keeps scheduling work: a callback loop?")
        if target > self.clock.now:
            self.clock.now = target


# -- transports ----------------------------------------------------------------------------------
class FakeTransport:
    """Enough of ``asyncio.Transport`` for one side of the data plane."""

    def __init__(self, loop: FakeLoop, peer: tuple[str, int]) -> None:
        self.loop = loop
        self.peer = peer
        self.protocol: asyncio.Protocol | None = None
        self.written: list[bytes] = []
        self.closing = False  # close() or abort() was called (by the data plane)
        self.aborted = False
        self.lost = False  # connection_lost has been delivered
        self.reading_paused = False
        self.pause_calls = 0
        self.resume_calls = 0
        self.write_buffer_limits: tuple[int | None, int | None] | None = None
        self.eof_written = False
        self._inbox: list[bytes] = []  # bytes the peer sent while reading was paused

    # The data plane's side.
    def write(self, data: bytes) -> None:
        # After close() the buffered bytes still go out; after abort() or the loss, nothing.
        if not self.aborted and not self.lost:
            self.written.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._deliver_lost, None)

    def abort(self) -> None:
        self.aborted = True
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._deliver_lost, None)

    def pause_reading(self) -> None:
        self.pause_calls += 1
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.resume_calls += 1
        self.reading_paused = False
        if self._inbox:
            self.loop.call_soon(self._deliver_inbox)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_buffer_limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    # The peer's side.
    def feed(self, data: bytes) -> None:
        """Bytes from the peer: delivered now, or once reading resumes."""
        if self.lost:
            raise AssertionError("bytes sent on a connection that is already closed")
        if self.reading_paused or self._inbox:
            self._inbox.append(data)
            return
        self._data_received(data)

    def _data_received(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.data_received(data)

    def _deliver_inbox(self) -> None:
        while self._inbox and not self.reading_paused and not self.lost:
            self._data_received(self._inbox.pop(0))

    def peer_closed(self, exc: Exception | None) -> None:
        """The peer sent FIN (``exc`` None) or reset the connection."""
        if self.lost:
            return
        assert self.protocol is not None
        if exc is None:
            keep_open = self.protocol.eof_received()
            if keep_open:
                return
        self.closing = True
        self._deliver_lost(exc)

    def _deliver_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._inbox.clear()
        assert self.protocol is not None
        self.protocol.connection_lost(exc)

    @property
    def data(self) -> bytes:
        return b"".join(self.written)


# -- responses as the client sees them ------------------------------------------------------------
@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers:
            if key == lowered:
                return value
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        lowered = name.lower()
        return [value for key, value in self.headers if key == lowered]


def parse_responses(data: bytes, head_requests: int = 0) -> list[Response]:
    """Split a byte stream into HTTP/1.1 responses (an incomplete last one is left out).

    ``head_requests``: how many of the leading responses answer HEAD (no body). A 101 ends the
    stream: what follows is the tunnel's.
    """
    responses: list[Response] = []
    position = 0
    while position < len(data):
        end = data.find(b"\r\n\r\n", position)
        if end < 0:
            break
        lines = data[position:end].split(b"\r\n")
        _, status_text, *reason = lines[0].split(b" ", 2)
        status = int(status_text)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        body_start = end + 4
        fields = dict(headers)
        head_only = len(responses) < head_requests
        if status < 200 or status in (204, 304) or head_only:
            body, body_end = b"", body_start
        elif b"content-length" in fields:
            body_end = body_start + int(fields[b"content-length"])
            if body_end > len(data):
                break
            body = data[body_start:body_end]
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            decoded = _dechunk(data, body_start)
            if decoded is None:
                break
            body, body_end = decoded
        else:
            body, body_end = data[body_start:], len(data)  # close-delimited
        responses.append(
            Response(status, reason[0] if reason else b"", headers, body, data[position:body_end])
        )
        position = body_end
        if status == 101:
            break
    return responses


def _dechunk(data: bytes, position: int) -> tuple[bytes, int] | None:
    body: list[bytes] = []
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(data[position:line_end].split(b";")[0], 16)
        position = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n", position)
            while trailer_end > position:  # skip trailer fields
                position = trailer_end + 2
                trailer_end = data.find(b"\r\n", position)
            if trailer_end < 0:
                return None
            return b"".join(body), trailer_end + 2
        if position + size + 2 > len(data):
            return None
        body.append(data[position : position + size])
        position += size + 2


# -- the two sides as tests drive them -----------------------------------------------------------
@dataclass(frozen=True)
class Try:
    """One upstream attempt of the exchange being answered, as a test may observe it."""

    instance: str  # the instance whose active-request slot it holds ("" once given back)
    connected: bool  # it has an upstream connection (its events reach the exchange)
    read_timer: bool  # a read deadline runs for it (the upstream owes bytes)
    hedge: bool  # the second try racing the first


class Client:
    """One downstream client connection to the gateway."""

    def __init__(self, harness: Harness, peer: tuple[str, int]) -> None:
        self.harness = harness
        self.transport = FakeTransport(harness.loop, peer)
        self.protocol = ClientConnection(harness.server)
        self.transport.protocol = self.protocol
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]
        harness.run()

    def send(self, data: bytes) -> None:
        self.transport.feed(data)
        self.harness.run()

    def disconnect(self) -> None:
        """The client closes its end (FIN)."""
        self.transport.peer_closed(None)
        self.harness.run()

    def reset(self) -> None:
        self.transport.peer_closed(ConnectionResetError("client reset"))
        self.harness.run()

    def pause_writing(self) -> None:
        """The client stops reading: its socket buffer passes the high-water mark."""
        # The transport's current protocol: after a 101 that is the tunnel's end, not ours.
        protocol = self.transport.protocol
        assert protocol is not None
        protocol.pause_writing()
        self.harness.run()

    def resume_writing(self) -> None:
        protocol = self.transport.protocol
        assert protocol is not None
        protocol.resume_writing()
        self.harness.run()

    def received(self) -> bytes:
        return self.transport.data

    def tries(self) -> list[Try]:
        """The active exchange's tries in flight: its current one (also after it failed and
        until the next one starts), then a racing hedge. Empty with no exchange under way."""
        ex = self.protocol.active
        if ex is None:
            return []
        found = []
        for attempt, hedge in ((ex.attempt, False), (ex.hedge, True)):
            if attempt is not None:
                instance = attempt.instance.address if attempt.instance is not None else ""
                found.append(
                    Try(instance, attempt.conn is not None, bool(attempt.read_deadline), hedge)
                )
        return found

    def exchange(self) -> Any:
        """The exchange under way (the object itself: it stays alive while the test holds it)."""
        ex = self.protocol.active
        assert ex is not None, "no exchange under way"
        return ex

    def responses(self, head_requests: int = 0) -> list[Response]:
        return parse_responses(self.transport.data, head_requests)

    def clear(self) -> None:
        self.transport.written.clear()

    @property
    def closed(self) -> bool:
        """The gateway closed (or aborted) this connection."""
        return self.transport.closing

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def reading_paused(self) -> bool:
        return self.transport.reading_paused

    @property
    def write_buffer_high(self) -> int | None:
        limits = self.transport.write_buffer_limits
        return None if limits is None else limits[0]


class UpstreamEnd:
    """One upstream connection, seen from the instance's side."""

    def __init__(self, harness: Harness, conn: UpstreamConnection, transport: FakeTransport):
        self.harness = harness
        self.conn = conn
        self.transport = transport
        self.address = f"{transport.peer[0]}:{transport.peer[1]}"

    def received(self) -> bytes:
        """Every byte the gateway wrote to this connection."""
        return self.transport.data

    def request_head(self) -> bytes:
        data = self.transport.data
        end = data.find(b"\r\n\r\n")
        return data[: end + 4] if end >= 0 else data

    def request_headers(self) -> dict[bytes, bytes]:
        """Fields of the first request head the gateway sent, names lowercased."""
        lines = self.request_head().split(b"\r\n")[1:]
        fields: dict[bytes, bytes] = {}
        for line in lines:
            if line:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
        return fields

    def respond(self, data: bytes) -> None:
        self.transport.feed(data)
        self.harness.run()

    def close(self) -> None:
        """The instance closes the connection (FIN)."""
        self.transport.peer_closed(None)
        self.harness.run()

    def reset(self) -> None:
        self.transport.peer_closed(ConnectionResetError("upstream reset"))
        self.harness.run()

    def pause_writing(self) -> None:
        """The instance stops reading the request: the gateway's buffer toward it is full."""
        protocol = self.transport.protocol  # after a 101: the tunnel's end
        assert protocol is not None
        protocol.pause_writing()
        self.harness.run()

    def resume_writing(self) -> None:
        protocol = self.transport.protocol
        assert protocol is not None
        protocol.resume_writing()
        self.harness.run()

    @property
    def closed(self) -> bool:
        """The gateway closed (or aborted) this connection."""
        return self.transport.closing

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def reading_paused(self) -> bool:
        return self.transport.reading_paused

    @property
    def pooled(self) -> bool:
        """Idle in its instance's pool, ready for the next exchange."""
        return self.conn in self.conn.pool.idle


class PendingConnect:
    """One ``InstancePool.connect`` in flight."""

    def __init__(
        self,
        harness: Harness,
        pool: InstancePool,
        on_done: OnConnected,
    ) -> None:
        self.harness = harness
        self.pool = pool
        self.address = f"{pool.host}:{pool.port}"
        self.on_done: OnConnected | None = on_done
        self.settled = False
        self._timeout = harness.loop.call_later(pool.connect_timeout, self.time_out)

    def _settle(self) -> OnConnected | None:
        """The callback to call, once: then it is let go, as a finished connect task lets go of
        its frame (what it holds must not outlive the exchange because of the harness)."""
        on_done = self.on_done
        if on_done is None:
            return None
        self.on_done = None
        self.settled = True
        self._timeout.cancel()
        self.pool.connecting -= 1
        return on_done

    def accept(self) -> UpstreamEnd:
        on_done = self._settle()
        if on_done is None:
            raise AssertionError("this connect has already settled")
        end = self.harness._open_upstream(self.pool)
        on_done(end.conn, None)
        self.harness.run()
        return end

    def refuse(self, error: BaseException | None = None) -> None:
        on_done = self._settle()
        if on_done is not None:
            on_done(None, error or ConnectionRefusedError(111, "Connection refused"))
            self.harness.run()

    def time_out(self) -> None:
        on_done = self._settle()
        if on_done is not None:
            on_done(None, TimeoutError())


def _upstreams_of(snapshot: Snapshot) -> list[Upstream]:
    return list(snapshot.upstreams.values())


@dataclass
class _Patch:
    target: Any
    name: str
    value: Any
    saved: Any = field(default=None)


class Harness:
    """A ``ProxyServer`` on a snapshot built from YAML text, with no sockets and no running loop.

    Use as a context manager: it patches the clock, the running loop and the connector while
    open, and restores them on exit.
    """

    def __init__(self, config_yaml: str) -> None:
        self.clock = FakeClock()
        self.loop = FakeLoop(self.clock)
        self.upstream_ends: list[UpstreamEnd] = []
        self.connects: list[PendingConnect] = []
        self.connect_policy: dict[str, str] = {}  # address -> ACCEPT / REFUSE / HANG
        self.default_connect = ACCEPT  # for addresses not in connect_policy
        self._config_yaml = config_yaml
        self._patches = [
            _Patch(time, "monotonic", self.clock.monotonic),
            _Patch(pools_module, "_factory", self._pool_factory()),
        ]
        self._ports = itertools.count(50_000)
        self._opened = False

    # -- set-up ------------------------------------------------------------------------------
    def __enter__(self) -> Harness:
        for patch in self._patches:
            patch.saved = getattr(patch.target, patch.name)
            setattr(patch.target, patch.name, patch.value)
        asyncio.events._set_running_loop(self.loop)  # type: ignore[arg-type]
        self._opened = True
        try:
            self.snapshot = build_snapshot(load_config_text(self._config_yaml))
            self.metrics = GatewayMetrics()
            self.server = ProxyServer(self.snapshot, self.metrics)
            # What ProxyServer.start does besides listening: the periodic timeout sweep.
            self.server._loop = self.loop  # type: ignore[assignment]
            self.server._sweeper = self.loop.call_later(  # type: ignore[assignment]
                server_module.TICK, self.server._sweep
            )
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._opened:
            self._opened = False
            asyncio.events._set_running_loop(None)
            for patch in reversed(self._patches):
                setattr(patch.target, patch.name, patch.saved)

    def _pool_factory(self) -> Callable[..., InstancePool]:
        """Pools whose connects the harness settles (a subclass: the compiled data plane calls
        the pool's own ``connect``, which a patch of the class would not reach)."""
        harness = self

        class HarnessPool(InstancePool):
            def connect(  # type: ignore[override]
                self,
                on_done: Callable[[UpstreamConnection | None, BaseException | None], Any],
            ) -> PendingConnect:
                return connect(self, on_done)

        def connect(
            pool: InstancePool,
            on_done: Callable[[UpstreamConnection | None, BaseException | None], Any],
        ) -> PendingConnect:
            pool.connecting += 1
            pending = PendingConnect(harness, pool, on_done)
            harness.connects.append(pending)
            policy = harness.connect_policy.get(pending.address, harness.default_connect)
            if policy == ACCEPT:
                harness.loop.call_soon(pending.accept)
            elif policy == REFUSE:
                harness.loop.call_soon(pending.refuse)
            return pending

        return HarnessPool

    def _open_upstream(self, pool: InstancePool) -> UpstreamEnd:
        conn = UpstreamConnection(pool)
        transport = FakeTransport(self.loop, (pool.host, pool.port))
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        end = UpstreamEnd(self, conn, transport)
        self.upstream_ends.append(end)
        return end

    # -- driving -----------------------------------------------------------------------------
    def client(self, peer: tuple[str, int] | None = None) -> Client:
        return Client(self, peer or (CLIENT_PEER[0], next(self._ports)))

    def run(self) -> None:
        """Run what the loop has ready now (as after any callback returns)."""
        self.loop.run_until(self.clock.now)

    def advance(self, seconds: float) -> None:
        """Move the fake clock on, firing timers and timeout sweeps as they fall due."""
        self.loop.run_until(self.clock.now + seconds)

    def pooled(self, address: str, count: int = 1) -> list[UpstreamEnd]:
        """Idle keep-alive connections to ``address``, already used once (as after an earlier
        exchange), put in its pool; the most recent is handed out first."""
        pool = self._pool(address)
        ends = []
        for _ in range(count):
            end = self._open_upstream(pool)
            pool.release(end.conn)
            ends.append(end)
        return ends

    def upstream(self, address: str | None = None, index: int = -1) -> UpstreamEnd:
        """An upstream connection the gateway opened or was given (the latest by default)."""
        ends = [e for e in self.upstream_ends if address is None or e.address == address]
        if not ends:
            raise AssertionError(f"no upstream connection to {address or 'any instance'}")
        return ends[index]

    def pending_connects(self, address: str | None = None) -> list[PendingConnect]:
        return [
            p for p in self.connects if not p.settled and (address is None or p.address == address)
        ]

    # -- reading state -----------------------------------------------------------------------
    def _instances(self) -> list[Instance]:
        return [i for u in _upstreams_of(self.snapshot) for i in u.instances]

    def _instance(self, address: str) -> Instance:
        for instance in self._instances():
            if instance.address == address:
                return instance
        raise AssertionError(f"no instance {address}")

    def _pool(self, address: str) -> InstancePool:
        pool = self._instance(address).pool
        assert isinstance(pool, InstancePool)
        return pool

    def in_flight(self) -> dict[str, int]:
        """Counters that must all be back to zero once no exchange is under way."""
        upstreams = _upstreams_of(self.snapshot)
        pools = [self._pool(i.address) for i in self._instances()]
        return {
            "active_requests": sum(i.active_requests for i in self._instances()),
            "breaker_requests": sum(u.breaker.requests for u in upstreams),
            "breaker_pending": sum(u.breaker.pending for u in upstreams),
            "connecting": sum(p.connecting for p in pools),
            "client_connections": len(self.server.connections),
        }

    def active_requests(self, address: str) -> int:
        """Requests the instance is counted as serving (the balancer's view)."""
        return self._instance(address).active_requests

    def idle_count(self, address: str) -> int:
        return len(self._pool(address).idle)

    def open_count(self, address: str) -> int:
        return self._pool(address).open_count

    def retries(self) -> dict[str, int]:
        """Retries (and hedges) started, by reason."""
        return {reason: n for (_, reason), n in self.metrics.retries.items()}

    def statuses(self) -> dict[int, int]:
        """Finished exchanges by the status recorded for them (499: the client went away)."""
        counts: dict[int, int] = {}
        for (_, _, _, status), n in self.metrics.requests.items():
            counts[status] = counts.get(status, 0) + n
        return counts

    def client_timeouts(self) -> dict[str, int]:
        return dict(self.metrics.client_timeouts)


NOTHING_IN_FLIGHT = {
    "active_requests": 0,
    "breaker_requests": 0,
    "breaker_pending": 0,
    "connecting": 0,
    "client_connections": 0,
}


def request(
    method: str = "GET",
    path: str = "/",
    *,
    version: str = "1.1",
    host: str | None = "gw.test",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> bytes:
    """Raw request bytes; a body gets a Content-Length unless ``headers`` frame it."""
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    framed = any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers)
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def response(
    status: int = 200,
    body: bytes = b"ok",
    *,
    headers: tuple[tuple[str, str], ...] = (),
    reason: str = "",
    length: bool = True,
) -> bytes:
    """Raw response bytes, with a Content-Length unless ``length`` is False or ``headers``
    frame it."""
    lines = [f"HTTP/1.1 {status} {reason or _REASON.get(status, 'Status')}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    framed = any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers)
    if length and not framed and status not in (101, 204, 304) and status >= 200:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_REASON = {
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def config(
    *,
    instances: tuple[str, ...] = ("10.0.0.1:80",),
    upstream: str = "",
    route: str = "",
    limits: str = "",
) -> str:
    """YAML of one upstream ``app`` and one catch-all route ``main``; the strings are extra YAML
    keys (flow style, comma-separated) for the upstream, the route and ``limits``."""
    upstream_extra = f", {upstream}" if upstream else ""
    route_extra = f", {route}" if route else ""
    limits_line = f"limits: {{{limits}}}\n" if limits else ""
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"
        f"{limits_line}"
        "upstreams:\n"
        f"  app: {{instances: [{', '.join(instances)}]{upstream_extra}}}\n"
        "routes:\n"
        f"  - {{name: main, match: {{path: {{prefix: /}}}}, upstream: app{route_extra}}}\n"
    )
