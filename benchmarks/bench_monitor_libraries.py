"""LatencyMonitor's rolling-window sketch vs the same window built on kept libraries, in one run.

Run: uv run python benchmarks/bench_monitor_libraries.py [--quick] [--samples N] [--repeat N]

The libraries (each skipped, with a printed note, when it is not installed):
  ddsketch      DataDog's sketches-py: DDSketch(relative_accuracy=0.01)
  hdrhistogram  HdrHistogram_py: integer microseconds, 1 us..120 s, 2 significant figures
  fastdigest    a t-digest (Rust): TDigest(max_centroids=1000), its default
None of them can subtract an expired slice, so each gets the window the library way: per series
a ring of 30 per-slice sketches (10 s of a 300 s window), merged at query time. Each wrapper takes
a lock, reads the clock once and validates input as LatencyMonitor does, keeps exact per-slice
min/max (and sum, where the library has none), and clamps percentiles to [min, max] as
LatencyMonitor does: only the sketch differs.

Prints, medians of interleaved repetitions, every figure from this one run:
  record µs     per sample at steady state: N samples in the window, slices expiring as it slides
  get_stats µs  per call (count, mean, median, p95, p99, min, max); a library merges 30 slices
  memory KiB    a full window of one series (tracemalloc; a Rust heap it cannot see is estimated)
then the p50/p95/p99 relative error vs exact (linear interpolation, numpy's default) on lognormal
latencies (median 600 ms), a bimodal mix and point masses (scripted delays of exactly 250, 800
and 1200 ms), whether count/mean/min/max are exact, and whether the count of samples <= 800 ms
(an SLO threshold and Prometheus bucket edge) is exact; and ratios against LatencyMonitor.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import random
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or import in tests

from bench_monitor import exact_quantile, seconds_per_call

from lk_observe.monitor import LatencyMonitor

WINDOW_S = 300.0
SLICES = 30
SLO_MS = 800.0  # a Prometheus bucket edge (0.8 s), as every SLO threshold is
QUANTILES = (("median", 0.50), ("p95", 0.95), ("p99", 0.99))
OURS = "LatencyMonitor"


class _Clock:
    """Advances one step per read, so `per_window` records fill exactly one window."""

    def __init__(self, per_window: int) -> None:
        self.step = WINDOW_S / per_window
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _empty_stats() -> dict[str, float | int]:
    return {"count": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}


def _valid(component: object, duration_ms: object) -> bool:
    # The checks LatencyMonitor makes before it takes its lock (it counts and logs the failures).
    if not isinstance(component, str) or not component:
        return False
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, (int, float)):
        return False
    value = float(duration_ms)
    return not math.isnan(value) and not math.isinf(value) and value >= 0


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


class _Part:
    """One slice of a ring: the library's sketch plus what the library does not keep exactly."""

    __slots__ = ("count", "high", "id", "low", "sketch", "total")

    def __init__(self) -> None:
        self.id = -1
        self.sketch: Any = None
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf


