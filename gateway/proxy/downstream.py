"""What the lifecycle phases need of the server a downstream connection belongs to.

The phases (``lifecycle.py``, ``relay.py``, ``failover.py``) are mixins of the HTTP/1.1
``ClientConnection``; they name the server through this protocol rather than ``ProxyServer``
(listener.py imports them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.accesslog import AccessLog
    from gateway.metrics import GatewayMetrics
    from gateway.proxy.headers import RequestIds
    from gateway.snapshot import Snapshot


class Server(Protocol):
    @property
    def metrics(self) -> GatewayMetrics: ...
    @property
    def snapshot(self) -> Snapshot: ...
    @property
    def clock(self) -> float: ...
    @property
    def draining(self) -> bool: ...
    @property
    def request_ids(self) -> RequestIds: ...
    @property
    def access_log(self) -> AccessLog | None: ...
