"""The jwt filter with real keys and signatures (PyJWT + cryptography): HS256, RS256, ES256
and EdDSA; iss/aud/exp/nbf with leeway; required claims and scopes; claims to headers; RFC 6750
challenges; and a jwks_url served by a local aiohttp server (fetch, cache, refetch on an
unknown kid, rate limited)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.config import ConfigInvalid, load_config
from gateway.filters.api import SUSPENDED, LocalReply
from gateway.filters.chain import Chain
from gateway.filters.jwks import STORE
from gateway.filters.registry import build_filters
from tests.filters_support import filter_from_yaml, header, reply_of, request

ISSUER, AUDIENCE = "https://issuer.example", "api"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def _jwk(kid: str, alg: str) -> dict[str, Any]:
    if alg == "RS256":
        data = RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)
    elif alg == "ES256":
        data = ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(ED_KEY.public_key(), as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


JWKS = {"keys": [_jwk("rsa-1", "RS256"), _jwk("ec-1", "ES256"), _jwk("ed-1", "EdDSA")]}
PRIVATE = {"RS256": RSA_KEY, "ES256": EC_KEY, "EdDSA": ED_KEY}
KIDS = {"RS256": "rsa-1", "ES256": "ec-1", "EdDSA": "ed-1"}


def token(alg: str = "RS256", kid: str | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    if alg.startswith("HS"):
        return jwt.encode(payload, "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t", algorithm=alg)
    return jwt.encode(payload, PRIVATE[alg], algorithm=alg, headers={"kid": kid or KIDS[alg]})


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(JWKS))
    return path


def jwt_filter(tmp_path: Path, options: str) -> Any:
    config = tmp_path / "gw.yaml"
    config.write_text(f"filters:\n  - jwt: {options}\n")
    (item,) = build_filters(load_config(config, require_routes=False).filters)
    return item


def bearer(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + value.encode())]


BASE = f"{{issuer: '{ISSUER}', audiences: [api], jwks_file: jwks.json, leeway: 5s"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_valid_tokens_pass_with_claims_in_vars(tmp_path: Path, jwks_file: Path, alg: str) -> None:
    item = jwt_filter(tmp_path, BASE + "}")
    req = request(headers=bearer(token(alg)))
    assert item.on_request_headers(req) is None
    assert req.vars["jwt_claims"]["sub"] == "user-1"


def test_hs256_with_a_secret(tmp_path: Path) -> None:
    item = jwt_filter(
        tmp_path,
        "{secret: s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t, algorithms: [HS256], audiences: [api]}",
    )
    assert item.on_request_headers(request(headers=bearer(token("HS256")))) is None
    forged = jwt.encode({"aud": "api"}, "another-secret-another-secret-12", algorithm="HS256")
    assert reply_of(item.on_request_headers(request(headers=bearer(forged)))).status == 401


# Times relative to the moment of the request ("now"), so the table does not age.
NOW = 0


@pytest.mark.parametrize(
    ("claims", "status", "description"),
    [
        ({"exp": NOW - 60}, 401, b"the token expired"),
        ({"exp": NOW - 2}, None, None),  # within the 5s leeway
        ({"nbf": NOW + 60}, 401, b"the token is not valid yet"),
        ({"nbf": NOW + 2}, None, None),
        ({"iss": "https://other.example"}, 401, b"wrong issuer"),
        ({"aud": "other"}, 401, b"wrong audience"),
        ({"aud": ["other", "api"]}, None, None),
    ],
)
def test_registered_claims(
    tmp_path: Path,
    jwks_file: Path,
    claims: dict[str, Any],
    status: int | None,
    description: bytes | None,
) -> None:
    item = jwt_filter(tmp_path, BASE + "}")
    now = int(time.time())
    claims = {k: v + now if k in ("exp", "nbf") else v for k, v in claims.items()}
    result = item.on_request_headers(request(headers=bearer(token(**claims))))
    if status is None:
        assert result is None
        return
    reply = reply_of(result)
    assert reply.status == status
    challenge = header(reply.headers, b"www-authenticate")
    assert challenge == (
        b'Bearer realm="gateway", error="invalid_token", error_description="' + description + b'"'
    )


@pytest.mark.parametrize(
    ("headers", "status", "challenge"),
    [
        # RFC 6750 §3.1: no credentials -> no error code in the challenge.
        ([], 401, b'Bearer realm="gateway"'),
        ([(b"authorization", b"Basic dTpw")], 401, b'Bearer realm="gateway"'),
        ([(b"authorization", b"Bearer")], 400, b'Bearer realm="gateway", error="invalid_request"'),
        (
            [(b"authorization", b"Bearer a b")],
            400,
            b'Bearer realm="gateway", error="invalid_request"',
        ),
        (
            [(b"authorization", b"Bearer not.a.jwt")],
            401,
            b'Bearer realm="gateway", error="invalid_token"',
        ),
    ],
)
def test_rfc6750_challenges(
    tmp_path: Path,
    jwks_file: Path,
    headers: list[tuple[bytes, bytes]],
    status: int,
    challenge: bytes,
) -> None:
    item = jwt_filter(tmp_path, BASE + "}")
    reply = reply_of(item.on_request_headers(request(headers=headers)))
    assert reply.status == status
    value = header(reply.headers, b"www-authenticate")
    assert value is not None and value.startswith(challenge)


def test_forged_and_confused_tokens_are_refused(tmp_path: Path, jwks_file: Path) -> None:
    item = jwt_filter(tmp_path, BASE + "}")
    good = token("RS256")
    head, body, signature = good.split(".")
    tampered = f"{head}.{body[:-2]}AA.{signature}"
    unsigned = jwt.encode({"aud": "api", "iss": ISSUER}, None, algorithm="none")
    # The EC key's id on an RSA signature: the key decides, not the header.
    wrong_kid = token("RS256", kid="ec-1")
    unknown_kid = token("RS256", kid="nope")
    for bad in (tampered, unsigned, wrong_kid, unknown_kid):
        reply = reply_of(item.on_request_headers(request(headers=bearer(bad))))
        assert reply.status == 401, bad


def test_required_claims_and_scopes(tmp_path: Path, jwks_file: Path) -> None:
    item = jwt_filter(
        tmp_path, BASE + ", required_claims: [tenant], scopes: [orders:read, orders:write]}"
    )
    ok = token(tenant="t1", scope="orders:read orders:write profile")
    assert item.on_request_headers(request(headers=bearer(ok))) is None
    as_list = token(tenant="t1", scp=["orders:read", "orders:write"])
    assert item.on_request_headers(request(headers=bearer(as_list))) is None
    missing = reply_of(
        item.on_request_headers(request(headers=bearer(token(scope="orders:read orders:write"))))
    )
    assert missing.status == 401 and b"missing claim tenant" in missing.body
    scope = reply_of(
        item.on_request_headers(request(headers=bearer(token(tenant="t1", scope="orders:read"))))
    )
    assert scope.status == 403
    assert header(scope.headers, b"www-authenticate") == (
        b'Bearer realm="gateway", error="insufficient_scope",'
        b' error_description="the token lacks a required scope", scope="orders:read orders:write"'
    )


def test_claims_to_headers_replace_client_copies(tmp_path: Path, jwks_file: Path) -> None:
    item = jwt_filter(
        tmp_path, BASE + ", claims_to_headers: {sub: x-user, roles: x-roles}, forward_token: false}"
    )
    req = request(headers=[*bearer(token(roles=["a", "b"])), (b"x-user", b"admin")])
    assert item.on_request_headers(req) is None
    assert header(req.headers, b"x-user") == b"user-1"
    assert header(req.headers, b"x-roles") == b"a b"
    assert header(req.headers, b"authorization") is None


@pytest.mark.parametrize(
    ("options", "path", "message"),
    [
        ("{audiences: [api]}", "filters[0].jwt.jwks_file", "give one of secret"),
        ("{secret: x, jwks_file: jwks.json}", "filters[0].jwt.jwks_file", "give one key source"),
        ("{secret: x}", "filters[0].jwt.algorithms", "a secret verifies HS256"),
        (
            "{jwks_file: jwks.json, algorithms: [HS256]}",
            "filters[0].jwt.algorithms",
            "need a secret",
        ),
        ("{jwks_file: missing.json}", "filters[0].jwt.jwks_file", "cannot read"),
        ("{jwks_file: bad.json}", "filters[0].jwt.jwks_file", "not a JWK Set"),
        (
            "{jwks_file: jwks.json, algorithms: [none]}",
            "filters[0].jwt.algorithms[0]",
            "'none' is not",
        ),
    ],
)
def test_config_errors(
    tmp_path: Path, jwks_file: Path, options: str, path: str, message: str
) -> None:
    (tmp_path / "bad.json").write_text('{"kty": "RSA"}')
    config = tmp_path / "gw.yaml"
    config.write_text(f"filters:\n  - jwt: {options}\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(config, require_routes=False)
    (error,) = info.value.errors
    assert error.line == 2 and error.path == path and message in error.message


# --- jwks_url against a real HTTP server -----------------------------------------------------


class JwksServer:
    def __init__(self) -> None:
        self.keys: dict[str, Any] = {"keys": [_jwk("rsa-1", "RS256")]}
        self.requests = 0
        self.gate: asyncio.Event | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.gate is not None:
            await self.gate.wait()
        return web.json_response(self.keys)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    yield server
    await runner.cleanup()


async def _through_chain(chain: Chain, tok: str) -> LocalReply | None:
    done: asyncio.Future[LocalReply | None] = asyncio.get_running_loop().create_future()
    result = chain.on_request_headers(request(headers=bearer(tok)), done.set_result)
    if result is SUSPENDED:
        return await asyncio.wait_for(done, 5)
    assert result is None or isinstance(result, LocalReply)
    return result


async def test_jwks_url_fetch_cache_and_refetch_on_unknown_kid(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    item = jwt_filter(tmp_path, f"{{jwks_url: '{jwks_server.url}', jwks_min_refresh: 200ms}}")
    chain = Chain("r", [item])
    # First request: no keys yet, it waits for the fetch; the next ones are synchronous.
    assert await _through_chain(chain, token("RS256")) is None
    assert chain.on_request_headers(request(headers=bearer(token("RS256"))), lambda _: None) is None
    assert jwks_server.requests == 1
    # Rotation: a new kid appears at the issuer.
    jwks_server.keys = {"keys": [_jwk("rsa-1", "RS256"), _jwk("ec-1", "ES256")]}
    # Within jwks_min_refresh an unknown kid is refused at once (no fetch storm)...
    early = await _through_chain(chain, token("ES256"))
    assert early is not None and early.status == 401 and jwks_server.requests == 1
    # ...after it, one refetch finds the new key.
    deadline = time.monotonic() + 5
    while time.monotonic() - STORE.last_ask(item.url) < 0.2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await _through_chain(chain, token("ES256")) is None
    assert jwks_server.requests == 2


async def test_concurrent_unknown_kids_share_one_fetch(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    jwks_server.gate = asyncio.Event()
    item = jwt_filter(tmp_path, f"{{jwks_url: '{jwks_server.url}'}}")
    chain = Chain("r", [item])
    waiting = [asyncio.ensure_future(_through_chain(chain, token("RS256"))) for _ in range(5)]
    deadline = time.monotonic() + 5
    while jwks_server.requests == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    jwks_server.gate.set()
    assert await asyncio.gather(*waiting) == [None] * 5
    assert jwks_server.requests == 1


async def test_jwks_url_failure_is_a_401_not_a_crash(tmp_path: Path) -> None:
    item = jwt_filter(tmp_path, "{jwks_url: 'http://127.0.0.1:9/jwks', jwks_timeout: 1s}")
    reply = await _through_chain(Chain("r", [item]), token("RS256"))
    assert reply is not None and reply.status == 401
    assert STORE.local_fetcher is not None
    assert STORE.local_fetcher.fetches("http://127.0.0.1:9/jwks") == 1


def test_jwks_alias_takes_a_url_or_a_file(tmp_path: Path, jwks_file: Path) -> None:
    by_file = jwt_filter(tmp_path, "{jwks: jwks.json}")
    assert by_file.url is None and "rsa-1" in by_file.keys
    by_url = filter_from_yaml("jwt: {jwks: 'https://issuer.example/.well-known/jwks.json'}")
    assert by_url.url == "https://issuer.example/.well-known/jwks.json"  # type: ignore[attr-defined]


def test_a_cached_token_is_refused_once_it_expires(tmp_path: Path, jwks_file: Path) -> None:
    item = jwt_filter(tmp_path, BASE.replace("leeway: 5s", "leeway: 0s") + "}")
    short_lived = token(exp=int(time.time()) + 1)
    assert item.on_request_headers(request(headers=bearer(short_lived))) is None
    assert len(item._verified) == 1  # the second request is served from the cache
    assert item.on_request_headers(request(headers=bearer(short_lived))) is None
    deadline = time.monotonic() + 5
    while (result := item.on_request_headers(request(headers=bearer(short_lived)))) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert b"the token expired" in reply_of(result).body
    assert not item._verified
