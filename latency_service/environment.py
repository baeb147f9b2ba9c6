"""Host facts recorded with every measurement: what a number was measured on, so that two runs can be compared.

Everything is read from ``/proc`` and ``/sys`` where Linux exposes it and from :mod:`platform` otherwise; a fact the
host does not expose is ``None`` rather than a guess.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

_CPUINFO = Path("/proc/cpuinfo")
_CPU_SYSFS = Path("/sys/devices/system/cpu")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpuinfo_records() -> list[dict[str, str]]:
    text = _read_text(_CPUINFO)
    if not text:
        return []
    records = []
    for block in re.split(r"\n\s*\n", text):
        record: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                record[key.strip()] = value.strip()
        if record:
            records.append(record)
    return records


def _cpu_model(records: list[dict[str, str]]) -> str:
    # x86 says "model name"; ARM boards say "Hardware"/"CPU part" or only "Model" (Raspberry Pi).
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        for record in records:
            if record.get(key):
                return record[key]
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores(records: list[dict[str, str]]) -> int | None:
    pairs = {(r.get("physical id", "0"), r["core id"]) for r in records if "core id" in r}
    if pairs:
        return len(pairs)
    # ARM cpuinfo has no core ids; sysfs topology does.
    siblings = set()
    for cpu_dir in _CPU_SYSFS.glob("cpu[0-9]*"):
        text = _read_text(cpu_dir / "topology" / "core_cpus_list") or _read_text(
            cpu_dir / "topology" / "thread_siblings_list"
        )
        if text:
            siblings.add(text)
    return len(siblings) or None


def _cpu_index(path: Path) -> int:
    return int(path.name[3:])


def _governors() -> dict[str, str | None] | None:
    cpus = sorted(_CPU_SYSFS.glob("cpu[0-9]*"), key=_cpu_index)
    if not cpus:
        return None
    governors = {cpu.name: _read_text(cpu / "cpufreq" / "scaling_governor") for cpu in cpus}
    return governors if any(v is not None for v in governors.values()) else None


def _allowed_cores() -> list[int] | None:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def _realtime_allowed() -> bool:
    """Whether this process may time under SCHED_FIFO (``measurement`` does where it can); tried and undone."""
    if not hasattr(os, "sched_setscheduler"):
        return False
    try:
        previous = (os.sched_getscheduler(0), os.sched_getparam(0))
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        return False
    os.sched_setscheduler(0, *previous)
    return True


@functools.lru_cache(maxsize=1)
def _static_facts() -> dict[str, Any]:
    records = _cpuinfo_records()
    return {
        "cpu_model": _cpu_model(records),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(records),
        "governors": _governors(),
        "os": f"{platform.system()} {platform.release()}",
        "python_version": platform.python_version(),
        "python_implementation": sys.implementation.name,
        "machine": platform.machine(),
        "realtime_priority_allowed": _realtime_allowed(),
    }


MIN_PROBE_WINDOW_S = 0.1


class OtherLoadProbe:
    """Cores kept busy by other processes (and by the hypervisor, as steal) between ``start`` and ``stop``."""

    _STAT = "/proc/stat"

    def __init__(self) -> None:
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: tuple[float, float, float] | None = None

    def _busy_s(self) -> float | None:
        try:
            with open(self._STAT) as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already inside user, so
        # only the first eight count; of those, everything but idle and iowait is busy.
        counted = fields[:8]
        return (sum(counted) - counted[3] - (counted[4] if len(counted) > 4 else 0)) / self._ticks_per_s

    def start(self) -> None:
        busy = self._busy_s()
        self._start = None if busy is None else (busy, time.process_time(), time.perf_counter())

    def stop(self) -> float | None:
        busy = self._busy_s()
        if self._start is None or busy is None:
            return None
        busy0, own0, wall0 = self._start
        wall = time.perf_counter() - wall0
        others = (busy - busy0) - (time.process_time() - own0)
        # /proc/stat counts in 10 ms ticks: under 0.1 s the rounding (±0.2 cores at 0.1 s) nears the threshold.
        return max(0.0, others / wall) if wall >= MIN_PROBE_WINDOW_S else None


def host_environment() -> dict[str, Any]:
    """CPU model, core counts, allowed cores, per-core governor (or None), OS, Python and architecture.

    The facts that cannot change while the process runs are read once; the affinity is read on every call because
    ``measurement.pin_to_cores`` changes it.  ``governor`` is the single governor when all cores agree.
    """
    facts = dict(_static_facts())
    governors = facts["governors"] = dict(facts["governors"]) if facts["governors"] else None
    distinct = {g for g in governors.values() if g is not None} if governors else set()
    facts["governor"] = distinct.pop() if len(distinct) == 1 else None
    facts["allowed_cores"] = _allowed_cores()
    return facts


__all__ = ["OtherLoadProbe", "host_environment"]
