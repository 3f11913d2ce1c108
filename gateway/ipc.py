"""The messages between the supervisor and its workers (``workers: N``), typed.

One frame per message on the control socketpair: a 4-byte big-endian length, then an orjson
object whose ``op`` names its kind. Each kind is a ``TypedDict`` (so a message stays the plain
dict orjson writes, at no conversion cost) with one constructor here, used by the sender, and
one parser per direction, used by the receiver: ``parse_to_worker`` / ``parse_to_supervisor``
check every field and raise ``BadMessage`` for an unknown ``op`` or a malformed message, which
the receiver logs and ignores. See ``gateway/workers.py`` for what each message does.

supervisor -> worker: ``config``, ``discovered``, ``health``, ``eject``, ``metrics`` (request),
``jwks``
worker -> supervisor: ``ready``, ``ack``, ``reject``, ``metrics`` (reply), ``eject``,
``jwks_refresh``
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol, TypedDict

import orjson

__all__ = [
    "AckMessage",
    "BadMessage",
    "ConfigMessage",
    "ConfigPayload",
    "Discovered",
    "DiscoveredMessage",
    "EjectMessage",
    "Ejected",
    "HealthMessage",
    "InstanceState",
    "JwksMessage",
    "JwksRefreshMessage",
    "MetricsReply",
    "MetricsRequest",
    "ReadyMessage",
    "RejectMessage",
    "Reply",
    "ToSupervisor",
    "ToWorker",
    "Unhealthy",
    "ack_message",
    "config_message",
    "discovered_message",
    "discovered_rows",
    "eject_message",
    "health_message",
    "jwks_message",
    "jwks_refresh_message",
    "metrics_reply",
    "metrics_request",
    "parse_to_supervisor",
    "parse_to_worker",
    "read_frame",
    "ready_message",
    "reject_message",
    "send",
]

_FRAME = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024  # a 10,000-route config plus its metrics stays far below


class BadMessage(ValueError):
    """A control message that is not JSON, has an unknown ``op`` or a malformed field."""


# --------------------------------------------------------------------------- shared fields

# upstream -> [(host, port, weight), ...]: the instance lists discovery delivered.
InstanceRow = tuple[str, int, int]
Discovered = dict[str, list[InstanceRow]]
# (upstream, address) pairs that active health checks hold down.
Unhealthy = list[tuple[str, str]]
# (upstream, address, until) outlier ejections still running; ``until`` is time.monotonic()
# seconds (one clock for every process on the machine).
Ejected = list[tuple[str, str, float]]


class InstanceState(TypedDict):
    """The supervisor's current view of the instances: full state, so a restarted worker
    starts from it with one ``config`` message."""

    discovered: Discovered
    unhealthy: Unhealthy
    ejected: Ejected


class ConfigPayload(InstanceState):
    """A config as the supervisor validated it: the file's exact text (nothing is read again),
    its resolved ``${env:...}``/``${file:...}`` references, the digest of its bytes and the
    TLS files (path -> PEM text as latin-1) as the supervisor read and checked them."""

    source: str
    text: str
    sha256: str
    references: dict[str, str]
    tls: dict[str, str]


# --------------------------------------------------------------------------- to a worker


class ConfigMessage(ConfigPayload):
    """Parse the config, build a snapshot from the previous one, swap it in; answered by
    ``ack`` (``ready`` for the first). ``shared`` ({fd, semaphore, slots}: the shared rate-limit
    table) and ``connections`` ({fd, workers}: the gateway-wide connection count) are read
    from the first message only."""

    op: Literal["config"]
    seq: int
    shared: dict[str, Any] | None
    connections: dict[str, Any] | None


class DiscoveredMessage(InstanceState):
    """Same config, new instance lists."""

    op: Literal["discovered"]


class HealthMessage(TypedDict):
    """An active-check transition."""

    op: Literal["health"]
    upstream: str
    address: str
    healthy: bool


class EjectMessage(TypedDict):
    """An outlier ejection, both ways: a worker reports its own, the supervisor broadcasts it
    to every worker (the sender included: applying one it already has is a no-op)."""

    op: Literal["eject"]
    upstream: str
    address: str
    until: float


class MetricsRequest(TypedDict):
    op: Literal["metrics"]
    seq: int


class JwksMessage(TypedDict):
    """A JWK Set the supervisor fetched for ``url`` (``jwks`` None: none fetched yet), after a
    fetch to every worker, or to one worker as the answer to its ``jwks_refresh``."""

    op: Literal["jwks"]
    url: str
    jwks: dict[str, Any] | None
    fetched_at: float  # time.monotonic() of the fetch


ToWorker = (
    ConfigMessage | DiscoveredMessage | HealthMessage | EjectMessage | MetricsRequest | JwksMessage
)


# --------------------------------------------------------------------------- to the supervisor


class ReadyMessage(TypedDict):
    """The first snapshot is live and the listener open."""

    op: Literal["ready"]
    seq: int
    pid: int
    sha256: str


class AckMessage(TypedDict):
    op: Literal["ack"]
    seq: int
    sha256: str


class RejectMessage(TypedDict):
    op: Literal["reject"]
    seq: int
    error: str


class MetricsReply(TypedDict):
    op: Literal["metrics"]
    seq: int
    state: dict[str, Any]  # GatewayMetrics.export_state()


class JwksRefreshMessage(TypedDict):
    """A worker asks for ``url``'s keys (``unknown_kid``: a token named a key it lacks) with
    its filter's settings (seconds); answered by a ``jwks`` message."""

    op: Literal["jwks_refresh"]
    url: str
    unknown_kid: bool
    min_refresh: float
    cache_ttl: float
    timeout: float


