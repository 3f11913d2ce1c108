"""Micro-benchmark of RouteTable.match: 10 routes against 10,000.

Run with ``python -m loadtest.bench_routing [--iterations N]``. It prints, per scenario,
nanoseconds per lookup for a 10-route and a 10,000-route table and their ratio. Exact and prefix
lookups are indexed, so the ratio should stay near 1. The numbers include the Python call and
loop overhead (printed as "empty call" for reference). Each cell is the best of several chunks of
lookups, so other processes on a busy machine disturb it less.

Each lookup uses its own fresh path string, as the HTTP parser hands the table a new string per
request (a reused string would carry a cached hash and flatter the exact-path case).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable

from gateway.config.model import MatchConfig, PathMatch, RouteConfig
from gateway.routing import RouteTable

Request = tuple[str, str, str, str, list[tuple[bytes, bytes]]]
Scenario = Callable[[int], tuple[list[RouteConfig], list[Request]]]

CHUNK = 10_000  # lookups per timed chunk

HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"bench"),
    (b"accept", b"*/*"),
]


def _route(name: str, kind: str, path: str, host: str | None = None) -> RouteConfig:
    return RouteConfig(
        name=name,
        match=MatchConfig(host=host, path=PathMatch(kind, path)),  # type: ignore[arg-type]
        upstream="up",
    )


def _fresh(text: str) -> str:
    # A new str object with no cached hash, like one decoded from the wire.
    return (text + "\0")[:-1]


def exact_scenario(count: int) -> tuple[list[RouteConfig], list[Request]]:
    routes = [_route(f"r{i}", "exact", f"/api/v1/service{i}/status") for i in range(count)]
    rng = random.Random(1)
    targets = [f"/api/v1/service{rng.randrange(count)}/status" for _ in range(1024)]
    return routes, [("GET", "", t, "", HEADERS) for t in targets]


def prefix_scenario(count: int) -> tuple[list[RouteConfig], list[Request]]:
    # Prefixes of several lengths plus a catch-all: the realistic shape of a big table.
    routes = [_route(f"r{i}", "prefix", f"/api/v{i % 3}/svc{i}/") for i in range(count)]
    routes.append(_route("root", "prefix", "/"))
    rng = random.Random(2)
    targets = [f"/api/v{(i := rng.randrange(count)) % 3}/svc{i}/users/42" for _ in range(1024)]
    return routes, [("GET", "", t, "", HEADERS) for t in targets]


def host_scenario(count: int) -> tuple[list[RouteConfig], list[Request]]:
    # Hosts: a tenth exact hosts with one prefix each, a tenth wildcards, the rest host-less
    # prefixes; requests hit exact hosts, wildcard subdomains and the host-less fall-through.
    routes: list[RouteConfig] = []
    tenth = max(count // 10, 1)
    for i in range(tenth):
        routes.append(_route(f"h{i}", "prefix", "/v1/", host=f"tenant{i}.example.com"))
        routes.append(_route(f"w{i}", "prefix", "/", host=f"*.zone{i}.example.net"))
    for i in range(count - 2 * tenth):
        routes.append(_route(f"p{i}", "prefix", f"/svc{i}/"))
    rng = random.Random(3)
    requests: list[Request] = []
    for n in range(1024):
        i = rng.randrange(tenth)
        if n % 3 == 0:
            requests.append(("GET", f"Tenant{i}.example.com:8080", "/v1/orders", "", HEADERS))
        elif n % 3 == 1:
            requests.append(("GET", f"a.b.zone{i}.example.net", "/x", "", HEADERS))
        else:
            j = rng.randrange(max(count - 2 * tenth, 1))
            requests.append(("GET", f"tenant{i}.example.com", f"/svc{j}/y", "", HEADERS))
    return routes, requests


SCENARIOS: dict[str, Scenario] = {
    "exact": exact_scenario,
    "prefix": prefix_scenario,
    "hosts": host_scenario,
}


def _measure(table: RouteTable, requests: list[Request], iterations: int) -> float:
    """ns per lookup: the best of several chunks, to shrug off noise from other processes."""
    match = table.match
    for m, h, p, q, hd in requests:  # warm up, and prove every request is routed
        if match(m, h, p, q, hd) is None:
            raise AssertionError(f"benchmark request not routed: {h} {p}")
    chunk = min(CHUNK, iterations)
    best = float("inf")
    done = 0
    while done < iterations:
        # Fresh strings per chunk, built before the clock starts so only match() is timed.
        batch = [
            (m, _fresh(h), _fresh(p), q, hd)
            for m, h, p, q, hd in (requests[(done + i) % len(requests)] for i in range(chunk))
        ]
        gc.disable()
        try:
            start = time.perf_counter_ns()
            for m, h, p, q, hd in batch:
                match(m, h, p, q, hd)
            elapsed = time.perf_counter_ns() - start
        finally:
            gc.enable()
        best = min(best, elapsed / chunk)
        done += chunk
    return best


def _empty_call_ns(iterations: int) -> float:
    def nothing(m: str, h: str, p: str, q: str, hd: list[tuple[bytes, bytes]]) -> None:
        return None

    batch = [("GET", "", "/", "", HEADERS)] * CHUNK
    best = float("inf")
    for _ in range(max(iterations // CHUNK, 1)):
        start = time.perf_counter_ns()
        for m, h, p, q, hd in batch:
            nothing(m, h, p, q, hd)
        best = min(best, (time.perf_counter_ns() - start) / CHUNK)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--sizes", type=int, nargs=2, default=(10, 10_000), metavar="N")
    args = parser.parse_args(argv)
    small, large = args.sizes
    print(f"RouteTable.match, ns/lookup (best {CHUNK}-lookup chunk of {args.iterations} per cell)")
    print(f"| scenario | {small} routes | {large} routes | ratio |")
    print("|---|---:|---:|---:|")
    for name, scenario in SCENARIOS.items():
        cells: list[float] = []
        for count in (small, large):
            routes, requests = scenario(count)
            table = RouteTable(routes)
            cells.append(_measure(table, requests, args.iterations))
        print(f"| {name} | {cells[0]:.0f} | {cells[1]:.0f} | {cells[1] / cells[0]:.2f} |")
    print(f"| empty call (loop overhead) | {_empty_call_ns(args.iterations):.0f} | | |")


if __name__ == "__main__":
    main()
