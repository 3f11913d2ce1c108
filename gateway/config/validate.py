"""The validation engine: typed schema nodes that both check a YAML value and describe it as
JSON Schema, plus the cross-reference checks a JSON Schema cannot express.

Each node's ``check`` returns the converted value (model objects, float seconds, int bytes) or
``INVALID`` after recording errors; it never stops at the first problem, so one run reports
every error in the file. The declarations themselves live in ``gateway.config.schema``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from gateway.config.durations import (
    SIZE_HINT,
    SIZE_PATTERN,
    parse_duration,
    parse_size,
)
from gateway.config.errors import ConfigError
from gateway.config.model import Address
from gateway.config.secrets import (
    REDACTED,
    Resolver,
    has_reference,
    looks_like_reference,
    redact_secret,
    redact_userinfo,
    url_password,
)
from gateway.config.yamlpos import Path, Positions, format_path


class _Invalid:
    __slots__ = ()

    def __repr__(self) -> str:
        return "INVALID"


INVALID: Final = _Invalid()


class _Required:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()


class Context:
    """Where errors go while one document is checked."""

    def __init__(
        self, source: str, positions: Positions | None = None, resolver: Resolver | None = None
    ) -> None:
        self.source = source
        self.positions = positions or Positions()
        self.errors: list[ConfigError] = []
        self.resolver = resolver or Resolver()
        # Values of secret keys (and URL passwords) as loaded: what redaction must hide.
        self.secrets: list[str] = []

    def error(self, path: Path, message: str, *, key: bool = False) -> None:
        broken = self.positions.broken
        if broken and any(path[:i] in broken for i in range(len(path) + 1)):
            return  # YAML already reported this value as unreadable
        line = self.positions.line_of(path, key=key)
        # Messages quote values; a URL's password must not end up in a log or an answer.
        message = redact_userinfo(message)
        self.errors.append(ConfigError(self.source, line, format_path(path), message))


def describe(value: Any) -> str:
    """How a YAML value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value}"


def _type_error(
    ctx: Context, path: Path, expected: str, value: Any, *, quote_hint: bool = False
) -> _Invalid:
    hint = ""
    if quote_hint and isinstance(value, int | float | bool):
        # YAML reads `1`, `1.0` and `yes` as numbers/booleans; a string must be quoted.
        hint = " (quote it to make it a string)"
    ctx.error(path, f"expected {expected}, got {describe(value)}{hint}")
    return INVALID


def _anchored(pattern: str) -> str:
    return f"^(?:{pattern})$"


class Type:
    """A schema node. ``ref`` names it in the JSON Schema ``$defs`` (None = inline)."""

    expected: str = "a value"
    ref: str | None = None

    def accepts(self, value: Any) -> bool:
        """Whether the YAML value has the right Python type (used to pick a Union branch)."""
        raise NotImplementedError

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        raise NotImplementedError

    def json(self, gen: JsonGen) -> dict[str, Any]:
        raise NotImplementedError

    def redact(self, value: Any) -> Any:
        """``value`` (as written in YAML) for display: secrets and URL passwords hidden."""
        return redact_plain(value)


def redact_plain(value: Any) -> Any:
    """A value outside any secret key: only URL passwords are hidden."""
    if isinstance(value, str):
        return redact_userinfo(value)
    if isinstance(value, dict):
        return {key: redact_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_plain(item) for item in value]
    return value


class JsonGen:
    """Collects named nodes into ``$defs`` while a schema is rendered."""

    def __init__(self) -> None:
        self.defs: dict[str, dict[str, Any]] = {}

    def render(self, node: Type) -> dict[str, Any]:
        if node.ref is None:
            return node.json(self)
        if node.ref not in self.defs:
            self.defs[node.ref] = {}  # placeholder first: allows recursive references
            self.defs[node.ref] = node.json(self)
        return {"$ref": f"#/$defs/{node.ref}"}


