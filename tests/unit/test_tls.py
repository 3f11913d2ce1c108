"""Pure parts of TLS: certificate checks (file:line), SNI selection, name coverage for 421,
handshake failure labels, forwarding headers on TLS listeners, route matching on SNI."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
import trustme

from gateway.config import load_config_text
from gateway.config.model import RouteConfig
from gateway.proxy import headers as hdr
from gateway.routing.table import RouteTable, sni_matches
from gateway.tls.accept import handshake_reason
from gateway.tls.certs import check_tls_files, describe_pem, name_covered, resolve
from gateway.tls.contexts import CertEntry, build_store


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, stem: str, *names: str, **kw: object) -> None:
    cert = ca.issue_cert(*names, **kw)  # type: ignore[arg-type]
    (directory / f"{stem}.pem").write_bytes(cert.cert_chain_pems[0].bytes())
    (directory / f"{stem}.key").write_bytes(cert.private_key_pem.bytes())


def listener_config(directory: Path, pairs: list[tuple[str, str]], extra: str = "") -> str:
    entries = "".join(f"          - {{cert: {c}, key: {k}}}\n" for c, k in pairs)
    return (
        "listen:\n"
        "  - 127.0.0.1:0\n"
        "  - address: 127.0.0.1:0\n"
        "    tls:\n"
        "      certificates:\n"
        f"{entries}"
        f"{extra}"
        "upstreams: {u: {instances: [127.0.0.1:1]}}\n"
        "routes:\n"
        "  - {name: r, upstream: u, match: {sni: other.test}}\n"
    )


def check(directory: Path, text: str) -> tuple[list[str], list[str]]:
    source = str(directory / "gateway.yaml")
    config = load_config_text(text, source)
    result = check_tls_files(config, text)
    return [str(e) for e in result.errors], result.warnings


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    assert resolve("certs/a.pem", str(tmp_path / "gateway.yaml")) == str(tmp_path / "certs/a.pem")
    assert resolve("/etc/a.pem", str(tmp_path / "gateway.yaml")) == "/etc/a.pem"


def test_check_reports_file_line_for_missing_and_mismatched(ca: trustme.CA, tmp_path: Path) -> None:
    write_pair(ca, tmp_path, "a", "a.test")
    write_pair(ca, tmp_path, "b", "b.test")
    text = listener_config(tmp_path, [("a.pem", "b.key"), ("missing.pem", "a.key")])
    errors, _ = check(tmp_path, text)
    source = tmp_path / "gateway.yaml"
    assert errors == [
        f"{source}:7: listen[1].tls.certificates[1].cert: cannot read cert file"
        f" {tmp_path / 'missing.pem'}: No such file or directory",
        f"{source}:6: listen[1].tls.certificates[0].key: {tmp_path / 'b.key'} does not belong"
        f" to {tmp_path / 'a.pem'} (key values mismatch)",
    ]


def test_check_warns_for_expired_and_uncovered_names(ca: trustme.CA, tmp_path: Path) -> None:
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    write_pair(ca, tmp_path, "old", "a.test", not_before=past, not_after=past)
    errors, warnings = check(tmp_path, listener_config(tmp_path, [("old.pem", "old.key")]))
    assert errors == []
    assert any("expired on 2001-01-01" in w and ":6: listen[1]" in w for w in warnings), warnings
    assert any("routes[0].match.sni: warning: no listener certificate covers 'other.test'" in w
               for w in warnings), warnings  # fmt: skip


def test_not_a_key_and_not_a_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("hello\n")
    write_pair(ca, tmp_path, "a", "a.test")
    errors, _ = check(tmp_path, listener_config(tmp_path, [("junk.pem", "junk.pem")]))
    assert any(".key: " in e and "is not an unencrypted PEM private key" in e for e in errors)
    errors, _ = check(tmp_path, listener_config(tmp_path, [("junk.pem", "a.key")]))
    assert len(errors) == 1 and "is not a PEM certificate" in errors[0]


@pytest.mark.parametrize(
    ("names", "host", "covered"),
    [
        # RFC 6125 §6.4.3: "*" stands for exactly one leftmost label.
        (("api.test",), "api.test", True),
        (("api.test",), "API.TEST.", True),
        (("*.wild.test",), "a.wild.test", True),
        (("*.wild.test",), "wild.test", False),
        (("*.wild.test",), "a.b.wild.test", False),
        (("*.wild.test",), ".wild.test", False),
    ],
)
def test_name_covered(names: tuple[str, ...], host: str, covered: bool) -> None:
    assert name_covered(names, host) is covered


def test_store_picks_exact_then_wildcard_then_default(ca: trustme.CA, tmp_path: Path) -> None:
    write_pair(ca, tmp_path, "api", "api.test")
    write_pair(ca, tmp_path, "wild", "*.wild.test", "exact.wild.test")
    write_pair(ca, tmp_path, "wild2", "*.wild.test")
    text = listener_config(
        tmp_path,
        [("api.pem", "api.key"), ("wild.pem", "wild.key"), ("wild2.pem", "wild2.key")],
        "      default_certificate: wild2.pem\n",
    )
    config = load_config_text(text, str(tmp_path / "gateway.yaml"))
    tls = config.all_listeners[1].tls
    assert tls is not None
    files = check_tls_files(config, text).files
    store = build_store(tls, files, config.source)
    names = {id(e): e.info.path.rsplit("/", 1)[1] for e in store.entries}
    assert names[id(store.pick("api.test"))] == "api.pem"
    assert names[id(store.pick("API.test."))] == "api.pem"
    assert names[id(store.pick("x.wild.test"))] == "wild.pem"  # first certificate naming it
    assert names[id(store.pick(None))] == "wild2.pem"  # default_certificate
    assert names[id(store.pick("nothing.test"))] == "wild2.pem"


@pytest.mark.parametrize(
    ("host", "covered"),
    [(b"api.test", True), (b"api.test:8443", True), (b"Api.Test", True), (b"other.test", False),
     (b"127.0.0.1", True), (b"[::1]:443", False)],
)  # fmt: skip
def test_cert_entry_covers_host_header(ca: trustme.CA, host: bytes, covered: bool) -> None:
    cert = ca.issue_cert("api.test", "127.0.0.1")
    info = describe_pem(cert.cert_chain_pems[0].bytes(), "api.pem")
    entry = CertEntry(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), info)
    assert entry.covers_host(host) is covered
    assert entry.covers_host(host) is covered  # cached answer is the same


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] ...")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (ConnectionAbortedError("SSL handshake is taking longer than 1.0 seconds"), "timeout"),
        (_ssl_error("HTTP_REQUEST"), "http_on_https"),
        (_ssl_error("UNSUPPORTED_PROTOCOL"), "protocol_version"),
        (_ssl_error("WRONG_VERSION_NUMBER"), "protocol_version"),
        (_ssl_error("NO_SHARED_CIPHER"), "no_shared_cipher"),
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "client_certificate"),
        (_ssl_error("CERTIFICATE_VERIFY_FAILED"), "client_certificate"),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "peer_alert"),
        (_ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), "peer_alert"),
        (ConnectionResetError(), "closed"),
        (_ssl_error("SOMETHING_NEW"), "other"),
    ],
)
def test_handshake_reason_labels_are_bounded(error: BaseException, label: str) -> None:
    assert handshake_reason(error) == label


def _head(**kw: object) -> bytes:
    return hdr.build_request_head(
        b"GET",
        b"/",
        [(b"x-forwarded-client-cert", b"Hash=forged"), (b"x-forwarded-proto", b"http")],
        host=b"api.test",
        conn_tokens=frozenset(),
        client_ip="10.0.0.1",
        request_id=b"id",
        framing=b"",
        upgrade=None,
        **kw,  # type: ignore[arg-type]
    )


def test_forwarding_headers_on_a_tls_listener() -> None:
    head = _head(peer_trusted=False, proto=b"https", client_cert=b'Hash=ab;Subject="CN=c"')
    # RFC 7239 §5.4 proto= is the scheme of the client's hop; clients cannot inject XFCC.
    assert b"x-forwarded-proto: https\r\n" in head
    assert b"proto=https;host=api.test" in head
    assert head.count(b"x-forwarded-client-cert") == 1
    assert b'x-forwarded-client-cert: Hash=ab;Subject="CN=c"\r\n' in head
    plain = _head(peer_trusted=False)
    assert b"x-forwarded-proto: http\r\n" in plain and b"forged" not in plain


def test_trusted_proxy_client_cert_is_kept_and_ours_appended() -> None:
    head = _head(peer_trusted=True, proto=b"https", client_cert=b"Hash=ours")
    assert b"x-forwarded-client-cert: Hash=forged,Hash=ours\r\n" in head
    assert b"x-forwarded-proto: http\r\n" in head  # the trusted proxy's own scheme is kept


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [("api.test", "api.test", True), ("api.test", "", False), ("*.w.test", "a.w.test", True),
     ("*.w.test", "a.b.w.test", False), ("*.w.test", "w.test", False)],
)  # fmt: skip
def test_sni_matches(pattern: str, name: str, matches: bool) -> None:
    assert sni_matches(pattern, name) is matches


def test_route_match_on_sni() -> None:
    config = load_config_text(
        "upstreams: {u: {instances: [127.0.0.1:1]}}\n"
        "routes:\n"
        "  - {name: tls-only, upstream: u, match: {sni: '*.w.test', path: {prefix: /}}}\n"
        "  - {name: any, upstream: u}\n"
    )
    table = RouteTable(config.routes)
    assert isinstance(config.routes[0], RouteConfig)
    found = table.match("GET", "x", "/", "", [], "a.w.test")
    assert found is not None and found.name == "tls-only"
    found = table.match("GET", "x", "/", "", [])
    assert found is not None and found.name == "any"  # plaintext: no SNI, never matches sni
