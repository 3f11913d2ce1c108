"""Micro-benchmark of the balancers and the per-request resilience machinery.

Run with ``python -m loadtest.bench_balancers [--picks N]``. It prints:

1. ns per ``pick()`` for each balancer with 2, 100 and 1,000 instances (every pick must cost
   about the same at every size: O(1) or O(log n));
2. ns per simulated request of the data plane's resilience work: ``least_request`` pick, the
   active-request counter, outlier ``record``, circuit-breaker request slot, against a plain
   round-robin pick with the counter. The difference is what the machinery adds per request
   (the budget is 2 µs).

Each cell is the best of several chunks of picks (other processes on a busy machine disturb it
less), with the GC off while timing. Hash balancers get a fresh key per pick.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.balancing import BALANCERS, make_balancer
from gateway.health.outlier import OutlierDetector
from gateway.resilience import CircuitBreaker, RetryBudget

CHUNK = 10_000
SIZES = (2, 100, 1000)


@dataclass(eq=False, slots=True)
class BenchInstance:
    address: str
    weight: int = 1
    available: bool = True
    active_requests: int = 0


def instances(count: int) -> list[BenchInstance]:
    rng = random.Random(count)
    return [
        BenchInstance(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}:8080", rng.randint(1, 5))
        for i in range(count)
    ]


def best_ns(run_chunk: Callable[[], None], picks: int) -> float:
    run_chunk()  # warm up
    best = float("inf")
    for _ in range(max(picks // CHUNK, 1)):
        gc.disable()
        try:
            start = time.perf_counter_ns()
            run_chunk()
            elapsed = time.perf_counter_ns() - start
        finally:
            gc.enable()
        best = min(best, elapsed / CHUNK)
    return best


def bench_pick(name: str, count: int, picks: int) -> float:
    pool = instances(count)
    balancer = make_balancer(name, pool, rng=random.Random(1))
    pick = balancer.pick
    keys = [b"user-%d" % n for n in range(CHUNK)]
    if name in ("least_request", "peak_ewma"):
        rng = random.Random(2)
        for instance in pool:
            instance.active_requests = rng.randrange(10)
    if name == "peak_ewma":
        for n, instance in enumerate(pool):
            balancer.observe(instance, 0.001 * (1 + n % 7), 1.0)  # type: ignore[attr-defined]

    def run() -> None:
        for key in keys:
            pick(key)

    return best_ns(run, picks)


def bench_request(resilient: bool, count: int, picks: int) -> float:
    """One simulated request: pick, count it active, finish, account the outcome."""
    pool = instances(count)
    name = "least_request" if resilient else "round_robin"
    pick = make_balancer(name, pool, rng=random.Random(3)).pick
    detector = OutlierDetector(5, 5, 30.0, 300.0, 10.0)
    detector.set_instances(instance.address for instance in pool)
    record = detector.record
    breaker = CircuitBreaker(1024, 1024, 1024)
    budget = RetryBudget(20.0, 3)
    loop = range(CHUNK)
    now = 1.0

    if resilient:

        def run() -> None:
            for _ in loop:
                if not breaker.try_request():
                    continue
                instance = pick()
                instance.active_requests += 1  # type: ignore[union-attr]
                instance.active_requests -= 1  # type: ignore[union-attr]
                breaker.release_request()
                record(instance.address, True, False, now)  # type: ignore[union-attr]
            budget.limit(0)

    else:

        def run() -> None:
            for _ in loop:
                instance = pick()
                instance.active_requests += 1  # type: ignore[union-attr]
                instance.active_requests -= 1  # type: ignore[union-attr]

    return best_ns(run, picks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--picks", type=int, default=200_000, help="picks timed per cell")
    args = parser.parse_args(argv)
    print(f"pick(), ns per pick (best {CHUNK}-pick chunk of {args.picks} per cell)")
    header = " | ".join(f"{size} inst" for size in SIZES)
    print(f"| balancer | {header} | ratio {SIZES[-1]}/{SIZES[0]} |")
    print("|---|" + "---:|" * (len(SIZES) + 1))
    for name in BALANCERS:
        cells = [bench_pick(name, size, args.picks) for size in SIZES]
        row = " | ".join(f"{cell:.0f}" for cell in cells)
        print(f"| {name} | {row} | {cells[-1] / cells[0]:.2f} |")
    print()
    print("per simulated request, ns (100 instances)")
    plain = bench_request(False, 100, args.picks)
    full = bench_request(True, 100, args.picks)
    print("| path | ns/request |")
    print("|---|---:|")
    print(f"| round_robin pick + active counter | {plain:.0f} |")
    print(f"| least_request + outlier record + circuit breaker | {full:.0f} |")
    print(f"| added by the resilience machinery | {full - plain:.0f} |")


if __name__ == "__main__":
    main()
