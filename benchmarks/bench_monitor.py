"""LatencyMonitor vs the guide's deque+sort monitor at 1k/10k/100k samples, in one run.

Run: uv run python benchmarks/bench_monitor.py [--quick]
Prints record and get_stats cost, window memory (tracemalloc) and p50/p95/p99 error vs exact.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or import in tests

from guide_monitor import GuideLatencyMonitor

from lk_observe.monitor import LatencyMonitor


class _Monitor(Protocol):
    def record(self, component: str, duration_ms: float) -> None: ...
    def get_stats(self, component: str) -> dict[str, float | int]: ...


@dataclass(frozen=True)
class Row:
    samples: int
    name: str
    record_us: float
    stats_us: float
    memory_bytes: int
    max_error: float  # worst relative error of p50/p95/p99 vs exact (linear interpolation)


def exact_quantile(ordered: list[float], q: float) -> float:
    h = (len(ordered) - 1) * q
    k = math.floor(h)
    if k + 1 >= len(ordered):
        return ordered[k]
    return ordered[k] + (h - k) * (ordered[k + 1] - ordered[k])


def seconds_per_call(call: Callable[[], object], budget_s: float = 0.2) -> float:
    """Seconds per call: repeat until the budget is spent (at least 3 calls)."""
    calls = 0
    start = time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 3 and elapsed >= budget_s:
            return elapsed / calls


class _SpreadClock:
    """Advances one step per read so `samples` records exactly fill a 300 s window."""

    def __init__(self, samples: int) -> None:
        self.step = 299.0 / samples
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _filled(
    make: Callable[[_SpreadClock], _Monitor], values: list[float]
) -> tuple[_Monitor, float]:
    clock = _SpreadClock(len(values))
    monitor = make(clock)
    start = time.perf_counter()
    for value in values:
        monitor.record("e2e", value)
    elapsed = time.perf_counter() - start
    clock.step = 0.0  # queries then see the full window, not one that keeps sliding
    return monitor, elapsed


def _memory(make: Callable[[_SpreadClock], _Monitor], values: list[float]) -> int:
    # Separate pass: tracemalloc slows every allocation, so it must not touch the timings.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    monitor, _ = _filled(make, values)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del monitor
    return used


def _measure(name: str, make: Callable[[_SpreadClock], _Monitor], values: list[float]) -> Row:
    gc.collect()
    monitor, record_s = _filled(make, values)
    stats = monitor.get_stats("e2e")
    stats_s = seconds_per_call(lambda: monitor.get_stats("e2e"))
    ordered = sorted(values)
    error = max(
        abs(float(stats[key]) - exact_quantile(ordered, q)) / exact_quantile(ordered, q)
        for key, q in (("median", 0.5), ("p95", 0.95), ("p99", 0.99))
    )
    memory = _memory(make, values)
    return Row(len(values), name, record_s / len(values) * 1e6, stats_s * 1e6, memory, error)


def run(sizes: tuple[int, ...]) -> list[Row]:
    rng = random.Random(42)
    rows: list[Row] = []
    for size in sizes:
        # e2e-like lognormal around 700 ms, spread evenly over one full window (no expiry).
        values = [rng.lognormvariate(math.log(700.0), 0.35) for _ in range(size)]
        rows.append(_measure("ours", lambda clock: LatencyMonitor(clock=clock), values))
        rows.append(_measure("guide", lambda clock: GuideLatencyMonitor(clock=clock), values))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [
        f"{'samples':>8} {'monitor':>7} {'record µs':>10} {'get_stats µs':>13} "
        f"{'memory KiB':>11} {'max err %':>10}"
    ]
    for row in rows:
        lines.append(
            f"{row.samples:>8} {row.name:>7} {row.record_us:>10.2f} {row.stats_us:>13.1f} "
            f"{row.memory_bytes / 1024:>11.1f} {row.max_error * 100:>10.3f}"
        )
    lines.append("")
    lines.append(
        f"{'samples':>8} {'get_stats speedup':>18} {'record ratio':>13} {'memory ratio':>13}"
    )
    by_size: dict[int, dict[str, Row]] = {}
    for row in rows:
        by_size.setdefault(row.samples, {})[row.name] = row
    for size, pair in by_size.items():
        ours, guide = pair["ours"], pair["guide"]
        lines.append(
            f"{size:>8} {guide.stats_us / ours.stats_us:>17.0f}x "
            f"{ours.record_us / guide.record_us:>12.2f}x "
            f"{ours.memory_bytes / guide.memory_bytes:>12.3f}x"
        )
    lines.append("(speedup = guide/ours; record and memory ratios = ours/guide)")
    return "\n".join(lines)


def main(quick: bool = False) -> str:
    sizes = (1_000, 5_000) if quick else (1_000, 10_000, 100_000)
    table = format_table(run(sizes))
    print(table)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    main(quick=parser.parse_args().quick)
