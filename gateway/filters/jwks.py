"""JWK Sets from a ``jwks_url``, fetched once per gateway (issue 18).

Two halves:

- ``JwksFetcher`` runs in the control plane (the supervisor with ``workers: N``, the one
  process otherwise). It fetches each URL it is asked about, keeps the last good document,
  and pushes it to every process after each fetch. A fetch starts only when the keys are
  missing, older than ``jwks_cache_ttl``, or a worker saw an unknown key id, and never sooner
  than ``jwks_min_refresh`` after the last one for that URL, however many workers ask: an
  asker that is not given a fetch is answered with the keys as they are.
- ``JwksStore`` (one per process, ``STORE``) holds the parsed key sets the ``jwt`` filters
  read, asks the fetcher (``ask``: over the worker pipe, or a direct call in the fetcher's own
  process) and lets requests wait for the answer. A worker asks at most once per
  ``jwks_min_refresh`` and URL too, so an unknown-kid storm is one message, not one per request.

A fetched document is checked (``parse_jwks``) before it replaces the previous one; a failed
fetch keeps the old keys, is logged, and still answers the askers (their requests do not hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jwt as pyjwt

__all__ = ["STORE", "JwksFetcher", "JwksSettings", "JwksStore", "jwks_counters", "parse_jwks"]

log = logging.getLogger("gateway.filters.jwks")

# url, the JWK Set as fetched (None: no good fetch yet), time.monotonic() of that fetch (one
# clock for every process on the machine).
Push = Callable[[str, "dict[str, Any] | None", float], None]


@dataclass(frozen=True)
class JwksSettings:
    """A ``jwt`` filter's fetch settings (seconds). Filters sharing a URL share one entry: the
    shortest ttl and min_refresh, the longest timeout win."""

    min_refresh: float = 30.0
    cache_ttl: float = 600.0
    timeout: float = 5.0


def parse_jwks(data: Any) -> dict[str | None, pyjwt.PyJWK]:
    """kid -> key of a JWK Set's signature keys; ValueError when it has none usable."""
    import jwt as pyjwt

    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('not a JWK Set (expected {"keys": [...]})')
    keys: dict[str | None, pyjwt.PyJWK] = {}
    problems = []
    for index, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = pyjwt.PyJWK(jwk)
        except (pyjwt.PyJWKError, pyjwt.InvalidKeyError) as exc:
            problems.append(f"key {index}: {exc}")
            continue
        keys[jwk.get("kid")] = key
    if not keys:
        raise ValueError(
            "no usable signature key" + (f" ({'; '.join(problems)})" if problems else "")
        )
    return keys


# --------------------------------------------------------------------------- control plane

# Every fetcher of this process (gateway.metrics.PROCESS_COUNTERS keys).
_TOTALS = {"jwks_fetches": 0, "jwks_fetch_failures": 0}


def jwks_counters() -> dict[str, int]:
    """This process's fetches (a ``GatewayMetrics.count_from`` source; only the control
    plane fetches)."""
    return dict(_TOTALS)


@dataclass(eq=False)
class _Entry:
    url: str
    settings: JwksSettings
    data: dict[str, Any] | None = None
    fetched_at: float = -float("inf")
    last_attempt: float = -float("inf")
    fetches: int = 0
    task: asyncio.Task[None] | None = None
    waiting: list[Push] = field(default_factory=list)  # askers answered by the running fetch


