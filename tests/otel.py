"""An in-memory OpenTelemetry setup for tests: a fresh SDK provider whose every ended span is
kept, as OpenTelemetry's own instrumentor tests do."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def memory_tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider that hands each span to the returned exporter as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def turn_root(exporter: InMemorySpanExporter, trace_id: int | None) -> ReadableSpan:
    """The `voice.turn` root span of the turn with this trace id."""
    return next(
        span
        for span in exporter.get_finished_spans()
        if span.name == "voice.turn" and span.context and span.context.trace_id == trace_id
    )
