"""Trace sampling on real AgentSessions: every slow, interrupted, failed or tool-calling turn is
kept, the fraction of the rest within a binomial bound, kept + sampled out = turns, exemplars
only to kept traces, the decision reproducible, a user's OTel sampler still applied on top."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from livekit.agents import AgentSession, llm
from livekit.agents.voice.events import ErrorEvent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.sampling import KEEP_FRACTION_ENV, TurnSampler
from tests.otel import memory_tracing
from tests.replay import emit_recorded, recorded_turn, speech_of

REPLAYED = 2000
FRACTION = 0.1
FAILING_EVERY = 97  # every 97th replayed turn has an LLM error during its reply


def roots(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == "voice.turn"]


def sampled_out(registry: CollectorRegistry, agent: str) -> float | None:
    return registry.get_sample_value("voice_agent_traces_sampled_out_total", {"agent": agent})


def exemplar_trace_ids(registry: CollectorRegistry) -> set[int]:
    return {
        int(sample.exemplar.labels["trace_id"], 16)
        for family in registry.collect()
        for sample in family.samples
        if sample.exemplar is not None
    }


# -- a scripted session: the turns worth reading are all kept --------------------------------


@pytest.fixture(scope="module")
def scripted() -> tuple[list[lk_observe.Turn], InMemorySpanExporter, CollectorRegistry]:
    provider, exporter = memory_tracing()
    registry = CollectorRegistry()
    turns: list[lk_observe.Turn] = []

    async def play() -> None:
        pipeline = build_pipeline(
            [
                ScriptedTurn(),  # fast
                ScriptedTurn(llm_ttft_s=0.9, llm_total_s=1.0),  # slow: e2e over 1000 ms
                ScriptedTurn(tool_s=0.2),  # a tool call
                ScriptedTurn(reply_audio_s=2.5, barge_in_after_s=1.4),  # cut after its audio
                ScriptedTurn(),  # fast
            ]
        )
        lk_observe.instrument(
            pipeline.session,
            agent_name="sampled",
            tracer_provider=provider,
            registry=registry,
            monitor=lk_observe.LatencyMonitor(),
            on_turn=turns.append,
            trace_sampling=lk_observe.TraceSampling(keep_fraction=0.0, slower_than_ms=1000.0),
        )
        await run_pipeline(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.sleep(0.05)

    asyncio.run(play())
    return turns, exporter, registry


def test_slow_tool_and_interrupted_turns_are_kept_and_the_fast_ones_counted(scripted) -> None:  # type: ignore[no-untyped-def]
    turns, exporter, registry = scripted
    worth_reading = [
        t for t in turns if t.interrupted or t.tool_calls or t.latency_ms.get("e2e", 0) > 1000
    ]
    assert len(worth_reading) >= 3  # the slow, the tool and the interrupted turn
    assert any(t.interrupted and t.played_ms for t in worth_reading)  # decided at the end
    kept = {span.context.trace_id for span in roots(exporter)}
    assert {t.trace_id for t in worth_reading} == kept
    others = [t for t in turns if t not in worth_reading]
    assert others and all(t.trace_id is None for t in others)
    assert sampled_out(registry, "sampled") == len(others)
    assert len(kept) + len(others) == len(turns)
    # every kept trace is whole: its children came with it
    children = [s for s in exporter.get_finished_spans() if s.name != "voice.turn"]
    assert {s.context.trace_id for s in children} <= kept
    # the metrics still saw every turn
    count = registry.get_sample_value(
        "voice_agent_latency_seconds_count",
        {"component": "e2e", "agent": "sampled", "provider": "", "model": ""},
    )
    assert count == sum("e2e" in t.latency_ms for t in turns)
    # exemplars only point at kept traces (an interrupted turn kept at its end has none)
    assert exemplar_trace_ids(registry) <= kept


# -- thousands of replayed turns: the fraction ------------------------------------------------


async def replay(
    provider: TracerProvider, registry: CollectorRegistry, sampling: lk_observe.TraceSampling
) -> tuple[lk_observe.InstrumentHandle, list[lk_observe.Turn]]:
    session: AgentSession[Any] = AgentSession()
    turns: list[lk_observe.Turn] = []
    handle = lk_observe.instrument(
        session,
        agent_name="fleet",
        tracer_provider=provider,
        registry=registry,
        monitor=lk_observe.LatencyMonitor(),
        on_turn=turns.append,
        trace_sampling=sampling,
    )
    for n in range(1, REPLAYED + 1):
        events = recorded_turn(0.4)
        for i, event in enumerate(events):
            emit_recorded(session, event)
            if n % FAILING_EVERY == 0 and event[0] == "speech_created" and i:
                error = llm.LLMError(
                    timestamp=0.0, label="scripted", error=RuntimeError(), recoverable=True
                )
                session.emit("error", ErrorEvent(error=error, source=None))
        speech_of(events)._mark_done()
        await asyncio.sleep(0)
        session._recorded_events.clear()
    handle.uninstrument()
    assert await asyncio.to_thread(lk_observe.flush, 30.0)
    await asyncio.sleep(0.05)  # on_turn hand-backs
    return handle, turns


@pytest.fixture(scope="module")
def replayed() -> tuple[
    lk_observe.InstrumentHandle, list[lk_observe.Turn], InMemorySpanExporter, CollectorRegistry
]:
    provider, exporter = memory_tracing()
    registry = CollectorRegistry()
    handle, turns = asyncio.run(replay(provider, registry, lk_observe.TraceSampling(FRACTION)))
    return handle, turns, exporter, registry


def test_the_fraction_of_fast_turns_is_within_a_binomial_bound(replayed) -> None:  # type: ignore[no-untyped-def]
    handle, turns, exporter, registry = replayed
    assert len(turns) == REPLAYED
    failed = [t for t in turns if t.error_type is not None]
    assert len(failed) == REPLAYED // FAILING_EVERY
    assert all(t.error_type == "llm_error" and t.trace_id is not None for t in failed)
    fast = [t for t in turns if t.error_type is None]
    kept_fast = sum(t.trace_id is not None for t in fast)
    sigma = math.sqrt(len(fast) * FRACTION * (1 - FRACTION))
    assert abs(kept_fast - len(fast) * FRACTION) <= 4.5 * sigma, kept_fast
    kept = {s.context.trace_id for s in roots(exporter)}
    assert len(kept) == kept_fast + len(failed)
    assert len(kept) + sampled_out(registry, "fleet") == REPLAYED
    assert exemplar_trace_ids(registry) <= kept
    # reproducible: the same session id and index decide the same, here or in a replay
    sampler = TurnSampler(lk_observe.TraceSampling(FRACTION), lk_observe.DEFAULT_SLOS)
    assert [sampler.in_fraction(t) for t in fast] == [t.trace_id is not None for t in fast]
    assert {t.session_id for t in turns} == {handle.session_id}


def test_failed_turns_carry_the_error_on_their_span(replayed) -> None:  # type: ignore[no-untyped-def]
    _, turns, exporter, _ = replayed
    failed = {t.trace_id for t in turns if t.error_type is not None}
    spans = [s for s in roots(exporter) if s.context.trace_id in failed]
    assert len(spans) == len(failed)
    for span in spans:
        assert span.attributes["error.type"] == "llm_error"
        assert span.status.status_code.name == "ERROR"


def test_a_users_otel_sampler_still_applies_on_top(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    monkeypatch.setenv(KEEP_FRACTION_ENV, str(FRACTION))  # configured from the environment
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # reads OTEL_TRACES_SAMPLER
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    handle, turns = asyncio.run(replay(provider, registry, None))  # type: ignore[arg-type]
    assert handle.trace_sampling == lk_observe.TraceSampling(FRACTION)
    sampler = TurnSampler(lk_observe.TraceSampling(FRACTION), lk_observe.DEFAULT_SLOS)
    kept_by_us = [t for t in turns if t.error_type is not None or sampler.in_fraction(t)]
    exported = {s.context.trace_id for s in roots(exporter)}
    # what the provider's sampler dropped has no trace id: no exemplar or log points at it
    assert {t.trace_id for t in turns if t.trace_id is not None} == exported
    assert exporter.get_finished_spans() and exemplar_trace_ids(registry) <= exported
    sigma = math.sqrt(len(kept_by_us) * 0.25)
    assert abs(len(exported) - len(kept_by_us) / 2) <= 4.5 * sigma
    assert len(kept_by_us) + sampled_out(registry, "fleet") == REPLAYED
