"""CPU time and memory of a process tree, read from /proc.

``/proc/PID/stat`` of a process already sums all of its threads, so the CPU time of a proxy is
the sum over the processes of its tree (nginx master + workers, gateway supervisor + workers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PROC = "/proc"


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    comm: str
    ppid: int
    utime_ticks: int
    stime_ticks: int
    start_ticks: int = 0  # boot-relative start time: (pid, start) names a process uniquely

    @property
    def cpu_ticks(self) -> int:
        return self.utime_ticks + self.stime_ticks


def parse_stat_line(line: str) -> ProcStat:
    """Parse one ``/proc/PID/stat`` line (see proc(5)).

    ``comm`` is in parentheses and may itself contain spaces and ``)``, so the fixed fields are
    taken after the *last* ``)``.
    """
    open_at = line.index("(")
    close_at = line.rindex(")")
    pid = int(line[:open_at].strip())
    comm = line[open_at + 1 : close_at]
    rest = line[close_at + 1 :].split()
    # rest[0] is field 3 (state); field N of proc(5) is rest[N - 3].
    return ProcStat(
        pid=pid,
        comm=comm,
        ppid=int(rest[4 - 3]),
        utime_ticks=int(rest[14 - 3]),
        stime_ticks=int(rest[15 - 3]),
        start_ticks=int(rest[22 - 3]),
    )


def read_stat(pid: int, proc: str = PROC) -> ProcStat | None:
    """The stat of one process, or None when it has gone away."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return parse_stat_line(f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def all_stats(proc: str = PROC) -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    for name in os.listdir(proc):
        if name.isdigit():
            st = read_stat(int(name), proc)
            if st is not None:
                stats[st.pid] = st
    return stats


def descendants(root: int, parents: Mapping[int, int]) -> set[int]:
    """``root`` and every process below it, given a ``pid -> ppid`` map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree.add(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_pids(root: int, proc: str = PROC) -> set[int]:
    stats = all_stats(proc)
    if root not in stats:
        return set()
    return descendants(root, {pid: st.ppid for pid, st in stats.items()})


def tree_identities(root: int, proc: str = PROC) -> dict[int, int]:
    """``pid -> start time`` of every process in the tree under ``root``."""
    stats = all_stats(proc)
    if root not in stats:
        return {}
    pids = descendants(root, {pid: st.ppid for pid, st in stats.items()})
    return {pid: stats[pid].start_ticks for pid in pids}


def tree_cpu_ticks(roots: Iterable[int], proc: str = PROC) -> int:
    """utime + stime (clock ticks) summed over every process in the trees under ``roots``."""
    stats = all_stats(proc)
    parents = {pid: st.ppid for pid, st in stats.items()}
    pids: set[int] = set()
    for root in roots:
        if root in stats:
            pids |= descendants(root, parents)
    return sum(stats[pid].cpu_ticks for pid in pids)


def ticks_to_seconds(ticks: int) -> float:
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_us_per_request(ticks_before: int, ticks_after: int, requests: int) -> float | None:
    """Proxy CPU microseconds spent per completed request; None if nothing completed."""
    if requests <= 0:
        return None
    return ticks_to_seconds(ticks_after - ticks_before) * 1e6 / requests


def parse_vmrss_kib(status_text: str) -> int | None:
    """The ``VmRSS:`` value (KiB) of a ``/proc/PID/status`` document; None for kernel threads."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            fields = line.split()
            # "VmRSS:	   12345 kB"
            return int(fields[1])
    return None


def tree_rss_kib(roots: Iterable[int], proc: str = PROC) -> int:
    """Resident memory (KiB) summed over every process in the trees under ``roots``."""
    pids: set[int] = set()
    for root in roots:
        pids |= tree_pids(root, proc)
    total = 0
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/status", encoding="utf-8", errors="replace") as f:
                rss = parse_vmrss_kib(f.read())
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += rss or 0
    return total
