"""measure_latency inside a real AgentSession: a tool and an `on_user_turn_completed` override
timed with it land in the session's monitor, its Prometheus histogram and, as `voice.<name>`
child spans, in the trace of the turn they ran for."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

import pytest
from livekit.agents import function_tool, llm
from opentelemetry.sdk.trace import ReadableSpan
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe import measure
from lk_observe.demo import ScriptedAgent, ScriptedTurn, build_pipeline, run_pipeline
from tests.otel import memory_tracing, turn_root

RETRIEVAL_S = 0.12  # the tool's own wait (the scripted tool delay)
CRM_S = 0.06  # on_user_turn_completed's lookup
EMBEDDING_S = 0.03  # blocking work the tool runs in a thread (asyncio.to_thread)
AGENT = "measured_agent"
TOLERANCE_MS = 5.0
SPAN_TOLERANCE_S = 0.001


@dataclass
class Timed:
    """What the timed code saw of itself: (wall start, wall end) of each run."""

    runs: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.runs.setdefault(name, []).append((start, time.time()))


class MeasuredAgent(ScriptedAgent):
    timed: Timed

    async def on_user_turn_completed(
        self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage
    ) -> None:
        await super().on_user_turn_completed(turn_ctx, new_message)
        async with lk_observe.measure_latency("crm"):
            start = time.time()
            await asyncio.sleep(CRM_S)
            self.timed.add("crm", start)

    @function_tool
    @lk_observe.measure_latency("retrieval")
    async def lookup(self, turn: int) -> str:  # type: ignore[override]
        """Look something up for the caller."""
        start = time.time()
        result: str = await ScriptedAgent.lookup(self, turn)  # sleeps the scripted tool delay
        await asyncio.to_thread(self.embed)
        self.timed.add("retrieval", start)
        return result

    @lk_observe.measure_latency("embedding")
    def embed(self) -> None:
        start = time.time()
        time.sleep(EMBEDDING_S)
        self.timed.add("embedding", start)


@dataclass
class Played:
    turns: list[lk_observe.Turn]
    monitor: lk_observe.LatencyMonitor
    registry: CollectorRegistry
    spans: list[ReadableSpan]
    roots: dict[int, ReadableSpan]
    timed: Timed
    handle: lk_observe.InstrumentHandle


@pytest.fixture(scope="module")
def played() -> Played:
    measure._reset_for_tests()

    async def go() -> Played:
        provider, exporter = memory_tracing()
        registry = CollectorRegistry()
        monitor = lk_observe.LatencyMonitor()
        pipeline = build_pipeline([ScriptedTurn(tool_s=RETRIEVAL_S), ScriptedTurn()])
        agent = MeasuredAgent(pipeline.truth, {0: RETRIEVAL_S})
        agent.timed = Timed()
        pipeline = replace(pipeline, agent=agent)
        turns: list[lk_observe.Turn] = []
        handle = lk_observe.instrument(
            pipeline.session,
            agent_name=AGENT,
            tracer_provider=provider,
            registry=registry,
            monitor=monitor,
            on_turn=turns.append,
        )
        await run_pipeline(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.sleep(0.05)  # on_turn hand-backs run on this loop
        spans = list(exporter.get_finished_spans())
        roots = {
            turn.trace_id: turn_root(exporter, turn.trace_id)
            for turn in turns
            if turn.trace_id is not None
        }
        return Played(turns, monitor, registry, spans, roots, agent.timed, handle)

    return asyncio.run(go())


def durations_ms(runs: list[tuple[float, float]]) -> list[float]:
    return sorted((end - start) * 1000.0 for start, end in runs)


def test_the_timed_code_ran_where_expected(played: Played) -> None:
    assert len(played.timed.runs["retrieval"]) == 1  # the first turn calls the tool
    assert len(played.timed.runs["embedding"]) == 1  # in a thread, from the tool
    assert len(played.timed.runs["crm"]) == 2  # every user turn
    assert [t.kind for t in played.turns if t.complete] == ["user", "user"]


def test_the_monitor_has_each_measurement_under_the_sessions_agent(played: Played) -> None:
    for name, sleep_s in (
        ("retrieval", RETRIEVAL_S + EMBEDDING_S),
        ("crm", CRM_S),
        ("embedding", EMBEDDING_S),
    ):
        stats = played.monitor.get_stats(name, agent=AGENT)
        seen = durations_ms(played.timed.runs[name])
        assert stats["count"] == len(seen)
        assert sleep_s * 1000.0 <= stats["min"] <= sleep_s * 1000.0 + TOLERANCE_MS + 20.0
        assert stats["min"] == pytest.approx(seen[0], abs=TOLERANCE_MS)
        assert stats["max"] == pytest.approx(seen[-1], abs=TOLERANCE_MS)
        assert played.monitor.get_stats(name)["count"] == len(seen)  # and in the aggregate


def test_the_latency_histogram_has_each_measurement(played: Played) -> None:
    for name in ("retrieval", "crm", "embedding"):
        labels = {"component": name, "agent": AGENT, "provider": "", "model": ""}
        count = played.registry.get_sample_value("voice_agent_latency_seconds_count", labels)
        total = played.registry.get_sample_value("voice_agent_latency_seconds_sum", labels)
        seen = durations_ms(played.timed.runs[name])
        assert count == len(seen)
        assert total is not None
        assert total * 1000.0 == pytest.approx(sum(seen), abs=TOLERANCE_MS * len(seen))


def test_nothing_was_skipped(played: Played) -> None:
    assert measure.skipped_measurements() == {}
    assert played.handle.handler_failures == 0
    assert not any(k.startswith("measured") for k in played.handle.skipped)
    failures = played.registry.get_sample_value(
        "voice_agent_sink_failures_total", {"sink": "measure"}
    )
    assert not failures


def test_each_turn_carries_what_ran_for_it(played: Played) -> None:
    first, second = (t for t in played.turns if t.complete)
    assert sorted(name for name, _ in first.measured) == ["crm", "embedding", "retrieval"]
    assert [name for name, _ in second.measured] == ["crm"]


def test_measurements_are_child_spans_of_the_turn_at_their_real_times(played: Played) -> None:
    runs = {name: sorted(r) for name, r in played.timed.runs.items()}
    expected = {  # turn index -> (name, (start, end)) as the timed code saw itself
        0: [
            ("crm", runs["crm"][0]),
            ("embedding", runs["embedding"][0]),
            ("retrieval", runs["retrieval"][0]),
        ],
        1: [("crm", runs["crm"][1])],
    }
    for index, turn in enumerate(t for t in played.turns if t.complete):
        root = played.roots[turn.trace_id]  # type: ignore[index]
        assert root.context is not None
        children = sorted(
            (
                span
                for span in played.spans
                if span.parent is not None
                and span.parent.span_id == root.context.span_id
                and (span.attributes or {}).get("voice.measured") is True
            ),
            key=lambda span: span.name,
        )
        assert [span.name for span in children] == [f"voice.{n}" for n, _ in expected[index]]
        for span, (_, (start, end)) in zip(children, expected[index], strict=True):
            assert span.start_time is not None and span.end_time is not None
            assert span.context is not None
            assert span.context.trace_id == root.context.trace_id
            # the measurement brackets the code's own clock reads, a few µs outside them
            assert span.start_time / 1e9 == pytest.approx(start, abs=SPAN_TOLERANCE_S)
            assert span.end_time / 1e9 == pytest.approx(end, abs=SPAN_TOLERANCE_S)
            assert span.start_time / 1e9 <= start and span.end_time / 1e9 >= end - 1e-4
            assert root.start_time is not None and root.end_time is not None
            assert root.end_time >= span.end_time
