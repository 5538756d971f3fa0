"""What every benchmark shares: timing, interleaved repeats, helper processes, the machine."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    wall: float  # seconds
    cpu: float  # seconds of this process's CPU (every thread), helper processes excluded


@dataclass
class Series:
    """Repeated timings of one contender; the median run is the figure. Its runs alternate with
    the other contenders', so a burst of load elsewhere on the machine falls on all of them."""

    runs: list[Timing] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(t.wall for t in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(t.cpu for t in self.runs)

    def as_json(self) -> dict[str, Any]:
        return {
            "wall_s_median": round(self.wall, 4),
            "cpu_s_median": round(self.cpu, 4),
            "wall_s_runs": [round(t.wall, 4) for t in self.runs],
            "cpu_s_runs": [round(t.cpu, 4) for t in self.runs],
        }


def timed(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    return Timing(time.perf_counter() - wall0, time.process_time() - cpu0), result


def interleave(repeats: int, contenders: dict[str, Callable[[], Timing]]) -> dict[str, Series]:
    """Run each contender ``repeats`` times, alternating the order (A B, B A, ...), so that
    load from other processes on the machine falls on all of them alike. A contender sets
    itself up, times its own run (``timed``) and returns the Timing."""
    series = {name: Series() for name in contenders}
    names = list(contenders)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            series[name].runs.append(contenders[name]())
    return series


@contextmanager
def helper_process(module: str, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Run ``python -m module args`` (a server) in its own process, so its CPU is not ours.

    Yields (the JSON line it prints when ready, a dict filled with the JSON line it prints
    when its stdin is closed).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    final: dict[str, Any] = {}
    try:
        ready = json.loads(proc.stdout.readline())
        yield ready, final
        proc.stdin.close()
        final.update(json.loads(proc.stdout.readline()))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal"))
        mem = f"{mem_kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        mem = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
