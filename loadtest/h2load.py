"""Building h2load command lines and parsing its report (pure functions, no IO), for the HTTP/2
scenarios: nghttp2's load generator multiplexes ``-m`` streams on each connection."""

from __future__ import annotations

import re

from loadtest.wrk import WrkParseError, WrkResult

STREAMS_PER_CONNECTION = 100

_FINISHED_RE = re.compile(r"^finished in ([0-9.]+)(ms|s), ([0-9.]+) req/s", re.MULTILINE)
_REQUESTS_RE = re.compile(
    r"^requests: ([0-9]+) total, ([0-9]+) started, ([0-9]+) done, ([0-9]+) succeeded,"
    r" ([0-9]+) failed, ([0-9]+) errored, ([0-9]+) timeout",
    re.MULTILINE,
)
_STATUS_RE = re.compile(
    r"^status codes: ([0-9]+) 2xx, ([0-9]+) 3xx, ([0-9]+) 4xx, ([0-9]+) 5xx", re.MULTILINE
)
_MEAN_RE = re.compile(r"^time for request:\s+\S+\s+\S+\s+([0-9.]+)(us|ms|s)\s", re.MULTILINE)
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def h2load_command(
    url: str,
    *,
    duration_s: int,
    connections: int,
    streams: int = STREAMS_PER_CONNECTION,
    threads: int = 1,
    cpu: str | None = None,
) -> list[str]:
    """The argv that runs h2load for ``duration_s`` seconds (optionally pinned to ``cpu``)."""
    argv: list[str] = []
    if cpu is not None:
        argv += ["taskset", "-c", cpu]
    argv += [
        "h2load",
        f"--threads={threads}",
        f"--clients={max(connections, threads)}",
        f"--max-concurrent-streams={streams}",
        f"--duration={duration_s}",
        url,
    ]
    return argv


def parse_h2load_output(text: str) -> WrkResult:
    """h2load's report as a ``WrkResult`` (it gives a mean, not percentiles: those stay
    empty; failed streams count as read errors, timeouts as timeouts)."""
    finished = _FINISHED_RE.search(text)
    requests = _REQUESTS_RE.search(text)
    if finished is None or requests is None:
        raise WrkParseError("h2load output has no request summary:\n" + text.strip()[-2000:])
    duration_s = float(finished.group(1)) * (0.001 if finished.group(2) == "ms" else 1.0)
    done = int(requests.group(3))
    failed, errored, timeouts = (int(requests.group(n)) for n in (5, 6, 7))
    result = WrkResult(
        requests=done, duration_s=duration_s, requests_per_s=float(finished.group(3))
    )
    status = _STATUS_RE.search(text)
    if status is not None:
        result.non_2xx_3xx = int(status.group(3)) + int(status.group(4))
    result.read_errors = errored + max(0, failed - errored - result.non_2xx_3xx)
    result.timeouts = timeouts
    mean = _MEAN_RE.search(text)
    if mean is not None:
        result.latency_ms["mean"] = float(mean.group(1)) * _UNITS_MS[mean.group(2)]
    return result
