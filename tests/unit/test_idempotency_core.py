"""Pure core of the Idempotency-Key store (draft-ietf-httpapi-idempotency-key-header-06)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.idempotency.core import (
    CLAIMED,
    COMPLETED,
    CONFLICT,
    EMPTY_BODY_DIGEST,
    IN_FLIGHT,
    MAX_KEY_CHARS,
    MISMATCH,
    PROCEED,
    REPLAY,
    WAIT,
    InvalidKey,
    decide,
    decode_record,
    encode_record,
    fingerprint,
    parse_key,
    problem_response,
    replay_response,
    scope_key,
    storable,
)
from gateway.idempotency.stores import SQLiteStore

# Draft §2.1: the field is an Item Structured Header whose value is a String (RFC 8941 §3.3.3):
# DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE, unescaped = %x20-21 / %x23-5B / %x5D-7E.
VALID_KEYS = [
    (b'"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    (b'"a"', "a"),
    (b'"with space"', "with space"),
    (b'"esc\\"aped"', 'esc"aped'),
    (b'"back\\\\slash"', "back\\slash"),
    (b' "ows-trimmed" ', "ows-trimmed"),  # RFC 9110 §5.5: OWS around a field value
    (b'"' + b"k" * MAX_KEY_CHARS + b'"', "k" * MAX_KEY_CHARS),
]
INVALID_KEYS = [
    b"8e03978e-40d5-43e8-bc93-6894a57f9324",  # a Token, not a String: missing quotes
    b'"unterminated',
    b'unopened"',
    b'""',  # empty
    b'"in"ner"',  # unescaped quote
    b'"bad\\escape"',  # \e is not an escape (RFC 8941 §3.3.3)
    b'"tab\there"',  # control character
    b'"caf\xc3\xa9"',  # non-ASCII
    b'"' + b"k" * (MAX_KEY_CHARS + 1) + b'"',  # too long
    b'"key";param=1',  # parameters: not a bare String here
    b"?1",  # a Boolean
]


@pytest.mark.parametrize(("raw", "key"), VALID_KEYS)
def test_valid_keys(raw: bytes, key: str) -> None:
    assert parse_key([raw]) == key


@pytest.mark.parametrize("raw", INVALID_KEYS)
def test_invalid_keys(raw: bytes) -> None:
    with pytest.raises(InvalidKey):
        parse_key([raw])


def test_two_field_lines_make_a_list_not_an_item() -> None:
    with pytest.raises(InvalidKey, match="exactly one"):
        parse_key([b'"a"', b'"a"'])


def test_key_scoping_by_route_and_principal() -> None:
    base = scope_key("gw", "payments", "10.0.0.1", "k")
    assert base == scope_key("gw", "payments", "10.0.0.1", "k")
    assert base != scope_key("gw", "payments", "10.0.0.2", "k")  # another client
    assert base != scope_key("gw", "orders", "10.0.0.1", "k")  # another route
    assert base != scope_key("other", "payments", "10.0.0.1", "k")  # another prefix
    # Length-prefixed parts: moving bytes across the boundary changes the key.
    assert scope_key("gw", "ab", "c", "k") != scope_key("gw", "a", "bc", "k")
    assert base.startswith(b"gw:idem:") and len(base) == len(b"gw:idem:") + 64
    assert b"10.0.0.1" not in base  # neither the address nor the key is stored in clear


def test_fingerprint_parts() -> None:
    body = fingerprint(("method", "path", "body"), b"POST", b"/pay", b"1" * 32)
    assert len(body) == 32
    assert body != fingerprint(("method", "path", "body"), b"POST", b"/pay", b"2" * 32)
    assert body != fingerprint(("method", "path", "body"), b"PATCH", b"/pay", b"1" * 32)
    assert body != fingerprint(("method", "path", "body"), b"POST", b"/pay?x", b"1" * 32)
    no_body = ("method", "path")
    assert fingerprint(no_body, b"POST", b"/pay", b"1" * 32) == fingerprint(
        no_body, b"POST", b"/pay", b"2" * 32
    )
    assert fingerprint(("body",), b"POST", b"/a", EMPTY_BODY_DIGEST) == fingerprint(
        ("body",), b"PUT", b"/b", EMPTY_BODY_DIGEST
    )
    # The parts are separated: "PO" + "ST/pay" is not "POST" + "/pay".
    assert fingerprint(no_body, b"PO", b"ST/pay", b"") != fingerprint(
        no_body, b"POST", b"/pay", b""
    )


FP = b"f" * 32
OTHER = b"o" * 32
# (what the store found, stored fingerprint, in_flight option, action) — draft §2.7.
DECISIONS = [
    (CLAIMED, b"", "conflict", PROCEED),
    (IN_FLIGHT, FP, "conflict", CONFLICT),  # 409 while the first is outstanding
    (IN_FLIGHT, FP, "wait", WAIT),
    (IN_FLIGHT, OTHER, "wait", MISMATCH),  # 422 even in flight: another request
    (COMPLETED, FP, "conflict", REPLAY),
    (COMPLETED, OTHER, "conflict", MISMATCH),  # 422: key reused with another payload
]


@pytest.mark.parametrize(("outcome", "stored", "in_flight", "action"), DECISIONS)
def test_decisions(outcome: int, stored: bytes, in_flight: str, action: str) -> None:
    assert decide(outcome, stored, FP, in_flight) == action


@pytest.mark.parametrize(
    ("status", "store_4xx", "expected"),
    [
        (200, False, True),
        (201, True, True),
        (302, False, True),
        (404, True, True),
        (409, False, False),
        (500, True, False),
        (503, True, False),
        (101, True, False),
    ],
)
def test_storable(status: int, store_4xx: bool, expected: bool) -> None:
    assert storable(status, store_4xx) is expected


def test_record_round_trip_and_replay_bytes() -> None:
    fields = b"content-type: application/json\r\nx-custom: kept\r\n"
    record = encode_record(201, b"Created", fields, b'{"id":1}')
    assert decode_record(record) == (201, b"Created", fields, b'{"id":1}')
    status, data = replay_response(record, b"rid-2", True, False, False)
    assert status == 201
    assert data == (
        b"HTTP/1.1 201 Created\r\n" + fields + b"idempotent-replayed: true\r\n"
        b"x-request-id: rid-2\r\ncontent-length: 8\r\n\r\n" + b'{"id":1}'
    )
    _, head_only = replay_response(record, b"r", False, True, False)
    assert head_only.endswith(b"connection: close\r\n\r\n")  # HEAD: no body


def test_damaged_record_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_record(b"garbage")
    with pytest.raises(ValueError):
        decode_record(b"999 0\n0\n")


def test_problem_documents() -> None:
    data = problem_response(409, "in progress", b"rid", True, False)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 409 Conflict\r\n")
    assert b"content-type: application/problem+json" in head
    assert b'"status":409' in body and b'"request_id":"rid"' in body
    assert b"connection: close" in problem_response(422, "x", b"r", False, False)


async def _call(store: SQLiteStore, method: str, *args: object) -> object:
    done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    getattr(store, method)(*args, done.set_result)
    return await asyncio.wait_for(done, 5)


def test_sqlite_store_state_machine(tmp_path: Path) -> None:
    """claim -> in flight -> completed -> replayed until the TTL; release frees a claim; a
    claim past lock_timeout is free again. Two store objects on one file (two workers)."""
    asyncio.run(_state_machine(tmp_path / "idem.sqlite3"))


async def _state_machine(path: Path) -> None:
    first, second = SQLiteStore(path), SQLiteStore(path)
    now = 1000.0
    assert await _call(first, "claim", b"k", b"t1", FP, 30_000, now) == (CLAIMED, b"", b"")
    assert await _call(second, "claim", b"k", b"t2", FP, 30_000, now + 1) == (IN_FLIGHT, FP, b"")
    # Only the owner of the claim completes it.
    assert await _call(second, "complete", b"k", b"t2", FP, b"rec", 5_000, now + 1) is False
    assert await _call(first, "complete", b"k", b"t1", FP, b"rec", 5_000, now + 2) is True
    found = await _call(second, "claim", b"k", b"t3", OTHER, 30_000, now + 3)
    assert found == (COMPLETED, FP, b"rec")
    # TTL over (completed at now+2 for 5 s): the key is fresh.
    assert await _call(second, "claim", b"k", b"t4", FP, 30_000, now + 7.5) == (CLAIMED, b"", b"")
    # A crashed owner: lock_timeout frees it.
    assert await _call(first, "claim", b"j", b"t5", FP, 1_000, now) == (CLAIMED, b"", b"")
    assert await _call(second, "claim", b"j", b"t6", FP, 1_000, now + 1.5) == (CLAIMED, b"", b"")
    # Release by its owner only (releases are ordered before the next call of that store).
    second.release(b"j", b"wrong")
    assert await _call(second, "claim", b"j", b"t7", FP, 1_000, now + 1.6) == (IN_FLIGHT, FP, b"")
    second.release(b"j", b"t6")
    assert await _call(second, "claim", b"j", b"t8", FP, 1_000, now + 1.7) == (CLAIMED, b"", b"")
    await first.close()
    await second.close()


def test_metrics_export_merge_and_render() -> None:
    from gateway.metrics import GatewayMetrics

    workers = [GatewayMetrics(), GatewayMetrics()]
    workers[0].idempotency("payments", "stored")
    workers[1].idempotency("payments", "stored")
    workers[1].idempotency("payments", "replayed")
    merged = GatewayMetrics()
    for worker in workers:
        merged.merge_state(worker.export_state())
    assert merged.idempotency_results == {("payments", "stored"): 2, ("payments", "replayed"): 1}
    family = next(f for f in merged.families() if f.name == "gateway_idempotency")
    samples = {(s.labels["route"], s.labels["result"]): s.value for s in family.samples}
    assert samples[("payments", "stored")] == 2 and samples[("payments", "replayed")] == 1
