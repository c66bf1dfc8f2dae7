"""Rolling-window latency percentiles in fixed memory (the guide's LatencyMonitor API). Pure:
no files, no threads of its own; multiprocess.py moves snapshots between processes.

Not ddsketch/hdrhistogram: a sliding window needs a running total minus the expiring slice,
which fixed log buckets give for free and DDSketch lacks (merging 30 sketches per query is slow).
"""

from __future__ import annotations

import bisect
import logging
import math
import operator
import re
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Mapping
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING, Any

from lk_observe.promql import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from lk_observe.turns import Turn

__all__ = [
    "STAT_KEYS",
    "LatencyMonitor",
    "LatencyView",
    "MergedMonitor",
    "SnapshotError",
    "default_monitor",
    "parse_snapshot",
]

logger = logging.getLogger(__name__)

STAT_KEYS = ("count", "mean", "median", "p95", "p99", "min", "max")

# Bucket layout: 2% log steps from 0.1 ms to 120 s, with every Prometheus edge merged in so SLO
# thresholds are exact boundaries. Buckets are (lower, upper], as Prometheus counts `le`.
_LOWEST_MS = 0.1
_HIGHEST_MS = 120_000.0
_GROWTH = 1.02
_WARN_EVERY_S = 60.0  # one log line per skip reason per minute: bad input must not flood logs


def _bucket_bounds() -> tuple[float, ...]:
    steps = math.ceil(math.log(_HIGHEST_MS / _LOWEST_MS) / math.log(_GROWTH))
    edges = {_LOWEST_MS * _GROWTH**i for i in range(steps + 1)}
    # Same expression as SLO.threshold_ms, so `threshold_ms in bounds` holds bit for bit.
    edges.update(edge * 1000.0 for edge in LATENCY_BUCKETS_S)
    return tuple(sorted(edges))


_BOUNDS: tuple[float, ...] = _bucket_bounds()
_N_BUCKETS = len(_BOUNDS) + 1  # [0] underflow (<= 0.1 ms), [-1] overflow (> 120 s)


def _representatives() -> tuple[float, ...]:
    # Geometric midpoint: within sqrt(1.02) - 1 = 0.995% of any value in the bucket, whatever the
    # data; interpolating by rank inside a bucket can be 2% off on point masses (scripted delays).
    mids = [math.sqrt(lo * hi) for lo, hi in pairwise(_BOUNDS)]
    return (_BOUNDS[0] / 2.0, *mids, _BOUNDS[-1])


_REPRESENTATIVE: tuple[float, ...] = _representatives()
_ZERO_COUNTS = array("I", bytes(4 * _N_BUCKETS))  # copied (a memcpy) for each new slice
_ZERO_TOTALS = array("q", bytes(8 * _N_BUCKETS))

# Snapshots from another process merge only into the same bucket layout (a different lk_observe
# version could have other bounds: adding its counts bucket by bucket would be wrong, not close).
SNAPSHOT_VERSION = 1
MAX_NAME_LENGTH = 256  # of a component or agent name in a snapshot
_MAX_SLICE_COUNT = 1 << 24  # per process and slice: 256 files cannot overflow the uint32 buckets
_LAYOUT = f"{len(_BOUNDS)}:{zlib.crc32(repr(_BOUNDS).encode()):08x}"


def _empty_stats() -> dict[str, float | int]:
    # The guide's shape with nothing in the window: count 0 and zeros, never a missing key.
    return {"count": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}


