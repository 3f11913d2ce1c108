"""Certificate rotation: SIGHUP-free reloads (POST /admin/reload) swap certificates for new
handshakes while open connections (a WebSocket) stay up and no request fails; unusable
certificates (missing, mismatched key, expired) are refused by ``gateway check`` and by a
reload, and change nothing."""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.integration.backends import AppBackend
from tests.integration.conftest import ROOT, GatewayProcess, free_ports
from tests.integration.test_reload import admin_json
from tests.integration.tls_support import CertFiles, s_client, tls_get


def serial_seen(port: int, context: ssl.SSLContext) -> str:
    status, _, facts = tls_get(port, "api.test", context, path="/name")
    assert status == 200
    return str(facts["peer"]["serialNumber"])


def install(source: tuple[Path, Path], target: tuple[Path, Path]) -> None:
    """Replace cert and key files the way a rotation tool does (write aside, rename)."""
    for src, dst in zip(source, target, strict=True):
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


@pytest.fixture
def rotation(tmp_path: Path, app_backend: AppBackend, start_gateway: Any) -> Any:
    def start(workers: int) -> tuple[GatewayProcess, CertFiles, tuple[Path, Path], int]:
        certs = CertFiles(tmp_path)
        first = certs.issue("api-v1", "api.test")
        live = (tmp_path / "live.pem", tmp_path / "live.key")
        install(first, live)
        (port,) = free_ports(1)
        gateway = start_gateway(
            {
                "workers": workers,
                "listen": [
                    f"127.0.0.1:{free_ports(1)[0]}",
                    {
                        "address": f"127.0.0.1:{port}",
                        "name": "https",
                        "tls": {"certificates": [{"cert": str(live[0]), "key": str(live[1])}]},
                    },
                ],
                "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
                "routes": [{"name": "all", "upstream": "app"}],
            }
        )
        return gateway, certs, live, port

    return start


def relink(gateway: GatewayProcess, live: tuple[Path, Path]) -> None:
    """Point the config at ``live`` by absolute path (used by the refusal steps)."""
    config = yaml.safe_load(gateway.config_path.read_text())
    config["listen"][1]["tls"]["certificates"] = [{"cert": str(live[0]), "key": str(live[1])}]
    gateway.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.mark.parametrize("workers", [1, 2])
async def test_rotation_under_load_keeps_connections_and_fails_nothing(
    rotation: Any, workers: int, tmp_path: Path
) -> None:
    gateway, certs, live, port = rotation(workers)
    context = certs.client_context()
    old_serial = await asyncio.to_thread(serial_seen, port, context)
    ticket_file = tmp_path / "session.pem"
    request = b"GET /name HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n"
    resume = ["-servername", "api.test", "-tls1_3"]
    first = await asyncio.to_thread(
        s_client, port, *resume, "-sess_out", str(ticket_file), request=request
    )
    assert "New, TLSv1.3" in first

    failures: list[str] = []
    serials: set[str] = set()
    done = threading.Event()

    def load() -> None:  # light load: one new TLS connection and request after another
        while not done.is_set():
            try:
                serials.add(serial_seen(port, context))
            except (OSError, AssertionError) as error:
                failures.append(repr(error))

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"https://127.0.0.1:{port}/ws",
            ssl=context,
            server_hostname="api.test",
            headers={"Host": "api.test"},  # another Host than the SNI name would get a 421
        ) as ws,
    ):
        await ws.send_str("before")
        assert (await ws.receive(timeout=10)).data == "echo:before"

        install(certs.issue("api-v2", "api.test"), live)
        code, result = await asyncio.to_thread(admin_json, gateway, "/admin/reload", "POST")
        assert code == 200 and result["result"] == "success", result
        new_serial = await asyncio.to_thread(serial_seen, port, context)
        assert new_serial != old_serial  # the reload answered: every worker has it

        await ws.send_str("after")  # the tunnel opened before the swap is still up
        assert (await ws.receive(timeout=10)).data == "echo:after"
        if workers == 1:  # tickets are per process: with 2 workers the kernel picks one
            again = await asyncio.to_thread(
                s_client, port, *resume, "-sess_in", str(ticket_file), request=request
            )
            assert "Reused, TLSv1.3" in again  # a ticket from before the reload resumes
    done.set()
    await asyncio.to_thread(loader.join, 20)
    assert failures == []
    assert {old_serial, new_serial} <= serials


