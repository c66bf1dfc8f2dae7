"""With LiveKit's own telemetry on, each voice.turn links to LiveKit's agent_turn span."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from livekit.agents import telemetry
from livekit.agents.telemetry import traces as livekit_traces
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedTurn, build_pipeline, run_pipeline
from tests.otel import memory_tracing


@pytest.fixture
def livekit_spans() -> Iterator[InMemorySpanExporter]:
    provider, exporter = memory_tracing()
    telemetry.set_tracer_provider(provider, allow_pii=False)
    yield exporter
    livekit_traces.tracer.set_provider(trace.NoOpTracerProvider())


def test_voice_turn_links_to_livekit_agent_turn(livekit_spans: InMemorySpanExporter) -> None:
    provider, ours = memory_tracing()

    async def play() -> None:
        pipeline = build_pipeline([ScriptedTurn(), ScriptedTurn(llm_ttft_s=0.3)])
        lk_observe.instrument(
            pipeline.session,
            tracer_provider=provider,
            registry=CollectorRegistry(),
            monitor=lk_observe.LatencyMonitor(),
        )
        await run_pipeline(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)

    asyncio.run(play())
    agent_turns = {
        s.context.span_id: s for s in livekit_spans.get_finished_spans() if s.name == "agent_turn"
    }
    roots = [s for s in ours.get_finished_spans() if s.name == "voice.turn"]
    assert len(roots) == 2 and agent_turns
    for root in roots:
        assert len(root.links) == 1
        linked = root.links[0].context
        assert linked.span_id in agent_turns
        assert linked.trace_id == agent_turns[linked.span_id].context.trace_id
        assert linked.trace_id != root.context.trace_id  # our turn keeps a trace of its own


def test_lk_observe_leaves_livekits_own_telemetry_on(livekit_spans: InMemorySpanExporter) -> None:
    """lk_observe sets no global tracer or meter provider, keeps LiveKit's tracer, and leaves the
    per-turn metrics LiveKit's lk.agents.turn.* histograms are recorded from."""
    from opentelemetry import metrics

    global_tracer, global_meter = trace.get_tracer_provider(), metrics.get_meter_provider()
    livekit_tracer = livekit_traces.tracer._tracer_provider  # what set_tracer_provider installed
    provider, _ = memory_tracing()

    async def play() -> list[dict[str, object]]:
        pipeline = build_pipeline([ScriptedTurn(), ScriptedTurn(llm_ttft_s=0.3)])
        exporting = lk_observe.configure_tracing(
            endpoint="http://127.0.0.1:9", registry=CollectorRegistry()
        )
        lk_observe.instrument(
            pipeline.session,
            tracer_provider=provider,
            registry=CollectorRegistry(),
            monitor=lk_observe.LatencyMonitor(),
        )
        await run_pipeline(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.to_thread(lk_observe.shutdown_tracing, exporting, 1.0)
        return [dict(m.metrics) for m in pipeline.session.history.messages() if m.metrics]

    reports = asyncio.run(play())
    assert trace.get_tracer_provider() is global_tracer
    assert metrics.get_meter_provider() is global_meter
    assert livekit_traces.tracer._tracer_provider is livekit_tracer
    assert any(s.name == "agent_turn" for s in livekit_spans.get_finished_spans())
    # otel_metrics.flush_turn_metrics(session.history) records lk.agents.turn.* from these
    assert sum(1 for r in reports if "e2e_latency" in r) == 2