class _Slice:
    """One sub-window: dense bucket counts plus exact count, sum, min and max."""

    __slots__ = ("count", "counts", "high", "id", "low", "total")

    def __init__(self) -> None:
        self.id = -1
        # Allocated on first use, so a quiet series costs little; never larger than one array.
        self.counts: array[int] | None = None
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf

    def reset(self, slice_id: int) -> None:
        self.id = slice_id
        counts = self.counts
        if counts is not None and self.count:
            first, last = self.used_range()  # zero in place just what was used
            counts[first : last + 1] = _ZERO_COUNTS[first : last + 1]
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf

    def used_range(self) -> tuple[int, int]:
        """First and last bucket that can be non-zero: those of its min and max (a call fills a
        few dozen of the ~730, so dropping or reusing a slice touches those, not all)."""
        return bisect.bisect_left(_BOUNDS, self.low), bisect.bisect_left(_BOUNDS, self.high)


class _Series:
    """Ring of slices plus a running total of the live slices' bucket counts."""

    __slots__ = ("count", "ring", "totals")

    def __init__(self, slices: int) -> None:
        self.ring = [_Slice() for _ in range(slices)]
        self.totals = array("q", _ZERO_TOTALS)
        self.count = 0

    def _drop(self, part: _Slice) -> None:
        counts = part.counts
        if part.count and counts is not None:
            first, last = part.used_range()
            totals = self.totals
            totals[first : last + 1] = array(
                "q", map(operator.sub, totals[first : last + 1], counts[first : last + 1])
            )
            self.count -= part.count

    def add(self, bucket: int, value: float, slice_id: int) -> None:
        part = self.ring[slice_id % len(self.ring)]
        if part.id != slice_id:
            self._drop(part)  # this ring slot held a slice that has left the window
            part.reset(slice_id)
        if part.counts is None:
            part.counts = array("I", _ZERO_COUNTS)
        part.counts[bucket] += 1
        part.count += 1
        part.total += value
        if value < part.low:
            part.low = value
        if value > part.high:
            part.high = value
        self.totals[bucket] += 1
        self.count += 1

    def merge(
        self,
        slice_id: int,
        pairs: list[tuple[int, int]],
        count: int,
        total: float,
        low: float,
        high: float,
    ) -> None:
        """Add another monitor's slice (same layout, same slice clock) into this ring."""
        part = self.ring[slice_id % len(self.ring)]
        if part.id > slice_id:
            return  # the slot holds a newer slice: this one has already left the window
        if part.id != slice_id:
            self._drop(part)
            part.reset(slice_id)
        if part.counts is None:
            part.counts = array("I", _ZERO_COUNTS)
        counts, totals = part.counts, self.totals
        for bucket, n in pairs:
            counts[bucket] += n
            totals[bucket] += n
        part.count += count
        part.total += total
        part.low = min(part.low, low)
        part.high = max(part.high, high)
        self.count += count

    def expire(self, current_id: int) -> None:
        oldest_live = current_id - len(self.ring) + 1
        for part in self.ring:
            if part.id != -1 and part.id < oldest_live:
                self._drop(part)
                part.reset(-1)

    def live(self) -> list[_Slice]:
        return [part for part in self.ring if part.count]


def _quantile(cumulative: list[int], count: int, q: float, low: float, high: float) -> float:
    """Linear-interpolated quantile (numpy's default) of bucketed samples, within [low, high]."""

    def order_stat(k: int) -> float:
        bucket = bisect.bisect_right(cumulative, k)
        return min(max(_REPRESENTATIVE[bucket], low), high)

    h = (count - 1) * q
    k = math.floor(h)
    below = order_stat(k)
    if k + 1 >= count:
        return below
    return below + (h - k) * (order_stat(k + 1) - below)