Reply = ReadyMessage | AckMessage | RejectMessage | MetricsReply
ToSupervisor = Reply | EjectMessage | JwksRefreshMessage


# --------------------------------------------------------------------------- constructors


class _Instance(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def weight(self) -> int: ...


def discovered_rows(discovered: Mapping[str, Iterable[_Instance]]) -> Discovered:
    """``DiscoveryManager.instances()`` as the messages carry it."""
    return {
        name: [(i.host, i.port, i.weight) for i in instances]
        for name, instances in discovered.items()
    }


def config_message(
    payload: ConfigPayload,
    seq: int,
    *,
    shared: dict[str, Any] | None = None,
    connections: dict[str, Any] | None = None,
) -> ConfigMessage:
    return {
        "op": "config",
        "seq": seq,
        "source": payload["source"],
        "text": payload["text"],
        "sha256": payload["sha256"],
        "references": payload["references"],
        "tls": payload["tls"],
        "discovered": payload["discovered"],
        "unhealthy": payload["unhealthy"],
        "ejected": payload["ejected"],
        "shared": shared,
        "connections": connections,
    }


def discovered_message(state: InstanceState) -> DiscoveredMessage:
    return {
        "op": "discovered",
        "discovered": state["discovered"],
        "unhealthy": state["unhealthy"],
        "ejected": state["ejected"],
    }


def health_message(upstream: str, address: str, healthy: bool) -> HealthMessage:
    return {"op": "health", "upstream": upstream, "address": address, "healthy": healthy}


def eject_message(upstream: str, address: str, until: float) -> EjectMessage:
    return {"op": "eject", "upstream": upstream, "address": address, "until": until}


def jwks_message(url: str, jwks: dict[str, Any] | None, fetched_at: float) -> JwksMessage:
    return {"op": "jwks", "url": url, "jwks": jwks, "fetched_at": fetched_at}


def jwks_refresh_message(
    url: str, unknown_kid: bool, min_refresh: float, cache_ttl: float, timeout: float
) -> JwksRefreshMessage:
    return {
        "op": "jwks_refresh",
        "url": url,
        "unknown_kid": unknown_kid,
        "min_refresh": min_refresh,
        "cache_ttl": cache_ttl,
        "timeout": timeout,
    }


def metrics_request(seq: int) -> MetricsRequest:
    return {"op": "metrics", "seq": seq}


def ready_message(seq: int, pid: int, sha256: str) -> ReadyMessage:
    return {"op": "ready", "seq": seq, "pid": pid, "sha256": sha256}


def ack_message(seq: int, sha256: str) -> AckMessage:
    return {"op": "ack", "seq": seq, "sha256": sha256}


def reject_message(seq: int, error: str) -> RejectMessage:
    return {"op": "reject", "seq": seq, "error": error}


def metrics_reply(seq: int, state: dict[str, Any]) -> MetricsReply:
    return {"op": "metrics", "seq": seq, "state": state}


# --------------------------------------------------------------------------- framing


def send(writer: asyncio.StreamWriter, message: ToWorker | ToSupervisor) -> None:
    data = orjson.dumps(message)
    writer.write(_FRAME.pack(len(data)) + data)


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload, or None at EOF (the other side is gone). A frame longer than
    ``MAX_FRAME`` raises ValueError: the stream cannot be trusted after it."""
    try:
        head = await reader.readexactly(_FRAME.size)
        (size,) = _FRAME.unpack(head)
        if size > MAX_FRAME:
            raise ValueError(f"control frame of {size} bytes")
        return await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# --------------------------------------------------------------------------- parsers


def _object(payload: bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(payload, bytes | bytearray | memoryview):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            raise BadMessage(f"not JSON: {error}") from None
    if not isinstance(payload, Mapping):
        raise BadMessage(f"expected an object, got {type(payload).__name__}")
    return payload


def _field(message: Mapping[str, Any], key: str) -> Any:
    try:
        return message[key]
    except KeyError:
        raise BadMessage(f"{message.get('op')!r} message without {key!r}") from None


def _str(message: Mapping[str, Any], key: str) -> str:
    value = _field(message, key)
    if not isinstance(value, str):
        raise BadMessage(f"{key!r} must be a string")
    return value


def _int(message: Mapping[str, Any], key: str) -> int:
    value = _field(message, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadMessage(f"{key!r} must be an integer")
    return value


def _number(value: object, key: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadMessage(f"{key!r} must be a number")
    return float(value)


def _bool(message: Mapping[str, Any], key: str) -> bool:
    value = _field(message, key)
    if not isinstance(value, bool):
        raise BadMessage(f"{key!r} must be true or false")
    return value


def _str_map(message: Mapping[str, Any], key: str) -> dict[str, str]:
    value = _field(message, key)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadMessage(f"{key!r} must map strings to strings")
    return value


def _object_or_none(message: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = message.get(key)
    if value is not None and not isinstance(value, dict):
        raise BadMessage(f"{key!r} must be an object or null")
    return value


def _rows(message: Mapping[str, Any], key: str, width: int) -> list[list[Any]]:
    value = _field(message, key)
    if not isinstance(value, list | tuple) or not all(
        isinstance(row, list | tuple) and len(row) == width for row in value
    ):
        raise BadMessage(f"{key!r} must be a list of {width}-element lists")
    return [list(row) for row in value]


def _instance_state(message: Mapping[str, Any]) -> InstanceState:
    raw = _field(message, "discovered")
    if not isinstance(raw, dict):
        raise BadMessage("'discovered' must be an object")
    discovered: Discovered = {}
    for name, rows in raw.items():
        checked = _rows({"rows": rows}, "rows", 3)
        if not all(isinstance(h, str) and type(p) is int and type(w) is int for h, p, w in checked):
            raise BadMessage(f"'discovered' of {name!r} must be [host, port, weight] rows")
        discovered[str(name)] = [(h, p, w) for h, p, w in checked]
    unhealthy = _rows(message, "unhealthy", 2)
    if not all(isinstance(u, str) and isinstance(a, str) for u, a in unhealthy):
        raise BadMessage("'unhealthy' must be [upstream, address] pairs")
    ejected = _rows(message, "ejected", 3)
    if not all(isinstance(u, str) and isinstance(a, str) for u, a, _ in ejected):
        raise BadMessage("'ejected' must be [upstream, address, until] rows")
    return {
        "discovered": discovered,
        "unhealthy": [(u, a) for u, a in unhealthy],
        "ejected": [(u, a, _number(t, "until")) for u, a, t in ejected],
    }


def _eject(message: Mapping[str, Any]) -> EjectMessage:
    return eject_message(
        _str(message, "upstream"),
        _str(message, "address"),
        _number(_field(message, "until"), "until"),
    )


def parse_to_worker(payload: bytes | Mapping[str, Any]) -> ToWorker:
    """A message from the supervisor; ``BadMessage`` if it is not one."""
    message = _object(payload)
    op = message.get("op")
    if op == "config":
        return config_message(
            {
                "source": _str(message, "source"),
                "text": _str(message, "text"),
                "sha256": _str(message, "sha256"),
                "references": _str_map(message, "references"),
                "tls": _str_map(message, "tls"),
                **_instance_state(message),
            },
            _int(message, "seq"),
            shared=_object_or_none(message, "shared"),
            connections=_object_or_none(message, "connections"),
        )
    if op == "discovered":
        return discovered_message(_instance_state(message))
    if op == "health":
        return health_message(
            _str(message, "upstream"), _str(message, "address"), _bool(message, "healthy")
        )
    if op == "eject":
        return _eject(message)
    if op == "metrics":
        return metrics_request(_int(message, "seq"))
    if op == "jwks":
        fetched_at = _field(message, "fetched_at")
        return jwks_message(
            _str(message, "url"),
            _object_or_none(message, "jwks"),
            # JSON has no infinity: orjson writes -inf (never fetched) as null.
            -float("inf") if fetched_at is None else _number(fetched_at, "fetched_at"),
        )
    raise BadMessage(f"unknown op {op!r}")


def parse_to_supervisor(payload: bytes | Mapping[str, Any]) -> ToSupervisor:
    """A message from a worker; ``BadMessage`` if it is not one."""
    message = _object(payload)
    op = message.get("op")
    if op == "ready":
        return ready_message(_int(message, "seq"), _int(message, "pid"), _str(message, "sha256"))
    if op == "ack":
        return ack_message(_int(message, "seq"), _str(message, "sha256"))
    if op == "reject":
        return reject_message(_int(message, "seq"), _str(message, "error"))
    if op == "metrics":
        state = _field(message, "state")
        if not isinstance(state, dict):
            raise BadMessage("'state' must be an object")
        return metrics_reply(_int(message, "seq"), state)
    if op == "eject":
        return _eject(message)
    if op == "jwks_refresh":
        return jwks_refresh_message(
            _str(message, "url"),
            _bool(message, "unknown_kid"),
            _number(_field(message, "min_refresh"), "min_refresh"),
            _number(_field(message, "cache_ttl"), "cache_ttl"),
            _number(_field(message, "timeout"), "timeout"),
        )
    raise BadMessage(f"unknown op {op!r}")
