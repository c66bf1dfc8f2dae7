"""An in-memory OpenTelemetry setup for tests: a fresh SDK provider whose every ended span is
kept, as OpenTelemetry's own instrumentor tests do."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def memory_tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider that hands each span to the returned exporter as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter
