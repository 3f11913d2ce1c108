"""Active health checks: probe every instance on a jittered interval (control plane).

One asyncio task per target probes every ``interval ± jitter`` seconds with a ``timeout``. The
``http`` check sends ``GET path``: a response whose status is in ``expected_statuses`` is a
success, anything else (other status, refused connection, timeout) a failure. The ``grpc``
check calls ``grpc.health.v1.Health/Check`` for ``grpc_service`` over HTTP/2
(``gateway.health.grpc_check``): SERVING is a success, anything else a failure. A healthy
target turns unhealthy after ``unhealthy_threshold`` consecutive failures, an unhealthy one
healthy after ``healthy_threshold`` consecutive successes. Each transition is logged, counted
and reported to ``on_transition(target, healthy)``; the caller flips ``instance.available`` and
refreshes its balancers (and the balancer's slow start covers the recovery).

Targets are addresses (``"127.0.0.1:9001"``, ``"[::1]:9001"``) or objects with an ``.address``
attribute; they key the state, so they must be hashable. Jitter keeps the probes of many
gateways and instances from marching in step; the first probe of a target goes out after a
random fraction of the jitter so a start or reload does not burst either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config.validate import parse_address

logger = logging.getLogger("gateway.health")

Transition = Callable[[Hashable, bool], None]


@dataclass(slots=True)
class TargetHealth:
    healthy: bool
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    probes: int = 0
    transitions: int = 0
    last_status: int | None = None
    last_error: str | None = None
    last_probe: float = 0.0  # time.monotonic() of the last result


def target_address(target: Hashable) -> str:
    address = target if isinstance(target, str) else getattr(target, "address", None)
    if not isinstance(address, str):
        raise TypeError(f"health check target {target!r} has no address")
    return address


class ActiveHealthChecker:
    def __init__(
        self,
        targets: Iterable[Hashable],
        path: str = "/healthz",
        interval: float = 5.0,
        timeout: float = 1.0,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        expected_statuses: Iterable[int] = (200,),
        jitter: float = 0.0,
        on_transition: Transition | None = None,
        *,
        initially_healthy: bool = True,
        host_header: str | None = None,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        check_type: str = "http",
        grpc_service: str = "",
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        if not path.startswith("/"):
            raise ValueError("health check path must start with '/'")
        if check_type not in ("http", "grpc"):
            raise ValueError(f"health check type must be http or grpc, not {check_type!r}")
        self.check_type = check_type
        # grpc: the service asked about ("" = the server as a whole); ssl_context offers h2.
        self.grpc_service = grpc_service
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.expected_statuses = frozenset(expected_statuses)
        self.jitter = max(0.0, jitter)
        self.on_transition = on_transition
        self.initially_healthy = initially_healthy
        self.host_header = host_header
        # upstreams.NAME.tls: probes speak TLS with the data plane's context and SNI.
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.transitions = 0  # total, for gateway_upstream_health_transitions_total
        self._rng = rng if rng is not None else random.Random()
        self._targets: list[Hashable] = list(dict.fromkeys(targets))
        self._states: dict[Hashable, TargetHealth] = {
            target: TargetHealth(healthy=initially_healthy) for target in self._targets
        }
        self._tasks: dict[Hashable, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._running = False

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        # No pooling: a probe must exercise a fresh connection like a new client would, and
        # keep-alive would hide an instance that stopped accepting connections.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )
        for target in self._targets:
            self._spawn(target)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def update_targets(self, targets: Iterable[Hashable]) -> None:
        """Replace the target set: new targets start probing (in the initial state), removed
        ones stop; targets in both keep their state and schedule."""
        wanted = list(dict.fromkeys(targets))
        wanted_set = set(wanted)
        for target in self._targets:
            if target not in wanted_set:
                self._states.pop(target, None)
                task = self._tasks.pop(target, None)
                if task is not None:
                    task.cancel()
        for target in wanted:
            if target not in self._states:
                self._states[target] = TargetHealth(healthy=self.initially_healthy)
                if self._running:
                    self._spawn(target)
        self._targets = wanted

    # -- queries -------------------------------------------------------------------------------
    @property
    def targets(self) -> list[Hashable]:
        return list(self._targets)

    def is_healthy(self, target: Hashable) -> bool:
        return self._states[target].healthy

    def state(self, target: Hashable) -> TargetHealth:
        return self._states[target]

    def counts(self) -> dict[str, int]:
        """``{"healthy": n, "unhealthy": m}`` for ``gateway_upstream_instances{state}``."""
        healthy = sum(1 for state in self._states.values() if state.healthy)
        return {"healthy": healthy, "unhealthy": len(self._states) - healthy}

    # -- probing -------------------------------------------------------------------------------
    def _spawn(self, target: Hashable) -> None:
        self._tasks[target] = asyncio.get_running_loop().create_task(
            self._run(target), name=f"health-check {target_address(target)}"
        )

    def _delay(self) -> float:
        if not self.jitter:
            return self.interval
        return max(0.0, self.interval + self._rng.uniform(-self.jitter, self.jitter))

    async def _run(self, target: Hashable) -> None:
        scheme = "https" if self.ssl_context is not None else "http"
        url = f"{scheme}://{target_address(target)}{self.path}"
        await asyncio.sleep(self._rng.random() * min(self.jitter, self.interval))
        while self._running and target in self._states:
            if self.check_type == "grpc":
                ok, status, error = await self.probe_grpc(target_address(target))
            else:
                ok, status, error = await self.probe(url)
            self._record(target, ok, status, error)
            await asyncio.sleep(self._delay())

    async def probe(self, url: str) -> tuple[bool, int | None, str | None]:
        """One probe: (success, status or None, error text or None)."""
        session = self._session
        assert session is not None
        headers = {"Host": self.host_header} if self.host_header else None
        tls: dict[str, Any] = {}
        if self.ssl_context is not None:
            tls["ssl"] = self.ssl_context
            if self.server_hostname:
                tls["server_hostname"] = self.server_hostname
        try:
            async with session.get(
                url,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                **tls,
            ) as response:
                status = response.status
                return status in self.expected_statuses, status, None
        except TimeoutError:
            return False, None, "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            return False, None, f"{type(exc).__name__}: {exc}"

    async def probe_grpc(self, address: str) -> tuple[bool, int | None, str | None]:
        """One ``grpc.health.v1.Health/Check`` call to ``address``."""
        # Imported here: h2 is loaded only by processes that run a grpc check.
        from gateway.health.grpc_check import probe_grpc

        parsed = parse_address(address)
        return await probe_grpc(
            parsed.host,
            parsed.port,
            self.grpc_service,
            self.timeout,
            authority=self.host_header,
            ssl_context=self.ssl_context,
            server_hostname=self.server_hostname,
        )

    def _record(self, target: Hashable, ok: bool, status: int | None, error: str | None) -> None:
        state = self._states.get(target)
        if state is None:
            return  # removed while the probe was in flight
        state.probes += 1
        state.last_status = status
        state.last_error = error
        state.last_probe = time.monotonic()
        if ok:
            state.successes += 1
            state.failures = 0
            flip = not state.healthy and state.successes >= self.healthy_threshold
        else:
            state.failures += 1
            state.successes = 0
            flip = state.healthy and state.failures >= self.unhealthy_threshold
        if not flip:
            return
        state.healthy = not state.healthy
        state.transitions += 1
        self.transitions += 1
        # The error says more than the status when both exist (a grpc check answers 200).
        reason = error or (f"status {status}" if status is not None else "failure")
        logger.warning(
            "health check: %s is now %s (%s)",
            target_address(target),
            "healthy" if state.healthy else "unhealthy",
            reason,
        )
        if self.on_transition is not None:
            try:
                self.on_transition(target, state.healthy)
            except Exception:  # a buggy callback must not stop the checks
                logger.exception("health check transition callback failed")
