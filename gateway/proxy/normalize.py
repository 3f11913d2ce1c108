"""Request-target normalisation: the one step between the parser and the route table.

Pure functions, bytes in, bytes out (or :class:`InvalidTarget`), no IO. The route table, the
rewrites, the hash keys and the upstream all see the path returned here, so a path cannot match
one route and mean another resource at the origin. The rules, with their RFC references, are
listed in ``docs/request-validation.md``; in order:

1. The target has no fragment (``#``, RFC 9112 §3.2) and only visible ASCII (RFC 3986 §2; llhttp
   already refuses control characters and non-ASCII bytes, this keeps the function safe alone).
2. Percent-encoding (RFC 3986 §2.1) must be ``%`` + two hex digits. Unreserved characters
   (§2.3: letters, digits, ``-._~``) are decoded (§6.2.2.2), every other escape keeps its
   encoding with upper-case hex (§6.2.2.1). ``%00`` and a double-encoded dot, slash or backslash
   (``%252E``, ``%252F``, ``%255C``) are refused: they mean something only to an origin that
   decodes twice (CWE-174). ``%2F``/``%5C`` follow ``paths.escaped_slashes``.
3. A raw ``\\`` follows ``paths.backslashes`` (browsers read it as ``/``, RFC 3986 does not).
4. Dot segments are removed (RFC 3986 §5.2.4), after the decoding above, so ``%2e%2e`` is
   ``..``. A ``..`` that would climb above ``/`` is refused, and so is a dot segment carrying
   parameters (``..;x``: servlet containers strip ``;x`` and then climb).
5. Leading slashes collapse to one (``//host/x`` would read as a network-path reference,
   RFC 3986 §4.2), and with ``paths.merge_slashes`` every run of slashes does.

An already-normal path (no ``%``, ``\\``, ``#``, ``/.`` nor ``//``) is returned as the same
object after five substring tests on its latin-1 text, which the route table needs anyway
(measured under callgrind: a ``str`` ``in`` is ~250 instructions, ``bytes.find`` ~1,150 and
``b"/." in path`` ~2,300 through the buffer protocol, one regex search ~6,000). Control
characters, spaces and non-ASCII bytes are not looked for on that fast path: the parser (llhttp,
strict) refuses them in the request target with a 400 before this runs
(``tests/integration/test_malformed.py``); the slow path refuses them too.
"""

from __future__ import annotations

import re

from gateway.config.model import PathsConfig
from gateway.proxy.headers import valid_authority

__all__ = [
    "DEFAULT_PATHS",
    "InvalidTarget",
    "normalize_path",
    "normalize_rewritten",
    "parse_target",
]

DEFAULT_PATHS = PathsConfig()


class InvalidTarget(ValueError):
    """The request target cannot be routed safely; the client gets a 400 with this message."""


_HASH, _QUERY = 0x23, 0x3F  # int membership in bytes is a memchr (no buffer protocol)
_INVALID_BYTE = re.compile(rb"[^!-~]").search
# RFC 3986 §3.2: reg-name or IP-literal, optional port; no userinfo (RFC 9110 §4.2.4).
_HEX = frozenset(b"0123456789abcdefABCDEF")
# RFC 3986 §2.3: ALPHA / DIGIT / "-" / "." / "_" / "~"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# "%25" followed by these is a double-encoded ".", "/" or "\".
_DOUBLE_ENCODED = frozenset((b"2E", b"2F", b"5C"))


def normalize_path(path: bytes, policy: PathsConfig = DEFAULT_PATHS) -> bytes:
    """The normalised form of an origin-form path (no query); ``path`` itself when normal.

    Raises :class:`InvalidTarget` for a path that cannot be normalised safely.
    """
    text = path.decode("latin-1")
    if text[:1] == "/" and not (
        "%" in text or "\\" in text or "#" in text or "/." in text or "//" in text
    ):
        return path
    return _normalize(path, policy, resolve_dots=True)


def normalize_rewritten(path: bytes, policy: PathsConfig = DEFAULT_PATHS) -> bytes:
    """A rewrite's result made a valid origin-form path under the same rules.

    The input of a rewrite is normal, but a string-prefix strip can cut a segment in two
    (``/api../x`` minus ``/api`` is ``/../x``) and a regex can write anything. An empty result
    is ``/``; a dot segment is refused rather than resolved, since resolving it would move the
    request out of the mount the rewrite chose (``/internal/../admin``).
    """
    if path[:1] != b"/":
        path = b"/" + path
    text = path.decode("latin-1")
    if not ("%" in text or "\\" in text or "#" in text or "/." in text or "//" in text):
        return path
    return _normalize(path, policy, resolve_dots=False)


def parse_target(
    target: bytes, method: bytes, policy: PathsConfig = DEFAULT_PATHS
) -> tuple[bytes, bytes, str, bytes, bytes | None]:
    """Split and normalise a request target (RFC 9112 §3.2).

    Returns ``(upstream_target, path, path_text, query, authority)``: the origin-form target to
    send upstream (normalised path + the original query, untouched), the normalised path (and
    the same decoded as latin-1, what the route table takes), the raw query without ``?``, and
    the authority of an absolute-form target (None otherwise; it replaces the Host header,
    RFC 9112 §3.2.2). ``OPTIONS *`` gives ``(b"*", b"*", "*", b"", None)``.
    """
    if target[:1] == b"/":
        if _QUERY in target:
            query_at = target.find(b"?")
            path, query = target[:query_at], target[query_at + 1 :]
            if _HASH in query:
                raise InvalidTarget("a request target has no fragment ('#')")
        else:
            path, query = target, b""
        text = path.decode("latin-1")
        # The fast path of normalize_path, inlined: this runs for every request.
        if not ("%" in text or "\\" in text or "#" in text or "/." in text or "//" in text):
            return target, path, text, query, None
        path = _normalize(path, policy, resolve_dots=True)
        upstream_target = path + b"?" + query if _QUERY in target else path
        return upstream_target, path, path.decode("latin-1"), query, None
    if target == b"*":
        # RFC 9112 §3.2.4: asterisk-form is only for a server-wide OPTIONS.
        if method == b"OPTIONS":
            return target, target, "*", b"", None
        raise InvalidTarget("'*' is a request target for OPTIONS only")
    upstream_target, path, query, authority = _absolute_form(target, policy)
    return upstream_target, path, path.decode("latin-1"), query, authority


