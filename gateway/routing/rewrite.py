"""Path rewrites of a route, compiled once when the route table is built.

The steps run in a fixed order, each optional:

1. ``strip_prefix``: when the path starts with it (plain string prefix, like the route's prefix
   match), it is removed. An empty result becomes ``"/"``, and a result that does not start with
   ``"/"`` gets one (``/users`` stripped from ``/users-x`` gives ``/-x``). A path that does not
   start with it is left alone.
2. ``prefix``: prepended. When the prefix ends with ``"/"`` and the path starts with ``"/"``, one
   of the two slashes is dropped, so ``/v2/`` + ``/users`` is ``/v2/users``, not ``/v2//users``.
   ``/v2`` + ``/`` is ``/v2/`` (like Traefik's AddPrefix: the root of the upstream mount).
3. ``regex`` + ``replacement``: ``re.sub`` of every non-overlapping match in the path.
   The replacement uses Python's syntax: ``\\1`` or ``\\g<1>`` for numbered groups,
   ``\\g<name>`` for named ones (not ``$1``).

The result always starts with ``"/"``: the request target sent upstream must be in origin-form
(RFC 9112 §3.2.1), so a rewrite that yields ``""`` or ``"x"`` gives ``"/"`` or ``"/x"``.
The path handled here never contains the query string; the caller re-attaches it unchanged.
The input is the normalised request path; the data plane then checks the result with
``gateway.proxy.normalize.normalize_rewritten`` (leading slashes collapse, so ``//a`` below goes
upstream as ``/a``; a dot segment is a 400), so no rewrite sends a path that leaves its mount.
"""

from __future__ import annotations

import re

from gateway.config.model import RewriteConfig

__all__ = ["PathRewriter", "compile_path_rewrite"]


class PathRewriter:
    """A compiled path rewrite; call it with a path, get the rewritten path."""

    __slots__ = ("_prefix", "_prefix_ends_slash", "_regex", "_replacement", "_strip")

    def __init__(
        self,
        strip_prefix: str | None,
        prefix: str | None,
        regex: str | None,
        replacement: str | None,
    ) -> None:
        # Empty strings are "not set": stripping or prepending "" changes nothing.
        self._strip: str | None = strip_prefix or None
        if prefix and not prefix.startswith("/"):
            prefix = "/" + prefix  # keep the result in origin-form
        self._prefix: str | None = prefix or None
        self._prefix_ends_slash = prefix is not None and prefix.endswith("/")
        self._regex: re.Pattern[str] | None = re.compile(regex) if regex else None
        self._replacement = replacement or ""
        if self._regex is not None:
            # re.sub parses the template before it scans, so this raises now (not on the
            # first request) on a reference to a group the pattern does not have.
            try:
                self._regex.sub(self._replacement, "")
            except (re.error, IndexError) as exc:
                raise ValueError(f"invalid rewrite replacement {replacement!r}: {exc}") from None

    def __call__(self, path: str) -> str:
        strip = self._strip
        if strip is not None and path.startswith(strip):
            path = path[len(strip) :]
            if not path.startswith("/"):
                path = "/" + path
        prefix = self._prefix
        if prefix is not None:
            if self._prefix_ends_slash and path.startswith("/"):
                path = prefix + path[1:]
            else:
                path = prefix + path
        regex = self._regex
        if regex is not None:
            path = regex.sub(self._replacement, path)
        if not path.startswith("/"):
            path = "/" + path
        return path

    def describe(self) -> dict[str, str | None]:
        return {
            "strip_prefix": self._strip,
            "prefix": self._prefix,
            "regex": self._regex.pattern if self._regex is not None else None,
            "replacement": self._replacement if self._regex is not None else None,
        }


def compile_path_rewrite(config: RewriteConfig | None) -> PathRewriter | None:
    """Compile the path part of ``config``; None when it does not change paths.

    Raises ValueError on an invalid regex or replacement.
    """
    if config is None or not (config.strip_prefix or config.prefix or config.regex):
        return None
    try:
        return PathRewriter(config.strip_prefix, config.prefix, config.regex, config.replacement)
    except re.error as exc:
        raise ValueError(f"invalid rewrite regex {config.regex!r}: {exc}") from None
