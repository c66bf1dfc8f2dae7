"""Merging monitor snapshots: a merged view equals one monitor fed every sample; bad snapshots
are refused whole, before anything changes."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from lk_observe.monitor import LatencyMonitor, MergedMonitor, SnapshotError
from lk_observe.promql import LATENCY_BUCKETS_S
from lk_observe.slo import DEFAULT_SLOS, evaluate
from tests.unit.test_monitor import FakeClock, exact_quantile

MAX_RELATIVE_ERROR = 0.01  # the monitor's contract, kept by the merge


EDGES_MS = [edge * 1000.0 for edge in LATENCY_BUCKETS_S]


def roundtrip(monitor: LatencyMonitor) -> Any:
    """Through JSON text, as between processes."""
    return json.loads(json.dumps(monitor.snapshot()))


@pytest.mark.parametrize("seed", range(4))
def test_merged_percentiles_equal_one_monitor_fed_every_sample(seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock(10_000.0)
    parts = [LatencyMonitor(clock=clock) for _ in range(3)]
    single = LatencyMonitor(clock=clock)
    values: dict[str, list[float]] = {"support": [], "sales": []}
    for step in range(3_000):
        clock.now += 0.05  # spreads samples over 150 s: half the window's slices
        agent_name = rng.choice(("support", "sales"))
        value = (
            rng.lognormvariate(math.log(650.0), 0.5)
            if rng.random() < 0.9
            else rng.choice(EDGES_MS)  # point masses right on the Prometheus edges
        )
        values[agent_name].append(value)
        parts[step % 3].record("e2e", value, agent=agent_name)
        single.record("e2e", value, agent=agent_name)

    merged = MergedMonitor.like(single)
    for part in parts:
        merged.merge(roundtrip(part))

    everything = values["support"] + values["sales"]
    for agent_name, expected in ((None, everything), ("support", values["support"])):
        got = merged.get_stats("e2e", agent=agent_name)
        want = single.get_stats("e2e", agent=agent_name)
        assert got["count"] == want["count"] == len(expected)
        assert got["min"] == min(expected) and got["max"] == max(expected)
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-12)
        for key, q in (("median", 0.5), ("p95", 0.95), ("p99", 0.99)):
            assert got[key] == want[key]  # the same bucket totals: the same answer
            exact = exact_quantile(expected, q)
            assert abs(got[key] - exact) / exact <= MAX_RELATIVE_ERROR, (key, got[key], exact)
        for edge in EDGES_MS:
            exact_good = sum(1 for v in expected if v <= edge)
            assert merged.count_at_or_below("e2e", edge, agent=agent_name) == (
                exact_good,
                len(expected),
            ), edge
    assert merged.get_all_stats().keys() == single.get_all_stats().keys()
    for slo in DEFAULT_SLOS:
        assert evaluate(slo, merged) == evaluate(slo, single)


def test_a_merged_view_is_read_only() -> None:
    merged = MergedMonitor.like(LatencyMonitor(clock=FakeClock(10_000.0)))
    # a view changes only by merging snapshots: it has no way to record
    assert not hasattr(merged, "record") and not hasattr(merged, "record_turn")
    assert not isinstance(merged, LatencyMonitor)
    assert merged.get_stats("e2e")["count"] == 0
    assert merged.get_all_stats() == {}


def test_expired_slices_leave_the_merged_window_like_in_one_monitor() -> None:
    clock = FakeClock(10_000.0)
    writer, single = LatencyMonitor(clock=clock), LatencyMonitor(clock=clock)
    for second in range(300):
        clock.now += 1.0
        for monitor in (writer, single):
            monitor.record("e2e", 100.0 + second)
    snapshot = roundtrip(writer)
    for later in (0.0, 60.0, 150.0, 299.0, 310.0):
        clock.now += later
        merged = MergedMonitor.like(single)
        merged.merge(snapshot)
        assert merged.get_stats("e2e") == single.get_stats("e2e"), later
        clock.now -= later
    clock.now += 310.0
    merged = MergedMonitor.like(single)
    merged.merge(snapshot)
    assert merged.get_stats("e2e")["count"] == 0


def test_slices_from_another_clock_are_refused_whole() -> None:
    writer = LatencyMonitor(clock=FakeClock(now=1e9))
    writer.record("e2e", 100.0)
    merged = MergedMonitor.like(LatencyMonitor(clock=FakeClock(now=1000.0)))
    with pytest.raises(SnapshotError) as caught:
        merged.merge(writer.snapshot())
    assert caught.value.reason == "incompatible"
    assert merged.get_all_stats() == {}


def valid_state() -> dict[str, Any]:
    monitor = LatencyMonitor(clock=FakeClock(10_000.0))
    for value in (120.0, 480.0, 800.0):
        monitor.record("e2e", value, agent="support")
    state: dict[str, Any] = roundtrip(monitor)
    return state


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        target: Any = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


BAD_STATES: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "version": ("incompatible", _set(("v",), 99)),
    "layout": ("incompatible", _set(("layout",), "1:00000000")),
    "window": ("incompatible", _set(("window_s",), 60.0)),
    "series_not_list": ("corrupt", _set(("series",), {"e2e": 1})),
    "count_mismatch": ("corrupt", _set(("series", 0, "s", 0, 1), 7)),
    "bucket_out_of_range": ("corrupt", _set(("series", 0, "s", 0, 5), [10**6, 1])),
    "negative_count": ("corrupt", _set(("series", 0, "s", 0, 5), [5, -1])),
    "bool_count": ("corrupt", _set(("series", 0, "s", 0, 1), True)),
    "nan_sum": ("corrupt", _set(("series", 0, "s", 0, 2), math.nan)),
    "min_outside_bucket": ("corrupt", _set(("series", 0, "s", 0, 3), 1.0)),
    "empty_component": ("corrupt", _set(("series", 0, "c"), "")),
    "duplicate_series": ("corrupt", lambda s: s["series"].append(s["series"][0])),
    "slice_shape": ("corrupt", _set(("series", 0, "s", 0), [1, 2, 3])),
}


@pytest.mark.parametrize("name", sorted(BAD_STATES))
def test_bad_snapshots_are_refused_before_changing_anything(name: str) -> None:
    reason, change = BAD_STATES[name]
    state = valid_state()
    change(state)
    merged = MergedMonitor.like(LatencyMonitor(clock=FakeClock(10_000.0)))
    merged.merge(valid_state())
    before = merged.get_all_stats()
    with pytest.raises(SnapshotError) as caught:
        merged.merge(state)
    assert caught.value.reason == reason
    assert merged.get_all_stats() == before
