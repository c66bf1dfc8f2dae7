"""LatencyMonitor: accuracy vs exact percentiles, window expiry, bounded memory, bad input."""

from __future__ import annotations

import logging
import math
import random
import statistics
import threading
import tracemalloc
from collections.abc import Callable

import pytest

from lk_observe.monitor import STAT_KEYS, LatencyMonitor, default_monitor
from lk_observe.promql import LATENCY_BUCKETS_S
from lk_observe.turns import Turn

# The accuracy contract: p50/p95/p99 within 1% (relative) of the exact percentile.
MAX_RELATIVE_ERROR = 0.01


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exact_quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), by sorting."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * q
    k = math.floor(h)
    if k + 1 >= len(ordered):
        return ordered[k]
    return ordered[k] + (h - k) * (ordered[k + 1] - ordered[k])


def _uniform(rng: random.Random) -> float:
    return rng.uniform(1.0, 2000.0)


def _lognormal(rng: random.Random) -> float:
    return rng.lognormvariate(math.log(700.0), 0.4)


def _bimodal(rng: random.Random) -> float:
    return rng.gauss(250.0, 20.0) if rng.random() < 0.8 else rng.gauss(1400.0, 100.0)


def _pareto(rng: random.Random) -> float:
    return 50.0 * rng.paretovariate(1.5)


def _point_masses(rng: random.Random) -> float:
    # Scripted fakes produce repeated exact delays: the worst case for in-bucket interpolation.
    return rng.choice((123.0, 345.6, 801.0, 1999.0))


DISTRIBUTIONS: dict[str, Callable[[random.Random], float]] = {
    "uniform": _uniform,
    "lognormal": _lognormal,
    "bimodal": _bimodal,
    "pareto_heavy_tail": _pareto,
    "point_masses": _point_masses,
}


@pytest.mark.parametrize("size", [50, 1_000, 20_000])
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_percentiles_within_one_percent_of_exact(name: str, size: int) -> None:
    rng = random.Random(f"{name}-{size}")
    values = [DISTRIBUTIONS[name](rng) for _ in range(size)]
    monitor = LatencyMonitor(clock=FakeClock())
    for value in values:
        monitor.record("e2e", value)
    stats = monitor.get_stats("e2e")
    for key, q in (("median", 0.5), ("p95", 0.95), ("p99", 0.99)):
        exact = exact_quantile(values, q)
        assert abs(stats[key] - exact) / exact <= MAX_RELATIVE_ERROR, (key, stats[key], exact)


