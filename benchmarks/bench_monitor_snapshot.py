"""Monitor snapshots: write cost and size per series count, merge cost per process count.

Run: uv run python benchmarks/bench_monitor_snapshot.py [--quick]

"typical" fills each series like a busy call process: a turn every 2 s over the whole window
(about 5 samples per 10 s slice). "dense" is the worst case: every slice holds 400 distinct
buckets. The merge is what one ops app request costs when its cache is cold: list the
directory, read and parse every process's file, add them up, and answer get_all_stats + /slo.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable

from bench_monitor import seconds_per_call  # a sibling script: benchmarks/ is on sys.path

from lk_observe.monitor import LatencyMonitor
from lk_observe.multiprocess import SnapshotReader, SnapshotWriter
from lk_observe.slo import DEFAULT_SLOS, evaluate
from lk_observe.turns import COMPONENTS


class _Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def _keys(series: int) -> list[tuple[str, str | None]]:
    """(component, agent) pairs to record under so the monitor holds `series` series."""
    keys: list[tuple[str, str | None]]
    if series <= len(COMPONENTS):
        keys = [(component, None) for component in COMPONENTS[:series]]
    else:
        # every agent's sample also lands in its component's all-agents series
        components = [f"c{i}" for i in range(min(series, 64))]
        agents = max(0, series // len(components) - 1)
        keys = [(c, f"agent{a}") for a in range(agents) for c in components]
        keys = keys or [(c, None) for c in components]
    return keys


def _filled(
    keys: list[tuple[str, str | None]], dense: bool, seed: int, clock: _Clock
) -> LatencyMonitor:
    """A monitor with samples under every key in every slice of its window."""
    rng = random.Random(seed)
    monitor = LatencyMonitor(clock=clock)
    slices = 30
    start = clock.now
    per_slice = 400 if dense else 5
    for step in range(slices):
        clock.now = start - monitor.window_s + (step + 0.5) * monitor.window_s / slices
        for component, agent_name in keys:
            for _ in range(per_slice):
                value = (
                    rng.uniform(0.1, 100_000.0) if dense else rng.lognormvariate(math.log(500), 0.5)
                )
                monitor.record(component, value, agent=agent_name)
    clock.now = start
    return monitor


def bench_write(series_counts: list[int], budget_s: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for fill in ("typical", "dense"):
        for series in series_counts:
            if fill == "dense" and series > 64:
                continue  # 30 x 400 samples per series: minutes to fill, and capped anyway
            clock = _Clock()
            monitor = _filled(_keys(series), fill == "dense", series, clock)
            n_series = len(monitor.snapshot()["series"])
            with tempfile.TemporaryDirectory() as directory:
                writer = SnapshotWriter(monitor, directory)
                seconds = seconds_per_call(writer.write, budget_s)
                size = os.path.getsize(writer.path)
                with open(writer.path, "rb") as file:
                    dropped = json.load(file)["truncated"]
            rows.append(
                {
                    "fill": fill,
                    "series": n_series,
                    "write_ms": seconds * 1000,
                    "bytes": size,
                    "truncated": dropped,
                }
            )
    return rows


def request_new(
    own: LatencyMonitor, directory: str, request: Callable[[SnapshotReader], None]
) -> None:
    request(SnapshotReader(own, directory, max_age_s=0.0))


def bench_merge(process_counts: list[int], budget_s: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for processes in process_counts:
        clock = _Clock()
        with tempfile.TemporaryDirectory() as directory:
            size = 0
            for n in range(processes):
                # a call process: 6 components x (all agents, its agent) = 12 series
                monitor = _filled([(c, "support") for c in COMPONENTS], False, n, clock)
                writer = SnapshotWriter(monitor, directory)
                # final names: read whatever the pid, as a cleanly exited process's file is
                writer.write(final=True)
            for name in os.listdir(directory):
                size += os.path.getsize(os.path.join(directory, name))
            own = LatencyMonitor(clock=clock)
            reader = SnapshotReader(own, directory, max_age_s=0.0)

            def request(reader: SnapshotReader) -> None:
                view = reader.view()
                view.monitor.get_all_stats()
                for slo in DEFAULT_SLOS:
                    evaluate(slo, view.monitor)

            # cold: a new reader reads and validates every file; warm: files unchanged since
            # the last merge are reused (every final file, most live ones at the poll rate)
            cold = seconds_per_call(
                functools.partial(request_new, own, directory, request), budget_s
            )
            warm = seconds_per_call(functools.partial(request, reader), budget_s)
            view = reader.view()
            assert view.processes == processes, (view.processes, reader.skipped)
        rows.append(
            {
                "processes": processes,
                "cold_ms": cold * 1000,
                "warm_ms": warm * 1000,
                "files_bytes": size,
                "e2e_count": view.monitor.get_stats("e2e")["count"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter timings")
    args = parser.parse_args(argv)
    logging.getLogger("lk_observe").setLevel(logging.ERROR)  # the capped row warns by design
    budget = 0.05 if args.quick else 0.5
    write = bench_write([1, 12] if args.quick else [1, 12, 64, 256], budget)
    merge = bench_merge([2, 8] if args.quick else [8, 32], budget)

    print(f"{'fill':8} {'series':>6} {'write ms':>9} {'bytes':>10} {'dropped':>8}")
    for row in write:
        print(
            f"{row['fill']:8} {row['series']:>6} {row['write_ms']:>9.2f} {row['bytes']:>10,} "
            f"{row['truncated']:>8}"
        )
    print()
    print(f"{'processes':>9} {'cold ms':>8} {'warm ms':>8} {'files bytes':>12} {'e2e count':>10}")
    for row in merge:
        print(
            f"{row['processes']:>9} {row['cold_ms']:>8.2f} {row['warm_ms']:>8.2f} "
            f"{row['files_bytes']:>12,} {row['e2e_count']:>10}"
        )
    return {"write": write, "merge": merge}


if __name__ == "__main__":
    main(sys.argv[1:])
