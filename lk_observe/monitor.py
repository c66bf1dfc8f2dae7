"""Rolling-window latency percentiles in fixed memory (the guide's LatencyMonitor API).

Not ddsketch/hdrhistogram: a sliding window needs a running total minus the expiring slice,
which fixed log buckets give for free and DDSketch lacks (merging 30 sketches per query is slow).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import multiprocessing.util
import operator
import os
import re
import stat
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING, Any

from lk_observe.metrics import LATENCY_BUCKETS_S, _pid_alive, multiproc_dir

if TYPE_CHECKING:
    from lk_observe.turns import Turn

__all__ = [
    "STAT_KEYS",
    "LatencyMonitor",
    "MergedMonitor",
    "MergedView",
    "RecentTurns",
    "SnapshotError",
    "SnapshotReader",
    "SnapshotWriter",
    "default_monitor",
    "default_recent_turns",
    "snapshot_sinks",
    "snapshot_writer",
    "turn_summary",
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
_ZEROS = [0] * _N_BUCKETS

# Snapshots from another process merge only into the same bucket layout (a different lk_observe
# version could have other bounds: adding its counts bucket by bucket would be wrong, not close).
SNAPSHOT_VERSION = 1
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
        if self.counts is not None:
            self.counts = array("I", _ZEROS)
        self.count = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf


class _Series:
    """Ring of slices plus a running total of the live slices' bucket counts."""

    __slots__ = ("count", "ring", "totals")

    def __init__(self, slices: int) -> None:
        self.ring = [_Slice() for _ in range(slices)]
        self.totals = array("q", _ZEROS)
        self.count = 0

    def _drop(self, part: _Slice) -> None:
        if part.count and part.counts is not None:
            self.totals = array("q", map(operator.sub, self.totals, part.counts))
            self.count -= part.count

    def add(self, bucket: int, value: float, slice_id: int) -> None:
        part = self.ring[slice_id % len(self.ring)]
        if part.id != slice_id:
            self._drop(part)  # this ring slot held a slice that has left the window
            part.reset(slice_id)
        if part.counts is None:
            part.counts = array("I", _ZEROS)
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
            part.counts = array("I", _ZEROS)
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


class LatencyMonitor:
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
    first = bisect.bisect_left(_BOUNDS, part.low)
    last = bisect.bisect_left(_BOUNDS, part.high)
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


class RecentTurns:
    """The last `maxlen` turns, for the live page. Thread-safe; `add` is a turn sink."""

    def __init__(self, maxlen: int = 50) -> None:
        self._turns: deque[Turn] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, turn: Turn) -> None:
        with self._lock:
            self._turns.append(turn)

    def __len__(self) -> int:
        return len(self._turns)

    def turns(self) -> list[Turn]:
        """Oldest first."""
        with self._lock:
            return list(self._turns)


_default_recent: RecentTurns | None = None
_default_recent_lock = threading.Lock()


def default_recent_turns() -> RecentTurns:
    """The process-wide ring that instrument() feeds and the ops app's live page reads."""
    global _default_recent
    with _default_recent_lock:
        if _default_recent is None:
            _default_recent = RecentTurns()
        return _default_recent


# -- multiprocess: every job process's window in the ops app -----------------------------------
#
# LiveKit runs each job in its own process; the ops app runs in the worker's main process and
# its own monitor sees no turns. Each process that records turns writes its window (live slices,
# sparse bucket counts, count/sum/min/max, slice ids) to
# $PROMETHEUS_MULTIPROC_DIR/lk_observe/monitor_<pid>.json at most once a second; the app adds
# them up bucket by bucket, which is exact: merged counts equal one monitor fed every sample.
# Slice ids come from time.monotonic, one clock for every process of a host (the directory is
# per host anyway: prometheus_client's mmap files need that too).

