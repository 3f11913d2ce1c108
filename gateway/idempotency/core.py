"""Pure core of the Idempotency-Key replay store: no IO, no clock of its own.

References are to draft-ietf-httpapi-idempotency-key-header-06 ("the draft"):
§2.1 syntax (an sf-string, RFC 8941 §3.3.3), §2.2 uniqueness, §2.3 validity and expiry,
§2.4 fingerprint, §2.7 error scenarios (400 missing, 409 in flight, 422 reused key).
"""

from __future__ import annotations

import hashlib
from typing import Final

import orjson

MAX_KEY_CHARS: Final = 255  # the draft sets no bound; a UUIDv4 is 36
FINGERPRINT_PARTS: Final = ("method", "path", "body")
REPLAY_HEADER: Final = b"idempotent-replayed: true\r\n"  # the draft names none (see docs)

# Outcomes of a claim (what the store found, decided atomically by the store).
CLAIMED: Final = 0  # the key was free: this request owns it now
IN_FLIGHT: Final = 1  # another request holds it and has not finished
COMPLETED: Final = 2  # a stored response exists

# What the listener does with a keyed request.
PROCEED: Final = "proceed"  # forward it (and record the response)
CONFLICT: Final = "conflict"  # 409
MISMATCH: Final = "mismatch"  # 422
REPLAY: Final = "replay"  # answer with the stored response
WAIT: Final = "wait"  # poll again (in_flight: wait)


class InvalidKey(ValueError):
    """The Idempotency-Key field is not a valid sf-string (400)."""


def parse_key(values: list[bytes]) -> str:
    """The key of the Idempotency-Key field lines ``values`` (one line expected).

    The draft §2.1: the value is an Item Structured Header whose value is a String, so it
    is ``"`` *chars ``"`` with ``\\`` escaping only ``"`` and ``\\`` (RFC 8941 §3.3.3), printable
    ASCII only. Parameters are not used here and are refused; two field lines make a List,
    not an Item, and are refused too.
    """
    if len(values) != 1:
        raise InvalidKey("exactly one Idempotency-Key field line is allowed")
    raw = values[0].strip(b" \t")
    if len(raw) < 2 or raw[0] != 0x22 or raw[-1] != 0x22:
        raise InvalidKey("Idempotency-Key must be a quoted string (RFC 8941 §3.3.3)")
    out = bytearray()
    i = 1
    end = len(raw) - 1
    while i < end:
        c = raw[i]
        if c == 0x5C:  # backslash: only \" and \\ are escapes
            if i + 1 >= end or raw[i + 1] not in (0x22, 0x5C):
                raise InvalidKey("invalid escape in Idempotency-Key")
            out.append(raw[i + 1])
            i += 2
            continue
        if c == 0x22:
            raise InvalidKey("unescaped quote in Idempotency-Key")
        if c < 0x20 or c > 0x7E:
            raise InvalidKey("Idempotency-Key must be printable ASCII")
        out.append(c)
        i += 1
    if not out:
        raise InvalidKey("Idempotency-Key must not be empty")
    if len(out) > MAX_KEY_CHARS:
        raise InvalidKey(f"Idempotency-Key is longer than {MAX_KEY_CHARS} characters")
    return out.decode("ascii")


def scope_key(prefix: str, route: str, principal: str, key: str) -> bytes:
    """The store key: route and principal are part of it, so two clients (or two routes)
    never share an entry (draft §2.2: a key is unique per client and resource). Hashed so that
    neither the client address nor the key appears in Redis, and its length is fixed."""
    digest = hashlib.sha256()
    for part in (route, principal, key):
        data = part.encode("utf-8", "surrogateescape")
        digest.update(b"%d:" % len(data))
        digest.update(data)
    return f"{prefix}:idem:".encode() + digest.hexdigest().encode("ascii")


def fingerprint(parts: tuple[str, ...], method: bytes, target: bytes, body_digest: bytes) -> bytes:
    """SHA-256 (32 bytes) over the chosen request parts (draft §2.4), each length-prefixed so
    that no two different requests hash alike by moving bytes between parts. ``body_digest``
    is the SHA-256 of the request body, computed as it streamed (framing excluded: the same
    body sent chunked or with Content-Length has one fingerprint)."""
    digest = hashlib.sha256(b"idem-v1")
    if "method" in parts:
        digest.update(b"m%d:%b" % (len(method), method))
    if "path" in parts:
        digest.update(b"p%d:%b" % (len(target), target))
    if "body" in parts:
        digest.update(b"b32:" + body_digest)
    return digest.digest()


