"""The HTTP/1.1 request codec's pure parts: method and header tables, the Host check, the
chunked-framing walker, and the parser stand-ins (docs/request-validation.md).

``RequestCodec`` (h1codec.py, a mixin of ``ClientConnection``) drives httptools and calls
these; they keep their state on the ``Exchange`` (the walker's ``cw_*`` fields) and raise
``RequestRejected`` for bad input.
"""

from __future__ import annotations

import re

import httptools
from mypy_extensions import mypyc_attr

from gateway.proxy import headers as hdr
from gateway.proxy.exchange import (
    CW_DATA,
    CW_DATA_CRLF,
    CW_DONE,
    CW_LINE,
    CW_START,
    CW_TRAILER,
    Exchange,
)
from gateway.proxy.responses import RequestRejected

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# An extension method (RFC 9110 §9.1) llhttp does not know is fed to it as this one, which it
# parses the same way (request framing does not depend on the method), and restored afterwards.
STAND_IN_METHOD = b"GET"
MAX_METHOD_BYTES = 64  # a longer method token is refused (400)
MAX_PREFIX_BYTES = 1024  # request-line bytes kept across reads for a method llhttp refuses
# llhttp's errors for a method it does not know: at the method, or (RTSP names) at the version.
# llhttp's error for any byte (but CR/LF) after a message that ends the connection
# ("Connection: close", or HTTP/1.0 without keep-alive).
DATA_AFTER_CLOSE = "Data after `Connection: close`"
UNKNOWN_METHOD_ERRORS = (
    "Invalid method encountered",
    "Expected space after method",
    "Invalid method for HTTP/x.x request",
)
# Headers of the underscore option, as ints for a cheap compare per header.
UNDERSCORE_ALLOW = 0
UNDERSCORE_DROP = 1
UNDERSCORE_REJECT = 2
UNDERSCORE_ACTIONS = {"allow": UNDERSCORE_ALLOW, "drop": UNDERSCORE_DROP, "reject": 2}
# An int: ``b"_" in name`` costs ~0.2 µs more, as bytes.__contains__ first tries its argument
# as an integer and raises (and clears) a TypeError for a bytes one.
UNDERSCORE = ord("_")

CW_MAX_CANDIDATES = 8  # head ends tried when a chunked head ended mid-read (pipelining)

H_HOST = 1
H_CONTENT_LENGTH = 2
H_TRANSFER_ENCODING = 3
H_CONNECTION = 4
H_UPGRADE = 5
H_REQUEST_ID = 6
H_IDEMPOTENCY_KEY = 7
SPECIAL_HEADERS = {
    b"host": H_HOST,
    b"content-length": H_CONTENT_LENGTH,
    b"transfer-encoding": H_TRANSFER_ENCODING,
    b"connection": H_CONNECTION,
    b"upgrade": H_UPGRADE,
    b"x-request-id": H_REQUEST_ID,
    b"idempotency-key": H_IDEMPOTENCY_KEY,
}


# Methods llhttp parses (its HTTP method table): an llhttp error on one of these is not about
# an unknown method, so no stand-in is tried.
LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH"
    b" SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY"
    b" SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY PRI".split()
)
VALID_HOSTS = hdr.VALID_AUTHORITY_CACHE  # membership first: the same few Hosts repeat


def checked_host(value: bytes) -> bytes:
    """A Host value not seen valid before: valid (maybe without its trailing OWS), or 400."""
    if hdr.valid_authority(value):
        return value
    stripped = value.strip(b" \t")  # RFC 9110 §5.5: OWS around a value is not part of it
    if stripped != value and hdr.valid_authority(stripped):
        return stripped
    raise RequestRejected(400, "bad_request", "invalid Host header")


# Outcomes of walk_framing below zero (a non-negative outcome is where the walk stopped).
CW_DESYNC = -1
CW_LINE_TOO_LONG = -2
CW_EXTENSIONS_TOO_LONG = -3
CW_TRAILER_TOO_LARGE = -4
CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]+")