SNAPSHOT_DIRNAME = "lk_observe"
MAX_SNAPSHOT_BYTES = 1 << 20  # per process; a larger snapshot drops per-agent series first
MAX_SNAPSHOT_FILES = 256  # read per merge, newest first
MAX_SNAPSHOT_TOTAL_BYTES = 64 << 20  # read per merge
_MAX_CACHED_BYTES = 16 << 20  # of files whose parsed content the reader keeps between merges
SNAPSHOT_RECENT_TURNS = 20  # per process
SNAPSHOT_INTERVAL_S = 1.0
_MAX_SLICE_COUNT = 1 << 24  # per process and slice: 256 files cannot overflow the uint32 buckets
_MAX_NAME = 256
_LIVE_FILE = re.compile(r"^monitor_(\d{1,10})\.json$")
# A cleanly exited process renames its last snapshot: it counts until its slices expire.
_FINAL_FILE = re.compile(r"^monitor_(\d{1,10})\.(\d{1,20})\.final\.json$")
_TEMP_FILE = re.compile(r"^\.monitor_(\d{1,10})\.json\.tmp$")
_TIERS = ("excellent", "good", "slow")


def turn_summary(turn: Turn) -> dict[str, Any]:
    """A finished turn as the live page shows it: numbers and ids only (no speech or session
    ids, no user text)."""
    origin = min((stage.start for stage in turn.stages.values()), default=turn.started_at)
    return {
        "index": turn.index,
        "kind": turn.kind,
        "agent": turn.agent,
        "tier": turn.tier,
        "interrupted": turn.interrupted,
        "ended_at": turn.ended_at,
        "latency_ms": dict(turn.latency_ms),
        # offsets from the turn's first stage, so the page can draw a waterfall
        "stages": {
            name: [(stage.start - origin) * 1000.0, (stage.end - origin) * 1000.0]
            for name, stage in turn.stages.items()
        },
        "tool_calls": turn.tool_calls,
        "trace_id": None if turn.trace_id is None else f"{turn.trace_id:032x}",
    }


class SnapshotError(ValueError):
    """A snapshot that cannot be merged; `reason` is "corrupt" or "incompatible"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


_Part = tuple[int, int, float, float, float, list[tuple[int, int]]]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME


def _corrupt(detail: str) -> SnapshotError:
    return SnapshotError("corrupt", detail)


def _parse_slice(raw: object) -> _Part:
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
) -> list[tuple[str, str | None, list[_Part]]]:
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
    parsed: list[tuple[str, str | None, list[_Part]]] = []
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


class MergedMonitor(LatencyMonitor):
    """Read-only sum of monitor snapshots: the LatencyMonitor queries (get_stats,
    get_all_stats, count_at_or_below, so slo.evaluate too) over several processes.

    Same guarantees as one monitor fed every sample: per slice the bucket counts add up, so
    percentiles stay within 1%, counts at Prometheus edges stay exact, min/max/count exact.
    """

    @classmethod
    def like(cls, monitor: LatencyMonitor) -> MergedMonitor:
        """An empty view with `monitor`'s window, slices, clock and limits."""
        return cls(
            monitor._window_s,
            slices=monitor._slices,
            clock=monitor._clock,
            max_components=monitor._max_components,
            max_agents=monitor._max_agents,
        )

    def record(
        self,
        component: str,
        duration_ms: float,
        metadata: Mapping[str, object] | None = None,
        *,
        agent: str | None = None,
    ) -> None:
        """Refused (counted as "read_only"): a view changes only by merging snapshots."""
        self._skip("read_only", component, duration_ms)

    def record_turn(self, turn: Turn) -> None:
        """Refused like `record`, once per component."""
        for component, duration_ms in turn.latency_ms.items():
            self._skip("read_only", component, duration_ms)

    def merge(self, state: object) -> None:
        """Add a snapshot (`LatencyMonitor.snapshot()`, maybe read back from JSON).

        Raises SnapshotError, before changing anything, when it is malformed or comes from a
        monitor with another window, slice count, bucket layout or clock.
        """
        self.merge_parsed(parse_snapshot(state, self._window_s, self._slices))

    def merge_parsed(self, parsed: list[tuple[str, str | None, list[_Part]]]) -> None:
        """`merge` of a snapshot already validated by `parse_snapshot` for this window."""
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