EMPTY_BODY_DIGEST: Final = hashlib.sha256(b"").digest()


def decide(outcome: int, stored_fingerprint: bytes, fingerprint: bytes, in_flight: str) -> str:
    """What to do with a keyed request given what the store found.

    A stored entry with another fingerprint is a reused key: 422 (draft §2.7), whether it is
    in flight or completed. The same fingerprint while the first is in flight: 409 (draft
    §2.7), or wait and replay (``in_flight: wait``). Completed: replay.
    """
    if outcome == CLAIMED:
        return PROCEED
    if stored_fingerprint != fingerprint:
        return MISMATCH
    if outcome == IN_FLIGHT:
        return WAIT if in_flight == "wait" else CONFLICT
    return REPLAY


def storable(status: int, store_4xx: bool) -> bool:
    """Which responses are kept: 2xx and 3xx, 4xx when ``store_4xx``; never a 5xx (an upstream
    or gateway failure: the key is released so that the client can retry, draft §2.6)."""
    if status >= 500 or status < 200:
        return False
    return status < 400 or store_4xx


# -- stored records ------------------------------------------------------------------------
# A record is the response as the client got it, minus what belongs to the connection:
# b"%d %d\n" % (status, len(reason)) + reason + b"%d\n" % len(fields) + fields + body, where
# fields are the header lines without hop-by-hop fields, x-request-id or framing.


def encode_record(status: int, reason: bytes, fields: bytes, body: bytes) -> bytes:
    return b"%d %d\n%b%d\n%b%b" % (status, len(reason), reason, len(fields), fields, body)


def decode_record(record: bytes) -> tuple[int, bytes, bytes, bytes]:
    """``(status, reason, fields, body)``; ValueError when the record is damaged."""
    line = record.index(b"\n")
    status_text, reason_len_text = record[:line].split(b" ")
    status = int(status_text)
    at = line + 1
    reason_end = at + int(reason_len_text)
    reason = record[at:reason_end]
    line = record.index(b"\n", reason_end)
    fields_end = line + 1 + int(record[reason_end:line])
    fields = record[line + 1 : fields_end]
    if len(record) < fields_end or not 100 <= status <= 599:
        raise ValueError("damaged idempotency record")
    return status, reason, fields, record[fields_end:]


def replay_response(
    record: bytes, request_id: bytes, keep_alive: bool, is_head: bool, http10: bool
) -> tuple[int, bytes]:
    """The bytes of a replayed response: the stored status, reason, fields and body, plus
    this request's id, Content-Length framing and the replay marker."""
    status, reason, fields, body = decode_record(record)
    head = [b"HTTP/1.1 %d %b\r\n" % (status, reason), fields, REPLAY_HEADER]
    head.append(b"x-request-id: %b\r\n" % request_id)
    if status != 204 and status != 304:
        head.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        head.append(b"connection: close\r\n")
    elif http10:
        head.append(b"connection: keep-alive\r\n")
    head.append(b"\r\n")
    if not is_head and status != 204 and status != 304:
        head.append(body)
    return status, b"".join(head)


_TITLES = {
    400: (b"Bad Request", "Invalid or missing Idempotency-Key"),
    413: (b"Content Too Large", "Keyed request body too large"),
    409: (b"Conflict", "A request with this Idempotency-Key is being processed"),
    422: (b"Unprocessable Content", "Idempotency-Key reused with a different request"),
    503: (b"Service Unavailable", "The idempotency store is unavailable"),
}


def problem_response(
    status: int, detail: str, request_id: bytes, keep_alive: bool, is_head: bool
) -> bytes:
    """An RFC 9457 problem document (application/problem+json), as the draft's §2.7 examples."""
    reason, title = _TITLES[status]
    body = orjson.dumps(
        {
            "type": "about:blank",
            "title": title,
            "status": status,
            "detail": detail,
            "request_id": request_id.decode("ascii", "replace"),
        }
    )
    head = (
        b"HTTP/1.1 %d %b\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
        b"x-request-id: %b\r\n%b\r\n"
        % (status, reason, len(body), request_id, b"" if keep_alive else b"connection: close\r\n")
    )
    return head if is_head else head + body