def walk_framing(
    ex: Exchange, data: bytes, position: int, max_line: int, max_extensions: int, max_trailer: int
) -> int:
    """Walk the chunked framing of ``ex`` in ``data`` from ``position`` (state kept on ``ex``).

    Returns where the walk stopped (``len(data)``, or the end of the message), or a negative
    outcome. Checked against llhttp: the data bytes skipped must be those it delivered, and the
    walk must end the message exactly when llhttp did.
    """
    size = len(data)
    state = CW_LINE if ex.cw_state == CW_START else ex.cw_state
    line = ex.cw_line
    skipped = 0
    while position < size:
        if state == CW_DATA:
            take = min(ex.cw_left, size - position)
            position += take
            skipped += take
            ex.cw_left -= take
            if ex.cw_left == 0:
                state = CW_DATA_CRLF
                ex.cw_crlf = 2
        elif state == CW_DATA_CRLF:
            take = min(ex.cw_crlf, size - position)
            position += take
            ex.cw_crlf -= take
            if ex.cw_crlf == 0:
                state = CW_LINE
        elif state == CW_LINE:
            newline = data.find(b"\n", position)
            if newline < 0:
                if len(ex.cw_prefix) < 20:
                    ex.cw_prefix += data[position : position + 20]
                line += size - position
                if line > max_line:
                    return CW_LINE_TOO_LONG
                position = size
                break
            end = newline + 1
            line += end - position
            if line > max_line:
                return CW_LINE_TOO_LONG
            start = data[position : min(end, position + 20)]
            if ex.cw_prefix:
                start = ex.cw_prefix + start
                ex.cw_prefix = b""
            digits = CHUNK_SIZE_RE.match(start)
            if digits is None:
                return CW_DESYNC
            ex.cw_extensions += line - len(digits.group()) - 2
            if ex.cw_extensions > max_extensions:
                return CW_EXTENSIONS_TOO_LONG
            line = 0
            position = end
            ex.cw_left = int(digits.group(), 16)
            state = CW_DATA if ex.cw_left else CW_TRAILER
        else:  # CW_TRAILER: field lines up to an empty line
            newline = data.find(b"\n", position)
            end = size if newline < 0 else newline + 1
            line += end - position
            ex.cw_trailer += end - position
            if ex.cw_trailer > max_trailer:
                return CW_TRAILER_TOO_LARGE
            position = end
            if newline >= 0:
                if line == 2:
                    state = CW_DONE
                    line = 0
                    break
                line = 0
    ex.cw_state = state
    ex.cw_line = line
    delivered = ex.body_bytes - ex.cw_body_mark
    ex.cw_body_mark = ex.body_bytes
    if skipped != delivered or (state == CW_DONE) != ex.request_complete:
        return CW_DESYNC
    return position


def reset_walk(ex: Exchange) -> None:
    """Back to the start, after a walk from a wrong candidate position (the defaults of
    ``Exchange``, assigned: compiled, an exchange has no ``__dict__`` to drop them from)."""
    ex.cw_state = CW_START
    ex.cw_line = 0
    ex.cw_prefix = b""
    ex.cw_left = 0
    ex.cw_crlf = 0
    ex.cw_extensions = 0
    ex.cw_trailer = 0
    ex.cw_body_mark = 0


class HeldMethodParser:
    """Stands in for the parser while a method token is incomplete and held back: the next read
    is refused with ``METHOD_HELD``, and the error path feeds the held bytes and the new ones
    to a fresh parser."""

    def feed_data(self, data: bytes) -> None:
        raise METHOD_HELD


METHOD_HELD = httptools.HttpParserError("method token held for more bytes")
HELD_METHOD_PARSER = HeldMethodParser()


# A list subclass cannot be a mypyc native class.
@mypyc_attr(native_class=False)
class HeadFields(list[tuple[bytes, bytes]]):
    """The head fields of a chunked request, once the head is complete. What on_header appends
    after that is a trailer field: never merged into the head nor forwarded (the gateway drops
    request trailers), and RFC 9110 §6.5.1 fields are refused as they arrive, before the read
    they came in can dispatch anything. (A subclass only for chunked requests: a second list
    attribute on every Exchange cost ~0.15 µs per request in instance-dict growth.)"""

    def append(self, item: tuple[bytes, bytes]) -> None:
        self.trailer(item)

    def trailer(self, item: tuple[bytes, bytes]) -> None:
        name = item[0]
        if hdr.forbidden_trailer(name):
            raise RequestRejected(
                400, "bad_request", f"{name.decode('latin-1')} is not allowed in trailers"
            )
