"""Turn -> OpenTelemetry spans: one `voice.turn` trace per turn, children at their real times."""

from __future__ import annotations

import dataclasses

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, TracerProvider
from opentelemetry.util.types import AttributeValue

from lk_observe.turns import Stage, Turn

TRACER_NAME = "lk_observe"
ROOT_SPAN = "voice.turn"

# Turn.stages key -> child span name. e2e is the root span itself.
_CHILD_SPANS = {
    "vad": "voice.vad",
    "stt": "voice.stt",
    "eou": "voice.eou",
    "llm_ttft": "voice.llm",
    "tts_ttfb": "voice.tts",
    "tool": "voice.tool",
}
_LLM_ROUND_PREFIX = "llm_round_"


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def root_attributes(turn: Turn) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "voice.turn.index": turn.index,
        "voice.turn.kind": turn.kind,
        "voice.turn.interrupted": turn.interrupted,
        "voice.agent": turn.agent,
        "voice.session.id": turn.session_id,
    }
    if turn.speech_id:
        attributes["voice.speech_id"] = turn.speech_id
    if turn.tier is not None:
        attributes["voice.turn.tier"] = turn.tier
    for component, value in turn.latency_ms.items():
        attributes[f"voice.latency.{component}_ms"] = round(value, 3)
    for component, over in turn.budget_overruns_ms.items():
        attributes[f"voice.budget.overrun.{component}_ms"] = round(over, 3)
    if turn.tool_calls:
        attributes["voice.tool.calls"] = turn.tool_calls
    if turn.llm_rounds:
        attributes["voice.llm.rounds"] = turn.llm_rounds
    return attributes


def _llm_attributes(turn: Turn, round_number: int) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "voice.llm.round": round_number,
    }
    if turn.llm_model:
        attributes["gen_ai.request.model"] = turn.llm_model
    if turn.llm_provider:
        attributes["gen_ai.provider.name"] = turn.llm_provider
    if round_number == 1:  # usage is the reply's total; put it on one span so sums stay right
        if turn.input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = turn.input_tokens
        if turn.output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = turn.output_tokens
    return attributes


class TurnTracer:
    """Writes each finished Turn as spans back-dated to when its stages really happened.

    Creating spans only hands them to the provider's span processor; lk_observe calls this
    from its sink thread, so even a synchronous exporter never runs on the agent's loop.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from lk_observe import __version__

        self._tracer = trace.get_tracer(TRACER_NAME, __version__, tracer_provider=tracer_provider)

    def record(self, turn: Turn, link_to: SpanContext | None = None) -> Turn:
        """Emit the turn's spans; returns the turn with its trace and root span ids set."""
        starts = [turn.started_at, *(s.start for s in turn.stages.values())]
        ends = [turn.ended_at, *(s.end for s in turn.stages.values())]
        links = [Link(link_to)] if link_to is not None and link_to.is_valid else None
        root = self._tracer.start_span(
            ROOT_SPAN,
            context=otel_context.Context(),  # each turn is its own trace
            kind=SpanKind.INTERNAL,
            attributes=root_attributes(turn),
            links=links,
            start_time=_ns(min(starts)),
        )
        parent = trace.set_span_in_context(root)
        for key, stage in sorted(turn.stages.items(), key=lambda kv: kv[1].start):
            self._child(turn, key, stage, parent)
        root.end(end_time=_ns(max(ends)))
        span_context = root.get_span_context()
        if not span_context.is_valid:  # a no-op provider: no ids to hand on
            return turn
        return dataclasses.replace(
            turn, trace_id=span_context.trace_id, span_id=span_context.span_id
        )

    def _child(self, turn: Turn, key: str, stage: Stage, parent: otel_context.Context) -> None:
        # the span's own start/end carry its latency (also on the root as voice.latency.*):
        # no per-child attributes beyond gen_ai.*, each costs the SDK ~2 us per turn
        attributes: dict[str, AttributeValue] | None = None
        if key.startswith(_LLM_ROUND_PREFIX):
            name = "voice.llm"
            attributes = _llm_attributes(turn, int(key[len(_LLM_ROUND_PREFIX) :]))
        elif key in _CHILD_SPANS:
            name = _CHILD_SPANS[key]
            if key == "llm_ttft":
                attributes = _llm_attributes(turn, 1)
        else:
            return  # e2e is the root span itself
        span = self._tracer.start_span(
            name, context=parent, attributes=attributes, start_time=_ns(stage.start)
        )
        span.end(end_time=_ns(stage.end))
