"""The admin server: health, readiness, Prometheus metrics and a read-only view of the config.

Control plane only (aiohttp); nothing here is on the request hot path. Metrics are rendered at
scrape time from ``GatewayMetrics`` via the registry's collector.

Access: with ``admin.token`` set, everything except ``/``, ``/healthz``, ``/readyz``,
``/metrics`` and the registry's ``/register`` and ``/discover`` paths (which check the token on
their mutating calls themselves) needs ``Authorization: Bearer TOKEN`` (``X-Admin-Token`` is
accepted too); ``admin.read_without_token`` opens the GETs. Whatever is shown, the config's
secrets are redacted, and every JSON answer is scrubbed of secret values as a last resort.
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from gateway.config import redact_config
from gateway.config.model import GatewayConfig, RouteConfig
from gateway.config.secrets import SCRUBBER
from gateway.metrics import GatewayMetrics

__all__ = ["STATE_KEY", "AdminState", "create_admin_app", "json_response"]


@dataclass
class AdminState:
    config: GatewayConfig
    metrics: GatewayMetrics
    registry: CollectorRegistry
    ready: bool = False  # set by startup code once the data plane listens
    draining: bool = False  # set on shutdown: load balancers should stop sending traffic
    routes_describe: Callable[[], list[dict[str, Any]]] | None = None  # compiled route table
    # Upstreams with their instances' state, weight, load, latency and ejection info.
    upstreams_describe: Callable[[], list[dict[str, Any]]] | None = None
    # Extra detail for /readyz (e.g. upstreams running on stale discovery data); never makes
    # the gateway unready: serving the last known instances is the intended behaviour.
    ready_detail: Callable[[], dict[str, Any]] | None = None
    # False while no data-plane process has a live snapshot (e.g. every worker is restarting).
    ready_check: Callable[[], bool] | None = None
    # Re-read and apply the config file (POST /admin/reload): (trigger, force) -> outcome.
    reload: Callable[[str, bool], Awaitable[dict[str, Any]]] | None = None
    # Last reload outcome for /admin/config (running sha256, last error with file:line...).
    reload_status: Callable[[], dict[str, Any]] | None = None
    # Awaited before each /metrics render: the supervisor pulls and sums its workers' totals.
    refresh_metrics: Callable[[], Awaitable[None]] | None = None
    # Worker processes (pid, ready, config hash) for /admin/workers; None = single process.
    # None (or a None answer): a single process, no workers.
    workers_describe: Callable[[], list[dict[str, Any]] | None] | None = None


STATE_KEY: web.AppKey[AdminState] = web.AppKey("admin_state", AdminState)

_JSON = "application/json"


def json_response(data: Any, status: int = 200) -> web.Response:
    """JSON via orjson; unknown types (e.g. YAML timestamps, sets) fall back to ``str``."""
    body = orjson.dumps(data, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type=_JSON)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


async def _healthz(request: web.Request) -> web.Response:
    # Liveness: the process and its event loop answer. Nothing else is checked on purpose, so
    # an orchestrator does not restart a gateway whose upstreams are down.
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.draining:
        return json_response({"status": "draining"}, status=503)
    if not state.ready:
        return json_response({"status": "starting"}, status=503)
    if state.ready_check is not None and not state.ready_check():
        return json_response({"status": "no live workers"}, status=503)
    detail = state.ready_detail() if state.ready_detail is not None else {}
    return json_response({"status": "ready", **detail})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    # Prometheus asks for OpenMetrics in its Accept header when it can; choose_encoder falls
    # back to the classic text format (version 0.0.4) otherwise.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    if state.refresh_metrics is not None:
        await state.refresh_metrics()
    body = encoder(state.registry)
    # content_type carries parameters (version, charset), so it goes in as a raw header.
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    cfg = state.config
    # The document as written with secrets redacted; the hash is of the real bytes, so it
    # changes when a secret does (and reveals nothing about it: SHA-256 is not invertible).
    body: dict[str, Any] = {
        "sha256": cfg.sha256,
        "source": cfg.source,
        "config": redact_config(cfg),
    }
    if state.reload_status is not None:
        # "reload": running hash, last success time, counts, and the last rejected file's
        # errors (file:line: key: message) until a later reload succeeds.
        body["reload"] = state.reload_status()
    return json_response(body)


def _token_ok(request: web.Request, token: str | None) -> bool:
    if not token:
        return True
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    given = credentials.strip() if scheme.lower() == "bearer" else ""
    if not given:
        given = request.headers.get("X-Admin-Token", "")
    # compare_digest: the time taken does not depend on where the first wrong byte is.
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def _unauthorized() -> web.Response:
    response = json_response(
        {"error": "unauthorized", "message": "a valid admin token is required"}, status=401
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
    return response


_FORCE_VALUES = frozenset({"1", "true", "yes"})
_RELOAD_STATUS = {"success": 200, "refused": 409}


async def _reload(request: web.Request) -> web.Response:
    """Re-read the config file: 200 with the new hash, 400 listing every error, or 409 when it
    would drop too many routes/upstreams (nothing changed; ``?force=1`` applies it anyway).
    Guarded by ``admin.token`` when one is configured."""
    state = request.app[STATE_KEY]
    if not _token_ok(request, state.config.admin_token):
        return _unauthorized()
    if state.reload is None:
        return json_response({"error": "reload is not available"}, status=501)
    force = request.query.get("force", "").lower() in _FORCE_VALUES
    result = await state.reload("admin API", force)
    return json_response(result, status=_RELOAD_STATUS.get(str(result.get("result")), 400))


async def _workers(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    workers = state.workers_describe() if state.workers_describe is not None else None
    return json_response(
        {"mode": "single process" if workers is None else "supervisor", "workers": workers or []}
    )


def _describe_route(route: RouteConfig) -> dict[str, Any]:
    return dataclasses.asdict(route)


async def _routes(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.routes_describe is not None:
        routes = state.routes_describe()
    else:
        # No compiled table wired in: describe the configured routes in config order.
        routes = [_describe_route(r) for r in state.config.routes]
    return json_response({"routes": routes})


async def _upstreams(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    upstreams = state.upstreams_describe() if state.upstreams_describe is not None else []
    return json_response({"upstreams": upstreams})


async def _index(request: web.Request) -> web.Response:
    return json_response(
        {
            "endpoints": [
                "/healthz",
                "/readyz",
                "/metrics",
                "/admin/config",
                "/admin/routes",
                "/admin/upstreams",
                "/admin/workers",
                "/admin/reload (POST)",
                "/admin/discovery",
                "/register",
                "/discover",
            ]
        }
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Open whatever the token: probes, the scraper, and the registry (whose handlers check the token
# on mutating calls; /discover is read by the services themselves, not by operators).
_OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics"})
_REGISTRY_PREFIXES = ("/register", "/discover")
_READ_METHODS = frozenset({"GET", "HEAD"})


def _needs_token(request: web.Request, config: GatewayConfig) -> bool:
    if not config.admin_token:
        return False
    path = request.path
    if path in _OPEN_PATHS or path.startswith(_REGISTRY_PREFIXES):
        return False
    # Everything else (/admin/*, and paths added later) is closed by default.
    return not (config.admin_read_without_token and request.method in _READ_METHODS)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The token check, and a last scrub of secret values from every JSON answer."""
    if _needs_token(request, request.app[STATE_KEY].config) and not _token_ok(
        request, request.app[STATE_KEY].config.admin_token
    ):
        return _unauthorized()
    response = await handler(request)
    if isinstance(response, web.Response) and response.content_type == _JSON:
        body = response.body
        if isinstance(body, bytes):
            response.body = SCRUBBER.json_bytes(body)
    return response


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text 404/405 into the same JSON shape as every other answer."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body: dict[str, Any] = {"error": exc.reason.lower(), "status": exc.status}
        if exc.status == 404:
            body["path"] = request.path
        resp = json_response(body, status=exc.status)
        if exc.status == 405 and "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


def create_admin_app(state: AdminState) -> web.Application:
    app = web.Application(middlewares=[_json_errors, _guard])
    app[STATE_KEY] = state
    app.router.add_get("/", _index)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/config", _config)
    app.router.add_get("/admin/routes", _routes)
    app.router.add_get("/admin/upstreams", _upstreams)
    app.router.add_get("/admin/workers", _workers)
    app.router.add_post("/admin/reload", _reload)
    return app
