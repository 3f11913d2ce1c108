"""haproxy and caddy in both benchmarks: the CPU table (wrk) and the instruction counts.

Short real runs (about 45 s in all) against the Debian packages that scripts/setup_system.sh
installs: each proxy must start from its generated config, proxy the benchmark requests
without errors, and give a count in a plausible range. caddy runs under callgrind only
without Go's asynchronous preemption (loadtest/instructions.py): with it, callgrind aborts
on the first preemption signal and the run fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest import harness, instructions

pytestmark = pytest.mark.timeout(300)


def test_cpu_table_measures_haproxy_and_caddy(tmp_path: Path) -> None:
    rc = harness.main(
        [
            "--scenarios", "small,tls", "--only", "haproxy,caddy", "--duration", "1s",
            "--warmup", "0s", "--connections", "8", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0  # tls leaves them out by design: a note, not a failure
    (result,) = tmp_path.glob("loadtest-*.json")
    document = json.loads(result.read_text())
    rows = {(row["scenario"], row["proxy"]): row for row in document["results"]}
    assert set(rows) == {("small", "haproxy"), ("small", "caddy")}
    for row in rows.values():
        assert row["errors"] == 0 and row["requests"] > 100, row
        assert 1 < row["cpu_us_per_req"] < 10_000, row
    assert any(
        note.startswith("tls: TLS scenarios compare the gateway with nginx only")
        and "haproxy, caddy" in note
        for note in document["notes"]
    ), document["notes"]
    versions = document["machine"]["versions"]
    assert "HAProxy" in versions["haproxy"] and versions["caddy"][:1].isdigit(), versions


def test_instruction_counts_of_haproxy_and_caddy(tmp_path: Path) -> None:
    rc = instructions.main(
        [
            "--scenarios", "small,post", "--only", "haproxy,caddy", "--requests", "200",
            "--warmup-requests", "50", "--idle-seconds", "0.5", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0
    (result,) = tmp_path.glob("instructions-*.json")
    rows = {(r["scenario"], r["proxy"]): r for r in json.loads(result.read_text())["results"]}
    assert set(rows) == {(s, p) for s in ("small", "post") for p in ("haproxy", "caddy")}
    # Here: haproxy 2.6 ~29k / ~33k, caddy 2.6 (Go) ~255k / ~281k; allow other builds.
    for (scenario, proxy), row in rows.items():
        low, high = (5_000, 200_000) if proxy == "haproxy" else (20_000, 2_000_000)
        assert low < row["instructions_per_request"] < high, (scenario, proxy, row)
    for proxy in ("haproxy", "caddy"):  # a body costs more than none
        post = rows[("post", proxy)]["instructions_per_request"]
        assert post > rows[("small", proxy)]["instructions_per_request"]