def _absolute_form(target: bytes, policy: PathsConfig) -> tuple[bytes, bytes, bytes, bytes | None]:
    """RFC 9112 §3.2.2: ``http(s)://authority[path][?query]``; the path is normalised."""
    scheme_end = target.find(b"://")
    if scheme_end < 0 or target[:scheme_end].lower() not in (b"http", b"https"):
        raise InvalidTarget("invalid request target")
    rest = target[scheme_end + 3 :]
    if b"#" in rest:
        raise InvalidTarget("a request target has no fragment ('#')")
    end = len(rest)
    for stop in (b"/", b"?"):
        at = rest.find(stop)
        if 0 <= at < end:
            end = at
    authority = rest[:end]
    if b"@" in authority:
        raise InvalidTarget("userinfo is not allowed in a request target (RFC 9110 §4.2.4)")
    if not valid_authority(authority):  # the same rule as the Host header's
        raise InvalidTarget("invalid authority in the request target")
    rest = rest[end:]
    query_at = rest.find(b"?")
    if query_at < 0:
        raw_path, query = rest, b""
    else:
        raw_path, query = rest[:query_at], rest[query_at + 1 :]
    # RFC 9112 §3.3: an empty path in absolute-form is "/" in origin-form.
    path = normalize_path(raw_path or b"/", policy)
    upstream_target = path + b"?" + query if query_at >= 0 else path
    return upstream_target, path, query, authority


def _normalize(path: bytes, policy: PathsConfig, *, resolve_dots: bool) -> bytes:
    if b"#" in path:
        raise InvalidTarget("a request target has no fragment ('#')")
    if _INVALID_BYTE(path) is not None:
        raise InvalidTarget("the request target has a control character, space or non-ASCII byte")
    if path[:1] != b"/":
        raise InvalidTarget("an origin-form request target starts with '/'")
    if b"%" in path:
        path = _percent(path, policy)
    if b"\\" in path:
        action = policy.backslashes
        if action == "reject":
            raise InvalidTarget("a '\\' in the path is not allowed (paths.backslashes: reject)")
        if action == "to_slash":
            path = path.replace(b"\\", b"/")
    return _segments(path, policy.merge_slashes, resolve_dots)


def _percent(path: bytes, policy: PathsConfig) -> bytes:
    """Decode unreserved escapes, upper-case the others, apply the escaped-slash policy."""
    parts = path.split(b"%")
    out = [parts[0]]
    slashes = policy.escaped_slashes
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise InvalidTarget("invalid percent-encoding in the path (RFC 3986 §2.1)")
        code = int(part[:2], 16)
        if code in _UNRESERVED:
            out.append(bytes((code,)))
        elif code == 0x2F or code == 0x5C:
            if slashes == "reject":
                raise InvalidTarget(
                    "an encoded '/' or '\\' (%2F, %5C) in the path is not allowed"
                    " (paths.escaped_slashes: reject)"
                )
            if slashes == "decode":
                out.append(b"/" if code == 0x2F else b"\\")
            else:
                out.append(b"%" + part[:2].upper())
        elif code == 0:
            raise InvalidTarget("an encoded NUL (%00) in the path is not allowed")
        elif code == 0x25 and part[2:4].upper() in _DOUBLE_ENCODED:
            raise InvalidTarget("a double-encoded '.', '/' or '\\' in the path is not allowed")
        else:
            out.append(b"%" + part[:2].upper())
        out.append(part[2:])
    return b"".join(out)


def _segments(path: bytes, merge_slashes: bool, resolve_dots: bool) -> bytes:
    """RFC 3986 §5.2.4 on a path starting with '/', plus slash collapsing."""
    # Leading slashes collapse first, so "//a/../.." climbs (and is refused) like "/a/../..".
    segments = path.lstrip(b"/").split(b"/")
    last = len(segments) - 1
    out: list[bytes] = []
    for i, segment in enumerate(segments):
        if segment == b"." or segment == b"..":
            if not resolve_dots:
                raise InvalidTarget("the rewritten path has a '.' or '..' segment")
            if segment == b"..":
                if not out:
                    raise InvalidTarget("the path climbs above '/'")
                out.pop()
            if i == last:
                out.append(b"")  # "/a/b/.." is "/a/", a directory
        elif segment[:1] == b"." and (segment[:2] == b".;" or segment[:3] == b"..;"):
            raise InvalidTarget("a '.' or '..' segment with parameters (';') is not allowed")
        elif segment or not merge_slashes or i == last:
            out.append(segment)
    result = b"/" + b"/".join(out)
    if result[:2] == b"//":  # "/a/..//b": a '..' can bring an empty segment to the front
        result = b"/" + result.lstrip(b"/")
    return result
