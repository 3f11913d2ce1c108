"""Supervisor <-> worker control messages (gateway/ipc.py): every kind survives the wire (orjson
and back through its direction's parser) unchanged, and a malformed one is refused with
BadMessage, which the receivers log and ignore."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from gateway import ipc
from gateway.ipc import BadMessage
from gateway.workers import WorkerPool, _Worker

STATE: ipc.InstanceState = {
    "discovered": {"users": [("10.0.0.1", 9001, 1), ("10.0.0.2", 9002, 3)], "empty": []},
    "unhealthy": [("users", "10.0.0.2:9002")],
    "ejected": [("users", "10.0.0.1:9001", 12345.5)],
}
PAYLOAD: ipc.ConfigPayload = {
    "source": "/etc/gateway.yaml",
    "text": "listen: 127.0.0.1:8080\n",
    "sha256": "ab" * 32,
    "references": {"${env:TOKEN}": "s3cret"},
    "tls": {"/etc/gw/cert.pem": "-----BEGIN CERTIFICATE-----\n..."},
    **STATE,
}

TO_WORKER: list[ipc.ToWorker] = [
    ipc.config_message(PAYLOAD, 1),
    ipc.config_message(
        PAYLOAD, 2, shared={"fd": 5, "semaphore": "/gw", "slots": 64}, connections={"fd": 6}
    ),
    ipc.discovered_message(STATE),
    ipc.discovered_message({"discovered": {}, "unhealthy": [], "ejected": []}),
    ipc.health_message("users", "10.0.0.1:9001", False),
    ipc.eject_message("users", "10.0.0.1:9001", 99.25),
    ipc.metrics_request(7),
    ipc.jwks_message("https://issuer.example/jwks.json", {"keys": [{"kty": "EC"}]}, 12.5),
    ipc.jwks_message("https://issuer.example/jwks.json", None, 0.0),
]
TO_SUPERVISOR: list[ipc.ToSupervisor] = [
    ipc.ready_message(1, 4242, "cd" * 32),
    ipc.ack_message(2, "ef" * 32),
    ipc.reject_message(3, "gateway.yaml:4: routes.0.upstream: unknown upstream 'x'"),
    ipc.metrics_reply(4, {"version": 2, "requests": [["r", "u", "GET", "200", 5]]}),
    ipc.eject_message("users", "10.0.0.1:9001", 99.0),
    ipc.jwks_refresh_message("https://issuer.example/jwks.json", True, 30.0, 600.0, 5.0),
]


def wire(message: Any) -> bytes:
    return orjson.dumps(message)


@pytest.mark.parametrize("message", TO_WORKER, ids=lambda m: m["op"])
def test_to_worker_round_trip(message: ipc.ToWorker) -> None:
    assert ipc.parse_to_worker(wire(message)) == message


@pytest.mark.parametrize("message", TO_SUPERVISOR, ids=lambda m: m["op"])
def test_to_supervisor_round_trip(message: ipc.ToSupervisor) -> None:
    assert ipc.parse_to_supervisor(wire(message)) == message


def test_rows_come_back_as_tuples() -> None:
    # JSON has no tuples: the parser rebuilds them, so the receiver sees the sender's types.
    parsed = ipc.parse_to_worker(wire(ipc.discovered_message(STATE)))
    assert parsed["op"] == "discovered"
    assert parsed["discovered"]["users"][0] == ("10.0.0.1", 9001, 1)
    assert parsed["unhealthy"] == [("users", "10.0.0.2:9002")]
    assert isinstance(parsed["ejected"][0][2], float)


def test_integer_until_is_a_float() -> None:
    parsed = ipc.parse_to_supervisor(b'{"op":"eject","upstream":"u","address":"a:1","until":7}')
    assert parsed == {"op": "eject", "upstream": "u", "address": "a:1", "until": 7.0}
    assert isinstance(parsed["until"], float)


def test_a_never_fetched_jwks_time_survives_json() -> None:
    # -inf (no fetch yet) has no JSON form: orjson writes null, the parser reads -inf back.
    parsed = ipc.parse_to_worker(wire(ipc.jwks_message("u", None, -float("inf"))))
    assert parsed == {"op": "jwks", "url": "u", "jwks": None, "fetched_at": -float("inf")}


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (
            b'{"op": "jwks_refresh", "url": "u", "unknown_kid": 1, "min_refresh": 1,'
            b' "cache_ttl": 1, "timeout": 1}',
            "true or false",
        ),
        (
            b'{"op": "jwks_refresh", "url": "u", "unknown_kid": true, "min_refresh": "1s",'
            b' "cache_ttl": 1, "timeout": 1}',
            "'min_refresh' must be a number",
        ),
        (b'{"op": "jwks_refresh", "unknown_kid": true}', "without 'url'"),
    ],
)
def test_malformed_jwks_refresh(frame: bytes, problem: str) -> None:
    with pytest.raises(BadMessage) as raised:
        ipc.parse_to_supervisor(frame)
    assert problem in str(raised.value)


def test_discovered_rows_from_instances() -> None:
    class Instance:
        def __init__(self, host: str, port: int, weight: int) -> None:
            self.host, self.port, self.weight = host, port, weight

    rows = ipc.discovered_rows({"a": (Instance("h", 1, 2),), "b": ()})
    assert rows == {"a": [("h", 1, 2)], "b": []}


MALFORMED_TO_WORKER = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "expected an object"),
    (b'{"seq": 1}', "unknown op None"),
    (b'{"op": "reboot"}', "unknown op 'reboot'"),
    (b'{"op": "metrics"}', "without 'seq'"),
    (b'{"op": "metrics", "seq": "1"}', "'seq' must be an integer"),
    (b'{"op": "metrics", "seq": true}', "'seq' must be an integer"),
    (b'{"op": "health", "upstream": "u", "address": "a"}', "without 'healthy'"),
    (b'{"op": "health", "upstream": "u", "address": "a", "healthy": 1}', "true or false"),
    (b'{"op": "eject", "upstream": "u", "address": "a", "until": "soon"}', "must be a number"),
    (b'{"op": "eject", "upstream": 3, "address": "a", "until": 1}', "'upstream' must be"),
    (b'{"op": "discovered", "discovered": [], "unhealthy": [], "ejected": []}', "an object"),
    (
        b'{"op": "discovered", "discovered": {"u": [["h", "80", 1]]}, "unhealthy": [],'
        b' "ejected": []}',
        "[host, port, weight]",
    ),
    (
        b'{"op": "discovered", "discovered": {"u": [["h", 80]]}, "unhealthy": [], "ejected": []}',
        "3-element",
    ),
    (b'{"op": "discovered", "discovered": {}, "unhealthy": [["u"]], "ejected": []}', "2-element"),
    (
        b'{"op": "discovered", "discovered": {}, "unhealthy": [], "ejected": [["u", "a", null]]}',
        "must be a number",
    ),
    (b'{"op": "discovered", "discovered": {}, "unhealthy": []}', "without 'ejected'"),
    (b'{"op": "jwks", "url": "u", "jwks": [], "fetched_at": 1}', "'jwks' must be an object"),
    (b'{"op": "jwks", "url": "u", "jwks": null}', "without 'fetched_at'"),
]


@pytest.mark.parametrize(("frame", "problem"), MALFORMED_TO_WORKER)
def test_malformed_to_worker(frame: bytes, problem: str) -> None:
    with pytest.raises(BadMessage) as raised:
        ipc.parse_to_worker(frame)
    assert problem in str(raised.value)


def test_malformed_config_fields() -> None:
    good = dict(ipc.config_message(PAYLOAD, 1))
    for key, value, problem in [
        ("text", None, "'text' must be a string"),
        ("references", {"a": 1}, "'references' must map strings to strings"),
        ("shared", [1], "'shared' must be an object or null"),
        ("tls", {"/a.pem": None}, "'tls' must map strings to strings"),
        ("seq", 1.5, "'seq' must be an integer"),
    ]:
        with pytest.raises(BadMessage) as raised:
            ipc.parse_to_worker(wire({**good, key: value}))
        assert problem in str(raised.value), key


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b'{"op": "config"}', "unknown op 'config'"),  # a worker never sends one
        (b'{"op": "ready", "seq": 1, "sha256": "x"}', "without 'pid'"),
        (b'{"op": "ack", "seq": 1}', "without 'sha256'"),
        (b'{"op": "reject", "seq": 1, "error": ["x"]}', "'error' must be a string"),
        (b'{"op": "metrics", "seq": 1, "state": []}', "'state' must be an object"),
        (b'"ready"', "expected an object"),
    ],
)
def test_malformed_to_supervisor(frame: bytes, problem: str) -> None:
    with pytest.raises(BadMessage) as raised:
        ipc.parse_to_supervisor(frame)
    assert problem in str(raised.value)


async def test_read_frame_and_send() -> None:
    reader = asyncio.StreamReader()

    class Writer:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    writer = Writer()
    ipc.send(writer, ipc.metrics_request(3))  # type: ignore[arg-type]  # duck-typed writer
    reader.feed_data(writer.data)
    reader.feed_eof()
    frame = await ipc.read_frame(reader)
    assert frame is not None
    assert ipc.parse_to_worker(frame) == {"op": "metrics", "seq": 3}
    assert await ipc.read_frame(reader) is None  # EOF


async def test_oversized_frame_is_refused() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data((ipc.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError, match="control frame of"):
        await ipc.read_frame(reader)


async def test_supervisor_ignores_bad_replies(caplog: pytest.LogCaptureFixture) -> None:
    """WorkerPool._read logs a malformed reply and goes on: the good reply after it still
    resolves the request waiting for it, and an eject reaches on_eject."""
    pool = WorkerPool(1, "127.0.0.1", 0)
    ejections: list[ipc.EjectMessage] = []
    pool.on_eject = ejections.append
    loop = asyncio.get_running_loop()
    worker = _Worker(0, None, None, 0.0, loop.create_future())  # type: ignore[arg-type]
    waiting: asyncio.Future[ipc.Reply] = loop.create_future()
    worker.pending[5] = waiting
    reader = asyncio.StreamReader()
    for frame in [
        b"{garbage",
        wire({"op": "ack", "seq": 5}),  # no sha256
        wire({"op": "shutdown"}),
        wire(ipc.eject_message("u", "a:1", 3.0)),
        wire(ipc.ack_message(5, "ab")),
    ]:
        reader.feed_data(len(frame).to_bytes(4, "big") + frame)
    reader.feed_eof()
    with caplog.at_level(logging.WARNING, logger="gateway.workers"):
        await pool._read(worker, reader)
    assert waiting.result() == {"op": "ack", "seq": 5, "sha256": "ab"}
    assert worker.sha256 == "ab"
    assert ejections == [{"op": "eject", "upstream": "u", "address": "a:1", "until": 3.0}]
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(ignored) == 3, ignored
    assert worker.gone
