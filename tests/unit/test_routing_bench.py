"""The routing micro-benchmark still runs (a smoke test: no timing is asserted)."""

from __future__ import annotations

import pytest

from loadtest import bench_routing


def test_bench_routing_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench_routing.main(["--iterations", "2000", "--sizes", "10", "200"])
    out = capsys.readouterr().out
    for scenario in bench_routing.SCENARIOS:
        assert f"| {scenario} |" in out
