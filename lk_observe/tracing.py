"""Turn -> OpenTelemetry spans: one `voice.turn` trace per turn, children at their real times."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
)
from opentelemetry.util.types import AttributeValue

from lk_observe.turns import BREAKDOWN_PARTS, Stage, Turn

TRACER_NAME = "lk_observe"
MAX_OPEN_TURNS = 1024  # root spans of replies still playing, per tracer
ROOT_SPAN = "voice.turn"

# Turn.stages key -> child span name: every pipeline stage, and tool time. e2e is the root span.
CHILD_SPANS = {
    "vad": "voice.vad",
    "stt": "voice.stt",
    "eou": "voice.eou",
    "llm_ttft": "voice.llm",
    "tts_ttfb": "voice.tts",
    "leading_silence": "voice.leading_silence",
    "tool": "voice.tool",
}
_LLM_ROUND_PREFIX = "llm_round_"
_NEW_TRACE = otel_context.Context()  # an empty context: no parent span
_UNSET = object()


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


# attribute keys built once, not per turn; other names (from a newer assembler) are formatted
_LATENCY_KEYS = {c: f"voice.latency.{c}_ms" for c in ("e2e", *CHILD_SPANS)}
_OVERRUN_KEYS = {c: f"voice.budget.overrun.{c}_ms" for c in ("e2e", *CHILD_SPANS)}
_BREAKDOWN_KEYS = {p: f"voice.breakdown.{p}_ms" for p in BREAKDOWN_PARTS}
_SETTING_KEYS = {p: f"voice.breakdown.{p}.setting" for p in BREAKDOWN_PARTS}
MEASURED_SPAN_PREFIX = "voice."  # measure_latency("retrieval") -> span "voice.retrieval"


def root_attributes(
    turn: Turn, overruns_ms: Mapping[str, float] | None = None
) -> dict[str, AttributeValue]:
    """The `voice.turn` span's attributes; `overruns_ms` defaults to the turn's own."""
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
    if turn.e2e_source is not None:
        attributes["voice.e2e.source"] = turn.e2e_source
    if turn.livekit_e2e_ms is not None:
        attributes["voice.latency.livekit_e2e_ms"] = round(turn.livekit_e2e_ms, 3)
    for component, value in turn.latency_ms.items():
        key = _LATENCY_KEYS.get(component) or f"voice.latency.{component}_ms"
        attributes[key] = round(value, 3)
    overruns = turn.budget_overruns_ms if overruns_ms is None else overruns_ms
    for component, over in overruns.items():
        key = _OVERRUN_KEYS.get(component) or f"voice.budget.overrun.{component}_ms"
        attributes[key] = round(over, 3)
    if turn.active_agent:
        attributes["gen_ai.agent.name"] = turn.active_agent
    if turn.played_ms is not None:
        attributes["voice.reply.played_ms"] = round(turn.played_ms, 3)
    if turn.tool_calls:
        attributes["voice.tool.calls"] = turn.tool_calls
    if turn.llm_rounds:
        attributes["voice.llm.rounds"] = turn.llm_rounds
    if turn.error_type is not None:
        attributes["error.type"] = turn.error_type
    for part, value in turn.breakdown_ms.items():
        attributes[_BREAKDOWN_KEYS.get(part) or f"voice.breakdown.{part}_ms"] = round(value, 3)
    for part, setting in turn.breakdown_settings.items():
        attributes[_SETTING_KEYS.get(part) or f"voice.breakdown.{part}.setting"] = setting
    return attributes


def _model_attributes(
    provider: str | None, model: str | None, stage: str
) -> dict[str, AttributeValue] | None:
    if provider is None and model is None:
        return None
    attributes: dict[str, AttributeValue] = {}
    if provider is not None:
        attributes[f"voice.{stage}.provider"] = provider
    if model is not None:
        attributes[f"voice.{stage}.model"] = model
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
    """Writes each turn as spans back-dated to when its stages really happened.

    The root span starts when the turn goes live (its first audio), so metrics exemplars can
    point at its trace at once, and ends with the children when the reply ends. Creating spans
    only hands them to the provider's span processor; lk_observe calls this from its sink
    thread, so even a synchronous exporter never runs on the agent's loop.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from lk_observe import __version__

        self._tracer = trace.get_tracer(TRACER_NAME, __version__, tracer_provider=tracer_provider)
        # live turns whose reply has not ended: (session, index) -> root span, its attributes
        self._open: OrderedDict[tuple[str, int], tuple[Span, dict[str, AttributeValue]]] = (
            OrderedDict()
        )

    def start(self, turn: Turn, link_to: SpanContext | None = None) -> SpanContext | None:
        """Open the turn's root span (at its live report); returns its context, None from a
        no-op provider."""
        attributes = root_attributes(turn)
        root = self._tracer.start_span(
            ROOT_SPAN,
            context=_NEW_TRACE,  # each turn is its own trace
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=[Link(link_to)] if link_to is not None and link_to.is_valid else None,
            start_time=_ns(_start(turn)),
        )
        self._open[(turn.session_id, turn.index)] = (root, attributes)
        if len(self._open) > MAX_OPEN_TURNS:  # replies that never end must not pile up
            _, (oldest, _) = self._open.popitem(last=False)
            oldest.end()
        span_context = root.get_span_context()
        return _recorded(span_context)

    def finish(
        self,
        turn: Turn,
        link_to: SpanContext | None = None,
        overruns_ms: Mapping[str, float] | None = None,
    ) -> SpanContext | None:
        """Write the complete turn: the children, the final attributes, the root's end."""
        opened = self._open.pop((turn.session_id, turn.index), None)
        if opened is None:
            self.start(turn, link_to)
            opened = self._open.pop((turn.session_id, turn.index))
        root, live_attributes = opened
        # only what the reply's end changed (played_ms, tools, later rounds): each attribute
        # set costs the SDK a validation
        final = root_attributes(turn, overruns_ms)
        changed = {k: v for k, v in final.items() if live_attributes.get(k, _UNSET) != v}
        if changed:
            root.set_attributes(changed)
        if turn.error_type is not None:
            root.set_status(Status(StatusCode.ERROR, turn.error_type))
        parent = trace.set_span_in_context(root)
        # creation order is irrelevant: every child carries its own start and end time
        for key, stage in turn.stages.items():
            self._child(turn, key, stage, parent)
        for name, stage in turn.measured:
            span = self._tracer.start_span(
                MEASURED_SPAN_PREFIX + name,
                context=parent,
                attributes=_MEASURED_ATTRIBUTES,
                start_time=_ns(stage.start),
            )
            span.end(end_time=_ns(stage.end))
        ends = [s.end for s in turn.stages.values()] + [s.end for _, s in turn.measured]
        end = max(turn.ended_at, *ends) if ends else turn.ended_at
        root.end(end_time=_ns(end))
        span_context = root.get_span_context()
        return _recorded(span_context)

    def record(
        self,
        turn: Turn,
        link_to: SpanContext | None = None,
        overruns_ms: Mapping[str, float] | None = None,
    ) -> SpanContext | None:
        """Emit a whole turn's spans at once; returns the root span's context."""
        self.start(turn, link_to)
        return self.finish(turn, link_to, overruns_ms)

    def _child(self, turn: Turn, key: str, stage: Stage, parent: otel_context.Context) -> None:
        # the span's own start/end carry its latency (also on the root as voice.latency.*):
        # no per-child attributes beyond gen_ai.*: each one costs the SDK per turn (performance.md)
        name = CHILD_SPANS.get(key)
        attributes: dict[str, AttributeValue] | None = None
        if name is None:
            if not key.startswith(_LLM_ROUND_PREFIX):
                return  # e2e is the root span itself
            name = "voice.llm"
            attributes = _llm_attributes(turn, int(key[len(_LLM_ROUND_PREFIX) :]))
        elif key == "llm_ttft":
            attributes = _llm_attributes(turn, 1)
        elif key == "stt":
            attributes = _model_attributes(turn.stt_provider, turn.stt_model, "stt")
        elif key == "tts_ttfb":
            attributes = _model_attributes(turn.tts_provider, turn.tts_model, "tts")
        span = self._tracer.start_span(
            name, context=parent, attributes=attributes, start_time=_ns(stage.start)
        )
        span.end(end_time=_ns(stage.end))


_MEASURED_ATTRIBUTES: dict[str, AttributeValue] = {"voice.measured": True}


def _recorded(span_context: SpanContext) -> SpanContext | None:
    """The context of a span that will be exported: None from a no-op provider or when the
    provider's own sampler (OTEL_TRACES_SAMPLER) dropped it, so no exemplar or log event
    points at a trace that does not exist."""
    return span_context if span_context.is_valid and span_context.trace_flags.sampled else None


def _start(turn: Turn) -> float:
    stages = turn.stages.values()
    return min(turn.started_at, *(s.start for s in stages)) if stages else turn.started_at
