"""Certificate files: read once, checked, and described (names, expiry).

The process that validates a config (``gateway check``, the supervisor at start and on every
reload) reads every TLS file the config names, checks it, and keeps the bytes in
``GatewayConfig.tls_files``; workers receive those bytes and never read the files, so every
process serves exactly the certificate that was checked, even while a file is being rewritten.

Problems that make a certificate unusable (missing file, unreadable PEM, key that does not match
the certificate, CA bundle without a certificate) are errors, reported as ``file:line: key:
message`` like every config error. An expired (or not yet valid) certificate and a route name
no certificate covers are warnings: the config still runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config.errors import ConfigError, ConfigInvalid
from gateway.config.model import GatewayConfig
from gateway.config.yamlpos import load_yaml
from gateway.tls.contexts import load_chain

YamlPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What a certificate says, for SNI selection, checks and the expiry metric."""

    path: str  # resolved path of the cert file
    names: tuple[str, ...]  # DNS names of its subjectAltName (lower case), else its CN
    ips: tuple[str, ...]
    not_before: float  # Unix time
    not_after: float
    subject: str  # RFC 4514

    @property
    def name(self) -> str:
        """One name for labels and logs: the first DNS name, else the subject."""
        return self.names[0] if self.names else self.subject


def resolve(path: str, source: str) -> str:
    """A config file path, relative to the config file's directory (absolute stays)."""
    candidate = Path(path)
    if candidate.is_absolute() or source in ("", "<string>"):
        return str(candidate)
    return str(Path(source).resolve().parent / candidate)


def describe_pem(cert_pem: bytes, path: str) -> CertInfo:
    """Parse the first certificate of a PEM chain; ValueError if there is none."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names: list[str] = []
    ips: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        names = [str(attr.value).lower() for attr in common]
    return CertInfo(
        path=path,
        names=tuple(names),
        ips=tuple(ips),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        subject=cert.subject.rfc4514_string(),
    )


def name_covered(names: tuple[str, ...], host: str) -> bool:
    """RFC 6125 §6.4.3: exact, or a leftmost "*" label standing for exactly one label."""
    host = host.lower().rstrip(".")
    for name in names:
        if name == host:
            return True
        if name.startswith("*."):
            suffix = name[1:]
            head = host[: -len(suffix)] if host.endswith(suffix) else ""
            if head and "." not in head:
                return True
    return False


@dataclass(frozen=True, slots=True)
class _FileRef:
    path: str  # as written
    resolved: str
    where: YamlPath  # config key path, for file:line
    kind: str  # cert | key | ca


def _listener_refs(config: GatewayConfig) -> Iterator[_FileRef]:
    for i, listener in enumerate(config.all_listeners):
        tls = listener.tls
        if tls is None:
            continue
        base: YamlPath = ("listen", i, "tls")  # a TLS listener is always in a list
        for j, pair in enumerate(tls.certificates):
            at = (*base, "certificates", j)
            yield _FileRef(pair.cert, resolve(pair.cert, config.source), (*at, "cert"), "cert")
            yield _FileRef(pair.key, resolve(pair.key, config.source), (*at, "key"), "key")
        if tls.client_auth is not None:
            ca = tls.client_auth.ca
            yield _FileRef(ca, resolve(ca, config.source), (*base, "client_auth", "ca"), "ca")


def _upstream_refs(config: GatewayConfig) -> Iterator[_FileRef]:
    for name, upstream in config.upstreams.items():
        tls = upstream.tls
        if tls is None:
            continue
        base: YamlPath = ("upstreams", name, "tls")
        for kind, path in (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)):
            if path is not None:
                yield _FileRef(path, resolve(path, config.source), (*base, kind), kind)


@dataclass
class TLSCheck:
    """Outcome of reading a config's TLS files."""

    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    errors: list[ConfigError] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # (listener name, cert info) of every listener certificate, for the expiry metric.
    certificates: list[tuple[str, CertInfo]] = dataclasses.field(default_factory=list)


