"""measure_latency outside a session: decorator and context managers, sync and async, into the
monitor and the latency histogram it is given."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe import measure
from lk_observe.livekit_events import current_speech_context
from lk_observe.measure import MAX_USER_COMPONENTS, measure_latency, skipped_measurements

TOLERANCE_MS = 15.0  # timer sleeps overshoot on a loaded machine; never undershoot


class RecordingMonitor(lk_observe.LatencyMonitor):
    """A monitor that also keeps every sample it is given, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[tuple[str, float, str | None]] = []
        self._samples_lock = threading.Lock()

    def record(
        self,
        component: str,
        duration_ms: float,
        metadata: Any = None,
        *,
        agent: str | None = None,
    ) -> None:
        with self._samples_lock:
            self.samples.append((component, duration_ms, agent))
        super().record(component, duration_ms, metadata, agent=agent)


class BrokenMonitor(lk_observe.LatencyMonitor):
    def record(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")


@pytest.fixture(autouse=True)
def fresh_names() -> Iterator[None]:
    measure._reset_for_tests()
    yield
    measure._reset_for_tests()


@pytest.fixture
def monitor() -> RecordingMonitor:
    return RecordingMonitor()


def histogram(
    registry: CollectorRegistry, component: str, agent: str = "default"
) -> tuple[float | None, float | None]:
    labels = {"component": component, "agent": agent, "provider": "", "model": ""}
    return (
        registry.get_sample_value("voice_agent_latency_seconds_count", labels),
        registry.get_sample_value("voice_agent_latency_seconds_sum", labels),
    )


def assert_took(ms: float, expected_ms: float) -> None:
    assert expected_ms - 1.0 <= ms <= expected_ms + TOLERANCE_MS, (ms, expected_ms)


def test_it_is_exported_from_the_package() -> None:
    assert lk_observe.measure_latency is measure_latency
    assert "measure_latency" in lk_observe.__all__


def test_a_sync_function_is_timed_and_keeps_its_return_value(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    @measure_latency("retrieval", monitor=monitor, registry=registry)
    def retrieve(query: str, *, k: int = 2) -> list[str]:
        """Find documents."""
        time.sleep(0.03)
        return [query] * k

    assert retrieve("q", k=3) == ["q", "q", "q"]
    assert retrieve.__name__ == "retrieve" and retrieve.__doc__ == "Find documents."
    [(component, ms, agent)] = monitor.samples
    assert (component, agent) == ("retrieval", "default")
    assert_took(ms, 30.0)
    count, total = histogram(registry, "retrieval")
    assert count == 1 and total == pytest.approx(ms / 1000.0)
    assert monitor.get_stats("retrieval", agent="default")["count"] == 1


def test_an_async_function_stays_a_coroutine_function_and_is_timed(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    @measure_latency("db", monitor=monitor, registry=registry, agent="support")
    async def query(n: int) -> int:
        await asyncio.sleep(0.04)
        return n * 2

    assert inspect.iscoroutinefunction(query)
    assert asyncio.run(query(21)) == 42
    [(component, ms, agent)] = monitor.samples
    assert (component, agent) == ("db", "support")
    assert_took(ms, 40.0)
    assert histogram(registry, "db", agent="support")[0] == 1


def test_sync_and_async_context_managers(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    timer = measure_latency("db", monitor=monitor, registry=registry)
    with timer as entered:
        time.sleep(0.02)
    assert entered is timer

    async def go() -> None:
        async with measure_latency("cache", monitor=monitor, registry=registry):
            await asyncio.sleep(0.03)

    asyncio.run(go())
    (c1, ms1, _), (c2, ms2, _) = monitor.samples
    assert (c1, c2) == ("db", "cache")
    assert_took(ms1, 20.0)
    assert_took(ms2, 30.0)
    assert histogram(registry, "db")[0] == 1 and histogram(registry, "cache")[0] == 1


def test_exceptions_propagate_and_the_time_is_still_recorded(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    timer = measure_latency("lookup", monitor=monitor, registry=registry)

    @timer
    def failing() -> None:
        time.sleep(0.01)
        raise KeyError("missing")

    @timer
    async def failing_async() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("bad")

    with pytest.raises(KeyError):
        failing()
    with pytest.raises(ValueError, match="bad"):
        asyncio.run(failing_async())
    with pytest.raises(ZeroDivisionError), timer:
        time.sleep(0.01)
        _ = 1 / 0
    assert len(monitor.samples) == 3
    for _, ms, _ in monitor.samples:
        assert_took(ms, 10.0)
    assert histogram(registry, "lookup")[0] == 3


def test_a_reused_object_nests_and_each_block_gets_its_own_time(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    timer = measure_latency("step", monitor=monitor, registry=registry)
    with timer:
        time.sleep(0.02)
        with timer:
            time.sleep(0.01)
    inner, outer = (ms for _, ms, _ in monitor.samples)
    assert_took(inner, 10.0)
    assert_took(outer, 30.0)


@pytest.mark.parametrize(
    "name",
    ["", "Retrieval", "1db", "_db", "db-lookup", "db lookup", "a" * 41, "é"],
)
def test_bad_names_are_refused_at_construction(name: str) -> None:
    with pytest.raises(ValueError, match="lowercase"):
        measure_latency(name)


@pytest.mark.parametrize(
    "name",
    [*lk_observe.COMPONENTS, "turn", "llm", "tts", "tool", "eou", "stt", "vad", "llm_round_2"],
)
def test_lk_observes_own_components_and_span_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="lk_observe's own"):
        measure_latency(name)


def test_wrong_argument_types_are_refused() -> None:
    with pytest.raises(TypeError):
        measure_latency(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        measure_latency("db", monitor="m")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        measure_latency("db", registry=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        measure_latency("db", agent=" ")
    with pytest.raises(TypeError, match="generator"):

        @measure_latency("db")
        def rows() -> Iterator[int]:
            yield 1


def test_names_past_the_cap_are_counted_and_logged_once_never_raised(
    monitor: RecordingMonitor, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(MAX_USER_COMPONENTS):
        with measure_latency(f"part_{i}", monitor=monitor, registry=registry):
            pass
    assert len(monitor.samples) == MAX_USER_COMPONENTS
    with caplog.at_level(logging.WARNING, logger="lk_observe.measure"):
        for _ in range(3):
            with measure_latency("one_too_many", monitor=monitor, registry=registry):
                pass
        with measure_latency("part_0", monitor=monitor, registry=registry):  # admitted: still in
            pass
    assert len(monitor.samples) == MAX_USER_COMPONENTS + 1
    assert skipped_measurements() == {"too_many_components": 3}
    assert len([r for r in caplog.records if "one_too_many" in r.getMessage()]) == 1
    overflow = registry.get_sample_value("voice_agent_label_overflow_total", {"label": "component"})
    assert overflow == 3
    assert histogram(registry, "one_too_many") == (None, None)


def test_a_failing_sink_never_reaches_the_timed_code(registry: CollectorRegistry) -> None:
    @measure_latency("db", monitor=BrokenMonitor(), registry=registry)
    def work() -> str:
        return "done"

    assert work() == "done"
    assert work() == "done"
    assert skipped_measurements() == {"record_failed": 2}


def test_concurrent_calls_of_one_decorated_coroutine_time_separately(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    @measure_latency("retrieval", monitor=monitor, registry=registry)
    async def retrieve(delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        return delay_s

    async def go() -> list[float]:
        return list(await asyncio.gather(retrieve(0.09), retrieve(0.03), retrieve(0.06)))

    assert asyncio.run(go()) == [0.09, 0.03, 0.06]
    durations = [ms for _, ms, _ in monitor.samples]  # in finishing order
    for ms, expected in zip(durations, (30.0, 60.0, 90.0), strict=True):
        assert_took(ms, expected)
    assert histogram(registry, "retrieval")[0] == 3


def test_one_context_manager_shared_by_concurrent_tasks_times_each_task(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    timer = measure_latency("db", monitor=monitor, registry=registry)

    async def query(delay_s: float) -> None:
        async with timer:
            await asyncio.sleep(delay_s)

    async def go() -> None:
        await asyncio.gather(query(0.08), query(0.02), query(0.05))

    asyncio.run(go())
    durations = [ms for _, ms, _ in monitor.samples]
    for ms, expected in zip(durations, (20.0, 50.0, 80.0), strict=True):
        assert_took(ms, expected)


def test_functions_run_in_threads_are_timed(
    monitor: RecordingMonitor, registry: CollectorRegistry
) -> None:
    timer = measure_latency("embedding", monitor=monitor, registry=registry)

    @timer
    def embed(delay_s: float) -> str:
        time.sleep(delay_s)
        return threading.current_thread().name

    def block(delay_s: float) -> None:
        with timer:
            time.sleep(delay_s)

    async def go() -> list[Any]:
        return list(
            await asyncio.gather(
                asyncio.to_thread(embed, 0.06),
                asyncio.to_thread(embed, 0.02),
                asyncio.to_thread(block, 0.04),
            )
        )

    names = asyncio.run(go())
    assert threading.current_thread().name not in names[:2]
    durations = sorted(ms for _, ms, _ in monitor.samples)
    for ms, expected in zip(durations, (20.0, 40.0, 60.0), strict=True):
        assert_took(ms, expected)


def test_start_is_the_wall_clock_at_entry_and_end_start_plus_duration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, float, float, str | None]] = []

    class Handle:
        metrics = None

        def record_measured(
            self, component: str, start: float, end: float, speech_id: str | None
        ) -> None:
            seen.append((component, start, end, speech_id))

    # as if the code ran inside an instrumented session's reply
    monkeypatch.setattr(measure, "_session_handle", lambda: (Handle(), "speech_1"))
    before = time.time()
    with measure_latency("db"):
        time.sleep(0.02)
    after = time.time()
    [(component, start, end, speech_id)] = seen
    assert (component, speech_id) == ("db", "speech_1")
    assert before <= start <= before + 0.002
    assert_took((end - start) * 1000.0, 20.0)
    assert end <= after + 0.002


def test_without_a_monitor_it_goes_to_the_default_monitor(registry: CollectorRegistry) -> None:
    before = lk_observe.default_monitor().get_stats("default_sink_check", agent="default")["count"]
    with measure_latency("default_sink_check", registry=registry):
        pass
    after = lk_observe.default_monitor().get_stats("default_sink_check", agent="default")["count"]
    assert after == before + 1


def test_no_speech_context_outside_a_session() -> None:
    assert current_speech_context() == (None, None)


def test_speech_context_reads_livekits_context_variables() -> None:
    from livekit.agents.voice import agent_activity

    class Activity:
        session = object()

    class Speech:
        id = "speech_123"

    def inside() -> tuple[Any, str | None]:
        agent_activity._AgentActivityContextVar.set(Activity())  # type: ignore[arg-type]
        agent_activity._SpeechHandleContextVar.set(Speech())  # type: ignore[arg-type]
        return current_speech_context()

    assert contextvars.copy_context().run(inside) == (Activity.session, "speech_123")
    assert current_speech_context() == (None, None)  # set only inside that context
