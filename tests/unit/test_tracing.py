"""Turn -> spans: names, parents, attributes and back-dated timestamps (no session, no I/O)."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, SpanContext, TraceFlags

from lk_observe.tracing import CHILD_SPANS, ROOT_SPAN, TurnTracer
from lk_observe.turns import STAGES, Stage, Turn

T0 = 1_700_000_000.0


def ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def tool_turn() -> Turn:
    return Turn(
        index=3,
        speech_id="speech_1",
        started_at=T0,
        ended_at=T0 + 2.0,
        latency_ms={"e2e": 900.0, "vad": 150.0, "llm_ttft": 200.0, "tts_ttfb": 60.0},
        interrupted=False,
        tier="slow",
        session_id="abc",
        agent="support",
        stages={
            "e2e": Stage(T0, T0 + 0.9),
            "vad": Stage(T0, T0 + 0.15),
            "llm_ttft": Stage(T0 + 0.2, T0 + 0.4),
            "tool": Stage(T0 + 0.4, T0 + 0.6),
            "llm_round_2": Stage(T0 + 0.6, T0 + 0.75),
            "tts_ttfb": Stage(T0 + 0.8, T0 + 0.86),
        },
        tool_calls=1,
        llm_rounds=2,
        llm_model="gpt-4.1-mini",
        llm_provider="openai",
        input_tokens=48,
        output_tokens=12,
    )


def test_a_turn_is_one_trace_with_children_at_their_real_times(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    root_context = TurnTracer(provider).record(tool_turn())
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == ROOT_SPAN)
    assert root_context is not None and root.context is not None
    assert root.context.trace_id == root_context.trace_id
    assert root.parent is None  # each turn is its own trace
    assert (root.start_time, root.end_time) == (ns(T0), ns(T0 + 2.0))
    children = {(s.name, s.start_time, s.end_time) for s in spans if s is not root}
    assert children == {
        ("voice.vad", ns(T0), ns(T0 + 0.15)),
        ("voice.llm", ns(T0 + 0.2), ns(T0 + 0.4)),
        ("voice.tool", ns(T0 + 0.4), ns(T0 + 0.6)),
        ("voice.llm", ns(T0 + 0.6), ns(T0 + 0.75)),
        ("voice.tts", ns(T0 + 0.8), ns(T0 + 0.86)),
    }
    for span in spans:
        if span is not root:
            assert span.parent is not None and span.parent.span_id == root.context.span_id


def test_root_attributes_follow_the_contract(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    TurnTracer(provider).record(tool_turn(), overruns_ms={"e2e": 100.0})
    root = next(s for s in exporter.get_finished_spans() if s.name == ROOT_SPAN)
    attrs = dict(root.attributes or {})
    assert attrs["voice.turn.index"] == 3
    assert attrs["voice.speech_id"] == "speech_1"
    assert attrs["voice.agent"] == "support"
    assert attrs["voice.session.id"] == "abc"
    assert attrs["voice.turn.tier"] == "slow"
    assert attrs["voice.turn.interrupted"] is False
    assert attrs["voice.latency.e2e_ms"] == 900.0
    assert attrs["voice.latency.llm_ttft_ms"] == 200.0
    assert attrs["voice.budget.overrun.e2e_ms"] == 100.0
    assert attrs["voice.tool.calls"] == 1 and attrs["voice.llm.rounds"] == 2


def test_llm_spans_carry_gen_ai_attributes_and_usage_once(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    TurnTracer(provider).record(tool_turn())
    llm = sorted(
        (s for s in exporter.get_finished_spans() if s.name == "voice.llm"),
        key=lambda s: s.start_time or 0,
    )
    first, second = (dict(s.attributes or {}) for s in llm)
    for attrs in (first, second):
        assert attrs["gen_ai.request.model"] == "gpt-4.1-mini"
        assert attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.operation.name"] == "chat"
    assert (first["gen_ai.usage.input_tokens"], first["gen_ai.usage.output_tokens"]) == (48, 12)
    assert "gen_ai.usage.input_tokens" not in second  # the reply's total, counted once


def test_links_to_livekit_span_when_given(
    tracing: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = tracing
    theirs = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False, trace_flags=TraceFlags(1))
    TurnTracer(provider).record(tool_turn(), theirs)
    root = next(s for s in exporter.get_finished_spans() if s.name == ROOT_SPAN)
    assert [link.context.span_id for link in root.links] == [0xDEF]


def test_a_noop_provider_records_nothing_and_returns_no_context() -> None:
    assert TurnTracer(NoOpTracerProvider()).record(tool_turn()) is None


def test_every_pipeline_stage_has_a_child_span() -> None:
    assert set(CHILD_SPANS) == {*STAGES, "tool"}
