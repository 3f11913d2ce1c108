"""A fake Kubernetes API server for EndpointSlices, written from the API documentation
("API Concepts": efficient detection of changes, watch bookmarks, resource versions).

What it implements, as the documentation describes it:

- ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=k=v`` -> an
  ``EndpointSliceList`` whose ``metadata.resourceVersion`` is the current version;
- the same with ``watch=1``: a chunked stream of JSON lines ``{"type", "object"}``. Events after
  the given ``resourceVersion`` are replayed from the retained history, then live ones follow.
  ``allowWatchBookmarks=true`` adds ``BOOKMARK`` events (an object with only
  ``metadata.resourceVersion``). The stream ends after ``timeoutSeconds`` (capped by
  ``max_watch_seconds`` so that tests see resumes);
- a ``resourceVersion`` older than the retained history: ``200`` with one ``ERROR`` event whose
  object is a ``Status`` with ``code: 410, reason: Expired`` ("too old resource version"), or an
  HTTP ``410`` with that Status when ``gone_as_http`` is set;
- bearer-token authentication: ``401`` with a ``Status`` for unknown tokens.

Tests mutate it from their own thread (``put_slice``, ``delete_slice``, ``compact``,
``set_tokens``); ``stop``/``start`` take the HTTP listener down and up on the same port while the
stored state (like etcd behind a real API server) stays.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.integration.backends import LoopThread

SLICES = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }


def endpoint(
    address: str,
    pod: str,
    ready: bool | None = True,
    terminating: bool | None = None,
    serving: bool | None = None,
) -> dict[str, Any]:
    conditions = {
        k: v
        for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if v is not None
    }
    return {
        "addresses": [address],
        "conditions": conditions,
        "nodeName": "node-1",
        "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
    }


class FakeKubeAPI:
    def __init__(self, tokens: set[str] | None = None) -> None:
        self.thread = LoopThread()
        self.tokens = set(tokens or ())
        self.version = 1000
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (version, type, object)
        self.oldest = self.version  # versions <= this are compacted away
        self.watchers: set[asyncio.Queue[tuple[int, str, dict[str, Any]] | None]] = set()
        self.max_watch_seconds = 300.0
        self.bookmark_interval = 0.5
        self.send_bookmarks = True  # off: clients keep their older versions (to get a 410)
        self.gone_as_http = False
        self.requests: list[dict[str, str]] = []  # kind (list/watch/denied), token, version
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle (from the test thread) ------------------------------------------------------

    def start(self) -> None:
        self.port = self.thread.call(self._start())

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_get(SLICES, self._slices)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def stop(self) -> None:
        self.thread.call(self._stop())

    async def _stop(self) -> None:
        for queue in list(self.watchers):
            queue.put_nowait(None)  # end open watch streams
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def close(self) -> None:
        if self._runner is not None:
            self.stop()
        self.thread.stop()

    # -- mutations (from the test thread) ------------------------------------------------------

    def put_slice(self, slice_: dict[str, Any]) -> None:
        self.thread.call(self._change("put", json.loads(json.dumps(slice_))))

    def delete_slice(self, name: str, namespace: str = "default") -> None:
        obj = {"metadata": {"name": name, "namespace": namespace}}
        self.thread.call(self._change("delete", obj))

    def compact(self) -> None:
        """Forget the event history (etcd compaction): every version so far now gets 410.
        Turn ``send_bookmarks`` off first, or a bookmark brings clients past the compaction."""

        async def run() -> None:
            # Other resources moved the store on meanwhile; nothing before now is retained.
            self.version += 1
            self.oldest = self.version
            self.history.clear()

        self.thread.call(run())

    def set_tokens(self, tokens: set[str]) -> None:
        async def run() -> None:
            self.tokens = set(tokens)

        self.thread.call(run())

    async def _change(self, action: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace", "default"), meta["name"])
        self.version += 1
        if action == "delete":
            old = self.objects.pop(key)
            old = {**old, "metadata": {**old["metadata"], "resourceVersion": str(self.version)}}
            kind, current = "DELETED", old
        else:
            kind = "MODIFIED" if key in self.objects else "ADDED"
            meta["resourceVersion"] = str(self.version)
            meta.setdefault("namespace", "default")
            self.objects[key] = obj
            current = obj
        self.history.append((self.version, kind, current))
        for queue in list(self.watchers):
            queue.put_nowait((self.version, kind, current))

    # -- HTTP ----------------------------------------------------------------------------------

    @staticmethod
    def _selected(obj: dict[str, Any], namespace: str, selector: str) -> bool:
        if obj["metadata"].get("namespace", "default") != namespace:
            return False
        labels = obj["metadata"].get("labels") or {}
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            if labels.get(key) != value.lstrip("="):
                return False
        return True

    async def _slices(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if self.tokens and token not in self.tokens:
            self.requests.append({"kind": "denied", "token": token})
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        namespace = request.match_info["namespace"]
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request, namespace, selector, token)
        self.requests.append({"kind": "list", "token": token, "version": str(self.version)})
        items = [o for o in self.objects.values() if self._selected(o, namespace, selector)]
        return web.json_response(
            {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }
        )

    async def _watch(
        self, request: web.Request, namespace: str, selector: str, token: str
    ) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.version)
        self.requests.append({"kind": "watch", "token": token, "version": str(since)})
        timeout = min(float(request.query.get("timeoutSeconds", 1800)), self.max_watch_seconds)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        expired = since < self.oldest
        if expired and self.gone_as_http:
            message = f"too old resource version: {since} ({self.oldest})"
            return web.json_response(status(410, "Expired", message), status=410)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if expired:
            message = f"too old resource version: {since} ({self.oldest})"
            await send("ERROR", status(410, "Expired", message))
            await response.write_eof()
            return response
        queue: asyncio.Queue[tuple[int, str, dict[str, Any]] | None] = asyncio.Queue()
        for item in self.history:
            if item[0] > since:
                queue.put_nowait(item)
        self.watchers.add(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                wait = min(left, self.bookmark_interval) if bookmarks else left
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if bookmarks and self.send_bookmarks and deadline - loop.time() > 0:
                        meta = {"resourceVersion": str(self.version)}
                        await send(
                            "BOOKMARK",
                            {
                                "kind": "EndpointSlice",
                                "apiVersion": "discovery.k8s.io/v1",
                                "metadata": meta,
                            },
                        )
                    continue
                if item is None:
                    break
                version, kind, obj = item
                if version > since and self._selected(obj, namespace, selector):
                    await send(kind, obj)
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self.watchers.discard(queue)
        return response
