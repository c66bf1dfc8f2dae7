"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from tests.jobprocs import multiproc_dir
from tests.otel import memory_tracing

__all__ = ["multiproc_dir", "registry", "tracing"]


@pytest.fixture
def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A fresh SDK provider and the exporter that keeps every span it ends."""
    return memory_tracing()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry, read with `registry.get_sample_value(...)`."""
    return CollectorRegistry()
