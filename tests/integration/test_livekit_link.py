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