def _clean_summary(raw: object) -> dict[str, Any]:
    """A turn summary read from another process's snapshot, checked field by field."""
    if not isinstance(raw, dict):
        raise _corrupt("recent turn is not an object")
    latency, stages = raw.get("latency_ms"), raw.get("stages")
    tier, trace_id = raw.get("tier"), raw.get("trace_id")
    if not (
        _is_int(raw.get("index"))
        and raw.get("kind") in ("user", "agent")
        and _is_name(raw.get("agent"))
        and (tier is None or tier in _TIERS)
        and isinstance(raw.get("interrupted"), bool)
        and _is_number(raw.get("ended_at"))
        and _is_int(raw.get("tool_calls"))
        and (trace_id is None or (isinstance(trace_id, str) and len(trace_id) == 32))
        and isinstance(latency, dict)
        and len(latency) <= 16
        and all(_is_name(k) and _is_number(v) for k, v in latency.items())
        and isinstance(stages, dict)
        and len(stages) <= 16
        and all(
            _is_name(k) and isinstance(v, list) and len(v) == 2 and all(map(_is_number, v))
            for k, v in stages.items()
        )
    ):
        raise _corrupt("bad recent turn")
    return {
        key: raw[key]
        for key in (
            "index",
            "kind",
            "agent",
            "tier",
            "interrupted",
            "ended_at",
            "latency_ms",
            "stages",
            "tool_calls",
            "trace_id",
        )
    }


def snapshot_dir(base: str) -> str:
    """Where processes leave their monitor snapshots, under PROMETHEUS_MULTIPROC_DIR."""
    return os.path.join(base, SNAPSHOT_DIRNAME)


class SnapshotWriter:
    """Writes one process's monitor window (and its last few turns) for the ops app to merge.

    `notify` is a turn sink: it only flags the change. A daemon thread writes at most every
    `min_interval_s` (a trailing write included, so the last turn of a burst is not stranded)
    with write-temp-then-os.replace, so a reader never sees half a file. No fsync: the crash
    that matters is the process's, and the page cache outlives it. `close` writes a final
    snapshot under a ".final" name that readers keep counting until its slices expire.
    """

    def __init__(
        self,
        monitor: LatencyMonitor,
        directory: str,
        *,
        recent: RecentTurns | None = None,
        min_interval_s: float = SNAPSHOT_INTERVAL_S,
        max_bytes: int = MAX_SNAPSHOT_BYTES,
        recent_turns: int = SNAPSHOT_RECENT_TURNS,
    ) -> None:
        self.monitor = monitor
        self.directory = directory
        self.pid = os.getpid()
        self.path = os.path.join(directory, f"monitor_{self.pid}.json")
        self._temp = os.path.join(directory, f".monitor_{self.pid}.json.tmp")
        self._recent = recent
        self._min_interval_s = min_interval_s
        self._max_bytes = max_bytes
        self._recent_turns = recent_turns
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._dirty = False
        self._closed = False
        self._finalized = False
        self._thread: threading.Thread | None = None
        self.writes = 0
        self.failures = 0
        self.truncated = 0  # series left out of size-capped snapshots, in total
        self.last_bytes = 0
        self._warned_at = -math.inf

    def notify(self, turn: Turn | None = None) -> None:
        """The monitor changed: write within min_interval_s. Cheap; never blocks on I/O."""
        del turn
        with self._cond:
            if self._closed:
                return
            self._dirty = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="lk-observe-snapshot", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and write the final snapshot (if anything was ever recorded)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = self._dirty or self.writes > 0
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if pending:
            self._write_logged(final=True, timeout_s=timeout_s)

    def write(self, *, final: bool = False, timeout_s: float = -1) -> int:
        """Write the snapshot now; its size in bytes (0 when skipped). Blocking: off the loop."""
        if not self._write_lock.acquire(timeout=timeout_s):
            raise TimeoutError("a snapshot write is stuck")
        try:
            if self._finalized:
                return 0
            data = self._encode(final)
            os.makedirs(self.directory, exist_ok=True)
            with open(self._temp, "wb") as file:
                file.write(data)
            os.replace(self._temp, self.path)
            if final:
                # A rename keeps the file under one name at any moment: never counted twice.
                final_name = f"monitor_{self.pid}.{time.time_ns()}.final.json"
                os.replace(self.path, os.path.join(self.directory, final_name))
                self._finalized = True
            self.writes += 1
            self.last_bytes = len(data)
            return len(data)
        finally:
            self._write_lock.release()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._dirty = False
            self._write_logged(final=False)
            with self._cond:  # throttle; close() cuts the wait short
                self._cond.wait_for(lambda: self._closed, self._min_interval_s)

    def _write_logged(self, *, final: bool, timeout_s: float = -1) -> None:
        try:
            self.write(final=final, timeout_s=timeout_s)
        except Exception:  # a full disk costs the ops app this process's numbers, nothing more
            self.failures += 1
            logger.warning("lk_observe could not write a monitor snapshot", exc_info=True)

    def _encode(self, final: bool) -> bytes:
        state = self.monitor.snapshot()
        series: list[dict[str, Any]] = state.pop("series")
        state.update(pid=self.pid, final=final, written_at=time.time())
        recent_json = "[]"
        if self._recent is not None and self._recent_turns > 0:
            summaries = []
            for turn in self._recent.turns()[-self._recent_turns :]:
                # the reader's own check: one odd turn must not get the whole file refused
                with contextlib.suppress(SnapshotError):
                    summaries.append(_clean_summary(turn_summary(turn)))
            try:
                recent_json = _dumps(summaries)
            except ValueError:  # NaN in a turn: the page loses those turns, not the numbers
                recent_json = "[]"
            if len(recent_json) > self._max_bytes // 4:
                recent_json = "[]"
        head = _dumps(state)
        used = len(head) + len(recent_json) + 64
        kept: list[str] = []
        dropped = 0
        for entry in series:  # aggregates first: dropping from the end loses per-agent views
            text = _dumps(entry)
            too_long = len(entry["c"]) > _MAX_NAME or len(entry["a"] or "") > _MAX_NAME
            if too_long or used + len(text) + 1 > self._max_bytes:
                dropped += 1
                continue
            kept.append(text)
            used += len(text) + 1
        if dropped:
            self.truncated += dropped
        if dropped and time.monotonic() - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = time.monotonic()
            logger.warning(
                "lk_observe snapshot: %d series left out (over %d bytes or names over %d chars)",
                dropped,
                self._max_bytes,
                _MAX_NAME,
            )
        # head is a non-empty object: splice the big lists in without re-encoding them
        series_json = ",".join(kept)
        body = (
            f'{head[:-1]},"truncated":{dropped},"series":[{series_json}],"recent":{recent_json}}}'
        )
        return body.encode()


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


