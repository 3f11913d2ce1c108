"""CPU cost of filter chains per request, without a data plane.

Each case builds the chain a config would (``gateway.filters.registry``) and runs the hooks a
request of that route goes through: ``on_request_headers``, then ``on_response_headers`` and
``on_response_body`` when the chain wants them, on the api.py objects. The figures are µs of
CPU per request (``time.process_time``), the loop and the fresh RequestInfo/ResponseInfo and
header lists included (the data plane builds those once per request for routes with filters);
``RequestInfo only`` is that allocation alone and ``no filters`` the falsy-dict test a route
without filters pays.

The ``export`` cases measure the tracing filter's span export: the hot-path cost of
``on_log`` recording a span (lean exporter), the background cost per span of encoding a
512-span batch to OTLP JSON, and, when ``opentelemetry-sdk`` is importable (it is not a
dependency), the same span made with the SDK's tracer and ``BatchSpanProcessor``.

    python -m loadtest.bench_filters [--seconds 0.5] [--only jwt]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    if not args.only or args.only in "export":
        bench_export(args.seconds)


def bench_export(seconds: float) -> None:
    """µs per request of span export: lean exporter vs opentelemetry-sdk, if installed."""
    from gateway.filters.otlp import encode_spans
    from gateway.filters.tracing import TracingFilter

    parent = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    plain = Chain("bench", [TracingFilter({})])
    item = TracingFilter({"export": {"endpoint": "http://127.0.0.1:9/v1/traces"}})
    exporter = item.exporter
    assert exporter is not None
    exporter.queue_size = 1 << 30  # measure recording, not dropping; emptied as it goes
    exported = Chain("bench", [item])

    # What the data plane gives on_log for a request answered on its first try (one attempt
    # span); skipped where RequestInfo has no attempts (older code, for before/after runs).
    now = time.perf_counter()
    tries = (("10.0.0.1:8080", now - 0.0008, now - 0.0001, "", ""),)
    with_tries = "attempts" in RequestInfo.__slots__

    def traced(chain: Chain) -> Callable[[], None]:
        def run() -> None:
            request = _request(parent)
            chain.on_request_headers(request, _resume)
            if with_tries:
                request.attempts = tries  # type: ignore[attr-defined,unused-ignore]
            chain.on_log(request, 200, 0.001)
            if len(exporter.queue) >= 4096:
                exporter.queue.clear()

        return run

    without = _time(traced(plain), seconds)
    with_export = _time(traced(exported), seconds)
    print(f"{'export: tracing, no export':<48} {without:8.2f} µs")
    print(
        f"{'export: lean, on_log records the span':<48} {with_export:8.2f} µs"
        f"  ({with_export - without:+.2f} hot path)"
    )
    request = _request(parent)
    exported.on_request_headers(request, _resume)
    if with_tries:
        request.attempts = tries  # type: ignore[attr-defined,unused-ignore]
    exporter.queue.clear()
    exported.on_log(request, 200, 0.001)
    recorded = list(exporter.queue)  # the gateway span, and its attempt span if any
    batch = (recorded * (512 // len(recorded)))[:512]

    def encode() -> None:
        encode_spans(batch, "gateway")

    per_batch = _time(encode, seconds)
    print(f"{'export: lean, JSON encoding (background)':<48} {per_batch / 512:8.2f} µs/span")
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace import export as sdk_export
    except ImportError:
        print("export: opentelemetry-sdk not installed (pip install opentelemetry-sdk)")
        return
    _bench_sdk(trace, TracerProvider, sdk_export, plain, parent, without, seconds)


def _bench_sdk(
    trace: Any,
    provider_class: Any,
    sdk_export: Any,
    plain: Chain,
    parent: list[tuple[bytes, bytes]],
    without: float,
    seconds: float,
) -> None:
    """The same span through opentelemetry-sdk: tracer + BatchSpanProcessor (hot path), and
    its protobuf encoder (background), if opentelemetry-exporter-otlp-proto-common is there."""
    collected: list[Any] = []

    class Keep(sdk_export.SpanExporter):  # type: ignore[misc]
        def __init__(self, keep: bool) -> None:
            self.keep = keep

        def export(self, spans: Any) -> Any:
            if self.keep:
                collected.extend(spans)
            return sdk_export.SpanExportResult.SUCCESS

    provider = provider_class()
    processor = sdk_export.BatchSpanProcessor(
        Keep(False), max_queue_size=4096, max_export_batch_size=512
    )
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("gateway")
    remote = trace.set_span_in_context(
        trace.NonRecordingSpan(
            trace.SpanContext(
                0x4BF92F3577B34DA6A3CE929D0E0E4736,
                0x00F067AA0BA902B7,
                is_remote=True,
                trace_flags=trace.TraceFlags(1),
            )
        )
    )

    def span_of(tracer: Any, request: RequestInfo, status: int) -> None:
        end = time.time_ns()
        span = tracer.start_span(
            f"{request.method} {request.route}",
            context=remote,
            kind=trace.SpanKind.SERVER,
            start_time=end - 1_000_000,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "http.route": request.route,
                "server.address": request.host,
                "client.address": request.client_ip,
                "http.response.status_code": status,
            },
        )
        span.end(end)

    def sdk() -> None:
        request = _request(parent)
        plain.on_request_headers(request, _resume)
        span_of(tracer, request, 200)

    sdk_cost = _time(sdk, seconds)
    print(
        f"{'export: opentelemetry-sdk BatchSpanProcessor':<48} {sdk_cost:8.2f} µs"
        f"  ({sdk_cost - without:+.2f} hot path)"
    )
    processor.shutdown()
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    except ImportError:
        return
    keeper = provider_class()
    keeper.add_span_processor(sdk_export.SimpleSpanProcessor(Keep(True)))
    keep_tracer = keeper.get_tracer("gateway")
    for _ in range(512):
        span_of(keep_tracer, _request(parent), 200)

    def encode() -> None:
        encode_spans(collected).SerializeToString()

    encoded = _time(encode, seconds)
    print(f"{'export: opentelemetry protobuf encoding (bg)':<48} {encoded / 512:8.2f} µs/span")


if __name__ == "__main__":
    main()