class Text(Type):
    """A string, optionally checked by a pattern and/or parsed by a function (ValueError = bad)."""

    def __init__(
        self,
        expected: str,
        *,
        pattern: str | None = None,
        parse: Callable[[str], Any] | None = None,
        lower: bool = False,
        upper: bool = False,
        min_length: int = 1,
        ref: str | None = None,
        json_extra: dict[str, Any] | None = None,
    ) -> None:
        self.expected = expected
        self.pattern = pattern
        self._regex = re.compile(pattern) if pattern is not None else None
        self.parse = parse
        self.lower = lower
        self.upper = upper
        self.min_length = min_length
        self.ref = ref
        self.json_extra = json_extra or {}

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not isinstance(value, str):
            quote_hint = self.parse is None
            return _type_error(ctx, path, self.expected, value, quote_hint=quote_hint)
        if len(value) < self.min_length:
            ctx.error(path, f"must not be empty: expected {self.expected}")
            return INVALID
        if has_reference(value) and looks_like_reference(value):
            # Left over: references are expanded before this, in the keys that allow them.
            ctx.error(path, _NOT_EXPANDED)
            return INVALID
        if self.parse is not None:
            try:
                result = self.parse(value)
            except ValueError as exc:
                ctx.error(path, str(exc))
                return INVALID
        else:
            result = value
        if self._regex is not None and self._regex.fullmatch(value) is None:
            ctx.error(path, f"{value!r} is not {self.expected}")
            return INVALID
        if isinstance(result, str):
            result = result.lower() if self.lower else result.upper() if self.upper else result
        return result

    def json(self, gen: JsonGen) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string"}
        if self.min_length:
            out["minLength"] = self.min_length
        if self.pattern is not None:
            out["pattern"] = _anchored(self.pattern)
        out.update(self.json_extra)
        return out


# Upper bound of every Int that declares none: a count, percentage or bound in this config
# beyond a signed 32-bit integer is a typo or a unit mistake, never a real setting.
DEFAULT_MAXIMUM: Final = 2**31 - 1
# Numbers (floats: histogram bounds in seconds or bytes, fractions) up to the largest integer a
# float holds exactly; this also refuses .inf and 1e300.
DEFAULT_MAX_NUMBER: Final = 2**53
# Same for sizes: 1 PiB.
DEFAULT_MAX_SIZE: Final = 2**50


class Int(Type):
    """An integer within bounds (``DEFAULT_MAXIMUM`` unless a maximum is given)."""

    json_type = "integer"

    def __init__(
        self, minimum: float | None = None, maximum: float | None = DEFAULT_MAXIMUM
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.expected = "an integer"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def convert(self, value: Any) -> Any:
        return value

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not self.accepts(value) or value != value:  # NaN is not a number here
            return _type_error(ctx, path, self.expected, value)
        if self.minimum is not None and value < self.minimum:
            ctx.error(path, f"must be at least {self.minimum}, got {value}")
            return INVALID
        if self.maximum is not None and value > self.maximum:
            ctx.error(path, f"must be at most {self.maximum}, got {value}")
            return INVALID
        return self.convert(value)

    def json(self, gen: JsonGen) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.json_type}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


class Number(Int):
    """An integer or a decimal number (not a boolean), as a float."""

    json_type = "number"

    def __init__(
        self, minimum: float | None = None, maximum: float | None = DEFAULT_MAX_NUMBER
    ) -> None:
        super().__init__(minimum, maximum)
        self.expected = "a number"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def convert(self, value: Any) -> Any:
        return float(value)


class Bool(Type):
    expected = "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not isinstance(value, bool):
            return _type_error(ctx, path, self.expected, value)
        return value

    def json(self, gen: JsonGen) -> dict[str, Any]:
        return {"type": "boolean"}


class Enum(Type):
    def __init__(self, values: Sequence[str]) -> None:
        self.values = tuple(values)
        self.expected = "one of " + ", ".join(self.values)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not isinstance(value, str):
            return _type_error(ctx, path, self.expected, value)
        if value not in self.values:
            ctx.error(path, f"{value!r} is not {self.expected}{_did_you_mean(value, self.values)}")
            return INVALID
        return value

    def json(self, gen: JsonGen) -> dict[str, Any]:
        if len(self.values) == 1:
            return {"const": self.values[0]}
        return {"type": "string", "enum": list(self.values)}


