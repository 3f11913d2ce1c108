"""Load balancers: pick one instance of an upstream per request.

Every balancer shares one interface (see :mod:`gateway.balancing.base` for the contract):

- ``Balancer(instances, *, panic_threshold=0.0, slow_start=None, rng=None, now=0.0, ...)``
- ``pick(key: bytes | None = None, exclude: Container[object] = ()) -> instance | None``:
  ``key`` feeds the hash balancers (others ignore it); ``exclude`` is avoided when any other
  eligible instance exists (a retry goes elsewhere). ``None`` only when no instance is available.
- ``rebuild(instances, now)``: a new instance set (state carries over by address).
- ``refresh(now)``: re-read ``.available`` after a flip (health check, ejection, return).
- ``tick(now)``: advance slow start (call from a periodic timer).

Names (config ``upstreams.<name>.balancer``): ``round_robin``, ``weighted_round_robin`` (EDF),
``least_request`` (P2C), ``peak_ewma``, ``random`` (weighted, alias method), ``ring_hash``,
``maglev``. Every pick is O(1) or O(log n): see ``loadtest/bench_balancers.py``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from gateway.balancing.base import Balanced, Balancer, T, instance_key
from gateway.balancing.edf import EdfWeightedRoundRobin
from gateway.balancing.hash_key import compile_hash_key, hash_key_bytes, hash_key_from
from gateway.balancing.least_request import LeastRequest
from gateway.balancing.maglev import Maglev
from gateway.balancing.peak_ewma import PeakEwma
from gateway.balancing.ring_hash import RingHash
from gateway.balancing.round_robin import RoundRobin, SmoothWeightedRoundRobin
from gateway.balancing.slow_start import SlowStart, slow_start_weight
from gateway.balancing.weighted_random import WeightedRandom

#: Kept for compatibility with code written against the first balancer module.
Weighted = Balanced

BALANCERS: dict[str, type[Balancer[Any]]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": EdfWeightedRoundRobin,
    "smooth_weighted_round_robin": SmoothWeightedRoundRobin,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
    "random": WeightedRandom,
    "ring_hash": RingHash,
    "maglev": Maglev,
}

#: Balancers that take a request hash key (``hash_key`` in config).
HASH_BALANCERS = frozenset({"ring_hash", "maglev"})


def make_balancer(
    name: str,
    instances: Sequence[T],
    *,
    panic_threshold: float = 0.0,
    slow_start: SlowStart | None = None,
    rng: random.Random | None = None,
    now: float = 0.0,
    **options: Any,
) -> Balancer[T]:
    """Build the balancer called ``name``. ``slow_start`` is ignored by balancers whose
    ``weighted`` is False (round_robin, ring_hash, maglev); ``options`` go to the class
    (``decay``/``penalty`` for peak_ewma, ``replicas``/``max_points`` for ring_hash,
    ``table_size`` for maglev)."""
    cls = BALANCERS.get(name)
    if cls is None:
        raise ValueError(f"unknown balancer {name!r}")
    kwargs: dict[str, Any] = {"panic_threshold": panic_threshold, "rng": rng, "now": now}
    if cls.weighted:
        kwargs["slow_start"] = slow_start
    kwargs.update(options)
    return cls(instances, **kwargs)


__all__ = [
    "BALANCERS",
    "HASH_BALANCERS",
    "Balanced",
    "Balancer",
    "EdfWeightedRoundRobin",
    "LeastRequest",
    "Maglev",
    "PeakEwma",
    "RingHash",
    "RoundRobin",
    "SlowStart",
    "SmoothWeightedRoundRobin",
    "Weighted",
    "WeightedRandom",
    "compile_hash_key",
    "hash_key_bytes",
    "hash_key_from",
    "instance_key",
    "make_balancer",
    "slow_start_weight",
]
