"""CPU cost of filter chains per request, without a data plane.

Each case builds the chain a config would (``gateway.filters.registry``) and runs the hooks a
request of that route goes through: ``on_request_headers``, then ``on_response_headers`` and
``on_response_body`` when the chain wants them, on the api.py objects. The figures are µs of
CPU per request (``time.process_time``), the loop and the fresh RequestInfo/ResponseInfo and
header lists included (the data plane builds those once per request for routes with filters);
``RequestInfo only`` is that allocation alone and ``no filters`` the falsy-dict test a route
without filters pays.

    python -m loadtest.bench_filters [--seconds 0.5] [--only jwt]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.config import load_config
from gateway.filters.api import RequestInfo, ResponseInfo
from gateway.filters.base import Filter
from gateway.filters.chain import Chain
from gateway.filters.registry import build_filters

BASE_HEADERS = [
    (b"host", b"api.example"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, br, zstd"),
]
RESPONSE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"4096"),
    (b"etag", b'"abc"'),
]
BODY = (b'{"id": 12345, "name": "a typical json document", "tags": ["x", "y", "z"]}\n' * 64)[:4096]


class EmptyFilter(Filter):
    name = "empty"

    def on_request_headers(self, request: RequestInfo) -> None:
        return None


def _resume(_: object) -> None:
    raise AssertionError("a benchmark chain suspended")


def _time(run: Callable[[], None], seconds: float) -> float:
    """µs of CPU per call of ``run`` (repeated for about ``seconds``)."""
    n = 1000
    while True:
        start = time.process_time()
        for _ in range(n):
            run()
        elapsed = time.process_time() - start
        if elapsed >= seconds:
            return elapsed / n * 1e6
        n *= max(2, int(seconds / max(elapsed, 1e-6) * 1.2))


def _request(extra: list[tuple[bytes, bytes]]) -> RequestInfo:
    return RequestInfo(
        method="GET",
        path="/v1/items",
        query="",
        host="api.example",
        headers=[*BASE_HEADERS, *extra],
        client_ip="10.1.2.3",
        route="bench",
        request_id="0123456789abcdef-1",
    )


def _case(chain: Chain | None, extra: list[tuple[bytes, bytes]], body: bool) -> Callable[[], None]:
    if chain is None:
        filters: dict[str, Chain] = {}

        def no_filters() -> None:
            if filters:  # what the data plane does for a route without filters
                raise AssertionError

        return no_filters

    def run() -> None:
        request = _request(extra)
        if chain.on_request_headers(request, _resume) is not None:
            raise AssertionError("refused")
        if chain.wants_response_headers:
            response = ResponseInfo(request, 200, list(RESPONSE_HEADERS))
            chain.on_response_headers(response)
            if body and chain.wants_response_body:
                chain.on_response_body(response, BODY, False)
                chain.on_response_body(response, b"", True)

    return run


def _keys(directory: Path) -> dict[str, tuple[str, object]]:
    """alg -> (kid, private key); writes their JWKS to directory/jwks.json."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    jwks = {
        "keys": [
            {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "rs"},
            {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "es"},
            {**OKPAlgorithm.to_jwk(ed_key.public_key(), as_dict=True), "kid": "ed"},
        ]
    }
    (directory / "jwks.json").write_text(json.dumps(jwks))
    return {"RS256": ("rs", rsa_key), "ES256": ("es", ec_key), "EdDSA": ("ed", ed_key)}