class Size(Type):
    """Bytes: an integer or a string such as '64KiB'."""

    ref = "size"

    def __init__(self, minimum: int = 0, maximum: int = DEFAULT_MAX_SIZE) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.expected = f"a size: {SIZE_HINT}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str | int) and not isinstance(value, bool)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not self.accepts(value):
            return _type_error(ctx, path, self.expected, value)
        try:
            size = parse_size(value)
        except ValueError as exc:
            ctx.error(path, str(exc))
            return INVALID
        if size < self.minimum:
            ctx.error(path, f"must be at least {self.minimum} bytes, got {size}")
            return INVALID
        if size > self.maximum:
            ctx.error(path, f"must be at most {self.maximum} bytes, got {size}")
            return INVALID
        return size

    def json(self, gen: JsonGen) -> dict[str, Any]:
        return {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": self.maximum},
                {"type": "string", "pattern": _anchored(SIZE_PATTERN)},
            ],
            "description": f"Size in bytes: {SIZE_HINT}.",
        }


class ListOf(Type):
    def __init__(self, item: Type, *, min_items: int = 0, unique: bool = False) -> None:
        self.item = item
        self.min_items = min_items
        self.unique = unique
        self.expected = f"a list of {item.expected}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not isinstance(value, list):
            return _type_error(ctx, path, self.expected, value)
        if len(value) < self.min_items:
            noun = "item" if self.min_items == 1 else "items"
            ctx.error(path, f"must have at least {self.min_items} {noun}")
            return INVALID
        out: list[Any] = []
        ok = True
        for i, item in enumerate(value):
            converted = self.item.check(ctx, (*path, i), item)
            if converted is INVALID:
                ok = False
            elif self.unique and converted in out:
                ctx.error((*path, i), f"duplicate item {converted!r}")
                ok = False
            else:
                out.append(converted)
        return tuple(out) if ok else INVALID

    def json(self, gen: JsonGen) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": gen.render(self.item)}
        if self.min_items:
            out["minItems"] = self.min_items
        if self.unique:
            out["uniqueItems"] = True
        return out

    def redact(self, value: Any) -> Any:
        if not isinstance(value, list):
            return redact_plain(value)
        return [self.item.redact(item) for item in value]


