"""CPU time of processes from ``/proc``: what a benchmark on a shared machine can compare
when msgs/s moves with everybody else's load."""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
#: (time.perf_counter(), CPU seconds by process name)
Sample = tuple[float, dict[str, float]]


def _stat(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` fields after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """User + system CPU of a process (every thread); ``tree``: with its live children and
    the children it reaped (PostgreSQL's backends are children of the postmaster)."""
    try:
        fields = _stat(pid)
    except FileNotFoundError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if tree:
        ticks += int(fields[13]) + int(fields[14])
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    child = _stat(int(entry.name))
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if int(child[1]) == pid:
                    ticks += int(child[11]) + int(child[12])
    return ticks / _TICKS


class CpuMeter:
    """CPU seconds of named processes, sampled together."""

    def __init__(self, pids: dict[str, int], trees: frozenset[str] = frozenset()) -> None:
        self.pids = pids
        self.trees = trees

    def sample(self) -> Sample:
        return time.perf_counter(), {
            name: cpu_seconds(pid, tree=name in self.trees) for name, pid in self.pids.items()
        }


def cpu_per_message(
    idle: tuple[Sample, Sample],
    start: Sample,
    end: Sample,
    first_result: float,
    messages: int,
) -> dict[str, float]:
    """µs of CPU per message of each process between ``start`` and ``end``, less what the
    process burns idle (its rate over ``idle``) until the first result."""
    (idle_from, idle_a), (idle_to, idle_b) = idle
    waited = max(0.0, first_result - start[0])
    out = {}
    for name, used in end[1].items():
        idle_rate = (idle_b[name] - idle_a[name]) / (idle_to - idle_from)
        busy = used - start[1][name] - idle_rate * waited
        out[name] = round(busy / messages * 1e6, 1)
    return out


def idle_percent(idle: tuple[Sample, Sample]) -> dict[str, float]:
    """Each process's CPU between two samples, in % of one core."""
    (idle_from, idle_a), (idle_to, idle_b) = idle
    return {
        name: round((idle_b[name] - idle_a[name]) / (idle_to - idle_from) * 100, 1)
        for name in idle_b
    }


def loadavg() -> str:
    """The machine's 1, 5 and 15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
