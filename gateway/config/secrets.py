"""Secrets in the config: references to the environment or to files, and redaction.

**References.** A key marked ``secret`` in the schema (and the URL keys that may carry a
password) may name where its value lives instead of holding it::

    admin: {address: 0.0.0.0:9901, token: "${env:GATEWAY_ADMIN_TOKEN}"}
    redis: {url: "redis://:${file:/run/secrets/redis-password}@redis:6379/0"}

``${env:NAME}`` is the environment variable NAME; ``${file:PATH}`` the content of PATH (relative
to the config file's directory; one trailing newline is dropped). They are expanded when the
config is loaded; a missing variable or an unreadable file is a config error (file:line: key).
Every reference a load resolved is kept (``Resolver.resolved``), so worker processes build
their config from the supervisor's values instead of reading the environment or files again.

**Redaction.** Wherever the config is shown (``/admin/config``, error messages, logs), values of
``secret`` keys become ``<redacted>`` and so does the password of any URL (its userinfo); a value
written as references only is shown as written (``${env:NAME}``), which reveals nothing.
``SCRUBBER`` is a last line of defence for text built elsewhere (log lines, admin answers): it
replaces the current secret values and URL userinfo wherever they appear.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REDACTED",
    "SCRUBBER",
    "RedactingFilter",
    "Resolver",
    "SecretScrubber",
    "has_reference",
    "install_log_redaction",
    "is_only_references",
    "looks_like_reference",
    "redact_secret",
    "redact_userinfo",
    "url_password",
]

REDACTED = "<redacted>"
MAX_SECRET_FILE_BYTES = 64 * 1024
# Shorter values are not scrubbed from free text: they would garble unrelated words.
MIN_SCRUB_LENGTH = 6

REFERENCE = re.compile(r"\$\{([^{}]*)\}")
_ANY_REFERENCE = re.compile(r"\$\{\s*(?:env|file)\s*:", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ONLY_REFERENCES = re.compile(r"(?:\$\{[^{}]*\})+")
# scheme://userinfo@ : the userinfo runs to the last '@' before the path (greedy), so a raw '@'
# inside a password is still covered.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s\"'<>]*)@")


def has_reference(text: str) -> bool:
    return "${" in text


def looks_like_reference(text: str) -> bool:
    """``${env:`` or ``${file:`` somewhere in ``text`` (to refuse them where they do nothing)."""
    return _ANY_REFERENCE.search(text) is not None


def is_only_references(text: str) -> bool:
    return _ONLY_REFERENCES.fullmatch(text) is not None


class Resolver:
    """Expands ``${env:NAME}`` and ``${file:PATH}`` in one config load.

    ``known`` (reference -> value, as sent by the supervisor) replaces the environment and the
    file system: a worker resolves exactly what the supervisor resolved.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        known: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.environ = os.environ if environ is None else environ
        self.known = known
        self.resolved: dict[str, str] = {}

    def expand(self, text: str) -> str:
        """``text`` with every reference replaced; ValueError names the one that failed."""
        return REFERENCE.sub(lambda match: self._value(match.group(1)), text)

    def _value(self, reference: str) -> str:
        kind, sep, argument = reference.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in ("env", "file") or not argument:
            raise ValueError(
                f"unknown reference ${{{reference}}}: write ${{env:NAME}} or ${{file:PATH}}"
            )
        key = f"{kind}:{argument}"
        if key in self.resolved:
            return self.resolved[key]
        if self.known is not None:
            if key not in self.known:
                raise ValueError(f"${{{key}}} was not resolved by the supervisor")
            value = self.known[key]
        elif kind == "env":
            value = self._env(argument)
        else:
            value = self._file(argument)
        self.resolved[key] = value
        return value

    def _env(self, name: str) -> str:
        if _ENV_NAME.fullmatch(name) is None:
            raise ValueError(f"${{env:{name}}}: {name!r} is not an environment variable name")
        value = self.environ.get(name)
        if value is None:
            raise ValueError(f"${{env:{name}}}: environment variable {name} is not set")
        return value

    def _file(self, name: str) -> str:
        path = Path(name)
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            raise ValueError(
                f"${{file:{name}}}: cannot read {path}: {exc.strerror or exc}"
            ) from None
        if len(data) > MAX_SECRET_FILE_BYTES:
            raise ValueError(
                f"${{file:{name}}}: {path} is larger than {MAX_SECRET_FILE_BYTES} bytes"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"${{file:{name}}}: {path} is not UTF-8 text") from None
        # Secret files usually end with a newline that is not part of the secret.
        if text.endswith("\r\n"):
            return text[:-2]
        return text[:-1] if text.endswith("\n") else text


# --- redaction ---------------------------------------------------------------------------------


def redact_secret(value: Any) -> Any:
    """How the value of a ``secret`` key is shown: references as written, anything else hidden."""
    if value is None:
        return None
    if isinstance(value, str) and is_only_references(value):
        return value
    return REDACTED


def _redact_password(password: str) -> str:
    return password if password and is_only_references(password) else REDACTED


def _userinfo(match: re.Match[str]) -> str:
    user, sep, password = match.group("userinfo").partition(":")
    if sep:
        return f"{match.group('scheme')}{user}:{_redact_password(password)}@"
    # A lone userinfo is often a token (https://TOKEN@host): hide it too.
    return f"{match.group('scheme')}{_redact_password(user)}@"


def redact_userinfo(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password (or lone user) hidden."""
    if "@" not in text:
        return text
    return _USERINFO.sub(_userinfo, text)


def url_password(url: str) -> str | None:
    """The password (or lone userinfo) of the first URL in ``url``, if there is one."""
    if "@" not in url:
        return None
    match = _USERINFO.search(url)
    if match is None:
        return None
    user, sep, password = match.group("userinfo").partition(":")
    value = password if sep else user
    return value or None


class SecretScrubber:
    """Replaces the current secret values and URL userinfo in free text."""

    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()

    def set_secrets(self, values: Iterable[str]) -> None:
        # Longest first, so a secret containing another is replaced whole.
        unique = {v for v in values if len(v) >= MIN_SCRUB_LENGTH}
        self._values = tuple(sorted(unique, key=len, reverse=True))

    def text(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return redact_userinfo(text)

    def json_bytes(self, body: bytes) -> bytes:
        """The same on serialized JSON, where a secret appears with JSON escapes."""
        import orjson

        for value in self._values:
            escaped = orjson.dumps(value)[1:-1]
            if escaped in body:
                body = body.replace(escaped, REDACTED.encode())
        if b"@" in body:
            body = redact_userinfo(body.decode("utf-8", "surrogateescape")).encode(
                "utf-8", "surrogateescape"
            )
        return body


SCRUBBER = SecretScrubber()


class RedactingFilter(logging.Filter):
    """A handler filter: log records leave with secrets scrubbed (message and traceback)."""

    def __init__(self, scrubber: SecretScrubber = SCRUBBER) -> None:
        super().__init__()
        self.scrubber = scrubber
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self.scrubber.text(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.scrubber.text(self._formatter.formatException(record.exc_info))
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a ``RedactingFilter`` to every handler of ``logger`` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