class _Window:
    """The series of one rolling window and every operation on them, under one lock."""

    def __init__(
        self,
        window_s: float = 300.0,
        *,
        slices: int = 30,
        clock: Callable[[], float] = time.monotonic,
        max_components: int = 64,
        max_agents: int = 64,
    ) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a positive number, got {window_s!r}")
        if slices < 1:
            raise ValueError(f"slices must be >= 1, got {slices!r}")
        self._window_s = float(window_s)
        self._slices = slices
        self._slice_s = self._window_s / slices
        self._clock = clock
        self._max_components = max_components
        self._max_agents = max_agents
        self._lock = threading.Lock()
        # Key (component, agent); agent None is the aggregate over all agents.
        self._series: dict[tuple[str, str | None], _Series] = {}
        self._components: set[str] = set()
        self._agents: set[str] = set()
        self._latest_id = -1  # a clock stepping back reuses the newest slice instead of old ones
        self._skipped: dict[str, int] = {}
        self._last_warned: dict[str, float] = {}

    @property
    def window_s(self) -> float:
        return self._window_s

    @property
    def slices(self) -> int:
        return self._slices

    def like(self) -> _Window:
        """An empty window with this one's length, slices, clock and limits."""
        return _Window(
            self._window_s,
            slices=self._slices,
            clock=self._clock,
            max_components=self._max_components,
            max_agents=self._max_agents,
        )

    @property
    def skipped(self) -> dict[str, int]:
        """Samples refused so far, by reason (a copy)."""
        with self._lock:
            return dict(self._skipped)

    def components(self) -> list[str]:
        with self._lock:
            return sorted(self._components)

    def agents(self) -> list[str]:
        with self._lock:
            return sorted(self._agents)

    def record(self, component: str, duration_ms: float, agent: str | None) -> None:
        reason = self._rejection(component, duration_ms, agent)
        if reason is not None:
            self._skip(reason, component, duration_ms)
            return
        value = float(duration_ms)
        with self._lock:
            self._record_locked(component, value, agent, self._current_id())

    def record_turn(self, turn: Turn) -> None:
        """Record every measured component of a finished turn under the turn's agent."""
        agent = turn.agent
        samples: list[tuple[str, float]] = []
        for component, duration_ms in turn.latency_ms.items():
            reason = self._rejection(component, duration_ms, agent)
            if reason is not None:
                self._skip(reason, component, duration_ms)
            else:
                samples.append((component, float(duration_ms)))
        with self._lock:  # one lock and one clock read for the whole turn
            slice_id = self._current_id()
            for component, value in samples:
                self._record_locked(component, value, agent, slice_id)

    def _record_locked(
        self, component: str, value: float, agent: str | None, slice_id: int
    ) -> None:
        bucket = bisect.bisect_left(_BOUNDS, value)
        aggregate = self._series_for(component, None)
        if aggregate is None:
            self._skip_locked("too_many_components", component, value)
            return
        aggregate.add(bucket, value, slice_id)
        if agent is None:
            return
        per_agent = self._series_for(component, agent)
        if per_agent is None:
            # The aggregate keeps the sample; only the per-agent view loses it.
            self._skip_locked("too_many_agents", agent, value)
            return
        per_agent.add(bucket, value, slice_id)

    def get_stats(self, component: str, *, agent: str | None = None) -> dict[str, float | int]:
        """count, mean, median, p95, p99, min, max (ms) over the window; zeros when empty."""
        with self._lock:
            series = self._series.get((component, agent))
            if series is None:
                return _empty_stats()
            series.expire(self._current_id())
            return self._stats(series)

    def get_all_stats(self, *, agent: str | None = None) -> dict[str, dict[str, float | int]]:
        """get_stats for every component seen under `agent` (None: all agents together)."""
        with self._lock:
            current = self._current_id()
            result: dict[str, dict[str, float | int]] = {}
            for (component, owner), series in sorted(self._series.items(), key=_series_order):
                if owner == agent:
                    series.expire(current)
                    result[component] = self._stats(series)
            return result

    def count_at_or_below(
        self, component: str, threshold_ms: float, *, agent: str | None = None
    ) -> tuple[int, int]:
        """(samples <= threshold_ms, all samples) in the window.

        Exact when the threshold is a Prometheus bucket edge (every SLO threshold is) or outside
        the window's [min, max]; otherwise rounded down to the bucket boundary below, so an SLO
        never looks better than it is.
        """
        if math.isnan(threshold_ms):
            raise ValueError("threshold_ms must be a number, got NaN")
        with self._lock:
            series = self._series.get((component, agent))
            if series is None:
                return 0, 0
            series.expire(self._current_id())
            total = series.count
            live = series.live()
            if total == 0:
                return 0, 0
            if threshold_ms >= max(part.high for part in live):
                return total, total
            if threshold_ms < min(part.low for part in live):
                return 0, total
            edge = bisect.bisect_left(_BOUNDS, threshold_ms)
            exact = edge < len(_BOUNDS) and math.isclose(_BOUNDS[edge], threshold_ms)
            last_good = edge if exact else edge - 1  # bucket `edge` ends at _BOUNDS[edge]
            return sum(series.totals[: last_good + 1]), total

    def snapshot(self) -> dict[str, Any]:
        """The window's live slices as plain JSON-able data, for `MergedMonitor.merge` in
        another process. Aggregate series come first (a size-capped writer drops from the end).
        """
        with self._lock:
            current = self._current_id()
            copied: list[
                tuple[
                    str, str | None, list[tuple[int, int, float, float, float, tuple[int, bytes]]]
                ]
            ]
            copied = []
            for (component, agent), series in sorted(self._series.items(), key=_snapshot_order):
                series.expire(current)
                parts = [
                    (part.id, part.count, part.total, part.low, part.high, _used(part))
                    for part in sorted(series.live(), key=_slice_id)
                    if part.counts is not None
                ]
                if parts:
                    copied.append((component, agent, parts))
        # Encoded outside the lock: record() on the sink thread must not wait for this.
        return {
            "v": SNAPSHOT_VERSION,
            "layout": _LAYOUT,
            "window_s": self._window_s,
            "slices": self._slices,
            "now": current,
            "series": [
                {
                    "c": component,
                    "a": agent,
                    "s": [[i, n, t, lo, hi, _sparse(*used)] for i, n, t, lo, hi, used in parts],
                }
                for component, agent, parts in copied
            ],
        }

    def merge_parsed(self, parsed: list[tuple[str, str | None, list[SnapshotPart]]]) -> None:
        """Add snapshot slices already validated by `parse_snapshot` for this window."""
        with self._lock:
            current = self._current_id()
            newest = max((part[0] for _, _, parts in parsed for part in parts), default=current)
            # The writer read the clock before we did; one slice of slack covers the race. More
            # than that is another clock, whose ids would expire everything here.
            if newest > current + 1:
                raise SnapshotError("incompatible", "slices from the future: another clock?")
            if newest > self._latest_id:
                self._latest_id = newest
            oldest_live = self._latest_id - self._slices + 1
            for component, agent, parts in parsed:
                series = self._series_for(component, agent)
                if series is None:
                    reason = "too_many_agents" if agent is not None else "too_many_components"
                    self._skip_locked(reason, agent or component, sum(p[1] for p in parts))
                    continue
                for slice_id, count, total, low, high, pairs in parts:
                    if slice_id >= oldest_live:
                        series.merge(slice_id, pairs, count, total, low, high)

    def _current_id(self) -> int:
        slice_id = int(self._clock() // self._slice_s)
        if slice_id > self._latest_id:
            self._latest_id = slice_id
        return self._latest_id

    def _series_for(self, component: str, agent: str | None) -> _Series | None:
        key = (component, agent)
        series = self._series.get(key)
        if series is not None:
            return series
        if component not in self._components:
            if len(self._components) >= self._max_components:
                return None
            self._components.add(component)
        if agent is not None and agent not in self._agents:
            if len(self._agents) >= self._max_agents:
                return None
            self._agents.add(agent)
        series = self._series[key] = _Series(self._slices)
        return series

    @staticmethod
    def _stats(series: _Series) -> dict[str, float | int]:
        count = series.count
        if count == 0:
            return _empty_stats()
        live = series.live()
        low = min(part.low for part in live)
        high = max(part.high for part in live)
        cumulative = list(accumulate(series.totals))
        mean = math.fsum(part.total for part in live) / count
        return {
            "count": count,
            "mean": min(max(mean, low), high),  # float rounding must not leave [min, max]
            "median": _quantile(cumulative, count, 0.50, low, high),
            "p95": _quantile(cumulative, count, 0.95, low, high),
            "p99": _quantile(cumulative, count, 0.99, low, high),
            "min": low,
            "max": high,
        }

    @staticmethod
    def _rejection(component: object, duration_ms: object, agent: object) -> str | None:
        if not isinstance(component, str) or not component:
            return "bad_component"
        if agent is not None and (not isinstance(agent, str) or not agent):
            return "bad_agent"
        # bool is an int subclass, but True ms is a caller bug, not a latency.
        if isinstance(duration_ms, bool) or not isinstance(duration_ms, (int, float)):
            return "non_numeric"
        try:
            value = float(duration_ms)
        except OverflowError:  # an int beyond float range
            return "infinite"
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "infinite"
        if value < 0:
            return "negative"
        return None

    def _skip(self, reason: str, subject: object, value: object) -> None:
        with self._lock:
            self._skip_locked(reason, subject, value)

    def _skip_locked(self, reason: str, subject: object, value: object) -> None:
        self._skipped[reason] = self._skipped.get(reason, 0) + 1
        now = time.monotonic()
        last = self._last_warned.get(reason)
        if last is not None and now - last < _WARN_EVERY_S:
            return
        self._last_warned[reason] = now
        logger.warning(
            "latency sample skipped (%s): %r=%r; %d skipped for this reason so far",
            reason,
            subject,
            value,
            self._skipped[reason],
        )


def _series_order(item: tuple[tuple[str, str | None], _Series]) -> str:
    return item[0][0]


def _snapshot_order(item: tuple[tuple[str, str | None], _Series]) -> tuple[bool, str, str]:
    (component, agent), _ = item
    return (agent is not None, agent or "", component)


def _slice_id(part: _Slice) -> int:
    return part.id


_NONZERO_BYTE = re.compile(rb"[^\x00]")


def _used(part: _Slice) -> tuple[int, bytes]:
    """The slice's buckets from its min's to its max's (the rest are zero), as raw bytes."""
    assert part.counts is not None
    first, last = part.used_range()
    return first, part.counts[first : last + 1].tobytes()


def _sparse(first: int, raw: bytes) -> list[int]:
    """Non-zero buckets as a flat [bucket, count, bucket, count, ...] list."""
    counts = array("I")
    counts.frombytes(raw)
    flat: list[int] = []
    last = -1
    # The regex scans the bytes in C: a busy call fills a handful of buckets per slice, and a
    # Python loop over all ~720 of them was most of a snapshot's cost.
    for match in _NONZERO_BYTE.finditer(raw):
        index = match.start() // counts.itemsize
        if index != last:
            flat += (first + index, counts[index])
            last = index
    return flat


class LatencyView:
    """The LatencyMonitor queries over a rolling window: one process's monitor, or the sum of
    several processes' snapshots (MergedMonitor). Thread-safe."""

    def __init__(self, window: _Window) -> None:
        self._window = window

    @property
    def window_s(self) -> float:
        return self._window.window_s

    @property
    def slices(self) -> int:
        return self._window.slices

    @property
    def skipped(self) -> dict[str, int]:
        """Samples refused so far, by reason (a copy)."""
        return self._window.skipped

    def components(self) -> list[str]:
        return self._window.components()

    def agents(self) -> list[str]:
        return self._window.agents()

    def get_stats(self, component: str, *, agent: str | None = None) -> dict[str, float | int]:
        """count, mean, median, p95, p99, min, max (ms) over the window; zeros when empty."""
        return self._window.get_stats(component, agent=agent)

    def get_all_stats(self, *, agent: str | None = None) -> dict[str, dict[str, float | int]]:
        """get_stats for every component seen under `agent` (None: all agents together)."""
        return self._window.get_all_stats(agent=agent)

    def count_at_or_below(
        self, component: str, threshold_ms: float, *, agent: str | None = None
    ) -> tuple[int, int]:
        """(samples <= threshold_ms, all samples) in the window.

        Exact when the threshold is a Prometheus bucket edge (every SLO threshold is) or outside
        the window's [min, max]; otherwise rounded down to the bucket boundary below, so an SLO
        never looks better than it is.
        """
        return self._window.count_at_or_below(component, threshold_ms, agent=agent)


class LatencyMonitor(LatencyView):
    """Rolling percentiles of per-component latencies (ms) over the last `window_s` seconds.

    The window is a ring of `slices` sub-windows: a sample counts for at least
    `window_s - window_s / slices` and at most `window_s` seconds. Memory is fixed per
    (component, agent) series and queries cost O(buckets), whatever the traffic. Percentiles are
    within 1% (relative) of the exact linear-interpolated percentile for values in 0.1 ms-120 s;
    min, max, mean and count are exact. Thread-safe.
    """

    def __init__(
        self,
        window_s: float = 300.0,
        *,
        slices: int = 30,
        clock: Callable[[], float] = time.monotonic,
        max_components: int = 64,
        max_agents: int = 64,
    ) -> None:
        super().__init__(
            _Window(
                window_s,
                slices=slices,
                clock=clock,
                max_components=max_components,
                max_agents=max_agents,
            )
        )

    def record(
        self,
        component: str,
        duration_ms: float,
        metadata: Mapping[str, object] | None = None,
        *,
        agent: str | None = None,
    ) -> None:
        """Add one latency sample. Never raises: bad input is counted in `skipped` and logged.

        `metadata` is accepted for the guide's API and not stored: keeping it would make memory
        grow with traffic.
        """
        del metadata
        self._window.record(component, duration_ms, agent)

    def record_turn(self, turn: Turn) -> None:
        """Record every measured component of a finished turn under the turn's agent."""
        self._window.record_turn(turn)

    def snapshot(self) -> dict[str, Any]:
        """The window's live slices as plain JSON-able data, for `MergedMonitor.merge` in
        another process. Aggregate series come first (a size-capped writer drops from the end).
        """
        return self._window.snapshot()


class MergedMonitor(LatencyView):
    """Read-only sum of monitor snapshots: the LatencyMonitor queries (get_stats,
    get_all_stats, count_at_or_below, so slo.evaluate too) over several processes.

    Same guarantees as one monitor fed every sample: per slice the bucket counts add up, so
    percentiles stay within 1%, counts at Prometheus edges stay exact, min/max/count exact.
    """

    @classmethod
    def like(cls, view: LatencyView) -> MergedMonitor:
        """An empty view with `view`'s window, slices, clock and limits."""
        return cls(view._window.like())

    def merge(self, state: object) -> None:
        """Add a snapshot (`LatencyMonitor.snapshot()`, maybe read back from JSON).

        Raises SnapshotError, before changing anything, when it is malformed or comes from a
        monitor with another window, slice count, bucket layout or clock.
        """
        self.merge_parsed(parse_snapshot(state, self.window_s, self.slices))

    def merge_parsed(self, parsed: list[tuple[str, str | None, list[SnapshotPart]]]) -> None:
        """`merge` of a snapshot already validated by `parse_snapshot` for this window."""
        self._window.merge_parsed(parsed)


_default: LatencyMonitor | None = None
_default_lock = threading.Lock()


def default_monitor() -> LatencyMonitor:
    """The process-wide monitor `instrument()` uses unless given one (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = LatencyMonitor()
    return _default


class SnapshotError(ValueError):
    """A snapshot that cannot be merged; `reason` is "corrupt" or "incompatible"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


SnapshotPart = tuple[int, int, float, float, float, list[tuple[int, int]]]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH


def _corrupt(detail: str) -> SnapshotError:
    return SnapshotError("corrupt", detail)


def _parse_slice(raw: object) -> SnapshotPart:
    if not isinstance(raw, list) or len(raw) != 6:
        raise _corrupt("slice is not [id, count, sum, min, max, buckets]")
    slice_id, count, total, low, high, flat = raw
    if not (_is_int(slice_id) and _is_int(count) and 0 < count <= _MAX_SLICE_COUNT):
        raise _corrupt("bad slice id or count")
    if not (_is_number(total) and _is_number(low) and _is_number(high)):
        raise _corrupt("bad sum, min or max")
    total, low, high = float(total), float(low), float(high)
    if not 0.0 <= low <= high or not low * count * (1 - 1e-9) <= total <= high * count * (1 + 1e-9):
        raise _corrupt("sum, min and max disagree")
    if not isinstance(flat, list) or not flat or len(flat) % 2 or len(flat) > 2 * _N_BUCKETS:
        raise _corrupt("bad bucket list")
    # Whole-list checks in C (map, min, sum): a merge validates ~10k slices per 32 processes.
    # `type is int` is exact for JSON (and rules out bool).
    if set(map(type, flat)) != {int}:
        raise _corrupt("non-integer bucket entry")
    buckets, counts = flat[::2], flat[1::2]
    if min(counts) <= 0 or sum(counts) != count:
        raise _corrupt("bucket counts do not add up to the count")
    if buckets[0] < 0 or buckets[-1] >= _N_BUCKETS or sorted(set(buckets)) != buckets:
        raise _corrupt("buckets not increasing within the layout")
    # min and max must sit in the first and last non-empty buckets: the counts are trustworthy
    if bisect.bisect_left(_BOUNDS, low) != buckets[0]:
        raise _corrupt("min outside its bucket")
    if bisect.bisect_left(_BOUNDS, high) != buckets[-1]:
        raise _corrupt("max outside its bucket")
    return slice_id, count, total, low, high, list(zip(buckets, counts, strict=True))


def parse_snapshot(
    state: object, window_s: float, slices: int
) -> list[tuple[str, str | None, list[SnapshotPart]]]:
    """Validate a snapshot entirely (nothing half-merged) for a monitor of this window."""
    if not isinstance(state, dict):
        raise _corrupt("not a JSON object")
    if state.get("v") != SNAPSHOT_VERSION or state.get("layout") != _LAYOUT:
        raise SnapshotError("incompatible", "another snapshot version or bucket layout")
    if state.get("window_s") != window_s or state.get("slices") != slices:
        raise SnapshotError("incompatible", "another window or slice count")
    series = state.get("series")
    if not isinstance(series, list):
        raise _corrupt("no series list")
    parsed: list[tuple[str, str | None, list[SnapshotPart]]] = []
    seen: set[tuple[str, str | None]] = set()
    for entry in series:
        if not isinstance(entry, dict):
            raise _corrupt("series is not an object")
        component, agent, raw_slices = entry.get("c"), entry.get("a"), entry.get("s")
        if not _is_name(component) or not (agent is None or _is_name(agent)):
            raise _corrupt("bad component or agent")
        assert isinstance(component, str) and (agent is None or isinstance(agent, str))
        if (component, agent) in seen:
            raise _corrupt("series listed twice")  # merging it twice would double count
        seen.add((component, agent))
        if not isinstance(raw_slices, list) or len(raw_slices) > slices:
            raise _corrupt("bad slice list")
        parts = [_parse_slice(raw) for raw in raw_slices]
        if len({part[0] for part in parts}) != len(parts):
            raise _corrupt("slice listed twice")
        parsed.append((component, agent, parts))
    return parsed
