"""Kubernetes discovery (``type: kubernetes``): EndpointSlices of a Service, list + watch.

``service: [NAMESPACE/]NAME[:PORT]`` follows the EndpointSlices (``discovery.k8s.io/v1``) labelled
``kubernetes.io/service-name=NAME``. PORT (a port name or number; default: the backend's
``port``, else the slices' only port) picks the endpoint port.

The watch follows the API server's documented "efficient detection of changes":

1. **list** the slices; the list's ``metadata.resourceVersion`` is where the watch starts;
2. **watch** from that resourceVersion with ``allowWatchBookmarks=true`` and ``timeoutSeconds``
   (``wait``); the answer is a stream of JSON lines ``{"type", "object"}``: ADDED/MODIFIED/DELETED
   change the slice set (the complete merged set goes to the sink after each), BOOKMARK only
   advances the resourceVersion, ERROR carries a ``Status``;
3. the stream ending (the server's timeout) is normal: **resume** from the last resourceVersion
   seen, without a relist;
4. ``410 Gone`` (as an HTTP status, or as an ERROR event whose Status has code 410: "too old
   resource version") means the history is compacted: **relist**;
5. anything else (unreachable, 401/403, garbage) is a failure: reported, jittered backoff,
   relist.

Endpoints count when ``conditions.ready`` is true or absent ("unknown state ... interpret as
ready") and they are not ``terminating``; with ``include_terminating`` also terminating ones whose
``serving`` condition holds. The first address of an endpoint is used (the API documents the
addresses as fungible). Several slices of one Service are merged; duplicates collapse.

Credentials, in order: ``kubeconfig`` (its current context: server, CA, token / tokenFile or
client certificate), explicit ``address`` (+ ``token`` / ``token_file`` / TLS keys), else
in-cluster: ``KUBERNETES_SERVICE_HOST``/``_PORT``, the service-account token, CA bundle and
namespace under ``/var/run/secrets/kubernetes.io/serviceaccount``. Token files are re-read when
they change (projected tokens rotate) and on any ``401``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import yaml

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import (
    Backend,
    Backoff,
    DiscoveredInstance,
    DiscoveryError,
    ServiceQuery,
    Sink,
    WatchTasks,
)

__all__ = [
    "SERVICE_ACCOUNT_DIR",
    "ClusterAccess",
    "KubernetesBackend",
    "TokenSource",
    "endpoints_of",
    "in_cluster_access",
    "kubeconfig_access",
    "parse_service",
]

log = logging.getLogger("gateway.discovery.kubernetes")

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_LABEL = "kubernetes.io/service-name"
# Shortest time between two watch requests of one query (a stream that keeps ending at once
# must not become a busy loop).
MIN_INTERVAL = 0.1
# Token files are also re-read at least this often, whatever their mtime says.
TOKEN_MAX_AGE = 60.0


class _Gone(Exception):
    """410: the resourceVersion is too old; relist."""


# -- credentials ---------------------------------------------------------------------------------


class TokenSource:
    """A bearer token: fixed, or read from a file and re-read when the file changes."""

    def __init__(self, token: str | None = None, path: Path | None = None) -> None:
        self._token = token
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._read_at = 0.0
        self.reads = 0

    def get(self, force: bool = False) -> str | None:
        if self.path is None:
            return self._token
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            now = time.monotonic()
            if force or stamp != self._stamp or now - self._read_at > TOKEN_MAX_AGE:
                self._token = self.path.read_text().strip()
                self._stamp, self._read_at = stamp, now
                self.reads += 1
        except OSError as exc:
            if self._token is None:
                raise DiscoveryError(f"cannot read token file {self.path}: {exc}") from None
            log.warning("kubernetes: cannot re-read token file %s: %s", self.path, exc)
        return self._token


@dataclass
class ClusterAccess:
    server: str
    token: TokenSource
    ssl: ssl.SSLContext | bool | None = None
    namespace: str = "default"


def _tls(
    server: str,
    verify: bool,
    ca_file: str | None = None,
    ca_data: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> ssl.SSLContext | bool | None:
    if not server.startswith("https"):
        return None
    if not verify:
        return False
    context = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
    if cert_file and key_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def in_cluster_access(
    env: Mapping[str, str] | None = None, account_dir: Path = SERVICE_ACCOUNT_DIR
) -> ClusterAccess:
    """The pod's own credentials (what client-go's InClusterConfig reads)."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise DiscoveryError(
            "not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset): give kubeconfig or"
            " address"
        )
    host = f"[{host}]" if ":" in host else host
    server = f"https://{host}:{port}"
    ca = account_dir / "ca.crt"
    namespace_file = account_dir / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else "default"
    return ClusterAccess(
        server,
        TokenSource(path=account_dir / "token"),
        _tls(server, True, str(ca) if ca.exists() else None),
        namespace,
    )