_writer: SnapshotWriter | None = None
_writer_lock = threading.Lock()
_writer_mismatch_logged = False


def snapshot_writer(monitor: LatencyMonitor) -> SnapshotWriter | None:
    """This process's writer when PROMETHEUS_MULTIPROC_DIR is set (else None), bound to the
    first monitor it is asked for: one file per process holds one monitor."""
    global _writer, _writer_mismatch_logged
    base = multiproc_dir()
    if base is None:
        return None
    with _writer_lock:
        if _writer is None:
            _writer = SnapshotWriter(monitor, snapshot_dir(base), recent=default_recent_turns())
            # also runs when a multiprocessing child (a LiveKit job process) returns
            multiprocessing.util.Finalize(None, _close_writer, exitpriority=10)
        if _writer.monitor is monitor:
            return _writer
        if not _writer_mismatch_logged:
            _writer_mismatch_logged = True
            logger.warning(
                "lk_observe shares one monitor per process with the ops app; "
                "turns recorded into another monitor stay in this process"
            )
        return None


def snapshot_sinks(monitor: LatencyMonitor) -> list[tuple[str, Callable[[Turn], None]]]:
    """The turn sinks that share `monitor` with the ops app ([] outside multiprocess mode)."""
    writer = snapshot_writer(monitor)
    return [] if writer is None else [("snapshot", writer.notify)]


def _close_writer() -> None:
    writer = _writer
    if writer is not None and writer.pid == os.getpid():
        writer.close()


def _forget_writer_after_fork() -> None:
    # The child has the parent's writer object but not its thread, and another pid.
    global _writer
    _writer = None