class _RingMonitor:
    """A rolling window the library way: per component a ring of per-slice sketches, merged on
    every query. Subclasses supply the sketch."""

    name = ""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._slice_s = WINDOW_S / SLICES
        self._lock = threading.Lock()
        self._series: dict[str, list[_Part]] = {}
        self._latest_id = -1

    def _current_id(self) -> int:
        slice_id = int(self._clock() // self._slice_s)
        if slice_id > self._latest_id:
            self._latest_id = slice_id
        return self._latest_id

    def record(self, component: str, duration_ms: float) -> None:
        if not _valid(component, duration_ms):
            return
        value = float(duration_ms)
        with self._lock:
            slice_id = self._current_id()
            ring = self._series.get(component)
            if ring is None:
                ring = self._series[component] = [_Part() for _ in range(SLICES)]
            part = ring[slice_id % SLICES]
            if part.id != slice_id:  # the slot's slice has left the window: a fresh sketch
                part.id = slice_id
                part.sketch = self._new()
                part.count = 0
                part.total = 0.0
                part.low = math.inf
                part.high = -math.inf
            self._add(part, value)

    def _live(self, component: str) -> list[_Part]:
        ring = self._series.get(component, [])
        oldest = self._current_id() - SLICES + 1
        return [part for part in ring if part.id >= oldest and part.sketch is not None]

    def get_stats(self, component: str) -> dict[str, float | int]:
        with self._lock:
            live = self._live(component)
            if not live:
                return _empty_stats()
            return self._stats(live)

    def count_at_or_below(self, component: str, threshold_ms: float) -> int:
        with self._lock:
            live = self._live(component)
            return self._count_le(live, threshold_ms) if live else 0

    def _new(self) -> Any:
        raise NotImplementedError

    def _add(self, part: _Part, value: float) -> None:
        raise NotImplementedError

    def _stats(self, live: list[_Part]) -> dict[str, float | int]:
        raise NotImplementedError

    def _count_le(self, live: list[_Part], threshold_ms: float) -> int:
        raise NotImplementedError

    def native_bytes(self) -> int:
        """Memory outside Python's allocator, which tracemalloc cannot see."""
        return 0


def _result(
    count: int, total: float, low: float, high: float, values: list[float]
) -> dict[str, float | int]:
    median, p95, p99 = (_clamp(v, low, high) for v in values)
    mean = _clamp(total / count, low, high)
    return {
        "count": count,
        "mean": mean,
        "median": median,
        "p95": p95,
        "p99": p99,
        "min": low,
        "max": high,
    }


class DDSketchMonitor(_RingMonitor):
    name = "ddsketch"

    def __init__(self, clock: Callable[[], float]) -> None:
        from ddsketch import DDSketch

        self._sketch_type = DDSketch
        super().__init__(clock)

    def _new(self) -> Any:
        return self._sketch_type(relative_accuracy=0.01)

    def _add(self, part: _Part, value: float) -> None:
        part.sketch.add(value)  # keeps count and sum exactly; min/max only privately
        if value < part.low:
            part.low = value
        if value > part.high:
            part.high = value

    def _merged(self, live: list[_Part]) -> Any:
        merged = self._new()
        for part in live:
            merged.merge(part.sketch)
        return merged

    def _stats(self, live: list[_Part]) -> dict[str, float | int]:
        merged = self._merged(live)
        low = min(part.low for part in live)
        high = max(part.high for part in live)
        values = [merged.get_quantile_value(q) for _, q in QUANTILES]
        return _result(int(merged.count), merged.sum, low, high, values)

    def _count_le(self, live: list[_Part], threshold_ms: float) -> int:
        # DDSketch has no rank or CDF query: sum the bins that lie wholly at or below the
        # threshold (the bin holding it also holds values above it), from the store's internals.
        merged = self._merged(live)
        store = merged._store
        below = max(0, min(len(store.bins), merged._mapping.key(threshold_ms) - store.offset))
        return round(merged._zero_count + math.fsum(store.bins[:below]))


class HdrMonitor(_RingMonitor):
    name = "hdrhistogram"
    _UNIT = 1000.0  # record integer microseconds

    def __init__(self, clock: Callable[[], float]) -> None:
        from hdrh.histogram import HdrHistogram

        self._hist_type = HdrHistogram
        super().__init__(clock)

    def _new(self) -> Any:
        return self._hist_type(1, 120_000_000, 2)

    def _add(self, part: _Part, value: float) -> None:
        # min/max are only kept to a bucket, and mean is estimated from buckets: keep them here
        part.sketch.record_value(min(round(value * self._UNIT), 120_000_000))
        part.count += 1
        part.total += value
        if value < part.low:
            part.low = value
        if value > part.high:
            part.high = value

    def _merged(self, live: list[_Part]) -> Any:
        merged = self._new()
        for part in live:
            merged.add(part.sketch)
        return merged

    def _stats(self, live: list[_Part]) -> dict[str, float | int]:
        merged = self._merged(live)
        low = min(part.low for part in live)
        high = max(part.high for part in live)
        # one pass over the counts for the three percentiles
        found = merged.get_percentile_to_value_dict([q * 100 for _, q in QUANTILES])
        values = [found[q * 100] / self._UNIT for _, q in QUANTILES]
        total = math.fsum(part.total for part in live)
        return _result(merged.get_total_count(), total, low, high, values)

    def _count_le(self, live: list[_Part], threshold_ms: float) -> int:
        # buckets whose every value is <= the threshold (the one holding it straddles it)
        merged = self._merged(live)
        limit = threshold_ms * self._UNIT
        return sum(
            item.count_added_in_this_iter_step
            for item in merged.get_recorded_iterator()
            if item.value_iterated_to <= limit
        )


class FastDigestMonitor(_RingMonitor):
    name = "fastdigest"

    def __init__(self, clock: Callable[[], float]) -> None:
        import fastdigest

        self._module = fastdigest
        super().__init__(clock)

    def _new(self) -> Any:
        return self._module.TDigest()  # keeps count, sum, min and max itself

    def _add(self, part: _Part, value: float) -> None:
        part.sketch.update(value)

    def _stats(self, live: list[_Part]) -> dict[str, float | int]:
        merged = self._module.merge_all(part.sketch for part in live)
        values = merged.quantile_vec([q for _, q in QUANTILES])
        low, high = merged.min(), merged.max()
        return _result(merged.n_values, merged.sum(), low, high, values)

    def _count_le(self, live: list[_Part], threshold_ms: float) -> int:
        merged = self._module.merge_all(part.sketch for part in live)
        return round(merged.cdf(threshold_ms) * merged.n_values)

    def native_bytes(self) -> int:
        # Rust heap: 16 bytes (mean, weight) per centroid, a lower bound
        return sum(
            16 * part.sketch.n_centroids
            for ring in self._series.values()
            for part in ring
            if part.sketch is not None
        )


LIBRARIES: tuple[tuple[str, str, type[_RingMonitor]], ...] = (
    # (distribution name, module to import, wrapper)
    ("ddsketch", "ddsketch", DDSketchMonitor),
    ("hdrhistogram", "hdrh", HdrMonitor),
    ("fastdigest", "fastdigest", FastDigestMonitor),
)


class _OursAdapter:
    """LatencyMonitor, with count_at_or_below returning the count only."""

    name = OURS

    def __init__(self, clock: Callable[[], float]) -> None:
        self.monitor = LatencyMonitor(WINDOW_S, slices=SLICES, clock=clock)
        self.record = self.monitor.record
        self.get_stats = self.monitor.get_stats

    def count_at_or_below(self, component: str, threshold_ms: float) -> int:
        return self.monitor.count_at_or_below(component, threshold_ms)[0]

    def native_bytes(self) -> int:
        return 0


def available() -> tuple[list[tuple[str, Callable[[Callable[[], float]], Any]]], list[str]]:
    """[(name, factory)] with LatencyMonitor first, and a note per library left out."""
    makers: list[tuple[str, Callable[[Callable[[], float]], Any]]] = [(OURS, _OursAdapter)]
    notes: list[str] = []
    for name, module, cls in LIBRARIES:
        try:
            __import__(module)
        except ImportError:
            notes.append(f"{name}: not installed, skipped (uv pip install {name})")
            continue
        makers.append((name, cls))
    return makers, notes


def versions(names: list[str]) -> dict[str, str]:
    """The installed version of each library benchmarked."""
    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "?"
    return found


# --- data -------------------------------------------------------------------------------------


def datasets(samples: int, seed: int = 7) -> dict[str, list[float]]:
    """Two windows' worth of each kind of latency: the first fills the window, the second
    slides it (so slices expire), and the window then holds about `samples`."""
    rng = random.Random(seed)
    total = 2 * samples
    lognormal = [rng.lognormvariate(math.log(600.0), 0.45) for _ in range(total)]
    # a fast path and a slow one (a tool call, a cold LLM): two humps, a gap between them
    bimodal = [
        rng.lognormvariate(math.log(450.0), 0.2)
        if rng.random() < 0.8
        else rng.lognormvariate(math.log(2500.0), 0.3)
        for _ in range(total)
    ]
    # scripted delays: p50 falls on 250.0, p95 on 800.0, p99 on 1200.0 (away from the seams)
    points = [250.0] * (total * 60 // 100) + [800.0] * (total * 37 // 100)
    points += [1200.0] * (total - len(points))
    rng.shuffle(points)
    return {"lognormal": lognormal, "bimodal": bimodal, "point masses": points}


def _fill(make: Callable[[_Clock], Any], values: list[float], samples: int) -> tuple[Any, float]:
    """Record all values (clock sliding one step per record); returns the monitor and the
    seconds spent on the last `samples` records (steady state: the window is full)."""
    clock = _Clock(samples)
    monitor = make(clock)
    record = monitor.record
    warm = len(values) - samples
    for value in values[:warm]:
        record("e2e", value)
    start = time.perf_counter()
    for value in values[warm:]:
        record("e2e", value)
    elapsed = time.perf_counter() - start
    clock.step = 0.0  # queries then see one fixed window
    return monitor, elapsed


def window_values(values: list[float], samples: int) -> list[float]:
    """The values a 30-slice window holds after `_fill`: those of the last 30 slices."""
    clock = _Clock(samples)  # the same float steps, so the same slice at every seam
    slice_s = WINDOW_S / SLICES
    ids = [int(clock() // slice_s) for _ in values]
    oldest = ids[-1] - SLICES + 1
    return [value for value, slice_id in zip(values, ids, strict=True) if slice_id >= oldest]


# --- measurements -----------------------------------------------------------------------------


def _memory(make: Callable[[_Clock], Any], values: list[float], samples: int) -> int:
    # Separate pass: tracemalloc slows every allocation, so it must not touch the timings.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    monitor, _ = _fill(make, values, samples)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    used += monitor.native_bytes()
    del monitor
    return used


def accuracy(make: Callable[[_Clock], Any], values: list[float], samples: int) -> dict[str, Any]:
    monitor, _ = _fill(make, values, samples)
    stats = monitor.get_stats("e2e")
    window = window_values(values, samples)
    ordered = sorted(window)
    errors = {}
    for key, q in QUANTILES:
        exact = exact_quantile(ordered, q)
        errors[key] = abs(float(stats[key]) - exact) / exact
    exact_mean = math.fsum(window) / len(window)
    exact_stats = (
        stats["count"] == len(window)
        and stats["min"] == ordered[0]
        and stats["max"] == ordered[-1]
        and math.isclose(float(stats["mean"]), exact_mean, rel_tol=1e-9)
    )
    exact_le = sum(1 for value in window if value <= SLO_MS)
    counted_le = monitor.count_at_or_below("e2e", SLO_MS)
    return {
        "errors": errors,
        "exact_stats": exact_stats,
        "slo_count": counted_le,
        "slo_exact_count": exact_le,
        "slo_exact": counted_le == exact_le,
    }


def run(samples: int, repeat: int, budget_s: float) -> dict[str, Any]:
    makers, notes = available()
    for note in notes:
        print(f"note: {note}")
    data = datasets(samples)
    timing_values = data["lognormal"]

    record_us: dict[str, list[float]] = {name: [] for name, _ in makers}
    stats_us: dict[str, list[float]] = {name: [] for name, _ in makers}
    for rep in range(repeat):
        # interleaved, the order rotating each repetition, so drift hits every monitor alike
        order = makers[rep % len(makers) :] + makers[: rep % len(makers)]
        for name, make in order:
            gc.collect()
            monitor, elapsed = _fill(make, timing_values, samples)
            record_us[name].append(elapsed / samples * 1e6)
            query = monitor.get_stats
            stats_us[name].append(seconds_per_call(lambda q=query: q("e2e"), budget_s) * 1e6)
            del monitor

    rows: dict[str, dict[str, Any]] = {}
    for name, make in makers:
        rows[name] = {
            "record_us": statistics.median(record_us[name]),
            "stats_us": statistics.median(stats_us[name]),
            "memory_bytes": _memory(make, timing_values, samples),
            "accuracy": {kind: accuracy(make, values, samples) for kind, values in data.items()},
        }
    window = len(window_values(timing_values, samples))
    return {
        "samples_in_window": window,
        "repeat": repeat,
        "versions": versions([name for name, _ in makers if name != OURS]),
        "skipped": notes,
        "rows": rows,
    }


def format_report(result: dict[str, Any]) -> str:
    rows: dict[str, dict[str, Any]] = result["rows"]
    ours = rows[OURS]
    lines = [
        f"window 300 s in 30 slices, {result['samples_in_window']} samples in it (lognormal), "
        f"medians of {result['repeat']} interleaved repetitions",
        "versions: "
        + (", ".join(f"{k} {v}" for k, v in result["versions"].items()) or "no library"),
        "",
        f"{'monitor':<15} {'record µs':>10} {'get_stats µs':>13} {'memory KiB':>11} "
        f"{'record x':>9} {'get_stats x':>12} {'memory x':>9}",
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<15} {row['record_us']:>10.2f} {row['stats_us']:>13.1f} "
            f"{row['memory_bytes'] / 1024:>11.1f} {row['record_us'] / ours['record_us']:>8.2f}x "
            f"{row['stats_us'] / ours['stats_us']:>11.1f}x "
            f"{row['memory_bytes'] / ours['memory_bytes']:>8.2f}x"
        )
    lines.append(f"(x = this monitor / {OURS}, same run)")
    lines.append("")
    lines.append(
        f"{'monitor':<15} {'data':<13} {'p50 err %':>10} {'p95 err %':>10} {'p99 err %':>10} "
        f"{'cnt/mean/min/max':>17} {'<=800ms count':>21}"
    )
    for name, row in rows.items():
        for kind, acc in row["accuracy"].items():
            errors = acc["errors"]
            slo = (
                "exact"
                if acc["slo_exact"]
                else f"{acc['slo_count'] - acc['slo_exact_count']:+d} of {acc['slo_exact_count']}"
            )
            lines.append(
                f"{name:<15} {kind:<13} {errors['median'] * 100:>10.3f} "
                f"{errors['p95'] * 100:>10.3f} {errors['p99'] * 100:>10.3f} "
                f"{'exact' if acc['exact_stats'] else 'NOT exact':>17} {slo:>21}"
            )
    lines.append("(err = |reported - exact| / exact, exact by linear interpolation)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer samples, one repetition")
    parser.add_argument("--samples", type=int, default=None, help="samples in the window")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repetitions")
    args = parser.parse_args(argv)
    samples = args.samples or (2_000 if args.quick else 10_000)
    repeat = args.repeat or (1 if args.quick else 5)
    result = run(samples, repeat, budget_s=0.05 if args.quick else 0.3)
    print(format_report(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
