"""The filter API users write against: a ``Filter`` base class with optional hooks, and helpers
for the ``Headers`` lists filters read and change.

A filter is a class; the gateway makes one instance per place it is configured (a global filter
is one instance shared by every route, an upstream's one is shared by that upstream's routes)
and calls the hooks it overrides, in the phases described in ``gateway.filters.api``::

    class TenantHeader(Filter):
        @classmethod
        def validate_config(cls, options):
            return [] if isinstance(options.get("header"), str) else ["header: required"]

        def __init__(self, options):
            super().__init__(options)
            self.header = options["header"].encode()

        def on_request_headers(self, request):
            tenant = request.host.split(".", 1)[0]
            set_header(request.headers, self.header, tenant)
            return None  # go on; a LocalReply answers the request instead

Hooks are synchronous and must not block. A hook that needs IO is declared ``async def
on_request_headers`` (the exchange is parked while it runs), or a synchronous hook returns
``Pending(awaitable)`` for the rare request that needs to wait (a JWKS refresh on an unknown
key id) so that the others pay nothing.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Mapping
from typing import Any

from gateway.filters.api import Headers, LocalReply, RequestInfo, ResponseInfo

__all__ = [
    "Filter",
    "Headers",
    "LocalReply",
    "Pending",
    "RequestInfo",
    "ResponseInfo",
    "add_header",
    "get_header",
    "get_headers",
    "overridden_hooks",
    "remove_header",
    "set_header",
]

HOOKS: tuple[str, ...] = (
    "on_request_headers",
    "on_request_body",
    "on_response_headers",
    "on_response_body",
    "on_log",
)


class Pending:
    """Returned by a synchronous ``on_request_headers`` that must wait for IO this time: the
    chain awaits ``awaitable`` in a task and takes its result (``LocalReply`` or ``None``) as
    the hook's answer."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[LocalReply | None]) -> None:
        self.awaitable = awaitable


class Filter:
    """Base class of every filter. Override only the hooks you need: a hook left alone costs
    nothing (the chain never calls it)."""

    # Label of this filter in gateway_filter_errors_total and log lines (built-ins: their
    # config name; python filters: the class path).
    name: str = "python"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    @classmethod
    def validate_config(cls, options: Mapping[str, Any]) -> list[str]:
        """Problems with ``options``, one message each (empty: fine). Called at config load;
        a message starting with ``KEY: `` is reported at that key's line."""
        return []

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> Filter:
        """The filter for validated ``options`` (once per config load or reload)."""
        return cls(options)

    def close(self) -> None:
        """The config this instance belongs to was replaced (stop background work)."""

    # --- hooks: the chain calls only those a subclass overrides ---------------------------

    def on_request_headers(self, request: RequestInfo) -> LocalReply | Pending | None:
        """Before the request goes upstream: change ``request.headers``, set
        ``request.upstream`` or ``request.vars``, or answer with a ``LocalReply``."""
        return None

    def on_request_body(self, request: RequestInfo, chunk: bytes, end: bool) -> bytes:
        """A request body chunk (unframed); returns what is sent on."""
        return chunk

    def on_response_headers(self, response: ResponseInfo) -> None:
        """The upstream's response head: change ``response.status`` / ``response.headers``.
        Changing the body's length means removing ``content-length``."""

    def on_response_body(self, response: ResponseInfo, chunk: bytes, end: bool) -> bytes:
        """A response body chunk; ``end`` on the last call (whose chunk may be empty)."""
        return chunk

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        """After the exchange (never fails it)."""


def overridden_hooks(cls: type[Filter]) -> dict[str, bool]:
    """Hook name -> whether it is ``async def``, for the hooks ``cls`` overrides."""
    found: dict[str, bool] = {}
    for hook in HOOKS:
        mine = getattr(cls, hook, None)
        if mine is None or mine is getattr(Filter, hook):
            continue
        found[hook] = inspect.iscoroutinefunction(mine)
    return found


# --- header helpers: names are lowercase bytes in the list; str is accepted and encoded ------


_UNSAFE = re.compile(rb"[\r\n\x00]")


def _name(name: bytes | str) -> bytes:
    return name.lower() if isinstance(name, bytes) else name.lower().encode("ascii")


def _value(value: bytes | str) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    # RFC 9110 §5.5: CR, LF and NUL never belong in a field value (header injection).
    if _UNSAFE.search(raw) is not None:
        raise ValueError(f"header value {raw!r} contains CR, LF or NUL")
    return raw


def get_header(headers: Headers, name: bytes | str) -> bytes | None:
    """The first value of ``name``, or None."""
    key = _name(name)
    for field_name, value in headers:
        if field_name == key:
            return value
    return None


def get_headers(headers: Headers, name: bytes | str) -> list[bytes]:
    """Every value of ``name``, in order."""
    key = _name(name)
    return [value for field_name, value in headers if field_name == key]


def set_header(headers: Headers, name: bytes | str, value: bytes | str) -> None:
    """Replace every ``name`` field by one with ``value`` (in the first one's place)."""
    key, raw = _name(name), _value(value)
    for i, (field_name, _) in enumerate(headers):
        if field_name == key:
            headers[i] = (key, raw)
            headers[i + 1 :] = [item for item in headers[i + 1 :] if item[0] != key]
            return
    headers.append((key, raw))


def add_header(headers: Headers, name: bytes | str, value: bytes | str) -> None:
    """Add one more ``name`` field (after those present)."""
    headers.append((_name(name), _value(value)))


def remove_header(headers: Headers, name: bytes | str) -> int:
    """Remove every ``name`` field; returns how many there were."""
    key = _name(name)
    before = len(headers)
    headers[:] = [item for item in headers if item[0] != key]
    return before - len(headers)
