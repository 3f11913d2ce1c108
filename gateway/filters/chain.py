"""``Chain``: one route's filters compiled into the ``FilterChain`` the data plane calls.

Order (Envoy's and Kong's onion): request-phase hooks run global -> route -> upstream filters,
each list in its written order; response-phase hooks run in the reverse order, so the filter
that saw the request first sees the response last (a global ``compress`` compresses what the
route's ``headers`` filter produced). ``on_log`` runs in request order.

Only the hooks a filter overrides are called. Synchronous hooks run inline; an ``async def``
hook (or a ``Pending`` returned by a synchronous one) starts one task for that request, the
chain answers ``SUSPENDED`` and calls ``resume`` once the remaining request hooks are done.
Every exception a filter raises stays here: it is counted in
``gateway_filter_errors_total{route,filter}``, logged (rate limited), and becomes a 500 in the
request phase; in the response phase the response goes on unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.filters.api import (
    SUSPENDED,
    LocalReply,
    RequestInfo,
    ResponseInfo,
    Resume,
    _Suspended,
)
from gateway.filters.base import Filter, Pending, overridden_hooks

__all__ = ["Chain", "ErrorCounter", "count_filter_errors", "filter_error_count"]

log = logging.getLogger("gateway.filters")

ErrorCounter = Callable[[str, str], None]


class _Counts:
    """Where filter errors are counted: the process's GatewayMetrics once it registered
    (``count_filter_errors``), and always this dict (tests and the benchmark read it)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.sink: ErrorCounter | None = None

    def __call__(self, route: str, name: str) -> None:
        key = (route, name)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.sink is not None:
            self.sink(route, name)


_ERRORS = _Counts()


def count_filter_errors(sink: ErrorCounter | None) -> None:
    """Send filter errors to ``sink`` (``GatewayMetrics.filter_error``) from now on."""
    _ERRORS.sink = sink


def filter_error_count(route: str, name: str) -> int:
    """Errors counted in this process for (route, filter) since it started."""
    return _ERRORS.counts.get((route, name), 0)


_LOG_INTERVAL = 10.0  # seconds between two logged tracebacks of one (route, filter)


def _internal_error() -> LocalReply:
    return LocalReply(
        500,
        [(b"content-type", b"text/plain; charset=utf-8")],
        b"internal error in a gateway filter\n",
    )


RequestHook = Callable[[RequestInfo], Any]
BodyHook = Callable[[Any, bytes, bool], bytes]
ResponseHook = Callable[[ResponseInfo], None]
LogHook = Callable[[RequestInfo, int, float], None]