def _named(items: Any, name: str, kind: str) -> dict[str, Any]:
    for item in items or ():
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(kind)
            return value if isinstance(value, dict) else {}
    raise ValueError(f"no {kind} named {name!r}")


def _data_file(data: str, directory: Path, name: str) -> str:
    path = directory / name
    path.write_bytes(base64.b64decode(data))
    return str(path)


def kubeconfig_access(path: Path, context_name: str | None = None) -> ClusterAccess:
    """Server, CA, namespace and credentials of a kubeconfig's (current) context."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DiscoveryError(f"cannot read kubeconfig {path}: {exc}") from None
    if not isinstance(document, dict):
        raise DiscoveryError(f"kubeconfig {path}: not a mapping")
    base = path.resolve().parent

    def local(file: str | None) -> str | None:
        # Relative paths in a kubeconfig are relative to the file itself.
        return None if file is None else str(base / file)

    try:
        name = context_name or document.get("current-context")
        if not name:
            raise ValueError("no current-context")
        context = _named(document.get("contexts"), name, "context")
        cluster = _named(document.get("clusters"), context.get("cluster", ""), "cluster")
        user = _named(document.get("users"), context["user"], "user") if "user" in context else {}
        server = cluster.get("server")
        if not isinstance(server, str) or not server.startswith(("http://", "https://")):
            raise ValueError(f"cluster server {server!r} is not an http(s) URL")
        ca_data = cluster.get("certificate-authority-data")
        ca_text = base64.b64decode(ca_data).decode() if ca_data else None
        cert_file, key_file = (
            local(user.get("client-certificate")),
            local(user.get("client-key")),
        )
        with tempfile.TemporaryDirectory(prefix="gateway-kubeconfig-") as tmp:
            # ssl only loads client certificates from files: write inline data briefly.
            if user.get("client-certificate-data"):
                cert_file = _data_file(user["client-certificate-data"], Path(tmp), "cert.pem")
            if user.get("client-key-data"):
                key_file = _data_file(user["client-key-data"], Path(tmp), "key.pem")
            context_tls = _tls(
                server,
                not cluster.get("insecure-skip-tls-verify", False),
                local(cluster.get("certificate-authority")),
                ca_text,
                cert_file,
                key_file,
            )
        token_file = user.get("tokenFile")
        token = TokenSource(
            user.get("token"), Path(local(token_file) or "") if token_file else None
        )
        namespace = context.get("namespace") or "default"
    except (KeyError, TypeError, ValueError, OSError, ssl.SSLError) as exc:
        raise DiscoveryError(f"kubeconfig {path}: {exc}") from None
    return ClusterAccess(server.rstrip("/"), token, context_tls, str(namespace))


def resolve_access(config: DiscoveryConfig, base: Path | None = None) -> ClusterAccess:
    def local(file: str | None) -> Path | None:
        if file is None:
            return None
        path = Path(file)
        return base / path if base is not None and not path.is_absolute() else path

    if config.kubeconfig is not None:
        access = kubeconfig_access(local(config.kubeconfig))  # type: ignore[arg-type]
    elif config.address is not None:
        token_path = local(config.token_file)
        access = ClusterAccess(
            config.address.rstrip("/"),
            TokenSource(config.token, token_path),
            _tls(
                config.address,
                config.tls_verify,
                str(local(config.ca_file)) if config.ca_file else None,
                None,
                str(local(config.cert_file)) if config.cert_file else None,
                str(local(config.key_file)) if config.key_file else None,
            ),
        )
    else:
        access = in_cluster_access()
        if config.token_file is not None:
            access.token = TokenSource(path=local(config.token_file))
    if config.namespace:
        access.namespace = config.namespace
    return access


# -- slices -> instances -------------------------------------------------------------------------


def parse_service(service: str, namespace: str, port: str | None) -> tuple[str, str, str | None]:
    """``[namespace/]name[:port]`` -> (namespace, name, port name or number or None)."""
    rest = service
    if "/" in rest:
        namespace, _, rest = rest.partition("/")
    name, _, given = rest.partition(":")
    if not name or not namespace:
        raise ValueError(f"kubernetes service {service!r}: expected [namespace/]name[:port]")
    return namespace, name, given or port


def _condition(conditions: Mapping[str, Any], key: str, unknown: bool) -> bool:
    value = conditions.get(key)
    return unknown if value is None else value is True


def _slice_port(ports: Any, wanted: str | None) -> int | None:
    candidates = [p for p in ports or () if isinstance(p, dict) and isinstance(p.get("port"), int)]
    if wanted is None:
        if len(candidates) == 1:
            return int(candidates[0]["port"])
        if not candidates:
            return None
        names = ", ".join(str(p.get("name") or p["port"]) for p in candidates)
        raise ValueError(f"several ports ({names}): say which one with service NAME:PORT or port")
    for port in candidates:
        if wanted.isdigit() and port["port"] == int(wanted):
            return int(port["port"])
        if port.get("name") == wanted:
            return int(port["port"])
    return None


def endpoints_of(
    slice_: Mapping[str, Any], port: str | None, include_terminating: bool = False
) -> list[DiscoveredInstance]:
    """The routable endpoints of one EndpointSlice; ``ValueError`` when it is malformed."""
    number = _slice_port(slice_.get("ports"), port)
    if number is None:
        return []
    name = str((slice_.get("metadata") or {}).get("name", ""))
    out: list[DiscoveredInstance] = []
    for endpoint in slice_.get("endpoints") or ():
        if not isinstance(endpoint, dict):
            raise ValueError(f"slice {name}: an endpoint is not an object")
        addresses = endpoint.get("addresses")
        if not isinstance(addresses, list) or not addresses or not isinstance(addresses[0], str):
            raise ValueError(f"slice {name}: an endpoint has no addresses")
        conditions = endpoint.get("conditions") or {}
        ready = _condition(conditions, "ready", True)
        terminating = _condition(conditions, "terminating", False)
        serving = _condition(conditions, "serving", ready)
        if not ((ready and not terminating) or (include_terminating and terminating and serving)):
            continue
        target = endpoint.get("targetRef") or {}
        meta = {"slice": name}
        for key, value in (
            ("node", endpoint.get("nodeName")),
            ("zone", endpoint.get("zone")),
            ("pod", target.get("name") if isinstance(target, dict) else None),
        ):
            if isinstance(value, str):
                meta[key] = value
        if terminating:
            meta["terminating"] = "true"
        out.append(
            DiscoveredInstance(
                addresses[0],
                number,
                meta=meta,
                healthy=ready,
                id=meta.get("pod", addresses[0]),
            )
        )
    return out


# -- the backend ---------------------------------------------------------------------------------


class KubernetesBackend(Backend):
    type = "kubernetes"

    def __init__(self, config: DiscoveryConfig, sink: Sink, base: Path | None = None) -> None:
        super().__init__(config.name, sink)
        self.config = config
        self.base = base
        self.access: ClusterAccess | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks = WatchTasks()
        self.lists = 0  # visible to tests: full lists done
        self.watches = 0  # watch requests made

    async def start(self) -> None:
        self._tasks.start("kubernetes", self.queries, self._run)

    async def stop(self) -> None:
        await self._tasks.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _access(self) -> ClusterAccess:
        if self.access is None:
            self.access = resolve_access(self.config, self.base)
        return self.access

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl_context = self._access().ssl
            connector = aiohttp.TCPConnector(
                ssl=True if ssl_context is None else ssl_context, limit=0
            )
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _headers(self, force: bool = False) -> dict[str, str]:
        token = self._access().token.get(force)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    # -- loop ----------------------------------------------------------------------------------

    async def _run(self, query: ServiceQuery) -> None:
        backoff = Backoff(self.config.retry_min, self.config.retry_max)
        while True:
            try:
                access = self._access()
                namespace, name, port = parse_service(
                    query.service, access.namespace, self.config.port
                )
                slices, version = await self.list_slices(namespace, name)
                self._deliver(query, slices, port)
                backoff.reset()
                while True:  # watch, resuming from the last resourceVersion until 410
                    started = time.monotonic()
                    version = await self.watch_once(query, namespace, name, port, slices, version)
                    backoff.reset()
                    elapsed = time.monotonic() - started
                    if elapsed < MIN_INTERVAL:
                        await asyncio.sleep(MIN_INTERVAL - elapsed)
            except _Gone as exc:
                log.info("kubernetes %s: %s; listing %s again", self.name, exc, query)
            except (DiscoveryError, ValueError) as exc:
                error = exc if isinstance(exc, DiscoveryError) else DiscoveryError(str(exc))
                self.sink.failure(self.name, query, error)
                await asyncio.sleep(backoff.next_delay())

    def _deliver(
        self, query: ServiceQuery, slices: Mapping[str, Mapping[str, Any]], port: str | None
    ) -> None:
        merged: dict[tuple[str, int], DiscoveredInstance] = {}
        for name in sorted(slices):
            for instance in endpoints_of(slices[name], port, self.config.include_terminating):
                merged.setdefault((instance.host, instance.port), instance)
        self.sink.update(self.name, query, tuple(merged.values()))

    def _url(self, namespace: str) -> str:
        return (
            f"{self._access().server}/apis/discovery.k8s.io/v1/namespaces/"
            f"{quote(namespace, safe='')}/endpointslices"
        )

    async def _get(
        self, url: str, params: dict[str, str], total: float | None
    ) -> aiohttp.ClientResponse:
        """A GET with the current token; on 401 the token is re-read and the call retried once."""
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=self.config.timeout)
        for attempt in range(2):
            response = await self._client().get(
                url, params=params, headers=self._headers(force=attempt > 0), timeout=timeout
            )
            if response.status != 401 or attempt:
                return response
            response.release()
        raise AssertionError("unreachable")

    async def _check(self, response: aiohttp.ClientResponse, url: str) -> None:
        if response.status == 200:
            return
        body = (await response.read())[:300].decode(errors="replace").strip()
        response.release()
        if response.status == 410:
            raise _Gone(f"HTTP 410 from {url}: {body}")
        raise DiscoveryError(f"HTTP {response.status} from {url}: {body}")

    async def list_slices(self, namespace: str, name: str) -> tuple[dict[str, dict[str, Any]], str]:
        """The Service's slices by name, and the list's resourceVersion."""
        url = self._url(namespace)
        params = {"labelSelector": f"{SERVICE_LABEL}={name}"}
        try:
            response = await self._get(url, params, self.config.timeout + 30.0)
            async with response:
                await self._check(response, url)
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None
        self.lists += 1
        try:
            data = orjson.loads(raw)
            version = str(data["metadata"]["resourceVersion"])
            slices = {str(item["metadata"]["name"]): item for item in data.get("items") or ()}
        except (ValueError, KeyError, TypeError) as exc:
            raise DiscoveryError(f"bad EndpointSliceList from {url}: {exc!r}") from None
        return slices, version

    async def watch_once(
        self,
        query: ServiceQuery,
        namespace: str,
        name: str,
        port: str | None,
        slices: dict[str, dict[str, Any]],
        version: str,
    ) -> str:
        """One watch request; applies its events to ``slices``; returns the last version."""
        url = self._url(namespace)
        wait = max(1, int(self.config.wait))
        params = {
            "labelSelector": f"{SERVICE_LABEL}={name}",
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(wait),
        }
        self.watches += 1
        try:
            # The server ends the stream after timeoutSeconds; allow it some slack beyond that.
            response = await self._get(url, params, wait + 30.0)
            async with response:
                await self._check(response, url)
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        version, changed = self._event(line, slices, version)
                        if changed:
                            self._deliver(query, slices, port)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None
        return version

    @staticmethod
    def _event(line: bytes, slices: dict[str, dict[str, Any]], version: str) -> tuple[str, bool]:
        try:
            event = orjson.loads(line)
            kind, obj = event["type"], event["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            raise DiscoveryError(f"bad watch event: {exc!r}") from None
        if kind == "ERROR":
            code = obj.get("code")
            message = obj.get("message", "")
            if code == 410 or obj.get("reason") in ("Expired", "Gone"):
                raise _Gone(f"watch expired: {message}")
            raise DiscoveryError(f"watch error {code}: {message}")
        metadata = obj.get("metadata") or {}
        new_version = str(metadata.get("resourceVersion") or version)
        if kind == "BOOKMARK":
            return new_version, False
        object_name = metadata.get("name")
        if not isinstance(object_name, str):
            raise DiscoveryError(f"{kind} event without metadata.name")
        if kind in ("ADDED", "MODIFIED"):
            slices[object_name] = obj
        elif kind == "DELETED":
            slices.pop(object_name, None)
        else:
            raise DiscoveryError(f"unknown watch event type {kind!r}")
        return new_version, True