class MapOf(Type):
    """A mapping with user-chosen keys (upstream names, header names).

    ``pairs`` returns a tuple of (key, value) pairs instead of a dict; ``key_field`` stores the
    key into that field of each (dataclass) value, e.g. the upstream's ``name``.
    """

    def __init__(
        self,
        key: Text,
        value: Type,
        *,
        pairs: bool = False,
        key_field: str | None = None,
    ) -> None:
        self.key = key
        self.value = value
        self.pairs = pairs
        self.key_field = key_field
        self.expected = f"a mapping of {key.expected} to {value.expected}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not isinstance(value, dict):
            return _type_error(ctx, path, "a mapping", value)
        out: dict[Any, Any] = {}
        ok = True
        for raw_key, item in value.items():
            child = (*path, raw_key)
            key = self.key.check(_KeyContext(ctx), child, raw_key)
            if key is INVALID:
                ok = False
            elif key in out:
                ctx.error(child, f"duplicate key {raw_key!r} (keys are case-insensitive)", key=True)
                ok = False
            converted = self.value.check(ctx, child, item)
            if converted is INVALID or key is INVALID:
                ok = False
                continue
            if self.key_field is not None:
                converted = replace(converted, **{self.key_field: key})
            out[key] = converted
        if not ok:
            return INVALID
        return tuple(out.items()) if self.pairs else out

    def redact(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return redact_plain(value)
        return {key: self.value.redact(item) for key, item in value.items()}

    def json(self, gen: JsonGen) -> dict[str, Any]:
        key_schema = gen.render(self.key)
        key_schema.pop("minLength", None)  # propertyNames applies to strings only; keep lean
        return {
            "type": "object",
            "propertyNames": key_schema,
            "additionalProperties": gen.render(self.value),
        }


class _KeyContext(Context):
    """Routes errors about a mapping key to the key's line."""

    def __init__(self, parent: Context) -> None:
        self.parent = parent

    def error(self, path: Path, message: str, *, key: bool = False) -> None:
        self.parent.error(path, message, key=True)


class Union(Type):
    """One of several nodes, picked by the YAML value's type (string vs mapping, int vs str)."""

    def __init__(self, *options: Type, expected: str | None = None) -> None:
        self.options = options
        self.expected = expected or " or ".join(o.expected for o in options)

    def accepts(self, value: Any) -> bool:
        return any(o.accepts(value) for o in self.options)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        for option in self.options:
            if option.accepts(value):
                return option.check(ctx, path, value)
        return _type_error(ctx, path, self.expected, value)

    def json(self, gen: JsonGen) -> dict[str, Any]:
        return {"anyOf": [gen.render(o) for o in self.options]}

    def redact(self, value: Any) -> Any:
        for option in self.options:
            if option.accepts(value):
                return option.redact(value)
        return redact_plain(value)


class Mapped(Type):
    """Another node whose converted value is passed through ``convert``."""

    def __init__(self, inner: Type, convert: Callable[[Any], Any]) -> None:
        self.inner = inner
        self.convert = convert
        self.expected = inner.expected
        self.ref = None

    def accepts(self, value: Any) -> bool:
        return self.inner.accepts(value)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        result = self.inner.check(ctx, path, value)
        return INVALID if result is INVALID else self.convert(result)

    def json(self, gen: JsonGen) -> dict[str, Any]:
        return gen.render(self.inner)

    def redact(self, value: Any) -> Any:
        return self.inner.redact(value)


@dataclass(frozen=True)
class Field:
    """One key of a Struct. ``default`` is written as a user would write it in YAML ("30s");
    ``REQUIRED`` makes the key mandatory, ``None`` means absent -> None."""

    name: str
    type: Type
    doc: str
    default: Any = None
    # A credential (or the path of one): shown as <redacted> wherever the config is shown;
    # may be written as ${env:NAME} / ${file:PATH}.
    secret: bool = False
    # Not secret as a whole, but may hold references (a URL whose password is one).
    references: bool = False


Check = Callable[[dict[str, Any]], Iterable[tuple[str, str]]]


class Struct(Type):
    """A mapping with fixed keys; unknown keys are errors.

    ``exactly_one``: groups of keys of which exactly one must be present.
    ``together``: groups of keys that must all be present or all absent.
    ``checks``: functions of the converted values returning (key, message) problems, for rules
    JSON Schema cannot express (they are validator-only).
    """

    def __init__(
        self,
        ref: str | None,
        doc: str,
        fields: Sequence[Field],
        build: Callable[..., Any],
        *,
        exactly_one: Sequence[Sequence[str]] = (),
        together: Sequence[Sequence[str]] = (),
        checks: Sequence[Check] = (),
    ) -> None:
        self.ref = ref
        self.doc = doc
        self.fields = {f.name: f for f in fields}
        self.build = build
        self.exactly_one = [tuple(g) for g in exactly_one]
        self.together = [tuple(g) for g in together]
        self.checks = tuple(checks)
        self.expected = "a mapping"
        for group in (*self.exactly_one, *self.together):
            assert set(group) <= set(self.fields), group
        for f in fields:  # a bad default is a programming error: fail at import
            if f.default is not None and f.default is not REQUIRED:
                probe = Context("<default>")
                f.type.check(probe, (f.name,), f.default)
                assert not probe.errors, (f.name, probe.errors)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check(self, ctx: Context, path: Path, value: Any) -> Any:
        if not isinstance(value, dict):
            return _type_error(ctx, path, "a mapping", value)
        ok = True
        for key in value:
            if key not in self.fields:
                hint = _did_you_mean(key, self.fields) or f" (allowed: {', '.join(self.fields)})"
                ctx.error((*path, key), f"unknown key {key!r}{hint}", key=True)
                ok = False
        out: dict[str, Any] = {}
        for name, f in self.fields.items():
            if name in value:
                converted = _check_field(ctx, (*path, name), f, value[name])
            elif f.default is REQUIRED:
                ctx.error((*path, name), "required key is missing")
                converted = INVALID
            elif f.default is None:
                converted = None
            else:  # converted per use so that mutable defaults ({} / []) are never shared
                converted = f.type.check(Context("<default>"), (name,), f.default)
            if converted is INVALID:
                ok = False
            out[name] = converted
        for group in self.exactly_one:
            present = [k for k in group if k in value]
            if len(present) != 1:
                found = f" (found: {', '.join(present)})" if present else ""
                ctx.error(path, f"exactly one of {', '.join(group)} is required{found}")
                ok = False
        for group in self.together:
            present = [k for k in group if k in value]
            if present and len(present) != len(group):
                missing = [k for k in group if k not in value]
                ctx.error(
                    (*path, present[0]),
                    f"{' and '.join(group)} must be given together (missing: {', '.join(missing)})",
                )
                ok = False
        if not ok:
            return INVALID
        for check in self.checks:
            for key, message in check(out):
                ctx.error((*path, key), message)
                ok = False
        return self.build(**out) if ok else INVALID

    def redact(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return redact_plain(value)
        out: dict[str, Any] = {}
        for key, item in value.items():
            f = self.fields.get(key)
            if f is None:
                out[key] = redact_plain(item)
            elif f.secret:
                out[key] = redact_secret(item)
            else:
                out[key] = f.type.redact(item)
        return out

    def json(self, gen: JsonGen) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        for name, f in self.fields.items():
            prop = dict(gen.render(f.type))
            prop["description"] = f.doc
            if f.secret:
                # JSON Schema 2019-09 annotation: editors and tools may hide the value.
                prop["writeOnly"] = True
            if f.default is REQUIRED:
                required.append(name)
            elif f.default is not None:
                prop["default"] = f.default
            properties[name] = prop
        out: dict[str, Any] = {
            "type": "object",
            "description": self.doc,
            "properties": properties,
            "additionalProperties": False,
        }
        if required:
            out["required"] = required
        if len(self.exactly_one) == 1:
            out["oneOf"] = [{"required": [k]} for k in self.exactly_one[0]]
        elif self.exactly_one:
            out["allOf"] = [{"oneOf": [{"required": [k]} for k in g]} for g in self.exactly_one]
        if self.together:
            dependent: dict[str, list[str]] = {}
            for group in self.together:
                for k in group:
                    dependent.setdefault(k, []).extend(o for o in group if o != k)
            out["dependentRequired"] = dependent
        return out


_NOT_EXPANDED = (
    "${env:...} and ${file:...} references are only expanded in secret keys and URLs that may"
    " hold a password (admin.token, redis.url, discovery address, token, key_file, token_file)"
)


def _check_field(ctx: Context, path: Path, f: Field, value: Any) -> Any:
    """Check one key's value: expand its references first where they are allowed, and keep a
    secret's value out of the error messages."""
    written = value
    if (f.secret or f.references) and isinstance(value, str) and has_reference(value):
        try:
            value = ctx.resolver.expand(value)
        except ValueError as exc:
            ctx.error(path, str(exc))
            return INVALID
    first_error = len(ctx.errors)
    converted = f.type.check(ctx, path, value)
    if f.secret:
        # Numbers too: "got integer 12345678" would quote a numeric token.
        hidden = {str(v) for v in (written, value) if isinstance(v, str | int | float) and str(v)}
        ctx.errors[first_error:] = [
            replace(e, message=_hide(e.message, hidden)) for e in ctx.errors[first_error:]
        ]
        if converted is not INVALID and isinstance(value, str):
            ctx.secrets.append(value)
    elif f.references and isinstance(value, str) and "@" in value:
        # A malformed URL escapes the userinfo redaction: quote only what follows the '@'.
        shown = f"{REDACTED}@{value.rpartition('@')[2]}"
        ctx.errors[first_error:] = [
            replace(e, message=e.message.replace(value, shown)) for e in ctx.errors[first_error:]
        ]
    if not f.secret and isinstance(value, str) and (password := url_password(value)) is not None:
        ctx.secrets.append(password)
    return converted


def _hide(message: str, values: Iterable[str]) -> str:
    for value in sorted(values, key=len, reverse=True):
        message = message.replace(repr(value), REDACTED).replace(value, REDACTED)
    return message


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- value parsers shared by schema.py -------------------------------------------------------

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME_PATTERN = rf"{_LABEL}(?:\.{_LABEL})*"
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
ADDRESS_PATTERN = rf"(?:\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]|{HOSTNAME_PATTERN}):{_PORT}"
ADDRESS_HINT = "host:port (e.g. 127.0.0.1:8080, localhost:9001, [::1]:8080)"
_HOSTNAME_RE = re.compile(HOSTNAME_PATTERN)


def parse_host(host: str) -> str:
    """Validate a host name or IPv4 literal (IPv6 goes in brackets elsewhere)."""
    if not _HOSTNAME_RE.fullmatch(host) or len(host) > 253:
        raise ValueError(f"invalid host {host!r}")
    if all(label.isdigit() for label in host.split(".")):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {host!r}") from None
    return host


def parse_address(text: str) -> Address:
    """'host:port' or '[ipv6]:port' -> Address (IPv6 host stored without brackets)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid address {text!r}: missing ']' (expected {ADDRESS_HINT})")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid address {text!r}: {host!r} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"invalid address {text!r}: missing ':port' (expected {ADDRESS_HINT})")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"invalid address {text!r}: expected {ADDRESS_HINT}")
        if ":" in host:
            raise ValueError(
                f"invalid address {text!r}: IPv6 addresses go in brackets, e.g. [::1]:8080"
            )
        try:
            parse_host(host)
        except ValueError as exc:
            raise ValueError(f"invalid address {text!r}: {exc}") from None
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid address {text!r}: port must be a number from 0 to 65535")
    return Address(host, int(port_text))


def parse_cidr(text: str) -> str:
    """A CIDR (or a single address) -> its normalised network string, e.g. '10.0.0.0/8'."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"invalid CIDR {text!r} (expected e.g. 10.0.0.0/8 or ::1/128)") from None


def parse_regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def parse_positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"duration must be greater than zero, got {text!r}")
    return seconds


def check_replacement(regex: str, replacement: str) -> str | None:
    """Why ``replacement`` is not a valid template for ``regex`` (bad group refs/escapes)."""
    try:
        # `sub` compiles the template even when nothing matches, which is all we need.
        re.compile(regex).sub(replacement, "")
    except (re.error, IndexError) as exc:
        return f"invalid replacement {replacement!r}: {exc}"
    return None


# --- cross-reference checks -----------------------------------------------------------------


def cross_check(ctx: Context, data: dict[str, Any]) -> None:
    """Rules that relate keys to each other (JSON Schema cannot say these)."""
    upstreams = data.get("upstreams")
    known = sorted(upstreams) if isinstance(upstreams, dict) else []
    routes = data.get("routes")
    if isinstance(routes, list):
        first_seen: dict[str, int | None] = {}
        for i, route in enumerate(routes):
            if not isinstance(route, dict):
                continue
            name = route.get("name")
            if isinstance(name, str):
                if name in first_seen:
                    where = first_seen[name]
                    at = f" (first defined at line {where})" if where else ""
                    ctx.error(("routes", i, "name"), f"duplicate route name {name!r}{at}")
                else:
                    first_seen[name] = ctx.positions.line_of(("routes", i, "name"))
            target = route.get("upstream")
            # An upstreams section of the wrong type is reported once, not once per route.
            valid_section = isinstance(upstreams, dict | None)
            if isinstance(target, str) and target and valid_section and target not in known:
                listing = f"known: {', '.join(known)}" if known else "no upstreams are defined"
                ctx.error(("routes", i, "upstream"), f"unknown upstream {target!r} ({listing})")
    if isinstance(upstreams, dict):
        for name, upstream in upstreams.items():
            if isinstance(upstream, dict) and isinstance(upstream.get("instances"), list):
                _duplicate_instances(ctx, ("upstreams", name, "instances"), upstream["instances"])
    _listen_admin_clash(ctx, data)
    _discovery_references(ctx, data)
    _traffic_split_references(ctx, data, known if isinstance(upstreams, dict | None) else None)


def _traffic_split_references(ctx: Context, data: dict[str, Any], known: list[str] | None) -> None:
    """traffic_split filters name upstreams that must exist (wherever the filter is)."""
    if known is None:
        return
    places: list[tuple[Path, Any]] = [(("filters",), data.get("filters"))]
    routes = data.get("routes")
    if isinstance(routes, list):
        places += [
            (("routes", i, "filters"), r.get("filters"))
            for i, r in enumerate(routes)
            if isinstance(r, dict)
        ]
    upstreams = data.get("upstreams")
    if isinstance(upstreams, dict):
        places += [
            (("upstreams", name, "filters"), u.get("filters"))
            for name, u in upstreams.items()
            if isinstance(u, dict)
        ]
    for path, entries in places:
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            split = entry.get("traffic_split") if isinstance(entry, dict) else None
            targets = split.get("upstreams") if isinstance(split, dict) else None
            if not isinstance(targets, dict):
                continue
            for name in targets:
                if isinstance(name, str) and name not in known:
                    listing = ", ".join(known) or "none"
                    ctx.error(
                        (*path, i, "traffic_split", "upstreams", name),
                        f"unknown upstream {name!r} (known: {listing})",
                        key=True,
                    )


# The embedded registry exists even when the `discovery` section does not name it.
EMBEDDED_REGISTRY = "registry"
# Upstream filters a backend type cannot apply (it has no such data).
_NO_FILTER_TYPES = {
    "tags": ("dns", "kubernetes", "zookeeper", "eureka"),
    "datacenter": ("dns", "kubernetes", "etcd", "zookeeper", "eureka"),
}


def _discovery_references(ctx: Context, data: dict[str, Any]) -> None:
    backends = data.get("discovery")
    if not isinstance(backends, dict | None):
        return  # reported by the schema
    types: dict[str, Any] = {}
    for name, backend in (backends or {}).items():
        types[name] = backend.get("type") if isinstance(backend, dict) else None
    registries = [name for name, kind in types.items() if kind == "registry"]
    if not registries:
        types.setdefault(EMBEDDED_REGISTRY, "registry")  # only while none is declared
    known = ", ".join(sorted(types))
    upstreams = data.get("upstreams")
    if isinstance(upstreams, dict):
        for name, upstream in upstreams.items():
            target = upstream.get("discovery") if isinstance(upstream, dict) else None
            if not isinstance(target, str):
                continue
            path = ("upstreams", name, "discovery")
            if target not in types:
                ctx.error(path, f"unknown discovery backend {target!r} (known: {known})")
                continue
            kind = types[target]
            for key in ("tags", "datacenter"):
                if upstream.get(key) and kind in _NO_FILTER_TYPES.get(key, ()):
                    ctx.error(
                        ("upstreams", name, key), f"not supported by {kind} backend {target!r}"
                    )
    admin = data.get("admin")
    registry = admin.get("registry") if isinstance(admin, dict) else None
    if len(registries) > 1 and registry is None:
        # Which one would POST /register fill? Guessing put registrations where no upstream
        # looked; make the choice explicit.
        ctx.error(
            ("discovery", registries[1]),
            f"several backends of type registry ({', '.join(registries)}): set admin.registry"
            " to the one the registration API uses by default",
        )
    if isinstance(registry, str):
        if registry not in types:
            ctx.error(("admin", "registry"), f"unknown discovery backend {registry!r} ({known})")
        elif types[registry] not in ("registry", "consul"):
            ctx.error(
                ("admin", "registry"),
                f"backend {registry!r} is of type {types[registry]}: registration needs"
                " type registry or consul",
            )


def _duplicate_instances(ctx: Context, path: Path, instances: list[Any]) -> None:
    seen: set[Address] = set()
    for i, item in enumerate(instances):
        text = item.get("address") if isinstance(item, dict) else item
        if not isinstance(text, str):
            continue
        try:
            address = parse_address(text)
        except ValueError:
            continue
        if address in seen:
            ctx.error((*path, i), f"duplicate instance {str(address)!r}")
        seen.add(address)


def _listen_admin_clash(ctx: Context, data: dict[str, Any]) -> None:
    listen, admin = data.get("listen"), data.get("admin")
    if not (isinstance(listen, str) and isinstance(admin, str)):
        return
    try:
        a, b = parse_address(listen), parse_address(admin)
    except ValueError:
        return
    if a == b and a.port != 0:  # port 0 = "any free port", used by tests for both
        ctx.error(("admin",), f"admin address {admin!r} is the same as listen")