def write_bad(kind: str, certs: CertFiles, directory: Path) -> tuple[Path, Path]:
    if kind == "missing":
        return directory / "absent.pem", directory / "absent.key"
    if kind == "mismatched":
        cert, _ = certs.issue("half-a", "api.test")
        _, key = certs.issue("half-b", "api.test")
        return cert, key
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    return certs.issue("expired", "api.test", not_before=past, not_after=past)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "cannot read cert file"),
        ("mismatched", "does not belong to"),
        ("expired", "expired on 2001-01-01"),
    ],
)
def test_unusable_certificates_are_refused_by_reload_and_check(
    rotation: Any, kind: str, message: str, tmp_path: Path
) -> None:
    gateway, certs, _live, port = rotation(1)
    context = certs.client_context()
    serial = serial_seen(port, context)
    relink(gateway, write_bad(kind, certs, tmp_path))
    code, result = admin_json(gateway, "/admin/reload", "POST")
    assert code == 400 and result["result"] == "error", result
    errors = result["errors"]
    assert any(message in error for error in errors), errors
    for error in errors:  # file:line: key — the line of the listener's certificates entry
        assert error.startswith(f"{gateway.config_path}:")
        assert "listen[1].tls.certificates[0]." in error
    assert serial_seen(port, context) == serial  # nothing changed

    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(gateway.config_path), "--strict"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 1
    assert message in check.stderr
    if kind == "expired":  # a warning in check (--strict fails on it), an error on reload
        assert ": warning: " in check.stderr


async def test_reloaded_client_ca_applies_to_new_handshakes(tmp_path: Path) -> None:
    """client_auth.ca rotation: OpenSSL reads the verify mode from the context a handshake
    started with and the CA store from the one SNI switched to; both follow a reload."""
    import trustme

    from gateway.config import load_config_text
    from gateway.tls.certs import check_tls_files
    from gateway.tls.contexts import ServerTLS, build_store

    server_ca, ca_a, ca_b = trustme.CA(), trustme.CA(), trustme.CA()
    leaf = server_ca.issue_cert("api.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "s.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "s.key"))
    ca_a.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = (
        "listen:\n  - address: 127.0.0.1:0\n    tls:\n"
        "      certificates: [{cert: s.pem, key: s.key}]\n"
        "      client_auth: {ca: ca.pem, mode: require}\nroutes: []\n"
    )

    def load() -> tuple[Any, dict[str, bytes]]:
        config = load_config_text(text, str(tmp_path / "gateway.yaml"))
        return config.all_listeners[0].tls, check_tls_files(config, text).files

    settings, files = load()
    tls = ServerTLS("x", settings, files, str(tmp_path / "gateway.yaml"))

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            transport.write(b"ok")
            transport.close()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Answer, "127.0.0.1", 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]

    async def accepted(client_ca: trustme.CA) -> bool:
        context = ssl.create_default_context()
        server_ca.configure_trust(context)
        client_ca.issue_cert("client.test").configure_cert(context)
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="api.test"
            )
            data = await reader.read()
            writer.close()
        except (OSError, ssl.SSLError):
            return False
        return data == b"ok"

    try:
        assert await accepted(ca_a) and not await accepted(ca_b)
        ca_b.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        settings, files = load()
        tls.update(settings, build_store(settings, files, str(tmp_path / "gateway.yaml")))
        assert await accepted(ca_b) and not await accepted(ca_a)
    finally:
        server.close()


def test_watch_applies_replaced_certificate_files(
    tmp_path: Path, app_backend: AppBackend, start_gateway: Any
) -> None:
    certs = CertFiles(tmp_path)
    live = (tmp_path / "live.pem", tmp_path / "live.key")
    install(certs.issue("v1", "api.test"), live)
    (port,) = free_ports(1)
    gateway = start_gateway(
        {
            "watch": True,
            "listen": [
                {
                    "address": f"127.0.0.1:{port}",
                    "tls": {"certificates": [{"cert": str(live[0]), "key": str(live[1])}]},
                }
            ],
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "all", "upstream": "app"}],
        }
    )
    context = certs.client_context()
    old = serial_seen(port, context)
    install(certs.issue("v2", "api.test"), live)  # no reload call: the watcher sees it
    deadline = time.monotonic() + 15
    while serial_seen(port, context) == old:
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.1)
    assert "config reloaded (certificate change" in gateway.log()