def _token(alg: str, key: object, kid: str | None) -> bytes:
    claims = {
        "iss": "https://issuer.example",
        "aud": "api",
        "sub": "u1",
        "exp": int(time.time()) + 3600,
    }
    headers = {"kid": kid} if kid else None
    return b"Bearer " + jwt.encode(claims, key, algorithm=alg, headers=headers).encode()  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="CPU time per case")
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        keys = _keys(directory)
        secret = "bench-secret-bench-secret-bench-secret"
        api_key = "bench-api-key"
        import hashlib

        digest = hashlib.sha256(api_key.encode()).hexdigest()
        entries: list[tuple[str, str | None, list[tuple[bytes, bytes]], bool]] = [
            (
                "headers: {request: {set: {x-a: b, x-client: '{client_ip}'}},"
                " response: {set: {x-s: g}}}",
                "headers (2 set + 1 response set)",
                [],
                False,
            ),
            (
                "cors: {allow_origins: [https://app.example]}",
                "cors (actual request)",
                [(b"origin", b"https://app.example")],
                False,
            ),
            (
                f"api_key: {{keys: {{alice: 'sha256:{digest}'}}}}",
                "api_key",
                [(b"x-api-key", api_key.encode())],
                False,
            ),
            ("ip_filter: {allow: [10.0.0.0/8]}", "ip_filter", [], False),
            (
                f"jwt: {{secret: {secret}, algorithms: [HS256], audiences: [api]}}",
                "jwt HS256",
                [(b"authorization", _token("HS256", secret, None))],
                False,
            ),
        ]
        entries += [
            ("tracing: {sample_rate: 0.1}", "tracing (new trace)", [], False),
            (
                "tracing: {}",
                "tracing (continued traceparent)",
                [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
                False,
            ),
            (
                "traffic_split: {upstreams: {bench: 95, canary: 5}}",
                "traffic_split (random)",
                [],
                False,
            ),
            (
                "traffic_split: {upstreams: {bench: 95, canary: 5}, sticky: 'header:x-user'}",
                "traffic_split (sticky header)",
                [(b"x-user", b"user-12345")],
                False,
            ),
        ]
        for alg, (kid, key) in keys.items():
            entries.append(
                (
                    "jwt: {jwks_file: jwks.json, audiences: [api]}",
                    f"jwt {alg}",
                    [(b"authorization", _token(alg, key, kid))],
                    False,
                )
            )
        for coding in ("gzip", "br", "zstd"):
            entries.append(
                (
                    f"compress: {{algorithms: [{coding}]}}",
                    f"compress {coding} (4 KiB JSON body)",
                    [],
                    True,
                )
            )
        entries.append(("compress: {}", "compress, headers only (image/png: skipped)", [], False))

        config = directory / "gw.yaml"
        cases: list[tuple[str, Chain | None, list[tuple[bytes, bytes]], bool]] = [
            ("no filters", None, [], False),
            ("empty filter", Chain("bench", [EmptyFilter()]), [], False),
            ("two empty filters", Chain("bench", [EmptyFilter(), EmptyFilter()]), [], False),
        ]
        for text, label, extra, body in entries:
            config.write_text(
                "upstreams:\n  bench: {instances: [127.0.0.1:9]}\n"
                "  canary: {instances: [127.0.0.1:9]}\n"
                f"filters:\n  - {text}\n"
            )
            items = build_filters(load_config(config, require_routes=False).filters)
            cases.append((label or text, Chain("bench", items), extra, body))

        # The same tokens with the verified-token cache emptied before every request: the cost
        # of a token's first request (signature check, claims).
        for label, chain, extra, body in list(cases):
            if label.startswith("jwt"):
                cases.append((f"{label}, first sight (uncached)", chain, extra, body))

        baseline = _time(lambda: _request([]) and None, args.seconds)
        print(f"{'RequestInfo only':<48} {baseline:8.2f} µs")
        for label, chain, extra, body in cases:
            if args.only and args.only not in label:
                continue
            if label.startswith("compress, headers only"):
                global RESPONSE_HEADERS
                saved = RESPONSE_HEADERS
                RESPONSE_HEADERS = [(b"content-type", b"image/png"), (b"content-length", b"4096")]
                cost = _time(_case(chain, extra, body), args.seconds)
                RESPONSE_HEADERS = saved
            elif label.endswith("(uncached)"):
                assert chain is not None
                (item,) = chain.filters
                run = _case(chain, extra, body)

                def uncached(run: Callable[[], None] = run, item: Filter = item) -> None:
                    item._verified.clear()  # type: ignore[attr-defined]
                    run()

                cost = _time(uncached, args.seconds)
            else:
                cost = _time(_case(chain, extra, body), args.seconds)
            extra_cost = "" if chain is None else f"  ({cost - baseline:+.2f} over RequestInfo)"
            print(f"{label:<48} {cost:8.2f} µs{extra_cost}")


if __name__ == "__main__":
    main()
