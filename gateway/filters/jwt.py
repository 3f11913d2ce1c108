"""``jwt``: requests must carry a valid JWT (RFC 7519) as a bearer token (RFC 6750).

Signatures are checked with PyJWT: HS256/384/512 with a shared ``secret``, RS*/PS*/ES*/EdDSA
with keys from a JWKS (RFC 7517) ``jwks_file`` or ``jwks_url``. Then ``iss``, ``aud``, ``exp``
and ``nbf`` (with ``leeway``), the required claims and the required scopes.

A ``jwks_url`` is fetched by the control plane, once for the whole gateway
(``gateway.filters.jwks``: the supervisor with ``workers: N``, pushed to every worker), never
on a request's critical path except when a token names a key id this process has not seen:
that request waits for one refresh (shared by every request that arrives meanwhile, at most
one ask per ``jwks_min_refresh`` per process and one fetch per ``jwks_min_refresh`` for the
gateway), the others are checked synchronously. Keys older than ``jwks_cache_ttl`` are
refetched in the background while the cached ones stay in use.

Failures answer as RFC 6750 §3 says: no token -> 401 with a bare ``Bearer realm=...``
challenge; a malformed Authorization header -> 400 ``invalid_request``; a bad, expired or
unverifiable token -> 401 ``invalid_token``; missing scopes -> 403 ``insufficient_scope``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt as pyjwt

from gateway.filters.base import Filter, LocalReply, Pending, RequestInfo
from gateway.filters.jwks import STORE, JwksSettings, parse_jwks

__all__ = ["JwtFilter", "parse_jwks"]

log = logging.getLogger("gateway.filters.jwt")

_CACHE_ENTRIES = 4096  # verified tokens remembered per filter (16-byte digests as keys)
_UNSAFE_DESCRIPTION = re.compile(r"[^\x20\x21\x23-\x5B\x5D-\x7E]")  # RFC 6750 §3 error_description


def _read_jwks_file(path: str) -> dict[str | None, pyjwt.PyJWK]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    try:
        return parse_jwks(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


class JwtFilter(Filter):
    name = "jwt"

    @classmethod
    def validate_config(cls, options: Mapping[str, Any]) -> list[str]:
        path = options.get("jwks_file")
        if path is not None:
            try:
                _read_jwks_file(path)
            except ValueError as exc:
                return [f"jwks_file: {exc}"]
        return []

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        issuer = options.get("issuer")
        self.issuer: str | list[str] | None = (
            list(issuer) if isinstance(issuer, tuple | list) else issuer
        )
        audiences = options.get("audiences")
        self.audiences: list[str] | None = list(audiences) if audiences else None
        self.algorithms = list(options.get("algorithms") or ("RS256", "ES256", "EdDSA"))
        self.leeway = float(options.get("leeway", 30.0))
        self.required = list(options.get("required_claims") or ())
        self.scopes = tuple(options.get("scopes") or ())
        self.claims_to_headers = [
            (claim, header.encode("ascii"))
            for claim, header in options.get("claims_to_headers") or ()
        ]
        self.header = options.get("header", "authorization").encode("ascii")
        self.forward_token = bool(options.get("forward_token", True))
        self.realm = options.get("realm", "gateway")
        self.decode_options: dict[str, Any] = {
            "require": self.required,
            "verify_aud": self.audiences is not None,
        }
        secret = options.get("secret")
        self.secret: bytes | None = secret.encode("utf-8") if secret is not None else None
        self.file_keys: dict[str | None, pyjwt.PyJWK] = {}
        if options.get("jwks_file"):
            self.file_keys = _read_jwks_file(options["jwks_file"])
        self.url: str | None = options.get("jwks_url")
        self.jwks = JwksSettings(
            min_refresh=float(options.get("jwks_min_refresh", 30.0)),
            cache_ttl=float(options.get("jwks_cache_ttl", 600.0)),
            timeout=float(options.get("jwks_timeout", 5.0)),
        )
        if self.url is not None:
            STORE.watch(self.url, self.jwks)  # keys asked for now, not at the first request
        # digest of a verified token -> (claims, valid until, valid from), unix time
        self._verified: dict[bytes, tuple[dict[str, Any], float, float]] = {}

    # --- request hook ---------------------------------------------------------------------

    def on_request_headers(self, request: RequestInfo) -> LocalReply | Pending | None:
        value = None
        for name, field_value in request.headers:
            if name == self.header:
                value = field_value
                break
        if value is None:
            return self._challenge(401)
        scheme, _, token_bytes = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return self._challenge(401)  # another scheme: no bearer token was offered
        token_bytes = token_bytes.strip()
        if not token_bytes or b" " in token_bytes:
            return self._challenge(400, "invalid_request", "malformed Authorization header")
        cache_key = hashlib.blake2b(token_bytes, digest_size=16).digest()
        cached = self._verified.get(cache_key)
        if cached is not None:
            claims, not_after, not_before = cached
            now = time.time()
            if now <= not_after and now >= not_before:
                self._accept(request, claims)
                return None
            del self._verified[cache_key]  # expired (or not yet valid): the full check says so
        token = token_bytes.decode("latin-1")
        try:
            header = pyjwt.get_unverified_header(token)
        except pyjwt.InvalidTokenError:
            return self._challenge(401, "invalid_token", "malformed token")
        alg = header.get("alg")
        if alg not in self.algorithms:
            return self._challenge(401, "invalid_token", "signature algorithm not accepted")
        kid = header.get("kid")
        key = self._key_for(kid)
        url = self.url
        if url is not None:
            if key is None:
                if STORE.refresh(url, self.jwks, unknown_kid=True):
                    return Pending(self._verify_after_refresh(request, token, kid))
                return self._challenge(401, "invalid_token", "unknown key id")
            if time.monotonic() - STORE.fetched_at(url) >= self.jwks.cache_ttl:
                # Stale keys: refetched in the background, used meanwhile.
                STORE.refresh(url, self.jwks, unknown_kid=False)
        if key is None:
            return self._challenge(401, "invalid_token", "unknown key id")
        return self._verify(request, token, key)

    @property
    def keys(self) -> dict[str | None, pyjwt.PyJWK]:
        """The keys tokens are checked with: the jwks_url's as last fetched, or jwks_file's."""
        if self.url is not None:
            return STORE.keys(self.url) or {}
        return self.file_keys

    def _key_for(self, kid: object) -> Any:
        if self.secret is not None:
            return self.secret
        keys = self.keys
        found = keys.get(kid) if isinstance(kid, str) or kid is None else None
        if found is None and kid is None and len(keys) == 1:
            found = next(iter(keys.values()))  # a JWKS of one key need not name it
        return found.key if found is not None else None

    def _verify(self, request: RequestInfo, token: str, key: Any) -> LocalReply | None:
        try:
            claims = pyjwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.audiences,
                issuer=self.issuer,
                leeway=self.leeway,
                options=self.decode_options,  # type: ignore[arg-type]
            )
        except pyjwt.ExpiredSignatureError:
            return self._challenge(401, "invalid_token", "the token expired")
        except pyjwt.ImmatureSignatureError:
            return self._challenge(401, "invalid_token", "the token is not valid yet")
        except pyjwt.InvalidAudienceError:
            return self._challenge(401, "invalid_token", "wrong audience")
        except pyjwt.InvalidIssuerError:
            return self._challenge(401, "invalid_token", "wrong issuer")
        except pyjwt.MissingRequiredClaimError as exc:
            return self._challenge(401, "invalid_token", f"missing claim {exc.claim}")
        except pyjwt.InvalidSignatureError:
            return self._challenge(401, "invalid_token", "bad signature")
        except pyjwt.InvalidTokenError:
            return self._challenge(401, "invalid_token", "invalid token")
        except (TypeError, ValueError, pyjwt.InvalidKeyError):
            # The kid names a key of another type than the alg (an RSA alg on an EC key).
            return self._challenge(401, "invalid_token", "the key does not fit the algorithm")
        if self.scopes:
            granted = _granted_scopes(claims)
            if not all(scope in granted for scope in self.scopes):
                return self._challenge(
                    403,
                    "insufficient_scope",
                    "the token lacks a required scope",
                    " ".join(self.scopes),
                )
        self._remember(token, claims)
        self._accept(request, claims)
        return None

    def _remember(self, token: str, claims: dict[str, Any]) -> None:
        """Cache a verified token until its exp (plus leeway): the signature check is most of
        the cost, and clients send the same token many times."""
        if len(self._verified) >= _CACHE_ENTRIES:
            self._verified.pop(next(iter(self._verified)))  # the oldest entry
        exp, nbf = claims.get("exp"), claims.get("nbf")
        not_after = float(exp) + self.leeway if isinstance(exp, int | float) else float("inf")
        not_before = float(nbf) - self.leeway if isinstance(nbf, int | float) else -float("inf")
        key = hashlib.blake2b(token.encode("latin-1"), digest_size=16).digest()
        self._verified[key] = (claims, not_after, not_before)

    def _accept(self, request: RequestInfo, claims: dict[str, Any]) -> None:
        request.vars["jwt_claims"] = dict(claims)  # a copy: the cached one is shared
        headers = request.headers
        if self.claims_to_headers or not self.forward_token:
            drop = {header for _, header in self.claims_to_headers}
            if not self.forward_token:
                drop.add(self.header)
            headers[:] = [item for item in headers if item[0] not in drop]
            for claim, header in self.claims_to_headers:
                value = claims.get(claim)
                if value is None:
                    continue
                text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
                headers.append((header, re.sub(r"[\r\n\x00]", " ", text).encode("utf-8")))

    def _challenge(
        self,
        status: int,
        error: str | None = None,
        description: str | None = None,
        scope: str | None = None,
    ) -> LocalReply:
        params = [f'realm="{self.realm}"']
        if error is not None:
            params.append(f'error="{error}"')
        if description is not None:
            params.append(f'error_description="{_UNSAFE_DESCRIPTION.sub("", description)}"')
        if scope is not None:
            params.append(f'scope="{scope}"')
        challenge = ("Bearer " + ", ".join(params)).encode("latin-1")
        body = (description or "a bearer token is required") + "\n"
        return LocalReply(
            status,
            [(b"www-authenticate", challenge), (b"content-type", b"text/plain; charset=utf-8")],
            body.encode("utf-8"),
        )

    # --- JWKS fetching ------------------------------------------------------------------

    async def _verify_after_refresh(
        self, request: RequestInfo, token: str, kid: object
    ) -> LocalReply | None:
        assert self.url is not None
        await STORE.wait(self.url)
        key = self._key_for(kid)
        if key is None:
            return self._challenge(401, "invalid_token", "unknown key id")
        return self._verify(request, token, key)


def _granted_scopes(claims: Mapping[str, Any]) -> set[str]:
    granted: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(str(v) for v in value)
    return granted