class JwksFetcher:
    """The control plane's fetches: one per URL at a time, at most one per min_refresh."""

    def __init__(self, push: Push) -> None:
        self.push = push  # after every fetch: to every process
        self.entries: dict[str, _Entry] = {}

    def fetches(self, url: str) -> int:
        entry = self.entries.get(url)
        return entry.fetches if entry is not None else 0

    def request(self, url: str, settings: JwksSettings, *, unknown_kid: bool, reply: Push) -> None:
        """A process asks for ``url``'s keys (``unknown_kid``: a token named a key it lacks).
        Answered by the push of a fetch started now or running, else by ``reply`` at once."""
        entry = self.entries.get(url)
        if entry is None:
            entry = self.entries[url] = _Entry(url, settings)
        elif settings != entry.settings:
            old = entry.settings
            entry.settings = JwksSettings(
                min(old.min_refresh, settings.min_refresh),
                min(old.cache_ttl, settings.cache_ttl),
                max(old.timeout, settings.timeout),
            )
        task = entry.task
        loop = asyncio.get_running_loop()
        if task is not None and not task.done() and task.get_loop() is loop:
            return  # the running fetch's push reaches every process
        now = time.monotonic()
        stale = now - entry.fetched_at >= entry.settings.cache_ttl
        due = entry.data is None or unknown_kid or stale
        if due and now - entry.last_attempt >= entry.settings.min_refresh:
            entry.last_attempt = now
            entry.task = loop.create_task(self._fetch(entry))
            return
        reply(url, entry.data, entry.fetched_at)  # fresh enough, or rate limited

    async def _fetch(self, entry: _Entry) -> None:
        import aiohttp

        entry.fetches += 1
        _TOTALS["jwks_fetches"] += 1
        try:
            timeout = aiohttp.ClientTimeout(total=entry.settings.timeout)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(entry.url, headers={"Accept": "application/json"}) as response,
            ):
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                data = await response.json(content_type=None)
            parse_jwks(data)  # a document without usable keys never replaces good ones
            entry.data = data
            entry.fetched_at = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep the keys we have; the next refresh may work
            _TOTALS["jwks_fetch_failures"] += 1
            log.warning("jwt: fetching JWKS from %s failed: %s", entry.url, exc)
        finally:
            entry.task = None
        self.push(entry.url, entry.data, entry.fetched_at)

    async def stop(self) -> None:
        tasks = [entry.task for entry in self.entries.values() if entry.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# --------------------------------------------------------------------------- every process

# url, settings, unknown_kid: how a store reaches the fetcher.
Ask = Callable[[str, JwksSettings, bool], None]


class JwksStore:
    """The key sets of this process, by URL, as the fetcher last pushed them."""

    def __init__(self) -> None:
        self.sets: dict[str, tuple[dict[str | None, pyjwt.PyJWK], float]] = {}
        self.ask: Ask | None = None  # None: a fetcher of this process's own (``_local``)
        self._asked: dict[str, float] = {}  # url -> monotonic time of this process's last ask
        # url -> (resolved by the next update, when to stop waiting for it: an ask whose
        # answer never came, say from a supervisor that went away, does not block new ones).
        self._answered: dict[str, tuple[asyncio.Future[None], float]] = {}
        self._local: JwksFetcher | None = None

    # -- reading ----------------------------------------------------------------------------

    def keys(self, url: str) -> dict[str | None, pyjwt.PyJWK] | None:
        found = self.sets.get(url)
        return found[0] if found is not None else None

    def fetched_at(self, url: str) -> float:
        found = self.sets.get(url)
        return found[1] if found is not None else -float("inf")

    def last_ask(self, url: str) -> float:
        return self._asked.get(url, -float("inf"))

    def _pending(self, url: str) -> asyncio.Future[None] | None:
        found = self._answered.get(url)
        if found is None:
            return None
        answered, give_up = found
        if answered.done() or time.monotonic() >= give_up:
            return None
        try:
            if answered.get_loop() is not asyncio.get_running_loop():
                return None  # asked from another event loop (tests run one per test)
        except RuntimeError:
            return None
        return answered

    def asking(self, url: str) -> bool:
        """An ask for ``url`` is out and not answered yet."""
        return self._pending(url) is not None

    # -- asking -----------------------------------------------------------------------------

    def refresh(self, url: str, settings: JwksSettings, *, unknown_kid: bool) -> bool:
        """Ask the fetcher for ``url`` unless an ask is out or this process asked less than
        ``min_refresh`` ago; True when an answer is coming (``wait`` for it)."""
        if self.asking(url):
            return True
        now = time.monotonic()
        if now - self._asked.get(url, -float("inf")) < settings.min_refresh:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # building a config outside the gateway (check, tests): no ask
            return False
        self._asked[url] = now
        self._answered[url] = (loop.create_future(), now + settings.timeout + 1.0)
        if self.ask is not None:
            self.ask(url, settings, unknown_kid)
        else:
            if self._local is None:
                self._local = JwksFetcher(self.update)
            self._local.request(url, settings, unknown_kid=unknown_kid, reply=self.update)
        return True

    def watch(self, url: str, settings: JwksSettings) -> None:
        """A filter of this URL was built: get its keys now, before the first request."""
        if url not in self.sets:
            self.refresh(url, settings, unknown_kid=False)

    async def wait(self, url: str) -> None:
        """Until the answer to the ask out for ``url`` (or until that ask is given up)."""
        found = self._answered.get(url)
        answered = self._pending(url)
        if found is not None and answered is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(
                    asyncio.get_running_loop().time() + max(0.0, found[1] - time.monotonic())
                ):
                    await asyncio.shield(answered)

    # -- answers ----------------------------------------------------------------------------

    def update(self, url: str, data: dict[str, Any] | None, fetched_at: float) -> None:
        """The fetcher's keys for ``url`` (pushed after a fetch, or an answer to an ask)."""
        if data is not None:
            current = self.sets.get(url)
            if current is None or current[1] != fetched_at:
                try:
                    self.sets[url] = (parse_jwks(data), fetched_at)
                except ValueError as exc:  # the fetcher checked it: should not happen
                    log.warning("jwt: JWKS of %s not usable: %s", url, exc)
        found = self._answered.pop(url, None)
        if found is not None and not found[0].done():
            with contextlib.suppress(RuntimeError):  # its loop is closed (an old test's)
                found[0].set_result(None)

    @property
    def local_fetcher(self) -> JwksFetcher | None:
        """The fetcher running in this process when nothing else was installed."""
        return self._local

    def install(self, ask: Ask | None) -> None:
        """Route asks to ``ask`` (a worker: the supervisor; the supervisor: its fetcher)."""
        self.ask = ask

    async def stop(self) -> None:
        if self._local is not None:
            await self._local.stop()


STORE = JwksStore()