def check_tls_files(
    config: GatewayConfig, text: str | None, *, now: float | None = None
) -> TLSCheck:
    """Read and check every TLS file ``config`` names; ``text`` is the config's text (for
    line numbers; None: errors name the file only)."""
    out = TLSCheck()
    uses_tls = any(listener.tls for listener in config.all_listeners) or any(
        upstream.tls for upstream in config.upstreams.values()
    )
    if not uses_tls:
        return out
    positions = load_yaml(text, config.source)[1] if text is not None else None
    now = time.time() if now is None else now

    def line(where: YamlPath) -> int | None:
        return positions.line_of(where) if positions is not None else None

    def error(ref: _FileRef, message: str) -> None:
        out.errors.append(ConfigError(config.source, line(ref.where), _dotted(ref.where), message))

    refs = [*_listener_refs(config), *_upstream_refs(config)]
    readable: dict[YamlPath, bytes] = {}
    for ref in refs:
        try:
            data = Path(ref.resolved).read_bytes()
        except OSError as exc:
            error(ref, f"cannot read {ref.kind} file {ref.resolved}: {exc.strerror or exc}")
            continue
        out.files[ref.resolved] = data
        readable[ref.where] = data

    # Certificates with their keys, and CA bundles.
    for ref in refs:
        found = readable.get(ref.where)
        if found is None:
            continue
        data = found
        if ref.kind == "ca":
            try:
                ssl.create_default_context(cadata=data.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                error(ref, f"{ref.resolved} is not a PEM CA bundle: {_reason(exc)}")
        elif ref.kind == "key":
            try:
                serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as exc:
                error(ref, f"{ref.resolved} is not an unencrypted PEM private key: {exc}")
                readable.pop(ref.where)
    pairs = _pairs(config, refs)
    for cert_ref, key_ref, listener_name in pairs:
        cert_pem = readable.get(cert_ref.where)
        key_pem = readable.get(key_ref.where)
        if cert_pem is None:
            continue
        try:
            info = describe_pem(cert_pem, cert_ref.resolved)
        except ValueError as exc:
            error(cert_ref, f"{cert_ref.resolved} is not a PEM certificate: {exc}")
            continue
        if key_pem is not None:
            try:
                load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_pem, key_pem)
            except ssl.SSLError as exc:
                error(
                    key_ref,
                    f"{key_ref.resolved} does not belong to {cert_ref.resolved} ({_reason(exc)})",
                )
                continue
        where = f"{config.source}:{line(cert_ref.where) or '?'}: {_dotted(cert_ref.where)}"
        if info.not_after < now:
            out.warnings.append(
                f"{where}: warning: certificate {cert_ref.resolved} ({info.name}) expired on"
                f" {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(info.not_after))}"
            )
        elif info.not_before > now:
            out.warnings.append(
                f"{where}: warning: certificate {cert_ref.resolved} ({info.name}) is not valid"
                f" before {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(info.not_before))}"
            )
        if listener_name is not None:
            out.certificates.append((listener_name, info))
    if not out.errors:
        out.warnings += _uncovered_names(config, out, positions)
    return out


def _pairs(
    config: GatewayConfig, refs: list[_FileRef]
) -> list[tuple[_FileRef, _FileRef, str | None]]:
    """(cert, key, listener name or None for an upstream client cert), in config order."""
    pairs: list[tuple[_FileRef, _FileRef, str | None]] = []
    by_where = {ref.where: ref for ref in refs}
    for ref in refs:
        if ref.kind != "cert":
            continue
        key = by_where.get((*ref.where[:-1], "key"))
        if key is None:
            continue
        index = ref.where[1]
        listener = config.all_listeners[index].name if isinstance(index, int) else None
        pairs.append((ref, key, listener))
    return pairs


def _uncovered_names(config: GatewayConfig, check: TLSCheck, positions: object) -> list[str]:
    """Route hosts and SNI names that no listener certificate covers: such a request gets the
    default certificate (a client that checks names refuses it) or a 421."""
    if not check.certificates:
        return []
    listeners = config.all_listeners
    only_tls = all(listener.tls is not None for listener in listeners)
    names = tuple(name for _, info in check.certificates for name in info.names)
    warnings = []
    for i, route in enumerate(config.routes):
        for key, value in (("sni", route.match.sni), ("host", route.match.host)):
            if value is None or value == "*" or (key == "host" and not only_tls):
                continue
            probe = "x" + value[1:] if value.startswith("*.") else value
            if value.startswith("*.") and value in names:
                continue
            if not name_covered(names, probe):
                line = positions.line_of(("routes", i, "match", key)) if positions else None  # type: ignore[attr-defined]
                warnings.append(
                    f"{config.source}:{line or '?'}: routes[{i}].match.{key}: warning: no"
                    f" listener certificate covers {value!r}"
                )
    return warnings


def _dotted(path: YamlPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else str(exc)


def load_with_tls(
    config: GatewayConfig, text: str | None, *, refuse_expired: bool = False
) -> tuple[GatewayConfig, TLSCheck]:
    """``config`` with its TLS files attached; ConfigInvalid if any is unusable.

    ``refuse_expired`` (reloads): an expired or not yet valid listener certificate is an
    error, not a warning. Rotating to such a certificate is always a mistake (every client
    would refuse it), and the running one keeps serving; at start and in ``gateway check`` it
    is a warning, so that a gateway can still come up and say why."""
    check = check_tls_files(config, text)
    if refuse_expired and not check.errors:
        for warning in check.warnings:
            if "expired on" in warning or "is not valid before" in warning:
                where, _, message = warning.partition(": warning: ")
                file, _, rest = where.partition(":")
                line_text, _, key = rest.partition(": ")
                line = int(line_text) if line_text.isdigit() else None
                check.errors.append(
                    ConfigError(file, line, key, message + "; not swapped in on a reload")
                )
    if check.errors:
        raise ConfigInvalid(check.errors)
    return (
        dataclasses.replace(config, tls_files=check.files, tls_warnings=tuple(check.warnings)),
        check,
    )


def material_digest(files: dict[str, bytes], paths: tuple[str | None, ...]) -> str:
    """Digest of the named files' bytes: a pool or context built from them is reused only
    while this is unchanged (a rotated client certificate opens new connections)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(b"\0" + (files.get(path, b"") if path is not None else b""))
    return digest.hexdigest()