if hasattr(os, "register_at_fork"):  # POSIX only; nothing forks elsewhere
    os.register_at_fork(after_in_child=_forget_writer_after_fork)


@dataclass(frozen=True)
class MergedView:
    """What the ops app shows in multiprocess mode."""

    monitor: MergedMonitor
    recent: list[dict[str, Any]]  # turn summaries, oldest first
    processes: int  # other processes' snapshots merged in


@dataclass(frozen=True)
class _Candidate:
    path: str
    pid: int
    final: bool
    mtime_ns: int
    size: int


# a snapshot file's validated series and recent turns
_Parsed = tuple[list[tuple[str, str | None, list[_Part]]], list[dict[str, Any]]]


class SnapshotReader:
    """Merges a monitor with the snapshots other processes left in `directory`.

    Blocking (file I/O): call `view()` from a worker thread. Results are cached for
    `max_age_s`, so the page's simultaneous requests share one merge. Bad files (corrupt,
    truncated, too large, another version or window) are skipped and counted in `skipped`.
    Files of dead processes that did not exit cleanly are deleted, as are expired final files.
    """

    def __init__(
        self,
        monitor: LatencyMonitor,
        directory: str,
        *,
        recent: RecentTurns | None = None,
        max_age_s: float = 0.5,
        max_files: int = MAX_SNAPSHOT_FILES,
        max_bytes: int = MAX_SNAPSHOT_BYTES,
        max_total_bytes: int = MAX_SNAPSHOT_TOTAL_BYTES,
        recent_turns: int = 50,
    ) -> None:
        self.monitor = monitor
        self.directory = directory
        self._recent = recent
        self._max_age_s = max_age_s
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._max_total_bytes = max_total_bytes
        self._recent_turns = recent_turns
        self._lock = threading.Lock()
        self._cached: MergedView | None = None
        self._cached_at = -math.inf
        self._skipped: dict[str, int] = {}
        self._last_warned: dict[str, float] = {}
        # (path, mtime_ns, size) -> what the file held; only files of the latest listing
        self._parsed: dict[tuple[str, int, int], _Parsed | str] = {}

    @property
    def skipped(self) -> dict[str, int]:
        """Snapshot files skipped so far, by reason (a copy)."""
        with self._lock:
            return dict(self._skipped)

    def view(self) -> MergedView:
        """This process's monitor plus every live process's snapshot. Never raises."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached_at < self._max_age_s:
                return self._cached
            try:
                view = self._merge()
            except Exception:  # the ops app must answer; at worst with this process alone
                logger.exception("lk_observe could not merge monitor snapshots")
                self._count("error", self.directory)
                view = self._merge_own()
            self._cached, self._cached_at = view, time.monotonic()
            return view

    def _merge_own(self) -> MergedView:
        merged = MergedMonitor.like(self.monitor)
        merged.merge(self.monitor.snapshot())
        recent = [] if self._recent is None else [turn_summary(t) for t in self._recent.turns()]
        return MergedView(merged, recent[-self._recent_turns :], 0)

    def _merge(self) -> MergedView:
        own = self._merge_own()
        merged, recent = own.monitor, own.recent
        processes = 0
        budget = self._max_total_bytes
        parsed_before, self._parsed = self._parsed, {}
        cached_bytes = 0
        for candidate in self._candidates():
            key = (candidate.path, candidate.mtime_ns, candidate.size)
            # A file unchanged since the last merge (every final one, most live ones at the
            # page's poll rate) is not read or validated again.
            entry = parsed_before.get(key)
            if entry is None:
                if budget < candidate.size:
                    self._count("over_limit", candidate.path)
                    continue
                budget -= candidate.size
                entry = self._load(candidate.path)
                if entry is None:
                    continue
            if cached_bytes + candidate.size <= _MAX_CACHED_BYTES:
                self._parsed[key] = entry
                cached_bytes += candidate.size
            if isinstance(entry, str):
                self._count(entry, candidate.path)
                continue
            series, cleaned = entry
            try:
                merged.merge_parsed(series)
            except SnapshotError as exc:
                self._count(exc.reason, candidate.path)
                continue
            recent.extend(cleaned)
            processes += 1
        recent.sort(key=_ended_at)
        return MergedView(merged, recent[-self._recent_turns :], processes)

    def _load(self, path: str) -> _Parsed | str | None:
        """A file's validated content, or why it is skipped (None: gone meanwhile)."""
        data = self._read(path)
        if data is None:
            return None
        if len(data) > self._max_bytes:
            return "too_large"
        try:
            state = json.loads(data)
            if not isinstance(state, dict):
                raise _corrupt("not a JSON object")
            summaries = state.get("recent", [])
            if not isinstance(summaries, list) or len(summaries) > 4 * SNAPSHOT_RECENT_TURNS:
                raise _corrupt("bad recent list")
            cleaned = [_clean_summary(raw) for raw in summaries]
            series = parse_snapshot(state, self.monitor.window_s, self.monitor._slices)
        except SnapshotError as exc:
            return exc.reason
        except (ValueError, RecursionError):  # not JSON: truncated, garbage, not UTF-8
            return "corrupt"
        return series, cleaned

    def _candidates(self) -> list[_Candidate]:
        """Snapshots worth reading, newest first; deletes those of dead or long-gone processes."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError:
            self._count("unreadable", self.directory)
            return []
        own = os.getpid()
        wall_ns = time.time_ns()
        # after this long a file holds no live slice (mtime is its last write)
        horizon_ns = int((self.monitor.window_s * (1 + 1 / self.monitor._slices) + 1) * 1e9)
        found: list[_Candidate] = []
        for name in names:
            path = os.path.join(self.directory, name)
            temp = _TEMP_FILE.match(name)
            if temp is not None:
                if not _pid_alive(int(temp.group(1))):
                    _remove(path)  # a writer died between write and rename
                continue
            live, final = _LIVE_FILE.match(name), _FINAL_FILE.match(name)
            match = live or final
            if match is None:
                continue
            pid = int(match.group(1))
            if live is not None and pid == own:
                continue  # this process's monitor is merged directly, and fresher
            try:
                info = os.lstat(path)
            except OSError:
                continue  # renamed or deleted meanwhile
            if not stat.S_ISREG(info.st_mode):
                continue
            expired = wall_ns - info.st_mtime_ns > horizon_ns
            if final is not None:
                if expired:
                    _remove(path)
                    continue
            elif not _pid_alive(pid):
                # killed without a goodbye (no final snapshot): drop it, as /metrics drops its
                # live gauges; its turns are in Prometheus counters, not in this window
                _remove(path)
                self._count("dead", path)
                continue
            elif expired:
                self._count("stale", path)
                continue
            found.append(_Candidate(path, pid, final is not None, info.st_mtime_ns, info.st_size))
        # mid-rename a process can show under both names: the final one wins
        finals = {c.pid: c.mtime_ns for c in found if c.final}
        found = [c for c in found if c.final or finals.get(c.pid, -1) < c.mtime_ns]
        found.sort(key=_newest_first)
        for extra in found[self._max_files :]:
            self._count("over_limit", extra.path)
        return found[: self._max_files]

    def _read(self, path: str) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None  # the process exited (renamed to final) or was reaped meanwhile
        except OSError:
            self._count("unreadable", path)
            return None
        try:
            with os.fdopen(fd, "rb") as file:
                data = file.read(self._max_bytes + 1)
        except OSError:
            self._count("unreadable", path)
            return None
        return data  # one byte over max_bytes tells _load it is too large

    def _count(self, reason: str, path: str) -> None:
        self._skipped[reason] = self._skipped.get(reason, 0) + 1
        if reason in ("dead", "stale"):
            return  # routine: processes end
        now = time.monotonic()
        last = self._last_warned.get(reason)
        if last is not None and now - last < _WARN_EVERY_S:
            return
        self._last_warned[reason] = now
        logger.warning("lk_observe skipped monitor snapshot %s (%s)", path, reason)


def _ended_at(summary: dict[str, Any]) -> float:
    return float(summary["ended_at"])


def _newest_first(candidate: _Candidate) -> int:
    return -candidate.mtime_ns


def _remove(path: str) -> None:
    # another reader may have removed it first; a read-only directory leaves it for someone else
    with contextlib.suppress(OSError):
        os.unlink(path)