class Chain:
    """The ``FilterChain`` of one route (see ``gateway.filters.api``)."""

    __slots__ = (
        "_last_logged",
        "_log",
        "_request",
        "_request_body",
        "_request_hooks",
        "_response",
        "_response_body",
        "_single_request_hook",
        "_tasks",
        "filters",
        "request_phase_only",
        "route",
        "wants_log",
        "wants_request_body",
        "wants_request_headers",
        "wants_response_body",
        "wants_response_headers",
    )

    def __init__(self, route: str, filters: Sequence[Filter]) -> None:
        self.route = route
        self.filters = tuple(filters)
        request: list[tuple[str, RequestHook]] = []
        request_body: list[tuple[str, BodyHook]] = []
        response: list[tuple[str, ResponseHook]] = []
        response_body: list[tuple[str, BodyHook]] = []
        log_hooks: list[tuple[str, LogHook]] = []
        for item in self.filters:
            hooks = overridden_hooks(type(item))
            for hook, is_async in hooks.items():
                if is_async and hook != "on_request_headers":
                    raise TypeError(
                        f"filter {item.name}: only on_request_headers may be async, not {hook}"
                    )
            for hook in list(hooks):
                # An instance may switch a hook off by binding the base's no-op to it.
                if getattr(getattr(item, hook), "__func__", None) is getattr(Filter, hook):
                    del hooks[hook]
            if "on_request_headers" in hooks:
                request.append((item.name, item.on_request_headers))
            if "on_request_body" in hooks:
                request_body.append((item.name, item.on_request_body))
            if "on_response_headers" in hooks:
                response.append((item.name, item.on_response_headers))
            if "on_response_body" in hooks:
                response_body.append((item.name, item.on_response_body))
            if "on_log" in hooks:
                log_hooks.append((item.name, item.on_log))
        self._request = tuple(request)
        self._request_hooks = tuple(hook for _, hook in request)  # the per-request loop's
        # The usual chain has one request hook: called without a loop.
        self._single_request_hook = request[0][1] if len(request) == 1 else None
        self._request_body = tuple(request_body)
        self._response = tuple(reversed(response))
        self._response_body = tuple(reversed(response_body))
        self._log = tuple(log_hooks)
        self.wants_request_headers = bool(request)
        self.wants_request_body = bool(request_body)
        self.wants_response_headers = bool(response or response_body)
        self.wants_response_body = bool(response_body)
        self.wants_log = bool(log_hooks)
        self.request_phase_only = not (request_body or response or response_body or log_hooks)
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_logged: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"Chain({self.route!r}, {[f.name for f in self.filters]})"

    # --- request phase --------------------------------------------------------------------

    def on_request_headers(
        self, request: RequestInfo, resume: Resume | None = None
    ) -> LocalReply | _Suspended | None:
        hooks = self._request_hooks
        hook = self._single_request_hook
        try:
            if hook is not None:
                result = hook(request)
                if result is None:
                    return None
            else:
                for hook in hooks:
                    result = hook(request)
                    if result is not None:
                        break
                else:
                    return None
        except Exception:
            # ``hook`` is the one that raised: found by identity only now (no counter per hook).
            return self._failed(self._request[_position(hooks, hook)][0], "on_request_headers")
        if isinstance(result, LocalReply):
            return result
        index = _position(hooks, hook)
        return self._suspend(index, self._request[index][0], result, request, resume)

    def _suspend(
        self, index: int, name: str, result: object, request: RequestInfo, resume: Resume | None
    ) -> LocalReply | _Suspended:
        awaitable = result.awaitable if isinstance(result, Pending) else result
        if not inspect_awaitable(awaitable):
            return self._failed(name, "on_request_headers", f"returned {result!r}")
        if resume is None:
            # The data plane's request (FilterState) carries its own resume.
            resume = getattr(request, "resume", None)
            if resume is None:
                _discard(awaitable)
                return self._failed(name, "on_request_headers", "suspended without a resume")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop: nothing could ever resume it
            _discard(awaitable)
            return self._failed(name, "on_request_headers", "suspended outside an event loop")
        task = loop.create_task(
            self._continue(index, awaitable, request, resume)  # type: ignore[arg-type]
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return SUSPENDED

    async def _continue(
        self,
        index: int,
        awaitable: Awaitable[Any],
        request: RequestInfo,
        resume: Resume,
    ) -> None:
        hooks = self._request
        reply: LocalReply | None = None
        pending: Awaitable[Any] | None = awaitable
        while pending is not None:
            name = hooks[index][0]
            try:
                result = await pending
            except Exception:
                reply = self._failed(name, "on_request_headers")
                break
            pending = None
            if result is not None:
                if isinstance(result, LocalReply):
                    reply = result
                else:
                    reply = self._failed(name, "on_request_headers", f"returned {result!r}")
                break
            # The hooks after it run inline until one answers or suspends again.
            index += 1
            while index < len(hooks):
                name, hook = hooks[index]
                try:
                    result = hook(request)
                except Exception:
                    reply = self._failed(name, "on_request_headers")
                    break
                if result is None:
                    index += 1
                    continue
                if isinstance(result, LocalReply):
                    reply = result
                    break
                pending = result.awaitable if isinstance(result, Pending) else result
                if not inspect_awaitable(pending):
                    pending = None
                    reply = self._failed(name, "on_request_headers", f"returned {result!r}")
                break
            if reply is not None:
                break
        try:
            resume(reply)
        except Exception:
            log.exception("route %s: resuming the exchange after a filter failed", self.route)

    def on_request_body(self, request: RequestInfo, chunk: bytes, end: bool) -> bytes:
        for name, hook in self._request_body:
            try:
                chunk = hook(request, chunk, end)
            except Exception:
                # Too late for a 500 (the head went upstream): the chunk goes on unchanged.
                self._count(name, "on_request_body")
        return chunk

    # --- response phase -------------------------------------------------------------------

    def on_response_headers(self, response: ResponseInfo) -> None:
        for name, hook in self._response:
            try:
                hook(response)
            except Exception:
                self._count(name, "on_response_headers")

    def on_response_body(self, response: ResponseInfo, chunk: bytes, end: bool) -> bytes:
        for name, hook in self._response_body:
            try:
                chunk = hook(response, chunk, end)
            except Exception:
                self._count(name, "on_response_body")
        return chunk

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        for name, hook in self._log:
            try:
                hook(request, status, duration_s)
            except Exception:
                self._count(name, "on_log")

    # --- errors -------------------------------------------------------------------------

    def _failed(self, name: str, hook: str, why: str | None = None) -> LocalReply:
        self._count(name, hook, why)
        return _internal_error()

    def _count(self, name: str, hook: str, why: str | None = None) -> None:
        _ERRORS(self.route, name)
        now = time.monotonic()
        if now - self._last_logged.get(name, -_LOG_INTERVAL) >= _LOG_INTERVAL:
            self._last_logged[name] = now
            if why is None:
                log.exception("route %s: filter %s failed in %s", self.route, name, hook)
            else:
                log.error("route %s: filter %s %s in %s", self.route, name, why, hook)


def _position(hooks: tuple[Any, ...], hook: object) -> int:
    return next(index for index, item in enumerate(hooks) if item is hook)


def _discard(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never awaited: no warning
    if callable(close):
        close()


def inspect_awaitable(value: object) -> bool:
    return hasattr(value, "__await__")
