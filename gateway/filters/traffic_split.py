"""``traffic_split``: weighted upstreams per route (a canary at 5%), optionally sticky.

Each request of the route is sent to one of ``upstreams`` with probability weight/total (the
hook sets ``request.upstream``). With ``sticky: header:NAME`` or ``cookie:NAME`` a client that
sends that value always lands on the same upstream while the weights stay the same: the value
is hashed onto the weight line instead of drawing a random number (a client without it gets a
random draw).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from itertools import accumulate
from typing import Any

from gateway.filters.base import Filter, RequestInfo

__all__ = ["TrafficSplitFilter"]


class TrafficSplitFilter(Filter):
    name = "traffic_split"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        pairs = [(name, int(weight)) for name, weight in options["upstreams"] if int(weight) > 0]
        self.names: list[str] = [name for name, _ in pairs]
        self.bounds = list(accumulate(weight for _, weight in pairs))
        self.total = self.bounds[-1] if self.bounds else 0
        sticky = options.get("sticky")
        self.sticky_kind: str | None = None
        self.sticky_name = b""
        if sticky:
            kind, _, name = sticky.partition(":")
            self.sticky_kind, self.sticky_name = kind, name.lower().encode("ascii")
        self._random = random.Random()

    def _sticky_value(self, request: RequestInfo) -> bytes | None:
        if self.sticky_kind == "header":
            for name, value in request.headers:
                if name == self.sticky_name:
                    return value
            return None
        wanted = self.sticky_name.decode("ascii")
        for name, value in request.headers:
            if name == b"cookie":
                try:
                    jar = SimpleCookie(value.decode("latin-1"))
                except CookieError:
                    continue
                for key, morsel in jar.items():
                    if key.lower() == wanted:
                        return morsel.value.encode("latin-1")
        return None

    def pick(self, request: RequestInfo) -> str:
        value = self._sticky_value(request) if self.sticky_kind is not None else None
        if value:
            digest = hashlib.blake2b(value, digest_size=8).digest()
            point = int.from_bytes(digest, "big") % self.total
        else:
            point = self._random.randrange(self.total)
        return self.names[bisect.bisect_right(self.bounds, point)]

    def on_request_headers(self, request: RequestInfo) -> None:
        if self.total:
            request.upstream = self.pick(request)