def test_count_min_max_and_mean_are_exact() -> None:
    rng = random.Random(7)
    values = [_lognormal(rng) for _ in range(5_000)]
    monitor = LatencyMonitor(clock=FakeClock())
    for value in values:
        monitor.record("stt", value)
    stats = monitor.get_stats("stt")
    assert stats["count"] == len(values)
    assert stats["min"] == min(values)
    assert stats["max"] == max(values)
    assert stats["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)


def test_constant_data_returns_the_exact_value() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    for _ in range(1_000):
        monitor.record("tts_ttfb", 61.7)
    stats = monitor.get_stats("tts_ttfb")
    assert {key: stats[key] for key in STAT_KEYS if key != "count"} == dict.fromkeys(
        ("mean", "median", "p95", "p99", "min", "max"), 61.7
    )


def test_single_sample_returns_it_for_every_statistic() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    monitor.record("llm_ttft", 287.25)
    assert monitor.get_stats("llm_ttft") == {
        "count": 1,
        "mean": 287.25,
        "median": 287.25,
        "p95": 287.25,
        "p99": 287.25,
        "min": 287.25,
        "max": 287.25,
    }


def test_no_samples_gives_count_zero_and_zeros_like_the_guide() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    expected = {"count": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "p99": 0.0}
    expected |= {"min": 0.0, "max": 0.0}
    assert monitor.get_stats("e2e") == expected
    assert list(monitor.get_stats("e2e")) == list(STAT_KEYS)
    assert monitor.get_all_stats() == {}


def test_zero_latency_is_a_valid_sample() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    monitor.record("vad", 0.0)
    monitor.record("vad", 0)
    assert monitor.get_stats("vad")["count"] == 2
    assert monitor.get_stats("vad")["p99"] == 0.0


def test_samples_expire_after_the_window_without_sleeping() -> None:
    clock = FakeClock(0.0)
    monitor = LatencyMonitor(window_s=300.0, slices=30, clock=clock)
    monitor.record("e2e", 100.0)
    clock.now = 150.0
    monitor.record("e2e", 900.0)
    clock.now = 299.9
    assert monitor.get_stats("e2e")["count"] == 2
    clock.now = 300.0  # the first sample's 10 s slice has left the window
    stats = monitor.get_stats("e2e")
    assert (stats["count"], stats["min"], stats["max"], stats["median"]) == (1, 900.0, 900.0, 900.0)
    clock.now = 460.0
    assert monitor.get_stats("e2e")["count"] == 0
    assert monitor.get_all_stats() == {"e2e": monitor.get_stats("e2e")}


def test_window_keeps_samples_at_least_window_minus_one_slice() -> None:
    clock = FakeClock(9.99)  # the end of slice 0
    monitor = LatencyMonitor(window_s=300.0, slices=30, clock=clock)
    monitor.record("e2e", 500.0)
    clock.now = 299.99
    assert monitor.get_stats("e2e")["count"] == 1
    clock.now = 300.0
    assert monitor.get_stats("e2e")["count"] == 0


def test_ring_slot_reuse_drops_the_old_slice_on_record() -> None:
    clock = FakeClock(0.0)
    monitor = LatencyMonitor(window_s=30.0, slices=3, clock=clock)
    monitor.record("e2e", 100.0)
    clock.now = 30.0  # same ring slot as t=0, one full window later
    monitor.record("e2e", 200.0)
    stats = monitor.get_stats("e2e")
    assert (stats["count"], stats["min"], stats["max"]) == (1, 200.0, 200.0)


def test_window_matches_a_plain_list_through_many_ring_wraps() -> None:
    # slices are dropped and reused in place (only their used buckets are touched): the counts
    # must stay those of exactly the samples still in the window, whatever their spread
    rng = random.Random(7)
    clock = FakeClock(0.0)
    monitor = LatencyMonitor(window_s=30.0, slices=3, clock=clock)
    kept: list[tuple[float, float]] = []
    for step in range(600):
        clock.now = step * 0.7
        value = rng.choice([rng.uniform(0.0, 0.2), rng.lognormvariate(6.0, 1.5), 200_000.0])
        monitor.record("e2e", value)
        kept.append((clock.now, value))
        oldest_slice = int(clock.now // 10.0) - 2
        live = [v for t, v in kept if int(t // 10.0) >= oldest_slice]
        threshold = rng.choice(LATENCY_BUCKETS_S) * 1000.0
        good, total = monitor.count_at_or_below("e2e", threshold)
        assert total == len(live)
        assert good == sum(v <= threshold for v in live)
        stats = monitor.get_stats("e2e")
        assert (stats["min"], stats["max"]) == (min(live), max(live))


def test_clock_stepping_back_does_not_resurrect_or_lose_samples() -> None:
    clock = FakeClock(100.0)
    monitor = LatencyMonitor(window_s=30.0, slices=3, clock=clock)
    monitor.record("e2e", 100.0)
    clock.now = 50.0
    monitor.record("e2e", 200.0)
    assert monitor.get_stats("e2e")["count"] == 2


def _traced_size(samples: int) -> int:
    rng = random.Random(3)
    values = [_lognormal(rng) for _ in range(samples)]
    clock = FakeClock(0.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        monitor = LatencyMonitor(clock=clock)
        for i, value in enumerate(values):
            clock.now = i * 290.0 / samples  # fill every slice of the window, as real traffic does
            monitor.record("e2e", value, agent="a")
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert monitor.get_stats("e2e")["count"] > 0
    return size


def test_memory_does_not_grow_with_the_number_of_samples() -> None:
    small, large = _traced_size(1_000), _traced_size(100_000)
    # Two series (aggregate + agent) of fixed arrays; the guide's deque would hold ~19 MB here.
    assert abs(large - small) <= 4096, (small, large)
    assert large < 256 * 1024


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (math.nan, "nan"),
        (math.inf, "infinite"),
        (-math.inf, "infinite"),
        (10**400, "infinite"),
        (-1.0, "negative"),
        ("12", "non_numeric"),
        (None, "non_numeric"),
        (True, "non_numeric"),
    ],
)
def test_bad_sample_is_skipped_counted_and_never_raises(value: object, reason: str) -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    monitor.record("e2e", 100.0)
    monitor.record("e2e", value)  # type: ignore[arg-type]
    assert monitor.get_stats("e2e")["count"] == 1
    assert monitor.skipped == {reason: 1}


def test_bad_component_or_agent_name_is_skipped() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    monitor.record("", 1.0)
    monitor.record(None, 1.0)  # type: ignore[arg-type]
    monitor.record("e2e", 1.0, agent="")
    assert monitor.skipped == {"bad_component": 2, "bad_agent": 1}
    assert monitor.components() == []


def test_skip_warning_is_rate_limited_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="lk_observe.monitor"):
        for _ in range(100):
            monitor.record("e2e", math.nan)
        monitor.record("e2e", -5.0)
    assert len(caplog.records) == 2
    assert monitor.skipped == {"nan": 100, "negative": 1}


def test_components_beyond_the_bound_are_skipped() -> None:
    monitor = LatencyMonitor(clock=FakeClock(), max_components=2)
    for component in ("e2e", "stt", "tts_ttfb"):
        monitor.record(component, 10.0)
    assert monitor.components() == ["e2e", "stt"]
    assert monitor.skipped == {"too_many_components": 1}


def test_agents_beyond_the_bound_still_count_in_the_aggregate() -> None:
    monitor = LatencyMonitor(clock=FakeClock(), max_agents=1)
    monitor.record("e2e", 10.0, agent="a")
    monitor.record("e2e", 20.0, agent="b")
    assert monitor.agents() == ["a"]
    assert monitor.get_stats("e2e")["count"] == 2
    assert monitor.get_stats("e2e", agent="b")["count"] == 0
    assert monitor.skipped == {"too_many_agents": 1}


def test_agent_samples_count_under_the_agent_and_the_aggregate() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    monitor.record("e2e", 100.0, agent="support")
    monitor.record("e2e", 300.0, agent="sales")
    monitor.record("e2e", 500.0)
    assert monitor.get_stats("e2e")["count"] == 3
    assert monitor.get_stats("e2e", agent="support")["max"] == 100.0
    assert monitor.get_all_stats(agent="sales") == {"e2e": monitor.get_stats("e2e", agent="sales")}
    assert monitor.agents() == ["sales", "support"]


def test_record_turn_records_every_component_under_the_turn_agent() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    turn = Turn(
        index=0,
        speech_id="s1",
        started_at=0.0,
        ended_at=1.0,
        latency_ms={"e2e": 640.0, "stt": 180.0, "llm_ttft": 250.0},
        interrupted=False,
        tier="good",
        agent="support",
    )
    monitor.record_turn(turn)
    assert monitor.components() == ["e2e", "llm_ttft", "stt"]
    assert monitor.get_stats("stt", agent="support")["median"] == 180.0
    assert sorted(monitor.get_all_stats()) == ["e2e", "llm_ttft", "stt"]


@pytest.mark.parametrize("edge_s", LATENCY_BUCKETS_S)
def test_count_at_or_below_is_exact_at_every_prometheus_edge(edge_s: float) -> None:
    edge_ms = edge_s * 1000.0
    monitor = LatencyMonitor(clock=FakeClock())
    for value in (edge_ms * 0.999, edge_ms, math.nextafter(edge_ms, math.inf), edge_ms * 1.001):
        monitor.record("e2e", value)
    monitor.record("e2e", 0.0)  # keep the threshold inside [min, max]
    monitor.record("e2e", 100_000.0)
    assert monitor.count_at_or_below("e2e", edge_ms) == (3, 6)


def test_count_at_or_below_at_800ms_counts_800_as_good() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    for value in (799.9, 800.0, 800.1):
        monitor.record("e2e", value, agent="a")
    assert monitor.count_at_or_below("e2e", 800.0) == (2, 3)
    assert monitor.count_at_or_below("e2e", 800.0, agent="a") == (2, 3)
    assert monitor.count_at_or_below("e2e", 800.0, agent="other") == (0, 0)


def test_count_at_or_below_off_edge_never_overcounts_good() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    for value in (700.0, 733.0, 760.0, 900.0):
        monitor.record("e2e", value)
    good, total = monitor.count_at_or_below("e2e", 750.0)
    assert total == 4
    assert good <= 2


def test_concurrent_record_and_read_lose_no_samples() -> None:
    monitor = LatencyMonitor()
    errors: list[BaseException] = []

    def writer(agent: str) -> None:
        rng = random.Random(agent)
        for _ in range(20_000):
            monitor.record("e2e", rng.uniform(1.0, 1000.0), agent=agent)

    def reader() -> None:
        try:
            for _ in range(300):
                stats = monitor.get_stats("e2e")
                assert stats["min"] <= stats["median"] <= stats["max"]
                monitor.get_all_stats()
        except BaseException as exc:  # surfaced below: a thread's failure is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
    threads.append(threading.Thread(target=reader))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert monitor.get_stats("e2e")["count"] == 40_000
    assert monitor.get_stats("e2e", agent="a")["count"] == 20_000


def test_default_monitor_is_one_instance_per_process() -> None:
    seen: list[LatencyMonitor] = []
    threads = [threading.Thread(target=lambda: seen.append(default_monitor())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(monitor is default_monitor() for monitor in seen)
