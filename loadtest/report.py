"""Result rows -> markdown table, JSON file and PNG chart."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]

TABLE_COLUMNS = (
    "scenario",
    "proxy",
    "req/s",
    "p50 ms",
    "p99 ms",
    "CPU µs/req",
    "vs nginx",
    "errors",
)


def add_ratios(rows: Sequence[Row], baseline: str = "nginx") -> None:
    """Set ``cpu_ratio_vs_nginx`` on each row: its CPU µs/req over nginx's in the same scenario."""
    base: dict[str, float] = {}
    for row in rows:
        cpu = row.get("cpu_us_per_req")
        if row["proxy"] == baseline and cpu:
            base[row["scenario"]] = cpu
    for row in rows:
        cpu = row.get("cpu_us_per_req")
        ref = base.get(row["scenario"])
        row["cpu_ratio_vs_nginx"] = (cpu / ref) if (cpu is not None and ref) else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _errors_cell(row: Row) -> str:
    if row.get("failure"):
        return f"FAILED: {row['failure']}"
    errors = row.get("errors") or 0
    if not errors:
        return "0"
    return f"**{errors}** ({row.get('error_summary', '')})"


def table_row(row: Row) -> list[str]:
    ratio = row.get("cpu_ratio_vs_nginx")
    return [
        row["scenario"],
        row["proxy"],
        _fmt(row.get("requests_per_s"), ",.0f"),
        _fmt(row.get("p50_ms"), ".3f"),
        _fmt(row.get("p99_ms"), ".3f"),
        _fmt(row.get("cpu_us_per_req"), ".1f"),
        "-" if ratio is None else f"{ratio:.2f}x",
        _errors_cell(row),
    ]


def render_table(rows: Sequence[Row]) -> str:
    """A GitHub markdown table, numbers right-aligned."""
    cells = [list(TABLE_COLUMNS)] + [table_row(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    numeric = {2, 3, 4, 5, 6}

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "| " + " | ".join(padded) + " |"

    sep = [
        ("-" * (widths[i] - 1) + ":") if i in numeric else "-" * widths[i]
        for i in range(len(TABLE_COLUMNS))
    ]
    return "\n".join([line(cells[0]), line(sep), *(line(c) for c in cells[1:])])


def render_idle_table(rows: Sequence[Row]) -> str:
    head = "| proxy | connections | RSS before KiB | RSS after KiB | KiB per connection |"
    out = [head, "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("failure"):
            out.append(f"| {r['proxy']} | FAILED: {r['failure']} | | | |")
            continue
        out.append(
            f"| {r['proxy']} | {r['connections']} | {r['rss_before_kib']} | "
            f"{r['rss_after_kib']} | {_fmt(r.get('kib_per_connection'), '.2f')} |"
        )
    return "\n".join(out)


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def draw_chart(path: Path, rows: Sequence[Row]) -> str | None:
    """Grouped bars of CPU µs/req (and req/s) per scenario per proxy; returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (install the [loadtest] extra)"

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    proxies = list(dict.fromkeys(r["proxy"] for r in rows))
    by_key = {(r["scenario"], r["proxy"]): r for r in rows}
    fig, (ax_cpu, ax_rps) = plt.subplots(2, 1, figsize=(max(8, 2.2 * len(scenarios)), 9))
    width = 0.8 / max(1, len(proxies))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, proxy in enumerate(proxies):
        color = palette[i % len(palette)]  # same colour for a proxy in both charts
        xs = [s + (i - (len(proxies) - 1) / 2) * width for s in range(len(scenarios))]
        cpu = [by_key.get((sc, proxy), {}).get("cpu_us_per_req") or 0.0 for sc in scenarios]
        rps = [by_key.get((sc, proxy), {}).get("requests_per_s") or 0.0 for sc in scenarios]
        if proxy != "direct":  # direct has no proxy, so no proxy CPU
            bars = ax_cpu.bar(xs, cpu, width, label=proxy, color=color)
            ax_cpu.bar_label(bars, fmt="%.1f", fontsize=7)
        ax_rps.bar(xs, rps, width, label=proxy, color=color)
    for ax, title, unit in (
        (ax_cpu, "Proxy CPU per request (lower is better)", "CPU µs / request"),
        (ax_rps, "Throughput (higher is better)", "requests / s"),
    ):
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
