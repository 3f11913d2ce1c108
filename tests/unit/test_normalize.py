"""The request-target normaliser (gateway/proxy/normalize.py): tables per rule, plus properties
checked against a literal transcription of RFC 3986 §5.2.4."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.model import PathsConfig
from gateway.proxy.normalize import (
    InvalidTarget,
    normalize_path,
    normalize_rewritten,
    parse_target,
)

DEFAULT = PathsConfig()
KEEP = PathsConfig(escaped_slashes="keep", backslashes="keep")
DECODE = PathsConfig(escaped_slashes="decode", backslashes="to_slash")
MERGE = PathsConfig(merge_slashes=True)

# (raw path, policy, normalised path, or None when the path is refused with InvalidTarget)
PATHS: list[tuple[bytes, PathsConfig, bytes | None]] = [
    # already normal: returned as is
    (b"/", DEFAULT, b"/"),
    (b"/public/index.html", DEFAULT, b"/public/index.html"),
    (b"/a.b/c..d/...", DEFAULT, b"/a.b/c..d/..."),  # not dot segments: "...", "c..d"
    (b"/a|b^c{d}[e]", DEFAULT, b"/a|b^c{d}[e]"),  # printable ASCII that browsers send raw
    # RFC 3986 §5.2.4: dot-segment removal
    (b"/public/../admin", DEFAULT, b"/admin"),
    (b"/public/./x", DEFAULT, b"/public/x"),
    (b"/public/x/../../admin", DEFAULT, b"/admin"),
    (b"/a/b/..", DEFAULT, b"/a/"),  # a trailing ".." leaves a directory
    (b"/a/b/.", DEFAULT, b"/a/b/"),
    (b"/a//../b", DEFAULT, b"/a/b"),  # ".." removes the empty segment
    (b"/.", DEFAULT, b"/"),
    # climbing above "/" is refused (RFC 3986 §5.2.4 would clamp it silently)
    (b"/..", DEFAULT, None),
    (b"/../admin", DEFAULT, None),
    (b"/a/../../admin", DEFAULT, None),
    (b"//a/../../x", DEFAULT, None),  # leading slashes collapse first
    # RFC 3986 §2.3 / §6.2.2.2: unreserved characters are decoded; then dots are segments
    (b"/public/%2e%2e/admin", DEFAULT, b"/admin"),
    (b"/public/.%2e/admin", DEFAULT, b"/admin"),
    (b"/public/%2E./admin", DEFAULT, b"/admin"),
    (b"/%2e%2e", DEFAULT, None),
    (b"/%7Euser/%41%62%30%2D%5F", DEFAULT, b"/~user/Ab0-_"),
    # RFC 3986 §6.2.2.1: other escapes stay encoded, with upper-case hex
    (b"/caf%c3%a9", DEFAULT, b"/caf%C3%A9"),
    (b"/a%20b%3fc%23d", DEFAULT, b"/a%20b%3Fc%23d"),  # space, "?" and "#" stay escaped
    (b"/50%25", DEFAULT, b"/50%25"),
    # RFC 3986 §2.1: an escape is "%" HEXDIG HEXDIG
    (b"/a%zz", DEFAULT, None),
    (b"/a%2", DEFAULT, None),
    (b"/a%", DEFAULT, None),
    (b"/a%%41", DEFAULT, None),
    (b"/a%00b", DEFAULT, None),  # encoded NUL
    # double encoding (CWE-174): %25 followed by the hex of ".", "/" or "\"
    (b"/public/%252e%252e/admin", DEFAULT, None),
    (b"/a%252Fb", KEEP, None),
    (b"/a%255cb", DECODE, None),
    (b"/a%2541", DEFAULT, b"/a%2541"),  # "%A" is not dangerous: kept as data
    # encoded "/" and "\" (paths.escaped_slashes)
    (b"/public/..%2fadmin", DEFAULT, None),
    (b"/public/..%5Cadmin", DEFAULT, None),
    (b"/public/..%2fadmin", KEEP, b"/public/..%2Fadmin"),  # one segment "..%2F", not ".."
    (b"/a%2fb%5cc", KEEP, b"/a%2Fb%5Cc"),
    (b"/public/..%2fadmin", DECODE, b"/admin"),  # decoded before dots are resolved
    (b"/public/..%5cadmin", DECODE, b"/admin"),  # "\" then to_slash
    (b"/a%5cb", PathsConfig(escaped_slashes="decode"), None),  # decoded "\" meets reject
    (b"/a%5cb", PathsConfig(escaped_slashes="decode", backslashes="keep"), b"/a\\b"),
    (b"/%2f%2fevil.example/x", DECODE, b"/evil.example/x"),  # decoded leading slashes collapse
    # raw backslashes (paths.backslashes)
    (b"/public\\..\\admin", DEFAULT, None),
    (b"/public\\..\\admin", DECODE, b"/admin"),
    (b"/public\\..\\admin", KEEP, b"/public\\..\\admin"),
    # dot segments with parameters: "..;x" climbs in servlet containers
    (b"/public/..;/admin", DEFAULT, None),
    (b"/public/.;x/admin", DEFAULT, None),
    (b"/public/a;b/..;c", DEFAULT, None),
    (b"/public/x;..", DEFAULT, b"/public/x;.."),
    # slashes: leading runs always collapse (RFC 3986 §4.2: "//host" is a network-path reference)
    (b"//evil.example/x", DEFAULT, b"/evil.example/x"),
    (b"///", DEFAULT, b"/"),
    (b"/a/..//b", DEFAULT, b"/b"),
    (b"/a//b//", DEFAULT, b"/a//b//"),  # merge_slashes off: kept inside the path
    (b"/a//b//", MERGE, b"/a/b/"),
    (b"/a//./../b", MERGE, b"/b"),
    # RFC 9112 §3.2: no fragment; RFC 3986 §2: visible ASCII only (llhttp refuses these first)
    (b"/a#b", DEFAULT, None),
    (b"/a#", DEFAULT, None),
    (b"/./a\x01", DEFAULT, None),
    (b"/./caf\xc3\xa9", DEFAULT, None),
    # origin-form starts with "/"
    (b"", DEFAULT, None),
    (b"a/b", DEFAULT, None),
]


@pytest.mark.parametrize(("raw", "policy", "expected"), PATHS)
def test_normalize_path(raw: bytes, policy: PathsConfig, expected: bytes | None) -> None:
    if expected is None:
        with pytest.raises(InvalidTarget):
            normalize_path(raw, policy)
    else:
        assert normalize_path(raw, policy) == expected


def test_normal_path_is_returned_as_the_same_object() -> None:
    # The fast path allocates nothing.
    path = b"/api/v1/users/12345/profile.json"
    assert normalize_path(path) is path
    target = path + b"?a=1"
    assert parse_target(target, b"GET")[0] is target


# (target, method, upstream target, path, query, authority; None = refused)
TARGETS: list[tuple[bytes, bytes, tuple[bytes, bytes, bytes, bytes | None] | None]] = [
    (b"/x?a=1", b"GET", (b"/x?a=1", b"/x", b"a=1", None)),
    (b"/x?", b"GET", (b"/x?", b"/x", b"", None)),
    # the query is never normalised: "..", "%2F", "//" and lower-case hex stay as they came
    (
        b"/p/../q?next=/../admin&x=%2f%2e//",
        b"GET",
        (b"/q?next=/../admin&x=%2f%2e//", b"/q", b"next=/../admin&x=%2f%2e//", None),
    ),
    (b"/p?x=1#frag", b"GET", None),  # RFC 9112 §3.2: no fragment, in the query either
    (b"/p#frag?x=1", b"GET", None),
    # RFC 9112 §3.2.4: asterisk-form, OPTIONS only
    (b"*", b"OPTIONS", (b"*", b"*", b"", None)),
    (b"*", b"GET", None),
    # RFC 9112 §3.2.2: absolute-form; the authority is returned for Host, the path normalised
    (
        b"http://h.example:81/public/../admin?x=%2F",
        b"GET",
        (b"/admin?x=%2F", b"/admin", b"x=%2F", b"h.example:81"),
    ),
    (b"HTTPS://H.example/a", b"GET", (b"/a", b"/a", b"", b"H.example")),
    (b"http://h.example", b"GET", (b"/", b"/", b"", b"h.example")),  # RFC 9112 §3.3: "" is "/"
    (b"http://h.example?q", b"GET", (b"/?q", b"/", b"q", b"h.example")),
    (b"http://[::1]:8080/x", b"GET", (b"/x", b"/x", b"", b"[::1]:8080")),
    (b"http://h.example/%2e%2e/x", b"GET", None),  # climbs above "/"
    (b"http://h.example//evil/x", b"GET", (b"/evil/x", b"/evil/x", b"", b"h.example")),
    (b"http://user:pw@h.example/x", b"GET", None),  # RFC 9110 §4.2.4: no userinfo
    (b"http:///x", b"GET", None),  # empty authority
    (b"http://h ex/x", b"GET", None),
    (b"http://h.example/x#f", b"GET", None),
    (b"ftp://h.example/x", b"GET", None),
    (b"h.example:80", b"GET", None),  # authority-form is for CONNECT, which is refused
    (b"x", b"GET", None),
]


@pytest.mark.parametrize(("target", "method", "expected"), TARGETS)
def test_parse_target(
    target: bytes, method: bytes, expected: tuple[bytes, bytes, bytes, bytes | None] | None
) -> None:
    if expected is None:
        with pytest.raises(InvalidTarget):
            parse_target(target, method)
    else:
        upstream_target, path, path_text, query, authority = parse_target(target, method)
        assert (upstream_target, path, query, authority) == expected
        assert path_text == path.decode("latin-1")


# (rewrite result, policy, what goes upstream, or None when refused)
REWRITTEN: list[tuple[bytes, PathsConfig, bytes | None]] = [
    (b"/internal/v2/x", DEFAULT, b"/internal/v2/x"),
    (b"", DEFAULT, b"/"),  # never empty (RFC 9112 §3.2.1: origin-form)
    (b"x", DEFAULT, b"/x"),
    (b"//evil.example/x", DEFAULT, b"/evil.example/x"),  # strip_prefix /api of /api//evil...
    (b"/../admin", DEFAULT, None),  # strip_prefix /api of /api../admin
    (b"/internal/../admin", DEFAULT, None),  # refused, not resolved out of the mount
    (b"/internal/./x", DEFAULT, None),
    (b"/a%2fb", DEFAULT, None),  # a regex replacement writing an escape meets the same policy
    (b"/a%2fb", KEEP, b"/a%2Fb"),
    (b"/a//b", MERGE, b"/a/b"),
]


@pytest.mark.parametrize(("path", "policy", "expected"), REWRITTEN)
def test_normalize_rewritten(path: bytes, policy: PathsConfig, expected: bytes | None) -> None:
    if expected is None:
        with pytest.raises(InvalidTarget):
            normalize_rewritten(path, policy)
    else:
        assert normalize_rewritten(path, policy) == expected


# -- properties ---------------------------------------------------------------------------------


def rfc3986_remove_dot_segments(path: str) -> tuple[str, bool]:
    """RFC 3986 §5.2.4, rule by rule; also reports whether a ".." found the output empty."""
    inp, out, climbed = path, "", False
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../") or inp == "/..":
            inp = "/" + inp[4:] if inp.startswith("/../") else "/"
            if not out:
                climbed = True
            out = out[: max(out.rfind("/"), 0)]
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            end = inp.find("/", start)
            end = len(inp) if end < 0 else end
            out, inp = out + inp[:end], inp[end:]
    return out, climbed


plain_paths = st.lists(st.sampled_from(["a", "b", ".", "..", ""]), min_size=1, max_size=8).map(
    lambda segments: "/" + "/".join(segments)
)


@settings(max_examples=500, deadline=None)
@given(plain_paths)
def test_dot_segments_agree_with_rfc3986(path: str) -> None:
    # The reference runs on the path with its leading slashes collapsed, as ours does.
    expected, climbed = rfc3986_remove_dot_segments("/" + path.lstrip("/"))
    if climbed:
        with pytest.raises(InvalidTarget):
            normalize_path(path.encode())
        return
    expected = "/" + expected.lstrip("/")  # "/a/..//b": no "//" at the front either
    assert normalize_path(path.encode()).decode() == expected


path_bytes = st.lists(
    st.sampled_from(
        [b"a", b"/", b".", b"..", b"%2e", b"%2E", b"%2f", b"%5c", b"\\", b"%41", b"%c3", b";", b"%"]
    ),
    max_size=12,
).map(lambda parts: b"/" + b"".join(parts))
policies = st.builds(
    PathsConfig,
    escaped_slashes=st.sampled_from(["reject", "keep", "decode"]),
    backslashes=st.sampled_from(["reject", "keep", "to_slash"]),
    merge_slashes=st.booleans(),
)


@settings(max_examples=1000, deadline=None)
@given(path_bytes, policies)
def test_normal_form_is_stable_and_safe(path: bytes, policy: PathsConfig) -> None:
    try:
        normal = normalize_path(path, policy)
    except InvalidTarget:
        return
    # Idempotent: the upstream (or a second gateway) normalising again changes nothing.
    assert normalize_path(normal, policy) == normal
    assert normalize_rewritten(normal, policy) == normal
    assert normal.startswith(b"/") and not normal.startswith(b"//")
    segments = normal.split(b"/")
    assert b"." not in segments and b".." not in segments
    # Only escapes that must stay escaped are left, with upper-case hex.
    for escape in normal.split(b"%")[1:]:
        assert escape[:2] == escape[:2].upper() and int(escape[:2], 16) not in b"-._~" + bytes(
            range(0x30, 0x3A)
        ) + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))
    if policy.escaped_slashes != "keep":
        assert b"%2F" not in normal and b"%5C" not in normal
    if policy.backslashes != "keep":
        assert b"\\" not in normal
    if policy.merge_slashes:
        assert b"//" not in normal
